"""Evaluation of a brain preset on its validation subjects, at native 1 mm.

    python examples/brain/evaluate.py --preset pretrained/brain \
        --data ../shared/data/mindboggle-oasis-trt20 \
        --out work_cache/brain/evaluation.json [--ants] [--flip | --no-flip] \
        [--cohort ../shared/data/freesurfer-cohort]

    # brain v3 (whole brain): the label maps relabelled onto its table first
    python examples/brain/whole_brain_data.py --data ../shared/data -o work_cache/brain_v3/data
    python examples/brain/evaluate.py --preset work_cache/brain_v3/brain \
        --data work_cache/brain_v3/data/oasis --out work_cache/brain_v3/evaluation.json \
        --cohort work_cache/brain_v3/data/freesurfer-cohort \
        --cohort-labels labels.whole_brain.nii.gz

The validation subjects are the ``data.validation`` of the preset's own ``recipe.json``
(written by ``dazoo export``; the shipped ``pretrained/brain`` has one too) or, for a preset
without one, of ``pretrained/brain/recipe.json``; they are found in ``--data`` with that
recipe's image and label patterns. The label ids scored are the preset's ``labels.json``.

* segmentation Dice per region (the preset's ids: v2's 62 lateralised DKT31 regions, v3's 92
  whole-brain structures) and left/right merged, per validation subject, against the label
  maps on the scan's own grid; for a table with structure groups (v3) also the mean per group
  (cortex, white matter, subcortical grey matter, ventricles and CSF, cerebellum, brainstem,
  non-cortical);
* registration Dice over all ordered validation pairs (moving labels carried onto the fixed
  scan's own grid) and folding fraction;
* with --ants: the same pairs with ANTs (antspyx) affine only and affine + SyN, default
  settings, labels carried with genericLabel interpolation: Dice and seconds per pair;
* consistency: the first validation scan rewritten as LIA and resampled onto an oblique grid
  (15 degrees) is segmented again; agreement with the original segmentation in world space;
* speed: end-to-end `dazoo segment` and `dazoo register` commands (new process: imports,
  model loading, reading, alignment, prediction, writing) on a 256x256x160 scan.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
from scipy import ndimage

from dazoo import io
from dazoo.evaluate import evaluate_registration, evaluate_segmentation, score_labels, summarise
from dazoo.hub import load
from dazoo.presets import get_preset
from dazoo.training.data import split_subjects
from dazoo.training.recipe import Recipe
from dazoo.training.subjects import Subject, load_subjects


HERE = pathlib.Path(__file__).resolve().parent
BRAIN_RECIPE = HERE.parents[1] / "pretrained" / "brain" / "recipe.json"


def preset_recipe(preset: str | os.PathLike) -> pathlib.Path:
    """The preset's own ``recipe.json``, else the shipped ``pretrained/brain/recipe.json``."""
    own = get_preset(preset).file("recipe.json")
    return own if own.is_file() else BRAIN_RECIPE


def validation_subjects(data: str | os.PathLike,
                        preset: str | os.PathLike = "pretrained/brain",
                        labels: str | None = None) -> list[Subject]:
    """The recipe's validation subjects (see :func:`preset_recipe`), found in ``data`` with
    the recipe's image / label patterns (file names only: no image is read); ``labels``: another
    label file name per subject instead of the recipe's."""
    recipe = Recipe.load(preset_recipe(preset))
    spec = recipe["data"]
    if spec["validation"] is None:
        raise SystemExit(f"{recipe.source}: no data.validation")
    subjects = load_subjects(data, image=spec["image"], labels=labels or spec["labels"])
    _, held = split_subjects(subjects, spec["validation"], source=recipe.source,
                             seed=recipe["seed"])
    unlabelled = [s.name for s in held if s.labels is None]
    if unlabelled:
        raise SystemExit(f"{data}: validation subject(s) {unlabelled} have no label map")
    return held


def label_ids(preset: str | os.PathLike) -> list[int]:
    """The preset's region ids (``labels.json``, background left out)."""
    return [int(c["id"]) for c in get_preset(preset).read_json("labels.json")["classes"]
            if int(c["id"]) != 0]


