"""Input sanity checks: is this the kind of scan the preset was trained on?

A network segments whatever it is given: a head with its scalp and skull, a brain whose header
says 10 mm voxels, or a knee given to the brain preset all come out as label maps. These checks
look at the input before the network does, with thresholds stored in the preset
(``checks.json``) and measured on real scans and on damaged copies of them
(``benchmarks/sanity_thresholds.py``):

- **size**: the foreground's physical extent along each world axis (RAS mm, robust 1st-99th
  percentile span of the voxels above 10 % of the robust intensity range), as a ratio of the
  preset's reference extent: catches wrong voxel sizes in the header and wrong anatomy;
- **alignment**: the correlation between the template and the image after the affine
  pre-alignment (:func:`dazoo.preprocess.alignment_score`): catches failed alignments;
- **outside**: for presets trained on masked scans (skull-stripped brains), the fraction of
  the aligned image's bright voxels that fall outside the template's foreground (dilated):
  catches scans that were not skull-stripped;
- after the segmenter, for presets without a template (the knee): **volumes**, each
  structure's volume within bounds measured on manual label maps, and **confidence**, the
  segmenter's mean highest class probability over the voxels it labels
  (:func:`measure_output`, ``benchmarks/knee_sanity.py``): catch wrong anatomy.

:func:`check_input` (and :func:`check_output`) return one line per failed check (empty when
all pass). The pipeline
attaches them to its results (``result.warnings``), the CLI prints them as ``warning: FILE:
...`` and, with ``--strict``, refuses the input (exit 2, nothing written).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from dazoo.errors import DazooInputError
from dazoo.io import Volume

__all__ = ["InputChecks", "measure_input", "check_input", "foreground_extent",
           "measure_output", "check_output", "region_confidence", "label_agreement",
           "top_class"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class InputChecks:
    """Thresholds of the sanity checks (``checks.json`` in a preset).

    Args:
        extent_mm: the reference foreground extent along the world R, A, S axes (mm).
        extent_ratio: ``(low, high)``: each axis's extent / the reference must lie within.
        min_alignment: lowest accepted template correlation after alignment (None: no check).
        max_outside: highest accepted fraction of bright voxels outside the template's
            dilated foreground (None: no check; for presets trained on masked scans).
        outside_margin_mm: the dilation of the template's foreground for ``max_outside``.
        needs: what the preset expects, for the messages (e.g. "a skull-stripped T1 brain").
        volumes_ml: ``{id: (low, high)}``: accepted volume (mL) of each structure in the
            segmentation (None: no check).
        min_confidence: lowest accepted mean highest class probability over the labelled
            voxels (None: no check).
        scale_range: ``(low, high)``: accepted scale of the affine alignment (cube root of
            its determinant; None: no check). Catches what the outside check cannot see: a
            head shrunk into a brain template by the alignment.
    """

    extent_mm: tuple[float, float, float]
    extent_ratio: tuple[float, float] = (0.6, 1.6)
    min_alignment: float | None = None
    max_outside: float | None = None
    outside_margin_mm: float = 6.0
    needs: str = "the anatomy this preset was trained on"
    volumes_ml: Mapping[str, tuple[float, float]] | None = None
    min_confidence: float | None = None
    scale_range: tuple[float, float] | None = None

    @property
    def after_network(self) -> bool:
        """Whether some checks look at the segmentation (:func:`check_output`)."""
        return bool(self.volumes_ml) or self.min_confidence is not None

    def __post_init__(self):
        extent = tuple(float(v) for v in self.extent_mm)
        low, high = (float(v) for v in self.extent_ratio)
        if len(extent) != 3 or not all(v > 0 for v in extent) or not 0 < low < 1 < high:
            raise DazooInputError("checks", "needs 3 positive extent_mm and extent_ratio "
                                            "(low < 1 < high)")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, source: str = "checks") -> InputChecks:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields - {"measured"})
        if unknown:
            raise DazooInputError(source, f"unknown key(s) {unknown}")
        values = {k: v for k, v in config.items() if k in fields}
        for key in ("extent_mm", "extent_ratio", "scale_range"):
            if values.get(key) is not None:
                values[key] = tuple(float(v) for v in values[key])
        if values.get("volumes_ml") is not None:
            try:
                values["volumes_ml"] = {str(int(k)): (float(lo), float(hi))
                                        for k, (lo, hi) in values["volumes_ml"].items()}
            except (TypeError, ValueError, AttributeError):
                raise DazooInputError(source, "volumes_ml must map label ids to [low, high] "
                                              "mL") from None
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> InputChecks:
        with open(path) as handle:
            return cls.from_dict(json.load(handle), source=os.fspath(path))


def foreground_extent(volume: Volume) -> np.ndarray:
    """Physical extent (mm) of an image's foreground along the world R, A, S axes: the span
    between the 1st and 99th percentiles of the world positions of the voxels above 10 % of
    the robust intensity range (0.5th-99.5th percentiles); zeros if there is none."""
    array = np.asarray(volume.array)
    step = max(1, int(round((array.size / 2e6) ** (1 / 3))))
    sample = np.asarray(array[::step, ::step, ::step], np.float32)
    low, high = np.percentile(sample, [0.5, 99.5])
    index = np.argwhere(sample > low + 0.1 * (high - low)) * step
    if len(index) < 10:
        return np.zeros(3)
    world = index @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    lower, upper = np.percentile(world, [1, 99], axis=0)
    return upper - lower


def measure_input(volume: Volume, template: Volume | None, alignment: np.ndarray | None,
                  *, outside_margin_mm: float = 6.0) -> dict[str, Any]:
    """The raw measurements behind the checks (for calibration and the messages):
    ``extent_mm`` (3), and with a template and alignment ``alignment`` (correlation) and
    ``outside`` (fraction of bright aligned voxels outside the dilated template
    foreground)."""
    from dazoo.preprocess import alignment_score

    out: dict[str, Any] = {"extent_mm": foreground_extent(volume).tolist()}
    if template is None or alignment is None:
        return out
    out["alignment"] = alignment_score(volume, template, alignment)
    # How much the alignment had to scale the template to fit the image (the cube root of
    # its linear part's determinant): a head fitted into a brain template needs more.
    out["scale"] = float(abs(np.linalg.det(np.asarray(alignment)[:3, :3])) ** (1 / 3))
    out["outside"] = _outside_fraction(volume, template, alignment, outside_margin_mm)
    return out


def _outside_fraction(volume: Volume, template: Volume, alignment: np.ndarray,
                      margin_mm: float) -> float:
    """Of the template-grid voxels where the aligned image is bright (above 20 % of its robust
    range), the fraction outside the template's foreground dilated by ``margin_mm``."""
    near = _near_template(template, float(margin_mm))
    # native voxel coordinates of every template voxel, axis by axis (no (N, 4) index array)
    matrix = np.linalg.inv(volume.affine) @ np.asarray(alignment, float) @ template.affine
    grids = np.ogrid[tuple(slice(0, n) for n in near.shape)]
    native = np.empty((3,) + near.shape)
    for k in range(3):
        native[k] = matrix[k, 3] + sum(matrix[k, j] * grids[j] for j in range(3))
    upper = np.array(volume.shape[:3], float) - 1
    valid = np.all((native >= 0) & (native <= upper.reshape(3, 1, 1, 1)), axis=0)
    array = np.asarray(volume.array, np.float32)
    values = ndi.map_coordinates(array, native[:, valid], order=1).astype(np.float32)
    if not values.size:
        return 0.0
    low, high = np.percentile(values, [0.5, 99.5])
    bright = values > low + 0.2 * (high - low)
    if not bright.any():
        return 0.0
    return float(np.mean(~near[valid][bright]))


