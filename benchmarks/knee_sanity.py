"""Measures the input checks of a knee preset (dazoo.checks) on knees and on what is not a
knee, and proposes (``--write``: stores) the thresholds in the preset's checks.json.

A knee preset has no template (its images are centred by their field of view), so the
brain preset's alignment and outside checks do not apply. What is measured instead:
  size        the foreground's physical extent (R x A x S mm), as for the brain;
  volumes     the volume (mL, on the input's grid) of each structure the network labels;
  confidence  the segmenter's mean highest class probability over the voxels it labels.

Knees (all must pass):
  - the real DESS scan (``knee-dess/dess_echo1.nii.gz``) and a left-right mirrored copy of it
    (a left knee);
  - the images synthesised from held-out OAI label maps (``--knees CSV``, e.g. what
    ``examples/knee/make_validation.py`` writes; optional);
  - the reference volumes: the manual OAI label maps that trained the preset (``--maps``,
    ground-truth volumes, no network): the volume bounds are a margin around these.
Not knees (each must be flagged): the Mindboggle OASIS-TRT-20 brains, the FreeSurfer cohort's
brainmasks and its raw heads (``T1.mgz``), and the DESS scan with 10 mm / 0.1 mm voxels in
its header (size alone).

Usage:
    python benchmarks/knee_sanity.py --preset knee --data ../shared/data \\
        [--knees work_cache/knee_v2/validation/validation.csv] \\
        [--maps examples/knee/run_v2/recipe.json] [--out work_cache/knee_sanity.json] [--write]
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import numpy as np


def _map_volumes(paths_relabel, ids):
    """Ground-truth volume (mL) of each id in each label map."""
    from dazoo import io
    from dazoo.training.subjects import relabelled

    rows = []
    for path, relabel in paths_relabel:
        volume = io.read_labels(path)
        array = relabelled(np.asarray(volume.array), relabel)
        ml = abs(np.linalg.det(volume.affine[:3, :3])) / 1000.0
        counts = np.bincount(array.ravel().astype(np.int64), minlength=max(ids) + 1)
        rows.append({int(i): float(counts[i] * ml) for i in ids})
    return rows


def _maps_of(recipe_path):
    """(path, relabel) of the label maps a run's recipe trained on."""
    recipe = json.loads(pathlib.Path(recipe_path).read_text())
    out = []
    for entry in recipe["data"]["label_maps"]:
        if isinstance(entry, dict):
            out.append((entry["path"], {int(k): int(v) for k, v in
                                        (entry.get("relabel") or {}).items()}))
        else:
            out.append((entry, {}))
    return out


def measure_all(pipeline, data, knees_csv, rows):
    from dazoo import io
    from dazoo.checks import measure_input
    from dazoo.io import Volume

    def measure(volume, name, kind, network=True):
        started = time.perf_counter()
        row = {"scan": name, "kind": kind, **measure_input(volume, None, None)}
        if network:
            row.update(pipeline.segment(volume).measures)
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        volumes = " ".join(f"{v:.0f}" for v in row.get("volumes_ml", {}).values())
        confidence = row.get("confidence")
        print(f"{kind:8s} {name:34s} extent {np.round(row['extent_mm']).astype(int)} "
              f"mL [{volumes}] confidence "
              + ("-" if confidence is None else f"{confidence:.3f}"), flush=True)

    dess = data / "knee-dess" / "dess_echo1.nii.gz"
    if dess.exists():
        volume = io.read_image(dess)
        measure(volume, "dess_echo1", "knee")
        axis = int(np.argmax(np.abs(volume.affine[0, :3])))  # the array axis along R
        measure(Volume(np.ascontiguousarray(np.flip(volume.array, axis)), volume.affine,
                       None), "dess_echo1 mirrored", "knee")
        for kind, factor in (("voxel10", 10.0), ("voxel01", 0.1)):
            affine = volume.affine.copy()
            affine[:3, :3] *= factor / np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
            measure(Volume(volume.array, affine, None), "dess_echo1", kind, network=False)
    if knees_csv:
        import csv

        for row in csv.DictReader(open(knees_csv)):
            measure(io.read_image(row["image"]), row["name"], "synthetic")
    brains = sorted(data.glob("mindboggle-oasis-trt20/*/t1weighted_brain.nii.gz")) + sorted(
        data.glob("freesurfer-cohort/*/brainmask.mgz"))
    for path in brains:
        measure(io.read_image(path), path.parent.name, "brain")
    for path in sorted(data.glob("freesurfer-cohort/*/T1.mgz")):
        measure(io.read_image(path), path.parent.name, "head")


