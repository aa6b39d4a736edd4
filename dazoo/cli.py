"""The ``dazoo`` command line.

Every verb only parses its arguments and calls library functions. Heavy imports (Keras,
TensorFlow) happen inside the verbs, so ``dazoo --help`` is fast. Errors in the user's input
are printed as one line (``dazoo: error: <file>: <problem>``) with exit status 2, never as a
traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Sequence

from dazoo import __version__
from dazoo.errors import DazooInputError

__all__ = ["main"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    """Train a tiny DeepAtlas on synthetic anatomies and write its results as NIfTI."""
    import numpy as np

    from dazoo.demo import run_demo

    started = time.perf_counter()
    report = run_demo(args.out, steps=args.steps, size=args.size, seed=args.seed, log=_log)
    _log(f"done in {time.perf_counter() - started:.0f} s")
    print(f"registration Dice (held-out pair, foreground mean): identity "
          f"{report['identity_dice']:.3f} -> DeepAtlas {report['registered_dice']:.3f}")
    print(f"segmentation Dice (held-out image, foreground mean): "
          f"{report['segmentation_dice']:.3f}")
    print(f"folding voxels: {100 * report['folding_fraction']:.3f} %")
    print(f"outputs in {os.path.abspath(args.out)}: "
          + ", ".join(sorted(os.path.basename(p) for p in report['files'])))
    return 0 if np.isfinite(report["registered_dice"]) else 1


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="train a tiny DeepAtlas on synthetic volumes and write NIfTI results",
        description="Generates synthetic labelled anatomies, trains a small DeepAtlas (joint "
                    "registration + segmentation, half of the subjects labelled) for a few "
                    "steps on the CPU, then registers and segments held-out subjects and "
                    "writes the images, label maps, displacement field and model to --out.",
    )
    p.add_argument("--out", default="dazoo-demo", help="output folder (default: dazoo-demo)")
    p.add_argument("--steps", type=int, default=240, help="training steps (default: 240)")
    p.add_argument("--size", type=int, default=32, choices=(32, 48, 64),
                   help="cubic volume size in voxels (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(run=_demo)


# --------------------------------------------------------------------------- segment
def _segment_targets(inputs: Sequence[str], out: str) -> list[str]:
    """Output path per input: ``out`` itself for one input and a NIfTI name, else a folder
    holding ``<input name>_seg.nii.gz`` for each input (two inputs with the same name are
    refused, as one result would replace the other)."""
    from dazoo.io import WRITABLE, stem

    if len(inputs) == 1 and out.endswith(WRITABLE):
        return [out]
    if os.path.exists(out) and not os.path.isdir(out):
        raise DazooInputError(out, "is a file; give a folder for several inputs")
    targets = [os.path.join(out, f"{stem(p)}_seg.nii.gz") for p in inputs]
    for number, target in enumerate(targets):
        if target in targets[:number]:
            raise DazooInputError(inputs[number], "another input has the same file name, and "
                                                  f"both would be written to {target}")
    return targets


def _check_outputs(outputs: Sequence[str | None], inputs: Sequence[str]) -> None:
    """Refuses, before any work, an output path that names an input file."""
    from dazoo.io import same_file

    for path in outputs:
        if path is not None and any(same_file(path, p) for p in inputs):
            raise DazooInputError(path, "refusing to overwrite an input file")


def _segment(args: argparse.Namespace) -> int:
    from dazoo.hub import load

    targets = _segment_targets(args.inputs, args.output)
    for path in args.inputs:
        if not os.path.isfile(path):
            raise DazooInputError(path, "no such file")
    _check_outputs(targets, args.inputs)
    pipeline = load(args.preset)
    for number, (path, target) in enumerate(zip(args.inputs, targets), 1):
        result = pipeline.segment(path)
        result.save(target, protect=args.inputs)
        _log(f"[{number}/{len(targets)}] {path} -> {target} ({result.seconds:.1f} s)")
    return 0


def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment images in their native space",
                       description="Segments each input with a pretrained preset; the label "
                                   "maps are written on each input's own grid and affine.")
    p.add_argument("inputs", nargs="+", metavar="IN", help="NIfTI (.nii, .nii.gz) or MGZ images")
    p.add_argument("-o", "--output", required=True,
                   help="output file (one input) or folder (<name>_seg.nii.gz per input)")
    p.add_argument("--preset", default="brain", help="preset name or folder (default: brain)")
    p.set_defaults(run=_segment)


# --------------------------------------------------------------------------- register
def _register(args: argparse.Namespace) -> int:
    from dazoo.hub import load

    if args.moved_labels and not args.moving_labels:
        raise DazooInputError("--moved-labels", "needs --moving-labels")
    if not (args.moved or args.warp or args.moved_labels):
        raise DazooInputError("register", "nothing to write: give --moved, --warp and/or "
                                          "--moved-labels")
    inputs = [p for p in (args.moving, args.fixed, args.moving_labels) if p]
    for path in inputs:
        if not os.path.isfile(path):
            raise DazooInputError(path, "no such file")
    _check_outputs([args.moved, args.warp, args.moved_labels], inputs)
    pipeline = load(args.preset)
    _log(f"registering {args.moving} -> {args.fixed}")
    result = pipeline.register(args.moving, args.fixed, moving_labels=args.moving_labels)
    written = result.save(moved=args.moved, warp=args.warp, moved_labels=args.moved_labels,
                          warp_convention=args.warp_convention, protect=inputs)
    _log(f"done in {result.seconds:.1f} s; folding voxels "
         f"{100 * result.folding_fraction:.4f} %; wrote {', '.join(written)}")
    return 0


def _add_register(sub) -> None:
    p = sub.add_parser("register", help="register a moving image onto a fixed image",
                       description="Affine pre-alignment and deformable registration with a "
                                   "pretrained preset. Outputs are on the FIXED image's own "
                                   "grid and affine.")
    p.add_argument("moving", help="image to deform")
    p.add_argument("fixed", help="reference image")
    p.add_argument("--moved", help="output: the moved image")
    p.add_argument("--warp", help="output: displacement field in mm (5D NIfTI vector image), "
                                  "fixed -> moving, on the fixed grid")
    p.add_argument("--warp-convention", choices=("itk", "ras"), default="itk",
                   help="vector components in LPS (itk: ITK/ANTs/Slicer, default) or RAS")
    p.add_argument("--moving-labels", help="label map of the moving image to carry along")
    p.add_argument("--moved-labels", help="output: the moved label map")
    p.add_argument("--preset", default="brain", help="preset name or folder (default: brain)")
    p.set_defaults(run=_register)


# --------------------------------------------------------------------------- evaluate
def _evaluate(args: argparse.Namespace) -> int:
    import json

    from dazoo.training import load_subjects
    from dazoo.evaluate import evaluate_registration, evaluate_segmentation, summarise
    from dazoo.hub import load

    subjects = [s for s in load_subjects(args.data, image=args.image, labels=args.labels)
                if s.labels]
    if not subjects:
        raise DazooInputError(args.data, "no subject has a label map to evaluate against")
    pipeline = load(args.preset)
    report = {"preset": pipeline.name, "data": os.path.abspath(args.data),
              "subjects": [s.name for s in subjects]}
    if not args.skip_segmentation:
        _log(f"segmentation of {len(subjects)} subjects")
        per_subject = evaluate_segmentation(pipeline, subjects, log=_log)
        report["segmentation"] = {"summary": summarise(per_subject), "subjects": per_subject}
    if args.pairs != 0 and len(subjects) > 1:
        import itertools

        pairs = list(itertools.permutations(range(len(subjects)), 2))
        if args.pairs > 0:
            pairs = pairs[: args.pairs]
        _log(f"registration of {len(pairs)} ordered pairs")
        per_pair = evaluate_registration(pipeline, subjects, pairs=pairs, log=_log)
        report["registration"] = {"summary": summarise(per_pair), "pairs": per_pair}
    for task in ("segmentation", "registration"):
        if task in report:
            summary = report[task]["summary"]
            line = (f"{task}: mean Dice {summary['mean_dice']:.3f} over {summary['count']} "
                    f"(left/right merged {summary['mean_merged_dice']:.3f}), "
                    f"{summary['seconds']:.1f} s each")
            if "folding_fraction" in summary:
                line += f", folding {100 * summary['folding_fraction']:.4f} % of voxels"
            print(line)
    if args.output:
        from dazoo.io import write_text_atomic

        write_text_atomic(args.output, json.dumps(report, indent=1))
        _log(f"report: {args.output}")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="Dice per region and folding of a preset on a labelled folder",
        description="Segments every labelled subject and registers ordered pairs of them "
                    "with a preset, scoring at the scans' native resolution against their "
                    "manual labels. DATA is a CSV manifest (image,labels) or a folder: "
                    "images/ + labels/, or one subfolder per subject (--image/--labels "
                    "patterns).")
    p.add_argument("data", help="CSV manifest or data folder")
    p.add_argument("--preset", default="brain", help="preset name or folder (default: brain)")
    p.add_argument("--image", default="image.*",
                   help="image file pattern inside subject folders (default: image.*)")
    p.add_argument("--labels", default="labels.*",
                   help="label file pattern inside subject folders (default: labels.*)")
    p.add_argument("--pairs", type=int, default=-1,
                   help="number of ordered pairs to register (-1: all, 0: none)")
    p.add_argument("--skip-segmentation", action="store_true")
    p.add_argument("-o", "--output", help="write the full report (JSON) here")
    p.set_defaults(run=_evaluate)


# --------------------------------------------------------------------------- list
def _list(args: argparse.Namespace) -> int:
    from dazoo.presets import get_preset, list_presets

    if args.card:
        print(get_preset(args.card).file("README.md").read_text())
        return 0
    presets = list_presets()
    if not presets:
        print("no presets installed")
    for preset in presets:
        meta = preset.metadata
        print(f"{preset.name}  (v{meta.get('version', '?')}, {meta.get('license', '?')})")
        print(f"    {preset.description}")
        for key, value in meta.get("summary", {}).items():
            print(f"    {key}: {value}")
        print(f"    model card: dazoo list --card {preset.name}   folder: {preset.path}")
    return 0


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list the pretrained presets and their model cards")
    p.add_argument("--card", metavar="PRESET", help="print this preset's full model card")
    p.set_defaults(run=_list)


# --------------------------------------------------------------------------- train
def _command_line() -> str:
    import shlex

    return "dazoo " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _train(args: argparse.Namespace) -> int:
    from dazoo.training.engine import make_strategy, train

    strategy = make_strategy(args.strategy) if args.strategy else None  # before any TF op
    if args.resume:
        if args.recipe is not None or args.output is not None:
            raise DazooInputError("--resume", "give only the run folder: dazoo train --resume RUN/")
        run = train(None, args.resume, resume=True, strategy=strategy, log=_log)
    else:
        if args.recipe is None or args.output is None:
            raise DazooInputError("train", "needs RECIPE.json and -o RUN/ (or --resume RUN/)")
        from dazoo.training.recipe import Recipe

        recipe = Recipe.load(args.recipe)
        overrides = list(args.set or ())
        if args.data is not None:
            overrides.append(f"data.train={os.path.abspath(args.data)}")
        if overrides:
            recipe = recipe.with_overrides(overrides)
        run = train(recipe, args.output, command=_command_line(), strategy=strategy, log=_log)
    print(f"{run.folder}: {run.steps} steps")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a DeepAtlas from a JSON recipe into a run folder",
        description="Trains the model a recipe declares (data, labels, preprocessing, "
                    "networks, losses, schedule, optimizers, augmentation; see "
                    "dazoo.training.recipe). The run folder gets checkpoints (resumable "
                    "exactly after a kill), CSV / TensorBoard logs and the validation scores; "
                    "`dazoo export RUN/ -o PRESET/` turns it into a preset.")
    p.add_argument("recipe", nargs="?", help="recipe file (JSON)")
    p.add_argument("-o", "--output", metavar="RUN", help="run folder (new)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder")
    p.add_argument("--data", help="training data (CSV manifest or folder) instead of the "
                                  "recipe's data.train")
    p.add_argument("--strategy", choices=("mirrored", "multi_worker"),
                   help="tf.distribute: all local GPUs (mirrored) or several machines "
                        "(multi_worker, cluster in TF_CONFIG); batch_size is the global batch")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set training.steps=300 (JSON values; "
                        "repeatable)")
    p.set_defaults(run=_train)


def _export(args: argparse.Namespace) -> int:
    from dazoo.training.engine import export

    preset = export(args.run_folder, args.output, checkpoint=args.checkpoint,
                    command=_command_line(), log=_log)
    print(f"preset {preset.name}: {preset.path}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a preset folder from a training run",
                       description="Writes a preset (config, weights with sha256, "
                                   "preprocessing, template, labels, recipe, model card) from "
                                   "a run folder's best (or last) checkpoint and its record.")
    p.add_argument("run_folder", metavar="RUN", help="run folder of dazoo train / finetune")
    p.add_argument("-o", "--output", required=True, metavar="PRESET", help="preset folder")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="best validation score (default) or the last checkpoint")
    p.set_defaults(run=_export)


def _finetune(args: argparse.Namespace) -> int:
    from dazoo.training.engine import finetune, make_strategy

    strategy = make_strategy(args.strategy) if args.strategy else None  # before any TF op
    for path in [args.data] + ([args.validation] if args.validation else []):
        if not os.path.exists(path):
            raise DazooInputError(path, "no such file or folder")
    preset = finetune(args.parent, args.data, args.output, steps=args.steps,
                      validation=args.validation, labels_from_data=args.labels_from_data,
                      freeze=args.freeze or (), learning_rate=args.lr, seed=args.seed,
                      run=args.run_dir, resume=args.resume, strategy=strategy,
                      command=_command_line(), log=_log)
    print(f"preset {preset.name}: {preset.path}")
    return 0


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a preset on your own scans (labelled and unlabelled)",
        description="Fine-tunes a preset (architecture, weights, preprocessing and training "
                    "options of the parent) on a cohort: a CSV manifest image,labels (an "
                    "empty labels cell for an unlabelled image) or a data folder. Labelled "
                    "and unlabelled images are both used. The result is a preset folder for "
                    "dazoo segment/register --preset and dazoo.load().")
    p.add_argument("--from", dest="parent", default="brain",
                   help="parent preset name or folder (default: brain)")
    p.add_argument("--data", required=True, help="cohort: CSV manifest or data folder")
    p.add_argument("-o", "--output", required=True, metavar="PRESET", help="new preset folder")
    p.add_argument("--steps", type=int, default=400, help="training steps (default: 400)")
    p.add_argument("--validation", help="CSV manifest of labelled validation scans: scored at "
                                        "native resolution, the best checkpoint is exported")
    p.add_argument("--labels-from-data", action="store_true",
                   help="the cohort's own label ids as the label table (re-initialises the "
                        "segmenter's last layer); default: the parent's, unknown ids -> "
                        "background")
    p.add_argument("--freeze", action="append", choices=("registration", "segmentation"),
                   help="keep this network fixed (train only the other)")
    p.add_argument("--lr", type=float, help="learning rate of both optimizers (default: the "
                                            "parent recipe's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--run", dest="run_dir", help="run folder for checkpoints and logs (default: PRESET.run)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted fine-tuning")
    p.add_argument("--strategy", choices=("mirrored", "multi_worker"),
                   help="tf.distribute, as for dazoo train")
    p.set_defaults(run=_finetune)


# --------------------------------------------------------------------------- main
_VERBS: list[Callable] = [_add_segment, _add_register, _add_evaluate, _add_train, _add_finetune,
                          _add_export, _add_list, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dazoo",
        description="DeepAtlas joint registration and segmentation (Keras 3).",
    )
    parser.add_argument("--version", action="version", version=f"dazoo {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for add in _VERBS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 ok, 1 failure, 2 bad input or usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except DazooInputError as err:
        print(f"dazoo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dazoo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
