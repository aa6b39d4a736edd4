"""QC pictures: segment a scan and register it to another, and draw both results.

    python examples/qc_pictures.py scan.nii.gz --fixed other.nii.gz -o qc/ --preset brain

``qc/<scan>_seg.png``: three orthogonal slices in world orientation (the patient's left on
the left, letters at the edges) with the label map overlaid; ``qc/<scan>_to_<fixed>.png``
(with ``--fixed``): fixed/moved checkerboard, the deformed grid and the Jacobian determinant
(folding in red). The command line does the same with ``--qc DIR`` on ``dazoo segment`` and
``dazoo register``, and ``dazoo qc IMAGE --labels L -o out.png`` draws existing files.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scan", help="a scan (NIfTI or MGZ)")
    parser.add_argument("--fixed", help="register the scan onto this one too")
    parser.add_argument("-o", "--output", required=True, help="folder for the PNG files")
    parser.add_argument("--preset", default="brain", help="preset name or folder (default: brain)")
    args = parser.parse_args(argv)
    from dazoo.cli import quiet_tensorflow

    quiet_tensorflow()  # TensorFlow's import-time log lines, as the dazoo command hides them

    import dazoo
    from dazoo.io import stem
    from dazoo.qc import label_overlay, registration_overlay

    os.makedirs(args.output, exist_ok=True)
    pipeline = dazoo.load(args.preset)
    segmentation = pipeline.segment(args.scan)
    picture = label_overlay(args.scan, segmentation.labels,
                            os.path.join(args.output, f"{stem(args.scan)}_seg.png"),
                            names=pipeline.label_names)
    print(picture)
    if args.fixed:
        result = pipeline.register(args.scan, args.fixed)
        picture = registration_overlay(
            args.fixed, result.moved, result.displacement,
            os.path.join(args.output, f"{stem(args.scan)}_to_{stem(args.fixed)}.png"))
        print(picture)
    return 0


if __name__ == "__main__":
    sys.exit(main())
