"""Thin Keras layers over :mod:`dazoo.ops`, compatible with VoxelMorph's TensorFlow layers.

All layers are registered as ``dazoo>Name`` so saved models load without
``custom_objects``. Conventions: channels-last ``(batch, D, H, W, C)``, displacements in
voxels with ``ij`` indexing, the moving image sampled at ``x + u(x)``.
"""
from __future__ import annotations

import keras

from dazoo import ops as spatial_ops

__all__ = ["SpatialTransformer", "VecInt", "RescaleTransform", "Resize", "LeakyReLU"]

_register = keras.saving.register_keras_serializable(package="dazoo")


@_register
class SpatialTransformer(keras.layers.Layer):
    """Warps an image with a dense displacement field (VoxelMorph's SpatialTransformer).

    Called on ``[image, displacement]``: ``image`` is ``(batch, D, H, W, C)`` with any number
    of channels, ``displacement`` is ``(batch, D, H, W, 3)`` in voxels (``ij`` indexing).
    Returns the image sampled at ``x + displacement(x)``, ``(batch, D, H, W, C)``.

    Args:
        interp_method: ``"linear"`` or ``"nearest"``.
        fill_value: value for samples outside the volume; ``None`` (default, as VoxelMorph)
            clamps them to the border.

    Example:
    >>> moved = SpatialTransformer()([moving, displacement])
    """

    def __init__(self, interp_method: str = "linear", fill_value: float | None = None, **kwargs):
        super().__init__(**kwargs)
        if interp_method not in ("linear", "nearest"):
            raise ValueError(f"interp_method must be 'linear' or 'nearest', got {interp_method!r}")
        self.interp_method = interp_method
        self.fill_value = fill_value

    def call(self, inputs):
        image, displacement = inputs
        return spatial_ops.warp(
            image, displacement, method=self.interp_method, fill_value=self.fill_value
        )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "interp_method": self.interp_method,
                "fill_value": self.fill_value}


@_register
class VecInt(keras.layers.Layer):
    """Integrates a stationary velocity field by scaling and squaring (VoxelMorph's VecInt).

    Input and output: ``(batch, D, H, W, 3)`` in voxels.

    Args:
        int_steps: number of squaring steps (the field is divided by ``2**int_steps``).
    """

    def __init__(self, int_steps: int = 7, **kwargs):
        super().__init__(**kwargs)
        self.int_steps = int(int_steps)

    def call(self, velocity):
        return spatial_ops.integrate_velocity(velocity, steps=self.int_steps)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "int_steps": self.int_steps}


@_register
class Resize(keras.layers.Layer):
    """Resizes a volume by a zoom factor with corner-aligned sampling (neurite's Resize).

    Input ``(batch, *spatial, C)``; output ``(batch, *[int(n * zoom_factor)], C)``.

    Args:
        zoom_factor: e.g. 0.5 or 2.
        interp_method: ``"linear"`` or ``"nearest"``.
    """

    def __init__(self, zoom_factor: float, interp_method: str = "linear", **kwargs):
        super().__init__(**kwargs)
        self.zoom_factor = float(zoom_factor)
        self.interp_method = interp_method

    def call(self, volume):
        return spatial_ops.resize(volume, self.zoom_factor, method=self.interp_method)

    def compute_output_shape(self, input_shape):
        spatial = [None if n is None else int(n * self.zoom_factor) for n in input_shape[1:-1]]
        return (input_shape[0], *spatial, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "zoom_factor": self.zoom_factor,
                "interp_method": self.interp_method}


@_register
class RescaleTransform(Resize):
    """Resizes a displacement field and scales its vectors (VoxelMorph's RescaleTransform).

    Input ``(batch, D, H, W, 3)`` in voxels; output on a grid ``zoom_factor`` times finer, with
    vectors in voxels of that grid.

    Args:
        zoom_factor: e.g. 0.5 (to half resolution) or 2 (back to full resolution).
    """

    def __init__(self, zoom_factor: float, **kwargs):
        kwargs.pop("interp_method", None)
        super().__init__(zoom_factor, interp_method="linear", **kwargs)

    def call(self, displacement):
        return spatial_ops.rescale_displacement(displacement, self.zoom_factor)

    def get_config(self):
        config = super().get_config()
        config.pop("interp_method")
        return config


@_register
class LeakyReLU(keras.layers.LeakyReLU):
    """``keras.layers.LeakyReLU`` with the output-based gradient of :func:`dazoo.ops.leaky_relu`
    (same values and gradients, one activation less kept for the backward pass)."""

    def call(self, inputs):
        return spatial_ops.leaky_relu(inputs, self.negative_slope)
