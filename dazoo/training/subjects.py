"""Training subjects: a CSV manifest or a folder -> :class:`Subject` items.

Manifests (lists of :class:`Subject`) come from either

* a CSV file with a header and the columns ``image`` (required), ``labels`` (optional; an
  empty cell means "no label map") and ``name`` (optional; defaults to the image path as
  written, without its file ending). Relative paths are relative to the CSV file's folder::

      image,labels
      scans/s01.nii.gz,segs/s01.nii.gz
      scans/s02.mgz,

* or a folder, in one of three layouts (see :func:`find_subjects`):

  - ``images/<name>.nii.gz`` with optional ``labels/<name>.nii.gz`` (any of ``.nii``,
    ``.nii.gz``, ``.mgz``), the nnU-Net-like layout;
  - one subfolder per subject, ``<name>/<image pattern>`` with an optional
    ``<name>/<labels pattern>`` (glob patterns, which may name subfolders and use ``**``;
    e.g. Mindboggle: ``image="t1weighted_brain.nii.gz",
    labels="labels.DKT31.manual.nii.gz"``; FreeSurfer subjects: ``image="mri/T1.mgz",
    labels="mri/aparc.DKTatlas+aseg.mgz"``);
  - a BIDS dataset (``dataset_description.json``, or ``sub-*`` folders): every
    ``sub-<x>[/ses-<y>]/anat/*_T1w.nii[.gz]`` is a subject named after its entities
    (``sub-01_ses-1``); its label map is the file of the same entities matching
    ``*_dseg.nii*`` in the same ``anat`` folder or in ``derivatives/<pipeline>/`` (BIDS
    derivatives). The image and labels patterns replace ``*_T1w.nii*`` / ``*_dseg.nii*``
    when given.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import os

from dazoo.errors import DazooInputError
from dazoo.io import WRITABLE, stem
from dazoo.labels import NEAREST  # relabel target "nearest": the nearest kept structure's id

__all__ = ["Subject", "read_manifest", "find_subjects", "load_subjects", "find_label_maps",
           "relabelled", "NEAREST", "IMAGE", "LABELS", "BIDS_IMAGE", "BIDS_LABELS"]

#: Default patterns of the subfolder layout and of a BIDS dataset (see the module docstring).
IMAGE, LABELS = "image.*", "labels.*"
BIDS_IMAGE, BIDS_LABELS = "*_T1w.nii*", "*_dseg.nii*"

# ----------------------------------------------------------------------------- manifests
@dataclasses.dataclass(frozen=True)
class Subject:
    """One training image and its optional label map.

    Args:
        image: str or None. Path of the image; None for a label map without an image (see
            :func:`find_label_maps`).
        labels: str or None. Path of the label map (same grid as the image), if any.
        name: str. A short unique name.
        relabel: ``((id, new id), ...)`` applied to the label map when it is read (a label map
            from another labelling protocol); ids not listed are kept; a new id
            :data:`NEAREST` takes the nearest kept structure's id (:func:`relabelled`).
    """

    image: str | None
    labels: str | None
    name: str
    relabel: tuple[tuple[int, int], ...] = ()

    @property
    def label_only(self) -> bool:
        """A label map without an image (training synthesises its images)."""
        return self.image is None


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
    image: str | None = None,
    labels: str | None = LABELS,
) -> list[Subject]:
    """Subjects from a folder (see the module docstring for the layouts).

    Args:
        folder: the data folder.
        image: glob pattern of the image inside each subject folder (default ``image.*``; in
            a BIDS dataset, of the file name in each ``anat`` folder, default ``*_T1w.nii*``).
        labels: glob pattern of the label map likewise (default ``labels.*``, BIDS
            ``*_dseg.nii*``), or None for no labels.

    Returns:
        Subjects sorted by name.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DazooInputError(folder, "is not a folder")
    if os.path.isdir(os.path.join(folder, "images")):
        subjects, expected = _images_layout(folder), "images/<name>.nii.gz"
    elif is_bids(folder):
        image = BIDS_IMAGE if image in (None, IMAGE) else image
        labels = BIDS_LABELS if labels == LABELS else labels
        subjects, expected = _bids_layout(folder, image, labels), f"sub-*/[ses-*/]anat/{image}"
    else:
        image = image or IMAGE
        subjects, expected = _subfolder_layout(folder, image, labels), f"<name>/{image}"
    if not subjects:
        raise DazooInputError(folder, f"no subjects found (expected {expected}; the patterns "
                                      f"are --image / --labels, or data.image / data.labels "
                                      f"in a recipe)")
    return sorted(subjects, key=lambda s: s.name)


