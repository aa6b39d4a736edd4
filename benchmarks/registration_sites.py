"""Brain registration across sites: dazoo (network alone, refined) beside ANTs SyN.

Three sets of ordered pairs, every pair scored on the fixed scan's native grid over the
preset's label ids (Dice per id, mean), folding fraction and seconds per pair:

- ``validation``: the preset's validation subjects (Mindboggle OASIS-TRT-20, manual labels);
- ``cohort``: the FreeSurfer cohort's labelled subjects (another site; FreeSurfer's automatic
  ``aparc.DKTatlas+aseg``);
- ``degraded``: the validation subjects degraded on their own grid (:func:`degrade`): each
  gets 5 mm thick slices along another axis (subject k: axis k mod 3), a smooth bias field,
  noise and a contrast change (gamma 0.6), so robustness shows without other data;
- ``resliced``: each cohort subject resampled onto coronal slices of 0.86 x 0.86 mm,
  1.5 mm apart, with the origin at the volume's corner (:func:`reslice`; the other site's
  geometry of the issue), registered to the other cohort subjects as they are: the
  affine pre-alignment has to find a brain 100+ mm away from where the others lie.

Methods: ``network`` (``refine=0``: what training made), ``refined`` (the preset's default
refinement, guided by the segmenter's labels: the moving labels are never shown to it),
``refined_labels`` (not run by default: the refinement guided by the moving scan's own labels,
what ``dazoo register --moving-labels`` does: an atlas with labels, not a fair match for SyN,
which sees no labels), and
``syn`` (ANTs ``ants.registration(type_of_transform="SyN")``: affine + SyN, antspyx's
defaults, labels carried with genericLabel; antspyx is a benchmark dependency only).

    python benchmarks/registration_sites.py --data ../shared/data --preset brain \\
        --out work_cache/registration_sites.json [--sets validation cohort degraded] \\
        [--methods network refined syn] [--pairs N]

``--alignment`` instead compares the affine pre-alignment of every validation and cohort scan
with that of its resliced copy (:func:`alignment_travel`), the check of the issue's corner
origin and anisotropic voxels without the deformable step.

Results (JSON) keep every pair; the summary table (Markdown) is printed. Rerunning with the
same ``--out`` reuses the pairs already measured (delete the file to measure again).

A whole-brain preset scored over its cortex (the 62 DKT regions) against the same label files
as the cortex-only version 2, so that SyN's rows measured for it carry over (copy its results
JSON to ``--out`` and drop its ``network`` / ``refined`` rows; SyN sees no preset):

    python benchmarks/registration_sites.py --data ../shared/data --preset PRESET \
        --group cortex --oasis-labels labels.DKT31.manual.nii.gz --out RESULTS.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
import tempfile
import time

import numpy as np
import scipy.ndimage as ndi

SETS = ("validation", "cohort", "degraded", "resliced")
METHODS = ("network", "refined", "refined_labels", "syn")
DEFAULT_METHODS = ("network", "refined", "syn")


# --------------------------------------------------------------------------- degraded scans
def degrade(array: np.ndarray, index: int, *, thickness: int = 5, seed: int = 0) -> np.ndarray:
    """A scan degraded on its own grid: slices ``thickness`` voxels thick along axis
    ``index % 3`` (block means, linearly interpolated back between slice centres), a smooth
    multiplicative bias field (+-20 %), Gaussian noise (3 % of the 99th percentile, in the
    foreground) and a contrast change (intensities to the power 0.6). Zero stays zero."""
    rng = np.random.default_rng([seed, index])
    array = np.asarray(array, np.float32)
    foreground = array > 0
    axis = index % 3
    n = array.shape[axis]
    blocks = -(-n // thickness)
    padded = np.concatenate([array, np.repeat(np.take(array, [-1], axis=axis),
                                              blocks * thickness - n, axis=axis)], axis=axis)
    shape = list(array.shape)
    shape[axis:axis + 1] = [blocks, thickness]
    means = padded.reshape(shape).mean(axis=axis + 1)              # one value per slice
    centres = np.arange(blocks) * thickness + (thickness - 1) / 2
    position = np.clip(np.interp(np.arange(n), centres, np.arange(blocks)), 0, blocks - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, blocks - 1)
    weight = (position - low).reshape([-1 if a == axis else 1 for a in range(3)])
    thick = np.take(means, low, axis=axis) * (1 - weight) + np.take(means, high, axis=axis) * weight
    coarse = rng.normal(size=(4, 4, 4))
    bias = ndi.zoom(coarse, np.array(array.shape) / 4, order=3)[tuple(slice(0, s) for s in array.shape)]
    bias = 1.0 + 0.2 * bias / max(np.abs(bias).max(), 1e-6)
    top = float(np.percentile(array[foreground], 99)) if foreground.any() else 1.0
    noisy = thick * bias + rng.normal(0, 0.03 * top, array.shape)
    out = top * np.clip(noisy / top, 0, None) ** 0.6
    return np.where(foreground, out, 0).astype(np.float32)


def reslice(volume, labels: np.ndarray, spacing=(0.86, 0.86, 1.5)):
    """A scan and its labels resampled onto LIA voxel axes (coronal slices ``spacing[2]``
    apart, in-plane ``spacing[:2]``) covering the same field, the origin (voxel 0) at world
    (0, 0, 0): the anatomy moves in world space as a corner-origin export would put it.
    Returns ``(Volume, labels)``: the image by linear, the labels by nearest interpolation."""
    from dazoo import io

    shape, sampling = _reslice_grid(volume, spacing)
    to_old = np.linalg.inv(volume.affine) @ sampling  # new voxel -> old voxel
    image = ndi.affine_transform(np.asarray(volume.array, np.float32), to_old[:3, :3],
                                 to_old[:3, 3], output_shape=shape, order=1)
    resliced = ndi.affine_transform(labels, to_old[:3, :3], to_old[:3, 3], output_shape=shape,
                                    order=0)
    affine = sampling.copy()
    affine[:3, 3] = 0.0                                  # the origin at the corner
    return io.Volume(image, affine, None), resliced


def reslice_motion(volume, spacing=(0.86, 0.86, 1.5)) -> np.ndarray:
    """The world -> world matrix :func:`reslice` applies to the anatomy (a translation: the
    field's corner moved to the origin)."""
    _, sampling = _reslice_grid(volume, spacing)
    motion = np.eye(4)
    motion[:3, 3] = -sampling[:3, 3]
    return motion


def _reslice_grid(volume, spacing):
    corners = np.array([[i, j, k, 1] for i in (0, volume.shape[0] - 1)
                        for j in (0, volume.shape[1] - 1) for k in (0, volume.shape[2] - 1)],
                       float) @ volume.affine.T
    low, high = corners[:, :3].min(0), corners[:, :3].max(0)
    # LIA: i -> left (x decreasing), j -> inferior (z decreasing), k -> anterior (y increasing)
    directions = np.array([[-1, 0, 0], [0, 0, -1], [0, 1, 0]], float).T
    extent = np.array([high[0] - low[0], high[2] - low[2], high[1] - low[1]])
    shape = tuple(int(np.ceil(e / s)) + 1 for e, s in zip(extent, spacing))
    start = np.array([high[0], low[1], high[2]])        # the corner at voxel 0
    sampling = np.eye(4)
    sampling[:3, :3] = directions * np.asarray(spacing)
    sampling[:3, 3] = start
    return shape, sampling


def alignment_travel(pipeline, cases) -> list[dict]:
    """The affine pre-alignment of each scan and of its resliced copy (:func:`reslice`:
    coronal anisotropic voxels, corner origin), compared where it matters: the distance
    (mm) between where the two put each bright template voxel, once the reslice's known
    motion is undone (mean, largest), and each alignment's correlation score on the original
    scan (equal scores with different matrices: a flat optimum, not a failure)."""
    from dazoo.preprocess.alignment import alignment_score

    template = pipeline.preprocessor.template
    bright = np.argwhere(template.array > np.percentile(template.array, 60))
    points = np.c_[bright @ template.affine[:3, :3].T + template.affine[:3, 3],
                   np.ones(len(bright))]
    rows = []
    for name, volume, _ in cases:
        copy, _ = reslice(volume, np.zeros(volume.shape, np.int8))
        back = np.linalg.inv(reslice_motion(volume))
        original = pipeline.preprocess(volume).alignment
        resliced = back @ pipeline.preprocess(copy).alignment
        distance = np.linalg.norm(points @ (resliced - original).T, axis=1)
        rows.append({"scan": name, "mean_mm": float(distance.mean()),
                     "max_mm": float(distance.max()),
                     "score_original": float(alignment_score(volume, template, original)),
                     "score_resliced": float(alignment_score(volume, template, resliced))})
    return rows


# --------------------------------------------------------------------------- the pairs
def _cases(args, which: str, ids):
    """(name, image Volume, truth array) per subject of a set."""
    from dazoo import io

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "brain"))
    from evaluate import validation_subjects

    if which in ("validation", "degraded"):
        subjects = validation_subjects(args.oasis or os.path.join(args.data, "mindboggle-oasis-trt20"),
                                       args.preset, labels=args.oasis_labels)
        files = [(s.name, s.image, s.labels) for s in subjects]
    else:
        root = os.path.join(args.data, "freesurfer-cohort")
        files = [(name, os.path.join(root, name, "brainmask.mgz"),
                  os.path.join(root, name, args.cohort_labels))
                 for name in sorted(os.listdir(root))
                 if os.path.exists(os.path.join(root, name, args.cohort_labels))]
    cases, moved = [], []
    for k, (name, image, labels) in enumerate(files):
        volume = io.read_image(image)
        truth = io.read_labels(labels, like=volume).array
        if which == "degraded":
            volume = io.Volume(degrade(volume.array, k), volume.affine, None)
            name = f"{name}-degraded"
        if which == "resliced":
            moved.append((f"{name}-resliced", *reslice(volume, truth)))
        cases.append((name, volume, truth))
    if which == "resliced":  # resliced moving scans onto the other subjects as they are
        n = len(cases)
        return cases + moved, [(n + i, j) for i in range(n) for j in range(n) if i != j]
    return cases, list(itertools.permutations(range(len(cases)), 2))


