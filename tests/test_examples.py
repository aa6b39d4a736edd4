"""The example scripts run as their --help says (on the tiny test preset and synthetic scans)."""
import csv
import importlib.util
import os
import pathlib

import nibabel as nib
import numpy as np
import pytest

from test_pipeline import IDS, preset_dir, scans  # noqa: F401  (fixtures)

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _script(name):
    spec = importlib.util.spec_from_file_location(name.replace("/", "_"), EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["segment_folder.py", "register_and_warp.py",
                                  "qc_pictures.py", "train_your_own.py",
                                  "finetune_on_your_cohort.py", "knee/evaluate.py",
                                  "knee/evaluate_folder.py"])
def test_every_example_has_help(name, capsys):
    with pytest.raises(SystemExit) as done:
        _script(name).main(["--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_segment_folder_register_and_warp_and_qc_examples(preset_dir, scans, tmp_path):  # noqa: F811
    folder = tmp_path / "scans"
    folder.mkdir()
    for n, (image, _) in enumerate(scans):
        os.symlink(image, folder / f"s{n}.nii.gz")
    table = tmp_path / "v.csv"
    assert _script("segment_folder.py").main([str(folder), "-o", str(tmp_path / "segs"),
                                              "--preset", str(preset_dir),
                                              "--volumes", str(table)]) == 0
    rows = list(csv.reader(table.open()))
    assert len(rows) == 3 and len(rows[0]) == len(IDS)

    (moving, labels), (fixed, _) = scans
    out = tmp_path / "reg"
    assert _script("register_and_warp.py").main(
        [moving, fixed, "-o", str(out), "--also", moving, "--labels", labels,
         "--preset", str(preset_dir)]) == 0
    np.testing.assert_allclose(nib.load(out / "s0_moved.nii.gz").get_fdata(),
                               nib.load(out / "moved.nii.gz").get_fdata(), atol=1e-4)
    moved_labels = np.asarray(nib.load(out / "s0_labels_moved.nii.gz").dataobj)
    assert set(np.unique(moved_labels)) <= set(IDS)

    assert _script("qc_pictures.py").main([moving, "--fixed", fixed, "-o", str(tmp_path / "qc"),
                                           "--preset", str(preset_dir)]) == 0
    assert sorted(os.listdir(tmp_path / "qc")) == ["s0_seg.png", "s0_to_s1.png"]


def test_train_your_own_example_trains_and_exports(tmp_path):
    from dazoo import io
    from dazoo.synthetic import make_subjects

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    rows = []
    for n, (image, labels) in enumerate(make_subjects(3, (32, 32, 32), num_classes=3, seed=1)):
        io.write_image((image, affine), tmp_path / f"s{n}.nii.gz")
        io.write_labels((labels.astype(np.int16) * 10, affine), tmp_path / f"s{n}_seg.nii.gz")
        rows.append(f"s{n}.nii.gz,s{n}_seg.nii.gz")
    (tmp_path / "cohort.csv").write_text("image,labels\n" + "\n".join(rows) + "\n")
    out = tmp_path / "mine"
    assert _script("train_your_own.py").main(
        ["--data", str(tmp_path / "cohort.csv"), "--ids", "10,20", "-o", str(out),
         "--labelled", "1", "--steps", "4", "--checkpoint-every", "2", "--shape", "32,32,32",
         "--template", "none"]) == 0
    from dazoo.presets import get_preset

    preset = get_preset(out)
    preset.verify()
    names = [c["id"] for c in preset.read_json("labels.json")["classes"]]
    assert names == [0, 10, 20]


@pytest.mark.parametrize("spacing, tilt", [((1.0, 1.0, 1.0), False), ((0.4, 0.4, 0.7), False),
                                           ((0.5, 0.5, 0.5), True)])
def test_knee_cartilage_thickness_of_known_plates(spacing, tilt):
    """A bone block under a cartilage plate of known thickness (2.5 mm), flat or tilted by
    30 degrees: the mean thickness from the bone interface is within half a voxel."""
    knee = _script("knee/evaluate_folder.py")
    shape = (60, 60, 60)
    grid = np.indices(shape).astype(float) * np.array(spacing)[:, None, None, None]
    height = grid[2] - (np.tan(np.radians(30)) * grid[0] if tilt else 0) - 8.0
    normal = np.cos(np.radians(30)) if tilt else 1.0  # the plate's thickness along z
    labels = np.zeros(shape, np.int16)
    labels[height < 0] = 3  # tibia
    labels[(height >= 0) & (height < 2.5 / normal)] = 4  # tibial cartilage, 2.5 mm thick
    affine = np.diag([*spacing, 1.0])
    got = knee.measures(labels, affine)
    assert got["tibial thickness mm"] == pytest.approx(2.5, abs=0.5 * max(spacing) + 0.1)
    expected_ml = (labels == 4).sum() * np.prod(spacing) / 1000
    assert got["tibial volume mL"] == pytest.approx(expected_ml)
    assert np.isnan(got["femoral thickness mm"])  # no femoral plate
    assert knee.dice(labels, labels, 4) == 1.0 and np.isnan(knee.dice(labels, labels, 6))


def test_knee_v2_evaluation_helpers():
    """How far a bone reaches towards the field of view's edges, on the scan's own S-I axis
    (a sagittal grid: voxel axis 2 is S-I here, flipped in the second affine)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "knee" / "evaluate_v2.py"
    spec = importlib.util.spec_from_file_location("knee_evaluate_v2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    labels = np.zeros((4, 5, 20), np.int16)
    labels[:, :, 3:12] = 1   # femur: voxels 3..11 along S-I
    labels[:, :, 14:] = 3
    affine = np.diag([0.7, 0.4, 0.5, 1.0])
    assert module.bone_reach_mm(labels, affine, 1, "top") == pytest.approx((19 - 11) * 0.5)
    assert module.bone_reach_mm(labels, affine, 1, "bottom") == pytest.approx(3 * 0.5)
    assert module.bone_reach_mm(labels, affine, 3, "top") == 0.0
    flipped = affine.copy()
    flipped[2, 2] = -0.5  # index increases inferiorly: the ends swap
    assert module.bone_reach_mm(labels, flipped, 1, "top") == pytest.approx(3 * 0.5)
    assert np.isnan(module.bone_reach_mm(labels, affine, 5, "top"))
    assert module.subject_of("OAI_AKOA_9271853_96m") == "OAI_AKOA_9271853"
    assert module.subject_of("OAI_ZIB-UQ_9001104") == "OAI_ZIB-UQ_9001104"


def test_knee_crop_check_keeps_world_positions():
    """Rows removed at the top or bottom of a scan's S-I axis: the array loses them, the
    affine shifts so every kept voxel stays where it was in the world (both index directions)."""
    from dazoo import io

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "knee" / "crop_check.py"
    spec = importlib.util.spec_from_file_location("knee_crop_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    array = np.arange(4 * 20 * 5, dtype=np.float32).reshape(4, 20, 5)
    for sign in (1.0, -1.0):  # voxel axis 1 runs superior (+) or inferior (-)
        affine = np.array([[0, 0, 1.5, 3], [0.3, 0, 0, -7], [0, 0.5 * sign, 0, 11], [0, 0, 0, 1]])
        volume = io.Volume(array, affine, None)
        for end in ("top", "bottom"):
            out = module.cropped(volume, 6, end)
            assert out.array.shape == (4, 14, 5)
            world = lambda a, ijk: (a @ np.append(ijk, 1.0))[:3]  # noqa: E731
            kept = np.flatnonzero(np.isin(array[0, :, 0], out.array[0, :, 0]))
            assert len(kept) == 14
            for new_j, old_j in enumerate(kept):
                np.testing.assert_allclose(world(out.affine, (2, new_j, 1)),
                                           world(affine, (2, old_j, 1)))
            z = [world(affine, (0, j, 0))[2] for j in kept]
            dropped = [world(affine, (0, j, 0))[2] for j in range(20) if j not in kept]
            # the removed rows are the superior ones for "top", the inferior for "bottom"
            assert (min(dropped) > max(z)) if end == "top" else (max(dropped) < min(z))


def test_knee_v2_card_sections_carry_the_measured_numbers():
    """The card's sections hold the results' numbers, the targets' verdicts, refinement rows
    only when refinement changed something, and no section for a part that was not run."""
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "knee" / "evaluate_v2.py"
    spec = importlib.util.spec_from_file_location("knee_evaluate_v2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = list(module.NAMES.values())
    mean = {name: 0.5 + 0.05 * k for k, name in enumerate(names)}
    mean["femur"] = 0.975  # above its 0.97 target
    seg = {"per_subject": {"a": {}, "b": {}}, "mean": mean,
           "min": {name: v - 0.1 for name, v in mean.items()}, "seconds": 3.0,
           "targets": {name: {"target": module.TARGETS[i], "reached": mean[name] >= module.TARGETS[i]}
                       for i, name in module.NAMES.items()}}
    (title, text), = module.card_sections({"segmentation": seg}, "CMD")
    assert title == "Held-out OAI label maps" and "2 held-out" in text and text.endswith("`CMD`")
    assert "| femur | 0.975 | 0.875 | 0.97 | yes |" in text
    assert "| tibia | 0.600 | 0.500 | 0.97 | no |" in text
    stage = {name: 0.25 for name in names} | {"mean": 0.25}
    moved = {name: 0.5 for name in names} | {"mean": 0.5}
    summary = {"two subjects": {"pairs": 2, "before": stage, "network": moved, "refined": moved,
                                "folding_max_percent": 0.01}}
    (_, text), = module.card_sections({"registration": {"summary": summary}}, "CMD")
    assert "| two subjects | 2 | deformable | " + " | ".join(["0.500"] * 7) + " |" in text
    assert "refinement" not in text and "two subjects 0.0100 %" in text
    summary["two subjects"]["refined"] = {name: 0.6 for name in names} | {"mean": 0.6}
    (_, text), = module.card_sections({"registration": {"summary": summary}}, "CMD")
    assert "| two subjects | 2 | deformable, refined (segmenter-guided) | " + " | ".join(["0.600"] * 7) in text
    assert text.startswith("Every ordered pair")
    (_, text), = module.card_sections(
        {"registration": {"summary": summary, "of": 72, "every": 3}}, "CMD")
    assert text.startswith("2 of the 72 ordered pairs of the held-out images (one in 3)")
    assert module.card_sections({}, "CMD") == []
    dess = {"segment_seconds": 2.0, "volumes_ml": {name: 10.0 + k for k, name in enumerate(names)},
            "left_knee_agreement": {name: 0.9 for name in names}, "femur_to_top_edge_mm": 2.5,
            "tibia_to_bottom_edge_mm": 0.0, "confidence": 0.95, "warnings": [],
            "cartilage": {f"{p} {m}": 2.0 for p in ("femoral", "tibial", "patellar")
                          for m in ("volume mL", "thickness mm")}}
    (title, text), = module.card_sections({"dess": dess}, "CMD")
    assert "| tibia | 12.00 | 0.900 |" in text and "2.5 mm from the field of view's top" in text
    assert "![" not in text  # no picture in the preset: no link
    (title, text), = module.card_sections({"dess": dess}, "CMD", picture="qc.png")
    assert "![DESS segmentation](qc.png)" in text
    assert "network alone" not in text
    dess["left_knee_agreement_network_alone"] = {name: 0.8 for name in names}
    (title, text), = module.card_sections({"dess": dess}, "CMD")
    assert "| tibia | 12.00 | 0.900 | 0.800 |" in text and "by construction" in text
    ext = {"mean": {name: 0.9 for name in names}, "short_mm_max": {"femur top": 39.5,
                                                                  "tibia bottom": 0.7}}
    short = {"a_ext": {"femur top": 39.5, "tibia bottom": 0.0},
             "b_ext": {"femur top": 1.0, "tibia bottom": 0.7}, "a": {"femur top": 9.0,
                                                                     "tibia bottom": 0.0}}
    (title, text), = module.card_sections({"segmentation_extended": ext, "short_mm": short},
                                          "CMD")
    assert title == "Held-out maps with their shafts continued" and "same 2 held-out" in text
    assert "1 of 2 (at most 39.5 mm" in text and "| patella | 0.900 |" in text
