"""Label tables: label ids <-> contiguous classes, and the one left/right merge rule.

:func:`left_id` / :func:`merge_left_right` / :func:`has_sides` are the only place that knows
which FreeSurfer / DKT ids are the right twin of which left id; :class:`LabelMap` (training),
the training data checks and :mod:`dazoo.evaluate` (merged Dice) use them.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from dazoo.errors import DazooInputError
from dazoo.io import Volume

__all__ = ["LabelMap", "has_sides", "left_id", "merge_left_right", "mirror_id",
           "FREESURFER_LUT", "label_colours", "side_free_name", "BRAIN_GROUPS",
           "freesurfer_group", "label_groups", "table_groups", "group_members",
           "WHOLE_BRAIN_ASEG", "DKT31_CORTEX", "NEAREST", "whole_brain_relabel"]

#: FreeSurfer subcortical right -> left ids (FreeSurferColorLUT), plus Mindboggle's basal
#: forebrain (92 -> 91). Cortical parcellations use 2xxx -> 1xxx (DK/DKT) and 12xxx -> 11xxx
#: (Destrieux).
_RIGHT_TO_LEFT = {40: 1, 41: 2, 42: 3, 43: 4, 44: 5, 46: 7, 47: 8, 48: 9, 49: 10, 50: 11,
                  51: 12, 52: 13, 53: 17, 54: 18, 58: 26, 59: 27, 60: 28, 61: 29, 62: 30,
                  63: 31, 92: 91}


#: FreeSurfer's names and colours (FreeSurferColorLUT.txt) of the DKT / Desikan cortical
#: parcels of the left hemisphere (the right's id is +1000, same colour) and of the aseg
#: structures dazoo's tables use.
_CORTEX = {
    1001: ("bankssts", (25, 100, 40)), 1002: ("caudalanteriorcingulate", (125, 100, 160)),
    1003: ("caudalmiddlefrontal", (100, 25, 0)), 1004: ("corpuscallosum", (120, 70, 50)),
    1005: ("cuneus", (220, 20, 100)), 1006: ("entorhinal", (220, 20, 10)),
    1007: ("fusiform", (180, 220, 140)), 1008: ("inferiorparietal", (220, 60, 220)),
    1009: ("inferiortemporal", (180, 40, 120)), 1010: ("isthmuscingulate", (140, 20, 140)),
    1011: ("lateraloccipital", (20, 30, 140)), 1012: ("lateralorbitofrontal", (35, 75, 50)),
    1013: ("lingual", (225, 140, 140)), 1014: ("medialorbitofrontal", (200, 35, 75)),
    1015: ("middletemporal", (160, 100, 50)), 1016: ("parahippocampal", (20, 220, 60)),
    1017: ("paracentral", (60, 220, 60)), 1018: ("parsopercularis", (220, 180, 140)),
    1019: ("parsorbitalis", (20, 100, 50)), 1020: ("parstriangularis", (220, 60, 20)),
    1021: ("pericalcarine", (120, 100, 60)), 1022: ("postcentral", (220, 20, 20)),
    1023: ("posteriorcingulate", (220, 180, 220)), 1024: ("precentral", (60, 20, 220)),
    1025: ("precuneus", (160, 140, 180)), 1026: ("rostralanteriorcingulate", (80, 20, 140)),
    1027: ("rostralmiddlefrontal", (75, 50, 125)), 1028: ("superiorfrontal", (20, 220, 160)),
    1029: ("superiorparietal", (20, 180, 140)), 1030: ("superiortemporal", (140, 220, 220)),
    1031: ("supramarginal", (80, 160, 20)), 1032: ("frontalpole", (100, 0, 100)),
    1033: ("temporalpole", (70, 70, 70)), 1034: ("transversetemporal", (150, 150, 200)),
    1035: ("insula", (255, 192, 32)),
}
_ASEG = {
    2: ("Left-Cerebral-White-Matter", (245, 245, 245)), 3: ("Left-Cerebral-Cortex", (205, 62, 78)),
    4: ("Left-Lateral-Ventricle", (120, 18, 134)), 5: ("Left-Inf-Lat-Vent", (196, 58, 250)),
    7: ("Left-Cerebellum-White-Matter", (220, 248, 164)),
    8: ("Left-Cerebellum-Cortex", (230, 148, 34)), 10: ("Left-Thalamus", (0, 118, 14)),
    11: ("Left-Caudate", (122, 186, 220)), 12: ("Left-Putamen", (236, 13, 176)),
    13: ("Left-Pallidum", (12, 48, 255)), 14: ("3rd-Ventricle", (204, 182, 142)),
    15: ("4th-Ventricle", (42, 204, 164)), 16: ("Brain-Stem", (119, 159, 176)),
    17: ("Left-Hippocampus", (220, 216, 20)), 18: ("Left-Amygdala", (103, 255, 255)),
    24: ("CSF", (60, 60, 60)), 26: ("Left-Accumbens-area", (255, 165, 0)),
    28: ("Left-VentralDC", (165, 42, 42)), 30: ("Left-vessel", (160, 32, 240)),
    31: ("Left-choroid-plexus", (0, 200, 200)), 41: ("Right-Cerebral-White-Matter", (245, 245, 245)),
    42: ("Right-Cerebral-Cortex", (205, 62, 78)), 43: ("Right-Lateral-Ventricle", (120, 18, 134)),
    44: ("Right-Inf-Lat-Vent", (196, 58, 250)),
    46: ("Right-Cerebellum-White-Matter", (220, 248, 164)),
    47: ("Right-Cerebellum-Cortex", (230, 148, 34)), 49: ("Right-Thalamus", (0, 118, 14)),
    50: ("Right-Caudate", (122, 186, 220)), 51: ("Right-Putamen", (236, 13, 176)),
    52: ("Right-Pallidum", (13, 48, 255)), 53: ("Right-Hippocampus", (220, 216, 20)),
    54: ("Right-Amygdala", (103, 255, 255)), 58: ("Right-Accumbens-area", (255, 165, 0)),
    60: ("Right-VentralDC", (165, 42, 42)), 62: ("Right-vessel", (160, 32, 240)),
    63: ("Right-choroid-plexus", (0, 200, 221)), 72: ("5th-Ventricle", (120, 190, 150)),
    77: ("WM-hypointensities", (200, 70, 255)), 85: ("Optic-Chiasm", (234, 169, 30)),
}
FREESURFER_LUT: dict[int, tuple[str, tuple[int, int, int]]] = {
    **_ASEG,
    **{i: (f"ctx-lh-{name}", rgb) for i, (name, rgb) in _CORTEX.items()},
    **{i + 1000: (f"ctx-rh-{name}", rgb) for i, (name, rgb) in _CORTEX.items()},
}


#: The DKT31 protocol's cortical parcels (Klein & Tourville 2012): 31 per hemisphere, FreeSurfer's
#: DK ids without banks of the STS (1001), corpus callosum (1004), frontal and temporal pole
#: (1032, 1033).
DKT31_CORTEX = tuple(sorted({*range(1002, 1036), *range(2002, 2036)}
                            - {1004, 2004, 1032, 2032, 1033, 2033}))

#: The non-cortical structures of SynthSeg's whole-brain table (FreeSurfer aseg ids): cerebral
#: white matter, lateral and inferior lateral ventricles, cerebellar white matter and cortex,
#: thalamus, caudate, putamen, pallidum, 3rd and 4th ventricles, brainstem, hippocampus,
#: amygdala, CSF, accumbens, ventral DC; left and right.
WHOLE_BRAIN_ASEG = (2, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28,
                    41, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60)

#: A relabelling target (``"nearest"`` in a recipe's ``relabel``): the voxels take the id of
#: the nearest voxel that keeps a non-zero id (:func:`dazoo.training.subjects.relabelled`).
NEAREST = -1


def whole_brain_relabel(ids: Iterable[int]) -> dict[int, int]:
    """The relabelling of a FreeSurfer / Mindboggle-101 label map's ``ids`` onto the
    whole-brain table (:data:`DKT31_CORTEX` + :data:`WHOLE_BRAIN_ASEG`): the table's ids kept,
    the choroid plexus into the lateral ventricle (31 -> 4, 63 -> 43), every other non-zero id
    (unparcellated cortex 1000/2000, corpus callosum 251-255, white-matter hypointensities 77,
    vessels 30/62, optic chiasm 85, DK parcels DKT31 merged away: 1001, 1032, 1033, ...) the
    nearest kept structure's (:data:`NEAREST`)."""
    keep = set(DKT31_CORTEX) | set(WHOLE_BRAIN_ASEG)
    return {int(i): {31: 4, 63: 43}.get(int(i), NEAREST) for i in ids
            if int(i) != 0 and int(i) not in keep}


