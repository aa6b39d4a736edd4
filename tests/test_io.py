"""dazoo.io: reading (paths, nibabel images, arrays), validation errors, atomic writes."""
from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from dazoo import io
from dazoo.errors import DazooInputError


@pytest.fixture
def image(make_affine, phantom):
    affine = make_affine("LIA", (1.2, 1.0, 1.5), (20, 18, 16), centre=(3, -2, 5))
    return phantom(affine, (20, 18, 16)), affine


def _listing(folder):
    return sorted(os.listdir(folder))


def _error(func, *args, **kwargs) -> str:
    with pytest.raises(DazooInputError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("ending", [".nii", ".nii.gz", ".mgz"])
def test_write_read_round_trip(tmp_path, image, ending):
    array, affine = image
    path = io.write_image((array, affine), tmp_path / f"scan{ending}")
    volume = io.read_image(path)
    reference = nib.load(path)
    assert volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array, array, rtol=1e-6)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    np.testing.assert_allclose(volume.affine, reference.affine)
    assert volume.path == str(tmp_path / f"scan{ending}")
    assert _listing(tmp_path) == [f"scan{ending}"]


def test_sources_agree(tmp_path, image):
    array, affine = image
    path = io.write_image((array, affine), tmp_path / "scan.nii.gz")
    from_path = io.read_image(path)
    from_nibabel = io.read_image(nib.load(path))
    from_tuple = io.read_image((array, affine))
    from_volume = io.read_image(from_path)
    for volume in (from_nibabel, from_tuple, from_volume):
        np.testing.assert_array_equal(volume.array, from_path.array)
        np.testing.assert_allclose(volume.affine, from_path.affine, atol=1e-5)
    assert from_nibabel.path == path and from_tuple.path is None


def test_spacing_and_shape(image):
    array, affine = image
    volume = io.read_image((array, affine))
    assert volume.shape == (20, 18, 16)
    np.testing.assert_allclose(volume.spacing, [1.2, 1.0, 1.5])


def test_4d_single_volume_is_squeezed(tmp_path, image):
    array, affine = image
    nib.save(nib.Nifti1Image(array[..., None], affine), tmp_path / "one.nii.gz")
    volume = io.read_image(tmp_path / "one.nii.gz")
    np.testing.assert_array_equal(volume.array, array)


def test_4d_several_volumes_is_an_error(tmp_path, image):
    array, affine = image
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([array] * 3, -1), affine), path)
    message = _error(io.read_image, path)
    assert message.startswith(str(path)) and "3 volumes" in message


def test_2d_is_an_error(tmp_path):
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), path)
    assert "2D" in _error(io.read_image, path)
    assert "at least 2 voxels" in _error(io.read_image, (np.ones((8, 8, 1)), np.eye(4)))


def test_nan_and_inf(tmp_path, image):
    array, affine = image
    array = array.copy()
    array[0, 0, :2] = np.nan
    array[1, 1, 1] = np.inf
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(array, affine), path)
    message = _error(io.read_image, path)
    assert message == f"{path}: contains 2 NaN and 1 Inf values"


def test_all_zero_image(tmp_path, image):
    _, affine = image
    path = tmp_path / "zero.mgz"
    nib.save(nib.MGHImage(np.zeros((8, 8, 8), np.float32), affine), path)
    assert _error(io.read_image, path) == f"{path}: is empty (all voxels are zero)"


def test_missing_garbage_and_truncated_files(tmp_path, image):
    array, affine = image
    assert _error(io.read_image, tmp_path / "nope.nii.gz").endswith("no such file")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image")
    assert _error(io.read_image, garbage).startswith(f"{garbage}: cannot be read")
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(array, affine), good)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert _error(io.read_image, truncated).startswith(f"{truncated}: cannot be read")
    raw = tmp_path / "short.nii"
    raw.write_bytes(gzip.decompress(good.read_bytes())[:600])
    assert _error(io.read_image, raw).startswith(f"{raw}: cannot be read")


def test_bad_affines_and_types(image):
    array, affine = image
    assert "affine" in _error(io.read_image, (array, np.zeros((4, 4))))
    assert "4x4" in _error(io.read_image, (array, np.eye(3)))
    assert "(array, affine)" in _error(io.read_image, array)
    assert "unsupported input type" in _error(io.read_image, 42)


def test_labels_read_as_int32_from_float_storage(tmp_path, make_affine, phantom_labels):
    affine = make_affine("ASL", (1.0, 1.0, 2.0), (16, 16, 12))
    ids = phantom_labels(affine, (16, 16, 12))
    path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(ids.astype(np.float32), affine), path)
    labels = io.read_labels(path)
    assert labels.array.dtype == np.int32
    np.testing.assert_array_equal(labels.array, ids)


