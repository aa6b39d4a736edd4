"""Registration and segmentation losses as ``keras.losses.Loss`` subclasses.

Each loss returns one value per sample (shape ``(batch,)``) from ``call``; the usual Keras
reduction (mean over the batch by default) applies on ``__call__``. Definitions follow
VoxelMorph 0.2 (``NCC``, ``MSE``, ``Grad``, ``Dice``) so that values agree with it to float32
rounding; where VoxelMorph returns a negated similarity (``-NCC``, ``-Dice``), dazoo does the
same for NCC and returns ``1 - Dice`` for Dice so that every loss is minimised at a
meaningful value.

Tensors are channels-last ``(batch, D, H, W, C)``.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import keras
from keras import ops

__all__ = [
    "NCC",
    "MSE",
    "Grad",
    "BendingEnergy",
    "SoftDice",
    "CrossEntropy",
    "DiceCE",
]

_register = keras.saving.register_keras_serializable(package="dazoo")


def _spatial_axes(x) -> list[int]:
    return list(range(1, len(x.shape) - 1))


def _per_sample_mean(x):
    return ops.mean(ops.reshape(x, (ops.shape(x)[0], -1)), axis=-1)


def box_sum(x, window: Sequence[int]):
    """Sum of ``x`` over a centred box window with zero padding ('same' convolution).

    Computed as separable 1D convolutions (one per spatial axis), which equals the full
    box convolution VoxelMorph uses up to float32 rounding, at a fraction of its cost.

    Args:
        x: ``(batch, *spatial, 1)``.
        window: box size per spatial axis (odd sizes centre exactly).

    Returns:
        ``(batch, *spatial, 1)``.
    """
    ndims = len(x.shape) - 2
    for axis, size in enumerate(window):
        kernel_shape = [1] * ndims
        kernel_shape[axis] = int(size)
        kernel = ops.ones((*kernel_shape, 1, 1), dtype=x.dtype)
        x = ops.conv(x, kernel, strides=1, padding="same")
    return x


@_register
class NCC(keras.losses.Loss):
    """Negative local (windowed) normalised cross-correlation, as VoxelMorph's ``NCC``.

    In every window of ``win`` voxels (sums taken over channels too),
    ``cc = (cross / var_I) * (cross / var_J)`` with the local covariance ``cross`` and the
    variances each clamped below at ``eps`` (VoxelMorph 0.2's definition: anti-correlated
    windows count as uncorrelated). The loss is ``-mean(cc)`` per sample, in [-1, 0].

    Args:
        win: window size per spatial axis; an int applies to every axis. Default 9.
        eps: lower clamp of the local covariance and of both variances (VoxelMorph: 1e-5).
    """

    def __init__(self, win: int | Sequence[int] = 9, eps: float = 1e-5, *, name: str = "ncc",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.win = win
        self.eps = float(eps)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        ndims = len(y_true.shape) - 2
        window = ([int(self.win)] * ndims if isinstance(self.win, numbers.Integral)
                  else [int(w) for w in self.win])
        channels = int(y_true.shape[-1])
        win_size = float(channels)
        for size in window:
            win_size *= size

        def local_sum(x):
            return box_sum(ops.sum(x, axis=-1, keepdims=True), window)

        i_sum = local_sum(y_true)
        j_sum = local_sum(y_pred)
        i2_sum = local_sum(y_true * y_true)
        j2_sum = local_sum(y_pred * y_pred)
        ij_sum = local_sum(y_true * y_pred)
        u_i = i_sum / win_size
        u_j = j_sum / win_size
        # VoxelMorph 0.2 clamps the covariance and both variances at eps: windows with a
        # negative correlation contribute ~0 (not +cc**2), flat windows do not divide by 0.
        cross = ops.maximum(ij_sum - u_j * i_sum - u_i * j_sum + u_i * u_j * win_size, self.eps)
        i_var = ops.maximum(i2_sum - 2 * u_i * i_sum + u_i * u_i * win_size, self.eps)
        j_var = ops.maximum(j2_sum - 2 * u_j * j_sum + u_j * u_j * win_size, self.eps)
        cc = (cross / i_var) * (cross / j_var)
        return -_per_sample_mean(cc)

    def get_config(self):
        return {**super().get_config(), "win": self.win, "eps": self.eps}


@_register
class MSE(keras.losses.Loss):
    """Mean squared intensity difference per sample."""

    def __init__(self, *, name: str = "mse", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        diff = ops.cast(y_true, "float32") - ops.cast(y_pred, "float32")
        return _per_sample_mean(diff * diff)


def forward_differences(field) -> list:
    """Forward differences of ``field`` along each spatial axis (one tensor per axis)."""
    diffs = []
    for axis in _spatial_axes(field):
        upper = [slice(None)] * len(field.shape)
        lower = [slice(None)] * len(field.shape)
        upper[axis] = slice(1, None)
        lower[axis] = slice(None, -1)
        diffs.append(field[tuple(upper)] - field[tuple(lower)])
    return diffs


class _FieldRegularizer(keras.losses.Loss):
    """A loss on a displacement field alone: ``y_true`` is ignored and may be ``None``."""

    def __call__(self, y_true, y_pred, sample_weight=None):
        return super().__call__(y_pred if y_true is None else y_true, y_pred, sample_weight)


@_register
class Grad(_FieldRegularizer):
    """Diffusion regulariser on a displacement field, as VoxelMorph's ``Grad``.

    Mean over voxels of the squared (``"l2"``) or absolute (``"l1"``) forward differences,
    averaged over the spatial axes. ``y_true`` is ignored; ``y_pred`` is the field
    ``(batch, D, H, W, 3)``.

    Args:
        penalty: ``"l1"`` (default, as VoxelMorph) or ``"l2"``.
        loss_mult: optional factor (VoxelMorph's training scripts pass the integration
            downsize factor, e.g. 2, when the field is at half resolution).
    """

    def __init__(self, penalty: str = "l1", loss_mult: float | None = None, *,
                 name: str = "grad", **kwargs):
        super().__init__(name=name, **kwargs)
        if penalty not in ("l1", "l2"):
            raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
        self.penalty = penalty
        self.loss_mult = loss_mult

    def call(self, y_true, y_pred):
        diffs = forward_differences(ops.cast(y_pred, "float32"))
        transform = ops.abs if self.penalty == "l1" else ops.square
        grad = sum(_per_sample_mean(transform(d)) for d in diffs) / len(diffs)
        if self.loss_mult is not None:
            grad = grad * self.loss_mult
        return grad

    def get_config(self):
        return {**super().get_config(), "penalty": self.penalty, "loss_mult": self.loss_mult}


@_register
class BendingEnergy(_FieldRegularizer):
    """Bending energy of a displacement field (second-order smoothness).

    With central differences on interior voxels, the mean over voxels and vector components
    of ``sum_a (d2u/da2)**2 + 2 * sum_{a<b} (d2u/dadb)**2``. ``y_true`` is ignored.
    """

    def __init__(self, *, name: str = "bending_energy", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        u = ops.cast(y_pred, "float32")
        axes = _spatial_axes(u)
        interior = [slice(None)] + [slice(1, -1)] * len(axes) + [slice(None)]

        def shift(x, axis, offset):
            return ops.roll(x, -offset, axis=axis)

        total = 0.0
        for i, a in enumerate(axes):
            second = shift(u, a, 1) - 2.0 * u + shift(u, a, -1)
            total = total + _per_sample_mean(ops.square(second[tuple(interior)]))
            for b in axes[i + 1:]:
                mixed = (shift(shift(u, a, 1), b, 1) - shift(shift(u, a, 1), b, -1)
                         - shift(shift(u, a, -1), b, 1) + shift(shift(u, a, -1), b, -1)) / 4.0
                total = total + 2.0 * _per_sample_mean(ops.square(mixed[tuple(interior)]))
        return total


def soft_dice_scores(y_true, y_pred, *, include_background: bool = True):
    """Soft Dice per sample and class, VoxelMorph's definition.

    ``2 * sum(t * p) / max(sum(t + p), 1e-5)`` over voxels, for one-hot (or probability)
    tensors ``(batch, *spatial, K)``. Returns ``(batch, K)`` (or ``K - 1`` without the
    background channel 0).
    """
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    if not include_background:
        y_true = y_true[..., 1:]
        y_pred = y_pred[..., 1:]
    axes = _spatial_axes(y_true)
    return dice_from_sums(ops.sum(y_true * y_pred, axis=axes), ops.sum(y_true, axis=axes),
                          ops.sum(y_pred, axis=axes))


def class_sums(values, classes, num_classes: int):
    """Per sample and class, the sum of ``values`` over the voxels of that class.

    ``values`` and ``classes`` ``(batch, ...)``, ``values`` in ``[0, 1]`` (validity masks,
    probabilities), ``classes`` integers in ``0..K-1``. Summed by
    :func:`dazoo.ops.unit_segment_sum` (fixed-point: deterministic, ~2x faster on the CPU
    than a float segment sum). Returns ``(batch, K)`` float32: e.g.
    ``class_sums(ones, classes, K)`` is the voxel count of each label,
    ``sum(one_hot(classes), spatial axes)`` without the one-hot map.
    """
    batch = ops.shape(classes)[0]
    classes = ops.reshape(ops.cast(classes, "int32"), (batch, -1))
    segments = classes + ops.reshape(ops.arange(batch, dtype="int32") * num_classes, (-1, 1))
    from dazoo.ops import unit_segment_sum

    sums = unit_segment_sum(ops.reshape(ops.cast(values, "float32"), (-1,)),
                             ops.reshape(segments, (-1,)), batch * num_classes)
    return ops.reshape(sums, (-1, num_classes))


def dice_from_sums(intersection, true_sum, pred_sum):
    """Soft Dice ``2 * I / max(T + P, 1e-5)`` from per-class sums over voxels (VoxelMorph's
    definition, as :func:`soft_dice_scores`)."""
    return ops.divide_no_nan(2.0 * intersection, ops.maximum(true_sum + pred_sum, 1e-5))


@_register
class SoftDice(keras.losses.Loss):
    """Multi-class soft Dice loss: ``1 - mean over classes of Dice``, per sample.

    ``y_true`` and ``y_pred`` are one-hot label maps or class probabilities
    ``(batch, D, H, W, K)``. Equals ``1 + VoxelMorph's Dice().loss`` when the background is
    included.

    Args:
        include_background: whether channel 0 counts in the mean.
    """

    def __init__(self, include_background: bool = True, *, name: str = "soft_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.include_background = bool(include_background)

    def call(self, y_true, y_pred):
        scores = soft_dice_scores(y_true, y_pred, include_background=self.include_background)
        return 1.0 - ops.mean(scores, axis=-1)

    def from_sums(self, intersection, true_sum, pred_sum):
        """The per-sample loss from its per-class sums ``(batch, K)``: the intersection
        ``sum y_true * y_pred``, ``sum y_true`` and ``sum y_pred`` (the fast paths of
        :class:`dazoo.models.objective.Objective`, which build the sums without the
        ``K``-channel maps)."""
        dice = dice_from_sums(intersection, true_sum, pred_sum)
        if not self.include_background:
            dice = dice[:, 1:]
        return 1.0 - ops.mean(dice, axis=-1)

    def get_config(self):
        return {**super().get_config(), "include_background": self.include_background}


@_register
class CrossEntropy(keras.losses.Loss):
    """Voxel-wise categorical cross-entropy, mean over voxels, per sample.

    ``y_true`` one-hot and ``y_pred`` class probabilities, ``(batch, D, H, W, K)``.

    Args:
        epsilon: probabilities are clipped to ``[epsilon, 1]`` before the log.
    """

    def __init__(self, epsilon: float = 1e-7, *, name: str = "cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.epsilon = float(epsilon)

    def call(self, y_true, y_pred):
        log_p = ops.log(ops.clip(ops.cast(y_pred, "float32"), self.epsilon, 1.0))
        return _per_sample_mean(-ops.sum(ops.cast(y_true, "float32") * log_p, axis=-1))

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@_register
class DiceCE(keras.losses.Loss):
    """Weighted sum of :class:`SoftDice` and :class:`CrossEntropy`, per sample.

    Args:
        dice_weight: weight of the soft Dice term.
        ce_weight: weight of the cross-entropy term.
        include_background: passed to :class:`SoftDice`.
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 include_background: bool = False, *, name: str = "dice_ce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        self.include_background = bool(include_background)
        self._dice = SoftDice(include_background)
        self._ce = CrossEntropy()

    @property
    def epsilon(self) -> float:
        """The cross-entropy's clipping of probabilities (``[epsilon, 1]`` before the log)."""
        return self._ce.epsilon

    def call(self, y_true, y_pred):
        return (self.dice_weight * self._dice.call(y_true, y_pred)
                + self.ce_weight * self._ce.call(y_true, y_pred))

    def call_on_classes(self, classes, y_pred):
        """:meth:`call` with ``y_true = one_hot(classes)``, computed without the one-hot map.

        The one-hot labels select one probability per voxel, so the cross-entropy is a
        gather and the Dice intersection a segment sum of it: memory and time grow with the
        voxels, and only ``y_pred`` (and its gradient) has ``K`` channels. Equal to
        :meth:`call` to float32 rounding, gradient included.

        Args:
            classes: ``(batch, *spatial)`` integer labels; ids outside ``0..K-1`` count as
                no class (an all-zero one-hot row).
            y_pred: ``(batch, *spatial, K)`` probabilities.
        """
        y_pred = ops.cast(y_pred, "float32")
        k = int(y_pred.shape[-1])
        batch = ops.shape(y_pred)[0]
        probabilities = ops.reshape(y_pred, (batch, -1, k))
        classes = ops.reshape(ops.cast(classes, "int32"), (batch, -1))
        valid = ops.cast(ops.logical_and(classes >= 0, classes < k), "float32")
        classes = ops.clip(classes, 0, k - 1)
        at_label = ops.take_along_axis(probabilities, classes[..., None], axis=2)[..., 0]
        log_p = ops.log(ops.clip(at_label, self.epsilon, 1.0))
        return self.from_sums(class_sums(at_label * valid, classes, k),
                              class_sums(valid, classes, k), ops.sum(probabilities, axis=1),
                              ops.mean(log_p * valid, axis=-1))

    def from_sums(self, intersection, true_sum, pred_sum, mean_log_likelihood):
        """The per-sample loss from its sums: per class ``(batch, K)`` the intersection
        ``sum p_c [c = k]``, the label count and the probability sum, and per sample the mean
        over voxels of ``log(clip(p_c, epsilon, 1))`` (0 where no class)."""
        dice = dice_from_sums(intersection, true_sum, pred_sum)
        if not self.include_background:
            dice = dice[:, 1:]
        return (self.dice_weight * (1.0 - ops.mean(dice, axis=-1))
                - self.ce_weight * mean_log_likelihood)

    def get_config(self):
        return {**super().get_config(), "dice_weight": self.dice_weight,
                "ce_weight": self.ce_weight, "include_background": self.include_background}
