"""Register a moving scan onto a fixed scan, then apply the same warp to other images and
label maps of the moving scan's space.

    python examples/register_and_warp.py moving.nii.gz fixed.nii.gz -o out/ \
        --also moving_flair.nii.gz --labels moving_labels.nii.gz --preset brain

Writes ``out/moved.nii.gz``, ``out/warp.nii.gz`` (a displacement field in mm on the fixed
grid, ITK's LPS convention: ANTs, SimpleITK and Slicer read it directly), then every
``--also`` image (linear) and ``--labels`` map (nearest neighbour, ids kept) moved onto the
fixed grid through that warp file, as ``dazoo warp`` does.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("moving", help="the scan to deform")
    parser.add_argument("fixed", help="the reference scan")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--also", action="append", default=[],
                        help="another image in the moving scan's space (repeatable)")
    parser.add_argument("--labels", action="append", default=[],
                        help="a label map in the moving scan's space (repeatable)")
    parser.add_argument("--preset", default="brain", help="preset name or folder (default: brain)")
    args = parser.parse_args(argv)
    from dazoo.cli import quiet_tensorflow

    quiet_tensorflow()  # TensorFlow's import-time log lines, as the dazoo command hides them

    import dazoo
    from dazoo import io
    from dazoo.io import stem
    from dazoo.postprocess import warp_native

    os.makedirs(args.output, exist_ok=True)
    inputs = [args.moving, args.fixed, *args.also, *args.labels]
    result = dazoo.load(args.preset).register(args.moving, args.fixed)
    warp = os.path.join(args.output, "warp.nii.gz")
    result.save(moved=os.path.join(args.output, "moved.nii.gz"), warp=warp, protect=inputs)
    print(f"registered in {result.seconds:.1f} s, folding {100 * result.folding_fraction:.4f} %")

    # Later, or elsewhere: only the warp file and the fixed grid are needed.
    field = io.read_displacement(warp)
    fixed = io.read_image(args.fixed)
    for path in args.also:
        moved = warp_native(io.read_image(path), field, fixed.affine, order=1)
        out = io.write_image((moved, fixed.affine),
                             os.path.join(args.output, f"{stem(path)}_moved.nii.gz"),
                             protect=inputs)
        print(f"{path} -> {out}")
    for path in args.labels:
        moved = warp_native(io.read_labels(path), field, fixed.affine, order=0)
        out = io.write_labels((moved, fixed.affine),
                              os.path.join(args.output, f"{stem(path)}_moved.nii.gz"),
                              protect=inputs)
        print(f"{path} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
