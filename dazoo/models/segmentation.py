"""SegmentationNet: a 3D U-Net giving class probabilities."""
from __future__ import annotations

from typing import Sequence

import keras

from dazoo.models.unet import (
    NORMALIZATIONS,
    check_divisible,
    check_features,
    layers_of,
    num_poolings,
    unet,
)

__all__ = ["SegmentationNet"]

DEFAULT_SEG_FEATURES = ((16, 32, 64, 64), (64, 64, 32, 32, 16, 16))


@keras.saving.register_keras_serializable(package="dazoo")
class SegmentationNet(keras.Model):
    """3D U-Net segmenter: image in, class probabilities out.

    Same U-Net body as :class:`~dazoo.RegistrationNet` (VoxelMorph layout), with optional
    normalisation and dropout, and a 1x1x1 convolution + softmax head (computed in float32).

    Input: ``(batch, D, H, W, in_channels)``. Output: ``(batch, D, H, W, num_classes)``
    probabilities summing to 1 over the last axis; class 0 is the background.

    Args:
        inshape: spatial shape ``(D, H, W)``; each size must divide ``2**levels``.
        num_classes: number of classes K, background included.
        features: ``(encoder, decoder)`` filters (VoxelMorph-style spec).
        conv_per_level: convolutions per U-Net level.
        normalization: ``None``, ``"batch"``, ``"instance"`` or ``"group"``.
        dropout: spatial dropout rate in the decoder.
        in_channels: image channels.
        dtype: the standard Keras dtype policy of the network, e.g. ``"mixed_bfloat16"``
            (float32 weights, bfloat16 arithmetic: about 2x faster training on CPUs with
            AVX512-BF16); ``None`` uses the global policy. The softmax is always float32.
            The weights do not depend on it: a model trained in ``"mixed_bfloat16"`` loads
            its weights into the same network built with ``dtype="float32"``.

    Example:
    >>> net = SegmentationNet((64, 64, 64), num_classes=5)
    >>> net(image).shape
    (1, 64, 64, 64, 5)
    """

    def __init__(
        self,
        inshape: Sequence[int],
        num_classes: int,
        *,
        features: Sequence[Sequence[int]] = DEFAULT_SEG_FEATURES,
        conv_per_level: int = 1,
        normalization: str | None = "instance",
        dropout: float = 0.0,
        in_channels: int = 1,
        dtype=None,
        name: str = "segmentation_net",
        **kwargs,
    ):
        dtype = None if dtype is None else keras.dtype_policies.get(dtype)
        inshape = tuple(int(n) for n in inshape)
        features = check_features(features, conv_per_level)
        check_divisible(inshape, num_poolings(features, conv_per_level))
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + 1), got {num_classes}")

        # === Functional model ===
        image = keras.Input(shape=(*inshape, in_channels), name="image")
        x = unet(image, features=features, conv_per_level=conv_per_level,
                 normalization=normalization, dropout=dropout, dtype=dtype, name="unet")
        logits = keras.layers.Conv3D(num_classes, 1, name="logits", dtype=dtype)(x)
        probabilities = keras.layers.Softmax(axis=-1, dtype="float32", name="probabilities")(logits)
        super().__init__(inputs=image, outputs=probabilities, name=name, **kwargs)
        if dtype is not None:
            self.dtype_policy = dtype  # what keras.Model.get_config records as "dtype"

        # === Config ===
        self.inshape = inshape
        self.num_classes = int(num_classes)
        self.features = features
        self.conv_per_level = int(conv_per_level)
        self.normalization = normalization
        self.dropout = float(dropout)
        self.in_channels = int(in_channels)

    def unet_features(self, image, *, training=False, recompute: int = 0):
        """The U-Net's output for ``image`` (the head's input), from this network's layers;
        ``recompute`` > 0 recomputes the activations of that many finest resolution levels
        in the backward pass instead of keeping them (see :func:`dazoo.models.unet.unet`):
        the same values and gradients, less memory."""
        return unet(image, features=self.features, conv_per_level=self.conv_per_level,
                    normalization=self.normalization, dropout=self.dropout,
                    name="unet", get=layers_of(self), training=training, recompute=recompute)

    def recomputed(self, image, *, training=False, recompute: int = 0):
        """``self(image, training=training)``; with ``recompute`` > 0, from the same layers
        with :meth:`unet_features`'s recomputation (same probabilities and gradients)."""
        if not recompute:
            return self(image, training=training)
        x = self.unet_features(image, training=training, recompute=recompute)
        return self.get_layer("probabilities")(self.get_layer("logits")(x))

    def get_config(self):
        config = super().get_config()  # name, trainable, dtype (the Keras policy)
        return {
            **config,
            "inshape": list(self.inshape),
            "num_classes": self.num_classes,
            "features": [list(f) for f in self.features],
            "conv_per_level": self.conv_per_level,
            "normalization": self.normalization,
            "dropout": self.dropout,
            "in_channels": self.in_channels,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
