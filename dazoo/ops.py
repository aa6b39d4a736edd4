"""Spatial transformation math as pure ``keras.ops`` functions (any Keras 3 backend).

Conventions (VoxelMorph's, kept everywhere in dazoo):

* tensors are channels-last: images ``(batch, D, H, W, C)``, displacement fields
  ``(batch, D, H, W, 3)``;
* a displacement is measured in voxels of the grid it lives on, with ``ij`` indexing:
  component ``d`` moves along array axis ``d + 1``;
* warping samples the moving image at ``x + u(x)`` (a pull-back);
* sample points outside the volume are clamped to the border, VoxelMorph's (and
  ``scipy.ndimage.map_coordinates(mode='nearest')``'s) default fill.

The linear interpolation reproduces neurite's ``interpn`` operation by operation, so the
results agree with VoxelMorph 0.2's TensorFlow layers to float32 rounding.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
from keras import ops

__all__ = [
    "identity_grid",
    "interpolate",
    "warp",
    "integrate_velocity",
    "resize",
    "rescale_displacement",
    "warped_label_overlap",
    "warped_one_hot",
    "warp_adjoint_labels",
    "leaky_relu",
]


def leaky_relu(x, negative_slope: float = 0.2):
    """``keras.ops.leaky_relu`` whose gradient is computed from its output, not its input.

    For a positive slope, ``y > 0`` exactly where ``x > 0``, so the derivative
    ``where(x > 0, 1, slope)`` equals ``where(y > 0, 1, slope)``: the same values and
    gradients, but the backward pass needs only ``y``, which the next convolution keeps
    anyway, so the convolution's (or normalisation's) output ``x`` can be freed after the
    forward pass. In a U-Net that is one full-size activation less per convolution block.
    """
    slope = float(negative_slope)
    if slope <= 0:
        return ops.leaky_relu(x, slope)

    @ops.custom_gradient
    def _leaky_relu(x):
        y = ops.leaky_relu(x, slope)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return upstream * ops.cast(ops.where(y > 0, 1.0, slope), upstream.dtype)

        return y, grad

    return _leaky_relu(x)


def identity_grid(spatial_shape: Sequence[int]):
    """Voxel coordinates of every grid point.

    Args:
        spatial_shape: ``(D, H, W)`` (or any number of spatial dimensions).

    Returns:
        A float32 tensor of shape ``(*spatial_shape, ndims)`` whose last axis holds the
        ``ij``-indexed voxel coordinates of each point.
    """
    axes = [np.arange(n, dtype="float32") for n in spatial_shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return ops.convert_to_tensor(grid, dtype="float32")


def _flat_indices(subs, spatial_shape):
    """Flat (row-major) voxel index of integer subscripts ``subs`` (one tensor per axis)."""
    index = subs[0]
    for sub, size in zip(subs[1:], spatial_shape[1:]):
        index = index * size + sub
    return index


class _Gatherer:
    """Reads rows of a volume at flat voxel indices, for per-sample or shared points."""

    def __init__(self, volume, points, spatial_shape):
        self.channels = int(volume.shape[-1])
        self.out_spatial = tuple(int(s) for s in points.shape[-(len(spatial_shape) + 1):-1])
        self.shared = len(points.shape) == len(spatial_shape) + 1
        n_vox = int(np.prod(spatial_shape))
        if self.shared:
            # (batch, voxels, C): one index list serves every sample.
            self.table = ops.reshape(volume, (-1, n_vox, self.channels))
            self.offset = 0
        else:
            # (batch * voxels, C): per-sample indices are offset by sample * voxels.
            self.table = ops.reshape(volume, (-1, self.channels))
            batch = ops.shape(volume)[0]
            offset_shape = (-1,) + (1,) * len(self.out_spatial)
            self.offset = ops.reshape(ops.arange(batch, dtype="int32") * n_vox, offset_shape)

    def __call__(self, index):
        index = ops.reshape(index + self.offset, (-1,))
        return ops.take(self.table, index, axis=1 if self.shared else 0)

    def as_column(self, weight):
        """Reshape a per-point weight to broadcast against gathered rows."""
        return ops.reshape(weight, (1, -1, 1) if self.shared else (-1, 1))

    def unflatten(self, values):
        return ops.reshape(values, (-1, *self.out_spatial, self.channels))


def interpolate(volume, points, *, method: str = "linear", fill_value: float | None = None):
    """Sample a batch of volumes at voxel coordinates, clamping points to the border.

    Args:
        volume: ``(batch, *spatial, C)`` tensor.
        points: ``(batch, *out_spatial, ndims)`` float tensor of voxel coordinates
            (``ij`` indexing) into each sample of ``volume``, or ``(*out_spatial, ndims)``
            shared by every sample.
        method: ``"linear"`` (multilinear) or ``"nearest"``.
        fill_value: value for points outside ``[0, n - 1]`` along any axis; ``None``
            (default) clamps them to the border instead.

    Returns:
        ``(batch, *out_spatial, C)`` tensor of the volume's dtype.
    """
    values = _interpolate_clamped(volume, points, method)
    if fill_value is None:
        return values
    spatial_shape = [int(s) for s in volume.shape[1:-1]]
    outside = None
    for d, size in enumerate(spatial_shape):
        out_d = ops.logical_or(points[..., d] < 0, points[..., d] > size - 1)
        outside = out_d if outside is None else ops.logical_or(outside, out_d)
    fill = ops.cast(fill_value, values.dtype)
    return ops.where(outside[..., None], fill, values)


def _interpolate_clamped(volume, points, method):
    if method not in ("linear", "nearest"):
        raise ValueError(f"method must be 'linear' or 'nearest', got {method!r}")
    spatial_shape = tuple(int(s) for s in volume.shape[1:-1])
    ndims = len(spatial_shape)
    gather = _Gatherer(volume, points, spatial_shape)
    points = ops.cast(points, "float32")
    max_loc = [float(s - 1) for s in spatial_shape]

    if method == "nearest":
        subs = [
            ops.clip(ops.cast(ops.round(points[..., d]), "int32"), 0, int(max_loc[d]))
            for d in range(ndims)
        ]
        return gather.unflatten(gather(_flat_indices(subs, spatial_shape)))

    if "int" in str(volume.dtype) or "bool" in str(volume.dtype):
        # Fractional weights would be truncated: interpolate integer volumes as float32.
        gather = _Gatherer(ops.cast(volume, "float32"), points, spatial_shape)
    result = 0.0
    for index, weight in _linear_corners(points, spatial_shape):
        values = gather(index)
        result = result + ops.cast(gather.as_column(weight), values.dtype) * values
    return gather.unflatten(result)


def _linear_corners(points, spatial_shape):
    """The ``2**ndims`` corners of multilinear interpolation at ``points`` (float32, clamped
    to the border as neurite's ``interpn``): a list of ``(flat voxel index, weight)``, each
    shaped like ``points[..., 0]``."""
    ndims = len(spatial_shape)
    max_loc = [float(s - 1) for s in spatial_shape]
    floor = ops.floor(points)
    clipped = [ops.clip(points[..., d], 0.0, max_loc[d]) for d in range(ndims)]
    loc0 = [ops.clip(floor[..., d], 0.0, max_loc[d]) for d in range(ndims)]
    loc1 = [ops.clip(loc0[d] + 1.0, 0.0, max_loc[d]) for d in range(ndims)]
    subs = [[ops.cast(f, "int32") for f in loc0], [ops.cast(f, "int32") for f in loc1]]
    # Weight of the lower corner is (upper - p), of the upper corner 1 - (upper - p).
    weight_upper_gap = [loc1[d] - clipped[d] for d in range(ndims)]
    weights = [weight_upper_gap, [1.0 - w for w in weight_upper_gap]]
    corners = []
    for corner in itertools.product((0, 1), repeat=ndims):
        weight = weights[corner[0]][0]
        for d in range(1, ndims):
            weight = weight * weights[corner[d]][d]
        corners.append((_flat_indices([subs[corner[d]][d] for d in range(ndims)],
                                      spatial_shape), weight))
    return corners


def warped_label_overlap(labels, displacement, target, num_classes: int):
    """Soft-Dice sums between linearly warped one-hot labels and a target, without the
    ``K``-channel warp.

    With ``m = one_hot(labels)`` warped linearly by ``displacement`` (as :func:`warp`), returns
    per sample and class ``sum_x target_k(x) * m_k(x)`` and ``sum_x m_k(x)``. Each voxel's
    interpolated one-hot vector is a weighted sum of the 8 corner labels, so both sums are
    segment sums of the corner weights: memory and time grow with the voxels, not with
    ``voxels x classes``, and the gradient reaches ``displacement`` and ``target``.

    Args:
        labels: ``(batch, D, H, W)`` integer class map ``0..K-1`` of the moving image.
        displacement: ``(batch, D, H, W, 3)`` in voxels.
        target: ``(batch, D, H, W, K)`` fixed-image one-hot labels or probabilities.
        num_classes: ``K``.

    Returns:
        ``(intersection, warped_sum)``, each ``(batch, K)`` float32.
    """
    spatial_shape = tuple(int(s) for s in displacement.shape[1:-1])
    n_vox = int(np.prod(spatial_shape))
    points = identity_grid(spatial_shape) + ops.cast(displacement, "float32")
    labels = ops.reshape(ops.cast(labels, "int32"), (-1, n_vox))            # (B, N)
    # Ids outside 0..K-1 count as no class (as a one-hot of them would be all zeros).
    valid = ops.cast(ops.logical_and(labels >= 0, labels < num_classes), "float32")
    labels = ops.clip(labels, 0, num_classes - 1)
    target = ops.reshape(ops.cast(target, "float32"), (-1, n_vox, num_classes))
    # Segment ids: sample b's class k is segment b * K + k.
    sample_offset = ops.reshape(ops.arange(ops.shape(labels)[0], dtype="int32") * num_classes,
                                (-1, 1))
    segments = ops.shape(labels)[0] * num_classes
    intersection, warped_sum = 0.0, 0.0
    for index, weight in _linear_corners(points, spatial_shape):
        corner_index = ops.reshape(index, (-1, n_vox))
        corner_labels = ops.take_along_axis(labels, corner_index, axis=1)
        weight = ops.reshape(weight, (-1, n_vox)) * ops.take_along_axis(valid, corner_index,
                                                                         axis=1)
        at_label = ops.take_along_axis(target, corner_labels[..., None], axis=2)[..., 0]
        ids = ops.reshape(corner_labels + sample_offset, (-1,))
        intersection = intersection + ops.segment_sum(
            ops.reshape(weight * at_label, (-1,)), ids, num_segments=segments)
        warped_sum = warped_sum + ops.segment_sum(ops.reshape(weight, (-1,)), ids,
                                                  num_segments=segments)
    return (ops.reshape(intersection, (-1, num_classes)),
            ops.reshape(warped_sum, (-1, num_classes)))


def _corner_scatter(labels, displacement, num_classes: int, *, at_corner: bool):
    """Scatters the ``2**ndims`` linear-interpolation weights of ``x -> x + displacement(x)``
    into a dense ``(batch, *spatial, K)`` tensor, with one segment sum (no ``K``-channel
    gather).

    ``at_corner=False``: entry ``(x, labels[corner])`` receives each corner's weight
    (the warped one-hot map). ``at_corner=True``: entry ``(corner, labels[x])`` does (the
    adjoint). Ids outside ``0..K-1`` receive nothing, as a one-hot of them is all zeros.
    Returns the dense tensor and, for ``at_corner``, the summed weight per corner voxel.
    """
    spatial_shape = tuple(int(s) for s in displacement.shape[1:-1])
    n_vox = int(np.prod(spatial_shape))
    points = identity_grid(spatial_shape) + ops.cast(displacement, "float32")
    labels = ops.reshape(ops.cast(labels, "int32"), (-1, n_vox))             # (B, N)
    batch = ops.shape(labels)[0]
    valid = ops.cast(ops.logical_and(labels >= 0, labels < num_classes), "float32")
    labels = ops.cast(ops.clip(labels, 0, num_classes - 1), "int64")
    sample = ops.reshape(ops.arange(batch, dtype="int64") * n_vox, (-1, 1))
    voxel = ops.reshape(ops.arange(n_vox, dtype="int64"), (1, -1)) + sample  # (B, N)
    ids, values, corner_voxels, weights = [], [], [], []
    for index, weight in _linear_corners(points, spatial_shape):
        index = ops.reshape(index, (-1, n_vox))
        weight = ops.reshape(weight, (-1, n_vox))
        weights.append(weight)
        if at_corner:
            target = ops.cast(index, "int64") + sample
            ids.append(target * num_classes + labels)
            values.append(weight * valid)
            corner_voxels.append(target)
        else:
            ids.append(voxel * num_classes + ops.take_along_axis(labels, index, axis=1))
            values.append(weight * ops.take_along_axis(valid, index, axis=1))
    ids = ops.reshape(ops.concatenate(ids, axis=1), (-1,))
    dense = ops.segment_sum(ops.reshape(ops.concatenate(values, axis=1), (-1,)), ids,
                            num_segments=batch * n_vox * num_classes)
    dense = ops.reshape(dense, (-1, *spatial_shape, num_classes))
    if not at_corner:
        return dense
    # All weights (whatever the label): the warped image's sum over x, per corner voxel.
    total = ops.segment_sum(ops.reshape(ops.concatenate(weights, axis=1), (-1,)),
                            ops.reshape(ops.concatenate(corner_voxels, axis=1), (-1,)),
                            num_segments=batch * n_vox)
    return dense, ops.reshape(total, (-1, *spatial_shape))


def warped_one_hot(labels, displacement, num_classes: int):
    """``warp(one_hot(labels, K), displacement)`` (linear), without warping ``K`` channels.

    Each voxel's interpolated one-hot vector holds the ``2**ndims`` corner weights at the
    corners' labels, so the result is one segment sum of ``8 x voxels`` weights: the work
    grows with the voxels, not with ``voxels x classes`` (only the output has ``K``
    channels). Differentiable in ``displacement``; equal to the ``K``-channel warp to float32
    rounding.

    Args:
        labels: ``(batch, D, H, W)`` integer class map ``0..K-1`` (other ids: all-zero rows).
        displacement: ``(batch, D, H, W, 3)`` in voxels.
        num_classes: ``K``.

    Returns:
        ``(batch, D, H, W, K)`` float32.
    """
    return _corner_scatter(labels, displacement, num_classes, at_corner=False)


def warp_adjoint_labels(labels, displacement, num_classes: int):
    """The adjoint of linear warping, applied to a fixed image's one-hot labels.

    For a fixed label map ``l``, returns ``(A, a)`` such that for every moving volume ``p``
    ``(batch, D, H, W, K)`` warped by ``displacement`` (as :func:`warp`)::

        sum_x one_hot(l)_k(x) * warp(p)_k(x) == sum_y p_k(y) * A_k(y)
        sum_x warp(p)_k(x)                   == sum_y p_k(y) * a(y)

    i.e. the soft-Dice sums between the fixed labels and a warped prediction, as linear
    functions of the prediction, without warping its ``K`` channels (one segment sum of the
    ``8 x voxels`` corner weights).

    Args:
        labels: ``(batch, D, H, W)`` integer class map of the fixed image.
        displacement: ``(batch, D, H, W, 3)`` in voxels (its gradient is not needed here).
        num_classes: ``K``.

    Returns:
        ``A`` ``(batch, D, H, W, K)`` and ``a`` ``(batch, D, H, W)``, float32.
    """
    return _corner_scatter(labels, displacement, num_classes, at_corner=True)


def warp(image, displacement, *, method: str = "linear", fill_value: float | None = None):
    """Warp a batch of images with dense displacement fields (pull-back).

    ``out[b, x] = image[b, x + displacement[b, x]]``, with points outside the volume clamped
    to the border.

    Args:
        image: ``(batch, D, H, W, C)`` tensor.
        displacement: ``(batch, D, H, W, 3)`` tensor in voxels, ``ij`` indexing, on the same
            grid as ``image``.
        method: ``"linear"`` or ``"nearest"``.
        fill_value: value outside the volume; ``None`` clamps to the border.

    Returns:
        The warped image, ``(batch, D, H, W, C)``.
    """
    spatial_shape = tuple(int(s) for s in displacement.shape[1:-1])
    points = identity_grid(spatial_shape) + ops.cast(displacement, "float32")
    return interpolate(image, points, method=method, fill_value=fill_value)


def integrate_velocity(velocity, *, steps: int = 7):
    """Integrate a stationary velocity field by scaling and squaring.

    The field is divided by ``2**steps`` and composed with itself ``steps`` times:
    ``u <- u + u(x + u(x))``. The result is a diffeomorphic displacement for smooth,
    small enough velocities.

    Args:
        velocity: ``(batch, D, H, W, 3)`` velocity in voxels, ``ij`` indexing.
        steps: number of squaring steps; 0 returns the input unchanged.

    Returns:
        The displacement field, same shape as ``velocity``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    displacement = velocity / (2.0**steps)
    for _ in range(steps):
        displacement = displacement + warp(displacement, displacement)
    return displacement


def _linspace_float32(start: float, stop: float, num: int) -> np.ndarray:
    """``linspace`` evaluated in float32 as TensorFlow does (start + i * delta, exact ends)."""
    if num == 1:
        return np.array([start], dtype="float32")
    delta = np.float32(stop - start) / np.float32(num - 1)
    values = np.float32(start) + np.arange(num, dtype="float32") * delta
    values[-1] = stop
    return values.astype("float32")


def resize(volume, factor: float, *, method: str = "linear"):
    """Resize a batch of volumes by ``factor`` with corner-aligned sampling (neurite's resize).

    The output has ``int(n * factor)`` points along each spatial axis, placed at
    ``linspace(0, n - 1, int(n * factor))`` of the input: the corner voxels map exactly.

    Args:
        volume: ``(batch, *spatial, C)``.
        factor: zoom factor, e.g. 0.5 or 2.
        method: ``"linear"`` or ``"nearest"``.
    """
    spatial_shape = [int(s) for s in volume.shape[1:-1]]
    new_shape = [int(s * factor) for s in spatial_shape]
    axes = [_linspace_float32(0.0, s - 1.0, n) for s, n in zip(spatial_shape, new_shape)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    points = ops.convert_to_tensor(grid, dtype="float32")
    return interpolate(volume, points, method=method)


def rescale_displacement(displacement, factor: float):
    """Resize a displacement field and scale its vectors (VoxelMorph's RescaleTransform).

    A field on a grid ``factor`` times finer needs vectors ``factor`` times longer, in voxels
    of the new grid. As in VoxelMorph, a downsampling resizes first and a upsampling scales
    first (to save memory).

    Args:
        displacement: ``(batch, D, H, W, 3)`` in voxels.
        factor: e.g. 0.5 (to half resolution) or 2 (back to full resolution).

    Returns:
        ``(batch, int(D * factor), int(H * factor), int(W * factor), 3)`` in voxels of the
        new grid.
    """
    if factor == 1:
        return displacement
    if factor < 1:
        return resize(displacement, factor) * factor
    return resize(displacement * factor, factor)
