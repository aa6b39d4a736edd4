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
import os
import pathlib
import re
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # train.py, one_shot.py

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


def training_record(run: pathlib.Path, steps_completed: int) -> dict:
    """Arguments, steps and the last validation line (at or before the checkpoint's step)."""
    args = json.loads((run / "args.json").read_text())
    log = (run / "train.log").read_text().splitlines()
    validations = [line for line in log
                   for m in [re.search(r" validation step (\d+):", line)]
                   if m and int(m.group(1)) <= steps_completed]
    return {"args": args, "steps_completed": steps_completed,
            "last_validation_on_model_grid": validations[-1].split(" ", 2)[2] if validations
            else None}


def train_options(args: dict) -> str:
    """The training run's options that differ from train.py's defaults, as command flags."""
    from train import build_parser

    defaults = vars(build_parser().parse_args([]))
    flags = []
    for key, value in args.items():
        if key in ("work", "out", "steps", "checkpoint_every", "validate_every") or \
                key not in defaults or value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        flags.append(flag if value is True else f"{flag} {value}")
    return "".join(" " + f for f in flags)


def _fmt(summary, key, scale=1.0, digits=3):
    return f"{scale * summary[key]:.{digits}f}" if summary and key in summary else "not measured"


def _summary(ev: dict) -> dict:
    """The few numbers `dazoo list` shows."""
    out = {}
    if "segmentation" in ev:
        out["segmentation Dice (62 regions, validation, native 1 mm)"] = round(
            ev["segmentation"]["summary"]["mean_dice"], 3)
    if "registration" in ev:
        summary = ev["registration"]["summary"]
        out["registration Dice (62 regions, 6 validation pairs)"] = round(summary["mean_dice"], 3)
        out["folding voxels (%)"] = round(100 * summary["folding_fraction"], 4)
    return out


def targets(seg: dict, reg: dict, syn: dict, speed: dict | None) -> list[str]:
    """The project's goals for this preset next to what was measured (met or not)."""
    if not (seg and reg and syn):
        return []

    def verdict(ok):
        return "met" if ok else "**not met**"

    lines = [
        "Against the project's goals for this preset:",
        "",
        f"- segmentation mean Dice >= 0.80 over the 62 regions: {seg['mean_dice']:.3f}, "
        f"{verdict(seg['mean_dice'] >= 0.80)};",
        f"- registration mean Dice >= 0.55: {reg['mean_dice']:.3f}, "
        f"{verdict(reg['mean_dice'] >= 0.55)} (ANTs SyN on the same pairs: "
        f"{syn['mean_dice']:.3f});",
        f"- folding < 0.1 % of voxels: {100 * reg['folding_fraction']:.4f} %, "
        f"{verdict(reg['folding_fraction'] < 1e-3)};",
        f"- >= 10x faster than SyN: {syn['seconds'] / reg['seconds']:.1f}x per pair in "
        "process (dazoo: reading the moving scan, affine alignment of both scans, prediction, "
        "resampling onto the fixed grid; "
        "ANTs: its registration call alone)"
        + (f", {syn['seconds'] / statistics.median(speed['cli_register_seconds']):.1f}x "
           "counting dazoo's whole `dazoo register` command" if speed else "")
        + f", {verdict(syn['seconds'] / reg['seconds'] >= 10)};",
    ]
    if speed:
        seg_s = statistics.median(speed["cli_segment_seconds"])
        reg_s = statistics.median(speed["cli_register_seconds"])
        lines += [f"- end-to-end `dazoo segment` < 20 s: {seg_s:.1f} s, {verdict(seg_s < 20)}; "
                  f"`dazoo register` < 30 s: {reg_s:.1f} s, {verdict(reg_s < 30)}."]
    return lines + [""]


