"""Evaluation of a preset on labelled scans, at the scans' native resolution.

Segmentation: each image is segmented by the pipeline (results on its own grid) and scored
against its manual label map, voxel for voxel, on the native grid. Registration: for ordered
pairs of labelled subjects, the moving label map is carried onto the fixed scan's native grid
through the predicted transform and scored against the fixed manual labels; the folding
fraction of each transform is reported.

Dice is reported per label id, as the mean over the preset's labels, and (the DeepAtlas
paper's protocol for DKT labels) over regions with left and right merged
(:func:`dazoo.labels.merge_left_right`: FreeSurfer ids ``2xxx`` counted as their left twin
``1xxx``, subcortical right ids such as 53 as their left twin 17).
"""
from __future__ import annotations

import itertools
import time
from typing import Callable, Sequence

import numpy as np

from dazoo import io
from dazoo.labels import merge_left_right
from dazoo.metrics import dice_per_label

__all__ = ["merge_left_right", "score_labels", "evaluate_segmentation", "evaluate_registration",
           "summarise"]


def score_labels(truth: np.ndarray, prediction: np.ndarray, ids: Sequence[int]) -> dict:
    """Dice per id, its mean, and the left/right-merged Dice per region and mean.

    Ids absent from both maps are left out of the means (NaN).
    """
    per_id = dice_per_label(truth, prediction, ids)
    merged_ids = sorted({int(i) for i in merge_left_right(np.asarray(ids))})
    per_merged = dice_per_label(merge_left_right(truth), merge_left_right(prediction), merged_ids)
    return {
        "dice": per_id,
        "mean_dice": float(np.nanmean(list(per_id.values()))),
        "merged_dice": per_merged,
        "mean_merged_dice": float(np.nanmean(list(per_merged.values()))),
    }


def _ids(pipeline) -> list[int]:
    return [int(i) for i in pipeline.class_ids if i != 0]


def evaluate_segmentation(pipeline, subjects, *, flip: bool | None = None,
                          log: Callable[[str], None] = print) -> list[dict]:
    """Segments every labelled subject and scores it on its native grid.

    Args:
        pipeline: a :class:`dazoo.pipeline.Pipeline`.
        subjects: :class:`dazoo.training.Subject` items (those without labels are skipped).
        flip: left-right test-time augmentation (default: the preset's).

    Returns:
        one dict per subject: ``name``, ``seconds`` and the fields of :func:`score_labels`.
    """
    results = []
    labelled = [s for s in subjects if s.labels]
    for number, subject in enumerate(labelled, 1):
        image = io.read_image(subject.image)
        truth = io.read_labels(subject.labels, like=image).array
        seg = pipeline.segment(image, flip=flip)
        scores = score_labels(truth, seg.labels.array, _ids(pipeline))
        results.append({"name": subject.name, "seconds": seg.seconds, **scores})
        log(f"[{number}/{len(labelled)}] segment {subject.name}: mean Dice "
            f"{scores['mean_dice']:.3f} (merged {scores['mean_merged_dice']:.3f}), "
            f"{seg.seconds:.1f} s")
    return results


def evaluate_registration(pipeline, subjects, *, pairs: Sequence[tuple[int, int]] | None = None,
                          refine_options: dict | None = None,
                          log: Callable[[str], None] = print) -> list[dict]:
    """Registers ordered pairs of labelled subjects and scores the carried labels.

    Args:
        pipeline: a :class:`dazoo.pipeline.Pipeline`.
        subjects: :class:`dazoo.training.Subject` items with labels.
        pairs: ``(moving index, fixed index)`` into ``subjects``; default every ordered pair.
        refine_options: passed to :meth:`~dazoo.pipeline.Pipeline.register` (e.g.
            ``{"guide": "segmenter"}``: the refinement does not see the moving labels).

    Returns:
        one dict per pair: ``moving``, ``fixed``, ``seconds``, ``folding_fraction`` and the
        fields of :func:`score_labels`.
    """
    subjects = [s for s in subjects if s.labels]
    if pairs is None:
        pairs = list(itertools.permutations(range(len(subjects)), 2))
    results = []
    for number, (i, j) in enumerate(pairs, 1):
        moving, fixed = subjects[i], subjects[j]
        fixed_image = io.read_image(fixed.image)
        truth = io.read_labels(fixed.labels, like=fixed_image).array
        start = time.perf_counter()
        result = pipeline.register(moving.image, fixed_image, moving_labels=moving.labels,
                                   refine_options=refine_options)
        seconds = time.perf_counter() - start
        scores = score_labels(truth, result.moved_labels.array, _ids(pipeline))
        results.append({"moving": moving.name, "fixed": fixed.name, "seconds": seconds,
                        "folding_fraction": result.folding_fraction, **scores})
        log(f"[{number}/{len(pairs)}] register {moving.name} -> {fixed.name}: mean Dice "
            f"{scores['mean_dice']:.3f} (merged {scores['mean_merged_dice']:.3f}), folding "
            f"{100 * result.folding_fraction:.4f} %, {seconds:.1f} s")
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
    if "folding_fraction" in results[0]:
        summary["folding_fraction_max"] = float(max(r["folding_fraction"] for r in results))
    return summary
