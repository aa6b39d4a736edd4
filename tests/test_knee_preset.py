"""The shipped ``knee`` preset (version 3, issue 25): OAI-ZIB's label table, and on the one real
DESS scan (unlabelled, ``../shared/data/knee-dess``; skipped without it) what the issue asks
of it: output on the scan's own grid, bones whole inside the field of view, cartilage plates
continuous, volumes of a knee. Thresholds come from anatomy, not from a measured run."""
import importlib.util
import pathlib

import numpy as np
import pytest
from scipy import ndimage

DESS = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "knee-dess"
        / "dess_echo1.nii.gz")
OAI_ZIB = {1: "femur", 2: "femoral cartilage", 3: "tibia", 4: "tibial cartilage",
           5: "patella", 6: "patellar cartilage"}


def test_knee_preset_is_version_3_with_oai_zib_ids():
    from dazoo.presets import get_preset

    preset = get_preset("knee")
    preset.verify()
    assert preset.metadata["version"] == "3"
    classes = preset.read_json("labels.json")["classes"]
    assert {c["id"]: c["name"].lower() for c in classes if c["id"]} == OAI_ZIB


def _evaluate_v2():
    """examples/knee/evaluate_v2.py (its helpers are tested in test_examples.py)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "knee" / "evaluate_v2.py"
    spec = importlib.util.spec_from_file_location("knee_evaluate_v2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reach_mm(mask, affine, end):
    """mm from the mask's most superior ("top") / inferior voxel to that edge of the field of
    view: examples/knee/evaluate_v2.py's ``bone_reach_mm``."""
    return _evaluate_v2().bone_reach_mm(mask.astype(np.uint8), affine, 1, end)


def _largest_pieces_fraction(mask, pieces):
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    sizes = np.sort(np.bincount(components.ravel())[1:])[::-1]
    return sizes[:pieces].sum() / sizes.sum() if count else 0.0


@pytest.fixture(scope="module")
def dess():
    if not DESS.is_file():
        pytest.skip("needs ../shared/data/knee-dess")
    import dazoo
    from dazoo import io

    result = dazoo.load("knee").segment(DESS)
    return io.read_image(DESS), result


def test_knee_preset_on_the_real_dess_scan(dess):
    image, result = dess
    labels, affine = np.asarray(result.labels.array), result.labels.affine
    assert labels.shape == image.array.shape[:3]
    np.testing.assert_allclose(affine, image.affine, atol=1e-4)
    assert not result.warnings
    ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    volumes = {name: (labels == i).sum() * ml for i, name in OAI_ZIB.items()}
    # The tibia runs out of the field of view's bottom: labelled to its edge (version 1's box
    # stopped 8 mm short), i.e. within two voxels of the model grid.
    assert _reach_mm(labels == 3, affine, "bottom") <= 3.0
    assert volumes["femur"] > 60 and volumes["tibia"] > 40 and 5 < volumes["patella"] < 40
    # Cartilage of an adult knee (OAI-ZIB's ranges are roughly femoral 8-25 mL, tibial 3-10,
    # patellar 2-8), as continuous plates: femoral and patellar one piece, tibial two
    # (medial and lateral), holding nearly all of each label's voxels.
    assert 5 < volumes["femoral cartilage"] < 30
    assert 1.5 < volumes["tibial cartilage"] < 15
    assert 1 < volumes["patellar cartilage"] < 12
    assert _largest_pieces_fraction(labels == 2, 1) > 0.9
    assert _largest_pieces_fraction(labels == 4, 2) > 0.9
    assert _largest_pieces_fraction(labels == 6, 1) > 0.9


def _edge_fraction(mask, affine, end, depth_mm=20.0):
    """The mask's cross-section in the plane 1 mm inside the field of view's ``end`` ("top" or
    "bottom") edge, as a fraction of its cross-section ``depth_mm`` further in: ~1 for a bone
    that runs out of the field of view, 0 for one whose labels stop or taper before it."""
    axis, up, spacing = _evaluate_v2().si_axis(affine)
    n = mask.shape[axis]
    near, far = round(1.0 / spacing), round((1.0 + depth_mm) / spacing)
    if (end == "top") == up:
        near, far = n - 1 - near, n - 1 - far
    area = mask.sum(axis=tuple(a for a in range(3) if a != axis))
    return area[near] / max(int(area[far]), 1)


def test_edge_fraction_of_a_bone_running_out_and_one_stopping_short():
    affine = np.diag([1.5, 0.5, 0.5, 1.0])             # the third voxel axis runs superior
    shaft = np.zeros((8, 8, 100), bool)
    shaft[2:6, 2:6, 30:] = True                         # runs out of the top edge
    assert _edge_fraction(shaft, affine, "top") == 1.0
    assert _edge_fraction(shaft, affine, "bottom") == 0.0
    tapered = shaft.copy()
    tapered[:, :, 94:] = False                          # stops 3 mm below the top edge
    tapered[3:5, 3:5, 90:94] = True
    assert _edge_fraction(tapered, affine, "top") == 0.0
    flipped = np.flip(shaft, 2)                         # the same bone, index running inferior
    assert _edge_fraction(flipped, np.diag([1.5, 0.5, -0.5, 1.0]), "top") == 1.0


@pytest.mark.xfail(strict=True, reason="issue 25, open: on this scan (160 mm field of view) "
                   "version 3 labels the femoral shaft to 3.1 mm below the top edge (version 2: "
                   "25 mm), narrowing over its last ~3 mm like a bone's end instead of running out "
                   "of the field of view")
def test_knee_preset_labels_the_femur_to_the_top_of_the_field_of_view(dess):
    _, result = dess
    labels, affine = np.asarray(result.labels.array), result.labels.affine
    assert _reach_mm(labels == 1, affine, "top") <= 3.0
    # The shaft runs out of the field of view: its cross-section at the edge is not a taper.
    assert _edge_fraction(labels == 1, affine, "top") > 0.5
