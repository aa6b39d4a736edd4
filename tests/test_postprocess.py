"""dazoo.postprocess: back to the native grid; world displacements; warping in native space."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from dazoo import io
from dazoo import postprocess as post
from dazoo import preprocess as pp
from dazoo.errors import DazooInputError


def _preprocessor(voxel_size, shape, **kwargs):
    return pp.Preprocessor(pp.PreprocessConfig(voxel_size=voxel_size, shape=shape, levels=2,
                                               intensity={"method": "none"}, **kwargs))


def _inside(points: np.ndarray, shape, margin: float) -> np.ndarray:
    return np.all((points >= margin) & (points <= np.array(shape) - 1 - margin), axis=-1)


def _covered(pre: pp.Preprocessed, margin: float = 1.0) -> np.ndarray:
    """Native voxels whose model-grid position lies inside the model grid (by ``margin``
    voxels) and that are ``2 * margin`` voxels inside the native grid (so that their model
    neighbours were sampled inside the native field of view)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in pre.native_shape], indexing="ij"), -1)
    model = index @ pre.native_to_model[:3, :3].T + pre.native_to_model[:3, 3]
    return _inside(model, pre.array.shape, margin) & _inside(index, pre.native_shape, 2 * margin)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("codes, spacing, model_spacing", [
    ("LIA", (1.0, 1.2, 1.5), (1.0, 1.5, 1.2)),
    ("ASL", (1.5, 1.0, 1.25), (1.25, 1.5, 1.0)),
])
def test_round_trip_exact_at_native_resolution(make_affine, phantom, phantom_labels, codes,
                                               spacing, model_spacing):
    """Model grid with the input's own lattice: images and labels come back unchanged."""
    shape = (60, 52, 44)
    affine = make_affine(codes, spacing, shape, centre=(2.3, -1.1, 0.7))
    image, ids = phantom(affine, shape), phantom_labels(affine, shape)
    pre = _preprocessor(model_spacing, (48, 48, 44))
    out = pre.apply((image, affine))
    covered = _covered(out, margin=0.0)
    assert covered.mean() > 0.5
    back = post.image_to_native(out.array, out)
    np.testing.assert_allclose(back[covered], image[covered], atol=1e-4)
    np.testing.assert_array_equal(back[~covered], 0)
    labels_back = post.labels_to_native(pre.apply_labels((ids, affine), out), out)
    np.testing.assert_array_equal(labels_back[covered], ids[covered])
    assert labels_back.dtype == np.int32 and labels_back.shape == shape


@pytest.mark.parametrize("codes", ["LIA", "ASL"])
def test_round_trip_oblique_anisotropic(make_affine, phantom, phantom_labels, rotation, codes):
    """Oblique, anisotropic input, model grid at another resolution: identity in world."""
    shape = (104, 88, 68)
    affine = make_affine(codes, (1.1, 1.3, 1.7), shape, rotation(23, (1, 2, -1)), centre=(4, -2, 3))
    image, ids = phantom(affine, shape), phantom_labels(affine, shape)
    pre = _preprocessor((0.9, 0.9, 0.9), (120, 124, 104))
    out = pre.apply((image, affine))
    covered = _covered(out)
    assert covered[image > 10].mean() > 0.99  # the object is inside the model grid
    back = post.image_to_native(out.array, out)
    error = np.abs(back - image)[covered]
    assert error.mean() < 0.005 * image.max() and error.max() < 0.05 * image.max()
    # labels through the network's usual outputs: one-hot probabilities, and integer labels
    on_model = pre.apply_labels((ids, affine), out)
    classes = np.searchsorted(np.array((0,) + tuple(sorted(set(ids.ravel()) - {0}))), on_model)
    onehot = np.eye(classes.max() + 1, dtype=np.float32)[classes]
    from_probabilities = post.labels_to_native(onehot, out)
    from_labels = post.labels_to_native(on_model, out)
    truth = np.searchsorted(np.unique(ids), ids)
    assert (from_probabilities == truth).mean() > 0.98
    assert (from_labels == ids).mean() > 0.98


