"""dazoo.training engine: recipes, dazoo train / --resume (after a real kill) / export /
finetune, DeepAtlas.from_preset, and the new preset used by dazoo segment."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import dazoo
import keras
import numpy as np
import pytest

from dazoo import io
from dazoo.errors import DazooInputError
from dazoo.synthetic import make_subjects
from dazoo.training.recipe import Recipe

SHAPE = (32, 32, 32)
IDS = (10, 20, 30)
SMALL = [[8, 16, 16], [16, 16, 16, 8]]


def _cohort(folder: pathlib.Path, count=5, unlabelled=(3,), extra_id=None) -> pathlib.Path:
    """``count`` synthetic subjects as NIfTI (2 mm, RAS), labels with ids 10/20/30 (and
    ``extra_id`` in subject 0), a manifest ``train.csv`` of all but the last and
    ``val.csv`` of the last."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -31.0
    rows = []
    for i, (image, labels) in enumerate(make_subjects(count, SHAPE, num_classes=4, seed=0)):
        ids = np.where(labels > 0, np.array((0,) + IDS)[labels], 0).astype(np.int16)
        if extra_id is not None and i == 0:
            ids[ids == IDS[-1]] = extra_id
        io.write_image((image * 100.0, affine), folder / f"s{i}.nii.gz")
        io.write_labels((ids, affine), folder / f"s{i}_seg.nii.gz")
        rows.append(f"s{i}.nii.gz," + ("" if i in unlabelled else f"s{i}_seg.nii.gz"))
    (folder / "train.csv").write_text("image,labels\n" + "\n".join(rows[:-1]) + "\n")
    (folder / "val.csv").write_text(f"image,labels\ns{count - 1}.nii.gz,s{count - 1}_seg.nii.gz\n")
    return folder


def _recipe(folder: pathlib.Path, **training) -> pathlib.Path:
    recipe = {
        "name": "tiny", "seed": 0,
        "data": {"train": "train.csv", "validation": "val.csv"},
        "labels": {"ids": list(IDS), "names": {"10": "ten", "20": "twenty", "30": "thirty"}},
        "preprocess": {"voxel_size": [2, 2, 2], "shape": list(SHAPE), "levels": 3,
                       "template": None, "alignment": "none"},
        "model": {"registration": {"int_steps": 0, "features": SMALL},
                  "segmentation": {"features": SMALL}},
        "training": {"steps": 8, "checkpoint_every": 2, "validate_every": 4, **training},
        "augmentation": {"rotation": 5, "gamma": 0.1, "phases": ["segmentation"]},
        "card": {"license": "CC0-1.0", "notes": ["synthetic test data"],
                 # The paper as a recipe may cite it (no DOI): the card cites it once.
                 "citations": ["Xu Z., Niethammer M. DeepAtlas: Joint Semi-supervised Learning "
                               "of Image Registration and Segmentation. MICCAI 2019.",
                               "Someone A. A data set. 2020."]},
    }
    path = folder / "recipe.json"
    path.write_text(json.dumps(recipe))
    return path


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dazoo", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


def _dazoo_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's own log lines (before it is imported they cannot be
    silenced here)."""
    return [line for line in stderr.splitlines() if line.startswith("dazoo")]


def _state(path):
    import dazoo.models  # noqa: F401

    model = keras.saving.load_model(path)
    optimizers = model.reg_optimizer.variables + model.seg_optimizer.variables
    return model.get_weights(), [np.asarray(v) for v in optimizers]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cohort, its recipe and one uninterrupted 8-step run."""
    from dazoo.training import train

    folder = _cohort(tmp_path_factory.mktemp("cohort"))
    recipe = _recipe(folder)
    run = train(recipe, folder / "run", verbose=0, log=lambda m: None,
                command="dazoo train recipe.json -o run")
    return folder, recipe, run


def test_progress_lines_when_there_is_no_progress_bar(trained):
    """Output that is not a terminal (a log file, nohup) gets progress lines in the run's log:
    the step, the losses, the pace and the time left, at the first and the last step at
    least (issue: ~140 s of silence in a trial)."""
    folder, _, run = trained
    lines = (run.folder / "train.log").read_text().splitlines()
    first = next(line for line in lines if "step 1/8:" in line)
    assert "reg_loss" in first and "seg_loss" in first and "s/step" in first
    assert "left" in first
    assert any("step 8/8:" in line and "0:00:00 left" in line for line in lines)


# ----------------------------------------------------------------------------- recipes
def test_recipe_defaults_paths_and_strict_keys(tmp_path):
    recipe = Recipe.from_dict({"data": {"train": "d.csv"}, "labels": {"ids": [1]}},
                              root=tmp_path)
    assert recipe["data"]["train"] == str(tmp_path / "d.csv")
    assert recipe["training"]["checkpoint_every"] == 100 and recipe["seed"] == 0
    for bad, words in [
        ({"data": {"train": "d.csv"}, "labels": {"ids": [1]}, "optimiser": {}},
         "unknown key(s) ['optimiser']"),
        ({"data": {"train": "d.csv", "valid": []}, "labels": {"ids": [1]}},
         "unknown key(s) ['valid'] in data"),
        ({"data": {"train": "d.csv"}, "labels": {"ids": [1]},
          "training": {"steps": 150, "checkpoint_every": 100}}, "multiple of"),
        ({"data": {"train": "d.csv"}, "labels": {"ids": [1]}, "precision": "mixed_float16"},
         "precision must be one of"),
        ({"data": {"train": "d.csv"}}, "labels needs"),
        ({"data": {"train": "d.csv"}, "labels": {"ids": [1]}, "inference": {"flip": "yes"}},
         "inference.flip must be true or false"),
        ({"data": {"train": "d.csv"}, "labels": {"ids": [1]},
          "inference": {"refine": {"iterations": -1}}}, "iterations must be an integer >= 0"),
        ({"data": {"train": "d.csv"}, "labels": {"ids": [1]},
          "inference": {"refine": {"iterations": 5, "lr": 0.2}}}, "inference.refine must be"),
        ({"data": {"train": "d.csv"}, "labels": {"ids": [1]},
          "training": {"recompute": -1}}, "training.recompute must be an integer >= 0"),
        ({"data": {"train": "d.csv"}, "labels": {"ids": [1]},
          "inference": {"largest_component": [1, "2"]}}, "inference.largest_component must"),
        ({"data": {"train": "d.csv"}, "labels": {"ids": [1]},
          "losses": {"synth_similarity_weight": -0.5}}, "losses.synth_similarity_weight must"),
    ]:
        with pytest.raises(DazooInputError, match=None) as info:
            Recipe.from_dict(bad, root=tmp_path, source="r.json")
        assert str(info.value).startswith("r.json") and words in str(info.value), info.value


