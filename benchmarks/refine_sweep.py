"""Registration Dice, folding and seconds against the number of refinement iterations.

Every ordered pair of a brain preset's validation subjects is registered once by the network,
then refined (dazoo.refine) for the largest N; the displacement reached at each N in --steps
is resampled onto the fixed scan's native 1 mm grid and scored against its manual labels
(62 DKT regions, as examples/brain/evaluate.py). Two guides: the moving scan's manual labels
(--moving-labels, atlas-style use) and the segmenter's probabilities of both scans.

``--cohort DIR`` sweeps the labelled scans of a FreeSurfer cohort instead (``sub-*/
brainmask.mgz`` scored against ``--cohort-labels``, by default FreeSurfer's
``aparc.DKTatlas+aseg.mgz``; for a whole-brain preset ``labels.whole_brain.nii.gz`` as written by
examples/brain/whole_brain_data.py): another site, where the defaults chosen on the validation
pairs have to hold.

    python benchmarks/refine_sweep.py --preset brain --data ../shared/data/mindboggle-oasis-trt20 \
        --steps 0,10,20,40 [--learning-rate 0.05 --smoothness 1 --anatomy 1] \
        [--cohort ../shared/data/freesurfer-cohort [--cohort-labels labels.whole_brain.nii.gz]]
"""
from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples" / "brain"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="brain")
    parser.add_argument("--data", default="../shared/data/mindboggle-oasis-trt20")
    parser.add_argument("--steps", default="0,10,20,40")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--smoothness", type=float, default=1.0)
    parser.add_argument("--anatomy", type=float, default=1.0)
    parser.add_argument("--guides", default="labels,segmenter")
    parser.add_argument("--pairs", type=int, default=0, help="only the first N pairs (0: all)")
    parser.add_argument("--cohort", metavar="DIR",
                        help="sweep a FreeSurfer cohort's labelled scans instead of the "
                             "validation subjects")
    parser.add_argument("--cohort-labels", default="aparc.DKTatlas+aseg.mgz", metavar="NAME",
                        help="the cohort's label file per subject (default: %(default)s)")
    parser.add_argument("--out", default="work_cache/refine_sweep.json")
    args = parser.parse_args(argv)

    import dazoo
    from dazoo import io
    from dazoo.evaluate import score_labels
    from evaluate import label_ids, validation_subjects  # examples/brain/evaluate.py

    steps = sorted(int(s) for s in args.steps.split(","))
    pipeline = dazoo.load(args.preset)
    if args.cohort:
        from dazoo.training import load_subjects

        subjects = [s for s in load_subjects(args.cohort, image="brainmask.mgz",
                                             labels=args.cohort_labels)
                    if s.labels is not None]
    else:
        subjects = validation_subjects(args.data, args.preset)
    ids = label_ids(args.preset)
    # the mean per structure group too, as dazoo.evaluate scores (a whole-brain table's
    # cortex: the 62 DKT regions, comparable with v2's Dice62)
    groups = pipeline.label_groups or None
    pairs = list(itertools.permutations(range(len(subjects)), 2))
    pairs = pairs[: args.pairs] if args.pairs else pairs
    options = dict(learning_rate=args.learning_rate, smoothness=args.smoothness,
                   anatomy=args.anatomy)
    rows = []
    cache = {}

    def prepared(subject):
        if subject.name not in cache:
            volume = io.read_image(subject.image)
            cache[subject.name] = (volume, pipeline.preprocess(volume),
                                   io.read_labels(subject.labels, like=volume))
        return cache[subject.name]

    for i, j in pairs:
        moving, fixed = subjects[i], subjects[j]
        m_volume, m_pre, m_labels = prepared(moving)
        f_volume, f_pre, f_labels = prepared(fixed)
        for guide in args.guides.split(","):
            u, history = pipeline.refine(m_pre, f_pre, iterations=steps[-1], snapshots=tuple(steps),
                                         moving_labels=m_labels if guide == "labels" else None,
                                         **options)
            # the gradient steps' own time (the first includes the one-time tracing)
            step_seconds = [h["seconds"] for h in history[:-1]]
            for n in steps:
                refine_seconds = float(sum(step_seconds[:n]))
                result = pipeline.registration_from(history[n]["displacement"][0], m_volume,
                                                    m_pre, f_volume.affine, f_pre,
                                                    moving_labels=m_labels)
                scores = score_labels(f_labels.array, result.moved_labels.array, ids,
                                      groups=groups)
                rows.append({"moving": moving.name, "fixed": fixed.name, "guide": guide,
                             "iterations": n, "mean_dice": scores["mean_dice"],
                             "folding_fraction": result.folding_fraction,
                             "refine_seconds": refine_seconds,
                             "first_step_seconds": step_seconds[0] if step_seconds else 0.0,
                             "loss": history[n]["loss"], "soft_dice": history[n]["dice"],
                             **({"group_dice": scores["group_dice"]} if groups else {})})
                print(f"{moving.name} -> {fixed.name} {guide:9s} N={n:3d}: Dice "
                      f"{scores['mean_dice']:.3f}{_group_text(rows[-1])}, folding "
                      f"{100 * result.folding_fraction:.4f} %, refinement {refine_seconds:.1f} s",
                      flush=True)
    print("\nmean over pairs:")
    summary = {}
    for guide in args.guides.split(","):
        for n in steps:
            sel = [r for r in rows if r["guide"] == guide and r["iterations"] == n]
            entry = {k: float(np.mean([r[k] for r in sel]))
                     for k in ("mean_dice", "folding_fraction", "refine_seconds")}
            if groups:
                entry["group_dice"] = {g: float(np.nanmean([r["group_dice"][g] for r in sel]))
                                       for g in sel[0]["group_dice"]}
            summary[f"{guide} N={n}"] = entry
            print(f"{guide:9s} N={n:3d}: Dice {entry['mean_dice']:.3f}{_group_text(entry)}, "
                  f"folding "
                  f"{100 * entry['folding_fraction']:.4f} %, +{entry['refine_seconds']:.1f} s "
                  f"({len(sel)} pairs)")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"subjects": args.cohort or "validation", "options": options, "steps": steps, "summary": summary,
                               "rows": rows}, indent=1))


def _group_text(entry: dict) -> str:
    """``" (cortex 0.612, non-cortical 0.701)"``: the row's or summary's group means, if any."""
    groups = entry.get("group_dice")
    if not groups:
        return ""
    return " (" + ", ".join(f"{g} {v:.3f}" for g, v in groups.items()) + ")"


if __name__ == "__main__":
    main()
