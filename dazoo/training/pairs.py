"""Pair datasets for DeepAtlas: (moving, fixed) batches mixing labelled and unlabelled images.

:class:`PairDataset` is a ``keras.utils.PyDataset``; every batch follows the contract of
:mod:`dazoo.batch`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import numpy as np

from dazoo.batch import NETWORKS, SEGMENTATION, Schedule, make_batch
from dazoo.errors import DazooInputError
from dazoo.labels import LabelMap
from dazoo.preprocess import Preprocessor
from dazoo.training.augment import Augmentation
from dazoo.training.cache import VolumeCache
from dazoo.training.subjects import Subject
from dazoo.training.synth import LabelSynth

__all__ = ["PairDataset"]


class PairDataset(keras.utils.PyDataset):
    """Random (moving, fixed) pairs for DeepAtlas, mixing labelled and unlabelled images.

    The images are already on the model grid (see :meth:`from_subjects` to build one from
    files through a :class:`~dazoo.preprocess.Preprocessor` and a :class:`VolumeCache`).
    Batch ``i`` of epoch ``e`` is drawn from ``numpy.random.default_rng([seed, 0, e, i])``:
    the same seed gives the same batches, in any order and with any number of workers.

    With a ``schedule`` (:class:`~dazoo.batch.Schedule`, e.g. ``model.schedule``),
    batch ``i`` of epoch ``e`` is training step ``e * steps_per_epoch + i`` and the sampling
    follows its phase: a segmentation step draws pairs that hold at least one labelled
    image (on a random side), so that every segmentation step has a supervised target (so
    does every step of ``"simultaneous"`` training, which updates both networks from each
    batch), and ``augment_phases`` says which phases' images are augmented. To resume training at step
    ``s`` (a multiple of ``steps_per_epoch``), set ``dataset.epoch = s // steps_per_epoch``.

    Args:
        images: sequence of ``(D, H, W)`` float arrays (one shape for all).
        labels: sequence (same length) of ``(D, H, W)`` label-id arrays or None; or None.
        label_map: LabelMap. Ids -> classes (default: every id found, no merging).
        labelled: which subjects keep their labels: indices or names (``names``). Default:
            every subject with a label map (unless ``k`` is given).
        k: how many subjects keep their labels, chosen reproducibly (from ``seed``) among
            those with a label map; ``k=1`` is the one-shot setting.
        names: sequence of subject names (for ``labelled`` and messages).
        batch_size: pairs per batch.
        steps_per_epoch: batches per epoch (``len(dataset)``).
        seed: int. Seed of the choice of ``k`` labelled subjects and of the pair sampling.
        labelled_fraction: float or None. Probability that each image of a pair is drawn
            from the labelled subjects (None: uniform over all subjects).
        map_fraction: float or None. Probability that each image of a pair is drawn from
            the label maps without images (``images`` entry None) rather than from the real
            images (None: uniform over all subjects). E.g. 0.5 with 12 real images and 93
            label maps shows real images half the time instead of 11 %.
        augment: Augmentation or None, applied independently to each image of a pair.
        synth: LabelSynth or None. Synthesises images from label maps (SynthSeg-style):
            each drawn image that has a label map is replaced, with probability
            ``synth_probability``, by ``synth(raw label map)`` (the deformed map becomes its
            labels; ``augment`` then applies as to any image). An ``images`` entry may be
            None for a label map without an image: it is always synthesised (and labelled).
        synth_probability: float in [0, 1], see ``synth``.
        schedule: Schedule or None. The model's phase schedule (see above).
        augment_phases: the phases whose batches are augmented (default both; needs a
            ``schedule`` to tell the phases apart).
        **kwargs: ``workers``, ``use_multiprocessing``, ``max_queue_size`` of PyDataset.

    Example:

    >>> data = PairDataset(images, labels, k=1, batch_size=2, steps_per_epoch=50)  # doctest: +SKIP
    >>> batch = data[0]; sorted(batch)                                             # doctest: +SKIP
    """

    def __init__(self, images: Sequence[np.ndarray],
                 labels: Sequence[np.ndarray | None] | None = None, *,
                 label_map: LabelMap | None = None,
                 labelled: Sequence[int | str] | None = None, k: int | None = None,
                 names: Sequence[str] | None = None, batch_size: int = 1,
                 steps_per_epoch: int = 100, seed: int = 0,
                 labelled_fraction: float | None = None, map_fraction: float | None = None,
                 augment: Augmentation | None = None, schedule: Schedule | None = None,
                 augment_phases: Sequence[str] = ("registration", "segmentation"),
                 synth: LabelSynth | None = None, synth_probability: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.images = [None if i is None else np.ascontiguousarray(i, dtype=np.float32)
                       for i in images]
        count = len(self.images)
        if count < 2:
            raise DazooInputError("dataset", "needs at least 2 images to make pairs")
        if not 0 <= float(synth_probability) <= 1:
            raise DazooInputError("dataset", "synth_probability must be in [0, 1]")
        self.synth, self.synth_probability = synth, float(synth_probability)
        label_only = [i for i, image in enumerate(self.images) if image is None]
        if label_only and synth is None:
            raise DazooInputError("dataset", "a subject without an image needs synth= "
                                             "(its image is synthesised from its label map)")
        raw = list(labels) if labels is not None else [None] * count
        if len(raw) != count:
            raise DazooInputError("dataset", "labels must have one entry (or None) per image")
        if any(raw[i] is None for i in label_only):
            raise DazooInputError("dataset", "a subject needs an image or a label map")
        if len(label_only) == count:
            raise DazooInputError("dataset", "needs at least one real image")
        shapes = {np.shape(i) for i in self.images if i is not None}
        shape = next(iter(shapes))
        if len(shape) != 3 or len(shapes) != 1:
            raise DazooInputError("dataset", "images must all be 3D arrays of one shape")
        self.names = [str(n) for n in (names if names is not None else range(count))]
        if len(self.names) != count:
            raise DazooInputError("dataset", "names must have one entry per image")
        for name, item in zip(self.names, raw):
            if item is not None and np.shape(item) != shape:
                raise DazooInputError(name, f"label map shape {np.shape(item)} is not {shape}")
        self.label_map = label_map or LabelMap.from_labels([r for r in raw if r is not None])
        self.seed = int(seed)
        has_image = [i not in label_only for i in range(count)]
        # k (and the default) choose among the real images; label maps are always labelled.
        self.labelled = sorted(set(_choose_labelled(
            [r is not None and (has_image[i] or labelled is not None) for i, r in enumerate(raw)],
            self.names, labelled, k, self.seed)) | set(label_only))
        self.classes = [
            self._classes(raw[i], self.names[i]) if i in self.labelled else None
            for i in range(count)
        ]
        # The raw ids of the maps that may be synthesised from (each id its own tissue).
        self.raw_labels = [np.asarray(raw[i]) if synth is not None and i in self.labelled
                           else None for i in range(count)]
        self.batch_size = _positive(batch_size, "batch_size")
        self.steps_per_epoch = _positive(steps_per_epoch, "steps_per_epoch")
        if labelled_fraction is not None and not 0 <= labelled_fraction <= 1:
            raise DazooInputError("dataset", "labelled_fraction must be in [0, 1]")
        self.labelled_fraction = labelled_fraction
        if map_fraction is not None and not 0 <= map_fraction <= 1:
            raise DazooInputError("dataset", "map_fraction must be in [0, 1]")
        self.map_fraction = map_fraction
        self.label_only = set(label_only)
        self.augment = augment
        self.schedule = schedule
        unknown = sorted(set(augment_phases) - set(NETWORKS))
        if unknown:
            raise DazooInputError("dataset", f"unknown augment_phases {unknown}")
        if schedule is None and set(augment_phases) != set(NETWORKS):
            raise DazooInputError("dataset", "augment_phases needs a schedule")
        if (schedule is not None and schedule.shared
                and set(augment_phases) not in (set(), set(NETWORKS))):
            raise DazooInputError("dataset", "simultaneous training shares each batch between "
                                             "both networks: augment_phases must list both "
                                             "phases or none")
        self.augment_phases = tuple(augment_phases)
        self.epoch = 0

    def _classes(self, labels, name):
        classes = self.label_map.to_classes(labels, source=name)
        dtype = np.uint8 if self.label_map.num_classes <= 256 else np.int32
        return classes.astype(dtype)

    @classmethod
    def from_subjects(cls, subjects: Sequence[Subject], preprocessor: Preprocessor, *,
                      cache: VolumeCache | None = None,
                      cache_folder: str | os.PathLike | None = None,
                      **kwargs) -> PairDataset:
        """Preprocess (once, through the cache) and build the dataset.

        Label maps are read only for the subjects that keep them (``labelled``/``k``
        are applied to the subjects with a label file, before any is read).
        """
        cache = cache or VolumeCache(preprocessor, folder=cache_folder)
        names = [s.name for s in subjects]
        keep = set(_choose_labelled([s.labels is not None and s.image is not None
                                     for s in subjects], names,
                                    kwargs.pop("labelled", None), kwargs.pop("k", None),
                                    int(kwargs.get("seed", 0))))
        keep |= {i for i, s in enumerate(subjects) if s.image is None}
        entries = [cache.get(s, with_labels=i in keep) for i, s in enumerate(subjects)]
        images = [None if e.preprocessed is None else e.preprocessed.array for e in entries]
        labels = [e.labels if i in keep else None for i, e in enumerate(entries)]
        return cls(images, labels, names=names, labelled=sorted(keep), **kwargs)

    # ------------------------------------------------------------------ PyDataset
    def __len__(self) -> int:
        return self.steps_per_epoch

    def on_epoch_end(self):
        self.epoch += 1

    def step(self, index: int, epoch: int | None = None) -> int:
        """The training step that batch ``index`` of ``epoch`` (default: the current) is."""
        return (self.epoch if epoch is None else epoch) * self.steps_per_epoch + int(index)

    def updates(self, index: int, epoch: int | None = None) -> frozenset[str] | None:
        """The networks that batch ``index``'s step updates (:meth:`Schedule.updates`; None
        without a schedule)."""
        return None if self.schedule is None else self.schedule.updates(self.step(index, epoch))

    def pairs(self, index: int, epoch: int | None = None) -> list[tuple[int, int]]:
        """The ``(moving, fixed)`` subject indices of batch ``index``."""
        rng = self._rng(index, epoch)
        updates = self.updates(index, epoch)
        return [self._pair(rng, updates) for _ in range(self.batch_size)]

    def _rng(self, index, epoch):
        return np.random.default_rng([self.seed, 0, self.epoch if epoch is None else epoch, index])

    def _pair(self, rng, updates=None) -> tuple[int, int]:
        everyone = list(range(len(self.images)))
        if updates and SEGMENTATION in updates and self.labelled and len(self.labelled) < len(everyone):
            # Every segmentation step gets a supervised target: a labelled anchor, on either
            # side, with any other image.
            anchor = self._by_source(rng, list(self.labelled))
            other = self._by_source(rng, [i for i in everyone if i != anchor])
            return (anchor, other) if rng.random() < 0.5 else (other, anchor)
        moving = self._draw(rng, everyone)
        others = [i for i in everyone if i != moving]
        return moving, self._draw(rng, others)

    def _by_source(self, rng, pool) -> int:
        """One of ``pool``: from its label maps with probability ``map_fraction``, else from
        its real images (uniform over ``pool`` without ``map_fraction``)."""
        return int(rng.choice(self._source_pool(rng, pool)))

    def _source_pool(self, rng, pool) -> list[int]:
        if self.map_fraction is not None:
            maps = [i for i in pool if i in self.label_only]
            real = [i for i in pool if i not in self.label_only]
            if maps and real:
                return maps if rng.random() < self.map_fraction else real
        return pool

    def _draw(self, rng, pool) -> int:
        pool = self._source_pool(rng, pool)
        if self.labelled_fraction is not None:
            labelled = [i for i in pool if i in self.labelled]
            unlabelled = [i for i in pool if i not in self.labelled]
            if labelled and unlabelled:
                pool = labelled if rng.random() < self.labelled_fraction else unlabelled
        return int(rng.choice(pool))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range (0..{len(self) - 1})")
        return self._batch(index, self.epoch)

    def at_step(self, step: int) -> dict[str, np.ndarray]:
        """The batch of training step ``step``: batch ``step % steps_per_epoch`` of epoch
        ``step // steps_per_epoch``, whatever the current epoch."""
        epoch, index = divmod(int(step), self.steps_per_epoch)
        return self._batch(index, epoch)

    def steps(self, start: int, stop: int) -> keras.utils.PyDataset:
        """The batches of training steps ``start..stop-1`` as one PyDataset (item ``i`` is
        step ``start + i``), for ``fit(..., steps_per_epoch=n, shuffle=False)``: Keras then
        keeps one iterator across its epochs, so no epoch counter (nor its timing relative
        to prefetching) decides which batch a step gets; a resumed run at ``start`` sees the
        same batches as an uninterrupted one."""
        return _Steps(self, int(start), int(stop))

    def _batch(self, index: int, epoch: int) -> dict[str, np.ndarray]:
        rng = self._rng(index, epoch)
        updates = self.updates(index, epoch)
        augmented = updates is None or bool(updates & set(self.augment_phases))
        augment = self.augment if augmented else None
        samples, shared = [], []
        for moving, fixed in [self._pair(rng, updates) for _ in range(self.batch_size)]:
            # Both images of a pair are mirrored or neither: the registration network never
            # sees a pair that only a reflection would align.
            flip = bool(augment.flip) and rng.random() < augment.flip if augment else None
            # Synthesised pairs may share their tissue intensities (LabelSynth.pair_contrast;
            # nothing is drawn when it is 0, so older runs draw the same batches).
            share = self.synth is not None and self.synth.pair_contrast
            tissues = (int(rng.integers(2 ** 62))
                       if share and rng.random() < self.synth.pair_contrast else None)
            *first, synth_moving = self._sample(moving, rng, augment, flip, tissues)
            *second, synth_fixed = self._sample(fixed, rng, augment, flip, tissues)
            samples.append((*first, *second))
            # One contrast: two real scans, or two images synthesised with shared intensities.
            shared.append(synth_moving == synth_fixed and (not synth_moving or tissues is not None))
        return make_batch(samples, shared_contrast=shared)

    def _sample(self, subject, rng, augment, flip=None, tissues=None):
        """``(image, classes, synthesised)`` of ``subject`` for one pair."""
        image, classes = self.images[subject], self.classes[subject]
        synthesised = self.raw_labels[subject] is not None and (
            image is None or rng.random() < self.synth_probability)
        if synthesised:
            image, raw = self.synth(self.raw_labels[subject], rng, tissues=tissues)
            classes = self._classes(raw, self.names[subject])
        if augment is not None:
            image, classes = augment(image, classes, rng, flip=flip)
        return image, classes, synthesised


