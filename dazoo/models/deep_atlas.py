"""DeepAtlas: joint semi-supervised training of a registration and a segmentation network.

Xu & Niethammer, "DeepAtlas: Joint Semi-Supervised Learning of Image Registration and
Segmentation", MICCAI 2019. The two networks are trained alternately, each with its own
optimizer, while the other is held fixed:

* **registration phase** (updates only the registration network): image similarity
  between the fixed and the moved image + smoothness of the flow + anatomy loss ``L_a``, the
  soft Dice between the moving label map warped onto the fixed image and the fixed label
  map. A sample's manual label map is used where it has one, the segmenter's prediction
  where it does not;
* **segmentation phase** (updates only the segmentation network): a supervised loss on
  every labelled image of the pair, plus ``L_a`` on pairs where exactly one image is
  labelled: the warped manual labels against the prediction on the other image, or the
  warped prediction against the other image's manual labels.

Training batches follow the contract of :mod:`dazoo.batch` (:data:`BATCH_KEYS`):
images ``"moving"``/``"fixed"`` ``(batch, D, H, W, 1)``, class maps ``"moving_labels"``/
``"fixed_labels"`` ``(batch, D, H, W)`` and per-sample flags ``"moving_labelled"``/
``"fixed_labelled"`` (1 where the label map is a manual one).
"""
from __future__ import annotations

import contextlib

import keras
from keras import ops

from dazoo import ops as spatial_ops
from dazoo.batch import BATCH_KEYS, MODES, REGISTRATION, SEGMENTATION, Schedule
from dazoo.layers import SpatialTransformer
from dazoo.losses import (DiceCE, Grad, NCC, SoftDice, class_sums, dice_from_sums,
                          soft_dice_scores)

__all__ = ["DeepAtlas", "BATCH_KEYS", "MODES"]

_REGISTRATION_METRICS = ("reg_loss", "reg_similarity", "reg_smoothness", "reg_anatomy")
_SEGMENTATION_METRICS = ("seg_loss", "seg_supervised", "seg_anatomy")
_VALIDATION_METRICS = ("warped_dice", "seg_dice")


