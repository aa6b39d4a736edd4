"""benchmarks/bench_training.py's bookkeeping: ratios against the reference measured before
and after dazoo's configurations, and the class-count ratio (hand-made rows)."""
from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_training  # noqa: E402


def _reference(seconds, peak, when):
    return {"shape": "80x96x80", "reference": "voxelmorph-0.2", "classes": 5,
            "precision": "float32", "reference_step_s": seconds, "peak_rss_gib": peak,
            "when": when}


def _row(classes, joint, **extra):
    return {"shape": "80x96x80", "classes": classes, "precision": "float32",
            "segmenter": "default", "recompute": 0, "mode": "joint",
            "joint_step_s": joint, **extra}


def test_ratios_use_the_mean_of_the_reference_before_and_after():
    references = [_reference(2.0, 3.5, "start"), _reference(3.0, 3.9, "end"),
                  {"shape": "160x192x160", "reference": "voxelmorph-0.2",
                   "error": "killed (SIGKILL: out of memory)"}]
    measured = [_row(5, 3.0), _row(63, 4.5), _row(5, 2.0, mode="simultaneous"),
                _row(5, 1.0, shape="160x192x160"),
                {"shape": "160x192x160", "classes": 63, "precision": "float32",
                 "segmenter": "default", "inference_s": 7.0}]
    rows = bench_training._with_ratios(references, measured)
    reference = rows[0]
    assert reference["reference_step_s"] == pytest.approx(2.5)
    assert reference["reference_runs_s"] == [2.0, 3.0]
    assert reference["reference_drift"] == pytest.approx(1.5)
    assert reference["peak_rss_gib"] == 3.9
    assert rows[1]["error"].startswith("killed")
    five, sixty_three, simultaneous, large, inference = rows[2:]
    assert five["ratio"] == pytest.approx(3.0 / 2.5)
    assert sixty_three["ratio"] == pytest.approx(4.5 / 2.5)
    assert sixty_three["classes_ratio"] == pytest.approx(1.5)
    # the baseline rows themselves, and another mode (its own baseline), have none
    assert "classes_ratio" not in five and "classes_ratio" not in simultaneous
    assert simultaneous["ratio"] == pytest.approx(2.0 / 2.5)
    # no reference at that grid: no ratio
    assert "ratio" not in large and "ratio" not in inference
    assert "ratio" not in measured[0]  # the measured rows are not modified
    table = bench_training._table(rows)
    assert "| 2.50 (start 2.00, end 3.00) | 3.90 |" in table
    assert "| 80x96x80 | 63 | float32 | default | joint | - | - | 4.50 | 2.50 | 1.80 | 1.50 |" \
        in table


def test_degraded_scans_are_thick_along_one_axis_and_keep_their_background():
    import numpy as np

    import registration_sites

    rng = np.random.default_rng(0)
    scan = rng.uniform(50, 150, (30, 31, 32)).astype(np.float32)
    scan[:3] = 0
    for index in range(3):
        out = registration_sites.degrade(scan, index)
        assert out.shape == scan.shape and (out[:3] == 0).all() and (out[3:] > 0).all()
        # along the thick axis: linear between slice centres, only noise changes it fast
        rough = [np.abs(np.diff(out[4:], n=2, axis=a)).mean() for a in range(3)]
        thick = index % 3
        assert all(rough[thick] < 0.5 * rough[a] for a in range(3) if a != thick)
    np.testing.assert_array_equal(registration_sites.degrade(scan, 1),
                                  registration_sites.degrade(scan, 1))  # seeded


