"""Start-up of TensorFlow without its noise (keras-free: importing this module imports
nothing heavy). The CLI calls :func:`quiet_tensorflow` before a verb that runs the networks;
the Python API (``dazoo.load``, ``dazoo.DeepAtlas``, ...) calls it on first use, unless the
user chose a TensorFlow log level below 3 (``TF_CPP_MIN_LOG_LEVEL``) or another Keras
backend."""
from __future__ import annotations

import os
import sys

__all__ = ["quiet_tensorflow", "quiet_for_api", "tensorflow", "device_summary"]


#: What :func:`quiet_tensorflow` asked for, applied by :func:`tensorflow` when ``now=False``.
_PENDING: dict = {}


def tensorflow() -> None:
    """Imports TensorFlow now, as a :func:`quiet_tensorflow` call with ``now=False`` asked
    (quietly, its thread counts set); a no-op otherwise or when it is imported already. The
    CLI's verbs call it once their arguments are checked, so that a wrong path or preset name
    is reported at once, not after TensorFlow's few seconds of start-up."""
    if _PENDING:
        options = dict(_PENDING)
        _PENDING.clear()
        quiet_tensorflow(**options)


def quiet_tensorflow(*, verbose: bool = False, threads: int | None = None,
                     now: bool = True) -> None:
    """Before TensorFlow is imported: hide its C++ and Python log lines (on a CPU machine the
    CUDA probe prints an error-looking line, oneDNN an info line) unless ``verbose``, and set
    its thread counts. Environment variables the user set already win. ``now=False``: only
    remember the request; :func:`tensorflow` carries it out."""
    if not now:
        _PENDING.update(verbose=verbose, threads=threads)
        return
    import logging

    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
        try:
            import absl.logging

            absl.logging.set_verbosity(absl.logging.ERROR)
        except ImportError:  # pragma: no cover
            pass
    if threads is not None:
        for name in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS"):
            os.environ[name] = str(threads)
        os.environ["TF_NUM_INTEROP_THREADS"] = "1" if threads == 1 else "2"
    if not verbose and "tensorflow" not in sys.modules:
        # TensorFlow's C++ side logs at import and at its CUDA probe before its log-level
        # settings apply (absl writes "All log messages before absl::InitializeLog() ..." to
        # the stderr file descriptor): import it with that descriptor sent to /dev/null.
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            import tensorflow as tf

            tf.config.list_physical_devices()
        except ImportError:  # pragma: no cover (reported by the verb that needs it)
            pass
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
    if threads is not None:
        try:
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1 if threads == 1 else 2)
        except (ImportError, RuntimeError):  # reported by the verb / already initialised
            pass


def quiet_for_api() -> None:
    """:func:`quiet_tensorflow` for the Python API's first use of Keras: only on the
    TensorFlow backend, before TensorFlow is imported, and unless ``TF_CPP_MIN_LOG_LEVEL`` is
    set below 3 (the user asked for TensorFlow's lines)."""
    if "tensorflow" in sys.modules:
        return
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3") not in ("3", ""):
        return
    quiet_tensorflow()


def device_summary() -> str:
    """Where the networks run, in words: ``"GPU (NVIDIA H100 ...)"`` or ``"CPU (2 cores)"``,
    with the Keras backend (imports it: call after :func:`tensorflow`)."""
    import keras

    backend = keras.backend.backend()
    gpus = []
    if backend == "tensorflow":
        import tensorflow as tf

        for device in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(device)
            gpus.append(details.get("device_name", device.name))
    elif backend == "torch":
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    elif backend == "jax":
        import jax

        gpus = [str(d) for d in jax.devices() if d.platform != "cpu"]
    if gpus:
        return f"{backend} on GPU ({', '.join(gpus)})"
    return f"{backend} on CPU ({os.cpu_count()} cores)"
