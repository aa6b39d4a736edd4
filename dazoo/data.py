"""Training data: manifests, label maps, a cache of preprocessed volumes, pair datasets.

Manifests (lists of :class:`Subject`) come from either

* a CSV file with a header and the columns ``image`` (required), ``labels`` (optional; an
  empty cell means "no label map") and ``name`` (optional; defaults to the image path as
  written, without its file ending). Relative paths are relative to the CSV file's folder::

      image,labels
      scans/s01.nii.gz,segs/s01.nii.gz
      scans/s02.mgz,

* or a folder, in one of two layouts (see :func:`find_subjects`):

  - ``images/<name>.nii.gz`` with optional ``labels/<name>.nii.gz`` (any of ``.nii``,
    ``.nii.gz``, ``.mgz``), the nnU-Net-like layout;
  - one subfolder per subject, ``<name>/<image pattern>`` with an optional
    ``<name>/<labels pattern>`` (glob patterns, e.g. Mindboggle:
    ``image="t1weighted_brain.nii.gz", labels="labels.DKT31.manual.nii.gz"``).

:class:`LabelMap` maps label ids (FreeSurfer/DKT or any integers) to contiguous classes
``0..K-1`` (0 = background), optionally merging left and right structures.

:class:`VolumeCache` keeps preprocessed volumes in memory and, optionally, as ``.npz`` files in
a folder, keyed by the file paths, their modification times and the preprocessing, so that
epochs and runs do not redo the alignment.

:class:`PairDataset` is a ``keras.utils.PyDataset`` of (moving, fixed) pairs for DeepAtlas
(:mod:`dazoo.models.deep_atlas`). Every batch is a dict with exactly the keys ``moving``,
``fixed`` ``(B, D, H, W, 1)`` float32, ``moving_labels``, ``fixed_labels`` ``(B, D, H, W)``
int32 classes (zeros where unlabelled) and ``moving_labelled``, ``fixed_labelled`` ``(B,)``
float32 flags.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import scipy.ndimage as ndi

from dazoo.errors import DazooInputError
from dazoo.io import WRITABLE, Volume, stem
from dazoo.models.deep_atlas import BATCH_KEYS  # the keys DeepAtlas.train_step reads
from dazoo.preprocess import Preprocessed, Preprocessor

__all__ = [
    "Subject",
    "read_manifest",
    "find_subjects",
    "load_subjects",
    "LabelMap",
    "VolumeCache",
    "CachedSubject",
    "Augmentation",
    "PairDataset",
    "BATCH_KEYS",
]



# ----------------------------------------------------------------------------- manifests
@dataclasses.dataclass(frozen=True)
class Subject:
    """One training image and its optional label map.

    Args:
        image: str. Path of the image.
        labels: str or None. Path of the label map (same grid as the image), if any.
        name: str. A short unique name.
    """

    image: str
    labels: str | None
    name: str


def _default_name(path: str) -> str:
    """The manifest's path without its file ending, e.g. ``"s01/t1"`` for ``s01/t1.nii.gz``."""
    return os.path.join(os.path.dirname(path), stem(path)).replace(os.sep, "/")