def test_round_trip_through_an_aligned_template(tmp_path, make_affine, phantom, phantom_labels,
                                                phantom_function, world_points, rotation):
    grid = pp.grid_affine(orientation="RAS", voxel_size=(1.5, 1.5, 1.5), shape=(72, 72, 68),
                          centre=(0, 0, 0))
    io.write_image((phantom(grid, (72, 72, 68)), grid), tmp_path / "template.nii.gz")
    motion = np.eye(4)
    motion[:3, :3] = rotation(12, (0, 1, 1)) * 1.05
    motion[:3, 3] = [6, -8, 4]
    shape = (80, 72, 64)
    affine = make_affine("LIA", (1.2, 1.4, 1.6), shape, centre=(5, -5, 5))
    inverse = np.linalg.inv(motion)
    points = world_points(affine, shape)
    image = phantom_function(points @ inverse[:3, :3].T + inverse[:3, 3]).astype(np.float32)
    pre = _preprocessor((1.5, 1.5, 1.5), (72, 72, 68), template="template.nii.gz",
                        alignment="affine")
    pre.root = str(tmp_path)
    out = pre.apply((image, affine))
    assert not np.allclose(out.alignment, np.eye(4), atol=0.1)
    back = post.image_to_native(out.array, out)
    covered = _covered(out)
    error = np.abs(back - image)[covered]
    assert error.mean() < 0.01 * image.max()


def test_probabilities_match_independent_reference(make_affine, rotation):
    rng = np.random.default_rng(0)
    scores = ndi.gaussian_filter(rng.random((16, 16, 16, 4)), (2, 2, 2, 0)).astype(np.float32)
    affine = make_affine("PSR", (1.7, 1.3, 2.1), (20, 22, 18), rotation(30, (1, 0, 1)))
    pre = _preprocessor((2, 2, 2), (16, 16, 16))
    out = pre.apply((np.random.default_rng(1).random((20, 22, 18)) + 1, affine))
    result = post.labels_to_native(scores, out)
    np.testing.assert_array_equal(result, _scipy_argmax(scores, affine, (20, 22, 18), out))


