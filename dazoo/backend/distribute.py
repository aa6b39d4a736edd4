"""``tf.distribute`` workarounds, in one place: the replica count, counts over the global
batch (so each replica's loss is its share of the global mean and the summed gradients are
those of one device with the whole batch), and multi-worker logs. Outside a TensorFlow
strategy every function is the one-device identity."""
from __future__ import annotations

import keras
from keras import ops


def replicas() -> int:
    """Replicas training in sync (``tf.distribute``), 1 outside a replica context."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return 1 if context is None else int(context.num_replicas_in_sync)


def global_count(values):
    """``max(sum(values), 1)`` over the whole global batch (all-reduced across replicas).
    Must be called the same number of times on every replica (never inside a branch of a
    ``cond``)."""
    count = ops.stop_gradient(ops.sum(ops.cast(values, "float32")))
    if replicas() > 1:
        import tensorflow as tf

        count = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM,
                                                               count)
    return ops.maximum(count, 1.0)


def multi_worker(model) -> bool:
    """Whether ``model`` runs under a ``tf.distribute.MultiWorkerMirroredStrategy``."""
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None:
        return False
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_logs(model, logs: dict) -> dict:
    """Keras reduces a step's outputs across workers with a MEAN over axis 0, which a scalar
    does not have (keras 3.15): under multi-worker training each value gets that axis."""
    if multi_worker(model):
        return {name: ops.reshape(value, (1,)) for name, value in logs.items()}
    return logs


def tracker_scale() -> int:
    """Each replica's loss is its share of the global batch's value and the trackers average
    over replicas: the factor that logs the global value."""
    return replicas()
