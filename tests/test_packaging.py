"""Packaging: `python -m build` makes a wheel with the presets inside, and that wheel,
installed apart from the checkout, segments a scan with a shipped preset; CITATION.cff
matches the package."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import dazoo

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_citation_file_matches_the_package():
    text = (ROOT / "CITATION.cff").read_text()
    assert re.search(r'^version: "([^"]+)"', text, re.M).group(1) == dazoo.__version__
    assert "10.1007/978-3-030-32245-8_47" in text  # DeepAtlas, the preferred citation
    assert re.search(r"^cff-version: 1\.2\.0$", text, re.M)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("build", reason="the [test] extra installs build")
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                             "--outdir", str(out), str(ROOT)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    wheels = list(out.glob("dazoo-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_wheel_holds_the_presets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in ("brain", "knee", "brainmask"):
        shipped = {p.name for p in (ROOT / "pretrained" / preset).iterdir() if p.is_file()}
        assert "metadata.json" in shipped and any(n.endswith(".weights.h5") for n in shipped)
        inside = {n.rsplit("/", 1)[1] for n in names
                  if n.startswith(f"dazoo/pretrained/{preset}/")}
        assert inside == shipped, f"{preset}: missing {sorted(shipped - inside)}"
    assert "dazoo/cli.py" in names
    assert not any("work_cache" in n or n.startswith("tests/") for n in names)


def test_installed_wheel_segments_offline(wheel, tmp_path):
    """The wheel unpacked into a folder of its own (its dependencies from this environment),
    run from elsewhere: the presets come from the wheel, not from the checkout."""
    import nibabel as nib

    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                             "--target", str(target), str(wheel)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rng = np.random.default_rng(0)
    grid = np.mgrid[:72, :88, :72].astype(np.float32)
    centre = np.array([36, 44, 36])[:, None, None, None]
    half = np.array([28, 36, 30])[:, None, None, None]
    radius = np.sqrt((((grid - centre) / half) ** 2).sum(0))
    image = np.where(radius < 1, 80 + 40 * (radius > 0.7), 0) + rng.normal(0, 3, radius.shape)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -70
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), tmp_path / "scan.nii.gz")
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    where = subprocess.run([sys.executable, "-c", "import dazoo.presets as p, json; print("
                            "json.dumps([p.__file__, str(p.get_preset('brain').path)]))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr[-2000:]
    module, preset = json.loads(where.stdout.strip().splitlines()[-1])
    assert module.startswith(str(target)) and preset.startswith(str(target))
    run = subprocess.run([sys.executable, "-m", "dazoo", "segment", "scan.nii.gz", "-o",
                          "seg.nii.gz"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    seg = nib.load(tmp_path / "seg.nii.gz")
    assert seg.shape == image.shape and np.allclose(seg.affine, affine)