def is_bids(folder: str | os.PathLike) -> bool:
    """A BIDS dataset: ``dataset_description.json`` or subject folders ``sub-*``."""
    folder = os.fspath(folder)
    return (os.path.isfile(os.path.join(folder, "dataset_description.json"))
            or bool(glob.glob(os.path.join(glob.escape(folder), "sub-*", "anat")))
            or bool(glob.glob(os.path.join(glob.escape(folder), "sub-*", "ses-*", "anat"))))


def _entities(filename: str) -> str:
    """A BIDS file name's entities, without the suffix: ``sub-01_ses-1`` of
    ``sub-01_ses-1_T1w.nii.gz``."""
    parts = stem(filename).split("_")
    return "_".join(parts[:-1]) if len(parts) > 1 else parts[0]


def _bids_layout(folder, image, labels):
    subjects = []
    root = glob.escape(folder)
    anats = sorted(glob.glob(os.path.join(root, "sub-*", "anat"))
                   + glob.glob(os.path.join(root, "sub-*", "ses-*", "anat")))
    derivatives = sorted(p for p in glob.glob(os.path.join(root, "derivatives", "*"))
                         if os.path.isdir(p))
    for anat in anats:
        relative = os.path.relpath(anat, folder)
        images = sorted(p for p in glob.glob(os.path.join(glob.escape(anat), image))
                        if p.endswith(WRITABLE))
        candidates = []
        if labels is not None:
            for where in [anat] + [os.path.join(d, relative) for d in derivatives]:
                candidates += sorted(p for p in glob.glob(os.path.join(glob.escape(where), labels))
                                     if p.endswith(WRITABLE))
            images = [p for p in images if p not in candidates]
        for path in images:
            name = _entities(os.path.basename(path))
            mine = [c for c in candidates if os.path.basename(c).startswith(name + "_")]
            if len(mine) > 1:
                found = ", ".join(os.path.relpath(m, folder) for m in mine)
                raise DazooInputError(path, f"has {len(mine)} label maps matching {labels!r} "
                                            f"(--labels / data.labels): {found}; give a "
                                            f"pattern that matches one")
            subjects.append(Subject(path, mine[0] if mine else None, name))
    _check_unique(subjects, folder)
    return subjects


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
        images = sorted(p for p in glob.glob(os.path.join(glob.escape(sub), image),
                                             recursive=True) if os.path.isfile(p))
        if labels is not None:
            label_files = sorted(p for p in glob.glob(os.path.join(glob.escape(sub), labels),
                                                      recursive=True) if os.path.isfile(p))
            images = [p for p in images if p not in label_files]
        else:
            label_files = []
        if not images:
            continue
        for pattern, matches, option in ((image, images, "--image / data.image"),
                                         (labels, label_files, "--labels / data.labels")):
            if len(matches) > 1:
                names = ", ".join(os.path.basename(m) for m in matches)
                raise DazooInputError(sub, f"the pattern {pattern!r} ({option}) matches "
                                           f"{len(matches)} files: {names}; give a pattern "
                                           f"that matches one")
        subjects.append(Subject(images[0], label_files[0] if label_files else None, name))
    return subjects


def load_subjects(source: str | os.PathLike, **kwargs) -> list[Subject]:
    """A CSV manifest (``*.csv``) or a folder (keyword arguments of :func:`find_subjects`)."""
    source = os.fspath(source)
    if source.lower().endswith(".csv"):
        return read_manifest(source)
    return find_subjects(source, **kwargs)



