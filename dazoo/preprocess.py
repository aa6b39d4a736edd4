"""Preprocessing: from a scan in its native space to the model's grid, with the affines kept.

The steps, driven by a declarative :class:`PreprocessConfig` that a preset stores:

1. read and validate the image (:func:`dazoo.io.read_image`);
2. affine (12 parameters) or rigid pre-alignment to the preset's template
   (:func:`align_affine`, SimpleITK: centre-of-mass initialisation, multi-resolution,
   correlation or Mattes mutual information on sampled voxels);
3. one resampling onto the model grid: canonical orientation (``config.orientation``),
   ``config.voxel_size`` and ``config.shape`` (each a multiple of ``2**config.levels``). The
   reorientation, the alignment, the change of voxel size and the crop/pad are *composed* as
   4x4 matrices and applied in a single interpolation, so the image is interpolated once;
4. intensity normalisation (robust percentiles to [0, 1], min-max, z-score or none).

Coordinates: every affine maps voxel indices ``(i, j, k)`` to world RAS+ millimetres, as in
nibabel. The recorded chain (:class:`Preprocessed`) holds the native grid (shape, affine), the
alignment matrix and the model grid's affine, so :mod:`dazoo.postprocess` maps results back onto
the input's own grid in one resampling.

The alignment matrix ``alignment`` (4x4, world -> world) maps a point of the *template* world
(the model grid's world) to the corresponding point of the *input's* native world: it is a
"fixed to moving" (pull-back) transform, as ITK registration returns. A model-grid voxel ``v``
samples the native image at native voxel ``inv(native_affine) @ alignment @ affine @ v``.

This module imports numpy, scipy and nibabel only; SimpleITK is imported inside
:func:`align_affine`.

Example:

>>> config = PreprocessConfig(voxel_size=(1, 1, 1), shape=(160, 192, 160),
...                           template="template.nii.gz", alignment="affine")
>>> pre = Preprocessor(config, root="path/to/preset").apply("scan.mgz")  # doctest: +SKIP
>>> pre.array.shape, pre.affine                                           # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from dazoo.errors import DazooInputError
from dazoo.io import Source, Volume, read_image, read_labels

__all__ = [
    "PreprocessConfig",
    "Preprocessor",
    "Preprocessed",
    "align_affine",
    "alignment_score",
    "mirror_matrix",
    "build_affine_template",
    "grid_affine",
    "orientation_matrix",
    "reorient",
    "resample",
    "intensity_parameters",
    "normalise_intensity",
    "image_centre",
]

_AXES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0),
         "S": (2, 1.0), "I": (2, -1.0)}
_INTENSITY_KEYS = {
    "percentile": {"method", "lower", "upper", "nonzero"},
    "minmax": {"method", "nonzero"},
    "zscore": {"method", "nonzero"},
    "none": {"method"},
}
_ALIGNMENTS = ("affine", "rigid", "none")
_METRICS = ("correlation", "mi")
_CENTRES = ("mass", "bbox", "fov")
#: LPS <-> RAS: ITK's world frame has x and y negated with respect to nibabel's.
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """How a preset expects its images: a declarative, JSON-serialisable description.

    Args:
        voxel_size: 3 floats. Model voxel size in mm along the model's axes.
        shape: 3 ints. Model grid shape ``(D, H, W)``; each a multiple of ``2**levels``.
        orientation: str. Axis codes of the model grid (nibabel's convention: ``"RAS"`` means
            the first axis points to the Right, the second Anterior, the third Superior).
        levels: int. Number of down-sampling levels of the network (shape check).
        intensity: dict. ``{"method": "percentile", "lower": 0.5, "upper": 99.5}`` (clip to
            the percentiles, scale to [0, 1]), ``{"method": "minmax"}``,
            ``{"method": "zscore"}`` or ``{"method": "none"}``; ``"nonzero": true`` computes
            the statistics on non-zero voxels only (skull-stripped or masked images).
        template: str or None. Reference image, a path relative to the preset folder (the
            ``root`` given to :class:`Preprocessor`). The model grid is centred on it.
        alignment: str. ``"affine"`` (12 parameters), ``"rigid"`` or ``"none"``. Anything but
            ``"none"`` needs a template.
        metric: str. Alignment similarity: ``"correlation"`` (same modality) or ``"mi"``
            (Mattes mutual information, any modality).
        centre: str. Without a template, where the model grid is centred on the image:
            ``"mass"`` (intensity centre of mass), ``"bbox"`` (foreground bounding box) or
            ``"fov"`` (centre of the field of view).
        mirror: str. ``"none"``, or ``"auto"``: the alignment is also tried on the image
            mirrored left-right, and the better of the two (correlation with the template
            after alignment) is kept, so that a left limb is processed on the (right)
            template's side; the reflection is part of the recorded alignment, so results go
            back onto the input's grid unmirrored. Needs an alignment. Only for label tables
            without left/right structures (knee: medial/lateral are kept by a reflection; a
            brain's Left-X/Right-X would be swapped): ``dazoo train`` refuses the others.
    """

    voxel_size: tuple[float, float, float]
    shape: tuple[int, int, int]
    orientation: str = "RAS"
    levels: int = 4
    intensity: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"method": "percentile", "lower": 0.5, "upper": 99.5}
    )
    template: str | None = None
    alignment: str = "none"
    metric: str = "correlation"
    centre: str = "mass"
    mirror: str = "none"

    def __post_init__(self):
        name = "preprocess config"
        set_ = lambda key, value: object.__setattr__(self, key, value)  # noqa: E731
        set_("voxel_size", _floats3(self.voxel_size, "voxel_size", name))
        if not isinstance(self.levels, int) or isinstance(self.levels, bool) or self.levels < 0:
            raise DazooInputError(name, f"levels must be a non-negative int, got {self.levels!r}")
        set_("shape", _shape3(self.shape, 2**self.levels, name))
        set_("orientation", _check_orientation(self.orientation, name))
        set_("intensity", _check_intensity(self.intensity, name))
        if self.template is not None and not isinstance(self.template, (str, os.PathLike)):
            raise DazooInputError(name, f"template must be a path or null, got {self.template!r}")
        if self.template is not None:
            set_("template", os.fspath(self.template))
        _choice(self.alignment, _ALIGNMENTS, "alignment", name)
        _choice(self.metric, _METRICS, "metric", name)
        _choice(self.centre, _CENTRES, "centre", name)
        if self.alignment != "none" and self.template is None:
            raise DazooInputError(name, f"alignment {self.alignment!r} needs a template")
        _choice(self.mirror, ("none", "auto"), "mirror", name)
        if self.mirror != "none" and self.alignment == "none":
            raise DazooInputError(name, "mirror \"auto\" needs an alignment")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (lists for tuples)."""
        out = dataclasses.asdict(self)
        out["voxel_size"] = list(self.voxel_size)
        out["shape"] = list(self.shape)
        out["intensity"] = dict(self.intensity)
        if self.mirror == "none":  # the configs (and fingerprints) of presets before it
            del out["mirror"]
        return out

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, source: str = "preprocess config"):
        """Build from a dict; unknown or missing keys raise :class:`DazooInputError`."""
        if not isinstance(config, Mapping):
            raise DazooInputError(source, "must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise DazooInputError(
                source, f"unknown key(s) {', '.join(map(repr, unknown))}; known: {sorted(known)}"
            )
        missing = [k for k in ("voxel_size", "shape") if k not in config]
        if missing:
            raise DazooInputError(source, f"missing key(s) {', '.join(map(repr, missing))}")
        try:
            return cls(**config)
        except DazooInputError as err:
            raise DazooInputError(source, err.problem) from None

    def to_json(self) -> str:
        """The config as an indented JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> PreprocessConfig:
        """Read a JSON file (e.g. a preset's ``preprocess.json``)."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError) as err:
            raise DazooInputError(path, f"cannot be read as JSON ({err})") from None
        return cls.from_dict(config, source=path)

    def fingerprint(self) -> str:
        """A short hash of the config (for cache keys)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def _choice(value, choices, key, name):
    if value not in choices:
        raise DazooInputError(name, f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _floats3(value, key, name) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise DazooInputError(name, f"{key} must be 3 numbers, got {value!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) and v > 0 for v in out):
        raise DazooInputError(name, f"{key} must be 3 positive numbers, got {value!r}")
    return out


def _shape3(value, multiple, name) -> tuple[int, int, int]:
    try:
        values = list(value)
        ok = len(values) == 3 and all(
            not isinstance(v, bool) and float(v) == int(v) and int(v) > 0 for v in values
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DazooInputError(name, f"shape must be 3 positive ints, got {value!r}")
    out = tuple(int(v) for v in values)
    bad = [n for n in out if n % multiple]
    if bad:
        raise DazooInputError(
            name, f"shape {list(out)}: each dimension must be a multiple of {multiple} (2**levels)"
        )
    return out


def _check_orientation(code, name) -> str:
    if not isinstance(code, str) or len(code) != 3:
        raise DazooInputError(name, f"orientation must be 3 axis codes like 'RAS', got {code!r}")
    code = code.upper()
    if any(c not in _AXES for c in code) or len({_AXES[c][0] for c in code}) != 3:
        raise DazooInputError(name, f"orientation {code!r} is not a valid axis code")
    return code


def _check_intensity(spec, name) -> dict[str, Any]:
    if isinstance(spec, str):
        spec = {"method": spec}
    if not isinstance(spec, Mapping) or "method" not in spec:
        raise DazooInputError(name, f"intensity must be a dict with a 'method', got {spec!r}")
    spec = dict(spec)
    method = spec["method"]
    if method not in _INTENSITY_KEYS:
        raise DazooInputError(
            name, f"intensity method must be one of {sorted(_INTENSITY_KEYS)}, got {method!r}"
        )
    unknown = sorted(set(spec) - _INTENSITY_KEYS[method])
    if unknown:
        raise DazooInputError(name, f"unknown intensity key(s) {unknown} for method {method!r}")
    if method == "percentile":
        spec.setdefault("lower", 0.5)
        spec.setdefault("upper", 99.5)
        lower, upper = spec["lower"], spec["upper"]
        if not (isinstance(lower, (int, float)) and isinstance(upper, (int, float))
                and 0 <= lower < upper <= 100):
            raise DazooInputError(name, "intensity percentiles need 0 <= lower < upper <= 100")
    if "nonzero" in spec and not isinstance(spec["nonzero"], bool):
        raise DazooInputError(name, "intensity 'nonzero' must be true or false")
    return spec


# ----------------------------------------------------------------------------- grids
def orientation_matrix(code: str) -> np.ndarray:
    """The ``(3, 3)`` matrix whose column ``i`` is the RAS unit vector of axis code ``code[i]``."""
    code = _check_orientation(code, "orientation")
    matrix = np.zeros((3, 3))
    for column, letter in enumerate(code):
        row, sign = _AXES[letter]
        matrix[row, column] = sign
    return matrix


def grid_affine(
    *,
    orientation: str,
    voxel_size: Sequence[float],
    shape: Sequence[int],
    centre: Sequence[float],
) -> np.ndarray:
    """The ``(4, 4)`` voxel -> world RAS mm affine of an axis-aligned grid.

    Args:
        orientation: axis codes, e.g. ``"RAS"``.
        voxel_size: 3 floats, mm.
        shape: 3 ints.
        centre: 3 floats, world mm of the grid's centre ``(shape - 1) / 2``.
    """
    affine = np.eye(4)
    affine[:3, :3] = orientation_matrix(orientation) * np.asarray(voxel_size, dtype=float)
    affine[:3, 3] = np.asarray(centre, dtype=float) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def reorient(volume: Volume, orientation: str = "RAS") -> Volume:
    """Flip/permute the array axes (no interpolation) to the given axis codes.

    The nearest canonical axes are used for oblique affines (the affine stays exact: the world
    position of every voxel is unchanged).

    Args:
        volume: a :class:`Volume`, ``(X, Y, Z)`` or ``(X, Y, Z, C)``.
        orientation: target axis codes, e.g. ``"RAS"``.

    Returns:
        A new :class:`Volume` with the reordered array and its affine.
    """
    import nibabel.orientations as nio

    start = nio.io_orientation(volume.affine)
    target = nio.axcodes2ornt(tuple(_check_orientation(orientation, "orientation")))
    transform = nio.ornt_transform(start, target)
    array = nio.apply_orientation(volume.array, transform)
    affine = volume.affine @ nio.inv_ornt_aff(transform, volume.array.shape[:3])
    return Volume(np.ascontiguousarray(array), affine, volume.path)


def resample(
    volume: Volume,
    affine: np.ndarray,
    shape: Sequence[int],
    *,
    transform: np.ndarray | None = None,
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """Sample ``volume`` on another grid in one interpolation.

    The output voxel ``v`` takes the value of ``volume`` at the world point
    ``transform @ affine @ v`` (``transform`` defaults to the identity).

    Args:
        volume: the :class:`Volume` to sample (3D array).
        affine: ``(4, 4)`` voxel -> world RAS mm of the output grid.
        shape: output shape, 3 ints.
        transform: ``(4, 4)`` world -> world (output grid's world -> ``volume``'s world).
        order: interpolation order (0 nearest, 1 linear, 3 cubic).
        cval: value outside ``volume``'s field of view.

    Returns:
        The array of shape ``shape``, dtype of ``volume`` for ``order=0``, float32 otherwise.
    """
    matrix = np.linalg.inv(volume.affine) @ (np.eye(4) if transform is None else transform)
    return _affine_sample(volume.array, _snap(matrix @ affine), shape, order=order, cval=cval)


def _affine_sample(array, matrix, shape, *, order, cval):
    if order == 0:
        return ndi.affine_transform(array, matrix, output_shape=tuple(shape), order=0,
                                    cval=cval, mode="constant")
    source = array if array.dtype == np.float32 else array.astype(np.float32)
    return ndi.affine_transform(source, matrix, output_shape=tuple(shape), order=order,
                                cval=cval, mode="constant", prefilter=order > 1,
                                output=np.float32)


def _snap(matrix: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Round entries within ``tol`` of an integer (float noise of composed affines)."""
    rounded = np.round(matrix)
    return np.where(np.abs(matrix - rounded) < tol, rounded, matrix)


def image_centre(volume: Volume, *, method: str = "mass") -> np.ndarray:
    """World position (RAS mm, shape ``(3,)``) of an image's centre.

    ``"mass"``: intensity centre of mass (intensities above the image minimum);
    ``"bbox"``: centre of the bounding box of voxels above 10% of the robust range;
    ``"fov"``: centre of the field of view.
    """
    _choice(method, _CENTRES, "centre", volume.name)
    array = volume.array
    if method == "fov":
        index = (np.array(array.shape[:3]) - 1) / 2
    elif method == "mass":
        step = max(1, int(round((array.size / 2e6) ** (1 / 3))))
        sample = array[::step, ::step, ::step]
        weights = sample - sample.min()
        total = weights.sum(dtype=np.float64)
        index = (np.array(ndi.center_of_mass(weights)) * step if total > 0
                 else (np.array(array.shape[:3]) - 1) / 2)
    else:
        low, high = float(array.min()), float(np.percentile(array, 99.5))
        nonzero = np.nonzero(array > low + 0.1 * (high - low))
        index = np.array([(n.min() + n.max()) / 2 for n in nonzero])
    return volume.affine[:3, :3] @ index + volume.affine[:3, 3]


# ----------------------------------------------------------------------------- intensity
def intensity_parameters(array: np.ndarray, spec: Mapping[str, Any], *, name: str = "<array>"):
    """Offset and scale so that ``(x - offset) / scale`` is the normalised intensity.

    Statistics are computed on at most ~2 million voxels (a regular sub-sampling).

    Returns:
        ``(offset, scale)`` as floats.

    Raises:
        DazooInputError: the image has (robustly) constant intensity.
    """
    spec = _check_intensity(spec, name)
    method = spec["method"]
    if method == "none":
        return 0.0, 1.0
    step = max(1, int(math.ceil((array.size / 2e6) ** (1 / 3))))
    sample = array[::step, ::step, ::step].ravel()
    if spec.get("nonzero"):
        sample = sample[sample != 0]
        if sample.size == 0:
            raise DazooInputError(name, "has no non-zero voxels to normalise")
    if method == "percentile":
        low, high = np.percentile(sample, [spec["lower"], spec["upper"]])
    elif method == "minmax":
        low, high = sample.min(), sample.max()
    else:
        low, high = sample.mean(), sample.mean() + sample.std()
    if not high > low:
        raise DazooInputError(name, "has constant intensity; it cannot be normalised")
    return float(low), float(high - low)


def normalise_intensity(
    array: np.ndarray, offset: float, scale: float, *, clip: bool
) -> np.ndarray:
    """``(array - offset) / scale`` as float32, clipped to [0, 1] when ``clip``."""
    out = (np.asarray(array, dtype=np.float32) - np.float32(offset)) / np.float32(scale)
    return np.clip(out, 0.0, 1.0, out=out) if clip else out


# ----------------------------------------------------------------------------- alignment
def align_affine(
    moving: Source,
    fixed: Source,
    *,
    kind: str = "affine",
    metric: str = "correlation",
    resolution: float = 2.0,
    seed: int = 1,
) -> np.ndarray:
    """Affine (or rigid) pre-alignment with SimpleITK.

    Centre-of-mass initialisation, then a rigid stage on a 3-level pyramid, then (for
    ``kind="affine"``) a 12-parameter affine stage on the two finest levels. The images are
    first block-averaged to about ``resolution`` mm; the metric is evaluated on a random
    (seeded) sample of voxels, so the result is reproducible.

    Args:
        moving: the image to align (a path, Volume, nibabel image or ``(array, affine)``).
        fixed: the reference (e.g. the preset's template).
        kind: ``"affine"`` or ``"rigid"``.
        metric: ``"correlation"`` (same modality) or ``"mi"`` (Mattes mutual information).
        resolution: float. Finest working resolution in mm.
        seed: int. Seed (>= 1) of the metric's voxel sampling (SimpleITK reads 0 as "use the
            clock", so 0 is refused).

    Returns:
        ``(4, 4)`` float64 world -> world matrix in RAS mm that maps a point of the FIXED
        image's world to the corresponding point of the MOVING image's world (ITK's
        fixed-to-moving convention): ``moving(M @ y)`` matches ``fixed(y)``.
    """
    import SimpleITK as sitk

    _choice(kind, ("affine", "rigid"), "kind", "align_affine")
    _choice(metric, _METRICS, "metric", "align_affine")
    if not isinstance(seed, int) or seed < 1:
        raise DazooInputError("align_affine", f"seed must be an int >= 1, got {seed!r}")
    moving = read_image(moving)
    fixed = read_image(fixed)
    try:
        return _align(moving, fixed, kind=kind, metric=metric, resolution=resolution, seed=seed,
                      sitk=sitk)
    except RuntimeError as err:
        problem = " ".join(str(err).split())[-160:]
        raise DazooInputError(
            moving.name, f"affine alignment to {fixed.name} failed ({problem})"
        ) from None


def _align(moving, fixed, *, kind, metric, resolution, seed, sitk):
    fixed_img = _working_image(_to_sitk(fixed, sitk), resolution, sitk)
    moving_img = _working_image(_to_sitk(moving, sitk), resolution, sitk)
    initial = sitk.CenteredTransformInitializer(
        fixed_img, moving_img, sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS,
    )
    centre = np.array(initial.GetFixedParameters()[:3])
    shrink = _pyramid(fixed_img)
    # For an affine result the rigid stage stops one level early: the affine stage refines.
    rigid_shrink = shrink[:-1] if kind == "affine" and len(shrink) > 1 else shrink
    rigid = _register(fixed_img, moving_img, initial, rigid_shrink, metric=metric, seed=seed,
                      step=2.0, sitk=sitk)
    matrix = _probe_matrix(rigid)
    if kind == "affine":
        start = sitk.AffineTransform(3)
        start.SetCenter(centre.tolist())
        start.SetMatrix(matrix[:3, :3].ravel().tolist())
        start.SetTranslation((matrix[:3, 3] - centre + matrix[:3, :3] @ centre).tolist())
        result = _register(fixed_img, moving_img, start, shrink[-2:], metric=metric,
                           seed=seed, step=1.0, sitk=sitk)
        matrix = _probe_matrix(result)
    return _FLIP @ matrix @ _FLIP


def _to_sitk(volume: Volume, sitk):
    """A SimpleITK float32 image with the volume's geometry (ITK's LPS world)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array.transpose(2, 1, 0)))
    affine = _FLIP @ volume.affine
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((affine[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    return image


def _working_image(image, resolution, sitk):
    factors = [max(1, int(round(resolution / s))) for s in image.GetSpacing()]
    factors = [min(f, max(1, n // 16)) for f, n in zip(factors, image.GetSize())]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def _pyramid(image) -> list[int]:
    """Shrink factors (coarse to fine) that keep at least 12 voxels along every axis."""
    smallest = min(image.GetSize())
    return [f for f in (4, 2, 1) if smallest // f >= 12] or [1]


def _register(fixed, moving, initial, shrink, *, metric, seed, step, sitk):
    """One stage: regular-step gradient descent, parameter scales from physical shift (mm)."""
    method = sitk.ImageRegistrationMethod()
    if metric == "mi":
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    else:
        method.SetMetricAsCorrelation()
    voxels = np.prod(fixed.GetSize())
    # at least 2% of the voxels and at least ~5000 points per level
    percentages = [min(1.0, max(0.02, 5000.0 * f**3 / voxels)) for f in shrink]
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel(percentages, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=step, minStep=3e-3, numberOfIterations=100, relaxationFactor=0.8,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel([f / 2 if f > 1 else 0 for f in shrink])
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(fixed, moving)


def _probe_matrix(transform) -> np.ndarray:
    """The 4x4 matrix of an affine SimpleITK transform, read off by mapping 4 points."""
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    matrix = np.eye(4)
    for axis in range(3):
        point = np.zeros(3)
        point[axis] = 100.0
        matrix[:3, axis] = (np.array(transform.TransformPoint(point.tolist())) - origin) / 100.0
    matrix[:3, 3] = origin
    return matrix


def mirror_matrix(volume: Volume) -> np.ndarray:
    """``(4, 4)`` world -> world reflection left-right (x -> -x, RAS) through the image's
    centre of mass: applied to a left limb's image, it gives a right limb's (its own
    inverse)."""
    centre = image_centre(volume, method="mass")
    matrix = np.diag([-1.0, 1.0, 1.0, 1.0])
    matrix[0, 3] = 2 * centre[0]
    return matrix


def alignment_score(volume: Volume, template: Volume, alignment: np.ndarray) -> float:
    """Pearson correlation between the template and the image resampled onto the template's
    grid through ``alignment`` (template world -> native world), on the template's voxels
    that map inside the image: a number to compare alignments (or to flag a failed one)."""
    template = read_image(template)
    step = max(1, int(round((template.array.size / 4e5) ** (1 / 3))))
    index = np.stack(np.meshgrid(*[np.arange(0, n, step) for n in template.shape[:3]],
                                 indexing="ij"), axis=-1).reshape(-1, 3).astype(float)
    world = template.affine[:3, :3] @ index.T + template.affine[:3, 3:4]
    native = np.linalg.inv(volume.affine) @ (alignment @ np.vstack([world, np.ones((1, len(index)))]))
    inside = np.all((native[:3] >= 0) & (native[:3] <= np.array(volume.shape[:3])[:, None] - 1),
                    axis=0)
    if inside.sum() < 100:
        return -1.0
    moved = ndi.map_coordinates(np.asarray(volume.array, np.float32), native[:3, inside],
                                order=1)
    fixed = template.array[tuple(index[inside].astype(int).T)].astype(np.float64)
    if moved.std() == 0 or fixed.std() == 0:
        return 0.0
    return float(np.corrcoef(moved, fixed)[0, 1])


# ----------------------------------------------------------------------------- pipeline
@dataclasses.dataclass(eq=False)
class Preprocessed:
    """An image on the model grid, with the chain that maps it back to its native grid.

    Args:
        array: np.ndarray. ``(D, H, W)`` float32 normalised intensities on the model grid.
        affine: np.ndarray. ``(4, 4)`` model voxel -> template (model) world RAS mm.
        native_shape: tuple. ``(X, Y, Z)`` shape of the input's own grid.
        native_affine: np.ndarray. ``(4, 4)`` native voxel -> native world RAS mm.
        alignment: np.ndarray. ``(4, 4)`` template world -> native world (identity without
            alignment).
        intensity: tuple. ``(offset, scale)``: normalised = ``(raw - offset) / scale``.
        source: str or None. The input's path (for messages).
    """

    array: np.ndarray
    affine: np.ndarray
    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    alignment: np.ndarray
    intensity: tuple[float, float] = (0.0, 1.0)
    source: str | None = None

    @property
    def model_to_native(self) -> np.ndarray:
        """``(4, 4)`` model voxel -> native voxel: ``inv(native_affine) @ alignment @ affine``."""
        return _snap(np.linalg.inv(self.native_affine) @ self.alignment @ self.affine)

    @property
    def native_to_model(self) -> np.ndarray:
        """``(4, 4)`` native voxel -> model voxel (inverse of :attr:`model_to_native`)."""
        return _snap(np.linalg.inv(self.affine) @ np.linalg.inv(self.alignment)
                     @ self.native_affine)

    @property
    def native_volume_like(self) -> Volume:
        """A zero-memory :class:`Volume` with the native grid (for grid checks)."""
        empty = np.broadcast_to(np.zeros((), dtype=np.uint8), self.native_shape)
        return Volume(empty, self.native_affine, self.source)

    def volume(self) -> Volume:
        """The model-grid image as a :class:`Volume` (to write it with its affine)."""
        return Volume(self.array, self.affine, None)

    def chain(self) -> dict[str, Any]:
        """The recorded chain as JSON-serialisable values (no image data)."""
        return {
            "affine": self.affine.tolist(),
            "native_shape": list(self.native_shape),
            "native_affine": self.native_affine.tolist(),
            "alignment": self.alignment.tolist(),
            "intensity": list(self.intensity),
            "source": self.source,
        }

    @classmethod
    def from_chain(cls, array: np.ndarray, chain: Mapping[str, Any]) -> Preprocessed:
        """Rebuild from :meth:`chain` and the model-grid array."""
        return cls(
            array=np.asarray(array, dtype=np.float32),
            affine=np.array(chain["affine"], dtype=float),
            native_shape=tuple(int(n) for n in chain["native_shape"]),
            native_affine=np.array(chain["native_affine"], dtype=float),
            alignment=np.array(chain["alignment"], dtype=float),
            intensity=tuple(float(v) for v in chain["intensity"]),
            source=chain.get("source"),
        )


class Preprocessor:
    """Maps native scans onto a model grid, as a :class:`PreprocessConfig` describes.

    Args:
        config: PreprocessConfig or dict.
        root: str or None. Folder that relative paths in the config (the template) are
            relative to; usually the preset folder.

    Example:

    >>> pre = Preprocessor(PreprocessConfig(voxel_size=(2, 2, 2), shape=(64, 64, 64)))
    >>> out = pre.apply("scan.nii.gz")                       # doctest: +SKIP
    >>> labels = pre.apply_labels("seg.nii.gz", out)         # doctest: +SKIP
    """

    def __init__(self, config: PreprocessConfig | Mapping[str, Any], *,
                 root: str | os.PathLike | None = None):
        if not isinstance(config, PreprocessConfig):
            config = PreprocessConfig.from_dict(config)
        self.config = config
        self.root = None if root is None else os.fspath(root)
        self._template: Volume | None = None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Preprocessor:
        """Load a config file; the template path is taken relative to its folder."""
        return cls(PreprocessConfig.from_json(path), root=os.path.dirname(os.path.abspath(path)))

    @property
    def template_path(self) -> str | None:
        """The resolved template path, or None."""
        if self.config.template is None:
            return None
        path = self.config.template
        return path if self.root is None or os.path.isabs(path) else os.path.join(self.root, path)

    @property
    def template(self) -> Volume | None:
        """The template image (read once), or None."""
        if self._template is None and self.template_path is not None:
            self._template = read_image(self.template_path)
        return self._template

    def fingerprint(self) -> str:
        """A hash of the config and the template's contents (for cache keys): a copy of the
        same template elsewhere (each training run keeps its own) gives the same key."""
        parts = [self.config.to_json()]
        if self.template_path is not None:
            stat = os.stat(self.template_path)
            identity = (os.path.abspath(self.template_path), stat.st_size, stat.st_mtime_ns)
            if getattr(self, "_template_digest", (None,))[0] != identity:
                digest = hashlib.sha256()
                with open(self.template_path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
                self._template_digest = (identity, digest.hexdigest())
            parts.append(self._template_digest[1])
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def model_grid(self, volume: Volume) -> np.ndarray:
        """``(4, 4)`` voxel -> world affine of the model grid for this input.

        With a template: centred on the template (its own affine when the template already
        has the model grid). Without: centred on the image (``config.centre``), shifted by less
        than a voxel so that model voxel centres fall on the native lattice where the axes
        and voxel sizes allow it (then the round trip of a label map is exact).
        """
        cfg = self.config
        template = self.template
        if template is not None:
            affine = grid_affine(orientation=cfg.orientation, voxel_size=cfg.voxel_size,
                                 shape=cfg.shape, centre=image_centre(template, method="fov"))
            if template.shape == cfg.shape and np.allclose(template.affine, affine, atol=1e-4):
                return template.affine.copy()
            return affine
        affine = grid_affine(orientation=cfg.orientation, voxel_size=cfg.voxel_size,
                             shape=cfg.shape, centre=image_centre(volume, method=cfg.centre))
        lattice = np.round(np.linalg.solve(volume.affine, affine[:, 3]))
        affine[:3, 3] = (volume.affine @ lattice)[:3]
        return affine

    def align(self, volume: Volume) -> np.ndarray:
        """``(4, 4)`` template world -> native world (identity without alignment); with
        ``mirror="auto"``, possibly with a left-right reflection (see PreprocessConfig)."""
        if self.config.alignment == "none" or self.template is None:
            return np.eye(4)
        matrix = align_affine(volume, self.template, kind=self.config.alignment,
                              metric=self.config.metric)
        if self.config.mirror == "none":
            return matrix
        reflection = mirror_matrix(volume)
        mirrored = Volume(volume.array, reflection @ volume.affine, volume.path)
        candidate = reflection @ align_affine(mirrored, self.template,
                                              kind=self.config.alignment,
                                              metric=self.config.metric)
        scores = [alignment_score(volume, self.template, m) for m in (matrix, candidate)]
        return candidate if scores[1] > scores[0] else matrix

    def apply(self, source: Source) -> Preprocessed:
        """Read, align, resample (once) and normalise an image.

        Args:
            source: a path, nibabel image, Volume or ``(array, affine)``.

        Returns:
            A :class:`Preprocessed` with the ``config.shape`` float32 array and the chain.
        """
        volume = read_image(source)
        offset, scale = intensity_parameters(volume.array, self.config.intensity,
                                             name=volume.name)
        alignment = self.align(volume)
        affine = self.model_grid(volume)
        fill = float(volume.array.min())
        array = resample(volume, affine, self.config.shape, transform=alignment, order=1,
                         cval=fill)
        array = normalise_intensity(array, offset, scale,
                                    clip=self.config.intensity["method"] == "percentile")
        return Preprocessed(array=array, affine=affine, native_shape=volume.shape,
                            native_affine=volume.affine, alignment=alignment,
                            intensity=(offset, scale), source=volume.path)

    def apply_labels(self, labels: Source, preprocessed: Preprocessed) -> np.ndarray:
        """Put a label map of the same input onto the model grid (nearest neighbour).

        Args:
            labels: the label map (path, nibabel image, Volume or ``(array, affine)``); its
                grid must match the image that gave ``preprocessed``.
            preprocessed: the image's :class:`Preprocessed`.

        Returns:
            ``(D, H, W)`` int32 label ids on the model grid (0 outside the input's field of
            view).
        """
        volume = read_labels(labels, like=preprocessed.native_volume_like)
        return _affine_sample(volume.array, preprocessed.model_to_native,
                              preprocessed.array.shape, order=0, cval=0)


    @property
    def aligns_label_maps(self) -> bool:
        """Whether :meth:`apply_label_map` aligns a map's outline to the template (a template
        and an alignment) rather than placing it by a shift."""
        return self.config.alignment != "none" and self.template_path is not None

    def apply_label_map(self, labels: Source) -> np.ndarray:
        """Put a label map that has no image onto the model grid (nearest neighbour).

        There is no image to align. With a template and ``config.alignment`` (affine or
        rigid), the map's foreground (every nonzero id, holes filled) is aligned to the
        template's (voxels above a tenth of its maximum, holes filled) by
        :func:`align_affine` with correlation: the outline of the anatomy, not its contrast.
        Measured on two Mindboggle subjects whose images are here: their cortical labels
        placed this way agree with the same labels placed through their images' alignment
        at mean Dice 0.68-0.69 (a shift alone: 0.21-0.34). Without a template and with
        ``config.centre == "fov"``, the map is placed as :meth:`apply` places a scan on its
        grid (the field of view's centre at the grid's centre: a knee map covering a DESS
        field of view lands where that scan would). Otherwise the map is placed by
        position only, its foreground's centre of mass at the template's centre
        (``config.centre``), or at the grid's centre without a template. Used for label maps
        that training synthesises images from (:class:`dazoo.training.LabelSynth`, whose
        random affine covers the remaining difference in pose).

        Returns:
            ``(D, H, W)`` int32 label ids on the model grid.
        """
        volume = read_labels(labels)
        foreground = np.argwhere(volume.array != 0)
        if not len(foreground):
            raise DazooInputError(volume.name, "label map is empty (only background)")
        template = self.template
        if self.aligns_label_maps:
            import scipy.ndimage as ndi

            affine = self.model_grid(template)
            moving = ndi.binary_fill_holes(volume.array != 0).astype(np.float32)
            fixed = ndi.binary_fill_holes(template.array > 0.1 * float(template.array.max()))
            alignment = align_affine(Volume(moving, volume.affine, volume.path),
                                     Volume(fixed.astype(np.float32), template.affine,
                                            template.path),
                                     kind=self.config.alignment, metric="correlation")
        elif template is None and self.config.centre == "fov":
            # As apply() places a scan (the knee's field of view): the map's own field of
            # view at the grid's centre, on its voxel lattice (an exact round trip).
            affine = self.model_grid(volume)
            alignment = np.eye(4)
        else:
            centre = volume.affine[:3, :3] @ foreground.mean(axis=0) + volume.affine[:3, 3]
            if template is not None:
                affine = self.model_grid(template)
                target = image_centre(template, method=self.config.centre)
            else:
                affine = grid_affine(orientation=self.config.orientation,
                                     voxel_size=self.config.voxel_size, shape=self.config.shape,
                                     centre=centre)
                target = centre
            alignment = np.eye(4)
            alignment[:3, 3] = centre - target  # template world -> the map's world: a shift
        to_native = np.linalg.inv(volume.affine) @ alignment @ affine
        return _affine_sample(volume.array, to_native, self.config.shape, order=0, cval=0)


# ----------------------------------------------------------------------------- template
def build_affine_template(
    volumes: Sequence[Source],
    *,
    voxel_size: Sequence[float],
    shape: Sequence[int],
    orientation: str = "RAS",
    iterations: int = 2,
    kind: str = "affine",
    metric: str = "correlation",
    intensity: Mapping[str, Any] | None = None,
    reference: int = 0,
) -> Volume:
    """An affine population-average template.

    Start from ``volumes[reference]``; at each iteration align every volume to the current
    template, then average the normalised, aligned images. Before averaging, the mean
    alignment matrix is factored out so that the template sits in the average position,
    size and shape of the population rather than the reference's. The grid is centred on the
    mean centre of mass of the volumes.

    Args:
        volumes: sources (paths, Volumes, ...), at least 2.
        voxel_size: 3 floats, mm.
        shape: 3 ints, the template grid.
        orientation: axis codes of the template grid.
        iterations: number of align-and-average rounds.
        kind: ``"affine"`` or ``"rigid"`` alignment.
        metric: ``"correlation"`` or ``"mi"``.
        intensity: intensity normalisation spec (default percentile 0.5-99.5 to [0, 1]).
        reference: index of the initial reference.

    Returns:
        A :class:`Volume` (float32 ``shape`` array in [0, 1], grid affine).
    """
    if len(volumes) < 2:
        raise DazooInputError("build_affine_template", "needs at least 2 volumes")
    spec = _check_intensity(intensity or {"method": "percentile"}, "build_affine_template")
    images = [read_image(v) for v in volumes]
    centre = np.mean([image_centre(v, method="mass") for v in images], axis=0)
    grid = grid_affine(orientation=orientation, voxel_size=voxel_size, shape=shape, centre=centre)
    norms = [intensity_parameters(v.array, spec, name=v.name) for v in images]
    clip = spec["method"] == "percentile"

    def average(transforms):
        total = np.zeros(tuple(shape), dtype=np.float64)
        for image, (offset, scale), transform in zip(images, norms, transforms):
            sampled = resample(image, grid, shape, transform=transform,
                               cval=float(image.array.min()))
            total += normalise_intensity(sampled, offset, scale, clip=clip)
        return Volume((total / len(images)).astype(np.float32), grid)

    offset, scale = norms[reference]
    template = Volume(normalise_intensity(
        resample(images[reference], grid, shape, cval=float(images[reference].array.min())),
        offset, scale, clip=clip), grid)
    for _ in range(iterations):
        transforms = [align_affine(v, template, kind=kind, metric=metric) for v in images]
        mean_inverse = np.linalg.inv(np.mean(transforms, axis=0))
        template = average([t @ mean_inverse for t in transforms])
    return template
