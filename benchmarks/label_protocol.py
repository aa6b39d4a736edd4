"""Label protocols compared by volume: is a gap between two data sets the network's or the labels'?

Two data sets labelled with "the same" FreeSurfer ids can still draw a structure differently
(FreeSurfer version, atlas, manual edits): the nucleus accumbens of one protocol can be half the
other's. A segmenter trained on one protocol then loses Dice on the other whatever it learns.
This script measures it without any network: for each set of label maps (``--set NAME=GLOB``),
each structure's share of the labelled brain (per mille of all non-zero voxels, so head size
cancels), its mean and standard deviation over the set's maps, and against the first set:

- ``ratio``: the set's mean share over the first set's;
- ``z``: the difference of the means in units of the first set's standard deviation;
- ``bound``: the highest Dice two label maps with those volumes can reach,
  ``2 min(r, 1/r) / (1 + min(r, 1/r))`` (one volume inside the other): a segmenter that draws
  the first set's protocol perfectly cannot score above it against the other set's labels.

Structures are those of a label table (``--labels``, a preset's or run's ``labels.json``);
the cortex is reported as one structure (every id :func:`dazoo.labels.freesurfer_group`
calls cortex, DKT's 1000-2999 among them). A set of the network's own
segmentations (``--set predicted=...``) shows which protocol the network follows.

    python benchmarks/label_protocol.py --labels pretrained/brain/labels.json \\
        --set oasis='work_cache/brain_v3/data/oasis/*/labels.whole_brain.nii.gz' \\
        --set cohort='work_cache/brain_v3/data/freesurfer-cohort/*/labels.whole_brain.nii.gz'
"""
from __future__ import annotations

import argparse
import glob
import json
import sys

import numpy as np

from dazoo.labels import freesurfer_group

CORTEX = "cortex"                           # freesurfer_group's name for the cortical ids


def structures(table: list[dict]) -> dict:
    """``{key: name}`` of a label table's classes: the non-cortical ids, and ``"cortex"`` for
    all cortical parcels together."""
    out = {}
    for entry in table:
        label = int(entry["id"])
        if label == 0:
            continue
        if freesurfer_group(label) == CORTEX:
            out[CORTEX] = "cortex (all parcels)"
        else:
            out[label] = entry.get("name", str(label))
    return out


def shares(labels: np.ndarray, keys) -> dict:
    """Each structure's share of the labelled voxels, per mille."""
    ids, sizes = np.unique(np.asarray(labels), return_counts=True)
    counts = {int(i): int(n) for i, n in zip(ids, sizes) if i != 0}
    counts[CORTEX] = sum(n for i, n in counts.items() if freesurfer_group(i) == CORTEX)
    total = max(sum(n for i, n in counts.items() if i != CORTEX), 1)
    return {key: 1000.0 * counts.get(key, 0) / total for key in keys}


def dice_bound(ratio: float) -> float:
    """The highest Dice of two volumes ``ratio`` apart (the smaller inside the larger)."""
    if not ratio > 0:
        return 0.0
    r = min(ratio, 1.0 / ratio)
    return 2.0 * r / (1.0 + r)


def compare(sets: dict[str, list[dict]], names: dict) -> list[dict]:
    """One row per structure: ``{"key", "name", "<set>": (mean, sd), "ratio:<set>",
    "z:<set>", "bound:<set>"}`` for every set after the first (the reference)."""
    order = list(sets)
    reference = order[0]
    rows = []
    for key, name in names.items():
        row = {"key": key, "name": name}
        for s in order:
            values = np.array([m[key] for m in sets[s]], float)
            row[s] = (float(values.mean()), float(values.std()))
        ref_mean, ref_sd = row[reference]
        for s in order[1:]:
            mean = row[s][0]
            ratio = mean / ref_mean if ref_mean > 0 else float("nan")
            row[f"ratio:{s}"] = ratio
            row[f"z:{s}"] = (mean - ref_mean) / ref_sd if ref_sd > 0 else float("nan")
            row[f"bound:{s}"] = dice_bound(ratio)
        rows.append(row)
    return rows


def markdown(rows: list[dict], order: list[str], counts: dict[str, int]) -> str:
    reference = order[0]
    head = ["structure"] + [f"{s} (n={counts[s]}), per mille" for s in order]
    for s in order[1:]:
        head += [f"{s}/{reference}", "z", "Dice bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["name"]] + [f"{row[s][0]:.2f} ± {row[s][1]:.2f}" for s in order]
        for s in order[1:]:
            cells += [f"{row[f'ratio:{s}']:.2f}", f"{row[f'z:{s}']:+.1f}",
                      f"{row[f'bound:{s}']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="labels.json of a preset or run")
    parser.add_argument("--set", action="append", required=True, metavar="NAME=GLOB",
                        help="a set of label maps (repeatable; the first is the reference)")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    import nibabel as nib

    table = json.load(open(args.labels))
    table = table["classes"] if isinstance(table, dict) else table
    names = structures(table)
    sets, counts = {}, {}
    for spec in args.set:
        name, _, pattern = spec.partition("=")
        paths = sorted(glob.glob(pattern))
        if not name or not paths:
            print(f"--set {spec}: no files match", file=sys.stderr)
            return 2
        sets[name] = [shares(np.asarray(nib.load(p).dataobj), names) for p in paths]
        counts[name] = len(paths)
    text = markdown(compare(sets, names), list(sets), counts)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
