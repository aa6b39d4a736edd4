"""How far a U-Net's bfloat16 probabilities stray from float32's with the same weights.

    python benchmarks/bench_bfloat16_error.py [SEEDS]
    TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/bench_bfloat16_error.py   # emulated kernels

Per weight seed: the largest, 99th-percentile and mean absolute difference of the
probabilities of ``SegmentationNet((16, 16, 16), 3)`` (the net of
``tests/test_models.py::test_segmentation_in_mixed_bfloat16_matches_float32_weights``) on a
uniform-noise image, and the fraction of voxels with the same most probable class.
"""
from __future__ import annotations

import sys

import keras
import numpy as np

from dazoo import SegmentationNet

SHAPE = (16, 16, 16)


def main(seeds: int = 6) -> None:
    rows = []
    image = np.random.default_rng(0).random((1, *SHAPE, 1)).astype(np.float32)
    for seed in range(seeds):
        keras.utils.set_random_seed(seed)
        mixed = SegmentationNet(SHAPE, 3, dtype="mixed_bfloat16")
        plain = SegmentationNet(SHAPE, 3)
        plain.set_weights(mixed.get_weights())
        p, q = mixed.predict(image, verbose=0), plain.predict(image, verbose=0)
        d = np.abs(p - q)
        rows.append((d.max(), np.percentile(d, 99), d.mean(), (p.argmax(-1) == q.argmax(-1)).mean()))
        print(f"seed {seed}: max {rows[-1][0]:.4f} p99 {rows[-1][1]:.4f} mean {rows[-1][2]:.5f} "
              f"argmax agree {rows[-1][3]:.4f}", flush=True)
    r = np.array(rows)
    print(f"worst: max {r[:, 0].max():.4f} p99 {r[:, 1].max():.4f} mean {r[:, 2].max():.5f} "
          f"min argmax agree {r[:, 3].min():.4f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
