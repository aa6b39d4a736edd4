"""RegistrationNet and SegmentationNet: topology, outputs, serialisation, VoxelMorph import."""
import pathlib

import keras
import numpy as np
import pytest

from dazoo import RegistrationNet, SegmentationNet, load_voxelmorph_weights
from dazoo import ops as dops

VXM = pathlib.Path(__file__).parent / "data" / "voxelmorph-0.2"
SHAPE = (16, 16, 16)


def _images(n=1, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((n, *shape, 1)).astype(np.float32) for _ in range(2)]


@pytest.mark.parametrize("kwargs, flow_shape", [
    ({}, (8, 8, 8, 3)),                                     # VoxelMorph default: SVF at 1/2
    ({"int_steps": 0}, (16, 16, 16, 3)),
    ({"int_steps": 0, "half_res": True}, (8, 8, 8, 3)),
    ({"int_steps": 5, "int_resolution": 1}, (16, 16, 16, 3)),
])
def test_registration_outputs(kwargs, flow_shape):
    net = RegistrationNet(SHAPE, **kwargs)
    moving, fixed = _images(2)
    out = net.predict([moving, fixed], verbose=0)
    assert out["moved"].shape == moving.shape
    assert out["displacement"].shape == (2, *SHAPE, 3)
    assert out["flow"].shape[1:] == flow_shape
    # The flow head starts near zero, so the initial transform is near the identity.
    assert np.abs(out["displacement"]).max() < 1e-2
    # "moved" is the moving image warped by "displacement".
    np.testing.assert_allclose(out["moved"], dops.warp(moving, out["displacement"]), atol=1e-6)


def test_voxelmorph_import_reproduces_voxelmorph_outputs():
    io = np.load(VXM / "vxm_dense_32_io.npz")
    net = load_voxelmorph_weights(RegistrationNet((32, 32, 32)), VXM / "vxm_dense_32.h5")
    out = net.predict([io["moving"], io["fixed"]], verbose=0)
    np.testing.assert_allclose(out["moved"], io["moved"], atol=1e-4)
    np.testing.assert_allclose(out["flow"], io["flow"], atol=1e-4)


def test_voxelmorph_import_rejects_other_topologies():
    net = RegistrationNet((32, 32, 32), features=((8, 16, 16, 16), (16, 16, 16, 16, 16, 8, 8)))
    with pytest.raises(ValueError, match="unet_enc_conv_0_0"):
        load_voxelmorph_weights(net, VXM / "vxm_dense_32.h5")


