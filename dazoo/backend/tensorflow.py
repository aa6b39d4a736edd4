"""TensorFlow: gradients with ``tf.GradientTape``."""
from __future__ import annotations

import contextlib
import threading
import weakref

import keras
import tensorflow as tf


def gradients(loss_fns, variables, *, after=()):
    """See :func:`dazoo.backend.gradients`."""
    parts, total = [], None
    dependencies = [t for t in keras.tree.flatten(after) if t is not None]
    for loss_fn in loss_fns:
        with tf.control_dependencies(dependencies):
            with tf.GradientTape() as tape:
                parts.append(loss_fn())
            part = tape.gradient(parts[-1][0], variables)
        dependencies = [g for g in part if g is not None]
        total = part if total is None else [
            g if h is None else (h if g is None else g + h) for g, h in zip(total, part)]
    return total, parts


def value_and_grad(function, *, compiled: bool = True):
    """See :func:`dazoo.backend.value_and_grad`."""
    def step(x, *data):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss, aux = function(x, *data)
        return (loss, aux), tape.gradient(loss, x)

    if not compiled:
        return step
    # No AutoGraph: the refinement's Python branches and loops are on static values, so the
    # source-to-source conversion of every function it calls is pure cost (the brain preset's
    # first refinement of a process: trace + one step 12.0-14.0 s with it, 7.4-9.4 s without,
    # beside a training run; the same loss and displacement).
    traced = tf.function(step, reduce_retracing=True, autograph=False)

    def run(x, *data):
        with _without_grappler():
            return traced(x, *data)

    return run


@contextlib.contextmanager
def _without_grappler():
    """TensorFlow's graph optimiser (Grappler) off while a refinement step is instantiated
    and run. Its rewritten graph summed the gradient in an order that changed from call to
    call (run with 2 inter-op threads: gradients differing by 1e-11 between identical calls,
    which Adam's normalised steps grew to 0.2-0.3 voxel differences of the brain preset's
    refined displacement from one run to the next); the graph as traced is deterministic,
    as the eager step, and its first call is ~0.7 s cheaper (no optimisation) at the same
    step time. The option is process-wide: it is restored when the last step running in
    any thread ends (and left alone where the user had turned Grappler off)."""
    global _STEPS_RUNNING, _RESTORE
    with _GRAPPLER_LOCK:
        if _STEPS_RUNNING == 0:
            _RESTORE = not tf.config.optimizer.get_experimental_options().get(
                "disable_meta_optimizer", False)
            if _RESTORE:
                tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
        _STEPS_RUNNING += 1
    try:
        yield
    finally:
        with _GRAPPLER_LOCK:
            _STEPS_RUNNING -= 1
            if _STEPS_RUNNING == 0 and _RESTORE:
                tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})


_GRAPPLER_LOCK = threading.Lock()
_STEPS_RUNNING = 0
_RESTORE = False


def no_grad():
    return contextlib.nullcontext()


def inference(net):
    """``net``'s inference pass as one traced graph (kept per network for later calls)."""
    traced = _TRACED.get(net)
    if traced is None:
        traced = tf.function(lambda inputs: net(inputs, training=False), autograph=False,
                             reduce_retracing=True)
        _TRACED[net] = traced
    return traced


_TRACED = weakref.WeakKeyDictionary()
