"""Run folder -> preset folder (``dazoo export``): the model in float32, the run's
preprocessing, label table, recipe and template, and a model card from the run's own record.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Callable

from dazoo import __version__
from dazoo.batch import REGISTRATION, SEGMENTATION
from dazoo.errors import DazooInputError
from dazoo.training.recipe import Recipe

__all__ = ["export", "DEEPATLAS_CITATION"]

DEEPATLAS_CITATION = (
    "Xu Z., Niethammer M. DeepAtlas: Joint Semi-supervised Learning of Image Registration and "
    "Segmentation. MICCAI 2019. doi:10.1007/978-3-030-32245-8_47")


def _cites_deepatlas(citation: str) -> bool:
    """Whether a recipe's citation is the DeepAtlas paper (with or without its DOI), which
    every card already cites first."""
    return citation.startswith("Xu Z., Niethammer M. DeepAtlas")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _float32(model):
    """The same DeepAtlas computing in float32 everywhere (weights copied): both networks
    rebuilt with the standard ``dtype="float32"`` policy."""
    from dazoo.models import DeepAtlas, RegistrationNet, SegmentationNet

    seg, reg = model.segmentation_net, model.registration_net
    plain_seg = SegmentationNet.from_config(dict(seg.get_config(), dtype="float32"))
    plain_seg.set_weights(seg.get_weights())
    if reg.dtype_policy.name != "float32":
        plain_reg = RegistrationNet.from_config(dict(reg.get_config(), dtype="float32"))
        plain_reg.set_weights(reg.get_weights())
        reg = plain_reg
    return DeepAtlas(reg, plain_seg, mode=model.mode,
                     registration_steps=model.registration_steps,
                     segmentation_steps=model.segmentation_steps)


def export(run: str | os.PathLike, out: str | os.PathLike, *, checkpoint: str = "best",
           command: str | None = None, log: Callable[[str], None] = _stderr):
    """Writes a preset folder from a run folder's own record (``dazoo export``).

    Args:
        run: the run folder.
        out: the preset folder to write (replaced whole, atomically, if it exists).
        checkpoint: ``"best"`` (the best validation score; the last checkpoint when the run
            has no validation) or ``"last"``.
        command: the export command line, for the model card.

    Returns:
        the written :class:`dazoo.presets.Preset` (verified).
    """
    import dazoo.models  # noqa: F401  (registers dazoo's classes)
    from dazoo.presets import render_card, save_preset
    from dazoo.training.callbacks import read_validation, steps_done
    from dazoo.training.engine import load_checkpoint

    folder = pathlib.Path(run)
    if checkpoint not in ("best", "last"):
        raise DazooInputError("export", f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    if not (folder / "run.json").is_file():
        raise DazooInputError(folder, "is not a run folder (no run.json)")
    path = folder / ("best.keras" if checkpoint == "best" and (folder / "best.keras").exists()
                     else "checkpoint.keras")
    if not path.is_file():
        raise DazooInputError(folder, "has no checkpoint yet")
    record = json.loads((folder / "run.json").read_text())
    recipe = Recipe.load(folder / "recipe.json")
    model = load_checkpoint(path)
    steps = steps_done(model)
    history = read_validation(folder)
    scores = next((h for h in history if h["step"] == steps), None)
    c = recipe.config
    card = c["card"]
    parent = record.get("parent")
    parent_preset = None
    if parent is not None:
        from dazoo.presets import get_preset

        try:
            parent_preset = get_preset(parent["path"])
        except DazooInputError:
            parent_preset = None
    parent_meta = parent_preset.metadata if parent_preset is not None else {}
    tasks = [task for task in (SEGMENTATION, REGISTRATION) if task in model.schedule.networks]
    preprocess = json.loads((folder / "preprocess.json").read_text())
    template_source = None  # the preset gets its own copy (a run's record may name another)
    if preprocess.get("template"):
        template_source = folder / preprocess["template"]
        preprocess["template"] = "template.nii.gz"
    labels = json.loads((folder / "labels.json").read_text())["classes"]
    summary = {}
    if scores:
        for key, text in (("native_seg_dice", "segmentation Dice (validation, native)"),
                          ("native_reg_dice", "registration Dice (validation pairs, native)")):
            if key in scores:
                summary[text] = round(scores[key], 3)
    metadata = {
        "version": str(card.get("version") or 1),
        "dazoo_version": __version__,
        "description": c["description"] or (
            f"DeepAtlas ({model.mode}) trained with dazoo train"
            + (f", fine-tuned from the {parent['name']} preset" if parent else "") + "."),
        "task": tasks,
        "license": card["license"] or parent_meta.get("license", "unspecified"),
        "license_note": card["license_note"] or parent_meta.get("license_note", ""),
        **({"data_terms": card["data_terms"]} if card.get("data_terms") else {}),
        "data": {"name": card["data_name"] or os.path.basename(c["data"]["train"].rstrip("/")),
                 "train": record["train"], "validation": record["validation"],
                 "labelled": record["labelled"], "unlabelled": record["unlabelled"]},
        "labels": {"classes": len(labels), "regions": len(labels) - 1},
        "input": {"model_grid": preprocess},
        "training": {
            "command": record.get("command"), "export_command": command,
            "recipe": "recipe.json", "seed": record["seed"], "steps_completed": steps,
            "steps_planned": record["steps_planned"], "checkpoint": path.name,
            "mode": model.mode, "precision": c["precision"],
            "seconds": round(sum(s.get("seconds", 0) for s in record["sessions"]), 1),
            "parent": parent},
        "validation": {"at_step": steps if scores else None, "scores": scores,
                       "history": history},
        "summary": summary,
        **({"flip": True} if c["inference"]["flip"] else {}),
        **({"grow": True} if c["inference"].get("grow") else {}),
        **({"largest_component": list(c["inference"]["largest_component"])}
           if c["inference"].get("largest_component") else {}),
        **({"refine": dict(c["inference"]["refine"])} if c["inference"].get("refine") else {}),
        "notes": list(card["notes"]),
        "citations": [DEEPATLAS_CITATION] + [x for x in card["citations"]
                                             if not _cites_deepatlas(x)],
    }
    if parent_meta.get("skull_strip"):
        # the brain extraction settings (dazoo.Pipeline.skull_strip_default): measured with
        # the extractor preset on the input domain, not with these weights; a child of a
        # preset for skull-stripped brains is one too
        metadata["skull_strip"] = dict(parent_meta["skull_strip"])
    files = {"recipe.json": folder / "recipe.json"}
    if template_source is not None:
        files["template.nii.gz"] = template_source
    checks = _parent_checks(parent_preset, preprocess, template_source)
    if checks is not None:
        files["checks.json"] = checks
    name = pathlib.Path(out).name
    metadata_for_card = {"name": name, **metadata}
    preset = save_preset(out, model=_float32(model), preprocess=preprocess, labels=labels,
                         metadata=metadata, files=files, readme=render_card(metadata_for_card))
    log(f"exported {path} (step {steps}) -> {preset.path}")
    return preset


def _parent_checks(source, preprocess: dict, template) -> pathlib.Path | None:
    """The parent preset's (``source``, a Preset or None) ``checks.json`` (input sanity
    thresholds, measured on the template and the preprocessing) when the run kept both
    unchanged (fine-tuning), else None: a new template or grid needs them measured anew
    (benchmarks/sanity_thresholds.py)."""
    if source is None or not source.file("checks.json").is_file():
        return None
    theirs = source.read_json("preprocess.json")
    if {**theirs, "template": None} != {**preprocess, "template": None}:
        return None
    if bool(theirs.get("template")) != (template is not None):
        return None
    if template is not None and (source.path / theirs["template"]).read_bytes() != \
            pathlib.Path(template).read_bytes():
        return None
    return source.file("checks.json")
