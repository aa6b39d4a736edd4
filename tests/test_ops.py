"""dazoo.ops against scipy.ndimage, hand-computed cases and VoxelMorph 0.2's own outputs."""
import pathlib

import numpy as np
import pytest
from scipy import ndimage

from dazoo import ops as dops

VXM = pathlib.Path(__file__).parent / "data" / "voxelmorph-0.2"


def scipy_warp(image, displacement, order):
    """Reference pull-back warp of a (B, D, H, W, C) batch with map_coordinates."""
    out = np.empty_like(image)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape[1:4]], indexing="ij"))
    for b in range(image.shape[0]):
        points = grid + np.moveaxis(displacement[b], -1, 0)
        for c in range(image.shape[-1]):
            out[b, ..., c] = ndimage.map_coordinates(image[b, ..., c], points, order=order,
                                                     mode="nearest")
    return out


@pytest.fixture
def random_pair():
    rng = np.random.default_rng(0)
    image = rng.random((2, 9, 11, 7, 3)).astype(np.float32)
    displacement = rng.normal(scale=3.0, size=(2, 9, 11, 7, 3)).astype(np.float32)
    return image, displacement


def test_linear_warp_matches_scipy(random_pair):
    image, displacement = random_pair
    got = np.asarray(dops.warp(image, displacement))
    np.testing.assert_allclose(got, scipy_warp(image, displacement, order=1), atol=1e-5)


def test_nearest_warp_matches_scipy(random_pair):
    image, displacement = random_pair
    got = np.asarray(dops.warp(image, displacement, method="nearest"))
    np.testing.assert_allclose(got, scipy_warp(image, displacement, order=0), atol=1e-5)


@pytest.mark.parametrize("method", ["linear", "nearest"])
def test_zero_displacement_is_identity(random_pair, method):
    image, _ = random_pair
    got = np.asarray(dops.warp(image, np.zeros(image.shape[:-1] + (3,), np.float32),
                               method=method))
    np.testing.assert_array_equal(got, image)


def test_integer_shift_equals_slicing(random_pair):
    image, _ = random_pair
    shift = (2, -3, 1)
    displacement = np.broadcast_to(np.array(shift, np.float32), image.shape[:-1] + (3,))
    got = np.asarray(dops.warp(image, displacement))
    # out[x] = image[x + shift]: compare where x + shift stays inside the volume.
    np.testing.assert_array_equal(got[:, :-2, 3:, :-1], image[:, 2:, :-3, 1:])


def test_fill_value_outside(random_pair):
    image, _ = random_pair
    displacement = np.zeros(image.shape[:-1] + (3,), np.float32)
    displacement[..., 0] = 100.0
    got = np.asarray(dops.warp(image, displacement, fill_value=-1.0))
    np.testing.assert_array_equal(got, -np.ones_like(image))


def test_interpolate_shared_points_match_per_sample_points(random_pair):
    image, displacement = random_pair
    points = np.asarray(dops.identity_grid(image.shape[1:4])) + displacement[0]
    shared = np.asarray(dops.interpolate(image, points))
    per_sample = np.asarray(dops.interpolate(image, np.stack([points, points])))
    np.testing.assert_array_equal(shared, per_sample)


def test_integrate_zero_and_constant_fields():
    zero = np.zeros((1, 8, 8, 8, 3), np.float32)
    np.testing.assert_array_equal(np.asarray(dops.integrate_velocity(zero, steps=7)), zero)
    constant = np.broadcast_to(np.array([1.5, -0.75, 0.25], np.float32), zero.shape)
    got = np.asarray(dops.integrate_velocity(constant, steps=7))
    np.testing.assert_allclose(got, constant, atol=1e-5)


def test_integrated_field_inverts_with_negated_velocity():
    """exp(v) composed with exp(-v) is close to the identity for a smooth small field."""
    x = np.linspace(0, np.pi, 16)
    field = np.stack(np.meshgrid(x, x, x, indexing="ij"), -1)
    velocity = (1.5 * np.sin(field)).astype(np.float32)[None]
    forward = dops.integrate_velocity(velocity, steps=7)
    backward = dops.integrate_velocity(-velocity, steps=7)
    composed = np.asarray(backward + dops.warp(forward, backward))
    assert np.abs(composed[:, 3:-3, 3:-3, 3:-3]).max() < 0.05


