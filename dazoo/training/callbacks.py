"""Keras callbacks of a training run: exact-resume checkpoints and native-resolution validation.

A run trains through ``model.fit`` with one Keras "epoch" per checkpoint interval, so that
every epoch end is a step count the run can resume from exactly: the ``.keras`` checkpoint
holds the weights and both optimizers' state (their iteration counts are the schedule's
position), and batch ``i`` of epoch ``e`` is drawn from a seed of ``(e, i)`` alone
(:class:`~dazoo.training.pairs.PairDataset`).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import keras
import numpy as np

from dazoo import io
from dazoo.batch import REGISTRATION, SEGMENTATION, make_batch
from dazoo.evaluate import Case, evaluate_registration, evaluate_segmentation
from dazoo.labels import LabelMap

__all__ = ["ProgressLog", "RunCheckpoint", "Validation", "Validator", "save_atomic",
           "steps_done"]


def _count(variable) -> int:
    value = variable.value
    return int(value.numpy() if hasattr(value, "numpy") else value)  # tf.distribute's too


def steps_done(model) -> int:
    """Training steps a DeepAtlas has made: the sum of its two optimizers' iterations (in
    ``"simultaneous"`` mode, where each step updates both, the registration optimizer's:
    :meth:`dazoo.batch.Schedule.steps_done`)."""
    return model.schedule.steps_done(_count(model.reg_optimizer.iterations),
                                     _count(model.seg_optimizer.iterations))


def save_atomic(model, path: str | os.PathLike) -> None:
    """``model.save(path)`` through a temporary file and a rename: a kill never leaves a
    truncated checkpoint."""
    io.atomic_write(path, model.save)


class ProgressLog(keras.callbacks.Callback):
    """Progress lines for output that is not a terminal (a log file, ``nohup``), where
    Keras's progress bar does not draw: the first step, then one line at most every
    ``seconds``: ``step S/T``, the running means of the losses over the current checkpoint
    interval, seconds per step this session, and the time left at that pace.

    Args:
        total: the run's last step.
        seconds: the least time between two lines (0: every step).
        log: function receiving the lines.
    """

    def __init__(self, total: int, *, seconds: float = 30.0,
                 log: Callable[[str], None] = print):
        super().__init__()
        self.total, self.seconds, self.log = int(total), float(seconds), log

    def on_train_begin(self, logs=None):
        self.first = steps_done(self.model)
        self.started = self.last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        step = steps_done(self.model)
        if step != self.first + 1 and step != self.total and now - self.last < self.seconds:
            return
        self.last = now
        per_step = (now - self.started) / max(step - self.first, 1)
        left = int(round(per_step * (self.total - step)))
        shown = " ".join(f"{k} {float(v):.4g}" for k, v in sorted((logs or {}).items()))
        self.log(f"step {step}/{self.total}: {shown}; {per_step:.2f} s/step, "
                 f"{left // 3600:d}:{left % 3600 // 60:02d}:{left % 60:02d} left")


class RunCheckpoint(keras.callbacks.Callback):
    """Saves ``RUN/checkpoint.keras`` at the end of every epoch (= checkpoint interval).

    Args:
        path: the checkpoint file.
        log: function receiving one line per checkpoint.
    """

    def __init__(self, path: str | os.PathLike, *, log: Callable[[str], None] | None = None):
        super().__init__()
        self.path = os.fspath(path)
        self.log = log

    def on_epoch_end(self, epoch, logs=None):
        save_atomic(self.model, self.path)
        if self.log is not None:
            self.log(f"step {steps_done(self.model)}: checkpoint {self.path}")


class Validator:
    """Scores a DeepAtlas on validation subjects, on the model grid and at native resolution.

    * On the model grid (cheap; the numbers ``DeepAtlas.test_step`` reports): ``seg_dice``,
      the segmenter's hard-label Dice on each labelled image, and ``warped_dice``, the Dice of
      the moving labels warped onto the fixed image, over ordered pairs.
    * At native resolution (the scans' own grids, as ``dazoo evaluate`` scores a preset):
      ``native_seg_dice``, each prediction resampled onto its scan's grid against the scan's
      label map, and ``native_reg_dice``, the moving label map carried onto the fixed scan's
      grid (with ``folding_fraction``, the mean share of voxels with det(J) <= 0). Both are
      means over the label table's regions (:func:`dazoo.evaluate.score_labels`; also
      ``*_merged_dice``, left and right merged, and the values per subject / pair)
      with the native labels mapped through the run's :class:`~dazoo.labels.LabelMap` (ids it
      maps to background count as background); for a table with structure groups (the whole
      brain) also ``native_seg_group_dice`` / ``native_reg_group_dice``, the mean per group
      (cortex, white matter, ..., non-cortical). ``native_dice`` is the mean of the two
      (or the one the mode trains).

    Args:
        subjects: validation :class:`~dazoo.training.subjects.Subject` items with labels.
        cache: the run's :class:`~dazoo.training.cache.VolumeCache`.
        label_map: the run's label map.
        max_pairs: at most this many ordered pairs are registered (the first ones).
    """

    def __init__(self, subjects, cache, label_map: LabelMap, *, max_pairs: int = 6):
        self.subjects = [s for s in subjects if s.labels is not None]
        self.label_map = label_map
        self.entries = [cache.get(s) for s in self.subjects]
        self.classes = [label_map.to_classes(e.labels, source=s.labels)
                        for s, e in zip(self.subjects, self.entries)]
        self.cases = []  # the scans on their native grids, their ids through the label map
        for subject, entry in zip(self.subjects, self.entries):
            image = io.read_image(subject.image)
            truth = io.read_labels(subject.labels, like=image)
            ids = label_map.to_ids(label_map.to_classes(truth.array, source=subject.labels))
            self.cases.append(Case(subject.name, image, ids, entry.preprocessed))
        count = len(self.subjects)
        self.pairs = [(i, j) for i in range(count) for j in range(count) if i != j][:max_pairs]

    def __bool__(self) -> bool:
        return bool(self.subjects)

    def __call__(self, model, preprocessor) -> dict[str, float]:
        from dazoo.pipeline import Pipeline

        pipeline = Pipeline.from_model(model, preprocessor, self.label_map.to_table(),
                                       name="validation")
        scores: dict[str, float] = {}
        registration = REGISTRATION in model.schedule.networks
        segmentation = SEGMENTATION in model.schedule.networks
        if self.pairs:  # model grid, through DeepAtlas.test_step
            samples = [(self.entries[i].preprocessed.array, self.classes[i],
                        self.entries[j].preprocessed.array, self.classes[j])
                       for i, j in self.pairs]
            grid = model.evaluate(make_batch(samples), batch_size=1, verbose=0,
                                  return_dict=True)
            for key in ("seg_dice", "warped_dice"):
                if key in grid:
                    scores[key] = float(grid[key])
        if segmentation:
            per = {r["name"]: r for r in evaluate_segmentation(pipeline, cases=self.cases,
                                                                log=None)}
            scores["native_seg_dice"] = float(np.mean([r["mean_dice"] for r in per.values()]))
            scores["native_seg_merged_dice"] = float(np.mean(
                [r["mean_merged_dice"] for r in per.values()]))
            scores["native_seg_per_subject"] = {k: r["mean_dice"] for k, r in per.items()}
            if any("group_dice" in r for r in per.values()):
                scores["native_seg_group_dice"] = _group_means(per.values())
        if registration and self.pairs:
            results = evaluate_registration(pipeline, cases=self.cases, pairs=self.pairs,
                                            log=None)
            per = {f"{r['moving']} -> {r['fixed']}": r for r in results}
            scores["native_reg_dice"] = float(np.mean([r["mean_dice"] for r in per.values()]))
            scores["native_reg_merged_dice"] = float(np.mean(
                [r["mean_merged_dice"] for r in per.values()]))
            scores["native_reg_per_pair"] = {k: r["mean_dice"] for k, r in per.items()}
            if any("group_dice" in r for r in per.values()):
                scores["native_reg_group_dice"] = _group_means(per.values())
            scores["folding_fraction"] = float(np.mean([r["folding_fraction"]
                                                        for r in results]))
        natives = [scores[k] for k in ("native_seg_dice", "native_reg_dice") if k in scores]
        if natives:
            scores["native_dice"] = float(np.mean(natives))
        return scores


def _group_means(results) -> dict[str, float]:
    """The mean over subjects (or pairs) of each structure group's mean Dice (a table with
    groups: the whole brain's cortex, white matter, ..., non-cortical)."""
    from dazoo.evaluate import summarise

    return summarise(list(results))["group_dice"]


