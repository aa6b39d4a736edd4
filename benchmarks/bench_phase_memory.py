"""Peak memory and seconds of ONE DeepAtlas training phase, alone in this process (a benchmark
script, not a test).

``bench_training.py`` runs both phases in one process, where the allocator's pool left by one
phase serves the other; this script builds the same configuration (VoxelMorph's default
VxmDense, dazoo's default SegmentationNet, batch 1, the moving image labelled and the fixed one
not) and runs only registration steps or only segmentation steps, printing after each step the
resident memory now (``rss``) and the process's peak (``ru_maxrss``), in GiB.

Usage::

    python benchmarks/bench_phase_memory.py --shape 160x192x160 --classes 63 --phase seg \\
        --recompute 1
    # TensorFlow's oneDNN build pools memory (a BFC allocator); to compare with the system
    # allocator and a fixed mmap threshold (large buffers returned to the system at once):
    TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1 python benchmarks/bench_phase_memory.py --mmap-threshold 131072
"""
from __future__ import annotations

import argparse
import ctypes
import json
import resource
import time


def _rss_gib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="80x96x80")
    parser.add_argument("--classes", type=int, default=63)
    parser.add_argument("--phase", choices=("reg", "seg"), default="seg")
    parser.add_argument("--recompute", type=int, default=0,
                        help="DeepAtlas.compile(recompute=N) (default 0)")
    parser.add_argument("--precision", choices=("float32", "mixed_bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="glibc mallopt(M_MMAP_THRESHOLD, N) before TensorFlow starts "
                             "(0: leave malloc as it is)")
    args = parser.parse_args(argv)
    if args.mmap_threshold:
        ctypes.CDLL("libc.so.6").mallopt(-3, args.mmap_threshold)  # M_MMAP_THRESHOLD

    import keras

    from bench_training import benchmark_batch
    from dazoo import DeepAtlas, RegistrationNet, SegmentationNet

    shape, k = tuple(int(n) for n in args.shape.split("x")), args.classes
    batch = benchmark_batch(shape, k)
    dtype = None if args.precision == "float32" else args.precision
    model = DeepAtlas(RegistrationNet(shape, dtype=dtype), SegmentationNet(shape, k, dtype=dtype),
                      registration_steps=1, segmentation_steps=1)
    model.compile(reg_optimizer=keras.optimizers.Adam(1e-4),
                  seg_optimizer=keras.optimizers.Adam(1e-4), recompute=args.recompute)
    base = {"shape": args.shape, "classes": k, "phase": args.phase, "precision": args.precision,
            "recompute": args.recompute, "mmap_threshold": args.mmap_threshold}
    print(json.dumps({**base, "step": None, "rss_gib": round(_rss_gib(), 3)}), flush=True)
    # The phase follows the optimizers' iteration counts (a cycle of 1 + 1): counting a step
    # of the other network before each step keeps this phase's turn.
    skipped = model.seg_optimizer if args.phase == "reg" else model.reg_optimizer
    if args.phase == "seg":
        skipped.iterations.assign(1)
    for step in range(args.steps):
        assert bool(model.is_registration_turn()) == (args.phase == "reg")
        start = time.perf_counter()
        model.train_on_batch(batch)
        seconds = time.perf_counter() - start
        print(json.dumps({**base, "step": step, "seconds": round(seconds, 2),
                          "rss_gib": round(_rss_gib(), 3),
                          "peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                            / 2**20, 3)}), flush=True)
        skipped.iterations.assign_add(1)


if __name__ == "__main__":
    main()