def test_recipe_precision_per_network(tmp_path):
    from dazoo.training.engine import build_model

    base = {"data": {"train": "d.csv"}, "labels": {"ids": [1]},
            "preprocess": {"shape": [16, 16, 16]},
            "model": {"registration": {"int_steps": 0}}}
    expected = {"float32": ("float32", "float32"),
                "mixed_bfloat16": ("float32", "mixed_bfloat16"),  # its meaning since 0.1
                json.dumps({"registration": "mixed_bfloat16", "segmentation": "float32"}):
                    ("mixed_bfloat16", "float32")}
    for precision, (reg, seg) in expected.items():
        value = json.loads(precision) if precision.startswith("{") else precision
        recipe = Recipe.from_dict(dict(base, precision=value), root=tmp_path)
        model = build_model(recipe, num_classes=2)
        assert model.registration_net.get_layer("unet_enc_conv_0_0").dtype_policy.name == reg
        assert model.segmentation_net.get_layer("unet_enc_conv_0_0").dtype_policy.name == seg
        # The integration and warps run in float32 whatever the convolutions do.
        assert model.registration_net.get_layer("transformer").compute_dtype == "float32"
    with pytest.raises(DazooInputError, match="exactly the keys"):
        Recipe.from_dict(dict(base, precision={"registration": "mixed_bfloat16"}),
                         root=tmp_path, source="r.json")


def test_bfloat16_falls_back_to_float32_where_the_machine_emulates_it(tmp_path, monkeypatch):
    from dazoo.training import engine, train
    from dazoo.training.precision import cpu_flags, machine_precision

    intel = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n"
    assert cpu_flags(intel) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16", "amx_tile"}
    assert cpu_flags("Features\t: fp asimd bf16\n") == {"fp", "asimd", "bf16"}
    both = {"registration": "mixed_bfloat16", "segmentation": "float32"}
    assert machine_precision("mixed_bfloat16", native=False) == "float32"
    assert machine_precision(both, native=False) == {"registration": "float32",
                                                     "segmentation": "float32"}
    assert machine_precision("mixed_bfloat16", native=True) == "mixed_bfloat16"
    assert machine_precision(both, native=True) == both

    folder = _cohort(tmp_path)
    path = _recipe(folder, steps=1, checkpoint_every=1, validate_every=1)
    config = json.loads(path.read_text())
    path.write_text(json.dumps(dict(config, precision="mixed_bfloat16")))
    monkeypatch.setattr(engine, "native_bfloat16", lambda: True)
    recipe, warning = engine._precision_here(Recipe.load(path))
    assert recipe["precision"] == "mixed_bfloat16" and warning is None
    monkeypatch.setattr(engine, "native_bfloat16", lambda: False)
    messages = []
    train(path, folder / "run", verbose=0, log=messages.append)
    assert [m for m in messages if m.startswith("warning:")] == [
        f"warning: {path}: precision \"mixed_bfloat16\" -> \"float32\": this machine has no "
        "native bfloat16 (no AVX512-BF16/AMX, no GPU), where it is slower and less exact than "
        "float32"]
    assert json.loads((folder / "run" / "recipe.json").read_text())["precision"] == "float32"
    import dazoo.models  # noqa: F401

    model = keras.saving.load_model(folder / "run" / "checkpoint.keras")
    assert model.segmentation_net.get_layer("unet_enc_conv_0_0").compute_dtype == "float32"


def test_recipe_recompute_reaches_the_compiled_model(tmp_path):
    from dazoo.training.engine import build_model, compile_model

    recipe = Recipe.from_dict({"data": {"train": "d.csv"}, "labels": {"ids": [1]},
                               "preprocess": {"shape": [16, 16, 16]},
                               "training": {"recompute": 1}}, root=tmp_path)
    model = build_model(recipe, num_classes=2)
    compile_model(model, recipe)
    assert model.recompute == 1 and model.get_compile_config()["recompute"] == 1
    assert model.objective.synth_similarity_weight == 1.0  # the default: every pair alike
    recipe = recipe.with_overrides(["losses.synth_similarity_weight=0"])
    compile_model(model, recipe)
    assert model.objective.synth_similarity_weight == 0.0


def test_recipe_overrides(tmp_path):
    recipe = Recipe.from_dict({"data": {"train": "d.csv"}, "labels": {"ids": [1]}},
                              root=tmp_path)
    changed = recipe.with_overrides(["training.steps=300", "model.mode=registration_only",
                                     "augmentation.phases=[\"segmentation\"]"])
    assert changed["training"]["steps"] == 300 and changed["model"]["mode"] == "registration_only"
    assert changed["augmentation"]["phases"] == ["segmentation"]
    assert recipe["training"]["steps"] == 6000  # the original is unchanged
    for bad in ("training.stpes=3", "training.steps", "nothing.steps=3"):
        with pytest.raises(DazooInputError, match="expected KEY=VALUE"):
            recipe.with_overrides([bad])
    with pytest.raises(DazooInputError, match="multiple of"):
        recipe.with_overrides(["training.steps=150"])