def ants_baseline(subjects, ids, kind):
    import ants

    results = []
    for i, j in itertools.permutations(range(len(subjects)), 2):
        moving, fixed = subjects[i], subjects[j]
        fixed_img, moving_img = ants.image_read(fixed.image), ants.image_read(moving.image)
        start = time.perf_counter()
        reg = ants.registration(fixed=fixed_img, moving=moving_img, type_of_transform=kind)
        seconds = time.perf_counter() - start
        moved = ants.apply_transforms(fixed=fixed_img, moving=ants.image_read(moving.labels),
                                      transformlist=reg["fwdtransforms"],
                                      interpolator="genericLabel")
        truth = io.read_labels(fixed.labels).array
        scores = score_labels(truth, np.rint(moved.numpy()).astype(np.int32), ids)
        results.append({"moving": moving.name, "fixed": fixed.name, "seconds": seconds,
                        **scores})
        print(f"ANTs {kind} {moving.name} -> {fixed.name}: mean Dice {scores['mean_dice']:.3f} "
              f"(merged {scores['mean_merged_dice']:.3f}), {seconds:.1f} s", flush=True)
    return results


def oblique_copy(path, out, degrees=15.0):
    """The scan resampled (linear) onto a grid rotated by ``degrees`` about two axes."""
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float32)
    angle = np.deg2rad(degrees)
    rot_x = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    rot_z = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    rotation = np.eye(4)
    rotation[:3, :3] = rot_z @ rot_x
    centre = image.affine @ np.r_[(np.array(data.shape) - 1) / 2, 1]
    shift = np.eye(4)
    shift[:3, 3] = centre[:3]
    new_affine = shift @ rotation @ np.linalg.inv(shift) @ image.affine
    voxel_map = np.linalg.inv(image.affine) @ new_affine  # new voxel -> old voxel
    resampled = ndimage.affine_transform(data, voxel_map, order=1, cval=0.0)
    nib.save(nib.Nifti1Image(resampled, new_affine), out)
    return str(out)


def lia_copy(path, out):
    image = nib.load(path)
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(image.affine),
                                                nib.orientations.axcodes2ornt("LIA"))
    nib.save(image.as_reoriented(transform), out)
    return str(out)


def world_agreement(reference: io.Volume, other: io.Volume, ids) -> dict:
    """``other`` resampled (nearest) onto ``reference``'s grid; Dice and voxel agreement."""
    voxel_map = np.linalg.inv(other.affine) @ reference.affine
    on_reference = ndimage.affine_transform(other.array, voxel_map, output_shape=reference.shape,
                                            order=0, cval=-1)
    inside = on_reference >= 0
    scores = score_labels(reference.array * inside, np.where(inside, on_reference, 0), ids)
    return {"mean_dice": scores["mean_dice"],
            "voxel_agreement": float(np.mean(on_reference[inside] == reference.array[inside]))}


def consistency(pipeline, subjects, ids, tmp):
    """Segmentation and registration of rewritten scans agree with the originals in world
    space (compared on the original grids, nearest-neighbour; ``ids``: the regions scored)."""
    moving, fixed = subjects[0], subjects[1]
    original = pipeline.segment(moving.image).labels
    report = {}
    for name, make in (("LIA", lia_copy), ("oblique_15deg", oblique_copy)):
        path = make(moving.image, os.path.join(tmp, f"{name}.nii.gz"))
        report[f"segment_{name}"] = world_agreement(original, pipeline.segment(path).labels, ids)
        print(f"consistency segment {name}: {report[f'segment_{name}']}", flush=True)
    # Registration: moving scan and labels rewritten as LIA, fixed scan rewritten as LIA;
    # the moved labels (on the LIA fixed grid) against the original run's (on its grid).
    reference = pipeline.register(moving.image, fixed.image, moving_labels=moving.labels)
    rewritten = pipeline.register(lia_copy(moving.image, os.path.join(tmp, "m.nii.gz")),
                                  lia_copy(fixed.image, os.path.join(tmp, "f.nii.gz")),
                                  moving_labels=lia_copy(moving.labels,
                                                         os.path.join(tmp, "ml.nii.gz")))
    report["register_LIA"] = world_agreement(reference.moved_labels, rewritten.moved_labels, ids)
    print(f"consistency register LIA: {report['register_LIA']}", flush=True)
    return report


def timed(cmd):
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def speed(preset, subjects, tmp):
    a, b = subjects[0], subjects[1]
    dazoo = [sys.executable, "-m", "dazoo"]
    segment = [timed(dazoo + ["segment", a.image, "-o", os.path.join(tmp, f"s{k}.nii.gz"),
                              "--preset", preset]) for k in range(2)]
    register = [timed(dazoo + ["register", a.image, b.image, "--moved",
                               os.path.join(tmp, f"m{k}.nii.gz"), "--warp",
                               os.path.join(tmp, f"w{k}.nii.gz"), "--moving-labels", a.labels,
                               "--moved-labels", os.path.join(tmp, f"l{k}.nii.gz"),
                               "--preset", preset]) for k in range(2)]
    return {"cli_segment_seconds": segment, "cli_register_seconds": register}


