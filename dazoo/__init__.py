"""dazoo: DeepAtlas (Xu & Niethammer, MICCAI 2019) for Keras 3.

Joint semi-supervised learning of 3D image registration and segmentation, with
VoxelMorph-compatible layers and pretrained presets.

Conventions used everywhere in dazoo: channels-last tensors ``(batch, D, H, W, C)``,
``ij`` indexing, displacement fields in voxels of the network grid, and the moving
image sampled at ``x + u(x)``.

The public names are imported lazily so that ``import dazoo`` (and ``dazoo --help``)
do not pay for importing Keras and TensorFlow.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "layers": ("dazoo.layers", None),
    "losses": ("dazoo.losses", None),
    "ops": ("dazoo.ops", None),
    "metrics": ("dazoo.metrics", None),
    "io": ("dazoo.io", None),
    "RegistrationNet": ("dazoo.models.registration", "RegistrationNet"),
    "SegmentationNet": ("dazoo.models.segmentation", "SegmentationNet"),
    "DeepAtlas": ("dazoo.models.deep_atlas", "DeepAtlas"),
    "load_voxelmorph_weights": ("dazoo.models.registration", "load_voxelmorph_weights"),
    "DazooInputError": ("dazoo.errors", "DazooInputError"),
    "load": ("dazoo.hub", "load"),
    "segment": ("dazoo.hub", "segment"),
    "register": ("dazoo.hub", "register"),
    "list_presets": ("dazoo.presets", "list_presets"),
}

__all__ = sorted([*_LAZY, "__version__"])
#: Names that do not import Keras.
_LIGHT = {"io", "metrics", "DazooInputError", "list_presets"}


def __getattr__(name: str):
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'dazoo' has no attribute {name!r}") from None
    if name not in _LIGHT:  # TensorFlow's start-up lines hidden, as in the CLI
        from dazoo.startup import quiet_for_api

        quiet_for_api()
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return __all__
