"""The brain example scripts' own logic: the one-shot runs' recipes and table, evaluate's
validation subjects. Light: subject folders with empty files, no image read, no training."""
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "brain"
BRAIN = ROOT / "pretrained" / "brain"
BRAIN_RECIPE = json.loads((BRAIN / "recipe.json").read_text())
DATA = ROOT.parent / "shared" / "data" / "mindboggle-oasis-trt20"  # the scans, if present
VALIDATION = BRAIN_RECIPE["data"]["validation"]
TRAINING = sorted(["OASIS-TRT-20-3", "OASIS-TRT-20-7", "OASIS-TRT-20-10", "OASIS-TRT-20-11",
                   "OASIS-TRT-20-9"])


def _load(name):
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"brain_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def one_shot():
    return _load("one_shot")


@pytest.fixture
def fake_data(tmp_path):
    """A Mindboggle-like folder: one subfolder per subject with empty image / label files."""
    data = tmp_path / "data"
    spec = BRAIN_RECIPE["data"]
    for name in TRAINING + VALIDATION:
        (data / name).mkdir(parents=True)
        (data / name / spec["image"]).write_bytes(b"")
        (data / name / spec["labels"]).write_bytes(b"")
    (data / "LICENSE-README.txt").write_text("not a subject")
    (data / "no-image").mkdir()  # a folder without the image pattern is no subject
    return data


def test_one_shot_recipes(one_shot, fake_data, tmp_path):
    from dazoo.training.recipe import Recipe

    work = tmp_path / "work"
    args = one_shot.parse_args(["--work", str(work), "--data", str(fake_data),
                                "--pretrain", "30", "--pretrain-segmentation", "70",
                                "--steps", "250"])
    recipes = one_shot.run_recipes(args)
    assert list(recipes) == ["pretrain_registration", "pretrain_segmentation",
                             "registration_only", "segmentation_only", "joint"]
    root = work.resolve() / "one_shot"
    expected = {"pretrain_registration": ("registration_only", 30),
                "pretrain_segmentation": ("segmentation_only", 70),
                "registration_only": ("registration_only", 250),
                "segmentation_only": ("segmentation_only", 250),
                "joint": ("joint", 500)}
    # sorted() order of the names, not numeric: "OASIS-TRT-20-10" comes first
    assert TRAINING[0] == "OASIS-TRT-20-10"
    init = {"registration_from": str(root / "pretrain_registration"),
            "segmentation_from": str(root / "pretrain_segmentation")}
    for name, (recipe, folder) in recipes.items():
        assert isinstance(recipe, Recipe)
        assert folder == root / name
        c = recipe.config
        mode, steps = expected[name]
        assert c["model"]["mode"] == mode
        t = c["training"]
        assert t["steps"] == steps and t["validate_every"] == steps  # validated once, at the end
        assert t["checkpoint_every"] <= 100 and steps % t["checkpoint_every"] == 0
        assert c["data"]["train"] == str(fake_data.resolve())
        assert c["data"]["labelled"] == [TRAINING[0]]
        assert c["data"]["validation"] == VALIDATION
        assert c["data"]["cache"] == str(root / "cache")  # one cache for all runs
        assert c["init"] == (None if name.startswith("pretrain_") else init)
        if name == "pretrain_registration":
            assert recipe.builds_template
        else:  # the first run's template, copied
            assert c["preprocess"]["template"] == str(root / "pretrain_registration"
                                                      / "template.nii.gz")
        # everything else is version 1's from-scratch recipe's
        v1 = json.loads((EXAMPLES / "recipe_v1.json").read_text())
        for key in ("losses", "optimizers", "augmentation", "precision", "seed", "labels"):
            assert c[key] == Recipe.from_dict(v1, root=EXAMPLES)[key]
        Recipe.from_dict(json.loads(recipe.to_json()))  # what the run folder keeps is valid
    assert recipes["joint"][0]["training"]["checkpoint_every"] == 100
    assert recipes["pretrain_segmentation"][0]["training"]["checkpoint_every"] == 70


def test_one_shot_keeps_its_cli(one_shot):
    args = one_shot.parse_args(["--pretrain", "300"])
    assert (args.pretrain, args.pretrain_segmentation, args.steps) == (300, 300, 500)
    with pytest.raises(SystemExit):
        one_shot.parse_args(["--validate-every", "300"])


def test_one_shot_scores_are_the_last_validation(one_shot, tmp_path):
    records = [{"step": 100, "native_reg_dice": 0.1},
               {"step": 200, "native_reg_dice": 0.4, "native_reg_merged_dice": 0.41,
                "native_reg_per_pair": {"a -> b": 0.4}, "folding_fraction": 0.0,
                "native_dice": 0.4, "seconds": 3.0}]
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert one_shot.scores(tmp_path, 200) == {
        "registration_dice": 0.4, "registration_merged_dice": 0.41, "folding_fraction": 0.0,
        "registration_per_pair": {"a -> b": 0.4}}
    with pytest.raises(SystemExit):
        one_shot.scores(tmp_path, 300)  # the run did not reach its last validation


def _result(reg, seg):
    return {"registration_dice": float(np.mean(list(reg.values()))),
            "registration_merged_dice": 0.5, "folding_fraction": 0.0,
            "registration_per_pair": reg,
            "segmentation_dice": float(np.mean(list(seg.values()))),
            "segmentation_merged_dice": 0.5, "segmentation_per_subject": seg}


