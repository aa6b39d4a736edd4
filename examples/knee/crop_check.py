"""Segments a sagittal knee scan with rows removed from the top (or bottom) of its field of view,
the affine kept, and reports how far the femur's labels stop from the new top edge and the
femur's cross-section (voxels) in the top rows: whether a shaft stopping short of the edge is
the network's reaction to the edge itself or to what lies near it (e.g. the signal fall-off of
a real scan's outermost rows).

    python examples/knee/crop_check.py --preset knee ../shared/data/knee-dess/dess_echo1.nii.gz \
        --top 0 10 20 [--bottom 0 64 128]
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib

import numpy as np

import dazoo
from dazoo import io

_spec = importlib.util.spec_from_file_location(
    "knee_evaluate_v2", pathlib.Path(__file__).with_name("evaluate_v2.py"))
_evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_evaluate)


def cropped(volume: io.Volume, rows: int, end: str) -> io.Volume:
    """``volume`` with ``rows`` voxel rows removed at its superior (``"top"``) or inferior end
    along the voxel axis closest to S-I; the affine follows (the same world positions)."""
    affine = volume.affine
    axis, up, _ = _evaluate.si_axis(affine)
    n = volume.array.shape[axis]
    start, stop = 0, n
    if (end == "top") == up:
        stop = n - rows
    else:
        start = rows
    index = [slice(None)] * volume.array.ndim
    index[axis] = slice(start, stop)
    shift = np.eye(4)
    shift[axis, 3] = start
    return io.Volume(volume.array[tuple(index)], affine @ shift, None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scan")
    parser.add_argument("--preset", default="knee")
    parser.add_argument("--top", type=int, nargs="*", default=[0], help="rows removed at the top")
    parser.add_argument("--bottom", type=int, nargs="*", default=[],
                        help="rows removed at the bottom")
    args = parser.parse_args(argv)
    pipeline = dazoo.load(args.preset)
    image = io.read_image(args.scan)
    axis, up, spacing = _evaluate.si_axis(image.affine)
    for end, counts in (("top", args.top), ("bottom", args.bottom)):
        for rows in counts:
            volume = cropped(image, rows, end)
            labels = pipeline.segment(volume).labels
            femur = labels.array == 1
            area = femur.sum(axis=tuple(a for a in range(3) if a != axis))
            if up:
                area = area[::-1]                  # from the top edge down
            reach = _evaluate.bone_reach_mm(labels.array, labels.affine, 1, "top")
            print(f"{end} {rows} rows ({rows * spacing:.1f} mm) removed: femur labelled to "
                  f"{reach:.1f} mm from the top edge; femur voxels in the top rows "
                  f"{area[:16].tolist()}, 20 mm below {int(area[round(20 / spacing)])}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
