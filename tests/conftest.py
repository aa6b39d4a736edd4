"""Shared fixtures: analytic phantoms sampled on arbitrary grids, oblique affines, real data."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

#: The real data folder, ``../shared/data`` relative to the repository root.
DATA_ROOT = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data"

# The phantom: a soft-edged ellipsoidal "head" (radii in mm) holding Gaussian blobs given as
# centre (RAS mm), width (mm), amplitude; deliberately asymmetric so that rotations and flips
# are identifiable. It is zero (background) beyond ~50 mm from the origin.
_HEAD_RADII = (42.0, 48.0, 38.0)
_BLOBS = [
    ((18.0, -10.0, 6.0), 8.0, 0.8),
    ((-15.0, 14.0, -4.0), 6.0, -0.5),
    ((4.0, 22.0, 15.0), 5.0, 0.9),
    ((-8.0, -20.0, 18.0), 7.0, 0.6),
    ((22.0, 12.0, -16.0), 4.0, 1.2),
    ((-20.0, -6.0, -18.0), 9.0, 0.7),
    ((0.0, -30.0, -5.0), 6.0, -0.4),
]
#: Label ids of the label phantom (non-contiguous, FreeSurfer-like).
PHANTOM_IDS = (2, 17, 53, 1002, 2002, 1035, 2035, 41)


def _phantom(points: np.ndarray) -> np.ndarray:
    """Intensity of the phantom at world points ``(..., 3)`` (RAS mm)."""
    radius = np.sqrt(((points / np.array(_HEAD_RADII)) ** 2).sum(-1))
    value = 0.5 / (1 + np.exp((radius - 1) * 25))
    for centre, width, amplitude in _BLOBS:
        dist2 = ((points - np.array(centre)) ** 2).sum(-1)
        value += amplitude * np.exp(-dist2 / (2 * width**2))
    return 100.0 * np.clip(value, 0, None)


def _phantom_labels(points: np.ndarray) -> np.ndarray:
    """Label ids at world points: octants of an ellipsoid, each with its own id."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    inside = (x / 34) ** 2 + (y / 30) ** 2 + (z / 26) ** 2 <= 1
    octant = (x > 3).astype(int) + 2 * (y > -2) + 4 * (z > 1)
    return np.where(inside, np.array(PHANTOM_IDS)[octant], 0).astype(np.int32)


def _world_points(affine: np.ndarray, shape) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return index @ affine[:3, :3].T + affine[:3, 3]


def _make_affine(codes="RAS", spacing=(1.0, 1.0, 1.0), shape=(32, 32, 32), rotation=None,
                 centre=(0.0, 0.0, 0.0)):
    """An affine with the given axis codes, voxel sizes, extra rotation (3x3) and FOV centre."""
    axes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    direction = np.zeros((3, 3))
    for column, code in enumerate(codes):
        row, sign = axes[code]
        direction[row, column] = sign
    if rotation is not None:
        direction = rotation @ direction
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing, dtype=float)
    affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def _rotation(degrees, axis):
    axis = np.asarray(axis, dtype=float)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


@pytest.fixture
def phantom():
    """``phantom(affine, shape) -> float32 array``: the analytic phantom sampled on a grid."""
    return lambda affine, shape: _phantom(_world_points(affine, shape)).astype(np.float32)


@pytest.fixture
def phantom_function():
    """``f(points (..., 3) RAS mm) -> intensities``: the phantom as a function of world."""
    return _phantom


@pytest.fixture
def phantom_labels():
    """``phantom_labels(affine, shape) -> int32 ids``: the label phantom sampled on a grid."""
    return lambda affine, shape: _phantom_labels(_world_points(affine, shape))


@pytest.fixture
def phantom_label_function():
    """``f(points (..., 3) RAS mm) -> int32 ids``: the label phantom as a function of world."""
    return _phantom_labels


@pytest.fixture
def make_affine():
    """``make_affine(codes, spacing, shape, rotation, centre) -> (4, 4)`` voxel -> RAS mm."""
    return _make_affine


@pytest.fixture
def rotation():
    """``rotation(degrees, axis) -> (3, 3)`` rotation matrix (Rodrigues)."""
    return _rotation


@pytest.fixture
def world_points():
    """``world_points(affine, shape) -> (*shape, 3)`` world mm of every voxel."""
    return _world_points


@pytest.fixture
def data_root():
    """The real data folder; the test is skipped when it is absent."""
    if not DATA_ROOT.is_dir():
        pytest.skip(f"real data not found at {DATA_ROOT}")
    return DATA_ROOT