def test_one_shot_table_reports_paired_changes(one_shot):
    results = {
        "registration_only": _result({"a -> b": 0.40, "b -> a": 0.50, "a -> c": 0.45},
                                     {"a": 0.2, "b": 0.3}),
        "segmentation_only": _result({"a -> b": 0.1, "b -> a": 0.1, "a -> c": 0.1},
                                     {"a": 0.30, "b": 0.40}),
        "joint": _result({"a -> b": 0.43, "b -> a": 0.49, "a -> c": 0.48},
                         {"a": 0.35, "b": 0.39}),
    }
    table = one_shot.markdown(results)
    # registration: (+0.03 - 0.01 + 0.03) / 3 = +0.0167 -> +1.7 points, 2 of 3 pairs better
    assert "registration: +1.7 Dice points, 2 of 3 improved" in table
    # segmentation: (+0.05 - 0.01) / 2 = +0.02 -> +2.0 points, 1 of 2 subjects better
    assert "segmentation: +2.0 Dice points, 1 of 2 improved" in table
    assert "| DeepAtlas joint | 0.467 |" in table
    assert "starting point" not in table  # rows appear only for runs that were evaluated


def test_evaluate_validates_on_the_recipes_subjects(fake_data):
    evaluate = _load("evaluate")
    subjects = evaluate.validation_subjects(fake_data, BRAIN)
    assert sorted(s.name for s in subjects) == sorted(VALIDATION)
    spec = BRAIN_RECIPE["data"]
    for s in subjects:
        assert s.image == str(fake_data / s.name / spec["image"])
        assert s.labels == str(fake_data / s.name / spec["labels"])
    ids = evaluate.label_ids(BRAIN)
    assert ids == BRAIN_RECIPE["labels"]["ids"] and len(ids) == 92  # v3: the whole brain


def test_evaluate_uses_an_exported_presets_own_recipe(fake_data, tmp_path):
    import shutil

    evaluate = _load("evaluate")
    preset = tmp_path / "preset"  # what validation_subjects reads of a preset
    preset.mkdir()
    for name in ("metadata.json", "labels.json", "recipe.json"):
        shutil.copyfile(BRAIN / name, preset / name)
    recipe = json.loads((preset / "recipe.json").read_text())
    recipe["data"]["validation"] = VALIDATION[:2]
    (preset / "recipe.json").write_text(json.dumps(recipe))
    names = [s.name for s in evaluate.validation_subjects(fake_data, preset)]
    assert sorted(names) == sorted(VALIDATION[:2])
    (preset / "recipe.json").unlink()  # no recipe of its own: the brain recipe's subjects
    names = [s.name for s in evaluate.validation_subjects(fake_data, preset)]
    assert sorted(names) == sorted(VALIDATION)


@pytest.mark.skipif(not DATA.is_dir(), reason="needs the Mindboggle data")
def test_one_shot_labels_the_first_real_training_subject(one_shot, tmp_path):
    args = one_shot.parse_args(["--work", str(tmp_path), "--data", str(DATA)])
    recipes = one_shot.run_recipes(args)
    assert recipes["joint"][0]["data"]["labelled"] == ["OASIS-TRT-20-10"]  # as in the card


def test_evaluate_card_text_lists_what_was_measured():
    evaluate = _load("evaluate")
    summary = {"count": 3, "mean_dice": 0.7123, "mean_merged_dice": 0.7201, "seconds": 4.0}
    report = {"validation": ["a", "b", "c"],
              "segmentation": {"summary": summary, "flip": True},
              "registration": {"summary": dict(summary, count=6, folding_fraction=0.0)},
              "speed": {"cli_segment_seconds": 9.04, "cli_register_seconds": 17.26}}
    text = evaluate.card_text(report, "python examples/brain/evaluate.py --preset P")
    assert "`python examples/brain/evaluate.py --preset P`" in text and "a, b, c" in text
    assert "| segmentation (per subject), flip test-time augmentation (3) | 0.712 | 0.720 |" \
        in text
    assert "| registration (ordered pairs) (6) | 0.712 | 0.720 | 4.0 | 0.0000 % |" in text
    assert "`dazoo segment` 9.0 s, `dazoo register` 17.3 s" in text
    report["speed"] = {"cli_segment_seconds": [9.04, 8.8], "cli_register_seconds": [17.26]}
    assert "`dazoo segment` 9.0, 8.8 s" in evaluate.card_text(report, "c")
    assert "cohort" not in text and "ANTs" not in text  # only what the report holds
    assert "per structure group" not in text and "manual labels" in text

    # A whole-brain table: its size in the header, what is automatic, a row per group.
    groups = {"cortex": 0.71, "white matter": 0.9, "non-cortical": 0.8412}
    report["label_count"], report["whole_brain"] = 92, True
    report["segmentation"]["summary"] = dict(summary, group_dice=groups)
    report["cohort"] = {"summary": dict(summary, group_dice=dict(groups, cortex=0.6))}
    text = evaluate.card_text(report, "c")
    assert "| mean Dice, 92 structures |" in text and "FreeSurfer's automatic aseg" in text
    assert "| task | cortex | white matter | non-cortical |" in text
    assert "| segmentation (per subject), flip test-time augmentation (3) | 0.710 | 0.900 | " \
        "0.841 |" in text
    assert "no fine-tuning) (3) | 0.600 | 0.900 | 0.841 |" in text
