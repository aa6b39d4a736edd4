"""Reading and writing volumes: NIfTI (``.nii``, ``.nii.gz``) and FreeSurfer MGZ (``.mgz``).

Every reader takes a *source*: a path (``str`` or ``os.PathLike``), a nibabel image, a
:class:`Volume`, or a tuple ``(array, affine)``. It returns a :class:`Volume`, the array in the
file's own voxel order together with its 4x4 voxel -> world affine (RAS+ millimetres, as in
nibabel). Nothing is reoriented or resampled here: that is :mod:`dazoo.preprocess`'s job.

Every writer is atomic (the data go to a temporary file in the destination folder, which is
then renamed over the destination) and refuses to overwrite any path given in ``protect=``
(the inputs). On failure nothing is left on disk.

Every problem with the input raises :class:`dazoo.errors.DazooInputError` with a one-line
message ``"<file>: <problem>"``.

This module imports numpy and nibabel only (no Keras, no TensorFlow).

Example:

>>> vol = read_image("scan.nii.gz")                      # doctest: +SKIP
>>> seg = read_labels("seg.mgz", like=vol)               # doctest: +SKIP
>>> write_labels(seg, "out/seg.nii.gz", protect=["seg.mgz"])  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from dazoo.errors import DazooInputError

__all__ = [
    "Volume",
    "Source",
    "read_image",
    "read_labels",
    "read_displacement",
    "write_image",
    "write_labels",
    "write_displacement",
    "write_text_atomic",
    "atomic_write",
    "same_grid",
]

#: File name endings that the writers accept (readers accept whatever nibabel can read).
WRITABLE = (".nii.gz", ".nii", ".mgz")
#: Tolerance, in mm, when comparing two grids' affines.
GRID_TOLERANCE_MM = 1e-3
#: ``descrip`` header values that record the frame of a displacement field's vectors.
_DISP_DESCRIP = {"itk": "dazoo displacement LPS mm", "ras": "dazoo displacement RAS mm"}


@dataclasses.dataclass(eq=False)
class Volume:
    """A 3D array with its voxel -> world affine.

    Args:
        array: np.ndarray. ``(X, Y, Z)`` in the file's voxel order (or ``(X, Y, Z, C)`` for
            a vector field such as a displacement).
        affine: np.ndarray. ``(4, 4)`` float64, voxel indices -> world RAS+ millimetres.
        path: str or None. The file the volume was read from, if any (used in messages and
            to refuse overwriting an input).
    """

    array: np.ndarray
    affine: np.ndarray
    path: str | None = None

    def __post_init__(self):
        self.affine = np.asarray(self.affine, dtype=np.float64)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The spatial shape ``(X, Y, Z)``."""
        return tuple(int(n) for n in self.array.shape[:3])

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis, shape ``(3,)``."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def name(self) -> str:
        """A short name for messages: the path, or ``"<array>"``."""
        return self.path if self.path is not None else "<array>"


Source = Union[str, os.PathLike, Volume, tuple, "nib.spatialimages.SpatialImage"]


# ----------------------------------------------------------------------------- reading
def read_image(source: Source, *, name: str | None = None) -> Volume:
    """Read an intensity image as float32.

    Args:
        source: a path, a nibabel image, a :class:`Volume` or ``(array, affine)``.
        name: str. How to call the input in error messages (defaults to the path).

    Returns:
        A :class:`Volume` with a float32 ``(X, Y, Z)`` array (a 4D file with a single volume
        is squeezed).

    Raises:
        DazooInputError: unreadable or corrupt file, not 3D, NaN/Inf values, all-zero image,
            invalid affine.
    """
    raw, affine, label = _load(source, name)
    array = _to_3d(raw, label)
    if not (np.issubdtype(array.dtype, np.number) and not np.iscomplexobj(array)):
        raise DazooInputError(label, f"has unsupported data type {array.dtype}")
    array = np.asarray(array, dtype=np.float32)
    _check_finite(array, label)
    if not np.any(array):
        raise DazooInputError(label, "is empty (all voxels are zero)")
    return Volume(array, affine, _path_of(source))


