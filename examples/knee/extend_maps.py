"""Training label maps with the femoral and tibial shafts continued (knee recipe_v3).

The OAI maps cover a 140 mm field of view centred near the joint line: their femoral shaft
ends ~70 mm above it. A DESS scan with a taller field of view, or one not centred on the
joint, shows more shaft, which version 2 left unlabelled. This writes, for each of a recipe's
``data.label_maps``, a copy ``<name>_ext.nii.gz`` whose superior and inferior end planes are repeated outward
(``make_validation.extended_map``, along the map's own voxel axis nearest S-I, each original
voxel keeping its world position), so that placed on the model grid the shafts run to its
ends; ``LabelSynth``'s ``extend`` then shifts the anatomy along the leg. The copies are
derived data (the maps' terms apply): written under ``work_cache``, never committed.

    python examples/knee/extend_maps.py examples/knee/recipe_v2.json \
        -o work_cache/knee_v3/maps_extended --mm 60
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a recipe whose data.label_maps are the maps to extend")
    parser.add_argument("-o", "--out", required=True)
    parser.add_argument("--mm", type=float, default=60.0,
                        help="how far each end plane is repeated, mm (default 60)")
    args = parser.parse_args(argv)
    import nibabel as nib

    from dazoo import io
    from dazoo.training.recipe import Recipe

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_validation import extended_map

    maps = Recipe.load(args.recipe)["data"]["label_maps"] or []
    if not maps:
        print(f"{args.recipe}: no data.label_maps", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    for entry in maps:
        path = entry["path"] if isinstance(entry, dict) else entry
        image = nib.load(path)
        labels = np.asarray(image.dataobj).astype(np.int16)
        out, affine = extended_map(labels, image.affine, args.mm, args.mm)
        name = os.path.basename(path).split(".")[0] + "_ext.nii.gz"
        io.write_labels(out, os.path.join(args.out, name), affine=affine)
        print(f"{name}: {labels.shape} -> {out.shape}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