def test_labels_non_integer(tmp_path, image):
    array, affine = image
    path = tmp_path / "soft.nii.gz"
    nib.save(nib.Nifti1Image(array, affine), path)
    message = _error(io.read_labels, path)
    assert message.startswith(f"{path}: is not a label map") and "non-integer" in message


def test_labels_grid_must_match_image(tmp_path, image):
    array, affine = image
    scan = io.read_image((array, affine), name="scan.nii.gz")
    scan.path = "scan.nii.gz"
    wrong_shape = tmp_path / "shape.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 18, 15), np.int16), affine), wrong_shape)
    message = _error(io.read_labels, wrong_shape, like=scan)
    assert message.startswith(str(wrong_shape)) and "does not match" in message
    shifted = affine.copy()
    shifted[:3, 3] += [0.0, 0.5, 0.0]
    wrong_affine = tmp_path / "affine.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 18, 16), np.int16), shifted), wrong_affine)
    message = _error(io.read_labels, wrong_affine, like=scan)
    assert "affine differs" in message and "scan.nii.gz" in message
    assert "by up to 0.5 mm" in message  # the grid shift in mm, not a matrix entry
    same = tmp_path / "same.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 18, 16), np.int16), affine), same)
    assert io.read_labels(same, like=scan).shape == scan.shape


@pytest.mark.parametrize("ids, dtype", [((0, 3, 255), np.uint8), ((0, 1002, 2035), np.int16),
                                        ((0, 70000), np.int32)])
@pytest.mark.parametrize("ending", [".nii.gz", ".mgz"])
def test_write_labels_keeps_ids(tmp_path, ids, dtype, ending):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    labels = np.random.default_rng(0).choice(ids, size=(6, 7, 8)).astype(np.int64)
    path = io.write_labels((labels, affine), tmp_path / f"seg{ending}")
    stored = nib.load(path)
    assert stored.get_data_dtype().newbyteorder("=") == np.dtype(dtype)
    np.testing.assert_array_equal(np.asanyarray(stored.dataobj), labels)
    np.testing.assert_array_equal(io.read_labels(path).array, labels)
    if ending == ".nii.gz":
        assert stored.header.get_intent()[0] == "label"


def test_write_labels_rejects_fractions(tmp_path):
    message = _error(io.write_labels, (np.full((4, 4, 4), 0.5), np.eye(4)), tmp_path / "x.nii.gz")
    assert "not integers" in message
    assert _listing(tmp_path) == []


def test_writes_never_overwrite_inputs(tmp_path, image):
    array, affine = image
    source = io.write_image((array, affine), tmp_path / "in.nii.gz")
    before = (tmp_path / "in.nii.gz").read_bytes()
    volume = io.read_image(source)
    message = _error(io.write_image, volume, source)
    assert message == f"{source}: refusing to overwrite an input file"
    _error(io.write_image, (array, affine), str(tmp_path / "." / "in.nii.gz"), protect=[source])
    link = tmp_path / "link.nii.gz"
    link.symlink_to(tmp_path / "in.nii.gz")
    _error(io.write_labels, (np.zeros((4, 4, 4), int), affine), link, protect=[source])
    assert (tmp_path / "in.nii.gz").read_bytes() == before


def test_failed_write_leaves_nothing(tmp_path, image, monkeypatch):
    array, affine = image
    target = tmp_path / "new" / "deeper" / "out.nii.gz"

    def broken_save(img, filename):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "save_image", broken_save)
    message = _error(io.write_image, (array, affine), target)
    assert message.startswith(str(target)) and "No space left" in message
    assert _listing(tmp_path) == []


def test_failed_threaded_gzip_write_leaves_nothing(tmp_path, image, monkeypatch):
    """The threaded gzip writer failing half-way (a disk full while nibabel writes the data):
    no file, no temporary, no folder left behind."""
    array, affine = image
    target = tmp_path / "new" / "out.nii.gz"

    def broken(self, file_map, *args, **kwargs):
        handle = file_map["image"].fileobj
        handle.write(b"\0" * 400)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", broken)
    message = _error(io.write_image, (array, affine), target)
    assert message.startswith(str(target)) and "No space left" in message
    assert _listing(tmp_path) == []


def test_failed_write_keeps_existing_file(tmp_path, image, monkeypatch):
    array, affine = image
    target = io.write_image((array, affine), tmp_path / "out.nii.gz")
    before = (tmp_path / "out.nii.gz").read_bytes()
    monkeypatch.setattr(io, "save_image", lambda img, f: (_ for _ in ()).throw(OSError("boom")))
    _error(io.write_image, (array * 2, affine), target)
    assert (tmp_path / "out.nii.gz").read_bytes() == before
    assert _listing(tmp_path) == ["out.nii.gz"]


