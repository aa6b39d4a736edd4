"""Measures the input sanity checks (dazoo.checks) of a brain preset on real scans and on damaged
copies of them, and proposes (``--write``: stores) the thresholds in the preset's checks.json.

Real scans (all must pass): the Mindboggle OASIS-TRT-20 images and the freesurfer-cohort
brainmasks. Damaged copies and heads (all but "axes" must be flagged; under the default
--skull-strip auto a head is brain-extracted before these checks, which then see the brain):
  scalp    a synthetic scalp and skull around the brain (a not skull-stripped scan):
           CSF/skull (dark) 0-8 mm outside the brain, scalp and fat (bright, textured)
           8-14 mm, air beyond;
  scalp8   a thinner, dimmer one: skull 0-4 mm, scalp 4-8 mm at 0.6x white matter;
  head     the FreeSurfer cohort's real raw heads (T1.mgz);
  voxel10  the header says 10 mm voxels (a 2.5 m head);
  voxel01  the header says 0.1 mm voxels (a 2.5 cm head);
  axes     the header's first two axes swapped: the anatomy rotated and mirrored (a 12-
           parameter affine cannot undo the reflection: left and right would swap); reported,
           not calibrated on (no threshold separates it, see the output);
  knee     a knee MRI (wrong anatomy).

Usage:
    python benchmarks/sanity_thresholds.py --preset brain --data ../shared/data \
        [--out work_cache/sanity.json] [--write]
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import numpy as np
import scipy.ndimage as ndi


def _damaged(volume, kind, rng):
    from dazoo.io import Volume

    array = np.asarray(volume.array, np.float32)
    affine = volume.affine.copy()
    if kind in ("scalp", "scalp8"):
        # scalp: skull 0-8 mm, scalp 8-14 mm as bright as white matter; scalp8: a thinner,
        # dimmer head (skull 0-4 mm, scalp 4-8 mm at 0.6x).
        inner, outer, level = (8, 14, 0.9) if kind == "scalp" else (4, 8, 0.6)
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        brain = array > 0
        distance = ndi.distance_transform_edt(~brain, sampling=spacing)
        white = float(np.percentile(array[brain], 99))
        out = array.copy()
        skull = (distance > 0) & (distance <= inner)
        scalp = (distance > inner) & (distance <= outer)
        out[skull] = 0.08 * white * (1 + 0.3 * rng.standard_normal(int(skull.sum())))
        texture = ndi.gaussian_filter(rng.standard_normal(array.shape).astype(np.float32), 1.5)
        out[scalp] = white * (level + 0.6 * texture[scalp] / texture.std())
        return Volume(np.clip(out, 0, None), affine, volume.path)
    if kind in ("voxel10", "voxel01"):
        factor = 10.0 if kind == "voxel10" else 0.1
        affine[:3, :3] *= factor / np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        return Volume(array, affine, volume.path)
    if kind == "axes":
        affine[:3, [0, 1]] = affine[:3, [1, 0]]
        return Volume(array, affine, volume.path)
    raise ValueError(kind)


def measure_all(pre, template, data, rows):
    from dazoo import io
    from dazoo.checks import measure_input

    good = sorted(data.glob("mindboggle-oasis-trt20/*/t1weighted_brain.nii.gz")) + sorted(
        data.glob("freesurfer-cohort/*/brainmask.mgz"))
    if not good:
        sys.exit(f"no scans under {data}")
    rng = np.random.default_rng(0)

    def measure(volume, name, kind, align=True):
        # The header-size copies are flagged by their size alone; aligning a 2.5 m head to
        # the template takes SimpleITK minutes, so they skip the alignment measurements.
        started = time.perf_counter()
        alignment = pre.apply(volume).alignment if align else None
        row = {"scan": name, "kind": kind, "alignment": None, "outside": None,
               **measure_input(volume, template, alignment),
               "seconds": time.perf_counter() - started}
        rows.append(row)
        shown = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{kind:8s} {name:32s} extent {np.round(row['extent_mm']).astype(int)} "
              f"align {shown(row['alignment'])} outside {shown(row['outside'])}", flush=True)

    for path in good:
        name = path.parent.name
        volume = io.read_image(path)
        measure(volume, name, "real")
        for kind in ("scalp", "scalp8", "voxel10", "voxel01", "axes"):
            measure(_damaged(volume, kind, rng), name, kind,
                    align=kind in ("scalp", "scalp8", "axes"))
    for path in sorted(data.glob("freesurfer-cohort/*/T1.mgz")):  # real heads
        measure(io.read_image(path), path.parent.name, "head")
    knee = data / "knee-dess" / "dess_echo1.nii.gz"
    if knee.exists():
        measure(io.read_image(knee), knee.name, "knee")



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="brain")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--out", default="work_cache/sanity.json")
    parser.add_argument("--write", action="store_true",
                        help="write the proposed thresholds into the preset's checks.json")
    parser.add_argument("--from-json", metavar="JSON",
                        help="propose thresholds from the rows of an earlier --out (no measuring)")
    args = parser.parse_args(argv)

    from dazoo.checks import InputChecks, check_input
    from dazoo.presets import get_preset
    from dazoo.preprocess import Preprocessor

    preset = get_preset(args.preset)
    pre = Preprocessor.from_json(preset.file("preprocess.json"))
    template = pre.template
    data = pathlib.Path(args.data)
    rows = []
    if args.from_json:
        rows = json.loads(pathlib.Path(args.from_json).read_text())["rows"]
    else:
        measure_all(pre, template, data, rows)

    real = [r for r in rows if r["kind"] == "real"]
    reference = np.median([r["extent_mm"] for r in real], axis=0)
    ratios = np.array([np.asarray(r["extent_mm"]) / reference for r in real])
    low, high = ratios.min(), ratios.max()
    # Thresholds: a margin beyond the real scans' extremes (none of the damaged cases is
    # near them: printed below), geometric for the size ratio.
    extent_ratio = (float(np.round(low * 0.8, 2)), float(np.round(high * 1.25, 2)))
    # Alignment and outside thresholds: midway between the real scans' worst value and the
    # damaged copies' best (the cases each check is for), when they separate.
    # The knee is the failed-alignment case; the mirrored headers ("axes") are reported, not
    # calibrated on: a brain is nearly symmetric, and some mirrored copies align as well as
    # real scans (measured), so no correlation threshold separates them.
    worst_alignment = min(r["alignment"] for r in real)
    failed = [r["alignment"] for r in rows if r["kind"] == "knee"]
    best_failed = max(failed) if failed else worst_alignment - 0.3
    worst_outside = max(r["outside"] for r in real)
    scalp_outside = min(r["outside"] for r in rows if r["kind"] == "scalp")
    min_alignment = float(np.round((worst_alignment + best_failed) / 2, 3))
    # Some scalp copies are shrunk into the brain template by the alignment (outside ~0, but
    # their correlation drops): the outside threshold sits between the real scans' worst and
    # the typical scalp copy (geometric mean), not below the smallest.
    typical_scalp = float(np.median([r["outside"] for r in rows if r["kind"] == "scalp"]))
    max_outside = float(np.round(np.sqrt(max(worst_outside, 1e-3) * typical_scalp), 3))
    # The alignment's scale: a margin of 5 % beyond the real scans' extremes; reported
    # against the heads and scalp copies it is meant to catch.
    scales = [r["scale"] for r in real if r.get("scale") is not None]
    scale_range = (float(np.round(min(scales) / 1.05, 3)), float(np.round(max(scales) * 1.05, 3)))
    for kind in ("scalp", "scalp8", "head"):
        values = [r["scale"] for r in rows if r["kind"] == kind and r.get("scale") is not None]
        if values:
            print(f"scale: {kind} {min(values):.3f}..{max(values):.3f} (real "
                  f"{min(scales):.3f}..{max(scales):.3f}, accepted {scale_range})")
    print(f"alignment: real >= {worst_alignment:.3f}, knee <= {best_failed:.3f}"
          + ("" if best_failed < worst_alignment else "  (NOT separable)"))
    checks = InputChecks(extent_mm=tuple(float(v) for v in np.round(reference, 1)),
                         extent_ratio=extent_ratio, min_alignment=min_alignment,
                         max_outside=max_outside, scale_range=scale_range,
                         needs="a skull-stripped T1 brain")
    summary = {}
    for row in rows:
        row["flags"] = check_input(row, checks)
        entry = summary.setdefault(row["kind"], {"scans": 0, "flagged": 0})
        entry["scans"] += 1
        entry["flagged"] += bool(row["flags"])
    print(f"\nreal scans: size ratio {low:.2f}..{high:.2f}, alignment >= {worst_alignment:.3f}, "
          f"outside <= {worst_outside:.3f}; scalp outside >= {scalp_outside:.3f} "
          f"(median {typical_scalp:.3f})")
    for kind in ("alignment", "outside"):
        values = {k: [r[kind] for r in rows if r["kind"] == k and r[kind] is not None]
                  for k in summary}
        print(kind, {k: f"{min(v):.3f}..{max(v):.3f}" for k, v in values.items() if v})
    print("thresholds:", json_checks := {
        "extent_mm": list(checks.extent_mm), "extent_ratio": list(extent_ratio),
        "min_alignment": min_alignment, "max_outside": max_outside,
        "outside_margin_mm": checks.outside_margin_mm, "scale_range": list(scale_range),
        "needs": checks.needs})
    for kind, entry in summary.items():
        print(f"{kind:8s} {entry['flagged']}/{entry['scans']} flagged")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "summary": summary, "checks": json_checks},
                              indent=1))
    separable = best_failed < min_alignment < worst_alignment
    if args.write and (summary["real"]["flagged"] or not separable):
        sys.exit("not written: real scans would be flagged or the knee is not separable")
    if args.write:
        json_checks["measured"] = (
            f"{datetime.date.today()}: python benchmarks/sanity_thresholds.py --preset "
            f"{args.preset} --data ../shared/data --write; "
            f"{summary['real']['scans'] - summary['real']['flagged']}/{len(real)} real scans "
            "pass (12 of the 15 Mindboggle scans trained the preset; the 5 FreeSurfer "
            "brainmasks are from another site), "
            + ", ".join(f"{k} {e['flagged']}/{e['scans']} flagged"
                        for k, e in summary.items() if k != "real"))
        target = preset.file("checks.json")
        target.write_text(json.dumps(json_checks, indent=1) + "\n")
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
