"""Function-preserving widening of a trained segmenter (dazoo.models.widen)."""
import numpy as np
import pytest

import keras

from dazoo.models import SegmentationNet, widen

SHAPE = (16, 16, 8)
NARROW = [[4, 4, 8, 8], [8, 8, 4, 4, 4]]
WIDE = [[4, 6, 8, 16], [16, 8, 4, 8, 6]]  # wider in the encoder, decoder and final convs


def _randomised(net, seed=0):
    """Every weight random (norm scales and biases too), so nothing is copied by luck."""
    rng = np.random.default_rng(seed)
    net.set_weights([rng.normal(0, 0.1, w.shape).astype("float32") + (1.0 if "gamma" in v.path
                     else 0.0) for w, v in zip(net.get_weights(), net.weights)])
    return net


def _image(seed=1):
    return np.random.default_rng(seed).normal(size=(2, *SHAPE, 1)).astype("float32")


@pytest.mark.parametrize("normalization", ["instance", None])
def test_widened_network_computes_the_same_function(normalization):
    source = _randomised(SegmentationNet(SHAPE, 5, features=NARROW, conv_per_level=2,
                                         normalization=normalization))
    target = SegmentationNet(SHAPE, 5, features=WIDE, conv_per_level=2,
                             normalization=normalization)

    def logits(net):
        return np.asarray(keras.Model(net.inputs, net.get_layer("logits").output)(_image()))

    before = logits(target)
    widen(source, target)
    expected, got = logits(source), logits(target)
    scale = np.abs(expected).max()
    assert target.count_params() > source.count_params()
    assert np.abs(before - expected).max() > 0.1 * scale  # the copy makes them agree
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(target(_image())), np.asarray(source(_image())),
                               atol=1e-5)
    # the added filters keep their own random weights (they are not zero)
    k = np.asarray(target.get_layer("unet_enc_conv_1_1").kernel)
    assert np.abs(k[..., 8:]).max() > 1e-3


def test_widened_network_learns_with_its_new_width():
    source = _randomised(SegmentationNet(SHAPE, 3, features=NARROW, conv_per_level=2))
    target = widen(source, SegmentationNet(SHAPE, 3, features=WIDE, conv_per_level=2))
    # unet_dec_conv_0_0 reads [upsampled unet_dec_conv_1_1 (8 -> 8), unet_enc_conv_1_1 (8 ->
    # 16)]: input channels 16..23 are new; its 4 old filters read them through zero weights
    layer = target.get_layer("unet_dec_conv_0_0")
    x = _image()
    y = keras.utils.to_categorical(np.random.default_rng(2).integers(0, 3, (2, *SHAPE)), 3)
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.categorical_crossentropy(y, target(x)))
    grad = np.asarray(tape.gradient(loss, layer.kernel))
    np.testing.assert_array_equal(np.asarray(layer.kernel)[..., 16:, :4], 0)
    assert np.abs(grad[..., 16:, :4]).max() > 1e-6  # training grows into the new width


def test_widen_refuses_what_it_cannot_preserve():
    source = SegmentationNet(SHAPE, 3, features=NARROW, conv_per_level=2)
    with pytest.raises(ValueError, match="fewer"):
        widen(source, SegmentationNet(SHAPE, 3, features=[[2, 4, 8, 8], NARROW[1]],
                                      conv_per_level=2))
    with pytest.raises(ValueError, match="same layers"):
        widen(source, SegmentationNet(SHAPE, 3, features=[[4, 8], [8, 4, 4]], conv_per_level=1))
    grouped = SegmentationNet(SHAPE, 3, features=[[8, 8, 8, 8], [8, 8, 8, 8, 8]],
                              conv_per_level=2, normalization="group")
    with pytest.raises(ValueError, match="groups"):
        widen(grouped, SegmentationNet(SHAPE, 3, features=[[8, 16, 8, 8], [8, 8, 8, 8, 8]],
                                       conv_per_level=2, normalization="group"))
