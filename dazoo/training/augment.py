"""Random spatial and intensity augmentation of training images (NumPy / SciPy; the spatial
sampler is :mod:`dazoo.spatial`, shared with synthesis)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from dazoo import spatial
from dazoo.errors import DazooInputError

__all__ = ["Augmentation"]

@dataclasses.dataclass(frozen=True, kw_only=True)
class Augmentation:
    """Random augmentation of a training image (spatial transforms also apply to its labels).

    Spatial (one resampling; linear for the image, nearest for the labels, 0 outside):

    Args:
        rotation: float. Maximum rotation about each axis, degrees.
        scale: float. Maximum relative scaling per axis (0.1 = 0.9..1.1).
        translation: float. Maximum translation per axis, voxels.
        elastic: float. Standard deviation of a smooth random displacement, voxels.
        elastic_spacing: float. Spacing of its control points, voxels (smoothness).
        gamma: float. Standard deviation of ``log(gamma)``; ``x -> x ** gamma`` on [0, 1].
        noise: float. Standard deviation of additive Gaussian noise (normalised units).
        flip: float. Probability of mirroring image and labels along ``flip_axis`` (after the
            spatial transform). Label ids are kept: right for tissues named by anatomy
            (a knee's medial and lateral compartments swap sides with the knee), wrong for
            tables with left and right structures (the training engine refuses those it
            recognises by FreeSurfer's ids; a custom left/right id scheme is not recognised).
        flip_axis: int. The mirrored array axis (0: left-right on an RAS model grid).
    """

    rotation: float = 0.0
    scale: float = 0.0
    translation: float = 0.0
    elastic: float = 0.0
    elastic_spacing: float = 16.0
    gamma: float = 0.0
    noise: float = 0.0
    flip: float = 0.0
    flip_axis: int = 0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise DazooInputError("augmentation", f"{field.name} must be >= 0, got {value!r}")
        if self.flip > 1 or self.flip_axis not in (0, 1, 2):
            raise DazooInputError("augmentation", "needs flip <= 1 (a probability) and "
                                                  "flip_axis 0, 1 or 2")
        if self.elastic_spacing < 2 or self.scale >= 1:
            raise DazooInputError("augmentation", "needs elastic_spacing >= 2 and scale < 1")

    @property
    def spatial(self) -> bool:
        return bool(self.rotation or self.scale or self.translation or self.elastic)

    def coordinates(self, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """Sampling coordinates ``(3, D, H, W)`` float32: where each output voxel samples
        (:func:`dazoo.spatial.coordinates`; the elastic part a B-spline-smooth field,
        :func:`dazoo.spatial.smooth_noise`)."""
        shape = tuple(int(n) for n in shape)
        matrix = spatial.random_matrix(rng, rotation=self.rotation, scale=self.scale)
        shift = rng.uniform(-self.translation, self.translation, 3)
        coords = spatial.coordinates(shape, matrix, shift)
        if self.elastic:
            for row in range(3):
                coords[row] += spatial.smooth_noise(shape, self.elastic_spacing, self.elastic,
                                                    rng)
        return coords

    def __call__(self, image: np.ndarray, labels: np.ndarray | None,
                 rng: np.random.Generator, *, flip: bool | None = None,
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """Augment ``image`` ``(D, H, W)`` and ``labels`` (same spatial transform).

        ``flip``: whether to mirror, decided by the caller (a pair's two images are mirrored
        together: a left knee does not register onto a right one); None: drawn here with
        probability ``self.flip``."""
        if self.spatial:
            coords = self.coordinates(image.shape, rng)
            image = spatial.sample(image, coords, order=1, cval=0.0)
            if labels is not None:
                labels = spatial.sample(labels, coords, order=0)
        if flip is None:
            flip = bool(self.flip) and rng.random() < self.flip
        if flip:
            image = np.flip(image, self.flip_axis)
            if labels is not None:
                labels = np.ascontiguousarray(np.flip(labels, self.flip_axis))
        if self.gamma:
            image = np.clip(image, 0, None) ** np.float32(np.exp(rng.normal(0, self.gamma)))
        if self.noise:
            image = image + rng.normal(0, self.noise, image.shape).astype(np.float32)
        return np.ascontiguousarray(image, dtype=np.float32), labels

