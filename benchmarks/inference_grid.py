"""What a recipe's grid costs at inference, before training it: `dazoo segment` / `dazoo
register` seconds of a preset and of the same preset moved onto the recipe's grid and class
count, measured side by side.

The regridded preset is what the recipe's training starts from (``init.preprocessing:
"recipe"``: the parent's kernels on the new grid, a new head for the recipe's classes;
:func:`dazoo.training.engine.build_model`), with the parent's template resampled onto the
new grid; its labels are untrained, so its outputs mean nothing, but every stage a user
waits for (reading, brain extraction, affine alignment, the networks on the larger grid,
refinement, resampling back, writing) runs as the trained preset's will. The two presets
are timed alternately through the CLI (a new process per call, as a user runs it), after one
warm-up call each; the ratio is what to compare (absolute seconds drift between runs).

    python benchmarks/inference_grid.py --preset brain \\
        --recipe examples/brain/recipe_whole_brain.json --labels whole-brain \\
        --data ../shared/data/mindboggle-oasis-trt20 --repeats 2 --out work_cache/inference_grid
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples" / "brain"))


def regrid_template(template, shape, voxel_size):
    """The template resampled (trilinear) onto a grid of ``shape`` x ``voxel_size`` with the
    same centre and axes (a Volume)."""
    from dazoo import io
    from dazoo.preprocess.geometry import resample

    old = np.asarray(template.affine, float)
    axes = old[:3, :3] / np.linalg.norm(old[:3, :3], axis=0)
    centre = old[:3, :3] @ ((np.array(template.shape[:3]) - 1) / 2) + old[:3, 3]
    new = np.eye(4)
    new[:3, :3] = axes * np.asarray(voxel_size, float)
    new[:3, 3] = centre - new[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return io.Volume(resample(template, new, shape), new, None)


def whole_brain_table() -> list[dict]:
    from dazoo.labels import DKT31_CORTEX, WHOLE_BRAIN_ASEG, FREESURFER_LUT, LabelMap

    ids = sorted({*DKT31_CORTEX, *WHOLE_BRAIN_ASEG})
    return LabelMap(ids, names={i: FREESURFER_LUT[i][0] for i in ids if i in FREESURFER_LUT}
                    ).to_table()


def regridded_preset(preset: str, recipe_path: str, table: list[dict] | None, out: str):
    """Writes the parent preset moved onto the recipe's grid (see the module docstring)."""
    from dazoo import io
    from dazoo.presets import get_preset, save_preset
    from dazoo.training.engine import build_model
    from dazoo.training.recipe import Recipe

    parent = get_preset(preset)
    recipe = Recipe.load(recipe_path).with_overrides(['precision="float32"'])
    table = table or parent.read_json("labels.json")["classes"]
    model = build_model(recipe, len(table), parent, log=lambda message: None)
    shape, voxel = recipe["preprocess"]["shape"], recipe["preprocess"]["voxel_size"]
    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    template = folder / "template-source.nii.gz"
    io.write_image(regrid_template(io.read_image(parent.file("template.nii.gz")), shape, voxel),
                   str(template))
    preprocess = dict(parent.read_json("preprocess.json"), shape=list(shape),
                      voxel_size=list(voxel), template="template.nii.gz")
    metadata = {k: v for k, v in parent.metadata.items() if k not in ("name", "weights_sha256")}
    metadata["description"] = (f"{parent.metadata.get('name')} moved onto {recipe.source}'s "
                               "grid, untrained head: for timing only")
    return save_preset(folder / "preset", model=model, preprocess=preprocess, labels=table,
                       metadata=metadata, files={"template.nii.gz": str(template)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="brain")
    parser.add_argument("--recipe", default="examples/brain/recipe_whole_brain.json")
    parser.add_argument("--labels", choices=("parent", "whole-brain"), default="parent",
                        help="the regridded preset's label table")
    parser.add_argument("--data", default="../shared/data/mindboggle-oasis-trt20")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="work_cache/inference_grid")
    args = parser.parse_args(argv)

    from evaluate import timed, validation_subjects  # examples/brain/evaluate.py

    table = whole_brain_table() if args.labels == "whole-brain" else None
    regridded = str(regridded_preset(args.preset, args.recipe, table, args.out).path)
    a, b = validation_subjects(args.data, args.preset)[:2]
    dazoo = [sys.executable, "-m", "dazoo"]
    tmp = pathlib.Path(args.out) / "outputs"
    tmp.mkdir(exist_ok=True)
    commands = {
        "segment": lambda preset, k: dazoo + ["segment", a.image, "-o", str(tmp / f"s{k}.nii.gz"),
                                              "--preset", preset],
        "register": lambda preset, k: dazoo + ["register", a.image, b.image, "--moved",
                                               str(tmp / f"m{k}.nii.gz"), "--warp",
                                               str(tmp / f"w{k}.nii.gz"), "--preset", preset],
    }
    seconds = {(verb, name): [] for verb in commands for name in ("parent", "regridded")}
    for verb, command in commands.items():
        for name, preset in (("parent", args.preset), ("regridded", regridded)):
            timed(command(preset, 0))                                 # warm-up (file caches)
        for k in range(args.repeats):
            for name, preset in (("parent", args.preset), ("regridded", regridded)):
                seconds[verb, name].append(timed(command(preset, k)))
                print(f"{verb} {name}: {seconds[verb, name][-1]:.1f} s", flush=True)
    report = {"preset": args.preset, "recipe": args.recipe, "labels": args.labels,
              "seconds": {f"{v} {n}": s for (v, n), s in seconds.items()}}
    for verb in commands:
        parent, grid = np.median(seconds[verb, "parent"]), np.median(seconds[verb, "regridded"])
        report[f"{verb}_ratio"] = float(grid / parent)
        print(f"dazoo {verb}: {args.preset} {parent:.1f} s, on {args.recipe}'s grid {grid:.1f} s "
              f"(median of {args.repeats}): x{grid / parent:.2f}")
    (pathlib.Path(args.out) / "inference_grid.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
