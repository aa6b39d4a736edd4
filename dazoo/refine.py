"""Anatomy-guided test-time refinement of a registration (instance optimisation).

The registration network predicts a stationary velocity field for a pair in one pass. Its
DeepAtlas training loss, image similarity + smoothness + an anatomy term (soft Dice between the
warped moving segmentation and the fixed one), can also be minimised for the one pair at hand:
:func:`refine_velocity` starts from the network's velocity (at its integration resolution) and
takes ``iterations`` Adam steps on

    loss(v) = NCC(fixed, moving o phi) + smoothness * Grad_l2(v)
              + anatomy * (1 - mean_k softDice_k(P_moving o phi, P_fixed)),
    phi = exp(v) (scaling and squaring, as the network), upsampled to the model grid,

where ``P_moving`` is the moving image's one-hot label map when it is given, else the
one-hot argmax of the segmenter's probabilities (linearly warped: the soft-Dice sums come
from the 8 interpolation corners' labels, :func:`dazoo.ops.warped_label_overlap`, with no
K-channel warp), and ``P_fixed`` the segmenter's probabilities of the fixed image (classes
without voxels in both are left out). The result stays an integrated velocity:
diffeomorphic up to discretisation, as the network's own output.

Gradients come from :func:`dazoo.backend.value_and_grad` (TensorFlow ``GradientTape``, torch
autograd or ``jax.grad``); the similarity and smoothness terms are the registration loss's
own (:func:`dazoo.models.objective.image_terms`); the Adam update is plain NumPy-free
tensor code.
"""
from __future__ import annotations

import time
from typing import Any

import keras
import numpy as np
from keras import ops

from dazoo import backend
from dazoo import ops as dops
from dazoo.losses import NCC, Grad, dice_from_sums
from dazoo.models.objective import image_terms

__all__ = ["refine_velocity"]


def _displacement(velocity, *, int_steps, int_resolution):
    """The model-grid displacement of a velocity: integrated, then upsampled."""
    displacement = dops.integrate_velocity(velocity, steps=int_steps)
    if int_resolution > 1:
        displacement = dops.rescale_displacement(displacement, int_resolution)
    return displacement


def _loss_terms(velocity, moving, fixed, moving_classes, fixed_probs, *, int_steps,
                int_resolution, ncc, smoothness, anatomy, present, num_classes):
    displacement = _displacement(velocity, int_steps=int_steps, int_resolution=int_resolution)
    moved = dops.warp(moving, displacement)
    similarity, smooth = image_terms(ncc, Grad("l2"), fixed, moved, velocity)
    similarity, smooth = ops.mean(similarity), ops.mean(smooth)
    total = similarity + smoothness * smooth
    overlap = ops.zeros(())
    if anatomy:
        # soft Dice of the linearly warped one-hot moving labels against the fixed
        # probabilities, from corner-weight sums (no K-channel warp)
        intersection, warped_sum = dops.warped_label_overlap(moving_classes, displacement,
                                                             fixed_probs, num_classes,
                                                             fixed_point=True)
        fixed_sum = ops.sum(fixed_probs, axis=(1, 2, 3))
        dice = dice_from_sums(intersection, fixed_sum, warped_sum)[0]
        overlap = ops.sum(dice * present) / ops.maximum(ops.sum(present), 1.0)
        total = total + anatomy * (1.0 - overlap)
    return total, (similarity, smooth, overlap, displacement)


#: Traced gradient steps, one per backend and set of static options: a session that refines
#: many pairs traces once (about 4.5 s on 2 cores for the brain preset's grid, 80x96x80 with
#: 63 classes) instead of once per pair. The pair's
#: tensors are arguments, so a new pair of the same shapes reuses the graph.
_STEPS: dict = {}


def _value_and_grad(function, compiled: bool = True, key=None):
    """:func:`dazoo.backend.value_and_grad`, kept in :data:`_STEPS` under ``key`` (with the
    backend) when compiled."""
    cache_key = None if key is None or not compiled else (keras.backend.backend(), key)
    if cache_key is not None and cache_key in _STEPS:
        return _STEPS[cache_key]
    step = backend.value_and_grad(function, compiled=compiled)
    if cache_key is not None:
        _STEPS[cache_key] = step
    return step


