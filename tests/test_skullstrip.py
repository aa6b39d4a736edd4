"""Brain extraction (dazoo.preprocess.skullstrip, dazoo strip, --skull-strip): PyTorch's
resampling and transposed convolutions reproduced, the procedure's geometry on the input's
own grid (with stand-in networks whose answer is known), the auto decision, the CLI verb;
with torch and the deepbet wheel at hand, parity with the original networks."""
from __future__ import annotations

import os
import pathlib

import nibabel as nib
import numpy as np
import pytest

from dazoo.cli import main
from dazoo.io import Volume
from dazoo.preprocess import skullstrip
from dazoo.preprocess.skullstrip import BrainExtractor, nearest_exact

from test_pipeline import preset_dir, scans  # noqa: F401  (fixtures)

ROOT = pathlib.Path(__file__).resolve().parent.parent
WHEEL = os.environ.get("DAZOO_DEEPBET_WHEEL", str(ROOT / "work_cache" / "deepbet" /
                                                   "deepbet-1.0.2-py3-none-any.whl"))


def test_nearest_exact_is_pytorchs_rule():
    array = np.arange(5)[:, None, None] * np.ones((1, 2, 2))
    assert nearest_exact(array, (3, 2, 2))[:, 0, 0].tolist() == [0, 2, 4]  # (i+.5)*5/3
    assert nearest_exact(array, (8, 2, 2))[:, 0, 0].tolist() == [0, 0, 1, 2, 2, 3, 4, 4]
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.random((7, 10, 5)).astype(np.float32)
    for shape in ((4, 16, 5), (13, 3, 9)):
        want = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], shape,
                                               mode="nearest-exact")[0, 0].numpy()
        np.testing.assert_array_equal(nearest_exact(x, shape), want)


@pytest.mark.parametrize("stride, padding, output_padding, kernel", [
    (2, 1, 1, 3), (1, 1, 0, 3), (2, 0, 0, 2)])
def test_transposed_convolution_has_pytorchs_size_and_values(stride, padding, output_padding,
                                                             kernel):
    """Against a transposed convolution written out: each input voxel scatters its kernel
    at ``stride * i - padding``."""
    from dazoo.models.linknet import TorchConvTranspose3D

    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 3, 4, 2, 2)).astype(np.float32)
    w = rng.normal(size=(kernel,) * 3 + (3, 2)).astype(np.float32)  # (k, k, k, out, in)
    layer = TorchConvTranspose3D(3, kernel, stride, padding, output_padding)
    layer.build(x.shape)
    layer.kernel.assign(w)
    got = np.asarray(layer(x))
    size = [(n - 1) * stride - 2 * padding + kernel + output_padding for n in x.shape[1:4]]
    full = np.zeros([(n - 1) * stride + kernel + output_padding for n in x.shape[1:4]] + [3])
    for i, j, k in np.ndindex(*x.shape[1:4]):
        full[i * stride:i * stride + kernel, j * stride:j * stride + kernel,
             k * stride:k * stride + kernel] += np.einsum("abcoi,i->abco", w, x[0, i, j, k])
    want = full[padding:padding + size[0], padding:padding + size[1], padding:padding + size[2]]
    assert got.shape == (1, *size, 3)
    np.testing.assert_allclose(got[0], want, atol=1e-5)


class _Threshold:
    """A stand-in network: probability 1 where the (normalised) input is in the upper
    half of its range (the 'brain', not the dimmer 'scalp')."""

    def __call__(self, x, training=False):
        x = np.asarray(x)
        p = (x > 0.5 * (x.max() + x.min())).astype(np.float32)
        return np.concatenate([1 - p, p], axis=-1)


def _head(codes=("L", "I", "A"), shape=(60, 70, 50)):
    """A bright ellipsoid 'brain' with a hole, a dim shell 'scalp', noise; stored with the
    axis codes ``codes`` and 1.2 mm voxels."""
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1) / 2
    radius = np.sqrt(sum(((g - c) / (0.33 * n)) ** 2 for g, c, n in zip(grid, centre, shape)))
    brain = radius < 1.0
    image = np.where(brain, 100.0, np.where(radius < 1.3, 30.0, 0.0))
    image[tuple(int(c) for c in centre)] = 0  # a hole, filled by the procedure
    image += np.random.default_rng(0).normal(0, 1, shape)
    affine = np.zeros((4, 4))
    axes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    for column, code in enumerate(codes):
        row, sign = axes[code]
        affine[row, column] = 1.2 * sign
    affine[:3, 3] = [10, -20, 5]
    affine[3, 3] = 1
    return Volume(image.astype(np.float32), affine, None), brain


