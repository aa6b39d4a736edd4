"""Brain extraction (skull stripping) of T1-weighted head MRI, before the brain preset.

The extractor is deepbet's (Fisch et al. 2024, MIT license), converted to Keras
(:mod:`dazoo.models.linknet`, ``examples/brainmask/convert_deepbet.py``) and run without
torch, step for step as deepbet 1.0.2 runs it: the scan in RAS orientation; a first
network at 128^3 finds the brain's bounding box; the box (plus 10 % on each side) is
resampled to 256^3 for the second network; its probability map comes back to the box's
voxels; above 0.5, the largest connected component, holes filled. Resampling is PyTorch's
``nearest-exact``. The mask lives on the input's own grid and affine. The preset then grows
it by 2 mm (:func:`dilate_mm`): FreeSurfer-like masks, as the brain preset was trained on.

:func:`outside_fraction` decides ``--skull-strip auto``: the share of the scan's bright
voxels that lie outside the first network's brain (dilated): near zero for a skull-stripped
brain, large for a head.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import scipy.ndimage as ndi

from dazoo import io
from dazoo.errors import DazooInputError
from dazoo.io import Source, Volume

__all__ = ["BrainExtractor", "Extraction", "dilate_mm", "nearest_exact", "network_input",
           "outside_fraction"]

SMALL, LARGE = (128, 128, 128), (256, 256, 256)


def nearest_exact(array: np.ndarray, shape) -> np.ndarray:
    """PyTorch's ``interpolate(mode="nearest-exact")``: output voxel ``i`` takes input voxel
    ``floor((i + 0.5) * n_in / n_out)``."""
    index = [np.minimum(np.floor((np.arange(m) + 0.5) * (n / m)).astype(np.int64), n - 1)
             for n, m in zip(array.shape, shape)]
    return array[np.ix_(*index)]


def _to_ras(volume: Volume):
    import nibabel as nib

    ornt = nib.orientations.io_orientation(volume.affine)
    array = nib.orientations.apply_orientation(np.asarray(volume.array, np.float32), ornt)
    return np.nan_to_num(array), ornt


def _from_ras(array: np.ndarray, ornt) -> np.ndarray:
    import nibabel as nib

    back = nib.orientations.ornt_transform(np.array([[0, 1], [1, 1], [2, 1]]), ornt)
    return nib.orientations.apply_orientation(array, back)


def _normalise(x: np.ndarray, low: float, high: float) -> np.ndarray:
    x = np.clip((x - low) / max(high - low, 1e-12), 0.0, 1.0)
    x = (x - x.mean()) / max(float(x.std(ddof=1)), 1e-12)  # torch.std: unbiased
    return (0.226 * x + 0.449).astype(np.float32)


def network_input(source: Source, shape=SMALL) -> np.ndarray:
    """A scan as deepbet's first network sees it (RAS, ``nearest-exact`` to ``shape``,
    normalised): for the conversion's parity checks."""
    array, _ = _to_ras(io.read_image(source))
    small = nearest_exact(array, SMALL)
    low, high = np.quantile(small, [0.005, 0.995])
    return _normalise(nearest_exact(array, shape), low, high)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _box(mask_small: np.ndarray, shape, margin: float = 0.1) -> tuple[slice, ...]:
    """deepbet's bounding box: the rows where the small mask's mean over the other two axes
    exceeds 0.02, scaled to ``shape``, widened by ``margin`` on each side."""
    centre, size = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        rows = np.where(mask_small.mean(axis=other) > 0.02)[0]
        if rows.size == 0:
            raise DazooInputError("brain extraction", "found no brain in the image")
        centre.append((rows.max() + 1 + rows.min()) / 2)
        size.append(rows.max() + 1 - rows.min())
    scale = np.array(shape, float) / np.array(mask_small.shape, float)
    centre = np.round(np.array(centre, np.float32) * scale.astype(np.float32))
    size = np.round((1 + 2 * margin) * (np.array(size, np.float32) * scale.astype(np.float32)))
    return tuple(slice(max(0, int(c - s / 2)), min(n, int(c + s / 2)))
                 for c, s, n in zip(centre, size, shape))


@dataclasses.dataclass
class Extraction:
    """A brain extraction on the input's grid: ``mask`` (uint8 0/1 Volume) and ``brain``
    (the image with zeros outside the mask), ``seconds``."""

    mask: Volume
    brain: Volume
    seconds: float = 0.0

    @property
    def volume_ml(self) -> float:
        """The brain's volume (mL)."""
        voxel = abs(np.linalg.det(np.asarray(self.mask.affine)[:3, :3]))
        return float(np.count_nonzero(self.mask.array)) * voxel / 1000

    def save(self, brain: str | os.PathLike | None = None, mask: str | os.PathLike | None = None,
             *, protect=()) -> list[str]:
        written = []
        if brain is not None:
            written.append(io.write_image(self.brain, brain, protect=protect))
        if mask is not None:
            written.append(io.write_labels(self.mask, mask, protect=protect))
        return written