class _Steps(keras.utils.PyDataset):
    """Training steps ``start..stop-1`` of a :class:`PairDataset` (see ``PairDataset.steps``)."""

    def __init__(self, dataset: PairDataset, start: int, stop: int):
        super().__init__()
        if not 0 <= start < stop:
            raise DazooInputError("dataset", f"needs 0 <= start < stop, got {start}, {stop}")
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"step index {index} out of range (0..{len(self) - 1})")
        return self.dataset.at_step(self.start + index)


def _choose_labelled(has_labels: list[bool], names: list[str], labelled, k, seed) -> list[int]:
    """Indices of the subjects that keep their labels (see :class:`PairDataset`)."""
    available = [i for i, has in enumerate(has_labels) if has]
    if labelled is not None and k is not None:
        raise DazooInputError("dataset", "give either labelled= or k=, not both")
    if labelled is not None:
        chosen = sorted({_subject_index(item, names) for item in labelled})
        missing = [names[i] for i in chosen if not has_labels[i]]
        if missing:
            raise DazooInputError("dataset", f"subject(s) {missing} have no label map")
        return chosen
    if k is None:
        return available
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= len(available):
        raise DazooInputError(
            "dataset", f"k must be an int in 0..{len(available)} (subjects with labels)")
    rng = np.random.default_rng([seed, 1])
    return sorted(int(i) for i in rng.choice(available, size=int(k), replace=False))


def _subject_index(item, names) -> int:
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        if 0 <= item < len(names):
            return int(item)
    elif item in names:
        return names.index(item)
    raise DazooInputError("dataset", f"labelled subject {item!r} is not in the dataset")


def _positive(value, name) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DazooInputError("dataset", f"{name} must be a positive int, got {value!r}")
    return int(value)
