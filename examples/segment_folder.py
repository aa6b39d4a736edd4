"""Segment every scan of a folder with a preset and write a table of region volumes.

    python examples/segment_folder.py scans/ -o segs/ --preset brain --volumes volumes.csv

Each label map is written on its scan's own grid (``segs/<name>_seg.nii.gz``); the table
has one row per scan and one column per region (mm^3, region names from the preset). A scan
that cannot be read is reported in one line and skipped; the exit status is 1 if any failed.
The command-line equivalent: ``dazoo segment scans/ -o segs/ --volumes volumes.csv
--continue-on-error``.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="folder of NIfTI (.nii, .nii.gz) or MGZ scans")
    parser.add_argument("-o", "--output", required=True, help="folder for the label maps")
    parser.add_argument("--preset", default="brain", help="preset name or folder (default: brain)")
    parser.add_argument("--volumes", default="volumes.csv", help="table to write (CSV)")
    args = parser.parse_args(argv)
    from dazoo.cli import quiet_tensorflow

    quiet_tensorflow()  # TensorFlow's import-time log lines, as the dazoo command hides them

    import dazoo
    from dazoo.errors import DazooInputError
    from dazoo.io import WRITABLE, stem

    scans = sorted(os.path.join(args.folder, n) for n in os.listdir(args.folder)
                   if n.endswith(WRITABLE))
    if not scans:
        print(f"{args.folder}: no .nii, .nii.gz or .mgz file", file=sys.stderr)
        return 2
    pipeline = dazoo.load(args.preset)
    names = {i: n for i, n in pipeline.label_names.items() if i != 0}  # {id: name}
    os.makedirs(args.output, exist_ok=True)
    rows, failed = [], 0
    for scan in scans:
        try:
            result = pipeline.segment(scan)
        except DazooInputError as err:  # one line, keep going
            print(f"skipped: {err}", file=sys.stderr)
            failed += 1
            continue
        result.save(os.path.join(args.output, f"{stem(scan)}_seg.nii.gz"), protect=scans)
        volumes = result.volumes()
        rows.append([scan] + [f"{volumes.get(i, 0.0):.1f}" for i in sorted(names)])
        print(f"{scan}: {result.seconds:.1f} s")
    with open(args.volumes, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image"] + [f"{names[i]} mm3" for i in sorted(names)])
        writer.writerows(rows)
    print(f"{len(rows)} scans segmented, {failed} failed; volumes in {args.volumes}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
