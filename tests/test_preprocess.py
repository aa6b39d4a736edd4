"""dazoo.preprocess: config, grids, one-resampling model grid, alignment, template building."""
from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from dazoo import io
from dazoo import preprocess as pp
from dazoo.errors import DazooInputError

NO_NORM = {"method": "none"}


def _config(**kwargs):
    base = {"voxel_size": (2.0, 2.0, 2.0), "shape": (48, 48, 48), "levels": 3,
            "intensity": NO_NORM}
    base.update(kwargs)
    return pp.PreprocessConfig(**base)


def _random_affine(rng, rotation, *, degrees=20.0, shift=20.0, scale=0.1):
    """Rotation up to ``degrees`` about a random axis, translation up to ``shift`` mm,
    per-axis scaling within 1 +- ``scale``; about the world origin (the phantom's centre)."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation(rng.uniform(-degrees, degrees), rng.normal(size=3)) @ np.diag(
        rng.uniform(1 - scale, 1 + scale, 3))
    direction = rng.normal(size=3)
    matrix[:3, 3] = direction / np.linalg.norm(direction) * rng.uniform(0, shift)
    return matrix


def _transformed_phantom(phantom_function, world_points, matrix, affine, shape):
    """The phantom moved by ``matrix`` (world -> world), sampled on (affine, shape):
    ``moving(x) = phantom(inv(matrix) @ x)``, so ``moving(matrix @ y) = phantom(y)``."""
    inverse = np.linalg.inv(matrix)
    points = world_points(affine, shape)
    return phantom_function(points @ inverse[:3, :3].T + inverse[:3, 3]).astype(np.float32)


# ----------------------------------------------------------------------------- config
def test_config_round_trip_through_json():
    config = _config(template="tpl.nii.gz", alignment="affine", metric="mi",
                     intensity={"method": "percentile", "lower": 1, "upper": 99, "nonzero": True})
    text = json.dumps(config.to_dict())
    again = pp.PreprocessConfig.from_dict(json.loads(text))
    assert again == config
    assert again.shape == (48, 48, 48) and again.voxel_size == (2.0, 2.0, 2.0)
    assert config.fingerprint() == again.fingerprint() != _config().fingerprint()


@pytest.mark.parametrize("change, words", [
    ({"colour": "red"}, "unknown key(s) 'colour'"),
    ({"shape": (48, 44, 48)}, "multiple of 8"),
    ({"shape": (48, 48)}, "3 positive ints"),
    ({"voxel_size": (1, -1, 1)}, "3 positive numbers"),
    ({"orientation": "RAR"}, "not a valid axis code"),
    ({"alignment": "affine"}, "needs a template"),
    ({"alignment": "warp"}, "alignment must be one of"),
    ({"intensity": {"method": "percentile", "upper": 120}}, "percentiles"),
    ({"intensity": {"method": "zscore", "lower": 1}}, "unknown intensity key"),
])
def test_config_errors(change, words):
    data = _config().to_dict()
    data.update(change)
    with pytest.raises(DazooInputError, match="^preprocess config: ") as info:
        pp.PreprocessConfig.from_dict(data)
    assert words in str(info.value)


def test_config_missing_keys_and_json_file(tmp_path):
    with pytest.raises(DazooInputError, match="missing key"):
        pp.PreprocessConfig.from_dict({"shape": [16, 16, 16]})
    path = tmp_path / "preset" / "preprocess.json"
    path.parent.mkdir()
    path.write_text(_config(template="template.nii.gz", alignment="rigid").to_json())
    pre = pp.Preprocessor.from_json(path)
    assert pre.template_path == str(tmp_path / "preset" / "template.nii.gz")
    path.write_text("{not json")
    with pytest.raises(DazooInputError, match=f"^{path}: cannot be read as JSON"):
        pp.PreprocessConfig.from_json(path)


def test_import_does_not_pull_keras_or_simpleitk():
    code = ("import sys, dazoo.io, dazoo.preprocess, dazoo.postprocess; "
            "print(sorted(m for m in ('keras', 'tensorflow', 'SimpleITK') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- grids
@pytest.mark.parametrize("codes", ["RAS", "LIA", "ASL", "PIR"])
def test_grid_affine_matches_nibabel_orientation(codes):
    affine = pp.grid_affine(orientation=codes, voxel_size=(1.5, 2.0, 3.0), shape=(10, 12, 14),
                            centre=(4.0, -5.0, 6.0))
    assert "".join(nib.aff2axcodes(affine)) == codes
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), [1.5, 2.0, 3.0])
    np.testing.assert_allclose(affine @ [4.5, 5.5, 6.5, 1], [4.0, -5.0, 6.0, 1])


@pytest.mark.parametrize("codes", ["LIA", "ASL", "PSR"])
def test_reorient_matches_nibabel_canonical(make_affine, phantom, codes):
    affine = make_affine(codes, (1.0, 1.5, 2.0), (12, 10, 8))
    array = phantom(affine, (12, 10, 8))
    canonical = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    volume = pp.reorient(io.Volume(array, affine), "RAS")
    np.testing.assert_array_equal(volume.array, np.asanyarray(canonical.dataobj))
    np.testing.assert_allclose(volume.affine, canonical.affine)


def test_resample_matches_map_coordinates(make_affine, phantom, rotation):
    source = make_affine("LIA", (1.3, 1.1, 1.7), (30, 28, 26), rotation(15, (1, 2, 3)))
    volume = io.Volume(phantom(source, (30, 28, 26)), source)
    target = make_affine("RAS", (2.0, 2.0, 2.0), (16, 16, 16), centre=(2, 1, -1))
    transform = np.eye(4)
    transform[:3, 3] = [1.5, -2.0, 0.5]
    result = pp.resample(volume, target, (16, 16, 16), transform=transform, order=1)
    index = np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij"), -1).reshape(-1, 3)
    world = index @ target[:3, :3].T + target[:3, 3] + transform[:3, 3]
    voxel = (world - source[:3, 3]) @ np.linalg.inv(source[:3, :3]).T
    expected = ndi.map_coordinates(volume.array, voxel.T, order=1, cval=0).reshape(16, 16, 16)
    np.testing.assert_allclose(result, expected, atol=1e-3)


# ----------------------------------------------------------------------------- pipeline
@pytest.mark.parametrize("codes, spacing, degrees", [
    ("LIA", (1.0, 1.2, 1.5), 0), ("ASL", (1.6, 1.0, 1.2), 0), ("RAS", (1.1, 1.4, 0.9), 25),
])
def test_model_grid_samples_the_world(make_affine, phantom, phantom_function, world_points,
                                      rotation, codes, spacing, degrees):
    """Each model voxel holds the phantom's value at the world point its affine gives."""
    shape = (112, 120, 108)
    affine = make_affine(codes, spacing, shape, rotation(degrees, (1, -1, 2)), centre=(3, -4, 2))
    pre = pp.Preprocessor(_config(voxel_size=(1.5, 1.5, 1.5), shape=(64, 64, 56)))
    native = phantom(affine, shape)
    out = pre.apply((native, affine))
    assert out.array.shape == (64, 64, 56) and out.array.dtype == np.float32
    assert "".join(nib.aff2axcodes(out.affine)) == "RAS"
    np.testing.assert_allclose(nib.affines.voxel_sizes(out.affine), 1.5)
    points = world_points(out.affine, (64, 64, 56))
    expected = phantom_function(points)
    index = (points - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    inside = np.all((index >= 0) & (index <= np.array(shape) - 1), axis=-1)
    assert inside.mean() > 0.9
    # linear interpolation error of the narrowest blob (h^2/8 f'') stays under 3% of the peak
    assert np.abs(out.array - expected)[inside].max() < 0.03 * expected.max()
    # ... and the values are exactly those of one linear interpolation at those world points
    reference = ndi.map_coordinates(native, index.reshape(-1, 3).T, order=1, mode="nearest")
    np.testing.assert_allclose(out.array[inside], reference.reshape(index.shape[:3])[inside],
                               atol=1e-3)
    np.testing.assert_array_equal(out.array[~inside], native.min())  # filled with the minimum
    centre_of_mass = out.affine @ [*ndi.center_of_mass(out.array), 1]
    np.testing.assert_allclose(centre_of_mass[:3], pp.image_centre(io.Volume(native, affine)),
                               atol=2.0)
    np.testing.assert_array_equal(out.alignment, np.eye(4))
    assert out.native_shape == shape


def test_percentile_normalisation(make_affine, phantom):
    affine = make_affine("RAS", (2, 2, 2), (40, 40, 40))
    array = phantom(affine, (40, 40, 40))
    config = _config(shape=(40, 40, 40), levels=2,
                     intensity={"method": "percentile", "lower": 2, "upper": 98})
    out = pp.Preprocessor(config).apply((array, affine))
    low, high = np.percentile(array, [2, 98])
    raw = pp.Preprocessor(_config(shape=(40, 40, 40), levels=2)).apply((array, affine)).array
    np.testing.assert_allclose(out.array, np.clip((raw - low) / (high - low), 0, 1), atol=1e-5)
    assert out.intensity == pytest.approx((low, high - low))


def test_constant_image_cannot_be_normalised():
    with pytest.raises(DazooInputError, match="constant intensity"):
        pp.Preprocessor(_config(intensity={"method": "minmax"})).apply(
            (np.full((8, 8, 8), 3.0), np.eye(4)))


def test_apply_labels_exact_at_native_resolution(make_affine, phantom, phantom_labels):
    """LIA input at 1 mm, RAS model grid at 1 mm: nearest-neighbour labels are copied exactly."""
    affine = make_affine("LIA", (1, 1, 1), (80, 88, 72), centre=(0.4, -0.3, 0.2))
    pre = pp.Preprocessor(_config(voxel_size=(1, 1, 1), shape=(64, 64, 64)))
    out = pre.apply((phantom(affine, (80, 88, 72)), affine))
    ids = phantom_labels(affine, (80, 88, 72))
    on_model = pre.apply_labels((ids, affine), out)
    index = np.stack(np.meshgrid(*[np.arange(64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    native = (index @ out.affine[:3, :3].T + out.affine[:3, 3] - affine[:3, 3]) @ np.linalg.inv(
        affine[:3, :3]).T
    np.testing.assert_allclose(native, np.round(native), atol=1e-6)  # lattice points
    native = np.round(native).astype(int)
    inside = np.all((native >= 0) & (native < [80, 88, 72]), axis=1)
    expected = np.zeros(len(index), np.int32)
    expected[inside] = ids[tuple(native[inside].T)]
    np.testing.assert_array_equal(on_model.reshape(-1), expected)
    assert on_model.dtype == np.int32


def test_apply_labels_checks_grid(make_affine, phantom):
    affine = make_affine("RAS", (2, 2, 2), (20, 20, 20))
    pre = pp.Preprocessor(_config(shape=(16, 16, 16), levels=2))
    out = pre.apply((phantom(affine, (20, 20, 20)), affine))
    with pytest.raises(DazooInputError, match="does not match"):
        pre.apply_labels((np.zeros((20, 20, 19), np.int16), affine), out)


# ----------------------------------------------------------------------------- alignment
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_align_affine_recovers_a_random_affine(make_affine, phantom, phantom_function,
                                               world_points, rotation, seed):
    fixed_affine = make_affine("RAS", (2, 2, 2), (56, 56, 56))
    fixed = io.Volume(phantom(fixed_affine, (56, 56, 56)), fixed_affine)
    truth = _random_affine(np.random.default_rng(seed), rotation)
    moving_affine = make_affine("LIA", (2.2, 1.8, 2.5), (80, 96, 72), rotation(10, (1, 1, 0)),
                                centre=(5, -3, 8))
    moving = io.Volume(_transformed_phantom(phantom_function, world_points, truth, moving_affine,
                                            (80, 96, 72)), moving_affine)
    found = pp.align_affine(moving, fixed, kind="affine")
    points = world_points(fixed_affine, (56, 56, 56))[fixed.array > 10]
    error = np.linalg.norm(points @ (found - truth)[:3, :3].T + (found - truth)[:3, 3], axis=1)
    assert error.mean() < 1.0, error.mean()


def test_align_rigid_recovers_a_rigid_motion(make_affine, phantom, phantom_function,
                                             world_points, rotation):
    fixed_affine = make_affine("ASL", (2, 2, 2), (56, 56, 56))
    fixed = io.Volume(phantom(fixed_affine, (56, 56, 56)), fixed_affine)
    truth = _random_affine(np.random.default_rng(7), rotation, scale=0.0)
    moving_affine = make_affine("RAS", (2, 2, 2), (72, 72, 72))
    moving = (_transformed_phantom(phantom_function, world_points, truth, moving_affine,
                                   (72, 72, 72)), moving_affine)
    found = pp.align_affine(moving, fixed, kind="rigid")
    np.testing.assert_allclose(found[:3, :3] @ found[:3, :3].T, np.eye(3), atol=1e-6)
    points = world_points(fixed_affine, (56, 56, 56))[fixed.array > 10]
    error = np.linalg.norm(points @ (found - truth)[:3, :3].T + (found - truth)[:3, 3], axis=1)
    assert error.mean() < 1.0


def test_preprocessor_aligns_to_its_template(tmp_path, make_affine, phantom, phantom_function,
                                             world_points, rotation):
    config = _config(voxel_size=(2, 2, 2), shape=(48, 48, 48), template="tpl.nii.gz",
                     alignment="affine")
    grid = pp.grid_affine(orientation="RAS", voxel_size=(2, 2, 2), shape=(48, 48, 48),
                          centre=(0, 0, 0))
    io.write_image((phantom(grid, (48, 48, 48)), grid), tmp_path / "tpl.nii.gz")
    truth = _random_affine(np.random.default_rng(3), rotation)
    native = make_affine("LIA", (1.5, 1.8, 1.6), (88, 80, 84), centre=(10, 20, -5))
    moving = _transformed_phantom(phantom_function, world_points, truth, native, (88, 80, 84))
    out = pp.Preprocessor(config, root=tmp_path).apply((moving, native))
    np.testing.assert_allclose(out.affine, nib.load(tmp_path / "tpl.nii.gz").affine, atol=1e-5)
    expected = phantom(grid, (48, 48, 48))
    assert np.abs(out.array - expected).mean() < 0.01 * expected.max()
    points = world_points(grid, (48, 48, 48))[expected > 10]
    error = out.alignment - truth
    assert np.linalg.norm(points @ error[:3, :3].T + error[:3, 3], axis=1).mean() < 1.0


def test_build_affine_template(make_affine, phantom, phantom_function, world_points, rotation):
    """Three copies moved by affines whose mean is the identity average back to the phantom."""
    shifts = [np.eye(4) for _ in range(3)]
    shifts[0][:3, 3] = [6, -4, 3]
    shifts[1][:3, 3] = [-6, 4, -3]
    shifts[1][:3, :3] = np.diag([1.05, 0.95, 1.0])
    shifts[2][:3, :3] = np.diag([0.95, 1.05, 1.0])
    native = make_affine("LIA", (2, 2, 2), (64, 64, 64))
    volumes = [(_transformed_phantom(phantom_function, world_points, m, native, (64, 64, 64)),
                native) for m in shifts]
    template = pp.build_affine_template(volumes, voxel_size=(2, 2, 2), shape=(48, 48, 48),
                                        iterations=2, reference=2)
    assert template.shape == (48, 48, 48) and "".join(nib.aff2axcodes(template.affine)) == "RAS"
    expected = phantom(template.affine, (48, 48, 48))
    correlation = np.corrcoef(template.array.ravel(), expected.ravel())[0, 1]
    assert correlation > 0.99
    assert 0 <= template.array.min() and template.array.max() <= 1


# ----------------------------------------------------------------------------- real data
def _mindboggle(data_root) -> list:
    subjects = sorted(p for p in (data_root / "mindboggle-oasis-trt20").glob("OASIS-TRT-20-*")
                      if p.is_dir())
    if len(subjects) < 2:
        pytest.skip("fewer than 2 Mindboggle subjects")
    return subjects


def _label_overlap(moving_dir, fixed_dir) -> tuple[float, float]:
    """Mean Dice of the DKT31+aseg labels, moving resampled onto fixed by the headers only
    and after affine alignment."""
    fixed = io.read_image(fixed_dir / "t1weighted_brain.nii.gz")
    moving = io.read_image(moving_dir / "t1weighted_brain.nii.gz")
    name = "labels.DKT31.manual+aseg.nii.gz"
    fixed_labels = io.read_labels(fixed_dir / name, like=fixed).array
    moving_labels = io.read_labels(moving_dir / name, like=moving)
    matrix = pp.align_affine(moving, fixed)
    ids = np.intersect1d(np.unique(fixed_labels), np.unique(moving_labels.array))
    fixed_classes = np.searchsorted(ids, fixed_labels).ravel()  # ids not in both -> class 0
    fixed_classes[ids[np.minimum(fixed_classes, len(ids) - 1)] != fixed_labels.ravel()] = 0
    scores = []
    for transform in (np.eye(4), matrix):
        warped = pp.resample(moving_labels, fixed.affine, fixed.shape, transform=transform,
                             order=0).ravel()
        classes = np.searchsorted(ids, warped)
        classes[ids[np.minimum(classes, len(ids) - 1)] != warped] = 0
        both = np.bincount(classes[classes == fixed_classes], minlength=len(ids))
        sizes = np.bincount(classes, minlength=len(ids)) + np.bincount(fixed_classes,
                                                                         minlength=len(ids))
        scores.append(float(np.mean(2 * both[1:] / sizes[1:])))
    return scores[0], scores[1]


@pytest.mark.data
def test_real_alignment_improves_label_overlap(data_root):
    folder = data_root / "mindboggle-oasis-trt20"
    if not (folder / "OASIS-TRT-20-12").is_dir() or not (folder / "OASIS-TRT-20-18").is_dir():
        pytest.skip("Mindboggle subjects 12 and 18 not found")
    before, after = _label_overlap(folder / "OASIS-TRT-20-18", folder / "OASIS-TRT-20-12")
    assert after > 1.5 * before and after > before + 0.1, (before, after)


@pytest.mark.data
@pytest.mark.slow
def test_real_alignment_every_subject(data_root):
    """Each Mindboggle subject aligned to the next one (cyclically)."""
    subjects = _mindboggle(data_root)
    results = [_label_overlap(moving, fixed)
               for moving, fixed in zip(subjects, subjects[1:] + subjects[:1])]
    before, after = np.array(results).T
    assert np.all(after > 1.2 * before), results
    assert after.mean() > before.mean() + 0.12, results


def test_fingerprint_follows_the_template_contents_not_its_path(tmp_path):
    import shutil

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    template = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    io.write_image((template, affine), tmp_path / "a" / "template.nii.gz")
    (tmp_path / "b").mkdir()
    shutil.copyfile(tmp_path / "a" / "template.nii.gz", tmp_path / "b" / "template.nii.gz")
    config = pp.PreprocessConfig(voxel_size=(2, 2, 2), shape=(16, 16, 16), levels=2,
                                 template="template.nii.gz", alignment="affine")
    first = pp.Preprocessor(config, root=tmp_path / "a")
    copy = pp.Preprocessor(config, root=tmp_path / "b")
    assert first.fingerprint() == copy.fingerprint()  # each run's copy reuses the cache
    io.write_image((template + 0.1, affine), tmp_path / "b" / "template.nii.gz")
    assert pp.Preprocessor(config, root=tmp_path / "b").fingerprint() != first.fingerprint()


def test_mirror_auto_aligns_a_mirrored_image_and_maps_back(tmp_path, make_affine, phantom,
                                                           phantom_function, world_points,
                                                           phantom_labels,
                                                           phantom_label_function):
    """mirror="auto": a left-right mirrored copy of the template (a left limb against a
    right-limb template) is aligned through a reflection, lands like the template, and its
    label map goes back onto its own grid exactly; the unmirrored image keeps no reflection."""
    grid = pp.grid_affine(orientation="RAS", voxel_size=(2, 2, 2), shape=(48, 48, 48),
                          centre=(0, 0, 0))
    io.write_image((phantom(grid, (48, 48, 48)), grid), tmp_path / "tpl.nii.gz")
    config = _config(template="tpl.nii.gz", alignment="rigid", mirror="auto")
    pre = pp.Preprocessor(config, root=tmp_path)
    native = make_affine("LIA", (1.5, 1.5, 1.5), (72, 72, 72), centre=(4, -3, 2))
    flip = np.diag([-1.0, 1.0, 1.0])
    points = world_points(native, (72, 72, 72))
    mirrored = phantom_function(points @ flip.T).astype(np.float32)  # the phantom, mirrored
    out = pre.apply((mirrored, native))
    assert np.linalg.det(out.alignment[:3, :3]) < 0  # a reflection was chosen
    expected = phantom(grid, (48, 48, 48))
    assert np.abs(out.array - expected).mean() < 0.02 * expected.max()
    plain = pre.apply((phantom_function(points).astype(np.float32), native))
    assert np.linalg.det(plain.alignment[:3, :3]) > 0
    score = pp.alignment_score(io.read_image((mirrored, native)), pre.template, out.alignment)
    unmirrored = pp.alignment_score(io.read_image((mirrored, native)), pre.template,
                                    plain.alignment)
    assert score > 0.95 and unmirrored < score
    # Labels of the mirrored image (the label phantom, mirrored) on the model grid are the
    # template-side labels, and the model -> native chain is consistent with them.
    labels = phantom_label_function(points @ flip.T)
    on_grid = pre.apply_labels((labels, native), out)
    agree = np.mean(on_grid == phantom_labels(grid, (48, 48, 48)))
    assert agree > 0.97
    with pytest.raises(DazooInputError, match="mirror"):
        _config(mirror="auto")  # no alignment


def test_label_map_without_image_is_aligned_by_its_foreground(tmp_path, make_affine, rotation,
                                                             phantom_label_function,
                                                             world_points):
    """A label map with no image, moved by a known affine, lands back on the template's
    anatomy (its outline aligned to the template's foreground); a shift alone does not."""
    grid = pp.grid_affine(orientation="RAS", voxel_size=(2, 2, 2), shape=(48, 48, 48),
                          centre=(0, 0, 0))

    def anatomy(points):  # the octant ellipsoid and an off-centre lobe (no symmetry)
        lobe = (((points - np.array([14.0, -24.0, -18.0])) / np.array([14.0, 10.0, 9.0])) ** 2
                ).sum(-1) <= 1
        return np.where(lobe, 99, phantom_label_function(points)).astype(np.int32)

    expected = anatomy(world_points(grid, (48, 48, 48)))
    template = ndi.gaussian_filter((expected > 0).astype(np.float32) * 100, 1.0)
    io.write_image((template, grid), tmp_path / "tpl.nii.gz")
    truth = _random_affine(np.random.default_rng(5), rotation, degrees=30, scale=0.12)
    native = make_affine("LIA", (1.2, 1.0, 1.1), (96, 100, 92), centre=(8, -6, 4))
    inverse = np.linalg.inv(truth)
    points = world_points(native, (96, 100, 92))
    moved = anatomy(points @ inverse[:3, :3].T + inverse[:3, 3])
    io.write_labels((moved.astype(np.int16), native), tmp_path / "map.nii.gz")

    def mean_dice(placed):
        ids = [i for i in np.unique(expected) if i]
        return np.mean([2 * ((placed == i) & (expected == i)).sum()
                        / ((placed == i).sum() + (expected == i).sum()) for i in ids])

    aligned = pp.Preprocessor(_config(template="tpl.nii.gz", alignment="affine"),
                              root=tmp_path).apply_label_map(tmp_path / "map.nii.gz")
    shifted = pp.Preprocessor(_config(template="tpl.nii.gz", alignment="none"),
                              root=tmp_path).apply_label_map(tmp_path / "map.nii.gz")
    assert set(np.unique(aligned)) <= set(np.unique(expected))
    # Placed by the known affine, the regions (10-13 voxels across) agree at 0.94; the
    # outline's alignment is within about a voxel (2 mm) of it.
    assert mean_dice(aligned) > 0.78  # measured 0.80; a shift alone 0.66
    assert mean_dice(shifted) < mean_dice(aligned) - 0.1


def test_label_map_without_template_is_placed_by_its_field_of_view_like_its_scan(
        tmp_path, make_affine):
    """centre "fov", no template (the knee): a label map lands where apply() puts a scan on
    the same grid, so a map covering a scan's field of view is not shifted by its anatomy's
    centre of mass; on a grid of the map's own voxel size the round trip is exact."""
    from dazoo.postprocess import labels_to_native

    rng = np.random.default_rng(3)
    labels = np.zeros((30, 40, 36), np.int16)
    labels[2:12, 5:30, 4:20] = 1          # off-centre anatomy: its mass is not the FOV centre
    labels[6:9, 10:14, 8:30] = 5
    labels[rng.random(labels.shape) < 0.01] = 3
    affine = make_affine("RAS", (1.5, 0.75, 0.75), labels.shape, centre=(10, -20, 5))
    io.write_labels((labels, affine), tmp_path / "map.nii.gz")
    config = _config(voxel_size=(1.5, 0.75, 0.75), shape=(32, 48, 48), centre="fov")
    placed = pp.Preprocessor(config).apply_label_map(tmp_path / "map.nii.gz")
    scan = pp.Preprocessor(config).apply((labels.astype(np.float32), affine))
    to_native = scan.model_to_native
    expected = ndi.affine_transform(labels, to_native[:3, :3], to_native[:3, 3],
                                    output_shape=(32, 48, 48), order=0, cval=0)
    np.testing.assert_array_equal(placed, expected)
    np.testing.assert_array_equal(labels_to_native(placed, scan), labels)