def read_manifest(path: str | os.PathLike) -> list[Subject]:
    """Subjects from a CSV manifest (columns ``image``, optional ``labels`` and ``name``).

    Raises:
        DazooInputError: unreadable file, no ``image`` column, a missing file, duplicate names.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
            columns = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DazooInputError(path, f"cannot be read as CSV ({err})") from None
    if not rows:
        raise DazooInputError(path, "has no subjects")
    if "image" not in columns:
        raise DazooInputError(path, "needs an 'image' column (and optionally 'labels', 'name')")
    unknown = sorted(columns - {"image", "labels", "name"} - {None})
    if unknown:
        raise DazooInputError(path, f"unknown column(s) {unknown}")
    subjects = []
    for line, row in enumerate(rows, start=2):
        image = _resolve(row.get("image"), folder, path, line, "image")
        if image is None:
            raise DazooInputError(path, f"line {line}: empty image path")
        labels = _resolve(row.get("labels"), folder, path, line, "labels")
        name = (row.get("name") or "").strip() or _default_name(row["image"].strip())
        subjects.append(Subject(image, labels, name))
    _check_unique(subjects, path)
    return subjects


def _resolve(value, folder, manifest, line, column) -> str | None:
    value = (value or "").strip()
    if not value:
        return None
    resolved = value if os.path.isabs(value) else os.path.join(folder, value)
    if not os.path.isfile(resolved):
        raise DazooInputError(manifest, f"line {line}: {column} file {value} does not exist")
    return resolved


def _check_unique(subjects, source):
    names = [s.name for s in subjects]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DazooInputError(source, f"duplicate subject name(s) {duplicates}")


def find_subjects(
    folder: str | os.PathLike,
    *,
    image: str = "image.*",
    labels: str | None = "labels.*",
) -> list[Subject]:
    """Subjects from a folder (see the module docstring for the two layouts).

    Args:
        folder: the data folder.
        image: glob pattern of the image inside each subject folder (subfolder layout).
        labels: glob pattern of the label map inside each subject folder, or None.

    Returns:
        Subjects sorted by name.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DazooInputError(folder, "is not a folder")
    if os.path.isdir(os.path.join(folder, "images")):
        subjects = _images_layout(folder)
    else:
        subjects = _subfolder_layout(folder, image, labels)
    if not subjects:
        raise DazooInputError(
            folder, f"no subjects found (expected images/<name>.nii.gz or <name>/{image})"
        )
    return sorted(subjects, key=lambda s: s.name)


def _images_layout(folder):
    subjects = []
    for path in sorted(os.listdir(os.path.join(folder, "images"))):
        if not path.endswith(WRITABLE):
            continue
        name = stem(path)
        candidates = [os.path.join(folder, "labels", name + e) for e in WRITABLE]
        found = [c for c in candidates if os.path.isfile(c)]
        subjects.append(Subject(os.path.join(folder, "images", path), found[0] if found else None,
                                name))
    _check_unique(subjects, os.path.join(folder, "images"))
    return subjects


def _subfolder_layout(folder, image, labels):
    subjects = []
    for name in sorted(os.listdir(folder)):
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            continue
        images = sorted(glob.glob(os.path.join(glob.escape(sub), image)))
        if labels is not None:
            label_files = sorted(glob.glob(os.path.join(glob.escape(sub), labels)))
            images = [p for p in images if p not in label_files]
        else:
            label_files = []
        if not images:
            continue
        if len(images) > 1 or len(label_files) > 1:
            raise DazooInputError(sub, f"several files match {image!r} or {labels!r}")
        subjects.append(Subject(images[0], label_files[0] if label_files else None, name))
    return subjects


def load_subjects(source: str | os.PathLike, **kwargs) -> list[Subject]:
    """A CSV manifest (``*.csv``) or a folder (keyword arguments of :func:`find_subjects`)."""
    source = os.fspath(source)
    if source.lower().endswith(".csv"):
        return read_manifest(source)
    return find_subjects(source, **kwargs)


# ----------------------------------------------------------------------------- label map
#: FreeSurfer subcortical right -> left ids (FreeSurferColorLUT), plus Mindboggle's basal
#: forebrain (92 -> 91). Cortical parcellations use 2xxx -> 1xxx (DK/DKT) and 12xxx -> 11xxx
#: (Destrieux).
_RIGHT_TO_LEFT = {40: 1, 41: 2, 42: 3, 43: 4, 44: 5, 46: 7, 47: 8, 48: 9, 49: 10, 50: 11,
                  51: 12, 52: 13, 53: 17, 54: 18, 58: 26, 59: 27, 60: 28, 61: 29, 62: 30,
                  63: 31, 92: 91}


def _left_id(label: int) -> int:
    if 2000 <= label < 3000 or 12000 <= label < 13000:
        return label - 1000
    return _RIGHT_TO_LEFT.get(label, label)