def test_write_creates_folders_and_checks_extension(tmp_path, image):
    array, affine = image
    path = io.write_image((array, affine), tmp_path / "a" / "b" / "scan.nii")
    assert os.path.isfile(path)
    assert "extension" in _error(io.write_image, (array, affine), tmp_path / "scan.png")
    assert "no affine" in _error(io.write_image, array, tmp_path / "scan.nii")


def test_displacement_itk_convention(tmp_path, make_affine):
    sitk = pytest.importorskip("SimpleITK")
    affine = make_affine("LIA", (1.0, 2.0, 1.5), (5, 6, 7), centre=(10, -4, 2))
    field = np.random.default_rng(1).normal(size=(5, 6, 7, 3)).astype(np.float32)
    path = io.write_displacement((field, affine), tmp_path / "disp.nii.gz")
    itk = sitk.ReadImage(path)
    assert itk.GetNumberOfComponentsPerPixel() == 3
    stored = sitk.GetArrayFromImage(itk).transpose(2, 1, 0, 3)  # -> (X, Y, Z, 3)
    np.testing.assert_allclose(stored, field * [-1, -1, 1], rtol=1e-6)  # LPS components
    # ITK's physical point of voxel (1, 2, 3) is nibabel's world point with x, y negated.
    np.testing.assert_allclose(itk.TransformIndexToPhysicalPoint((1, 2, 3)),
                               (affine @ [1, 2, 3, 1])[:3] * [-1, -1, 1], atol=1e-4)
    back = io.read_displacement(path)
    np.testing.assert_allclose(back.array, field, rtol=1e-6)
    np.testing.assert_allclose(back.affine, affine, atol=1e-4)


def test_displacement_ras_convention(tmp_path):
    field = np.random.default_rng(2).normal(size=(4, 4, 4, 3)).astype(np.float32)
    path = io.write_displacement(field, tmp_path / "d.nii", affine=np.eye(4), convention="ras")
    np.testing.assert_array_equal(np.asanyarray(nib.load(path).dataobj)[:, :, :, 0, :], field)
    np.testing.assert_array_equal(io.read_displacement(path).array, field)
    assert "(X, Y, Z, 3)" in _error(io.write_displacement, field[..., :2], tmp_path / "e.nii",
                                    affine=np.eye(4))
    assert ".nii" in _error(io.write_displacement, field, tmp_path / "e.mgz", affine=np.eye(4))


