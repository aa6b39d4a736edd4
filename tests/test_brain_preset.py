"""The shipped `brain` preset: integrity always; accuracy on real scans when they are present."""
import json
import pathlib

import numpy as np
import pytest

from dazoo.presets import get_preset, list_presets

DATA = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data" / \
    "mindboggle-oasis-trt20"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}")


def test_brain_preset_is_complete_and_verified():
    from dazoo.labels import BRAIN_GROUPS, DKT31_CORTEX, WHOLE_BRAIN_ASEG

    preset = get_preset("brain")
    assert "brain" in [p.name for p in list_presets()]
    preset.verify()  # files present, weights sha256 as in the model card
    meta = preset.metadata
    assert meta["license"] == "CC-BY-NC-SA-3.0"
    for key in ("data", "training", "validation", "citations", "skull_strip", "refine"):
        assert key in meta
    # version 3: the whole brain, DKT31's 62 cortical regions + SynthSeg's 30 aseg structures
    classes = preset.read_json("labels.json")["classes"]
    ids = [c["id"] for c in classes]
    assert ids == [0, *sorted({*DKT31_CORTEX, *WHOLE_BRAIN_ASEG})] and len(ids) == 93
    assert {c["group"] for c in classes[1:]} == set(BRAIN_GROUPS)
    assert [c["id"] for c in classes if c.get("group") == "cortex"] == sorted(DKT31_CORTEX)
    preprocess = preset.read_json("preprocess.json")
    assert (preset.path / preprocess["template"]).is_file()
    assert preset.file("checks.json").is_file()
    # The numbers in the card are the ones in its validation record.
    card = preset.file("README.md").read_text()
    seg = meta["validation"]["scores"]["native_seg_dice"]
    assert f"{seg:.3f}" in card


def test_brain_model_runs_on_its_grid():
    import dazoo

    pipeline = dazoo.load("brain")
    shape = tuple(pipeline.preprocessor.config.shape)
    image = np.random.default_rng(0).random((1, *shape, 1)).astype(np.float32)
    probabilities = pipeline.model.segmentation_net.predict_on_batch(image)
    assert probabilities.shape == (1, *shape, len(pipeline.class_ids)) == (1, *shape, 93)
    np.testing.assert_allclose(np.asarray(probabilities).sum(-1), 1.0, atol=1e-4)


@pytest.mark.data
@pytest.mark.slow
@needs_data
def test_brain_preset_on_a_validation_scan(tmp_path):
    """Segmentation and registration of held-out Mindboggle scans, at native 1 mm, against
    their whole-brain label maps (Mindboggle-101's aparcNMMjt+aseg on the scans' grids, as
    examples/brain/whole_brain_data.py writes them), matching the card's validation record."""
    import sys

    import dazoo
    from dazoo.training import Subject
    from dazoo.evaluate import evaluate_registration, evaluate_segmentation

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples" / "brain"))
    from whole_brain_data import whole_brain_on

    meta = get_preset("brain").metadata
    names = meta["data"]["validation"][:2]
    subjects = []
    for n in names:
        image = DATA / n / "t1weighted_brain.nii.gz"
        labels = tmp_path / f"{n}.nii.gz"
        whole_brain_on(str(DATA.parent / "mindboggle101-labels" / f"{n}.aparcNMMjt+aseg.mgz"),
                       str(image), str(labels))
        subjects.append(Subject(str(image), str(labels), n))
    pipeline = dazoo.load("brain")
    # as the validator scored it: no flip; the network's own registration (no refinement)
    seg = evaluate_segmentation(pipeline, subjects[:1], flip=False, log=lambda _: None)[0]
    reg = evaluate_registration(pipeline, subjects, pairs=[(0, 1)],
                                refine_options={"iterations": 0}, log=lambda _: None)[0]
    refined = evaluate_registration(pipeline, subjects, pairs=[(0, 1)], log=lambda _: None)[0]
    assert pipeline.default_refine.get("iterations", 0) > 0
    assert refined["group_dice"]["cortex"] > reg["group_dice"]["cortex"] + 0.05
    assert refined["folding_fraction"] < 0.01 and reg["folding_fraction"] < 0.01
    scores = meta["validation"]["scores"]
    assert seg["mean_dice"] == pytest.approx(scores["native_seg_per_subject"][names[0]], abs=0.02)
    assert reg["mean_dice"] == pytest.approx(
        scores["native_reg_per_pair"][f"{names[0]} -> {names[1]}"], abs=0.02)
    assert seg["group_dice"]["cortex"] > 0.65 and seg["group_dice"]["white matter"] > 0.85
    assert json.dumps(seg["dice"])  # per-region scores are plain numbers


@needs_data
def test_brain_input_checks_pass_real_scans_and_flag_damaged_copies():
    """The shipped checks.json thresholds (benchmarks/sanity_thresholds.py) on a real scan, a
    not skull-stripped copy (synthetic scalp and skull), a 10 mm header and a knee."""
    import sys

    import dazoo
    from dazoo import io

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
    from sanity_thresholds import _damaged

    pipeline = dazoo.load("brain")
    assert pipeline.checks is not None
    volume = io.read_image(DATA / "OASIS-TRT-20-12" / "t1weighted_brain.nii.gz")
    rng = np.random.default_rng(0)
    assert pipeline.check(volume, pipeline.preprocess(volume)) == []
    scalp = _damaged(volume, "scalp", rng)
    assert pipeline.check(scalp, pipeline.preprocess(scalp))
    big = _damaged(volume, "voxel10", rng)
    assert any("physical size" in w for w in pipeline.check(big))
    knee = DATA.parent / "knee-dess" / "dess_echo1.nii.gz"
    if knee.exists():
        knee_volume = io.read_image(knee)
        assert any("alignment" in w for w in pipeline.check(knee_volume,
                                                            pipeline.preprocess(knee_volume)))
