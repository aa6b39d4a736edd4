"""dazoo.training data stack: manifests, label maps, the preprocessing cache, pair datasets, augmentation."""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
import scipy.ndimage as ndi

from dazoo import io
from dazoo import training as data
from dazoo import preprocess as pp
from dazoo.errors import DazooInputError


def _write_subjects(folder, make_affine, phantom, phantom_labels, count=3, labelled=(0, 1)):
    """``count`` small phantoms on different native grids, labels for ``labelled``."""
    subjects = []
    for i in range(count):
        shape = (40, 44, 36)
        affine = make_affine(["LIA", "RAS", "ASL"][i % 3], (2.4, 2.2, 2.6), shape,
                             centre=(i, -i, 2 * i))
        image = io.write_image((phantom(affine, shape), affine), folder / f"s{i}" / "image.nii.gz")
        labels = None
        if i in labelled:
            labels = io.write_labels((phantom_labels(affine, shape), affine),
                                     folder / f"s{i}" / "labels.mgz")
        subjects.append(data.Subject(image, labels, f"s{i}"))
    return subjects


def _preprocessor():
    return pp.Preprocessor(pp.PreprocessConfig(voxel_size=(3, 3, 3), shape=(32, 32, 32),
                                               levels=3))


# ----------------------------------------------------------------------------- manifests
def test_csv_manifest(tmp_path, make_affine, phantom, phantom_labels):
    _write_subjects(tmp_path, make_affine, phantom, phantom_labels)
    (tmp_path / "train.csv").write_text(
        "image,labels\ns0/image.nii.gz,s0/labels.mgz\ns2/image.nii.gz,\n")
    subjects = data.load_subjects(tmp_path / "train.csv")
    assert [s.name for s in subjects] == ["s0/image", "s2/image"]  # paths without the ending
    assert subjects[0].image == str(tmp_path / "s0" / "image.nii.gz")
    assert subjects[0].labels == str(tmp_path / "s0" / "labels.mgz")
    assert subjects[1].labels is None
    (tmp_path / "named.csv").write_text(
        "name,image,labels\na,s0/image.nii.gz,\nb,s1/image.nii.gz,\n")
    assert [s.name for s in data.read_manifest(tmp_path / "named.csv")] == ["a", "b"]


@pytest.mark.parametrize("text, words", [
    ("labels\nx.nii.gz\n", "needs an 'image' column"),
    ("image,labels\nmissing.nii.gz,\n", "line 2: image file missing.nii.gz does not exist"),
    ("image,label\ns0/image.nii.gz,\n", "unknown column(s) ['label']"),
    ("image\n", "has no subjects"),
    ("image\ns0/image.nii.gz\ns0/image.nii.gz\n", "duplicate subject name(s) ['s0/image']"),
])
def test_csv_manifest_errors(tmp_path, make_affine, phantom, phantom_labels, text, words):
    _write_subjects(tmp_path, make_affine, phantom, phantom_labels, count=1)
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DazooInputError) as info:
        data.read_manifest(tmp_path / "bad.csv")
    assert str(info.value).startswith(str(tmp_path / "bad.csv")) and words in str(info.value)


def test_folder_layouts(tmp_path, make_affine, phantom, phantom_labels):
    _write_subjects(tmp_path / "per_subject", make_affine, phantom, phantom_labels)
    subjects = data.find_subjects(tmp_path / "per_subject", image="image.*", labels="labels.*")
    assert [s.name for s in subjects] == ["s0", "s1", "s2"]
    assert [s.labels is not None for s in subjects] == [True, True, False]
    flat = tmp_path / "flat"
    for s in subjects:
        os.makedirs(flat / "images", exist_ok=True)
        os.link(s.image, flat / "images" / f"{s.name}.nii.gz")
        if s.labels:
            os.makedirs(flat / "labels", exist_ok=True)
            os.link(s.labels, flat / "labels" / f"{s.name}.mgz")
    again = data.load_subjects(flat)
    assert [(s.name, s.labels is not None) for s in again] == [("s0", True), ("s1", True),
                                                                ("s2", False)]
    with pytest.raises(DazooInputError, match="no subjects found"):
        data.find_subjects(tmp_path / "per_subject", image="t1.nii.gz")


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()
    return str(path)


