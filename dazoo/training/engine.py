"""The training engine: ``train`` a recipe into a run folder, ``export`` a run as a preset,
``finetune`` a preset on a new cohort (``dazoo train`` / ``dazoo export`` / ``dazoo finetune``).

A run folder holds everything the run needs to resume and to be exported::

    RUN/recipe.json        the recipe, defaults filled in, paths absolute
    RUN/run.json           the record: command, subjects (train / validation / labelled),
                           parent preset, steps, sessions
    RUN/preprocess.json    the preprocessing (template relative: RUN/template.nii.gz)
    RUN/labels.json        the label table {"classes": [{"class", "id", "name"}, ...]}
    RUN/checkpoint.keras   the latest checkpoint: weights and both optimizers' state
    RUN/best.keras         the checkpoint with the best validation score
    RUN/validation.jsonl   one line of scores per validation
    RUN/log.csv            Keras's CSV log (one row per checkpoint interval)
    RUN/tensorboard/       TensorBoard logs
    RUN/train.log          what the run printed
    RUN/cache/             preprocessed volumes (unless the recipe names another folder)

Training goes through ``model.fit`` (Keras's progress bar, callbacks, ``tf.distribute``);
one Keras epoch is one checkpoint interval, so that a killed run resumes exactly
(:mod:`dazoo.training.callbacks`).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from dazoo import __version__, io
from dazoo.batch import REGISTRATION, SEGMENTATION, Schedule
from dazoo.errors import DazooInputError
from dazoo.labels import LabelMap, left_id
from dazoo.training.recipe import Recipe, machine_precision, native_bfloat16, network_precisions

__all__ = ["train", "export", "finetune", "Run"]

DEEPATLAS_CITATION = (
    "Xu Z., Niethammer M. DeepAtlas: Joint Semi-supervised Learning of Image Registration and "
    "Segmentation. MICCAI 2019. doi:10.1007/978-3-030-32245-8_47")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Run:
    """The result of :func:`train`.

    Attributes:
        folder: the run folder.
        model: the trained :class:`dazoo.DeepAtlas` (its last state).
        steps: training steps completed.
        validation: the validation records (``validation.jsonl``).
    """

    folder: pathlib.Path
    model: object
    steps: int
    validation: list[dict]


# ----------------------------------------------------------------------------- pieces
def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _write_json(path: pathlib.Path, data) -> None:
    io.write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def split_subjects(subjects, validation, *, source: str, seed: int = 0):
    """``(train, validation)`` subjects from the recipe's ``data.validation``."""
    from dazoo.training.subjects import read_manifest

    if validation is None:
        return list(subjects), []
    if isinstance(validation, str):
        held = read_manifest(validation)
        images = {os.path.realpath(s.image) for s in held}
        train = [s for s in subjects if os.path.realpath(s.image) not in images]
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


def _label_map(recipe: Recipe, train, parent) -> LabelMap:
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


def _preprocessing(recipe: Recipe, folder: pathlib.Path, train, parent, log):
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


def _uses_bfloat16(precision) -> bool:
    return "mixed_bfloat16" in network_precisions(precision).values()


def _precision_here(recipe: Recipe) -> tuple[Recipe, str | None]:
    """The recipe with its precision for this machine (bfloat16 -> float32 where bfloat16 is
    emulated, see :func:`~dazoo.training.recipe.native_bfloat16`) and the warning to print."""
    asked = recipe["precision"]
    if not _uses_bfloat16(asked):
        return recipe, None
    used = machine_precision(asked, native_bfloat16())
    if used == asked:
        return recipe, None
    return recipe.with_overrides([f"precision={json.dumps(used)}"]), (
        f"warning: {recipe.source}: precision {json.dumps(asked)} -> {json.dumps(used)}: this "
        f"machine has no native bfloat16 (no AVX512-BF16/AMX, no GPU), where it is slower and "
        f"less exact than float32")


def _segmentation_config(config: dict, num_classes: int, precision) -> dict:
    return dict(config, num_classes=int(num_classes),
                dtype=network_precisions(precision)["segmentation"])


