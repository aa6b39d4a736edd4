"""The knee v2 recipe's validation set: held-out OAI label maps with images synthesised on
their own native grid.

The OAI maps have no images. For validation, each held-out map gets one image synthesised
once, with a fixed seed, on its own 160 x 384 x 384 DESS grid (``dazoo.training.LabelSynth``
with no spatial change, so the map stays the exact truth): per-structure contrast (DESS-like
for even-numbered maps, generic for odd ones), the background split into tissues, blur,
thicker slices, bias and noise. The validator of ``dazoo train`` then segments the image like
any scan and scores it against the map at native resolution, and registers validation pairs.

The split is by subject (both time points of an OAI_AKOA subject on the same side):
``--akoa`` subjects with two time points and ``--zib`` single subjects, a seeded choice.
Writes ``OUT/<name>/image.nii.gz``, ``OUT/<name>/labels.nii.gz`` (lesion ids 7/8/9 merged into
femur/tibia/patella) and ``OUT/validation.csv`` (name,image,labels), and prints the training
maps (the others) as JSON for the recipe's ``data.label_maps``.

``--extend TOP BOTTOM`` (mm) also writes, per held-out map, ``OUT/<name>_ext/``: the map with
its superior and inferior end planes repeated outward by TOP and BOTTOM mm (the femoral and
tibial shafts continued, as in a DESS scan whose field of view is taller than the maps' 140 mm
or not centred on the joint) and an image synthesised on it the same way, listed with the
others in ``OUT/validation_extended.csv`` (``validation.csv`` stays the nine maps alone).

    python examples/knee/make_validation.py ../shared/data/oai-knee-labels \
        -o work_cache/knee_v2/validation [--extend 40 20]
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import sys

import numpy as np

#: Bone lesions (ids 7-9) lie in femur, tibia and patella (checked on the 55 maps: the
#: voxels around id 7 are femur, 8 tibia, 9 patella): the recipe's relabel is the same.
LESIONS = {7: 1, 8: 3, 9: 5}

#: DESS-like contrast (water excitation: bone marrow dark, cartilage bright), the recipe's
#: ``synth.priors``.
DESS = {1: (0.05, 0.3), 3: (0.05, 0.3), 5: (0.05, 0.3),
        2: (0.5, 0.9), 4: (0.5, 0.9), 6: (0.5, 0.9)}


def subject_of(path: str) -> str:
    """OAI_AKOA_<subject>_<month> -> OAI_AKOA_<subject>; OAI_ZIB-UQ_<subject> unchanged."""
    name = os.path.basename(path).split(".")[0]
    return re.sub(r"_\d+m$", "", name)


def split(files, akoa: int, zib: int, seed: int):
    subjects = sorted({subject_of(f) for f in files})
    rng = np.random.default_rng(seed)
    paired = [s for s in subjects if s.startswith("OAI_AKOA")]
    single = [s for s in subjects if not s.startswith("OAI_AKOA")]
    held = set(rng.choice(paired, akoa, replace=False)) | set(rng.choice(single, zib,
                                                                         replace=False))
    validation = [f for f in files if subject_of(f) in held]
    return [f for f in files if f not in validation], validation


def extended_map(labels: np.ndarray, affine: np.ndarray, top_mm: float, bottom_mm: float):
    """``(labels, affine)`` with the map's superior and inferior end planes repeated outward by
    ``top_mm`` and ``bottom_mm`` (the voxel axis nearest the world S-I axis; the affine's origin
    moved so the original voxels keep their world positions). The planes repeated are the
    outermost ones holding the labelled cross-section in full
    (:func:`dazoo.training.synth.end_planes`); partly labelled planes beyond them (a sliver of
    femur in a map's last slice) take their labels too."""
    import nibabel as nib

    from dazoo.training.synth import end_planes

    codes = nib.aff2axcodes(affine)
    axis = next(i for i, c in enumerate(codes) if c in "SI")
    spacing = float(np.sqrt((np.asarray(affine)[:3, axis] ** 2).sum()))
    top, bottom = (int(round(mm / spacing)) for mm in (top_mm, bottom_mm))
    before, after = (bottom, top) if codes[axis] == "S" else (top, bottom)
    # repeat the outermost planes that hold the full cross-section (end_planes: a map's last
    # planes are often labelled only in part: they are replaced too, not continued)
    low, high = end_planes(labels, axis) or (0, labels.shape[axis] - 1)
    source = np.clip(np.arange(-before, labels.shape[axis] + after), low, high)
    out = np.take(labels, source, axis=axis)
    moved = np.array(affine, float, copy=True)
    moved[:3, 3] -= moved[:3, axis] * before
    return out, moved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("maps", help="folder of OAI knee label maps (oai-knee-labels)")
    parser.add_argument("-o", "--out", required=True)
    parser.add_argument("--akoa", type=int, default=3, help="held-out two-time-point subjects")
    parser.add_argument("--zib", type=int, default=3, help="held-out single subjects")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extend", type=float, nargs=2, metavar=("TOP", "BOTTOM"),
                        help="also extended copies of the held-out maps (mm superior, inferior)")
    args = parser.parse_args(argv)
    import nibabel as nib

    from dazoo.training import LabelSynth

    files = sorted(glob.glob(os.path.join(args.maps, "OAI_*.nii*")))
    if not files:
        print(f"{args.maps}: no OAI_*.nii.gz label maps", file=sys.stderr)
        return 2
    train, validation = split(files, args.akoa, args.zib, args.seed)
    os.makedirs(args.out, exist_ok=True)
    rows, extended = [], []
    for k, path in enumerate(validation):
        name = os.path.basename(path).split(".")[0]
        image = nib.load(path)
        labels = np.asarray(image.dataobj).astype(np.int16)
        for lesion, bone in LESIONS.items():
            labels[labels == lesion] = bone
        variants = [(name, labels, image.affine, 1000)]
        if args.extend:
            variants.append((name + "_ext", *extended_map(labels, image.affine, *args.extend),
                             5000))
        for variant, (out_name, out_labels, affine, base) in enumerate(variants):
            synth = LabelSynth(rotation=0, scale=0, shear=0, translation=0, nonlinear=0,
                               std=(0.0, 0.06), background=8, background_spacing=24,
                               blur=1.0, thickness=2.2, bias=0.3, noise=0.03, gamma=0.2,
                               priors=DESS, prior_probability=1.0 if k % 2 == 0 else 0.0)
            sample = synth.draw(out_labels, np.random.default_rng(base + args.seed * 100 + k))
            assert np.array_equal(sample.labels, out_labels)
            folder = os.path.join(args.out, out_name)
            os.makedirs(folder, exist_ok=True)
            nib.save(nib.Nifti1Image(sample.image, affine), os.path.join(folder, "image.nii.gz"))
            nib.save(nib.Nifti1Image(out_labels, affine), os.path.join(folder, "labels.nii.gz"))
            row = (out_name, os.path.abspath(os.path.join(folder, "image.nii.gz")),
                   os.path.abspath(os.path.join(folder, "labels.nii.gz")))
            (rows if variant == 0 else extended).append(row)
            print(f"{out_name}: {'DESS-like' if k % 2 == 0 else 'generic'} contrast, slices "
                  f"{sample.thickness:.2f} voxels along axis {sample.axis}, "
                  f"{out_labels.shape}", file=sys.stderr)
    if extended:
        with open(os.path.join(args.out, "validation_extended.csv"), "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["name", "image", "labels"])
            writer.writerows(rows + extended)
    with open(os.path.join(args.out, "validation.csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["name", "image", "labels"])
        writer.writerows(rows)
    print(json.dumps({"validation": [r[0] for r in rows],
                      "train_maps": [os.path.basename(f) for f in train]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