def _scipy_argmax(scores, affine, shape, out):
    """The independent reference: every channel resampled by scipy (linear, background
    outside the model grid) onto the native grid, then the argmax."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    model = (world - out.affine[:3, 3]) @ np.linalg.inv(out.affine[:3, :3]).T
    channels = [ndi.map_coordinates(scores[..., k], model.reshape(-1, 3).T, order=1,
                                    cval=1.0 if k == 0 else 0.0).reshape(world.shape[:3])
                for k in range(scores.shape[-1])]
    return np.argmax(np.stack(channels, -1), -1)


@pytest.mark.parametrize("sharpness", [1.0, 30.0])
def test_probabilities_of_many_classes_match_independent_reference(make_affine, rotation,
                                                                   sharpness):
    """Softmax probabilities of 12 classes, spread out (most resampled voxels interpolated
    over every class) and sharp (most decided by the corners' winners alone, see
    ``_argmax_resample``): the argmax of scipy's per-channel linear resampling, voxel for
    voxel."""
    rng = np.random.default_rng(2)
    logits = ndi.gaussian_filter(rng.normal(size=(16, 16, 16, 12)), (1.5, 1.5, 1.5, 0))
    scores = np.exp(sharpness * logits / logits.std())
    scores = (scores / scores.sum(-1, keepdims=True)).astype(np.float32)
    affine = make_affine("LIA", (0.9, 1.1, 1.3), (30, 28, 26), rotation(20, (0, 1, 1)))
    pre = _preprocessor((2, 2, 2), (16, 16, 16))
    out = pre.apply((np.random.default_rng(3).random((30, 28, 26)) + 1, affine))
    result = post.labels_to_native(scores, out)
    expected = _scipy_argmax(scores, affine, (30, 28, 26), out)
    assert len(np.unique(expected)) == 12
    np.testing.assert_array_equal(result, expected)


def test_denormalise_and_shape_errors(make_affine, phantom):
    affine = make_affine("RAS", (2, 2, 2), (24, 24, 24))
    image = phantom(affine, (24, 24, 24))
    pre = pp.Preprocessor(pp.PreprocessConfig(voxel_size=(2, 2, 2), shape=(24, 24, 24), levels=3,
                                              intensity={"method": "zscore"}))
    out = pre.apply((image, affine))
    covered = _covered(out, margin=0.0)
    back = post.image_to_native(out.array[..., None], out, denormalise=True)
    np.testing.assert_allclose(back[covered], image[covered], atol=1e-3)
    with pytest.raises(DazooInputError, match="does not match the model grid"):
        post.image_to_native(out.array[:-1], out)
    with pytest.raises(DazooInputError, match="does not match the model grid"):
        post.labels_to_native(np.zeros((24, 24, 23), np.int32), out)
    with pytest.raises(DazooInputError, match="must be integers"):
        post.labels_to_native(np.full((24, 24, 24), 0.5), out)


# ----------------------------------------------------------------------------- displacements
@pytest.fixture
def registration_case(make_affine, phantom, phantom_function, phantom_labels,
                      phantom_label_function, world_points, rotation, tmp_path):
    """A fixed and a moving phantom (moved by a known affine), preprocessed with a template
    (headers only), and the exact model-grid displacement that registers them."""
    grid = pp.grid_affine(orientation="RAS", voxel_size=(2, 2, 2), shape=(56, 56, 52),
                          centre=(1, -1, 0))
    io.write_image((phantom(grid, (56, 56, 52)), grid), tmp_path / "template.nii.gz")
    motion = np.eye(4)
    motion[:3, :3] = rotation(8, (1, 1, 0)) @ np.diag([1.04, 0.97, 1.0])
    motion[:3, 3] = [3.0, -2.0, 4.0]
    fixed_affine = make_affine("LIA", (1.5, 1.7, 1.6), (72, 64, 68), centre=(2, 1, -1))
    moving_affine = make_affine("ASL", (1.6, 1.4, 1.8), (76, 64, 72), rotation(10, (0, 0, 1)),
                                centre=(-3, 2, 1))
    inverse = np.linalg.inv(motion)
    moving_points = world_points(moving_affine, (76, 64, 72))
    moved_back = moving_points @ inverse[:3, :3].T + inverse[:3, 3]
    fixed = io.Volume(phantom(fixed_affine, (72, 64, 68)), fixed_affine)
    moving = io.Volume(phantom_function(moved_back).astype(np.float32), moving_affine)
    moving_ids = io.Volume(phantom_label_function(moved_back), moving_affine)
    pre = _preprocessor((2, 2, 2), (56, 56, 52), template="template.nii.gz")
    pre.root = str(tmp_path)
    fixed_pre, moving_pre = pre.apply(fixed), pre.apply(moving)
    # moving_model(w) = phantom(inv(motion) A w) and fixed_model(v) = phantom(A v), so
    # u(v) = inv(A) motion A v - v makes moved = fixed.
    matrix = np.linalg.inv(grid) @ motion @ grid
    index = world_points(np.eye(4), (56, 56, 52))
    u = (index @ matrix[:3, :3].T + matrix[:3, 3] - index).astype(np.float32)
    return {"fixed": fixed, "moving": moving, "moving_ids": moving_ids, "motion": motion,
            "fixed_pre": fixed_pre, "moving_pre": moving_pre, "u": u,
            "fixed_ids": phantom_labels(fixed_affine, (72, 64, 68)), "tmp": tmp_path}


def test_displacement_to_world_is_the_known_motion(registration_case, world_points):
    case = registration_case
    field = post.displacement_to_world(case["u"], case["fixed_pre"], case["moving_pre"])
    fixed = case["fixed"]
    assert field.shape == fixed.shape + (3,) and field.dtype == np.float32
    points = world_points(fixed.affine, fixed.shape)
    motion = case["motion"]
    expected = points @ motion[:3, :3].T + motion[:3, 3] - points
    covered = _covered(case["fixed_pre"], margin=0.0)
    np.testing.assert_allclose(field[covered], expected[covered], atol=1e-3)
    lps = post.displacement_to_world(case["u"], case["fixed_pre"], case["moving_pre"],
                                      frame="LPS")
    np.testing.assert_allclose(lps, field * [-1, -1, 1])


def test_zero_and_constant_displacements(make_affine, phantom):
    affine = make_affine("ASL", (1.2, 1.5, 1.0), (40, 36, 44))
    pre = _preprocessor((2, 2, 2), (32, 32, 32))
    out = pre.apply((phantom(affine, (40, 36, 44)), affine))
    zero = post.displacement_to_world(np.zeros((32, 32, 32, 3), np.float32), out, out)
    np.testing.assert_allclose(zero, 0, atol=1e-4)
    one_voxel = np.zeros((32, 32, 32, 3), np.float32)
    one_voxel[..., 1] = 1.0  # one model voxel along the second (anterior) axis = 2 mm
    field = post.displacement_to_world(one_voxel, out, out)
    np.testing.assert_allclose(field.reshape(-1, 3), [[0.0, 2.0, 0.0]] * field[..., 0].size,
                               atol=1e-4)


def test_warp_native_registers_image_and_labels(registration_case):
    case = registration_case
    field = post.displacement_to_world(case["u"], case["fixed_pre"], case["moving_pre"])
    fixed = case["fixed"]
    covered = _covered(case["fixed_pre"], margin=0.0)
    moved = post.warp_native(case["moving"], field, fixed.affine, order=1)
    error = np.abs(moved - fixed.array)[covered]
    assert error.mean() < 0.005 * fixed.array.max()
    moved_ids = post.warp_native(case["moving_ids"], io.Volume(field, fixed.affine), order=0)
    assert moved_ids.dtype == np.int32
    assert (moved_ids == case["fixed_ids"])[covered].mean() > 0.98
    foreground = covered & (case["fixed_ids"] > 0)
    assert (moved_ids == case["fixed_ids"])[foreground].mean() > 0.95
    unwarped = post.warp_native(case["moving_ids"], field * 0, fixed.affine, order=0)
    assert (unwarped == case["fixed_ids"])[foreground].mean() < 0.8  # the motion matters


def test_written_field_drives_simpleitk_identically(registration_case, world_points):
    """The file written with the ITK convention warps the same way in SimpleITK."""
    sitk = pytest.importorskip("SimpleITK")
    case = registration_case
    folder, fixed = case["tmp"], case["fixed"]
    field = post.displacement_to_world(case["u"], case["fixed_pre"], case["moving_pre"])
    io.write_displacement((field, fixed.affine), folder / "field.nii.gz")
    io.write_image(case["moving"], folder / "moving.nii.gz")
    io.write_image(fixed, folder / "fixed.nii.gz")
    transform = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.ReadImage(str(folder / "field.nii.gz")), sitk.sitkVectorFloat64))
    reference = sitk.ReadImage(str(folder / "fixed.nii.gz"))
    warped = sitk.Resample(sitk.ReadImage(str(folder / "moving.nii.gz")), reference, transform,
                           sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    expected = sitk.GetArrayFromImage(warped).transpose(2, 1, 0)
    ours = post.warp_native(case["moving"], field, fixed.affine, order=1)
    # compare where the warped point is inside the moving grid (ITK and scipy differ on how
    # far beyond the last voxel centre they interpolate)
    target = (world_points(fixed.affine, fixed.shape) + field - case["moving"].affine[:3, 3]) @ (
        np.linalg.inv(case["moving"].affine[:3, :3]).T)
    covered = _covered(case["fixed_pre"], margin=1.0) & _inside(target, case["moving"].shape, 1)
    np.testing.assert_allclose(ours[covered], expected[covered], atol=1e-2 * fixed.array.max())


def test_displacement_errors(registration_case):
    case = registration_case
    with pytest.raises(DazooInputError, match="shape"):
        post.displacement_to_world(case["u"][:-1], case["fixed_pre"], case["moving_pre"])
    with pytest.raises(DazooInputError, match="frame"):
        post.displacement_to_world(case["u"], case["fixed_pre"], case["moving_pre"], frame="XYZ")
    with pytest.raises(DazooInputError, match="affine"):
        post.warp_native(case["moving"], np.zeros((4, 4, 4, 3)))


# ----------------------------------------------------------------------------- real data
@pytest.mark.data
def test_real_round_trip_is_exact_at_native_resolution(data_root):
    """A Mindboggle label map (ASL, 1 mm) -> RAS 1 mm model grid -> back: unchanged."""
    subject = data_root / "mindboggle-oasis-trt20" / "OASIS-TRT-20-10"
    if not subject.is_dir():
        pytest.skip(f"{subject} not found")
    image = io.read_image(subject / "t1weighted_brain.nii.gz")
    labels = io.read_labels(subject / "labels.DKT31.manual+aseg.nii.gz", like=image)
    pre = pp.Preprocessor(pp.PreprocessConfig(voxel_size=(1, 1, 1), shape=(160, 192, 160)))
    out = pre.apply(image)
    assert out.array.shape == (160, 192, 160) and 0 <= out.array.min() < out.array.max() <= 1
    back = post.labels_to_native(pre.apply_labels(labels, out), out)
    np.testing.assert_array_equal(back, labels.array)  # the whole brain fits the model grid
    image_back = post.image_to_native(out.array, out, denormalise=True)
    inside = (back > 0) & (image.array < out.intensity[0] + out.intensity[1])  # not clipped
    np.testing.assert_allclose(image_back[inside], image.array[inside], rtol=1e-5, atol=1e-2)


def test_keep_largest_component_by_hand():
    """Of id 1's three pieces only the largest is kept (a corner-touching cube joins it: 26
    connectivity), id 2's two pieces stay when not asked for, and the input is untouched."""
    labels = np.zeros((20, 20, 20), np.int16)
    labels[2:8, 2:8, 2:8] = 1          # 216 voxels
    labels[8:10, 8:10, 8:10] = 1       # 8 voxels touching its corner: the same piece
    labels[14:17, 14:17, 14:17] = 1    # 27 voxels, apart: removed
    labels[2:4, 14:16, 2:4] = 2
    labels[16:18, 2:4, 14:16] = 2
    before = labels.copy()
    out = post.keep_largest_component(labels, [1])
    np.testing.assert_array_equal(labels, before)
    expected = before.copy()
    expected[14:17, 14:17, 14:17] = 0
    np.testing.assert_array_equal(out, expected)
    assert (out == 2).sum() == 16
    both = post.keep_largest_component(labels, [1, 2, 7])    # 7: absent, ignored
    assert (both == 2).sum() == 8 and (both == 1).sum() == 224


