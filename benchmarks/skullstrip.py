"""Brain extraction measured: dazoo's converted deepbet (Keras) against deepbet itself
(torch, the original, when ``--deepbet-wheel`` is given) and against FreeSurfer's brain masks,
on the FreeSurfer cohort's raw heads (``T1.mgz``; reference ``brainmask.mgz > 0``) and on
skull-stripped scans (which ``--skull-strip auto`` must leave alone).

Per scan: mask Dice with FreeSurfer's mask, Dice with deepbet's own mask (parity), the
``auto`` decision's measure (share of bright voxels outside the brain), seconds.

Usage:
    python benchmarks/skullstrip.py --data ../shared/data \\
        [--deepbet-wheel work_cache/deepbet/deepbet-1.0.2-py3-none-any.whl] [--out work_cache/skullstrip.json]
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--deepbet-wheel")
    parser.add_argument("--out", default="work_cache/skullstrip.json")
    args = parser.parse_args(argv)

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
