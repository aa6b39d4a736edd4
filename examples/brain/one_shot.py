"""The DeepAtlas paper's one-shot experiment on the Mindboggle brains, as a table.

Every run is a ``dazoo.training.engine.train`` run of the `brain` preset's recipe
(``pretrained/brain/recipe.json``: architecture, grid, losses, optimizers, augmentation, seed
and the 3 validation subjects), with these changes:

* one training subject keeps its labels (the first in sorted order; training subjects are
  the data folder's subjects minus the recipe's validation subjects); the other 11 are
  unlabelled;
* each run validates once, at its last step (``training.validate_every`` = its steps): the
  validation never chooses a checkpoint;
* all runs share one affine template (built by the first run, copied by the others) and one
  cache folder (``<work>/one_shot/cache``).

The runs:

1. pretraining from the same random initialisation: a registration-only run (unsupervised:
   with one labelled image no pair has two label maps) of ``--pretrain`` steps and a
   segmentation-only run (supervised on the one image, augmented) of
   ``--pretrain-segmentation`` steps (default ``--pretrain``);
2. from those two starting points (``init``: the registration network from the first run's
   last checkpoint, the segmentation network from the second's), three continuations with the
   same budget per network: registration-only (``--steps`` registration steps),
   segmentation-only (``--steps`` segmentation steps) and DeepAtlas joint (``2 * --steps``
   steps, alternating 1:1, so ``--steps`` for each network);
3. each run's scores are its last validation (``RUN/validation.jsonl``): at native 1 mm on the
   3 validation subjects, registration Dice over the 6 ordered pairs (and folding) for the
   runs that train registration, segmentation Dice per subject for those that train
   segmentation.

    python examples/brain/one_shot.py --work work_cache/brain --pretrain 300 \
        --pretrain-segmentation 700 --steps 300

Each run has its own folder, ``<work>/one_shot/<run>/``: a finished run is kept, an unfinished
one resumed (exactly, from its last checkpoint). The table is printed and written to
``<work>/one_shot/results.md``, the numbers to ``<work>/one_shot/results.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
RECIPE = HERE / "recipe_v1.json"  # version 1's from-scratch recipe (joint training)

#: run name -> model mode, in the order the runs are trained.
RUNS = {"pretrain_registration": "registration_only",
        "pretrain_segmentation": "segmentation_only",
        "registration_only": "registration_only",
        "segmentation_only": "segmentation_only",
        "joint": "joint"}

#: results.json key -> validation.jsonl key.
SCORES = {"registration_dice": "native_reg_dice",
          "registration_merged_dice": "native_reg_merged_dice",
          "folding_fraction": "folding_fraction",
          "registration_per_pair": "native_reg_per_pair",
          "segmentation_dice": "native_seg_dice",
          "segmentation_merged_dice": "native_seg_merged_dice",
          "segmentation_per_subject": "native_seg_per_subject"}


def training_subjects(config: dict, data: pathlib.Path) -> list[str]:
    """Sorted names of the subjects in ``data`` (the recipe's image pattern) that are not
    among the recipe's validation subjects."""
    from dazoo.training.subjects import find_subjects

    spec = config["data"]
    found = find_subjects(data, image=spec["image"], labels=spec["labels"])
    names = [s.name for s in found]
    missing = sorted(set(spec["validation"]) - set(names))
    if missing:
        raise SystemExit(f"{data}: validation subject(s) {missing} of {RECIPE} are missing")
    return sorted(n for n in names if n not in set(spec["validation"]))


def planned_steps(args) -> dict[str, int]:
    """Training steps of each run (joint: both networks, ``--steps`` each)."""
    return {"pretrain_registration": args.pretrain,
            "pretrain_segmentation": args.pretrain_segmentation,
            "registration_only": args.steps, "segmentation_only": args.steps,
            "joint": 2 * args.steps}


def run_recipes(args) -> dict[str, tuple]:
    """``{run name: (Recipe, run folder)}`` of the five runs, in training order.

    Lists the data folder's subjects (file names only, no image is read) to choose the
    labelled one.
    """
    from dazoo.training.engine import checkpoint_interval
    from dazoo.training.recipe import Recipe

    base = json.loads(RECIPE.read_text())
    data = pathlib.Path(args.data).resolve()
    root = pathlib.Path(args.work).resolve() / "one_shot"
    train_names = training_subjects(base, data)
    steps = planned_steps(args)
    folders = {name: root / name for name in RUNS}
    template = folders["pretrain_registration"] / "template.nii.gz"
    init = {"registration_from": str(folders["pretrain_registration"]),
            "segmentation_from": str(folders["pretrain_segmentation"])}
    recipes = {}
    for name, mode in RUNS.items():
        config = copy.deepcopy(base)
        config["name"] = f"brain_one_shot_{name}"
        config["description"] = (f"The DeepAtlas one-shot experiment, run {name} "
                                 "(examples/brain/one_shot.py).")
        config["data"].update(train=str(data), labelled=[train_names[0]],
                              cache=str(root / "cache"))
        config["model"]["mode"] = mode
        config["training"].update(steps=steps[name],
                                  checkpoint_every=checkpoint_interval(steps[name]),
                                  validate_every=steps[name])
        if name != "pretrain_registration":  # the first run builds the template
            config["preprocess"]["template"] = str(template)
        if not name.startswith("pretrain_"):
            config["init"] = dict(init)
        recipes[name] = (Recipe.from_dict(config, root=RECIPE.parent, source=f"{RECIPE} ({name})"),
                         folders[name])
    return recipes


def _record(folder: pathlib.Path) -> dict | None:
    path = folder / "run.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run(recipe, folder: pathlib.Path, command: str) -> None:
    """Trains one run: skipped when finished, resumed when started."""
    from dazoo.training.engine import train

    planned = recipe["training"]["steps"]
    record = _record(folder)
    if record is None:
        print(f"training {folder} ({planned} steps, {recipe['model']['mode']})", flush=True)
        train(recipe, folder, command=command)
        return
    if record["steps_planned"] != planned:
        raise SystemExit(f"{folder} holds a run of {record['steps_planned']} steps, not "
                         f"{planned}: remove it or choose another --work")
    if record.get("steps_completed") == planned:
        print(f"{folder}: finished ({planned} steps), kept", flush=True)
        return
    print(f"resuming {folder}", flush=True)
    train(None, folder, resume=True)


def scores(folder: pathlib.Path, steps: int) -> dict:
    """A run's last validation, under results.json's keys."""
    from dazoo.training.callbacks import read_validation

    history = read_validation(folder)
    if not history or history[-1]["step"] != steps:
        raise SystemExit(f"{folder}: no validation at step {steps} in validation.jsonl")
    last = history[-1]
    return {key: last[source] for key, source in SCORES.items() if source in last}


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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="work_cache/brain",
                        help="work folder; the runs go to <work>/one_shot/<run>/")
    parser.add_argument("--data", default="../shared/data/mindboggle-oasis-trt20",
                        help="the Mindboggle OASIS-TRT-20 folder (one subfolder per subject)")
    parser.add_argument("--pretrain", type=int, default=500,
                        help="registration-only pretraining steps")
    parser.add_argument("--pretrain-segmentation", type=int, default=None,
                        help="segmentation-only pretraining steps (default: --pretrain)")
    parser.add_argument("--steps", type=int, default=500,
                        help="steps per network in each continuation")
    args = parser.parse_args(argv)
    if args.pretrain_segmentation is None:
        args.pretrain_segmentation = args.pretrain
    return args


def main(argv=None):
    args = parse_args(argv)
    command = "python examples/brain/one_shot.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    recipes = run_recipes(args)
    for recipe, folder in recipes.values():
        run(recipe, folder, command)

    first = recipes["pretrain_registration"][0]
    labelled = first["data"]["labelled"]
    train_names = training_subjects(first.config, pathlib.Path(first["data"]["train"]))
    results = {"pretrain_registration_steps": args.pretrain,
               "pretrain_segmentation_steps": args.pretrain_segmentation,
               "steps_per_network": args.steps, "labelled": 1,
               "unlabelled": len(train_names) - 1, "labelled_subject": labelled[0],
               "command": command}
    for name, (recipe, folder) in recipes.items():
        record = _record(folder)
        if record["labelled"] != labelled:  # the engine's record of the run
            raise SystemExit(f"{folder}: labelled {record['labelled']}, expected {labelled}")
        results[name] = scores(folder, recipe["training"]["steps"])
    root = pathlib.Path(args.work) / "one_shot"
    results_path = root / "results.json"
    results_path.write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (root / "results.md").write_text(table + "\n")
    print(table)
    print(f"results: {results_path}")


if __name__ == "__main__":
    sys.exit(main())