def run_dazoo(pipeline, cases, pairs, method: str, ids, group: str | None = None) -> list[dict]:
    """dazoo on each pair; ``group``: ``mean_dice`` is the mean over that structure group of the
    preset's table (``group_dice``), the mean over every structure kept as ``all_mean_dice``."""
    from dazoo.evaluate import Case, evaluate_registration

    items = [Case(name, image=volume, truth=truth) for name, volume, truth in cases]
    refine = 0 if method == "network" else None
    options = {} if method == "refined_labels" else {"guide": "segmenter"}
    results = evaluate_registration(pipeline, cases=items, pairs=pairs, refine=refine,
                                    refine_options=options, log=None)
    for r in results:
        if group:
            r["all_mean_dice"] = r["mean_dice"]
            r["mean_dice"] = _group_mean(r["dice"], ids)
            r.pop("mean_merged_dice", None)
        for key in ("dice", "merged_dice"):
            r.pop(key, None)
    return results


def _group_mean(per_id: dict, ids) -> float:
    """Mean Dice over ``ids`` (ids absent from both maps, NaN, left out: dazoo.evaluate's
    group_means, as score_labels averages)."""
    from dazoo.evaluate import group_means

    return group_means(per_id, {i: "scored" for i in ids}).get("scored", float("nan"))


