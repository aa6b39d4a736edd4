"""What a run trains on: the recipe's subjects split into training and validation, the label
maps without images, the checks that keep validation clean and the label table sane, and the
preprocessing (template included) written into the run folder.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import time

import numpy as np

from dazoo import io
from dazoo.batch import SEGMENTATION
from dazoo.errors import DazooInputError
from dazoo.labels import LabelMap, has_sides
from dazoo.training.recipe import Recipe

__all__ = ["RunData", "gather", "split_subjects", "label_map", "preprocessing", "named_after"]


@dataclasses.dataclass
class RunData:
    """The subjects of a run: ``train`` (images, labelled or not), ``validation`` (labelled
    images) and ``label_maps`` (label maps without images, synthesised), with the run's
    :class:`~dazoo.labels.LabelMap`."""

    train: list
    validation: list
    label_maps: list
    labels: LabelMap


def gather(recipe: Recipe, schedule, parent=None) -> RunData:
    """The recipe's data, checked: no validation subject (or a file named after one) among
    the label maps, at least two training images (one real), a labelled one when the
    segmenter trains, labelled validation subjects, and no left/right-swapping option with a
    table that has sides (the rule of :func:`dazoo.labels.has_sides`).

    Raises:
        DazooInputError: the first problem found, naming the recipe or data.
    """
    from dazoo.training.subjects import find_label_maps, load_subjects

    c = recipe.config
    data = c["data"]
    subjects = load_subjects(data["train"], image=data["image"], labels=data["labels"])
    train, validation = split_subjects(subjects, data["validation"], source=recipe.source,
                                       seed=c["seed"], image=data["image"],
                                       labels=data["labels"])
    maps = []
    if data["label_maps"] is not None:
        maps = find_label_maps(data["label_maps"], source=recipe.source)
        held = {file_key(s.labels) for s in validation if s.labels}
        names = [s.name for s in validation]
        # The same file, or another file of a validation subject (a map named after it, e.g.
        # Mindboggle-101's OASIS-TRT-20-12.aparcNMMjt+aseg.mgz for the validation subject
        # OASIS-TRT-20-12): both contaminate the validation.
        leaked = [m.labels for m in maps
                  if file_key(m.labels) in held
                  or any(named_after(os.path.basename(m.labels), n) for n in names)]
        if leaked:
            raise DazooInputError(recipe.source, f"data.label_maps holds validation label "
                                                 f"maps {leaked}")
    if len(train) + len(maps) < 2 or not train:
        raise DazooInputError(data["train"], f"training needs at least 2 images (pairs for "
                                             f"registration), one of them real; found "
                                             f"{len(train)} images and {len(maps)} label maps")
    if not any(s.labels for s in train + maps) and SEGMENTATION in schedule.networks:
        raise DazooInputError(data["train"], "no training image has a label map: "
                                             "segmentation needs at least 1")
    unlabelled = [s.name for s in validation if s.labels is None]
    if unlabelled:
        raise DazooInputError(recipe.source, f"validation subject(s) {unlabelled} have no "
                                             "label map")
    table = label_map(recipe, train + maps, parent)
    check_sides(recipe, table)
    return RunData(train, validation, maps, table)


def check_sides(recipe: Recipe, table: LabelMap) -> None:
    """Refuses the options that reflect images while keeping their label ids (``augmentation.
    flip``, ``preprocess.mirror "auto"``) when the table has left and right structures
    (:func:`dazoo.labels.has_sides`): they would swap left and right labels."""
    if not has_sides(table.ids.tolist()):
        return
    if recipe["preprocess"].get("mirror") == "auto":
        raise DazooInputError(recipe.source, "preprocess.mirror \"auto\" reflects some scans "
                                             "onto the template's side, which would swap "
                                             "left/right labels: not with a label table "
                                             "that has left and right structures")
    if recipe["augmentation"].get("flip"):
        raise DazooInputError(recipe.source, "augmentation.flip mirrors images and keeps "
                                             "their label ids, which would swap left/right "
                                             "labels: not with a label table that has left "
                                             "and right structures")


def split_subjects(subjects, validation, *, source: str, seed: int = 0,
                   image: str | None = None, labels: str | None = None):
    """``(train, validation)`` subjects from the recipe's ``data.validation``: None, subject
    names, ``{"count": n, "seed": s}``, or a CSV manifest or folder (read with the
    ``image`` / ``labels`` patterns, as the training data)."""
    from dazoo.training.subjects import LABELS, load_subjects

    if validation is None:
        return list(subjects), []
    if isinstance(validation, str):
        held = load_subjects(validation, image=image, labels=labels or LABELS)
        images = {file_key(s.image) for s in held}
        train = [s for s in subjects if file_key(s.image) not in images]
        return train, held
    names = [s.name for s in subjects]
    if isinstance(validation, dict):
        labelled = sorted(s.name for s in subjects if s.labels is not None)
        count = validation["count"]
        if not 0 <= count < len(labelled):
            raise DazooInputError(source, f"data.validation count {count} needs more than "
                                          f"{count} labelled subjects (found {len(labelled)})")
        order = np.random.default_rng(validation.get("seed", seed)).permutation(len(labelled))
        validation = [labelled[i] for i in order[:count]]
    missing = sorted(set(validation) - set(names))
    if missing:
        raise DazooInputError(source, f"validation subject(s) {missing} are not in the data "
                                      f"(found {names[:6]}{' ...' if len(names) > 6 else ''})")
    held = [s for s in subjects if s.name in set(validation)]
    return [s for s in subjects if s.name not in set(validation)], held


def file_key(path: str):
    """What makes two paths the same file: device and inode (symbolic and hard links
    included), or the resolved path where the file cannot be examined."""
    try:
        status = os.stat(path)
        return status.st_dev, status.st_ino
    except OSError:
        return os.path.realpath(path)


def named_after(filename: str, subject: str) -> bool:
    """Whether ``filename`` is ``subject`` followed by ``.`` or ``_`` (and more): a file of
    that subject (``"s12.aseg.mgz"`` is one of ``"s12"``, ``"s123.mgz"`` is not)."""
    return filename.startswith(subject) and filename[len(subject):][:1] in (".", "_")


def label_map(recipe: Recipe, train, parent) -> LabelMap:
    """The run's label table: the recipe's ids, the ids in the training label maps
    (``labels.from_data``), or the parent preset's."""
    spec = recipe["labels"]
    from_data = spec["from_data"] or bool((recipe["init"] or {}).get("labels_from_data"))
    if from_data:
        from dazoo.training.subjects import relabelled

        maps = [relabelled(io.read_labels(s.labels).array, s.relabel) for s in train
                if s.labels is not None]
        if not maps:
            raise DazooInputError(recipe.source, "labels from the data need labelled images")
        ids = sorted(set().union(*(np.unique(m).tolist() for m in maps)) - {0})
        names = {int(k): v for k, v in spec["names"].items()}
        if parent is not None:  # the parent's names where it knows the id
            names = {**{c["id"]: c["name"] for c in parent.read_json("labels.json")["classes"]},
                     **names}
        return LabelMap(ids, names={i: names[i] for i in ids if i in names},
                        merge_left_right=spec["merge_left_right"], unknown="background")
    if spec["ids"] is None and parent is not None:
        return LabelMap.from_table(parent.read_json("labels.json")["classes"])
    return LabelMap(spec["ids"], names={int(k): v for k, v in spec["names"].items()},
                    merge_left_right=spec["merge_left_right"], unknown=spec["unknown"])