def one_shot_section(results: dict | None) -> list[str]:
    """The card's section on the paper's one-shot experiment (not the shipped weights)."""
    if not results:
        return []
    from one_shot import markdown

    return [
        "## The paper's one-shot experiment",
        "",
        "Not the shipped weights: separate runs with the same architecture, grid, losses and "
        f"seed, where 1 training subject ({results['labelled_subject']}) keeps its labels and the "
        f"other {results['unlabelled']} are unlabelled (`examples/brain/one_shot.py`). From the same random initialisation, "
        f"registration-only pretraining ({results['pretrain_registration_steps']} steps) and "
        "segmentation-only pretraining on the one labelled image, augmented "
        f"({results['pretrain_segmentation_steps']} steps); from both, three continuations with "
        f"{results['steps_per_network']} steps per trained network: registration-only "
        "(unsupervised), segmentation-only, and DeepAtlas joint (1:1 alternation, anatomy "
        "loss with the one manual label map or the segmenter's prediction). Scored like the "
        "preset, at native 1 mm on the validation subjects:",
        "",
        markdown(results),
        "",
        "The paper reports, for one-shot brain MRI, +1.8 Dice points for DeepAtlas over the "
        "unsupervised registration network, and better segmentation than independent "
        "training. These runs are far shorter than the paper's (CPU time), and 3 subjects / 6 "
        "pairs give large uncertainty: read the per-pair counts, not only the means.",
        "",
        "```bash",
        results["command"],
        "```",
        "",
    ]