def test_freesurfer_and_nested_patterns(tmp_path):
    """Patterns may name subfolders (FreeSurfer's mri/) and use ** (any depth)."""
    root = tmp_path / "fs"
    for name in ("bert", "ernie"):
        _touch(root / name / "mri" / "T1.mgz")
        _touch(root / name / "mri" / "brainmask.mgz")
    _touch(root / "bert" / "mri" / "aparc.DKTatlas+aseg.mgz")
    _touch(root / "fsaverage" / "surf" / "lh.white")  # not a subject: no image
    subjects = data.find_subjects(root, image="mri/brainmask.mgz",
                                  labels="mri/aparc.DKTatlas+aseg.mgz")
    assert [(s.name, os.path.relpath(s.image, root), s.labels and os.path.relpath(s.labels, root))
            for s in subjects] == [
        ("bert", "bert/mri/brainmask.mgz", "bert/mri/aparc.DKTatlas+aseg.mgz"),
        ("ernie", "ernie/mri/brainmask.mgz", None)]
    deep = data.find_subjects(root, image="**/brainmask.mgz", labels=None)
    assert [s.name for s in deep] == ["bert", "ernie"] and all(s.labels is None for s in deep)


def test_bids_layout(tmp_path):
    """sub-*/[ses-*/]anat/*_T1w with labels beside them or in derivatives/, named after the
    entities; both sessions of a subject kept apart; other suffixes ignored."""
    root = tmp_path / "bids"
    (root).mkdir()
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.8.0"}')
    t1 = {
        "sub-01_ses-1": _touch(root / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"),
        "sub-01_ses-2": _touch(root / "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz"),
        "sub-02": _touch(root / "sub-02/anat/sub-02_T1w.nii"),
        "sub-03": _touch(root / "sub-03/anat/sub-03_T1w.nii.gz"),
    }
    _touch(root / "sub-02/anat/sub-02_T2w.nii.gz")
    _touch(root / "sub-02/anat/sub-02_T1w.json")
    beside = _touch(root / "sub-02/anat/sub-02_dseg.nii.gz")
    derived = _touch(root / "derivatives/manual/sub-01/ses-2/anat/sub-01_ses-2_desc-dkt_dseg.nii.gz")
    subjects = data.load_subjects(root)  # the recipe's / CLI's default patterns
    assert {s.name: s.image for s in subjects} == t1
    assert {s.name: s.labels for s in subjects} == {"sub-01_ses-1": None, "sub-01_ses-2": derived,
                                                    "sub-02": beside, "sub-03": None}
    assert data.find_subjects(root, image="image.*", labels="labels.*")[1].labels == derived
    t2 = data.find_subjects(root, image="*_T2w.nii*", labels=None)
    assert [s.name for s in t2] == ["sub-02"]
    _touch(root / "derivatives/auto/sub-02/anat/sub-02_desc-aseg_dseg.nii.gz")
    with pytest.raises(DazooInputError, match="2 label maps matching"):
        data.load_subjects(root)
    picked = data.find_subjects(root, labels="*_desc-aseg_dseg.nii.gz")
    assert [s.name for s in picked if s.labels] == ["sub-02"]
    empty = tmp_path / "empty_bids"
    _touch(empty / "sub-01/anat/sub-01_FLAIR.nii.gz")
    with pytest.raises(DazooInputError, match=r"no subjects found \(expected sub-\*"):
        data.load_subjects(empty)


def test_validation_folder_read_with_the_training_patterns(tmp_path, make_affine, phantom,
                                                             phantom_labels):
    from dazoo.training.data import split_subjects

    _write_subjects(tmp_path / "all", make_affine, phantom, phantom_labels)
    subjects = data.find_subjects(tmp_path / "all", image="image.*", labels="labels.*")
    held = tmp_path / "held"
    os.makedirs(held / "v1")
    os.link(subjects[1].image, held / "v1" / "image.nii.gz")
    os.link(subjects[1].labels, held / "v1" / "labels.mgz")
    train, validation = split_subjects(subjects, str(held), source="r", image="image.*",
                                       labels="labels.*")
    assert [s.name for s in train] == ["s0", "s2"]  # the same file is held out
    assert [(s.name, s.labels is not None) for s in validation] == [("v1", True)]


# ----------------------------------------------------------------------------- label map
def test_label_map_contiguous_classes():
    label_map = data.LabelMap([17, 2, 1002, 0, 53], names={17: "Left-Hippocampus"})
    assert label_map.num_classes == 5
    assert label_map.ids.tolist() == [0, 2, 17, 53, 1002]
    ids = np.array([[0, 2, 17], [53, 1002, 17]])
    classes = label_map.to_classes(ids)
    np.testing.assert_array_equal(classes, [[0, 1, 2], [3, 4, 2]])
    np.testing.assert_array_equal(label_map.to_ids(classes), ids)
    assert label_map.class_names[2] == "Left-Hippocampus"
    again = data.LabelMap.from_dict(label_map.to_dict())
    np.testing.assert_array_equal(again.to_classes(ids), classes)


def test_label_map_merges_left_and_right():
    ids = [1002, 2002, 1035, 2035, 17, 53, 4, 43, 630]
    label_map = data.LabelMap(ids, merge_left_right=True)
    assert label_map.ids.tolist() == [0, 4, 17, 630, 1002, 1035]
    classes = label_map.to_classes(np.array(ids))
    assert classes.tolist() == [4, 4, 5, 5, 2, 2, 1, 1, 3]
    assert label_map.to_ids(classes).tolist() == [1002, 1002, 1035, 1035, 17, 17, 4, 4, 630]


def test_label_map_unknown_ids():
    label_map = data.LabelMap([1, 2, 3])
    with pytest.raises(DazooInputError) as info:
        label_map.to_classes(np.array([0, 1, 7, 99, 7]), source="seg.nii.gz")
    assert str(info.value) == "seg.nii.gz: unknown label id(s) 7, 99"
    lenient = data.LabelMap([1, 2, 3], unknown="background")
    assert lenient.to_classes(np.array([0, 1, 7, 3])).tolist() == [0, 1, 0, 3]
    with pytest.raises(DazooInputError, match="0..3"):
        label_map.to_ids(np.array([4]))


# ----------------------------------------------------------------------------- cache
def test_cache_reuses_memory_and_files(tmp_path, make_affine, phantom, phantom_labels):
    subjects = _write_subjects(tmp_path / "d", make_affine, phantom, phantom_labels)
    preprocessor = _preprocessor()
    cache = data.VolumeCache(preprocessor, folder=tmp_path / "cache")
    first = cache.get(subjects[0])
    assert cache.get(subjects[0]) is first and cache.computed == 1
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].startswith("s0-") and files[0].endswith(".npz")
    fresh = data.VolumeCache(preprocessor, folder=tmp_path / "cache")
    loaded = fresh.get(subjects[0])
    assert fresh.computed == 0
    np.testing.assert_array_equal(loaded.preprocessed.array, first.preprocessed.array)
    np.testing.assert_array_equal(loaded.labels, first.labels)
    np.testing.assert_allclose(loaded.preprocessed.model_to_native,
                               first.preprocessed.model_to_native)
    reference = preprocessor.apply(subjects[0].image)
    np.testing.assert_array_equal(first.preprocessed.array, reference.array)
    np.testing.assert_array_equal(first.labels, preprocessor.apply_labels(subjects[0].labels,
                                                                          reference))
    # another config is another key
    other = data.VolumeCache(pp.Preprocessor(pp.PreprocessConfig(
        voxel_size=(2, 2, 2), shape=(32, 32, 32), levels=3)))
    assert other.key(subjects[1]) != cache.key(subjects[1])


