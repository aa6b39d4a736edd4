"""Everyday CLI use: folders in, keep going past a bad file, volumes / probabilities / QC
pictures out, dazoo warp reproducing dazoo register, quiet logs, clear pattern errors.

On the tiny untrained preset of test_pipeline (plumbing and geometry, not accuracy)."""
import argparse
import csv
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from dazoo.cli import main
from dazoo.errors import DazooInputError

from test_pipeline import IDS, preset_dir, scans  # noqa: F401  (fixtures)


def _png(path):
    import matplotlib.image

    picture = matplotlib.image.imread(path)
    assert picture.shape[0] > 200 and picture.shape[1] > 400
    assert picture[..., :3].std() > 0.05  # not blank
    return picture


def test_segment_a_folder_past_a_bad_file_with_volumes_probabilities_and_qc(
        preset_dir, scans, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "in"
    folder.mkdir()
    for n, (image, _) in enumerate(scans):
        os.symlink(image, folder / f"s{n}.nii.gz")
    (folder / "broken.nii.gz").write_bytes(b"not a nifti")
    (folder / "notes.txt").write_text("ignored")
    out, table = tmp_path / "segs", tmp_path / "volumes.csv"
    code = main(["segment", str(folder), "-o", str(out), "--preset", str(preset_dir),
                 "--continue-on-error", "--volumes", str(table), "--probabilities",
                 str(tmp_path / "probs"), "--probabilities-dtype", "float32",
                 "--qc", str(tmp_path / "qc")])
    err = capsys.readouterr().err
    assert code == 2  # one input failed
    errors = [line for line in err.splitlines() if line.startswith("dazoo: error")]
    assert len(errors) == 1 and "broken.nii.gz" in errors[0]
    assert "2 segmented, 1 failed" in err
    assert sorted(os.listdir(out)) == ["s0_seg.nii.gz", "s1_seg.nii.gz"]
    rows = list(csv.reader(table.open()))
    assert rows[0][0] == "image" and len(rows) == 3 and len(rows[0]) == len(IDS)
    for row in rows[1:]:
        labels = nib.load(out / f"{os.path.basename(row[0]).split('.')[0]}_seg.nii.gz")
        array = np.asarray(labels.dataobj)
        voxel = abs(np.linalg.det(labels.affine[:3, :3]))
        # The regions' volumes add up to the labelled volume.
        assert sum(float(v) for v in row[1:]) == pytest.approx((array > 0).sum() * voxel,
                                                                abs=0.1 * len(row))
        probs = nib.load(tmp_path / "probs" / os.path.basename(labels.get_filename())
                         .replace("_seg", "_prob"))
        assert probs.shape == array.shape + (len(IDS),)
        assert b"float32" in probs.header["descrip"].tobytes()
        p = np.asarray(probs.dataobj, np.float32)
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=5e-3)
        assert np.mean(np.array(IDS)[np.argmax(p, -1)] == array) > 0.99
    for n in range(2):
        _png(tmp_path / "qc" / f"s{n}_seg.png")


def test_name_fields_and_output_patterns(tmp_path):
    from dazoo.cli import _targets

    inputs = [str(tmp_path / "fs" / s / "mri" / "T1.mgz") for s in ("bert", "ernie")]
    assert [os.path.relpath(t, tmp_path) for t in _targets(inputs, str(tmp_path / "o"),
                                                           "_seg.nii.gz", "x", "subject")] \
        == ["o/bert_seg.nii.gz", "o/ernie_seg.nii.gz"]
    assert [os.path.basename(t) for t in _targets(inputs, "o", "_seg.nii.gz", "x", "path")] \
        == ["bert_mri_T1_seg.nii.gz", "ernie_mri_T1_seg.nii.gz"]
    assert _targets(inputs, "segs/{subject}/{parent}-{name}.mgz", "", "x") \
        == ["segs/bert/mri-T1.mgz", "segs/ernie/mri-T1.mgz"]
    for name_from in ("name", "parent"):  # both clash here
        with pytest.raises(DazooInputError, match="would also be written"):
            _targets(inputs, "o", "_seg.nii.gz", "x", name_from)
    with pytest.raises(DazooInputError, match=r"bad output pattern.*\{subject\}"):
        _targets(inputs, "o/{sub}.nii.gz", "", "x")
    with pytest.raises(DazooInputError, match="must end in"):
        _targets(inputs, "o/{subject}", "", "x")
    with pytest.raises(DazooInputError, match="would also be written"):
        _targets(inputs, "o/{name}.nii.gz", "", "x")
    # Files in one folder: the subject is that folder (BIDS-like names kept whole).
    flat = [str(tmp_path / "anat" / f"sub-0{i}_T1w.nii.gz") for i in (1, 2)]
    assert [os.path.basename(t) for t in _targets(flat, "o", "_seg.nii.gz", "x", "path")] \
        == ["sub-01_T1w_seg.nii.gz", "sub-02_T1w_seg.nii.gz"]


