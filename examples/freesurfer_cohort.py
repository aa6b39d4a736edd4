"""Fine-tuning `brain` on a new cohort, measured: before / after on held-out subjects.

    python examples/freesurfer_cohort.py --data ../shared/data/freesurfer-cohort \
        --work work_cache/freesurfer --steps 400

The cohort (README of ../shared/data): 4 FreeSurfer-processed scans from another site with
FreeSurfer's automatic DKT labels (sub-01..04) and 1 unlabelled scan (sub-05). Four folds:
each holds out one labelled subject, fine-tunes `brain` on the other three (labelled) and
sub-05 (unlabelled) with exactly what ``dazoo finetune --from brain`` does (same function,
default options), and scores the held-out subject before and after at its native resolution:
mean Dice over the preset's 62 DKT regions against FreeSurfer's labels (ids the preset does
not know, e.g. FreeSurfer's subcortical ones, count as background on both sides).

The held-out subject is validated only once, after the last step (``validate_every = steps``),
so that it never chooses a checkpoint. Writes ``<work>/results.json`` and
``<work>/results.md``; the fine-tuned presets stay in ``<work>`` (do not ship them: the
cohort has no license for redistribution).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/freesurfer-cohort")
    parser.add_argument("--work", default="work_cache/freesurfer")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--folds", default="all", help="'all' or held-out names, e.g. sub-01")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from dazoo import DeepAtlas
    from dazoo.labels import LabelMap
    from dazoo.training import VolumeCache, load_subjects
    from dazoo.training.callbacks import Validator
    from dazoo.training.engine import finetune

    data, work = pathlib.Path(args.data).resolve(), pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    subjects = load_subjects(data, image="brainmask.mgz", labels="aparc.DKTatlas+aseg.mgz")
    labelled = [s for s in subjects if s.labels]
    unlabelled = [s for s in subjects if not s.labels]
    folds = labelled if args.folds == "all" else [s for s in labelled
                                                  if s.name in args.folds.split(",")]
    parent = DeepAtlas.from_preset("brain")
    label_map = LabelMap([c["id"] for c in parent.label_table[1:]], unknown="background")
    cache = VolumeCache(parent.preprocessor, folder=work / "cache")
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    for held in folds:
        if held.name in results:
            continue
        fold = work / f"holdout-{held.name}"
        fold.mkdir(exist_ok=True)
        train = [s for s in labelled if s is not held] + unlabelled
        (fold / "train.csv").write_text("name,image,labels\n" + "".join(
            f"{s.name},{s.image},{s.labels or ''}\n" for s in train))
        (fold / "val.csv").write_text(f"name,image,labels\n{held.name},{held.image},"
                                      f"{held.labels}\n")
        before = Validator([held], cache, label_map)(parent, parent.preprocessor)
        print(f"{held.name}: before {before['native_seg_dice']:.4f}", flush=True)
        started = time.perf_counter()
        preset = finetune("brain", fold / "train.csv", fold / "preset", steps=args.steps,
                          validation=fold / "val.csv", validate_every=args.steps,
                          seed=args.seed, run=fold / "run", resume=(fold / "run" / "run.json")
                          .exists(), command=f"python examples/freesurfer_cohort.py --steps "
                                             f"{args.steps} (fold {held.name})")
        seconds = time.perf_counter() - started
        scores = preset.metadata["validation"]["scores"]
        record = json.loads((fold / "run" / "run.json").read_text())
        train_seconds = sum(s.get("seconds", 0) for s in record["sessions"])
        results[held.name] = {
            "train": [s.name for s in train], "labelled": record["labelled"],
            "before": before["native_seg_dice"], "after": scores["native_seg_dice"],
            "steps": preset.metadata["training"]["steps_completed"],
            "fit_seconds": round(train_seconds, 1), "total_seconds": round(seconds, 1)}
        print(f"{held.name}: after {scores['native_seg_dice']:.4f} "
              f"({train_seconds / 60:.1f} min of fit, {seconds / 60:.1f} min in all)", flush=True)
        results_path.write_text(json.dumps(results, indent=1))

    (work / "results.md").write_text(markdown(results, args.steps))
    print(markdown(results, args.steps))
    return 0


def markdown(results: dict, steps: int) -> str:
    """The before / after table."""
    lines = ["| held-out subject | trained on (labelled + unlabelled) | `brain` | fine-tuned | "
             "change | fit minutes |", "|---|---|---|---|---|---|"]
    for name, r in sorted(results.items()):
        others = [n for n in r["train"] if n not in r["labelled"]]
        lines.append(f"| {name} | {', '.join(r['labelled'])} + {', '.join(others) or '-'} | "
                     f"{r['before']:.3f} | {r['after']:.3f} | {r['after'] - r['before']:+.3f} | "
                     f"{r['fit_seconds'] / 60:.1f} |")
    if results:
        values = list(results.values())
        mean = lambda key: sum(v[key] for v in values) / len(values)  # noqa: E731
        lines.append(f"| mean ({len(values)} folds) | | {mean('before'):.3f} | "
                     f"{mean('after'):.3f} | {mean('after') - mean('before'):+.3f} | "
                     f"{mean('fit_seconds') / 60:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
