"""Synthetic 3D "anatomies" with label maps, for the demo and the tests (NumPy + SciPy only).

A subject is a template of nested, labelled ellipsoidal structures deformed by a random
smooth displacement (sampled by :func:`dazoo.spatial.sample`; the field is a cubic
``scipy.ndimage.zoom`` of 4^3 control values, kept as it was so that the demo's data and
figures do not change), with a smooth intensity bias and noise. Pairs of subjects thus differ
by a known-smooth deformation that a registration network can learn to undo, and each
image comes with an exact label map.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from dazoo import spatial
from dazoo.batch import make_batch

__all__ = ["template", "random_smooth_displacement", "make_subject", "make_subjects",
           "pair_batch"]


def _unit_grid(shape: Sequence[int]) -> np.ndarray:
    """Coordinates in [-1, 1] along each axis, ``(*shape, 3)``."""
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def template(shape: Sequence[int], num_classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A template image and label map of ``num_classes - 1`` structures (0 = background).

    Structure 1 is a large ellipsoid; structures 2.. are smaller ellipsoids placed inside it
    at distinct positions, each with its own intensity.

    Returns:
        ``(image, labels)``: float32 in [0, 1] and int32 ``0..num_classes-1``, both ``shape``.
    """
    if num_classes < 2:
        raise ValueError("num_classes must be >= 2")
    grid = _unit_grid(shape)
    labels = np.zeros(tuple(shape), np.int32)
    labels[np.sum((grid / [0.75, 0.65, 0.7]) ** 2, -1) < 1] = 1
    inner = num_classes - 2
    for k in range(inner):
        angle = 2 * np.pi * k / max(inner, 1)
        centre = np.array([0.3 * np.cos(angle), 0.3 * np.sin(angle), 0.15 * (-1) ** k])
        radii = np.array([0.28, 0.2, 0.24])
        labels[np.sum(((grid - centre) / radii) ** 2, -1) < 1] = k + 2
    intensities = np.linspace(0.25, 1.0, num_classes).astype(np.float32)
    intensities[0] = 0.0
    return intensities[labels], labels


def random_smooth_displacement(shape: Sequence[int], *, magnitude: float, rng: np.random.Generator,
                               control_points: int = 4) -> np.ndarray:
    """A random smooth displacement ``(*shape, 3)`` in voxels (cubic upsampling of a coarse
    random field with ``control_points`` points per axis, scaled to a max of ``magnitude``)."""
    coarse = rng.normal(size=(control_points,) * 3 + (3,))
    zoom = [n / control_points for n in shape]
    field = np.stack([ndimage.zoom(coarse[..., d], zoom, order=3) for d in range(3)], axis=-1)
    field = field[: shape[0], : shape[1], : shape[2]]
    return (field * magnitude / max(np.abs(field).max(), 1e-6)).astype(np.float32)


def _warp(volume: np.ndarray, displacement: np.ndarray, order: int) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=0)
    points = grid + np.moveaxis(displacement, -1, 0)
    return spatial.sample(volume, points, order=order, mode="nearest")


def make_subject(shape: Sequence[int], *, num_classes: int = 4, magnitude: float = 3.0,
                 noise: float = 0.03, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic subject: the template deformed by a random smooth displacement.

    Returns:
        ``(image, labels)``: float32 ``shape`` and int32 ``shape``.
    """
    image, labels = template(shape, num_classes)
    displacement = random_smooth_displacement(shape, magnitude=magnitude, rng=rng)
    image = _warp(image, displacement, order=1)
    labels = _warp(labels, displacement, order=0).astype(np.int32)
    bias = 1.0 + 0.1 * random_smooth_displacement(shape, magnitude=1.0, rng=rng)[..., 0]
    image = image * bias + rng.normal(scale=noise, size=image.shape)
    return np.clip(image, 0, None).astype(np.float32), labels


def make_subjects(count: int, shape: Sequence[int], *, num_classes: int = 4, seed: int = 0,
                  **kwargs) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` subjects from one seeded generator (see :func:`make_subject`)."""
    rng = np.random.default_rng(seed)
    return [make_subject(shape, num_classes=num_classes, rng=rng, **kwargs) for _ in range(count)]


def pair_batch(subjects, pairs: Sequence[tuple[int, int]], labelled: Sequence[bool]) -> dict:
    """A DeepAtlas training batch (:mod:`dazoo.batch`) from subject pairs.

    Args:
        subjects: list of ``(image, labels)``.
        pairs: ``(moving index, fixed index)`` per sample.
        labelled: per subject, whether its label map may be used.
    """
    def side(i):
        return subjects[i][0], (subjects[i][1] if labelled[i] else None)

    return make_batch([side(m) + side(f) for m, f in pairs])
