"""Input sanity checks (dazoo.checks): physical size, failed alignment, not skull-stripped;
warnings by default, errors with strict / --strict (exit 2, nothing written)."""
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from dazoo.checks import InputChecks, check_input, foreground_extent, measure_input
from dazoo.cli import main
from dazoo.errors import DazooInputError
from dazoo.io import Volume

from test_pipeline import preset_dir, scans  # noqa: F401  (fixtures)


def _ball(shape, radius, spacing=1.0, centre=None):
    centre = (np.array(shape) - 1) / 2 if centre is None else np.asarray(centre)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return (np.sqrt((((grid - centre) * spacing) ** 2).sum(-1)) <= radius)


def test_foreground_extent_is_the_physical_size_along_world_axes():
    box = np.zeros((60, 50, 40), np.float32)
    box[10:50, 5:45, 8:28] = 100.0  # 40 x 40 x 20 voxels
    affine = np.diag([0.5, 2.0, 1.5, 1.0])
    extent = foreground_extent(Volume(box, affine, None))
    # the 1st..99th percentile span of uniformly spread positions: 0.98 of the size
    np.testing.assert_allclose(extent, 0.98 * np.array([20.0, 80.0, 30.0]), rtol=0.05)
    # stored with the axes permuted (A, S, R), the world extents are the same
    permuted = np.zeros((4, 4))
    permuted[[1, 2, 0], [0, 1, 2]] = [2.0, 1.5, 0.5]
    permuted[3, 3] = 1
    moved = foreground_extent(Volume(np.transpose(box, (1, 2, 0)), permuted, None))
    np.testing.assert_allclose(moved, extent, rtol=0.05)
    # a header claiming 10x the voxel size gives 10x the extent
    np.testing.assert_allclose(foreground_extent(Volume(box, affine * [10, 10, 10, 1], None)),
                               10 * extent, rtol=0.02)


def test_outside_fraction_counts_bright_voxels_beyond_the_template():
    shape = (40, 40, 40)
    template = Volume(_ball(shape, 10).astype(np.float32), np.eye(4), None)
    brain = Volume(template.array * 90.0, np.eye(4), None)
    clean = measure_input(brain, template, np.eye(4))
    assert clean["outside"] == 0.0 and clean["alignment"] > 0.99
    shell = _ball(shape, 17) & ~_ball(shape, 14)  # a bright "scalp" 4-7 mm beyond the brain
    head = Volume(brain.array + 90.0 * shell, np.eye(4), None)
    measured = measure_input(head, template, np.eye(4), outside_margin_mm=2.0)
    expected = shell.sum() / (shell.sum() + _ball(shape, 10).sum())
    assert measured["outside"] == pytest.approx(expected, rel=0.02)
    # a margin wider than the gap counts nothing
    assert measure_input(head, template, np.eye(4), outside_margin_mm=8.0)["outside"] == 0.0


def _outside_by_points(volume, template, alignment, margin_mm):
    """The measurement point by point (every template voxel's world position mapped through
    the alignment into the image): the reference for the vectorised one."""
    from scipy import ndimage as ndi

    t = template.array
    inside = t > t.min() + 0.02 * (np.percentile(t, 99.5) - t.min())
    spacing = np.sqrt((template.affine[:3, :3] ** 2).sum(axis=0))
    near = ndi.distance_transform_edt(~inside, sampling=spacing) <= margin_mm
    index = np.argwhere(np.ones(t.shape, bool))
    world = template.affine[:3, :3] @ index.T + template.affine[:3, 3:4]
    native = np.linalg.inv(volume.affine) @ (alignment @ np.vstack([world, np.ones((1, len(index)))]))
    valid = np.all((native[:3] >= 0) & (native[:3] <= np.array(volume.shape)[:, None] - 1), axis=0)
    values = ndi.map_coordinates(volume.array, native[:3, valid], order=1)
    low, high = np.percentile(values, [0.5, 99.5])
    bright = values > low + 0.2 * (high - low)
    return float(np.mean(~near.ravel()[valid][bright]))