def read_labels(source: Source, *, like: Volume | None = None, name: str | None = None) -> Volume:
    """Read a label map as int32 label ids.

    Args:
        source: a path, a nibabel image, a :class:`Volume` or ``(array, affine)``.
        like: Volume or None. The image the labels belong to: the label map must have the same
            shape and affine (within 1e-3 mm).
        name: str. How to call the input in error messages (defaults to the path).

    Returns:
        A :class:`Volume` with an int32 ``(X, Y, Z)`` array of label ids, unchanged.

    Raises:
        DazooInputError: unreadable file, not 3D, non-integer or non-finite values, ids out
            of the int32 range, grid different from ``like``.
    """
    raw, affine, label = _load(source, name)
    array = _to_3d(raw, label)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise DazooInputError(label, f"has unsupported data type {array.dtype} for a label map")
    if not np.issubdtype(array.dtype, np.integer):
        _check_finite(array, label)
        bad = np.count_nonzero(array != np.round(array))
        if bad:
            raise DazooInputError(
                label, f"is not a label map: {bad} voxels have non-integer values"
            )
    info = np.iinfo(np.int32)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise DazooInputError(label, "has label ids outside the int32 range")
    volume = Volume(np.asarray(array, dtype=np.int32), affine, _path_of(source))
    if like is not None:
        _check_same_grid(volume, like, label)
    return volume


def read_displacement(source: Source, *, name: str | None = None) -> Volume:
    """Read a displacement field written by :func:`write_displacement` (or by ITK/ANTs).

    Args:
        source: a path (NIfTI vector image), nibabel image, Volume or ``(array, affine)``.
        name: str. How to call the input in error messages.

    Returns:
        A :class:`Volume` with a float32 ``(X, Y, Z, 3)`` array of displacements in RAS mm
        (files marked ``"dazoo displacement RAS mm"`` are read as is; any other file is taken
        to follow the ITK convention, LPS components, and converted; a Volume or
        ``(array, affine)`` is taken to be in RAS already).
    """
    descrip = None
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        try:
            source_image = nib.load(os.fspath(source))
        except (ImageFileError, OSError, EOFError, zlib.error, ValueError) as err:
            raise DazooInputError(name or os.fspath(source),
                                  f"cannot be read as NIfTI ({_one_line(err)})") from None
        descrip = _descrip(source_image)
    elif _is_nibabel(source):
        descrip = _descrip(source)
    raw, affine, label = _load(source, name)
    array = np.asarray(raw)
    if array.ndim == 5 and array.shape[3] == 1:
        array = array[:, :, :, 0, :]
    if array.ndim != 4 or array.shape[3] != 3:
        raise DazooInputError(label, f"is not a 3D displacement field (shape {array.shape})")
    array = np.asarray(array, dtype=np.float32)
    _check_finite(array, label)
    if descrip is not None and descrip != _DISP_DESCRIP["ras"]:
        array = array * np.array([-1.0, -1.0, 1.0], dtype=np.float32)
    return Volume(array, affine, _path_of(source))


def same_grid(a: Volume, b: Volume, *, tol: float = GRID_TOLERANCE_MM) -> bool:
    """Whether two volumes share one grid: same spatial shape and affines within ``tol`` mm."""
    return a.shape == b.shape and _corner_distance_mm(a.affine, b.affine, a.shape) <= tol


