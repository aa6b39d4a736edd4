"""Function-preserving widening: a trained network's weights inside a wider one.

A larger segmenter trained from scratch needs more steps than a 2-core session holds; grown
from a trained one it starts where that one stands. :func:`widen` copies a network into one
of the same topology with more filters per convolution such that the wider network computes
exactly the same outputs (zero-initialised expansion): every old filter keeps its weights and
gets zero weights from the new input channels, and the new filters keep their fresh random
initialisation but reach the next layer through zero weights. Gradients reach those zero
weights at once (the new channels are active), so training uses the added width from the
first step. Per-channel normalisations (instance, batch) keep their old channels' weights;
a normalisation that mixes channels (group normalisation with fewer groups than channels)
would change the old channels' statistics, and is refused.
"""
from __future__ import annotations

import numpy as np

__all__ = ["widen"]

_CHANNEL_MIXING = ("Conv1D", "Conv2D", "Conv3D", "Dense")
_PER_CHANNEL = ("GroupNormalization", "BatchNormalization")


def _origins(model) -> dict:
    """For every layer's output, the origin of each channel: ``(layer name, index)`` of the
    convolution (or input) that made it, traced through the functional graph."""
    out = {}

    def origin(tensor):
        return out[tensor._keras_history.operation.name]

    for layer in model.layers:
        kind = type(layer).__name__
        inputs = layer._inbound_nodes[0].input_tensors if layer._inbound_nodes else []
        if not inputs or kind in _CHANNEL_MIXING:  # an input, or a layer making channels
            out[layer.name] = [(layer.name, i) for i in range(layer.output.shape[-1])]
        elif kind == "Concatenate":
            if layer.axis not in (-1, len(layer.output.shape) - 1):
                raise ValueError(f"widen: {layer.name} concatenates along axis {layer.axis}, "
                                 "not channels")
            out[layer.name] = [o for t in inputs for o in origin(t)]
        elif len(inputs) == 1 and inputs[0].shape[-1] == layer.output.shape[-1]:
            out[layer.name] = origin(inputs[0])  # channel-wise (norm, activation, pooling...)
        else:
            raise ValueError(f"widen: cannot trace the channels through {layer.name} ({kind})")
    return out


def _input_origins(layer, origins):
    (tensor,) = layer._inbound_nodes[0].input_tensors
    return origins[tensor._keras_history.operation.name]


def widen(source, target):
    """Copies the built network ``source`` into ``target`` (same layers, by name and type,
    each convolution with at least as many filters) so that ``target`` computes the same
    function; returns ``target``.

    The new filters keep ``target``'s own initialisation (seed it with
    ``keras.utils.set_random_seed`` before building ``target``).

    Raises:
        ValueError: the layers differ, a layer is narrower in ``target``, or a channel-mixing
            normalisation would have to change width.
    """
    names = [(l.name, type(l).__name__) for l in source.layers]
    if names != [(l.name, type(l).__name__) for l in target.layers]:
        raise ValueError("widen: source and target must have the same layers (names, types)")
    source_origins, target_origins = _origins(source), _origins(target)
    for layer in source.layers:
        if not layer.weights:
            continue
        new = target.get_layer(layer.name)
        kind = type(layer).__name__
        old_weights = [np.asarray(w) for w in layer.get_weights()]
        new_weights = [np.asarray(w).copy() for w in new.get_weights()]
        if kind in _CHANNEL_MIXING:
            kernel, bias = old_weights[0], old_weights[1] if len(old_weights) > 1 else None
            n_out = kernel.shape[-1]
            if new_weights[0].shape[-1] < n_out:
                raise ValueError(f"widen: {layer.name} has {new_weights[0].shape[-1]} filters "
                                 f"in the target, fewer than the source's {n_out}")
            rows = {o: i for i, o in enumerate(_input_origins(layer, source_origins))}
            columns = _input_origins(new, target_origins)
            if len(rows) != sum(o in rows for o in columns):
                raise ValueError(f"widen: {layer.name}'s inputs do not map onto the target's")
            wide = new_weights[0]
            wide[..., :n_out] = 0.0  # old filters: nothing from the new input channels
            for j, o in enumerate(columns):
                if o in rows:
                    wide[..., j, :n_out] = kernel[..., rows[o], :]
            # new filters: their own initialisation; every layer they feed reads them through
            # zero weights (above), so the function is unchanged
            if bias is not None:
                new_weights[1][:n_out] = bias
            new.set_weights(new_weights)
        elif kind in _PER_CHANNEL:
            n, n_new = old_weights[0].shape[-1], new_weights[0].shape[-1]
            groups = getattr(new, "groups", -1)
            if n_new != n and groups not in (-1, n_new):
                raise ValueError(f"widen: {layer.name} normalises groups of channels "
                                 f"(groups={groups}): widening it would change its statistics")
            for w_new, w_old in zip(new_weights, old_weights):
                w_new[:n] = w_old
            new.set_weights(new_weights)
        else:
            if [w.shape for w in new_weights] != [w.shape for w in old_weights]:
                raise ValueError(f"widen: {layer.name} ({kind}) cannot change its weights' "
                                 "shapes")
            new.set_weights(old_weights)
    return target
