"""Preprocessing: from a scan in its native space to the model's grid, with the affines kept.

The steps, driven by a declarative :class:`PreprocessConfig` that a preset stores:

1. read and validate the image (:func:`dazoo.io.read_image`);
2. affine (12 parameters) or rigid pre-alignment to the preset's template
   (:func:`align_affine`, SimpleITK: centre-of-mass initialisation, multi-resolution,
   correlation or Mattes mutual information on sampled voxels);
3. one resampling onto the model grid: canonical orientation (``config.orientation``),
   ``config.voxel_size`` and ``config.shape`` (each a multiple of ``2**config.levels``). The
   reorientation, the alignment, the change of voxel size and the crop/pad are *composed* as
   4x4 matrices and applied in a single interpolation, so the image is interpolated once;
4. intensity normalisation (robust percentiles to [0, 1], min-max, z-score or none).

Coordinates: every affine maps voxel indices ``(i, j, k)`` to world RAS+ millimetres, as in
nibabel. The recorded chain (:class:`Preprocessed`) holds the native grid (shape, affine), the
alignment matrix and the model grid's affine, so :mod:`dazoo.postprocess` maps results back onto
the input's own grid in one resampling.

The alignment matrix ``alignment`` (4x4, world -> world) maps a point of the *template* world
(the model grid's world) to the corresponding point of the *input's* native world: it is a
"fixed to moving" (pull-back) transform, as ITK registration returns. A model-grid voxel ``v``
samples the native image at native voxel ``inv(native_affine) @ alignment @ affine @ v``.

This module imports numpy, scipy and nibabel only; SimpleITK is imported inside
:func:`align_affine`.

Example:

>>> config = PreprocessConfig(voxel_size=(1, 1, 1), shape=(160, 192, 160),
...                           template="template.nii.gz", alignment="affine")
>>> pre = Preprocessor(config, root="path/to/preset").apply("scan.mgz")  # doctest: +SKIP
>>> pre.array.shape, pre.affine                                           # doctest: +SKIP
"""
from __future__ import annotations

from dazoo.preprocess.alignment import align_affine, alignment_score, mirror_matrix
from dazoo.preprocess.config import PreprocessConfig
from dazoo.preprocess.geometry import (
                                       grid_affine,
                                       image_centre,
                                       orientation_matrix,
                                       reorient,
                                       resample,
                                       snap,
)
from dazoo.preprocess.intensity import intensity_parameters, normalise_intensity
from dazoo.preprocess.preprocessor import Preprocessed, Preprocessor
from dazoo.preprocess.template import build_affine_template

__all__ = [
    "PreprocessConfig",
    "Preprocessor",
    "Preprocessed",
    "align_affine",
    "alignment_score",
    "mirror_matrix",
    "build_affine_template",
    "grid_affine",
    "orientation_matrix",
    "reorient",
    "resample",
    "snap",
    "intensity_parameters",
    "normalise_intensity",
    "image_centre",
]