def relabelled(array, relabel):
    """``array`` (label ids) with ``relabel`` (``{id: new id}`` or ``((id, new id), ...)``)
    applied; ids not listed are kept. A new id :data:`NEAREST` takes the id of the nearest
    voxel (Euclidean, in voxels) whose id is neither 0 nor itself relabelled so."""
    import numpy as np

    table = dict(relabel or ())
    if not table:
        return array
    array = np.asarray(array)
    ids = np.unique(array)
    lookup = np.array([table.get(int(i), int(i)) for i in ids], np.int32)
    out = lookup[np.searchsorted(ids, array)]
    nearest = [i for i, new in table.items() if new == NEAREST]
    if nearest:
        _fill_nearest(out, out == NEAREST)
    return out


def _fill_nearest(out, mask, margin: int = 8) -> None:
    """``out[mask]`` <- the value of the nearest voxel outside ``mask`` with a non-zero value,
    in place. The search works in the masked voxels' box grown by ``margin`` voxels (every
    point within ``margin`` of a masked voxel lies inside it), doubled until every masked
    voxel has its donor within the margin; no donor anywhere: background."""
    import numpy as np
    import scipy.ndimage as ndi

    if not mask.any():
        return
    points = np.argwhere(mask)
    low, high = points.min(0), points.max(0) + 1
    while True:
        box = tuple(slice(max(0, a - margin), min(n, b + margin))
                    for a, b, n in zip(low, high, out.shape))
        region, hole = out[box], mask[box]
        donors = (region != 0) & ~hole
        covers_all = all(b.start == 0 and b.stop == n for b, n in zip(box, out.shape))
        if donors.any():
            distance, index = ndi.distance_transform_edt(~donors, return_indices=True)
            if covers_all or (distance[hole] <= margin).all():
                region[hole] = region[tuple(i[hole] for i in index)]
                return
        elif covers_all:
            out[mask] = 0
            return
        margin *= 2


def find_label_maps(spec, *, source: str = "data.label_maps") -> list[Subject]:
    """Label maps without images (``Subject(image=None, ...)``) from a folder (every NIfTI/MGZ
    file inside, recursively), a glob pattern, ``{"path": folder or glob, "relabel": {id:
    new id}}``, or a list of them; named ``maps/<file stem>`` (made unique). Raises
    :class:`DazooInputError` when an entry matches nothing or is malformed."""
    specs = [spec] if isinstance(spec, (str, os.PathLike, dict)) else list(spec or [])
    found_all = []
    for item in specs:
        relabel = ()
        if isinstance(item, dict):
            if set(item) - {"path", "relabel"} or not isinstance(item.get("path"), str):
                raise DazooInputError(source, "an entry must be a path, a glob, or "
                                              "{\"path\": ..., \"relabel\": {id: new id}}")
            try:
                relabel = tuple(sorted((int(k), NEAREST if v == "nearest" else int(v))
                                       for k, v in (item.get("relabel") or {}).items()))
            except (TypeError, ValueError):
                raise DazooInputError(source, f"relabel of {item['path']!r} must map integer "
                                              "ids to integer ids or \"nearest\"") from None
            if any(v < 0 and v != NEAREST for _, v in relabel):
                raise DazooInputError(source, f"relabel of {item['path']!r}: new ids must "
                                              "be >= 0 or \"nearest\"")
            item = item["path"]
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(p for p in glob.glob(os.path.join(item, "**", "*"), recursive=True)
                           if p.endswith(tuple(WRITABLE)) and os.path.isfile(p))
        else:
            found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
        if not found:
            raise DazooInputError(source, f"{item!r} matches no label map file")
        found_all += [(path, relabel) for path in found]
    subjects, names = [], set()
    for path, relabel in found_all:
        base = f"maps/{stem(path)}"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.add(name)
        subjects.append(Subject(image=None, labels=path, name=name, relabel=relabel))
    return subjects
