"""Evaluates a knee preset on YOUR labelled knee scans (OAI-ZIB label ids: 1 femur,
2 femoral cartilage, 3 tibia, 4 tibial cartilage, 5 patella, 6 patellar cartilage): Dice per
structure, and for each cartilage plate its volume and mean thickness, from the preset's
segmentation and from your labels, at each scan's native resolution.

Mean thickness of a plate: the mean, over the cartilage voxels that touch their bone (the
bone-cartilage interface), of the distance (mm, on the scan's own voxel sizes) to the
nearest voxel that is neither that cartilage nor that bone: from the subchondral bone to the
articular surface. Within about half a voxel for plates of known thickness, flat or tilted
(``tests/test_examples.py``); it is not the surface-normal thickness of dedicated
morphometry tools (e.g. CartiMorph, Chondrometrics), and both label maps are measured the
same way, so the comparison between them is the fair one.

Usage:
    python examples/knee/evaluate_folder.py DATA --image 'image.*' --labels 'labels.*' \\
        --preset knee -o knee_report.csv
DATA: a CSV manifest (image,labels) or a folder (one subfolder per subject, or
images/ + labels/, or BIDS), as ``dazoo evaluate`` takes it.
"""
from __future__ import annotations

import argparse
import csv
import sys

import numpy as np
import scipy.ndimage as ndi

STRUCTURES = {1: "femur", 2: "femoral cartilage", 3: "tibia", 4: "tibial cartilage",
              5: "patella", 6: "patellar cartilage"}
PLATES = {"femoral": (2, 1), "tibial": (4, 3), "patellar": (6, 5)}  # (cartilage, bone)


def mean_thickness(labels: np.ndarray, spacing, cartilage: int, bone: int) -> float:
    """Mean cartilage thickness (mm) from the bone-cartilage interface to the articular
    surface (see the module docstring); NaN where the plate does not touch its bone."""
    labels = np.asarray(labels)
    plate, under = labels == cartilage, labels == bone
    if not plate.any() or not under.any():
        return float("nan")
    outside = ~(plate | under)
    distance = ndi.distance_transform_edt(~outside, sampling=spacing)
    interface = plate & ndi.binary_dilation(under, structure=ndi.generate_binary_structure(3, 1))
    return float(distance[interface].mean()) if interface.any() else float("nan")


def measures(labels: np.ndarray, affine: np.ndarray) -> dict:
    """Volume (mL) and mean thickness (mm) of each cartilage plate."""
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    voxel_ml = float(np.prod(spacing)) / 1000
    out = {}
    for plate, (cartilage, bone) in PLATES.items():
        out[f"{plate} volume mL"] = float((np.asarray(labels) == cartilage).sum() * voxel_ml)
        out[f"{plate} thickness mm"] = mean_thickness(labels, spacing, cartilage, bone)
    return out


def dice(truth: np.ndarray, prediction: np.ndarray, label: int) -> float:
    """Dice of one id (NaN where neither map has it)."""
    from dazoo.metrics import dice_per_label

    return dice_per_label(truth, prediction, [label])[label]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--image", default="image.*")
    parser.add_argument("--labels", default="labels.*")
    parser.add_argument("--preset", default="knee")
    parser.add_argument("-o", "--output", default="knee_report.csv")
    args = parser.parse_args(argv)

    import dazoo
    from dazoo import io
    from dazoo.metrics import dice_per_label
    from dazoo.training import load_subjects

    pipeline = dazoo.load(args.preset)
    names = {i: pipeline.label_names.get(i) for i in STRUCTURES}
    if any(names[i] != STRUCTURES[i] for i in STRUCTURES):
        print(f"warning: {args.preset}'s label ids are not OAI-ZIB's ({names}): Dice and "
              "plates below compare different structures", file=sys.stderr)
    subjects = [s for s in load_subjects(args.data, image=args.image, labels=args.labels)
                if s.labels]
    if not subjects:
        sys.exit(f"{args.data}: no subject has a label map")
    rows = []
    for subject in subjects:
        result = pipeline.segment(subject.image)
        truth = io.read_labels(subject.labels, like=io.read_image(subject.image))
        predicted = np.asarray(result.labels.array)
        row = {"subject": subject.name}
        scores = dice_per_label(truth.array, predicted, list(STRUCTURES))  # one pass
        for i, name in STRUCTURES.items():
            row[f"{name} Dice"] = scores[i]
        for key, value in measures(predicted, result.labels.affine).items():
            row[f"{key} (preset)"] = value
        for key, value in measures(truth.array, truth.affine).items():
            row[f"{key} (labels)"] = value
        rows.append(row)
        print(f"{subject.name}: " + ", ".join(f"{STRUCTURES[i]} {row[f'{STRUCTURES[i]} Dice']:.3f}"
                                             for i in STRUCTURES), flush=True)
    with open(args.output, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for name in STRUCTURES.values():
        values = [r[f"{name} Dice"] for r in rows if np.isfinite(r[f"{name} Dice"])]
        if values:
            print(f"mean {name} Dice {np.mean(values):.3f} over {len(values)}")
    for plate in PLATES:
        pairs = [(r[f"{plate} thickness mm (preset)"], r[f"{plate} thickness mm (labels)"])
                 for r in rows]
        pairs = [p for p in pairs if np.all(np.isfinite(p))]
        if pairs:
            diff = np.array([a - b for a, b in pairs])
            print(f"{plate} cartilage mean thickness: preset - labels {diff.mean():+.2f} mm "
                  f"(mean absolute {np.abs(diff).mean():.2f} mm, {len(pairs)} scans)")
    print(f"report: {args.output}")


if __name__ == "__main__":
    main()
