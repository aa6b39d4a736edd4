"""The batch contract between the data code and :class:`dazoo.DeepAtlas`, and the phase schedule.

One DeepAtlas training batch is a dict with the keys :data:`BATCH_KEYS`:

* ``"moving"``, ``"fixed"``: images ``(batch, D, H, W, 1)``, float32;
* ``"moving_labels"``, ``"fixed_labels"``: label maps ``(batch, D, H, W)`` of contiguous class
  indices ``0..K-1``, int32 (zeros where unlabelled);
* ``"moving_labelled"``, ``"fixed_labelled"``: per-sample flags ``(batch,)``, float32, 1 where
  the label map is a manual one, 0 where it must not be used.

and may hold the optional keys of :data:`BATCH_DEFAULTS` (the model reads a missing one as
its default for every sample):

* ``"shared_contrast"``: per-sample flags ``(batch,)``, float32, 1 where the two images share
  their contrast (both real scans of one protocol, or synthesised with shared tissue
  intensities), 0 where one of them was synthesised with its own (SynthMorph-style pairs,
  whose image similarity the recipe's ``losses.synth_similarity_weight`` may weigh down).

:func:`make_batch` is the only place that builds such a dict; the model, the datasets
(:mod:`dazoo.training.pairs`) and :mod:`dazoo.synthetic` import it from here. It sits below
both (it imports neither the model nor the data code), so no import runs up the floors.

:class:`Schedule` says which networks each training step updates (DeepAtlas's alternation of
registration and segmentation steps), shared by the model (which picks its step from it), the
datasets (which draw labelled images for segmentation steps) and the training engine.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["BATCH_KEYS", "BATCH_DEFAULTS", "MODES", "NETWORKS", "REGISTRATION", "SEGMENTATION",
           "Schedule", "make_batch"]

BATCH_KEYS = ("moving", "fixed", "moving_labels", "fixed_labels", "moving_labelled",
              "fixed_labelled")
#: Optional per-sample keys and the value a batch without them means.
BATCH_DEFAULTS = {"shared_contrast": 1.0}
MODES = ("joint", "simultaneous", "registration_only", "segmentation_only")


#: The two networks a step may update.
REGISTRATION, SEGMENTATION = "registration", "segmentation"
NETWORKS = (REGISTRATION, SEGMENTATION)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which networks each training step updates: the one place that reads the mode.

    In ``"joint"`` mode (the paper's alternation), steps cycle through ``registration_steps``
    registration steps and then ``segmentation_steps`` segmentation steps, counted from step 0
    (the number of updates both optimizers have made). ``"registration_only"`` and
    ``"segmentation_only"`` update one network at every step. In ``"simultaneous"`` mode every
    step updates both networks from one batch and shared forward passes (the cycle lengths are
    not used). The model, the datasets, the callbacks and the engine ask the schedule
    (:meth:`updates`, :attr:`networks`, :attr:`shared`) instead of switching on the mode.

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

    @property
    def networks(self) -> frozenset[str]:
        """The networks some step updates (a subset of :data:`NETWORKS`)."""
        return {"registration_only": frozenset({REGISTRATION}),
                "segmentation_only": frozenset({SEGMENTATION})}.get(self.mode,
                                                                    frozenset(NETWORKS))

    @property
    def shared(self) -> bool:
        """Whether every step updates both networks from one batch (``"simultaneous"``)."""
        return self.mode == "simultaneous"

    @property
    def alternates(self) -> bool:
        """Whether steps alternate between the networks (``"joint"``)."""
        return self.mode == "joint"

    def updates(self, step: int) -> frozenset[str]:
        """The networks that the step numbered ``step`` (from 0) updates: one of them, or
        both in ``"simultaneous"`` mode."""
        if not self.alternates:
            return self.networks
        cycle = self.registration_steps + self.segmentation_steps
        return frozenset({REGISTRATION if int(step) % cycle < self.registration_steps
                          else SEGMENTATION})

    def updates_in(self, steps: int) -> dict[str, int]:
        """``{network: number of its updates}`` in the first ``steps`` steps (at most one
        cycle's rounding up in ``"joint"`` mode; the length of each optimizer's schedule)."""
        if not self.alternates:
            return {network: int(steps) for network in self.networks}
        cycle = self.registration_steps + self.segmentation_steps
        return {REGISTRATION: math.ceil(steps * self.registration_steps / cycle),
                SEGMENTATION: math.ceil(steps * self.segmentation_steps / cycle)}

    def steps_done(self, registration_updates: int, segmentation_updates: int) -> int:
        """Training steps made, from the two optimizers' update counts (a simultaneous step
        updates both: it counts once)."""
        if self.shared:
            return int(registration_updates)
        return int(registration_updates) + int(segmentation_updates)


def make_batch(samples: Sequence[tuple[np.ndarray, np.ndarray | None,
                                       np.ndarray, np.ndarray | None]],
               shared_contrast: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
    """A batch (see the module docstring) from ``(moving, moving_classes, fixed, fixed_classes)``
    samples: images ``(D, H, W)``, class maps ``(D, H, W)`` or None where unlabelled;
    ``shared_contrast``: one flag per sample (default: every pair shares its contrast)."""
    if not samples:
        raise ValueError("a batch needs at least one sample")
    if shared_contrast is None:
        shared_contrast = [BATCH_DEFAULTS["shared_contrast"]] * len(samples)
    if len(shared_contrast) != len(samples):
        raise ValueError(f"shared_contrast has {len(shared_contrast)} flags for "
                         f"{len(samples)} samples")
    batch = {key: [] for key in BATCH_KEYS}
    for moving, moving_classes, fixed, fixed_classes in samples:
        for side, image, classes in (("moving", moving, moving_classes),
                                     ("fixed", fixed, fixed_classes)):
            image = np.asarray(image, np.float32)
            batch[side].append(image[..., None])
            batch[f"{side}_labels"].append(np.zeros(image.shape, np.int32) if classes is None
                                           else np.asarray(classes, np.int32))
            batch[f"{side}_labelled"].append(np.float32(classes is not None))
    batch["shared_contrast"] = [float(bool(flag)) for flag in shared_contrast]
    return {key: np.stack(values) if key.endswith(("moving", "fixed", "labels"))
            else np.array(values, np.float32) for key, values in batch.items()}
