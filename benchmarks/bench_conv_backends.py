"""One 3D convolution's forward + backward pass under each Keras backend, side by side.

The joint training step is mostly 3D convolutions and their gradients, so this says quickly
which backend trains faster on a CPU. Measured on an AMD EPYC with AVX2 only (2 cores, no
AVX512), 16 -> 16 channels on 112 x 128 x 112 (the brain v3 grid's first level), float32:
TensorFlow 3.32 s, torch 0.90 s per pass; the whole brain v3 joint step ~108 s vs ~48 s.
On an AMD EPYC with AVX512 and AVX512-BF16 (2 cores, beside a training run, `--precisions
float32,mixed_bfloat16`), the same pass: TensorFlow 0.44 s in float32 and 0.49 s in
mixed_bfloat16, torch 1.31 s and 1.06 s: torch 2.96x TensorFlow's time, bfloat16 no faster
(so the brain v3 run went back to TensorFlow, in float32: ~20 s per step alone).

    python benchmarks/bench_conv_backends.py                       # tensorflow and torch
    python benchmarks/bench_conv_backends.py --shape 80x96x80 --channels 32 --backends torch
    python benchmarks/bench_conv_backends.py --precisions float32,mixed_bfloat16

Each backend runs in its own process (Keras fixes its backend at import); one JSON line per
backend, then the ratio to the first. Compare figures from one run only: absolute times on a
shared machine drift.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


BACKENDS = ("tensorflow", "torch", "jax")


def _child(backend: str, shape, channels: int, repeats: int, precision: str) -> dict:
    if backend not in BACKENDS:
        raise SystemExit(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    os.environ["KERAS_BACKEND"] = backend
    import time

    import keras
    import numpy as np

    keras.config.set_dtype_policy(precision)  # mixed_bfloat16: bfloat16 arithmetic

    x = np.random.default_rng(0).random((1, *shape, channels), dtype=np.float32)
    layer = keras.layers.Conv3D(channels, 3, padding="same")
    if backend == "torch":
        import torch

        inputs = torch.tensor(x, requires_grad=True)
        layer(inputs)

        def step():
            layer(inputs).float().sum().backward()
    elif backend == "tensorflow":
        import tensorflow as tf

        inputs = tf.constant(x)
        layer(inputs)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                total = tf.reduce_sum(tf.cast(layer(inputs), tf.float32))
            return tape.gradient(total, [inputs, *layer.trainable_variables])
    elif backend == "jax":
        import jax

        layer.build(x.shape)
        weights = [v.value for v in layer.trainable_variables]

        def total(w, data):
            return layer.stateless_call(w, [], data)[0].astype("float32").sum()

        grad = jax.jit(jax.grad(total, argnums=(0, 1)))

        def step():
            jax.block_until_ready(grad(weights, x))
    step()  # tracing, allocation
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    seconds = (time.perf_counter() - started) / repeats
    return {"backend": backend, "precision": precision, "shape": list(shape),
            "channels": channels, "seconds_per_pass": round(seconds, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="tensorflow,torch",
                        help="comma-separated Keras backends (default: tensorflow,torch)")
    parser.add_argument("--shape", default="112x128x112", help="volume shape (default: the "
                        "brain v3 grid)")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", default="float32",
                        help="comma-separated Keras dtype policies, each run on every backend "
                             "(e.g. float32,mixed_bfloat16: bfloat16 is fast only where the "
                             "CPU has it in hardware)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    if args.child:
        print(json.dumps(_child(args.child, shape, args.channels, args.repeats,
                                args.precision)))
        return 0
    precisions = args.precisions.split(",")

    def label(row):
        return row["backend"] + (f" {row['precision']}" if len(precisions) > 1 else "")

    results = []
    for precision in precisions:
        for backend in args.backends.split(","):
            done = subprocess.run([sys.executable, __file__, "--child", backend, "--shape",
                                   args.shape, "--channels", str(args.channels), "--repeats",
                                   str(args.repeats), "--precision", precision],
                                  capture_output=True, text=True)
            if done.returncode:
                print(json.dumps({"backend": backend, "precision": precision,
                                  "error": done.stderr.strip()[-300:]}))
                continue
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]))
    if len(results) > 1:
        first = results[0]
        for r in results[1:]:
            print(f"{label(r)}: {r['seconds_per_pass'] / first['seconds_per_pass']:.2f}x "
                  f"{label(first)}'s time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
