"""Speed and memory of DeepAtlas training and inference, beside VoxelMorph's own TF step
(a benchmark script, not a test).

For each configuration a fresh process builds a DeepAtlas (VoxelMorph's default VxmDense,
diffeomorphic with 7 integration steps at half resolution, and a SegmentationNet) and times,
after two warm-up steps of each phase:

* a registration step and a segmentation step of the default (strictly alternating) joint
  training, batch 1, the moving image labelled and the fixed one not, so that every loss
  term runs (the anatomy loss against the segmenter's prediction in the registration step,
  the supervised loss and the anatomy loss in the segmentation step); their sum is
  ``joint_step_s``, one update of each network: the unit of VoxelMorph's reference step;
* with ``--mode simultaneous``: one step of ``DeepAtlas(mode="simultaneous")``, which
  updates both networks from one forward pass of each (``joint_step_s``, no per-phase times);
* inference: registration of a pair plus segmentation of one image.

It prints one JSON line per configuration (``shape``, ``classes``, ``precision``,
``segmenter``, ``reg_step_s``, ``seg_step_s``, ``joint_step_s``, ``peak_rss_gib``: the
process's ``ru_maxrss``; or ``inference_s``), then a Markdown table. With ``--reference
PYTHON`` (the interpreter of ``../shared/bench/voxelmorph-reference``'s virtual environment)
it runs VoxelMorph 0.2's own joint step at each grid it knows (80x96x80, 160x192x160;
5 classes, float32) in the same run, before and after dazoo's configurations, and adds
``reference_step_s`` (the mean of the two; ``reference_runs_s`` both, ``reference_drift``
end / start) and ``ratio`` (dazoo / VoxelMorph) to the rows of that grid. Rows are printed
as ``# `` lines as they are measured (kept if the run is cut off), and as JSON lines with
their ratios once the reference has run again. ``classes_ratio`` compares each row with the row of
the fewest classes of the same grid and precision.

Segmenters: ``default`` is dazoo's default SegmentationNet (features (16,32,64,64) /
(64,64,32,32,16,16), instance normalisation); ``voxelmorph`` is the reference's network
(VoxelMorph's Unet features, no normalisation), for a like-for-like ratio.

Usage::

    python benchmarks/bench_training.py --json \\
        --reference ~/.cache/dazoo-vxm-reference/bin/python     # the issue's configurations
    python benchmarks/bench_training.py --shapes 80x96x80 --classes 5 --precision float32,mixed_bfloat16

Measured numbers quoted in the docs come from this script; rerun it on your machine.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

REFERENCE_STEP = (pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "bench"
                  / "voxelmorph-reference" / "step.py")
REFERENCE_SIZES = {"80x96x80": "80", "160x192x160": "160"}
VOXELMORPH_FEATURES = ((16, 32, 32, 32), (32, 32, 32, 32, 32, 16, 16))
PRECISIONS = ("float32", "seg_bfloat16", "mixed_bfloat16")


def benchmark_batch(shape, classes):
    """The benchmarks' batch of one random pair, the moving image labelled and the fixed one
    not (so that every loss term runs)."""
    import numpy as np

    rng = np.random.default_rng(0)
    return {
        "moving": rng.random((1, *shape, 1), dtype=np.float32),
        "fixed": rng.random((1, *shape, 1), dtype=np.float32),
        "moving_labels": rng.integers(0, classes, (1, *shape)).astype(np.int32),
        "fixed_labels": rng.integers(0, classes, (1, *shape)).astype(np.int32),
        "moving_labelled": np.ones(1, np.float32),
        "fixed_labelled": np.zeros(1, np.float32),
    }


def _measure(shape, classes, steps, precision, segmenter, inference_only, mode="joint",
             fused=True, recompute=0):
    import keras

    from dazoo import DeepAtlas, RegistrationNet, SegmentationNet

    batch = benchmark_batch(shape, classes)
    reg = RegistrationNet(shape, dtype="mixed_bfloat16" if precision == "mixed_bfloat16"
                          else None)
    seg_options = {"dtype": None if precision == "float32" else "mixed_bfloat16"}
    if segmenter == "voxelmorph":
        seg_options.update(features=VOXELMORPH_FEATURES, normalization=None)
    seg = SegmentationNet(shape, classes, **seg_options)
    result = {"shape": "x".join(map(str, shape)), "classes": classes, "precision": precision,
              "segmenter": segmenter, "recompute": recompute}

    if not inference_only and mode == "simultaneous":
        result["mode"] = mode
        model = DeepAtlas(reg, seg, mode="simultaneous")
        model.compile(reg_optimizer=keras.optimizers.Adam(1e-4),
                      seg_optimizer=keras.optimizers.Adam(1e-4), recompute=recompute)
        model.objective.fast = fused  # the objective is made by compile
        timings = []
        for step in range(steps + 2):
            start = time.perf_counter()
            model.train_on_batch(batch)
            if step >= 2:  # two warm-up steps (tracing)
                timings.append(time.perf_counter() - start)
            print("PROGRESS " + json.dumps({
                "phase": "both", "step": step, "seconds": time.perf_counter() - start,
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}),
                flush=True)
        result["joint_step_s"] = statistics.median(timings)
    elif not inference_only:
        result["mode"] = "joint"
        model = DeepAtlas(reg, seg, registration_steps=1, segmentation_steps=1)
        model.compile(reg_optimizer=keras.optimizers.Adam(1e-4),
                      seg_optimizer=keras.optimizers.Adam(1e-4), recompute=recompute)
        model.objective.fast = fused  # the objective is made by compile
        times = {True: [], False: []}
        peaks = {}
        for step in range(2 * (steps + 2)):
            registration = bool(model.is_registration_turn())
            start = time.perf_counter()
            model.train_on_batch(batch)
            if step >= 4:  # two warm-up steps of each phase (tracing)
                times[registration].append(time.perf_counter() - start)
            if step < 2:  # ru_maxrss only grows: after a reg step, then after a seg step
                peaks["reg" if registration else "seg"] = (
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
            # What is measured so far, in case a later step is killed (out of memory).
            print("PROGRESS " + json.dumps({
                "phase": "reg" if registration else "seg", "step": step,
                "seconds": time.perf_counter() - start,
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}),
                flush=True)
        result["reg_step_s"] = statistics.median(times[True])
        result["seg_step_s"] = statistics.median(times[False])
        result["joint_step_s"] = result["reg_step_s"] + result["seg_step_s"]
        # Peak memory of the process after its first registration step (that phase's peak)
        # and after its first segmentation step (the larger of the two phases' peaks).
        result["peak_after_reg_gib"] = peaks.get("reg")
        result["peak_after_seg_gib"] = peaks.get("seg")
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
    result = _measure(shape, int(args.classes), args.steps, args.precision, args.segmenter,
                      args.inference, args.mode, args.fused == "on", int(args.recompute))
    print("RESULT " + json.dumps(result), flush=True)


def _run_child(shape, classes, precision, segmenter, args, inference, mode="joint",
               recompute=0):
    cmd = [sys.executable, __file__, "--child", shape, "--classes", str(classes),
           "--steps", str(args.steps), "--precision", precision, "--segmenter", segmenter,
           "--mode", mode, "--fused", args.fused, "--recompute", str(recompute)]
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
        following = {"seg": "registration", "reg": "segmentation", "both": "simultaneous"}
        reason += (f" during a {following[last['phase']]}"
                   f" step after {len(progress)} completed steps; completed steps: "
                   + ", ".join(f"{p['phase']} {p['seconds']:.1f} s" for p in progress)
                   + f"; peak {max(p['peak_rss_gib'] for p in progress):.1f} GiB before that")
    return {"shape": shape, "classes": classes, "precision": precision,
            "segmenter": segmenter, "mode": mode, "recompute": recompute,
            "error": reason}


def _run_reference(python, shape, steps):
    """VoxelMorph 0.2's joint step (``step.py``) in its own interpreter: its median seconds
    and peak memory, or an error."""
    size = REFERENCE_SIZES[shape]
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([python, str(REFERENCE_STEP), size, str(steps)], capture_output=True,
                          text=True, env=env)
    match = re.search(r"median ([0-9.]+)s .*peakRSS=([0-9.]+)GiB", proc.stdout)
    if not match:
        reason = ("killed (SIGKILL: out of memory)" if proc.returncode in (-9, 137)
                  else f"exit {proc.returncode}: " + (proc.stderr or proc.stdout).strip()[-300:])
        return {"shape": shape, "reference": "voxelmorph-0.2", "error": reason}
    return {"shape": shape, "reference": "voxelmorph-0.2", "classes": 5,
            "precision": "float32", "reference_step_s": float(match.group(1)),
            "peak_rss_gib": float(match.group(2))}


def _table(rows):
    lines = ["| grid | K | precision | segmenter | mode | reg step s | seg step s | joint s "
             "| VoxelMorph s | ratio | vs fewest K | inference s | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def fmt(key, r=r):
            return f"{r[key]:.2f}" if key in r else "-"
        if "reference" in r:
            name = f"{r['shape']} VoxelMorph 0.2 step (K=5, float32)"
            runs = r.get("reference_runs_s", [])
            body = (r["error"] if "error" in r
                    else f"{fmt('reference_step_s')}"
                    + (f" (start {runs[0]:.2f}, end {runs[1]:.2f})" if len(runs) == 2 else "")
                    + f" | {fmt('peak_rss_gib')}")
            lines.append(f"| {name} | {body} |")
            continue
        mode = r.get("mode", "inference" if "inference_s" in r else "joint")
        if r.get("recompute"):
            mode += f" (recompute {r['recompute']})"
        head = (f"| {r['shape']} | {r['classes']} | {r['precision']} | {r['segmenter']} "
                f"| {mode} | ")
        if "error" in r:
            lines.append(head + r["error"] + " |")
            continue
        lines.append(head + " | ".join(fmt(k) for k in (
            "reg_step_s", "seg_step_s", "joint_step_s", "reference_step_s", "ratio",
            "classes_ratio", "inference_s", "peak_rss_gib")) + " |")
    return "\n".join(lines)


def _with_ratios(references, measured):
    """The rows to print: one per reference grid (the mean of its runs, ``reference_runs_s``,
    ``reference_drift`` = last / first run, the largest peak), the references that failed,
    then each measured row with ``reference_step_s`` and ``ratio`` against that mean and
    ``classes_ratio`` against the row of fewest classes of the same configuration."""
    rows = []
    steps = {}
    for r in references:
        if "reference_step_s" in r:
            steps.setdefault(r["shape"], []).append(r["reference_step_s"])
    for shape, values in steps.items():
        row = {"shape": shape, "reference": "voxelmorph-0.2", "classes": 5,
               "precision": "float32", "reference_step_s": statistics.mean(values),
               "reference_runs_s": values,
               "peak_rss_gib": max(r["peak_rss_gib"] for r in references
                                   if r.get("shape") == shape and "peak_rss_gib" in r)}
        if len(values) >= 2:
            row["reference_drift"] = values[-1] / values[0]
        rows.append(row)
    rows += [r for r in references if "error" in r]
    same = ("precision", "segmenter", "mode", "recompute")
    defaults = {"mode": "joint", "recompute": 0}
    for row in measured:
        row = dict(row)
        if "joint_step_s" in row:
            shape = row["shape"]
            if shape in steps:
                row["reference_step_s"] = statistics.mean(steps[shape])
                row["ratio"] = row["joint_step_s"] / row["reference_step_s"]
            fewest = [r for r in rows if r.get("shape") == shape and "joint_step_s" in r
                      and all(r.get(k, defaults.get(k)) == row.get(k, defaults.get(k))
                              for k in same)]
            if fewest:
                base = min(fewest, key=lambda r: r["classes"])
                row["classes_ratio"] = row["joint_step_s"] / base["joint_step_s"]
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="80x96x80,160x192x160",
                        help="comma-separated training grids (default: 80x96x80,160x192x160)")
    parser.add_argument("--classes", default="5,63",
                        help="comma-separated class counts incl. background at the first grid "
                             "(default 5,63: the reference's and the brain preset's)")
    parser.add_argument("--large-classes", type=int, default=63,
                        help="class count of the other grids (default 63)")
    parser.add_argument("--precision", default="float32",
                        help="comma-separated: float32, seg_bfloat16 (segmenter in "
                             "mixed_bfloat16), mixed_bfloat16 (both networks)")
    parser.add_argument("--segmenter", default="default",
                        help="comma-separated: default, voxelmorph (the reference's U-Net)")
    parser.add_argument("--mode", default="joint",
                        help="comma-separated: joint (the paper's alternation: one registration "
                             "and one segmentation step), simultaneous (one step updating both "
                             "networks from shared passes)")
    parser.add_argument("--fused", default="on", choices=("on", "off"),
                        help="the objective's fast paths (segmentation losses from the "
                             "segmenter's features in chunks, dazoo.ops.softmax_class_sums; "
                             "label-overlap sums; default on) or the plain computation from "
                             "full probability and one-hot maps (off: the comparison; "
                             "Objective(fast=False))")
    parser.add_argument("--recompute", default="0",
                        help="comma-separated: U-Net levels recomputed in the backward pass "
                             "(DeepAtlas.compile(recompute=N); 0: none, the default)")
    parser.add_argument("--inference-shape", default="160x192x160",
                        help="grid of the inference timing ('' to skip)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per phase")
    parser.add_argument("--reference", metavar="PYTHON",
                        help="python of the VoxelMorph 0.2 reference environment: run its step "
                             "in this run and print ratios")
    parser.add_argument("--reference-steps", type=int, default=6)
    parser.add_argument("--reference-shapes", default="80x96x80",
                        help="grids at which to run the reference (default 80x96x80; "
                             "160x192x160 runs out of memory in 24 GiB)")
    parser.add_argument("--json", action="store_true", help="print only the JSON lines and "
                        "the table (no progress lines)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--inference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)
    precisions = args.precision.split(",")
    recomputes = [int(r) for r in args.recompute.split(",")]
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        parser.error(f"--precision: unknown {bad}; choose from {list(PRECISIONS)}")

    from dazoo.training.precision import BFLOAT16_CPU_FLAGS, cpu_flags  # no backend import

    native = sorted(cpu_flags() & set(BFLOAT16_CPU_FLAGS))
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}, bfloat16 in hardware: "
          f"{', '.join(native) or 'none (emulated: slower than float32)'}", flush=True)
    rows = []
    shapes = [s for s in args.shapes.split(",") if s]
    reference_shapes = ([s for s in args.reference_shapes.split(",") if s in REFERENCE_SIZES]
                        if args.reference else [])

    def run_references(when):
        found = []
        for shape in reference_shapes:
            row = _run_reference(args.reference, shape, args.reference_steps)
            row["when"] = when
            print("# " + json.dumps(row), flush=True)
            found.append(row)
        return found

    # The reference runs before and after dazoo's jobs; ratios use the mean of the two, and
    # its drift over the run (end / start) is printed: these machines' speed changes by
    # tens of per cent within an hour.
    references = run_references("start")
    jobs = []
    for index, shape in enumerate(shapes):
        counts = ([int(k) for k in args.classes.split(",")] if index == 0
                  else [args.large_classes])
        for precision in precisions:
            for segmenter in args.segmenter.split(","):
                for mode in args.mode.split(","):
                    for recompute in recomputes:
                        jobs += [(shape, k, precision, segmenter, False, mode, recompute)
                                 for k in counts]
    if args.inference_shape:
        jobs += [(args.inference_shape, args.large_classes, p, "default", True, "joint", 0)
                 for p in precisions]
    measured = []
    for shape, classes, precision, segmenter, inference, mode, recompute in jobs:
        row = _run_child(shape, classes, precision, segmenter, args, inference, mode, recompute)
        print("# " + json.dumps(row), flush=True)  # as measured, in case the run is cut off
        measured.append(row)
    if references:
        references += run_references("end")
    for row in _with_ratios(references, measured):
        print(json.dumps(row), flush=True)
        rows.append(row)
    print()
    print(_table(rows))


if __name__ == "__main__":
    main()
