"""benchmarks/one_shot/experiment.py: the runs it plans, their recipes, and the statistics,
table and curves it makes from run folders (hand-made validation records, no training)."""
import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = sorted(f"OASIS-TRT-20-{i}" for i in (3, 4, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18,
                                               19, 20))


@pytest.fixture(scope="module")
def experiment():
    path = ROOT / "benchmarks" / "one_shot" / "experiment.py"
    spec = importlib.util.spec_from_file_location("paper_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def data(tmp_path):
    spec = json.loads((ROOT / "examples" / "brain" / "recipe_v1.json").read_text())["data"]
    for name in NAMES:
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / spec["image"]).write_bytes(b"")
        (tmp_path / "data" / name / spec["labels"]).write_bytes(b"")
    return tmp_path / "data"


def _args(experiment, tmp_path, data, *extra):
    return experiment.parse_args(["--work", str(tmp_path / "work"), "--data", str(data),
                                  "--out", str(tmp_path / "out"), "--pretrain", "60",
                                  "--pretrain-segmentation", "40", "--steps", "40",
                                  "--ratio", "4", "--validate-every", "20", *extra])


def test_folds_rotate_validation_and_labelled_subjects(experiment, data, tmp_path):
    args = _args(experiment, tmp_path, data, "--folds", "0", "1", "4")
    runs = experiment.plan(args)
    validation = {r["fold"]: r["validation"] for r in runs}
    assert validation == {0: NAMES[0:3], 1: NAMES[3:6], 4: NAMES[12:15]}
    for run in runs:
        assert not set(run["labelled"]) & set(run["validation"])  # never a validation label
    one = {r["fold"]: r["labelled"] for r in runs if r["setting"] == "one-shot"}
    assert len({tuple(v) for v in one.values()}) == 3 and all(len(v) == 1 for v in one.values())
    few = [r["labelled"] for r in runs if r["setting"] == "few-shot"]
    assert all(len(v) == 5 for v in few)
    with pytest.raises(SystemExit, match="folds 0..4"):
        experiment.plan(_args(experiment, tmp_path, data, "--folds", "5"))


def test_every_arm_gets_the_same_updates_per_network(experiment, data, tmp_path):
    args = _args(experiment, tmp_path, data, "--folds", "0", "--settings", "one-shot")
    runs = {r["arm"]: r for r in experiment.plan(args)}
    assert list(runs) == ["pretrain_registration", "pretrain_segmentation",
                          "registration_only", "segmentation_only", "joint"]
    assert runs["joint"]["updates"] == {"registration": 40, "segmentation": 10}
    assert runs["registration_only"]["updates"] == {"registration": 40}
    assert runs["segmentation_only"]["updates"] == {"segmentation": 10}
    recipes = {arm: experiment.recipe_for(run, args) for arm, run in runs.items()}
    joint = recipes["joint"]
    assert joint["model"]["mode"] == "joint" and joint["training"]["steps"] == 50
    assert (joint["model"]["registration_steps"], joint["model"]["segmentation_steps"]) == (4, 1)
    assert joint["training"]["validate_every"] == 25  # 5 cycles of 4 + 1 = 20 reg updates
    assert recipes["segmentation_only"]["training"]["validate_every"] == 5
    for arm in ("registration_only", "segmentation_only", "joint"):
        assert recipes[arm]["init"] == {
            "registration_from": str(runs["pretrain_registration"]["folder"]),
            "segmentation_from": str(runs["pretrain_segmentation"]["folder"])}
        assert recipes[arm]["preprocess"]["template"].endswith(
            "fold0/pretrain_registration/template.nii.gz")
    for recipe in recipes.values():
        assert recipe["optimizers"]["registration"]["decay"] == "cosine"
        assert recipe["training"]["steps"] % recipe["training"]["validate_every"] == 0
        assert recipe["data"]["validation"] == NAMES[0:3]
    with pytest.raises(SystemExit, match="multiple of --ratio"):
        experiment.plan(_args(experiment, tmp_path, data, "--validate-every", "30",
                              "--pretrain", "60", "--steps", "60",
                              "--pretrain-segmentation", "60"))


