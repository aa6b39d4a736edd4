"""Quality-control pictures (PNG, matplotlib): a result checked at a glance.

:func:`label_overlay` draws three orthogonal slices through a scan in world orientation
(nibabel's RAS+: the patient's left on the picture's left, anterior up in axial slices,
superior up in coronal and sagittal ones, letters at the edges say which way is which), with
a translucent overlay and contours of a label map. The slices are taken after reorienting to
RAS, with each panel's aspect ratio from the voxel sizes, so anisotropic scans are not
squashed.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from dazoo.io import Source, Volume, atomic_write, read_image, read_labels
from dazoo.labels import FREESURFER_LUT, label_colours, label_groups, side_free_name

__all__ = ["label_overlay", "registration_overlay"]


def _ras(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The array reoriented to RAS (axes flipped / permuted, no interpolation) and the voxel
    size along each RAS axis."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(volume.affine)
    array = nib.orientations.apply_orientation(np.asarray(volume.array), ornt)
    spacing = np.sqrt((volume.affine[:3, :3] ** 2).sum(axis=0))
    ras_spacing = np.empty(3)
    for axis, (target, _) in enumerate(ornt):
        ras_spacing[int(target)] = spacing[axis]
    return array, ras_spacing


def _window(array: np.ndarray) -> np.ndarray:
    """Intensities to [0, 1] for display: from the 0.5th to the 99.5th percentile of the
    foreground (voxels above the minimum: a skull-stripped or masked scan's zeros do not set
    the window), the upper end raised to 1.3x the peak of the brighter half's histogram when
    that peak sits near it, so a plateau of bright tissue (FreeSurfer's white matter,
    normalised to exactly 110) shows as light grey, not white."""
    array = np.asarray(array, np.float32)
    step = max(1, int(round((array.size / 2e6) ** (1 / 3))))
    sample = array[::step, ::step, ::step]
    foreground = sample[sample > sample.min()]
    values = foreground if foreground.size > 0.05 * sample.size else sample.ravel()
    low, middle, high = np.percentile(values, [0.5, 50, 99.5])
    bright = values[(values >= middle) & (values <= high)]
    peak = high  # the whole upper half one plateau
    if bright.size > 100 and high > middle:
        counts, edges = np.histogram(bright, bins=64, range=(middle, high))
        peak = edges[np.argmax(counts)] + 0.5 * (edges[1] - edges[0])
    high = max(high, low + 1.3 * (peak - low))
    return np.clip((array - low) / max(high - low, 1e-6), 0, 1)


def _foreground_centre(array: np.ndarray) -> np.ndarray:
    """Voxel index of the intensity centre of mass above the minimum."""
    weights = np.asarray(array, np.float64) - float(np.min(array))
    total = weights.sum()
    if total <= 0:
        return np.array(array.shape) // 2
    grids = np.meshgrid(*[np.arange(n) for n in array.shape], indexing="ij", sparse=True)
    return np.array([int(round((weights * g).sum() / total)) for g in grids])


def label_overlay(image: Source, labels: Source | None, path: str | os.PathLike, *,
                  title: str | None = None, names: Mapping[int, str] | None = None,
                  point: Sequence[int] | None = None, alpha: float = 0.35,
                  dpi: int = 110, groups: Mapping[int, str] | None = None) -> str:
    """Writes a PNG of three orthogonal slices of ``image`` with ``labels`` on top.

    Args:
        image: the scan (path, nibabel image, Volume or ``(array, affine)``).
        labels: its label map on the same grid, or None (the scan alone).
        path: the PNG to write (atomically).
        title: the picture's title (default: the image's file name).
        names: ``{id: name}`` for the legend (ids without a name are listed by id).
        point: RAS voxel index of the slices' crossing (default: the centre of mass of the
            labels, else the middle of the volume).
        alpha: opacity of the label overlay.
        groups: ``{id: structure group}``: when the legend would be too long, a group with
            more than a few entries (a whole-brain table's 31 cortical parcels) is one entry,
            ``cortex (31 regions)``; default FreeSurfer's groups where the names are
            FreeSurfer's.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    volume = read_image(image)
    array, spacing = _ras(volume)
    label_array = None
    if labels is not None:
        label_volume = read_labels(labels, like=volume)
        label_array, _ = _ras(label_volume)
    shown = _window(array)
    if point is None:
        if label_array is not None and np.any(label_array):
            point = np.round(np.argwhere(label_array > 0).mean(axis=0)).astype(int)
        else:
            point = np.array(array.shape) // 2
    point = [int(np.clip(p, 0, n - 1)) for p, n in zip(point, array.shape)]
    ids = [] if label_array is None else [int(i) for i in np.unique(label_array) if i != 0]
    lookup = {i: (*rgb, 1.0) for i, rgb in label_colours(ids).items()}

    # (name, slicer, horizontal spacing, vertical spacing, edge letters left/right/bottom/top)
    panels = [
        ("axial", lambda a: a[:, :, point[2]].T, spacing[0], spacing[1], "L", "R", "P", "A"),
        ("coronal", lambda a: a[:, point[1], :].T, spacing[0], spacing[2], "L", "R", "I", "S"),
        ("sagittal", lambda a: a[point[0], :, :].T, spacing[1], spacing[2], "P", "A", "I", "S"),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.6), dpi=dpi,
                                gridspec_kw={"wspace": 0.05})
    visible: dict[int, int] = {}  # id -> voxels in the three slices
    for axis, (name, cut, dx, dy, left, right, bottom, top) in zip(axes, panels):
        axis.imshow(cut(shown), cmap="gray", origin="lower", vmin=0, vmax=1,
                    aspect=dy / dx, interpolation="nearest")
        if label_array is not None:
            slab = cut(label_array)
            index = np.zeros(slab.shape, int)
            for n, label in enumerate(ids):
                index[slab == label] = n + 1
            cmap = ListedColormap([(0, 0, 0, 0)] + [lookup[i] for i in ids] or [(0, 0, 0, 0)])
            axis.imshow(np.ma.masked_equal(index, 0), cmap=cmap, origin="lower",
                        vmin=0, vmax=max(len(ids), 1), alpha=alpha, aspect=dy / dx,
                        interpolation="nearest")
            for n, label in enumerate(ids):
                mask = (slab == label).astype(float)
                if mask.any():
                    visible[label] = visible.get(label, 0) + int(mask.sum())
                if mask.any() and not mask.all():
                    axis.contour(mask, levels=[0.5], colors=[lookup[label]], linewidths=0.7)
        axis.set_xticks([])
        axis.set_yticks([])
        for spine in axis.spines.values():
            spine.set_visible(False)
        axis.set_title(name, fontsize=9, color="white")
        _orientation_letters(axis, cut(shown).shape, left, right, bottom, top)
    figure.suptitle(title or os.path.basename(volume.path or "image"), fontsize=11,
                    color="white")
    if ids:
        entries = _legend_entries(visible, names or {}, lookup, groups)
        shown_entries = entries[:_LEGEND_MAX]
        handles = [plt.Line2D([], [], color=colour, lw=4, label=text)
                   for text, colour in shown_entries]
        hidden = len(ids) - len(visible)
        notes = []
        if len(entries) > _LEGEND_MAX:
            notes.append(f"{len(entries) - _LEGEND_MAX} smaller ones not listed")
        if hidden:
            notes.append(f"{hidden} labels outside these slices")
        legend = figure.legend(handles=handles, loc="upper center",
                               ncol=min(len(handles), 5), fontsize=7, frameon=False,
                               labelcolor="white", bbox_to_anchor=(0.5, 0.02),
                               title=("labels in these slices"
                                      + (f" ({'; '.join(notes)})" if notes else "")),
                               title_fontsize=7)
        legend.get_title().set_color("white")
    return _save_figure(figure, path, facecolor="black")


