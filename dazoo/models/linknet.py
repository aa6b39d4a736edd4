"""A 3D LinkNet (Chaurasia & Culurciello 2017, in 3D as deepbet's brain extractor uses it):
a residual encoder with four stages and a light decoder whose outputs are added to the
encoder's (links, not concatenations), instance normalisation and ReLU throughout.

Layer for layer the network of deepbet 1.0.2 (Fisch et al. 2024, MIT license), so that its
published weights load unchanged (``examples/brainmask/convert_deepbet.py``; channels last
here, first there). PyTorch's padding conventions are kept exactly: symmetric zero padding
before 'valid' convolutions and pooling, and transposed convolutions cropped as PyTorch's
``padding`` / ``output_padding`` define them.
"""
from __future__ import annotations

import keras
from keras import ops

__all__ = ["LinkNet3D", "TorchConvTranspose3D", "layer_name", "module_path"]


def layer_name(path: str) -> str:
    """The Keras layer name of a PyTorch module path (``down0.block1.double_conv.0`` ->
    ``down0-block1-double_conv-0``): the torch backend refuses "." in a layer's name (its
    variables become ``torch.nn.Parameter`` entries)."""
    return path.replace(".", "-")


def module_path(name: str) -> str:
    """The PyTorch module path of a :func:`layer_name`."""
    return name.replace("-", ".")


@keras.saving.register_keras_serializable(package="dazoo")
class TorchConvTranspose3D(keras.layers.Layer):
    """A transposed 3D convolution with PyTorch's ``ConvTranspose3d`` output size:
    ``(n - 1) * stride - 2 * padding + kernel + output_padding``. Kernel shape ``(k, k, k,
    filters, channels in)``."""

    def __init__(self, filters, kernel_size, strides=1, padding=0, output_padding=0,
                 use_bias=False, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size = int(filters), int(kernel_size)
        self.strides, self.padding = int(strides), int(padding)
        self.output_padding, self.use_bias = int(output_padding), bool(use_bias)

    def build(self, input_shape):
        k = self.kernel_size
        self.kernel = self.add_weight(name="kernel", shape=(k, k, k, self.filters,
                                                             int(input_shape[-1])))
        self.bias = (self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")
                     if self.use_bias else None)

    def call(self, x):
        y = ops.conv_transpose(x, self.kernel, strides=self.strides, padding="valid")
        p, q = self.padding, self.padding - self.output_padding
        if p or q:
            shape = ops.shape(y)
            y = y[:, p:shape[1] - q, p:shape[2] - q, p:shape[3] - q, :]
        if self.bias is not None:
            y = y + self.bias
        return y

    def compute_output_shape(self, input_shape):
        def size(n):
            return None if n is None else ((n - 1) * self.strides - 2 * self.padding
                                           + self.kernel_size + self.output_padding)
        return (input_shape[0], *(size(n) for n in input_shape[1:4]), self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": self.kernel_size, "strides": self.strides,
                "padding": self.padding, "output_padding": self.output_padding,
                "use_bias": self.use_bias}


def _conv(x, filters, kernel, stride, padding, name, use_bias=False):
    if padding:
        x = keras.layers.ZeroPadding3D(padding, name=layer_name(f"{name}.pad"))(x)
    return keras.layers.Conv3D(filters, kernel, strides=stride, padding="valid",
                               use_bias=use_bias, name=layer_name(name))(x)


def _norm(x, name):
    # Instance normalisation without scale or shift, eps 1e-5 (PyTorch's InstanceNorm3d).
    return keras.layers.GroupNormalization(groups=-1, center=False, scale=False,
                                           epsilon=1e-5, name=layer_name(name))(x)


def _relu(x):
    return keras.layers.ReLU()(x)


def _block(x, filters, stride, name):
    """``relu(double_conv(x) + downsample(x))``; the downsampling path only where the
    resolution or width changes."""
    residual = x
    if stride != 1 or x.shape[-1] != filters:
        residual = _norm(_conv(x, filters, 1, stride, 0, f"{name}.downsample.0"),
                         f"{name}.downsample.1")
    y = _relu(_norm(_conv(x, filters, 3, stride, 1, f"{name}.double_conv.0"),
                    f"{name}.double_conv.1"))
    y = _norm(_conv(y, filters, 3, 1, 1, f"{name}.double_conv.3"), f"{name}.double_conv.4")
    return _relu(keras.layers.Add()([y, residual]))


def _up(x, filters, stride, name):
    width = x.shape[-1] // 4
    y = _relu(_norm(_conv(x, width, 1, 1, 0, f"{name}.conv1.0"), f"{name}.conv1.1"))
    y = TorchConvTranspose3D(width, 3, stride, 1, stride - 1,
                             name=layer_name(f"{name}.tp_conv.0"))(y)
    y = _relu(_norm(y, f"{name}.tp_conv.1"))
    return _relu(_norm(_conv(y, filters, 1, 1, 0, f"{name}.conv2.0"), f"{name}.conv2.1"))


def LinkNet3D(shape=(None, None, None), *, channels=(16, 32, 64, 128), classes=2,
              name="linknet3d") -> keras.Model:
    """deepbet's LinkNet3d as a Keras functional model: ``(batch, D, H, W, 1)`` ->
    class probabilities ``(batch, D, H, W, classes)`` (softmax). Layers are named after the
    PyTorch modules (``down1-block1-double_conv-0`` for ``down1.block1.double_conv.0``: see
    :func:`module_path`) so the conversion maps by name.
    Each spatial size must be a multiple of 32."""
    inputs = keras.Input((*shape, 1), name="image")
    c = list(channels)
    x0 = _relu(_norm(_conv(inputs, c[0], 7, 2, 3, "init.0"), "init.1"))
    x0 = keras.layers.ZeroPadding3D(1, name=layer_name("init.3.pad"))(x0)  # after ReLU: 0 = -inf
    x0 = keras.layers.MaxPooling3D(3, strides=2, padding="valid", name=layer_name("init.3"))(x0)
    skips, x = [], x0
    for stage, (width, stride) in enumerate(zip(c, (1, 2, 2, 2))):
        x = _block(x, width, stride, f"down{stage}.block1")
        x = _block(x, width, 1, f"down{stage}.block2")
        skips.append(x)
    # Decoder: up0 (128 -> 64, x2), up1 (64 -> 32, x2), up2 (32 -> 16, x2), up3 (16 -> 16).
    y = skips[3]
    for stage, (width, stride, skip) in enumerate(zip((c[2], c[1], c[0], c[0]), (2, 2, 2, 1),
                                                     (skips[2], skips[1], skips[0], x0))):
        y = keras.layers.Add()([_up(y, width, stride, f"up{stage}"), skip])
    half = c[0] // 2
    y = TorchConvTranspose3D(half, 3, 2, 1, 1, use_bias=True, name=layer_name("tp_conv1.0"))(y)
    y = _relu(_norm(y, "tp_conv1.1"))
    y = _relu(_norm(_conv(y, half, 3, 1, 1, "conv.0", use_bias=True), "conv.1"))
    y = TorchConvTranspose3D(classes, 2, 2, 0, 0, use_bias=True, name="tp_conv2")(y)
    outputs = keras.layers.Softmax(axis=-1, name="probabilities")(y)
    return keras.Model(inputs, outputs, name=name)
