"""Intensity normalisation: robust percentiles to [0, 1], min-max, z-score or none."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from dazoo.errors import DazooInputError
from dazoo.preprocess.config import check_intensity


def intensity_parameters(array: np.ndarray, spec: Mapping[str, Any], *, name: str = "<array>"):
    """Offset and scale so that ``(x - offset) / scale`` is the normalised intensity.

    Statistics are computed on at most ~2 million voxels (a regular sub-sampling).

    Returns:
        ``(offset, scale)`` as floats.

    Raises:
        DazooInputError: the image has (robustly) constant intensity.
    """
    spec = check_intensity(spec, name)
    method = spec["method"]
    if method == "none":
        return 0.0, 1.0
    step = max(1, int(math.ceil((array.size / 2e6) ** (1 / 3))))
    sample = array[::step, ::step, ::step].ravel()
    if spec.get("nonzero"):
        sample = sample[sample != 0]
        if sample.size == 0:
            raise DazooInputError(name, "has no non-zero voxels to normalise")
    if method == "percentile":
        low, high = np.percentile(sample, [spec["lower"], spec["upper"]])
    elif method == "minmax":
        low, high = sample.min(), sample.max()
    else:
        low, high = sample.mean(), sample.mean() + sample.std()
    if not high > low:
        raise DazooInputError(name, "has constant intensity; it cannot be normalised")
    return float(low), float(high - low)


def normalise_intensity(
    array: np.ndarray, offset: float, scale: float, *, clip: bool
) -> np.ndarray:
    """``(array - offset) / scale`` as float32, clipped to [0, 1] when ``clip``."""
    out = (np.asarray(array, dtype=np.float32) - np.float32(offset)) / np.float32(scale)
    return np.clip(out, 0.0, 1.0, out=out) if clip else out
