"""Stage 3 of the `brain` preset: write pretrained/brain/ from a training checkpoint.

    python examples/brain/package.py --work work_cache/brain \
        --checkpoint work_cache/brain/run/checkpoint.keras --out pretrained/brain \
        [--evaluation work_cache/brain/evaluation.json]

The segmenter trained with bfloat16 arithmetic is stored for float32 inference (same
weights), which runs on any CPU. The model card (metadata.json + README.md) gets the training
record from the run folder (args.json, train.log) and, when given, the measured evaluation.
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import re
import sys

DKT31_NAMES = {
    2: "caudalanteriorcingulate", 3: "caudalmiddlefrontal", 5: "cuneus", 6: "entorhinal",
    7: "fusiform", 8: "inferiorparietal", 9: "inferiortemporal", 10: "isthmuscingulate",
    11: "lateraloccipital", 12: "lateralorbitofrontal", 13: "lingual",
    14: "medialorbitofrontal", 15: "middletemporal", 16: "parahippocampal", 17: "paracentral",
    18: "parsopercularis", 19: "parsorbitalis", 20: "parstriangularis", 21: "pericalcarine",
    22: "postcentral", 23: "posteriorcingulate", 24: "precentral", 25: "precuneus",
    26: "rostralanteriorcingulate", 27: "rostralmiddlefrontal", 28: "superiorfrontal",
    29: "superiorparietal", 30: "superiortemporal", 31: "supramarginal",
    34: "transversetemporal", 35: "insula",
}

LICENSE = "CC-BY-NC-SA-3.0"
CITATIONS = [
    "Xu Z., Niethammer M. DeepAtlas: Joint Semi-supervised Learning of Image Registration and "
    "Segmentation. MICCAI 2019. doi:10.1007/978-3-030-32245-8_47",
    "Klein A., Tourville J. 101 labeled brain images and a consistent human cortical labeling "
    "protocol. Frontiers in Neuroscience 6:171, 2012. doi:10.3389/fnins.2012.00171",
    "Balakrishnan G. et al. VoxelMorph: A Learning Framework for Deformable Medical Image "
    "Registration. IEEE TMI 38(8), 2019. doi:10.1109/TMI.2019.2897538",
]


def label_table(ids):
    table = [{"class": 0, "id": 0, "name": "background"}]
    for k, label_id in enumerate(ids, 1):
        side = "lh" if label_id < 2000 else "rh"
        table.append({"class": k, "id": label_id,
                      "name": f"ctx-{side}-{DKT31_NAMES[label_id % 1000]}"})
    return table


def for_float32_inference(model):
    """The same DeepAtlas with every layer computing in float32 (weights copied)."""
    from dazoo import DeepAtlas

    config = copy.deepcopy(model.get_config())
    config["segmentation_net"]["config"]["compute_dtype"] = None
    plain = DeepAtlas.from_config(config)
    plain.set_weights(model.get_weights())
    return plain


def training_record(run: pathlib.Path) -> dict:
    args = json.loads((run / "args.json").read_text())
    log = (run / "train.log").read_text().splitlines()
    validations = [line for line in log if " validation step " in line]
    steps = [int(m.group(1)) for line in log for m in [re.search(r" step (\d+) ", line)] if m]
    return {"args": args, "steps_completed": max(steps) if steps else 0,
            "last_validation_on_model_grid": validations[-1].split(" ", 2)[2] if validations
            else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="work_cache/brain")
    parser.add_argument("--checkpoint", default="work_cache/brain/run/checkpoint.keras")
    parser.add_argument("--out", default="pretrained/brain")
    parser.add_argument("--evaluation", help="evaluation.json from evaluate.py")
    parser.add_argument("--card", help="README.md text of the model card (else a stub)")
    args = parser.parse_args(argv)

    import keras

    from dazoo.presets import save_preset

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from train import DKT31_IDS  # noqa: E402

    work, checkpoint = pathlib.Path(args.work), pathlib.Path(args.checkpoint)
    model = for_float32_inference(keras.saving.load_model(checkpoint))
    split = json.loads((work / "split.json").read_text())
    preprocess = json.loads((work / "preprocess.json").read_text())
    metadata = {
        "version": "0.1.0",
        "description": "DeepAtlas for T1-weighted brain MRI (skull-stripped): 62 DKT31 cortical "
                       "regions, and deformable registration behind an affine pre-alignment.",
        "task": ["segmentation", "registration"],
        "license": LICENSE,
        "license_note": "The weights and the template are derived from Mindboggle-101 "
                        "(OASIS-TRT-20) images and labels, licensed CC BY-NC-SA 3.0: they carry "
                        "that license (non-commercial, share-alike). dazoo's code is Apache-2.0.",
        "data": {
            "name": "Mindboggle-101, OASIS-TRT-20 group (15 of 20 subjects)",
            "modality": "T1-weighted MRI, skull-stripped, 1 mm isotropic, 256x256x160",
            "labels": "manual DKT31 cortical labels (labels.DKT31.manual.nii.gz)",
            "split": split,
        },
        "input": {"orientation": "any (reoriented)", "spacing": "any (resampled)",
                  "model_grid": preprocess, "intensity": preprocess["intensity"]},
        "output": {"segmentation": "label map of DKT31 ids on the input's grid",
                   "registration": "moved image/labels on the fixed grid; displacement field "
                                   "in mm (5D NIfTI, ITK/LPS by default)"},
        "training": training_record(checkpoint.parent),
        "citation": CITATIONS,
        "intended_use": "Research on skull-stripped adult T1 brain MRI. Not for clinical use.",
    }
    if args.evaluation:
        metadata["evaluation"] = json.loads(pathlib.Path(args.evaluation).read_text())
    readme = pathlib.Path(args.card).read_text() if args.card else "# brain\n"
    preset = save_preset(args.out, model=model, preprocess=preprocess,
                         labels=label_table(DKT31_IDS), metadata=metadata,
                         files={"template.nii.gz": work / "template.nii.gz"}, readme=readme)
    print(f"wrote {preset.path} (weights sha256 {preset.metadata['weights_sha256'][:16]}...)")


if __name__ == "__main__":
    sys.exit(main())