#: Structure groups of a whole-brain FreeSurfer table, in report order.
BRAIN_GROUPS = ("cortex", "white matter", "subcortical grey matter", "ventricles and CSF",
                "cerebellum", "brainstem")
_GROUP_IDS = {
    "white matter": (2, 41, 77, 78, 79, 251, 252, 253, 254, 255),
    "subcortical grey matter": (9, 10, 11, 12, 13, 17, 18, 19, 20, 26, 27, 28,
                                48, 49, 50, 51, 52, 53, 54, 55, 56, 58, 59, 60),
    "ventricles and CSF": (4, 5, 14, 15, 24, 31, 43, 44, 63, 72),
    "cerebellum": (6, 7, 8, 45, 46, 47, 630, 631, 632),
    "brainstem": (16, 170, 171, 172, 173, 174, 175),
}
_GROUP_OF = {i: group for group, ids in _GROUP_IDS.items() for i in ids}


def freesurfer_group(label: int) -> str | None:
    """The :data:`BRAIN_GROUPS` entry of a FreeSurfer id (``1035`` -> ``"cortex"``, ``17`` ->
    ``"subcortical grey matter"``), or None for ids outside them (0, vessels, ...)."""
    label = int(label)
    if 1000 <= label < 3000 or 11000 <= label < 13000 or label in (3, 42):
        return "cortex"
    return _GROUP_OF.get(label)