def test_registration_sites_summary_by_hand():
    import registration_sites

    def row(moving, fixed, dice, folding=0.0, seconds=1.0):
        return {"moving": moving, "fixed": fixed, "mean_dice": dice,
                "folding_fraction": folding, "seconds": seconds}

    results = {"cohort": {
        "network": [row("a", "b", 0.40), row("b", "a", 0.50)],
        "refined": [row("a", "b", 0.60, 0.001, 10.0), row("b", "a", 0.50, 0.0, 20.0)],
        "syn": [row("a", "b", 0.55, 0.0, 70.0), row("b", "a", 0.58, 0.0, 80.0)]}}
    table = registration_sites.summary_table(results)
    assert "| cohort | network | 2 | 0.450 (0.050) | 0.0000 (0.0000) | 1.0 |" in table
    assert "| cohort | refined | 2 | 0.550 (0.050) | 0.0500 (0.1000) | 15.0 |" in table
    assert "| cohort | syn | 2 | 0.565 (0.015) | 0.0000 (0.0000) | 75.0 |" in table
    assert "cohort: dazoo (refined) - SyN = -0.015 Dice over 2 pairs (1 pairs better)" in table
    assert "validation" not in table
    bare = registration_sites.summary_table(results, seconds=False)
    assert "| cohort | syn | 2 | 0.565 (0.015) | 0.0000 (0.0000) |\n" in bare
    assert "s / pair" not in bare and "75.0" not in bare
    card = registration_sites.card_text(results, "CMD", 62)
    assert "mean over the preset's 62 labelled structures" in card
    assert "| cohort | refined | 2 | 0.550 (0.050) | 0.0500 (0.1000) |" in card
    assert card.endswith("`CMD`")
    card = registration_sites.card_text(results, "CMD", 62, group="cortex")
    assert "mean over the preset's 62 structures of its cortex group" in card


def test_registration_sites_scores_one_group_of_a_whole_brain_table():
    import types

    import pytest

    import registration_sites
    from dazoo.labels import table_groups

    classes = [{"id": 0, "name": "background"}, {"id": 2, "name": "Left-Cerebral-White-Matter"},
               {"id": 17, "name": "Left-Hippocampus"}, {"id": 1002, "name": "ctx-lh-caudalanteriorcingulate"},
               {"id": 2002, "name": "ctx-rh-caudalanteriorcingulate"}]
    pipeline = types.SimpleNamespace(class_ids=[c["id"] for c in classes], preset="p",
                                     label_groups=table_groups(classes))
    assert registration_sites.group_ids(pipeline, None) == [2, 17, 1002, 2002]
    assert registration_sites.group_ids(pipeline, "cortex") == [1002, 2002]
    with pytest.raises(SystemExit, match="no structure group 'cerebellum'"):
        registration_sites.group_ids(pipeline, "cerebellum")
    per_id = {2: 0.9, 17: 0.8, 1002: 0.5, 2002: float("nan")}   # 2002 absent from both maps
    assert registration_sites._group_mean(per_id, [1002, 2002]) == 0.5
    assert abs(registration_sites._group_mean(per_id, [2, 17, 1002]) - 0.7333333) < 1e-6


def test_resliced_scans_are_coronal_anisotropic_with_a_corner_origin():
    import nibabel as nib
    import numpy as np

    import registration_sites
    from dazoo.io import Volume

    affine = np.array([[0, 0, -1.0, 80], [1.0, 0, 0, -128], [0, 1.0, 0, -128], [0, 0, 0, 1]])
    labels = np.zeros((60, 50, 40), np.int16)
    labels[20:40, 10:30, 5:25] = 17            # a 20 x 20 x 20 mm box
    image = Volume(labels.astype(np.float32) * 5, affine, None)
    volume, resliced = registration_sites.reslice(image, labels)
    assert nib.aff2axcodes(volume.affine) == ("L", "I", "A")
    np.testing.assert_allclose(volume.affine[:3, 3], 0.0)
    np.testing.assert_allclose(np.sqrt((volume.affine[:3, :3] ** 2).sum(0)), [0.86, 0.86, 1.5])
    voxel = 0.86 * 0.86 * 1.5
    assert abs((resliced == 17).sum() * voxel - 8000) < 0.08 * 8000  # the box's 8 mL
    assert volume.shape == resliced.shape and volume.array.max() > 0


