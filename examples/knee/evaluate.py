"""Evaluates a knee preset the honest way available here (no labelled multi-subject knee MRI):

1. synthetic held-out: images synthesised (dazoo.training.LabelSynth, the recipe's options)
   from each training label map with seeds training never drew: Dice per tissue;
2. the CLAIR-Knee-103R template image (real intensities) under held-out random deformations
   and intensity changes (gamma, bias, noise): Dice per tissue;
3. the real, unlabelled DESS scan: `segment` on its own grid (tissue volumes in mL, a QC
   picture); the same scan mirrored left-right (a left knee: flip augmentation is what lets
   the preset take both sides), whose segmentation mirrored back should agree with the
   right knee's (Dice per tissue); `register` scan -> template and template -> scan (local
   NCC on the model grid after the preset's pre-alignment and after the deformable step,
   folding).

Numbers 1-2 measure robustness to shape / contrast / pose changes around two anatomies, not
accuracy on real patients; 3 is a plausibility check. The model card says so.

Usage:
    python examples/knee/evaluate.py --preset knee --data ../shared/data --out work_cache/knee-eval
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np
import scipy.ndimage as ndi

CLASSES = ("femur", "femoral cartilage", "tibia", "medial tibial cartilage",
           "lateral tibial cartilage")


def _dice(truth, prediction, ids):
    scores = {}
    for i in ids:
        t, p = truth == i, prediction == i
        total = t.sum() + p.sum()
        scores[int(i)] = float(2 * np.logical_and(t, p).sum() / total) if total else float("nan")
    return scores


def _local_ncc(a, b, window=9):
    """Mean local normalised cross-correlation (VoxelMorph's NCC window) of two volumes."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mean = lambda x: ndi.uniform_filter(x, window)  # noqa: E731
    ma, mb = mean(a), mean(b)
    cross = mean(a * b) - ma * mb
    va, vb = mean(a * a) - ma ** 2, mean(b * b) - mb ** 2
    return float(np.mean(cross ** 2 / (va * vb + 1e-5)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="knee", help="preset name or folder (default knee)")
    parser.add_argument("--data", default="../shared/data", help="the shared data folder")
    parser.add_argument("--samples", type=int, default=8, help="held-out samples per source")
    parser.add_argument("--seed", type=int, default=10_000,
                        help="first held-out seed (training draws from other streams)")
    parser.add_argument("--out", default="work_cache/knee-eval", help="output folder")
    parser.add_argument("--qc", help="also write the DESS QC picture here (e.g. into the preset)")
    parser.add_argument("--card", action="store_true",
                        help="write the results into the preset's model card (a preset folder)")
    args = parser.parse_args(argv)

    import dazoo
    from dazoo import io
    from dazoo.qc import label_overlay
    from dazoo.training import LabelSynth
    from dazoo.training.augment import Augmentation
    from dazoo.training.subjects import relabelled

    data = pathlib.Path(args.data)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = dazoo.load(args.preset)
    pre = pipeline.preprocessor
    shape = tuple(pre.config.shape)
    recipe = json.loads(pipeline.preset.file("recipe.json").read_text())
    options = dict(recipe["synth"])
    options.pop("probability", None)
    for key in ("mean", "std"):
        if key in options:
            options[key] = tuple(options[key])
    synth = LabelSynth(**options)
    ids = [int(c["id"]) for c in sorted(pipeline.model.label_table, key=lambda c: c["class"])]
    foreground = [i for i in ids if i]

    def segment_grid(image):
        probabilities = pipeline.model.segmentation_net.predict_on_batch(image[None, ..., None])
        return np.asarray(pipeline.class_ids)[np.argmax(np.asarray(probabilities)[0], -1)]

    def to_classes(raw):  # raw ids -> the preset's ids (others: background)
        return np.where(np.isin(raw, foreground), raw, 0)

    # The training label maps on the model grid, as training saw them.
    clair = data / "clair-knee-103r"
    template_labels = io.read_labels(clair / "CLAIR-Knee-103R_segmentation_64x128x128.nii.gz")
    template_image = io.read_image(clair / "CLAIR-Knee-103R_template_64x128x128.nii.gz")
    template_pre = pre.apply(template_image)
    maps = {"CLAIR-Knee-103R mask": pre.apply_labels(template_labels, template_pre)}
    for entry in recipe["data"].get("label_maps") or []:
        path = entry["path"] if isinstance(entry, dict) else entry
        if not os.path.isfile(path):  # the recipe's absolute path is from another machine
            path = str(data / "knee-labels" / pathlib.Path(path).name)
        raw = pre.apply_label_map(path)
        if isinstance(entry, dict):
            raw = relabelled(raw, {int(k): int(v) for k, v in (entry.get("relabel") or {}).items()})
        maps[pathlib.Path(path).name.split(".")[0]] = raw

    results = {"preset": str(pipeline.preset.path), "samples": args.samples,
               "seeds": [args.seed, args.seed + args.samples - 1], "synthetic": {},
               "template_real_intensities": {}}
    started = time.perf_counter()
    for name, raw in maps.items():
        scores = []
        for n in range(args.samples):
            sample = synth.draw(raw.astype(np.int32), np.random.default_rng(args.seed + n))
            scores.append(_dice(to_classes(sample.labels), segment_grid(sample.image), foreground))
        results["synthetic"][name] = {CLASSES[i - 1]: float(np.nanmean([s[i] for s in scores]))
                                      for i in foreground}
        print(f"synthetic held-out from {name}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in results["synthetic"][name].items()),
              flush=True)

    # The template image itself (real intensities), deformed and re-contrasted.
    deform = LabelSynth(rotation=synth.rotation, scale=synth.scale, shear=synth.shear,
                        translation=synth.translation, nonlinear=synth.nonlinear,
                        nonlinear_spacing=synth.nonlinear_spacing)
    change = Augmentation(gamma=0.3, noise=0.03)
    scores = []
    labels_grid = to_classes(maps["CLAIR-Knee-103R mask"])
    for n in range(args.samples):
        rng = np.random.default_rng(args.seed + 1000 + n)
        coords = deform.coordinates(shape, rng)
        image = ndi.map_coordinates(template_pre.array, coords, order=1, mode="nearest")
        labels = ndi.map_coordinates(labels_grid, coords, order=0, mode="constant")
        bias = np.exp(ndi.zoom(rng.normal(0, 0.2, (4, 5, 5)), np.array(shape) / (4, 5, 5),
                               order=3)[: shape[0], : shape[1], : shape[2]])
        image, _ = change(np.clip(image * bias, 0, None).astype(np.float32), None, rng)
        image = np.clip(image / max(np.percentile(image, 99.5), 1e-6), 0, 1).astype(np.float32)
        scores.append(_dice(labels, segment_grid(image), foreground))
    results["template_real_intensities"] = {CLASSES[i - 1]: float(np.nanmean([s[i] for s in scores]))
                                            for i in foreground}
    print("CLAIR template, held-out deformations + intensity changes: "
          + ", ".join(f"{k} {v:.3f}" for k, v in results["template_real_intensities"].items()),
          flush=True)

    # The real DESS scan.
    dess = data / "knee-dess" / "dess_echo1.nii.gz"
    if dess.is_file():
        seg = pipeline.segment(dess)
        seg.save(out / "dess_labels.nii.gz")
        voxel_ml = abs(np.linalg.det(seg.labels.affine[:3, :3])) / 1000.0
        results["dess"] = {
            "segment_seconds": round(seg.seconds, 1),
            "volumes_ml": {CLASSES[i - 1]: round(float((seg.labels.array == i).sum() * voxel_ml), 2)
                           for i in foreground}}
        names = {i: CLASSES[i - 1] for i in foreground}
        label_overlay(dess, seg.labels, out / "dess_segmentation.png",
                      title=f"{dess.name}: dazoo segment --preset {pipeline.name}", names=names)
        if args.qc:
            label_overlay(dess, seg.labels, args.qc,
                          title=f"{dess.name}: dazoo segment --preset {pipeline.name}",
                          names=names, dpi=80)
        moving_volume = io.read_image(dess)
        # A left knee: the same scan mirrored along its left-right axis (same affine).
        axis = int(np.argmax(np.abs(moving_volume.affine[0, :3])))
        mirrored = io.Volume(np.flip(moving_volume.array, axis).copy(), moving_volume.affine,
                             None)
        left = np.flip(pipeline.segment(mirrored).labels.array, axis)
        results["dess"]["left_knee_agreement"] = {
            CLASSES[i - 1]: round(v, 3)
            for i, v in _dice(seg.labels.array, left, foreground).items()}
        moving_pre = pre.apply(moving_volume)
        for direction, (a_pre, b_pre) in {"scan -> template": (moving_pre, template_pre),
                                          "template -> scan": (template_pre, moving_pre)}.items():
            predicted = pipeline.model.registration_net.predict_on_batch(
                [a_pre.array[None, ..., None], b_pre.array[None, ..., None]])
            moved = np.asarray(predicted["moved"])[0, ..., 0]
            from dazoo.metrics import folding_fraction

            u = np.asarray(predicted["displacement"])[0]
            results["dess"][direction] = {
                "ncc_before": round(_local_ncc(a_pre.array, b_pre.array), 4),
                "ncc_deformable": round(_local_ncc(moved, b_pre.array), 4),
                "folding_percent": round(100 * folding_fraction(u), 4)}
        print("DESS:", json.dumps(results["dess"]), flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    if args.card:
        from dazoo.presets import add_evaluation

        command = "python examples/knee/evaluate.py " + " ".join(argv or sys.argv[1:])
        header = "| source | " + " | ".join(CLASSES) + " |\n|---|" + "---|" * len(CLASSES)
        rows = [f"| synthesised from {name} | " + " | ".join(f"{v[c]:.3f}" for c in CLASSES)
                + " |" for name, v in results["synthetic"].items()]
        real = results["template_real_intensities"]
        rows.append("| CLAIR template image, deformed + re-contrasted | "
                    + " | ".join(f"{real[c]:.3f}" for c in CLASSES) + " |")
        text = (f"Dice per tissue on the model grid, mean of {args.samples} held-out samples per "
                f"source (seeds {args.seed}..; training never drew them). These images come from "
                "the same two anatomies the model was trained on: they measure robustness to "
                "pose, shape, contrast, resolution and noise changes, not accuracy on new "
                f"patients.\n\n{header}\n" + "\n".join(rows) + f"\n\n`{command}`")
        add_evaluation(pipeline.preset, "Held-out synthetic and template images", text)
        if "dess" in results:
            d = results["dess"]
            lines = ["| tissue | volume (mL) |", "|---|---|"] + [
                f"| {k} | {v:.2f} |" for k, v in d["volumes_ml"].items()]
            reg = ["| direction | local NCC, pre-alignment only | local NCC, deformable | "
                   "folding % |", "|---|---|---|---|"] + [
                f"| {k} | {d[k]['ncc_before']:.4f} | {d[k]['ncc_deformable']:.4f} | "
                f"{d[k]['folding_percent']:.4f} |" for k in ("scan -> template", "template -> scan")]
            text = ("The real sagittal DESS scan `knee-dess/dess_echo1.nii.gz` (unlabelled: a "
                    "plausibility check, not a score). `dazoo segment --preset knee` on its own "
                    f"grid in {d['segment_seconds']} s; tissue volumes:\n\n" + "\n".join(lines)
                    + "\n\nThe scan mirrored left-right (a left knee), segmented, mirrored back: "
                    "Dice against the right knee's segmentation: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in d["left_knee_agreement"].items())
                    + "\n\nRegistration on the model grid (local NCC, window 9):\n\n"
                    + "\n".join(reg) + "\n\n![DESS segmentation](qc_dess_segmentation.png)"
                    + f"\n\n`{command}`")
            add_evaluation(pipeline.preset, "The real DESS scan", text)
    (out / "evaluation.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