def test_threads_give_the_serial_results(registration_case, monkeypatch):
    """The resampling in slabs over threads (``DAZOO_THREADS``, dazoo.parallel) gives what one
    thread gives, bit for bit: the slabs depend on the shape, not on the threads. Small
    chunks: many slabs of uneven length for the point-wise functions."""
    case = registration_case
    fixed_pre, moving_pre, fixed = case["fixed_pre"], case["moving_pre"], case["fixed"]
    rng = np.random.default_rng(4)
    scores = ndi.gaussian_filter(rng.random(fixed_pre.array.shape + (5,)), (2, 2, 2, 0))
    scores = scores.astype(np.float32)
    ids = rng.integers(0, 7, fixed_pre.array.shape).astype(np.int32)

    def everything():
        field = post.displacement_to_world(case["u"], fixed_pre, moving_pre)
        return {"field": field,
                "moved": post.warp_native(case["moving"], field, fixed.affine, order=1),
                "moved_ids": post.warp_native(case["moving_ids"], field, fixed.affine, order=0),
                "argmax": post.labels_to_native(scores, fixed_pre),
                "labels": post.labels_to_native(ids, fixed_pre),
                "image": post.image_to_native(fixed_pre.array, fixed_pre),
                "probabilities": post.probabilities_to_native(scores, fixed_pre)}

    monkeypatch.setenv("DAZOO_THREADS", "1")
    serial = everything()
    monkeypatch.setenv("DAZOO_THREADS", "3")
    monkeypatch.setattr(post, "_CHUNK", 5000)  # slabs of a row or two
    threaded = everything()
    for name in serial:
        np.testing.assert_array_equal(threaded[name], serial[name], err_msg=name)
    assert np.abs(serial["field"]).max() > 1  # a real motion, not zeros