def test_rescale_displacement_scales_vectors_and_grid():
    constant = np.broadcast_to(np.array([2.0, -1.0, 0.5], np.float32), (1, 8, 10, 6, 3))
    half = np.asarray(dops.rescale_displacement(constant, 0.5))
    assert half.shape == (1, 4, 5, 3, 3)
    np.testing.assert_allclose(half, constant[:, :4, :5, :3] * 0.5, atol=1e-6)
    double = np.asarray(dops.rescale_displacement(half, 2.0))
    np.testing.assert_allclose(double, constant, atol=1e-6)


def test_resize_is_corner_aligned_linear():
    volume = np.arange(5, dtype=np.float32).reshape(1, 5, 1, 1, 1) * np.ones((1, 5, 2, 2, 1))
    got = np.asarray(dops.resize(volume.astype(np.float32), 2.0))
    assert got.shape == (1, 10, 4, 4, 1)
    np.testing.assert_allclose(got[0, :, 0, 0, 0], np.linspace(0, 4, 10), atol=1e-6)


@pytest.mark.parametrize("shape, factor", [((2, 7, 9, 5, 2), 2.0), ((1, 8, 10, 6, 3), 0.5),
                                           ((1, 5, 6, 7, 1), 1.5)])
def test_separable_resize_equals_interpolation_on_the_grid_with_its_gradient(shape, factor):
    # the definition: multilinear interpolation at linspace(0, n - 1, int(n * factor))
    import tensorflow as tf

    volume = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    axes = [np.linspace(0, n - 1, int(n * factor)) for n in shape[1:4]]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)
    expected = np.stack([np.stack([ndimage.map_coordinates(volume[b, ..., c],
                                                           np.moveaxis(points, -1, 0), order=1,
                                                           mode="nearest")
                                   for c in range(shape[-1])], axis=-1)
                         for b in range(shape[0])])
    x = tf.constant(volume)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        got = dops.resize(x, factor)
        reference = dops.interpolate(x, tf.constant(points))
        weights = tf.constant(np.random.default_rng(4).normal(size=got.shape).astype(np.float32))
        loss, loss_ref = tf.reduce_sum(got * weights), tf.reduce_sum(reference * weights)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), tape.gradient(loss_ref, x).numpy(),
                               atol=1e-5)


def test_unit_segment_sum_equals_bincount_is_deterministic_and_its_gradient_is_a_gather():
    import tensorflow as tf

    rng = np.random.default_rng(8)
    ids = rng.integers(0, 7, 5000).astype(np.int32)
    values = rng.random(5000).astype(np.float32)
    x = tf.constant(values)
    with tf.GradientTape() as tape:
        tape.watch(x)
        sums = dops.unit_segment_sum(x, tf.constant(ids), 9)        # bins 7, 8 stay empty
        loss = tf.reduce_sum(sums * tf.range(9, dtype=tf.float32) ** 2)
    np.testing.assert_allclose(sums.numpy(), np.bincount(ids, weights=values, minlength=9),
                               rtol=1e-6)
    np.testing.assert_array_equal(tape.gradient(loss, x).numpy(), ids.astype(np.float32) ** 2)
    # many values into few bins, run again: bit for bit the same (a float bincount is not)
    ids = tf.constant(rng.integers(0, 63, 2_000_000).astype(np.int32))
    values = tf.constant(rng.random(2_000_000).astype(np.float32))
    runs = [dops.unit_segment_sum(values, ids, 63).numpy() for _ in range(4)]
    for other in runs[1:]:
        np.testing.assert_array_equal(other, runs[0])


@pytest.fixture(scope="module")
def vxm():
    return np.load(VXM / "inputs.npz"), np.load(VXM / "outputs.npz")


@pytest.mark.parametrize("name, image_key, method", [
    ("warp_linear", "vol", "linear"),
    ("warp_linear_3ch", "vol3", "linear"),
    ("warp_nearest", "vol", "nearest"),
])
def test_warp_matches_voxelmorph(vxm, name, image_key, method):
    inputs, outputs = vxm
    got = np.asarray(dops.warp(inputs[image_key], inputs["flow"], method=method))
    np.testing.assert_allclose(got, outputs[name], atol=1e-5)


def test_vecint_matches_voxelmorph(vxm):
    inputs, outputs = vxm
    got = np.asarray(dops.integrate_velocity(inputs["svf"], steps=7))
    np.testing.assert_allclose(got, outputs["vecint_7"], atol=1e-5)


