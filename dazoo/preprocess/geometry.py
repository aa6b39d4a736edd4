"""Grid geometry: orientation codes, model-grid affines, one-interpolation resampling through
composed 4x4 matrices, image centres. Every affine maps voxel indices to world RAS+ mm."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.ndimage as ndi

from dazoo.io import Volume
from dazoo.preprocess.config import AXES, CENTRES, check_orientation, choice


def orientation_matrix(code: str) -> np.ndarray:
    """The ``(3, 3)`` matrix whose column ``i`` is the RAS unit vector of axis code ``code[i]``."""
    code = check_orientation(code, "orientation")
    matrix = np.zeros((3, 3))
    for column, letter in enumerate(code):
        row, sign = AXES[letter]
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
    target = nio.axcodes2ornt(tuple(check_orientation(orientation, "orientation")))
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
    return affine_sample(volume.array, snap(matrix @ affine), shape, order=order, cval=cval)


def affine_sample(array, matrix, shape, *, order, cval):
    if order == 0:
        return ndi.affine_transform(array, matrix, output_shape=tuple(shape), order=0,
                                    cval=cval, mode="constant")
    source = array if array.dtype == np.float32 else array.astype(np.float32)
    return ndi.affine_transform(source, matrix, output_shape=tuple(shape), order=order,
                                cval=cval, mode="constant", prefilter=order > 1,
                                output=np.float32)


def snap(matrix: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Round entries within ``tol`` of an integer (float noise of composed affines)."""
    rounded = np.round(matrix)
    return np.where(np.abs(matrix - rounded) < tol, rounded, matrix)


def image_centre(volume: Volume, *, method: str = "mass") -> np.ndarray:
    """World position (RAS mm, shape ``(3,)``) of an image's centre.

    ``"mass"``: intensity centre of mass (intensities above the image minimum);
    ``"bbox"``: centre of the bounding box of voxels above 10% of the robust range;
    ``"fov"``: centre of the field of view.
    """
    choice(method, CENTRES, "centre", volume.name)
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
