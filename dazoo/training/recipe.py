"""Recipes: one JSON file declaring everything a training run needs.

A recipe has these sections (every key is checked; an unknown key is an error, a missing
one takes the default shown by ``Recipe.defaults()``)::

    {
      "name": "brain", "description": "...",
      "seed": 0,
      "data": {"train": "data/",              CSV manifest (image,labels) or folder
               "image": "t1.nii.gz", "labels": "labels.nii.gz",   folder patterns
               "validation": ["s12", "s13"],  names in "train", a CSV manifest or folder, or
                                               {"count": 3, "seed": 0}: a seeded split
               "labelled": "all",             "all", k (seeded choice), or names
               "cache": null,                  folder of preprocessed volumes (default RUN/cache)
               "label_maps": null},            label maps without images (folder, glob or list;
                                               for "synth"; an entry {"path": ..., "relabel":
                                               {id: new id or "nearest"}} maps another
                                               protocol's ids: "nearest" gives an id's voxels
                                               the nearest kept structure's id, e.g.
                                               dazoo.labels.whole_brain_relabel)
      "labels": {"ids": [...], "names": {"1002": "..."}, "merge_left_right": false,
                 "unknown": "background"},    or {"from_data": true}: every id in the train labels
      "preprocess": {... dazoo.preprocess.PreprocessConfig ...,
                     "template": "template.nii.gz" | {"build": {"iterations": 2}} | null},
      "model": {"mode": "joint", "registration_steps": 1, "segmentation_steps": 1,
                "registration": {RegistrationNet options}, "segmentation": {SegmentationNet options}},
                                               mode: "joint" (the paper's alternation),
                                               "simultaneous" (both networks each step, shared
                                               passes), "registration_only", "segmentation_only"
      "losses": {"similarity": "ncc", "ncc_window": 9, "smoothness_weight": 1.0,
                 "anatomy_weight": 1.0, "supervised_weight": 1.0,
                 "segmentation_anatomy_weight": 1.0, "synth_similarity_weight": 1.0},
                                               synth_similarity_weight: the image similarity's
                                               weight on pairs that do not share a contrast
                                               (a synthesised image with its own intensities;
                                               SynthMorph: 0)
      "optimizers": {"registration": {"name": "adam", "learning_rate": 3e-4, "decay": "constant"},
                     "segmentation": {"name": "adam", "learning_rate": 1e-3, "decay": "constant"}},
      "training": {"steps": 6000, "batch_size": 1, "checkpoint_every": 100,
                   "validate_every": 500, "validation_pairs": 6, "monitor": "native_dice",
                   "labelled_fraction": null, "map_fraction": null, "recompute": 0},
                                               map_fraction: probability of drawing a label
                                               map (synthesised) instead of a real image;
                                               recompute: U-Net levels recomputed in the
                                               backward pass (DeepAtlas.compile(recompute=N):
                                               same training, less memory, more time)
      "augmentation": {"rotation": 0, "scale": 0, "translation": 0, "elastic": 0,
                       "elastic_spacing": 16, "gamma": 0, "noise": 0, "flip": 0,
                       "flip_axis": 0, "phases": ["registration", "segmentation"]},
      "synth": null,                           or {"probability": p, LabelSynth options...}:
                                               labelled training images are replaced, with
                                               probability p, by images synthesised from their
                                               label maps (SynthSeg-style); data.label_maps
                                               (label maps without images, a folder, glob or
                                               list) are always synthesised
      "precision": "float32",                  or "mixed_bfloat16" (the segmenter's arithmetic),
                                               or {"registration": P, "segmentation": P};
                                               bfloat16 falls back to float32, with a
                                               warning, where it is not native (a CPU
                                               without AVX512-BF16/AMX): slower there
      "init": null,                            or {"preset": "brain", "labels_from_data": false}
                                               (+ "segmentation_features": [[enc], [dec]]:
                                               the preset's segmenter grown to these filters,
                                               computing the same function at step 0; see
                                               dazoo.models.widen;
                                               + "preprocessing": "recipe": this recipe's
                                               preprocess section (another grid, a new
                                               template) instead of the preset's, the
                                               preset's weights copied onto it: convolution
                                               kernels do not depend on the grid)
                                               or {"registration_from": RUN, "segmentation_from": RUN}
      "inference": {"flip": false},            the exported preset's defaults: "flip" true
                                               averages each segmentation with that of the
                                               mirrored scan (dazoo segment --flip);
                                               "refine": {"iterations": N, "learning_rate":
                                               .., "smoothness": .., "anatomy": ..} makes
                                               register refine N steps by default; "grow"
                                               true: segment grows the model grid to an
                                               input's whole field of view (Pipeline.grows);
                                               "largest_component": [ids]: segment keeps only
                                               the largest connected piece of each of these
                                               structures (one-piece anatomy, e.g. bones)
      "card": {"license": ..., "license_note": ..., "citations": [...], "notes": [...],
               "data_name": ..., "version": 2}  model-card prose, copied into the exported
                                                preset; "version": the model's own version
    }

Paths are relative to the recipe file's folder. :meth:`Recipe.load` resolves them, so the
copy a run keeps (``RUN/recipe.json``) holds absolute paths and resumes from anywhere.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from dazoo.errors import DazooInputError
from dazoo.training.precision import (  # noqa: F401  (re-exported: the recipe's precision)
    PRECISIONS,
    cpu_flags,
    machine_precision,
    native_bfloat16,
    network_precisions,
)

__all__ = ["Recipe", "DEFAULTS"]

#: Every key a recipe may hold, with its default (None: no default, or "not set").
DEFAULTS: dict[str, Any] = {
    "name": "model",
    "description": "",
    "seed": 0,
    "data": {"train": None, "image": "image.*", "labels": "labels.*", "validation": None,
             "labelled": "all", "cache": None, "label_maps": None},
    "labels": {"from_data": False, "ids": None, "names": {}, "merge_left_right": False,
               "unknown": "background"},
    "preprocess": {"voxel_size": [2.0, 2.0, 2.0], "shape": [80, 96, 80], "orientation": "RAS",
                   "intensity": {"method": "percentile", "lower": 0.5, "upper": 99.5,
                                 "nonzero": True},
                   "template": None, "alignment": "none", "metric": "correlation",
                   "centre": "mass", "levels": 4, "mirror": "none"},
    "model": {"mode": "joint", "registration_steps": 1, "segmentation_steps": 1,
              "registration": {}, "segmentation": {}},
    "losses": {"similarity": "ncc", "ncc_window": 9, "smoothness_weight": 1.0,
               "anatomy_weight": 1.0, "supervised_weight": 1.0,
               "segmentation_anatomy_weight": 1.0, "synth_similarity_weight": 1.0},
    "optimizers": {
        "registration": {"name": "adam", "learning_rate": 3e-4, "decay": "constant"},
        "segmentation": {"name": "adam", "learning_rate": 1e-3, "decay": "constant"},
    },
    "training": {"steps": 6000, "batch_size": 1, "checkpoint_every": 100, "validate_every": 500,
                 "validation_pairs": 6, "monitor": "native_dice", "labelled_fraction": None,
                 "map_fraction": None, "recompute": 0},
    "augmentation": {"rotation": 0.0, "scale": 0.0, "translation": 0.0, "elastic": 0.0,
                     "elastic_spacing": 16.0, "gamma": 0.0, "noise": 0.0, "flip": 0.0,
                     "flip_axis": 0, "phases": ["registration", "segmentation"]},
    "synth": None,
    "precision": "float32",
    "init": None,
    "inference": {"flip": False, "refine": None, "grow": False, "largest_component": []},
    "card": {"license": None, "license_note": None, "citations": [], "notes": [],
             "data_name": None, "version": None, "data_terms": None},
}
# Sections whose content is free-form (checked by the classes they configure).
_OPEN = {("model", "registration"), ("model", "segmentation"), ("labels", "names"), ("synth",)}
_INIT_KEYS = {"preset", "labels_from_data", "registration_from", "segmentation_from",
              "segmentation_features", "preprocessing"}
MONITORS = ("native_dice", "native_seg_dice", "native_reg_dice", "seg_dice", "warped_dice")
OPTIMIZERS = ("adam", "adamw", "sgd")
DECAYS = ("constant", "cosine")


def _merge(defaults: Any, given: Any, where: str, source: str, path=()) -> Any:
    """``given`` over ``defaults``, refusing keys the defaults do not have."""
    if not isinstance(defaults, dict) or path in _OPEN:
        return copy.deepcopy(given)
    if not isinstance(given, Mapping):
        raise DazooInputError(source, f"{where or 'the recipe'} must be a JSON object")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise DazooInputError(source, f"unknown key(s) {unknown} in {where or 'the recipe'}")
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if key == "init" and not path:
            out[key] = copy.deepcopy(value)
        elif isinstance(defaults.get(key), dict) and value is not None:
            out[key] = _merge(defaults[key], value, f"{where}.{key}".strip("."), source,
                              path + (key,))
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclasses.dataclass
class Recipe:
    """A validated recipe (see the module docstring).

    Attributes:
        config: the full recipe, defaults filled in, paths absolute.
        source: where it was read from (for messages), or ``"<recipe>"``.
    """

    config: dict
    source: str = "<recipe>"

    @staticmethod
    def defaults() -> dict:
        return copy.deepcopy(DEFAULTS)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, root: str | os.PathLike | None = None,
                  source: str = "<recipe>") -> Recipe:
        """Fills in defaults, checks every key and value, resolves paths against ``root``."""
        full = _merge(DEFAULTS, config, "", source)
        recipe = cls(full, source)
        recipe._resolve(os.fspath(root) if root is not None else os.getcwd())
        recipe.check()
        return recipe

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        """Reads a recipe file (paths in it are relative to its folder)."""
        from dazoo.io import read_json

        path = os.fspath(path)
        config = read_json(path, what="JSON recipe")
        return cls.from_dict(config, root=os.path.dirname(os.path.abspath(path)), source=path)

    def with_overrides(self, items) -> Recipe:
        """A new recipe with ``KEY=VALUE`` overrides (``dazoo train --set``): dotted keys
        (``training.steps=300``), values parsed as JSON where they parse, else strings; the
        result is checked as a whole."""
        config = copy.deepcopy(self.config)
        for item in items:
            key, sign, text = str(item).partition("=")
            *parents, leaf = key.split(".")
            section = config
            for name in parents:
                section = section.get(name) if isinstance(section, dict) else None
            if not sign or not isinstance(section, dict) or leaf not in section:
                raise DazooInputError("--set", f"{item!r}: expected KEY=VALUE with a recipe key "
                                               "such as training.steps")
            try:
                section[leaf] = json.loads(text)
            except ValueError:
                section[leaf] = text
        return Recipe.from_dict(config, source=self.source)

    def to_json(self) -> str:
        return json.dumps(self.config, indent=1)

    def __getitem__(self, key: str) -> Any:
        return self.config[key]

    # ------------------------------------------------------------------ checks
    def _resolve(self, root: str) -> None:
        def absolute(value):
            return value if os.path.isabs(value) else os.path.normpath(os.path.join(root, value))

        data = self.config["data"]
        for key in ("train", "cache"):
            if isinstance(data[key], str):
                data[key] = absolute(data[key])
        if isinstance(data["validation"], str):
            data["validation"] = absolute(data["validation"])
        maps = data["label_maps"]
        if isinstance(maps, str):
            data["label_maps"] = absolute(maps)
        elif isinstance(maps, (list, dict)):
            def resolve(entry):
                if isinstance(entry, str):
                    return absolute(entry)
                if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                    return dict(entry, path=absolute(entry["path"]))
                return entry
            data["label_maps"] = ([resolve(m) for m in maps] if isinstance(maps, list)
                                  else resolve(maps))
        template = self.config["preprocess"]["template"]
        if isinstance(template, str):
            self.config["preprocess"]["template"] = absolute(template)
        init = self.config["init"]
        if isinstance(init, dict) and isinstance(init.get("preset"), str):
            candidate = absolute(init["preset"])
            if os.path.isdir(candidate):  # a folder; else a shipped preset's name
                init["preset"] = candidate
        if isinstance(init, dict):
            for key in ("registration_from", "segmentation_from"):
                if isinstance(init.get(key), str):
                    init[key] = absolute(init[key])

    def _fail(self, message: str):
        raise DazooInputError(self.source, message)

    def check(self) -> None:
        """Raises :class:`DazooInputError` (naming the recipe) for a bad value."""
        c = self.config
        if not isinstance(c["seed"], int) or isinstance(c["seed"], bool):
            self._fail(f"seed must be an integer, got {c['seed']!r}")
        data = c["data"]
        if not isinstance(data["train"], str):
            self._fail("data.train must name a CSV manifest or a data folder")
        validation = data["validation"]
        if not (validation is None or isinstance(validation, (str, list))
                or (isinstance(validation, dict) and set(validation) <= {"count", "seed"}
                    and isinstance(validation.get("count"), int))):
            self._fail("data.validation must be null, a list of names, a CSV manifest or "
                       "{\"count\": n, \"seed\": s}")
        labelled = data["labelled"]
        if not (labelled == "all" or isinstance(labelled, list)
                or (isinstance(labelled, int) and not isinstance(labelled, bool)
                    and labelled >= 0)):
            self._fail(f"data.labelled must be \"all\", a count or a list of names, "
                       f"got {labelled!r}")
        labels = c["labels"]
        if not labels["from_data"] and not labels["ids"] and not (c["init"] or {}).get("preset"):
            self._fail("labels needs \"ids\" (or \"from_data\": true)")
        if labels["unknown"] not in ("error", "background"):
            self._fail("labels.unknown must be \"error\" or \"background\"")
        model = c["model"]
        from dazoo.batch import MODES

        if model["mode"] not in MODES:
            self._fail(f"model.mode must be one of {list(MODES)}, got {model['mode']!r}")
        for key in ("registration_steps", "segmentation_steps"):
            if not isinstance(model[key], int) or model[key] < 1:
                self._fail(f"model.{key} must be an integer >= 1")
        if c["losses"]["similarity"] not in ("ncc", "mse"):
            self._fail("losses.similarity must be \"ncc\" or \"mse\"")
        weight = c["losses"]["synth_similarity_weight"]
        if (not isinstance(weight, (int, float)) or isinstance(weight, bool)
                or not math.isfinite(weight) or weight < 0):
            self._fail("losses.synth_similarity_weight must be a finite number >= 0")
        for network in ("registration", "segmentation"):
            opt = c["optimizers"][network]
            if set(opt) - {"name", "learning_rate", "decay"}:
                self._fail(f"optimizers.{network} has unknown key(s) "
                           f"{sorted(set(opt) - {'name', 'learning_rate', 'decay'})}")
            if opt.get("name", "adam") not in OPTIMIZERS:
                self._fail(f"optimizers.{network}.name must be one of {list(OPTIMIZERS)}")
            if opt.get("decay", "constant") not in DECAYS:
                self._fail(f"optimizers.{network}.decay must be one of {list(DECAYS)}")
            rate = opt.get("learning_rate")
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0:
                self._fail(f"optimizers.{network}.learning_rate must be a number > 0")
        t = c["training"]
        if not isinstance(c["inference"]["flip"], bool):
            self._fail("inference.flip must be true or false")
        if not isinstance(c["inference"]["grow"], bool):
            self._fail("inference.grow must be true or false")
        pieces = c["inference"]["largest_component"]
        if not isinstance(pieces, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in pieces):
            self._fail("inference.largest_component must be a list of label ids > 0")
        refine = c["inference"]["refine"]
        if refine is not None:
            known = {"iterations", "learning_rate", "smoothness", "anatomy"}
            if not isinstance(refine, dict) or set(refine) - known:
                self._fail(f"inference.refine must be an object with keys among {sorted(known)}")
            n = refine.get("iterations")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                self._fail("inference.refine.iterations must be an integer >= 0")
            for key in known - {"iterations"}:
                value = refine.get(key, 1.0)
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    self._fail(f"inference.refine.{key} must be a number >= 0")
        for key in ("steps", "batch_size", "checkpoint_every", "validate_every"):
            if not isinstance(t[key], int) or isinstance(t[key], bool) or t[key] < 1:
                self._fail(f"training.{key} must be an integer >= 1, got {t[key]!r}")
        recompute = t["recompute"]
        if not isinstance(recompute, int) or isinstance(recompute, bool) or recompute < 0:
            self._fail(f"training.recompute must be an integer >= 0, got {recompute!r}")
        if t["steps"] % t["checkpoint_every"]:
            self._fail(f"training.steps ({t['steps']}) must be a multiple of "
                       f"training.checkpoint_every ({t['checkpoint_every']})")
        if t["validate_every"] % t["checkpoint_every"]:
            self._fail(f"training.validate_every ({t['validate_every']}) must be a multiple of "
                       f"training.checkpoint_every ({t['checkpoint_every']})")
        if t["monitor"] not in MONITORS:
            self._fail(f"training.monitor must be one of {list(MONITORS)}")
        phases = c["augmentation"]["phases"]
        if not isinstance(phases, list) or set(phases) - {"registration", "segmentation"}:
            self._fail("augmentation.phases must be a list of \"registration\", \"segmentation\"")
        self.augmentation()  # checks the values
        maps = data["label_maps"]
        def map_entry(m):
            return isinstance(m, str) or (isinstance(m, dict) and isinstance(m.get("path"), str)
                                          and set(m) <= {"path", "relabel"})
        if maps is not None and not (map_entry(maps) or (
                isinstance(maps, list) and all(map_entry(m) for m in maps))):
            self._fail("data.label_maps must be null, a folder / glob pattern, "
                       "{\"path\": ..., \"relabel\": {id: new id or \"nearest\"}}, or a list of them")
        self.synth()  # checks the values
        if maps is not None and c["synth"] is None:
            self._fail("data.label_maps (label maps without images) needs a \"synth\" section: "
                       "their images are synthesised")
        try:
            network_precisions(c["precision"])
        except ValueError as err:
            self._fail(str(err))
        init = c["init"]
        if init is not None:
            if not isinstance(init, dict) or not init or set(init) - _INIT_KEYS:
                self._fail(f"init must be an object with keys among {sorted(_INIT_KEYS)}")
            if "preset" in init and ({"registration_from", "segmentation_from"} & set(init)):
                self._fail("init: give a preset, or networks from runs, not both")
            if "segmentation_features" in init and "preset" not in init:
                self._fail("init.segmentation_features widens a preset's segmenter: "
                           "give init.preset")
            if init.get("preprocessing", "parent") not in ("parent", "recipe"):
                self._fail("init.preprocessing must be \"parent\" (the preset's grid and "
                           "template) or \"recipe\" (this recipe's preprocess section)")
            if init.get("preprocessing") == "recipe" and "preset" not in init:
                self._fail("init.preprocessing applies to init.preset")
        if not self.parent_preprocessing:  # with a parent preset, its preprocessing is used
            self.preprocess_config("template.nii.gz" if self.builds_template else None)

    @property
    def parent_preprocessing(self) -> bool:
        """Whether the run uses its parent preset's preprocessing (grid, template): with
        ``init.preset``, unless ``init.preprocessing`` is ``"recipe"``."""
        init = self.config["init"] or {}
        return bool(init.get("preset")) and init.get("preprocessing", "parent") == "parent"

    # ------------------------------------------------------------------ builders
    def preprocess_config(self, template: str | None = None):
        """The :class:`~dazoo.preprocess.PreprocessConfig` (``template``: its path, when the
        recipe builds it)."""
        from dazoo.preprocess import PreprocessConfig

        config = dict(self.config["preprocess"])
        if isinstance(config["template"], dict):
            if set(config["template"]) != {"build"} or not isinstance(
                    config["template"]["build"], dict):
                self._fail("preprocess.template must be a path, null or {\"build\": {...}}")
            config["template"] = template
        elif template is not None:  # the run's own copy of a given template
            config["template"] = template
        try:
            return PreprocessConfig.from_dict(config, source=self.source)
        except DazooInputError as err:
            self._fail(f"preprocess: {err.problem}")
        except (TypeError, ValueError) as err:
            self._fail(f"preprocess: {err}")

    @property
    def builds_template(self) -> bool:
        return isinstance(self.config["preprocess"]["template"], dict)

    def synth(self):
        """``(LabelSynth, probability)`` from the ``"synth"`` section, or ``(None, 0.0)``."""
        from dazoo.training.synth import LabelSynth

        spec = self.config["synth"]
        if spec is None:
            return None, 0.0
        if not isinstance(spec, dict):
            self._fail("synth must be null or an object of LabelSynth options + \"probability\"")
        options = dict(spec)
        probability = options.pop("probability", 0.0)
        if isinstance(probability, bool) or not isinstance(probability, (int, float)) \
                or not 0 <= probability <= 1:
            self._fail("synth.probability must be a number in [0, 1]")
        if "groups" in options and isinstance(options["groups"], dict):
            try:
                options["groups"] = {int(k): v for k, v in options["groups"].items()}
            except (TypeError, ValueError):
                self._fail("synth.groups must map label ids to group names")
        if "priors" in options and isinstance(options["priors"], dict):
            try:
                options["priors"] = {int(k): tuple(v) for k, v in options["priors"].items()}
            except (TypeError, ValueError):
                self._fail("synth.priors must map label ids to [low, high] ranges")
        for key in ("mean", "std"):
            if isinstance(options.get(key), list):
                options[key] = tuple(options[key])
        fields = {f.name for f in dataclasses.fields(LabelSynth)}
        unknown = sorted(set(options) - fields)
        if unknown:
            self._fail(f"synth has unknown key(s) {unknown}; LabelSynth takes {sorted(fields)}")
        try:
            return LabelSynth(**options), float(probability)
        except DazooInputError as err:
            self._fail(f"synth: {err.problem}")
        except (TypeError, ValueError) as err:
            self._fail(f"synth: {err}")

    def augmentation(self):
        """The :class:`~dazoo.training.augment.Augmentation` (None when every value is 0)."""
        from dazoo.training.augment import Augmentation

        values = {k: v for k, v in self.config["augmentation"].items() if k != "phases"}
        augment = Augmentation(**values)
        active = augment.spatial or augment.gamma or augment.noise or augment.flip
        return augment if active else None
