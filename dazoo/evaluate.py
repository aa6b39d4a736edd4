"""Evaluation of a preset on labelled scans, at the scans' native resolution.

Segmentation: each image is segmented by the pipeline (results on its own grid) and scored
against its manual label map, voxel for voxel, on the native grid. Registration: for ordered
pairs of labelled subjects, the moving label map is carried onto the fixed scan's native grid
through the predicted transform and scored against the fixed manual labels; the folding
fraction of each transform is reported. ``dazoo evaluate`` and the training validator
(:class:`dazoo.training.callbacks.Validator`, on its cached model-grid images) both score
through :func:`evaluate_segmentation` / :func:`evaluate_registration`.

Dice is reported per label id, as the mean over the preset's labels, and (the DeepAtlas
paper's protocol for DKT labels) over regions with left and right merged
(:func:`dazoo.labels.merge_left_right`: FreeSurfer ids ``2xxx`` counted as their left twin
``1xxx``, subcortical right ids such as 53 as their left twin 17).
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from dazoo import io
from dazoo.labels import group_members, merge_left_right
from dazoo.metrics import dice_per_label

__all__ = ["merge_left_right", "score_labels", "group_means", "Case", "evaluate_segmentation",
           "evaluate_registration", "summarise"]


#: The aggregate of every group but the cortex (a whole-brain table's aseg structures).
NON_CORTICAL = "non-cortical"


def score_labels(truth: np.ndarray, prediction: np.ndarray, ids: Sequence[int],
                 groups: Mapping[int, str] | None = None) -> dict:
    """Dice per id, its mean, and the left/right-merged Dice per region and mean; with
    ``groups`` (``{id: structure group}``, :func:`dazoo.labels.table_groups`) also the mean
    Dice per group (``group_dice``), and, where the table has a cortex group beside others,
    the mean over every id outside the cortex (``group_dice["non-cortical"]``).

    Ids absent from both maps are left out of the means (NaN).
    """
    per_id = dice_per_label(truth, prediction, ids)
    merged_ids = sorted({int(i) for i in merge_left_right(np.asarray(ids))})
    per_merged = dice_per_label(merge_left_right(truth), merge_left_right(prediction), merged_ids)
    scores = {
        "dice": per_id,
        "mean_dice": _mean(per_id.values()),
        "merged_dice": per_merged,
        "mean_merged_dice": _mean(per_merged.values()),
    }
    if groups:
        scores["group_dice"] = group_means(per_id, groups)
    return scores


def group_means(per_id: Mapping[int, float], groups: Mapping[int, str]) -> dict[str, float]:
    """Mean of ``per_id`` over each group's ids (NaN ids left out), groups in report order;
    plus ``"non-cortical"`` when there is a ``"cortex"`` group and another."""
    members = group_members({i: g for i, g in groups.items() if int(i) in per_id})
    out = {group: _mean(per_id[i] for i in ids) for group, ids in members.items()}
    if "cortex" in members and len(members) > 1:
        out[NON_CORTICAL] = _mean(per_id[i] for g, ids in members.items() if g != "cortex"
                                  for i in ids)
    return out


def _mean(values) -> float:
    values = np.array(list(values), dtype=float)
    if not np.isfinite(values).any():
        return float("nan")
    return float(np.nanmean(values))


def _ids(pipeline) -> list[int]:
    return [int(i) for i in pipeline.class_ids if i != 0]


def _groups(pipeline) -> dict[int, str] | None:
    return getattr(pipeline, "label_groups", None) or None


@dataclasses.dataclass
class Case:
    """A labelled scan to score: its native image and label ids (``truth``, on the image's
    grid), and optionally the image already on the model grid (``pre``, a
    :class:`~dazoo.preprocess.Preprocessed`, e.g. from a training run's cache), which is
    then not preprocessed again. ``Case.of(subject)`` reads the files only when scored
    (:meth:`load`), so a large cohort is never held in memory at once."""

    name: str
    image: io.Volume | None = None
    truth: np.ndarray | None = None
    pre: object = None
    subject: object = None

    @classmethod
    def of(cls, subject) -> Case:
        """A case of a :class:`dazoo.training.Subject` with labels (read by :meth:`load`)."""
        return cls(subject.name, subject=subject)

    def load(self) -> Case:
        """This case with its image and truth read (itself when they are already there)."""
        if self.image is not None:
            return self
        image = io.read_image(self.subject.image)
        truth = io.read_labels(self.subject.labels, like=image).array
        return dataclasses.replace(self, image=image, truth=truth)


def _cases(subjects, cases):
    if cases is not None:
        return list(cases)
    return [Case.of(s) for s in subjects if s.labels]


def evaluate_segmentation(pipeline, subjects=(), *, cases: Sequence[Case] | None = None,
                          flip: bool | None = None,
                          log: Callable[[str], None] | None = print,
                          measure: Callable[[Case, io.Volume], dict] | None = None,
                          ids: Sequence[int] | None = None) -> list[dict]:
    """Segments every labelled subject and scores it on its native grid.

    Args:
        pipeline: a :class:`dazoo.pipeline.Pipeline`.
        subjects: :class:`dazoo.training.Subject` items (those without labels are skipped).
        cases: :class:`Case` items instead of ``subjects`` (the training validator's, with
            their preprocessed images).
        flip: left-right test-time augmentation (default: the preset's).
        log: progress lines (None: quiet).
        ids: the label ids to score (default: the preset's table, background left out).
        measure: optional ``measure(case, labels)`` -> dict of more fields per subject, from
            the loaded case and the segmentation (a native-grid label :class:`Volume`).

    Returns:
        one dict per subject: ``name``, ``seconds``, the fields of :func:`score_labels` and
        those of ``measure``.
    """
    results = []
    cases = _cases(subjects, cases)
    for number, case in enumerate(cases, 1):
        case = case.load()
        start = time.perf_counter()
        if case.pre is not None:
            labels = pipeline.segment_preprocessed(case.pre, flip=flip)
        else:
            labels = pipeline.segment(case.image, flip=flip).labels
        seconds = time.perf_counter() - start
        scores = score_labels(case.truth, labels.array, ids or _ids(pipeline), _groups(pipeline))
        results.append({"name": case.name, "seconds": seconds, **scores,
                        **(measure(case, labels) if measure is not None else {})})
        if log is not None:
            log(f"[{number}/{len(cases)}] segment {case.name}: mean Dice "
                f"{scores['mean_dice']:.3f} (merged {scores['mean_merged_dice']:.3f}), "
                f"{seconds:.1f} s")
    return results


def evaluate_registration(pipeline, subjects=(), *, cases: Sequence[Case] | None = None,
                          pairs: Sequence[tuple[int, int]] | None = None,
                          refine: int | None = None, refine_options: dict | None = None,
                          log: Callable[[str], None] | None = print,
                          ids: Sequence[int] | None = None) -> list[dict]:
    """Registers ordered pairs of labelled subjects and scores the carried labels.

    Args:
        pipeline: a :class:`dazoo.pipeline.Pipeline`.
        subjects: :class:`dazoo.training.Subject` items with labels.
        cases: :class:`Case` items instead of ``subjects`` (preprocessed when both images of
            a pair carry ``pre``).
        pairs: ``(moving index, fixed index)`` into the cases; default every ordered pair.
        refine: refinement iterations (None: the preset's default, 0: the network alone).
        refine_options: passed to :meth:`~dazoo.pipeline.Pipeline.register` (e.g.
            ``{"guide": "segmenter"}``: the refinement does not see the moving labels).
        log: progress lines (None: quiet).
        ids: the label ids to score (default: the preset's table, background left out).

    Returns:
        one dict per pair: ``moving``, ``fixed``, ``seconds``, ``folding_fraction`` and the
        fields of :func:`score_labels`.
    """
    cases = _cases(subjects, cases)
    if pairs is None:
        pairs = list(itertools.permutations(range(len(cases)), 2))
    results = []
    for number, (i, j) in enumerate(pairs, 1):
        moving, fixed = cases[i].load(), cases[j].load()
        labels = io.Volume(moving.truth, moving.image.affine, None)
        start = time.perf_counter()
        if moving.pre is not None and fixed.pre is not None:
            result = pipeline.register_preprocessed(
                moving.image, moving.pre, fixed.image.affine, fixed.pre, moving_labels=labels,
                refine=refine, refine_options=refine_options)
        else:
            result = pipeline.register(moving.image, fixed.image, moving_labels=labels,
                                       refine=refine, refine_options=refine_options)
        seconds = time.perf_counter() - start
        scores = score_labels(fixed.truth, result.moved_labels.array, ids or _ids(pipeline),
                              _groups(pipeline))
        results.append({"moving": moving.name, "fixed": fixed.name, "seconds": seconds,
                        "folding_fraction": result.folding_fraction, **scores})
        if log is not None:
            log(f"[{number}/{len(pairs)}] register {moving.name} -> {fixed.name}: mean Dice "
                f"{scores['mean_dice']:.3f} (merged {scores['mean_merged_dice']:.3f}), "
                f"folding {100 * result.folding_fraction:.4f} %, {seconds:.1f} s")
    return results


def summarise(results: list[dict]) -> dict:
    """Means over subjects/pairs of the per-item numbers, and the mean Dice per label id."""
    if not results:
        return {}
    summary = {"count": len(results)}
    for key in ("mean_dice", "mean_merged_dice", "seconds", "folding_fraction"):
        if key in results[0]:
            values = np.array([r[key] for r in results], dtype=float)
            summary[key] = float(np.nanmean(values))
            summary[f"{key}_std"] = float(np.nanstd(values))
    for field in ("dice", "merged_dice"):
        ids = sorted(results[0][field])
        summary[f"{field}_per_label"] = {
            int(i): float(np.nanmean([r[field][i] for r in results])) for i in ids}
    if "group_dice" in results[0]:
        summary["group_dice"] = {g: _mean(r["group_dice"][g] for r in results)
                                 for g in results[0]["group_dice"]}
    if "folding_fraction" in results[0]:
        summary["folding_fraction_max"] = float(max(r["folding_fraction"] for r in results))
    return summary
