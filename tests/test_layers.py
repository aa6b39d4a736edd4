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


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_instance_normalization_equals_keras_group_normalization_with_gradients(dtype):
    """dazoo's GroupNormalization(groups=-1) (written-out gradient, lean backward pass) against
    keras.layers.GroupNormalization(groups=-1): values and the gradients of a random
    weighting of the output w.r.t. input, gamma and beta; the weights load into either."""
    import tensorflow as tf

    from dazoo.layers import GroupNormalization, LeakyReLU

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, (2, 6, 5, 4, 3)).astype(np.float32))
    weights = tf.constant(rng.normal(size=(2, 6, 5, 4, 3)).astype(np.float32))
    ours = GroupNormalization(groups=-1, dtype=dtype)
    theirs = keras.layers.GroupNormalization(groups=-1, dtype=dtype)
    ours.build(x.shape)
    theirs.build(x.shape)
    ours.set_weights([rng.normal(1.0, 0.5, 3).astype(np.float32),
                      rng.normal(0.0, 0.5, 3).astype(np.float32)])
    theirs.set_weights(ours.get_weights())

    def value_and_grads(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(tf.cast(x, layer.compute_dtype))
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * weights)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        return [np.asarray(y, np.float32)] + [np.asarray(g, np.float32) for g in grads]

    tol = 1e-5 if dtype == "float32" else 2e-2
    for got, want in zip(value_and_grads(ours), value_and_grads(theirs)):
        np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max()))
    # and a hand-computed value: per sample and channel, zero mean and unit variance
    plain = GroupNormalization(groups=-1)
    out = np.asarray(plain(x))
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    var = np.asarray(x).var(axis=(1, 2, 3))
    np.testing.assert_allclose(out.var(axis=(1, 2, 3)), var / (var + 1e-3), rtol=1e-4)

    # LeakyReLU's output-based gradient, against the input-based one
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        a = tf.reduce_sum(LeakyReLU(negative_slope=0.2)(x) * weights)
        b = tf.reduce_sum(tf.nn.leaky_relu(x, 0.2) * weights)
    np.testing.assert_allclose(tape.gradient(a, x), tape.gradient(b, x), atol=1e-6)
