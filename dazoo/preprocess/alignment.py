"""Affine / rigid pre-alignment with SimpleITK (imported inside :func:`align_affine`): the
4x4 world -> world matrix from the template (fixed) to the scan (moving), a pull-back, as ITK
returns; the alignment score and the left-right mirror used by ``mirror="auto"``."""
from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi

from dazoo.errors import DazooInputError
from dazoo.io import Source, Volume, read_image
from dazoo.preprocess.config import METRICS, choice
from dazoo.preprocess.geometry import image_centre

#: LPS <-> RAS: ITK's world frame has x and y negated with respect to nibabel's.
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


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

    choice(kind, ("affine", "rigid"), "kind", "align_affine")
    choice(metric, METRICS, "metric", "align_affine")
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
