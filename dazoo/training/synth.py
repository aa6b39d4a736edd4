"""Training images synthesised from label maps (SynthSeg-style), NumPy / SciPy only.

Billot et al., "SynthSeg: Segmentation of brain MRI scans of any contrast and resolution
without retraining", Medical Image Analysis 2023; Hoffmann et al., "SynthMorph: learning
contrast-invariant registration without acquired images", IEEE TMI 2022.

:class:`LabelSynth` turns one label map (any id set, on the model grid) into a random
(image, label map) pair on the same grid, so that networks learn shapes rather than one
scanner's contrast:

1. **deformation**: a random affine (rotation, scaling, shear, translation about the grid
   centre) composed with a smooth diffeomorphism, the scaling-and-squaring integral of a
   random stationary velocity field (B-spline-smooth control values, integrated at half
   resolution); labels are resampled with nearest neighbour (ids exact, no new ids);
2. **intensities**: per label (or per group of labels) a Gaussian with a random mean and
   standard deviation; optionally (``background``) label 0 is split into random smooth
   regions with Gaussians of their own, for the unlabelled tissue around the labelled
   anatomy (muscle, fat, fluid around a knee's bones);
3. **acquisition**: partial-volume blur, a random slice thickness along a random axis
   (blurred by the slice profile, sampled at that spacing and interpolated back to the
   grid), a smooth multiplicative bias field, Gaussian noise, min-max normalisation to
   [0, 1] and a random gamma.

``synth.draw(labels, rng)`` returns a :class:`SynthSample` that records what was drawn (for
tests and figures); ``synth(labels, rng)`` returns ``(image, labels)``.
:class:`~dazoo.training.PairDataset` uses it on the fly (``synth=``, ``synth_probability=``,
and label maps without images).
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.ndimage as ndi

from dazoo import spatial
from dazoo.errors import DazooInputError

__all__ = ["LabelSynth", "SynthSample", "integrate_svf", "end_planes"]


@dataclasses.dataclass
class SynthSample:
    """One synthesised sample and what was drawn to make it.

    Attributes:
        image: ``(D, H, W)`` float32 in [0, 1].
        labels: ``(D, H, W)`` the input's ids, deformed (nearest neighbour).
        coordinates: ``(3, D, H, W)`` float32, where each output voxel samples the input.
        ids: the label ids of the input, sorted.
        means, stds: the Gaussian drawn for each id (in the units before normalisation).
        offset, scale: the final min-max normalisation, ``image = (x - offset) / scale``
            before the gamma (``gamma`` 1 means none).
        gamma: the exponent applied to the normalised image.
        axis, thickness: the simulated slice axis and thickness in voxels (1: none).
        regions: ``(D, H, W)`` int8, the background region of each voxel whose label is 0
            (-1 elsewhere); None without ``background``.
        region_means, region_stds: the Gaussian of each background region (region 0 uses
            the background's ``means``/``stds`` entry).
        falloff: the signal fall-off at the ``falloff_axis`` ends, ``(width at the first
            end, width at the last)`` in voxels (0: none there), and ``falloff_floor``: the
            relative signal left at each end's outermost plane.
    """

    image: np.ndarray
    labels: np.ndarray
    coordinates: np.ndarray
    ids: np.ndarray
    means: np.ndarray
    stds: np.ndarray
    offset: float
    scale: float
    gamma: float
    axis: int
    thickness: float
    regions: np.ndarray | None = None
    region_means: np.ndarray | None = None
    region_stds: np.ndarray | None = None
    falloff: tuple[float, float] = (0.0, 0.0)
    falloff_floor: tuple[float, float] = (1.0, 1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LabelSynth:
    """Random image (and deformed labels) from a label map, SynthSeg-style.

    Each range below is the maximum of a uniform draw from 0 (so every sample has its own
    strength), except ``mean`` and ``std``, which are ``(low, high)`` ranges.

    Args:
        rotation: maximum rotation about each axis, degrees.
        scale: maximum relative scaling per axis (0.15 = 0.85..1.15).
        shear: maximum shear per axis pair.
        translation: maximum translation per axis, voxels.
        nonlinear: maximum standard deviation of the velocity field's control values, voxels.
        nonlinear_spacing: spacing of its control points, voxels (smoothness).
        integration_steps: scaling-and-squaring steps (7, as VoxelMorph).
        mean: range of each label's mean intensity.
        std: range of each label's intensity standard deviation (texture).
        groups: optional ``{id: group}``: the ids of a group share one Gaussian (e.g. the
            left and right of a structure); unlisted ids are their own group.
        zero_background: probability that label 0 is drawn as intensity 0 (a skull-stripped
            or masked scan) instead of a random Gaussian.
        background: maximum number of random smooth regions label 0 is split into (each
            sample draws 1..background), each with its own Gaussian: unlabelled tissue
            around the labelled anatomy. 0 or 1: label 0 is one tissue.
        background_spacing: size of those regions (control-point spacing of the random
            fields whose argmax makes them), voxels.
        priors: optional ``{id: (low, high)}``: a known contrast (e.g. a knee DESS scan:
            bone marrow dark, cartilage bright). With probability ``prior_probability`` a
            sample draws the mean of each listed id from its range instead of ``mean``
            (each id on its own, whatever its group); unlisted ids stay random.
        prior_probability: probability of a sample with the ``priors`` contrast.
        blur: maximum partial-volume blur (Gaussian sigma, voxels, per axis).
        thickness: maximum simulated slice thickness along a random axis, voxels (1: off).
        bias: maximum standard deviation of the log bias field's control values.
        bias_spacing: spacing of the bias field's control points, voxels.
        noise: maximum standard deviation of additive noise (relative to the mean range).
        gamma: standard deviation of ``log(gamma)`` of the final ``x -> x ** gamma``.
        pair_contrast: probability that the two images of a training pair, when both are
            synthesised, share their tissue intensities (one protocol, e.g. two DESS scans:
            the image similarity term then compares like with like); their anatomy, pose,
            background tissues, blur, slices, bias, noise and gamma stay independent.
            Used by :class:`~dazoo.training.PairDataset` (``draw(..., tissues=seed)``).
        extend_axis: optional model-grid axis along which the labelled anatomy runs on
            beyond the map (a limb: a knee map's femoral and tibial shafts leave its field of
            view). The map's first and last labelled planes along it are repeated outward
            (the sampling coordinates clamped to the labelled planes), so the anatomy reaches
            the grid's ends whatever the draw's scaling and translation. None: off.
        extend: with ``extend_axis``, the map is also shifted along that axis by up to this
            many voxels (uniform, either way), the repeated planes filling the side it leaves:
            the joint lands anywhere in the grid and a shaft runs up to the grid's end, as in
            a scan whose field of view is taller than the maps' or not centred on the joint.
        falloff: maximum width, in voxels, of a signal fall-off at the two ends of
            ``falloff_axis`` (a surface coil's sensitivity: a knee DESS scan's outermost
            S-I planes keep 10 % of the signal, which recovers over ~4 mm). Each end, on its
            own with probability 1/2, multiplies the signal (after the bias field, before
            the noise, which stays) by a raised-cosine ramp from a floor of 0-50 % at the
            outermost plane to 1 at a depth drawn from 1..``falloff`` voxels; the labels
            are unchanged (the anatomy is there, only fainter). 0: off (no random draw is
            made, so samples stay those of a recipe without it).
        falloff_axis: the axis of ``falloff`` (0, 1 or 2; with ``falloff`` > 0).
    """

    rotation: float = 15.0
    scale: float = 0.15
    shear: float = 0.02
    translation: float = 4.0
    nonlinear: float = 3.0
    nonlinear_spacing: float = 16.0
    integration_steps: int = 7
    mean: tuple[float, float] = (0.0, 1.0)
    std: tuple[float, float] = (0.0, 0.08)
    groups: Mapping[int, int] | None = None
    zero_background: float = 0.0
    background: int = 0
    background_spacing: float = 12.0
    priors: Mapping[int, tuple[float, float]] | None = None
    prior_probability: float = 0.0
    blur: float = 1.0
    thickness: float = 3.0
    bias: float = 0.3
    bias_spacing: float = 32.0
    noise: float = 0.04
    gamma: float = 0.25
    pair_contrast: float = 0.0
    extend_axis: int | None = None
    extend: float = 0.0
    falloff: float = 0.0
    falloff_axis: int | None = None

    def __post_init__(self):
        scalars = ("rotation", "scale", "shear", "translation", "nonlinear", "blur", "bias",
                   "noise", "gamma", "zero_background", "extend", "falloff")
        for name in scalars:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not np.isfinite(value) or value < 0:
                raise DazooInputError("synth", f"{name} must be a number >= 0, got {value!r}")
        if isinstance(self.prior_probability, bool) \
                or not isinstance(self.prior_probability, (int, float)) \
                or not 0 <= self.prior_probability <= 1:
            raise DazooInputError("synth", f"prior_probability must be in [0, 1], got "
                                           f"{self.prior_probability!r}")
        for key, span in (self.priors or {}).items():
            low, high = (float(v) for v in span)
            if isinstance(key, bool) or not isinstance(key, (int, np.integer)) \
                    or not (np.isfinite(low) and np.isfinite(high) and 0 <= low <= high):
                raise DazooInputError("synth", f"priors must map label ids to ranges "
                                               f"0 <= low <= high, got {key!r}: {span!r}")
        if isinstance(self.pair_contrast, bool) or not isinstance(
                self.pair_contrast, (int, float)) or not 0 <= self.pair_contrast <= 1:
            raise DazooInputError("synth", f"pair_contrast must be in [0, 1], got "
                                           f"{self.pair_contrast!r}")
        for name in ("extend", "falloff"):  # each an amount along its own optional axis
            axis = getattr(self, f"{name}_axis")
            if axis is not None and (isinstance(axis, bool) or axis not in (0, 1, 2)):
                raise DazooInputError("synth", f"{name}_axis must be null or an axis 0, 1 or "
                                               f"2, got {axis!r}")
            if getattr(self, name) and axis is None:
                raise DazooInputError("synth", f"{name} needs {name}_axis")
        if self.scale >= 1 or self.zero_background > 1:
            raise DazooInputError("synth", "needs scale < 1 and zero_background <= 1")
        if self.nonlinear_spacing < 2 or self.bias_spacing < 2 or self.thickness < 1:
            raise DazooInputError("synth", "needs nonlinear_spacing, bias_spacing >= 2 and "
                                           "thickness >= 1")
        if isinstance(self.background, bool) or not isinstance(self.background, int) \
                or not 0 <= self.background <= 100:
            raise DazooInputError("synth", f"background must be an integer 0..100, got "
                                           f"{self.background!r}")
        if not self.background_spacing >= 2:
            raise DazooInputError("synth", "needs background_spacing >= 2")
        if int(self.integration_steps) < 0:
            raise DazooInputError("synth", "integration_steps must be >= 0")
        for name in ("mean", "std"):
            low, high = (float(v) for v in getattr(self, name))
            if not (np.isfinite(low) and np.isfinite(high) and 0 <= low <= high):
                raise DazooInputError("synth", f"{name} must be a range 0 <= low <= high")

    # ------------------------------------------------------------------ spatial
    def affine(self, rng: np.random.Generator) -> np.ndarray:
        """A random 3x3 matrix (rotation @ shear @ scaling), determinant > 0."""
        return spatial.random_matrix(rng, rotation=self.rotation, scale=self.scale,
                                     shear=self.shear)

    def displacement(self, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """A random diffeomorphic displacement ``(3, D, H, W)`` (voxels), the integral of a
        smooth random velocity field; zeros when ``nonlinear`` is 0."""
        shape = tuple(int(n) for n in shape)
        if not self.nonlinear:
            return np.zeros((3,) + shape, np.float32)
        sigma = rng.uniform(0, self.nonlinear)
        half = tuple(max(n // 2, 2) for n in shape)
        coarse = tuple(int(np.ceil(n / self.nonlinear_spacing)) + 1 for n in shape)
        # Velocity in half-resolution voxels: full-resolution values / 2.
        velocity = np.stack([
            spatial.upsample(rng.normal(0.0, sigma / 2, coarse), half) for _ in range(3)])
        half_displacement = integrate_svf(velocity, int(self.integration_steps))
        out = np.empty((3,) + shape, np.float32)
        for c, (component, n, h) in enumerate(zip(half_displacement, shape, half)):
            np.multiply(spatial.upsample(component, shape, kernel="linear"), np.float32(n / h),
                        out=out[c])
        return out

    def coordinates(self, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """Where each output voxel samples the input, ``(3, D, H, W)``: the grid centre +
        affine @ (x - centre + u(x)) + translation, ``u`` from :meth:`displacement`
        (:func:`dazoo.spatial.coordinates`)."""
        shape = tuple(int(n) for n in shape)
        matrix = self.affine(rng)
        shift = rng.uniform(-self.translation, self.translation, 3)
        u = self.displacement(shape, rng)
        return spatial.coordinates(shape, matrix, shift, u if self.nonlinear else None)

    # ------------------------------------------------------------------ sample
    def draw(self, labels: np.ndarray, rng: np.random.Generator | int | None = None,
             *, tissues: int | None = None) -> SynthSample:
        """One random sample from ``labels`` ``(D, H, W)`` (integer ids). ``tissues``: a
        seed of the tissue intensities (and of the prior and zero-background draws): two
        draws with one seed give every id (group) the same Gaussian, whatever their other
        ids; None: drawn from ``rng``."""
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        labels = np.asarray(labels)
        if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
            raise DazooInputError("synth", f"needs a 3D integer label map, got "
                                           f"{labels.dtype} {labels.shape}")
        shape = labels.shape
        coords = self.coordinates(shape, rng)
        if self.extend_axis is not None:
            coords = self._extended(coords, labels, rng)
        moved = spatial.sample(labels, coords, order=0)
        ids = np.union1d(np.unique(labels), [0])  # 0: also what lies outside the map
        means, stds = self._gaussians(ids, rng, tissues)
        index = np.searchsorted(ids, moved)
        mean, std = means[index], stds[index]
        regions, region_means, region_stds = self._background(moved, ids, means, stds, rng)
        if regions is not None:
            outside = regions >= 0
            mean[outside] = region_means[regions[outside]]
            std[outside] = region_stds[regions[outside]]
        image = (mean + std * rng.standard_normal(shape, np.float32)).astype(np.float32)
        if self.blur:
            image = ndi.gaussian_filter(image, rng.uniform(0, self.blur, 3), mode="nearest")
        axis, thickness = int(rng.integers(3)), float(rng.uniform(1, self.thickness))
        if thickness > 1.05:
            image = _thick_slices(image, axis, thickness)
        else:
            thickness = 1.0
        if self.bias:
            coarse = tuple(int(np.ceil(n / self.bias_spacing)) + 1 for n in shape)
            log_bias = spatial.upsample(rng.normal(0, rng.uniform(0, self.bias), coarse), shape)
            image = image * np.exp(log_bias).astype(np.float32)
        falloff, floor = (0.0, 0.0), (1.0, 1.0)
        if self.falloff:
            image, falloff, floor = self._falloff(image, rng)
        if self.noise:
            spread = max(self.mean[1] - self.mean[0], 1e-3)
            image = image + rng.normal(0, rng.uniform(0, self.noise) * spread,
                                       shape).astype(np.float32)
        offset = float(image.min())
        scale = max(float(image.max()) - offset, 1e-6)
        image = (image - np.float32(offset)) / np.float32(scale)
        gamma = float(np.exp(rng.normal(0, self.gamma))) if self.gamma else 1.0
        if gamma != 1.0:
            image = np.clip(image, 0, 1) ** np.float32(gamma)
        return SynthSample(image=image.astype(np.float32), labels=moved, coordinates=coords,
                           ids=ids, means=means, stds=stds, offset=offset, scale=scale,
                           gamma=gamma, axis=axis, thickness=thickness, regions=regions,
                           region_means=region_means, region_stds=region_stds,
                           falloff=falloff, falloff_floor=floor)

    def _falloff(self, image: np.ndarray, rng: np.random.Generator):
        """``image`` with a random signal fall-off at the ends of :attr:`falloff_axis`
        (see the class's arguments); returns it, the widths and the floors."""
        axis = int(self.falloff_axis)
        n = image.shape[axis]
        profile = np.ones(n, np.float32)
        widths, floors = [0.0, 0.0], [1.0, 1.0]
        for end in (0, 1):
            if rng.random() >= 0.5:
                continue
            width = float(rng.uniform(1.0, max(float(self.falloff), 1.0)))
            floor = float(rng.uniform(0.0, 0.5))
            depth = np.arange(n, dtype=np.float64)  # voxels from this end's outermost plane
            if end:
                depth = depth[::-1]
            ramp = floor + (1 - floor) * 0.5 * (1 - np.cos(np.pi * np.minimum(depth / width, 1)))
            profile *= ramp.astype(np.float32)
            widths[end], floors[end] = width, floor
        shape = [1, 1, 1]
        shape[axis] = n
        return image * profile.reshape(shape), tuple(widths), tuple(floors)

    def _extended(self, coords: np.ndarray, labels: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
        """``coords`` shifted along :attr:`extend_axis` by a random ``[-extend, extend]``
        voxels and clamped there to the map's labelled planes (see the class's arguments)."""
        axis = int(self.extend_axis)
        shift = float(rng.uniform(-self.extend, self.extend)) if self.extend else 0.0
        ends = end_planes(labels, axis)
        if ends is None:
            return coords
        coords = np.array(coords, np.float32, copy=True)
        np.clip(coords[axis] + np.float32(shift), ends[0], ends[1], out=coords[axis])
        return coords

    def __call__(self, labels: np.ndarray, rng: np.random.Generator | int | None = None,
                 *, tissues: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(image, deformed labels)`` of one random sample (see :meth:`draw`)."""
        sample = self.draw(labels, rng, tissues=tissues)
        return sample.image, sample.labels

    def _gaussians(self, ids: np.ndarray, rng: np.random.Generator, tissues: int | None = None):
        groups = {int(i): (self.groups or {}).get(int(i), ("id", int(i))) for i in ids}
        keys = sorted(set(groups.values()), key=repr)
        if tissues is None:
            drawn = {key: (rng.uniform(*self.mean), rng.uniform(*self.std)) for key in keys}
            coin, zero_coin = rng, rng
            prior = lambda i: rng.uniform(*self.priors[i])  # noqa: E731
        else:  # one generator per tissue: the same key draws the same Gaussian in any map
            tissue = lambda *key: np.random.default_rng([int(tissues), *key])  # noqa: E731
            drawn = {}
            for key in keys:
                g = tissue(0, zlib.crc32(repr(key).encode()))
                drawn[key] = (g.uniform(*self.mean), g.uniform(*self.std))
            coin, zero_coin = tissue(1), tissue(2)
            prior = lambda i: tissue(3, int(i)).uniform(*self.priors[i])  # noqa: E731
        means = np.array([drawn[groups[int(i)]][0] for i in ids], np.float32)
        stds = np.array([drawn[groups[int(i)]][1] for i in ids], np.float32)
        if self.priors and self.prior_probability and coin.random() < self.prior_probability:
            for position, i in enumerate(ids.tolist()):
                if i in self.priors:
                    means[position] = prior(i)
        if 0 in groups and zero_coin.random() < self.zero_background:
            position = int(np.searchsorted(ids, 0))
            means[position] = stds[position] = 0.0
        return means, stds


    def _background(self, moved, ids, means, stds, rng):
        """Background regions (``-1`` off the background), their means and stds; ``(None,
        None, None)`` without ``background`` or when the background was drawn as zero."""
        position = int(np.searchsorted(ids, 0))
        if self.background < 2 or (means[position] == 0 and stds[position] == 0):
            return None, None, None
        count = int(rng.integers(1, self.background + 1))
        region_means = np.concatenate([[means[position]],
                                       rng.uniform(*self.mean, count - 1)]).astype(np.float32)
        region_stds = np.concatenate([[stds[position]],
                                      rng.uniform(*self.std, count - 1)]).astype(np.float32)
        shape = moved.shape
        regions = np.full(shape, -1, np.int8)
        background = moved == 0
        if count == 1:
            regions[background] = 0
            return regions, region_means, region_stds
        coarse = tuple(int(np.ceil(n / self.background_spacing)) + 1 for n in shape)
        # The argmax over ``count`` smooth random fields, one field at a time (a strictly
        # larger value takes over: ties keep the first, as np.argmax).
        best = spatial.upsample(rng.standard_normal(coarse), shape)
        winner = np.zeros(shape, np.int8)
        for region in range(1, count):
            field = spatial.upsample(rng.standard_normal(coarse), shape)
            larger = field > best
            np.copyto(winner, np.int8(region), where=larger)
            np.copyto(best, field, where=larger)
        regions[background] = winner[background]
        return regions, region_means, region_stds


def end_planes(labels: np.ndarray, axis: int, *, depth: int | None = None,
               fraction: float = 0.5) -> tuple[int, int] | None:
    """The first and last planes along ``axis`` that hold the labelled anatomy's full cross
    section: from each end, the outermost plane whose labelled voxel count reaches
    ``fraction`` of the largest count among the ``depth`` outermost labelled planes there
    (default: 2 % of the axis, at least 3). A map's outermost planes are often labelled only
    in part (a few hundred femur voxels where the planes inside hold thousands): repeating
    such a plane outward would continue a sliver, not the shaft. None: nothing labelled."""
    counts = np.count_nonzero(np.asarray(labels) != 0,
                              axis=tuple(a for a in range(np.ndim(labels)) if a != axis))
    planes = np.flatnonzero(counts)
    if not len(planes):
        return None
    depth = max(3, int(round(0.02 * len(counts)))) if depth is None else max(1, int(depth))
    first = planes[:depth]
    last = planes[::-1][:depth]
    low = first[np.argmax(counts[first] >= fraction * counts[first].max())]
    high = last[np.argmax(counts[last] >= fraction * counts[last].max())]
    return int(low), int(high)


def integrate_svf(velocity: np.ndarray, steps: int = 7) -> np.ndarray:
    """Scaling and squaring of a stationary velocity field ``(3, D, H, W)`` (voxels): the
    displacement of its time-1 flow (NumPy twin of :func:`dazoo.ops.integrate_velocity`,
    linear interpolation, border values repeated)."""
    u = np.asarray(velocity, np.float32) / np.float32(2 ** int(steps))
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in u.shape[1:]],
                                indexing="ij"))
    for _ in range(int(steps)):
        points = grid + u
        u = u + np.stack([ndi.map_coordinates(c, points, order=1, mode="nearest") for c in u])
    return u


def _thick_slices(image: np.ndarray, axis: int, thickness: float) -> np.ndarray:
    """Simulates slices ``thickness`` voxels apart along ``axis``: the slice profile (a
    Gaussian of FWHM ``thickness``), sampling at that spacing, linear interpolation back."""
    sigma = [0.0, 0.0, 0.0]
    sigma[axis] = thickness / 2.355
    blurred = ndi.gaussian_filter(image, sigma, mode="nearest")
    n = image.shape[axis]
    sampled = _lerp_take(blurred, np.arange(0, n - 1 + 1e-6, thickness), axis)
    where = np.minimum(np.arange(n) / thickness, sampled.shape[axis] - 1)
    return _lerp_take(sampled, where, axis)


def _lerp_take(array: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """``array`` linearly interpolated at fractional ``positions`` along ``axis``."""
    n = array.shape[axis]
    low = np.clip(np.floor(positions).astype(int), 0, n - 1)
    high = np.minimum(low + 1, n - 1)
    shape = [1] * array.ndim
    shape[axis] = len(positions)
    weight = (positions - low).astype(np.float32).reshape(shape)
    return (np.take(array, low, axis=axis) * (1 - weight)
            + np.take(array, high, axis=axis) * weight).astype(np.float32)
