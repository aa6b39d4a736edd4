"""Anatomy-guided test-time refinement (dazoo.refine): recovers a known deformation from the
image term and from the anatomy term alone, stays diffeomorphic, and plugs into register."""
import numpy as np
import pytest
import scipy.ndimage as ndi

from dazoo.metrics import jacobian_determinant
from dazoo.refine import refine_velocity

from test_pipeline import preset_dir, scans  # noqa: F401  (fixtures)

SHAPE = (24, 24, 24)
SHIFT = np.array([1.5, -1.0, 2.0])  # voxels


def _blobs(shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    image = ndi.gaussian_filter(rng.standard_normal(shape), 2.5)
    image = (image - image.min()) / (image.max() - image.min())
    return image.astype(np.float32)


def _shifted(volume, shift, order=1):
    """``out(x) = volume(x - shift)``: the moving image whose pull-back displacement onto
    ``volume`` is ``shift`` everywhere (``out(x + shift) = volume(x)``)."""
    return ndi.shift(volume, shift, order=order, mode="nearest")


def _soft(classes, k, sigma=1.5):
    """Smooth class probabilities (a blurred one-hot map), like a segmenter's output."""
    maps = np.stack([ndi.gaussian_filter((classes == c).astype(np.float32), sigma)
                     for c in range(k)], axis=-1)
    return (maps / maps.sum(-1, keepdims=True))[None].astype(np.float32)


@pytest.mark.parametrize("terms", ["image", "anatomy"])
def test_refinement_recovers_a_known_translation(terms):
    fixed = _blobs()
    moving = _shifted(fixed, SHIFT)
    # three classes by intensity (the anatomy), moved with the image
    classes_f = np.digitize(fixed, [0.4, 0.6])
    classes_m = np.digitize(moving, [0.4, 0.6])
    kwargs = dict(int_steps=5, int_resolution=2, learning_rate=0.1, smoothness=0.1)
    if terms == "image":
        probs = (None, None)
    else:  # anatomy only: the image term sees two constant images
        probs = (classes_m[None], _soft(classes_f, 3))
        moving = fixed = np.full(SHAPE, 0.5, np.float32)
    velocity = np.zeros((1, 12, 12, 12, 3), np.float32)
    # hard moving labels pull only where interpolation corners straddle a boundary: slower
    iterations = 60 if terms == "image" else 150
    u, history = refine_velocity(velocity, moving[None, ..., None], fixed[None, ..., None],
                                 *probs, iterations=iterations, anatomy=1.0, **kwargs)
    assert len(history) == iterations + 1 and history[-1]["loss"] < history[0]["loss"]
    inner = u[0, 6:-6, 6:-6, 6:-6]
    error = np.abs(inner.reshape(-1, 3).mean(axis=0) - SHIFT)
    assert np.all(error < 0.35), (inner.reshape(-1, 3).mean(axis=0), SHIFT)
    assert np.all(jacobian_determinant(u[0]) > 0)
    if terms == "anatomy":
        assert history[-1]["dice"] > history[0]["dice"] + 0.05


def test_without_the_final_loss_the_displacement_is_the_same():
    """``final_loss=False`` (what ``register`` asks) skips the loss after the last update,
    not the update: the same displacement, one history entry fewer."""
    rng = np.random.default_rng(3)
    velocity = rng.normal(0, 0.3, (1, 12, 12, 12, 3)).astype(np.float32)
    fixed, moving = _blobs()[None, ..., None], np.roll(_blobs(), 2, axis=0)[None, ..., None]
    kwargs = dict(iterations=4, int_steps=4, learning_rate=0.1)
    u, history = refine_velocity(velocity, moving, fixed, **kwargs)
    u_fast, history_fast = refine_velocity(velocity, moving, fixed, final_loss=False, **kwargs)
    np.testing.assert_allclose(u_fast, u, atol=1e-5)
    assert len(history_fast) == 4 and len(history) == 5
    assert [h["loss"] for h in history_fast] == pytest.approx([h["loss"] for h in history[:4]])
    assert np.abs(u_fast).max() > 0.1  # the updates moved it


def test_zero_iterations_is_the_network_output():
    velocity = np.random.default_rng(1).normal(0, 0.3, (1, 12, 12, 12, 3)).astype(np.float32)
    image = _blobs()[None, ..., None]
    u, history = refine_velocity(velocity, image, image, iterations=0, int_steps=4)
    from dazoo import ops as dops

    expected = dops.rescale_displacement(dops.integrate_velocity(velocity, steps=4), 2)
    np.testing.assert_allclose(u, np.asarray(expected), atol=1e-6)
    assert len(history) == 1


def test_register_refine_improves_the_pair(preset_dir, scans):  # noqa: F811
    import nibabel as nib

    import dazoo
    from dazoo.pipeline import _classes_of

    pipeline = dazoo.load(str(preset_dir))
    assert pipeline.default_refine == {"iterations": 0}
    (moving, moving_labels), (fixed, fixed_labels) = scans
    plain = pipeline.register(moving, fixed, moving_labels=moving_labels)
    again = pipeline.register(moving, fixed, moving_labels=moving_labels, refine=0)
    np.testing.assert_array_equal(plain.displacement.array, again.displacement.array)
    # refine's starting point is the network's own displacement (its "flow" output is the
    # velocity it integrates)
    m_pre, f_pre = pipeline.preprocess(moving), pipeline.preprocess(fixed)
    out = pipeline.model.registration_net.predict_on_batch(
        [m_pre.array[None, ..., None], f_pre.array[None, ..., None]])
    start, _ = pipeline.refine(m_pre, f_pre, iterations=0)
    np.testing.assert_allclose(start, np.asarray(out["displacement"])[0], atol=1e-5)
    with pytest.raises(Exception, match="iterations >= 0"):
        pipeline.register(moving, fixed, refine=-1)
    refined = pipeline.register(moving, fixed, moving_labels=moving_labels, refine=40,
                                refine_options={"learning_rate": 0.2})
    truth = np.asarray(nib.load(fixed_labels).dataobj)

    def dice(result):
        moved = result.moved_labels.array
        ids = [i for i in np.unique(truth) if i]
        return np.mean([2 * np.sum((moved == i) & (truth == i))
                        / (np.sum(moved == i) + np.sum(truth == i)) for i in ids])

    assert dice(refined) > dice(plain) + 0.02
    assert refined.folding_fraction < 0.005
    # guide "segmenter": the moving labels are carried along but do not guide: the same
    # displacement as a registration given no labels
    guided = pipeline.register(moving, fixed, moving_labels=moving_labels, refine=3,
                               refine_options={"guide": "segmenter"})
    unlabelled = pipeline.register(moving, fixed, refine=3)
    by_labels = pipeline.register(moving, fixed, moving_labels=moving_labels, refine=3)
    np.testing.assert_allclose(guided.displacement.array, unlabelled.displacement.array,
                               atol=1e-4)
    assert np.abs(guided.displacement.array - by_labels.displacement.array).max() > 1e-3
    assert guided.moved_labels is not None and unlabelled.moved_labels is None
    with pytest.raises(Exception, match="guide must be"):
        pipeline.register(moving, fixed, refine=1, refine_options={"guide": "atlas"})
    np.testing.assert_array_equal(_classes_of(np.array([0, 7, 999]), np.array([0, 7, 3])),
                                  [0, 1, 0])


def test_traced_step_is_reused_across_pairs_with_the_same_results():
    """A second pair with the same options reuses the traced step (no new entry), and gives
    exactly what an eager (untraced) run gives."""
    from dazoo import refine

    fixed = _blobs(seed=1)
    moving = _shifted(fixed, SHIFT)
    other = _shifted(_blobs(seed=2), -SHIFT)
    kwargs = dict(int_steps=4, int_resolution=2, learning_rate=0.1, smoothness=0.3,
                  ncc_window=5, iterations=3)
    velocity = np.zeros((1, 12, 12, 12, 3), np.float32)
    before = len(refine._STEPS)
    first, _ = refine_velocity(velocity, moving[None, ..., None], fixed[None, ..., None],
                               **kwargs)
    assert len(refine._STEPS) == before + 1
    second, _ = refine_velocity(velocity, other[None, ..., None], fixed[None, ..., None],
                                **kwargs)
    assert len(refine._STEPS) == before + 1  # the same traced step
    eager, _ = refine_velocity(velocity, other[None, ..., None], fixed[None, ..., None],
                               compiled=False, **kwargs)
    np.testing.assert_allclose(second, eager, atol=2e-4)  # graph vs eager round-off
    assert np.abs(first - second).max() > 1e-3  # a different pair, a different result


def test_traced_refinement_is_deterministic_and_leaves_grappler_on():
    """The same pair refined twice gives the same displacement bit for bit (the traced step
    runs without TensorFlow's graph rewrites, whose gradient summation order changed from
    call to call), with the anatomy term's class sums; the process-wide optimiser option is
    as it was afterwards."""
    import tensorflow as tf

    fixed = _blobs(seed=3)
    moving = _shifted(fixed, SHIFT)
    classes_f, classes_m = np.digitize(fixed, [0.4, 0.6]), np.digitize(moving, [0.4, 0.6])
    kwargs = dict(int_steps=5, int_resolution=2, learning_rate=0.2, smoothness=0.3,
                  iterations=6, anatomy=1.0)
    velocity = np.random.default_rng(0).normal(0, 0.2, (1, 12, 12, 12, 3)).astype(np.float32)
    runs = [refine_velocity(velocity, moving[None, ..., None], fixed[None, ..., None],
                            classes_m[None], _soft(classes_f, 3), **kwargs)[0]
            for _ in range(3)]
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[1], runs[2])
    assert not tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer")