def preprocessing(recipe: Recipe, folder: pathlib.Path, train, parent, log):
    """Writes RUN/preprocess.json (and RUN/template.nii.gz); returns the Preprocessor."""
    from dazoo.preprocess import PreprocessConfig, Preprocessor, build_affine_template

    template = folder / "template.nii.gz"
    if parent is not None:
        config = parent.read_json("preprocess.json")
        if config.get("template"):
            if not template.exists():
                shutil.copyfile(parent.path / config["template"], template)
            config["template"] = template.name
        config = PreprocessConfig.from_dict(config, source=str(parent.file("preprocess.json")))
    elif recipe.builds_template:
        if not template.exists():
            spec = recipe["preprocess"]
            options = dict(spec["template"]["build"])
            started = time.perf_counter()
            log(f"building an affine template from {len(train)} training images")
            volume = build_affine_template(
                [s.image for s in train], voxel_size=spec["voxel_size"], shape=spec["shape"],
                orientation=spec["orientation"], intensity=spec["intensity"],
                iterations=options.pop("iterations", 2),
                metric=options.pop("metric", spec["metric"]), **options)
            io.write_image(volume, template)
            log(f"template built in {time.perf_counter() - started:.0f} s")
        config = recipe.preprocess_config(template.name)
    else:
        given = recipe["preprocess"]["template"]
        if given is not None:
            if not os.path.isfile(given):
                raise DazooInputError(recipe.source, f"template {given} does not exist")
            if not template.exists():
                shutil.copyfile(given, template)
        config = recipe.preprocess_config(template.name if given is not None else None)
    io.write_text_atomic(folder / "preprocess.json", config.to_json() + "\n")
    return Preprocessor(config, root=folder)