def test_paired_tests_and_fdr_by_hand(experiment):
    from scipy import stats

    a = {"p1": 0.60, "p2": 0.55, "p3": 0.70, "p4": 0.52, "extra": 1.0}
    b = {"p1": 0.58, "p2": 0.56, "p3": 0.65, "p4": 0.50}
    test = experiment.paired_test(a, b)
    diff = [0.02, -0.01, 0.05, 0.02]
    assert test["n"] == 4 and test["improved"] == 3
    assert test["mean_difference"] == pytest.approx(np.mean(diff))
    assert test["wilcoxon_p"] == pytest.approx(stats.wilcoxon(diff).pvalue)
    assert test["t_p"] == pytest.approx(stats.ttest_rel([.6, .55, .7, .52],
                                                        [.58, .56, .65, .5]).pvalue)
    q = experiment.fdr([0.01, 0.04, float("nan"), 0.03])
    # BH: sorted p 0.01, 0.03, 0.04 (m = 3) -> 0.03, 0.045, 0.04 -> monotone 0.03, 0.04, 0.04
    assert q[0] == pytest.approx(0.03) and q[3] == pytest.approx(0.04)
    assert q[1] == pytest.approx(0.04) and math.isnan(q[2])


def _write_validation(folder, steps, every, reg=None, seg=None):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(every, steps + 1, every):
        record = {"step": step}
        if reg is not None:
            record.update(native_reg_dice=np.mean(list(reg.values())) * step / steps,
                          native_reg_per_pair=reg, folding_fraction=0.0001)
        if seg is not None:
            record.update(native_seg_dice=np.mean(list(seg.values())) * step / steps,
                          native_seg_per_subject=seg)
        lines.append(json.dumps(record))
    (folder / "validation.jsonl").write_text("\n".join(lines) + "\n")


def test_results_table_and_curves_from_run_folders(experiment, data, tmp_path):
    args = _args(experiment, tmp_path, data, "--folds", "0", "1", "--settings", "one-shot")
    runs = experiment.plan(args)
    pairs = {f"{m} -> {f}": 0.0 for m in "abc" for f in "abc" if m != f}
    rng = np.random.default_rng(0)
    for run in runs:
        every = experiment.recipe_for(run, args)["training"]["validate_every"]
        reg = ({k: 0.5 + 0.01 * rng.random() + (0.02 if run["arm"] == "joint" else 0)
                for k in pairs} if run["mode"] != "segmentation_only" else None)
        seg = ({s: 0.6 + 0.01 * rng.random() for s in "xyz"}
               if run["mode"] != "registration_only" else None)
        if run["key"] == "fold1/one-shot/joint":
            _write_validation(run["folder"], run["steps"], every, reg, seg)
            lines = (run["folder"] / "validation.jsonl").read_text().splitlines()[:-1]
            (run["folder"] / "validation.jsonl").write_text("\n".join(lines) + "\n")
            continue  # not finished: no last validation
        _write_validation(run["folder"], run["steps"], every, reg, seg)
    results = experiment.collect(runs, args)
    assert results["missing"] == ["fold1/one-shot/joint"]
    joint = results["settings"]["one-shot"]["joint"]
    assert len(joint["registration"]) == 6 and all(k.startswith("fold0:") for k in joint[
        "registration"])
    (reg_test, seg_test) = results["comparisons"]
    assert reg_test["task"] == "registration" and reg_test["n"] == 6
    assert reg_test["improved"] == 6 and 0.01 < reg_test["mean_difference"] < 0.03
    assert seg_test["n"] == 3
    table = experiment.markdown(results, args)
    assert "| one-shot | joint |" in table and "Not finished: fold1/one-shot/joint" in table
    assert f"| one-shot | registration | 6 | {100 * reg_test['mean_difference']:+.2f} |" in table
    curve = results["curves"]["fold0/one-shot/joint"]
    assert [c["updates"] for c in curve] == [{"registration": 20, "segmentation": 5},
                                             {"registration": 40, "segmentation": 10}]
    experiment.plot_curves(results, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
