"""High-level entry points: ``load`` a preset, ``segment`` and ``register`` with it."""
from __future__ import annotations

import functools
import os

from dazoo.io import Source

__all__ = ["load", "segment", "register", "DEFAULT_PRESET"]

DEFAULT_PRESET = "brain"


@functools.lru_cache(maxsize=4)
def _cached(name_or_path: str):
    from dazoo.pipeline import Pipeline
    from dazoo.presets import DEEPATLAS, get_preset

    return Pipeline(get_preset(name_or_path).require(DEEPATLAS))


def load(name_or_path: str | os.PathLike = DEFAULT_PRESET):
    """Loads a pretrained preset (by name, e.g. ``"brain"``, or a preset folder).

    Works offline: the presets ship inside the package. The weights' sha256 is checked
    against the model card. Loaded pipelines are cached per preset folder for the life of
    the process, so repeated calls are free (a preset rewritten meanwhile is not reloaded).

    Returns:
        a :class:`dazoo.pipeline.Pipeline` with ``.segment(image)`` and
        ``.register(moving, fixed, *, moving_labels=None)``.

    Example:
    >>> brain = dazoo.load("brain")
    >>> brain.segment("t1.nii.gz").save("t1_dkt.nii.gz")
    """
    key = os.fspath(name_or_path)
    if os.path.isdir(key):
        key = os.path.realpath(key)  # the same folder, however it is written
    return _cached(key)


def segment(image: Source, *, preset: str | os.PathLike = DEFAULT_PRESET):
    """Segments ``image`` with ``preset`` (default ``"brain"``); see ``Pipeline.segment``."""
    return load(preset).segment(image)


def register(moving: Source, fixed: Source, *, moving_labels: Source | None = None,
             preset: str | os.PathLike = DEFAULT_PRESET):
    """Registers ``moving`` onto ``fixed`` with ``preset``; see ``Pipeline.register``."""
    return load(preset).register(moving, fixed, moving_labels=moving_labels)