#: The template's foreground dilated by a margin, per template and margin (an exact
#: distance transform of the template grid: computed once per process, not per image).
_NEAR: dict = {}


def _near_template(template: Volume, margin_mm: float) -> np.ndarray:
    t = np.asarray(template.array, np.float32)
    key = (t.shape, np.asarray(template.affine, float).tobytes(), margin_mm)
    for cached_key, (source, near) in _NEAR.items():
        if cached_key == key and np.array_equal(source, t):
            return near
    spacing = np.sqrt((template.affine[:3, :3] ** 2).sum(axis=0))
    inside_template = t > t.min() + 0.02 * (np.percentile(t, 99.5) - t.min())
    distance = ndi.distance_transform_edt(~inside_template, sampling=spacing)
    near = distance <= margin_mm
    if len(_NEAR) >= 4:
        _NEAR.pop(next(iter(_NEAR)))
    _NEAR[key] = (t.copy(), near)
    return near


def check_input(measured: Mapping[str, Any], checks: InputChecks) -> list[str]:
    """One line per failed check of :func:`measure_input`'s ``measured`` (empty: all pass)."""
    problems = []
    extent = np.asarray(measured["extent_mm"], float)
    reference = np.asarray(checks.extent_mm, float)
    if not np.any(extent > 0):
        return [f"no foreground (nothing above 10 % of the intensity range); this preset "
                f"expects {checks.needs}"]
    ratio = extent / reference
    low, high = checks.extent_ratio
    if not np.all((ratio >= low) & (ratio <= high)):
        shown = " x ".join(f"{v:.0f}" for v in extent)
        expected = " x ".join(f"{v:.0f}" for v in reference)
        problems.append(f"implausible physical size: the foreground spans {shown} mm (R x A x S)"
                        f", {checks.needs} spans about {expected} mm; check the voxel size "
                        "in the header and the anatomy")
    score = measured.get("alignment")
    if checks.min_alignment is not None and score is not None and score < checks.min_alignment:
        problems.append(f"the alignment to the template looks failed (correlation "
                        f"{score:.2f} < {checks.min_alignment:.2f}); is this {checks.needs}?")
    scale = measured.get("scale")
    if checks.scale_range is not None and scale is not None and not (
            checks.scale_range[0] <= scale <= checks.scale_range[1]):
        problems.append(f"the alignment had to scale the template by {scale:.2f} (the "
                        f"training scans: {checks.scale_range[0]:.2f}..{checks.scale_range[1]:.2f})"
                        f": a head or another field of view? this preset expects {checks.needs}"
                        f" (--skull-strip auto extracts the brain of a head)")
    outside = measured.get("outside")
    if checks.max_outside is not None and outside is not None and outside > checks.max_outside:
        problems.append(f"{100 * outside:.0f} % of the bright voxels lie outside the template's "
                        f"foreground (more than {100 * checks.max_outside:.0f} %): not "
                        f"skull-stripped or masked? this preset expects {checks.needs}")
    return problems