#: At most this many legend entries (the largest in the slices; twins count once).
_LEGEND_MAX = 40


#: A structure group with more legend entries than this is drawn as one entry.
_GROUP_ENTRIES = 6


def _legend_entries(visible: Mapping[int, int], names: Mapping[int, str],
                    lookup: Mapping[int, tuple],
                    structure_groups: Mapping[int, str] | None = None) -> list[tuple[str, tuple]]:
    """``(text, colour)`` per legend entry, largest first: the labels seen in the slices,
    left and right twins of one colour merged into one entry named without the side
    (``ctx-lh-insula`` + ``ctx-rh-insula`` -> ``insula (L+R)``). Where that is more than
    :data:`_LEGEND_MAX` entries, the structure groups of more than :data:`_GROUP_ENTRIES`
    entries (the cortical parcels of a whole-brain table), largest group first, become one
    entry each, ``cortex (31 regions)``, in their largest member's colour."""
    twins: dict[tuple, list[int]] = {}
    names = {**{i: n for i, (n, _) in FREESURFER_LUT.items()}, **names}
    if structure_groups is None:
        structure_groups = label_groups({i: names[i] for i in visible if i in names})
    for label in visible:
        name = names.get(label, str(label))
        key = (side_free_name(name), tuple(np.round(lookup[label], 3)))
        twins.setdefault(key, []).append(label)
    entries = []
    for (base, _), labels in twins.items():
        if len(labels) > 1:
            text = f"{base} (L+R)"
        else:
            text = names.get(labels[0], str(labels[0]))
        size = sum(visible[i] for i in labels)
        biggest = max(labels, key=lambda i: visible[i])
        entries.append((size, text, lookup[biggest], structure_groups.get(biggest)))
    per_group: dict[str, list] = {}
    for entry in entries:
        if entry[3] is not None:
            per_group.setdefault(entry[3], []).append(entry)
    for group, members in sorted(per_group.items(), key=lambda g: -len(g[1])):
        if len(entries) > _LEGEND_MAX and len(members) > _GROUP_ENTRIES:
            entries = [e for e in entries if e[3] != group]
            largest = max(members, key=lambda e: e[0])
            entries.append((sum(e[0] for e in members), f"{group} ({len(members)} regions)",
                            largest[2], group))
    entries.sort(key=lambda e: -e[0])
    return [(text, colour) for _, text, colour, _ in entries]


