"""The batch contract between the data code and :class:`dazoo.DeepAtlas`, and the phase schedule.

One DeepAtlas training batch is a dict with exactly the keys :data:`BATCH_KEYS`:

* ``"moving"``, ``"fixed"``: images ``(batch, D, H, W, 1)``, float32;
* ``"moving_labels"``, ``"fixed_labels"``: label maps ``(batch, D, H, W)`` of contiguous class
  indices ``0..K-1``, int32 (zeros where unlabelled);
* ``"moving_labelled"``, ``"fixed_labelled"``: per-sample flags ``(batch,)``, float32, 1 where
  the label map is a manual one, 0 where it must not be used.

:func:`make_batch` is the only place that builds such a dict; the model, the datasets
(:mod:`dazoo.training.pairs`) and :mod:`dazoo.synthetic` import it from here. This module
imports neither the model nor the data code.

:class:`Schedule` is DeepAtlas's alternation of registration and segmentation steps, shared by
the model (which picks its phase from it) and the datasets (which draw labelled images for
segmentation steps).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["BATCH_KEYS", "MODES", "PHASES", "Schedule", "make_batch"]

BATCH_KEYS = ("moving", "fixed", "moving_labels", "fixed_labels", "moving_labelled",
              "fixed_labelled")
MODES = ("joint", "simultaneous", "registration_only", "segmentation_only")
PHASES = ("registration", "segmentation")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which phase each training step is.

    In ``"joint"`` mode, steps cycle through ``registration_steps`` registration steps and
    then ``segmentation_steps`` segmentation steps, counted from step 0 (the number of
    updates both optimizers have made). The single-network modes have one phase; in
    ``"simultaneous"`` mode every step is a ``"simultaneous"`` one (both networks updated from
    one batch; the cycle lengths are not used).

    Args:
        mode: one of :data:`MODES`.
        registration_steps: registration steps per cycle (>= 1).
        segmentation_steps: segmentation steps per cycle (>= 1).
    """

    mode: str = "joint"
    registration_steps: int = 1
    segmentation_steps: int = 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if int(self.registration_steps) < 1 or int(self.segmentation_steps) < 1:
            raise ValueError("registration_steps and segmentation_steps must be >= 1")

    def phase(self, step: int) -> str:
        """``"registration"`` or ``"segmentation"`` for the step numbered ``step`` (from 0)."""
        if self.mode == "registration_only":
            return "registration"
        if self.mode == "segmentation_only":
            return "segmentation"
        if self.mode == "simultaneous":
            return "simultaneous"
        cycle = self.registration_steps + self.segmentation_steps
        return "registration" if int(step) % cycle < self.registration_steps else "segmentation"


def make_batch(samples: Sequence[tuple[np.ndarray, np.ndarray | None,
                                       np.ndarray, np.ndarray | None]]) -> dict[str, np.ndarray]:
    """A batch (see the module docstring) from ``(moving, moving_classes, fixed, fixed_classes)``
    samples: images ``(D, H, W)``, class maps ``(D, H, W)`` or None where unlabelled."""
    if not samples:
        raise ValueError("a batch needs at least one sample")
    batch = {key: [] for key in BATCH_KEYS}
    for moving, moving_classes, fixed, fixed_classes in samples:
        for side, image, classes in (("moving", moving, moving_classes),
                                     ("fixed", fixed, fixed_classes)):
            image = np.asarray(image, np.float32)
            batch[side].append(image[..., None])
            batch[f"{side}_labels"].append(np.zeros(image.shape, np.int32) if classes is None
                                           else np.asarray(classes, np.int32))
            batch[f"{side}_labelled"].append(np.float32(classes is not None))
    return {key: np.stack(values) if key.endswith(("moving", "fixed", "labels"))
            else np.array(values, np.float32) for key, values in batch.items()}
