"""Fine-tune a dazoo preset on your own scans with the Python API (Keras ``fit``).

    python examples/finetune_on_your_cohort.py --preset brain --data cohort.csv \
        -o mybrain/ --steps 400

``cohort.csv`` has the columns ``image,labels`` (paths relative to the CSV; an empty
``labels`` cell for an unlabelled scan). Labelled and unlabelled scans are both used, as in
DeepAtlas: registration steps draw any two scans (the anatomy loss uses the segmenter's
prediction where a scan has no labels), segmentation steps always include a labelled one.
Label ids the preset does not know count as background. The result is a preset folder:

    dazoo segment scan.nii.gz -o scan_seg.nii.gz --preset mybrain/

This is what ``dazoo finetune --from brain --data cohort.csv -o mybrain/`` does, written out
with the library's pieces (which the command also adds validation, checkpoints that resume
and a full model card to).
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="brain", help="preset name or folder (default: brain)")
    parser.add_argument("--data", required=True, help="CSV manifest image,labels")
    parser.add_argument("-o", "--output", required=True, help="new preset folder")
    parser.add_argument("--steps", type=int, default=400, help="training steps (default: 400)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: 1e-4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import keras

    from dazoo import DeepAtlas
    from dazoo.errors import DazooInputError
    from dazoo.labels import LabelMap
    from dazoo.presets import render_card, save_preset
    from dazoo.training import PairDataset, load_subjects

    try:
        # 1. The preset's joint model, its preprocessing and its label table.
        model = DeepAtlas.from_preset(args.preset)
        table = model.label_table
        label_map = LabelMap.from_table(table)  # unknown ids -> background
        # 2. The cohort on the model grid (aligned to the preset's template), as phase-aware
        #    pairs: batch i is training step i.
        subjects = load_subjects(args.data)
        keras.utils.set_random_seed(args.seed)
        data = PairDataset.from_subjects(subjects, model.preprocessor, label_map=label_map,
                                         schedule=model.schedule, steps_per_epoch=args.steps,
                                         seed=args.seed)
    except DazooInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # 3. Two optimizers, one per network; Keras fit runs DeepAtlas's alternating train_step.
    model.compile(reg_optimizer=keras.optimizers.Adam(args.lr),
                  seg_optimizer=keras.optimizers.Adam(args.lr))
    model.fit(data.steps(0, args.steps), steps_per_epoch=args.steps, epochs=1, shuffle=False,
              verbose=2)
    # 4. A preset folder that dazoo.load() and dazoo segment --preset accept.
    parent = model.preset
    preprocess = model.preprocessor.config.to_dict()
    files = {}
    if preprocess["template"]:
        files[preprocess["template"]] = model.preprocessor.template_path
    labelled = [data.names[i] for i in data.labelled]
    metadata = {
        "description": f"{parent.name} fine-tuned on {args.data} "
                       f"(examples/finetune_on_your_cohort.py).",
        "task": ["segmentation", "registration"],
        "license": parent.metadata.get("license", "unspecified"),
        "license_note": parent.metadata.get("license_note", ""),
        "data": {"name": args.data, "train": data.names, "labelled": labelled,
                 "unlabelled": [n for n in data.names if n not in labelled], "validation": []},
        "labels": {"classes": len(table), "regions": len(table) - 1},
        "input": {"model_grid": preprocess},
        "training": {"command": "python examples/finetune_on_your_cohort.py "
                                + " ".join(sys.argv[1:] if argv is None else argv),
                     "mode": model.mode, "seed": args.seed, "steps_completed": args.steps,
                     "steps_planned": args.steps, "checkpoint": "end of training",
                     "precision": "float32",
                     "parent": {"name": parent.name,
                                "version": parent.metadata.get("version"),
                                "weights_sha256": parent.metadata.get("weights_sha256")}},
    }
    name = args.output.rstrip("/").split("/")[-1]
    preset = save_preset(args.output, model=model, preprocess=preprocess, labels=list(table),
                         metadata=metadata, files=files,
                         readme=render_card({"name": name, **metadata}))
    print(f"preset written to {preset.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
