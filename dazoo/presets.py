"""The registry of pretrained presets: where they are, what they hold, and their checksums.

A preset is a folder (``pretrained/<name>/`` in the source tree, installed as the
``dazoo.pretrained`` package data) with:

* ``metadata.json``: the model card's machine-readable part (MONAI-bundle style): version,
  description, data and license, label table, the measured evaluation numbers and the
  commands that produced them, and ``weights_sha256``;
* ``README.md``: the model card for people;
* ``config.json``: ``{"model": <serialised DeepAtlas config>}``;
* ``model.weights.h5``: the weights of that model;
* ``preprocess.json``: a :class:`dazoo.preprocess.PreprocessConfig` (paths relative to the
  folder), e.g. the reference template it names;
* ``labels.json``: ``{"classes": [{"class": k, "id": label id, "name": ...}, ...]}``.

This module only reads JSON; it imports neither Keras nor TensorFlow.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib

from dazoo.errors import DazooInputError

__all__ = ["Preset", "preset_root", "list_presets", "get_preset", "sha256", "save_preset",
           "render_card"]

REQUIRED_FILES = ("metadata.json", "config.json", "model.weights.h5", "preprocess.json",
                  "labels.json")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A preset folder and its metadata.

    Args:
        name: the preset's name (its folder name).
        path: the folder.
        metadata: the parsed ``metadata.json``.
    """

    name: str
    path: pathlib.Path
    metadata: dict

    def file(self, name: str) -> pathlib.Path:
        return self.path / name

    def read_json(self, name: str) -> dict:
        try:
            return json.loads(self.file(name).read_text())
        except (OSError, ValueError) as err:
            raise DazooInputError(self.file(name), f"unreadable preset file ({err})") from None

    @property
    def kind(self) -> str:
        """``"deepatlas"`` (segment / register) or ``"brain-extraction"`` (``dazoo strip``)."""
        return self.metadata.get("kind", DEEPATLAS)

    def require(self, kind: str) -> Preset:
        """This preset if it is of ``kind``; else a one-line :class:`DazooInputError`
        saying what it is and what to use instead."""
        if self.kind == kind:
            return self
        if self.kind == EXTRACTOR:
            raise DazooInputError(self.name, "is a brain extractor, not a DeepAtlas preset: "
                                             "use dazoo strip (or --skull-strip on)")
        raise DazooInputError(self.name, f"is not a {kind} preset")

    @property
    def description(self) -> str:
        return self.metadata.get("description", "")

    def verify(self) -> None:
        """Checks that every file is present and the weights match ``weights_sha256``."""
        for name in REQUIRED_FILES:
            if not self.file(name).is_file():
                raise DazooInputError(self.path, f"preset is missing {name}")
        expected = self.metadata.get("weights_sha256")
        actual = sha256(self.file("model.weights.h5"))
        if expected != actual:
            raise DazooInputError(
                self.file("model.weights.h5"),
                f"sha256 {actual[:12]}... does not match the model card's "
                f"{str(expected)[:12]}... (corrupt or modified weights)",
            )


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def preset_root() -> pathlib.Path:
    """The folder holding the presets: the installed package data, else the source tree's."""
    try:
        import dazoo.pretrained as installed

        return pathlib.Path(installed.__file__).parent
    except ImportError:
        return pathlib.Path(__file__).resolve().parent.parent / "pretrained"


#: ``metadata.json`` ``"kind"`` of a brain-extraction preset (``brainmask``); without a
#: ``"kind"`` a preset is a DeepAtlas one.
EXTRACTOR, DEEPATLAS = "brain-extraction", "deepatlas"


def _read(path: pathlib.Path) -> Preset:
    try:
        metadata = json.loads((path / "metadata.json").read_text())
    except (OSError, ValueError) as err:
        raise DazooInputError(path / "metadata.json", f"unreadable model card ({err})") from None
    return Preset(name=metadata.get("name", path.name), path=path, metadata=metadata)


def list_presets() -> list[Preset]:
    """Every preset shipped with dazoo, sorted by name."""
    root = preset_root()
    if not root.is_dir():
        return []
    return [_read(p) for p in sorted(root.iterdir())
            if not p.name.startswith(".") and (p / "metadata.json").is_file()]


def get_preset(name_or_path: str | os.PathLike) -> Preset:
    """A shipped preset by name, or a preset folder by path."""
    path = pathlib.Path(name_or_path)
    if path.is_dir() and (path / "metadata.json").is_file():
        return _read(path)
    for preset in list_presets():
        if preset.name == str(name_or_path):
            return preset
    names = ", ".join(p.name for p in list_presets()) or "none installed"
    raise DazooInputError(str(name_or_path), f"no such preset (available: {names})")