def top_class(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(best, top)``: the winning class and its probability per voxel of ``(..., K)``
    scores (computed once for :func:`measure_output` and :func:`region_confidence`: each
    is a pass over all K channels)."""
    scores = np.asarray(scores)
    best = scores.argmax(axis=-1)
    return best, np.take_along_axis(scores, best[..., None], axis=-1)[..., 0]


def measure_output(volumes_mm3: Mapping[int, float], scores: np.ndarray, *,
                   top: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """What the segmentation says about its input: ``volumes_ml`` (``{"id": mL}``, from
    the label map on the input's grid) and ``confidence`` (the mean highest class
    probability over the model-grid voxels not labelled background; 0 if none).
    ``top``: :func:`top_class` of ``scores`` if already computed."""
    best, highest = top if top is not None else top_class(scores)
    labelled = best != 0
    confidence = float(highest[labelled].mean()) if labelled.any() else 0.0
    return {"volumes_ml": {str(int(i)): float(v) / 1000.0 for i, v in volumes_mm3.items()
                           if int(i) != 0},
            "confidence": confidence}


def region_confidence(scores: np.ndarray, class_ids, *,
                      top: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """``{"id": mean highest class probability over the model-grid voxels labelled id}``
    for the labelled classes present (a per-structure QC score, SynthSeg-like). ``top``:
    :func:`top_class` of ``scores`` if already computed."""
    best, highest = top if top is not None else top_class(scores)
    best, highest = best.ravel(), highest.ravel().astype(np.float64)
    classes = np.shape(scores)[-1]
    count = np.bincount(best, minlength=classes)
    total = np.bincount(best, weights=highest, minlength=classes)
    return {str(int(class_ids[k])): float(total[k] / count[k])
            for k in range(1, classes) if count[k] > 0}


def label_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the non-zero classes present in either of two class maps (1.0 when
    neither has any)."""
    from dazoo.metrics import dice_per_label

    ids = [int(i) for i in np.union1d(np.unique(a), np.unique(b)) if i != 0]
    return float(np.mean(list(dice_per_label(a, b, ids).values()))) if ids else 1.0


def check_output(measured: Mapping[str, Any], checks: InputChecks,
                 names: Mapping[int, str] | None = None) -> list[str]:
    """One line per failed check of :func:`measure_output`'s ``measured`` (empty: all
    pass, or the preset has no such checks)."""
    problems = []
    names = names or {}
    volumes = measured.get("volumes_ml") or {}
    odd = []
    for key, (low, high) in (checks.volumes_ml or {}).items():
        value = float(volumes.get(key, 0.0))
        if not low <= value <= high:
            odd.append(f"{names.get(int(key), key)} {value:.2f} mL (expected "
                       f"{low:g}..{high:g})")
    if odd:
        problems.append("implausible segmentation: " + ", ".join(odd)
                        + f"; is this {checks.needs}?")
    confidence = measured.get("confidence")
    if (checks.min_confidence is not None and confidence is not None
            and confidence < checks.min_confidence):
        problems.append(f"the segmenter is unsure (mean confidence {confidence:.2f} < "
                        f"{checks.min_confidence:.2f}); is this {checks.needs}?")
    return problems


def extent_summary(values: Sequence[Sequence[float]]) -> list[float]:
    """The reference extent of a set of scans (median per axis)."""
    return np.median(np.asarray(values, float), axis=0).tolist()