def group_ids(pipeline, group: str | None) -> list[int]:
    """The preset's label ids (background left out), only those of ``group`` when given."""
    ids = [int(i) for i in pipeline.class_ids if i != 0]
    if not group:
        return ids
    groups = pipeline.label_groups or {}
    chosen = [i for i in ids if groups.get(i) == group]
    if not chosen:
        raise SystemExit(f"{pipeline.preset}: no structure group {group!r} in its label table "
                         f"(groups: {sorted(set(groups.values())) or 'none'})")
    return chosen


def run_syn(cases, pairs, ids, done=(), save=None) -> list[dict]:
    """SyN on each ordered pair; ``done``: rows already measured (their pairs are skipped and
    the rows kept), ``save(rows)`` is called after every pair, so an interrupted run loses at
    most the pair it was on (SyN takes minutes per pair)."""
    import ants

    from dazoo import io
    from dazoo.evaluate import score_labels

    results = list(done)
    finished = {(r["moving"], r["fixed"]) for r in results}
    pairs = [(i, j) for i, j in pairs if (cases[i][0], cases[j][0]) not in finished]
    if not pairs:
        return results
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for k, (_, volume, truth) in enumerate(cases):
            image, labels = os.path.join(folder, f"{k}.nii.gz"), os.path.join(folder, f"{k}_l.nii.gz")
            io.write_image(volume, image)
            io.write_labels((truth, volume.affine), labels)
            paths.append((image, labels))
        for i, j in pairs:
            fixed, moving = ants.image_read(paths[j][0]), ants.image_read(paths[i][0])
            start = time.perf_counter()
            reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyN")
            seconds = time.perf_counter() - start
            moved = ants.apply_transforms(fixed=fixed, moving=ants.image_read(paths[i][1]),
                                          transformlist=reg["fwdtransforms"],
                                          interpolator="genericLabel")
            jacobian = ants.create_jacobian_determinant_image(fixed, reg["fwdtransforms"][0])
            scores = score_labels(cases[j][2], np.rint(moved.numpy()).astype(np.int32), ids)
            results.append({"moving": cases[i][0], "fixed": cases[j][0], "seconds": seconds,
                            "folding_fraction": float((jacobian.numpy() <= 0).mean()),
                            "mean_dice": scores["mean_dice"],
                            "mean_merged_dice": scores["mean_merged_dice"]})
            if save is not None:
                save(results)
    return results


