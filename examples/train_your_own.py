"""Train a DeepAtlas on your own scans, a few labelled and the rest unlabelled
(semi-supervised), through the library's training engine, and export it as a preset.

    python examples/train_your_own.py --data cohort.csv --ids 10,20,30 -o mymodel/ \
        --labelled 2 --steps 2000 --voxel-size 2 --shape 80,96,80

``cohort.csv`` has the columns ``image,labels`` (an empty ``labels`` cell: unlabelled);
``--labelled k`` keeps the labels of k of them (seeded choice: the one-shot setting is
``--labelled 1``). ``--validation val.csv`` (labelled scans) scores the model at the scans'
native resolution during training and exports the best checkpoint. The run folder
(``mymodel.run/``) resumes with ``--resume``. The recipe written there is what ``dazoo train
recipe.json -o RUN`` would take; see ``dazoo/training/recipe.py`` for every option.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CSV manifest image,labels")
    parser.add_argument("--ids", required=True, help="comma-separated label ids to learn")
    parser.add_argument("-o", "--output", required=True, help="preset folder to write")
    parser.add_argument("--labelled", default="all", help="'all' or k labelled scans")
    parser.add_argument("--validation", help="CSV manifest of labelled validation scans")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--voxel-size", type=float, default=2.0, help="model voxel size, mm")
    parser.add_argument("--shape", default="80,96,80", help="model grid (multiples of 16)")
    parser.add_argument("--levels", type=int, default=4, help="U-Net poolings (shape check)")
    parser.add_argument("--template", default="build",
                        help="'build' (an affine template from the training scans), a file, "
                             "or 'none' (no alignment)")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    from dazoo.cli import quiet_tensorflow

    quiet_tensorflow()  # TensorFlow's import-time log lines, as the dazoo command hides them

    from dazoo.training import export, train

    template = ({"build": {"iterations": 2}} if args.template == "build"
                else None if args.template == "none" else os.path.abspath(args.template))
    recipe = {
        "name": os.path.basename(args.output.rstrip("/")),
        "data": {"train": os.path.abspath(args.data),
                 "validation": os.path.abspath(args.validation) if args.validation else None,
                 "labelled": args.labelled if args.labelled == "all" else int(args.labelled)},
        "labels": {"ids": [int(i) for i in args.ids.split(",")]},
        "preprocess": {"voxel_size": [args.voxel_size] * 3,
                       "shape": [int(n) for n in args.shape.split(",")],
                       "levels": args.levels, "template": template,
                       "alignment": "none" if template is None else "affine"},
        "training": {"steps": args.steps, "checkpoint_every": args.checkpoint_every,
                     "validate_every": max(args.checkpoint_every, args.steps // 10
                                           // args.checkpoint_every * args.checkpoint_every)},
    }
    run = f"{args.output.rstrip('/')}.run"
    path = f"{args.output.rstrip('/')}.recipe.json"
    if not args.resume:
        with open(path, "w") as handle:
            json.dump(recipe, handle, indent=1)
    result = train(path, run, resume=args.resume)
    preset = export(run, args.output)
    print(f"{result.steps} steps; preset {preset.path}: dazoo segment scan.nii.gz -o seg.nii.gz "
          f"--preset {preset.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