def test_shipped_brain_recipe_is_valid():
    from dazoo.presets import get_preset

    recipe = Recipe.load(get_preset("brain").file("recipe.json"))
    assert recipe["data"]["validation"] == ["OASIS-TRT-20-12", "OASIS-TRT-20-13",
                                            "OASIS-TRT-20-4"]
    labels = json.loads(get_preset("brain").file("labels.json").read_text())["classes"]
    assert recipe["labels"]["ids"] == [c["id"] for c in labels[1:]]
    assert recipe.builds_template and recipe["precision"] == "mixed_bfloat16"


# ----------------------------------------------------------------------------- train
def test_run_folder_record_and_logs(trained):
    folder, _, run = trained
    out = run.folder
    assert run.steps == 8
    record = json.loads((out / "run.json").read_text())
    assert record["train"] == ["s0", "s1", "s2", "s3"] and record["validation"] == ["s4"]
    assert record["labelled"] == ["s0", "s1", "s2"] and record["unlabelled"] == ["s3"]
    assert record["steps_completed"] == 8 and record["command"].startswith("dazoo train")
    steps = [v["step"] for v in run.validation]
    assert steps == [4, 8]
    assert all(0 <= v["native_seg_dice"] <= 1 for v in run.validation)
    assert (out / "best.keras").is_file() and (out / "checkpoint.keras").is_file()
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 1 + 4  # one row per interval
    assert any(p.name.startswith("events.out") for p in (out / "tensorboard").rglob("*"))
    labels = json.loads((out / "labels.json").read_text())["classes"]
    assert [c["id"] for c in labels] == [0, *IDS] and labels[1]["name"] == "ten"


def test_a_killed_run_resumes_exactly(trained, tmp_path):
    folder, recipe, run = trained
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, keras
        from dazoo.training import train

        class Kill(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch == 1:  # step 4, after its validation and checkpoint
                    os.kill(os.getpid(), signal.SIGKILL)

        train({str(recipe)!r}, {str(killed)!r}, callbacks=[Kill()], verbose=0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == -9, result.stderr[-2000:]
    assert [v["step"] for v in map(json.loads, (killed / "validation.jsonl").open())] == [4]
    result = _cli("train", "--resume", killed)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed" in result.stderr and "at step 4" in result.stderr
    weights, optimizers = _state(killed / "checkpoint.keras")
    expected_weights, expected_optimizers = _state(run.folder / "checkpoint.keras")
    for got, expected in zip(weights + optimizers, expected_weights + expected_optimizers):
        np.testing.assert_array_equal(got, expected)
    history = [json.loads(line) for line in (killed / "validation.jsonl").open()]
    assert [h["step"] for h in history] == [4, 8]
    assert history[-1]["native_seg_dice"] == run.validation[-1]["native_seg_dice"]


def test_resume_in_another_precision_keeps_the_state_and_records_the_switch(trained,
                                                                            tmp_path):
    """``--precision`` on resume (bfloat16 is emulated, several times slower, on CPUs without
    AVX512-BF16/AMX): the networks come back with the new dtype policy and the checkpoint's
    exact weights and optimizer state, the run's recipe.json and run.json say so, and the run
    trains on."""
    from dazoo.training import train
    from dazoo.training.engine import load_checkpoint

    _, _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run.folder, copy)
    weights, optimizers = _state(copy / "checkpoint.keras")
    switched = load_checkpoint(copy / "checkpoint.keras", "mixed_bfloat16")
    assert switched.segmentation_net.dtype_policy.name == "mixed_bfloat16"
    assert switched.registration_net.dtype_policy.name == "float32"  # the recipe's meaning
    assert switched.segmentation_net.compute_dtype == "bfloat16"
    for got, expected in zip(switched.get_weights() + [np.asarray(v) for v in
                                                      switched.reg_optimizer.variables
                                                      + switched.seg_optimizer.variables],
                             weights + optimizers):
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)

    # Two more steps in the new precision.
    recipe = json.loads((copy / "recipe.json").read_text())
    recipe["training"]["steps"] = 10
    (copy / "recipe.json").write_text(json.dumps(recipe))
    messages = []
    resumed = train(None, copy, resume=True, precision="mixed_bfloat16", verbose=0,
                    log=messages.append)
    assert resumed.steps == 10
    assert resumed.model.segmentation_net.dtype_policy.name == "mixed_bfloat16"
    assert json.loads((copy / "recipe.json").read_text())["precision"] == "mixed_bfloat16"
    record = json.loads((copy / "run.json").read_text())
    assert [(c["at_step"], c["from"], c["to"]) for c in record["precision_changes"]] == [
        (8, "float32", "mixed_bfloat16")]
    assert any('precision "float32" -> "mixed_bfloat16" from step 8' in m for m in messages)
    later = _state(copy / "checkpoint.keras")[0]
    assert any(not np.array_equal(a, b) for a, b in zip(later, weights))  # it trained on
    # Asking for the precision it has already changes and records nothing.
    train(None, copy, resume=True, precision="mixed_bfloat16", verbose=0, log=lambda m: None)
    assert len(json.loads((copy / "run.json").read_text())["precision_changes"]) == 1

    # Bookkeeping may change on resume (recorded); the math and the data may not.
    train(None, copy, resume=True, overrides=["training.checkpoint_every=1",
                                              "training.validate_every=5"],
          verbose=0, log=lambda m: None)
    record = json.loads((copy / "run.json").read_text())
    assert [(c["at_step"], c["key"], c["from"], c["to"]) for c in record["changes"]] == [
        (10, "training.checkpoint_every", 2, 1), (10, "training.validate_every", 4, 5)]
    assert json.loads((copy / "recipe.json").read_text())["training"]["checkpoint_every"] == 1
    result = _cli("train", "--resume", copy, "--set", "training.steps=20")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "training.steps" in result.stderr and "can change only" in result.stderr
    result = _cli("train", "--resume", copy, "--data", copy)
    assert result.returncode == 2 and "keeps its data" in result.stderr
    result = _cli("train", "--resume", copy, "--precision", "float16")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--precision" in result.stderr and "float16" in result.stderr
    result = _cli("train", tmp_path / "r.json", "-o", tmp_path / "r", "--precision", "float32")
    assert result.returncode == 2 and "is for --resume" in result.stderr