def save_preset(
    folder: str | os.PathLike,
    *,
    model,
    preprocess: dict,
    labels: list[dict],
    metadata: dict,
    files: dict[str, str | os.PathLike] | None = None,
    readme: str | None = None,
) -> Preset:
    """Writes a preset folder (see the module docstring) and returns it, verified.

    Args:
        folder: destination (created; existing preset files are replaced).
        model: a :class:`dazoo.DeepAtlas` (its config and weights are saved).
        preprocess: a :class:`dazoo.preprocess.PreprocessConfig` as a dict; relative paths
            in it (the template) refer to ``files`` copied into the folder.
        labels: ``[{"class": k, "id": label id, "name": str}, ...]``, class 0 = background.
        metadata: the model card's fields; ``name``, ``weights_sha256`` and ``framework``
            are filled in.
        files: extra files to copy in, ``{name in the folder: source path}`` (e.g. the
            template).
        readme: the model card text (``README.md``).
    """
    import platform
    import shutil
    import tempfile

    import keras

    final = pathlib.Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Built and verified in a sibling folder, then swapped in: an interrupted save never
    # leaves weights that disagree with the recorded sha256.
    folder = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(folder, 0o755)
    try:
        for name, source in (files or {}).items():
            shutil.copyfile(source, folder / name)
        model.save_weights(folder / "model.weights.h5")
        (folder / "config.json").write_text(json.dumps({"model": model.get_config()},
                                                       indent=1))
        (folder / "preprocess.json").write_text(json.dumps(preprocess, indent=2,
                                                           sort_keys=True))
        (folder / "labels.json").write_text(json.dumps({"classes": labels}, indent=1))
        metadata = {
            "name": final.name,
            **metadata,
            "weights_sha256": sha256(folder / "model.weights.h5"),
            "framework": {"keras": keras.__version__, "backend": keras.backend.backend(),
                          "python": platform.python_version()},
        }
        (folder / "metadata.json").write_text(json.dumps(metadata, indent=1))
        if readme is not None:
            (folder / "README.md").write_text(readme)
        _read(folder).verify()
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(folder, final)
            shutil.rmtree(old)
        else:
            os.replace(folder, final)
    finally:
        if folder.exists():
            shutil.rmtree(folder)
    return _read(final)