def test_syn_runs_resume_per_pair(monkeypatch):
    """``run_syn`` skips the pairs already measured, keeps their rows and saves after every
    new pair (a stand-in ``ants`` module that leaves the moving labels where they are, so
    Dice is the plain overlap of the two label maps, computed here by hand)."""
    import types

    import nibabel as nib
    import numpy as np

    import registration_sites
    from dazoo.io import Volume

    class Image:
        def __init__(self, path):
            self.array = np.asarray(nib.load(path).dataobj)

        def numpy(self):
            return self.array

    calls = []
    fake = types.ModuleType("ants")
    fake.image_read = Image
    fake.registration = lambda fixed, moving, type_of_transform: (
        calls.append(type_of_transform) or {"fwdtransforms": ["warp"]})
    fake.apply_transforms = lambda fixed, moving, transformlist, interpolator: moving
    fake.create_jacobian_determinant_image = lambda fixed, transform: types.SimpleNamespace(
        numpy=lambda: np.ones(fixed.array.shape))
    monkeypatch.setitem(sys.modules, "ants", fake)

    a = np.zeros((12, 12, 12), np.int16)
    a[2:8, 2:8, 2:8] = 1                          # 216 voxels
    b = np.zeros_like(a)
    b[4:10, 2:8, 2:8] = 1                         # 216 voxels, 144 shared
    cases = [(name, Volume(labels.astype(np.float32), np.eye(4), None), labels)
             for name, labels in (("a", a), ("b", b))]
    done = [{"moving": "a", "fixed": "b", "mean_dice": 0.123, "folding_fraction": 0.0,
             "seconds": 1.0, "mean_merged_dice": 0.123}]
    saved = []
    rows = registration_sites.run_syn(cases, [(0, 1), (1, 0)], [1], done=done,
                                      save=lambda rows: saved.append(len(rows)))
    assert calls == ["SyN"] and saved == [2]          # only the missing pair (b onto a) ran
    assert rows[0] == done[0]
    assert (rows[1]["moving"], rows[1]["fixed"]) == ("b", "a")
    assert rows[1]["mean_dice"] == pytest.approx(2 * 144 / (216 + 216))
    assert rows[1]["folding_fraction"] == 0.0
    assert registration_sites.run_syn(cases, [(0, 1)], [1], done=done) == done


def test_reslice_motion_is_where_the_anatomy_went():
    """The world motion of a resliced scan, checked on a labelled box: its centre in the
    copy's world is the motion applied to its centre in the original's world."""
    import numpy as np

    import registration_sites
    from dazoo.io import Volume

    affine = np.array([[1.0, 0, 0, -40], [0, 1.0, 0, -60], [0, 0, 1.0, -30], [0, 0, 0, 1]])
    labels = np.zeros((50, 60, 40), np.int16)
    labels[10:20, 30:40, 5:15] = 1
    volume, resliced = registration_sites.reslice(Volume(labels * 1.0, affine, None), labels)
    motion = registration_sites.reslice_motion(Volume(labels * 1.0, affine, None))

    def centre(array, affine):
        return affine[:3, :3] @ np.argwhere(array == 1).mean(0) + affine[:3, 3]

    expected = motion[:3, :3] @ centre(labels, affine) + motion[:3, 3]
    np.testing.assert_allclose(centre(resliced, volume.affine), expected, atol=0.5)
    assert np.linalg.norm(motion[:3, 3]) > 50            # the anatomy moved far