def _replicas() -> int:
    """Replicas training in sync (``tf.distribute``), 1 outside a replica context."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return 1 if context is None else int(context.num_replicas_in_sync)


def _global_count(values):
    """``max(sum(values), 1)`` over the whole global batch: all-reduced across the replicas of
    a ``tf.distribute`` strategy, so that each replica's loss is its share of the global
    batch's mean and the optimizers' summed gradients are those of one device with the whole
    batch. Must be called the same number of times on every replica (never inside a branch
    of a ``cond``)."""
    count = ops.stop_gradient(ops.sum(ops.cast(values, "float32")))
    if _replicas() > 1:
        import tensorflow as tf

        count = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM,
                                                               count)
    return ops.maximum(count, 1.0)


def _multi_worker(model) -> bool:
    """Whether ``model`` runs under a ``tf.distribute.MultiWorkerMirroredStrategy``."""
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None:
        return False
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def _masked_mean(per_sample, mask):
    """Mean of per-sample values where ``mask`` is 1 (over the global batch); 0 when the
    mask is empty.

    ``per_sample`` may carry extra axes (e.g. a Keras loss that keeps voxels); they are
    averaged first.
    """
    mask = ops.cast(mask, "float32")
    return _weighted_sum(per_sample, mask, _global_count(mask))


def _no_grad():
    """``torch.no_grad()`` on the torch backend (no graph kept for fixed networks' passes);
    elsewhere a no-op (TensorFlow records nothing outside a tape)."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def _per_sample(values):
    """Averages any axes after the first (a loss that keeps voxels) to one value per sample."""
    values = ops.cast(values, "float32")
    if len(values.shape) > 1:
        values = ops.mean(ops.reshape(values, (ops.shape(values)[0], -1)), axis=-1)
    return values


def _weighted_sum(per_sample, mask, denominator):
    """``sum(per_sample * mask) / denominator``."""
    return ops.sum(_per_sample(per_sample) * ops.cast(mask, "float32")) / denominator


def _sum_parts(parts):
    """Adds ``(total, terms)`` pairs term by term."""
    total = parts[0][0]
    terms = dict(parts[0][1])
    for part_total, part_terms in parts[1:]:
        total = total + part_total
        terms = {key: terms[key] + part_terms[key] for key in terms}
    return total, terms


def _masked_mean_if_any(per_sample_fn, mask):
    """``_masked_mean(per_sample_fn(), mask)``, without computing it when the mask is empty."""
    count = _global_count(mask)  # outside the cond: every replica all-reduces
    return ops.cond(ops.any(mask > 0), lambda: _weighted_sum(per_sample_fn(), mask, count),
                    lambda: ops.zeros((), dtype="float32"))


def _present_mean_dice(truth, prediction):
    """Per-sample mean Dice over the foreground classes present in either one-hot map."""
    axes = tuple(range(1, len(truth.shape) - 1))
    scores = soft_dice_scores(truth, prediction, include_background=False)
    present = ops.cast(ops.sum(truth[..., 1:] + prediction[..., 1:], axis=axes) > 0, "float32")
    return ops.sum(scores * present, axis=-1) / ops.maximum(ops.sum(present, axis=-1), 1.0)


def _exactly_one(batch):
    """Per-sample 1 where exactly one image of the pair is labelled."""
    moving, fixed = batch["moving_labelled"], batch["fixed_labelled"]
    return moving + fixed - 2.0 * moving * fixed


def _select(flag, labelled, predicted):
    """Per sample: the manual label map where ``flag`` is 1, else the prediction."""
    flag = ops.reshape(ops.cast(flag, "float32"), (-1,) + (1,) * (len(labelled.shape) - 1))
    return flag * labelled + (1.0 - flag) * predicted


class _Holder:
    """A plain container (not tracked by Keras, so not saved)."""

    def __init__(self, value, head=None):
        self.value, self.head = value, head


@keras.saving.register_keras_serializable(package="dazoo")
class DeepAtlas(keras.Model):
    """Joint registration + segmentation model with alternating two-optimizer training.

    Called on ``[moving, fixed]`` (each ``(batch, D, H, W, 1)``) it returns a dict:
    ``"moved"`` and ``"displacement"`` (from the registration network, displacement in
    voxels), ``"moving_segmentation"`` and ``"fixed_segmentation"`` (class probabilities
    ``(batch, D, H, W, K)``) and ``"moved_segmentation"`` (the moving probabilities warped
    onto the fixed image).

    ``fit`` takes batches of the dict format described in :mod:`dazoo.models.deep_atlas`
    (e.g. from :class:`dazoo.training.PairDataset`). Each training step is either a
    registration step or a segmentation step, on a fixed cycle of ``registration_steps``
    registration steps followed by ``segmentation_steps`` segmentation steps (counted from
    the two optimizers' iterations, so it resumes where it stopped).

    Args:
        registration_net: a :class:`~dazoo.RegistrationNet`.
        segmentation_net: a :class:`~dazoo.SegmentationNet` on the same grid.
        mode: ``"joint"`` (DeepAtlas, strictly alternating), ``"simultaneous"`` (every step
            updates both networks from one forward pass of each on the same batch: the
            registration network's ``L_a`` targets and the segmenter's warp come from the
            networks as they were before this step, not after the other's update, and the
            segmenter's predictions used as targets are computed with ``training=True``; about
            a third fewer network passes per update of each, at the memory of both networks'
            activations at once; ``registration_steps``/``segmentation_steps`` are not used),
            ``"registration_only"`` (only registration steps;
            the anatomy loss uses manual labels only, on pairs where both are labelled, as
            VoxelMorph's semi-supervised training; set ``anatomy_weight=0`` in ``compile``
            for unsupervised training) or ``"segmentation_only"`` (only supervised
            segmentation steps). The three share one code path, so the paper's baselines are
            fair comparisons.
        registration_steps: registration steps per cycle.
        segmentation_steps: segmentation steps per cycle.

    Example:
    >>> model = DeepAtlas(RegistrationNet(shape), SegmentationNet(shape, num_classes=4))
    >>> model.compile(reg_optimizer=keras.optimizers.Adam(1e-4),
    ...               seg_optimizer=keras.optimizers.Adam(1e-3))
    >>> model.fit(pair_dataset, epochs=10)
    """

    def __init__(
        self,
        registration_net: keras.Model,
        segmentation_net: keras.Model,
        *,
        mode: str = "joint",
        registration_steps: int = 8,
        segmentation_steps: int = 1,
        name: str = "deep_atlas",
        **kwargs,
    ):
        Schedule(mode, registration_steps, segmentation_steps)  # checks the three
        reg_shape = tuple(registration_net.inputs[0].shape[1:-1])
        seg_shape = tuple(segmentation_net.inputs[0].shape[1:-1])
        if reg_shape != seg_shape:
            raise ValueError(f"the networks' grids differ: registration {reg_shape}, "
                             f"segmentation {seg_shape}")

        # === Functional model ===
        moving = keras.Input(shape=(*reg_shape, registration_net.inputs[0].shape[-1]),
                             name="moving")
        fixed = keras.Input(shape=(*reg_shape, registration_net.inputs[1].shape[-1]),
                            name="fixed")
        registration = registration_net([moving, fixed])
        moving_segmentation = segmentation_net(moving)
        fixed_segmentation = segmentation_net(fixed)
        moved_segmentation = SpatialTransformer(name="label_transformer")(
            [moving_segmentation, registration["displacement"]]
        )
        super().__init__(
            inputs=[moving, fixed],
            outputs={
                "moved": registration["moved"],
                "displacement": registration["displacement"],
                "moving_segmentation": moving_segmentation,
                "fixed_segmentation": fixed_segmentation,
                "moved_segmentation": moved_segmentation,
            },
            name=name,
            **kwargs,
        )

        # === Config ===
        self.registration_net = registration_net
        self.segmentation_net = segmentation_net
        self.mode = mode
        self.registration_steps = int(registration_steps)
        self.segmentation_steps = int(segmentation_steps)
        self.num_classes = int(segmentation_net.outputs[0].shape[-1])
        self._trackers = {
            name: keras.metrics.Mean(name=name)
            for name in _REGISTRATION_METRICS + _SEGMENTATION_METRICS + _VALIDATION_METRICS
        }

    # ------------------------------------------------------------------ config
    def get_config(self):
        return {
            **super().get_config(),  # name, trainable, dtype
            "registration_net": keras.saving.serialize_keras_object(self.registration_net),
            "segmentation_net": keras.saving.serialize_keras_object(self.segmentation_net),
            "mode": self.mode,
            "registration_steps": self.registration_steps,
            "segmentation_steps": self.segmentation_steps,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("registration_net", "segmentation_net"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)

    @classmethod
    def from_preset(cls, preset, **kwargs) -> DeepAtlas:
        """The joint model of a preset, with its weights, ready to ``compile`` and ``fit``.

        keras-hub style: ``preset`` is a shipped preset's name (``"brain"``) or a preset
        folder (e.g. one written by ``dazoo export`` / ``dazoo finetune``). The weights are
        checked against the model card's sha256. The preset's preprocessing and label table
        come with the model as attributes: ``model.preset`` (:class:`dazoo.presets.Preset`),
        ``model.preprocessor`` (:class:`dazoo.preprocess.Preprocessor`, its template
        included) and ``model.label_table`` (``[{"class", "id", "name"}, ...]``).

        Args:
            preset: str, path or :class:`dazoo.presets.Preset`.
            **kwargs: overrides of the saved config (e.g. ``mode="segmentation_only"``).

        Example:
        >>> model = DeepAtlas.from_preset("brain")
        >>> model.compile(reg_optimizer=keras.optimizers.Adam(1e-4),
        ...               seg_optimizer=keras.optimizers.Adam(1e-4))
        """
        from dazoo.preprocess import Preprocessor
        from dazoo.presets import Preset, get_preset

        preset = preset if isinstance(preset, Preset) else get_preset(preset)
        preset.verify()
        config = dict(preset.read_json("config.json")["model"], **kwargs)
        model = cls.from_config(config)
        model.load_weights(preset.file("model.weights.h5"))
        model.preset = preset
        model.preprocessor = Preprocessor(preset.read_json("preprocess.json"), root=preset.path)
        model.label_table = sorted(preset.read_json("labels.json")["classes"],
                                   key=lambda c: c["class"])
        return model

    # ------------------------------------------------------------------ compile
    def compile(
        self,
        *,
        reg_optimizer: keras.optimizers.Optimizer | str = "adam",
        seg_optimizer: keras.optimizers.Optimizer | str = "adam",
        similarity_loss: keras.losses.Loss | None = None,
        smoothness_loss: keras.losses.Loss | None = None,
        anatomy_loss: keras.losses.Loss | None = None,
        segmentation_loss: keras.losses.Loss | None = None,
        smoothness_weight: float = 1.0,
        anatomy_weight: float = 1.0,
        supervised_weight: float = 1.0,
        segmentation_anatomy_weight: float = 1.0,
        jit_compile: bool | str = False,
        steps_per_execution: int = 1,
        recompute: int = 0,
    ):
        """Configures training with one optimizer per network.

        Args:
            reg_optimizer: optimizer of the registration network (applied only to its
                variables).
            seg_optimizer: optimizer of the segmentation network.
            similarity_loss: image similarity of ``(fixed, moved)``; default local
                :class:`~dazoo.losses.NCC` (window 9).
            smoothness_loss: regulariser of the registration network's ``"flow"``; default
                :class:`~dazoo.losses.Grad` (``"l2"``).
            anatomy_loss: between label maps / probabilities (``L_a``); default
                :class:`~dazoo.losses.SoftDice` without background.
            segmentation_loss: supervised loss of the segmenter on labelled images; default
                :class:`~dazoo.losses.DiceCE`.
            smoothness_weight: weight of the smoothness loss (registration phase).
            anatomy_weight: weight of ``L_a`` in the registration phase.
            supervised_weight: weight of the supervised loss (segmentation phase).
            segmentation_anatomy_weight: weight of ``L_a`` in the segmentation phase.
            jit_compile: XLA compilation of the train step (TensorFlow).
            steps_per_execution: training steps per compiled call.
            recompute: gradient checkpointing in the training steps: the activations of both
                U-Nets' ``recompute`` finest resolution levels are recomputed in the backward
                pass instead of kept (``keras.remat``; see :func:`dazoo.models.unet.unet`).
                The same losses and gradients, less memory, one more forward pass of those
                levels per step. 0 (default) keeps everything.
        """
        if int(recompute) < 0:
            raise ValueError(f"recompute must be >= 0, got {recompute}")
        if "mixed_float16" in (keras.config.dtype_policy().name,
                               self.segmentation_net.dtype_policy.name,
                               self.registration_net.dtype_policy.name):
            raise ValueError(
                "DeepAtlas does not scale losses for float16; use 'mixed_bfloat16' (e.g. "
                "SegmentationNet(..., dtype='mixed_bfloat16')) instead of 'mixed_float16'")
        super().compile(optimizer=None, jit_compile=jit_compile,
                        steps_per_execution=steps_per_execution)
        self.reg_optimizer = keras.optimizers.get(reg_optimizer)
        self.seg_optimizer = keras.optimizers.get(seg_optimizer)
        if self.reg_optimizer is self.seg_optimizer:
            raise ValueError("reg_optimizer and seg_optimizer must be two distinct optimizers")
        self.reg_optimizer.build(self.registration_net.trainable_variables)
        self.seg_optimizer.build(self.segmentation_net.trainable_variables)
        self.similarity_loss = similarity_loss if similarity_loss is not None else NCC()
        self.smoothness_loss = smoothness_loss if smoothness_loss is not None else Grad("l2")
        self.anatomy_loss = anatomy_loss if anatomy_loss is not None else SoftDice(False)
        self.segmentation_loss = segmentation_loss if segmentation_loss is not None else DiceCE()
        self.smoothness_weight = float(smoothness_weight)
        self.anatomy_weight = float(anatomy_weight)
        self.supervised_weight = float(supervised_weight)
        self.segmentation_anatomy_weight = float(segmentation_anatomy_weight)
        self.recompute = int(recompute)
        self._dazoo_compile_config = {
            "smoothness_weight": self.smoothness_weight,
            "anatomy_weight": self.anatomy_weight,
            "supervised_weight": self.supervised_weight,
            "segmentation_anatomy_weight": self.segmentation_anatomy_weight,
            "jit_compile": jit_compile,
            "steps_per_execution": steps_per_execution,
            "recompute": self.recompute,
        }

    def get_compile_config(self):
        if not getattr(self, "compiled", False):
            return None
        serialize = keras.saving.serialize_keras_object
        return {
            "reg_optimizer": serialize(self.reg_optimizer),
            "seg_optimizer": serialize(self.seg_optimizer),
            "similarity_loss": serialize(self.similarity_loss),
            "smoothness_loss": serialize(self.smoothness_loss),
            "anatomy_loss": serialize(self.anatomy_loss),
            "segmentation_loss": serialize(self.segmentation_loss),
            **self._dazoo_compile_config,
        }

    def compile_from_config(self, config):
        deserialize = keras.saving.deserialize_keras_object
        config = dict(config)
        for key in ("reg_optimizer", "seg_optimizer", "similarity_loss", "smoothness_loss",
                    "anatomy_loss", "segmentation_loss"):
            config[key] = deserialize(config[key])
        self.compile(**config)

    @property
    def metrics(self):
        return list(self._trackers.values())

    # ------------------------------------------------------------------ losses
    def _pass(self, net, inputs, *, training):
        """``net``'s outputs in a training pass, with the compiled ``recompute`` when the
        network supports it (``recomputed``)."""
        recompute = getattr(self, "recompute", 0)
        if recompute and hasattr(net, "recomputed"):
            return net.recomputed(inputs, training=training, recompute=recompute)
        return net(inputs, training=training)

    def _features(self, image, *, training):
        """The segmenter's head input (fused segmentation phase; ``recompute`` as above)."""
        net, recompute = self.segmentation_net, getattr(self, "recompute", 0)
        if recompute and hasattr(net, "unet_features"):
            return net.unet_features(image, training=training, recompute=recompute)
        return self._segmentation_features()(image, training=training)

    def _unpack(self, data):
        if isinstance(data, (tuple, list)):
            data = data[0]
        missing = [key for key in BATCH_KEYS if key not in data]
        if missing:
            raise ValueError(f"DeepAtlas batches need the keys {BATCH_KEYS}; missing {missing}")
        batch = dict(data)
        for key in ("moving", "fixed", "moving_labelled", "fixed_labelled"):
            batch[key] = ops.cast(batch[key], "float32")
        for side in ("moving", "fixed"):
            batch[f"{side}_classes"] = ops.cast(batch[f"{side}_labels"], "int32")
            batch[f"{side}_labels"] = ops.one_hot(batch[f"{side}_classes"], self.num_classes)
        return batch

    def _anatomy(self, moving_segmentation, fixed_segmentation, displacement):
        """Per-sample ``L_a``: fixed label map vs the moving one warped onto it."""
        moved = spatial_ops.warp(moving_segmentation, displacement)
        return self.anatomy_loss.call(fixed_segmentation, moved)

    def _manual_anatomy(self, moving_classes, fixed_segmentation, displacement):
        """``L_a`` with manual moving labels, any anatomy loss: the warped one-hot map built
        by :func:`dazoo.ops.warped_one_hot` (a scatter of the corner weights, equal to
        warping the ``K`` one-hot channels)."""
        moved = spatial_ops.warped_one_hot(moving_classes, displacement, self.num_classes)
        return self.anatomy_loss.call(fixed_segmentation, moved)

    def _adjoint_anatomy(self, moving_segmentation, batch, displacement):
        """Segmentation-phase ``L_a`` with manual fixed labels, gradient to the moving
        prediction only (the displacement is fixed): for the default
        :class:`~dazoo.losses.SoftDice`, the soft-Dice sums are linear in the prediction,
        ``sum_y p_k(y) A_k(y)`` with the adjoint warp of the fixed labels
        (:func:`dazoo.ops.warp_adjoint_labels`), so the ``K`` probability channels are not
        warped (nor their gradient scattered back). Other losses: the warp."""
        if type(self.anatomy_loss) is not SoftDice:
            return self._anatomy(moving_segmentation, batch["fixed_labels"], displacement)
        adjoint, weight = spatial_ops.warp_adjoint_labels(batch["fixed_classes"], displacement,
                                                          self.num_classes)
        prediction = ops.cast(moving_segmentation, "float32")
        axes = (1, 2, 3)
        intersection = ops.sum(prediction * adjoint, axis=axes)
        moved_sum = ops.sum(prediction * weight[..., None], axis=axes)
        return self._dice_loss_from_sums(intersection,
                                         self._class_counts(batch["fixed_classes"]), moved_sum)

    def _class_counts(self, classes):
        """``(batch, K)`` voxels per class of an integer class map (ids outside ``0..K-1``
        count for no class): the sums of its one-hot map."""
        k = self.num_classes
        valid = ops.logical_and(classes >= 0, classes < k)
        return class_sums(valid, ops.clip(classes, 0, k - 1), k)

    def _dice_loss_from_sums(self, intersection, fixed_sum, moved_sum):
        """The default :class:`~dazoo.losses.SoftDice` ``L_a`` per sample from its sums."""
        dice = dice_from_sums(intersection, fixed_sum, moved_sum)
        if not self.anatomy_loss.include_background:
            dice = dice[:, 1:]
        return 1.0 - ops.mean(dice, axis=-1)

    def _label_overlap_anatomy(self, moving_classes, fixed_segmentation, displacement):
        """Per-sample soft Dice ``L_a`` from manual moving labels (integer classes), computed by
        :func:`dazoo.ops.warped_label_overlap`: the value of warping the ``K`` one-hot
        channels, in memory and time independent of ``K``; differentiable in the displacement
        and in ``fixed_segmentation``."""
        intersection, moved_sum = spatial_ops.warped_label_overlap(
            moving_classes, displacement, fixed_segmentation, self.num_classes)
        fixed_sum = ops.sum(fixed_segmentation, axis=(1, 2, 3))
        return self._dice_loss_from_sums(intersection, fixed_sum, moved_sum)

    def _manual_moving_anatomy(self, fixed_segmentation, displacement, batch):
        """``L_a`` when the moving labels are manual: the label-overlap form for the default
        :class:`~dazoo.losses.SoftDice`, else the warp of the one-hot channels."""
        if type(self.anatomy_loss) is SoftDice:
            return self._label_overlap_anatomy(batch["moving_classes"], fixed_segmentation,
                                               displacement)
        return self._manual_anatomy(batch["moving_classes"], fixed_segmentation, displacement)

    def _registration_anatomy(self, moving_segmentation, fixed_segmentation, displacement,
                              batch):
        """``L_a`` of the registration phase (gradient to the displacement only)."""
        return ops.cond(
            ops.all(batch["moving_labelled"] > 0),
            lambda: self._manual_moving_anatomy(fixed_segmentation, displacement, batch),
            lambda: self._anatomy(moving_segmentation, fixed_segmentation, displacement))

    def _registration_targets(self, batch):
        """Label maps for ``L_a`` in the registration phase, and the samples that use it.

        Computed outside any gradient tape: the segmenter is fixed in this phase. Its
        predictions are only computed for a side of the batch that lacks manual labels.
        """
        if SEGMENTATION not in self.schedule.networks or not self.anatomy_weight:
            mask = batch["moving_labelled"] * batch["fixed_labelled"]
            return batch["moving_labels"], batch["fixed_labels"], mask

        def manual_or_predicted(side):
            labels, flags = batch[f"{side}_labels"], batch[f"{side}_labelled"]

            def predicted():
                with _no_grad():
                    prediction = self.segmentation_net(batch[side], training=False)
                return _select(flags, labels, ops.stop_gradient(prediction))

            return ops.cond(ops.all(flags > 0), lambda: labels, predicted)

        return (manual_or_predicted("moving"), manual_or_predicted("fixed"),
                ops.ones_like(batch["moving_labelled"]))

    def _registration_losses(self, batch, targets, *, training):
        out = self._pass(self.registration_net, [batch["moving"], batch["fixed"]],
                         training=training)
        return self._registration_terms(batch, targets, out)

    def _registration_terms(self, batch, targets, out):
        """The registration loss ``(total, terms)`` of the registration network's outputs
        ``out`` against the ``L_a`` targets of :meth:`_registration_targets`."""
        moving_seg, fixed_seg, anatomy_mask = targets
        similarity = _masked_mean(self.similarity_loss.call(batch["fixed"], out["moved"]),
                                  ops.ones_like(batch["moving_labelled"]))
        smoothness = _masked_mean(self.smoothness_loss.call(out["flow"], out["flow"]),
                                  ops.ones_like(batch["moving_labelled"]))
        if self.anatomy_weight:
            anatomy = _masked_mean_if_any(
                lambda: self._registration_anatomy(moving_seg, fixed_seg, out["displacement"],
                                                   batch),
                anatomy_mask)
        else:
            anatomy = ops.zeros(())
        total = similarity + self.smoothness_weight * smoothness + self.anatomy_weight * anatomy
        return total, dict(zip(_REGISTRATION_METRICS, (total, similarity, smoothness, anatomy)))

    def _segmentation_displacement(self, batch):
        """The fixed registration network's displacement, outside any gradient tape.

        Zeros (without running the network) when no pair of the batch has exactly one
        labelled image, since ``L_a`` is then masked out.
        """
        if (self.schedule.networks != {REGISTRATION, SEGMENTATION}
                or not self.segmentation_anatomy_weight):
            return None
        moving, fixed = batch["moving"], batch["fixed"]

        def register():
            with _no_grad():
                out = self.registration_net([moving, fixed], training=False)
            return ops.stop_gradient(out["displacement"])

        def identity():
            return ops.repeat(ops.zeros_like(moving[..., :1]), 3, axis=-1)

        return ops.cond(ops.any(_exactly_one(batch) > 0), register, identity)

    def _segmentation_side(self, batch, displacement, side, *, training, prediction=None):
        """The part of the segmentation loss that depends on the prediction for ``side``.

        The segmentation loss is a sum of two such parts, one per image of the pair: the
        supervised loss of each labelled image, and ``L_a`` on pairs with exactly one labelled
        image, which depends only on the unlabelled image's prediction (the manual side enters
        as a constant). Their gradients can thus be taken one image at a time, which halves
        the peak memory of a segmentation step. ``prediction``: the segmenter's output for
        ``side`` when it is already computed (the simultaneous step), else it is run here.
        """
        if prediction is None and self._fused_segmentation():
            return self._fused_segmentation_side(batch, displacement, side, training=training)
        other = "fixed" if side == "moving" else "moving"
        flags = batch[f"{side}_labelled"]
        if prediction is None:
            prediction = self._pass(self.segmentation_net, batch[side], training=training)
        labelled_count = _global_count(
            ops.concatenate([batch["moving_labelled"], batch["fixed_labelled"]], axis=0))
        supervised = _weighted_sum(self._supervised(batch, side, prediction), flags,
                                   labelled_count)
        if displacement is not None:
            # This side unlabelled, the other labelled: the other's manual labels against
            # this side's prediction.
            mask = (1.0 - flags) * batch[f"{other}_labelled"]
            if side == "moving":
                def per_sample():
                    return self._adjoint_anatomy(prediction, batch, displacement)
            else:
                def per_sample():
                    return self._manual_anatomy(batch["moving_classes"], prediction,
                                                displacement)
            return self._segmentation_terms(batch, supervised, mask, per_sample)
        return self._segmentation_terms(batch, supervised)

    def _segmentation_terms(self, batch, supervised, mask=None, per_sample_anatomy=None):
        """``(total, terms)`` of one side: its supervised part and, on the pairs of ``mask``
        (exactly one image labelled), ``L_a`` from ``per_sample_anatomy()``, only computed
        when some pair needs it."""
        if mask is None:
            anatomy = ops.zeros(())
        else:
            pairs_count = _global_count(_exactly_one(batch))  # outside the cond (replicas)
            anatomy = ops.cond(
                ops.any(mask > 0),
                lambda: _weighted_sum(per_sample_anatomy(), mask, pairs_count),
                lambda: ops.zeros((), dtype="float32"))
        total = self.supervised_weight * supervised + self.segmentation_anatomy_weight * anatomy
        return total, dict(zip(_SEGMENTATION_METRICS, (total, supervised, anatomy)))

    def _fused_segmentation(self) -> bool:
        """Whether the segmentation phase computes its losses from the segmenter's features
        with :func:`dazoo.ops.softmax_class_sums` (TensorFlow, default losses, a SegmentationNet
        with its ``"logits"`` head): the ``K``-channel probabilities and their gradients exist
        one chunk at a time instead of for the whole volume. Same values and gradients."""
        return (keras.backend.backend() == "tensorflow"
                and type(self.segmentation_loss) is DiceCE
                and type(self.anatomy_loss) is SoftDice
                and getattr(self, "fused_segmentation", True)
                and self._segmentation_features() is not None)

    def _segmentation_features(self):
        """The segmenter up to its head's input (the same layers), or None without a
        ``"logits"`` 1x1x1 convolution + softmax head. Kept outside Keras's tracking (a
        plain holder), so the saved weights are the same as without it."""
        holder = self.__dict__.get("_features_holder")
        if holder is None:
            net = self.segmentation_net
            names = [layer.name for layer in net.layers]
            head = net.get_layer("logits") if "logits" in names else None
            ok = (head is not None and names[-1] == "probabilities"
                  and tuple(head.kernel.shape[:3]) == (1, 1, 1) and head.use_bias
                  and head.activation is keras.activations.linear)
            model = keras.Model(net.inputs, head.input, name="segmentation_features") if ok \
                else None
            holder = _Holder(model, head)
            object.__setattr__(self, "_features_holder", holder)
        return holder.value

    def _fused_segmentation_side(self, batch, displacement, side, *, training, features=None):
        """:meth:`_segmentation_side` from :func:`dazoo.ops.softmax_class_sums`: the
        supervised :class:`~dazoo.losses.DiceCE` and the :class:`~dazoo.losses.SoftDice`
        ``L_a`` from per-class sums (the warped manual labels as interpolation corners, or
        the adjoint warp of the other side's labels), equal to the unfused losses."""
        other = "fixed" if side == "moving" else "moving"
        flags = batch[f"{side}_labelled"]
        k = self.num_classes
        if features is None:
            features = self._features(batch[side], training=training)
        head = self.__dict__["_features_holder"].head
        kernel, bias = ops.convert_to_tensor(head.kernel), ops.convert_to_tensor(head.bias)
        classes = batch[f"{side}_classes"]
        n_vox = 1
        for size in classes.shape[1:]:
            n_vox *= int(size)
        flat = ops.reshape(classes, (-1, n_vox))
        valid = ops.cast(ops.logical_and(flat >= 0, flat < k), "float32")
        labelled_count = _global_count(
            ops.concatenate([batch["moving_labelled"], batch["fixed_labelled"]], axis=0))
        loss = self.segmentation_loss
        sums = spatial_ops.softmax_class_sums(
            features, kernel, bias, sparse=[(flat[..., None], valid[..., None])],
            log_classes=classes, epsilon=loss._ce.epsilon)
        per_sample = loss.from_sums(sums["sparse"][0], self._class_counts(classes),
                                    sums["sum"], sums["log_likelihood"] / float(n_vox))
        supervised = _weighted_sum(per_sample, flags, labelled_count)
        if displacement is not None:
            mask = (1.0 - flags) * batch[f"{other}_labelled"]

            def per_sample_anatomy():
                if side == "fixed":  # the moving image's manual labels, warped
                    labels, weights = spatial_ops.warped_label_corners(
                        batch["moving_classes"], displacement, k)
                    parts = spatial_ops.softmax_class_sums(features, kernel, bias,
                                                           sparse=[(labels, weights)])
                    moved_sum = spatial_ops._class_scatter(weights, labels, k)
                    return self._dice_loss_from_sums(parts["sparse"][0], parts["sum"],
                                                     moved_sum)
                adjoint, weight = spatial_ops.warp_adjoint_labels(
                    batch["fixed_classes"], displacement, k)
                parts = spatial_ops.softmax_class_sums(features, kernel, bias, dense=adjoint,
                                                       weight=weight)
                return self._dice_loss_from_sums(
                    parts["dense"], self._class_counts(batch["fixed_classes"]),
                    parts["weighted"])

            return self._segmentation_terms(batch, supervised, mask, per_sample_anatomy)
        return self._segmentation_terms(batch, supervised)

    def _supervised(self, batch, side, prediction):
        """Per-sample supervised loss of ``side``'s prediction against its label map (the
        default :class:`~dazoo.losses.DiceCE` from the integer classes: no one-hot map)."""
        if type(self.segmentation_loss) is DiceCE:
            return self.segmentation_loss.call_on_classes(batch[f"{side}_classes"], prediction)
        return self.segmentation_loss.call(batch[f"{side}_labels"], prediction)

    def _segmentation_losses(self, batch, displacement, *, training):
        parts = [self._segmentation_side(batch, displacement, side, training=training)
                 for side in ("moving", "fixed")]
        return _sum_parts(parts)

    # ------------------------------------------------------------------ steps
    def _optimize(self, loss_fns, network, optimizer, *, after=()):
        """Applies the summed gradient of ``loss_fns`` to ``network``'s variables only.

        Each function returns ``(total, terms)``; their gradients are taken one after the
        other (so only one function's activations are alive at a time) and summed. In a
        TensorFlow graph, explicit control dependencies enforce that order, and start the
        first function only once the tensors ``after`` (e.g. a fixed network's outputs) are
        computed: otherwise the executor may run independent passes side by side and hold
        all their activations at once.
        """
        variables = network.trainable_variables
        backend = keras.backend.backend()
        parts = []
        if backend == "tensorflow":
            import tensorflow as tf

            gradients = None
            dependencies = [t for t in keras.tree.flatten(after) if t is not None]
            for loss_fn in loss_fns:
                with tf.control_dependencies(dependencies):
                    with tf.GradientTape() as tape:
                        parts.append(loss_fn())
                    part = tape.gradient(parts[-1][0], variables)
                dependencies = [g for g in part if g is not None]
                gradients = part if gradients is None else [
                    g if h is None else (h if g is None else g + h)
                    for g, h in zip(gradients, part)]
            optimizer.apply(gradients, variables)
        elif backend == "torch":
            import torch

            for variable in variables:
                variable.value.grad = None
            for loss_fn in loss_fns:
                parts.append(loss_fn())
                parts[-1][0].backward()  # gradients accumulate in .grad
            with torch.no_grad():
                optimizer.apply([v.value.grad for v in variables], variables)
        else:
            raise NotImplementedError(
                f"DeepAtlas training supports the tensorflow and torch backends, not {backend!r}"
            )
        total, terms = _sum_parts(parts)
        self._update_trackers(terms)
        return total

    def _registration_step(self, batch):
        targets = self._registration_targets(batch)
        return self._optimize(
            [lambda: self._registration_losses(batch, targets, training=True)],
            self.registration_net, self.reg_optimizer, after=targets,
        )

    def _segmentation_step(self, batch):
        displacement = self._segmentation_displacement(batch)
        return self._optimize(
            [lambda side=side: self._segmentation_side(batch, displacement, side, training=True)
             for side in ("moving", "fixed")],
            self.segmentation_net, self.seg_optimizer, after=displacement,
        )

    def _simultaneous_losses(self, batch):
        """Both networks' losses from one forward pass of each (``mode="simultaneous"``).

        The registration network runs once on the pair and the segmenter once per image; the
        registration loss takes the segmenter's predictions (gradient stopped) as its ``L_a``
        targets where an image has no manual labels, and the segmentation loss takes the
        displacement (gradient stopped) for its ``L_a``. Returns the two totals and the
        metrics of both.
        """
        out = self._pass(self.registration_net, [batch["moving"], batch["fixed"]],
                         training=True)
        fused = self._fused_segmentation()
        if fused:
            # One pass of the segmenter's body per image; the registration loss's targets are
            # its probabilities without gradient, the segmentation loss is computed from the
            # features (dazoo.ops.softmax_class_sums).
            net = self.segmentation_net
            features = {side: self._features(batch[side], training=True)
                        for side in ("moving", "fixed")}
            predictions = {side: ops.stop_gradient(net.get_layer("probabilities")(
                net.get_layer("logits")(features[side]))) for side in ("moving", "fixed")}
        else:
            predictions = {side: self._pass(self.segmentation_net, batch[side], training=True)
                           for side in ("moving", "fixed")}
        if self.anatomy_weight:
            targets = tuple(_select(batch[f"{side}_labelled"], batch[f"{side}_labels"],
                                    ops.stop_gradient(predictions[side]))
                            for side in ("moving", "fixed"))
            targets += (ops.ones_like(batch["moving_labelled"]),)
        else:
            targets = (batch["moving_labels"], batch["fixed_labels"],
                       ops.zeros_like(batch["moving_labelled"]))
        reg_total, reg_terms = self._registration_terms(batch, targets, out)
        displacement = (ops.stop_gradient(out["displacement"])
                        if self.segmentation_anatomy_weight else None)
        seg_total, seg_terms = _sum_parts([
            self._fused_segmentation_side(batch, displacement, side, training=True,
                                          features=features[side]) if fused else
            self._segmentation_side(batch, displacement, side, training=True,
                                    prediction=predictions[side])
            for side in ("moving", "fixed")])
        return reg_total, seg_total, {**reg_terms, **seg_terms}

    def _simultaneous_step(self, batch):
        """One update of each network from shared forward passes: the gradient of the sum of
        the two losses, taken once, splits into each network's own gradient (each loss reaches
        the other network only through a stopped gradient); each optimizer applies its part."""
        reg_variables = self.registration_net.trainable_variables
        seg_variables = self.segmentation_net.trainable_variables
        variables = reg_variables + seg_variables
        backend = keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                reg_total, seg_total, terms = self._simultaneous_losses(batch)
                total = reg_total + seg_total
            gradients = tape.gradient(total, variables)
        elif backend == "torch":
            import torch

            for variable in variables:
                variable.value.grad = None
            reg_total, seg_total, terms = self._simultaneous_losses(batch)
            total = reg_total + seg_total
            total.backward()
            gradients = [v.value.grad for v in variables]
        else:
            raise NotImplementedError(
                f"DeepAtlas training supports the tensorflow and torch backends, not {backend!r}"
            )
        count = len(reg_variables)
        with _no_grad():
            self.reg_optimizer.apply(gradients[:count], reg_variables)
            self.seg_optimizer.apply(gradients[count:], seg_variables)
        self._update_trackers(terms)
        return total

    @property
    def schedule(self) -> Schedule:
        """Which networks each step updates (shared with the datasets, which draw labelled
        images for segmentation steps, and with the training engine)."""
        return Schedule(self.mode, self.registration_steps, self.segmentation_steps)

    def is_registration_turn(self):
        """Whether the next training step is a registration step (a boolean tensor)."""
        if not self.schedule.alternates:
            return ops.convert_to_tensor(self.schedule.networks == {REGISTRATION})
        done = ops.cast(self.reg_optimizer.iterations, "int64") + ops.cast(
            self.seg_optimizer.iterations, "int64")
        cycle = self.registration_steps + self.segmentation_steps
        return ops.less(ops.mod(done, cycle), self.registration_steps)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Under ``tf.distribute``, Keras (TF trainer) builds the model symbolically from a
        first batch that it reduces across replicas; ``MultiWorkerMirroredStrategy`` cannot
        reduce a dict batch (its cross-device reduce takes tensors only). DeepAtlas is built
        at construction and both optimizers in ``compile``, so there is nothing to build:
        skipped under that strategy, Keras's path everywhere else."""
        if _multi_worker(self) and self.built and getattr(self, "compiled", False):
            return
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def make_train_function(self, force=False):
        """TensorFlow, joint mode: one compiled function per phase, chosen in Python.

        Choosing the phase inside the graph (a ``tf.cond`` around two gradient computations)
        made TensorFlow keep far more memory alive: 21.6 GiB instead of 15.0 GiB for the same
        registration step at 160x192x160 (measured). The two functions are traced on their
        first use.
        """
        if keras.backend.backend() != "tensorflow" or not self.schedule.alternates:
            return super().make_train_function(force)
        if self.train_function is not None and not force:
            return self.train_function
        if self.steps_per_execution != 1:
            raise ValueError("joint DeepAtlas training on TensorFlow needs steps_per_execution=1")
        functions = {}
        for phase in ("registration", "segmentation"):
            super().make_train_function(force=True)
            functions[phase] = self.train_function

        def train_function(*args, **kwargs):
            phase = "registration" if bool(self.is_registration_turn()) else "segmentation"
            self._traced_phase = phase  # read by train_step when the function is traced
            return functions[phase](*args, **kwargs)

        self.train_function = train_function
        return train_function

    def train_step(self, data):
        batch = self._unpack(data)
        networks = self.schedule.networks
        # One network: its step; joint: the phase the TF train function was traced for (else
        # chosen in the graph below).
        phase = next(iter(networks)) if len(networks) == 1 else getattr(self, "_traced_phase",
                                                                          None)
        if self.schedule.shared:
            self._simultaneous_step(batch)
        elif phase == REGISTRATION:
            self._registration_step(batch)
        elif phase == SEGMENTATION:
            self._segmentation_step(batch)
        else:
            ops.cond(self.is_registration_turn(),
                     lambda: self._registration_step(batch),
                     lambda: self._segmentation_step(batch))
        return self._logs(self._training_metric_names())

    def _training_metric_names(self):
        networks = self.schedule.networks
        return ((_REGISTRATION_METRICS if REGISTRATION in networks else ())
                + (_SEGMENTATION_METRICS if SEGMENTATION in networks else ()))

    def test_step(self, data):
        batch = self._unpack(data)
        networks = self.schedule.networks
        if REGISTRATION in networks:
            _, terms = self._registration_losses(batch, self._registration_targets(batch),
                                                 training=False)
            self._update_trackers(terms)
        if SEGMENTATION in networks:
            _, terms = self._segmentation_losses(batch, self._segmentation_displacement(batch),
                                                 training=False)
            self._update_trackers(terms)
        dice = self._validation_dice(batch)
        self._update_trackers(dice)
        return self._logs(self._training_metric_names() + tuple(dice))

    def _validation_dice(self, batch):
        """Hard-label Dice (background excluded) of registration and segmentation.

        Per sample, the mean over the classes present in either map; samples without the
        needed manual labels get weight 0 in the running means (they are not scored as 0).
        Returns ``{name: (per-sample Dice, per-sample weight)}``.
        """
        both = batch["moving_labelled"] * batch["fixed_labelled"]
        terms = {}
        networks = self.schedule.networks
        if REGISTRATION in networks:
            out = self.registration_net([batch["moving"], batch["fixed"]], training=False)
            moved = spatial_ops.warp(batch["moving_labels"], out["displacement"],
                                     method="nearest")
            terms["warped_dice"] = (_present_mean_dice(batch["fixed_labels"], moved), both)
        if SEGMENTATION in networks:
            flags, labels, predictions = [], [], []
            for side in ("moving", "fixed"):
                probabilities = self.segmentation_net(batch[side], training=False)
                predictions.append(ops.one_hot(ops.argmax(probabilities, axis=-1),
                                               self.num_classes))
                labels.append(batch[f"{side}_labels"])
                flags.append(batch[f"{side}_labelled"])
            terms["seg_dice"] = (_present_mean_dice(ops.concatenate(labels, 0),
                                                    ops.concatenate(predictions, 0)),
                                 ops.concatenate(flags, 0))
        return terms

    def _update_trackers(self, terms):
        """Adds values to the running means; a ``(values, weights)`` pair is weighted.

        Under a ``tf.distribute`` strategy each replica's loss is its share of the global
        batch's value (see ``_global_count``); the trackers average over replicas, so the
        shares are scaled by the replica count to log the global value.
        """
        replicas = _replicas()
        for name, value in terms.items():
            if isinstance(value, tuple):
                self._trackers[name].update_state(value[0], sample_weight=value[1])
            else:
                self._trackers[name].update_state(value * replicas if replicas > 1 else value)

    def _logs(self, names):
        logs = {name: self._trackers[name].result() for name in names}
        if _multi_worker(self):
            # Keras reduces a step's outputs across workers with a MEAN over axis 0, which a
            # scalar does not have (keras 3.15): give each value that axis.
            logs = {name: ops.reshape(value, (1,)) for name, value in logs.items()}
        return logs