# ----------------------------------------------------------------------------- model card
def _score(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _names(names, limit: int = 12) -> str:
    """A list of subject names for a card line: all of them up to ``limit``, else the first
    few, a count and where the rest is (label maps counted apart)."""
    names = list(names)
    if not names:
        return "none"
    if len(names) <= limit:
        return ", ".join(names)
    maps = [n for n in names if str(n).startswith("maps/")]
    scans = [n for n in names if not str(n).startswith("maps/")]
    parts = []
    if scans:
        shown = ", ".join(scans[:limit // 2]) + (f" and {len(scans) - limit // 2} more"
                                                  if len(scans) > limit // 2 else "")
        parts.append(f"{len(scans)} scans ({shown})")
    if maps:
        parts.append(f"{len(maps)} label maps ({', '.join(maps[:3])}, ...)")
    return " + ".join(parts) + "; every name in `metadata.json`"


def render_card(meta: dict) -> str:
    """A preset's model card (README.md) rendered from its metadata alone.

    Generic: every number and name comes from ``meta`` (as :func:`dazoo.training.export`
    writes it); prose specific to a preset lives in its metadata (``description``,
    ``license_note``, ``notes``), not in code.
    """
    name = meta.get("name", "preset")
    training = meta.get("training", {})
    data = meta.get("data", {})
    grid = meta.get("input", {}).get("model_grid", {})
    lines = [f"# {name}", "", meta.get("description", ""), ""]
    if meta.get("version"):
        lines += [f"Version {meta['version']}"
                  + (f" (saved with dazoo {meta['dazoo_version']})" if meta.get("dazoo_version")
                     else "") + ".", ""]
    what = "weights and template" if grid.get("template") else "weights"
    lines += [f"**License of the {what}: {meta.get('license', 'unspecified')}.** "
              + (meta.get("license_note") or ""), ""]
    parent = training.get("parent")
    if parent:
        terms = meta.get("data_terms") or (
            "not stated: dazoo cannot know them. Check them before sharing these weights")
        lines += [f"**Fine-tuning data ({data.get('name', '?')}):** the weights derive from "
                  f"them as well as from `{parent['name']}`, so their terms apply too: "
                  f"{terms}.", ""]
    # A shipped preset loads by name; any other (fine-tuned, exported) by its folder.
    shipped = (preset_root() / str(name) / "metadata.json").is_file()
    where = repr(name) if shipped else repr(f"path/to/{name}")
    lines += ["## Use", "", "```python", "import dazoo",
              f"model = dazoo.load({where})" + ("          # or the preset folder's path"
                                               if shipped else "   # the preset folder")]
    if "segmentation" in meta.get("task", []):
        lines.append("model.segment('scan.nii.gz').save('scan_seg.nii.gz')")
    if "registration" in meta.get("task", []):
        lines.append("model.register('moving.nii.gz', 'fixed.nii.gz').save(moved='moved.nii.gz', "
                     "warp='warp.nii.gz')")
    ref = name if shipped else f"path/to/{name}"
    lines += ["```", "", f"From the shell: `dazoo segment scan.nii.gz -o seg.nii.gz --preset "
              f"{ref}`; fine-tune it further with `dazoo finetune --from {ref} ...`.", ""]
    if grid:
        template = "an affine pre-alignment to the shipped template, " if grid.get(
            "template") else ""
        lines += ["## Input", "",
                  f"Any orientation and voxel size: {template}one resampling onto the model grid "
                  f"({grid.get('orientation')}, {' x '.join(str(v) for v in grid.get('voxel_size', []))}"
                  f" mm, {' x '.join(str(v) for v in grid.get('shape', []))} voxels), intensity "
                  f"normalisation {json.dumps(grid.get('intensity'))}. Outputs are resampled back "
                  "onto the input's own grid and affine.", ""]
    lines += [f"Labels: {meta.get('labels', {}).get('regions', '?')} regions "
              "(`labels.json`).", ""]
    validation = meta.get("validation") or {}
    scores = validation.get("scores")
    lines += ["## Measured", ""]
    if scores:
        lines += [f"Validation at step {validation['at_step']} on {len(data.get('validation', []))}"
                  f" held-out subjects ({', '.join(data.get('validation', []))}), mean Dice over "
                  "the label table's regions (`dazoo.training.callbacks.Validator`):", "",
                  "| score | value |", "|---|---|"]
        for key, text in (("native_seg_dice", "segmentation, native resolution"),
                          ("native_reg_dice", "registration (ordered pairs), native resolution"),
                          ("seg_dice", "segmentation, model grid"),
                          ("warped_dice", "registration, model grid")):
            if key in scores:
                lines.append(f"| {text} | {_score(scores[key])} |")
        lines.append("")
        history = validation.get("history", [])
        if len(history) > 1:
            keys = [k for k in ("native_seg_dice", "native_reg_dice", "seg_dice", "warped_dice")
                    if k in history[0]]
            lines += ["Validation history:", "", "| step | " + " | ".join(keys) + " |",
                      "|---|" + "---|" * len(keys)]
            lines += [f"| {h['step']} | " + " | ".join(_score(h.get(k)) for k in keys) + " |"
                      for h in history]
            lines.append("")
    else:
        lines += ["No validation subjects during training" + (
            ": the sections below were measured afterwards." if meta.get("evaluations")
            else ": nothing was measured on held-out data."), ""]
    for section in meta.get("evaluations", []):  # added later, e.g. by dazoo evaluate
        lines += [f"### {section.get('title', 'Evaluation')}", "", section.get("text", ""), ""]
    lines += ["## Training", ""]
    parent = training.get("parent")
    if parent:
        lines.append(f"- Fine-tuned from `{parent['name']}` (version {parent.get('version')}, "
                     f"weights sha256 {str(parent.get('weights_sha256'))[:12]}...).")
    lines += [
        f"- Data: {data.get('name', '?')}; {_count(len(data.get('train', [])), 'training scan')}"
        f"; labelled: {_names(data.get('labelled', []))}"
        f"; unlabelled: {_names(data.get('unlabelled', []))}; validation: "
        f"{_names(data.get('validation', []))}.",
        f"- Mode {training.get('mode')}, seed {training.get('seed')}, precision "
        f"{training.get('precision')}; {training.get('steps_completed')} of "
        f"{training.get('steps_planned')} planned steps (checkpoint `{training.get('checkpoint')}`),"
        f" {training.get('seconds', 0) / 60:.0f} min of training.",
        "- The full recipe is `recipe.json` in this folder.",
    ]
    if training.get("command"):
        lines += ["", "```bash", training["command"]]
        if training.get("export_command"):
            lines.append(training["export_command"])
        lines += ["```"]
    lines.append("")
    if meta.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    framework = meta.get("framework")
    if framework:
        lines += [f"Saved with Keras {framework.get('keras')} ({framework.get('backend')} "
                  f"backend), Python {framework.get('python')}.", ""]
    if meta.get("citations"):
        lines += ["## Citation", ""] + [f"- {c}" for c in meta["citations"]] + [""]
    return "\n".join(lines)


def add_evaluation(preset: str | os.PathLike | Preset, title: str, text: str) -> Preset:
    """Adds (or replaces, by title) a measured section of a preset's model card: stored in
    ``metadata.json`` under ``"evaluations"`` and rendered into ``README.md`` (both written
    atomically; the weights and their sha256 are untouched)."""
    from dazoo.io import write_text_atomic

    # Read from disk: a Preset object's metadata may predate an earlier section.
    preset = get_preset(preset.path if isinstance(preset, Preset) else preset)
    meta = dict(preset.metadata)
    sections = [s for s in meta.get("evaluations", []) if s.get("title") != title]
    meta["evaluations"] = sections + [{"title": title, "text": text}]
    write_text_atomic(preset.file("metadata.json"), json.dumps(meta, indent=1) + "\n")
    write_text_atomic(preset.file("README.md"), render_card(meta))
    return get_preset(preset.path)
