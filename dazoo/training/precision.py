"""Precision of the two networks: the recipe's ``"precision"`` forms, whether this machine
runs bfloat16 natively (AVX512-BF16 / AMX, or a GPU), and the float32 fallback where it
does not (measured: emulated bfloat16 is several times slower and less exact)."""
from __future__ import annotations

import os

PRECISIONS = ("float32", "mixed_bfloat16")


def network_precisions(precision) -> dict:
    """The Keras dtype policy of each network for a recipe's ``precision``.

    ``"float32"``: both float32. ``"mixed_bfloat16"``: the segmenter in mixed bfloat16, the
    registration network float32 (the meaning this value has always had).
    ``{"registration": P, "segmentation": P}`` sets each (P one of :data:`PRECISIONS`),
    e.g. both ``"mixed_bfloat16"``: 1.2-1.35x faster joint steps on CPUs with AMX/AVX512-BF16
    (``benchmarks/bench_training.py``), a change of arithmetic, never the default.
    """
    if isinstance(precision, str):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)} or an object "
                             f"{{\"registration\": ..., \"segmentation\": ...}}, "
                             f"got {precision!r}")
        return {"registration": "float32", "segmentation": precision}
    if (not isinstance(precision, dict) or set(precision) != {"registration", "segmentation"}
            or any(p not in PRECISIONS for p in precision.values())):
        raise ValueError(f"precision as an object needs exactly the keys \"registration\" and "
                         f"\"segmentation\", each one of {list(PRECISIONS)}; got {precision!r}")
    return dict(precision)


#: CPU flags (Linux ``/proc/cpuinfo``) of hardware bfloat16 arithmetic that oneDNN uses.
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set:
    """The CPU's feature flags from the text of Linux's ``/proc/cpuinfo`` (read when None;
    empty where it cannot be read, e.g. on other systems)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read()
        except OSError:
            return set()
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def native_bfloat16() -> bool:
    """Whether the Keras backend runs bfloat16 arithmetic in hardware here: a GPU, or a CPU
    with AVX512-BF16/AMX (and, under TensorFlow, oneDNN not switched off).

    Elsewhere bfloat16 is emulated, slower and less exact than float32: measured on a CPU
    without AVX512 (AMD EPYC), a training step of the brain segmenter took 3.8x as long as in
    float32, and with TensorFlow's non-oneDNN kernels (``TF_ENABLE_ONEDNN_OPTS=0``) a
    U-Net's probabilities strayed 5x further from float32's than with oneDNN's
    (``benchmarks/bench_bfloat16_error.py``). Unknown CPUs (no ``/proc/cpuinfo``) count as not native.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            return True
        if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip() in ("0", "false", "False"):
            return False
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            return bool(torch.cuda.is_bf16_supported())
    elif backend == "jax":
        import jax

        if jax.default_backend() != "cpu":
            return True
    return bool(cpu_flags() & set(BFLOAT16_CPU_FLAGS))


def machine_precision(precision, native: bool):
    """``precision`` with ``"mixed_bfloat16"`` replaced by ``"float32"`` where bfloat16 is
    not ``native`` (see :func:`native_bfloat16`); unchanged otherwise, in the same form."""
    if native:
        return precision
    if isinstance(precision, str):
        return "float32" if precision == "mixed_bfloat16" else precision
    return {k: ("float32" if v == "mixed_bfloat16" else v) for k, v in precision.items()}