def test_linknet_layer_names_map_to_pytorchs_modules_and_suit_every_backend():
    """No "." in a layer name (the torch backend refuses it: ``dazoo segment`` with
    KERAS_BACKEND=torch failed on the brain preset's skull-strip check); the names still map
    one to one onto deepbet's module paths."""
    from dazoo.models.linknet import LinkNet3D, module_path

    names = [layer.name for layer in LinkNet3D().layers if layer.weights]
    assert names and not any("." in n for n in names)
    paths = [module_path(n) for n in names]
    assert len(set(paths)) == len(paths)
    assert {"init.0", "down0.block1.double_conv.0", "down1.block1.downsample.0",
            "up0.tp_conv.0", "up3.conv2.0", "tp_conv1.0", "conv.0", "tp_conv2"} <= set(paths)


TORCH_EXTRACTOR = """
import sys, numpy as np
from dazoo.models.linknet import LinkNet3D
from dazoo.preprocess.skullstrip import BrainExtractor
net = LinkNet3D()
net.load_weights(sys.argv[1])
x = np.random.default_rng(0).random((32, 32, 32)).astype(np.float32)
np.save(sys.argv[2], BrainExtractor._predict(net, x))
"""


@pytest.mark.torch
def test_extractor_networks_run_on_the_torch_backend(tmp_path):
    """The same weights file under TensorFlow and torch: the same probabilities."""
    import subprocess
    import sys

    import keras

    from dazoo.models.linknet import LinkNet3D

    pytest.importorskip("torch")
    keras.utils.set_random_seed(0)
    net = LinkNet3D()
    net.save_weights(tmp_path / "net.weights.h5")
    x = np.random.default_rng(0).random((32, 32, 32)).astype(np.float32)
    want = BrainExtractor._predict(net, x)
    result = subprocess.run([sys.executable, "-c", TORCH_EXTRACTOR,
                             str(tmp_path / "net.weights.h5"),
                             str(tmp_path / "p.npy")], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "KERAS_BACKEND": "torch"})
    assert result.returncode == 0, result.stderr[-3000:]
    got = np.load(tmp_path / "p.npy")
    assert got.shape == want.shape == (32, 32, 32)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("codes", [("L", "I", "A"), ("R", "A", "S")])
