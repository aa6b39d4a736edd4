"""Losses against hand-computed values, NumPy references and VoxelMorph 0.2's outputs."""
import pathlib

import numpy as np
import pytest

from dazoo import losses

VXM = pathlib.Path(__file__).parent / "data" / "voxelmorph-0.2"


@pytest.fixture(scope="module")
def vxm():
    return np.load(VXM / "inputs.npz"), np.load(VXM / "outputs.npz")


def test_ncc_matches_voxelmorph(vxm):
    inputs, outputs = vxm
    got = np.asarray(losses.NCC().call(inputs["vol"], inputs["vol3"][..., :1]))
    np.testing.assert_allclose(got, outputs["ncc_win9"], rtol=1e-5, atol=1e-6)


def test_mse_grad_dice_match_voxelmorph(vxm):
    inputs, outputs = vxm
    np.testing.assert_allclose(float(losses.MSE()(inputs["vol"], inputs["vol3"][..., :1])),
                               outputs["mse"], rtol=1e-6)
    for penalty in ("l2", "l1"):
        got = np.asarray(losses.Grad(penalty).call(None, inputs["flow"]))
        np.testing.assert_allclose(got, outputs[f"grad_{penalty}"], rtol=1e-6)
    dice_loss = float(losses.SoftDice()(inputs["seg_a"], inputs["seg_b"]))
    np.testing.assert_allclose(1.0 - dice_loss, -outputs["dice"], rtol=1e-6)


def test_ncc_of_an_image_with_itself_a_scaled_copy_and_its_negative():
    # Windows are zero-padded at the border, so only exact scalings (which scale the padding
    # too) correlate perfectly everywhere.
    image = np.random.default_rng(0).random((1, 12, 12, 12, 1)).astype(np.float32)
    assert float(losses.NCC()(image, image)) == pytest.approx(-1.0, abs=1e-4)
    assert float(losses.NCC()(image, 3.0 * image)) == pytest.approx(-1.0, abs=1e-4)
    # VoxelMorph 0.2 clamps the covariance at eps: anti-correlation scores 0, not -1.
    assert float(losses.NCC()(image, -image)) == pytest.approx(0.0, abs=1e-6)


def test_grad_of_linear_field_is_hand_computed():
    i = np.arange(6, dtype=np.float32)
    field = np.zeros((1, 6, 6, 6, 3), np.float32)
    field[..., 0] = 0.5 * i[:, None, None]  # d/dx = 0.5 along axis 0 only
    # l2: mean over the 3 axes of mean squared differences = (0.25 + 0 + 0) / 3
    # (VoxelMorph averages each difference over all 3 components: 0.25 / 3 again).
    assert float(losses.Grad("l2")(None, field)) == pytest.approx(0.25 / 3 / 3, rel=1e-6)
    assert float(losses.Grad("l1")(None, field)) == pytest.approx(0.5 / 3 / 3, rel=1e-6)


def test_bending_energy_is_zero_for_affine_and_hand_computed_for_quadratic():
    g = np.stack(np.meshgrid(*[np.arange(7.0)] * 3, indexing="ij"), -1).astype(np.float32)
    affine_field = (g @ np.array([[0.1, 0.2, 0], [0, 0.3, 0.1], [0.2, 0, 0.1]], np.float32))[None]
    assert float(losses.BendingEnergy()(None, affine_field)) == pytest.approx(0, abs=1e-8)
    quadratic = np.zeros((1, 7, 7, 7, 3), np.float32)
    quadratic[..., 1] = 0.5 * g[..., 0] ** 2 + g[..., 0] * g[..., 2]
    # d2u1/dx0^2 = 1, d2u1/dx0dx2 = 1: per voxel 1 + 2 * 1 = 3 on component 1; mean over 3.
    assert float(losses.BendingEnergy()(None, quadratic)) == pytest.approx(1.0, rel=1e-5)


def _one_hot(labels, k):
    return np.eye(k, dtype=np.float32)[labels]


def test_soft_dice_hand_computed():
    a = np.zeros((1, 4, 4, 4), np.int32)
    a[0, :2] = 1
    b = np.zeros_like(a)
    b[0, :1] = 1
    ta, tb = _one_hot(a, 2), _one_hot(b, 2)
    assert float(losses.SoftDice()(ta, ta)) == pytest.approx(0.0, abs=1e-6)
    # class 1: 2*16 / (32 + 16) = 2/3; class 0: 2*32 / (32 + 48) = 0.8.
    assert float(losses.SoftDice(include_background=False)(ta, tb)) == pytest.approx(1 / 3)
    assert float(losses.SoftDice()(ta, tb)) == pytest.approx(1 - (2 / 3 + 0.8) / 2)


def test_cross_entropy_and_dice_ce_against_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 4, 4, 4, 3))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    truth = _one_hot(rng.integers(0, 3, (2, 4, 4, 4)), 3)
    expected_ce = -(truth * np.log(probs)).sum(-1).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(losses.CrossEntropy().call(truth, probs)), expected_ce,
                               rtol=1e-5)
    dice = np.asarray(losses.SoftDice(False).call(truth, probs))
    np.testing.assert_allclose(np.asarray(losses.DiceCE(2.0, 0.5).call(truth, probs)),
                               2.0 * dice + 0.5 * expected_ce, rtol=1e-5)


@pytest.mark.parametrize("loss", [losses.NCC(win=5), losses.Grad("l1"), losses.SoftDice(False),
                                  losses.DiceCE(0.5, 2.0), losses.BendingEnergy(), losses.MSE(),
                                  losses.CrossEntropy(1e-6)])
def test_config_round_trip(loss):
    clone = type(loss).from_config(loss.get_config())
    assert clone.get_config() == loss.get_config()


def test_dice_ce_on_classes_equals_the_one_hot_form_with_its_gradient():
    import tensorflow as tf

    rng = np.random.default_rng(8)
    k = 5
    classes = rng.integers(-1, k + 1, (2, 6, 7, 5)).astype(np.int32)  # -1, k: no class
    logits = tf.constant(rng.normal(size=(2, 6, 7, 5, k)).astype(np.float32))
    loss = losses.DiceCE(dice_weight=0.7, ce_weight=1.3)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        probabilities = tf.nn.softmax(logits)
        reference = loss.call(tf.one_hot(classes, k), probabilities)
        fast = loss.call_on_classes(classes, probabilities)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(reference), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(tape.gradient(fast, logits)),
                               np.asarray(tape.gradient(reference, logits)),
                               rtol=1e-4, atol=1e-7)


def test_class_sums_count_labels_like_a_one_hot_sum():
    rng = np.random.default_rng(9)
    classes = rng.integers(0, 4, (3, 5, 6))
    counts = np.asarray(losses.class_sums(np.ones(classes.shape, np.float32), classes, 4))
    np.testing.assert_array_equal(counts, np.eye(4)[classes].sum(axis=(1, 2)))
