"""The brain example scripts' own logic: label mapping, pair sampling, one-shot table."""
import importlib.util
import pathlib
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples" / "brain"


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
def train():
    return _load("train")


@pytest.fixture(scope="module")
def one_shot():
    return _load("one_shot")


def test_dkt31_classes(train):
    assert len(train.DKT31_IDS) == 62 and train.NUM_CLASSES == 63
    ids = np.array([0, 1002, 1035, 2002, 2035, 1032, 2033, 1004, 24, 5000])
    classes = train.id_to_class(ids)
    assert classes.tolist() == [0, 1, 31, 32, 62, 0, 0, 0, 0, 0]
    # every DKT31 id maps to a distinct class 1..62, in sorted order
    assert train.id_to_class(np.array(train.DKT31_IDS)).tolist() == list(range(1, 63))


def test_segmentation_pairs_always_hold_the_labelled_image(train):
    labelled = [True] + [False] * 11
    sides = set()
    for step in range(200):
        rng = np.random.default_rng([0, step])
        moving, fixed = train.sample_pair(rng, labelled, registration_turn=False)
        assert moving != fixed and 0 in (moving, fixed)
        sides.add(0 if moving == 0 else 1)
    assert sides == {0, 1}  # the labelled image appears as moving and as fixed
    rng = np.random.default_rng(0)
    pairs = {train.sample_pair(rng, labelled, registration_turn=True) for _ in range(200)}
    assert any(0 not in pair for pair in pairs)  # registration pairs ignore the labels


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


def test_card_only_update_adds_one_shot_and_keeps_weights(tmp_path):
    import json
    import shutil

    from dazoo.presets import get_preset, sha256

    package = _load("package")
    shipped = pathlib.Path(__file__).resolve().parents[1] / "pretrained" / "brain"
    folder = tmp_path / "brain"
    shutil.copytree(shipped, folder)
    weights_before = sha256(folder / "model.weights.h5")
    meta_before = json.loads((folder / "metadata.json").read_text())
    meta_before.pop("one_shot", None)
    results = {
        "labelled_subject": "subject-A", "unlabelled": 11,
        "pretrain_registration_steps": 7, "pretrain_segmentation_steps": 9,
        "steps_per_network": 5, "command": "python examples/brain/one_shot.py --steps 5",
        "registration_only": _result({"a -> b": 0.40, "b -> a": 0.50}, {"a": 0.2}),
        "segmentation_only": _result({"a -> b": 0.1, "b -> a": 0.1}, {"a": 0.30}),
        "joint": _result({"a -> b": 0.43, "b -> a": 0.49}, {"a": 0.35}),
    }
    (tmp_path / "results.json").write_text(json.dumps(results))

    package.main(["--card-only", "--out", str(folder),
                  "--one-shot", str(tmp_path / "results.json")])

    assert sha256(folder / "model.weights.h5") == weights_before
    get_preset(folder).verify()
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta.pop("one_shot") == results
    assert meta == meta_before  # nothing else in the metadata changed
    card = (folder / "README.md").read_text()
    assert "## The paper's one-shot experiment" in card
    assert "1 training subject (subject-A) keeps its labels" in card
    assert "registration: +1.0 Dice points, 1 of 2 improved" in card
    assert "--one-shot work_cache/brain/one_shot/results.json" in card
