"""Speed and memory of DeepAtlas training and inference (a benchmark script, not a test).

For each configuration, a fresh process builds a DeepAtlas (VoxelMorph's default VxmDense,
diffeomorphic with 7 integration steps at half resolution, and the default SegmentationNet)
and times, after warm-up:

* a registration step and a segmentation step of joint training (batch 1, half of the
  images unlabelled so every loss term is computed), and their sum: one "joint reg+seg
  step", the unit of VoxelMorph's reference figure;
* inference: registration of a pair plus segmentation of one image.

It prints the median seconds over the timed steps and the peak resident memory of that
process (``ru_maxrss``), one line per configuration, then a table.

Usage::

    python benchmarks/bench_training.py                  # 80x96x80 and 160x192x160, K=32
    python benchmarks/bench_training.py --shapes 80x96x80 --classes 63 --jit --steps 5
    python benchmarks/bench_training.py --precision seg_bfloat16     # segmenter in bf16

Measured numbers quoted in the docs come from this script; rerun it on your machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _measure(shape, classes, steps, jit, precision, inference_only):
    import keras
    import numpy as np

    if precision in ("mixed_float16", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(precision)
    from dazoo import DeepAtlas, RegistrationNet, SegmentationNet

    rng = np.random.default_rng(0)
    batch = {
        "moving": rng.random((1, *shape, 1), dtype=np.float32),
        "fixed": rng.random((1, *shape, 1), dtype=np.float32),
        "moving_labels": rng.integers(0, classes, (1, *shape)).astype(np.int32),
        "fixed_labels": rng.integers(0, classes, (1, *shape)).astype(np.int32),
        "moving_labelled": np.ones(1, np.float32),
        "fixed_labelled": np.zeros(1, np.float32),
    }
    reg = RegistrationNet(shape)
    seg = SegmentationNet(shape, classes, dtype="mixed_bfloat16"
                          if precision == "seg_bfloat16" else None)
    result = {"shape": "x".join(map(str, shape)), "classes": classes, "jit": jit,
              "precision": precision}

    if not inference_only:
        model = DeepAtlas(reg, seg, registration_steps=1, segmentation_steps=1)
        model.compile(reg_optimizer=keras.optimizers.Adam(1e-4),
                      seg_optimizer=keras.optimizers.Adam(1e-4), jit_compile=jit)
        times = {True: [], False: []}
        for step in range(2 * (steps + 2)):
            registration = bool(model.is_registration_turn())
            start = time.perf_counter()
            model.train_on_batch(batch)
            if step >= 4:  # two warm-up steps of each phase (tracing/compilation)
                times[registration].append(time.perf_counter() - start)
            # What is measured so far, in case a later step is killed (out of memory).
            print("PROGRESS " + json.dumps({
                "phase": "reg" if registration else "seg", "step": step,
                "seconds": time.perf_counter() - start,
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}),
                flush=True)
        result["reg_step_s"] = statistics.median(times[True])
        result["seg_step_s"] = statistics.median(times[False])
        result["joint_step_s"] = result["reg_step_s"] + result["seg_step_s"]
    else:
        moving, fixed = batch["moving"], batch["fixed"]
        timings = []
        for step in range(steps + 1):
            start = time.perf_counter()
            reg.predict_on_batch([moving, fixed])
            seg.predict_on_batch(fixed)
            if step >= 1:
                timings.append(time.perf_counter() - start)
        result["inference_s"] = statistics.median(timings)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def _child(args):
    shape = tuple(int(n) for n in args.child.split("x"))
    result = _measure(shape, args.classes, args.steps, args.jit, args.precision,
                      args.inference)
    print("RESULT " + json.dumps(result), flush=True)


def _run_child(shape, args, inference):
    cmd = [sys.executable, __file__, "--child", shape, "--classes", str(args.classes),
           "--steps", str(args.steps), "--precision", args.precision]
    if args.jit:
        cmd.append("--jit")
    if inference:
        cmd.append("--inference")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    progress = [json.loads(line[9:]) for line in proc.stdout.splitlines()
                if line.startswith("PROGRESS ")]
    if proc.returncode in (-9, 137):
        reason = "killed (SIGKILL: out of memory)"
    else:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines()
                if not line.startswith(("I0000", "W0000", "E0000"))][-2:]
        reason = f"exit {proc.returncode}: " + " | ".join(tail)
    if progress:
        last = progress[-1]
        reason += (f" during a {'registration' if last['phase'] == 'seg' else 'segmentation'}"
                   f" step after {len(progress)} completed steps; completed steps: "
                   + ", ".join(f"{p['phase']} {p['seconds']:.1f} s" for p in progress)
                   + f"; peak {max(p['peak_rss_gib'] for p in progress):.1f} GiB before that")
    return {"shape": shape, "error": reason}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="80x96x80,160x192x160",
                        help="comma-separated training grids (default: 80x96x80,160x192x160)")
    parser.add_argument("--inference-shape", default="160x192x160",
                        help="grid of the inference timing ('' to skip)")
    parser.add_argument("--classes", type=int, default=32,
                        help="segmentation classes incl. background (default 32: the 31 DKT "
                             "regions merged left/right, as the DeepAtlas paper)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    parser.add_argument("--jit", action="store_true", help="XLA (jit_compile=True)")
    parser.add_argument("--precision", default="float32",
                        choices=("float32", "seg_bfloat16", "mixed_float16", "mixed_bfloat16"),
                        help="global policy, or seg_bfloat16: only the segmenter in bfloat16")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--inference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)

    import platform

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}", flush=True)
    rows = []
    jobs = [(s, False) for s in args.shapes.split(",") if s]
    if args.inference_shape:
        jobs.append((args.inference_shape, True))
    for shape, inference in jobs:
        row = _run_child(shape, args, inference)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| grid | K | jit | precision | reg step s | seg step s | joint reg+seg s "
          "| inference s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda k: f"{r[k]:.2f}" if k in r else "-"  # noqa: E731
        if "error" in r:
            print(f"| {r['shape']} | {args.classes} | {args.jit} | {args.precision} | "
                  f"{r['error']} |")
            continue
        print(f"| {r['shape']} | {r['classes']} | {r['jit']} | {r['precision']} | "
              f"{fmt('reg_step_s')} | {fmt('seg_step_s')} | {fmt('joint_step_s')} | "
              f"{fmt('inference_s')} | {r['peak_rss_gib']:.1f} |")


if __name__ == "__main__":
    main()