def propose(rows, map_rows, ids, names):
    """Thresholds: the size window as for the brain (a margin around the knees' extremes);
    the volume bounds a margin around the manual maps' volumes (a smaller field of view cuts
    the bones: the lower bound is generous); the confidence midway between the knees'
    worst and the other anatomies' best."""
    knees = [r for r in rows if r["kind"] in ("knee", "synthetic")]
    reference = np.median([r["extent_mm"] for r in knees], axis=0)
    ratios = np.array([np.asarray(r["extent_mm"]) / reference for r in knees])
    extent_ratio = (float(np.round(ratios.min() * 0.8, 2)), float(np.round(ratios.max() * 1.25, 2)))
    volumes = {}
    for i in ids:
        values = [m[i] for m in map_rows] + [r["volumes_ml"][str(i)] for r in knees]
        volumes[str(i)] = [float(np.round(0.25 * min(values), 1)),
                           float(np.round(2.0 * max(values), 1))]
    worst = min(r["confidence"] for r in knees)
    others = [r["confidence"] for r in rows if r["kind"] in ("brain", "head")]
    best_other = max(others) if others else worst - 0.2
    min_confidence = float(np.round((worst + best_other) / 2, 3)) if best_other < worst else None
    return {"extent_mm": [float(v) for v in np.round(reference, 1)],
            "extent_ratio": list(extent_ratio), "volumes_ml": volumes,
            "min_confidence": min_confidence,
            "needs": "a knee MRI (sagittal, the whole joint in view)"}, worst, best_other


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="knee")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--knees", help="CSV (name,image[,labels]) of synthesised knees")
    parser.add_argument("--maps", help="a run's recipe.json: its label maps give the volumes")
    parser.add_argument("--out", default="work_cache/knee_sanity.json")
    parser.add_argument("--write", action="store_true",
                        help="write the proposed thresholds into the preset's checks.json")
    parser.add_argument("--from-json", metavar="JSON",
                        help="propose thresholds from the rows of an earlier --out (no measuring)")
    args = parser.parse_args(argv)

    from dazoo.checks import InputChecks, check_input, check_output
    from dazoo.hub import load

    pipeline = load(args.preset)
    pipeline.checks = None  # measure without the current thresholds
    ids = [int(i) for i in pipeline.class_ids if i != 0]
    names = pipeline.label_names
    rows = []
    if args.from_json:
        rows = json.loads(pathlib.Path(args.from_json).read_text())["rows"]
    else:
        measure_all(pipeline, pathlib.Path(args.data), args.knees, rows)
    map_rows = _map_volumes(_maps_of(args.maps), ids) if args.maps else []
    thresholds, worst, best_other = propose(rows, map_rows, ids, names)
    checks = InputChecks.from_dict(thresholds)
    summary = {}
    for row in rows:
        row["flags"] = check_input(row, checks) + (check_output(row, checks, names)
                                                   if "volumes_ml" in row else [])
        entry = summary.setdefault(row["kind"], {"scans": 0, "flagged": 0})
        entry["scans"] += 1
        entry["flagged"] += bool(row["flags"])
    print(f"\nconfidence: knees >= {worst:.3f}, other anatomy <= {best_other:.3f}"
          + ("" if best_other < worst else "  (NOT separable)"))
    if map_rows:
        for i in ids:
            values = [m[i] for m in map_rows]
            print(f"  {names.get(i, i)}: manual maps {min(values):.1f}..{max(values):.1f} mL")
    print("thresholds:", json.dumps(thresholds))
    for kind, entry in summary.items():
        print(f"{kind:9s} {entry['flagged']}/{entry['scans']} flagged")
    for row in rows:
        if row["flags"]:
            print(f"  {row['kind']} {row['scan']}: {row['flags'][0]}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "summary": summary, "checks": thresholds,
                               "maps": map_rows}, indent=1, default=str))
    knees_flagged = sum(summary.get(k, {}).get("flagged", 0) for k in ("knee", "synthetic"))
    others_missed = sum(e["scans"] - e["flagged"] for k, e in summary.items()
                        if k not in ("knee", "synthetic"))
    if args.write and (knees_flagged or others_missed):
        sys.exit("not written: a knee would be flagged or something else would pass")
    if args.write:
        from dazoo.presets import get_preset

        counts = ", ".join(f"{k} {e['flagged']}/{e['scans']} flagged"
                           for k, e in summary.items())
        thresholds["measured"] = (
            f"{datetime.date.today()}: python benchmarks/knee_sanity.py --preset {args.preset} "
            f"--out {args.out} "
            f"--data ../shared/data" + (f" --knees {args.knees}" if args.knees else "")
            + (f" --maps {args.maps}" if args.maps else "") + f" --write; {counts}"
            + f"; mean confidence: knees >= {worst:.3f}, other anatomy <= {best_other:.3f}"
            + (f"; volume bounds from {len(map_rows)} label maps (the recipe's)" if map_rows else
               "; volume bounds from the knees' own segmentations"))
        path = get_preset(args.preset).file("checks.json")
        path.write_text(json.dumps(thresholds, indent=1) + "\n")
        print(f"written: {path}")


if __name__ == "__main__":
    main()
