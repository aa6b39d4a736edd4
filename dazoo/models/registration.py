"""RegistrationNet: VoxelMorph's VxmDense as a Keras 3 functional model, and its weight import."""
from __future__ import annotations

import json
import os
from typing import Sequence

import keras
import numpy as np

from dazoo.layers import RescaleTransform, SpatialTransformer, VecInt
from dazoo.models.unet import (
    DEFAULT_FEATURES,
    check_divisible,
    check_features,
    create_layer,
    layers_of,
    num_poolings,
    unet,
)

__all__ = ["RegistrationNet", "load_voxelmorph_weights"]


def _vxm_graph(moving, fixed, *, ndim, features, conv_per_level, int_steps, int_resolution,
               half_res, fill_value, dtype=None, get=None, training=None, recompute=0):
    """VxmDense's computation: builds the layers (``get`` None) on Keras tensors, or runs a
    built network's (``get=layers_of(net)``) on tensors. Returns the outputs' dict."""
    get = get or create_layer
    flow_resolution = 2 if half_res else 1
    x = get("unet_input_concat", lambda: keras.layers.Concatenate(
        axis=-1, name="unet_input_concat", dtype=dtype))([moving, fixed])
    x = unet(x, features=features, conv_per_level=conv_per_level, half_res=half_res,
             dtype=dtype, name="unet", get=get, training=training, recompute=recompute)
    flow = get("flow", lambda: keras.layers.Conv3D(
        ndim, 3, padding="same", name="flow", dtype=dtype,
        kernel_initializer=keras.initializers.RandomNormal(mean=0.0, stddev=1e-5)))(x)
    flow = get("flow_float32", lambda: keras.layers.Activation(
        "linear", dtype="float32", name="flow_float32"))(flow)
    if int_steps > 0:
        if int_resolution > flow_resolution:
            flow = get("flow_resize", lambda: RescaleTransform(
                flow_resolution / int_resolution, name="flow_resize", dtype="float32"))(flow)
        displacement = get("flow_int", lambda: VecInt(int_steps, name="flow_int",
                                                      dtype="float32"))(flow)
        if int_resolution > 1:
            displacement = get("diffflow", lambda: RescaleTransform(
                int_resolution, name="diffflow", dtype="float32"))(displacement)
    elif flow_resolution > 1:
        displacement = get("diffflow", lambda: RescaleTransform(
            flow_resolution, name="diffflow", dtype="float32"))(flow)
    else:
        displacement = flow
    displacement = get("displacement", lambda: keras.layers.Activation(
        "linear", dtype="float32", name="displacement"))(displacement)
    moved = get("transformer", lambda: SpatialTransformer(
        fill_value=fill_value, dtype="float32", name="transformer"))([moving, displacement])
    return {"moved": moved, "displacement": displacement, "flow": flow}