def test_conv_backends_benchmark_prints_one_line_per_backend_and_the_ratio(capsys):
    """benchmarks/bench_conv_backends.py on a tiny volume: a timing line per backend (each in
    its own process), a failing backend reported as a line, and the ratio to the first."""
    import json

    import bench_conv_backends

    pytest.importorskip("torch")
    assert bench_conv_backends.main(["--backends", "tensorflow,torch,nonesuch", "--shape",
                                     "6x6x6", "--channels", "2", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in lines[:3]]
    assert [r["backend"] for r in rows] == ["tensorflow", "torch", "nonesuch"]
    assert all(r["seconds_per_pass"] > 0 and r["shape"] == [6, 6, 6] for r in rows[:2])
    assert "unknown backend" in rows[2]["error"]
    ratio = rows[1]["seconds_per_pass"] / rows[0]["seconds_per_pass"]
    assert lines[3] == f"torch: {ratio:.2f}x tensorflow's time"

    # Several precisions: every backend in each, labelled by both.
    assert bench_conv_backends.main(["--backends", "tensorflow", "--precisions",
                                     "float32,mixed_bfloat16", "--shape", "6x6x6",
                                     "--channels", "2", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in lines[:2]]
    assert [r["precision"] for r in rows] == ["float32", "mixed_bfloat16"]
    ratio = rows[1]["seconds_per_pass"] / rows[0]["seconds_per_pass"]
    assert lines[2] == (f"tensorflow mixed_bfloat16: {ratio:.2f}x tensorflow float32's time")


def test_label_protocol_shares_ratios_and_dice_bound_by_hand(tmp_path, capsys):
    import json

    import nibabel as nib
    import numpy as np

    import label_protocol

    # reference maps: 100 labelled voxels, structure 26 of 10 and 12 voxels, cortex 40;
    # other maps: structure 26 of 5 and 6 (half), cortex 40
    def volume(n26, n_cortex=40, total=100):
        a = np.zeros(200, np.int16)
        a[:n26] = 26
        a[n26:n26 + n_cortex // 2] = 1003
        a[n26 + n_cortex // 2:n26 + n_cortex] = 2003
        a[n26 + n_cortex:total] = 2                       # white matter fills the rest
        return a.reshape(4, 5, 10)

    for folder, counts in (("ref", (10, 12)), ("other", (5, 6))):
        (tmp_path / folder).mkdir()
        for i, n in enumerate(counts):
            nib.save(nib.Nifti1Image(volume(n), np.eye(4)), str(tmp_path / folder / f"{i}.nii.gz"))
    table = [{"id": 0, "name": "background"}, {"id": 2, "name": "WM"},
             {"id": 26, "name": "Left-Accumbens-area"}, {"id": 1003, "name": "ctx-lh-x"},
             {"id": 2003, "name": "ctx-rh-x"}]
    (tmp_path / "labels.json").write_text(json.dumps({"classes": table}))

    names = label_protocol.structures(table)
    assert names == {2: "WM", 26: "Left-Accumbens-area", "cortex": "cortex (all parcels)"}
    assert label_protocol.shares(volume(10), names) == {2: 500.0, 26: 100.0, "cortex": 400.0}
    assert label_protocol.dice_bound(0.5) == pytest.approx(2 * 0.5 / 1.5)
    assert label_protocol.dice_bound(2.0) == pytest.approx(2 * 0.5 / 1.5)
    assert label_protocol.dice_bound(0.0) == 0.0

    out = tmp_path / "table.md"
    code = label_protocol.main(["--labels", str(tmp_path / "labels.json"),
                                "--set", f"ref={tmp_path}/ref/*.nii.gz",
                                "--set", f"other={tmp_path}/other/*.nii.gz", "--out", str(out)])
    assert code == 0
    text = out.read_text()
    assert capsys.readouterr().out == text
    # accumbens: reference 100 and 120 per mille (mean 110, sd 10), other 50 and 60 (55):
    # ratio 0.5, z = (55 - 110) / 10, bound 2/3; cortex 400 both: ratio 1, z 0 (sd 0: nan)
    assert ("| Left-Accumbens-area | 110.00 ± 10.00 | 55.00 ± 5.00 | 0.50 | -5.5 | 0.67 |"
            in text)
    assert "| cortex (all parcels) | 400.00 ± 0.00 | 400.00 ± 0.00 | 1.00 | +nan | 1.00 |" in text
    assert label_protocol.main(["--labels", str(tmp_path / "labels.json"),
                                "--set", f"none={tmp_path}/missing/*.nii.gz"]) == 2
