"""JAX: ``jax.value_and_grad`` (refinement; DeepAtlas training does not run on JAX)."""
from __future__ import annotations

import contextlib

import jax


def gradients(loss_fns, variables, *, after=()):
    raise NotImplementedError("DeepAtlas training supports the tensorflow and torch backends, "
                              "not 'jax' (its stateless training step is not written)")


def value_and_grad(function, *, compiled: bool = True):
    """See :func:`dazoo.backend.value_and_grad`."""
    grad_fn = jax.value_and_grad(function, has_aux=True)
    return jax.jit(grad_fn) if compiled else grad_fn


def no_grad():
    return contextlib.nullcontext()
