"""The knee model grid by measurement: the ceiling of a perfect segmenter on each grid.

For each candidate grid (voxel size and shape, RAS, centred on the field of view as the
`knee` preset's preprocessing does), every label map is taken to the model grid and back
to its own native grid the way ``dazoo segment`` does it, and compared with itself:

- ``soft``: the perfect segmenter's probabilities, the class fractions of each model voxel
  (the native one-hot, smoothed by the downsampling's partial volume and sampled at the
  model voxel centres), back to native by linear interpolation per class and argmax (as
  ``labels_to_native`` does for probabilities);
- ``hard``: the model-grid training target itself (nearest neighbour, what the network
  is trained on), back to native by nearest neighbour.

Dice per structure is the best any network on that grid can reach at native resolution.
Bone lesion ids 7-9 are merged into the bone they lie in first (see ``knee_lesions``).

    python benchmarks/knee_grid.py ../shared/data/oai-knee-labels --maps 6 \
        --grids 1.4x0.73x0.73:80x192x192 1.4x0.875x0.875:80x160x160
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import scipy.ndimage as ndi

NAMES = {1: "femur", 2: "femoral cartilage", 3: "tibia", 4: "tibial cartilage",
         5: "patella", 6: "patellar cartilage"}


def lesions_to_bone(labels: np.ndarray) -> np.ndarray:
    """Ids 7-9 (bone lesions) replaced by the nearest bone id (1 femur, 3 tibia, 5 patella)."""
    lesion = labels >= 7
    if not lesion.any():
        return labels
    bone = np.isin(labels, (1, 3, 5))
    _, (i, j, k) = ndi.distance_transform_edt(~bone, return_indices=True)
    out = labels.copy()
    out[lesion] = labels[i[lesion], j[lesion], k[lesion]]
    return out


def dice(a: np.ndarray, b: np.ndarray, ids) -> dict:
    out = {}
    for i in ids:
        x, y = a == i, b == i
        s = x.sum() + y.sum()
        out[i] = float(2 * (x & y).sum() / s) if s else float("nan")
    return out


def ceiling(labels: np.ndarray, affine: np.ndarray, voxel_size, shape) -> dict:
    from dazoo.postprocess import labels_to_native
    from dazoo.preprocess import PreprocessConfig, Preprocessor

    config = PreprocessConfig(voxel_size=tuple(voxel_size), shape=tuple(shape),
                              orientation="RAS", centre="fov",
                              intensity={"method": "none"})
    pre = Preprocessor(config).apply((labels.astype(np.float32), affine))
    to_native = pre.model_to_native                     # model voxel -> native voxel
    native_size = np.sqrt((affine[:3, :3] ** 2).sum(0))
    # The partial volume of a model voxel: a Gaussian of FWHM the model voxel (where the
    # model voxel is larger than the native one; both grids RAS-aligned here).
    ratio = np.asarray(voxel_size, float) / native_size
    sigma = np.where(ratio > 1, ratio / 2.355, 0.0)
    hard = ndi.affine_transform(labels, to_native[:3, :3], to_native[:3, 3],
                                output_shape=tuple(shape), order=0, cval=0)
    classes = list(range(7))
    probs = np.zeros(tuple(shape) + (len(classes),), np.float32)
    for c in classes:
        onehot = ndi.gaussian_filter((labels == c).astype(np.float32), sigma)
        probs[..., c] = ndi.affine_transform(onehot, to_native[:3, :3], to_native[:3, 3],
                                             output_shape=tuple(shape), order=1, cval=c == 0)
    soft_native = labels_to_native(probs, pre)
    hard_native = labels_to_native(hard.astype(np.int32), pre)
    ids = sorted(NAMES)
    return {"soft": dice(soft_native, labels, ids), "hard": dice(hard_native, labels, ids),
            "labelled_outside": outside(labels, pre.native_to_model, shape)}


def outside(labels: np.ndarray, native_to_model: np.ndarray, shape) -> int:
    """Labelled native voxels whose centre falls outside the model grid (cut off)."""
    points = np.argwhere(labels > 0)
    model = points @ native_to_model[:3, :3].T + native_to_model[:3, 3]
    inside = np.all((model >= -0.5) & (model <= np.asarray(shape) - 0.5), axis=1)
    return int((~inside).sum())


def parse_grids(specs) -> list[tuple[list[float], list[int]]]:
    """``"VXxVYxVZ:SXxSYxSZ"`` (mm : voxels) -> ``(voxel size, shape)`` per grid."""
    grids = []
    for spec in specs:
        voxels, shape = spec.split(":")
        grids.append(([float(x) for x in voxels.split("x")], [int(x) for x in shape.split("x")]))
    return grids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--maps", type=int, default=6, help="first N maps (sorted)")
    parser.add_argument("--grids", nargs="+", required=True,
                        help="VX x VY x VZ : SX x SY x SZ (mm : voxels, RAS)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    import nibabel as nib

    files = sorted(glob.glob(os.path.join(args.folder, "*.nii*")))[:args.maps]
    grids = parse_grids(args.grids)
    results = {g: [] for g in args.grids}
    for f in files:
        image = nib.load(f)
        labels = lesions_to_bone(np.asarray(image.dataobj).astype(np.int32))
        for g, (vox, shape) in zip(args.grids, grids):
            t = time.perf_counter()
            r = ceiling(labels, image.affine, vox, shape)
            results[g].append(r)
            print(f"{os.path.basename(f)} {g}: soft "
                  + " ".join(f"{r['soft'][i]:.3f}" for i in NAMES)
                  + " | hard " + " ".join(f"{r['hard'][i]:.3f}" for i in NAMES)
                  + f" | labelled voxels outside the grid {r['labelled_outside']}"
                  + f" ({time.perf_counter() - t:.0f} s)", flush=True)
    print("\nmean Dice of a perfect segmenter at native resolution over "
          f"{len(files)} maps (soft = probabilities, hard = nearest-neighbour targets)")
    print("grid".ljust(32) + "".join(n[:14].rjust(16) for n in NAMES.values()))
    summary = {}
    for g in args.grids:
        for kind in ("soft", "hard"):
            means = {NAMES[i]: float(np.nanmean([r[kind][i] for r in results[g]]))
                     for i in NAMES}
            summary.setdefault(g, {})[kind] = means
            print(f"{g} {kind}".ljust(32) + "".join(f"{m:16.3f}" for m in means.values()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"maps": [os.path.basename(f) for f in files], "summary": summary,
                       "per_map": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