def test_outside_fraction_matches_the_point_by_point_reference_and_its_cache():
    from dazoo.checks import _outside_fraction

    rng = np.random.default_rng(0)
    shape = (30, 34, 28)
    t_affine = np.diag([1.5, 1.5, 1.5, 1.0])
    t_affine[:3, 3] = [-20, -25, -18]
    template = Volume(_ball(shape, 9).astype(np.float32), t_affine, None)
    v_affine = np.array([[0, 0, 1.2, -30], [-0.9, 0, 0, 28], [0, 1.0, 0, -22], [0, 0, 0, 1]])
    head = 50 * _ball((52, 40, 48), 14) + 40 * _ball((52, 40, 48), 19) + rng.random((52, 40, 48))
    volume = Volume(head.astype(np.float32), v_affine, None)
    angle = np.deg2rad(8)
    alignment = np.eye(4)
    alignment[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    alignment[:3, :3] *= 1.07
    alignment[:3, 3] = [2.0, -3.0, 1.5]
    for margin in (3.0, 6.0, 3.0):  # the third: the cached dilation
        expected = _outside_by_points(volume, template, alignment, margin)
        assert 0.02 < expected < 0.98
        assert _outside_fraction(volume, template, alignment, margin) == pytest.approx(expected, abs=1e-9)
    # a template changed in place is not served from the cache
    template.array[:] = _ball(shape, 5)
    assert _outside_fraction(volume, template, alignment, 3.0) == pytest.approx(
        _outside_by_points(volume, template, alignment, 3.0), abs=1e-9)


def test_check_input_flags_each_failure_in_one_line():
    checks = InputChecks(extent_mm=(120, 150, 110), extent_ratio=(0.6, 1.6),
                         min_alignment=0.6, max_outside=0.1, needs="a skull-stripped T1 brain")
    good = {"extent_mm": [118, 160, 100], "alignment": 0.9, "outside": 0.01}
    assert check_input(good, checks) == []
    big = check_input({**good, "extent_mm": [1180, 1600, 1000]}, checks)
    assert len(big) == 1 and "implausible physical size" in big[0] and "1180" in big[0]
    assert "size" in check_input({**good, "extent_mm": [12, 16, 10]}, checks)[0]
    assert "alignment" in check_input({**good, "alignment": 0.3}, checks)[0]
    assert "skull-stripped" in check_input({**good, "outside": 0.4}, checks)[0]
    assert len(check_input({"extent_mm": [1, 1, 1], "alignment": 0.1, "outside": 0.9},
                           checks)) == 3
    assert all("\n" not in line for line in big)
    # checks without alignment thresholds ignore those measurements
    plain = InputChecks(extent_mm=(120, 150, 110))
    assert check_input({**good, "alignment": -1.0, "outside": 1.0}, plain) == []
    with pytest.raises(DazooInputError, match="extent_ratio"):
        InputChecks(extent_mm=(1, 1, 1), extent_ratio=(1.2, 2.0))
    with pytest.raises(DazooInputError, match="unknown key"):
        InputChecks.from_dict({"extent_mm": [1, 1, 1], "size": 3})


@pytest.fixture
def checked_preset(preset_dir, scans, tmp_path):  # noqa: F811
    """The tiny preset with a checks.json whose reference extent is the test scans'."""
    folder = tmp_path / "checked"
    shutil.copytree(preset_dir, folder)
    image = nib.load(scans[0][0])
    extent = foreground_extent(Volume(np.asarray(image.dataobj), image.affine, None))
    (folder / "checks.json").write_text(json.dumps(
        {"extent_mm": extent.tolist(), "extent_ratio": [0.6, 1.6], "needs": "a test phantom"}))
    return folder


def _ten_mm(path, out):
    image = nib.load(path)
    affine = image.affine.copy()
    affine[:3, :3] *= 10 / 1.5
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), out)
    return str(out)


def test_pipeline_warns_and_strict_refuses(checked_preset, preset_dir, scans,  # noqa: F811
                                           tmp_path):
    import dazoo

    pipeline = dazoo.load(str(checked_preset))
    assert pipeline.segment(scans[0][0]).warnings == []
    assert pipeline.segment(scans[1][0]).warnings == []
    big = _ten_mm(scans[0][0], tmp_path / "big.nii.gz")
    result = pipeline.segment(big)
    assert len(result.warnings) == 1 and "implausible physical size" in result.warnings[0]
    with pytest.raises(DazooInputError, match="implausible physical size.*strict"):
        pipeline.segment(big, strict=True)
    registration = pipeline.register(scans[0][0], big)
    assert [w.split(":")[0] for w in registration.warnings] == ["fixed"]
    with pytest.raises(DazooInputError, match="big.nii.gz"):
        pipeline.register(big, scans[0][0], strict=True)
    # presets without checks.json do not check
    unchecked = dazoo.load(str(preset_dir))
    assert unchecked.checks is None and unchecked.segment(big).warnings == []


def test_cli_warning_line_and_strict_exit(checked_preset, scans, tmp_path, capsys):  # noqa: F811
    big = _ten_mm(scans[0][0], tmp_path / "big.nii.gz")
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", big, "-o", str(out), "--preset", str(checked_preset)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {big}: implausible")
    assert out.exists()
    strict = tmp_path / "strict.nii.gz"
    assert main(["segment", big, "-o", str(strict), "--preset", str(checked_preset),
                 "--strict"]) == 2
    err = capsys.readouterr().err
    assert not strict.exists() and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("dazoo: error")] == [
        line for line in err.splitlines() if big in line]
    # clean input is untouched by --strict
    clean = tmp_path / "clean.nii.gz"
    assert main(["segment", scans[0][0], "-o", str(clean), "--preset", str(checked_preset),
                 "--strict"]) == 0
    assert "warning:" not in capsys.readouterr().err and clean.exists()
    moved = tmp_path / "moved.nii.gz"
    assert main(["register", scans[0][0], big, "--moved", str(moved), "--preset",
                 str(checked_preset), "--strict"]) == 2
    assert not moved.exists()