class LabelMap:
    """Label ids <-> contiguous classes ``0..K-1`` (class 0 = background = id 0).

    Args:
        ids: the label ids to keep (0 may be included or not; it is always class 0). Classes
            follow the sorted ids.
        names: optional ``{id: name}``.
        merge_left_right: give left and right structures one class (FreeSurfer/DKT ids:
            ``2xxx -> 1xxx``, ``12xxx -> 11xxx``, subcortical pairs such as ``53 -> 17``).
            The class's id is then the left one.
        unknown: what an id not in ``ids`` does: ``"error"`` (default) or ``"background"``.

    Example:

    >>> lm = LabelMap([1002, 1003, 2002, 2003], merge_left_right=True)
    >>> lm.num_classes, lm.ids.tolist()
    (3, [0, 1002, 1003])
    """

    def __init__(self, ids: Iterable[int], *, names: Mapping[int, str] | None = None,
                 merge_left_right: bool = False, unknown: str = "error"):
        if unknown not in ("error", "background"):
            raise DazooInputError("label map", f"unknown must be 'error' or 'background', "
                                               f"got {unknown!r}")
        try:
            given = sorted({int(i) for i in ids} - {0})
        except (TypeError, ValueError):
            raise DazooInputError("label map", "ids must be integers") from None
        self.merge_left_right = bool(merge_left_right)
        self.unknown = unknown
        self.names = {int(k): str(v) for k, v in (names or {}).items()}
        representative = [_left_id(i) if merge_left_right else i for i in given]
        self._class_ids = np.array([0] + sorted(set(representative)), dtype=np.int64)
        self._known = np.array([0] + given, dtype=np.int64)
        self._classes = np.concatenate(
            [[0], np.searchsorted(self._class_ids, representative)]).astype(np.int32)

    @property
    def num_classes(self) -> int:
        """K, background included."""
        return len(self._class_ids)

    @property
    def ids(self) -> np.ndarray:
        """The id of each class (``(K,)``; the left id for merged classes)."""
        return self._class_ids.copy()

    @property
    def known_ids(self) -> np.ndarray:
        """Every id the map accepts, 0 included."""
        return self._known.copy()

    @property
    def class_names(self) -> list[str]:
        """A name per class (``"background"``, then the names given, else the ids)."""
        return ["background"] + [self.names.get(int(i), str(int(i))) for i in self._class_ids[1:]]

    def to_classes(self, labels: np.ndarray, *, source: str | None = None) -> np.ndarray:
        """Label ids -> int32 classes (same shape).

        Raises:
            DazooInputError: ids not in the map (when ``unknown="error"``), naming ``source``.
        """
        labels = np.asarray(labels)
        flat = labels.astype(np.int64, copy=False).ravel()
        position = np.clip(np.searchsorted(self._known, flat), 0, len(self._known) - 1)
        found = self._known[position] == flat
        if not found.all():
            if self.unknown == "error":
                bad = np.unique(flat[~found])
                shown = ", ".join(str(int(b)) for b in bad[:10]) + (" ..." if len(bad) > 10 else "")
                raise DazooInputError(source or "label map", f"unknown label id(s) {shown}")
            position = np.where(found, position, 0)
        return self._classes[position].reshape(labels.shape)

    def to_ids(self, classes: np.ndarray) -> np.ndarray:
        """Classes -> label ids (int32, same shape)."""
        classes = np.asarray(classes)
        if classes.size and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise DazooInputError("classes", f"values must be in 0..{self.num_classes - 1}")
        return self._class_ids.astype(np.int32)[classes]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (for a preset's ``labels.json``)."""
        return {"ids": self._known[1:].tolist(),
                "names": {str(k): v for k, v in self.names.items()},
                "merge_left_right": self.merge_left_right, "unknown": self.unknown}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelMap:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        extra = sorted(set(data) - {"ids", "names", "merge_left_right", "unknown"})
        if extra:
            raise DazooInputError("label map", f"unknown key(s) {extra}")
        names = {int(k): v for k, v in (data.get("names") or {}).items()}
        return cls(data["ids"], names=names, merge_left_right=data.get("merge_left_right", False),
                   unknown=data.get("unknown", "error"))

    @classmethod
    def from_labels(cls, label_maps: Iterable[np.ndarray | Volume], **kwargs) -> LabelMap:
        """A map of every id found in the given label arrays."""
        ids = set()
        for labels in label_maps:
            array = labels.array if isinstance(labels, Volume) else np.asarray(labels)
            ids.update(np.unique(array).tolist())
        return cls(ids, **kwargs)

    def __repr__(self) -> str:
        return (f"LabelMap({self.num_classes} classes, merge_left_right={self.merge_left_right},"
                f" unknown={self.unknown!r})")


# ----------------------------------------------------------------------------- cache
@dataclasses.dataclass(eq=False)
class CachedSubject:
    """A preprocessed subject: the image on the model grid and its label ids there (or None)."""

    preprocessed: Preprocessed
    labels: np.ndarray | None


class VolumeCache:
    """Preprocessed volumes, computed once.

    Entries are keyed by the image (and label) file's absolute path, size and modification
    time and by :meth:`dazoo.preprocess.Preprocessor.fingerprint`, so a changed file or
    config is recomputed. With ``folder``, entries are also stored as ``<name>-<key>.npz``
    (written atomically) and reused by later runs.

    Args:
        preprocessor: the :class:`~dazoo.preprocess.Preprocessor` to apply.
        folder: str or None. Where to keep ``.npz`` files (created if missing).
        memory: bool. Keep entries in memory as well.
    """

    def __init__(self, preprocessor: Preprocessor, *, folder: str | os.PathLike | None = None,
                 memory: bool = True):
        self.preprocessor = preprocessor
        self.folder = None if folder is None else os.fspath(folder)
        self.memory = memory
        self._entries: dict[str, CachedSubject] = {}
        self.computed = 0  # number of entries computed (not found in a cache)

    def key(self, subject: Subject, *, with_labels: bool = True) -> str:
        """The cache key of a subject."""
        parts = [self.preprocessor.fingerprint(), _file_identity(subject.image)]
        if with_labels and subject.labels is not None:
            parts.append(_file_identity(subject.labels))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]

    def get(self, subject: Subject, *, with_labels: bool = True) -> CachedSubject:
        """The preprocessed subject (labels as ids on the model grid, or None)."""
        key = self.key(subject, with_labels=with_labels)
        if key in self._entries:
            return self._entries[key]
        path = None if self.folder is None else os.path.join(self.folder,
                                                             f"{_safe(subject.name)}-{key}.npz")
        entry = _load_entry(path) if path is not None and os.path.isfile(path) else None
        if entry is None:
            entry = self._compute(subject, with_labels)
            self.computed += 1
            if path is not None:
                _save_entry(path, entry)
        if self.memory:
            self._entries[key] = entry
        return entry

    def _compute(self, subject: Subject, with_labels: bool) -> CachedSubject:
        pre = self.preprocessor.apply(subject.image)
        labels = None
        if with_labels and subject.labels is not None:
            labels = self.preprocessor.apply_labels(subject.labels, pre)
        return CachedSubject(pre, labels)


