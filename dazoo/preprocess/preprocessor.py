"""The :class:`Preprocessor` (read, align, resample once, normalise) and its record
:class:`Preprocessed`, which keeps the chain back to the native grid."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from dazoo.errors import DazooInputError
from dazoo.io import Source, Volume, read_image, read_labels
from dazoo.preprocess.alignment import align_affine, alignment_score, mirror_matrix
from dazoo.preprocess.config import PreprocessConfig
from dazoo.preprocess.geometry import affine_sample, grid_affine, image_centre, resample, snap
from dazoo.preprocess.intensity import intensity_parameters, normalise_intensity
from dazoo.presets import sha256


@dataclasses.dataclass(eq=False)
class Preprocessed:
    """An image on the model grid, with the chain that maps it back to its native grid.

    Args:
        array: np.ndarray. ``(D, H, W)`` float32 normalised intensities on the model grid.
        affine: np.ndarray. ``(4, 4)`` model voxel -> template (model) world RAS mm.
        native_shape: tuple. ``(X, Y, Z)`` shape of the input's own grid.
        native_affine: np.ndarray. ``(4, 4)`` native voxel -> native world RAS mm.
        alignment: np.ndarray. ``(4, 4)`` template world -> native world (identity without
            alignment).
        intensity: tuple. ``(offset, scale)``: normalised = ``(raw - offset) / scale``.
        source: str or None. The input's path (for messages).
    """

    array: np.ndarray
    affine: np.ndarray
    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    alignment: np.ndarray
    intensity: tuple[float, float] = (0.0, 1.0)
    source: str | None = None

    @property
    def model_to_native(self) -> np.ndarray:
        """``(4, 4)`` model voxel -> native voxel: ``inv(native_affine) @ alignment @ affine``."""
        return snap(np.linalg.inv(self.native_affine) @ self.alignment @ self.affine)

    @property
    def native_to_model(self) -> np.ndarray:
        """``(4, 4)`` native voxel -> model voxel (inverse of :attr:`model_to_native`)."""
        return snap(np.linalg.inv(self.affine) @ np.linalg.inv(self.alignment)
                     @ self.native_affine)

    @property
    def native_volume_like(self) -> Volume:
        """A zero-memory :class:`Volume` with the native grid (for grid checks)."""
        empty = np.broadcast_to(np.zeros((), dtype=np.uint8), self.native_shape)
        return Volume(empty, self.native_affine, self.source)

    def volume(self) -> Volume:
        """The model-grid image as a :class:`Volume` (to write it with its affine)."""
        return Volume(self.array, self.affine, None)

    def chain(self) -> dict[str, Any]:
        """The recorded chain as JSON-serialisable values (no image data)."""
        return {
            "affine": self.affine.tolist(),
            "native_shape": list(self.native_shape),
            "native_affine": self.native_affine.tolist(),
            "alignment": self.alignment.tolist(),
            "intensity": list(self.intensity),
            "source": self.source,
        }

    @classmethod
    def from_chain(cls, array: np.ndarray, chain: Mapping[str, Any]) -> Preprocessed:
        """Rebuild from :meth:`chain` and the model-grid array."""
        return cls(
            array=np.asarray(array, dtype=np.float32),
            affine=np.array(chain["affine"], dtype=float),
            native_shape=tuple(int(n) for n in chain["native_shape"]),
            native_affine=np.array(chain["native_affine"], dtype=float),
            alignment=np.array(chain["alignment"], dtype=float),
            intensity=tuple(float(v) for v in chain["intensity"]),
            source=chain.get("source"),
        )


#: A grown model grid holds at most this many times the preset grid's voxels.
GROW_LIMIT = 2.0


class Preprocessor:
    """Maps native scans onto a model grid, as a :class:`PreprocessConfig` describes.

    Args:
        config: PreprocessConfig or dict.
        root: str or None. Folder that relative paths in the config (the template) are
            relative to; usually the preset folder.

    Example:

    >>> pre = Preprocessor(PreprocessConfig(voxel_size=(2, 2, 2), shape=(64, 64, 64)))
    >>> out = pre.apply("scan.nii.gz")                       # doctest: +SKIP
    >>> labels = pre.apply_labels("seg.nii.gz", out)         # doctest: +SKIP
    """

    def __init__(self, config: PreprocessConfig | Mapping[str, Any], *,
                 root: str | os.PathLike | None = None):
        if not isinstance(config, PreprocessConfig):
            config = PreprocessConfig.from_dict(config)
        self.config = config
        self.root = None if root is None else os.fspath(root)
        self._template: Volume | None = None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Preprocessor:
        """Load a config file; the template path is taken relative to its folder."""
        return cls(PreprocessConfig.from_json(path), root=os.path.dirname(os.path.abspath(path)))

    @property
    def template_path(self) -> str | None:
        """The resolved template path, or None."""
        if self.config.template is None:
            return None
        path = self.config.template
        return path if self.root is None or os.path.isabs(path) else os.path.join(self.root, path)

    @property
    def template(self) -> Volume | None:
        """The template image (read once), or None."""
        if self._template is None and self.template_path is not None:
            self._template = read_image(self.template_path)
        return self._template

    def fingerprint(self) -> str:
        """A hash of the config and the template's contents (for cache keys): a copy of the
        same template elsewhere (each training run keeps its own) gives the same key."""
        parts = [self.config.to_json()]
        if self.template_path is not None:
            stat = os.stat(self.template_path)
            identity = (os.path.abspath(self.template_path), stat.st_size, stat.st_mtime_ns)
            if getattr(self, "_template_digest", (None,))[0] != identity:
                self._template_digest = (identity, sha256(self.template_path))
            parts.append(self._template_digest[1])
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def covering_shape(self, volume: Volume, alignment: np.ndarray | None = None, *,
                       limit: float | None = GROW_LIMIT) -> tuple[int, ...]:
        """The model grid's shape grown (never shrunk) to hold the input's whole field of
        view, each size a multiple of ``2**config.levels`` (the networks' divisibility):
        ``config.shape`` for an input that fits. The field of view is measured along the
        model axes (``config.orientation``), in ``config.voxel_size`` voxels, through the
        alignment to the template when there is one (``alignment``: :meth:`align`'s, when
        already computed). ``limit``: at most this many times ``config.shape``'s voxels
        (memory grows with them: a 256 mm head on the knee grid would need 6.7x and ran a
        24 GiB machine out of memory), the field of view shrunk evenly until it fits; the
        grid stays centred, so what lies beyond is not covered. ``None``: no limit."""
        cfg = self.config
        frame = grid_affine(orientation=cfg.orientation, voxel_size=cfg.voxel_size,
                            shape=cfg.shape, centre=np.zeros(3))[:3, :3]
        n = np.asarray(volume.shape[:3], float)
        corners = np.array([[i, j, k, 1.0] for i in (-0.5, n[0] - 0.5)
                            for j in (-0.5, n[1] - 0.5) for k in (-0.5, n[2] - 0.5)])
        world = corners @ volume.affine.T
        if self.template is not None and cfg.alignment != "none":
            alignment = self.align(volume) if alignment is None else alignment
            world = world @ np.linalg.inv(alignment).T  # native -> template world
        voxels = world[:, :3] @ np.linalg.inv(frame).T
        extent = voxels.max(0) - voxels.min(0)
        step = 2 ** int(cfg.levels)
        needed = (np.ceil(extent / step - 1e-6) * step).astype(int)
        shape = tuple(int(max(a, b)) for a, b in zip(cfg.shape, needed))
        if limit is None:
            return shape
        budget = max(float(limit), 1.0) * float(np.prod(cfg.shape))
        for scale in np.linspace(1.0, 0.0, 101):  # the field of view scaled down evenly
            fits = tuple(int(max(a, np.floor(b * scale / step) * step))
                         for a, b in zip(cfg.shape, needed))
            if np.prod(fits, dtype=float) <= budget:
                return fits
        return tuple(int(a) for a in cfg.shape)

    def model_grid(self, volume: Volume, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """``(4, 4)`` voxel -> world affine of the model grid for this input.

        With a template: centred on the template (its own affine when the template already
        has the model grid). Without: centred on the image (``config.centre``), shifted by less
        than a voxel so that model voxel centres fall on the native lattice where the axes
        and voxel sizes allow it (then the round trip of a label map is exact).
        """
        cfg = self.config
        shape = tuple(cfg.shape if shape is None else shape)
        template = self.template
        if template is not None:
            affine = grid_affine(orientation=cfg.orientation, voxel_size=cfg.voxel_size,
                                 shape=shape, centre=image_centre(template, method="fov"))
            if template.shape == shape and np.allclose(template.affine, affine, atol=1e-4):
                return template.affine.copy()
            return affine
        affine = grid_affine(orientation=cfg.orientation, voxel_size=cfg.voxel_size,
                             shape=shape, centre=image_centre(volume, method=cfg.centre))
        lattice = np.round(np.linalg.solve(volume.affine, affine[:, 3]))
        affine[:3, 3] = (volume.affine @ lattice)[:3]
        return affine

    def align(self, volume: Volume) -> np.ndarray:
        """``(4, 4)`` template world -> native world (identity without alignment); with
        ``mirror="auto"``, possibly with a left-right reflection (see PreprocessConfig)."""
        if self.config.alignment == "none" or self.template is None:
            return np.eye(4)
        matrix = align_affine(volume, self.template, kind=self.config.alignment,
                              metric=self.config.metric)
        if self.config.mirror == "none":
            return matrix
        reflection = mirror_matrix(volume)
        mirrored = Volume(volume.array, reflection @ volume.affine, volume.path)
        candidate = reflection @ align_affine(mirrored, self.template,
                                              kind=self.config.alignment,
                                              metric=self.config.metric)
        scores = [alignment_score(volume, self.template, m) for m in (matrix, candidate)]
        return candidate if scores[1] > scores[0] else matrix

    def apply(self, source: Source, *, shape: tuple[int, ...] | str | None = None
              ) -> Preprocessed:
        """Read, align, resample (once) and normalise an image.

        Args:
            source: a path, nibabel image, Volume or ``(array, affine)``.
            shape: the model grid's shape (default ``config.shape``), or ``"cover"``: grown
                to the input's field of view (:meth:`covering_shape`); centred as usual.

        Returns:
            A :class:`Preprocessed` with the ``config.shape`` float32 array and the chain.
        """
        volume = read_image(source)
        offset, scale = intensity_parameters(volume.array, self.config.intensity,
                                             name=volume.name)
        alignment = self.align(volume)
        if isinstance(shape, str):
            if shape != "cover":
                raise DazooInputError(volume.name, f"shape must be a shape or 'cover', "
                                                   f"got {shape!r}")
            shape = self.covering_shape(volume, alignment)
        shape = tuple(self.config.shape if shape is None else shape)
        affine = self.model_grid(volume, shape)
        fill = float(volume.array.min())
        array = resample(volume, affine, shape, transform=alignment, order=1, cval=fill)
        array = normalise_intensity(array, offset, scale,
                                    clip=self.config.intensity["method"] == "percentile")
        return Preprocessed(array=array, affine=affine, native_shape=volume.shape,
                            native_affine=volume.affine, alignment=alignment,
                            intensity=(offset, scale), source=volume.path)

    def apply_labels(self, labels: Source, preprocessed: Preprocessed) -> np.ndarray:
        """Put a label map of the same input onto the model grid (nearest neighbour).

        Args:
            labels: the label map (path, nibabel image, Volume or ``(array, affine)``); its
                grid must match the image that gave ``preprocessed``.
            preprocessed: the image's :class:`Preprocessed`.

        Returns:
            ``(D, H, W)`` int32 label ids on the model grid (0 outside the input's field of
            view).
        """
        volume = read_labels(labels, like=preprocessed.native_volume_like)
        return affine_sample(volume.array, preprocessed.model_to_native,
                              preprocessed.array.shape, order=0, cval=0)


    @property
    def aligns_label_maps(self) -> bool:
        """Whether :meth:`apply_label_map` aligns a map's outline to the template (a template
        and an alignment) rather than placing it by a shift."""
        return self.config.alignment != "none" and self.template_path is not None

    def apply_label_map(self, labels: Source) -> np.ndarray:
        """Put a label map that has no image onto the model grid (nearest neighbour).

        There is no image to align. With a template and ``config.alignment`` (affine or
        rigid), the map's foreground (every nonzero id, holes filled) is aligned to the
        template's (voxels above a tenth of its maximum, holes filled) by
        :func:`align_affine` with correlation: the outline of the anatomy, not its contrast.
        Measured on two Mindboggle subjects whose images are here: their cortical labels
        placed this way agree with the same labels placed through their images' alignment
        at mean Dice 0.68-0.69 (a shift alone: 0.21-0.34). Without a template and with
        ``config.centre == "fov"``, the map is placed as :meth:`apply` places a scan on its
        grid (the field of view's centre at the grid's centre: a knee map covering a DESS
        field of view lands where that scan would). Otherwise the map is placed by
        position only, its foreground's centre of mass at the template's centre
        (``config.centre``), or at the grid's centre without a template. Used for label maps
        that training synthesises images from (:class:`dazoo.training.LabelSynth`, whose
        random affine covers the remaining difference in pose).

        Returns:
            ``(D, H, W)`` int32 label ids on the model grid.
        """
        volume = read_labels(labels)
        foreground = np.argwhere(volume.array != 0)
        if not len(foreground):
            raise DazooInputError(volume.name, "label map is empty (only background)")
        template = self.template
        if self.aligns_label_maps:
            import scipy.ndimage as ndi

            affine = self.model_grid(template)
            moving = ndi.binary_fill_holes(volume.array != 0).astype(np.float32)
            fixed = ndi.binary_fill_holes(template.array > 0.1 * float(template.array.max()))
            alignment = align_affine(Volume(moving, volume.affine, volume.path),
                                     Volume(fixed.astype(np.float32), template.affine,
                                            template.path),
                                     kind=self.config.alignment, metric="correlation")
        elif template is None and self.config.centre == "fov":
            # As apply() places a scan (the knee's field of view): the map's own field of
            # view at the grid's centre, on its voxel lattice (an exact round trip).
            affine = self.model_grid(volume)
            alignment = np.eye(4)
        else:
            centre = volume.affine[:3, :3] @ foreground.mean(axis=0) + volume.affine[:3, 3]
            if template is not None:
                affine = self.model_grid(template)
                target = image_centre(template, method=self.config.centre)
            else:
                affine = grid_affine(orientation=self.config.orientation,
                                     voxel_size=self.config.voxel_size, shape=self.config.shape,
                                     centre=centre)
                target = centre
            alignment = np.eye(4)
            alignment[:3, 3] = centre - target  # template world -> the map's world: a shift
        to_native = np.linalg.inv(volume.affine) @ alignment @ affine
        return affine_sample(volume.array, to_native, self.config.shape, order=0, cval=0)
