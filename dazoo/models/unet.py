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
        # Keras's own layer: a written-out lean backward pass (tried, since deleted) saved no
        # memory at 160x192x160 and broke the two-replica MirroredStrategy equality test.
        return keras.layers.GroupNormalization(groups=-1, name=name, dtype=dtype)
    if kind == "group":
        return keras.layers.GroupNormalization(groups=8, name=name, dtype=dtype)
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {kind!r}")


def conv_block(x, filters: int, *, name: str, normalization: str | None = None, dtype=None,
               get=None, training=None):
    """3x3x3 convolution (he_normal), optional normalisation, LeakyReLU(0.2) (dazoo's, whose
    gradient needs only its output: the convolution's output is not kept for backward).

    ``dtype`` is a Keras dtype policy for the block's layers (None: the global policy).
    ``get(name, make)`` gives each layer (see :func:`unet`); by default it is created.
    ``training`` is passed to the normalisation (batch normalisation's mode).
    """
    get = get or create_layer
    x = get(name, lambda: keras.layers.Conv3D(filters, 3, padding="same",
                                              kernel_initializer="he_normal", name=name,
                                              dtype=dtype))(x)
    if normalization is not None:
        x = get(f"{name}_norm", lambda: _normalization(normalization, f"{name}_norm", dtype))(
            x, training=training)
    return get(f"{name}_activation",
               lambda: LeakyReLU(negative_slope=0.2, name=f"{name}_activation", dtype=dtype))(x)


def create_layer(name, make):
    """The default ``get(name, make)`` of :func:`unet`: builds a new layer."""
    return make()


def layers_of(model):
    """A ``get(name, make)`` that fetches the layers of the built ``model`` by name (to run
    :func:`unet` again on tensors, e.g. with ``recompute``)."""
    return lambda name, make: model.get_layer(name)


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
    get=None,
    training=None,
    recompute: int = 0,
):
    """Applies a VoxelMorph-style U-Net to ``x``.

    Args:
        x: ``(batch, D, H, W, C)`` Keras tensor (building a model) or tensor (running the
            layers of a built one, with ``get=layers_of(model)``); each spatial size must
            divide ``2**num_poolings(features, conv_per_level)``.
        features: ``(encoder, decoder)`` filters, see :func:`check_features`.
        conv_per_level: convolutions per resolution level.
        half_res: stop before the last upsampling (output at half resolution).
        normalization: ``None``, ``"batch"``, ``"instance"`` or ``"group"``.
        dropout: spatial dropout rate after each decoder level (0 disables it).
        dtype: Keras dtype policy of the layers, e.g. ``"mixed_bfloat16"`` (None: global).
        name: prefix of every layer name.
        get: ``get(layer_name, make)`` returns the layer of that name; the default creates
            it with ``make()`` (building); :func:`layers_of` fetches a built model's.
        training: passed to the normalisation and dropout layers.
        recompute: gradient checkpointing (``keras.remat``) at the ``recompute`` finest
            resolution levels: each convolution block there (convolution, normalisation,
            activation; the decoder's first one with the upsampling and concatenation
            before it) keeps only its input for the backward pass and runs again there, one
            block at a time. Same values and gradients; less memory, one more forward pass
            of those levels. Not in training with dropout (the recomputed masks would differ)
            or batch normalisation (its moving statistics would be updated twice).

    Returns:
        ``(batch, D, H, W, decoder[-1])`` (halved spatially when ``half_res``).
    """
    get = get or create_layer
    encoder, decoder = check_features(features, conv_per_level)
    levels = len(encoder) // conv_per_level
    final_convs = decoder[len(encoder):]
    if recompute and training is not False:
        if dropout:
            raise ValueError("recompute does not work with dropout: the recomputed dropout "
                             "masks would differ from the forward pass's")
        if normalization == "batch":
            raise ValueError("recompute does not work with batch normalisation in training: "
                             "the recomputation would update its moving statistics twice")

    def stage(resolution, fn):
        """``fn``, checkpointed when ``resolution`` (0 = the input's) is among the
        ``recompute`` finest."""
        return keras.remat(fn) if resolution < recompute else fn

    def run(resolution, units, *inputs):
        """``units`` in order, the first on ``inputs``: each one checkpointed on its own at
        the recomputed resolutions, so that the backward pass holds one unit's activations
        at a time and only the units' outputs are kept."""
        x = stage(resolution, units[0])(*inputs)
        for unit in units[1:]:
            x = stage(resolution, unit)(x)
        return x

    def conv(filters, block_name):
        return lambda x: conv_block(x, filters, name=block_name, normalization=normalization,
                                    dtype=dtype, get=get, training=training)

    def decoding(level):  # the decoder's level-th convolutions (coarsest first), dropout
        real_level = levels - level - 1
        units = [conv(decoder[level * conv_per_level + c], f"{name}_dec_conv_{real_level}_{c}")
                 for c in range(conv_per_level)]
        if dropout:
            units.append(lambda x: get(
                f"{name}_dec_dropout_{real_level}",
                lambda: keras.layers.SpatialDropout3D(
                    dropout, name=f"{name}_dec_dropout_{real_level}", dtype=dtype))(
                x, training=training))
        return units

    finals = [conv(filters, f"{name}_dec_final_conv_{num}")
              for num, filters in enumerate(final_convs)]
    last = 1 if half_res else 0  # the resolution of the output

    skips = []
    for level in range(levels):
        x = run(level, [conv(encoder[level * conv_per_level + c], f"{name}_enc_conv_{level}_{c}")
                        for c in range(conv_per_level)], x)
        skips.append(x)
        x = get(f"{name}_enc_pooling_{level}",
                lambda: keras.layers.MaxPooling3D(2, name=f"{name}_enc_pooling_{level}",
                                                  dtype=dtype))(x)

    x = run(levels, decoding(0) + (finals if levels == last else []), x)
    for level in range(levels - last):
        real_level = levels - level - 1  # the resolution this upsampling reaches
        units = ((decoding(level + 1) if level + 1 < levels else [])
                 + (finals if real_level == last else []))

        def up(x, skip, real_level=real_level, then=units[:1]):
            x = get(f"{name}_dec_upsample_{real_level}",
                    lambda: keras.layers.UpSampling3D(
                        2, name=f"{name}_dec_upsample_{real_level}", dtype=dtype))(x)
            x = get(f"{name}_dec_upsample_{real_level}_concat",
                    lambda: keras.layers.Concatenate(
                        axis=-1, name=f"{name}_dec_upsample_{real_level}_concat",
                        dtype=dtype))([x, skip])
            return then[0](x) if then else x

        x = run(real_level, [up] + units[1:], x, skips[real_level])
    return x


def check_divisible(inshape: Sequence[int], levels: int) -> None:
    """Refuses a grid a U-Net with ``levels`` poolings cannot take (every size a multiple of
    ``2**levels``)."""
    multiple = 2**levels
    bad = [n for n in inshape if n % multiple]
    if bad:
        raise ValueError(
            f"every spatial size must be a multiple of 2**{levels} = {multiple} for this "
            f"U-Net, got {tuple(inshape)}"
        )