_TORCH_RESUME = """
import json, pathlib, sys
from dazoo.training import train
run = pathlib.Path(sys.argv[1])
recipe = json.loads((run / "recipe.json").read_text())
recipe["training"]["steps"] = 10
(run / "recipe.json").write_text(json.dumps(recipe))
train(None, run, resume=True, verbose=0, log=lambda m: None)
print("torch trained to", json.loads((run / "run.json").read_text())["steps_completed"])
"""


@pytest.mark.torch
def test_a_run_resumes_on_another_backend(trained, tmp_path):
    """A checkpoint written under torch trains on under TensorFlow (and one written under
    TensorFlow under torch): Keras saves the backend's own optimizer class (under torch one
    whose update calls torch on the variables; it failed with "expected Tensor ... got
    ResourceVariable"); it is read as ``keras.optimizers``' with the same state."""
    pytest.importorskip("torch")
    from dazoo.training import train
    from dazoo.training.engine import load_checkpoint

    _, _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run.folder, copy)
    result = subprocess.run([sys.executable, "-c", _TORCH_RESUME, str(copy)],
                            env={**os.environ, "KERAS_BACKEND": "torch"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch trained to 10" in result.stdout
    saved = json.loads(zipfile.ZipFile(copy / "checkpoint.keras").read("config.json"))
    assert "torch" in saved["compile_config"]["reg_optimizer"]["module"]  # what Keras writes

    model = load_checkpoint(copy / "checkpoint.keras")
    assert "torch" not in type(model.reg_optimizer).__module__
    weights, optimizers = _state(copy / "checkpoint.keras")  # the file as Keras reads it
    state = [np.asarray(v) for v in model.reg_optimizer.variables
             + model.seg_optimizer.variables]
    assert len(state) == len(optimizers) > 2
    for got, expected in zip(model.get_weights() + state, weights + optimizers):
        np.testing.assert_array_equal(got, expected)

    recipe = json.loads((copy / "recipe.json").read_text())
    recipe["training"]["steps"] = 12
    (copy / "recipe.json").write_text(json.dumps(recipe))
    before = model.get_weights()
    resumed = train(None, copy, resume=True, verbose=0, log=lambda m: None)
    assert resumed.steps == 12
    backends = [s.get("backend") for s in json.loads((copy / "run.json").read_text())["sessions"]]
    assert backends[-2:] == ["torch", "tensorflow"]
    later = load_checkpoint(copy / "checkpoint.keras").get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(later, before))  # it trained on

def test_a_run_resumed_with_another_checkpoint_interval_trains_the_same(trained, tmp_path):
    """Killed at step 4, resumed with checkpoints every step: the same weights as the
    uninterrupted run (the batches' draws keep the first interval as their period)."""
    folder, recipe, run = trained
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, keras
        from dazoo.training import train

        class Kill(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch == 1:
                    os.kill(os.getpid(), signal.SIGKILL)

        train({str(recipe)!r}, {str(killed)!r}, callbacks=[Kill()], verbose=0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == -9, result.stderr[-2000:]
    result = _cli("train", "--resume", killed, "--set", "training.checkpoint_every=1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training.checkpoint_every 2 -> 1 from step 4" in result.stderr
    assert len((killed / "log.csv").read_text().splitlines()) == 1 + 2 + 4  # 2 + 4 intervals
    weights, optimizers = _state(killed / "checkpoint.keras")
    expected_weights, expected_optimizers = _state(run.folder / "checkpoint.keras")
    for got, expected in zip(weights + optimizers, expected_weights + expected_optimizers):
        np.testing.assert_array_equal(got, expected)


def test_cli_refuses_bad_runs_in_one_line(trained, tmp_path):
    folder, recipe, run = trained
    result = _cli("train", recipe, "-o", run.folder)
    assert result.returncode == 2 and "holds a run already" in result.stderr
    assert "Traceback" not in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": {"train": "x.csv"}, "labels": {"ids": [1]},
                               "model": {"mode": "both"}}))
    result = _cli("train", bad, "-o", tmp_path / "r")
    assert result.returncode == 2 and result.stderr.count("\n") == 1  # before any TF import
    assert str(bad) in result.stderr and "model.mode" in result.stderr
    (tmp_path / "one.csv").write_text(f"image,labels\n{folder / 's0.nii.gz'},"
                                      f"{folder / 's0_seg.nii.gz'}\n")
    result = _cli("finetune", "--from", "brain", "--data", tmp_path / "one.csv", "-o",
                  tmp_path / "p")
    assert result.returncode == 2 and "at least 2 images" in result.stderr
    assert len(_dazoo_lines(result.stderr)) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "p.run").exists() and not (tmp_path / "p").exists()  # nothing left
    result = _cli("finetune", "--from", "brain", "--data", tmp_path / "one.csv", "-o",
                  tmp_path / "one.csv" / "p")
    assert result.returncode == 2 and "is a file, not a folder" in result.stderr


# ----------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def exported(trained):
    from dazoo.training import export

    folder, _, run = trained
    return export(run.folder, folder / "tinypreset", log=lambda m: None)


def test_export_writes_a_verified_preset_from_the_run_record(trained, exported):
    from dazoo.models import DeepAtlas

    folder, _, run = trained
    exported.verify()
    meta = exported.metadata
    best = max(run.validation, key=lambda v: v["native_dice"])
    assert meta["validation"]["at_step"] == best["step"]
    assert meta["validation"]["scores"]["native_seg_dice"] == best["native_seg_dice"]
    assert meta["data"]["labelled"] == ["s0", "s1", "s2"] and meta["license"] == "CC0-1.0"
    assert meta["training"]["command"] == "dazoo train recipe.json -o run"
    card = exported.file("README.md").read_text()
    assert f"{best['native_seg_dice']:.3f}" in card and "synthetic test data" in card
    n = len(meta["data"]["train"])
    assert f"; {n} training scans; labelled: s0, s1, s2; unlabelled: " in card
    # Not a shipped preset: the card loads it by its folder (its name alone would fail).
    assert "dazoo.load('path/to/tinypreset')" in card and "dazoo.load('tinypreset')" not in card
    assert meta["version"] == "1" and meta["dazoo_version"] == dazoo.__version__
    assert "Fine-tuning data" not in card  # trained, not fine-tuned
    assert card.count("DeepAtlas: Joint") == 1 and "10.1007/978-3-030-32245-8_47" in card
    assert "Someone A. A data set. 2020." in card
    assert exported.file("recipe.json").is_file()
    model = DeepAtlas.from_preset(exported.path)
    weights, _ = _state(run.folder / "best.keras")
    for got, expected in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(got, expected)
    assert [c["id"] for c in model.label_table] == [0, *IDS]
    assert model.preprocessor.config.shape == SHAPE
    assert "flip" not in meta  # inference.flip false (the default): no flip by default