def render_card(meta: dict) -> str:
    """The model card (README.md) from the metadata, every number taken from it."""
    ev = meta.get("evaluation", {})
    seg = ev.get("segmentation", {}).get("summary", {})
    reg = ev.get("registration", {}).get("summary", {})
    syn = ev.get("ants_syn", {}).get("summary", {})
    aff = ev.get("ants_affine", {}).get("summary", {})
    train = meta["training"]
    args = train["args"]
    split = meta["data"]["split"]
    lines = [
        "# brain: DeepAtlas for T1 brain MRI (DKT31 cortical regions)",
        "",
        meta["description"],
        "",
        f"**License of the weights and template: {meta['license']}.** {meta['license_note']}",
        "",
        "## Use",
        "",
        "```python",
        "import dazoo",
        "brain = dazoo.load('brain')",
        "brain.segment('t1_brain.nii.gz').save('t1_dkt31.nii.gz')",
        "brain.register('moving.nii.gz', 'fixed.nii.gz').save(moved='moved.nii.gz', "
        "warp='warp.nii.gz')",
        "```",
        "",
        "Input: a skull-stripped T1-weighted brain MRI, NIfTI or MGZ, any orientation and voxel",
        "size. It is affinely aligned (SimpleITK, 12 parameters, correlation) to the shipped",
        "population template, resampled once to the model grid (RAS, 2 mm, 80x96x80 = 160x192x160",
        "mm) and scaled to [0, 1] between its 0.5th and 99.5th non-zero percentiles.",
        "Outputs are resampled once back to the input's own grid and affine: label maps with the",
        "DKT31 ids (1002..1035 left, 2002..2035 right; `labels.json`), displacement fields in mm.",
        "",
        "## Measured performance",
        "",
        f"On the {len(split['validation'])} validation subjects ({', '.join(split['validation'])}),"
        " scored at their native 1 mm resolution against the manual labels "
        "(`examples/brain/evaluate.py`):",
        "",
        "| task | mean Dice, 62 regions | mean Dice, 31 merged | seconds | folding voxels |",
        "|---|---|---|---|---|",
        f"| segmentation (per subject) | {_fmt(seg, 'mean_dice')} | {_fmt(seg, 'mean_merged_dice')}"
        f" | {_fmt(seg, 'seconds', digits=1)} | - |",
        f"| registration, DeepAtlas (6 ordered pairs) | {_fmt(reg, 'mean_dice')} | "
        f"{_fmt(reg, 'mean_merged_dice')} | {_fmt(reg, 'seconds', digits=1)} | "
        f"{_fmt(reg, 'folding_fraction', 100, 4)} % |",
        f"| registration, ANTs affine | {_fmt(aff, 'mean_dice')} | {_fmt(aff, 'mean_merged_dice')}"
        f" | {_fmt(aff, 'seconds', digits=1)} | - |",
        f"| registration, ANTs affine + SyN (defaults) | {_fmt(syn, 'mean_dice')} | "
        f"{_fmt(syn, 'mean_merged_dice')} | {_fmt(syn, 'seconds', digits=1)} | - |",
        "",
    ]
    if "speed" in ev:
        sp = ev["speed"]
        lines += [
            "End-to-end command lines on a 256x256x160 scan (new process: imports, model "
            "loading, reading, alignment, prediction, writing), 2 runs each: "
            f"`dazoo segment` {', '.join(f'{t:.1f}' for t in sp['cli_segment_seconds'])} s; "
            f"`dazoo register` {', '.join(f'{t:.1f}' for t in sp['cli_register_seconds'])} s.",
            "",
        ]
    if "consistency" in ev:
        lines += ["Orientation invariance (same scan rewritten, compared in world space):"]
        for name, value in ev["consistency"].items():
            lines.append(f"- {name}: voxel agreement {value['voxel_agreement']:.4f}, "
                         f"mean Dice {value['mean_dice']:.3f}")
        lines.append("")
    lines += targets(seg, reg, syn, ev.get("speed"))
    lines += [
        "Timings: the 2-core CPU machine this was built on; " + ev.get("machine", "")
        + " Reproduce with the evaluation command below.",
        "",
        "## Training",
        "",
        f"- Data: {meta['data']['name']}; {meta['data']['modality']}; {meta['data']['labels']}.",
        f"- Split (seed {split['seed']}, {split['method']}): training {', '.join(split['train'])};"
        f" validation {', '.join(split['validation'])}. Five further OASIS-TRT-20 subjects are "
        "not available here and were never used.",
        "- Classes: background + the 62 DKT31 regions. The ids 1032/1033/2032/2033 (frontal "
        "and temporal poles, not part of DKT31, present in a few subjects) were set to background.",
        f"- Model: DeepAtlas ({args['mode']} mode, "
        + ("all training images labelled" if args["labelled"] == "all" else
           f"the first {args['labelled']} training images labelled, the others unlabelled")
        + "), registration network "
        "VoxelMorph VxmDense (default features, 7 scaling-and-squaring steps at half "
        "resolution), segmentation network 3D U-Net (2 convolutions per level, instance norm; "
        "trained with bfloat16 arithmetic, shipped for float32 inference).",
        f"- Losses: registration NCC (window 9) + {args['smoothness_weight']} x Grad l2 on the "
        f"velocity + {args['anatomy_weight']} x soft Dice anatomy loss; segmentation Dice + "
        "cross-entropy. Adam, learning rates "
        f"{args['reg_lr']} (registration) / {args['seg_lr']} (segmentation); batch 1; "
        f"{args['registration_steps']}:{args['segmentation_steps']} alternation.",
        f"- Steps: {train['steps_completed']} in total, alternating "
        f"{args['registration_steps']} registration : {args['segmentation_steps']} "
        f"segmentation, seed {args['seed']}"
        + (f" (launched for {args['steps']} and stopped at this checkpoint for lack of CPU "
           "time; the learning rates are constant and each step's data is drawn from "
           "(seed, step), so the command below with this step count reproduces it)"
           if args["steps"] != train["steps_completed"] else "") + "; "
        "segmentation steps use random affine (4 degrees, 4 %, 2 voxels) and gamma augmentation.",
        f"- Last validation on the model grid during training: "
        f"{train['last_validation_on_model_grid']}",
        "",
        "Commands (from the repository root, data in ../shared/data):",
        "",
        "```bash",
        "python examples/brain/prepare.py --data ../shared/data/mindboggle-oasis-trt20 "
        "--work work_cache/brain",
        "python examples/brain/train.py --work work_cache/brain --out work_cache/brain/run "
        f"--steps {train['steps_completed']}{train_options(args)}",
        "python examples/brain/package.py --checkpoint work_cache/brain/run/checkpoint.keras "
        "--out pretrained/brain",
        "python examples/brain/evaluate.py --preset pretrained/brain --ants "
        "--out work_cache/brain/evaluation.json",
        "python examples/brain/package.py --checkpoint work_cache/brain/run/checkpoint.keras "
        "--out pretrained/brain --evaluation work_cache/brain/evaluation.json"
        + (" --one-shot work_cache/brain/one_shot/results.json" if meta.get("one_shot") else ""),
        "```",
        "",
        *one_shot_section(meta.get("one_shot")),
        "## Limitations",
        "",
        "- Trained on 12 adult brains of one dataset and scanner protocol (OASIS); expect lower "
        "accuracy on other ages, pathologies, contrasts or scanners, and on images that are not "
        "skull-stripped.",
        "- The model grid is 2 mm: thin cortical regions are segmented at that resolution and "
        "resampled (probabilities, then argmax) to the input grid.",
        "- Validation used only 3 subjects (6 registration pairs): the numbers have a large "
        "uncertainty.",
        "- Research use only; not a medical device.",
        "",
        "## Citation",
        "",
        *[f"- {c}" for c in meta["citation"]],
        "",
    ]
    return "\n".join(lines)