def test_extraction_mask_is_on_the_inputs_grid(codes):
    volume, brain = _head(codes)
    extractor = BrainExtractor(_Threshold(), _Threshold())
    result = extractor.extract(volume)
    assert result.mask.array.shape == volume.array.shape
    np.testing.assert_array_equal(result.mask.affine, volume.affine)
    mask = np.asarray(result.mask.array) > 0
    dice = 2 * (mask & brain).sum() / (mask.sum() + brain.sum())
    assert dice > 0.97 and mask[tuple((np.array(brain.shape) - 1) // 2)]  # hole filled
    brain_image = np.asarray(result.brain.array)
    assert np.all(brain_image[~mask] == 0)
    np.testing.assert_array_equal(brain_image[mask], np.asarray(volume.array)[mask])
    # The decision's measure: the shell lies outside the brain; the brain alone does not.
    assert extractor.outside_fraction(volume) > 0.2
    assert extractor.outside_fraction(result.brain) < 0.02


def test_pipeline_skull_strip_auto_decides_and_says_so(preset_dir, scans, tmp_path):  # noqa: F811
    import dazoo

    pipeline = dazoo.load(str(preset_dir))
    pipeline._extractor = BrainExtractor(_Threshold(), _Threshold())
    head, brain = _head(("R", "A", "S"), (40, 40, 40))
    stripped = pipeline.segment(head, skull_strip="auto")
    assert stripped.brain_mask is not None and "brain extracted" in stripped.notes[0]
    assert "% of the bright voxels lie outside the brain" in stripped.notes[0]
    assert stripped.labels.array.shape == head.array.shape
    again = Volume(np.where(np.asarray(stripped.brain_mask.array) > 0, head.array, 0),
                   head.affine, None)
    auto = pipeline.segment(again, skull_strip="auto")
    off = pipeline.segment(again, skull_strip="off")
    assert auto.brain_mask is None and "left as it is" in auto.notes[0] and off.notes == []
    np.testing.assert_array_equal(auto.labels.array, off.labels.array)  # auto changed nothing
    forced = pipeline.segment(again, skull_strip="on")
    assert forced.brain_mask is not None and "asked for" in forced.notes[0]
    registration = pipeline.register(head, again, skull_strip="auto")
    assert registration.masks["moving"] is not None and registration.masks["fixed"] is None
    assert [n.split(":")[0] for n in registration.notes] == ["moving", "fixed"]
    assert registration.moved.array.shape == head.array.shape
    assert pipeline.skull_strip_default == "off"  # the tiny preset does not ask for it


def test_strip_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["strip", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.nii.gz: no such file" in err
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    assert main(["strip", str(tmp_path / "a.nii.gz"), "-o", str(tmp_path / "o.nrrd")]) == 2
    assert "unsupported file extension" in capsys.readouterr().err
    assert main(["strip", str(tmp_path / "a.nii.gz"), "-o", str(tmp_path / "o.nii.gz"),
                 "--preset", "brain"]) == 2
    assert "is not a brain-extraction preset" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "a.nii.gz"), "-o", str(tmp_path / "s.nii.gz"),
                 "--preset", "brainmask"]) == 2
    assert "is a brain extractor" in capsys.readouterr().err


def test_strip_cli_writes_brain_and_mask_on_the_inputs_grid(tmp_path, capsys):
    volume, _ = _head(("L", "I", "A"), (64, 72, 60))
    path = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(volume.array), volume.affine), path)
    assert main(["strip", str(path), "-o", str(tmp_path / "out"), "--mask",
                 str(tmp_path / "masks"), "--qc", str(tmp_path / "qc")]) == 0
    brain = nib.load(tmp_path / "out" / "head_brain.nii.gz")
    mask = nib.load(tmp_path / "masks" / "head_mask.nii.gz")
    for image in (brain, mask):
        assert image.shape == volume.array.shape
        np.testing.assert_allclose(image.affine, volume.affine, atol=1e-5)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert os.listdir(tmp_path / "qc") == ["head_brain.png"]
    assert "brain" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isfile(WHEEL), reason="needs the deepbet wheel "
                                                      "(DAZOO_DEEPBET_WHEEL) and torch")
def test_converted_networks_match_deepbets():
    """The shipped Keras weights against the original TorchScript networks."""
    pytest.importorskip("torch")
    import sys

    sys.path.insert(0, str(ROOT / "examples" / "brainmask"))
    from convert_deepbet import largest_difference, torch_networks

    extractor = BrainExtractor.from_preset("brainmask")
    rng = np.random.default_rng(0)
    volume = rng.normal(0.45, 0.22, (64, 96, 64)).astype(np.float32)
    for key, (net, _) in torch_networks(WHEEL).items():
        model = extractor.bbox_net if key == "bbox" else extractor.mask_net
        assert largest_difference(net, model, volume) < 2e-3
    assert skullstrip.LARGE == (256, 256, 256)


def test_dilation_in_millimetres():
    from dazoo.preprocess.skullstrip import dilate_mm

    mask = np.zeros((9, 9, 9), bool)
    mask[4, 4, 4] = True
    grown = dilate_mm(mask, (1, 1, 1), 2)
    import scipy.ndimage as ndi

    np.testing.assert_array_equal(grown, ndi.binary_dilation(mask, iterations=2))  # 2 layers
    coarse = dilate_mm(mask, (1, 1, 2), 2)  # 2 mm = one 2 mm voxel along the last axis
    assert coarse[4, 4, 5] and not coarse[4, 4, 6] and coarse[4, 6, 4]
    assert not coarse[4, 5, 5]  # L1: 1 + 2 mm > 2 mm
    np.testing.assert_array_equal(dilate_mm(mask, (1, 1, 1), 0), mask)