# --------------------------------------------------------------------------- the summary
def summary_table(results: dict, *, seconds: bool = True) -> str:
    """Markdown: one row per set and method with the pairs measured, mean (std) Dice, folding
    (mean and largest, % of voxels) and (``seconds``) mean seconds per pair; then, per set,
    dazoo's default (``refined``) minus SyN over the pairs both measured."""
    lines = ["| pairs | method | n | mean Dice (std) | folding % (max) | s / pair |",
             "|---|---|---|---|---|---|"]
    if not seconds:
        lines = [line.rsplit("|", 2)[0] + "|" for line in lines]
    for which in SETS:
        for method in METHODS:
            rows = results.get(which, {}).get(method)
            if not rows:
                continue
            dice = np.array([r["mean_dice"] for r in rows])
            folding = 100 * np.array([r["folding_fraction"] for r in rows])
            line = (f"| {which} | {method} | {len(rows)} | {dice.mean():.3f} "
                    f"({dice.std():.3f}) | {folding.mean():.4f} ({folding.max():.4f}) |")
            if seconds:
                line += f" {np.mean([r['seconds'] for r in rows]):.1f} |"
            lines.append(line)
    for which in SETS:
        ours = {(r["moving"], r["fixed"]): r["mean_dice"]
                for r in results.get(which, {}).get("refined", [])}
        syn = {(r["moving"], r["fixed"]): r["mean_dice"]
               for r in results.get(which, {}).get("syn", [])}
        both = sorted(set(ours) & set(syn))
        if both:
            gaps = np.array([ours[p] - syn[p] for p in both])
            lines.append(f"\n{which}: dazoo (refined) - SyN = {gaps.mean():+.3f} Dice over "
                         f"{len(both)} pairs ({(gaps > 0).sum()} pairs better)")
    return "\n".join(lines)


CARD_TITLE = "Registration across sites, beside ANTs SyN"


