"""The DeepAtlas paper's claim, tested: joint training against each network trained alone,
in the one-shot and few-shot settings, over rotated folds, with paired statistics.

Every run is a ``dazoo.training.engine.train`` run of ``examples/brain/recipe_v1.json`` (the
from-scratch joint recipe: 2 mm grid, affine template built from the fold's training scans,
62 DKT31 regions, Adam) with cosine-decayed learning rates and these changes per run:

* **folds**: the 15 Mindboggle OASIS-TRT-20 subjects, sorted, split into 5 groups of 3; fold
  ``f`` validates on group ``f`` and trains on the other 12 (``--folds 0 1 2`` runs three);
* **settings**: ``one-shot`` keeps the labels of one training subject (fold ``f``: its
  ``f``-th training subject in sorted order, so every fold labels another one), ``few-shot``
  of ``--few`` (default 5) consecutive ones from there; the rest train unlabelled;
* **runs** of a fold and setting (all from the same random initialisation, ``seed``):

  1. ``pretrain_registration`` (per fold, shared by both settings): registration only,
     unsupervised (the one-shot labels: no pair has two label maps), ``--pretrain`` steps;
  2. ``pretrain_segmentation``: segmentation only, supervised on the labelled scans,
     augmented, ``--pretrain-segmentation`` steps;
  3. from both (``init``): ``registration_only`` (``--steps`` registration updates; few-shot:
     pairs of two labelled scans add the anatomy term, as the paper's baselines use the
     labels they have), ``segmentation_only`` (``--steps / --ratio`` segmentation updates)
     and ``joint`` (DeepAtlas alternating ``--ratio`` registration steps and one
     segmentation step: the same updates of each network as the single-task runs).

* each run validates every ``--validate-every`` updates of the network it trains (native
  1 mm on the fold's 3 subjects; all 6 ordered pairs), so its curve shows whether its budget
  has flattened; the score is its last validation (never the best: no selection).

Results (``--out``, default ``benchmarks/one_shot``): ``results.json`` (every run's curve and
last scores per pair / subject), ``results.md`` (the table: per setting and arm, registration
and segmentation Dice over 62 regions, folding; joint minus single-task with the Wilcoxon
signed-rank test and the paired t-test over every validation pair / subject of all folds,
Benjamini-Hochberg FDR over the four comparisons), ``curves.png``. ``--export`` writes the
one-shot arms of the first fold as presets ``registration_only/``, ``segmentation_only/``
and ``joint/`` there (``dazoo.load(path)``, ``dazoo register --preset path``).

    python benchmarks/one_shot/experiment.py --work work_cache/one_shot --folds 0 1 2 \\
        --settings one-shot few-shot --pretrain 1500 --pretrain-segmentation 1200 \\
        --steps 1500 --ratio 20 --validate-every 300 --export
    python benchmarks/one_shot/experiment.py --work work_cache/one_shot --report-only ...

A finished run is kept, an unfinished one resumed from its last checkpoint; ``--plan`` prints
the runs and their steps without training. Runs are trained one at a time, in order.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RECIPE = ROOT / "examples" / "brain" / "recipe_v1.json"
GROUP = 3                                   # validation subjects per fold
SETTINGS = ("one-shot", "few-shot")
ARMS = ("registration_only", "segmentation_only", "joint")


# --------------------------------------------------------------------------- the plan
def subjects(data: pathlib.Path) -> list[str]:
    """Sorted subject names of the data folder (the recipe's image pattern)."""
    from dazoo.training.subjects import find_subjects

    spec = json.loads(RECIPE.read_text())["data"]
    found = find_subjects(data, image=spec["image"], labels=spec["labels"])
    names = sorted(s.name for s in found if s.labels)
    if len(names) < 2 * GROUP:
        raise SystemExit(f"{data}: {len(names)} labelled subjects, need at least {2 * GROUP}")
    return names


def fold_split(names: list[str], fold: int) -> tuple[list[str], list[str]]:
    """(training, validation) names of a fold: validation is the fold-th group of 3."""
    folds = len(names) // GROUP
    if not 0 <= fold < folds:
        raise SystemExit(f"fold {fold}: {len(names)} subjects make folds 0..{folds - 1}")
    validation = names[GROUP * fold: GROUP * (fold + 1)]
    return [n for n in names if n not in validation], validation


def labelled(training: list[str], fold: int, setting: str, few: int) -> list[str]:
    """The labelled training subjects: one (one-shot) or ``few`` consecutive ones, from the
    fold-th (cyclically), so every fold labels another subject."""
    count = 1 if setting == "one-shot" else few
    return [training[(fold + i) % len(training)] for i in range(count)]


def plan(args) -> list[dict]:
    """The runs in training order: ``{"key", "fold", "setting", "arm", "mode", "steps",
    "labelled", "validation", "init", "folder", "updates"}`` (``updates``: per network)."""
    check_budgets(args)
    names = subjects(pathlib.Path(args.data))
    work = pathlib.Path(args.work).resolve()
    seg_updates = args.steps // args.ratio
    runs = []
    for fold in args.folds:
        training, validation = fold_split(names, fold)
        base = work / f"fold{fold}"
        one = labelled(training, fold, "one-shot", args.few)
        pre_reg = {"key": f"fold{fold}/pretrain_registration", "fold": fold, "setting": None,
                   "arm": "pretrain_registration", "mode": "registration_only",
                   "steps": args.pretrain, "labelled": one, "validation": validation,
                   "init": None, "folder": base / "pretrain_registration",
                   "updates": {"registration": args.pretrain}}
        runs.append(pre_reg)
        for setting in args.settings:
            chosen = labelled(training, fold, setting, args.few)
            folder = base / setting
            pre_seg = {"key": f"fold{fold}/{setting}/pretrain_segmentation", "fold": fold,
                       "setting": setting, "arm": "pretrain_segmentation",
                       "mode": "segmentation_only", "steps": args.pretrain_segmentation,
                       "labelled": chosen, "validation": validation, "init": None,
                       "folder": folder / "pretrain_segmentation",
                       "updates": {"segmentation": args.pretrain_segmentation}}
            runs.append(pre_seg)
            init = {"registration_from": str(pre_reg["folder"]),
                    "segmentation_from": str(pre_seg["folder"])}
            arms = {"registration_only": ("registration_only", args.steps,
                                          {"registration": args.steps}),
                    "segmentation_only": ("segmentation_only", seg_updates,
                                          {"segmentation": seg_updates}),
                    "joint": ("joint", args.steps + seg_updates,
                              {"registration": args.steps, "segmentation": seg_updates})}
            for arm, (mode, steps, updates) in arms.items():
                runs.append({"key": f"fold{fold}/{setting}/{arm}", "fold": fold,
                             "setting": setting, "arm": arm, "mode": mode, "steps": steps,
                             "labelled": chosen, "validation": validation, "init": init,
                             "folder": folder / arm, "updates": updates})
    return runs


def _every(run: dict, args) -> int:
    """Validation interval in training steps: every ``--validate-every`` updates of the
    network the run trains (segmentation-only continuation: ``--validate-every / --ratio``
    updates, as the joint run's segmenter gets; joint: whole cycles of ``--ratio + 1``
    steps, every ``--validate-every`` registration updates)."""
    if run["mode"] == "joint":
        return (args.ratio + 1) * (args.validate_every // args.ratio)
    if run["arm"] == "segmentation_only":
        return args.validate_every // args.ratio
    return args.validate_every


def check_budgets(args) -> None:
    """Every run validates at its last step: the budgets must be multiples of the interval."""
    if args.validate_every % args.ratio:
        raise SystemExit(f"--validate-every ({args.validate_every}) must be a multiple of "
                         f"--ratio ({args.ratio})")
    for name in ("pretrain", "pretrain_segmentation", "steps"):
        if getattr(args, name) % args.validate_every:
            raise SystemExit(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be a "
                             f"multiple of --validate-every ({args.validate_every})")


def recipe_for(run: dict, args):
    """The run's :class:`~dazoo.training.recipe.Recipe` (from ``recipe_v1.json``)."""
    from dazoo.training.engine import checkpoint_interval
    from dazoo.training.recipe import Recipe

    config = copy.deepcopy(json.loads(RECIPE.read_text()))
    config["name"] = f"brain_paper_{run['arm']}"
    config["description"] = (f"The DeepAtlas paper's experiment (benchmarks/one_shot/"
                             f"experiment.py): {run['key']}.")
    config["seed"] = args.seed
    every, steps = _every(run, args), run["steps"]
    config["data"].update(train=str(pathlib.Path(args.data).resolve()),
                          validation=run["validation"], labelled=run["labelled"],
                          cache=str(pathlib.Path(args.work).resolve() / "cache"))
    config["model"].update(mode=run["mode"], registration_steps=args.ratio,
                           segmentation_steps=1)
    for network in ("registration", "segmentation"):
        config["optimizers"][network]["decay"] = "cosine"
    config["training"].update(steps=steps, checkpoint_every=checkpoint_interval(every),
                              validate_every=every, monitor=(
                                  "native_seg_dice" if run["mode"] == "segmentation_only"
                                  else "native_reg_dice" if run["mode"] == "registration_only"
                                  else "native_dice"))
    if run["init"] is not None:
        config["init"] = dict(run["init"])
    if run["arm"] != "pretrain_registration":  # the fold's template, built by its first run
        config["preprocess"]["template"] = str(
            pathlib.Path(args.work).resolve() / f"fold{run['fold']}" / "pretrain_registration"
            / "template.nii.gz")
    if run["mode"] == "segmentation_only":
        config["training"]["validation_pairs"] = 0
    return Recipe.from_dict(config, root=RECIPE.parent, source=f"{RECIPE} ({run['key']})")


# --------------------------------------------------------------------------- running
def train_run(run: dict, args, command: str) -> None:
    from dazoo.training.engine import train

    folder = run["folder"]
    record = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() \
        else None
    if record is None:
        print(f"training {run['key']} ({run['steps']} steps, {run['mode']})", flush=True)
        train(recipe_for(run, args), folder, command=command)
    elif record.get("steps_completed") == run["steps"]:
        print(f"{run['key']}: finished, kept", flush=True)
    elif record["steps_planned"] != run["steps"]:
        raise SystemExit(f"{folder} holds a run of {record['steps_planned']} steps, not "
                         f"{run['steps']}: remove it or choose another --work")
    else:
        print(f"resuming {run['key']}", flush=True)
        train(None, folder, resume=True)


# --------------------------------------------------------------------------- results
def curve(run: dict, args) -> list[dict]:
    """The run's validations, each with the updates of the trained network(s) so far."""
    from dazoo.training.callbacks import read_validation

    out = []
    for record in read_validation(run["folder"]):
        fraction = record["step"] / run["steps"]
        out.append({**record, "updates": {k: round(v * fraction)
                                          for k, v in run["updates"].items()}})
    return out


def last_scores(run: dict, args) -> dict | None:
    """The run's last validation if it is at its last step (None otherwise)."""
    history = curve(run, args)
    if not history or history[-1]["step"] != run["steps"]:
        return None
    return history[-1]


def paired_test(a: dict, b: dict) -> dict:
    """``a - b`` over the keys both have: mean difference (Dice points), how many improved,
    the Wilcoxon signed-rank and paired t-test two-sided p-values."""
    import numpy as np
    from scipy import stats

    keys = sorted(set(a) & set(b))
    diff = np.array([a[k] - b[k] for k in keys], float)
    out = {"n": len(keys), "mean_difference": float(diff.mean()) if len(keys) else math.nan,
           "improved": int((diff > 0).sum())}
    if len(keys) >= 2 and np.any(diff != 0):
        out["wilcoxon_p"] = float(stats.wilcoxon(diff).pvalue)
        out["t_p"] = float(stats.ttest_rel([a[k] for k in keys], [b[k] for k in keys]).pvalue)
    else:
        out["wilcoxon_p"] = out["t_p"] = math.nan
    return out


def fdr(pvalues: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (NaN kept)."""
    import numpy as np

    p = np.array(pvalues, float)
    valid = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(len(p), np.nan)
    if len(valid):
        order = valid[np.argsort(p[valid])]
        m = len(valid)
        ranked = p[order] * m / np.arange(1, m + 1)
        adjusted[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    return adjusted.tolist()


def collect(runs: list[dict], args) -> dict:
    """Per setting and arm: per-pair registration Dice, per-subject segmentation Dice (keys
    prefixed by the fold), folding; every run's curve; the paired comparisons."""
    results = {"settings": {}, "curves": {}, "missing": []}
    for run in runs:
        results["curves"][run["key"]] = [
            {"step": c["step"], "updates": c["updates"],
             **{k: c[k] for k in ("native_reg_dice", "native_seg_dice", "folding_fraction")
                if k in c}} for c in curve(run, args)]
        if run["setting"] is None or run["arm"] not in ARMS:
            continue
        last = last_scores(run, args)
        if last is None:
            results["missing"].append(run["key"])
            continue
        arm = results["settings"].setdefault(run["setting"], {}).setdefault(
            run["arm"], {"registration": {}, "segmentation": {}, "folding": {}})
        prefix = f"fold{run['fold']}:"
        if run["arm"] != "segmentation_only":
            arm["registration"].update({prefix + k: v for k, v in
                                        last.get("native_reg_per_pair", {}).items()})
            arm["folding"][prefix] = last.get("folding_fraction")
        if run["arm"] != "registration_only":
            arm["segmentation"].update({prefix + k: v for k, v in
                                        last.get("native_seg_per_subject", {}).items()})
    comparisons = []
    for setting, arms in results["settings"].items():
        joint = arms.get("joint")
        for task, single in (("registration", "registration_only"),
                             ("segmentation", "segmentation_only")):
            if joint and arms.get(single):
                test = paired_test(joint[task], arms[single][task])
                comparisons.append({"setting": setting, "task": task, **test})
    for c, q in zip(comparisons, fdr([c["wilcoxon_p"] for c in comparisons])):
        c["wilcoxon_q"] = q
    results["comparisons"] = comparisons
    return results


def markdown(results: dict, args) -> str:
    import numpy as np

    lines = ["| setting | arm | registration Dice (62) | folding % | segmentation Dice (62) |",
             "|---|---|---|---|---|"]
    for setting, arms in results["settings"].items():
        for arm in ARMS:
            r = arms.get(arm)
            if r is None:
                continue
            reg = (f"{np.mean(list(r['registration'].values())):.3f} "
                   f"(n={len(r['registration'])})" if r["registration"] else "-")
            seg = (f"{np.mean(list(r['segmentation'].values())):.3f} "
                   f"(n={len(r['segmentation'])})" if r["segmentation"] else "-")
            folds = [v for v in r["folding"].values() if v is not None]
            fold = f"{100 * np.mean(folds):.4f}" if folds else "-"
            lines.append(f"| {setting} | {arm} | {reg} | {fold} | {seg} |")
    lines += ["", "Joint minus single-task, paired over validation pairs (registration) and "
              "subjects (segmentation) of all folds; p two-sided; q: Benjamini-Hochberg over "
              "the comparisons:", "",
              "| setting | task | n | joint - single (Dice points) | improved | Wilcoxon p | "
              "q | paired t p |", "|---|---|---|---|---|---|---|---|"]
    for c in results["comparisons"]:
        lines.append(f"| {c['setting']} | {c['task']} | {c['n']} | "
                     f"{100 * c['mean_difference']:+.2f} | {c['improved']} of {c['n']} | "
                     f"{c['wilcoxon_p']:.3g} | {c['wilcoxon_q']:.3g} | {c['t_p']:.3g} |")
    if results["missing"]:
        lines += ["", "Not finished: " + ", ".join(results["missing"])]
    return "\n".join(lines)


def plot_curves(results: dict, path: pathlib.Path) -> None:
    """Validation Dice against updates of the trained network, one panel per setting and
    task, one line per run (pretraining included, folds as separate lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(s, t) for s in SETTINGS for t in ("registration", "segmentation")]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=100)
    colours = {"pretrain_registration": "grey", "pretrain_segmentation": "grey",
               "registration_only": "tab:blue", "segmentation_only": "tab:orange",
               "joint": "tab:green"}
    for axis, (setting, task) in zip(axes, panels):
        key = "native_reg_dice" if task == "registration" else "native_seg_dice"
        for name, points in results["curves"].items():
            parts = name.split("/")
            arm = parts[-1]
            if (len(parts) == 3 and parts[1] != setting) or not points or key not in points[0]:
                continue
            offset = 0  # continuations start where their pretraining stopped
            if arm in ARMS:
                pre = (f"{parts[0]}/pretrain_registration" if task == "registration"
                       else f"{parts[0]}/{setting}/pretrain_segmentation")
                pre_points = results["curves"].get(pre) or [{"updates": {task: 0}}]
                offset = pre_points[-1]["updates"].get(task, 0)
            x = [offset + p["updates"].get(task, 0) for p in points]
            axis.plot(x, [p[key] for p in points], color=colours.get(arm, "black"),
                      label=arm if parts[0] == "fold0" or len(parts) < 3 else None,
                      marker=".", lw=1)
        axis.set_title(f"{setting}: {task}", fontsize=9)
        axis.set_xlabel(f"{task} network updates", fontsize=8)
        axis.set_ylabel("validation Dice (62, native)", fontsize=8)
        handles, labels = axis.get_legend_handles_labels()
        if handles:
            unique = dict(zip(labels, handles))
            axis.legend(unique.values(), unique.keys(), fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def export_arms(runs: list[dict], args) -> None:
    """The one-shot arms of the first fold as presets in ``--out``."""
    from dazoo.training.exporter import export

    fold = args.folds[0]
    for run in runs:
        if run["fold"] == fold and run["setting"] == "one-shot" and run["arm"] in ARMS:
            if last_scores(run, args) is None:
                print(f"{run['key']}: not finished, not exported", flush=True)
                continue
            export(run["folder"], pathlib.Path(args.out) / run["arm"], checkpoint="last",
                   command=f"python benchmarks/one_shot/experiment.py --export ({run['key']})")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="work_cache/one_shot", help="run folders go here")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"
                                              / "mindboggle-oasis-trt20"))
    parser.add_argument("--out", default=str(HERE), help="results and kept presets")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--few", type=int, default=5, help="labelled subjects of few-shot")
    parser.add_argument("--pretrain", type=int, default=1500,
                        help="registration pretraining steps (unsupervised)")
    parser.add_argument("--pretrain-segmentation", type=int, default=1200,
                        help="segmentation pretraining steps (supervised, augmented)")
    parser.add_argument("--steps", type=int, default=1500,
                        help="registration updates of each continuation")
    parser.add_argument("--ratio", type=int, default=20,
                        help="registration updates per segmentation update")
    parser.add_argument("--validate-every", type=int, default=300,
                        help="updates of the trained network between validations (a "
                             "multiple of --ratio; the budgets multiples of it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plan", action="store_true", help="print the runs, train nothing")
    parser.add_argument("--report-only", action="store_true", help="train nothing")
    parser.add_argument("--export", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/one_shot/experiment.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    runs = plan(args)
    for run in runs:  # every recipe is checked before anything trains
        recipe_for(run, args)
    if args.plan:
        for run in runs:
            print(f"{run['key']}: {run['mode']}, {run['steps']} steps, updates {run['updates']},"
                  f" labelled {run['labelled']}, validation {run['validation']}")
        return 0
    if not args.report_only:
        for run in runs:
            train_run(run, args, command)
    results = collect(runs, args)
    results.update(command=command, ratio=args.ratio, steps=args.steps,
                   pretrain=args.pretrain, pretrain_segmentation=args.pretrain_segmentation)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results, args)
    (out / "results.md").write_text(table + "\n")
    plot_curves(results, out / "curves.png")
    if args.export:
        export_arms(runs, args)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