def build_model(recipe: Recipe, num_classes: int, parent=None, *, log=_stderr):
    """The DeepAtlas a recipe declares (architecture and weights from ``parent`` when given)."""
    from dazoo.models import DeepAtlas, RegistrationNet, SegmentationNet

    spec = recipe["model"]
    options = dict(mode=spec["mode"], registration_steps=spec["registration_steps"],
                   segmentation_steps=spec["segmentation_steps"])
    if parent is None:
        shape = tuple(recipe["preprocess"]["shape"])
        seg_options = dict(spec["segmentation"])
        dtypes = network_precisions(recipe["precision"])
        seg_options["dtype"] = dtypes["segmentation"]
        try:
            registration = RegistrationNet(shape, **dict(spec["registration"],
                                                         dtype=dtypes["registration"]))
            segmentation = SegmentationNet(shape, num_classes, **seg_options)
        except (TypeError, ValueError) as err:
            raise DazooInputError(recipe.source, f"model: {err}") from None
        model = DeepAtlas(registration, segmentation, **options)
        _init_networks(model, recipe["init"] or {}, log)
        return model
    trained = DeepAtlas.from_preset(parent)
    config = parent.read_json("config.json")["model"]
    registration = RegistrationNet.from_config(dict(
        config["registration_net"]["config"],
        dtype=network_precisions(recipe["precision"])["registration"]))
    seg_config = _segmentation_config(config["segmentation_net"]["config"], num_classes,
                                      recipe["precision"])
    registration.set_weights(trained.registration_net.get_weights())
    same_classes = num_classes == trained.num_classes
    grown = (recipe["init"] or {}).get("segmentation_features")
    if grown is not None:
        return DeepAtlas(registration, _grown_segmenter(recipe, trained, seg_config, grown,
                                                        same_classes, log), **options)
    segmentation = SegmentationNet.from_config(seg_config)
    for layer in segmentation.layers:
        if layer.weights and (same_classes or layer.name != "logits"):
            layer.set_weights(trained.segmentation_net.get_layer(layer.name).get_weights())
    if not same_classes:
        log(f"segmenter's last layer re-initialised: {trained.num_classes} -> {num_classes} "
            "classes")
    return DeepAtlas(registration, segmentation, **options)


def _grown_segmenter(recipe, trained, seg_config: dict, features, same_classes: bool, log):
    """The parent's segmenter widened to ``features`` (``init.segmentation_features``), the
    same function at step 0 (:func:`dazoo.models.widen`)."""
    from dazoo.models import SegmentationNet, widen

    if not same_classes:
        raise DazooInputError(recipe.source, "init.segmentation_features needs the parent's "
                                             "classes (the head is kept)")
    try:
        segmentation = widen(trained.segmentation_net,
                             SegmentationNet.from_config(dict(seg_config, features=features)))
    except (TypeError, ValueError) as err:
        raise DazooInputError(recipe.source, f"init.segmentation_features: {err}") from None
    log(f"segmenter grown from {trained.segmentation_net.count_params()} to "
        f"{segmentation.count_params()} parameters (same function at step 0)")
    return segmentation


def _init_networks(model, init: dict, log) -> None:
    """Copies one network's weights from another run (``init.registration_from`` /
    ``init.segmentation_from``: a run folder (its last checkpoint) or a ``.keras`` file)."""
    import keras

    import dazoo.models  # noqa: F401  (registers dazoo's classes)

    for network in ("registration", "segmentation"):
        source = init.get(f"{network}_from")
        if not source:
            continue
        path = pathlib.Path(source)
        path = path / "checkpoint.keras" if path.is_dir() else path
        if not path.is_file():
            raise DazooInputError(source, f"no checkpoint to initialise the {network} network")
        trained = keras.saving.load_model(path, compile=False)
        getattr(model, f"{network}_net").set_weights(
            getattr(trained, f"{network}_net").get_weights())
        log(f"{network} network initialised from {path}")


def _optimizer(spec: dict, steps: int):
    import keras

    rate = float(spec["learning_rate"])
    if spec.get("decay", "constant") == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(rate, decay_steps=max(int(steps), 1))
    name = spec.get("name", "adam")
    return {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW,
            "sgd": keras.optimizers.SGD}[name](learning_rate=rate)


def _schedule(recipe: Recipe) -> Schedule:
    """The recipe's :class:`~dazoo.batch.Schedule` (``model.mode`` and cycle lengths)."""
    spec = recipe["model"]
    return Schedule(spec["mode"], spec["registration_steps"], spec["segmentation_steps"])


