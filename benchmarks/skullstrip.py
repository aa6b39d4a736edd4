"""Brain extraction measured: dazoo's converted deepbet (Keras) against deepbet itself
(torch, the original, when ``--deepbet-wheel`` is given) and against FreeSurfer's brain masks,
on the FreeSurfer cohort's raw heads (``T1.mgz``; reference ``brainmask.mgz > 0``) and on
skull-stripped scans (which ``--skull-strip auto`` must leave alone).

Per scan: mask Dice with FreeSurfer's mask, Dice with deepbet's own mask (parity), the
``auto`` decision's measure (share of bright voxels outside the brain), seconds.

With ``--segment``, the brain preset end to end instead (its default ``--skull-strip
auto``): DKT Dice against FreeSurfer's labels of each labelled raw head and of the same
subject's brainmask, the time of each; a skull-stripped scan segmented with ``auto`` and with
``off`` (must be identical); the three Mindboggle validation scans with synthetic scalp
and skull shells of two thicknesses and intensities (stripped back, or flagged); the knee
DESS scan under ``strict`` (must be refused).

Usage:
    python benchmarks/skullstrip.py --data ../shared/data \\
        [--deepbet-wheel work_cache/deepbet/deepbet-1.0.2-py3-none-any.whl] [--out work_cache/skullstrip.json]
    python benchmarks/skullstrip.py --data ../shared/data --segment [--preset brain] [--out work_cache/skullstrip_segment.json]
    python benchmarks/skullstrip.py --data ../shared/data --dilation-loo [--out work_cache/skullstrip_loo.json]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
import zipfile

import numpy as np


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _deepbet(wheel):
    """deepbet's own BrainExtraction from its wheel (needs torch, cc3d, fill_voids)."""
    folder = tempfile.mkdtemp()
    zipfile.ZipFile(wheel).extractall(folder)
    sys.path.insert(0, folder)
    from deepbet.bet import BrainExtraction  # noqa: E402

    return BrainExtraction(no_gpu=True)


def _dkt_dice(labels, reference, ids) -> float:
    """Mean Dice over the ids the reference holds."""
    from dazoo.metrics import dice_per_label

    present = set(np.unique(reference).tolist())
    return float(np.mean(list(dice_per_label(reference, labels,
                                             [i for i in ids if i in present]).values())))


def _shell(volume, thickness, intensity, rng):
    """A skull-stripped brain with a synthetic head around it: dark CSF/skull for the first
    half of ``thickness`` mm, then a bright textured scalp (``intensity`` x the brain's
    99th percentile), air beyond."""
    import scipy.ndimage as ndi

    from dazoo.io import Volume

    array = np.asarray(volume.array, np.float32)
    spacing = np.sqrt((volume.affine[:3, :3] ** 2).sum(axis=0))
    brain = array > 0
    distance = ndi.distance_transform_edt(~brain, sampling=spacing)
    white = float(np.percentile(array[brain], 99))
    out = array.copy()
    skull = (distance > 0) & (distance <= thickness / 2)
    scalp = (distance > thickness / 2) & (distance <= thickness)
    out[skull] = 0.08 * white * (1 + 0.3 * rng.standard_normal(int(skull.sum())))
    texture = ndi.gaussian_filter(rng.standard_normal(array.shape).astype(np.float32), 1.5)
    out[scalp] = intensity * white * (1 + 0.4 * texture[scalp] / texture.std())
    return Volume(np.clip(out, 0, None), volume.affine, None)


