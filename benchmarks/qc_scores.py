"""How well the per-scan QC scores (``dazoo segment --qc-scores``, ``Segmentation.measures``)
predict a poor segmentation, measured on the labelled brain scans at hand.

Scans (reference labels: DKT31 cortical regions):
  in-domain   the 15 Mindboggle OASIS-TRT-20 scans (manual labels; 12 of them trained the
              preset, the other 3 are its validation subjects: marked);
  other site  the FreeSurfer cohort's 4 labelled brainmasks (FreeSurfer's automatic labels);
  heads       the cohort's 3 labelled raw heads (T1.mgz) segmented WITHOUT brain extraction
              (--skull-strip off): the preset's known failure, Dice 0.2-0.3, the bad
              results the scores must expose.
For each scan: mean Dice over the 62 regions against the reference, and the scores; then the
Spearman rank correlation of each score with the Dice over scans, and of the per-region
confidence with the per-region Dice over all (scan, region) pairs.

Usage:
    python benchmarks/qc_scores.py --preset brain --data ../shared/data [--out work_cache/qc_scores.json]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np


def _spearman(x, y) -> float:
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    return float(spearmanr(x[keep], y[keep]).statistic) if keep.sum() > 2 else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="brain")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--out", default="work_cache/qc_scores.json")
    args = parser.parse_args(argv)

    from dazoo import io
    from dazoo.hub import load
    from dazoo.metrics import dice_per_label

    pipeline = load(args.preset)
    ids = [int(i) for i in pipeline.class_ids if i != 0]
    validation = set(pipeline.preset.metadata.get("data", {}).get("validation", []))
    data = pathlib.Path(args.data)
    cases = []
    for folder in sorted(data.glob("mindboggle-oasis-trt20/OASIS-TRT-20-*")):
        kind = "validation" if folder.name in validation else "trained on"
        cases.append((folder.name, kind, folder / "t1weighted_brain.nii.gz",
                      folder / "labels.DKT31.manual.nii.gz"))
    for folder in sorted(data.glob("freesurfer-cohort/sub-*")):
        labels = folder / "aparc.DKTatlas+aseg.mgz"
        if labels.exists():
            cases.append((folder.name, "other site", folder / "brainmask.mgz", labels))
            if (folder / "T1.mgz").exists():
                cases.append((folder.name, "head", folder / "T1.mgz", labels))
    rows = []
    for name, kind, image, labels in cases:
        started = time.perf_counter()
        result = pipeline.segment(str(image), skull_strip="off")
        got = np.asarray(result.labels.array)
        want = np.asarray(io.read_labels(str(labels)).array)
        present = set(np.unique(want).tolist())
        dice = {str(i): v for i, v in dice_per_label(
            want, got, [i for i in ids if i in present]).items()}
        m = result.measures
        row = {"scan": name, "kind": kind, "dice": float(np.mean(list(dice.values()))),
               "region_dice": dice, "confidence": m["confidence"],
               "flip_agreement": m.get("flip_agreement"), "alignment": m.get("alignment"),
               "outside": m.get("outside"), "region_confidence": m["region_confidence"],
               "warnings": len(result.warnings), "seconds": time.perf_counter() - started}
        rows.append(row)
        print(f"{kind:10s} {name:16s} Dice {row['dice']:.3f} confidence {row['confidence']:.3f}"
              f" flip {row['flip_agreement'] if row['flip_agreement'] is None else round(row['flip_agreement'], 3)}"
              f" alignment {row['alignment'] if row['alignment'] is None else round(row['alignment'], 3)}"
              f" warnings {row['warnings']}", flush=True)
    dice = [r["dice"] for r in rows]
    summary = {score: _spearman([r[score] if r[score] is not None else np.nan for r in rows],
                                dice)
               for score in ("confidence", "flip_agreement", "alignment")}
    summary["outside (negated)"] = _spearman(
        [-r["outside"] if r["outside"] is not None else np.nan for r in rows], dice)
    pairs = [(r["region_confidence"].get(k, np.nan), v) for r in rows
             for k, v in r["region_dice"].items()]
    summary["region confidence vs region Dice"] = _spearman(*zip(*pairs))
    not_heads = [r for r in rows if r["kind"] != "head"]
    summary["confidence, heads left out"] = _spearman([r["confidence"] for r in not_heads],
                                                      [r["dice"] for r in not_heads])
    print("\nSpearman rank correlation with Dice:")
    for key, value in summary.items():
        print(f"  {key}: {value:.2f}")
    for kind in ("validation", "trained on", "other site", "head"):
        chosen = [r for r in rows if r["kind"] == kind]
        if chosen:
            print(f"  {kind}: Dice {min(r['dice'] for r in chosen):.3f}.."
                  f"{max(r['dice'] for r in chosen):.3f}, confidence "
                  f"{min(r['confidence'] for r in chosen):.3f}.."
                  f"{max(r['confidence'] for r in chosen):.3f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "spearman": summary}, indent=1))


if __name__ == "__main__":
    main()
