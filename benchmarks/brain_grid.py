"""The brain v3 model grid by measurement: the ceiling of a perfect segmenter on each grid.

For each candidate grid (voxel size and shape, RAS, centred on the label map's centre of
mass), every whole-brain label map (DKT31 cortex + SynthSeg's aseg structures, the
Mindboggle-101 ``aparcNMMjt+aseg`` maps relabelled as the v3 recipe does:
:func:`dazoo.labels.whole_brain_relabel`) is taken to the model grid and back to its own 1 mm grid the
way ``dazoo segment`` does it, and compared with itself:

- ``soft``: the perfect segmenter's probabilities, the class fractions of each model voxel
  (the native one-hot smoothed by the model voxel's partial volume, sampled at the model
  voxel centres), back to native by linear interpolation per class and argmax
  (``labels_to_native``);
- ``hard``: the model-grid training target itself (nearest neighbour), back by nearest
  neighbour.

Dice per structure is the best any network on that grid can reach at 1 mm; reported per
structure group (``dazoo.labels.BRAIN_GROUPS``), over every non-cortical structure, and for
the smallest structures. (The preset aligns scans to its template by an affine first; the
grids here are axis-aligned: the partial-volume loss is the same to within the rotation.)

    python benchmarks/brain_grid.py ../shared/data/mindboggle101-labels --maps 6 \
        --grids 2x2x2:80x96x80 1.5x1.5x1.5:112x128x112
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

SMALL = {"accumbens": (26, 58), "amygdala": (18, 54), "pallidum": (13, 52),
         "inf-lat-vent": (5, 44), "hippocampus": (17, 53), "3rd-ventricle": (14,)}


def ceiling(labels: np.ndarray, affine: np.ndarray, classes, voxel_size, shape) -> dict:
    from dazoo.postprocess import labels_to_native
    from dazoo.preprocess import PreprocessConfig, Preprocessor

    config = PreprocessConfig(voxel_size=tuple(voxel_size), shape=tuple(shape),
                              orientation="RAS", centre="mass", intensity={"method": "none"})
    pre = Preprocessor(config).apply(((labels > 0).astype(np.float32), affine))
    to_native = pre.model_to_native                     # model voxel -> native voxel
    matrix, offset = to_native[:3, :3], to_native[:3, 3]
    native_size = np.sqrt((affine[:3, :3] ** 2).sum(0))
    # partial volume of a model voxel: a Gaussian of FWHM the model voxel, in native voxels
    # (per native axis: the model axis it maps to)
    model_per_native = np.abs(np.linalg.inv(matrix))   # native axis -> model axes
    ratio = (np.asarray(voxel_size, float)[np.argmax(model_per_native, axis=0)]
             / native_size)
    sigma = np.where(ratio > 1, ratio / 2.355, 0.0)
    hard = ndi.affine_transform(labels, matrix, offset, output_shape=tuple(shape), order=0)
    lookup = {c: k for k, c in enumerate(classes)}
    probs = np.zeros(tuple(shape) + (len(classes),), np.float32)
    inverse = np.linalg.inv(to_native)
    for label in classes[1:]:
        mask = labels == label
        if not mask.any():
            continue
        points = np.argwhere(mask)
        low = np.maximum(points.min(0) - 4, 0)
        high = np.minimum(points.max(0) + 5, labels.shape)
        crop = ndi.gaussian_filter(mask[tuple(slice(a, b) for a, b in zip(low, high))]
                                   .astype(np.float32), sigma)
        corners = np.array([[x, y, z, 1] for x in (low[0], high[0]) for y in (low[1], high[1])
                            for z in (low[2], high[2])], float) @ inverse.T
        m_low = np.clip(np.floor(corners[:, :3].min(0)).astype(int) - 1, 0, shape)
        m_high = np.clip(np.ceil(corners[:, :3].max(0)).astype(int) + 2, 0, shape)
        if np.any(m_high <= m_low):
            continue
        sub = ndi.affine_transform(crop, matrix, matrix @ m_low + offset - low,
                                   output_shape=tuple(m_high - m_low), order=1, cval=0.0)
        box = tuple(slice(a, b) for a, b in zip(m_low, m_high))
        probs[box + (lookup[label],)] = sub
    probs[..., 0] = np.clip(1.0 - probs[..., 1:].sum(-1), 0.0, 1.0)
    soft_native = labels_to_native(probs, pre)
    hard_native = labels_to_native(hard.astype(np.int32), pre)
    ids = np.asarray(classes)
    from dazoo.metrics import dice_per_label

    return {"soft": dice_per_label(labels, ids[soft_native], classes[1:]),
            "hard": dice_per_label(labels, hard_native, classes[1:])}


def summarise(per_label: dict) -> dict:
    from dazoo.evaluate import group_means
    from dazoo.labels import FREESURFER_LUT, label_groups

    groups = label_groups({i: FREESURFER_LUT[i][0] for i in per_label})
    out = group_means(per_label, groups)
    for name, ids in SMALL.items():
        out[name] = float(np.nanmean([per_label[i] for i in ids]))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="Mindboggle-101 aparcNMMjt+aseg maps")
    parser.add_argument("--maps", type=int, default=6, help="every k-th map, N maps in all")
    parser.add_argument("--grids", nargs="+", required=True,
                        help="VX x VY x VZ : SX x SY x SZ (mm : voxels, RAS)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    import nibabel as nib

    from dazoo.labels import DKT31_CORTEX, WHOLE_BRAIN_ASEG, whole_brain_relabel
    from dazoo.training.subjects import relabelled
    from knee_grid import parse_grids  # same folder

    every = sorted(glob.glob(os.path.join(args.folder, "*.mgz"))
                   + glob.glob(os.path.join(args.folder, "*.nii*")))
    files = every[:: max(1, len(every) // args.maps)][: args.maps]
    classes = [0] + sorted(DKT31_CORTEX + WHOLE_BRAIN_ASEG)
    grids = parse_grids(args.grids)
    results = {g: [] for g in args.grids}
    for f in files:
        image = nib.load(f)
        raw = np.asarray(image.dataobj).astype(np.int32)
        labels = relabelled(raw, whole_brain_relabel(np.unique(raw))).astype(np.int32)
        for g, (vox, shape) in zip(args.grids, grids):
            t = time.perf_counter()
            r = ceiling(labels, image.affine, classes, vox, shape)
            results[g].append(r)
            s, h = summarise(r["soft"]), summarise(r["hard"])
            print(f"{os.path.basename(f)} {g}: soft "
                  + " ".join(f"{k} {v:.3f}" for k, v in s.items())
                  + f" | hard cortex {h['cortex']:.3f} non-cortical {h['non-cortical']:.3f}"
                  + f" ({time.perf_counter() - t:.0f} s)", flush=True)
    print(f"\nmean Dice of a perfect segmenter at 1 mm over {len(files)} maps "
          "(soft = probabilities, hard = nearest-neighbour targets)")
    summary = {}
    for g in args.grids:
        for kind in ("soft", "hard"):
            per_map = [summarise(r[kind]) for r in results[g]]
            means = {k: float(np.nanmean([m[k] for m in per_map])) for k in per_map[0]}
            summary.setdefault(g, {})[kind] = means
            print(f"{g} {kind}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"maps": [os.path.basename(f) for f in files], "summary": summary,
                       "per_map": {g: [{k: {int(i): v for i, v in r[k].items()} for k in r}
                                       for r in rs] for g, rs in results.items()}},
                      fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