def test_export_carries_the_recipe_inference_defaults(trained, exported, tmp_path):
    """inference.flip / .refine in the run's recipe become the preset's defaults (metadata
    "flip", "refine")."""
    from dazoo.hub import load
    from dazoo.training import export

    folder, _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run.folder, copy)
    recipe = json.loads((copy / "recipe.json").read_text())
    recipe["inference"] = {"flip": True, "refine": {"iterations": 4, "learning_rate": 0.2},
                           "largest_component": [IDS[0]]}
    (copy / "recipe.json").write_text(json.dumps(recipe))
    preset = export(copy, tmp_path / "flipping", log=lambda m: None)
    assert preset.metadata["flip"] is True
    assert load(preset.path).default_flip is True
    assert load(preset.path).default_refine == {"iterations": 4, "learning_rate": 0.2}
    assert load(preset.path).largest_component == [IDS[0]]
    assert load(exported.path).largest_component == []


def test_segment_with_the_exported_preset(trained, exported, tmp_path):
    folder, _, _ = trained
    out = tmp_path / "seg.nii.gz"
    result = _cli("segment", folder / "s4.nii.gz", "-o", out, "--preset", exported.path)
    assert result.returncode == 0, result.stderr[-2000:]
    seg, image = io.read_labels(out), io.read_image(folder / "s4.nii.gz")
    assert seg.shape == image.shape and np.allclose(seg.affine, image.affine)
    assert set(np.unique(seg.array)) <= {0, *IDS}


# ----------------------------------------------------------------------------- finetune
def test_finetune_keeps_the_parent_table_or_learns_the_cohorts(trained, exported, tmp_path):
    from dazoo.models import DeepAtlas
    from dazoo.training import finetune

    cohort = _cohort(tmp_path / "cohort", count=4, unlabelled=(), extra_id=40)
    parent = DeepAtlas.from_preset(exported.path)
    quiet = dict(steps=2, verbose=0, log=lambda m: None)
    same = finetune(exported.path, cohort / "train.csv", tmp_path / "same",
                    data_terms="CC0-1.0 (synthetic)", **quiet)
    assert "their terms apply too: CC0-1.0 (synthetic)" in same.file("README.md").read_text()
    assert [c["id"] for c in same.read_json("labels.json")["classes"]] == [0, *IDS]  # 40 -> bg
    assert same.metadata["training"]["parent"]["name"] == "tinypreset"
    grown = finetune(exported.path, cohort / "train.csv", tmp_path / "grown",
                     labels_from_data=True, freeze=["registration"], **quiet)
    ids = [c["id"] for c in grown.read_json("labels.json")["classes"]]
    assert ids == [0, 10, 20, 30, 40]
    model = DeepAtlas.from_preset(grown.path)
    assert model.num_classes == 5 and model.mode == "segmentation_only"
    # Only the segmenter trained: the registration network is the parent's.
    for got, expected in zip(model.registration_net.get_weights(),
                             parent.registration_net.get_weights()):
        np.testing.assert_array_equal(got, expected)
    result = _cli("segment", cohort / "s0.nii.gz", "-o", tmp_path / "s.nii.gz", "--preset",
                  grown.path)
    assert result.returncode == 0, result.stderr[-2000:]


def test_finetune_carries_the_parents_brain_extraction_and_input_checks(trained, exported,
                                                                         tmp_path):
    """A child of a preset for skull-stripped brains keeps its brain extraction default
    (metadata "skull_strip"), its inference defaults as its metadata has them (a refinement
    count set after export), and, its template and grid being the parent's, the parent's
    input checks (checks.json); a preset trained anew has neither."""
    import dazoo
    from dazoo.training import finetune

    parent = tmp_path / "parent"
    shutil.copytree(exported.path, parent)
    meta = json.loads((parent / "metadata.json").read_text())
    meta["skull_strip"] = {"default": "auto", "extractor": "brainmask", "outside_threshold": 0.1}
    meta["refine"] = {"iterations": 7, "learning_rate": 0.2}  # set after export, not in recipe
    (parent / "metadata.json").write_text(json.dumps(meta))
    checks = {"extent_mm": [118.0, 150.0, 117.0], "extent_ratio": [0.7, 1.37],
              "min_alignment": 0.689, "max_outside": 0.018, "outside_margin_mm": 6.0,
              "scale_range": [0.926, 1.161], "needs": "a test volume", "measured": "by hand"}
    (parent / "checks.json").write_text(json.dumps(checks))
    cohort = _cohort(tmp_path / "cohort", count=3, unlabelled=())
    child = finetune(parent, cohort / "train.csv", tmp_path / "child", steps=2, verbose=0,
                     log=lambda m: None)
    assert child.metadata["skull_strip"] == meta["skull_strip"]
    assert dazoo.load(child.path).skull_strip_default == "auto"
    assert dazoo.load(child.path).default_refine == {"iterations": 7, "learning_rate": 0.2}
    assert json.loads(child.file("checks.json").read_text()) == checks
    assert dazoo.load(child.path).checks is not None
    assert "skull_strip" not in exported.metadata and not exported.file("checks.json").exists()
    assert dazoo.load(exported.path).skull_strip_default == "off"


