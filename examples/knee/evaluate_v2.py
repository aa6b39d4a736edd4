"""Evaluates a knee v2 preset (OAI-ZIB's six structures) for its model card.

1. **Held-out maps**: the validation images of ``make_validation.py`` (one image synthesised
   on each held-out map's own 160 x 384 x 384 grid, no spatial change, so the map is the exact
   truth): ``dazoo segment`` on each, Dice per structure at native resolution against the
   issue's targets (femur, tibia >= 0.97; femoral, tibial cartilage >= 0.85; patella >= 0.95;
   patellar cartilage >= 0.80).
2. **Registration of held-out pairs**: every ordered pair of the held-out images (or one in
   K, ``--every K``), the moving map carried onto the fixed grid before the deformable step
   (the two scans' model grids overlaid as the preprocessing places them: field-of-view
   centres, no alignment) and after
   it (the network alone, ``refine=0``; and the preset's default refinement, or ``--refine N``
   iterations, guided by the segmenter's labels), Dice per structure and folding. Pairs of
   one knee at two time points are reported apart from pairs of two subjects.
3. **The real DESS scan** (``knee-dess/dess_echo1.nii.gz``, unlabelled: plausibility, not a
   score): structure volumes (mL), cartilage volume and mean thickness per plate
   (``evaluate_folder.measures``), how far the femur and tibia labels reach
   towards the field of view's superior and inferior edges (bones cut by the model grid
   would stop short), the scan mirrored left-right (a left knee) segmented and mirrored back
   (Dice against the right knee's), and a QC picture. Only echo 1 is available here: echo
   consistency cannot be measured.

    python examples/knee/evaluate_v2.py --preset work_cache/knee_v2/preset \\
        --validation work_cache/knee_v2/validation/validation.csv --data ../shared/data \\
        --out work_cache/knee_v2/eval [--pairs 0 | --every 3] \\
        [--qc PRESET/qc_dess_segmentation.png] [--card]
"""
from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import shlex
import sys
import time

import numpy as np

NAMES = {1: "femur", 2: "femoral cartilage", 3: "tibia", 4: "tibial cartilage",
         5: "patella", 6: "patellar cartilage"}
TARGETS = {1: 0.97, 2: 0.85, 3: 0.97, 4: 0.85, 5: 0.95, 6: 0.80}


def subject_of(name: str) -> str:
    """``OAI_AKOA_9271853_00m`` -> ``OAI_AKOA_9271853`` (time points of one knee)."""
    parts = name.split("_")
    return "_".join(parts[:3]) if name.startswith("OAI_AKOA_") and len(parts) > 3 else name


def si_axis(affine: np.ndarray) -> tuple[int, bool, float]:
    """The voxel axis closest to superior-inferior, whether increasing index goes superior,
    and its spacing (mm)."""
    axis = int(np.argmax(np.abs(affine[2, :3])))
    return axis, bool(affine[2, axis] > 0), float(np.linalg.norm(affine[:3, axis]))


def bone_reach_mm(labels: np.ndarray, affine: np.ndarray, label: int, end: str) -> float:
    """Distance (mm) from the structure's most superior (``end="top"``) or inferior voxel
    to that edge of the field of view, along the scan's superior-inferior voxel axis."""
    axis, up, spacing = si_axis(affine)
    where = np.flatnonzero(np.any(labels == label, axis=tuple(a for a in range(3) if a != axis)))
    if not len(where):
        return float("nan")
    n = labels.shape[axis]
    if (end == "top") == up:
        return (n - 1 - int(where.max())) * spacing
    return int(where.min()) * spacing


def per_structure(dice: dict) -> dict:
    return {NAMES[i]: round(float(dice[i]), 4) for i in NAMES if i in dice}