def _freesurfer_named(label: int, name: str | None) -> bool:
    """Whether a table's ``name`` for ``label`` is FreeSurfer's for that id (so a table with
    its own numbering, a knee's 2 = femoral cartilage, is not read as FreeSurfer's)."""
    if name is None:
        return False
    if label in FREESURFER_LUT:
        ours = side_free_name(name).lower()
        theirs = side_free_name(FREESURFER_LUT[label][0]).lower()
        return ours.replace("_", "-") == theirs.replace("_", "-")
    return (1000 <= label < 3000 or 11000 <= label < 13000) and name.lower().startswith("ctx")


def label_groups(names: Mapping[int, str]) -> dict[int, str]:
    """The structure group of each id of a label table (``{id: name}``) that uses FreeSurfer's
    ids and names (:func:`freesurfer_group`); ids of other schemes get none."""
    out = {}
    for label, name in names.items():
        group = freesurfer_group(label) if _freesurfer_named(int(label), name) else None
        if group is not None:
            out[int(label)] = group
    return out


def table_groups(table: Iterable[Mapping[str, Any]]) -> dict[int, str]:
    """``{id: group}`` of a preset label table (``labels.json``'s ``classes``): the rows'
    ``"group"`` where the table gives them, else FreeSurfer's (:func:`label_groups`)."""
    rows = [r for r in table if int(r["id"]) != 0]
    if any("group" in r for r in rows):
        return {int(r["id"]): str(r["group"]) for r in rows if r.get("group")}
    return label_groups({int(r["id"]): r.get("name") for r in rows})


def group_members(groups: Mapping[int, str]) -> dict[str, list[int]]:
    """``{group: [ids]}``, groups in :data:`BRAIN_GROUPS` order first, then the others'
    first appearance."""
    out: dict[str, list[int]] = {}
    order = list(BRAIN_GROUPS) + [g for g in groups.values() if g not in BRAIN_GROUPS]
    for group in dict.fromkeys(order):
        ids = sorted(i for i, g in groups.items() if g == group)
        if ids:
            out[group] = ids
    return out


def label_colours(ids: Iterable[int]) -> dict[int, tuple[float, float, float]]:
    """A display colour (RGB in 0..1) per id: FreeSurfer's for the ids it names (the two
    hemispheres' twins share one), others spread around the hue circle by the golden angle
    (distinct for any number of ids, no palette repeats)."""
    import colorsys

    out, n = {}, 0
    for label in sorted(int(i) for i in ids):
        if label in FREESURFER_LUT:
            out[label] = tuple(c / 255 for c in FREESURFER_LUT[label][1])
        else:
            hue = (0.08 + n * 0.618033988749895) % 1.0
            lightness = (0.55, 0.42, 0.68)[n % 3]
            out[label] = colorsys.hls_to_rgb(hue, lightness, 0.85)
            n += 1
    return out


def side_free_name(name: str) -> str:
    """A label name without its hemisphere: ``ctx-lh-insula`` -> ``insula``,
    ``Left-Hippocampus`` -> ``Hippocampus``, ``left femur`` -> ``femur``."""
    for prefix in ("ctx-lh-", "ctx-rh-", "ctx_lh_", "ctx_rh_", "Left-", "Right-", "left ",
                   "right ", "Left ", "Right "):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def left_id(label: int) -> int:
    """The left twin of a right-hemisphere id (``2035 -> 1035``, ``53 -> 17``); others unchanged."""
    label = int(label)
    if 2000 <= label < 3000 or 12000 <= label < 13000:
        return label - 1000
    return _RIGHT_TO_LEFT.get(label, label)


