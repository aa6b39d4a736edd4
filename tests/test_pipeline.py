"""Presets, Pipeline and the CLI on a tiny synthetic preset built by the tests.

The networks are untrained: these tests check geometry and plumbing (native grids, affines,
orientation invariance, files, errors), not accuracy.
"""
import dataclasses
import json
import os

import keras
import nibabel as nib
import numpy as np
import pytest

from dazoo import DeepAtlas, RegistrationNet, SegmentationNet
from dazoo.cli import main
from dazoo.errors import DazooInputError
from dazoo.hub import load
from dazoo.pipeline import Pipeline
from dazoo.presets import get_preset, save_preset
from dazoo.synthetic import make_subjects

SHAPE = (32, 32, 32)
IDS = [0, 10, 20, 30]


@pytest.fixture(scope="module")
def preset_dir(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = DeepAtlas(RegistrationNet(SHAPE, int_steps=3),
                      SegmentationNet(SHAPE, len(IDS), features=((8, 8, 8, 8), (8, 8, 8, 8, 8))))
    folder = tmp_path_factory.mktemp("presets") / "tiny"
    save_preset(
        folder, model=model,
        preprocess={"voxel_size": [2.0, 2.0, 2.0], "shape": list(SHAPE), "orientation": "RAS",
                    "alignment": "none", "centre": "mass"},
        labels=[{"class": k, "id": i, "name": f"structure {i}"} for k, i in enumerate(IDS)],
        metadata={"version": "0.0.1", "description": "tiny untrained test preset",
                  "license": "Apache-2.0"},
        readme="# tiny\nAn untrained preset for tests.\n",
    )
    return folder


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two synthetic subjects as RAS NIfTI files (1.5 mm), with label maps of ids IDS."""
    folder = tmp_path_factory.mktemp("scans")
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = [-30.0, -20.0, -25.0]
    paths = []
    for n, (image, labels) in enumerate(make_subjects(2, (40, 40, 40), num_classes=4, seed=3)):
        image_path, labels_path = folder / f"s{n}.nii.gz", folder / f"s{n}_labels.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), image_path)
        nib.save(nib.Nifti1Image(np.array(IDS, np.int16)[labels], affine), labels_path)
        paths.append((str(image_path), str(labels_path)))
    return paths


def _reoriented(image, codes):
    """The same image (same world) stored with the axis codes ``codes``."""
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(image.affine),
                                                nib.orientations.axcodes2ornt(codes))
    out = image.as_reoriented(transform)
    assert nib.aff2axcodes(out.affine) == tuple(codes)
    return out


def _as_lia(path, out):
    nib.save(_reoriented(nib.load(path), ("L", "I", "A")), out)
    return str(out)


def test_preset_is_verified_by_sha256(preset_dir, tmp_path):
    preset = get_preset(preset_dir)
    preset.verify()
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(preset_dir):
        (broken / name).write_bytes((preset_dir / name).read_bytes())
    with open(broken / "model.weights.h5", "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(DazooInputError, match="sha256"):
        load(str(broken))


def test_segment_returns_ids_on_the_input_grid_in_any_orientation(preset_dir, scans, tmp_path):
    pipeline = load(str(preset_dir))
    image_path = scans[0][0]
    ras = pipeline.segment(image_path)
    native = nib.load(image_path)
    assert ras.labels.array.shape == native.shape
    np.testing.assert_allclose(ras.labels.affine, native.affine)
    assert set(np.unique(ras.labels.array)) <= set(IDS)

    lia_path = _as_lia(image_path, tmp_path / "lia.nii.gz")
    lia = pipeline.segment(lia_path)
    np.testing.assert_allclose(lia.labels.affine, nib.load(lia_path).affine)
    # Same world, other axes: bring the LIA result back to RAS axes, voxel for voxel.
    back = _reoriented(nib.Nifti1Image(lia.labels.array.astype(np.int16), lia.labels.affine),
                       nib.aff2axcodes(native.affine))
    np.testing.assert_allclose(back.affine, native.affine, atol=1e-5)
    agreement = np.mean(np.asarray(back.dataobj) == ras.labels.array)
    assert agreement > 0.999


def test_register_outputs_live_on_the_fixed_grid(preset_dir, scans, tmp_path):
    pipeline = load(str(preset_dir))
    (moving, moving_labels), (fixed, _) = scans
    result = pipeline.register(moving, fixed, moving_labels=moving_labels)
    fixed_img = nib.load(fixed)
    assert result.moved.array.shape == fixed_img.shape
    assert result.displacement.array.shape == fixed_img.shape + (3,)
    np.testing.assert_allclose(result.moved_labels.affine, fixed_img.affine)
    assert set(np.unique(result.moved_labels.array)) <= set(IDS)
    assert 0.0 <= result.folding_fraction <= 1.0 and result.jacobian["min"] <= 1.0
    written = result.save(moved=tmp_path / "moved.nii.gz", warp=tmp_path / "warp.nii.gz",
                          moved_labels=tmp_path / "moved_labels.nii.gz", protect=[moving])
    assert [os.path.basename(p) for p in written] == ["moved.nii.gz", "warp.nii.gz",
                                                      "moved_labels.nii.gz"]
    assert nib.load(tmp_path / "warp.nii.gz").shape == fixed_img.shape + (1, 3)
    # Moved labels asked of a result without them: refused before anything is written.
    unlabelled = dataclasses.replace(result, moved_labels=None)
    with pytest.raises(DazooInputError, match="no moving label map"):
        unlabelled.save(moved=tmp_path / "moved2.nii.gz", moved_labels=tmp_path / "ml.nii.gz")
    assert not (tmp_path / "moved2.nii.gz").exists()


def test_identity_registration_of_an_image_onto_itself(preset_dir, scans):
    """With the flow head zeroed, the displacement is exactly the world identity."""
    pipeline = load(str(preset_dir))
    flow = pipeline.model.registration_net.get_layer("flow")
    saved = flow.get_weights()
    try:
        flow.set_weights([np.zeros_like(w) for w in saved])
        image = scans[0][0]
        result = pipeline.register(image, image)
        np.testing.assert_allclose(result.displacement.array, 0.0, atol=1e-4)
        np.testing.assert_allclose(result.moved.array, nib.load(image).get_fdata(), atol=1e-4)
        assert result.folding_fraction == 0.0
    finally:
        flow.set_weights(saved)


def test_cli_segment_register_list_and_errors(preset_dir, scans, tmp_path, capsys, monkeypatch):
    (moving, moving_labels), (fixed, _) = scans
    out = tmp_path / "segs"
    assert main(["segment", moving, fixed, "-o", str(out), "--preset", str(preset_dir)]) == 0
    assert sorted(os.listdir(out)) == ["s0_seg.nii.gz", "s1_seg.nii.gz"]

    assert main(["register", moving, fixed, "--moved", str(tmp_path / "m.nii.gz"),
                 "--moving-labels", moving_labels, "--moved-labels", str(tmp_path / "ml.nii.gz"),
                 "--preset", str(preset_dir)]) == 0
    assert (tmp_path / "ml.nii.gz").exists()

    # Inputs are never overwritten; errors are one line with exit status 2.
    before = open(fixed, "rb").read()
    capsys.readouterr()
    assert main(["register", moving, fixed, "--moved", fixed, "--preset", str(preset_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fixed in err
    assert open(fixed, "rb").read() == before
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    assert main(["segment", str(bad), "-o", str(tmp_path / "x.nii.gz"),
                 "--preset", str(preset_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.nii.gz" in err
    assert not (tmp_path / "x.nii.gz").exists()

    monkeypatch.setattr("dazoo.presets.preset_root", lambda: preset_dir.parent)
    assert main(["list"]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["list", "--card", "tiny"]) == 0
    assert "untrained preset" in capsys.readouterr().out
    assert main(["segment", moving, "-o", str(tmp_path / "y.nii.gz"), "--preset", "nope"]) == 2
    assert "no such preset" in capsys.readouterr().err

    # Two inputs with one file name would write one output twice: refused before any work.
    twin = tmp_path / "twin" / os.path.basename(moving)
    twin.parent.mkdir()
    twin.write_bytes(open(moving, "rb").read())
    assert main(["segment", moving, str(twin), "-o", str(tmp_path / "twins"),
                 "--preset", str(preset_dir)]) == 2
    err = capsys.readouterr().err
    assert "would also be written to" in err and "--name-from subject" in err
    assert not (tmp_path / "twins").exists()
    # Asking for moved labels without moving labels writes nothing.
    assert main(["register", moving, fixed, "--moved", str(tmp_path / "m2.nii.gz"),
                 "--moved-labels", str(tmp_path / "ml2.nii.gz"),
                 "--preset", str(preset_dir)]) == 2
    assert not (tmp_path / "m2.nii.gz").exists()


def test_card_lists_long_subject_lists_in_short():
    from dazoo.presets import _names

    assert _names([]) == "none" and _names(["a", "b"]) == "a, b"
    many = [f"s{i}" for i in range(12)] + [f"maps/m{i}" for i in range(93)]
    text = _names(many)
    assert text.startswith("12 scans (s0, s1, s2, s3, s4, s5 and 6 more) + 93 label maps ")
    assert "maps/m3" not in text and "every name in `metadata.json`" in text


def test_saving_a_preset_again_replaces_it_whole_or_not_at_all(preset_dir, tmp_path):
    folder = tmp_path / "copy"
    preset = get_preset(preset_dir)
    model = Pipeline(preset).model
    kwargs = dict(model=model, preprocess=preset.read_json("preprocess.json"),
                  labels=preset.read_json("labels.json")["classes"],
                  metadata={"description": "first"})
    save_preset(folder, **kwargs)
    with pytest.raises(OSError):
        save_preset(folder, **{**kwargs, "metadata": {"description": "second"}},
                    files={"template.nii.gz": tmp_path / "missing.nii.gz"})
    kept = get_preset(folder)
    kept.verify()
    assert kept.metadata["description"] == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no temporary folder left


def test_help_is_fast_and_imports_no_keras():
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c",
                             "import sys; from dazoo.cli import main\n"
                             "try: main(['--help'])\n"
                             "except SystemExit: pass\n"
                             "assert 'keras' not in sys.modules and 'tensorflow' not in "
                             "sys.modules"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - start < 5


def test_cli_evaluate_writes_a_report(preset_dir, scans, tmp_path, capsys):
    folder = tmp_path / "data"
    for n, (image, labels) in enumerate(scans):
        (folder / f"s{n}").mkdir(parents=True)
        os.symlink(image, folder / f"s{n}" / "image.nii.gz")
        os.symlink(labels, folder / f"s{n}" / "labels.nii.gz")
    report_path = tmp_path / "report.json"
    assert main(["evaluate", str(folder), "--preset", str(preset_dir), "-o",
                 str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "segmentation: mean Dice" in out and "registration: mean Dice" in out
    import json

    report = json.loads(report_path.read_text())
    assert report["subjects"] == ["s0", "s1"]
    assert report["registration"]["summary"]["count"] == 2
    per_label = report["segmentation"]["summary"]["dice_per_label"]
    assert sorted(int(i) for i in per_label) == IDS[1:]


def test_cli_evaluate_leaves_out_structures_no_label_map_has(preset_dir, scans, tmp_path,
                                                             capsys):
    """Label maps of another protocol (here: without id 30, e.g. cortex-only DKT maps against
    a whole-brain preset): that structure is left out of the scores, with a note, rather than
    scored 0 for every subject; a structure missing from only some maps is still scored."""
    import json

    from dazoo import io

    folder = tmp_path / "data"
    for n, (image, labels) in enumerate(scans):
        (folder / f"s{n}").mkdir(parents=True)
        os.symlink(image, folder / f"s{n}" / "image.nii.gz")
        volume = io.read_labels(labels)
        array = np.where(volume.array == 30, 0, volume.array)
        if n == 0:
            array = np.where(array == 20, 0, array)      # 20 missing from one map only
        io.write_labels((array.astype(np.int16), volume.affine),
                        folder / f"s{n}" / "labels.nii.gz")
    report_path = tmp_path / "report.json"
    assert main(["evaluate", str(folder), "--preset", str(preset_dir), "--pairs", "0", "-o",
                 str(report_path)]) == 0
    err = capsys.readouterr().err
    assert "1 of the preset's 3 structures are in none of the label maps, left out of the " \
        "scores: " in err
    report = json.loads(report_path.read_text())
    assert sorted(int(i) for i in report["segmentation"]["summary"]["dice_per_label"]) == [10, 20]
    for subject in report["segmentation"]["subjects"]:
        assert sorted(int(i) for i in subject["dice"]) == [10, 20]


def test_score_labels_merges_left_and_right():
    from dazoo.evaluate import score_labels

    truth = np.zeros((4, 4, 4), int)
    truth[:2] = 1002
    truth[2:] = 2002
    swapped = np.where(truth == 1002, 2002, 1002) * (truth > 0)
    scores = score_labels(truth, swapped, [1002, 2002])
    assert scores["mean_dice"] == 0.0          # left and right swapped...
    assert scores["mean_merged_dice"] == 1.0   # ...but the same region once merged


def test_add_evaluation_keeps_earlier_sections(preset_dir, tmp_path):
    """Two sections added through the same (stale) Preset object both stay in the card."""
    import shutil

    from dazoo.presets import add_evaluation, get_preset

    folder = tmp_path / "card"
    shutil.copytree(preset_dir, folder)
    preset = get_preset(folder)
    add_evaluation(preset, "First", "one")
    add_evaluation(preset, "Second", "two")
    again = add_evaluation(preset, "First", "one, again")  # replaced by title, order kept last
    titles = [s["title"] for s in again.metadata["evaluations"]]
    assert titles == ["Second", "First"]
    card = (folder / "README.md").read_text()
    assert "### Second" in card and "one, again" in card and "\none\n" not in card


def test_mirror_id_swaps_sides():
    from dazoo.labels import left_id, mirror_id

    pairs = [(1035, 2035), (1002, 2002), (17, 53), (2, 41), (11101, 12101), (91, 92)]
    for left, right in pairs:
        assert mirror_id(left) == right and mirror_id(right) == left
        assert left_id(right) == left
    for unsided in (0, 16, 24, 85, 3500):
        assert mirror_id(unsided) == unsided


def _random_pipeline(ids, orientation, *, seed):
    """A pipeline of randomly initialised small networks for the label ``ids`` on SHAPE."""
    from dazoo.preprocess import Preprocessor

    keras.utils.set_random_seed(seed)
    model = DeepAtlas(RegistrationNet(SHAPE, int_steps=3),
                      SegmentationNet(SHAPE, len(ids), features=((8, 8, 8, 8), (8, 8, 8, 8, 8))))
    pre = Preprocessor({"voxel_size": [2.0, 2.0, 2.0], "shape": list(SHAPE),
                        "orientation": orientation, "alignment": "none"})
    return Pipeline.from_model(model, pre, [{"class": k, "id": i, "name": str(i)}
                                            for k, i in enumerate(ids)])


def test_flip_augmentation_is_mirror_equivariant_with_sides_swapped():
    """With ``flip``, segmenting the mirrored image gives the mirrored probabilities with left
    and right classes swapped (exactly, whatever the weights); without it a random network
    does not."""
    ids = [0, 16, 1002, 1035, 2002, 2035]  # background, a midline id, two left/right pairs
    pipeline = _random_pipeline(ids, "LPS", seed=1)
    assert pipeline.flip_axis() == 0
    np.testing.assert_array_equal(pipeline.flip_permutation(), [0, 1, 4, 5, 2, 3])
    image = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    mirrored = np.ascontiguousarray(image[::-1])
    swap = [0, 1, 4, 5, 2, 3]
    tta = pipeline.segment_scores(image, flip=True)
    np.testing.assert_allclose(pipeline.segment_scores(mirrored, flip=True),
                               tta[::-1][..., swap], atol=1e-5)
    np.testing.assert_allclose(tta.sum(-1), 1.0, atol=1e-5)
    plain = pipeline.segment_scores(image, flip=False)
    assert np.abs(pipeline.segment_scores(mirrored, flip=False)
                  - plain[::-1][..., swap]).max() > 1e-3
    # The mean of the two passes, as documented.
    other = pipeline.segment_scores(mirrored, flip=False)[::-1][..., swap]
    np.testing.assert_allclose(tta, 0.5 * (plain + other), atol=1e-6)
    # The flip agreement: Dice of the two passes' label maps, computed here by hand.
    details = {}
    pipeline.segment_scores(image, flip=True, details=details)
    a, b = plain.argmax(-1), other.argmax(-1)
    present = [k for k in range(1, len(ids)) if (a == k).any() or (b == k).any()]
    expected = np.mean([2 * ((a == k) & (b == k)).sum() / ((a == k).sum() + (b == k).sum())
                        for k in present])
    assert details["flip_agreement"] == pytest.approx(expected)


def test_mirror_segmenter_gives_the_sides_swapped_probabilities():
    """The flip augmentation's second network: the segmenter's probabilities with the
    classes reordered by the flip permutation (a table whose twins are not one block apart),
    built once per segmenter, the segmenter itself untouched."""
    ids = [0, 2, 4, 16, 41, 43, 1002, 2002]
    pipeline = _random_pipeline(ids, "RAS", seed=2)
    model = pipeline.model
    permutation = pipeline.flip_permutation()
    np.testing.assert_array_equal(permutation, [0, 4, 5, 3, 1, 2, 7, 6])
    image = np.random.default_rng(0).random((1, *SHAPE, 1), dtype=np.float32)
    before = [np.array(w) for w in model.segmentation_net.get_weights()]
    twin = pipeline.mirror_segmenter(SHAPE)
    assert pipeline.mirror_segmenter(SHAPE) is twin and twin is not model.segmentation_net
    plain = np.asarray(model.segmentation_net(image))
    np.testing.assert_allclose(np.asarray(twin(image)), plain[..., permutation], atol=1e-6)
    assert np.abs(plain[..., permutation] - plain).max() > 1e-3  # the order matters
    for a, b in zip(before, model.segmentation_net.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_segment_flip_option_and_preset_default(preset_dir, scans, tmp_path):
    pipeline = load(preset_dir)
    assert pipeline.default_flip is False
    plain = pipeline.segment(scans[0][0], flip=False, probabilities=True)
    flipped = pipeline.segment(scans[0][0], flip=True, probabilities=True)
    assert plain.labels.shape == flipped.labels.shape
    assert not np.allclose(plain.probabilities.array, flipped.probabilities.array)
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", scans[0][0], "-o", str(out), "--preset", str(preset_dir),
                 "--flip"]) == 0
    np.testing.assert_array_equal(nib.load(out).get_fdata().astype(int), flipped.labels.array)


def test_covering_shape_grows_to_the_field_of_view_in_network_steps():
    """A scan wider than the model grid: the grid grows (multiples of 2**levels) along the
    model axes the field of view spans, whatever the scan's own axis order; one that fits
    keeps config.shape."""
    from dazoo.io import Volume
    from dazoo.preprocess import PreprocessConfig, Preprocessor

    pre = Preprocessor(PreprocessConfig(voxel_size=(2.0, 2.0, 2.0), shape=(16, 16, 32),
                                        orientation="RAS", centre="fov", levels=3))
    wide = Volume(np.zeros((50, 20, 20), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]), None)
    assert pre.covering_shape(wide) == (32, 16, 32)         # 50 mm / 2 mm = 25 -> 32
    lia = np.array([[-1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -2.0, 0, 0], [0, 0, 0, 1]])
    noise = np.random.default_rng(0).random((20, 45, 70), np.float32)
    tall = Volume(noise, lia, None)  # S-I 90 mm, A-P 70 mm
    assert pre.covering_shape(tall, limit=None) == (16, 40, 48)
    small = Volume(np.zeros((10, 10, 10), np.float32), np.eye(4), None)
    assert pre.covering_shape(small) == (16, 16, 32)
    # At most GROW_LIMIT (2x) the grid's voxels: the field of view shrunk evenly to fit
    # (a 256 mm head on the knee grid needed 6.7x and ran out of 24 GiB).
    assert pre.covering_shape(tall) == (16, 32, 32)                # 2.0x; 40/48 -> 32/32
    assert pre.covering_shape(tall, limit=3.0) == (16, 32, 40)     # 2.5x (even: 0.9 of each)
    head = Volume(np.zeros((128, 128, 128), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), None)
    assert pre.covering_shape(head) == (16, 16, 32)  # any even growth would pass 2x
    assert pre.apply(tall, shape="cover").array.shape == (16, 32, 32)
    wide = Volume(np.random.default_rng(1).random((50, 20, 20), np.float32), np.eye(4), None)
    out = pre.apply(wide, shape="cover")
    assert out.array.shape == (32, 16, 32)
    # every native voxel centre lies inside the grown grid (nothing of the scan is cut)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in wide.shape], indexing="ij"), -1)
    points = grid.reshape(-1, 3) @ out.native_to_model[:3, :3].T + out.native_to_model[:3, 3]
    assert (points >= -0.5).all() and (points <= np.array(out.array.shape) - 0.5).all()
    with pytest.raises(DazooInputError, match="cover"):
        pre.apply(tall, shape="grow")


def test_segment_keeps_the_largest_piece_when_the_preset_says_so(preset_dir, tmp_path):
    """metadata "largest_component": every listed id of the label map is one piece (the
    preset's other output unchanged); an id outside the table is refused."""
    import shutil

    import scipy.ndimage as ndi

    plain = load(str(preset_dir))
    rng = np.random.default_rng(3)
    image = ndi.gaussian_filter(rng.random((40, 40, 40)), 1.5).astype(np.float32)
    volume = (image, np.diag([2.0, 2.0, 2.0, 1.0]))
    labels = plain.segment(volume).labels.array
    pieces = {int(i): ndi.label(labels == i, np.ones((3, 3, 3)))[1]
              for i in np.unique(labels) if i}
    many = [i for i, n in pieces.items() if n > 1]
    assert many, pieces                        # a random net's labels come in pieces
    cleaned_dir = tmp_path / "cleaned"
    shutil.copytree(preset_dir, cleaned_dir)
    meta = json.loads((cleaned_dir / "metadata.json").read_text())
    (cleaned_dir / "metadata.json").write_text(json.dumps({**meta, "largest_component": many}))
    cleaned = load(str(cleaned_dir))
    assert plain.largest_component == [] and cleaned.largest_component == many
    out = cleaned.segment(volume).labels.array
    for i in many:
        assert ndi.label(out == i, np.ones((3, 3, 3)))[1] == 1
    assert np.all((out == labels) | (out == 0))
    keep = ~np.isin(labels, many)
    np.testing.assert_array_equal(out[keep], labels[keep])
    bad_dir = tmp_path / "bad"
    shutil.copytree(preset_dir, bad_dir)
    (bad_dir / "metadata.json").write_text(json.dumps({**meta, "largest_component": [999]}))
    with pytest.raises(DazooInputError, match="largest_component"):
        load(str(bad_dir)).segment(volume)


def test_segment_grows_the_grid_when_the_preset_says_so(preset_dir, tmp_path):
    """metadata "grow": a scan wider than the 64 mm grid is labelled to its edges by the
    same weights on a larger grid; without it the labels stop at the grid's edge."""
    import shutil

    grown_dir = tmp_path / "grown"
    shutil.copytree(preset_dir, grown_dir)
    meta = json.loads((grown_dir / "metadata.json").read_text())
    (grown_dir / "metadata.json").write_text(json.dumps({**meta, "grow": True}))
    import scipy.ndimage as ndi

    rng = np.random.default_rng(0)
    image = ndi.gaussian_filter(rng.random((60, 30, 30)), 2).astype(np.float32)  # 120x60x60 mm
    volume = (image, np.diag([2.0, 2.0, 2.0, 1.0]))
    plain, grown = load(str(preset_dir)), load(str(grown_dir))
    assert not plain.grows and grown.grows
    fixed = plain.segment(volume, probabilities=True)
    wide = grown.segment(volume, probabilities=True)
    assert fixed.labels.shape == wide.labels.shape == (60, 30, 30)
    # the 32-voxel (64 mm) grid, centred on the scan: its ends are outside, background
    for ends in (slice(0, 10), slice(50, 60)):
        assert (fixed.labels.array[ends] == 0).all()
        assert np.all(fixed.probabilities.array[ends][..., 0] == 1.0)
        assert np.all(wide.probabilities.array[ends][..., 0] < 1.0)  # the network saw them
    assert set(grown._segmenters) == {(64, 32, 32)}
    for a, b in zip(grown.segmenter((64, 32, 32)).get_weights(),
                    plain.model.segmentation_net.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not any("wider than this preset segments" in w for w in wide.warnings)
    # 200 mm would need 3.5x the grid's voxels: grown to the 2x limit, and said so.
    longer = ndi.gaussian_filter(rng.random((100, 30, 30)), 2).astype(np.float32)
    result = grown.segment((longer, np.diag([2.0, 2.0, 2.0, 1.0])))
    (shape,) = grown._segmenters
    assert shape == (64, 32, 32) and result.labels.shape == (100, 30, 30)
    assert any("wider than this preset segments (128 x 64 x 64 mm" in w for w in result.warnings)


def test_reusing_inputs_prepares_each_file_once(preset_dir, scans, tmp_path, monkeypatch):
    """Inside ``reusing_inputs`` a file registered again is not prepared again (until it
    changes on disk); the registrations are those of a pipeline that prepares every time."""
    import os
    import shutil

    from dazoo.pipeline import Pipeline

    pipeline = load(str(preset_dir))
    (s0, _), (s1, _) = scans
    prepared = []
    original = Pipeline._prepare_new

    def counting(self, image, *args, **kwargs):
        prepared.append(os.path.basename(str(image)))
        return original(self, image, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "_prepare_new", counting)
    plain = pipeline.register(s1, s0, refine=0)
    assert prepared == ["s1.nii.gz", "s0.nii.gz"]
    copy = tmp_path / "s0.nii.gz"
    shutil.copy(s0, copy)
    prepared.clear()
    with pipeline.reusing_inputs(keep=8):
        pipeline.register(str(copy), s1, refine=0)
        again = pipeline.register(s1, str(copy), refine=0)
        assert prepared == ["s0.nii.gz", "s1.nii.gz"]  # the second pair: both kept
        np.testing.assert_allclose(again.moved.array, plain.moved.array, atol=1e-5)
        os.utime(copy, ns=(1, 1))  # changed on disk: prepared anew
        pipeline.register(s1, str(copy), refine=0)
        assert prepared == ["s0.nii.gz", "s1.nii.gz", "s0.nii.gz"]
    pipeline.register(s1, s0, refine=0)  # outside the block: nothing kept
    assert prepared[-2:] == ["s1.nii.gz", "s0.nii.gz"]