def test_finetune_cli_from_a_subject_folder(trained, exported, tmp_path):
    """FreeSurfer-like subject folders with --image/--labels patterns (subfolders named in
    them), a subject without a label file trained as unlabelled, a validation folder."""
    cohort = _cohort(tmp_path / "flat", count=5, unlabelled=(3,))
    for name, where in (("s0", "cohort"), ("s1", "cohort"), ("s2", "cohort"), ("s3", "cohort"),
                        ("s4", "held")):
        mri = tmp_path / where / name / "mri"
        mri.mkdir(parents=True)
        os.link(cohort / f"{name}.nii.gz", mri / "T1.nii.gz")
        if name != "s3":
            os.link(cohort / f"{name}_seg.nii.gz", mri / "aseg.nii.gz")
    result = _cli("finetune", "--from", exported.path, "--data", tmp_path / "cohort", "--image",
                  "mri/T1.nii.gz", "--labels", "mri/aseg.nii.gz", "--validation",
                  tmp_path / "held", "--steps", "2", "-o", tmp_path / "mine")
    assert result.returncode == 0, result.stderr[-2000:]
    card = (tmp_path / "mine" / "README.md").read_text()
    assert "Fine-tuning data (cohort)" in card and "not stated" in card  # --data-terms absent
    record = json.loads((tmp_path / "mine.run" / "run.json").read_text())
    assert sorted(record["labelled"]) == ["s0", "s1", "s2"] and record["unlabelled"] == ["s3"]
    assert record["validation"] == ["s4"]
    assert (tmp_path / "mine" / "model.weights.h5").is_file()
    result = _cli("finetune", "--from", exported.path, "--data", tmp_path / "cohort",
                  "--steps", "2", "-o", tmp_path / "nope")
    assert result.returncode == 2 and "no subjects found (expected <name>/image.*" in result.stderr
    assert not (tmp_path / "nope.run").exists()