def refine_velocity(velocity, moving, fixed, moving_classes=None, fixed_probs=None, *,
                    iterations: int = 20, learning_rate: float = 0.05,
                    int_steps: int = 7, int_resolution: int = 2, ncc_window: int = 9,
                    smoothness: float = 1.0, anatomy: float = 1.0,
                    snapshots: tuple[int, ...] = (), compiled: bool = True,
                    final_loss: bool = True,
                    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Refines a registration network's velocity on one pair (see the module docstring).

    Args:
        velocity: ``(1, d, h, w, 3)`` the network's velocity at the integration resolution
            (model grid / ``int_resolution``), voxels of that grid.
        moving, fixed: ``(1, D, H, W, 1)`` the pair on the model grid.
        moving_classes: ``(1, D, H, W)`` class indices ``0..K-1`` of the moving image (its
            label map, or the argmax of the segmenter's probabilities).
        fixed_probs: ``(1, D, H, W, K)`` the segmenter's probabilities of the fixed image.
            Either None: no anatomy term.
        iterations: Adam steps (0 returns the network's displacement).
        learning_rate: Adam step size, voxels of the velocity grid.
        int_steps, int_resolution: as the network (scaling-and-squaring steps; the velocity
            grid's downsampling of the model grid).
        ncc_window, smoothness, anatomy: the loss's NCC window and term weights.
        snapshots: iteration counts whose history entry also holds the ``"displacement"``
            (NumPy) reached there (to measure several iteration counts in one run).
        compiled: trace the gradient step once (TensorFlow graph: faster steps, a one-time
            tracing cost) or run it eagerly.
        final_loss: also evaluate the loss after the last update (the history's last entry:
            an untraced pass as costly as a step); False: only the displacement is computed
            there (``register`` needs no more).

    Returns:
        ``(displacement, history)``: the refined ``(1, D, H, W, 3)`` displacement (model grid
        voxels, float32 NumPy) and per iteration ``{"loss", "ncc", "smoothness", "dice",
        "seconds"}`` (the values before that iteration's update, and the time of its
        gradient; with ``final_loss``, a last entry: after the last update).
    """
    v = ops.convert_to_tensor(np.asarray(velocity, np.float32))
    m = ops.convert_to_tensor(np.asarray(moving, np.float32))
    f = ops.convert_to_tensor(np.asarray(fixed, np.float32))
    use_anatomy = bool(anatomy) and moving_classes is not None and fixed_probs is not None
    if use_anatomy:
        num_classes = int(np.shape(fixed_probs)[-1])
        classes = np.asarray(moving_classes, np.int32)
        fp = ops.convert_to_tensor(np.asarray(fixed_probs, np.float32))
        mc = ops.convert_to_tensor(classes)
        # Classes present in both images (a soft Dice of an absent class is 0 and would pull
        # the warp towards nothing); the background (class 0) is left out.
        hard_f = np.asarray(fixed_probs).reshape(-1, num_classes).max(axis=0) > 0.5
        present = (np.bincount(classes.ravel(), minlength=num_classes)[:num_classes] > 0) \
            & hard_f
        present = present.astype(np.float32)
        present[0] = 0.0
    else:
        num_classes = 1
        mc = ops.zeros((1, 1, 1, 1), dtype="int32")
        fp = ops.zeros((1, 1, 1, 1, 1))
        present = np.zeros((1,), np.float32)
    present = ops.convert_to_tensor(present)
    static = dict(int_steps=int(int_steps), int_resolution=int(int_resolution),
                  ncc_window=int(ncc_window), smoothness=float(smoothness),
                  anatomy=float(anatomy) if use_anatomy else 0.0, num_classes=num_classes)
    ncc = NCC(static["ncc_window"])
    options = {k: v for k, v in static.items() if k != "ncc_window"}

    def function(x, m, f, mc, fp, present):
        return _loss_terms(x, m, f, mc, fp, ncc=ncc, present=present, **options)

    # The key holds the shapes too: a traced step serves one grid (and class count) only.
    key = (tuple(sorted(static.items())), tuple(v.shape), tuple(m.shape), tuple(fp.shape))
    step = _value_and_grad(function, compiled, key=key)
    data = (m, f, mc, fp, present)
    history = []
    first, second = ops.zeros_like(v), ops.zeros_like(v)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for t in range(1, int(iterations) + 1):
        started = time.perf_counter()
        (loss, (similarity, smooth, overlap, displacement)), grad = step(v, *data)
        history.append(_record(loss, similarity, smooth, overlap))
        history[-1]["seconds"] = time.perf_counter() - started
        if t - 1 in snapshots:
            history[-1]["displacement"] = np.asarray(ops.convert_to_numpy(displacement))
        first = beta1 * first + (1 - beta1) * grad
        second = beta2 * second + (1 - beta2) * grad * grad
        corrected = learning_rate * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        v = v - corrected * first / (ops.sqrt(second) + eps)
    if not final_loss:
        displacement = _displacement(v, int_steps=static["int_steps"],
                                     int_resolution=static["int_resolution"])
        return np.asarray(ops.convert_to_numpy(displacement), np.float32), history
    loss, (similarity, smooth, overlap, displacement) = function(v, *data)
    history.append(_record(loss, similarity, smooth, overlap))
    if int(iterations) in snapshots:
        history[-1]["displacement"] = np.asarray(ops.convert_to_numpy(displacement))
    return np.asarray(ops.convert_to_numpy(displacement), np.float32), history


def _record(loss, similarity, smooth, overlap) -> dict[str, float]:
    value = lambda x: float(ops.convert_to_numpy(x))  # noqa: E731
    return {"loss": value(loss), "ncc": value(similarity), "smoothness": value(smooth),
            "dice": value(overlap)}