def registration_title(report: dict) -> str:
    refine = report.get("registration", {}).get("refine", {})
    if not refine.get("iterations"):
        return "registration (ordered pairs)"
    options = ", ".join(f"{k} {v}" for k, v in refine.items() if k != "iterations")
    return (f"registration (ordered pairs), network + {refine['iterations']} refinement "
            f"steps guided by the moving labels" + (f" ({options})" if options else ""))


def card_text(report: dict, command: str) -> str:
    """The model card's measured section from an evaluation report."""
    count = report.get("label_count", 62)
    whole_brain = report.get("whole_brain", False)
    truth = ("the Mindboggle-101 label maps relabelled onto the preset's table (cortex: manual "
             "DKT31; every other structure: FreeSurfer's automatic aseg)" if whole_brain
             else "the manual labels")
    lines = [f"Measured by `{command}`, on the validation subjects "
             f"({', '.join(report['validation'])}) at their native 1 mm resolution against "
             f"{truth}; nothing else running on the machine.", "",
             f"| task | mean Dice, {count} {'structures' if whole_brain else 'regions'} | "
             "mean Dice, left/right merged | seconds | folding |",
             "|---|---|---|---|---|"]
    rows = [("segmentation (per subject)" + (", flip test-time augmentation"
                                              if report.get("segmentation", {}).get("flip")
                                              else ""), "segmentation"),
            ("segmentation, another site (FreeSurfer cohort, FreeSurfer's DKT labels, "
             "no fine-tuning)", "cohort"),
            (registration_title(report), "registration"),
            ("registration, refinement guided by the segmenter (moving labels only carried "
             "along)", "registration_segmenter"),
            ("registration, another site (FreeSurfer cohort, ordered pairs, FreeSurfer's "
             "labels), as the first registration row", "cohort_registration"),
            ("registration, another site, the network alone (no refinement)",
             "cohort_registration_network"),
            ("registration, ANTs affine", "ants_affine"),
            ("registration, ANTs affine + SyN (defaults)", "ants_syn")]
    for title, key in rows:
        if key in report:
            s = report[key]["summary"]
            folding = (f"{100 * s['folding_fraction']:.4f} %" if "folding_fraction" in s
                       else "-")
            lines.append(f"| {title} ({s['count']}) | {s['mean_dice']:.3f} | "
                         f"{s['mean_merged_dice']:.3f} | {s['seconds']:.1f} | {folding} |")
    grouped = [(title, report[key]["summary"]) for title, key in rows
               if key in report and report[key]["summary"].get("group_dice")]
    if grouped:
        groups = list(dict.fromkeys(g for _, s in grouped for g in s["group_dice"]))
        lines += ["", "Mean Dice per structure group (non-cortical: every structure outside "
                      "the cortex):", "",
                  "| task | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
        for title, s in grouped:
            lines.append(f"| {title} ({s['count']}) | " + " | ".join(
                f"{s['group_dice'][g]:.3f}" if g in s["group_dice"] else "-" for g in groups)
                + " |")
    if "speed" in report:
        sp = report["speed"]

        def runs(value):
            values = value if isinstance(value, list) else [value]
            return ", ".join(f"{v:.1f}" for v in values) + " s"

        lines += ["", f"End-to-end commands on a 256x256x160 scan (new process: imports, model "
                      f"loading, reading, alignment, prediction, writing): `dazoo segment` "
                      f"{runs(sp['cli_segment_seconds'])}, `dazoo register` "
                      f"{runs(sp['cli_register_seconds'])}."]
    if "consistency" in report:
        lines += ["", "Orientation invariance (the first validation scan rewritten, compared "
                      "in world space):"]
        lines += [f"- {name}: voxel agreement {v['voxel_agreement']:.4f}, mean Dice "
                  f"{v['mean_dice']:.3f}" for name, v in report["consistency"].items()]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="pretrained/brain",
                        help="preset name or folder (e.g. one written by dazoo export)")
    parser.add_argument("--data", default="../shared/data/mindboggle-oasis-trt20",
                        help="the Mindboggle OASIS-TRT-20 folder (one subfolder per subject)")
    parser.add_argument("--out", default="work_cache/brain/evaluation.json",
                        help="the report (JSON)")
    parser.add_argument("--ants", action="store_true", help="also run the ANTs baselines")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=("segmentation", "registration", "consistency", "speed"))
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="left-right test-time augmentation of the segmentations "
                             "(default: the preset's)")
    parser.add_argument("--cohort", metavar="DIR",
                        help="also segment the labelled scans of a FreeSurfer cohort (sub-*/"
                             "brainmask.mgz and --cohort-labels), without fine-tuning: "
                             "e.g. ../shared/data/freesurfer-cohort")
    parser.add_argument("--cohort-labels", default="aparc.DKTatlas+aseg.mgz", metavar="NAME",
                        help="the cohort's label file per subject (default: %(default)s; a "
                             "whole-brain preset: labels.whole_brain.nii.gz as written by "
                             "examples/brain/whole_brain_data.py, relabelled onto its table)")
    parser.add_argument("--card", action="store_true",
                        help="write the measured section into the preset's model card")
    args = parser.parse_args(argv)
    subjects = validation_subjects(args.data, args.preset)
    pipeline = load(args.preset)
    ids = label_ids(args.preset)
    report = {"preset": args.preset, "validation": [s.name for s in subjects],
              "label_count": len(ids),
              "whole_brain": any(g != "cortex" for g in pipeline.label_groups.values())}
    if "segmentation" not in args.skip:
        per = evaluate_segmentation(pipeline, subjects, flip=args.flip)
        report["segmentation"] = {"summary": summarise(per), "subjects": per,
                                  "flip": pipeline.default_flip if args.flip is None
                                  else args.flip}
    if args.cohort:
        from dazoo.training import load_subjects

        cohort = load_subjects(args.cohort, image="brainmask.mgz", labels=args.cohort_labels)
        per = evaluate_segmentation(pipeline, cohort, flip=args.flip)
        report["cohort"] = {"path": args.cohort, "summary": summarise(per), "subjects": per}
        if "registration" not in args.skip:
            # every ordered pair of the other site's scans, scored against FreeSurfer's
            # labels: a check of the registration defaults on data not used to choose them
            per = evaluate_registration(pipeline, cohort)
            report["cohort_registration"] = {"summary": summarise(per), "pairs": per,
                                             "refine": pipeline.default_refine}
            if pipeline.default_refine.get("iterations", 0):
                per = evaluate_registration(pipeline, cohort, refine_options={"iterations": 0})
                report["cohort_registration_network"] = {"summary": summarise(per),
                                                         "pairs": per}
    if "registration" not in args.skip:
        per = evaluate_registration(pipeline, subjects)
        report["registration"] = {"summary": summarise(per), "pairs": per,
                                  "refine": pipeline.default_refine}
        if pipeline.default_refine.get("iterations", 0):
            # as a user without the moving scan's labels: the segmenter guides the refinement
            per = evaluate_registration(pipeline, subjects, refine_options={"guide": "segmenter"})
            report["registration_segmenter"] = {"summary": summarise(per), "pairs": per}
    if args.ants:
        # ANTs does not depend on the preset: its results are kept beside the report and
        # reused (delete the file to rerun it).
        cache = pathlib.Path(args.out).with_name("ants_baselines.json")
        baselines = json.loads(cache.read_text()) if cache.exists() else {}
        for kind in ("Affine", "SyN"):
            key = f"ants_{kind.lower()}"
            if key not in baselines:
                per = ants_baseline(subjects, ids, kind)
                baselines[key] = {"summary": summarise(per), "pairs": per}
                io.write_text_atomic(cache, json.dumps(baselines, indent=1))
            report[key] = baselines[key]
        import ants

        report["ants_version"] = getattr(ants, "__version__", "unknown")
    with tempfile.TemporaryDirectory() as tmp:
        if "consistency" not in args.skip:
            report["consistency"] = consistency(pipeline, subjects, ids, tmp)
        if "speed" not in args.skip:
            report["speed"] = speed(args.preset, subjects, tmp)
            print(f"speed: {report['speed']}", flush=True)
    io.write_text_atomic(args.out, json.dumps(report, indent=1))
    if args.card:
        from dazoo.presets import add_evaluation

        command = "python examples/brain/evaluate.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]) if a != "--card")
        add_evaluation(pipeline.preset, "Measured at native resolution",
                       card_text(report, command))
    for key in ("segmentation", "cohort", "registration", "registration_segmenter",
                "cohort_registration", "cohort_registration_network", "ants_affine",
                "ants_syn"):
        if key in report:
            s = report[key]["summary"]
            print(f"{key}: mean Dice {s['mean_dice']:.3f} (merged {s['mean_merged_dice']:.3f}) "
                  f"over {s['count']}, {s['seconds']:.1f} s each"
                  + (f", folding {100 * s['folding_fraction']:.4f} %" if "folding_fraction" in s
                     else ""))
            if s.get("group_dice"):
                print("    " + ", ".join(f"{g} {v:.3f}" for g, v in s["group_dice"].items()))
    print(f"report: {args.out}")


if __name__ == "__main__":
    sys.exit(main())
