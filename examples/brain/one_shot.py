"""The DeepAtlas paper's one-shot experiment on the Mindboggle brains, as a table.

One training subject keeps its labels (the first in sorted order); the other 11 are
unlabelled. All runs use the preset's architecture, grid, losses and seed:

1. pretraining from the same random initialisation: a registration-only run (unsupervised:
   with one labelled image no pair has two label maps) of ``--pretrain`` steps and a
   segmentation-only run (supervised on the one image, augmented) of
   ``--pretrain-segmentation`` steps (default ``--pretrain``);
2. from those two starting points, three continuations with the same budget per network:
   registration-only (``--steps`` registration steps), segmentation-only (``--steps``
   segmentation steps) and DeepAtlas joint (``--steps`` of each, alternating 1:1);
3. the starting points and each continuation are packaged as temporary presets and
   evaluated on the 3 validation subjects at native 1 mm: registration Dice over the 6
   ordered pairs and segmentation Dice per subject.

    python examples/brain/one_shot.py --work work_cache/brain --pretrain 300 \
        --pretrain-segmentation 700 --steps 300

Runs are resumable (each in its own folder under <work>/one_shot/); the table is printed and
written to <work>/one_shot/results.md, the numbers to <work>/one_shot/results.json.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent


def train(out: pathlib.Path, steps: int, mode: str, extra=()):
    cmd = [sys.executable, str(HERE / "train.py"), "--work", str(ARGS.work), "--out", str(out),
           "--steps", str(steps), "--mode", mode, "--labelled", "1",
           "--validate-every", str(ARGS.validate_every or 10**9), *extra]
    done = out / "train.log"
    if done.exists() and done.read_text().rstrip().endswith("done"):
        return
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def evaluate(run: pathlib.Path, tasks=("segmentation", "registration")) -> dict:
    """Native-resolution Dice of a run's checkpoint on the validation subjects: the means and
    each subject's (segmentation) or each ordered pair's (registration) mean Dice."""
    import keras

    import dazoo.models  # noqa: F401  (registers dazoo's classes for load_model)
    from dazoo.evaluate import evaluate_registration, evaluate_segmentation, summarise
    from dazoo.pipeline import Pipeline

    sys.path.insert(0, str(HERE))
    from evaluate import validation_subjects  # noqa: E402
    from package import for_float32_inference, label_table  # noqa: E402
    from train import DKT31_IDS  # noqa: E402

    from dazoo.presets import save_preset

    work = pathlib.Path(ARGS.work)
    model = for_float32_inference(keras.saving.load_model(run / "checkpoint.keras"))
    preset = save_preset(run / "preset", model=model,
                         preprocess=json.loads((work / "preprocess.json").read_text()),
                         labels=label_table(DKT31_IDS),
                         metadata={"description": f"one-shot experiment run {run.name}"},
                         files={"template.nii.gz": work / "template.nii.gz"})
    pipeline = Pipeline(preset)
    subjects = validation_subjects(pathlib.Path(ARGS.data), work)
    out = {}
    if "segmentation" in tasks:
        items = evaluate_segmentation(pipeline, subjects)
        seg = summarise(items)
        out.update(segmentation_dice=seg["mean_dice"],
                   segmentation_merged_dice=seg["mean_merged_dice"],
                   segmentation_per_subject={r["name"]: r["mean_dice"] for r in items})
    if "registration" in tasks:
        items = evaluate_registration(pipeline, subjects)
        reg = summarise(items)
        out.update(registration_dice=reg["mean_dice"],
                   registration_merged_dice=reg["mean_merged_dice"],
                   folding_fraction=reg["folding_fraction"],
                   registration_per_pair={f"{r['moving']} -> {r['fixed']}": r["mean_dice"]
                                          for r in items})
    return out


def _cell(result: dict, key: str, scale: float = 1.0, digits: int = 3) -> str:
    return f"{scale * result[key]:.{digits}f}" if key in result else "-"


def _paired(results: dict, key: str, better: str, baseline: str) -> str:
    """'+d.d points (n of m improved)': the change of ``better`` over ``baseline``."""
    a, b = results[better][key], results[baseline][key]
    diffs = [a[k] - b[k] for k in a]
    return (f"{100 * (sum(diffs) / len(diffs)):+.1f} Dice points, "
            f"{sum(d > 0 for d in diffs)} of {len(diffs)} improved")


def markdown(results: dict) -> str:
    """The results table (Dice as fractions, folding in % of voxels) and the paired changes."""
    rows = [("starting point: registration-only pretraining", "pretrain_registration"),
            ("starting point: segmentation-only pretraining", "pretrain_segmentation"),
            ("registration-only (unsupervised)", "registration_only"),
            ("segmentation-only (supervised, augmented)", "segmentation_only"),
            ("DeepAtlas joint", "joint")]
    lines = ["| run | registration Dice (62) | (31 merged) | folding % | "
             "segmentation Dice (62) | (31 merged) |", "|---|---|---|---|---|---|"]
    for title, key in rows:
        r = results.get(key)
        if r is None:
            continue
        lines.append(f"| {title} | {_cell(r, 'registration_dice')} | "
                     f"{_cell(r, 'registration_merged_dice')} | "
                     f"{_cell(r, 'folding_fraction', 100, 4)} | "
                     f"{_cell(r, 'segmentation_dice')} | {_cell(r, 'segmentation_merged_dice')} |")
    lines += ["",
              "DeepAtlas joint against the same-budget single-task continuations, per validation "
              "pair / subject (62 regions):",
              "- registration: " + _paired(results, "registration_per_pair", "joint",
                                           "registration_only") + " (ordered pairs);",
              "- segmentation: " + _paired(results, "segmentation_per_subject", "joint",
                                           "segmentation_only") + " (subjects)."]
    return "\n".join(lines)


def main(argv=None):
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="work_cache/brain")
    parser.add_argument("--data", default="../shared/data/mindboggle-oasis-trt20")
    parser.add_argument("--pretrain", type=int, default=500,
                        help="registration-only pretraining steps")
    parser.add_argument("--pretrain-segmentation", type=int, default=None,
                        help="segmentation-only pretraining steps (default: --pretrain)")
    parser.add_argument("--steps", type=int, default=500,
                        help="steps per network in each continuation")
    parser.add_argument("--validate-every", type=int, default=0,
                        help="log model-grid validation Dice every N steps (0: never); "
                             "for watching only, never used to select a checkpoint")
    ARGS = parser.parse_args(argv)
    if ARGS.pretrain_segmentation is None:
        ARGS.pretrain_segmentation = ARGS.pretrain
    root = pathlib.Path(ARGS.work) / "one_shot"
    pre_reg, pre_seg = root / "pretrain_registration", root / "pretrain_segmentation"
    train(pre_reg, ARGS.pretrain, "registration_only")
    train(pre_seg, ARGS.pretrain_segmentation, "segmentation_only")
    init = ["--init-registration", str(pre_reg / "checkpoint.keras"),
            "--init-segmentation", str(pre_seg / "checkpoint.keras")]
    runs = {
        "registration_only": (root / "registration_only", ARGS.steps),
        "segmentation_only": (root / "segmentation_only", ARGS.steps),
        "joint": (root / "joint", 2 * ARGS.steps),
    }
    for mode, (out, steps) in runs.items():
        train(out, steps, mode, init)

    # train.py labels the first --labelled names of split.json's training list
    train_names = json.loads((pathlib.Path(ARGS.work) / "split.json").read_text())["train"]
    results = {"pretrain_registration_steps": ARGS.pretrain,
               "pretrain_segmentation_steps": ARGS.pretrain_segmentation,
               "steps_per_network": ARGS.steps, "labelled": 1, "unlabelled": len(train_names) - 1,
               "labelled_subject": train_names[0],
               "command": "python examples/brain/one_shot.py " + " ".join(argv or sys.argv[1:])}
    results_path = root / "results.json"
    if results_path.exists():
        results.update(json.loads(results_path.read_text()))
    evaluations = {"pretrain_registration": (pre_reg, ("registration",)),
                   "pretrain_segmentation": (pre_seg, ("segmentation",)),
                   **{name: (folder, ("segmentation", "registration"))
                      for name, (folder, _) in runs.items()}}
    for name, (folder, tasks) in evaluations.items():
        if name not in results:
            print(f"evaluating {name}", flush=True)
            results[name] = evaluate(folder, tasks)
            results_path.write_text(json.dumps(results, indent=1))
    results_path.write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (root / "results.md").write_text(table + "\n")
    print(table)
    print(f"results: {results_path}")


if __name__ == "__main__":
    sys.exit(main())
