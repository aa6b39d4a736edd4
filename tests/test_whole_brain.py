"""A whole-brain label table (DKT31 cortex + aseg structures): structure groups, the
``nearest`` relabelling, evaluation per group, volumes per group, the QC legend, flips."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import scipy.ndimage as ndi

from dazoo.labels import (BRAIN_GROUPS, DKT31_CORTEX, FREESURFER_LUT, WHOLE_BRAIN_ASEG,
                          LabelMap, freesurfer_group, label_groups, mirror_id, table_groups)

WHOLE_BRAIN = sorted(DKT31_CORTEX + WHOLE_BRAIN_ASEG)
NAMES = {i: FREESURFER_LUT[i][0] for i in WHOLE_BRAIN}


def test_the_protocol_is_dkt31_and_synthsegs_structures():
    assert len(DKT31_CORTEX) == 62 and len(WHOLE_BRAIN_ASEG) == 30
    assert {1001, 1004, 1032, 1033, 2001, 2004, 2032, 2033}.isdisjoint(DKT31_CORTEX)
    assert set(WHOLE_BRAIN_ASEG) <= set(FREESURFER_LUT)  # every aseg id has a name/colour
    groups = label_groups(NAMES)
    assert set(groups) == set(WHOLE_BRAIN)  # every structure in one group
    assert [g for g in BRAIN_GROUPS if g in groups.values()] == list(BRAIN_GROUPS)
    assert groups[1035] == groups[2002] == "cortex"
    assert groups[17] == groups[53] == groups[10] == groups[28] == "subcortical grey matter"
    assert groups[4] == groups[14] == groups[24] == "ventricles and CSF"
    assert groups[2] == groups[41] == "white matter"
    assert groups[8] == groups[46] == "cerebellum" and groups[16] == "brainstem"


def test_groups_only_for_freesurfer_names():
    """A knee's ids 1-6 are not FreeSurfer's structures: no groups; explicit table groups win."""
    knee = {1: "femur", 2: "femoral cartilage", 3: "tibia", 4: "tibial cartilage"}
    assert label_groups(knee) == {}
    assert freesurfer_group(2) == "white matter"  # the id alone would say so
    assert label_groups({17: "Left-Hippocampus", 1002: "ctx-lh-caudalanteriorcingulate",
                         53: "right hippocampus"}) == {17: "subcortical grey matter",
                                                      1002: "cortex",
                                                      53: "subcortical grey matter"}
    table = [{"class": 0, "id": 0, "name": "background"},
             {"class": 1, "id": 1, "name": "femur", "group": "bone"},
             {"class": 2, "id": 2, "name": "femoral cartilage", "group": "cartilage"}]
    assert table_groups(table) == {1: "bone", 2: "cartilage"}
    assert LabelMap.from_table(table).to_table() == table


def test_label_map_writes_groups_into_the_table():
    table = LabelMap(WHOLE_BRAIN, names=NAMES).to_table()
    assert len(table) == 93
    assert {r["group"] for r in table[1:]} == set(BRAIN_GROUPS)
    assert LabelMap.from_table(table).to_table() == table


def test_flip_maps_the_whole_brain_table_onto_itself():
    """Every id's left/right twin is in the table, twice is the identity, midline ids stay."""
    table = set(WHOLE_BRAIN)
    for i in WHOLE_BRAIN:
        assert mirror_id(i) in table and mirror_id(mirror_id(i)) == i
    assert [mirror_id(i) for i in (14, 15, 16, 24)] == [14, 15, 16, 24]
    assert mirror_id(17) == 53 and mirror_id(2) == 41 and mirror_id(28) == 60
    sided = [i for i in WHOLE_BRAIN if mirror_id(i) != i]
    assert len(sided) == 62 + 26


def _brute_nearest(array, nearest_ids):
    """The distance from each relabelled voxel to the nearest kept non-zero voxel."""
    donors = (array != 0) & ~np.isin(array, nearest_ids)
    return ndi.distance_transform_edt(~donors), donors


@pytest.mark.parametrize("far", [False, True])
def test_nearest_relabelling_takes_the_nearest_kept_structure(far):
    from dazoo.training.subjects import NEAREST, relabelled

    rng = np.random.default_rng(3)
    array = rng.integers(1, 4, (40, 36, 30)).astype(np.int32)
    array = ndi.median_filter(array, 5)
    holes = ndi.uniform_filter(rng.random(array.shape), 4) > 0.56
    array[holes] = 9
    array[:4] = 0
    if far:  # a hole far from every donor: the search box has to grow
        array[:] = 0
        array[2:5, 2:5, 2:5] = 9
        array[35:38, 30:33, 25:28] = 2
        array[36, 31, 26] = 3
    out = relabelled(array, {9: NEAREST, 1: 5})
    assert not np.isin(out, [9, NEAREST]).any()
    kept = np.where(array == 1, 5, array)
    np.testing.assert_array_equal(out[array != 9], kept[array != 9])
    distance, donors = _brute_nearest(array, [9])
    # every relabelled voxel took an id found at the nearest donor distance
    for point in np.argwhere(array == 9)[:: 7]:
        d = distance[tuple(point)]
        grid = np.indices(array.shape).reshape(3, -1).T
        near = np.abs(np.sqrt(((grid - point) ** 2).sum(1)) - d) < 1e-6
        candidates = set(kept.reshape(-1)[near & donors.reshape(-1)].tolist())
        assert out[tuple(point)] in candidates
    assert relabelled(np.zeros((3, 3, 3), int) + 9 * np.eye(3, dtype=int)[None],
                      {9: NEAREST}).max() == 0  # no donor anywhere: background


