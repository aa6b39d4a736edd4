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

The run folder is :class:`~dazoo.training.runfolder.RunFolder`, what it trains on
:func:`dazoo.training.data.gather` (the checks), the preset it exports
:func:`dazoo.training.exporter.export`; this module builds the model from the recipe and fits it.
Training goes through ``model.fit`` (Keras's progress bar, callbacks, ``tf.distribute``);
one Keras epoch is one checkpoint interval, so that a killed run resumes exactly
(:mod:`dazoo.training.callbacks`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence

from dazoo import __version__
from dazoo.batch import REGISTRATION, SEGMENTATION, Schedule
from dazoo.errors import DazooInputError
from dazoo.training.data import split_subjects  # noqa: F401  (was defined here)
from dazoo.training.exporter import DEEPATLAS_CITATION, export  # noqa: F401  (the same API)
from dazoo.training.precision import machine_precision, native_bfloat16, network_precisions
from dazoo.training.recipe import Recipe
from dazoo.training.runfolder import RunFolder, now, worker, write_json

__all__ = ["train", "export", "finetune", "Run", "build_model", "compile_model",
           "make_strategy", "checkpoint_interval"]


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


def _uses_bfloat16(precision) -> bool:
    return "mixed_bfloat16" in network_precisions(precision).values()


def _precision_here(recipe: Recipe) -> tuple[Recipe, str | None]:
    """The recipe with its precision for this machine (bfloat16 -> float32 where bfloat16 is
    emulated, see :func:`~dazoo.training.precision.native_bfloat16`) and the warning to print."""
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


#: Recipe keys a resumed run may change (``dazoo train --resume RUN --set KEY=VALUE``).
RESUME_KEYS = ("training.checkpoint_every", "training.validate_every",
               "training.validation_pairs")


def _sampling_period(record, training) -> int:
    """The steps per epoch that seed each step's draws (:meth:`PairDataset.at_step`): the
    run's first ``checkpoint_every``, so a resumed run that changed it draws the batches an
    uninterrupted run would."""
    for change in (record or {}).get("changes", []):
        if change["key"] == "training.checkpoint_every":
            return int(change["from"])
    return int(training["checkpoint_every"])


def _resume_overrides(run, overrides) -> Recipe:
    """The resumed run's recipe with bookkeeping ``overrides`` (:data:`RESUME_KEYS`),
    checked like a new recipe, written to its ``recipe.json`` and recorded in ``run.json``."""
    keys = [item.partition("=")[0].strip() for item in overrides]
    refused = [k for k in keys if k not in RESUME_KEYS]
    if refused:
        raise DazooInputError("--set", f"a resumed run can change only {list(RESUME_KEYS)} "
                                       f"(its math and batches stay the run's), not {refused}")
    before = run.recipe
    recipe = before.with_overrides(list(overrides))
    step = _steps_completed(run)
    for key in keys:
        section, name = key.split(".")
        old, new = before[section][name], recipe[section][name]
        if old == new:
            continue
        if name == "checkpoint_every" and step % new:
            raise DazooInputError("--set", f"{key}={new}: the run is at step {step}, not a "
                                           f"multiple of it")
        _record_change(run, recipe, "changes", {"key": key, "from": old, "to": new},
                       f"{key} {old} -> {new} from step {step} on (recorded in run.json)")
    return run.recipe


def _switch_precision(run, precision) -> Recipe:
    """The resumed run's recipe with ``precision``; a change is written to its
    ``recipe.json``, logged and recorded in ``run.json`` (applied by :func:`load_checkpoint`)."""
    network_precisions(precision)  # checked before anything is written
    old = run.recipe["precision"]
    if network_precisions(old) == network_precisions(precision):
        return run.recipe
    recipe = run.recipe.with_overrides([f"precision={json.dumps(precision)}"])
    _record_change(run, recipe, "precision_changes", {"from": old, "to": precision},
                   f"precision {json.dumps(old)} -> {json.dumps(precision)} from step "
                   f"{_steps_completed(run)} on (recorded in run.json and the run's recipe.json)")
    return run.recipe


def _steps_completed(run) -> int:
    return run.record.get("steps_completed") or 0


def _record_change(run, recipe: Recipe, field: str, change: dict, message: str) -> None:
    """A resumed run's recipe changed: ``change`` (with the step and time) appended to the
    list ``field`` of its ``run.json``, the recipe written as its ``recipe.json``, logged."""
    from dazoo import io

    record = dict(run.record)
    record.setdefault(field, []).append({"at_step": _steps_completed(run), **change,
                                         "when": now()})
    run.write_record(record)
    io.write_text_atomic(run.path / "recipe.json", recipe.to_json() + "\n")
    run.recipe = recipe
    run.say(message)


def load_checkpoint(path, precision=None, *, compile=True):
    """A run's ``checkpoint.keras`` (a compiled DeepAtlas with its optimizers' state) under
    the backend in use, with each network's dtype policy set from a recipe ``precision`` when
    given: the weights are float32 under every policy, so only the arithmetic changes.

    Keras writes a backend's own optimizer class into the file (under torch
    ``keras.src.backend.torch.optimizers.torch_adam.Adam``, whose update calls torch on the
    variables), so a checkpoint saved under one backend would not train under another; those
    classes are read as the public ``keras.optimizers`` ones, whose variables are the same."""
    import tempfile
    import zipfile

    import keras

    import dazoo.models  # noqa: F401  (registers dazoo's classes)

    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
        changed = _portable_optimizers(config)
        if precision is not None:
            changed |= _set_precision(config["config"], network_precisions(precision))
        if not changed:
            return keras.saving.load_model(path, compile=compile)
        with tempfile.TemporaryDirectory() as tmp:
            copy = pathlib.Path(tmp) / "checkpoint.keras"
            with zipfile.ZipFile(copy, "w") as out:
                for item in archive.infolist():
                    data = (json.dumps(config).encode() if item.filename == "config.json"
                            else archive.read(item.filename))
                    out.writestr(item, data)
            return keras.saving.load_model(copy, compile=compile)


def _portable_optimizers(config) -> bool:
    """Backend-specific optimizer classes in a saved config replaced by ``keras.optimizers``'
    (in place); whether anything changed."""
    changed = False
    if isinstance(config, dict):
        module = config.get("module")
        if (isinstance(module, str) and module.startswith("keras.src.backend.")
                and ".optimizers" in module):
            config["module"] = "keras.optimizers"
            config["registered_name"] = None
            changed = True
        for value in config.values():
            changed |= _portable_optimizers(value)
    elif isinstance(config, list):
        for value in config:
            changed |= _portable_optimizers(value)
    return changed


def _set_precision(nets: dict, wanted: dict) -> bool:
    """Each network's dtype policy in a DeepAtlas config set to ``wanted`` (in place)."""
    changed = False
    for key, net in (("registration", "registration_net"), ("segmentation", "segmentation_net")):
        policy = nets[net]["config"]["dtype"]
        name = policy["config"]["name"] if isinstance(policy, dict) else policy
        if name != wanted[key]:
            nets[net]["config"]["dtype"] = {"module": "keras", "class_name": "DTypePolicy",
                                            "config": {"name": wanted[key]},
                                            "registered_name": None}
            changed = True
    return changed


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
    grid = {}  # init.preprocessing "recipe": the parent's networks on this recipe's grid
    if not recipe.parent_preprocessing:
        grid = {"inshape": list(recipe["preprocess"]["shape"])}
        log(f"the parent's networks on the recipe's grid {recipe['preprocess']['shape']}")
    registration = RegistrationNet.from_config(dict(
        config["registration_net"]["config"], **grid,
        dtype=network_precisions(recipe["precision"])["registration"]))
    seg_config = _segmentation_config(dict(config["segmentation_net"]["config"], **grid),
                                      num_classes, recipe["precision"])
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
    import dazoo.models  # noqa: F401  (registers dazoo's classes)

    for network in ("registration", "segmentation"):
        source = init.get(f"{network}_from")
        if not source:
            continue
        path = pathlib.Path(source)
        path = path / "checkpoint.keras" if path.is_dir() else path
        if not path.is_file():
            raise DazooInputError(source, f"no checkpoint to initialise the {network} network")
        trained = load_checkpoint(path, compile=False)
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
        synth_similarity_weight=losses["synth_similarity_weight"],
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


# ----------------------------------------------------------------------------- train
def train(recipe: Recipe | str | os.PathLike | None, out: str | os.PathLike, *,
          resume: bool = False, callbacks: Sequence = (), verbose: int | None = None,
          command: str | None = None, strategy=None, precision=None, overrides=(),
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
        precision: with ``resume`` only: continue in this precision (a recipe
            ``"precision"`` value) instead of the run's, e.g. ``"float32"`` on a machine that
            emulates bfloat16 (several times slower there). The weights and optimizer state
            are float32 under either; the arithmetic of the steps from here on changes, so
            the run is no longer reproducible from its recipe alone: the switch is written
            to the run's ``recipe.json`` and recorded in ``run.json``
            (``precision_changes``).
        overrides: with ``resume`` only: ``KEY=VALUE`` changes of the run's bookkeeping
            that leave its arithmetic and its batches as they were (:data:`RESUME_KEYS`:
            how often it checkpoints and validates, how many validation pairs), written and
            recorded like ``precision`` (``run.json``: ``changes``). The batches stay
            the run's: their draws keep the run's first checkpoint interval as their period.
        log: receives the run's messages (also written to ``RUN/train.log``).

    Returns:
        a :class:`Run`.
    """
    import contextlib

    import keras

    from dazoo.presets import get_preset
    from dazoo.training.cache import VolumeCache
    from dazoo.training.callbacks import (
        ProgressLog,
        RunCheckpoint,
        Validation,
        Validator,
        keep_steps_up_to,
        read_validation,
        steps_done,
    )
    from dazoo.training.data import gather, preprocessing
    from dazoo.training.pairs import PairDataset

    fallback = None
    if not resume:
        recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
        recipe, fallback = _precision_here(recipe)
    run = RunFolder(out, recipe=None if resume else recipe, resume=resume, strategy=strategy,
                    log=log)
    folder, recipe, say = run.path, run.recipe, run.say
    if precision is not None or overrides:
        if not resume:
            raise ValueError("precision= and overrides= are for resuming a run; a new run "
                             "takes its recipe's")
        if overrides:
            recipe = _resume_overrides(run, overrides)
        if precision is not None:
            recipe = _switch_precision(run, precision)
    if resume and _uses_bfloat16(recipe["precision"]) and not native_bfloat16():
        say(f"warning: {folder}: the run trains in mixed_bfloat16, which this machine emulates "
            f"(no AVX512-BF16/AMX, no GPU): expect steps several times slower than float32 "
            f"(--precision float32 continues the run in float32)")
    elif fallback:
        say(fallback)
    try:
        c, t = recipe.config, recipe.config["training"]
        parent = get_preset(c["init"]["preset"]) if (c["init"] or {}).get("preset") else None
        data = gather(recipe, _schedule(recipe), parent)
        write_json(folder / "labels.json", {"classes": data.labels.to_table()})
        preprocessor = preprocessing(recipe, folder, data.train,
                                     parent if recipe.parent_preprocessing else None, say)
        cache = VolumeCache(preprocessor, folder=c["data"]["cache"] or folder / "cache")

        # The model: resumed from its checkpoint, or built (and compiled) from the recipe.
        scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
        checkpoint = folder / "checkpoint.keras"
        with scope:
            if resume and checkpoint.exists():
                import dazoo.models  # noqa: F401  (registers dazoo's classes)

                model = load_checkpoint(checkpoint, recipe["precision"])
                say(f"resumed {folder} at step {steps_done(model)}")
            else:
                keras.utils.set_random_seed(c["seed"])
                model = build_model(recipe, data.labels.num_classes, parent, log=say)
                compile_model(model, recipe)
        done, total, every = steps_done(model), t["steps"], t["checkpoint_every"]
        if done % every:
            raise DazooInputError(checkpoint, f"was saved at step {done}, not a multiple of "
                                              f"checkpoint_every {every}")
        keep_steps_up_to(folder, done)

        # The batches and the validation.
        started = time.perf_counter()
        say(f"preprocessing {len(data.train) + len(data.validation)} images"
            + (f" and {len(data.label_maps)} label maps" if data.label_maps else "")
            + f" (cached in {cache.folder})")
        synth, synth_probability = recipe.synth()
        dataset = PairDataset.from_subjects(
            data.train + data.label_maps, preprocessor, cache=cache, label_map=data.labels,
            synth=synth, synth_probability=synth_probability,
            batch_size=t["batch_size"], steps_per_epoch=_sampling_period(run.record, t),
            seed=c["seed"],
            labelled_fraction=t["labelled_fraction"], map_fraction=t["map_fraction"],
            augment=recipe.augmentation(),
            schedule=model.schedule, augment_phases=c["augmentation"]["phases"],
            **_labelled_options(c["data"]["labelled"]))
        validator = Validator(data.validation, cache, data.labels,
                              max_pairs=t["validation_pairs"])
        say(f"preprocessed in {time.perf_counter() - started:.0f} s ({cache.computed} new)")
        labelled = [dataset.names[i] for i in dataset.labelled]
        record = run.record or _new_record(recipe, data, dataset, labelled, parent, command,
                                           strategy, run.workers)
        say(f"{len(data.train)} training images"
            + (f" + {len(data.label_maps)} label maps (synthesised)" if data.label_maps else "")
            + f" ({len(labelled)} labelled), "
            f"{len(data.validation)} validation; {data.labels.num_classes} classes; steps "
            f"{done} -> {total}")
        session = {"started": now(), "from_step": done, "backend": keras.backend.backend(),
                   "precision": recipe["precision"]}
        record["sessions"].append(session)
        run.write_record(record)

        # Fitting: one Keras epoch per checkpoint interval.
        cbs = []
        if validator:
            cbs.append(Validation(validator, preprocessor, folder, every=t["validate_every"],
                                  last_step=total, monitor=t["monitor"], log=say))
        started = time.perf_counter()

        def record_session(epoch=None, logs=None):
            # run.json says how far this session got at every checkpoint: a run stopped
            # between checkpoints (a session cut off) keeps its steps and training time.
            steps = steps_done(model)
            session.update(to_step=steps, seconds=round(time.perf_counter() - started, 1))
            record["steps_completed"] = steps
            run.write_record(record)

        cbs += [RunCheckpoint(checkpoint, log=None),
                keras.callbacks.LambdaCallback(on_epoch_end=record_session),
                keras.callbacks.CSVLogger(str(folder / "log.csv"), append=True)]
        if keras.backend.backend() == "tensorflow":
            cbs.append(keras.callbacks.TensorBoard(str(folder / "tensorboard"),
                                                   write_graph=False))
        cbs += list(callbacks)
        if verbose is None:
            verbose = 1 if sys.stdout.isatty() else 2
        if verbose != 1:  # no progress bar: a line at least every 30 s instead
            cbs.append(ProgressLog(total, seconds=30.0, log=say))
        if done < total:
            # One iterator over the remaining steps (item i = step done + i), never shuffled:
            # each step gets its own batch whatever the epoch bookkeeping.
            model.fit(dataset.steps(done, total), epochs=total // every,
                      initial_epoch=done // every, steps_per_epoch=every, shuffle=False,
                      callbacks=cbs, verbose=verbose)
        record_session()
        steps = steps_done(model)
        say(f"done: {steps} steps, {session['seconds']:.0f} s this session")
        return Run(folder, model, steps, read_validation(folder))
    except Exception:
        run.discard()  # no half-made run folder left by a run that never started
        raise
    finally:
        run.close()


def _new_record(recipe, data, dataset, labelled, parent, command, strategy, workers) -> dict:
    """The ``run.json`` record of a new run."""
    c = recipe.config
    return {
        "dazoo_version": __version__, "created": now(), "command": command,
        "recipe": "recipe.json", "seed": c["seed"], "steps_planned": c["training"]["steps"],
        "train": [s.name for s in data.train],
        "label_maps": [m.labels for m in data.label_maps],
        "validation": [s.name for s in data.validation],
        "labelled": labelled,
        "unlabelled": [n for n in dataset.names if n not in labelled],
        "classes": data.labels.num_classes,
        "parent": None if parent is None else {
            "name": parent.name, "path": str(parent.path),
            "weights_sha256": parent.metadata.get("weights_sha256"),
            "version": parent.metadata.get("version")},
        "sessions": [],
        "strategy": None if strategy is None else {
            "name": type(strategy).__name__,
            "replicas": int(strategy.num_replicas_in_sync), "workers": workers},
    }


# ----------------------------------------------------------------------------- finetune
def checkpoint_interval(steps: int, at_most: int = 100) -> int:
    """The largest divisor of ``steps`` that is <= ``at_most``."""
    return max(d for d in range(1, min(steps, at_most) + 1) if steps % d == 0)


def finetune(parent: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
             steps: int = 400, validation: str | os.PathLike | None = None,
             image: str | None = None, labels: str | None = None,
             data_terms: str | None = None, labels_from_data: bool = False,
             freeze: Sequence[str] = (),
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
            unlabelled image) or a data folder (see :mod:`dazoo.training.subjects`: images/ +
            labels/, one subfolder per subject, or BIDS).
        out: the preset folder to write.
        steps: training steps (both networks together).
        validation: a CSV manifest or folder of labelled validation scans (scored at native
            resolution; the best checkpoint is exported). Without it the last one is.
        image, labels: the file patterns inside subject folders (default ``image.*`` /
            ``labels.*``; BIDS ``*_T1w.nii*`` / ``*_dseg.nii*``); a subject without a label
            file is unlabelled.
        data_terms: the fine-tuning data's license or terms, for the card (the weights
            derive from them; without it the card says they were not stated).
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
    # The parent's inference defaults are those of its metadata.json (what dazoo.load uses;
    # e.g. a refinement count chosen after export), not necessarily its recipe's.
    meta = preset.metadata
    inference = dict(config.get("inference", {}))
    for key in ("flip", "grow", "largest_component", "refine"):
        if key in meta:
            inference[key] = meta[key]
    if inference:
        config["inference"] = inference
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
            os.path.abspath(validation) if validation is not None else None),
              **({"image": image} if image else {}), **({"labels": labels} if labels else {})},
        init={"preset": str(preset.path), "labels_from_data": bool(labels_from_data)},
        training={"steps": int(steps), "checkpoint_every": every,
                  "validate_every": validate_every or every * max(1, int(steps) // every // 4)},
        card={"license": preset.metadata.get("license"),
              "license_note": preset.metadata.get("license_note"),
              "citations": [c for c in base.get("card", {}).get("citations", [])],
              "notes": list(notes),
              "data_name": os.path.basename(os.path.abspath(data)),
              "data_terms": data_terms},
    )
    recipe = Recipe.from_dict(config, source=os.fspath(data))
    train(None if resume else recipe, run, resume=resume, callbacks=callbacks, verbose=verbose,
          command=command, strategy=strategy, log=log)
    if strategy is not None and not worker(strategy)[0]:
        return None  # only the chief exports
    return export(run, out, checkpoint="best", command=None, log=log)