def _orientation_letters(axis, shape, left, right, bottom, top, colour="yellow") -> None:
    """The patient's directions at the edges of an image drawn with ``origin="lower"``,
    just inside the image (not at the edges of a wider panel)."""
    rows, columns = shape
    style = dict(color=colour, fontsize=9, fontweight="bold", transform=axis.transData)
    axis.text(0.01 * columns, rows / 2, left, ha="left", va="center", **style)
    axis.text(0.99 * columns - 1, rows / 2, right, ha="right", va="center", **style)
    axis.text(columns / 2, 0.01 * rows, bottom, ha="center", va="bottom", **style)
    axis.text(columns / 2, 0.99 * rows - 1, top, ha="center", va="top", **style)


def registration_overlay(fixed: Source, moved: Source | None, displacement: Volume,
                         path: str | os.PathLike, *, title: str | None = None,
                         dpi: int = 110) -> str:
    """Writes a PNG to check a registration: for the axial, coronal and sagittal slices
    through the fixed image's centre, a checkerboard of the fixed and moved images, the
    deformed grid, and the Jacobian determinant of ``x -> x + d(x)`` on a log scale (blue:
    contraction, red: expansion, white: volume kept; folding, determinant <= 0, in green),
    with the patient's directions at the image edges.

    Args:
        fixed: the fixed image.
        moved: the moved image on the fixed grid, or None (the first column then shows the
            fixed image alone).
        displacement: the pull-back field on the fixed grid (``(X, Y, Z, 3)`` RAS mm), as
            :class:`dazoo.pipeline.Registration` holds it.
        path: the PNG to write (atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dazoo.metrics import world_jacobian_determinant

    fixed_volume = read_image(fixed)
    fixed_array, spacing = _ras(fixed_volume)
    moved_array = fixed_array if moved is None else _ras(read_image(moved))[0]
    affine = displacement.affine
    u = np.asarray(displacement.array, np.float64) @ np.linalg.inv(affine[:3, :3]).T
    det = world_jacobian_determinant(displacement.array, affine).astype(np.float32)
    det_ras, _ = _ras(Volume(det, affine, None))
    # Displacement in RAS voxel units, axes reoriented like the images.
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    u_ras = np.stack([nib.orientations.apply_orientation(u[..., c], ornt) for c in range(3)], -1)
    perm = np.empty(3, int)
    for axis, (target, flip) in enumerate(ornt):
        perm[int(target)] = axis
    u_ras = np.stack([u_ras[..., perm[t]] * ornt[perm[t], 1] for t in range(3)], -1)

    centre = _foreground_centre(fixed_array)
    fixed_array, moved_array = _window(fixed_array), _window(moved_array)
    cuts = [("axial", 2, (0, 1), spacing[0], spacing[1]),
            ("coronal", 1, (0, 2), spacing[0], spacing[2]),
            ("sagittal", 0, (1, 2), spacing[1], spacing[2])]
    figure, axes = plt.subplots(3, 3, figsize=(11, 11), dpi=dpi)
    for row, (name, axis, (h, v), dx, dy) in enumerate(cuts):
        index = [slice(None)] * 3
        index[axis] = int(centre[axis])
        index = tuple(index)
        a, b = fixed_array[index].T, moved_array[index].T
        tiles = max(a.shape) // 8 or 1
        yy, xx = np.indices(a.shape)
        board = np.where(((yy // tiles) + (xx // tiles)) % 2 == 0, a, b)
        axes[row, 0].imshow(board, cmap="gray", origin="lower", aspect=dy / dx,
                            vmin=0, vmax=1)
        axes[row, 0].set_title(f"{name}: " + ("fixed image" if moved is None
                                               else "fixed / moved checkerboard"), fontsize=8)
        axes[row, 1].imshow(a, cmap="gray", origin="lower", aspect=dy / dx, alpha=0.6)
        step = max(2, max(a.shape) // 24)
        uh, uv = u_ras[index][..., h].T, u_ras[index][..., v].T
        gy, gx = np.indices(a.shape).astype(float)
        px, py = gx + uh, gy + uv
        for k in range(0, a.shape[0], step):
            axes[row, 1].plot(px[k, :], py[k, :], color="cyan", lw=0.5)
        for k in range(0, a.shape[1], step):
            axes[row, 1].plot(px[:, k], py[:, k], color="cyan", lw=0.5)
        axes[row, 1].set_xlim(0, a.shape[1] - 1)
        axes[row, 1].set_ylim(0, a.shape[0] - 1)
        axes[row, 1].set_title(f"{name}: deformed grid", fontsize=8)
        d = det_ras[index].T
        # log2 of the determinant: contraction (blue) and expansion (red) symmetric about
        # volume kept (white); folding (det <= 0) has no logarithm: drawn apart, in green.
        log_det = np.log2(np.clip(d, 1e-6, None))
        shown = axes[row, 2].imshow(np.ma.masked_where(d <= 0, log_det), cmap="RdBu_r",
                                    origin="lower", aspect=dy / dx, vmin=-1, vmax=1)
        folds = np.ma.masked_where(d > 0, np.ones_like(d))
        axes[row, 2].imshow(folds, cmap=matplotlib.colors.ListedColormap(["lime"]),
                            origin="lower", aspect=dy / dx, vmin=0, vmax=1)
        axes[row, 2].set_title(f"{name}: Jacobian determinant "
                               f"(folding {100 * float(np.mean(det <= 0)):.3f} %: green)",
                               fontsize=8)
        bar = figure.colorbar(shown, ax=axes[row, 2], fraction=0.046, pad=0.02,
                              ticks=[-1, -0.5, 0, 0.5, 1])
        bar.ax.set_yticklabels(["<=0.5", "0.71", "1", "1.41", ">=2"], fontsize=7)
        letters = {"axial": ("L", "R", "P", "A"), "coronal": ("L", "R", "I", "S"),
                   "sagittal": ("P", "A", "I", "S")}[name]
        for column, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            _orientation_letters(ax, a.shape, *letters,
                                 colour="black" if column == 2 else "yellow")
    figure.suptitle(title or os.path.basename(fixed_volume.path or "registration"), fontsize=11)
    return _save_figure(figure, path)


def _save_figure(figure, path, **options) -> str:
    """Saves and closes a matplotlib figure, atomically (:func:`dazoo.io.atomic_write`)."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: figure.savefig(tmp, bbox_inches="tight",
                                                             **options))
    finally:
        plt.close(figure)
