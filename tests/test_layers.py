"""Layers: behaviour through Keras models, shapes, serialisation."""
import numpy as np
import keras
import pytest

from dazoo import layers, ops as dops


def _model(layer, shapes):
    inputs = [keras.Input(shape=s) for s in shapes]
    out = layer(inputs if len(inputs) > 1 else inputs[0])
    return keras.Model(inputs, out)


def test_spatial_transformer_in_a_saved_model(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.random((2, 8, 8, 8, 2)).astype(np.float32)
    displacement = rng.normal(size=(2, 8, 8, 8, 3)).astype(np.float32)
    model = _model(layers.SpatialTransformer(), [(8, 8, 8, 2), (8, 8, 8, 3)])
    expected = np.asarray(dops.warp(image, displacement))
    np.testing.assert_allclose(model.predict([image, displacement], verbose=0), expected,
                               atol=1e-6)
    model.save(tmp_path / "st.keras")
    loaded = keras.saving.load_model(tmp_path / "st.keras")
    np.testing.assert_allclose(loaded.predict([image, displacement], verbose=0), expected,
                               atol=1e-6)


@pytest.mark.parametrize("layer, in_shape, out_shape", [
    (layers.VecInt(int_steps=5), (8, 8, 8, 3), (8, 8, 8, 3)),
    (layers.RescaleTransform(0.5), (8, 8, 8, 3), (4, 4, 4, 3)),
    (layers.Resize(2.0, interp_method="nearest"), (4, 6, 8, 2), (8, 12, 16, 2)),
])
def test_layer_shapes_and_config_round_trip(layer, in_shape, out_shape):
    model = _model(layer, [in_shape])
    assert tuple(model.output.shape[1:]) == out_shape
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    x = np.random.default_rng(2).random((1, *in_shape)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(clone(x)), np.asarray(layer(x)))


def test_bad_interp_method_is_rejected():
    with pytest.raises(ValueError, match="interp_method"):
        layers.SpatialTransformer(interp_method="cubic")


def test_leaky_relu_output_based_gradient_equals_the_input_based_one():
    """dazoo's LeakyReLU (gradient from its output) against tf.nn.leaky_relu's."""
    import tensorflow as tf

    from dazoo.layers import LeakyReLU

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, (2, 6, 5, 4, 3)).astype(np.float32))
    weights = tf.constant(rng.normal(size=(2, 6, 5, 4, 3)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        a = tf.reduce_sum(LeakyReLU(negative_slope=0.2)(x) * weights)
        b = tf.reduce_sum(tf.nn.leaky_relu(x, 0.2) * weights)
    np.testing.assert_allclose(tape.gradient(a, x), tape.gradient(b, x), atol=1e-6)


TORCH_LEAKY_RELU = """
import gc
import numpy as np, torch, keras
from dazoo.layers import LeakyReLU
assert keras.backend.backend() == "torch"
rng = np.random.default_rng(0)
x = torch.tensor(rng.normal(2.0, 3.0, (2, 6, 5, 4, 3)).astype(np.float32), requires_grad=True)
weights = torch.tensor(rng.normal(size=(2, 6, 5, 4, 3)).astype(np.float32))
(LeakyReLU(negative_slope=0.2)(x) * weights).sum().backward()
ours, x.grad = x.grad.clone(), None
(torch.nn.functional.leaky_relu(x, 0.2) * weights).sum().backward()
np.testing.assert_allclose(ours.numpy(), x.grad.numpy(), atol=1e-6)
# Nothing outlives a training step (keras.ops.custom_gradient's context closed a cycle
# through the autograd graph that gc cannot see: every activation of every step leaked).
# (Each gc pass could free one link of such a chain: a U-Net's many blocks outgrew it.)
model = keras.Sequential([keras.Input((8, 8, 8, 2))] + [
    layer for _ in range(6) for layer in (keras.layers.Conv3D(4, 3, padding="same"),
                                          LeakyReLU())])
data = torch.tensor(rng.random((1, 8, 8, 8, 2)).astype(np.float32))
def alive():
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))
counts = []
for _ in range(4):
    model(data).sum().backward()
    counts.append(alive())
assert counts[1] == counts[2] == counts[3], counts
print("torch ok")
"""


@pytest.mark.torch
def test_leaky_relu_on_torch_has_the_gradient_and_frees_its_output():
    import os
    import subprocess
    import sys

    pytest.importorskip("torch")
    result = subprocess.run([sys.executable, "-c", TORCH_LEAKY_RELU], capture_output=True,
                            text=True, timeout=600,
                            env={**os.environ, "KERAS_BACKEND": "torch"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch ok" in result.stdout