def card_sections(results: dict, command: str, picture: str | None = None
                  ) -> list[tuple[str, str]]:
    """The model card's measured sections (title, markdown) from :func:`main`'s results: the
    held-out maps per structure against the issue's targets, the registration of held-out
    pairs before and after the deformable step, and the real DESS scan's checks (with the QC
    ``picture``, a file name in the preset folder, when there is one); a part that was not
    run gives no section."""
    sections = []
    seg = results.get("segmentation")
    if seg:
        n = len(seg["per_subject"])
        rows = [f"| {name} | {seg['mean'][name]:.3f} | {seg['min'][name]:.3f} | "
                f"{target['target']:.2f} | {'yes' if target['reached'] else 'no'} |"
                for name, target in seg["targets"].items()]
        sections.append(("Held-out OAI label maps", (
            f"Dice per structure on {n} held-out manual OAI label maps (subjects never seen in "
            "training, both time points of a subject held out together), each with one image "
            "synthesised on the map's own 160 x 384 x 384 grid (no spatial change, so the map "
            "is the exact truth), segmented with `dazoo segment` and scored at native "
            f"resolution ({seg['seconds']} s per scan). Synthesised images, not real scans: "
            "no labelled real knee image was available.\n\n"
            "| structure | mean Dice | lowest map | target | reached |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + f"\n\n`{command}`")))
    ext = results.get("segmentation_extended")
    if ext:
        short = results.get("short_mm", {})
        names = [n for n in short if n.endswith("_ext")]
        stopped = [n for n in names if short[n]["femur top"] > 3 or short[n]["tibia bottom"] > 3]
        rows = [f"| {name} | {ext['mean'][name]:.3f} |" for name in NAMES.values()]
        sections.append(("Held-out maps with their shafts continued", (
            f"The same {len(names)} held-out maps with their superior and inferior end planes "
            "repeated outward (`make_validation.py --extend 40 20`: the femoral shaft 40 mm "
            "longer, the tibial 20 mm: a field of view taller than the maps' 140 mm and the "
            "joint below its centre, as in the real DESS scan below), one image synthesised on "
            f"each. Femur or tibia labels stopping more than 3 mm short of the map's: "
            f"{len(stopped)} of {len(names)} (at most {ext['short_mm_max']['femur top']} mm "
            f"for the femur's top, {ext['short_mm_max']['tibia bottom']} mm for the tibia's "
            "bottom).\n\n| structure | mean Dice |\n|---|---|\n" + "\n".join(rows)
            + f"\n\n`{command}`")))
    reg = results.get("registration")
    if reg and reg.get("summary"):
        lines = ["| pairs | n | stage | " + " | ".join(NAMES.values()) + " | mean |",
                 "|---|---|---|" + "---|" * (len(NAMES) + 1)]
        folding = []
        for group, value in reg["summary"].items():
            stages = [("before", "before (grids overlaid)"), ("network", "deformable")]
            if value["refined"] != value["network"]:  # refined (by default or --refine)
                stages = [stages[0], ("network", "deformable, network alone"),
                          ("refined", "deformable, refined (segmenter-guided)")]
            for stage, title in stages:
                lines.append(f"| {group} | {value['pairs']} | {title} | " + " | ".join(
                    f"{value[stage][name]:.3f}" for name in NAMES.values())
                    + f" | {value[stage]['mean']:.3f} |")
            folding.append(f"{group} {value['folding_max_percent']:.4f} %")
        total = sum(value["pairs"] for value in reg["summary"].values())
        which = ("Every ordered pair of the held-out images" if total >= reg.get("of", total)
                 else f"{total} of the {reg['of']} ordered pairs of the held-out images"
                 + (f" (one in {reg['every']})" if reg.get("every", 1) > 1 else ""))
        sections.append(("Registration of held-out pairs", (
            which + ": the moving map carried onto the fixed "
            "scan's native grid before the deformable step (the two model grids overlaid as "
            "the preprocessing places them: field-of-view centres, no alignment) and after it; "
            "Dice per structure. Largest folding (non-positive Jacobian, native grid): "
            + ", ".join(folding) + ".\n\n" + "\n".join(lines) + f"\n\n`{command}`")))
    d = results.get("dess")
    if d:
        c = d["cartilage"]
        plates = ", ".join(f"{plate} {c[f'{plate} volume mL']:.2f} mL, mean thickness "
                           f"{c[f'{plate} thickness mm']:.2f} mm"
                           for plate in ("femoral", "tibial", "patellar"))
        alone = d.get("left_knee_agreement_network_alone")
        lines = ["| structure | volume (mL) | mirrored-copy Dice |"
                 + (" same, network alone (no flip averaging) |" if alone else ""),
                 "|---|---|---|" + ("---|" if alone else "")] + [
            f"| {name} | {d['volumes_ml'][name]:.2f} | {d['left_knee_agreement'][name]:.3f} |"
            + (f" {alone[name]:.3f} |" if alone else "") for name in NAMES.values()]
        sections.append(("The real DESS scan", (
            "The real sagittal DESS scan `knee-dess/dess_echo1.nii.gz` (unlabelled: a "
            "plausibility check, not a score), `dazoo segment --preset knee` on its own grid "
            f"in {d['segment_seconds']} s. Volumes, and the scan mirrored left-right (a left "
            "knee) segmented and mirrored back, Dice against the original's segmentation"
            + ((" (with the preset's flip averaging the two agree almost by construction: "
                "both average the scan with its mirror; the last column is the network "
                "alone on each)") if alone else "") + ":\n\n"
            + "\n".join(lines) + f"\n\nCartilage: {plates} (the mean distance from the "
            "cartilage touching its bone to the articular surface, `evaluate_folder.py`). The "
            f"femur's labels reach {d['femur_to_top_edge_mm']} mm from the field of view's top "
            f"edge, the tibia's {d['tibia_to_bottom_edge_mm']} mm from its bottom edge. Mean "
            f"confidence {d['confidence']:.3f}; warnings: {', '.join(d['warnings']) or 'none'}. "
            "Only echo 1 of the scan is available here: echo consistency is not measured."
            + (f"\n\n![DESS segmentation]({picture})" if picture else "")
            + f"\n\n`{command}`")))
    return sections


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="knee")
    parser.add_argument("--validation", required=True, help="make_validation.py's CSV")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--out", default="work_cache/knee_v2/eval")
    parser.add_argument("--pairs", type=int, default=-1, help="ordered pairs (-1 all, 0 none)")
    parser.add_argument("--every", type=int, default=1, metavar="K",
                        help="every K-th ordered pair only (a pair takes ~1 min on 2 cores; "
                             "for 9 images K=3 keeps 24 of the 72, each image moving 2-3 times "
                             "and fixed 2-3 times)")
    parser.add_argument("--qc", help="also write the DESS QC picture here")
    parser.add_argument("--dess-only", action="store_true",
                        help="only the real DESS scan's checks (part 3; no held-out maps)")
    parser.add_argument("--refine", type=int, default=None, metavar="N",
                        help="the registration's refined stage with N iterations of "
                             "segmenter-guided refinement (default: the preset's own default)")
    parser.add_argument("--refine-lr", type=float, default=0.2,
                        help="its learning rate with --refine (default 0.2, the brain preset's)")
    parser.add_argument("--flip", choices=("on", "off"), default=None,
                        help="left-right test-time augmentation of the held-out maps' "
                             "segmentation (default: the preset's)")
    parser.add_argument("--card", action="store_true",
                        help="write the measured sections into the preset's model card")
    args = parser.parse_args(argv)

    import dazoo
    from dazoo import io
    from dazoo.evaluate import Case, evaluate_segmentation, score_labels
    from dazoo.metrics import dice_per_label
    from dazoo.qc import label_overlay
    from dazoo.training.subjects import load_subjects

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from evaluate_folder import measures as cartilage_measures

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = dazoo.load(args.preset)
    subjects = [s for s in load_subjects(args.validation) if s.labels]
    ids = sorted(NAMES)
    results = {"preset": str(pipeline.preset.path), "validation": args.validation,
               "subjects": [s.name for s in subjects]}
    started = time.perf_counter()

    if args.dess_only:
        subjects, args.pairs = [], 0
    flip = None if args.flip is None else args.flip == "on"
    def short_mm(case, labels):
        """How far short of the truth's reach the femur (top) and tibia (bottom) stop, mm."""
        return {"short_mm": {
            f"{NAMES[i]} {end}": round(bone_reach_mm(labels.array, labels.affine, i, end)
                                       - bone_reach_mm(case.truth, labels.affine, i, end), 1)
            for i, end in ((1, "top"), (3, "bottom"))}}

    per = evaluate_segmentation(pipeline, subjects, flip=flip, log=print,
                                measure=short_mm) if subjects else []
    if per:
        results["short_mm"] = {r["name"]: r["short_mm"] for r in per}
        extended = [r for r in per if r["name"].endswith("_ext")]
        if extended:  # make_validation.py --extend: the extended maps apart from the nine
            results["segmentation_extended"] = {
                "mean": {NAMES[i]: round(float(np.nanmean([r["dice"][i] for r in extended])), 4)
                         for i in ids},
                "short_mm_max": {k: max(r["short_mm"][k] for r in extended)
                                 for k in extended[0]["short_mm"]}}
            per = [r for r in per if not r["name"].endswith("_ext")]
    if per:
        results["segmentation"] = {
            "per_subject": {r["name"]: per_structure(r["dice"]) for r in per},
            "mean": {NAMES[i]: round(float(np.nanmean([r["dice"][i] for r in per])), 4)
                     for i in ids},
            "min": {NAMES[i]: round(float(np.nanmin([r["dice"][i] for r in per])), 4)
                    for i in ids},
            "seconds": round(float(np.mean([r["seconds"] for r in per])), 1),
            "flip": pipeline.default_flip if flip is None else flip}
        results["segmentation"]["targets"] = {
            NAMES[i]: {"target": TARGETS[i], "reached": results["segmentation"]["mean"][
                NAMES[i]] >= TARGETS[i]} for i in ids}

    if args.pairs != 0:
        cases = [Case.of(s).load() for s in subjects]
        pres = [pipeline.preprocess(c.image) for c in cases]
        every = list(itertools.permutations(range(len(cases)), 2))
        pairs = every[:: max(1, args.every)]
        pairs = pairs if args.pairs < 0 else pairs[: args.pairs]
        rows = []
        for i, j in pairs:
            moving, fixed = cases[i], cases[j]
            labels = io.Volume(moving.truth, moving.image.affine, None)
            row = {"moving": moving.name, "fixed": fixed.name,
                   "same_knee": subject_of(moving.name) == subject_of(fixed.name)}
            zero = np.zeros(tuple(pipeline.preprocessor.config.shape) + (3,), np.float32)
            before = pipeline.registration_from(zero, moving.image, pres[i], fixed.image.affine,
                                                pres[j], moving_labels=labels)
            row["before"] = dice_per_label(fixed.truth, before.moved_labels.array, ids)
            for name, refine in (("network", 0), ("refined", args.refine)):
                t = time.perf_counter()
                options = {"guide": "segmenter"}
                if refine:
                    options["learning_rate"] = args.refine_lr
                reg = pipeline.register_preprocessed(
                    moving.image, pres[i], fixed.image.affine, pres[j], moving_labels=labels,
                    refine=refine, refine_options=options)
                row[name] = score_labels(fixed.truth, reg.moved_labels.array, ids)["dice"]
                row[f"{name}_folding"] = reg.folding_fraction
                row[f"{name}_seconds"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            print(f"{moving.name} -> {fixed.name}: mean Dice before "
                  f"{np.nanmean(list(row['before'].values())):.3f}, network "
                  f"{np.nanmean(list(row['network'].values())):.3f}, refined "
                  f"{np.nanmean(list(row['refined'].values())):.3f}", flush=True)
        summary = {}
        for group, keep in (("two subjects", False), ("one knee, two time points", True)):
            chosen = [r for r in rows if r["same_knee"] == keep]
            if not chosen:
                continue
            summary[group] = {"pairs": len(chosen)}
            for stage in ("before", "network", "refined"):
                summary[group][stage] = {
                    NAMES[i]: round(float(np.nanmean([r[stage][i] for r in chosen])), 4)
                    for i in ids}
                summary[group][stage]["mean"] = round(float(np.nanmean(
                    [np.nanmean([r[stage][i] for i in ids]) for r in chosen])), 4)
            summary[group]["folding_max_percent"] = round(100 * max(
                max(r["network_folding"], r["refined_folding"]) for r in chosen), 4)
        results["registration"] = {"refine": args.refine, "of": len(every),
                                   "every": max(1, args.every), "summary": summary, "pairs": [
            {k: (per_structure(v) if isinstance(v, dict) else v) for k, v in r.items()}
            for r in rows]}

    dess = pathlib.Path(args.data) / "knee-dess" / "dess_echo1.nii.gz"
    if dess.is_file():
        seg = pipeline.segment(dess)
        seg.save(out / "dess_labels.nii.gz")
        labels, affine = seg.labels.array, seg.labels.affine
        voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
        cartilage = cartilage_measures(labels, affine)
        image = io.read_image(dess)
        axis = int(np.argmax(np.abs(affine[0, :3])))
        mirrored = io.Volume(np.flip(image.array, axis).copy(), image.affine, None)
        left = np.flip(pipeline.segment(mirrored).labels.array, axis)
        network_alone = None
        if pipeline.default_flip:
            # Flip averaging makes the mirrored copy agree almost by construction (both
            # average the scan with its mirror): the network alone is the test of left knees.
            plain = pipeline.segment(dess, flip=False).labels.array
            plain_left = np.flip(pipeline.segment(mirrored, flip=False).labels.array, axis)
            network_alone = per_structure(dice_per_label(plain, plain_left, ids))
        results["dess"] = {
            "segment_seconds": round(seg.seconds, 1),
            "volumes_ml": {NAMES[i]: round(float((labels == i).sum() * voxel_ml), 2) for i in ids},
            "cartilage": {k: round(v, 3) for k, v in cartilage.items()},
            "femur_to_top_edge_mm": round(bone_reach_mm(labels, affine, 1, "top"), 1),
            "tibia_to_bottom_edge_mm": round(bone_reach_mm(labels, affine, 3, "bottom"), 1),
            "left_knee_agreement": per_structure(dice_per_label(labels, left, ids)),
            **({"left_knee_agreement_network_alone": network_alone} if network_alone else {}),
            "confidence": (seg.measures or {}).get("confidence"),
            "warnings": list(seg.warnings)}
        title = f"{dess.name}: dazoo segment --preset {pipeline.name}"
        label_overlay(dess, seg.labels, out / "dess_segmentation.png", title=title, names=NAMES)
        if args.qc:
            label_overlay(dess, seg.labels, args.qc, title=title, names=NAMES, dpi=80)
        print("DESS:", json.dumps(results["dess"]), flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "evaluation.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.card:
        from dazoo.presets import add_evaluation

        command = "python examples/knee/evaluate_v2.py " + shlex.join(
            sys.argv[1:] if argv is None else argv)
        qc = pathlib.Path(args.qc).resolve() if args.qc else None
        inside = qc is not None and qc.parent == pathlib.Path(pipeline.preset.path).resolve()
        for title, text in card_sections(results, command, qc.name if inside else None):
            add_evaluation(pipeline.preset, title, text)
    print(json.dumps({k: results[k] for k in ("segmentation",) if k in results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
