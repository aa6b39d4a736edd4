"""Training: from files to batches to a trained DeepAtlas and an exported preset.

The data flow, one module per stage:

* :mod:`~dazoo.training.subjects`: a CSV manifest or a folder -> :class:`Subject` items;
* :mod:`~dazoo.training.cache`: each subject preprocessed once (:class:`VolumeCache`);
* :mod:`~dazoo.training.augment`: random spatial / intensity :class:`Augmentation`;
* :mod:`~dazoo.training.synth`: :class:`LabelSynth`, images synthesised from label maps
  (SynthSeg-style), on the fly in the datasets;
* :mod:`~dazoo.training.pairs`: :class:`PairDataset`, phase-aware (moving, fixed) batches;
* :mod:`~dazoo.training.batch`: the batch contract (:data:`BATCH_KEYS`, :func:`make_batch`)
  and the phase :class:`Schedule`, shared with the model;
* :mod:`~dazoo.training.recipe`: a JSON :class:`Recipe` declaring a whole run;
* :mod:`~dazoo.training.callbacks`: checkpoints that resume exactly, native-resolution
  validation that keeps the best checkpoint;
* :mod:`~dazoo.training.engine`: :func:`train` (``dazoo train``), :func:`finetune`
  (``dazoo finetune``) and :func:`export` (``dazoo export``).

Label tables (:class:`dazoo.labels.LabelMap`) are re-exported here. Names are imported lazily,
so that the model can import the batch contract without importing the data code.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "BATCH_KEYS": "batch", "Schedule": "batch", "make_batch": "batch",
    "Subject": "subjects", "read_manifest": "subjects", "find_subjects": "subjects",
    "load_subjects": "subjects",
    "VolumeCache": "cache", "CachedSubject": "cache",
    "Augmentation": "augment",
    "LabelSynth": "synth", "SynthSample": "synth",
    "PairDataset": "pairs",
    "Recipe": "recipe",
    "train": "engine", "finetune": "engine", "export": "engine", "Run": "engine",
}

__all__ = sorted([*_LAZY, "LabelMap"])


def __getattr__(name: str):
    if name == "LabelMap":
        from dazoo.labels import LabelMap

        return LabelMap
    if name not in _LAZY:
        raise AttributeError(f"module 'dazoo.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dazoo.training.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
