"""A cache of preprocessed training volumes (memory and ``.npz`` files).

:class:`VolumeCache` keeps preprocessed volumes in memory and, optionally, as ``.npz`` files in
a folder, keyed by the file paths, their modification times and the preprocessing, so that
epochs and runs do not redo the alignment.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from dazoo.errors import DazooInputError
from dazoo.io import atomic_write
from dazoo.preprocess import Preprocessed, Preprocessor
from dazoo.presets import sha256
from dazoo.training.subjects import Subject, relabelled

__all__ = ["VolumeCache", "CachedSubject"]

@dataclasses.dataclass(eq=False)
class CachedSubject:
    """A preprocessed subject: the image on the model grid and its label ids there (or None);
    ``preprocessed`` is None for a label map without an image."""

    preprocessed: Preprocessed | None
    labels: np.ndarray | None


class VolumeCache:
    """Preprocessed volumes, computed once.

    Entries are keyed by the image (and label) file's size and contents (sha256) and by
    :meth:`dazoo.preprocess.Preprocessor.fingerprint`, so a changed file or config is
    recomputed, and a data folder mounted anew (fresh modification times) or moved is not.
    With ``folder``, entries are also stored as ``<name>-<key>.npz`` (written atomically) and
    reused by later runs.

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
        if subject.image is None:  # a label map without an image
            # "aligned": placed by the foreground's alignment to the template (see
            # Preprocessor.apply_label_map), not by a shift as before (those keys unchanged).
            # "fov": placed by the map's field of view (centre "fov", no template).
            pre = self.preprocessor
            placed_by_fov = pre.template_path is None and pre.config.centre == "fov"
            parts = [pre.fingerprint(), "label map"] + (
                ["aligned"] if pre.aligns_label_maps else []) + (
                ["fov"] if placed_by_fov else []) + [
                _file_identity(subject.labels), repr(subject.relabel)]
            return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]
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
        if subject.image is None:
            labels = relabelled(self.preprocessor.apply_label_map(subject.labels),
                                subject.relabel)
            return CachedSubject(None, labels)
        pre = self.preprocessor.apply(subject.image)
        labels = None
        if with_labels and subject.labels is not None:
            labels = self.preprocessor.apply_labels(subject.labels, pre)
        return CachedSubject(pre, labels)


#: ``(abspath, size, mtime_ns) -> sha256`` of files already hashed in this process.
_DIGESTS: dict = {}


def _file_identity(path: str) -> str:
    """A file's size and the sha256 of its contents: a key that survives a copy or a fresh
    modification time of the same bytes (a data folder mounted anew each session) and
    changes with the contents. Hashed once per process and (path, size, mtime)."""
    try:
        stat = os.stat(path)
    except OSError:
        raise DazooInputError(path, "no such file") from None
    seen = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if seen not in _DIGESTS:
        _DIGESTS[seen] = sha256(path)
    return f"{stat.st_size}|{_DIGESTS[seen]}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def _save_entry(path: str, entry: CachedSubject) -> None:
    arrays = {} if entry.preprocessed is None else {
        "array": entry.preprocessed.array,
        "chain": np.array(json.dumps(entry.preprocessed.chain()))}
    if entry.labels is not None:
        arrays["labels"] = entry.labels
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def _load_entry(path: str) -> CachedSubject | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            pre = (Preprocessed.from_chain(data["array"], json.loads(str(data["chain"])))
                   if "array" in data.files else None)
            labels = data["labels"] if "labels" in data.files else None
    except (OSError, ValueError, KeyError, EOFError):
        return None  # a damaged cache entry is recomputed
    return CachedSubject(pre, labels)