def test_shards_split_the_sorted_inputs_disjointly():
    from dazoo.cli import _parse_shard, _shard

    inputs = [f"/d/s{n:02d}.nii.gz" for n in range(11)]
    shards = [_shard(inputs[::-1], [], (i, 4))[0] for i in range(4)]  # given order irrelevant
    assert sorted(sum(shards, [])) == inputs and sum(len(s) for s in shards) == 11
    assert sorted(shards[1]) == ["/d/s01.nii.gz", "/d/s05.nii.gz", "/d/s09.nii.gz"]
    assert _shard(inputs[:2], ["/d/a.nii.gz"], (0, 2)) == (["/d/s01.nii.gz"], ["/d/a.nii.gz"])
    assert _parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "1", "a/b", "-1/3"):
        with pytest.raises(argparse.ArgumentTypeError):
            _parse_shard(bad)


def test_shards_write_what_one_job_writes(preset_dir, scans, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "in"
    folder.mkdir()
    for n, (image, _) in enumerate(scans):
        for copy in range(2):
            os.symlink(image, folder / f"s{n}{copy}.nii.gz")
    base = ["segment", str(folder), "--preset", str(preset_dir)]
    assert main(base + ["-o", str(tmp_path / "all"), "--volumes", str(tmp_path / "all.csv")]) == 0
    for i in range(3):
        assert main(base + ["-o", str(tmp_path / "sharded"), "--shard", f"{i}/3",
                            "--volumes", str(tmp_path / f"v{i}.csv")]) == 0
    assert sorted(os.listdir(tmp_path / "sharded")) == sorted(os.listdir(tmp_path / "all"))
    merged = subprocess.run("awk 'FNR>1 || NR==1' v*.csv", shell=True, cwd=tmp_path,
                            capture_output=True, text=True, check=True).stdout  # the README's
    rows = list(csv.reader(merged.splitlines()))
    whole = list(csv.reader((tmp_path / "all.csv").read_text().splitlines()))
    assert rows[0] == whole[0] and sorted(rows[1:]) == sorted(whole[1:])
    assert main(base + ["-o", str(tmp_path / "none"), "--shard", "7/8"]) == 0  # 4 inputs
    assert "shard 7/8: 0 inputs" in capsys.readouterr().err


def test_same_named_inputs_segmented_into_one_folder(preset_dir, scans, tmp_path,  # noqa: F811
                                                     capsys):
    inputs = []
    for n, (image, _) in enumerate(scans):
        (tmp_path / f"subj{n}").mkdir()
        os.symlink(image, tmp_path / f"subj{n}" / "t1.nii.gz")
        inputs.append(str(tmp_path / f"subj{n}" / "t1.nii.gz"))
    assert main(["segment", *inputs, "-o", str(tmp_path / "segs"), "--name-from", "subject",
                 "--qc", str(tmp_path / "qc"), "--preset", str(preset_dir)]) == 0
    assert sorted(os.listdir(tmp_path / "segs")) == ["subj0_seg.nii.gz", "subj1_seg.nii.gz"]
    assert sorted(os.listdir(tmp_path / "qc")) == ["subj0_seg.png", "subj1_seg.png"]
    assert main(["segment", *inputs, "-o", str(tmp_path / "p" / "{subject}" / "seg.mgz"),
                 "--qc", str(tmp_path / "qc2"), "--preset", str(preset_dir)]) == 0
    for n in range(2):
        written = nib.load(tmp_path / "p" / f"subj{n}" / "seg.mgz")
        np.testing.assert_allclose(written.affine, nib.load(inputs[n]).affine, atol=1e-4)
    # Same picture names (seg) under a pattern: named after the whole input path instead.
    assert sorted(os.listdir(tmp_path / "qc2")) == ["subj0_t1_seg.png", "subj1_t1_seg.png"]
    capsys.readouterr()


def test_output_with_an_unknown_extension_is_a_one_line_error(preset_dir, scans, tmp_path,  # noqa: F811
                                                              capsys):
    image = scans[0][0]
    assert main(["segment", image, "-o", str(tmp_path / "seg.nrrd"),
                 "--preset", str(preset_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'.nrrd'" in err
    assert not (tmp_path / "seg.nrrd").exists()
    assert main(["segment", image, scans[1][0], "-o", str(tmp_path / "x.nii.gz"),
                 "--preset", str(preset_dir)]) == 2
    assert "2 inputs" in capsys.readouterr().err


def test_warp_reproduces_register(preset_dir, scans, tmp_path, capsys):  # noqa: F811
    (moving, moving_labels), (fixed, _) = scans
    paths = {k: str(tmp_path / f"{k}.nii.gz") for k in ("moved", "warp", "ml", "jac", "w16")}
    assert main(["register", moving, fixed, "--preset", str(preset_dir), "--moved",
                 paths["moved"], "--warp", paths["warp"], "--moving-labels", moving_labels,
                 "--moved-labels", paths["ml"], "--jacobian", paths["jac"],
                 "--qc", str(tmp_path / "qc")]) == 0
    # The folding line says where it was measured, and counts the written map's voxels.
    err_lines = capsys.readouterr().err.splitlines()
    done = [line for line in err_lines if "done in" in line][0]
    det = np.asarray(nib.load(paths["jac"]).dataobj)
    assert "of model-grid voxels" in done
    # and which device ran the networks (issue: nothing said so)
    assert " on CPU (" in done or " on GPU (" in done
    assert f"jac.nii.gz (fixed grid, affine included): {int((det <= 0).sum())} voxels <= 0" \
        in done
    assert main(["warp", moving_labels, "--warp", paths["warp"], "--reference", fixed,
                 "-o", str(tmp_path / "again_labels.nii.gz"), "--labels"]) == 0
    expected = np.asarray(nib.load(paths["ml"]).dataobj)
    again = np.asarray(nib.load(tmp_path / "again_labels.nii.gz").dataobj)
    np.testing.assert_array_equal(again, expected)  # exactly the moved labels of register
    assert main(["warp", moving, "--warp", paths["warp"], "--reference", fixed,
                 "-o", str(tmp_path / "again.nii.gz")]) == 0
    np.testing.assert_allclose(nib.load(tmp_path / "again.nii.gz").get_fdata(),
                               nib.load(paths["moved"]).get_fdata(), rtol=1e-5, atol=1e-4)
    jac = nib.load(paths["jac"])
    assert jac.shape == nib.load(fixed).shape and np.isfinite(jac.get_fdata()).all()
    pictures = os.listdir(tmp_path / "qc")
    assert len(pictures) == 1
    _png(tmp_path / "qc" / pictures[0])
    assert main(["qc", fixed, "--warp", paths["warp"], "-o", str(tmp_path / "w.png")]) == 0
    _png(tmp_path / "w.png")
    # int16 warps: half the size, within max|d| / 32000 of the float32 one.
    assert main(["register", moving, fixed, "--preset", str(preset_dir), "--warp",
                 paths["w16"], "--warp-dtype", "int16"]) == 0
    assert nib.load(paths["w16"]).get_data_dtype() == np.int16
    full = nib.load(paths["warp"]).get_fdata()
    np.testing.assert_allclose(nib.load(paths["w16"]).get_fdata(), full,
                               atol=np.abs(full).max() / 32000 + 1e-6)
    from dazoo import io as dio
    np.testing.assert_allclose(dio.read_displacement(paths["w16"]).array,
                               dio.read_displacement(paths["warp"]).array,
                               atol=np.abs(full).max() / 32000 + 1e-6)
    # A warp applied on another grid is refused in one line, nothing written.
    other = tmp_path / "other_grid.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)), other)
    capsys.readouterr()
    assert main(["warp", moving, "--warp", paths["warp"], "--reference", str(other),
                 "-o", str(tmp_path / "no.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not on the grid" in err
    assert not (tmp_path / "no.nii.gz").exists()


def test_qc_verb_draws_labels(scans, tmp_path):  # noqa: F811
    image, labels = scans[0]
    assert main(["qc", image, "--labels", labels, "-o", str(tmp_path / "q.png")]) == 0
    _png(tmp_path / "q.png")
    assert main(["qc", image, "-o", str(tmp_path / "q.jpg")]) == 2


def test_stderr_has_no_tensorflow_log_lines(preset_dir, scans, tmp_path):  # noqa: F811
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP", "ABSL"))}
    for args in (["--help"], ["segment", scans[0][0], "-o", str(tmp_path / "s.nii.gz"),
                              "--preset", str(preset_dir)]):
        result = subprocess.run([sys.executable, "-m", "dazoo", *args], capture_output=True,
                                text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        noise = [line for line in result.stderr.splitlines()
                 if line[:5] in ("W0000", "I0000", "E0000") or "cuInit" in line
                 or "oneDNN" in line or "absl" in line or "TensorFlow binary" in line
                 or "tensorflow/" in line or "cuda" in line.lower()]
        assert noise == [], noise
    verbose = subprocess.run([sys.executable, "-m", "dazoo", "--verbose", "segment",
                              scans[0][0], "-o", str(tmp_path / "v.nii.gz"), "--preset",
                              str(preset_dir)], capture_output=True, text=True, env=env,
                             timeout=600)
    assert verbose.returncode == 0


def test_evaluate_pattern_error_names_the_pattern_and_the_files(tmp_path, capsys):
    subject = tmp_path / "data" / "s1"
    subject.mkdir(parents=True)
    for name in ("t1weighted.nii.gz", "t1weighted_brain.nii.gz", "labels.nii.gz"):
        (subject / name).write_bytes(b"")
    assert main(["evaluate", str(tmp_path / "data"), "--image", "t1*.nii.gz",
                 "--labels", "labels*.nii.gz"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'t1*.nii.gz'" in err and "t1weighted_brain.nii.gz" in err and "matches 2" in err


@pytest.mark.parametrize("codes", ["LIA", "RAS", "PSL"])
def test_qc_slices_are_in_world_orientation(codes):
    """The pictures' arrays are the scan reoriented to RAS exactly as nibabel's canonical
    form (so the patient's left is drawn on the left), with the voxel sizes along RAS."""
    from dazoo.io import Volume
    from dazoo.qc import _ras

    rng = np.random.default_rng(0)
    array = rng.random((6, 7, 8)).astype(np.float32)
    axes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.eye(4)
    spacing = (1.0, 2.0, 3.0)
    for column, code in enumerate(codes):
        row, sign = axes[code]
        affine[:3, :3][row, column] = sign * spacing[column]
    canonical = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    shown, ras_spacing = _ras(Volume(array, affine, None))
    np.testing.assert_array_equal(shown, np.asarray(canonical.dataobj))
    np.testing.assert_allclose(ras_spacing, canonical.header.get_zooms()[:3])


def test_qc_scores_table(preset_dir, scans, tmp_path, capsys):  # noqa: F811
    table = tmp_path / "qc.csv"
    assert main(["segment", scans[0][0], scans[1][0], "-o", str(tmp_path / "segs"),
                 "--qc-scores", str(table), "--flip", "--preset", str(preset_dir)]) == 0
    rows = list(csv.DictReader(table.open()))
    assert [r["image"] for r in rows] == [scans[0][0], scans[1][0]]
    for row in rows:
        assert 0 < float(row["confidence"]) <= 1 and 0 <= float(row["flip_agreement"]) <= 1
        regions = [float(v) for k, v in row.items() if k.endswith(") confidence") and v]
        assert regions and all(0 < v <= 1 for v in regions)
        assert float(row["extent_R_mm"]) > 0 and row["warnings"] == "0"
        assert "scale" in row and "alignment" in row  # empty without a template
    assert main(["segment", scans[0][0], "-o", str(tmp_path / "x.nii.gz"), "--qc-scores",
                 str(tmp_path / "qc.txt"), "--preset", str(preset_dir)]) == 2
    assert "QC scores is written as .csv" in capsys.readouterr().err


def test_region_confidence_and_agreement_by_hand():
    from dazoo.checks import label_agreement, region_confidence

    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.6, 0.3], [0.0, 0.3, 0.7]])
    assert region_confidence(scores, np.array([0, 17, 53])) == {
        "17": pytest.approx(0.7), "53": pytest.approx(0.7)}
    a, b = np.array([0, 1, 1, 2, 2]), np.array([0, 1, 2, 2, 0])
    assert label_agreement(a, b) == pytest.approx(np.mean([2 * 1 / 3, 2 * 1 / 4]))
    assert label_agreement(np.zeros(4, int), np.zeros(4, int)) == 1.0


def test_label_colours_are_freesurfers_or_distinct():
    from dazoo.labels import label_colours

    colours = label_colours([1028, 2028, 17, 53, 2])
    assert colours[1028] == colours[2028] == (20 / 255, 220 / 255, 160 / 255)  # superiorfrontal
    assert colours[17] == colours[53] and colours[2] == (245 / 255,) * 3
    other = label_colours(range(300, 400))  # ids FreeSurfer does not name: no repeats
    rgb = np.array(list(other.values()))
    distance = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1)) + np.eye(len(rgb))
    assert distance.min() > 0.01 and len({tuple(np.round(c, 3)) for c in rgb}) == 100


def test_legend_merges_twins_largest_first():
    from dazoo.labels import label_colours
    from dazoo.qc import _legend_entries

    lookup = label_colours([1025, 2025, 1005, 17, 53, 7])
    names = {1025: "ctx-lh-precuneus", 2025: "ctx-rh-precuneus", 1005: "ctx-lh-cuneus"}
    entries = _legend_entries({1025: 50, 2025: 40, 1005: 100, 17: 5, 7: 1}, names, lookup)
    assert [text for text, _ in entries] == ["ctx-lh-cuneus", "precuneus (L+R)",  # 100, 90
                                            "Left-Hippocampus", "Left-Cerebellum-White-Matter"]
    assert entries[0][1] != entries[1][1]  # cuneus and precuneus: different colours


def test_display_window_keeps_a_bright_plateau_grey():
    """FreeSurfer's white matter sits at exactly 110: the 99.5th percentile; the window
    must not show it as white. A few very bright voxels must not dim the rest either."""
    from dazoo.qc import _window

    rng = np.random.default_rng(0)
    brain = np.concatenate([np.full(60000, 110.0), rng.uniform(40, 90, 40000)])
    array = np.concatenate([np.zeros(100000), brain]).reshape(50, 40, 100)
    shown = _window(array)
    assert 0.6 < float(shown.ravel()[100000]) < 0.85  # white matter: light grey
    fat = np.concatenate([np.zeros(100000), brain[:-500], np.full(500, 255.0)])
    dimmed = _window(fat.reshape(50, 40, 100))
    assert float(dimmed.ravel()[100000]) > 0.6  # 0.5 % of fat does not set the window


def test_python_api_does_not_print_tensorflow_start_up_lines(tmp_path):
    """``import dazoo`` and a first use of a network print none of TensorFlow's C++ start-up
    lines (oneDNN, the CUDA probe, absl), as the CLI does not (a user's TF_CPP_MIN_LOG_LEVEL
    below 3 brings them back)."""
    import subprocess
    import sys

    code = ("import dazoo\n"
            "net = dazoo.SegmentationNet((16, 16, 16), 3)\n"
            "print('params', net.count_params())\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "params" in result.stdout
    noise = [line for line in result.stderr.splitlines()
             if any(w in line for w in ("oneDNN", "cuda", "cuInit", "absl", "cpu_feature"))]
    assert noise == []


@pytest.mark.parametrize("case", ["missing input", "unknown preset", "output under a file",
                                  "unwritable folder", "kernel folder"])
def test_bad_paths_and_preset_names_are_refused_before_tensorflow_starts(tmp_path, case):
    """A missing input, an unknown preset or an output that cannot be written is a one-line
    error (exit 2, the user's path named) found before any work: here TensorFlow cannot even
    be imported (a stand-in module that raises), so the check must come first."""
    import subprocess
    import sys

    stand_in = tmp_path / "site"
    stand_in.mkdir()
    marker = tmp_path / "tensorflow-was-imported"
    (stand_in / "tensorflow.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                            "raise ImportError('tensorflow imported')\n")
    image = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), image)
    (tmp_path / "afile").write_text("not a folder")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    args = {"missing input": [str(tmp_path / "nosuch.nii.gz"), "-o", str(tmp_path / "out")],
            "unknown preset": [str(image), "-o", str(tmp_path / "out"), "--preset", "nosuch"],
            "output under a file": [str(image), "-o", str(tmp_path / "afile" / "seg.nii.gz")],
            "unwritable folder": [str(image), "-o", str(readonly / "seg.nii.gz")],
            "kernel folder": [str(image), "-o", "/proc/seg.nii.gz"]}[case]
    if case == "kernel folder" and not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    if case == "unwritable folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        readonly.chmod(0o500)
    env = {**os.environ, "PYTHONPATH": f"{stand_in}{os.pathsep}{os.getcwd()}"}
    try:
        result = subprocess.run([sys.executable, "-m", "dazoo", "segment", *args],
                                capture_output=True, text=True, env=env, timeout=120)
    finally:
        readonly.chmod(0o700)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("dazoo: error:"), result.stderr
    assert not marker.exists(), "TensorFlow was imported before the check"
    expected = {"missing input": "nosuch.nii.gz", "unknown preset": "nosuch",
                "output under a file": "is a file, not a folder",
                "unwritable folder": "cannot be written",
                "kernel folder": "/proc/seg.nii.gz: cannot be written"}[case]
    assert expected in lines[0]


def test_threads_option_sets_the_resampling_threads(monkeypatch, capsys):
    """``dazoo --threads N`` bounds dazoo.parallel's threads too (DAZOO_THREADS), not only
    TensorFlow's; without it the cores available are used."""
    from dazoo import cli
    from dazoo.parallel import slabs, workers

    monkeypatch.setenv("DAZOO_THREADS", "")  # restored (removed) after the test
    assert workers() >= 1
    assert cli.main(["--threads", "3", "list"]) == 0
    assert workers() == 3 and len(slabs(100)) == 6
    monkeypatch.setenv("DAZOO_THREADS", "1")
    assert slabs(100) == [(0, 100)] and slabs(10, at_most=3) == [(0, 2), (2, 5), (5, 7), (7, 10)]


def test_register_pairs_from_a_csv(preset_dir, scans, tmp_path, capsys):  # noqa: F811
    """``--pairs``: every pair of the CSV registered in one run (paths relative to the CSV),
    outputs named by the patterns' {moving} and {fixed}; each pair's results are the ones
    of a single-pair run."""
    (s0, l0), (s1, l1) = scans
    rel = lambda p: os.path.relpath(p, tmp_path)  # noqa: E731
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("moving,fixed,moving_labels,note\n"
                     f"{rel(s0)},{rel(s1)},{rel(l0)},first\n\n"
                     f"{rel(s1)},{rel(s0)},{rel(l1)},second\n")
    out = tmp_path / "out"
    assert main(["register", "--pairs", str(pairs), "--preset", str(preset_dir),
                 "--moved", f"{out}/{{moving}}_to_{{fixed}}.nii.gz",
                 "--moved-labels", f"{out}/{{moving}}_to_{{fixed}}_labels.nii.gz",
                 "--qc", str(tmp_path / "qc")]) == 0
    err = capsys.readouterr().err
    assert "[1/2] done in" in err and "[2/2] done in" in err
    assert sorted(os.listdir(out)) == ["s0_to_s1.nii.gz", "s0_to_s1_labels.nii.gz",
                                       "s1_to_s0.nii.gz", "s1_to_s0_labels.nii.gz"]
    assert sorted(os.listdir(tmp_path / "qc")) == ["s0_to_s1.png", "s1_to_s0.png"]
    single = tmp_path / "single"
    assert main(["register", s1, s0, "--preset", str(preset_dir), "--moving-labels", l1,
                 "--moved", str(single / "moved.nii.gz"),
                 "--moved-labels", str(single / "labels.nii.gz")]) == 0
    np.testing.assert_allclose(nib.load(out / "s1_to_s0.nii.gz").get_fdata(),
                               nib.load(single / "moved.nii.gz").get_fdata(),
                               rtol=1e-4, atol=1e-3)
    same = (np.asarray(nib.load(out / "s1_to_s0_labels.nii.gz").dataobj)
            == np.asarray(nib.load(single / "labels.nii.gz").dataobj))
    assert same.mean() > 0.999
    assert nib.load(out / "s1_to_s0.nii.gz").shape == nib.load(s0).shape


@pytest.mark.parametrize("case", ["columns", "clash", "positional", "no_labels", "pattern"])
def test_register_pairs_errors_are_one_line_before_any_work(scans, tmp_path, capsys,  # noqa: F811
                                                            case):
    (s0, l0), (s1, _) = scans
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("moving,fixed\n" f"{s0},{s1}\n" f"{s1},{s0}\n")
    moved = f"{tmp_path}/{{moving}}_to_{{fixed}}.nii.gz"
    argv, expected = {
        "columns": (["--moved", moved], "needs a header line with the columns moving and fixed"),
        "clash": (["--moved", str(tmp_path / "moved.nii.gz")], "would be written for two pairs"),
        "positional": ([s0, s1, "--moved", moved], "give no MOVING FIXED"),
        "no_labels": (["--moved-labels", moved], "needs a moving_labels for every pair"),
        "pattern": (["--moved", f"{tmp_path}/{{subject}}.nii.gz"], "its fields are {moving}"),
    }[case]
    if case == "columns":
        pairs.write_text("source,target\n" f"{s0},{s1}\n")
    assert main(["register", "--pairs", str(pairs), "--preset", "brain", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert sorted(os.listdir(tmp_path)) == ["pairs.csv"]


def test_register_pairs_go_on_past_a_missing_image(preset_dir, scans, tmp_path,  # noqa: F811
                                                   capsys):
    (s0, _), (s1, _) = scans
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("moving,fixed\n" f"{tmp_path / 'absent.nii.gz'},{s1}\n" f"{s1},{s0}\n")
    argv = ["register", "--pairs", str(pairs), "--preset", str(preset_dir),
            "--warp", f"{tmp_path}/w/{{moving}}_to_{{fixed}}.nii.gz"]
    assert main(argv) == 2
    assert "absent.nii.gz: no such file" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    assert main(argv + ["--continue-on-error"]) == 2
    err = capsys.readouterr().err
    assert "1 registered, 1 failed" in err
    assert os.listdir(tmp_path / "w") == ["s1_to_s0.nii.gz"]


def test_register_pairs_csv_quirks_and_single_pair_options(scans, tmp_path, capsys):  # noqa: F811
    """A trailing comma is an empty extra field, not a traceback; an error names the CSV's
    real line (blank lines counted); pairs-only options are refused for one pair."""
    (s0, _), (s1, _) = scans
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("moving,fixed\n" f"{s0},{s1},\n\n" f"{s1},\n")
    assert main(["register", "--pairs", str(pairs), "--preset", "brain",
                 "--moved", f"{tmp_path}/{{moving}}_to_{{fixed}}.nii.gz"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "line 4: needs both a moving and a fixed" in err
    assert main(["register", s0, s1, "--continue-on-error",
                 "--moved", str(tmp_path / "m.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "go with --pairs" in err
