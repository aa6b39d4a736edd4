"""Evaluation metrics against hand-computed cases."""
import numpy as np
import pytest

from dazoo import metrics


def test_dice_per_label_hand_computed():
    truth = np.zeros((4, 4, 4), int)
    truth[:2] = 5
    truth[3] = 7
    pred = np.zeros_like(truth)
    pred[:1] = 5
    pred[2:] = 9
    got = metrics.dice_per_label(truth, pred, labels=[5, 7, 9, 11])
    assert got[5] == pytest.approx(2 * 16 / (32 + 16))
    assert got[7] == 0.0 and got[9] == 0.0
    assert np.isnan(got[11])
    assert metrics.dice_per_label(truth, truth) == {5: 1.0, 7: 1.0}
    assert metrics.dice_per_label(np.zeros_like(truth), pred) == {}  # nothing to score


def test_jacobian_of_affine_displacement_is_its_determinant():
    a = np.array([[1.1, 0.2, 0.0], [0.0, 0.9, 0.1], [0.05, 0.0, 1.2]])
    grid = np.stack(np.meshgrid(*[np.arange(6.0)] * 3, indexing="ij"), -1)
    u = grid @ (a - np.eye(3)).T
    np.testing.assert_allclose(metrics.jacobian_determinant(u), np.linalg.det(a), rtol=1e-10)
    # With 2 mm spacing and the field in mm, the same field has half the gradient.
    np.testing.assert_allclose(metrics.jacobian_determinant(2 * u, spacing=(2, 2, 2)),
                               np.linalg.det(a), rtol=1e-10)
    assert metrics.folding_fraction(u) == 0.0


def test_jacobian_of_a_random_field_equals_numpys_determinant_of_its_gradient():
    rng = np.random.default_rng(3)
    u = rng.normal(scale=0.7, size=(7, 9, 8, 3))
    spacing = (1.0, 2.0, 0.5)
    jac = np.stack([np.stack(np.gradient(u[..., c], *spacing), -1) for c in range(3)], -2)
    expected = np.linalg.det(jac + np.eye(3))
    assert np.any(expected < 0) and np.any(expected > 0)
    np.testing.assert_allclose(metrics.jacobian_determinant(u, spacing), expected,
                               rtol=1e-10, atol=1e-12)


def test_folding_fraction_counts_reflected_voxels():
    grid = np.stack(np.meshgrid(*[np.arange(8.0)] * 3, indexing="ij"), -1)
    u = np.zeros_like(grid)
    u[:4, ..., 0] = -2 * grid[:4, ..., 0]  # x -> -x on the first half: det = -1 there
    det = metrics.jacobian_determinant(u)
    assert np.all(det[:3] < 0) and np.all(det[5:] == 1)
    assert 3 / 8 <= metrics.folding_fraction(u) <= 5 / 8


def test_evaluate_segmentation_adds_what_measure_returns_per_case():
    """``measure(case, labels)`` sees each loaded case and its segmentation; its fields join
    the record beside score_labels' own (a stand-in pipeline returns a known prediction)."""
    import types

    from dazoo import io
    from dazoo.evaluate import Case, evaluate_segmentation

    truth = np.zeros((6, 6, 6), np.int16)
    truth[1:4, 1:4, 1:4] = 1
    prediction = np.zeros_like(truth)
    prediction[1:4, 1:4, 2:5] = 1          # 18 of 27 voxels shared: Dice 2/3
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    image = io.Volume(np.ones((6, 6, 6), np.float32), affine, None)
    pipeline = types.SimpleNamespace(
        class_ids=[0, 1],
        segment=lambda img, flip=None: types.SimpleNamespace(
            labels=io.Volume(prediction, img.affine, None)))
    seen = []

    def measure(case, labels):
        seen.append((case.name, labels.affine[0, 0]))
        return {"voxels": int((labels.array == 1).sum()), "truth_voxels": int(case.truth.sum())}

    (record,) = evaluate_segmentation(pipeline, cases=[Case("a", image, truth)], log=None,
                                      measure=measure)
    assert record["dice"][1] == pytest.approx(2 / 3)
    assert record["voxels"] == 27 and record["truth_voxels"] == 27 and seen == [("a", 2.0)]
    (plain,) = evaluate_segmentation(pipeline, cases=[Case("a", image, truth)], log=None)
    assert "voxels" not in plain and plain["dice"] == record["dice"]
