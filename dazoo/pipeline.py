"""Pipeline: a preset's networks with its preprocessing, on scans in their native space.

``Pipeline.segment`` and ``Pipeline.register`` run read -> preprocess (affine pre-alignment to
the preset's template, one resampling to the model grid, intensity normalisation) -> model ->
postprocess (one resampling back onto the input's own grid through the composed affines) and
return small result objects with ``.save(...)``. Results overlay their inputs in any viewer:
same shape, same affine.
"""
from __future__ import annotations

import contextlib
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
        warnings: the input's failed sanity checks (:mod:`dazoo.checks`), one line each.
        measures: per-scan QC measures (:mod:`dazoo.checks`): the input's ``extent_mm``
            (and ``alignment``, ``outside`` with a template), the segmentation's
            ``volumes_ml``, ``confidence`` and ``region_confidence`` (``{id: mean highest
            probability over its voxels}``), and ``flip_agreement`` with flip TTA.
        brain_mask: the brain mask (uint8, input grid) when the input was brain-extracted.
        notes: what was decided on the way (the skull-strip decision and its measure).
    """

    labels: Volume
    seconds: float = 0.0
    probabilities: Volume | None = None
    names: dict | None = None
    warnings: list = dataclasses.field(default_factory=list)
    measures: dict = dataclasses.field(default_factory=dict)
    brain_mask: Volume | None = None
    notes: list = dataclasses.field(default_factory=list)

    def save(self, path: str | os.PathLike, *, protect: Iterable = ()) -> str:
        """Writes the label map (integers, atomically); refuses to overwrite ``protect``."""
        return io.write_labels(self.labels, path, protect=protect)

    def save_probabilities(self, path: str | os.PathLike, *, dtype: str = "uint8",
                           protect: Iterable = ()) -> str:
        """Writes the class probabilities as a 4D NIfTI ``(X, Y, Z, K)`` on the input's grid
        (channel k = class k of the label table): ``"uint8"``, probability x 255 rounded
        (the header's description says so), or ``"float32"``."""
        if self.probabilities is None:
            raise DazooInputError(os.fspath(path), "no probabilities: segment(..., "
                                                   "probabilities=True)")
        return io.write_probabilities(self.probabilities, path, dtype=dtype, protect=protect)

    def volumes(self) -> dict[int, float]:
        """Volume in mm^3 of each label id of the preset's table (background excluded)."""
        voxel = float(abs(np.linalg.det(self.labels.affine[:3, :3])))
        counts = np.bincount(np.searchsorted(self._ids, self.labels.array.ravel()),
                             minlength=len(self._ids)) if len(self._ids) else []
        return {int(i): float(c) * voxel for i, c in zip(self._ids, counts) if i != 0}

    @property
    def _ids(self) -> np.ndarray:
        return np.array(sorted(self.names), dtype=np.int64) if self.names else np.unique(
            self.labels.array)


@dataclasses.dataclass
class _Input:
    """An input as :meth:`Pipeline._prepare` leaves it: ``original`` (as read), ``volume``
    (what the networks see: brain-extracted or the same), its preprocessing ``pre``, the
    failed checks, the brain ``mask`` (or None), the skull-strip ``note`` and what the
    checks measured (:meth:`Pipeline.measure`)."""

    original: Volume
    volume: Volume
    pre: object
    warnings: list
    mask: Volume | None
    note: str | None
    measured: dict


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
        warnings: failed sanity checks of either input, ``"moving: ..."`` / ``"fixed: ..."``.
        masks: ``{"moving": mask or None, "fixed": ...}``, brain masks of extracted inputs.
        notes: the skull-strip decisions, ``"moving: ..."`` / ``"fixed: ..."``.
    """

    moved: Volume
    displacement: Volume
    moved_labels: Volume | None
    folding_fraction: float
    jacobian: dict
    seconds: float = 0.0
    warnings: list = dataclasses.field(default_factory=list)
    masks: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)

    def jacobian_map(self) -> Volume:
        """Jacobian determinant of ``x -> x + d(x)`` (fixed world -> moving world) on the fixed
        grid, the affine pre-alignments included: 1 where volume is kept, below 1 where the
        moving image's region is smaller than the fixed image's; <= 0 marks folding. If the
        two scans were aligned to the template on different sides (``mirror="auto"`` reflected
        one of them), the transform contains a reflection and every determinant is negative:
        its sign then says nothing about folding (``folding_fraction``, on the model grid, is
        not affected)."""
        cached = self.__dict__.get("_jacobian_map")
        if cached is not None:
            return cached
        from dazoo.metrics import world_jacobian_determinant

        affine = self.displacement.affine
        det = world_jacobian_determinant(self.displacement.array, affine)
        self.__dict__["_jacobian_map"] = Volume(det.astype(np.float32), affine, None)
        return self.__dict__["_jacobian_map"]

    def save(self, *, moved: str | os.PathLike | None = None,
             warp: str | os.PathLike | None = None,
             moved_labels: str | os.PathLike | None = None,
             warp_convention: str = "itk", warp_dtype: str = "float32",
             jacobian: str | os.PathLike | None = None, protect: Iterable = ()) -> list[str]:
        """Writes the requested outputs atomically; returns the paths written.

        Args:
            moved: path of the moved image.
            warp: path of the displacement field (5D NIfTI vector image, mm); with
                ``warp_convention="itk"`` (default) the vectors are stored in LPS as ITK,
                ANTs and Slicer expect, with ``"ras"`` unchanged.
            moved_labels: path of the moved label map (needs ``moving_labels``).
            warp_dtype: ``"float32"`` or ``"int16"`` (half the file size, scaled integers).
            jacobian: path of the Jacobian determinant map of the whole transform (affine
                included) on the fixed grid (:meth:`jacobian_map`).
            protect: paths never to overwrite (the inputs).
        """
        if moved_labels is not None and self.moved_labels is None:  # before any writing
            raise DazooInputError(moved_labels, "no moving label map was given to warp")
        written = []
        if moved is not None:
            written.append(io.write_image(self.moved, moved, protect=protect))
        if warp is not None:
            written.append(io.write_displacement(self.displacement, warp, protect=protect,
                                                 convention=warp_convention, dtype=warp_dtype))
        if jacobian is not None:
            written.append(io.write_image(self.jacobian_map(), jacobian, protect=protect))
        if moved_labels is not None:
            written.append(io.write_labels(self.moved_labels, moved_labels, protect=protect))
        return written


def _infer(net, inputs, *, compiled: bool = False):
    """One inference pass as NumPy (:func:`dazoo.backend.infer`; ``compiled``: through a
    traced graph on TensorFlow, faster for the segmenters)."""
    from dazoo.backend import infer

    return infer(net, inputs, compiled=compiled)


def _classes_of(ids: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """Class index of each label id (ids outside the table: class 0, the background)."""
    order = np.argsort(class_ids)
    position = np.clip(np.searchsorted(class_ids[order], ids), 0, len(class_ids) - 1)
    found = class_ids[order][position] == ids
    return np.where(found, order[position], 0)


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

        from dazoo.checks import InputChecks

        model = DeepAtlas.from_preset(preset)  # verifies the weights' sha256
        self._setup(model, model.preprocessor, model.label_table, preset.name)
        self.preset = preset
        if preset.file("checks.json").exists():
            self.checks = InputChecks.from_json(preset.file("checks.json"))

    @classmethod
    def from_model(cls, model, preprocessor, label_table: list[dict], *,
                   name: str = "in-memory") -> Pipeline:
        """A pipeline over a model in memory (e.g. during training, for validation).

        Args:
            model: a :class:`dazoo.DeepAtlas`.
            preprocessor: its :class:`dazoo.preprocess.Preprocessor`.
            label_table: ``[{"class": k, "id": label id, "name": str}, ...]``.
        """
        pipeline = cls.__new__(cls)
        pipeline._setup(model, preprocessor, label_table, name)
        pipeline.preset = None
        return pipeline

    def _setup(self, model, preprocessor, label_table, name):
        self.model = model
        self.preprocessor = preprocessor
        self._name = name
        self.checks = None  # InputChecks from the preset's checks.json, if it has one
        classes = sorted(label_table, key=lambda c: c["class"])
        if [c["class"] for c in classes] != list(range(model.num_classes)):
            raise DazooInputError(name, f"label table classes must be 0..{model.num_classes - 1},"
                                        f" one entry each, for this model's "
                                        f"{model.num_classes} outputs")
        self.class_ids = np.array([c["id"] for c in classes], dtype=np.int32)
        self.label_names = {int(c["id"]): c["name"] for c in classes}
        from dazoo.labels import table_groups

        self.label_groups = table_groups(classes)  # {id: structure group}, may be empty
        self._segmenters: dict = {}  # grown grids' segmenters (see segmenter())
        self._mirror = None  # (segmenter, its twin with left/right classes swapped)
        self._kept = None  # prepared inputs kept by reusing_inputs(), or None

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        where = self.preset.path if self.preset is not None else "in memory"
        return f"Pipeline({self.name!r}, {where})"

    # ----------------------------------------------------------------- helpers
    def preprocess(self, image: Source, *, grow: bool = False):
        """The image on the model grid (:class:`dazoo.preprocess.Preprocessed`); ``grow``:
        the grid grown to hold the input's whole field of view
        (:meth:`~dazoo.preprocess.Preprocessor.covering_shape`)."""
        return self.preprocessor.apply(image, shape="cover" if grow else None)

    @property
    def grows(self) -> bool:
        """Whether :meth:`segment` grows the model grid to an input's whole field of view
        (the preset's ``metadata.json`` ``"grow": true``: a knee scan with a wider field of
        view than the training grid keeps its whole bones); the segmenter's weights run on
        the larger grid (convolutions do not depend on it). Registration keeps the grid."""
        grow = self.preset.metadata.get("grow", False) if self.preset is not None else False
        if not isinstance(grow, bool):
            raise DazooInputError(self.name, "metadata.json: \"grow\" must be true or false")
        return grow

    @property
    def largest_component(self) -> list[int]:
        """Label ids of which :meth:`segment` keeps only the largest connected piece (the
        preset's ``metadata.json`` ``"largest_component"``, e.g. a knee's bones: stray
        pieces in muscle of a wider field of view than the training maps' become
        background; :func:`dazoo.postprocess.keep_largest_component`). Empty: none."""
        ids = self.preset.metadata.get("largest_component", []) if self.preset else []
        known = {int(i) for i in self.class_ids}
        if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i in known for i in ids):
            raise DazooInputError(self.name, "metadata.json: \"largest_component\" must list "
                                             "label ids of the preset's table")
        return ids

    def segmenter(self, shape):
        """The segmentation network for a model-grid shape: the model's own, or (a grown
        grid) the same weights built for ``shape``, kept for the next input of that shape."""
        net = self.model.segmentation_net
        shape = tuple(int(n) for n in shape)
        if shape == tuple(net.inshape):
            return net
        cache = self._segmenters
        if shape not in cache:
            from dazoo.models import SegmentationNet

            grown = SegmentationNet.from_config(dict(net.get_config(), inshape=list(shape)))
            grown.set_weights(net.get_weights())
            cache.clear()  # one grown network at a time (memory)
            cache[shape] = grown
        return cache[shape]

    def mirror_segmenter(self, shape):
        """:meth:`segmenter` with its classes' sides swapped: the output channels of its
        1x1x1 ``logits`` layer reordered by :meth:`flip_permutation` (each channel computed as
        before; only the softmax sums in another order). Its probabilities of a mirrored
        image, mirrored back, are the flip augmentation's second pass without reordering the
        class axis of a probability map afterwards (1.8 s for 93 classes at 112x128x112 on 2
        cores, against 0.2 s for the mean itself). Kept for the next call."""
        net = self.segmenter(shape)
        if self._mirror is None or self._mirror[0] is not net:
            from dazoo.models import SegmentationNet

            twin = SegmentationNet.from_config(net.get_config())
            twin.set_weights(net.get_weights())
            logits = twin.get_layer("logits")
            permutation = self.flip_permutation()
            logits.set_weights([w[..., permutation] for w in logits.get_weights()])
            self._mirror = (net, twin)
        return self._mirror[1]

    def check(self, volume: Volume, pre=None) -> list[str]:
        """The failed sanity checks of an input (:mod:`dazoo.checks`; ``pre``: its
        :class:`~dazoo.preprocess.Preprocessed`, for the alignment checks), one line each;
        empty when the preset has no ``checks.json`` or all pass."""
        from dazoo.checks import check_input

        if self.checks is None:
            return []
        return check_input(self.measure(volume, pre), self.checks)

    def measure(self, volume: Volume, pre=None) -> dict:
        """What the input checks measure (:func:`dazoo.checks.measure_input`: the
        foreground's extent, and with ``pre`` the alignment's correlation and the outside
        fraction), whether or not the preset has thresholds for them."""
        from dazoo.checks import measure_input

        margin = self.checks.outside_margin_mm if self.checks is not None else 6.0
        return measure_input(volume, self.preprocessor.template,
                             None if pre is None else pre.alignment, outside_margin_mm=margin)

    @property
    def skull_strip_default(self) -> str:
        """``"auto"`` for presets trained on skull-stripped brains (``metadata.json``
        ``"skull_strip": {"default": "auto", ...}``), ``"off"`` otherwise."""
        meta = (self.preset.metadata.get("skull_strip") if self.preset is not None else None)
        return (meta or {}).get("default", "off")

    @property
    def extractor(self):
        """The brain extractor (:class:`dazoo.preprocess.skullstrip.BrainExtractor`) of the
        preset's ``"skull_strip"`` settings, loaded on first use."""
        if getattr(self, "_extractor", None) is None:
            from dazoo.preprocess.skullstrip import BrainExtractor

            meta = (self.preset.metadata.get("skull_strip") or {}) if self.preset else {}
            self._extractor = BrainExtractor.from_preset(meta.get("extractor", "brainmask"))
        return self._extractor

    def skull_strip(self, volume: Volume, mode: str | None = None):
        """``(image, mask or None, note or None)``: the input brain-extracted or as it is.

        ``mode``: ``"on"`` strips, ``"off"`` leaves it, ``"auto"`` (None: the preset's
        default) strips when more than the preset's ``outside_threshold`` of the scan's
        bright voxels lie outside the brain the extractor finds (a head, not a stripped
        brain). The note says what was decided and on which measure."""
        mode = self.skull_strip_default if mode is None else mode
        if mode not in ("auto", "on", "off"):
            raise DazooInputError("--skull-strip", f"expected auto, on or off, got {mode!r}")
        if mode == "off":
            return volume, None, None
        meta = (self.preset.metadata.get("skull_strip") or {}) if self.preset else {}
        threshold = float(meta.get("outside_threshold", 0.05))
        assessed = None
        if mode == "auto":
            assessed = self.extractor.assess(volume)
            outside = assessed["outside"]
            if not assessed["brain"]:
                return volume, None, ("skull-strip auto: the extractor finds no brain in this "
                                      "image: left as it is")
            if outside <= threshold:
                return volume, None, (f"skull-strip auto: {100 * outside:.1f} % of the bright "
                                      f"voxels lie outside the brain (<= {100 * threshold:.0f} "
                                      f"%): already a brain, left as it is")
            why = (f"{100 * outside:.0f} % of the bright voxels lie outside the brain "
                   f"(> {100 * threshold:.0f} %)")
        else:
            why = "asked for"
        extraction = self.extractor.extract(volume, assessed=assessed)
        return (extraction.brain, extraction.mask,
                f"skull-strip {mode}: {why}: brain extracted ({extraction.volume_ml:.0f} mL, "
                f"{extraction.seconds:.1f} s)")

    @contextlib.contextmanager
    def reusing_inputs(self, keep: int = 8, only: Iterable[str] | None = None):
        """Within the block, an image file given again (same path, unchanged on disk) is not
        read, brain-extracted, aligned and checked again: the last ``keep`` prepared files
        are kept (an atlas registered to a cohort, or every pair of a set, prepares each scan
        once; at 256^3 a kept scan holds ~150-250 MB). ``only``: keep only these files (real
        paths), e.g. those known to come again. ``dazoo register --pairs`` runs in it."""
        from collections import OrderedDict

        wanted = None if only is None else {os.path.realpath(p) for p in only}
        previous, self._kept = self._kept, (OrderedDict(), int(keep), wanted)
        try:
            yield self
        finally:
            self._kept = previous

    def _prepare(self, image: Source, strict: bool, role: str = "",
                 skull_strip: str | None = None, grow: bool = False):
        """Reads an input, brain-extracts it (:meth:`skull_strip`), preprocesses it and
        runs the checks; ``strict``: a failed check is a :class:`DazooInputError`, the size
        check before the (then possibly slow or failing) alignment, the others right after
        it, before the networks run. Inside :meth:`reusing_inputs`, a file prepared before
        is taken from there."""
        key = None
        real = (os.path.realpath(image)
                if self._kept is not None and isinstance(image, (str, os.PathLike)) else None)
        if real is not None and (self._kept[2] is None or real in self._kept[2]):
            try:
                stat = os.stat(real)
                key = (real, stat.st_mtime_ns, stat.st_size, bool(strict), skull_strip,
                       bool(grow))
            except OSError:
                key = None
        if key is not None and key in self._kept[0]:
            kept = self._kept[0]
            kept.move_to_end(key)
            prepared = kept[key]
        else:
            prepared = self._prepare_new(image, strict, skull_strip, grow)
            if key is not None:
                kept, size, _ = self._kept
                kept[key] = prepared
                while len(kept) > size:
                    kept.popitem(last=False)
        return dataclasses.replace(prepared, warnings=[role + w for w in prepared.warnings])

    def _prepare_new(self, image: Source, strict: bool, skull_strip: str | None,
                     grow: bool) -> _Input:
        from dazoo.checks import check_input

        original = io.read_image(image)
        volume, mask, note = self.skull_strip(original, skull_strip)
        if strict and self.checks is not None:  # physical size only: no alignment needed
            size = self.check(volume)
            if size:
                self._refuse(volume, size)
        pre = self.preprocess(volume, grow=grow)
        measured = self.measure(volume, pre)
        warnings = check_input(measured, self.checks) if self.checks is not None else []
        if grow:
            from dazoo.preprocess import preprocessor

            full = self.preprocessor.covering_shape(volume, pre.alignment, limit=None)
            if tuple(full) != tuple(pre.array.shape):
                mm = self.preprocessor.config.voxel_size
                size = " x ".join(f"{n * v:.0f}" for n, v in zip(pre.array.shape, mm))
                wide = " x ".join(f"{n * v:.0f}" for n, v in zip(full, mm))
                warnings.append(
                    f"field of view about {wide} mm (model axes), wider than this preset "
                    f"segments ({size} mm around its centre, the grid grown to the "
                    f"{preprocessor.GROW_LIMIT:g}x limit): nothing outside that box is labelled")
        if strict and warnings:
            self._refuse(volume, warnings)
        return _Input(original, volume, pre, list(warnings), mask, note, measured)

    @staticmethod
    def _refuse(volume, warnings):
        more = f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else ""
        raise DazooInputError(volume.name, warnings[0] + more + " (strict)")

    # ----------------------------------------------------------------- segment
    def segment(self, image: Source, *, probabilities: bool | str = False,
                strict: bool = False, flip: bool | None = None,
                skull_strip: str | None = None) -> Segmentation:
        """Segments one image and returns the label map on its own grid.

        Args:
            image: a path (NIfTI or MGZ), nibabel image, or ``(array, affine)``.
            probabilities: also return the class probabilities on the input's grid
                (``result.probabilities``, ``(X, Y, Z, K)``): True or ``"float32"``, or
                ``"uint8"`` (``round(255 p)``, a quarter of the memory).
            strict: a failed sanity check (``result.warnings`` otherwise) raises
                :class:`~dazoo.errors.DazooInputError`.
            flip: left-right test-time augmentation: the probabilities are averaged with
                those of the mirrored image (left and right labels swapped back); twice the
                network time. Default: the preset's (:attr:`default_flip`).
            skull_strip: ``"auto"``, ``"on"`` or ``"off"`` (:meth:`skull_strip`; None: the
                preset's default, ``"auto"`` for ``brain``). The mask is
                ``result.brain_mask``, the decision ``result.notes``.
        """
        from dazoo.checks import check_output, measure_output, region_confidence, top_class

        start = time.perf_counter()
        given = self._prepare(image, strict, skull_strip=skull_strip, grow=self.grows)
        volume, pre, warnings = given.volume, given.pre, given.warnings
        details: dict = {}
        labels, scores = self._segment(pre, flip, details)
        names = {0: "background", **self.label_names}
        result = Segmentation(labels=labels, seconds=0.0, names=names, warnings=warnings)
        top = top_class(scores)
        measures = {**given.measured, **measure_output(result.volumes(), scores, top=top),
                    "region_confidence": region_confidence(scores, self.class_ids, top=top),
                    **details}
        if self.checks is not None and self.checks.after_network:
            problems = check_output(measures, self.checks, self.label_names)
            if strict and problems:
                self._refuse(volume, problems)
            warnings += problems
        maps = None
        if probabilities:
            from dazoo.postprocess import probabilities_to_native

            dtype = "uint8" if probabilities == "uint8" else "float32"
            maps = Volume(probabilities_to_native(scores, pre, dtype=dtype), pre.native_affine,
                          None)
        return Segmentation(labels=labels, seconds=time.perf_counter() - start,
                            probabilities=maps, names=names, warnings=warnings,
                            measures=measures, brain_mask=given.mask,
                            notes=[given.note] if given.note else [])

    def segment_preprocessed(self, pre, *, flip: bool | None = None) -> Volume:
        """The label map (ids) on the native grid of an image already preprocessed."""
        return self._segment(pre, flip)[0]

    def _segment(self, pre, flip=None, details=None):
        from dazoo.postprocess import labels_to_native

        scores = self.segment_scores(pre.array, flip=flip, details=details)
        labels = self.class_ids[labels_to_native(scores, pre)]
        one_piece = self.largest_component
        if one_piece:
            from dazoo.postprocess import keep_largest_component

            labels = keep_largest_component(labels, one_piece)
        return Volume(labels, pre.native_affine, None), scores

    @property
    def default_flip(self) -> bool:
        """Whether :meth:`segment` averages with the mirrored image by default (the
        preset's ``metadata.json`` ``"flip": true``; off without it)."""
        flip = self.preset.metadata.get("flip", False) if self.preset is not None else False
        if not isinstance(flip, bool):
            raise DazooInputError(self.name, "metadata.json: \"flip\" must be true or false")
        return flip

    def flip_axis(self) -> int:
        """The model grid's left-right axis (the ``R``/``L`` letter of its orientation)."""
        code = self.preprocessor.config.orientation
        return next(i for i, c in enumerate(code) if c in "RL")

    def flip_permutation(self) -> np.ndarray:
        """``perm[k]``: the class of the other side's twin of class ``k`` (itself when the
        table has no twin: background, midline structures, one-sided tables)."""
        from dazoo.labels import mirror_id

        position = {int(i): k for k, i in enumerate(self.class_ids)}
        return np.array([position.get(mirror_id(i), k) for k, i in enumerate(self.class_ids)])

    def segment_scores(self, array: np.ndarray, *, flip: bool | None = None,
                       details: dict | None = None) -> np.ndarray:
        """The segmenter's class probabilities ``(D, H, W, K)`` of a model-grid image; with
        ``flip`` (default :attr:`default_flip`), the mean of those of the image and of its
        left-right mirror image (mirrored back, left and right classes swapped), and
        ``details["flip_agreement"]`` (if ``details`` is given): the mean Dice over the
        labelled classes between the two passes' label maps."""
        flip = self.default_flip if flip is None else bool(flip)
        array = np.asarray(array, np.float32)
        net = self.segmenter(array.shape)
        scores = np.asarray(_infer(net, array[None, ..., None], compiled=True),
                            np.float32)[0]
        if flip:
            axis = self.flip_axis()
            mirrored = np.ascontiguousarray(np.flip(array, axis))
            other = np.asarray(_infer(self.mirror_segmenter(array.shape),
                                      mirrored[None, ..., None], compiled=True), np.float32)[0]
            if details is not None:
                from dazoo.checks import label_agreement

                # argmax before mirroring back: on the mirrored view it takes 10x longer
                details["flip_agreement"] = label_agreement(
                    scores.argmax(-1), np.flip(other.argmax(-1), axis))
            # in place: a new 600 MB map (1.5 mm, 93 classes) costs its first touch, ~1.5 s
            np.add(scores, np.flip(other, axis), out=scores)
            del other
            scores *= 0.5
        return scores

    def refine(self, moving_pre, fixed_pre, *, moving_labels: Volume | None = None,
               iterations: int, out=None, **options):
        """Anatomy-guided refinement of the network's registration of a preprocessed pair
        (:func:`dazoo.refine.refine_velocity`; ``moving_labels``: the moving label map on its
        native grid, else the segmenter's probabilities of the moving image; ``out``: the
        registration network's outputs for the pair if already computed).

        Returns:
            ``(u, history)``: the model-grid displacement ``(D, H, W, 3)`` and the loss terms
            per iteration.
        """
        from dazoo.refine import refine_velocity

        labels_volume = moving_labels
        net = self.model.registration_net
        if out is None:
            out = _infer(net, [moving_pre.array[None, ..., None],
                               fixed_pre.array[None, ..., None]])
        # The network's "flow" output is what it integrates (already resized to the
        # integration resolution), or its displacement at flow resolution without integration.
        resolution = net.int_resolution if net.int_steps > 0 else (2 if net.half_res else 1)
        velocity = np.asarray(out["flow"], np.float32)
        seg = self.model.segmentation_net
        fixed_probs = np.asarray(_infer(seg, fixed_pre.array[None, ..., None], compiled=True),
                                 np.float32)
        if labels_volume is not None:
            ids = self.preprocessor.apply_labels(labels_volume, moving_pre)
            moving_classes = _classes_of(ids, self.class_ids)[None]
        else:
            moving_classes = np.argmax(_infer(seg, moving_pre.array[None, ..., None],
                                              compiled=True),
                                       axis=-1)
        u, history = refine_velocity(velocity, moving_pre.array[None, ..., None],
                                     fixed_pre.array[None, ..., None], moving_classes,
                                     fixed_probs, iterations=iterations,
                                     int_steps=net.int_steps, int_resolution=resolution,
                                     **options)
        return u[0], history

    def segment_many(self, images: Iterable[Source]) -> Iterator[Segmentation]:
        """Segments each image in turn (the model stays loaded)."""
        for image in images:
            yield self.segment(image)

    # ----------------------------------------------------------------- register
    def register(self, moving: Source, fixed: Source, *,
                 moving_labels: Source | None = None, strict: bool = False,
                 refine: int | None = None, refine_options: dict | None = None,
                 skull_strip: str | None = None) -> Registration:
        """Registers ``moving`` onto ``fixed``; results are on the fixed image's own grid.

        Args:
            moving: the image to deform (path, nibabel image or ``(array, affine)``).
            fixed: the reference image.
            moving_labels: optional label map of ``moving`` (same grid) to carry along; with
                ``refine`` it also guides the refinement (instead of the segmenter's
                probabilities of the moving image).
            strict: a failed sanity check of either image (``result.warnings`` otherwise)
                raises :class:`~dazoo.errors.DazooInputError`.
            refine: iterations of anatomy-guided test-time refinement
                (:func:`dazoo.refine.refine_velocity`); None: the preset's default
                (:attr:`default_refine`), 0: the network's output alone.
            refine_options: keyword arguments of :func:`dazoo.refine.refine_velocity`
                (``learning_rate``, ``smoothness``, ``anatomy``), the preset's defaults
                otherwise; ``"guide": "segmenter"`` guides the refinement by the segmenter's
                prediction of the moving image even when ``moving_labels`` are given (they
                are still carried along; default ``"labels"``).
            skull_strip: as for :meth:`segment`, for each image; the networks see the
                brains, the moved image is the whole moving scan; masks in
                ``result.masks``.
        """
        start = time.perf_counter()
        moving_in = self._prepare(moving, strict, "moving: ", skull_strip)
        labels_volume = None
        if moving_labels is not None:
            labels_volume = io.read_labels(moving_labels, like=moving_in.original)
        fixed_in = self._prepare(fixed, strict, "fixed: ", skull_strip)
        result = self.register_preprocessed(moving_in.original, moving_in.pre,
                                            fixed_in.original.affine, fixed_in.pre,
                                            moving_labels=labels_volume, refine=refine,
                                            refine_options=refine_options)
        result.warnings = moving_in.warnings + fixed_in.warnings
        result.masks = {"moving": moving_in.mask, "fixed": fixed_in.mask}
        result.notes = [f"{role}: {x.note}" for role, x in (("moving", moving_in),
                                                             ("fixed", fixed_in)) if x.note]
        result.seconds = time.perf_counter() - start
        return result

    @property
    def default_refine(self) -> dict:
        """The preset's refinement defaults (``metadata.json`` ``"refine"``: ``iterations``
        and :func:`dazoo.refine.refine_velocity` options); no refinement without them."""
        meta = self.preset.metadata.get("refine") if self.preset is not None else None
        if meta is not None and not isinstance(meta, dict):
            raise DazooInputError(self.name, "metadata.json: \"refine\" must be an object "
                                             "({\"iterations\": N, ...})")
        return dict(meta or {"iterations": 0})

    def register_preprocessed(self, moving_volume: Volume, moving_pre, fixed_affine: np.ndarray,
                              fixed_pre, *, moving_labels: Volume | None = None,
                              refine: int | None = None, refine_options: dict | None = None,
                              ) -> Registration:
        """:meth:`register` on images already preprocessed (``moving_volume``: the native
        moving image; ``fixed_affine``: the fixed image's native affine)."""
        labels_volume = moving_labels
        out = _infer(self.model.registration_net,
                     [moving_pre.array[None, ..., None], fixed_pre.array[None, ..., None]])
        u = np.asarray(out["displacement"])[0]
        options = self.default_refine
        options.update(refine_options or {})
        iterations = int(options.pop("iterations", 0) if refine is None else refine)
        options.pop("iterations", None)
        guide = options.pop("guide", "labels")
        if iterations < 0:
            raise DazooInputError("refine", f"needs a number of iterations >= 0, got {iterations}")
        if guide not in ("labels", "segmenter"):
            raise DazooInputError("refine", f"guide must be 'labels' or 'segmenter', got {guide!r}")
        if iterations > 0:
            u, _ = self.refine(moving_pre, fixed_pre,
                               moving_labels=labels_volume if guide == "labels" else None,
                               iterations=iterations, out=out, final_loss=False, **options)
        return self.registration_from(u, moving_volume, moving_pre, fixed_affine, fixed_pre,
                                      moving_labels=labels_volume)

    def registration_from(self, u: np.ndarray, moving_volume: Volume, moving_pre,
                          fixed_affine: np.ndarray, fixed_pre, *,
                          moving_labels: Volume | None = None) -> Registration:
        """The :class:`Registration` of a model-grid displacement ``u`` ``(D, H, W, 3)``
        (voxels): the moving image (and labels) resampled once onto the fixed native grid."""
        from dazoo.metrics import jacobian_determinant
        from dazoo.postprocess import displacement_to_world, warp_native

        labels_volume = moving_labels
        field = displacement_to_world(u, fixed_pre, moving_pre)
        moved = warp_native(moving_volume, field, fixed_affine, order=1)
        moved_labels = None
        if labels_volume is not None:
            moved_labels = Volume(warp_native(labels_volume, field, fixed_affine, order=0),
                                  fixed_affine, None)
        det = jacobian_determinant(u)
        return Registration(
            moved=Volume(moved, fixed_affine, None),
            displacement=Volume(field, fixed_affine, None),
            moved_labels=moved_labels,
            folding_fraction=float(np.mean(det <= 0)),
            jacobian={"min": float(det.min()), "max": float(det.max()),
                      "mean": float(det.mean()), "std": float(det.std())},
        )
