"""Training: from files to batches to a trained DeepAtlas and an exported preset.

The data flow, one module per stage:

* :mod:`~dazoo.training.subjects`: a CSV manifest or a folder -> :class:`Subject` items;
* :mod:`~dazoo.training.cache`: each subject preprocessed once (:class:`VolumeCache`);
* :mod:`~dazoo.training.augment`: random spatial / intensity :class:`Augmentation`;
* :mod:`~dazoo.training.synth`: :class:`LabelSynth`, images synthesised from label maps
  (SynthSeg-style), on the fly in the datasets;
* :mod:`~dazoo.training.pairs`: :class:`PairDataset`, phase-aware (moving, fixed) batches;
* :mod:`~dazoo.training.recipe`: a JSON :class:`Recipe` declaring a whole run;
* :mod:`~dazoo.training.callbacks`: checkpoints that resume exactly, native-resolution
  validation that keeps the best checkpoint;
* :mod:`~dazoo.training.data`: what a run trains on, checked (split, label maps, label
  table, preprocessing); :mod:`~dazoo.training.runfolder`: the run folder (new or resumed,
  its log and record);
* :mod:`~dazoo.training.engine`: :func:`train` (``dazoo train``: the model from the recipe,
  fitted) and :func:`finetune` (``dazoo finetune``); :mod:`~dazoo.training.exporter`:
  :func:`export` (``dazoo export``).

The batch contract (:data:`~dazoo.batch.BATCH_KEYS`, :func:`~dazoo.batch.make_batch`) and the
:class:`~dazoo.batch.Schedule` live one floor below, in :mod:`dazoo.batch`, shared with the
model; they and the label tables (:class:`dazoo.labels.LabelMap`) are re-exported here. Names
are imported on first use, so that ``import dazoo.training.recipe`` (the CLI's argument
checks) does not import TensorFlow.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "BATCH_KEYS": "dazoo.batch", "Schedule": "dazoo.batch", "make_batch": "dazoo.batch",
    "Subject": "subjects", "read_manifest": "subjects", "find_subjects": "subjects",
    "load_subjects": "subjects",
    "VolumeCache": "cache", "CachedSubject": "cache",
    "Augmentation": "augment",
    "LabelSynth": "synth", "SynthSample": "synth",
    "PairDataset": "pairs",
    "Recipe": "recipe",
    "train": "engine", "finetune": "engine", "export": "exporter", "Run": "engine",
}

__all__ = sorted([*_LAZY, "LabelMap"])


def __getattr__(name: str):
    if name == "LabelMap":
        from dazoo.labels import LabelMap

        return LabelMap
    if name not in _LAZY:
        raise AttributeError(f"module 'dazoo.training' has no attribute {name!r}")
    module = _LAZY[name]
    module = module if module.startswith("dazoo.") else f"dazoo.training.{module}"
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