def dilate_mm(mask: np.ndarray, spacing, distance_mm: float) -> np.ndarray:
    """``mask`` grown by ``distance_mm`` in the L1 (city-block) metric in millimetres: on a
    1 mm grid, ``distance_mm`` layers of 6-connected dilation (deepbet's ``n_dilate``)."""
    if distance_mm <= 0:
        return mask
    spacing = np.asarray(spacing, float)
    reach = np.floor(distance_mm / spacing + 1e-6).astype(int)
    offsets = np.indices(2 * reach + 1).reshape(3, -1).T - reach
    inside = (np.abs(offsets) * spacing).sum(axis=1) <= distance_mm + 1e-6
    structure = np.zeros(2 * reach + 1, bool)
    structure[tuple((offsets[inside] + reach).T)] = True
    return ndi.binary_dilation(mask, structure=structure)


class BrainExtractor:
    """deepbet's two networks (Keras) and its procedure; ``from_preset("brainmask")``.

    ``dilate_mm``: the mask grown by this many millimetres (L1) after deepbet's procedure.
    The brainmask preset's default, 2 mm, gives FreeSurfer-like masks that keep the CSF
    around the brain, as the brain preset's training scans were masked (measured: see the
    preset's card); 0 is deepbet's own mask.
    """

    def __init__(self, bbox_net, mask_net, *, threshold: float = 0.5, dilate_mm: float = 0.0,
                 name: str = "brainmask"):
        self.bbox_net, self.mask_net = bbox_net, mask_net
        self.threshold, self.name = float(threshold), name
        self.dilate_mm = float(dilate_mm)

    @classmethod
    def from_preset(cls, preset: str | os.PathLike = "brainmask") -> BrainExtractor:
        from dazoo.models.linknet import LinkNet3D
        from dazoo.presets import EXTRACTOR, get_preset

        found = get_preset(preset).require(EXTRACTOR)
        nets = []
        for key in ("bbox", "mask"):
            net = LinkNet3D(name=f"{found.name}_{key}")
            net.load_weights(found.file(f"{key}.weights.h5"))
            nets.append(net)
        return cls(*nets, threshold=found.metadata.get("threshold", 0.5),
                   dilate_mm=found.metadata.get("dilate_mm", 0.0), name=found.name)

    @staticmethod
    def _predict(net, array: np.ndarray) -> np.ndarray:
        from dazoo.backend import infer

        return np.asarray(infer(net, array[None, ..., None]), np.float32)[0, ..., 1]

    def _small(self, array: np.ndarray):
        small = nearest_exact(array, SMALL)
        low, high = (float(v) for v in np.quantile(small, [0.005, 0.995]))
        brain = _largest_component(self._predict(self.bbox_net, _normalise(small, low, high))
                                   > 0.5)
        return small, brain, (low, high)

    def assess(self, image: Source) -> dict:
        """The first network's look at a scan: ``outside`` (:func:`outside_fraction`; 1.0
        where it finds no brain), ``brain`` (whether it finds one; a knee: no), and what
        :meth:`extract` reuses (``state``)."""
        volume = io.read_image(image)
        array, ornt = _to_ras(volume)
        small, brain, (low, high) = self._small(array)
        found = bool(brain.any())
        return {"outside": outside_fraction(small, brain, low, high) if found else 1.0,
                "brain": found, "state": (volume, array, ornt, brain, (low, high))}

    def outside_fraction(self, image: Source) -> float:
        """:func:`outside_fraction` with this extractor's first network (1.0 where it finds
        no brain at all)."""
        return self.assess(image)["outside"]

    def extract(self, image: Source, *, assessed: dict | None = None) -> Extraction:
        """The brain mask and the stripped image of a T1 scan, on its own grid
        (``assessed``: :meth:`assess`'s result for the same scan, not computed again)."""
        import time

        started = time.perf_counter()
        if assessed is None:
            volume = io.read_image(image)
            array, ornt = _to_ras(volume)
            _, brain_small, (low, high) = self._small(array)
        else:
            volume, array, ornt, brain_small, (low, high) = assessed["state"]
        box = _box(brain_small.astype(np.float32), array.shape)
        crop = nearest_exact(array[box], LARGE)
        probabilities = self._predict(self.mask_net, _normalise(crop, low, high))
        full = np.zeros(array.shape, np.float32)
        full[box] = nearest_exact(probabilities, array[box].shape)
        mask = full > self.threshold
        inside = _largest_component(mask[box])
        mask[box] = ndi.binary_fill_holes(inside)
        mask = _from_ras(mask, ornt)
        spacing = np.sqrt((volume.affine[:3, :3] ** 2).sum(axis=0))
        mask = dilate_mm(mask, spacing, self.dilate_mm).astype(np.uint8)
        brain = np.where(mask > 0, np.asarray(volume.array), 0).astype(
            np.asarray(volume.array).dtype)
        return Extraction(mask=Volume(mask, volume.affine, volume.path),
                          brain=Volume(brain, volume.affine, volume.path),
                          seconds=time.perf_counter() - started)


def outside_fraction(small: np.ndarray, brain: np.ndarray, low: float, high: float,
                     dilate: int = 2) -> float:
    """Of the bright voxels of a scan at 128^3 (above 20 % of its 0.5-99.5 % range), the
    share outside the brain found there (dilated by ``dilate`` voxels, ~4 mm): ~0 for a
    skull-stripped brain, 0.2-0.6 for a head (measured: ``benchmarks/skullstrip.py``)."""
    bright = small > low + 0.2 * (high - low)
    if not bright.any():
        return 0.0
    near = ndi.binary_dilation(brain, iterations=dilate) if brain.any() else brain
    return float(np.mean(~near[bright]))
