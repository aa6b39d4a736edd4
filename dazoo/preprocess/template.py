"""Building an affine population-average template from training scans."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dazoo.errors import DazooInputError
from dazoo.io import Source, Volume, read_image
from dazoo.preprocess.alignment import align_affine
from dazoo.preprocess.config import check_intensity
from dazoo.preprocess.geometry import grid_affine, image_centre, resample
from dazoo.preprocess.intensity import intensity_parameters, normalise_intensity


def build_affine_template(
    volumes: Sequence[Source],
    *,
    voxel_size: Sequence[float],
    shape: Sequence[int],
    orientation: str = "RAS",
    iterations: int = 2,
    kind: str = "affine",
    metric: str = "correlation",
    intensity: Mapping[str, Any] | None = None,
    reference: int = 0,
) -> Volume:
    """An affine population-average template.

    Start from ``volumes[reference]``; at each iteration align every volume to the current
    template, then average the normalised, aligned images. Before averaging, the mean
    alignment matrix is factored out so that the template sits in the average position,
    size and shape of the population rather than the reference's. The grid is centred on the
    mean centre of mass of the volumes.

    Args:
        volumes: sources (paths, Volumes, ...), at least 2.
        voxel_size: 3 floats, mm.
        shape: 3 ints, the template grid.
        orientation: axis codes of the template grid.
        iterations: number of align-and-average rounds.
        kind: ``"affine"`` or ``"rigid"`` alignment.
        metric: ``"correlation"`` or ``"mi"``.
        intensity: intensity normalisation spec (default percentile 0.5-99.5 to [0, 1]).
        reference: index of the initial reference.

    Returns:
        A :class:`Volume` (float32 ``shape`` array in [0, 1], grid affine).
    """
    if len(volumes) < 2:
        raise DazooInputError("build_affine_template", "needs at least 2 volumes")
    spec = check_intensity(intensity or {"method": "percentile"}, "build_affine_template")
    images = [read_image(v) for v in volumes]
    centre = np.mean([image_centre(v, method="mass") for v in images], axis=0)
    grid = grid_affine(orientation=orientation, voxel_size=voxel_size, shape=shape, centre=centre)
    norms = [intensity_parameters(v.array, spec, name=v.name) for v in images]
    clip = spec["method"] == "percentile"

    def average(transforms):
        total = np.zeros(tuple(shape), dtype=np.float64)
        for image, (offset, scale), transform in zip(images, norms, transforms):
            sampled = resample(image, grid, shape, transform=transform,
                               cval=float(image.array.min()))
            total += normalise_intensity(sampled, offset, scale, clip=clip)
        return Volume((total / len(images)).astype(np.float32), grid)

    offset, scale = norms[reference]
    template = Volume(normalise_intensity(
        resample(images[reference], grid, shape, cval=float(images[reference].array.min())),
        offset, scale, clip=clip), grid)
    for _ in range(iterations):
        transforms = [align_affine(v, template, kind=kind, metric=metric) for v in images]
        mean_inverse = np.linalg.inv(np.mean(transforms, axis=0))
        template = average([t @ mean_inverse for t in transforms])
    return template