def add_results(meta: dict, *, evaluation: str | None, one_shot: str | None,
                machine: str) -> None:
    """Puts evaluate.py's and one_shot.py's JSON results (paths; None: keep) into ``meta``."""
    if evaluation:
        meta["evaluation"] = json.loads(pathlib.Path(evaluation).read_text())
        meta["evaluation"]["machine"] = machine
        meta["summary"] = _summary(meta["evaluation"])
    if one_shot:
        meta["one_shot"] = json.loads(pathlib.Path(one_shot).read_text())


def update_card(folder: str | os.PathLike, *, evaluation: str | None = None,
                one_shot: str | None = None, machine: str = "") -> None:
    """Adds results to an existing preset's metadata and re-renders its card; weights untouched.

    The preset is loaded and its weights checked against the recorded sha256 before and
    after; both files are written atomically (metadata first, then the card from it).
    """
    from dazoo.io import write_text_atomic
    from dazoo.presets import get_preset

    folder = pathlib.Path(folder)
    get_preset(folder).verify()
    meta = json.loads((folder / "metadata.json").read_text())
    add_results(meta, evaluation=evaluation, one_shot=one_shot,
                machine=machine or meta.get("evaluation", {}).get("machine", ""))
    write_text_atomic(folder / "metadata.json", json.dumps(meta, indent=1))
    write_text_atomic(folder / "README.md", render_card(meta))
    get_preset(folder).verify()
    print(f"updated the card of {folder} (weights sha256 {meta['weights_sha256'][:16]}..., "
          "unchanged)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="work_cache/brain")
    parser.add_argument("--checkpoint", default="work_cache/brain/run/checkpoint.keras")
    parser.add_argument("--run", help="training folder (args.json, train.log); default: the "
                                      "checkpoint's folder")
    parser.add_argument("--out", default="pretrained/brain")
    parser.add_argument("--evaluation", help="evaluation.json from evaluate.py")
    parser.add_argument("--one-shot", help="results.json from one_shot.py, for the card")
    parser.add_argument("--machine", default="",
                        help="one sentence on the machine the timings come from")
    parser.add_argument("--card-only", action="store_true",
                        help="keep the weights and metadata of the preset in --out; only add "
                             "--evaluation / --one-shot to its metadata and re-render README.md "
                             "(no checkpoint needed)")
    args = parser.parse_args(argv)
    if args.card_only:
        update_card(args.out, evaluation=args.evaluation, one_shot=args.one_shot,
                    machine=args.machine)
        return 0

    import keras

    import dazoo.models  # noqa: F401  (registers dazoo's classes for load_model)
    from dazoo.presets import save_preset

    from train import DKT31_IDS  # noqa: E402

    work, checkpoint = pathlib.Path(args.work), pathlib.Path(args.checkpoint)
    trained = keras.saving.load_model(checkpoint)
    steps_completed = int(trained.reg_optimizer.iterations) + int(
        trained.seg_optimizer.iterations)
    model = for_float32_inference(trained)
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
        "training": training_record(pathlib.Path(args.run) if args.run else checkpoint.parent,
                                    steps_completed),
        "citation": CITATIONS,
        "intended_use": "Research on skull-stripped adult T1 brain MRI. Not for clinical use.",
    }
    add_results(metadata, evaluation=args.evaluation, one_shot=args.one_shot,
                machine=args.machine)
    readme = render_card(metadata)
    preset = save_preset(args.out, model=model, preprocess=preprocess,
                         labels=label_table(DKT31_IDS), metadata=metadata,
                         files={"template.nii.gz": work / "template.nii.gz"}, readme=readme)
    print(f"wrote {preset.path} (weights sha256 {preset.metadata['weights_sha256'][:16]}...)")


if __name__ == "__main__":
    sys.exit(main())