def test_segmentation_outputs_probabilities():
    net = SegmentationNet(SHAPE, num_classes=5, dropout=0.1, normalization="batch")
    probs = net.predict(_images(2)[0], verbose=0)
    assert probs.shape == (2, *SHAPE, 5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("net", [
    lambda: RegistrationNet(SHAPE, int_steps=3, half_res=True, name="reg"),
    lambda: SegmentationNet(SHAPE, 3, conv_per_level=2,
                            features=((8, 8, 16, 16, 16, 16), (16, 16, 16, 16, 8, 8, 8))),
])
def test_keras_save_load_gives_identical_outputs(tmp_path, net):
    net = net()
    inputs = _images(1)
    inputs = inputs if len(net.inputs) == 2 else inputs[0]
    expected = net.predict(inputs, verbose=0)
    net.save(tmp_path / "net.keras")
    loaded = keras.saving.load_model(tmp_path / "net.keras")
    assert type(loaded) is type(net)
    assert loaded.get_config() == net.get_config()
    keras.tree.map_structure(np.testing.assert_array_equal,
                             loaded.predict(inputs, verbose=0), expected)


def test_segmentation_in_mixed_bfloat16_matches_float32_weights(tmp_path):
    from dazoo.training.precision import native_bfloat16

    keras.utils.set_random_seed(0)
    mixed = SegmentationNet(SHAPE, 3, dtype="mixed_bfloat16")  # the standard Keras argument
    assert mixed.get_layer("unet_enc_conv_0_0").compute_dtype == "bfloat16"
    assert all(w.dtype == "float32" for w in mixed.weights)
    image = _images(1)[0]
    probs = mixed.predict(image, verbose=0)
    assert probs.dtype == np.float32
    # The same weights in float32 give nearly the same probabilities. How near depends on
    # the kernels: measured over 6 weight seeds, oneDNN's bfloat16 convolutions (float32
    # sums; AVX512-BF16 CPU) differ from float32 by at most 0.021 (mean 0.0022, argmax
    # agreeing on >= 99.4 % of voxels); TensorFlow's emulated ones (TF_ENABLE_ONEDNN_OPTS=0,
    # or a CPU without AVX512) by up to 0.128 (mean 0.012, >= 96.7 %):
    # benchmarks/bench_bfloat16_error.py.
    expected = SegmentationNet(SHAPE, 3)
    expected.set_weights(mixed.get_weights())
    plain = expected.predict(image, verbose=0)
    difference = np.abs(plain - probs)
    assert difference.mean() < 0.025
    assert (plain.argmax(-1) == probs.argmax(-1)).mean() > 0.93
    if native_bfloat16():
        np.testing.assert_allclose(plain, probs, atol=0.05)
    mixed.save(tmp_path / "mixed.keras")
    loaded = keras.saving.load_model(tmp_path / "mixed.keras")
    assert loaded.get_config()["dtype"]["config"]["name"] == "mixed_bfloat16"
    assert loaded.get_layer("logits").compute_dtype == "bfloat16"
    # Float32 inference from the same config: only the standard dtype argument changes.
    again = SegmentationNet.from_config(dict(loaded.get_config(), dtype="float32"))
    again.set_weights(loaded.get_weights())
    assert again.get_layer("unet_enc_conv_0_0").compute_dtype == "float32"
    np.testing.assert_array_equal(again.predict(image, verbose=0), plain)


def test_configs_chain_keras():
    net = SegmentationNet(SHAPE, 3)
    config = net.get_config()
    assert {"name", "trainable", "dtype"} <= set(config)  # from keras.Model.get_config
    assert "dtype" in RegistrationNet(SHAPE).get_config()
    mixed = dict(config, dtype="mixed_bfloat16")
    assert SegmentationNet.from_config(mixed).get_layer("logits").compute_dtype == "bfloat16"


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="multiple of 2\\*\\*4"):
        RegistrationNet((20, 16, 16))
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationNet(SHAPE, 1)