@keras.saving.register_keras_serializable(package="dazoo")
class RegistrationNet(keras.Model):
    """Dense deformable registration network with VoxelMorph's VxmDense topology.

    The moving and fixed images are concatenated and passed through a U-Net; a 3x3x3
    convolution initialised near zero (normal, std 1e-5) predicts a flow field. With
    ``int_steps > 0`` the flow is a stationary velocity field, integrated by scaling and
    squaring at ``1 / int_resolution`` of the image resolution (a diffeomorphic transform);
    otherwise it is the displacement itself.

    Inputs, as a list ``[moving, fixed]``: ``(batch, D, H, W, src_feats)`` and
    ``(batch, D, H, W, trg_feats)``. Outputs, a dict:

    * ``"moved"``: the moving image warped to the fixed one, ``(batch, D, H, W, src_feats)``;
    * ``"displacement"``: ``(batch, D, H, W, 3)`` in voxels, ``ij`` indexing, such that
      ``moved(x) = moving(x + displacement(x))``;
    * ``"flow"``: the field a smoothness loss should act on (VoxelMorph's "preintegrated"
      field): the velocity at the integration resolution when ``int_steps > 0``, else the
      predicted displacement at the flow resolution. In voxels of its own grid.

    Args:
        inshape: spatial shape ``(D, H, W)``; each size must divide ``2**levels`` (levels =
            number of encoder levels, 4 by default).
        features: ``(encoder, decoder)`` U-Net filters, VoxelMorph's default
            ``((16, 32, 32, 32), (32, 32, 32, 32, 32, 16, 16))``.
        conv_per_level: convolutions per U-Net level.
        int_steps: scaling-and-squaring steps; 0 for a plain (non-diffeomorphic) displacement.
        int_resolution: relative voxel size of the integrated field (VoxelMorph default 2).
        half_res: predict the flow at half resolution (the decoder stops one level early).
        src_feats: channels of the moving image.
        trg_feats: channels of the fixed image.
        fill_value: value outside the moving image when warping; ``None`` clamps to the
            border (VoxelMorph's default).
        dtype: Keras dtype policy of the U-Net and flow convolutions, e.g.
            ``"mixed_bfloat16"`` (float32 weights, bfloat16 arithmetic; oneDNN runs it on
            AMX/AVX512-BF16 units); ``None`` uses the global policy. The flow is cast to
            float32 before the integration, rescaling and warping, which always run in
            float32. Weights do not depend on it.

    Example:
    >>> net = RegistrationNet((64, 64, 64))
    >>> out = net([moving, fixed])
    >>> out["displacement"].shape
    (1, 64, 64, 64, 3)
    """

    def __init__(
        self,
        inshape: Sequence[int],
        *,
        features: Sequence[Sequence[int]] = DEFAULT_FEATURES,
        conv_per_level: int = 1,
        int_steps: int = 7,
        int_resolution: int = 2,
        half_res: bool = False,
        src_feats: int = 1,
        trg_feats: int = 1,
        fill_value: float | None = None,
        dtype=None,
        name: str = "registration_net",
        **kwargs,
    ):
        dtype = None if dtype is None else keras.dtype_policies.get(dtype)
        inshape = tuple(int(n) for n in inshape)
        features = check_features(features, conv_per_level)
        check_divisible(inshape, num_poolings(features, conv_per_level))
        flow_resolution = 2 if half_res else 1
        if int_steps > 0:
            if int(int_resolution) < flow_resolution:
                raise ValueError(f"int_resolution must be >= {flow_resolution}"
                                 + (" when half_res=True" if half_res else ""))
            if any(n % int(int_resolution) for n in inshape):
                raise ValueError(f"int_resolution={int_resolution} must divide every spatial "
                                 f"size, got {inshape}")

        # === Functional model ===
        moving = keras.Input(shape=(*inshape, src_feats), name="moving")
        fixed = keras.Input(shape=(*inshape, trg_feats), name="fixed")
        outputs = _vxm_graph(moving, fixed, ndim=len(inshape), features=features,
                             conv_per_level=conv_per_level, int_steps=int_steps,
                             int_resolution=int_resolution, half_res=half_res,
                             fill_value=fill_value, dtype=dtype)
        super().__init__(
            inputs=[moving, fixed],
            outputs=outputs,
            name=name,
            **kwargs,
        )
        if dtype is not None:
            self.dtype_policy = dtype  # what keras.Model.get_config records as "dtype"

        # === Config ===
        self.inshape = inshape
        self.features = features
        self.conv_per_level = int(conv_per_level)
        self.int_steps = int(int_steps)
        self.int_resolution = int(int_resolution)
        self.half_res = bool(half_res)
        self.src_feats = int(src_feats)
        self.trg_feats = int(trg_feats)
        self.fill_value = fill_value

    def recomputed(self, inputs, *, training=False, recompute: int = 0):
        """``self(inputs, training=training)``; with ``recompute`` > 0, from the same layers
        with the activations of the U-Net's ``recompute`` finest resolution levels
        recomputed in the backward pass instead of kept (see :func:`dazoo.models.unet.unet`):
        the same outputs and gradients, less memory."""
        if not recompute:
            return self(inputs, training=training)
        moving, fixed = inputs
        return _vxm_graph(moving, fixed, ndim=len(self.inshape), features=self.features,
                          conv_per_level=self.conv_per_level, int_steps=self.int_steps,
                          int_resolution=self.int_resolution, half_res=self.half_res,
                          fill_value=self.fill_value, get=layers_of(self), training=training,
                          recompute=recompute)

    def get_config(self):
        return {
            **super().get_config(),  # name, trainable, dtype
            "inshape": list(self.inshape),
            "features": [list(f) for f in self.features],
            "conv_per_level": self.conv_per_level,
            "int_steps": self.int_steps,
            "int_resolution": self.int_resolution,
            "half_res": self.half_res,
            "src_feats": self.src_feats,
            "trg_feats": self.trg_feats,
            "fill_value": self.fill_value,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _voxelmorph_weight_groups(path: str | os.PathLike) -> tuple[str, dict[str, list[np.ndarray]]]:
    """Reads a VoxelMorph (Keras 2 HDF5) model file: its model name and weights per layer."""
    import h5py

    with h5py.File(path, "r") as h5:
        group = h5["model_weights"] if "model_weights" in h5 else h5
        config = h5.attrs.get("model_config")
        model_name = json.loads(config)["config"].get("name", "vxm_dense") if config else None
        weights = {}
        for layer_name in group.attrs["layer_names"]:
            layer_name = layer_name.decode() if isinstance(layer_name, bytes) else layer_name
            names = [n.decode() if isinstance(n, bytes) else n
                     for n in group[layer_name].attrs["weight_names"]]
            if names:
                weights[layer_name] = [np.asarray(group[layer_name][n]) for n in names]
    if model_name is None:
        prefixes = {n.split("_unet_")[0] for n in weights if "_unet_" in n}
        model_name = prefixes.pop() if len(prefixes) == 1 else "vxm_dense"
    return model_name, weights


def load_voxelmorph_weights(model: RegistrationNet, path: str | os.PathLike) -> RegistrationNet:
    """Loads the weights of a VoxelMorph TF ``VxmDense`` model file into ``model``.

    Works with VoxelMorph's own ``.h5`` files (Keras 2 HDF5 layout
    ``model_weights/<model name>_<layer>/...``), as its published pretrained TF models are
    saved. ``model`` must have the same topology (``inshape`` may differ: convolution
    weights do not depend on it).

    Args:
        model: the :class:`RegistrationNet` to fill.
        path: VoxelMorph ``.h5`` file.

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: naming the first layer that is missing or has mismatched shapes.
    """
    model_name, groups = _voxelmorph_weight_groups(path)
    prefix = f"{model_name}_"
    ours = {layer.name: layer for layer in model.layers if layer.weights}
    missing = set(ours)
    for vxm_name, arrays in groups.items():
        name = vxm_name[len(prefix):] if vxm_name.startswith(prefix) else vxm_name
        if name not in ours:
            raise ValueError(f"{os.fspath(path)}: layer {vxm_name!r} has no counterpart in "
                             f"{model.name} (is the topology the same?)")
        expected = [tuple(w.shape) for w in ours[name].weights]
        got = [a.shape for a in arrays]
        if expected != got:
            raise ValueError(f"{os.fspath(path)}: layer {vxm_name!r} has weights {got}, "
                             f"{model.name} expects {expected}")
        ours[name].set_weights(arrays)
        missing.discard(name)
    if missing:
        raise ValueError(f"{os.fspath(path)}: no weights for {sorted(missing)}")
    return model