def _file_identity(path: str) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        raise DazooInputError(path, "no such file") from None
    return f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def _save_entry(path: str, entry: CachedSubject) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp.npz"
    arrays = {"array": entry.preprocessed.array,
              "chain": np.array(json.dumps(entry.preprocessed.chain()))}
    if entry.labels is not None:
        arrays["labels"] = entry.labels
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_entry(path: str) -> CachedSubject | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            pre = Preprocessed.from_chain(data["array"], json.loads(str(data["chain"])))
            labels = data["labels"] if "labels" in data.files else None
    except (OSError, ValueError, KeyError, EOFError):
        return None  # a damaged cache entry is recomputed
    return CachedSubject(pre, labels)


# ----------------------------------------------------------------------------- augmentation
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
    """

    rotation: float = 0.0
    scale: float = 0.0
    translation: float = 0.0
    elastic: float = 0.0
    elastic_spacing: float = 16.0
    gamma: float = 0.0
    noise: float = 0.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise DazooInputError("augmentation", f"{field.name} must be >= 0, got {value!r}")
        if self.elastic_spacing < 2 or self.scale >= 1:
            raise DazooInputError("augmentation", "needs elastic_spacing >= 2 and scale < 1")

    @property
    def spatial(self) -> bool:
        return bool(self.rotation or self.scale or self.translation or self.elastic)

    def coordinates(self, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """Sampling coordinates ``(3, D, H, W)`` float32: where each output voxel samples."""
        shape = tuple(int(n) for n in shape)
        centre = (np.array(shape) - 1) / 2
        matrix = np.diag(rng.uniform(1 - self.scale, 1 + self.scale, 3))
        for axis, angle in enumerate(rng.uniform(-self.rotation, self.rotation, 3)):
            matrix = _axis_rotation(axis, np.deg2rad(angle)) @ matrix
        shift = rng.uniform(-self.translation, self.translation, 3)
        offset = centre - matrix @ centre + shift
        axes = [np.arange(n, dtype=np.float32) for n in shape]
        coords = np.empty((3,) + shape, dtype=np.float32)
        for row in range(3):
            coords[row] = offset[row] + sum(
                (matrix[row, a] * axes[a]).reshape([-1 if b == a else 1 for b in range(3)])
                for a in range(3))
        if self.elastic:
            coarse = tuple(int(np.ceil(n / self.elastic_spacing)) + 1 for n in shape)
            for row in range(3):
                control = rng.normal(0.0, self.elastic, coarse)
                coords[row] += ndi.zoom(control, [n / c for n, c in zip(shape, coarse)],
                                        order=3, mode="nearest", grid_mode=True)[
                                   : shape[0], : shape[1], : shape[2]]
        return coords

    def __call__(self, image: np.ndarray, labels: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """Augment ``image`` ``(D, H, W)`` and ``labels`` (same spatial transform)."""
        if self.spatial:
            coords = self.coordinates(image.shape, rng)
            image = ndi.map_coordinates(image, coords, order=1, cval=0.0, output=np.float32)
            if labels is not None:
                labels = ndi.map_coordinates(labels, coords, order=0, cval=0)
        if self.gamma:
            image = np.clip(image, 0, None) ** np.float32(np.exp(rng.normal(0, self.gamma)))
        if self.noise:
            image = image + rng.normal(0, self.noise, image.shape).astype(np.float32)
        return image.astype(np.float32, copy=False), labels


def _axis_rotation(axis: int, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


# ----------------------------------------------------------------------------- dataset
class PairDataset(keras.utils.PyDataset):
    """Random (moving, fixed) pairs for DeepAtlas, mixing labelled and unlabelled images.

    The images are already on the model grid (see :meth:`from_subjects` to build one from
    files through a :class:`~dazoo.preprocess.Preprocessor` and a :class:`VolumeCache`).
    Batch ``i`` of epoch ``e`` is drawn from ``numpy.random.default_rng([seed, e, i])``: the
    same seed gives the same batches, in any order and with any number of workers.

    Args:
        images: sequence of ``(D, H, W)`` float arrays (one shape for all).
        labels: sequence (same length) of ``(D, H, W)`` label-id arrays or None; or None.
        label_map: LabelMap. Ids -> classes (default: every id found, no merging).
        labelled: which subjects keep their labels: indices or names (``names``). Default:
            every subject with a label map (unless ``k`` is given).
        k: how many subjects keep their labels, chosen reproducibly (from ``seed``) among
            those with a label map; ``k=1`` is the one-shot setting.
        names: sequence of subject names (for ``labelled`` and messages).
        batch_size: pairs per batch.
        steps_per_epoch: batches per epoch (``len(dataset)``).
        seed: int. Seed of the choice of ``k`` labelled subjects and of the pair sampling.
        labelled_fraction: float or None. Probability that each image of a pair is drawn
            from the labelled subjects (None: uniform over all subjects).
        augment: Augmentation or None, applied independently to each image of a pair.
        **kwargs: ``workers``, ``use_multiprocessing``, ``max_queue_size`` of PyDataset.

    Example:

    >>> data = PairDataset(images, labels, k=1, batch_size=2, steps_per_epoch=50)  # doctest: +SKIP
    >>> batch = data[0]; sorted(batch)                                             # doctest: +SKIP
    """

    def __init__(self, images: Sequence[np.ndarray],
                 labels: Sequence[np.ndarray | None] | None = None, *,
                 label_map: LabelMap | None = None,
                 labelled: Sequence[int | str] | None = None, k: int | None = None,
                 names: Sequence[str] | None = None, batch_size: int = 1,
                 steps_per_epoch: int = 100, seed: int = 0,
                 labelled_fraction: float | None = None,
                 augment: Augmentation | None = None, **kwargs):
        super().__init__(**kwargs)
        self.images = [np.ascontiguousarray(i, dtype=np.float32) for i in images]
        count = len(self.images)
        if count < 2:
            raise DazooInputError("dataset", "needs at least 2 images to make pairs")
        shape = self.images[0].shape
        if len(shape) != 3 or any(i.shape != shape for i in self.images):
            raise DazooInputError("dataset", "images must all be 3D arrays of one shape")
        self.names = [str(n) for n in (names if names is not None else range(count))]
        if len(self.names) != count:
            raise DazooInputError("dataset", "names must have one entry per image")
        raw = list(labels) if labels is not None else [None] * count
        if len(raw) != count:
            raise DazooInputError("dataset", "labels must have one entry (or None) per image")
        for name, item in zip(self.names, raw):
            if item is not None and np.shape(item) != shape:
                raise DazooInputError(name, f"label map shape {np.shape(item)} is not {shape}")
        self.label_map = label_map or LabelMap.from_labels([r for r in raw if r is not None])
        self.seed = int(seed)
        self.labelled = _choose_labelled([r is not None for r in raw], self.names, labelled, k,
                                         self.seed)
        self.classes = [
            self._classes(raw[i], self.names[i]) if i in self.labelled else None
            for i in range(count)
        ]
        self.batch_size = _positive(batch_size, "batch_size")
        self.steps_per_epoch = _positive(steps_per_epoch, "steps_per_epoch")
        if labelled_fraction is not None and not 0 <= labelled_fraction <= 1:
            raise DazooInputError("dataset", "labelled_fraction must be in [0, 1]")
        self.labelled_fraction = labelled_fraction
        self.augment = augment
        self.epoch = 0

    def _classes(self, labels, name):
        classes = self.label_map.to_classes(labels, source=name)
        dtype = np.uint8 if self.label_map.num_classes <= 256 else np.int32
        return classes.astype(dtype)

    @classmethod
    def from_subjects(cls, subjects: Sequence[Subject], preprocessor: Preprocessor, *,
                      cache: VolumeCache | None = None,
                      cache_folder: str | os.PathLike | None = None,
                      **kwargs) -> PairDataset:
        """Preprocess (once, through the cache) and build the dataset.

        Label maps are read only for the subjects that keep them (``labelled``/``k``
        are applied to the subjects with a label file, before any is read).
        """
        cache = cache or VolumeCache(preprocessor, folder=cache_folder)
        names = [s.name for s in subjects]
        keep = set(_choose_labelled([s.labels is not None for s in subjects], names,
                                    kwargs.pop("labelled", None), kwargs.pop("k", None),
                                    int(kwargs.get("seed", 0))))
        entries = [cache.get(s, with_labels=i in keep) for i, s in enumerate(subjects)]
        images = [e.preprocessed.array for e in entries]
        labels = [e.labels if i in keep else None for i, e in enumerate(entries)]
        return cls(images, labels, names=names, labelled=sorted(keep), **kwargs)

    # ------------------------------------------------------------------ PyDataset
    def __len__(self) -> int:
        return self.steps_per_epoch

    def on_epoch_end(self):
        self.epoch += 1

    def pairs(self, index: int, epoch: int | None = None) -> list[tuple[int, int]]:
        """The ``(moving, fixed)`` subject indices of batch ``index``."""
        rng = self._rng(index, epoch)
        return [self._pair(rng) for _ in range(self.batch_size)]

    def _rng(self, index, epoch):
        return np.random.default_rng([self.seed, 0, self.epoch if epoch is None else epoch, index])

    def _pair(self, rng) -> tuple[int, int]:
        everyone = list(range(len(self.images)))
        moving = self._draw(rng, everyone)
        others = [i for i in everyone if i != moving]
        return moving, self._draw(rng, others)

    def _draw(self, rng, pool) -> int:
        if self.labelled_fraction is not None:
            labelled = [i for i in pool if i in self.labelled]
            unlabelled = [i for i in pool if i not in self.labelled]
            if labelled and unlabelled:
                pool = labelled if rng.random() < self.labelled_fraction else unlabelled
        return int(rng.choice(pool))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range (0..{len(self) - 1})")
        rng = self._rng(index, None)
        pairs = [self._pair(rng) for _ in range(self.batch_size)]
        batch = {key: [] for key in BATCH_KEYS}
        for moving, fixed in pairs:
            for side, subject in (("moving", moving), ("fixed", fixed)):
                image, classes = self._sample(subject, rng)
                batch[side].append(image[..., None])
                batch[f"{side}_labels"].append(classes)
                batch[f"{side}_labelled"].append(np.float32(self.classes[subject] is not None))
        return {
            "moving": np.stack(batch["moving"]).astype(np.float32),
            "fixed": np.stack(batch["fixed"]).astype(np.float32),
            "moving_labels": np.stack(batch["moving_labels"]).astype(np.int32),
            "fixed_labels": np.stack(batch["fixed_labels"]).astype(np.int32),
            "moving_labelled": np.array(batch["moving_labelled"], dtype=np.float32),
            "fixed_labelled": np.array(batch["fixed_labelled"], dtype=np.float32),
        }

    def _sample(self, subject, rng):
        image, classes = self.images[subject], self.classes[subject]
        if self.augment is not None:
            image, classes = self.augment(image, classes, rng)
        if classes is None:
            classes = np.zeros(image.shape, np.int32)
        return image, classes


def _choose_labelled(has_labels: list[bool], names: list[str], labelled, k, seed) -> list[int]:
    """Indices of the subjects that keep their labels (see :class:`PairDataset`)."""
    available = [i for i, has in enumerate(has_labels) if has]
    if labelled is not None and k is not None:
        raise DazooInputError("dataset", "give either labelled= or k=, not both")
    if labelled is not None:
        chosen = sorted({_subject_index(item, names) for item in labelled})
        missing = [names[i] for i in chosen if not has_labels[i]]
        if missing:
            raise DazooInputError("dataset", f"subject(s) {missing} have no label map")
        return chosen
    if k is None:
        return available
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= len(available):
        raise DazooInputError(
            "dataset", f"k must be an int in 0..{len(available)} (subjects with labels)")
    rng = np.random.default_rng([seed, 1])
    return sorted(int(i) for i in rng.choice(available, size=int(k), replace=False))


def _subject_index(item, names) -> int:
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        if 0 <= item < len(names):
            return int(item)
    elif item in names:
        return names.index(item)
    raise DazooInputError("dataset", f"labelled subject {item!r} is not in the dataset")


def _positive(value, name) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DazooInputError("dataset", f"{name} must be a positive int, got {value!r}")
    return int(value)