def compile_model(model, recipe: Recipe) -> None:
    """``model.compile`` with the recipe's optimizers, schedules and losses."""
    from dazoo.losses import MSE, NCC

    steps = recipe["training"]["steps"]
    updates = _schedule(recipe).updates_in(steps)  # a network no step updates: any length
    reg_steps, seg_steps = updates.get(REGISTRATION, steps), updates.get(SEGMENTATION, steps)
    losses = recipe["losses"]
    similarity = NCC(losses["ncc_window"]) if losses["similarity"] == "ncc" else MSE()
    model.compile(
        reg_optimizer=_optimizer(recipe["optimizers"]["registration"], reg_steps),
        seg_optimizer=_optimizer(recipe["optimizers"]["segmentation"], seg_steps),
        similarity_loss=similarity,
        smoothness_weight=losses["smoothness_weight"], anatomy_weight=losses["anatomy_weight"],
        supervised_weight=losses["supervised_weight"],
        segmentation_anatomy_weight=losses["segmentation_anatomy_weight"],
        recompute=recipe["training"]["recompute"])


def _labelled_options(labelled) -> dict:
    if labelled == "all":
        return {}
    if isinstance(labelled, int):
        return {"k": labelled}
    return {"labelled": list(labelled)}


# ----------------------------------------------------------------------------- strategies
STRATEGIES = ("mirrored", "multi_worker")


def make_strategy(name: str):
    """A ``tf.distribute`` strategy by name; create it before anything else touches TensorFlow.

    * ``"mirrored"``: every local GPU (``tf.distribute.MirroredStrategy``);
    * ``"multi_worker"``: several machines, each with its local devices
      (``tf.distribute.MultiWorkerMirroredStrategy``; the cluster comes from ``TF_CONFIG``).
    """
    import keras

    if name not in STRATEGIES:
        raise DazooInputError("--strategy", f"must be one of {list(STRATEGIES)}, got {name!r}")
    if keras.backend.backend() != "tensorflow":
        raise DazooInputError("--strategy", "tf.distribute needs KERAS_BACKEND=tensorflow")
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if "TF_CONFIG" not in os.environ:
        raise DazooInputError("--strategy", "multi_worker needs the cluster in TF_CONFIG")
    return tf.distribute.MultiWorkerMirroredStrategy()