def test_rescale_matches_voxelmorph(vxm):
    inputs, outputs = vxm
    half = np.asarray(dops.rescale_displacement(inputs["flow"], 0.5))
    np.testing.assert_allclose(half, outputs["rescale_half"], atol=1e-5)
    double = np.asarray(dops.rescale_displacement(outputs["rescale_half"], 2.0))
    np.testing.assert_allclose(double, outputs["rescale_double"], atol=1e-5)


def test_identity_grid_is_the_voxel_coordinates_and_no_graph_constant():
    import keras

    grid = np.asarray(keras.ops.convert_to_numpy(dops.identity_grid((3, 4, 5))))
    assert grid.dtype == np.float32 and grid.shape == (3, 4, 5, 3)
    np.testing.assert_array_equal(grid, np.stack(np.indices((3, 4, 5)), -1))
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    # traced, the warp's grid must be computed, not stored: a 32^3 grid is 393 kB of
    # float32, which a constant would serialise into the graph (and slow every trace)
    spec = tf.TensorSpec((1, 32, 32, 32, 3), tf.float32)
    graph = tf.function(lambda u: dops.warp(u, u)).get_concrete_function(spec).graph
    assert graph.as_graph_def().ByteSize() < 100_000


def test_warped_label_overlap_equals_the_one_hot_warp():
    rng = np.random.default_rng(5)
    k = 5
    labels = rng.integers(0, k, (2, 9, 10, 8)).astype(np.int32)
    displacement = rng.normal(scale=2.0, size=(2, 9, 10, 8, 3)).astype(np.float32)
    target = rng.random((2, 9, 10, 8, k)).astype(np.float32)
    moved = np.asarray(dops.warp(np.eye(k, dtype=np.float32)[labels], displacement))
    intersection, moved_sum = dops.warped_label_overlap(labels, displacement, target, k)
    np.testing.assert_allclose(np.asarray(intersection), (moved * target).sum(axis=(1, 2, 3)),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(moved_sum), moved.sum(axis=(1, 2, 3)), rtol=1e-5)
    # ids outside 0..K-1 (e.g. -1, K) are no class: their one-hot is all zeros
    odd = np.where(rng.random(labels.shape) < 0.2, rng.choice([-1, k, k + 3], labels.shape),
                   labels).astype(np.int32)
    one_hot = (odd[..., None] == np.arange(k)).astype(np.float32)
    moved = np.asarray(dops.warp(one_hot, displacement))
    for fixed_point in (False, True):
        intersection, moved_sum = dops.warped_label_overlap(odd, displacement, target, k,
                                                            fixed_point=fixed_point)
        np.testing.assert_allclose(np.asarray(intersection),
                                   (moved * target).sum(axis=(1, 2, 3)), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(moved_sum), moved.sum(axis=(1, 2, 3)), rtol=1e-5)


