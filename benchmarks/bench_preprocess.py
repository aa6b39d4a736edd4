"""Preprocessing time for a real 256x256x160 brain: read + affine alignment + resampling.

Uses two Mindboggle subjects from ``../shared/data`` (relative to the repository root): the
first is preprocessed, the second serves as the template (the preset's reference image). The
steps are those of :meth:`dazoo.preprocess.Preprocessor.apply`, timed one by one; the script
checks that its result equals ``apply``'s and prints the median of ``--runs`` runs.

Usage::

    python benchmarks/bench_preprocess.py [--data ../shared/data] [--runs 5]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dazoo import io  # noqa: E402
from dazoo import preprocess as pp  # noqa: E402


def timed_apply(pre: pp.Preprocessor, path: str) -> tuple[dict, pp.Preprocessed]:
    """``pre.apply(path)``, step by step, with the seconds of each step."""
    times = {}
    start = time.perf_counter()
    volume = io.read_image(path)
    times["read"] = time.perf_counter() - start

    start = time.perf_counter()
    alignment = pre.align(volume)
    times["align"] = time.perf_counter() - start

    start = time.perf_counter()
    offset, scale = pp.intensity_parameters(volume.array, pre.config.intensity, name=path)
    affine = pre.model_grid(volume)
    array = pp.resample(volume, affine, pre.config.shape, transform=alignment, order=1,
                        cval=float(volume.array.min()))
    array = pp.normalise_intensity(array, offset, scale,
                                   clip=pre.config.intensity["method"] == "percentile")
    times["resample+normalise"] = time.perf_counter() - start
    times["total"] = sum(times.values())
    result = pp.Preprocessed(array=array, affine=affine, native_shape=volume.shape,
                             native_affine=volume.affine, alignment=alignment,
                             intensity=(offset, scale), source=path)
    return times, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--subject", default="OASIS-TRT-20-10")
    parser.add_argument("--template", default="OASIS-TRT-20-11")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 192, 160))
    parser.add_argument("--alignment", default="affine", choices=("affine", "rigid", "none"))
    args = parser.parse_args(argv)

    folder = pathlib.Path(args.data) / "mindboggle-oasis-trt20"
    image = folder / args.subject / "t1weighted_brain.nii.gz"
    template = folder / args.template / "t1weighted_brain.nii.gz"
    if not image.is_file() or not template.is_file():
        print(f"data not found under {folder}", file=sys.stderr)
        return 1
    config = pp.PreprocessConfig(voxel_size=(1.0, 1.0, 1.0), shape=tuple(args.shape),
                                 template=str(template), alignment=args.alignment)
    pre = pp.Preprocessor(config)
    pre.template  # read the template once, outside the timings (a preset keeps it loaded)

    runs = []
    for _ in range(args.runs):
        times, result = timed_apply(pre, str(image))
        runs.append(times)
    reference = pre.apply(str(image))
    assert np.array_equal(result.array, reference.array), "benchmark differs from apply()"
    assert np.allclose(result.alignment, reference.alignment)

    native = io.read_image(str(image))
    import SimpleITK as sitk

    print(f"image: {image} {native.shape}, voxel {native.spacing.tolist()} mm")
    print(f"template: {template}; model grid {config.shape} at {config.voxel_size} mm, "
          f"alignment={config.alignment}, metric={config.metric}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"SimpleITK threads {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}, "
          f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    print(f"median of {args.runs} runs (min-max), seconds:")
    for step in runs[0]:
        values = [r[step] for r in runs]
        median = statistics.median(values)
        print(f"  {step:20s} {median:6.2f}  ({min(values):.2f}-{max(values):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
