"""The 3D U-Net body shared by the registration and segmentation networks.

Topology and layer names follow VoxelMorph's ``Unet`` (so VoxelMorph weights map onto it
one to one): per level, ``conv_per_level`` 3x3x3 convolutions with LeakyReLU(0.2), max
pooling by 2 on the way down, nearest upsampling by 2 and concatenation with the skip
connection on the way up, then any remaining "final" convolutions at full resolution.
"""
from __future__ import annotations

from typing import Sequence

import keras

from dazoo.layers import LeakyReLU

DEFAULT_FEATURES = ((16, 32, 32, 32), (32, 32, 32, 32, 32, 16, 16))

NORMALIZATIONS = (None, "batch", "instance", "group")


def check_features(features: Sequence[Sequence[int]], conv_per_level: int) -> tuple:
    """Validates a VoxelMorph-style ``(encoder, decoder)`` feature spec; returns it as tuples.

    ``encoder`` lists the filters of every encoder convolution (``conv_per_level`` per
    level); ``decoder`` lists as many decoder convolutions, then the final full-resolution
    convolutions.
    """
    if len(features) != 2:
        raise ValueError(f"features must be (encoder, decoder) lists, got {features!r}")
    encoder, decoder = (tuple(int(f) for f in part) for part in features)
    if not encoder or len(encoder) % conv_per_level:
        raise ValueError(
            f"the encoder needs a multiple of conv_per_level={conv_per_level} convolutions, "
            f"got {len(encoder)}"
        )
    if len(decoder) < len(encoder):
        raise ValueError(
            f"the decoder needs at least as many convolutions as the encoder "
            f"({len(encoder)}), got {len(decoder)}"
        )
    return encoder, decoder


def num_poolings(features: Sequence[Sequence[int]], conv_per_level: int = 1) -> int:
    """How many times the U-Net halves its input: each input dimension must divide 2**this."""
    encoder, _ = check_features(features, conv_per_level)
    return len(encoder) // conv_per_level


def _normalization(kind: str | None, name: str, dtype=None):
    if kind is None:
        return None
    if kind == "batch":
        return keras.layers.BatchNormalization(name=name, dtype=dtype)
    if kind == "instance":
        # Keras's own layer: dazoo.layers.GroupNormalization (lean backward pass, same
        # weights) saved no memory at 160x192x160 and broke the two-replica equality test.
        return keras.layers.GroupNormalization(groups=-1, name=name, dtype=dtype)
    if kind == "group":
        return keras.layers.GroupNormalization(groups=8, name=name, dtype=dtype)
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {kind!r}")


def conv_block(x, filters: int, *, name: str, normalization: str | None = None, dtype=None):
    """3x3x3 convolution (he_normal), optional normalisation, LeakyReLU(0.2) (dazoo's, whose
    gradient needs only its output: the convolution's output is not kept for backward).

    ``dtype`` is a Keras dtype policy for the block's layers (None: the global policy).
    """
    x = keras.layers.Conv3D(filters, 3, padding="same", kernel_initializer="he_normal",
                            name=name, dtype=dtype)(x)
    norm = _normalization(normalization, f"{name}_norm", dtype)
    if norm is not None:
        x = norm(x)
    return LeakyReLU(negative_slope=0.2, name=f"{name}_activation", dtype=dtype)(x)


def unet(
    x,
    *,
    features: Sequence[Sequence[int]] = DEFAULT_FEATURES,
    conv_per_level: int = 1,
    half_res: bool = False,
    normalization: str | None = None,
    dropout: float = 0.0,
    dtype=None,
    name: str = "unet",
):
    """Applies a VoxelMorph-style U-Net to the symbolic tensor ``x``.

    Args:
        x: ``(batch, D, H, W, C)`` Keras tensor; each spatial size must divide
            ``2**num_poolings(features, conv_per_level)``.
        features: ``(encoder, decoder)`` filters, see :func:`check_features`.
        conv_per_level: convolutions per resolution level.
        half_res: stop before the last upsampling (output at half resolution).
        normalization: ``None``, ``"batch"``, ``"instance"`` or ``"group"``.
        dropout: spatial dropout rate after each decoder level (0 disables it).
        dtype: Keras dtype policy of the layers, e.g. ``"mixed_bfloat16"`` (None: global).
        name: prefix of every layer name.

    Returns:
        ``(batch, D, H, W, decoder[-1])`` (halved spatially when ``half_res``).
    """
    encoder, decoder = check_features(features, conv_per_level)
    levels = len(encoder) // conv_per_level
    final_convs = decoder[len(encoder):]

    skips = []
    for level in range(levels):
        for conv in range(conv_per_level):
            x = conv_block(x, encoder[level * conv_per_level + conv],
                           name=f"{name}_enc_conv_{level}_{conv}", normalization=normalization,
                           dtype=dtype)
        skips.append(x)
        x = keras.layers.MaxPooling3D(2, name=f"{name}_enc_pooling_{level}", dtype=dtype)(x)

    for level in range(levels):
        real_level = levels - level - 1
        for conv in range(conv_per_level):
            x = conv_block(x, decoder[level * conv_per_level + conv],
                           name=f"{name}_dec_conv_{real_level}_{conv}",
                           normalization=normalization, dtype=dtype)
        if dropout:
            x = keras.layers.SpatialDropout3D(dropout, name=f"{name}_dec_dropout_{real_level}",
                                              dtype=dtype)(x)
        if half_res and level == levels - 1:
            skips.pop()
            break
        x = keras.layers.UpSampling3D(2, name=f"{name}_dec_upsample_{real_level}", dtype=dtype)(x)
        x = keras.layers.Concatenate(axis=-1, name=f"{name}_dec_upsample_{real_level}_concat",
                                     dtype=dtype)(
            [x, skips.pop()]
        )

    for num, filters in enumerate(final_convs):
        x = conv_block(x, filters, name=f"{name}_dec_final_conv_{num}",
                       normalization=normalization, dtype=dtype)
    return x