# ----------------------------------------------------------------- after the segmenter
def test_measure_output_volumes_and_confidence_by_hand():
    from dazoo.checks import measure_output

    scores = np.zeros((2, 2, 1, 3), np.float32)
    scores[..., 0] = 1.0  # background everywhere ...
    scores[0, 0, 0] = [0.2, 0.7, 0.1]  # ... but two labelled voxels
    scores[1, 1, 0] = [0.1, 0.4, 0.5]
    measured = measure_output({1: 1500.0, 2: 250.0}, scores)
    assert measured["volumes_ml"] == {"1": 1.5, "2": 0.25}
    assert measured["confidence"] == pytest.approx((0.7 + 0.5) / 2)
    assert measure_output({}, np.eye(3)[np.zeros((2, 2, 2), int)])["confidence"] == 0.0
    # The winners computed once (top_class) give the same measures.
    from dazoo.checks import region_confidence, top_class

    best, top = top_class(scores)
    np.testing.assert_array_equal(best, scores.argmax(-1))
    np.testing.assert_array_equal(top, scores.max(-1))
    assert measure_output({1: 1500.0}, scores, top=(best, top)) == measure_output(
        {1: 1500.0}, scores)
    assert region_confidence(scores, np.array([0, 17, 53]), top=(best, top)) == {
        "17": pytest.approx(0.7), "53": pytest.approx(0.5)}


def test_check_output_flags_volumes_and_confidence():
    from dazoo.checks import check_output

    checks = InputChecks.from_dict({"extent_mm": [100, 100, 100], "needs": "a knee",
                                    "volumes_ml": {"1": [50, 300], "2": [1, 20]},
                                    "min_confidence": 0.9})
    assert checks.after_network and checks.volumes_ml == {"1": (50.0, 300.0), "2": (1.0, 20.0)}
    names = {1: "femur", 2: "cartilage"}
    assert check_output({"volumes_ml": {"1": 120, "2": 10}, "confidence": 0.95}, checks,
                        names) == []
    problems = check_output({"volumes_ml": {"1": 20.0}, "confidence": 0.8}, checks, names)
    assert len(problems) == 2
    assert problems[0].startswith("implausible segmentation: femur 20.00 mL (expected 50..300)"
                                  ", cartilage 0.00 mL (expected 1..20)")
    assert "unsure (mean confidence 0.80 < 0.90); is this a knee?" in problems[1]
    assert not InputChecks(extent_mm=(1, 1, 1)).after_network
    with pytest.raises(DazooInputError, match="volumes_ml"):
        InputChecks.from_dict({"extent_mm": [1, 1, 1], "volumes_ml": {"1": 5}})


def test_segmentation_checks_warn_and_strict_refuses(checked_preset, scans, tmp_path,  # noqa: F811
                                                     capsys):
    import dazoo

    config = json.loads((checked_preset / "checks.json").read_text())
    plain = dazoo.load(str(checked_preset)).segment(scans[0][0])
    confidence = plain.measures["confidence"]
    assert 0 < confidence <= 1 and set(plain.measures["volumes_ml"]) == {"10", "20", "30"}
    config["min_confidence"] = min(1.0, confidence + 0.01)  # just above what it measures
    unsure = tmp_path / "unsure"  # another folder: dazoo.load keeps loaded presets
    shutil.copytree(checked_preset, unsure)
    (unsure / "checks.json").write_text(json.dumps(config))
    result = dazoo.load(str(unsure)).segment(scans[0][0])
    assert len(result.warnings) == 1 and "the segmenter is unsure" in result.warnings[0]
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", scans[0][0], "-o", str(out), "--preset", str(unsure),
                 "--strict"]) == 2
    err = capsys.readouterr().err
    assert "unsure" in err and "(strict)" in err and not out.exists()


@pytest.mark.skipif(not (__import__("pathlib").Path(__file__).resolve().parents[2] / "shared"
                         / "data" / "mindboggle-oasis-trt20").is_dir(),
                    reason="needs ../shared/data")
def test_knee_preset_flags_a_brain(tmp_path):
    """The report of issue 28: a brain given to the knee preset came out as femur and tibia
    without a word."""
    import pathlib

    import dazoo

    brain = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" /
             "mindboggle-oasis-trt20" / "OASIS-TRT-20-10" / "t1weighted_brain.nii.gz")
    result = dazoo.load("knee").segment(brain)
    assert result.warnings and "is this a knee MRI" in result.warnings[-1]


def test_alignment_scale_check():
    """A head fitted into a brain template needs a larger scale than any brain: flagged."""
    checks = InputChecks.from_dict({"extent_mm": [100, 100, 100], "scale_range": [0.9, 1.1],
                                    "needs": "a brain"})
    ok = {"extent_mm": [100, 100, 100], "scale": 1.05}
    assert check_input(ok, checks) == []
    problems = check_input({**ok, "scale": 1.3}, checks)
    assert len(problems) == 1 and "scale the template by 1.30" in problems[0]
    assert "--skull-strip auto" in problems[0]
    affine = np.diag([1.2, 1.2, 1.2, 1.0])
    volume = Volume(np.ones((8, 8, 8), np.float32), np.eye(4), None)
    measured = measure_input(volume, volume, affine)
    assert measured["scale"] == pytest.approx(1.2)
