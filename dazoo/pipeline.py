"""Pipeline: a preset's networks with its preprocessing, on scans in their native space.

``Pipeline.segment`` and ``Pipeline.register`` run read -> preprocess (affine pre-alignment to
the preset's template, one resampling to the model grid, intensity normalisation) -> model ->
postprocess (one resampling back onto the input's own grid through the composed affines) and
return small result objects with ``.save(...)``. Results overlay their inputs in any viewer:
same shape, same affine.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Iterable, Iterator

import numpy as np

from dazoo import io
from dazoo.errors import DazooInputError
from dazoo.io import Source, Volume
from dazoo.presets import Preset

__all__ = ["Pipeline", "Segmentation", "Registration"]


@dataclasses.dataclass
class Segmentation:
    """A label map on the input's own grid.

    Attributes:
        labels: :class:`~dazoo.io.Volume` of label ids (the preset's ids, 0 = background),
            on the input image's grid and affine.
        seconds: wall-clock time of the whole call.
    """

    labels: Volume
    seconds: float = 0.0

    def save(self, path: str | os.PathLike, *, protect: Iterable = ()) -> str:
        """Writes the label map (integers, atomically); refuses to overwrite ``protect``."""
        return io.write_labels(self.labels, path, protect=protect)


@dataclasses.dataclass
class Registration:
    """The moving image registered onto the fixed image's own grid.

    Attributes:
        moved: the moving image resampled on the fixed image's grid (one interpolation from
            the moving native image).
        displacement: ``(X, Y, Z, 3)`` pull-back field on the fixed image's grid, RAS mm: the
            fixed voxel at world ``x`` corresponds to the moving-image world point
            ``x + d(x)`` (affine pre-alignments included).
        moved_labels: the moving label map on the fixed grid (nearest), if given.
        folding_fraction: fraction of model-grid voxels whose deformable part has a
            Jacobian determinant <= 0.
        jacobian: summary of that determinant (min, max, mean, std).
        seconds: wall-clock time of the whole call.
    """

    moved: Volume
    displacement: Volume
    moved_labels: Volume | None
    folding_fraction: float
    jacobian: dict
    seconds: float = 0.0

    def save(self, *, moved: str | os.PathLike | None = None,
             warp: str | os.PathLike | None = None,
             moved_labels: str | os.PathLike | None = None,
             warp_convention: str = "itk", protect: Iterable = ()) -> list[str]:
        """Writes the requested outputs atomically; returns the paths written.

        Args:
            moved: path of the moved image.
            warp: path of the displacement field (5D NIfTI vector image, mm); with
                ``warp_convention="itk"`` (default) the vectors are stored in LPS as ITK,
                ANTs and Slicer expect, with ``"ras"`` unchanged.
            moved_labels: path of the moved label map (needs ``moving_labels``).
            protect: paths never to overwrite (the inputs).
        """
        if moved_labels is not None and self.moved_labels is None:  # before any writing
            raise DazooInputError(moved_labels, "no moving label map was given to warp")
        written = []
        if moved is not None:
            written.append(io.write_image(self.moved, moved, protect=protect))
        if warp is not None:
            written.append(io.write_displacement(self.displacement, warp, protect=protect,
                                                 convention=warp_convention))
        if moved_labels is not None:
            written.append(io.write_labels(self.moved_labels, moved_labels, protect=protect))
        return written


class Pipeline:
    """A loaded preset: segmentation and registration of native-space scans.

    Build it with :func:`dazoo.load`. The model is loaded once; call :meth:`segment` /
    :meth:`register` on as many images as needed.

    Args:
        preset: the :class:`~dazoo.presets.Preset` to load (its weights are verified
            against the model card's sha256).
    """

    def __init__(self, preset: Preset):
        from dazoo.models.deep_atlas import DeepAtlas
        from dazoo.preprocess import Preprocessor

        preset.verify()
        self.preset = preset
        config = preset.read_json("config.json")
        self.model = DeepAtlas.from_config(config["model"])
        self.model.load_weights(preset.file("model.weights.h5"))
        self.preprocessor = Preprocessor(preset.read_json("preprocess.json"), root=preset.path)
        classes = sorted(preset.read_json("labels.json")["classes"], key=lambda c: c["class"])
        if [c["class"] for c in classes] != list(range(self.model.num_classes)):
            raise DazooInputError(preset.file("labels.json"),
                                  f"classes must be 0..{self.model.num_classes - 1}, one "
                                  f"entry each, for this model's {self.model.num_classes} outputs")
        self.class_ids = np.array([c["id"] for c in classes], dtype=np.int32)
        self.label_names = {int(c["id"]): c["name"] for c in classes}

    @property
    def name(self) -> str:
        return self.preset.name

    def __repr__(self) -> str:
        return f"Pipeline({self.preset.name!r}, {self.preset.path})"

    # ----------------------------------------------------------------- helpers
    def preprocess(self, image: Source):
        """The image on the model grid (:class:`dazoo.preprocess.Preprocessed`)."""
        return self.preprocessor.apply(image)

    # ----------------------------------------------------------------- segment
    def segment(self, image: Source) -> Segmentation:
        """Segments one image and returns the label map on its own grid.

        Args:
            image: a path (NIfTI or MGZ), nibabel image, or ``(array, affine)``.
        """
        from dazoo.postprocess import labels_to_native

        start = time.perf_counter()
        pre = self.preprocess(image)
        probabilities = self.model.segmentation_net.predict_on_batch(pre.array[None, ..., None])
        classes = labels_to_native(np.asarray(probabilities)[0], pre)
        labels = Volume(self.class_ids[classes], pre.native_affine, None)
        return Segmentation(labels=labels, seconds=time.perf_counter() - start)

    def segment_many(self, images: Iterable[Source]) -> Iterator[Segmentation]:
        """Segments each image in turn (the model stays loaded)."""
        for image in images:
            yield self.segment(image)

    # ----------------------------------------------------------------- register
    def register(self, moving: Source, fixed: Source, *,
                 moving_labels: Source | None = None) -> Registration:
        """Registers ``moving`` onto ``fixed``; results are on the fixed image's own grid.

        Args:
            moving: the image to deform (path, nibabel image or ``(array, affine)``).
            fixed: the reference image.
            moving_labels: optional label map of ``moving`` (same grid) to carry along.
        """
        from dazoo.metrics import jacobian_determinant
        from dazoo.postprocess import displacement_to_world, warp_native

        start = time.perf_counter()
        moving_volume = io.read_image(moving)
        fixed_volume = io.read_image(fixed)
        labels_volume = None
        if moving_labels is not None:
            labels_volume = io.read_labels(moving_labels, like=moving_volume)
        moving_pre = self.preprocess(moving_volume)
        fixed_pre = self.preprocess(fixed_volume)
        out = self.model.registration_net.predict_on_batch(
            [moving_pre.array[None, ..., None], fixed_pre.array[None, ..., None]])
        u = np.asarray(out["displacement"])[0]
        field = displacement_to_world(u, fixed_pre, moving_pre)
        moved = warp_native(moving_volume, field, fixed_volume.affine, order=1)
        moved_labels = None
        if labels_volume is not None:
            moved_labels = Volume(warp_native(labels_volume, field, fixed_volume.affine, order=0),
                                  fixed_volume.affine, None)
        det = jacobian_determinant(u)
        return Registration(
            moved=Volume(moved, fixed_volume.affine, None),
            displacement=Volume(field, fixed_volume.affine, None),
            moved_labels=moved_labels,
            folding_fraction=float(np.mean(det <= 0)),
            jacobian={"min": float(det.min()), "max": float(det.max()),
                      "mean": float(det.mean()), "std": float(det.std())},
            seconds=time.perf_counter() - start,
        )