# ----------------------------------------------------------------------------- real data
@pytest.mark.data
def test_reads_every_mindboggle_subject(data_root):
    folder = data_root / "mindboggle-oasis-trt20"
    subjects = sorted(p for p in folder.glob("OASIS-TRT-20-*") if p.is_dir())
    if not subjects:
        pytest.skip(f"no Mindboggle subjects in {folder}")
    for subject in subjects:
        image = io.read_image(subject / "t1weighted_brain.nii.gz")
        assert image.shape == (256, 256, 160) and image.array.dtype == np.float32
        assert nib.aff2axcodes(image.affine) == ("A", "S", "L")
        cortical = np.unique(io.read_labels(subject / "labels.DKT31.manual.nii.gz",
                                            like=image).array)
        assert cortical[0] == 0
        assert np.all(np.isin(cortical[1:] // 1000, (1, 2)))  # DKT31: 1002..1035, 2002..2035
        assert np.all((cortical[1:] % 1000 >= 2) & (cortical[1:] % 1000 <= 35))
        both = np.unique(io.read_labels(subject / "labels.DKT31.manual+aseg.nii.gz",
                                        like=image).array)
        assert set(cortical) <= set(both) and both[(both > 0) & (both < 1000)].size > 0


# ---------------------------------------------------------------- atomic_write
def test_atomic_write_renames_a_unique_temp_with_the_files_ending(tmp_path):
    seen = []

    def writer(tmp):
        seen.append(tmp)
        with open(tmp, "w") as handle:
            handle.write("x")

    target = tmp_path / "new" / "report.nii.gz"
    assert io.atomic_write(target, writer) == str(target)
    io.atomic_write(target, writer)
    assert target.read_text() == "x"
    assert all(p.endswith(".tmp.nii.gz") and os.path.dirname(p) == str(target.parent)
               for p in seen)
    assert seen[0] != seen[1]  # unique per call
    assert sorted(os.listdir(target.parent)) == ["report.nii.gz"]


def test_atomic_write_failure_leaves_nothing_and_keeps_the_old_file(tmp_path):
    (tmp_path / "old.txt").write_text("old")

    def half_then_fail(tmp):
        with open(tmp, "w") as handle:
            handle.write("half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        io.atomic_write(tmp_path / "old.txt", half_then_fail)
    with pytest.raises(RuntimeError):
        io.atomic_write(tmp_path / "made" / "deeper" / "new.txt", half_then_fail)
    assert os.listdir(tmp_path) == ["old.txt"]  # no temp file, no folder created
    assert (tmp_path / "old.txt").read_text() == "old"


def test_atomic_write_names_the_users_path_not_the_temp(tmp_path):
    def fails(tmp):
        raise PermissionError(13, "Permission denied", tmp)

    with pytest.raises(DazooInputError) as err:
        io.atomic_write(tmp_path / "seg.nii.gz", fails)
    assert err.value.source == str(tmp_path / "seg.nii.gz")
    assert ".tmp" not in str(err.value).split(":")[0]
    with pytest.raises(DazooInputError, match="refusing to overwrite an input"):
        io.atomic_write(tmp_path / "seg.nii.gz", fails, protect=[tmp_path / "seg.nii.gz"])


def test_qc_picture_failure_leaves_no_temp_file(tmp_path, monkeypatch):
    import matplotlib.figure

    from dazoo import qc

    array = np.random.default_rng(0).random((12, 12, 12)).astype(np.float32)

    def broken(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(DazooInputError, match="cannot be written"):
        qc.label_overlay((array, np.eye(4)), None, tmp_path / "qc.png")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- threaded gzip
@pytest.mark.parametrize("threads", ["1", "3"])
def test_gzip_writer_is_one_standard_gzip_member(tmp_path, monkeypatch, threads):
    """Blocks deflated in threads (pigz's layout) decompress to the bytes written, as ONE
    gzip member (zlib stops at its end with nothing left over), also through gzip(1)'s
    reader; tell counts the bytes; seek goes forward only, writing zeros."""
    import zlib

    from dazoo.parallel import GzipWriter

    monkeypatch.setenv("DAZOO_THREADS", threads)
    rng = np.random.default_rng(0)
    data = [rng.normal(size=n).astype(np.float32).tobytes() for n in (10, 30_000, 7, 50_001)]
    path = tmp_path / "x.gz"
    with GzipWriter(path, block=10_007) as handle:
        handle.write(data[0])
        handle.seek(handle.tell() + 13)
        for piece in data[1:]:
            handle.write(piece)
        assert handle.tell() == sum(map(len, data)) + 13
        with pytest.raises(OSError):
            handle.seek(5)
    expected = data[0] + bytes(13) + b"".join(data[1:])
    raw = path.read_bytes()
    stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert stream.decompress(raw) == expected
    assert stream.eof and stream.unused_data == b""
    assert gzip.decompress(raw) == expected
    empty = tmp_path / "empty.gz"
    GzipWriter(empty).close()
    assert gzip.decompress(empty.read_bytes()) == b""


@pytest.mark.parametrize("ending", [".nii.gz", ".mgz"])
def test_threaded_gzip_images_hold_nibabels_bytes(tmp_path, monkeypatch, ending):
    """dazoo's writer (threaded deflate) stores exactly the bytes nibabel.save stores, once
    decompressed, for a 5D displacement-like field and an MGH volume."""
    import gzip

    monkeypatch.setenv("DAZOO_THREADS", "2")
    rng = np.random.default_rng(1)
    if ending == ".nii.gz":
        image = nib.Nifti1Image(rng.normal(size=(20, 18, 16, 1, 3)).astype(np.float32),
                                np.diag([1.5, 2.0, 1.0, 1.0]))
    else:
        image = nib.MGHImage(rng.normal(size=(20, 18, 16)).astype(np.float32), np.eye(4))
    nib.save(image, tmp_path / f"reference{ending}")
    io.save_image(image, tmp_path / f"dazoo{ending}")
    assert (gzip.decompress((tmp_path / f"dazoo{ending}").read_bytes())
            == gzip.decompress((tmp_path / f"reference{ending}").read_bytes()))
    back = nib.load(tmp_path / f"dazoo{ending}")
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(image.dataobj))


def test_thread_pool_survives_fork_and_nesting(monkeypatch):
    """dazoo.parallel's pool: a map inside a map runs serially in the pool's thread (no
    deadlock), and a forked child (Keras' multiprocessing workers) gets a pool of its own
    instead of the parent's threads, which do not exist in it."""
    import multiprocessing

    from dazoo.parallel import map_ordered

    monkeypatch.setenv("DAZOO_THREADS", "2")
    nested = map_ordered(lambda i: sum(map_ordered(lambda j: i * j, range(4))), range(5))
    assert nested == [6 * i for i in range(5)]
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        assert pool.apply_async(_square_in_threads).get(timeout=60) == [0, 1, 4, 9]


def _square_in_threads():
    from dazoo.parallel import map_ordered

    return map_ordered(lambda x: x * x, range(4))
