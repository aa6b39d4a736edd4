"""The DeepAtlas paper's one-shot experiment on the Mindboggle brains, as a table.

One training subject keeps its labels (the first in sorted order); the other 11 are
unlabelled. All runs use the preset's architecture, grid, losses and seed:

1. pretraining from the same random initialisation: a registration-only (unsupervised:
   with one labelled image no pair has two label maps) run of ``--pretrain`` steps and a
   segmentation-only run (supervised on the one image, augmented) of ``--pretrain`` steps;
2. from those two starting points, three continuations with the same budget per network:
   registration-only (``--steps`` registration steps), segmentation-only (``--steps``
   segmentation steps) and DeepAtlas joint (``--steps`` of each, alternating);
3. each result is packaged as a temporary preset and evaluated on the 3 validation subjects
   at native 1 mm: registration Dice over the 6 ordered pairs and segmentation Dice.

    python examples/brain/one_shot.py --work work_cache/brain --pretrain 500 --steps 500

Runs are resumable (each in its own folder under <work>/one_shot/); the table is printed and
written to <work>/one_shot/results.json.
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
           "--validate-every", str(10**9), *extra]
    done = out / "train.log"
    if done.exists() and done.read_text().rstrip().endswith("done"):
        return
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def evaluate(run: pathlib.Path) -> dict:
    """Native-resolution Dice of a run's checkpoint on the validation subjects."""
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
    seg = summarise(evaluate_segmentation(pipeline, subjects))
    reg = summarise(evaluate_registration(pipeline, subjects))
    return {"segmentation_dice": seg["mean_dice"], "segmentation_merged_dice":
            seg["mean_merged_dice"], "registration_dice": reg["mean_dice"],
            "registration_merged_dice": reg["mean_merged_dice"],
            "folding_fraction": reg["folding_fraction"]}


def main(argv=None):
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="work_cache/brain")
    parser.add_argument("--data", default="../shared/data/mindboggle-oasis-trt20")
    parser.add_argument("--pretrain", type=int, default=500)
    parser.add_argument("--steps", type=int, default=500)
    ARGS = parser.parse_args(argv)
    root = pathlib.Path(ARGS.work) / "one_shot"
    pre_reg, pre_seg = root / "pretrain_registration", root / "pretrain_segmentation"
    train(pre_reg, ARGS.pretrain, "registration_only")
    train(pre_seg, ARGS.pretrain, "segmentation_only")
    init = ["--init-registration", str(pre_reg / "checkpoint.keras"),
            "--init-segmentation", str(pre_seg / "checkpoint.keras")]
    runs = {
        "registration_only": (root / "registration_only", ARGS.steps),
        "segmentation_only": (root / "segmentation_only", ARGS.steps),
        "joint": (root / "joint", 2 * ARGS.steps),
    }
    for mode, (out, steps) in runs.items():
        train(out, steps, mode, init)

    results = {"pretrain_steps": ARGS.pretrain, "steps_per_network": ARGS.steps,
               "labelled": 1, "unlabelled": 11}
    results_path = root / "results.json"
    if results_path.exists():
        results.update(json.loads(results_path.read_text()))
    for name, (folder, _) in runs.items():
        if name not in results:
            results[name] = evaluate(folder)
            results_path.write_text(json.dumps(results, indent=1))
    print("\n| run | registration Dice (62) | segmentation Dice (62) | folding % |")
    print("|---|---|---|---|")
    for name in runs:
        r = results[name]
        print(f"| {name} | {r['registration_dice']:.3f} | {r['segmentation_dice']:.3f} | "
              f"{100 * r['folding_fraction']:.4f} |")
    print(f"results: {results_path}")


if __name__ == "__main__":
    sys.exit(main())