def test_slab_resampling_is_scipys():
    """``_affine_transform``'s slabs against one SciPy call on an oblique, scaled matrix:
    linear values to float32 rounding; nearest neighbour equal but at exact ties."""
    rng = np.random.default_rng(5)
    volume = rng.random((30, 26, 22)).astype(np.float32)
    ids = rng.integers(0, 9, (30, 26, 22)).astype(np.int32)
    matrix = np.eye(4)  # scaled, sheared, shifted; not round numbers (ties: rare)
    matrix[:3, :3] = np.diag([0.61, 0.7, 0.55]) + rng.uniform(-0.06, 0.06, (3, 3))
    matrix[:3, 3] = rng.uniform(-1.5, 2.5, 3)
    shape = (41, 33, 35)
    linear = post._affine_transform(volume, matrix, shape, dtype=np.float32, order=1,
                                    mode="nearest", prefilter=False)
    np.testing.assert_allclose(linear, ndi.affine_transform(
        volume, matrix, output_shape=shape, order=1, mode="nearest", prefilter=False),
        atol=1e-5)
    nearest = post._affine_transform(ids, matrix, shape, dtype=np.int32, order=0, cval=0)
    reference = ndi.affine_transform(ids, matrix, output_shape=shape, order=0, cval=0)
    assert (nearest == reference).mean() > 0.999