def _worker(strategy) -> tuple[bool, int, int]:
    """``(is chief, task index, workers)`` of a strategy (a single process: the chief)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True, 0, 1
    spec = resolver.cluster_spec().as_dict()
    workers = sum(len(v) for k, v in spec.items() if k in ("chief", "worker"))
    kind, index = resolver.task_type, int(resolver.task_id or 0)
    chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in spec)
    return chief, index, workers


# ----------------------------------------------------------------------------- train
def train(recipe: Recipe | str | os.PathLike | None, out: str | os.PathLike, *,
          resume: bool = False, callbacks: Sequence = (), verbose: int | None = None,
          command: str | None = None, strategy=None,
          log: Callable[[str], None] = _stderr) -> Run:
    """Trains the DeepAtlas a recipe declares into the run folder ``out``.

    Args:
        recipe: a :class:`Recipe` or a recipe file; ignored with ``resume`` (the run's own
            copy is used).
        out: the run folder (see the module docstring). Refused if it holds a run already,
            unless ``resume``.
        resume: continue the run in ``out`` from its last checkpoint; the result is the
            same as an uninterrupted run's.
        callbacks: extra Keras callbacks.
        verbose: Keras's ``fit`` verbosity (default: progress bar on a terminal, one line
            per checkpoint interval otherwise).
        command: the command line to record in ``run.json`` (and the model card).
        strategy: a ``tf.distribute`` strategy (see :func:`make_strategy`): the model is
            built and compiled under its scope, ``training.batch_size`` is the global batch
            (split across the replicas; a multiple of their number), and each phase's
            gradients are all-reduced so the result equals one device with the whole batch.
            Under ``multi_worker`` every worker runs this function with the same ``out``: the
            chief writes ``out``, worker ``i`` its own copy in ``out/.worker-i`` (so a shared
            file system is not needed, and each can resume from its own checkpoint).
        log: receives the run's messages (also written to ``RUN/train.log``).

    Returns:
        a :class:`Run`.
    """
    import contextlib

    import keras

    from dazoo.presets import get_preset
    from dazoo.training.cache import VolumeCache
    from dazoo.training.callbacks import (RunCheckpoint, Validation, Validator,
                                          keep_steps_up_to, read_validation, steps_done)
    from dazoo.training.pairs import PairDataset
    from dazoo.training.subjects import load_subjects

    folder = pathlib.Path(out)
    chief, task, workers = _worker(strategy) if strategy is not None else (True, 0, 1)
    if not chief:
        folder = folder / f".worker-{task}"
    if resume:
        if not (folder / "run.json").is_file():
            raise DazooInputError(folder, "is not a run folder (no run.json) to resume")
        recipe = Recipe.load(folder / "recipe.json")
        record = json.loads((folder / "run.json").read_text())
    else:
        recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
        recipe, fallback = _precision_here(recipe)
        if (folder / "run.json").exists() or (folder / "checkpoint.keras").exists():
            raise DazooInputError(folder, "holds a run already: resume it (--resume) or "
                                          "choose another folder")
        folder.mkdir(parents=True, exist_ok=True)
        io.write_text_atomic(folder / "recipe.json", recipe.to_json() + "\n")
        record = None
    log_file = open(folder / "train.log", "a", buffering=1, encoding="utf-8")

    def say(message: str) -> None:
        log(message)
        log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    if resume and _uses_bfloat16(recipe["precision"]) and not native_bfloat16():
        say(f"warning: {folder}: the run trains in mixed_bfloat16, which this machine emulates "
            f"(no AVX512-BF16/AMX, no GPU): expect steps several times slower than float32")
    elif not resume and fallback:
        say(fallback)
    try:
        c = recipe.config
        data = c["data"]
        subjects = load_subjects(data["train"], image=data["image"], labels=data["labels"])
        train_subjects, val_subjects = split_subjects(subjects, data["validation"],
                                                      source=recipe.source, seed=c["seed"])
        label_maps = []
        if data["label_maps"] is not None:
            from dazoo.training.subjects import find_label_maps

            label_maps = find_label_maps(data["label_maps"], source=recipe.source)
            held = {os.path.realpath(s.labels) for s in val_subjects if s.labels}
            names = [s.name for s in val_subjects]
            # The same file, or another file of a validation subject (a map named after
            # it, e.g. Mindboggle-101's OASIS-TRT-20-12.aparcNMMjt+aseg.mgz for the
            # validation subject OASIS-TRT-20-12): both contaminate the validation.
            leaked = [m.labels for m in label_maps
                      if os.path.realpath(m.labels) in held
                      or any(_named_after(os.path.basename(m.labels), n) for n in names)]
            if leaked:
                raise DazooInputError(recipe.source, f"data.label_maps holds validation "
                                                     f"label maps {leaked}")
        if len(train_subjects) + len(label_maps) < 2 or not train_subjects:
            raise DazooInputError(data["train"], f"training needs at least 2 images (pairs for "
                                                 f"registration), one of them real; found "
                                                 f"{len(train_subjects)} images and "
                                                 f"{len(label_maps)} label maps")
        if not any(s.labels for s in train_subjects + label_maps) and \
                SEGMENTATION in _schedule(recipe).networks:
            raise DazooInputError(data["train"], "no training image has a label map: "
                                                 "segmentation needs at least 1")
        unlabelled_val = [s.name for s in val_subjects if s.labels is None]
        if unlabelled_val:
            raise DazooInputError(recipe.source, f"validation subject(s) {unlabelled_val} "
                                                 "have no label map")
        parent = get_preset(c["init"]["preset"]) if (c["init"] or {}).get("preset") else None
        label_map = _label_map(recipe, train_subjects + label_maps, parent)
        # Left/right tables, by FreeSurfer's ids (a heuristic: a right-side id, or a DK/DKT
        # or Destrieux cortical id of either side; custom id schemes are not recognised).
        sided = any(left_id(i) != i or 1000 <= i < 3000 or 11000 <= i < 13000
                    for i in label_map.ids.tolist())
        if recipe["preprocess"].get("mirror") == "auto" and sided:
            raise DazooInputError(recipe.source, "preprocess.mirror \"auto\" reflects some scans "
                                                 "onto the template's side, which would swap "
                                                 "left/right labels: not with a label table "
                                                 "that has left and right structures")
        if c["augmentation"].get("flip") and sided:
            raise DazooInputError(recipe.source, "augmentation.flip mirrors images and keeps "
                                                 "their label ids, which would swap left/right "
                                                 "labels: not with a label table that has left "
                                                 "and right structures")
        table = label_map.to_table()
        _write_json(folder / "labels.json", {"classes": table})
        preprocessor = _preprocessing(recipe, folder, train_subjects, parent, say)
        cache = VolumeCache(preprocessor, folder=data["cache"] or folder / "cache")

        scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
        checkpoint = folder / "checkpoint.keras"
        with scope:
            if resume and checkpoint.exists():
                import dazoo.models  # noqa: F401  (registers dazoo's classes)

                model = keras.saving.load_model(checkpoint)
                say(f"resumed {folder} at step {steps_done(model)}")
            else:
                keras.utils.set_random_seed(c["seed"])
                model = build_model(recipe, label_map.num_classes, parent, log=say)
                compile_model(model, recipe)
        done = steps_done(model)
        t = c["training"]
        total, every = t["steps"], t["checkpoint_every"]
        if done % every:
            raise DazooInputError(checkpoint, f"was saved at step {done}, not a multiple of "
                                              f"checkpoint_every {every}")
        keep_steps_up_to(folder, done)

        started = time.perf_counter()
        say(f"preprocessing {len(train_subjects) + len(val_subjects)} images"
            + (f" and {len(label_maps)} label maps" if label_maps else "")
            + f" (cached in {cache.folder})")
        synth, synth_probability = recipe.synth()
        dataset = PairDataset.from_subjects(
            train_subjects + label_maps, preprocessor, cache=cache, label_map=label_map,
            synth=synth, synth_probability=synth_probability,
            batch_size=t["batch_size"], steps_per_epoch=every, seed=c["seed"],
            labelled_fraction=t["labelled_fraction"], map_fraction=t["map_fraction"],
            augment=recipe.augmentation(),
            schedule=model.schedule, augment_phases=c["augmentation"]["phases"],
            **_labelled_options(data["labelled"]))
        validator = Validator(val_subjects, cache, label_map, max_pairs=t["validation_pairs"])
        say(f"preprocessed in {time.perf_counter() - started:.0f} s ({cache.computed} new)")
        labelled = [dataset.names[i] for i in dataset.labelled]
        if record is None:
            record = {
                "dazoo_version": __version__, "created": _now(), "command": command,
                "recipe": "recipe.json", "seed": c["seed"], "steps_planned": total,
                "train": [s.name for s in train_subjects],
                "label_maps": [m.labels for m in label_maps],
                "validation": [s.name for s in val_subjects],
                "labelled": labelled,
                "unlabelled": [n for n in dataset.names if n not in labelled],
                "classes": label_map.num_classes,
                "parent": None if parent is None else {
                    "name": parent.name, "path": str(parent.path),
                    "weights_sha256": parent.metadata.get("weights_sha256"),
                    "version": parent.metadata.get("version")},
                "sessions": [],
                "strategy": None if strategy is None else {
                    "name": type(strategy).__name__,
                    "replicas": int(strategy.num_replicas_in_sync), "workers": workers},
            }
        say(f"{len(train_subjects)} training images"
            + (f" + {len(label_maps)} label maps (synthesised)" if label_maps else "")
            + f" ({len(labelled)} labelled), "
            f"{len(val_subjects)} validation; {label_map.num_classes} classes; steps "
            f"{done} -> {total}")
        session = {"started": _now(), "from_step": done}
        record["sessions"].append(session)
        _write_json(folder / "run.json", record)

        monitor = t["monitor"]
        cbs = []
        if validator:
            cbs.append(Validation(validator, preprocessor, folder, every=t["validate_every"],
                                  last_step=total, monitor=monitor, log=say))
        started = time.perf_counter()

        def record_session(epoch, logs=None):
            # run.json says how far this session got at every checkpoint: a run stopped
            # between checkpoints (a session cut off) keeps its steps and training time.
            steps = steps_done(model)
            session.update(to_step=steps, seconds=round(time.perf_counter() - started, 1))
            record["steps_completed"] = steps
            _write_json(folder / "run.json", record)

        cbs += [RunCheckpoint(checkpoint, log=None),
                keras.callbacks.LambdaCallback(on_epoch_end=record_session),
                keras.callbacks.CSVLogger(str(folder / "log.csv"), append=True)]
        if keras.backend.backend() == "tensorflow":
            cbs.append(keras.callbacks.TensorBoard(str(folder / "tensorboard"),
                                                   write_graph=False))
        cbs += list(callbacks)
        if verbose is None:
            verbose = 1 if sys.stdout.isatty() else 2
        if done < total:
            # One iterator over the remaining steps (item i = step done + i), never shuffled:
            # each step gets its own batch whatever the epoch bookkeeping.
            model.fit(dataset.steps(done, total), epochs=total // every,
                      initial_epoch=done // every, steps_per_epoch=every, shuffle=False,
                      callbacks=cbs, verbose=verbose)
        steps = steps_done(model)
        session.update(to_step=steps, seconds=round(time.perf_counter() - started, 1))
        record["steps_completed"] = steps
        _write_json(folder / "run.json", record)
        say(f"done: {steps} steps, {session['seconds']:.0f} s this session")
        return Run(folder, model, steps, read_validation(folder))
    finally:
        log_file.close()


def _named_after(filename: str, subject: str) -> bool:
    """Whether ``filename`` is ``subject`` followed by ``.`` or ``_`` (and more): a file of
    that subject (``"s12.aseg.mgz"`` is one of ``"s12"``, ``"s123.mgz"`` is not)."""
    return filename.startswith(subject) and filename[len(subject):][:1] in (".", "_")


# ----------------------------------------------------------------------------- export
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
    import keras

    import dazoo.models  # noqa: F401  (registers dazoo's classes)
    from dazoo.presets import render_card, save_preset
    from dazoo.training.callbacks import read_validation, steps_done

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
    model = keras.saving.load_model(path)
    steps = steps_done(model)
    history = read_validation(folder)
    scores = next((h for h in history if h["step"] == steps), None)
    c = recipe.config
    card = c["card"]
    parent = record.get("parent")
    parent_meta = {}
    if parent is not None:
        from dazoo.presets import get_preset

        try:
            parent_meta = get_preset(parent["path"]).metadata
        except DazooInputError:
            parent_meta = {}
    tasks = [task for task in (SEGMENTATION, REGISTRATION) if task in model.schedule.networks]
    preprocess = json.loads((folder / "preprocess.json").read_text())
    labels = json.loads((folder / "labels.json").read_text())["classes"]
    summary = {}
    if scores:
        for key, text in (("native_seg_dice", "segmentation Dice (validation, native)"),
                          ("native_reg_dice", "registration Dice (validation pairs, native)")):
            if key in scores:
                summary[text] = round(scores[key], 3)
    metadata = {
        "version": __version__,
        "description": c["description"] or (
            f"DeepAtlas ({model.mode}) trained with dazoo train"
            + (f", fine-tuned from the {parent['name']} preset" if parent else "") + "."),
        "task": tasks,
        "license": card["license"] or parent_meta.get("license", "unspecified"),
        "license_note": card["license_note"] or parent_meta.get("license_note", ""),
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
        **({"refine": dict(c["inference"]["refine"])} if c["inference"].get("refine") else {}),
        "notes": list(card["notes"]),
        "citations": [DEEPATLAS_CITATION] + [x for x in card["citations"]
                                             if x != DEEPATLAS_CITATION],
    }
    files = {"recipe.json": folder / "recipe.json"}
    if preprocess.get("template"):
        files[preprocess["template"]] = folder / preprocess["template"]
    name = pathlib.Path(out).name
    metadata_for_card = {"name": name, **metadata}
    preset = save_preset(out, model=_float32(model), preprocess=preprocess, labels=labels,
                         metadata=metadata, files=files, readme=render_card(metadata_for_card))
    log(f"exported {path} (step {steps}) -> {preset.path}")
    return preset


# ----------------------------------------------------------------------------- finetune
def checkpoint_interval(steps: int, at_most: int = 100) -> int:
    """The largest divisor of ``steps`` that is <= ``at_most``."""
    return max(d for d in range(1, min(steps, at_most) + 1) if steps % d == 0)


def finetune(parent: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
             steps: int = 400, validation: str | os.PathLike | None = None,
             labels_from_data: bool = False, freeze: Sequence[str] = (),
             learning_rate: float | None = None, seed: int = 0,
             run: str | os.PathLike | None = None, resume: bool = False,
             checkpoint_every: int | None = None, validate_every: int | None = None,
             notes: Sequence[str] = (), callbacks: Sequence = (), command: str | None = None,
             strategy=None, verbose: int | None = None, log: Callable[[str], None] = _stderr):
    """Fine-tunes a preset on a cohort and writes the result as a preset (``dazoo finetune``).

    The parent's architecture, weights, preprocessing (template included) and training
    options (losses, schedule, optimizers, augmentation, precision: its ``recipe.json`` when
    it ships one) are kept; the cohort's labelled and unlabelled images are both used, as in
    DeepAtlas's semi-supervised training.

    Args:
        parent: a preset name or folder (e.g. ``"brain"``).
        data: the cohort, a CSV manifest ``image,labels`` (an empty ``labels`` cell for an
            unlabelled image) or a data folder.
        out: the preset folder to write.
        steps: training steps (both networks together).
        validation: a CSV manifest of labelled validation scans (scored at native
            resolution; the best checkpoint is exported). Without it the last one is.
        labels_from_data: use the cohort's own label ids as the label table (the
            segmenter's last layer is re-initialised). Default: the parent's table, ids it
            does not know count as background.
        freeze: ``["registration"]`` (train only the segmenter) or ``["segmentation"]``
            (only the registration network).
        learning_rate: both optimizers' learning rate (default: the parent recipe's).
        seed: seed of the initialisation of new layers and of the sampling.
        run: the run folder (default ``<out>.run``), for checkpoints and logs.
        resume: continue an interrupted fine-tuning from ``run``.
        notes: lines for the model card.

    Returns:
        the written :class:`dazoo.presets.Preset`.
    """
    from dazoo.presets import get_preset

    preset = get_preset(parent)
    freeze = sorted(set(freeze))
    if set(freeze) - {"registration", "segmentation"} or len(freeze) > 1:
        raise DazooInputError("--freeze", "give one of 'registration', 'segmentation'")
    run = pathlib.Path(run) if run is not None else pathlib.Path(f"{os.fspath(out).rstrip('/')}.run")
    base = {}
    if preset.file("recipe.json").is_file():
        base = json.loads(preset.file("recipe.json").read_text())
    config = {key: base[key] for key in ("model", "losses", "optimizers", "augmentation",
                                         "precision", "inference") if key in base}
    model = dict(config.get("model", {}))
    model.pop("registration", None)
    model.pop("segmentation", None)
    if freeze:
        model["mode"] = {"registration": "segmentation_only",
                         "segmentation": "registration_only"}[freeze[0]]
    elif Schedule(model.get("mode", "joint")).networks != {REGISTRATION, SEGMENTATION}:
        # A parent made by single-network training (e.g. brain v2's segmentation-only
        # fine-tuning) is still fine-tuned as DeepAtlas: --freeze chooses one network.
        model["mode"] = "joint"
    config["model"] = model
    if learning_rate is not None:
        config["optimizers"] = {
            net: dict(config.get("optimizers", {}).get(net, {}), learning_rate=learning_rate)
            for net in ("registration", "segmentation")}
    every = checkpoint_every or checkpoint_interval(int(steps))
    config.update(
        name=pathlib.Path(out).name,
        description="",
        seed=int(seed),
        data={"train": os.path.abspath(data), "validation": (
            os.path.abspath(validation) if validation is not None else None)},
        init={"preset": str(preset.path), "labels_from_data": bool(labels_from_data)},
        training={"steps": int(steps), "checkpoint_every": every,
                  "validate_every": validate_every or every * max(1, int(steps) // every // 4)},
        card={"license": preset.metadata.get("license"),
              "license_note": preset.metadata.get("license_note"),
              "citations": [c for c in base.get("card", {}).get("citations", [])],
              "notes": list(notes),
              "data_name": os.path.basename(os.path.abspath(data))},
    )
    recipe = Recipe.from_dict(config, source=os.fspath(data))
    train(None if resume else recipe, run, resume=resume, callbacks=callbacks, verbose=verbose,
          command=command, strategy=strategy, log=log)
    if strategy is not None and not _worker(strategy)[0]:
        return None  # only the chief exports
    return export(run, out, checkpoint="best", command=None, log=log)
