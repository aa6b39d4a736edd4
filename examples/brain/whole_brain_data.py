"""Whole-brain label maps on the scans' own grids, for training and evaluating `brain` v3.

The Mindboggle-101 ``aparcNMMjt+aseg`` maps (``mindboggle101-labels``: manual DKT31 cortex +
FreeSurfer's automatic aseg structures, white matter included) lie in the same world space
as the OASIS-TRT-20 scans (FreeSurfer's conformed 256^3 LIA grid vs the scans' 256x256x160
ASL grid; the cortical labels agree voxel for voxel with ``labels.DKT31.manual.nii.gz``). This
script writes, per subject, the map resampled onto the scan's grid (nearest neighbour) and
relabelled onto the whole-brain table (:func:`dazoo.labels.whole_brain_relabel`), next to a
link to the scan:

    OUT/oasis/OASIS-TRT-20-N/{t1weighted_brain.nii.gz -> data, labels.whole_brain.nii.gz}
    OUT/freesurfer-cohort/sub-NN/{brainmask.mgz -> data, labels.whole_brain.nii.gz}

(the cohort's FreeSurfer ``aparc.DKTatlas+aseg`` relabelled the same way: automatic labels).
The files are derived from the data: they stay in ``work_cache`` and are never committed.

    python examples/brain/whole_brain_data.py --data ../shared/data -o work_cache/brain_v3/data
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np


def whole_brain_on(labels_path: str, image_path: str | None, out: str) -> dict:
    """Writes ``labels_path`` relabelled (and resampled onto ``image_path``'s grid) to
    ``out``; returns ``{id: voxels}`` of what was written."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    from dazoo.io import write_labels
    from dazoo.labels import whole_brain_relabel
    from dazoo.training.subjects import relabelled

    source = nib.load(labels_path)
    if image_path is not None:
        image = nib.load(image_path)
        source = resample_from_to(source, (image.shape[:3], image.affine), order=0)
    array = np.asarray(source.dataobj).astype(np.int32)
    array = relabelled(array, whole_brain_relabel(np.unique(array))).astype(np.int16)
    write_labels((array, source.affine), out)
    ids, counts = np.unique(array, return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    data = os.path.abspath(args.data)
    written = 0
    for folder in sorted(glob.glob(os.path.join(data, "mindboggle-oasis-trt20", "OASIS-TRT-20-*"))):
        name = os.path.basename(folder)
        labels = os.path.join(data, "mindboggle101-labels", f"{name}.aparcNMMjt+aseg.mgz")
        image = os.path.join(folder, "t1weighted_brain.nii.gz")
        target = os.path.join(args.output, "oasis", name)
        os.makedirs(target, exist_ok=True)
        link = os.path.join(target, "t1weighted_brain.nii.gz")
        if not os.path.lexists(link):
            os.symlink(image, link)
        counts = whole_brain_on(labels, image, os.path.join(target, "labels.whole_brain.nii.gz"))
        written += 1
        print(f"{name}: {len(counts) - 1} structures", flush=True)
    for folder in sorted(glob.glob(os.path.join(data, "freesurfer-cohort", "sub-*"))):
        labels = os.path.join(folder, "aparc.DKTatlas+aseg.mgz")
        if not os.path.exists(labels):
            continue
        name = os.path.basename(folder)
        target = os.path.join(args.output, "freesurfer-cohort", name)
        os.makedirs(target, exist_ok=True)
        link = os.path.join(target, "brainmask.mgz")
        if not os.path.lexists(link):
            os.symlink(os.path.join(folder, "brainmask.mgz"), link)
        counts = whole_brain_on(labels, None, os.path.join(target, "labels.whole_brain.nii.gz"))
        written += 1
        print(f"freesurfer-cohort/{name}: {len(counts) - 1} structures", flush=True)
    if not written:
        print(f"no subjects found under {data}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
