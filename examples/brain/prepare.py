"""Stage 1 of the `brain` preset: split, affine population template, preprocessed cache.

    python examples/brain/prepare.py --data ../shared/data/mindboggle-oasis-trt20 \
        --work work_cache/brain

Writes into --work (never into the repository's tracked files):
  split.json            training / validation subjects (seed 0, 12 / 3)
  template.nii.gz       affine population template of the training subjects (2 mm, 80x96x80)
  preprocess.json       the preset's preprocessing description (template path relative)
  cache/<subject>.npz   each subject on the model grid: image, label ids, preprocessing chain

The label maps keep their ids (1002..2035); mapping to classes happens at training time.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

from dazoo import io
from dazoo.preprocess import PreprocessConfig, Preprocessor, build_affine_template

GRID = {"voxel_size": [2.0, 2.0, 2.0], "shape": [80, 96, 80], "orientation": "RAS"}
INTENSITY = {"method": "percentile", "lower": 0.5, "upper": 99.5, "nonzero": True}
SEED = 0
N_VALIDATION = 3


def subjects(data: pathlib.Path) -> list[str]:
    return sorted(p.name for p in data.iterdir() if (p / "t1weighted_brain.nii.gz").exists())


def split(names: list[str]) -> dict:
    order = np.random.default_rng(SEED).permutation(len(names))
    chosen = [names[i] for i in order]
    return {"seed": SEED, "method": "numpy default_rng(seed).permutation of sorted names",
            "train": sorted(chosen[N_VALIDATION:]), "validation": sorted(chosen[:N_VALIDATION])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/mindboggle-oasis-trt20")
    parser.add_argument("--work", default="work_cache/brain")
    args = parser.parse_args(argv)
    data, work = pathlib.Path(args.data), pathlib.Path(args.work)
    (work / "cache").mkdir(parents=True, exist_ok=True)

    names = subjects(data)
    plan = split(names)
    (work / "split.json").write_text(json.dumps(plan, indent=1))
    print(f"{len(names)} subjects: train {plan['train']}, validation {plan['validation']}")

    template_path = work / "template.nii.gz"
    if not template_path.exists():
        start = time.perf_counter()
        template = build_affine_template(
            [data / n / "t1weighted_brain.nii.gz" for n in plan["train"]],
            voxel_size=GRID["voxel_size"], shape=GRID["shape"], orientation=GRID["orientation"],
            iterations=2, intensity=INTENSITY,
        )
        io.write_image(template, template_path)
        print(f"template built in {time.perf_counter() - start:.0f} s")

    config = PreprocessConfig(**GRID, intensity=INTENSITY, template="template.nii.gz",
                              alignment="affine", metric="correlation")
    (work / "preprocess.json").write_text(config.to_json())
    pre = Preprocessor(config, root=work)
    for name in names:
        out = work / "cache" / f"{name}.npz"
        if out.exists():
            continue
        start = time.perf_counter()
        image = pre.apply(data / name / "t1weighted_brain.nii.gz")
        labels = pre.apply_labels(data / name / "labels.DKT31.manual.nii.gz", image)
        tmp = out.with_name(f".{out.name}.tmp.npz")  # atomic: no truncated cache entry
        np.savez_compressed(tmp, image=image.array, labels=labels.astype(np.int16),
                            chain=json.dumps(image.chain()))
        os.replace(tmp, out)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