def card_text(results: dict, command: str, regions: int, group: str | None = None) -> str:
    """The model card's section: what the sets and methods are, the summary table without
    seconds (a benchmark run's timings depend on what else the machine ran), the command;
    ``regions``: how many label ids the scores average (``group``: the table's group they are)."""
    which = f"{regions} structures of its {group} group" if group else f"{regions} labelled structures"
    return (
        f"Registration Dice (mean over the preset's {which}, on the fixed "
        "scan's native grid) and "
        "folding (% of non-positive Jacobians) on ordered pairs of: the validation subjects "
        "(Mindboggle OASIS-TRT-20, manual labels); the FreeSurfer cohort (another site, "
        "FreeSurfer's automatic labels); the validation subjects degraded on their own grid "
        "(5 mm slices along one axis, bias field, noise, gamma 0.6); and the cohort's scans "
        "resliced onto coronal 0.86 x 0.86 x 1.5 mm voxels with the origin at the volume's "
        "corner, registered to the others as they are. Methods: `network` is `dazoo register "
        "--refine 0` (the network alone), `refined` is `dazoo register` with its defaults "
        "and no moving labels (the refinement guided by the segmenter), `refined_labels` "
        "(where measured) the refinement guided by the moving scan's own labels (`--moving-"
        "labels`: an atlas with labels, no fair match for SyN), `syn` is ANTs SyN "
        "(`ants.registration(type_of_transform=\"SyN\")`, affine + SyN, antspyx defaults).\n\n"
        + summary_table(results, seconds=False) + f"\n\n`{command}`")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--preset", default="brain")
    parser.add_argument("--out", required=True, help="results JSON (reused when present)")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--pairs", type=int, default=0, help="at most N pairs per set (0: all)")
    parser.add_argument("--oasis", metavar="DIR",
                        help="the validation subjects' folder (default: DATA/"
                             "mindboggle-oasis-trt20)")
    parser.add_argument("--oasis-labels", metavar="NAME",
                        help="their label file per subject (default: the preset recipe's)")
    parser.add_argument("--cohort-labels", default="aparc.DKTatlas+aseg.mgz", metavar="NAME",
                        help="the FreeSurfer cohort's label file per subject (default: "
                             "%(default)s)")
    parser.add_argument("--group", metavar="NAME",
                        help="score one structure group of the preset's table (e.g. cortex: "
                             "a whole-brain preset's 62 DKT regions, comparable with a "
                             "cortex-only preset's figures and SyN rows measured for them)")
    parser.add_argument("--alignment", action="store_true",
                        help="only compare the affine pre-alignment of the validation and "
                             "cohort scans with that of their resliced copies "
                             "(alignment_travel)")
    parser.add_argument("--card", action="store_true",
                        help="write the summary into the preset's model card (a preset folder)")
    args = parser.parse_args(argv)
    from dazoo.hub import load

    results = json.load(open(args.out)) if os.path.exists(args.out) else {}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as fh:
            json.dump(results, fh, indent=1)
        os.replace(args.out + ".tmp", args.out)

    pipeline = load(args.preset)
    ids = group_ids(pipeline, args.group)
    if args.alignment:
        for which in ("validation", "cohort"):
            rows = alignment_travel(pipeline, _cases(args, which, ids)[0])
            results.setdefault("alignment", {})[which] = rows
            save()
            for r in rows:
                print(f"{which} {r['scan']}: original vs resliced alignment {r['mean_mm']:.2f} "
                      f"mm (max {r['max_mm']:.2f}); correlation {r['score_original']:.3f} / "
                      f"{r['score_resliced']:.3f}", flush=True)
        return 0
    for which in args.sets:
        cases, pairs = _cases(args, which, ids)
        pairs = pairs[: args.pairs] if args.pairs else pairs
        for method in args.methods:
            done = results.get(which, {}).get(method)
            if done and len(done) >= len(pairs):
                continue
            start = time.perf_counter()
            if method == "syn":
                rows = run_syn(cases, pairs, ids, done=done or (),
                               save=lambda rows: (results.setdefault(which, {}).update(syn=rows),
                                                  save()))
            else:
                rows = run_dazoo(pipeline, cases, pairs, method, ids, args.group)
            results.setdefault(which, {})[method] = rows
            save()
            print(f"{which} {method}: mean Dice {np.mean([r['mean_dice'] for r in rows]):.3f} "
                  f"over {len(rows)} pairs ({time.perf_counter() - start:.0f} s)", flush=True)
    print(summary_table(results))
    if args.card:
        from dazoo.presets import add_evaluation

        command = "python benchmarks/registration_sites.py " + shlex.join(
            sys.argv[1:] if argv is None else argv)
        add_evaluation(pipeline.preset, CARD_TITLE,
                       card_text(results, command, len(ids), group=args.group))
    return 0


if __name__ == "__main__":
    sys.exit(main())