def test_cache_key_follows_contents_not_modification_time(tmp_path, make_affine, phantom,
                                                          phantom_labels):
    import shutil

    subjects = _write_subjects(tmp_path, make_affine, phantom, phantom_labels, count=2)
    cache = data.VolumeCache(_preprocessor())
    before = cache.key(subjects[0])
    # the same bytes with a new modification time, or copied elsewhere: the same key
    stat = os.stat(subjects[0].image)
    os.utime(subjects[0].image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache.key(subjects[0]) == before
    copy = tmp_path / "copy"
    shutil.copytree(pathlib.Path(subjects[0].image).parent, copy)
    moved = data.Subject(str(copy / pathlib.Path(subjects[0].image).name),
                         str(copy / pathlib.Path(subjects[0].labels).name), subjects[0].name)
    assert cache.key(moved) == before
    # other contents: another key
    shutil.copyfile(subjects[1].image, subjects[0].image)
    assert cache.key(subjects[0]) != before


# ----------------------------------------------------------------------------- dataset
def _arrays(count=5, shape=(16, 16, 16), seed=0):
    rng = np.random.default_rng(seed)
    images = [ndi.gaussian_filter(rng.random(shape), 2).astype(np.float32) for _ in range(count)]
    labels = [np.where(i > np.median(i), 17, 0) + np.where(i > np.percentile(i, 90), 36, 0)
              for i in images]
    return images, labels


def test_batches_have_the_contract_keys_shapes_and_types():
    images, labels = _arrays()
    dataset = data.PairDataset(images, labels, batch_size=3, steps_per_epoch=4, seed=1)
    batch = dataset[0]
    from dazoo.batch import BATCH_DEFAULTS

    assert isinstance(batch, dict) and set(batch) == set(data.BATCH_KEYS) | set(BATCH_DEFAULTS)
    np.testing.assert_array_equal(batch["shared_contrast"], np.ones(3, np.float32))  # real scans
    assert batch["moving"].shape == (3, 16, 16, 16, 1) and batch["moving"].dtype == np.float32
    assert batch["fixed"].shape == (3, 16, 16, 16, 1) and batch["fixed"].dtype == np.float32
    assert batch["moving_labels"].shape == (3, 16, 16, 16)
    assert batch["moving_labels"].dtype == np.int32 and batch["fixed_labels"].dtype == np.int32
    assert batch["moving_labelled"].shape == (3,)
    assert batch["moving_labelled"].dtype == np.float32
    assert len(dataset) == 4
    assert set(np.unique(batch["moving_labels"])) <= {0, 1, 2}  # ids 0, 17, 53


def test_batches_match_the_drawn_pairs():
    images, labels = _arrays()
    dataset = data.PairDataset(images, labels, labelled=[1, 3], batch_size=4, seed=3)
    label_map = data.LabelMap.from_labels(labels)
    batch = dataset[2]
    for sample, (moving, fixed) in enumerate(dataset.pairs(2)):
        assert moving != fixed
        np.testing.assert_array_equal(batch["moving"][sample, ..., 0], images[moving])
        np.testing.assert_array_equal(batch["fixed"][sample, ..., 0], images[fixed])
        for side, subject in (("moving", moving), ("fixed", fixed)):
            is_labelled = subject in (1, 3)
            assert batch[f"{side}_labelled"][sample] == float(is_labelled)
            expected = (label_map.to_classes(labels[subject]) if is_labelled
                        else np.zeros((16, 16, 16)))
            np.testing.assert_array_equal(batch[f"{side}_labels"][sample], expected)


def test_sampling_is_reproducible_and_changes_with_epoch():
    images, labels = _arrays()
    one = data.PairDataset(images, labels, batch_size=2, steps_per_epoch=8, seed=5)
    two = data.PairDataset(images, labels, batch_size=2, steps_per_epoch=8, seed=5)
    assert [one.pairs(i) for i in range(8)] == [two.pairs(i) for i in reversed(range(8))][::-1]
    np.testing.assert_array_equal(one[3]["moving"], two[3]["moving"])
    first_epoch = [one.pairs(i) for i in range(8)]
    one.on_epoch_end()
    assert [one.pairs(i) for i in range(8)] != first_epoch
    other_seed = data.PairDataset(images, labels, batch_size=2, steps_per_epoch=8, seed=6)
    assert [other_seed.pairs(i) for i in range(8)] != first_epoch


def test_k_labelled_subjects_one_shot():
    images, labels = _arrays(count=6)
    one_shot = data.PairDataset(images, labels, k=1, seed=11, batch_size=8, steps_per_epoch=20)
    assert len(one_shot.labelled) == 1
    again = data.PairDataset(images, labels, k=1, seed=11)
    assert again.labelled == one_shot.labelled
    chosen = {tuple(data.PairDataset(images, labels, k=2, seed=s).labelled) for s in range(12)}
    assert len(chosen) > 1  # the seed picks which subjects
    flags = np.concatenate([np.concatenate([one_shot[i]["moving_labelled"],
                                            one_shot[i]["fixed_labelled"]]) for i in range(20)])
    assert 0 < flags.mean() < 0.5  # mostly unlabelled images, some labelled ones
    mixed = data.PairDataset(images, labels, k=1, seed=11, batch_size=8, steps_per_epoch=20,
                             labelled_fraction=0.5)
    flags = np.concatenate([mixed[i]["moving_labelled"] for i in range(20)])
    assert 0.35 < flags.mean() < 0.65


def test_labelled_by_name_and_errors():
    images, labels = _arrays(count=4)
    labels[2] = None
    names = ["a", "b", "c", "d"]
    dataset = data.PairDataset(images, labels, names=names, labelled=["b", "d"])
    assert dataset.labelled == [1, 3]
    with pytest.raises(DazooInputError, match=r"\['c'\] have no label map"):
        data.PairDataset(images, labels, names=names, labelled=["c"])
    with pytest.raises(DazooInputError, match="either labelled= or k="):
        data.PairDataset(images, labels, labelled=[0], k=1)
    with pytest.raises(DazooInputError, match="k must be"):
        data.PairDataset(images, labels, k=4)
    with pytest.raises(DazooInputError, match="'z' is not in the dataset"):
        data.PairDataset(images, labels, names=names, labelled=["z"])
    with pytest.raises(DazooInputError, match="at least 2 images"):
        data.PairDataset(images[:1])
    with pytest.raises(DazooInputError, match=r"^a: unknown label id\(s\) 53$"):
        data.PairDataset(images, labels, names=names, label_map=data.LabelMap([17]))


def test_from_subjects_reads_only_kept_labels(tmp_path, make_affine, phantom, phantom_labels):
    subjects = _write_subjects(tmp_path, make_affine, phantom, phantom_labels, count=3,
                               labelled=(0, 1))
    label_map = data.LabelMap.from_labels([io.read_labels(s.labels) for s in subjects[:2]])
    cache = data.VolumeCache(_preprocessor())
    dataset = data.PairDataset.from_subjects(subjects, cache.preprocessor, cache=cache,
                                             label_map=label_map, labelled=["s1"],
                                             batch_size=2, steps_per_epoch=3)
    assert dataset.labelled == [1] and dataset.names == ["s0", "s1", "s2"]
    assert dataset.classes[0] is None and dataset.classes[1] is not None
    assert cache.computed == 3
    batch = dataset[0]
    assert batch["moving"].shape == (2, 32, 32, 32, 1)
    assert set(np.unique(dataset.classes[1])) == set(range(label_map.num_classes))


# ----------------------------------------------------------------------------- augmentation
def test_augmentation_moves_image_and_labels_together():
    shape = (24, 24, 24)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    labels = ((index[0] // 6 + index[1] // 6 + index[2] // 6) % 4).astype(np.int32)
    image = labels.astype(np.float32) / 3  # intensity is a function of the label
    augment = data.Augmentation(rotation=15, scale=0.1, translation=2, elastic=1.5,
                                elastic_spacing=8)
    rng_a, rng_b = np.random.default_rng(4), np.random.default_rng(4)
    moved_image, moved_labels = augment(image, labels, rng_a)
    coords = augment.coordinates(shape, rng_b)
    np.testing.assert_array_equal(moved_labels, ndi.map_coordinates(labels, coords, order=0))
    np.testing.assert_allclose(moved_image, ndi.map_coordinates(image, coords, order=1),
                               atol=1e-6)
    assert (moved_labels != labels).mean() > 0.05
    inside = ndi.binary_erosion(np.ones(shape, bool), iterations=4)
    # where the image is not at a label boundary it still equals label / 3
    flat = ndi.maximum_filter(moved_labels, 3) == ndi.minimum_filter(moved_labels, 3)
    np.testing.assert_allclose(moved_image[flat & inside], moved_labels[flat & inside] / 3,
                               atol=1e-5)


def test_intensity_augmentation_and_validation():
    image = np.linspace(0, 1, 8**3, dtype=np.float32).reshape(8, 8, 8)
    out, labels = data.Augmentation(gamma=0.3)(image, None, np.random.default_rng(0))
    gamma = np.exp(np.random.default_rng(0).normal(0, 0.3))
    np.testing.assert_allclose(out, image**gamma, rtol=1e-5)
    assert labels is None
    noisy, _ = data.Augmentation(noise=0.1)(image, None, np.random.default_rng(1))
    assert 0.08 < np.std(noisy - image) < 0.12
    with pytest.raises(DazooInputError, match="rotation must be >= 0"):
        data.Augmentation(rotation=-1)


def test_flip_mirrors_image_and_labels_and_keeps_ids():
    rng = np.random.default_rng(0)
    image = rng.random((6, 7, 8)).astype(np.float32)
    labels = rng.integers(0, 4, (6, 7, 8)).astype(np.int32)
    for axis in range(3):
        out, moved = data.Augmentation(flip=1.0, flip_axis=axis)(image, labels, rng)
        np.testing.assert_array_equal(out, np.flip(image, axis))
        np.testing.assert_array_equal(moved, np.flip(labels, axis))
        assert out.flags.c_contiguous and moved.flags.c_contiguous
    out, moved = data.Augmentation(flip=0.0)(image, labels, rng)
    np.testing.assert_array_equal(out, image)
    flips = [not np.array_equal(data.Augmentation(flip=0.5)(image, None, rng)[0], image)
             for _ in range(200)]
    assert 70 < sum(flips) < 130
    with pytest.raises(DazooInputError, match="flip <= 1"):
        data.Augmentation(flip=1.5)
    with pytest.raises(DazooInputError, match="flip_axis"):
        data.Augmentation(flip=0.5, flip_axis=3)


def test_pairs_are_mirrored_together():
    """Both images of a pair are flipped or neither (a left knee does not register onto a
    right one), and both cases occur."""
    images, labels = _arrays(count=3)
    dataset = data.PairDataset(images, labels, augment=data.Augmentation(flip=0.5),
                               batch_size=4, steps_per_epoch=10, seed=3)
    seen = set()
    for step in range(10):
        batch = dataset.at_step(step)
        for b in range(4):
            states = []
            for side in ("moving", "fixed"):
                image = batch[side][b, ..., 0]
                plain = [np.array_equal(image, i) for i in images]
                flipped = [np.array_equal(image, np.flip(i, 0)) for i in images]
                assert any(plain) != any(flipped)
                states.append(any(flipped))
            assert states[0] == states[1]
            seen.add(states[0])
    assert seen == {True, False}


def test_dataset_with_augmentation_is_reproducible():
    images, labels = _arrays()
    augment = data.Augmentation(rotation=10, elastic=1.0, gamma=0.2)
    one = data.PairDataset(images, labels, augment=augment, batch_size=2, seed=2)
    two = data.PairDataset(images, labels, augment=augment, batch_size=2, seed=2)
    np.testing.assert_array_equal(one[1]["moving"], two[1]["moving"])
    np.testing.assert_array_equal(one[1]["fixed_labels"], two[1]["fixed_labels"])


# ----------------------------------------------------------------------------- phases
def test_schedule_updates():
    from dazoo.batch import Schedule

    R, S = frozenset({"registration"}), frozenset({"segmentation"})
    joint = Schedule("joint", 2, 1)
    assert [joint.updates(s) for s in range(6)] == [R, R, S] * 2
    assert {Schedule("registration_only").updates(s) for s in range(4)} == {R}
    assert {Schedule("segmentation_only").updates(s) for s in range(4)} == {S}
    assert {Schedule("simultaneous", 8, 1).updates(s) for s in range(9)} == {R | S}
    assert joint.networks == R | S and joint.alternates and not joint.shared
    assert Schedule("simultaneous").shared and not Schedule("simultaneous").alternates
    # updates over a run: counted by hand from the cycle (7 steps of R, R, S: 5 R and 3 S
    # rounded up per network), every step for single-network and simultaneous modes
    assert joint.updates_in(7) == {"registration": 5, "segmentation": 3}
    assert sum(joint.updates(s) == R for s in range(6)) == joint.updates_in(6)["registration"]
    assert Schedule("registration_only").updates_in(10) == {"registration": 10}
    assert Schedule("simultaneous").updates_in(10) == {"registration": 10, "segmentation": 10}
    # steps from the optimizers' iterations: a simultaneous step updates both, counts once
    assert joint.steps_done(4, 2) == 6 and Schedule("simultaneous").steps_done(4, 4) == 4
    with pytest.raises(ValueError):
        Schedule("joint", 0, 1)
    with pytest.raises(ValueError, match="mode must be one of"):
        Schedule("both")


def test_segmentation_steps_draw_a_labelled_image_on_either_side():
    from dazoo.batch import Schedule

    images, labels = _arrays(count=5)
    dataset = data.PairDataset(images, labels, labelled=[2], batch_size=2, steps_per_epoch=40,
                               seed=0, schedule=Schedule("joint", 1, 1))
    sides = set()
    for index in range(40):
        pairs = dataset.pairs(index)
        if dataset.updates(index) == {"segmentation"}:
            assert all(2 in pair for pair in pairs)
            sides.update(pair.index(2) for pair in pairs)
            batch = dataset[index]
            assert np.all(batch["moving_labelled"] + batch["fixed_labelled"] >= 1)
    assert sides == {0, 1}  # the labelled image is moving in some pairs, fixed in others
    registration = [p for i in range(0, 40, 2) for p in dataset.pairs(i)]
    assert any(2 not in pair for pair in registration)  # registration pairs are unrestricted


def test_batch_of_a_step_is_the_batch_of_its_epoch():
    from dazoo.batch import Schedule

    images, labels = _arrays()
    dataset = data.PairDataset(images, labels, labelled=[0], steps_per_epoch=3, seed=4,
                               schedule=Schedule("joint", 2, 1),
                               augment=data.Augmentation(rotation=10, gamma=0.2),
                               augment_phases=["segmentation"])
    steps = dataset.steps(4, 9)
    assert len(steps) == 5
    for item in range(5):
        epoch, index = divmod(4 + item, 3)
        dataset.epoch = epoch
        expected = dataset[index]
        got = steps[item]
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_augmentation_only_in_the_phases_asked():
    from dazoo.batch import Schedule

    images, labels = _arrays()
    dataset = data.PairDataset(images, labels, steps_per_epoch=6, seed=1,
                               schedule=Schedule("joint", 1, 1),
                               augment=data.Augmentation(rotation=20, noise=0.1),
                               augment_phases=["segmentation"])
    for index in range(6):
        (moving, _), = dataset.pairs(index)
        same = np.array_equal(dataset[index]["moving"][0, ..., 0], images[moving])
        assert same == (dataset.updates(index) == {"registration"})
    with pytest.raises(DazooInputError, match="needs a schedule"):
        data.PairDataset(images, labels, augment_phases=["segmentation"])


def test_simultaneous_steps_draw_a_labelled_image_and_augment_both_or_none():
    from dazoo.batch import Schedule

    images, labels = _arrays(count=5)
    schedule = Schedule("simultaneous")
    dataset = data.PairDataset(images, labels, labelled=[2], steps_per_epoch=12, seed=0,
                               schedule=schedule, augment=data.Augmentation(noise=0.1))
    for index in range(12):
        assert dataset.updates(index) == {"registration", "segmentation"}
        (pair,) = dataset.pairs(index)
        assert 2 in pair  # every step updates the segmenter: a labelled image in each pair
        moving = pair[0]
        assert not np.array_equal(dataset[index]["moving"][0, ..., 0], images[moving])
    plain = data.PairDataset(images, labels, labelled=[2], steps_per_epoch=3, seed=0,
                             schedule=schedule, augment=data.Augmentation(noise=0.1),
                             augment_phases=[])
    (pair,) = plain.pairs(0)
    np.testing.assert_array_equal(plain[0]["moving"][0, ..., 0], images[pair[0]])
    with pytest.raises(DazooInputError, match="both phases or none"):
        data.PairDataset(images, labels, schedule=schedule, augment_phases=["segmentation"])


# ----------------------------------------------------------------------------- left/right
def test_one_left_right_rule_for_label_maps_and_evaluation():
    from dazoo import evaluate, labels

    ids = np.array([[0, 1002, 2002, 2035], [17, 53, 41, 2], [12035, 11035, 7, 92]])
    expected = np.array([[0, 1002, 1002, 1035], [17, 17, 2, 2], [11035, 11035, 7, 91]])
    np.testing.assert_array_equal(labels.merge_left_right(ids), expected)
    assert evaluate.merge_left_right is labels.merge_left_right
    label_map = labels.LabelMap(np.unique(ids), merge_left_right=True)
    classes = label_map.to_classes(ids)
    # Two ids share a class exactly when the rule merges them, and the class keeps the left id.
    np.testing.assert_array_equal(label_map.to_ids(classes), expected)


def test_label_map_from_a_preset_table():
    table = [{"class": 0, "id": 0, "name": "background"}, {"class": 1, "id": 1002, "name": "a"},
             {"class": 2, "id": 2002, "name": "b"}]
    label_map = data.LabelMap.from_table(table)
    assert label_map.ids.tolist() == [0, 1002, 2002] and label_map.class_names[1] == "a"
    assert label_map.to_table() == table
    # ids the table does not know (FreeSurfer's subcortical ones, say) become background
    assert label_map.to_classes(np.array([2002, 17, 1002])).tolist() == [2, 0, 1]
    with pytest.raises(DazooInputError, match="sorted"):
        data.LabelMap.from_table([table[0], {**table[1], "class": 2}, {**table[2], "class": 1}])