def segment_benchmark(data, out, preset="brain"):
    import dazoo
    from dazoo import io
    from dazoo.errors import DazooInputError

    brain = dazoo.load(preset)
    ids = [int(i) for i in brain.class_ids if i != 0]
    # DKT Dice: a whole-brain table is scored over its cortex, the 62 DKT regions (the
    # validation subjects' manual labels have nothing else; comparable with version 2)
    cortex = [i for i in ids if (brain.label_groups or {}).get(i) == "cortex"]
    ids = cortex or ids
    rows = {"heads": [], "shells": [], "identical": [], "knee": None}
    brain.segment(str(next(data.glob("freesurfer-cohort/*/brainmask.mgz"))))  # warm-up
    for folder in sorted(data.glob("freesurfer-cohort/sub-*")):
        labels = folder / "aparc.DKTatlas+aseg.mgz"
        if not ((folder / "T1.mgz").exists() and labels.exists()):
            continue
        reference = io.read_labels(str(labels)).array
        row = {"scan": folder.name}
        for kind in ("brainmask", "T1"):
            result = brain.segment(str(folder / f"{kind}.mgz"))
            row[kind] = {"dice": _dkt_dice(result.labels.array, reference, ids),
                         "seconds": result.seconds, "notes": result.notes,
                         "warnings": result.warnings}
            if result.brain_mask is not None:
                truth = np.asarray(io.read_image(str(folder / "brainmask.mgz")).array) > 0
                row[kind]["mask_dice"] = _dice(result.brain_mask.array, truth)
        rows["heads"].append(row)
        print(f"head {folder.name}: DKT Dice brainmask {row['brainmask']['dice']:.3f} "
              f"({row['brainmask']['seconds']:.1f} s), T1 head {row['T1']['dice']:.3f} "
              f"({row['T1']['seconds']:.1f} s), mask Dice {row['T1'].get('mask_dice', 0):.4f}; "
              f"{row['T1']['notes']}", flush=True)
    for folder in sorted(data.glob("freesurfer-cohort/sub-*"))[:2]:
        path = str(folder / "brainmask.mgz")
        auto, off = brain.segment(path), brain.segment(path, skull_strip="off")
        same = bool(np.array_equal(auto.labels.array, off.labels.array))
        rows["identical"].append({"scan": folder.name, "identical": same, "notes": auto.notes})
        print(f"stripped {folder.name}: auto == off: {same}; {auto.notes}", flush=True)
    rng = np.random.default_rng(0)
    validation = brain.preset.metadata["data"]["validation"]
    for name in validation:
        folder = data / "mindboggle-oasis-trt20" / name
        image = io.read_image(str(folder / "t1weighted_brain.nii.gz"))
        reference = io.read_labels(str(folder / "labels.DKT31.manual.nii.gz")).array
        clean = _dkt_dice(brain.segment(image).labels.array, reference, ids)
        for thickness, intensity in ((14, 0.9), (8, 0.6)):
            result = brain.segment(_shell(image, thickness, intensity, rng))
            dice = _dkt_dice(result.labels.array, reference, ids)
            mask = (_dice(result.brain_mask.array, np.asarray(image.array) > 0)
                    if result.brain_mask is not None else None)
            rows["shells"].append({"scan": name, "thickness_mm": thickness,
                                   "intensity": intensity, "clean": clean, "dice": dice,
                                   "mask_dice": mask, "notes": result.notes,
                                   "warnings": result.warnings})
            print(f"shell {name} {thickness} mm x{intensity}: Dice {dice:.3f} (clean {clean:.3f}, "
                  f"{dice - clean:+.3f}), mask Dice {mask}, warnings {len(result.warnings)}; "
                  f"{result.notes}", flush=True)
    knee = data / "knee-dess" / "dess_echo1.nii.gz"
    if knee.exists():
        try:
            brain.segment(str(knee), strict=True)
            rows["knee"] = "segmented (NOT refused)"
        except DazooInputError as err:
            rows["knee"] = f"refused: {err}"
        print(f"knee under strict: {rows['knee']}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1, default=str))


def dilation_loo(data, out):
    """The mask growth chosen leave-one-out on the cohort's raw heads: for each head, the
    dilation (0-3 voxels, 6-connected) with the best mean Dice against FreeSurfer's mask on
    the other heads, and that head's Dice with it."""
    import scipy.ndimage as ndi

    from dazoo import io
    from dazoo.preprocess.skullstrip import BrainExtractor

    extractor = BrainExtractor.from_preset("brainmask")
    extractor.dilate_mm = 0.0  # deepbet's own masks, grown below
    table = {}
    for path in sorted(data.glob("freesurfer-cohort/*/T1.mgz")):
        mask = np.asarray(extractor.extract(str(path)).mask.array) > 0
        truth = np.asarray(io.read_image(str(path.parent / "brainmask.mgz")).array) > 0
        table[path.parent.name] = [
            _dice(ndi.binary_dilation(mask, iterations=n) if n else mask, truth)
            for n in range(4)]
        print(f"{path.parent.name}: Dice with 0-3 voxels of growth "
              + " ".join(f"{v:.4f}" for v in table[path.parent.name]), flush=True)
    chosen = {}
    for held in table:
        others = np.mean([v for k, v in table.items() if k != held], axis=0)
        n = int(np.argmax(others))
        chosen[held] = {"voxels": n, "dice": table[held][n]}
        print(f"held out {held}: chosen {n} voxels on the others, its Dice "
              f"{table[held][n]:.4f}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dice": table, "chosen": chosen}, indent=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--deepbet-wheel")
    parser.add_argument("--segment", action="store_true")
    parser.add_argument("--preset", default="brain", help="with --segment: the brain preset")
    parser.add_argument("--dilation-loo", action="store_true")
    parser.add_argument("--out", default="work_cache/skullstrip.json")
    args = parser.parse_args(argv)
    if args.segment:
        return segment_benchmark(pathlib.Path(args.data), pathlib.Path(args.out), args.preset)
    if args.dilation_loo:
        return dilation_loo(pathlib.Path(args.data), pathlib.Path(args.out))

    import nibabel as nib

    from dazoo import io
    from dazoo.preprocess.skullstrip import BrainExtractor

    data = pathlib.Path(args.data)
    extractor = BrainExtractor.from_preset("brainmask")
    original = _deepbet(args.deepbet_wheel) if args.deepbet_wheel else None
    cases = [(p.parent.name, "head", p, p.parent / "brainmask.mgz")
             for p in sorted(data.glob("freesurfer-cohort/*/T1.mgz"))]
    cases += [(p.parent.name, "stripped", p, p) for p in
              sorted(data.glob("freesurfer-cohort/*/brainmask.mgz"))]
    cases += [(p.parent.name, "stripped", p, p) for p in
              sorted(data.glob("mindboggle-oasis-trt20/*/t1weighted_brain.nii.gz"))[:5]]
    rows = []
    extractor.extract(cases[0][2])  # warm-up (tracing), not timed
    for name, kind, path, reference in cases:
        started = time.perf_counter()
        outside = extractor.outside_fraction(path)
        decided = time.perf_counter() - started
        started = time.perf_counter()
        result = extractor.extract(path)
        seconds = time.perf_counter() - started
        truth = np.asarray(io.read_image(reference).array) > 0
        row = {"scan": name, "kind": kind, "outside": outside, "decision_seconds": decided,
               "seconds": seconds, "dice_reference": _dice(result.mask.array, truth)}
        if original is not None:
            _, mask, _ = original.run(nib.load(str(path)))
            row["dice_deepbet"] = _dice(result.mask.array, np.asarray(mask.dataobj))
            row["voxels_differing"] = int((np.asarray(result.mask.array) > 0).__xor__(
                np.asarray(mask.dataobj) > 0).sum())
        rows.append(row)
        print(f"{kind:8s} {name:16s} outside {outside:.3f} ({decided:.1f} s) mask Dice vs "
              f"reference {row['dice_reference']:.4f}"
              + (f", vs deepbet {row['dice_deepbet']:.5f} ({row['voxels_differing']} voxels "
                 f"differ)" if original is not None else "")
              + f"; {seconds:.1f} s", flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
