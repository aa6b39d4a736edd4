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