def test_label_map_entries_accept_nearest(tmp_path):
    import nibabel as nib

    from dazoo.errors import DazooInputError
    from dazoo.training.subjects import NEAREST, find_label_maps

    path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4)), path)
    (subject,) = find_label_maps({"path": str(path), "relabel": {"1000": "nearest", "31": 4}})
    assert subject.relabel == ((31, 4), (1000, NEAREST))
    with pytest.raises(DazooInputError, match="nearest"):
        find_label_maps({"path": str(path), "relabel": {"1000": "closest"}})
    with pytest.raises(DazooInputError, match=">= 0"):
        find_label_maps({"path": str(path), "relabel": {"1000": -5}})


def test_scores_per_structure_group_by_hand():
    from dazoo.evaluate import NON_CORTICAL, score_labels, summarise

    truth = np.array([1002] * 4 + [2002] * 4 + [17] * 4 + [4] * 2 + [0] * 2)
    pred = np.array([1002] * 4 + [2002] * 2 + [0] * 2 + [17] * 2 + [53] * 2 + [4] * 2 + [0] * 2)
    ids = [1002, 2002, 17, 53, 4]
    groups = label_groups({i: FREESURFER_LUT[i][0] for i in ids})
    scores = score_labels(truth, pred, ids, groups)
    d = {1002: 1.0, 2002: 2 * 2 / 6, 17: 2 * 2 / 6, 53: 0.0, 4: 1.0}
    for i, value in d.items():
        assert scores["dice"][i] == pytest.approx(value)
    assert scores["group_dice"]["cortex"] == pytest.approx((1 + 2 / 3) / 2)
    assert scores["group_dice"]["subcortical grey matter"] == pytest.approx((2 / 3 + 0) / 2)
    assert scores["group_dice"]["ventricles and CSF"] == pytest.approx(1.0)
    assert scores["group_dice"][NON_CORTICAL] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert list(scores["group_dice"])[:3] == ["cortex", "subcortical grey matter",
                                              "ventricles and CSF"]
    assert "group_dice" not in score_labels(truth, pred, ids)
    summary = summarise([{**scores, "seconds": 1.0}, {**scores, "seconds": 3.0}])
    assert summary["group_dice"][NON_CORTICAL] == pytest.approx((2 / 3 + 1) / 3)


def test_volumes_table_has_group_totals(tmp_path):
    from dazoo.cli import _write_volumes

    names = {17: "Left-Hippocampus", 53: "Right-Hippocampus", 1002: "ctx-lh-cuneus",
             2002: "ctx-rh-caudalanteriorcingulate"}  # 1002 misnamed: no group for it
    groups = label_groups(names)
    rows = [{"image": "a.nii", "volumes": {17: 3000.0, 53: 3100.5, 1002: 10.0, 2002: 20.0}}]
    path = tmp_path / "v.csv"
    _write_volumes(str(path), rows, names, groups)
    (header, row) = list(csv.reader(open(path)))
    assert header == ["image", "Left-Hippocampus (17) mm3", "Right-Hippocampus (53) mm3",
                      "ctx-lh-cuneus (1002) mm3", "ctx-rh-caudalanteriorcingulate (2002) mm3",
                      "total cortex mm3", "total subcortical grey matter mm3"]
    assert row[-2:] == ["20.0", "6100.5"]
    _write_volumes(str(path), rows, {1: "femur"}, {})
    assert list(csv.reader(open(path)))[0] == ["image", "femur (1) mm3"]


def test_legend_groups_the_cortex_of_a_whole_brain_table():
    from dazoo.labels import label_colours
    from dazoo.qc import _LEGEND_MAX, _legend_entries

    lookup = label_colours(WHOLE_BRAIN)
    visible = {i: 100 + k for k, i in enumerate(WHOLE_BRAIN)}
    entries = _legend_entries(visible, NAMES, lookup)
    texts = [t for t, _ in entries]
    assert "cortex (31 regions)" in texts and len(entries) <= _LEGEND_MAX
    assert "Hippocampus (L+R)" in texts and "Brain-Stem" in texts
    assert not any(t.startswith("ctx") or "cingulate" in t for t in texts)
    cortex = {i: visible[i] for i in DKT31_CORTEX}  # a cortex-only table: every parcel listed
    assert len(_legend_entries(cortex, NAMES, lookup)) == 31