def _count_calls(net, names):
    """Wraps the ``call`` of the layers ``names`` of ``net`` to count how often they run."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        layer = net.get_layer(name)
        original = layer.call

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        layer.call = counted
    return counts


def _perturbed(net, seed=0):
    """The flow head starts near zero; random weights make every output depend on them."""
    rng = np.random.default_rng(seed)
    for v in net.trainable_variables:
        v.assign(np.asarray(v) + rng.normal(0, 0.05, v.shape).astype(np.float32))
    return net


@pytest.mark.parametrize("kwargs", [
    {},
    {"int_steps": 0, "half_res": True},
    {"conv_per_level": 2, "features": ((8, 8, 16, 16), (16, 16, 8, 8, 8))},
], ids=["default", "half-res", "two-convs-per-level"])
def test_recomputed_registration_equals_the_network_and_reruns_fine_levels(kwargs):
    """``recomputed(recompute=N)`` (gradient checkpointing of the N finest U-Net levels) gives
    the functional network's outputs and gradients, and runs the finest level's
    convolutions again in the backward pass (the coarsest ones once)."""
    import tensorflow as tf

    net = _perturbed(RegistrationNet(SHAPE, **kwargs))
    moving, fixed = _images()

    def loss_and_grads(recompute):
        with tf.GradientTape() as tape:
            out = net.recomputed([moving, fixed], training=True, recompute=recompute)
            loss = (tf.reduce_sum(out["moved"] ** 2) + tf.reduce_sum(out["displacement"] ** 2)
                    + tf.reduce_sum(out["flow"] ** 2))
        return out, tape.gradient(loss, net.trainable_variables)

    reference = net([moving, fixed], training=True)
    _, expected = loss_and_grads(0)
    levels = len(net.features[0]) // net.conv_per_level
    fine, coarse = "unet_enc_conv_0_0", f"unet_dec_conv_{levels - 1}_0"
    counts = _count_calls(net, [fine, coarse])
    out, grads = loss_and_grads(1)
    assert counts == {fine: 2, coarse: 1}
    for key in ("moved", "displacement", "flow"):
        np.testing.assert_allclose(np.asarray(out[key]), np.asarray(reference[key]),
                                   rtol=1e-6, atol=1e-6)
    assert max(float(np.abs(g).max()) for g in expected) > 1.0
    for mine, theirs in zip(grads, expected):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-5, atol=1e-5)


def test_recomputed_segmentation_equals_the_network():
    import tensorflow as tf

    net = _perturbed(SegmentationNet(SHAPE, 4, conv_per_level=2,
                                     features=((8, 8, 16, 16), (16, 16, 8, 8, 8, 8))))
    image, _ = _images()
    weights = np.random.default_rng(1).random((1, *SHAPE, 4)).astype(np.float32)

    def loss_and_grads(fn):
        with tf.GradientTape() as tape:
            out = fn()
            loss = tf.reduce_sum(out * weights)
        return out, tape.gradient(loss, net.trainable_variables)

    expected_out, expected = loss_and_grads(lambda: net(image, training=True))
    counts = _count_calls(net, ["unet_dec_final_conv_0", "unet_enc_conv_1_0"])
    for recompute in (1, 3):
        counts.update(dict.fromkeys(counts, 0))
        out, grads = loss_and_grads(lambda: net.recomputed(image, training=True,
                                                        recompute=recompute))
        assert counts == {"unet_dec_final_conv_0": 2,
                          "unet_enc_conv_1_0": 2 if recompute > 1 else 1}
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected_out), atol=1e-6)
        for mine, theirs in zip(grads, expected):
            np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"dropout": 0.2}, "dropout"), ({"normalization": "batch"}, "batch normalisation")])
def test_recompute_refuses_stateful_or_random_layers_in_training(kwargs, message):
    net = SegmentationNet(SHAPE, 3, **kwargs)
    image, _ = _images()
    with pytest.raises(ValueError, match=message):
        net.recomputed(image, training=True, recompute=1)
    np.testing.assert_allclose(np.asarray(net.recomputed(image, training=False, recompute=1)),
                               np.asarray(net(image, training=False)), atol=1e-6)


def test_inference_through_a_traced_graph_equals_the_eager_pass():
    """``dazoo.backend.infer(..., compiled=True)`` (the pipeline's segmenter passes): the same
    outputs as the eager pass, as NumPy, one traced graph per network reused across calls
    (a dict output, the registration network's, too)."""
    from dazoo import backend

    keras.utils.set_random_seed(4)
    rng = np.random.default_rng(0)
    seg = SegmentationNet(SHAPE, 5, features=((8, 8), (8, 8, 8)))
    image = rng.random((1, *SHAPE, 1), dtype=np.float32)
    eager = backend.infer(seg, image)
    traced = backend.infer(seg, image, compiled=True)
    assert isinstance(traced, np.ndarray) and traced.shape == (1, *SHAPE, 5)
    np.testing.assert_allclose(traced, eager, atol=1e-6)
    other = rng.random((1, *SHAPE, 1), dtype=np.float32)
    np.testing.assert_allclose(backend.infer(seg, other, compiled=True),
                               backend.infer(seg, other), atol=1e-6)
    if backend.name() == "tensorflow":
        from dazoo.backend import tensorflow as tf_backend

        function = tf_backend.inference(seg)
        assert tf_backend.inference(seg) is function
        assert function.experimental_get_tracing_count() == 1  # both images: one trace
    reg = RegistrationNet(SHAPE, int_steps=3, features=((8, 8), (8, 8, 8)))
    pair = [image, other]
    eager, traced = backend.infer(reg, pair), backend.infer(reg, pair, compiled=True)
    assert sorted(traced) == sorted(eager)
    for key in eager:
        np.testing.assert_allclose(traced[key], eager[key], atol=1e-5)