def test_finetune_example_script(trained, exported, tmp_path):
    folder, _, _ = trained
    script = pathlib.Path(__file__).resolve().parent.parent / "examples" / \
        "finetune_on_your_cohort.py"
    help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True,
                               text=True, timeout=300)
    assert help_text.returncode == 0 and "--preset" in help_text.stdout
    result = subprocess.run([sys.executable, script, "--preset", exported.path, "--data",
                             folder / "train.csv", "--steps", "2", "-o", tmp_path / "mine"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    from dazoo.presets import get_preset

    get_preset(tmp_path / "mine").verify()
    assert os.path.isfile(tmp_path / "mine" / "README.md")


def test_training_with_label_maps_synthesised_and_simultaneous(tmp_path):
    """data.label_maps (maps without images, relabelled from another protocol) join training
    through synthesis; validation maps are refused; mode "simultaneous" trains both nets."""
    from dazoo.training import train

    folder = _cohort(tmp_path, count=4, unlabelled=(1,))
    labels = io.read_labels(folder / "s2_seg.nii.gz")
    other = np.select([labels.array == i for i in IDS], [1, 2, 3], 0).astype(np.int16)
    io.write_labels((other, labels.affine), folder / "maps" / "s2_other_protocol.nii.gz")
    (folder / "train.csv").write_text("image,labels\ns0.nii.gz,s0_seg.nii.gz\ns1.nii.gz,\n")
    recipe = json.loads(_recipe(folder, steps=4, validate_every=4).read_text())
    recipe["data"]["label_maps"] = [{"path": "maps", "relabel": {"1": 10, "2": 20, "3": 30}}]
    recipe["synth"] = {"probability": 0.5, "nonlinear": 1.0, "thickness": 2.0}
    recipe["model"]["mode"] = "simultaneous"
    recipe["augmentation"]["phases"] = ["registration", "segmentation"]
    path = tmp_path / "synth.json"
    path.write_text(json.dumps(recipe))
    run = train(path, tmp_path / "run", verbose=0, log=lambda m: None)
    record = json.loads((run.folder / "run.json").read_text())
    assert record["label_maps"] == [str(folder / "maps" / "s2_other_protocol.nii.gz")]
    assert "maps/s2_other_protocol" in record["labelled"]
    model = keras.saving.load_model(run.folder / "checkpoint.keras")
    assert int(model.reg_optimizer.iterations) == 4 == int(model.seg_optimizer.iterations)
    cached = [p for p in (run.folder / "cache").glob("maps_s2_other_protocol-*.npz")]
    assert len(cached) == 1
    with np.load(cached[0]) as entry:
        assert set(np.unique(entry["labels"])) <= {0, *IDS} and "array" not in entry.files

    recipe["data"]["label_maps"] = [str(folder / "s3_seg.nii.gz")]  # the validation map
    path.write_text(json.dumps(recipe))
    with pytest.raises(DazooInputError, match="validation label maps"):
        train(path, tmp_path / "leak", verbose=0, log=lambda m: None)
    # Another file of a validation subject (named after it) is refused as well.
    (folder / "other_maps").mkdir()
    shutil.copy(folder / "s3_seg.nii.gz", folder / "other_maps" / "s3.aseg.nii.gz")
    recipe["data"]["label_maps"] = [str(folder / "other_maps")]
    path.write_text(json.dumps(recipe))
    with pytest.raises(DazooInputError, match="validation label maps"):
        train(path, tmp_path / "leak2", verbose=0, log=lambda m: None)
    del recipe["synth"]
    path.write_text(json.dumps(recipe))
    with pytest.raises(DazooInputError, match="needs a \"synth\" section"):
        Recipe.load(path)


@pytest.mark.parametrize("change", ["flip", "mirror"])
def test_reflections_refused_with_left_right_label_tables(tmp_path, change):
    """Mirroring keeps label ids: with left/right structures it would teach swapped labels."""
    from dazoo.training.engine import train

    folder = _cohort(tmp_path, count=3, unlabelled=())
    recipe = json.loads(_recipe(folder).read_text())
    recipe["labels"] = {"ids": [10, 1002, 2002]}
    if change == "flip":
        recipe["augmentation"]["flip"] = 0.5
    else:
        recipe["preprocess"].update(mirror="auto", alignment="affine", template="s0.nii.gz")
    (folder / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(DazooInputError, match="left/right labels"):
        train(Recipe.load(folder / "recipe.json"), tmp_path / "run")


def test_a_recipe_grows_the_parents_segmenter_without_changing_its_output(trained, exported,
                                                                          tmp_path):
    from dazoo.models import DeepAtlas
    from dazoo.training.engine import build_model

    folder, _, _ = trained
    wide = [[8, 24, 16], [32, 16, 16, 8]]  # SMALL, wider at the two coarse levels
    config = json.loads(_recipe(folder).read_text())
    config["init"] = {"preset": str(exported.path), "segmentation_features": wide}
    recipe = Recipe.from_dict(config, root=folder)
    parent = DeepAtlas.from_preset(exported.path)
    model = build_model(recipe, parent.num_classes, exported, log=lambda m: None)
    assert [list(f) for f in model.segmentation_net.features] == wide
    assert model.segmentation_net.count_params() > parent.segmentation_net.count_params()
    image = np.random.default_rng(0).normal(size=(1, *SHAPE, 1)).astype("float32")
    np.testing.assert_allclose(np.asarray(model.segmentation_net(image)),
                               np.asarray(parent.segmentation_net(image)), atol=1e-5)
    config["init"]["segmentation_features"] = [[4, 16, 16], SMALL[1]]  # narrower: refused
    with pytest.raises(DazooInputError, match="fewer"):
        build_model(Recipe.from_dict(config, root=folder), parent.num_classes, exported,
                    log=lambda m: None)
    config["init"] = {"segmentation_features": wide}
    with pytest.raises(DazooInputError, match="init.preset"):
        Recipe.from_dict(config, root=folder)


def test_a_recipe_takes_the_parents_networks_onto_its_own_grid(trained, exported, tmp_path):
    """init.preprocessing "recipe": the preset's weights on the recipe's grid (brain v3:
    v2's networks from 2 mm to 1.5 mm) and a new head for a larger label table; the run's
    preprocessing is the recipe's, not the preset's."""
    from dazoo.models import DeepAtlas
    from dazoo.training import train
    from dazoo.training.engine import build_model

    folder, _, _ = trained
    config = json.loads(_recipe(folder, steps=2, validate_every=2).read_text())
    config["preprocess"].update(voxel_size=[2.5, 2.5, 2.5], shape=[24, 24, 24])
    config["labels"] = {"ids": [10, 20, 30, 40]}
    config["init"] = {"preset": str(exported.path), "preprocessing": "recipe"}
    recipe = Recipe.from_dict(config, root=folder)
    assert not recipe.parent_preprocessing
    parent = DeepAtlas.from_preset(exported.path)
    model = build_model(recipe, 5, exported, log=lambda m: None)
    assert tuple(model.registration_net.inshape) == tuple(model.segmentation_net.inshape) == (
        24, 24, 24)
    for new, old in zip(model.registration_net.get_weights(),
                        parent.registration_net.get_weights()):
        np.testing.assert_array_equal(new, old)
    for layer in model.segmentation_net.layers:
        if layer.weights and layer.name != "logits":
            for new, old in zip(layer.get_weights(),
                                parent.segmentation_net.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(new, old)
    assert model.segmentation_net.get_layer("logits").get_weights()[0].shape[-1] == 5
    path = folder / "regrid.json"
    path.write_text(json.dumps(config))
    run = train(path, tmp_path / "run", verbose=0, log=lambda m: None)
    written = json.loads((run.folder / "preprocess.json").read_text())
    assert written["shape"] == [24, 24, 24] and written["voxel_size"] == [2.5, 2.5, 2.5]
    config["init"]["preprocessing"] = "template"
    with pytest.raises(DazooInputError, match="init.preprocessing"):
        Recipe.from_dict(config, root=folder)
    config["init"] = {"preprocessing": "recipe"}
    with pytest.raises(DazooInputError, match="init.preset"):
        Recipe.from_dict(config, root=folder)


def test_knee_v2_recipe_parses_and_keeps_validation_subjects_out_of_its_maps():
    """examples/knee/recipe_v2.json: a valid recipe (DESS priors, 6 OAI-ZIB ids, the grid
    measured in examples/knee/README), and no training map belongs to a subject that
    make_validation.py holds out (both time points of an OAI_AKOA subject on one side)."""
    root = pathlib.Path(__file__).resolve().parent.parent / "examples" / "knee"
    sys.path.insert(0, str(root))
    try:
        import make_validation
    finally:
        sys.path.remove(str(root))
    recipe = Recipe.load(root / "recipe_v2.json")
    synth, probability = recipe.synth()
    assert probability == 1.0 and synth.prior_probability == 0.5
    assert synth.priors[2][0] > synth.priors[1][1]  # cartilage brighter than bone marrow
    assert recipe["labels"]["ids"] == [1, 2, 3, 4, 5, 6]
    assert recipe["preprocess"]["shape"] == [80, 160, 160]
    maps = [os.path.basename(m["path"]) for m in recipe["data"]["label_maps"]]
    assert all(m["relabel"] == {"7": 1, "8": 3, "9": 5} for m in recipe["data"]["label_maps"])
    subjects = [make_validation.subject_of(m) for m in maps]
    assert len(maps) == 46 and len(set(subjects)) == 30
    # every OAI_AKOA subject (two time points each) lies wholly on the training side
    assert all(subjects.count(s) == 2 for s in subjects if s.startswith("OAI_AKOA"))
    data = root.parent.parent.parent / "shared" / "data" / "oai-knee-labels"
    if data.is_dir():  # the recipe's maps are exactly what make_validation.py leaves
        files = sorted(str(p) for p in data.glob("OAI_*.nii*"))
        train, held = make_validation.split(files, 3, 3, 0)
        assert sorted(os.path.basename(f) for f in train) == sorted(maps)
        assert not {make_validation.subject_of(f) for f in held} & set(subjects)


def test_knee_v4_recipe_is_v3_with_the_signal_falloff():
    """examples/knee/recipe_v4.json: version 3's recipe (same maps, grid, validation) whose
    synthesis also draws the coil's signal fall-off at the S-I ends, reaching LabelSynth."""
    root = pathlib.Path(__file__).resolve().parent.parent / "examples" / "knee"
    v3, v4 = (json.loads((root / f"recipe_v{v}.json").read_text()) for v in (3, 4))
    assert v4["synth"].pop("falloff") == 5 and v4["synth"].pop("falloff_axis") == 2
    for recipe in (v3, v4):   # its own cache folder and card version
        del recipe["data"]["cache"], recipe["card"]["version"]
    assert v4 == v3
    synth, _ = Recipe.load(root / "recipe_v4.json").synth()
    assert synth.falloff == 5.0 and synth.falloff_axis == 2


@pytest.mark.parametrize("superior", ["S", "I"])
def test_knee_validation_extension_continues_the_shafts_in_world_space(superior):
    """make_validation.extended_map: the superior end plane repeated TOP mm upward and the
    inferior one BOTTOM mm downward, whichever way the voxel axis runs, each original voxel
    keeping its world position."""
    root = pathlib.Path(__file__).resolve().parent.parent / "examples" / "knee"
    sys.path.insert(0, str(root))
    try:
        import make_validation
    finally:
        sys.path.remove(str(root))
    labels = np.zeros((4, 5, 10), np.int16)
    labels[1:3, 1:4, 6:] = 1   # femur: leaves the top of the map (S end in RAS)
    labels[1:3, 1:3, :4] = 3   # tibia: leaves the bottom
    labels[3, 4, 5] = 5
    affine = np.diag([0.7, 0.5, 0.5, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    if superior == "I":  # the third axis runs inferior: flip it
        labels = labels[:, :, ::-1].copy()
        affine[:3, 3] += affine[:3, 2] * 9
        affine[:3, 2] *= -1
    out, moved = make_validation.extended_map(labels, affine, 2.0, 1.0)  # 4 and 2 planes
    assert out.shape == (4, 5, 16)
    world = lambda a, ijk: (a @ np.append(ijk, 1.0))[:3]  # noqa: E731
    # the original voxels keep their world positions
    offset = 2 if superior == "S" else 4
    np.testing.assert_array_equal(out[:, :, offset:offset + 10], labels)
    np.testing.assert_allclose(world(moved, [1, 2, offset]), world(affine, [1, 2, 0]))
    z = np.array([world(moved, [0, 0, k])[2] for k in range(16)])
    top, bottom = out[:, :, np.argmax(z)], out[:, :, np.argmin(z)]
    assert z.max() == pytest.approx(30.0 + 4.5 + 2.0) and z.min() == pytest.approx(30.0 - 1.0)
    assert np.array_equal(top == 1, labels[:, :, 9 if superior == "S" else 0] == 1) and top.any()
    assert np.array_equal(bottom == 3, labels[:, :, 0 if superior == "S" else 9] == 3)
    # a partly labelled last plane (a sliver of femur) is not what continues: the full one is
    sliver = labels.copy()
    top_plane = 9 if superior == "S" else 0
    sliver[:, :, top_plane] = 0
    sliver[1, 1, top_plane] = 1
    out, moved = make_validation.extended_map(sliver, affine, 2.0, 1.0)
    z = np.array([world(moved, [0, 0, k])[2] for k in range(16)])
    np.testing.assert_array_equal(out[:, :, np.argmax(z)] == 1, labels[:, :, top_plane] == 1)


def test_a_given_template_is_the_runs_own_copy_and_exports(trained, tmp_path):
    """preprocess.template given as a path (the paper experiment shares one fold's template
    between runs): the run records its own copy, and the export carries it (the recorded path
    used to be the shared file's, which the export then copied onto itself)."""
    from dazoo.training import train
    from dazoo.training.exporter import export

    folder, _, run = trained
    shared = tmp_path / "shared_template.nii.gz"
    io.write_image(io.read_image(folder / "s0.nii.gz"), shared)
    config = json.loads(_recipe(folder, steps=2, validate_every=2).read_text())
    config["preprocess"].update(template=str(shared), alignment="affine")
    path = folder / "given_template.json"
    path.write_text(json.dumps(config))
    result = train(path, tmp_path / "run", verbose=0, log=lambda m: None)
    written = json.loads((result.folder / "preprocess.json").read_text())
    assert written["template"] == "template.nii.gz"
    assert (result.folder / "template.nii.gz").is_file()
    preset = export(result.folder, tmp_path / "preset", checkpoint="last", log=lambda m: None)
    assert preset.read_json("preprocess.json")["template"] == "template.nii.gz"
    assert (preset.path / "template.nii.gz").is_file() and shared.is_file()


def test_validation_records_structure_group_means_for_a_freesurfer_table(trained, tmp_path):
    """A table with FreeSurfer's names has structure groups (10 is the left thalamus; 20 and
    30 belong to none): validation records the mean Dice per group (segmentation here: one
    validation subject makes no registration pair); a table without groups (the tiny
    recipe's "ten", ...) records none."""
    from dazoo.training import train

    folder, recipe_path, run = trained
    assert all("native_seg_group_dice" not in h for h in run.validation)
    recipe = json.loads(recipe_path.read_text())
    recipe["labels"]["names"] = {"10": "Left-Thalamus", "20": "twenty", "30": "Left-vessel"}
    recipe["training"].update(steps=2, checkpoint_every=2, validate_every=2)
    path = folder / "recipe_named.json"
    path.write_text(json.dumps(recipe))
    named = train(path, tmp_path / "run", verbose=0, log=lambda m: None)
    record = named.validation[-1]
    assert list(record["native_seg_group_dice"]) == ["subcortical grey matter"]
    assert 0.0 <= record["native_seg_group_dice"]["subcortical grey matter"] <= 1.0
    assert "native_reg_dice" not in record and "native_reg_group_dice" not in record