def test_warped_one_hot_equals_the_one_hot_warp_with_its_gradient():
    import tensorflow as tf

    rng = np.random.default_rng(6)
    k = 5
    # Ids -1 and k are outside 0..K-1: all-zero one-hot rows, in both forms.
    labels = rng.integers(-1, k + 1, (2, 9, 10, 8)).astype(np.int32)
    displacement = tf.constant(rng.normal(scale=2.0, size=(2, 9, 10, 8, 3)).astype(np.float32))
    one_hot = tf.one_hot(labels, k)
    upstream = tf.constant(rng.random((2, 9, 10, 8, k)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(displacement)
        reference = dops.warp(one_hot, displacement)
        fast = dops.warped_one_hot(labels, displacement, k)
        losses = [tf.reduce_sum(reference * upstream), tf.reduce_sum(fast * upstream)]
    np.testing.assert_allclose(np.asarray(fast), np.asarray(reference), atol=1e-6)
    np.testing.assert_allclose(np.asarray(tape.gradient(losses[1], displacement)),
                               np.asarray(tape.gradient(losses[0], displacement)),
                               rtol=1e-4, atol=1e-5)


def test_warp_adjoint_labels_gives_the_soft_dice_sums_of_a_warped_volume():
    rng = np.random.default_rng(7)
    k = 4
    labels = rng.integers(0, k, (2, 9, 10, 8)).astype(np.int32)
    displacement = rng.normal(scale=2.0, size=(2, 9, 10, 8, 3)).astype(np.float32)
    volume = rng.random((2, 9, 10, 8, k)).astype(np.float32)
    moved = np.asarray(dops.warp(volume, displacement))
    adjoint, weight = (np.asarray(t) for t in dops.warp_adjoint_labels(labels, displacement, k))
    one_hot = np.eye(k, dtype=np.float32)[labels]
    np.testing.assert_allclose((volume * adjoint).sum(axis=(1, 2, 3)),
                               (one_hot * moved).sum(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose((volume * weight[..., None]).sum(axis=(1, 2, 3)),
                               moved.sum(axis=(1, 2, 3)), rtol=1e-5)
    # Every voxel's eight weights sum to one: the adjoint conserves the total weight.
    assert weight.sum(axis=(1, 2, 3)) == pytest.approx([9 * 10 * 8] * 2, rel=1e-5)


def test_softmax_class_sums_chunked_equal_the_plain_composition():
    """The chunked, recomputing custom gradient (TensorFlow) equals automatic
    differentiation of softmax(features @ W + b) followed by the sums: values and gradients
    w.r.t. the features, the kernel and the bias, for every kind of target."""
    import tensorflow as tf

    from dazoo import ops as dops

    rng = np.random.default_rng(0)
    b, shape, c, k = 2, (6, 5, 7), 4, 5
    n = int(np.prod(shape))
    features = tf.constant(rng.normal(size=(b, *shape, c)).astype(np.float32))
    kernel = tf.constant(rng.normal(size=(1, 1, 1, c, k)).astype(np.float32))
    bias = tf.constant(rng.normal(size=(k,)).astype(np.float32))
    classes = rng.integers(-1, k + 1, (b, *shape)).astype(np.int32)  # some ids out of range
    corner_labels = rng.integers(0, k, (b, n, 8)).astype(np.int32)
    corner_weights = rng.random((b, n, 8)).astype(np.float32)
    flat = classes.reshape(b, -1)
    valid = ((flat >= 0) & (flat < k)).astype(np.float32)
    dense = rng.random((b, *shape, k)).astype(np.float32)
    weight = rng.random((b, *shape)).astype(np.float32)
    mix = [rng.normal(size=(b, k)).astype(np.float32) for _ in range(5)] + [
        rng.normal(size=(b,)).astype(np.float32)]

    def run(chunked):
        with tf.GradientTape() as tape:
            tape.watch([features, kernel, bias])
            if chunked:
                out = dops.softmax_class_sums(
                    features, kernel, bias, sparse=[(flat[..., None], valid[..., None]),
                                                    (corner_labels, corner_weights)],
                    dense=dense, weight=weight, log_classes=classes, chunk=37)
            else:  # the plain composition, differentiated by TensorFlow
                logits = tf.einsum("bnc,ck->bnk", tf.reshape(features, (b, n, c)),
                                   tf.reshape(kernel, (c, k))) + bias
                p = tf.nn.softmax(logits, axis=-1)
                onehot = tf.one_hot(np.clip(flat, 0, k - 1), k) * valid[..., None]
                corners = tf.reduce_sum(tf.one_hot(corner_labels, k)
                                        * corner_weights[..., None], axis=2)
                at_class = tf.reduce_sum(p * onehot, axis=-1)
                log_likelihood = tf.reduce_sum(
                    tf.math.log(tf.clip_by_value(at_class + (1 - valid), 1e-7, 1.0)) * valid, 1)
                out = {"sum": tf.reduce_sum(p, 1),
                       "sparse": [tf.reduce_sum(p * onehot, 1), tf.reduce_sum(p * corners, 1)],
                       "dense": tf.reduce_sum(p * dense.reshape(b, n, k), 1),
                       "weighted": tf.reduce_sum(p * weight.reshape(b, n, 1), 1),
                       "log_likelihood": log_likelihood}
            values = [out["sum"], *out["sparse"], out["dense"], out["weighted"],
                      out["log_likelihood"]]
            total = sum(tf.reduce_sum(v * m) for v, m in zip(values, mix))
        return values, tape.gradient(total, [features, kernel, bias])

    (fast, fast_grads), (plain, plain_grads) = run(True), run(False)
    for a, e in zip(fast, plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-4)
    for a, e in zip(fast_grads, plain_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-4)
    assert float(tf.reduce_max(tf.abs(fast_grads[0]))) > 1e-3