_LEFT_TO_RIGHT = {left: right for right, left in _RIGHT_TO_LEFT.items()}


def mirror_id(label: int) -> int:
    """The other side's twin of an id (``1035 <-> 2035``, ``17 <-> 53``, ``11101 <-> 12101``);
    ids without a side (e.g. 0, brainstem 16) unchanged. What a left-right reflection of the
    head does to a label."""
    label = int(label)
    if 1000 <= label < 2000 or 11000 <= label < 12000:
        return label + 1000
    if 2000 <= label < 3000 or 12000 <= label < 13000:
        return label - 1000
    return _RIGHT_TO_LEFT.get(label, _LEFT_TO_RIGHT.get(label, label))


def has_sides(ids: Iterable[int]) -> bool:
    """Whether a label table has left and right structures, by FreeSurfer's ids: a right-side
    id (one :func:`left_id` changes), or a DK/DKT (1xxx/2xxx) or Destrieux (11xxx/12xxx)
    cortical id of either side. A heuristic: a table of left-side subcortical ids alone, or a
    custom scheme (a knee's 1-6, which FreeSurfer would read as left structures), is not
    recognised as sided. Used to refuse the options that reflect images but keep their ids."""
    return any(left_id(i) != int(i) or 1000 <= int(i) < 3000 or 11000 <= int(i) < 13000
               for i in ids)


def merge_left_right(labels: np.ndarray) -> np.ndarray:
    """Every right-hemisphere id replaced by its left twin (:func:`left_id`), same shape and
    dtype. Merged regions keep the left id, so they never collide with other ids."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return labels.copy()
    ids = np.unique(labels)
    lefts = np.array([left_id(i) for i in ids], dtype=labels.dtype)
    return lefts[np.searchsorted(ids, labels)]


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
        groups: ``{id: structure group}`` (reports, QC legends); default FreeSurfer's groups
            where the names are FreeSurfer's (:func:`label_groups`), none otherwise.

    Example:

    >>> lm = LabelMap([1002, 1003, 2002, 2003], merge_left_right=True)
    >>> lm.num_classes, lm.ids.tolist()
    (3, [0, 1002, 1003])
    """

    def __init__(self, ids: Iterable[int], *, names: Mapping[int, str] | None = None,
                 merge_left_right: bool = False, unknown: str = "error",
                 groups: Mapping[int, str] | None = None):
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
        representative = [left_id(i) if merge_left_right else i for i in given]
        self._class_ids = np.array([0] + sorted(set(representative)), dtype=np.int64)
        self._known = np.array([0] + given, dtype=np.int64)
        self._classes = np.concatenate(
            [[0], np.searchsorted(self._class_ids, representative)]).astype(np.int32)
        groups = label_groups(self.names) if groups is None else groups
        self.groups = {int(k): str(v) for k, v in groups.items()
                       if int(k) in set(self._class_ids[1:].tolist())}

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

    def to_table(self) -> list[dict]:
        """The preset label table ``[{"class", "id", "name"[, "group"]}, ...]`` (inverse of
        :meth:`from_table`; ``group`` where the id has one)."""
        rows = [{"class": k, "id": int(i), "name": n}
                for k, (i, n) in enumerate(zip(self._class_ids, self.class_names))]
        for row in rows[1:]:
            if row["id"] in self.groups:
                row["group"] = self.groups[row["id"]]
        return rows

    @classmethod
    def from_table(cls, table, *, unknown: str = "background") -> LabelMap:
        """The map of a preset's label table (``labels.json``'s ``[{"class", "id", "name"}]``,
        e.g. ``DeepAtlas.from_preset(...).label_table``); its classes are the table's.

        Raises:
            DazooInputError: the table's classes are not its ids in sorted order.
        """
        rows = sorted(table, key=lambda c: c["class"])
        label_map = cls([c["id"] for c in rows[1:]],
                        names={c["id"]: c["name"] for c in rows[1:]}, unknown=unknown,
                        groups=table_groups(rows))
        if label_map.ids.tolist() != [c["id"] for c in rows]:
            raise DazooInputError("label table", "classes must follow the sorted label ids")
        return label_map

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
