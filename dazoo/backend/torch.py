"""torch: gradients with autograd (``.backward()`` accumulates in ``.grad``)."""
from __future__ import annotations

import torch


def gradients(loss_fns, variables, *, after=()):
    """See :func:`dazoo.backend.gradients` (``after`` is TensorFlow's; eager torch runs in
    order)."""
    for variable in variables:
        variable.value.grad = None
    parts = []
    for loss_fn in loss_fns:
        parts.append(loss_fn())
        parts[-1][0].backward()  # gradients accumulate in .grad
    return [v.value.grad for v in variables], parts


def value_and_grad(function, *, compiled: bool = True):
    """See :func:`dazoo.backend.value_and_grad` (always eager)."""
    def step(x, *data):
        x = x.detach().requires_grad_(True)
        loss, aux = function(x, *data)
        (grad,) = torch.autograd.grad(loss, [x])
        return (loss.detach(), tuple(a.detach() for a in aux)), grad

    return step


def no_grad():
    return torch.no_grad()


class _LeakyReLU(torch.autograd.Function):
    """leaky_relu whose backward pass reads only its output (see :func:`dazoo.ops.leaky_relu`).

    Not through ``keras.ops.custom_gradient``: on torch that keeps the input as well
    (``save_for_backward(*args)``), and its gradient closure over the output, stored on the
    context, closes a reference cycle through the autograd graph. Python's collector can
    free such a cycle only once no other graph node refers to it, one link of a chain per
    pass, so a U-Net's activations piled up: the brain v3 training step grew ~1 GB per step
    until the kernel killed it at 24 GiB. The output kept by ``save_for_backward`` makes no
    cycle.
    """

    @staticmethod
    def forward(ctx, x, slope):
        y = torch.nn.functional.leaky_relu(x, slope)
        ctx.slope = slope
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, upstream):
        (y,) = ctx.saved_tensors
        return torch.where(y > 0, upstream, upstream * ctx.slope), None


def leaky_relu(x, slope: float):
    return _LeakyReLU.apply(x, slope)
