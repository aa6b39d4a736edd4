"""Random spatial transforms of NumPy volumes: the one sampler behind training augmentation
(:class:`dazoo.training.Augmentation`), label-map synthesis (:class:`dazoo.training.LabelSynth`)
and the synthetic demo data (:mod:`dazoo.synthetic`).

Conventions: arrays ``(D, H, W)``, coordinates in voxels, ``coordinates[:, x]`` is where the
output voxel ``x`` samples the input (a pull-back, as ``scipy.ndimage.map_coordinates``
takes it); transforms act about the grid centre ``(shape - 1) / 2``.

- :func:`random_matrix`: a random 3x3 rotation @ shear @ scaling;
- :func:`upsample` / :func:`smooth_noise`: smooth random fields, a coarse grid of control
  values upsampled by separable cubic B-spline (or linear) matrices, one small matrix per
  axis: far faster than ``scipy.ndimage.zoom`` (measured in the synthesis work);
- :func:`coordinates`: ``centre + matrix @ (x - centre + u(x)) + shift``;
- :func:`sample`: linear for images, nearest for label maps.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.ndimage as ndi

__all__ = ["axis_rotation", "random_matrix", "upsample", "smooth_noise", "coordinates",
           "sample"]


def axis_rotation(axis: int, angle: float) -> np.ndarray:
    """The 3x3 rotation by ``angle`` radians about array axis ``axis``."""
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def random_matrix(rng: np.random.Generator, *, rotation: float, scale: float,
                  shear: float | None = None) -> np.ndarray:
    """A random ``rotation @ shear @ scaling`` (3x3, determinant > 0 for ``scale < 1``):
    per-axis scaling uniform in ``1 +- scale``, shears uniform in ``+- shear`` (not drawn
    when None), rotations about each axis uniform in ``+- rotation`` degrees."""
    matrix = np.diag(rng.uniform(1 - scale, 1 + scale, 3))
    if shear is not None:
        sheared = np.eye(3)
        for (i, j), value in zip(((0, 1), (0, 2), (1, 2)), rng.uniform(-shear, shear, 3)):
            sheared[i, j] = value
        matrix = sheared @ matrix
    for axis, angle in enumerate(rng.uniform(-rotation, rotation, 3)):
        matrix = axis_rotation(axis, np.deg2rad(angle)) @ matrix
    return matrix


def upsample(array: np.ndarray, shape: Sequence[int], *, kernel: str = "bspline") -> np.ndarray:
    """Separable upsampling of ``array`` to ``shape`` (float32), on aligned grids (voxel
    centres, ``grid_mode``), border values repeated: ``"bspline"``, the cubic B-spline of the
    values as control points (approximating: smooth, no overshoot), for control grids;
    ``"linear"``, linear interpolation."""
    out = np.asarray(array, np.float32)
    for axis, n in enumerate(shape):
        matrix = _upsampling_matrix(out.shape[axis], int(n), kernel)
        out = np.moveaxis(np.tensordot(matrix, out, axes=([1], [axis])), 0, axis)
    return np.ascontiguousarray(out, dtype=np.float32)


def smooth_noise(shape: Sequence[int], spacing: float, sigma: float,
                 rng: np.random.Generator) -> np.ndarray:
    """A smooth random field ``shape`` (float32): Gaussian control values (standard deviation
    ``sigma``) every ``spacing`` voxels, upsampled by cubic B-spline."""
    coarse = tuple(int(np.ceil(n / spacing)) + 1 for n in shape)
    return upsample(rng.normal(0.0, sigma, coarse), shape)


def coordinates(shape: Sequence[int], matrix: np.ndarray, shift=(0.0, 0.0, 0.0),
                displacement: np.ndarray | None = None) -> np.ndarray:
    """``(3, D, H, W)`` float32 sampling coordinates of ``centre + matrix @ (x - centre +
    u(x)) + shift``, ``u`` a ``(3, D, H, W)`` displacement (voxels) or none."""
    shape = tuple(int(n) for n in shape)
    centre = (np.array(shape) - 1) / 2
    offset = centre - matrix @ centre + np.asarray(shift, float)
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    coords = np.empty((3,) + shape, dtype=np.float32)
    for row in range(3):
        coords[row] = offset[row] + sum(
            (matrix[row, a] * axes[a]).reshape([-1 if b == a else 1 for b in range(3)])
            for a in range(3))
    if displacement is not None:
        for row in range(3):
            coords[row] += sum(np.float32(matrix[row, a]) * displacement[a] for a in range(3))
    return coords


def sample(volume: np.ndarray, coords: np.ndarray, *, order: int, cval=0,
           mode: str = "constant") -> np.ndarray:
    """``volume`` at ``coords`` (``order`` 1 linear, 0 nearest: label ids exact)."""
    output = np.float32 if order else volume.dtype
    return ndi.map_coordinates(volume, coords, order=order, cval=cval, mode=mode, output=output)


def _upsampling_matrix(coarse: int, n: int, kernel: str) -> np.ndarray:
    """``(n, coarse)`` weights of the control values at each output position."""
    t = (np.arange(n) + 0.5) * coarse / n - 0.5  # output centres in control-grid units
    offsets = np.arange(-2, 3)
    index = np.floor(t).astype(int)[:, None] + offsets[None, :]
    x = np.abs(t[:, None] - index)
    if kernel == "bspline":
        weights = np.where(x < 1, 2 / 3 - x ** 2 + x ** 3 / 2,
                           np.where(x < 2, (2 - x) ** 3 / 6, 0.0))
    else:
        weights = np.clip(1 - x, 0, None)
    matrix = np.zeros((n, coarse))
    rows = np.repeat(np.arange(n)[:, None], len(offsets), axis=1)
    np.add.at(matrix, (rows, np.clip(index, 0, coarse - 1)), weights)
    return (matrix / matrix.sum(axis=1, keepdims=True)).astype(np.float32)