class Validation(keras.callbacks.Callback):
    """Every ``every`` steps (and at the last step): scores the model with a
    :class:`Validator`, appends the scores to ``RUN/validation.jsonl``, adds them to the
    epoch's logs (CSV, TensorBoard) and keeps the best checkpoint (``RUN/best.keras``) by
    ``monitor`` (higher is better). The best score survives a resume (read back from the
    jsonl file).

    Args:
        validator: a :class:`Validator`.
        preprocessor: the run's preprocessor.
        folder: the run folder.
        every: validation interval, steps.
        last_step: the run's final step (always validated).
        monitor: the score that picks the best checkpoint.
        log: function receiving one line per validation.
    """

    def __init__(self, validator: Validator, preprocessor, folder: str | os.PathLike, *,
                 every: int, last_step: int, monitor: str = "native_dice",
                 log: Callable[[str], None] | None = None):
        super().__init__()
        self.validator = validator
        self.preprocessor = preprocessor
        self.folder = os.fspath(folder)
        self.every = int(every)
        self.last_step = int(last_step)
        self.monitor = monitor
        self.log = log
        self.history = read_validation(self.folder)
        values = [h[monitor] for h in self.history if monitor in h]
        self.best = max(values) if values else -np.inf

    def on_epoch_end(self, epoch, logs=None):
        step = steps_done(self.model)
        if step % self.every and step != self.last_step:
            return
        started = time.perf_counter()
        scores = self.validator(self.model, self.preprocessor)
        scores = {"step": step, **scores, "seconds": round(time.perf_counter() - started, 1)}
        with open(os.path.join(self.folder, "validation.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(scores) + "\n")
        self.history.append(scores)
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in scores.items()
                         if k not in ("step", "seconds") and not isinstance(v, dict)})
        value = scores.get(self.monitor, scores.get("native_dice"))
        improved = value is not None and value > self.best
        if improved:
            self.best = value
            save_atomic(self.model, os.path.join(self.folder, "best.keras"))
        if self.log is not None:
            shown = " ".join(f"{k} {v:.4f}" for k, v in scores.items()
                             if k not in ("step", "seconds") and not isinstance(v, dict))
            self.log(f"step {step}: validation {shown} ({scores['seconds']:.0f} s)"
                     + (" - best so far, saved best.keras" if improved else ""))


def read_validation(folder: str | os.PathLike) -> list[dict]:
    """The scores a run has recorded in ``validation.jsonl`` (empty if none)."""
    path = os.path.join(os.fspath(folder), "validation.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def keep_steps_up_to(folder: str | os.PathLike, step: int) -> None:
    """Drops validation records after ``step`` (written after the checkpoint a resumed run
    restarts from, so they would otherwise appear twice)."""
    path = os.path.join(os.fspath(folder), "validation.jsonl")
    records = [r for r in read_validation(folder) if r["step"] <= step]
    if os.path.isfile(path):
        io.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))

