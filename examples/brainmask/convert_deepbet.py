"""Converts deepbet's brain-extraction networks (deepbet 1.0.2, MIT license, Fisch et al.
2024) from its PyPI wheel into dazoo's Keras LinkNet3D (``dazoo.models.linknet``) and writes
their weights into the ``brainmask`` preset folder. Needs torch (conversion only; dazoo runs
them without it) and the deepbet wheel (``pip download deepbet==1.0.2 --no-deps``)::

    pip install torch
    pip download deepbet==1.0.2 --no-deps -d work_cache/deepbet
    python examples/brainmask/convert_deepbet.py work_cache/deepbet/deepbet-1.0.2-py3-none-any.whl \\
        -o pretrained/brainmask [--check]

``--check`` compares the converted networks with the originals on random and real-scan
inputs (largest absolute difference of the probabilities).
"""
from __future__ import annotations

import argparse
import hashlib
import pathlib
import sys
import tempfile
import zipfile

import numpy as np

NETWORKS = {"mask": "data/models/model.pt", "bbox": "data/models/bbox_model.pt"}


def torch_networks(wheel: str) -> dict:
    """The TorchScript networks inside the deepbet wheel, and its files' sha256."""
    import torch

    out, folder = {}, pathlib.Path(tempfile.mkdtemp())
    with zipfile.ZipFile(wheel) as archive:
        for key, member in NETWORKS.items():
            path = pathlib.Path(archive.extract(member, folder))
            net = torch.jit.load(str(path), map_location="cpu")
            net.eval()
            out[key] = (net, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def convert(net):
    """A Keras LinkNet3D with the TorchScript network's weights."""
    import keras

    from dazoo.models.linknet import LinkNet3D, module_path

    model = LinkNet3D()
    state = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    used = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        path = module_path(layer.name)
        kernel = state[f"{path}.weight"]
        weights = [np.transpose(kernel, (2, 3, 4, 1, 0))]  # (out|in, in|out, k, k, k) -> Keras
        used.add(f"{path}.weight")
        if len(layer.weights) > 1:
            weights.append(state[f"{path}.bias"])
            used.add(f"{path}.bias")
        layer.set_weights(weights)
    missing = sorted(set(state) - used)
    if missing:
        sys.exit(f"weights not converted: {missing}")
    assert isinstance(model, keras.Model)
    return model


def largest_difference(net, model, volume) -> float:
    import torch

    with torch.no_grad():
        want = net(torch.from_numpy(volume[None, None]))[0].numpy()
    got = np.asarray(model.predict_on_batch(volume[None, ..., None]))[0]
    return float(np.abs(np.moveaxis(want, 0, -1) - got).max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", help="deepbet-1.0.2-py3-none-any.whl")
    parser.add_argument("-o", "--output", default="pretrained/brainmask")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--scan", action="append", default=[],
                        help="a real scan for --check (resampled to the networks' inputs)")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for key, (net, sha) in torch_networks(args.wheel).items():
        model = convert(net)
        model.save_weights(out / f"{key}.weights.h5")
        print(f"{key}: {NETWORKS[key]} (sha256 {sha[:16]}...) -> {out / f'{key}.weights.h5'}")
        if args.check:
            rng = np.random.default_rng(0)
            volume = rng.normal(0.45, 0.22, (64, 96, 64)).astype(np.float32)
            print(f"  random 64x96x64: largest difference {largest_difference(net, model, volume):.2e}")
            for scan in args.scan:
                from dazoo.preprocess.skullstrip import network_input

                size = (128,) * 3 if key == "bbox" else (256,) * 3
                volume = network_input(scan, size)
                print(f"  {scan} at {size}: largest difference "
                      f"{largest_difference(net, model, volume):.2e}")


if __name__ == "__main__":
    main()