def _corner_distance_mm(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> float:
    """The largest distance, per world axis in mm, between the positions that the affines
    ``a`` and ``b`` give to the 8 corner voxels of a grid of ``shape``."""
    corners = np.array([[i, j, k, 1.0] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    corners[:, :3] *= np.array(shape[:3]) - 1
    return float(np.abs((a - b) @ corners.T).max())


def _check_same_grid(volume: Volume, like: Volume, label: str) -> None:
    if volume.shape != like.shape:
        raise DazooInputError(
            label,
            f"label map grid {volume.shape} does not match its image {like.name} {like.shape}",
        )
    if not same_grid(volume, like):
        diff = _corner_distance_mm(volume.affine, like.affine, volume.shape)
        raise DazooInputError(
            label,
            f"label map affine differs from its image {like.name} (by up to {diff:.3g} mm)",
        )


def _path_of(source: Any) -> str | None:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, Volume):
        return source.path
    if _is_nibabel(source):
        filename = source.get_filename()
        return None if filename is None else os.fspath(filename)
    return None


def _is_nibabel(source: Any) -> bool:
    return isinstance(source, nib.spatialimages.SpatialImage)


def _descrip(image: Any) -> str:
    try:
        value = image.header["descrip"]
    except (KeyError, TypeError, ValueError):
        return ""
    value = value.item() if hasattr(value, "item") else value
    return value.decode("latin-1").strip("\x00 ") if isinstance(value, bytes) else str(value)


def _load(source: Any, name: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Return ``(raw array, affine, label for messages)`` for any supported source."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        label = name or path
        if not os.path.exists(path):
            raise DazooInputError(label, "no such file")
        if os.path.isdir(path):
            raise DazooInputError(label, "is a folder, not an image file")
        try:
            image = nib.load(path)
            raw = np.asanyarray(image.dataobj)
        except (ImageFileError, OSError, EOFError, zlib.error, gzip.BadGzipFile,
                ValueError, TypeError, MemoryError) as err:
            problem = f"cannot be read as NIfTI/MGZ ({_one_line(err)})"
            raise DazooInputError(label, problem) from None
        affine = image.affine
    elif isinstance(source, Volume):
        label = name or source.name
        raw, affine = source.array, source.affine
    elif _is_nibabel(source):
        label = name or _path_of(source) or "<nibabel image>"
        try:
            raw = np.asanyarray(source.dataobj)
        except (OSError, EOFError, zlib.error, ValueError) as err:
            raise DazooInputError(label, f"cannot be read ({_one_line(err)})") from None
        affine = source.affine
    elif isinstance(source, (tuple, list)) and len(source) == 2:
        label = name or "<array>"
        raw, affine = np.asanyarray(source[0]), source[1]
    elif isinstance(source, np.ndarray):
        raise DazooInputError(name or "<array>", "an array needs its affine: pass (array, affine)")
    else:
        raise DazooInputError(
            name or "<input>",
            f"unsupported input type {type(source).__name__}; expected a path, a nibabel "
            "image or (array, affine)",
        )
    return np.asarray(raw), _check_affine(affine, label), label


def _check_affine(affine: Any, label: str) -> np.ndarray:
    if affine is None:
        raise DazooInputError(label, "has no affine")
    try:
        affine = np.array(affine, dtype=np.float64)
    except (TypeError, ValueError):
        raise DazooInputError(label, "affine is not a 4x4 numeric matrix") from None
    if affine.shape != (4, 4):
        raise DazooInputError(label, f"affine must be 4x4, got shape {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise DazooInputError(label, "affine contains NaN or Inf")
    if not np.allclose(affine[3], [0, 0, 0, 1]):
        raise DazooInputError(label, "affine's last row must be [0, 0, 0, 1]")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DazooInputError(label, "affine is singular (zero voxel size?)")
    return affine


def _to_3d(array: np.ndarray, label: str) -> np.ndarray:
    """Squeeze trailing singleton dimensions beyond the third; reject anything not 3D."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim > 3:
        volumes = int(np.prod(array.shape[3:]))
        raise DazooInputError(
            label,
            f"is {array.ndim}D with {volumes} volumes (shape {array.shape}); "
            "a single 3D volume is needed",
        )
    if array.ndim < 3:
        raise DazooInputError(
            label, f"is {array.ndim}D (shape {array.shape}); a 3D volume is needed"
        )
    if min(array.shape) < 2:
        raise DazooInputError(
            label, f"has shape {array.shape}: at least 2 voxels along each axis are needed"
        )
    return array


def _check_finite(array: np.ndarray, label: str) -> None:
    if np.issubdtype(array.dtype, np.integer):
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    nan = int(np.count_nonzero(np.isnan(array)))
    inf = int(array.size - np.count_nonzero(finite) - nan)
    parts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
    raise DazooInputError(label, f"contains {' and '.join(p for p in parts if p)} values")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) < 200 else text[:197] + "..."


# ----------------------------------------------------------------------------- writing
def write_image(
    image: Volume | tuple | np.ndarray,
    path: str | os.PathLike,
    *,
    affine: np.ndarray | None = None,
    protect: Iterable[str | os.PathLike] = (),
) -> str:
    """Write an intensity image as float32, atomically.

    Args:
        image: a :class:`Volume`, ``(array, affine)`` or an ``(X, Y, Z)`` array with
            ``affine=``.
        path: destination ending in ``.nii``, ``.nii.gz`` or ``.mgz``. Missing folders are
            created.
        affine: ``(4, 4)`` voxel -> world RAS mm, when ``image`` is a bare array.
        protect: paths that must not be overwritten (the inputs). A :class:`Volume`'s own
            ``path`` is always protected.

    Returns:
        The path written, as a string.
    """
    array, affine, protect = _unpack(image, affine, protect, path)
    array = np.asarray(array, dtype=np.float32)
    _check_finite(array, os.fspath(path))
    return _save(array, affine, path, protect=protect, kind="image")


def write_labels(
    labels: Volume | tuple | np.ndarray,
    path: str | os.PathLike,
    *,
    affine: np.ndarray | None = None,
    protect: Iterable[str | os.PathLike] = (),
) -> str:
    """Write a label map as integers (the label ids themselves), atomically.

    The smallest integer type that holds the ids is used (uint8, int16 or int32), without
    scaling; NIfTI files get the ``label`` intent.

    Args:
        labels: a :class:`Volume`, ``(array, affine)`` or an ``(X, Y, Z)`` integer-valued
            array with ``affine=``.
        path: destination ending in ``.nii``, ``.nii.gz`` or ``.mgz``.
        affine: ``(4, 4)`` voxel -> world RAS mm, when ``labels`` is a bare array.
        protect: paths that must not be overwritten (the inputs).

    Returns:
        The path written, as a string.
    """
    array, affine, protect = _unpack(labels, affine, protect, path)
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise DazooInputError(os.fspath(path), "label values to write are not integers")
    array = array.astype(_label_dtype(array, os.fspath(path)))
    return _save(array, affine, path, protect=protect, kind="labels")


def write_displacement(
    field: Volume | tuple | np.ndarray,
    path: str | os.PathLike,
    *,
    affine: np.ndarray | None = None,
    protect: Iterable[str | os.PathLike] = (),
    convention: str = "itk",
    dtype: str = "float32",
) -> str:
    """Write a displacement field in world millimetres as a NIfTI vector image, atomically.

    The field is a *pull-back* ("fixed to moving") field as returned by
    :func:`dazoo.postprocess.displacement_to_world`: at the world point ``x`` of a fixed
    voxel, ``x + d(x)`` is the corresponding point of the moving image. The file is a 5D
    NIfTI ``(X, Y, Z, 1, 3)`` with intent ``vector`` on the fixed image's grid.

    Args:
        field: a :class:`Volume`, ``(array, affine)`` or an ``(X, Y, Z, 3)`` array with
            ``affine=``; vectors in RAS mm (nibabel's world frame).
        path: destination ending in ``.nii`` or ``.nii.gz``.
        affine: ``(4, 4)`` voxel -> world RAS mm of the grid, when ``field`` is an array.
        protect: paths that must not be overwritten (the inputs).
        convention: ``"itk"`` (default) stores LPS components, the convention of ITK,
            SimpleITK, ANTs and Slicer, which then read the file directly as a displacement
            field transform; ``"ras"`` stores the RAS components unchanged. The choice is
            recorded in the header's ``descrip`` so :func:`read_displacement` reads both.
        dtype: ``"float32"`` (default) or ``"int16"``: half the file, the components stored as
            16-bit integers with the NIfTI scale factor (``scl_slope``, applied by nibabel, ITK
            and ANTs when reading), a resolution of ``max |d| / 32000`` mm (NIfTI has no
            16-bit float type).

    Returns:
        The path written, as a string.
    """
    array, affine, protect = _unpack(field, affine, protect, path)
    array = np.asarray(array, dtype=np.float32)
    label = os.fspath(path)
    if array.ndim != 4 or array.shape[3] != 3:
        raise DazooInputError(
            label, f"a displacement field must be (X, Y, Z, 3), got {array.shape}"
        )
    if convention not in _DISP_DESCRIP:
        raise DazooInputError(label, f"unknown convention {convention!r}; use 'itk' or 'ras'")
    if not label.endswith((".nii", ".nii.gz")):
        raise DazooInputError(label, "displacement fields are written as .nii or .nii.gz")
    _check_finite(array, label)
    if convention == "itk":
        array = array * np.array([-1.0, -1.0, 1.0], dtype=np.float32)
    if dtype not in ("float32", "int16"):
        raise DazooInputError(label, f"unknown warp dtype {dtype!r}; use float32 or int16")
    slope = None
    if dtype == "int16":
        slope = float(np.abs(array).max()) / 32000.0 or 1.0
        array = np.round(array / slope).astype(np.int16)
    return _save(array[:, :, :, None, :], affine, path, protect=protect,
                 kind="displacement", descrip=_DISP_DESCRIP[convention], slope=slope)


def write_probabilities(volume: Volume | tuple, path: str | os.PathLike, *,
                        dtype: str = "uint8", protect: Iterable[str | os.PathLike] = ()) -> str:
    """Write class probabilities ``(X, Y, Z, K)`` as a 4D NIfTI, atomically: ``"uint8"``
    stores ``round(255 p)`` (header description ``dazoo probabilities uint8: p = value /
    255``; no scale factor, so viewers show 0..255), ``"float32"`` the values (NIfTI has no
    16-bit float type)."""
    array, affine, protect = _unpack(volume, None, protect, path)
    label = os.fspath(path)
    if np.ndim(array) != 4:
        raise DazooInputError(label, f"probabilities must be (X, Y, Z, K), got {np.shape(array)}")
    if dtype == "uint8":
        data = (array if np.asarray(array).dtype == np.uint8  # already p x 255
                else np.round(np.clip(array, 0, 1) * 255).astype(np.uint8))
    elif dtype == "float32":
        data = np.asarray(array, np.float32)
    else:
        raise DazooInputError(label, f"unknown probabilities dtype {dtype!r}; use uint8 or float32")
    if not label.endswith((".nii", ".nii.gz")):
        raise DazooInputError(label, "probabilities are written as .nii or .nii.gz")
    descrip = ("dazoo probabilities uint8: p = value / 255" if dtype == "uint8"
               else "dazoo probabilities float32")
    return _save(data, affine, path, protect=protect, kind="probabilities", descrip=descrip)


def _unpack(data, affine, protect, path):
    protect = [os.fspath(p) for p in protect]
    if isinstance(data, Volume):
        if data.path is not None:
            protect.append(data.path)
        return data.array, data.affine, protect
    if isinstance(data, tuple) and len(data) == 2:
        data, affine = data
    if affine is None:
        raise DazooInputError(os.fspath(path), "no affine given for the array to write")
    return data, _check_affine(affine, os.fspath(path)), protect


def _label_dtype(array: np.ndarray, label: str) -> type:
    if array.size == 0:
        return np.uint8
    low, high = int(array.min()), int(array.max())
    for dtype in (np.uint8, np.int16, np.int32):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return dtype
    raise DazooInputError(label, "label ids do not fit in int32")


def _make_image(array, affine, path, kind, descrip, slope=None):
    if path.endswith(".mgz"):
        return nib.MGHImage(array, affine)
    header = nib.Nifti1Header()
    header.set_data_dtype(array.dtype)
    image = nib.Nifti1Image(array, affine, header)
    image.set_qform(affine, code="scanner")
    image.set_sform(affine, code="scanner")
    image.header.set_slope_inter(1.0, 0.0) if kind == "image" else None
    if kind == "labels":
        image.header.set_intent("label")
    elif kind == "displacement":
        image.header.set_intent("vector")
    if descrip:
        image.header["descrip"] = descrip.encode()
    if slope is not None:
        image.header.set_slope_inter(slope, 0.0)
    return image


def _ending(path: str) -> str:
    """The file's ending as writers read it (``.nii.gz`` kept whole; else the last suffix)."""
    base = os.path.basename(path)
    for ending in WRITABLE:
        if base.endswith(ending):
            return ending
    return os.path.splitext(base)[1]


def atomic_write(path: str | os.PathLike, writer: Callable[[str], object], *,
                 protect: Iterable[str | os.PathLike] = ()) -> str:
    """Writes ``path`` atomically: ``writer(tmp)`` writes a temporary file beside it, which is
    then renamed over ``path``. The one implementation of dazoo's temp-file-and-rename rule.

    The temporary name is unique (``.<stem>.<random>.tmp<ending>``, the file's own ending
    kept, so writers that choose the format by extension - nibabel, matplotlib, NumPy, Keras -
    write the right one) and is removed, with any folder this call created, when ``writer``
    fails: a failure or a kill never leaves a truncated ``path``.

    Args:
        path: the file to write; missing parent folders are created.
        writer: called with the temporary path; writes the whole file there.
        protect: paths that must not be overwritten (the inputs of a command).

    Returns:
        ``path`` as a string.

    Raises:
        DazooInputError: ``path`` is one of ``protect``, or cannot be written (an
            ``OSError``), named by the user's path, never the temporary one.
    """
    path = os.fspath(path)
    for other in protect:
        if same_file(path, other):
            raise DazooInputError(path, "refusing to overwrite an input file")
    folder = os.path.dirname(os.path.abspath(path))
    created = _make_folders(folder, path)
    ending = _ending(path)
    name = os.path.basename(path)
    tmp = os.path.join(folder, f".{name[:len(name) - len(ending)]}.{uuid.uuid4().hex[:8]}"
                               f".tmp{ending}")
    done = False
    try:
        writer(tmp)
        os.replace(tmp, path)
        done = True
    except OSError as err:
        raise DazooInputError(path, f"cannot be written ({_one_line(err)})") from None
    finally:
        if not done:
            if os.path.exists(tmp):
                os.remove(tmp)
            for made in reversed(created):
                _rmdir_quietly(made)
    return path


def _save(array, affine, path, *, protect, kind, descrip=None, slope=None) -> str:
    path = os.fspath(path)
    if not path.endswith(WRITABLE):
        raise DazooInputError(path, "unsupported file extension; use .nii, .nii.gz or .mgz")
    for other in protect:  # before the image is made
        if same_file(path, other):
            raise DazooInputError(path, "refusing to overwrite an input file")
    image = _make_image(array, affine, path, kind, descrip, slope)
    return atomic_write(path, lambda tmp: save_image(image, tmp))


def save_image(image, path: str | os.PathLike) -> None:
    """``nibabel.save``, but a gzipped file (``.nii.gz``, ``.mgz``) is deflated in threads
    (:class:`dazoo.parallel.GzipWriter`: one gzip member, nibabel's level 1, the same bytes
    once decompressed): a 256^3 displacement field is 200 MB of floats to deflate."""
    from dazoo.parallel import GzipWriter

    path = os.fspath(path)
    if not path.endswith((".nii.gz", ".mgz")):
        nib.save(image, path)
        return
    if isinstance(image, nib.Nifti1Pair) and not isinstance(image, nib.Nifti1Image):
        image = nib.Nifti1Image.from_image(image)  # as nib.save does for a .nii ending
    with GzipWriter(path) as handle:
        image.to_file_map(image.make_file_map({"image": handle}))


def read_json(path: str | os.PathLike, *, what: str = "JSON"):
    """The content of a JSON file; a :class:`DazooInputError` naming the file otherwise
    (``"no such <what> file"`` when it is missing, ``"cannot be read as <what> (...)"``)."""
    import json

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DazooInputError(path, f"no such {what} file") from None
    except (OSError, ValueError) as err:
        raise DazooInputError(path, f"cannot be read as {what} ({err})") from None


def write_text_atomic(path: str | os.PathLike, text: str, *,
                      protect: Iterable[str | os.PathLike] = ()) -> str:
    """Write a text file (a report, a JSON config) atomically (:func:`atomic_write`)."""
    def writer(tmp):
        with open(tmp, "w") as handle:
            handle.write(text)

    return atomic_write(path, writer, protect=protect)


def stem(path: str) -> str:
    """The file name without its image ending (``.nii.gz``, ``.nii``, ``.mgz``) or, for
    other files, without its last suffix."""
    base = os.path.basename(path)
    for ending in WRITABLE:
        if base.endswith(ending):
            return base[: -len(ending)]
    return os.path.splitext(base)[0]


def same_file(a: str, b: str) -> bool:
    """Whether two paths name the same file (same resolved path, or hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _make_folders(folder: str, label: str) -> list[str]:
    """Create ``folder`` and its missing parents; return those created (outermost first)."""
    missing = []
    current = folder
    while current and not os.path.exists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    try:
        for made in reversed(missing):
            os.mkdir(made)
    except OSError as err:
        raise DazooInputError(label, f"cannot create folder ({_one_line(err)})") from None
    return list(reversed(missing))


def _rmdir_quietly(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:
        pass
