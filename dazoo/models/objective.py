"""The DeepAtlas training objective: the losses of both phases, computed from a batch and the
two networks.

Xu & Niethammer, MICCAI 2019:

* **registration** (gradient to the registration network): image similarity of the fixed
  and the moved image + smoothness of the flow + the anatomy loss ``L_a``, the soft Dice
  between the moving label map warped onto the fixed image and the fixed label map. A
  sample's manual label map is used where it has one, the segmenter's prediction (no
  gradient) where it does not;
* **segmentation** (gradient to the segmenter): a supervised loss on every labelled image
  of the pair, plus ``L_a`` on pairs where exactly one image is labelled: the warped manual
  labels against the prediction on the other image, or the warped prediction against the
  other image's manual labels (the displacement has no gradient).

Fast paths, each equal to the plain computation in value and gradient (tested): the losses
own them, and a loss is given one when it has the method (``call_on_classes``,
``from_sums``) from its own class or one below the class that defines its ``call`` (so a
subclass that only renames keeps the fast path, one that changes ``call`` falls back):

* ``L_a`` with manual moving labels: the label-overlap sums of the 8 interpolation corners
  (:func:`dazoo.ops.warped_label_overlap`), no ``K``-channel warp;
* segmentation ``L_a`` with manual fixed labels: the adjoint warp of those labels
  (:func:`dazoo.ops.warp_adjoint_labels`), the prediction is not warped;
* supervised :class:`~dazoo.losses.DiceCE` from integer classes (no one-hot map);
* ``fused`` (TensorFlow, a segmenter with a ``"logits"`` 1x1x1 head): both segmentation
  losses from per-class sums of the head's softmax, chunk by chunk
  (:func:`dazoo.ops.softmax_class_sums`): the ``K``-channel probabilities never exist for
  the whole volume.

``Objective(..., fast=False)`` computes everything the plain way (the reference of the
tests). Batches follow :mod:`dazoo.batch`, as :meth:`Objective.unpack` returns them
(float flags, ``*_classes`` integer maps, ``*_labels`` one-hot maps).
"""
from __future__ import annotations

import math

import keras
from keras import ops

from dazoo import ops as spatial_ops
from dazoo.backend import distribute, no_grad
from dazoo.batch import BATCH_DEFAULTS, BATCH_KEYS, REGISTRATION, SEGMENTATION
from dazoo.losses import class_sums, soft_dice_scores

__all__ = ["Objective", "REGISTRATION_METRICS", "SEGMENTATION_METRICS", "VALIDATION_METRICS",
           "has_fast_path", "image_terms"]

REGISTRATION_METRICS = ("reg_loss", "reg_similarity", "reg_smoothness", "reg_anatomy")
SEGMENTATION_METRICS = ("seg_loss", "seg_supervised", "seg_anatomy")
VALIDATION_METRICS = ("warped_dice", "seg_dice")
SIDES = ("moving", "fixed")


def has_fast_path(loss, method: str) -> bool:
    """Whether ``loss`` offers ``method`` (e.g. ``"from_sums"``) for the computation its
    ``call`` defines: the method is defined in the class that defines ``call`` or in a
    subclass of it."""
    if getattr(loss, method, None) is None:
        return False

    def owner(name):
        return next(k for k in type(loss).__mro__ if name in vars(k))

    return issubclass(owner(method), owner("call"))


# ---------------------------------------------------------------------------- batch helpers
def masked_mean(per_sample, mask):
    """Mean of per-sample values where ``mask`` is 1 (over the global batch); 0 when the
    mask is empty. Extra axes (a loss that keeps voxels) are averaged first."""
    mask = ops.cast(mask, "float32")
    return weighted_sum(per_sample, mask, distribute.global_count(mask))


def per_sample(values):
    """Averages any axes after the first (a loss that keeps voxels) to one value per sample."""
    values = ops.cast(values, "float32")
    if len(values.shape) > 1:
        values = ops.mean(ops.reshape(values, (ops.shape(values)[0], -1)), axis=-1)
    return values


def weighted_sum(values, mask, denominator):
    """``sum(per_sample(values) * mask) / denominator``."""
    return ops.sum(per_sample(values) * ops.cast(mask, "float32")) / denominator


def sum_parts(parts):
    """Adds ``(total, terms)`` pairs term by term."""
    total = parts[0][0]
    terms = dict(parts[0][1])
    for part_total, part_terms in parts[1:]:
        total = total + part_total
        terms = {key: terms[key] + part_terms[key] for key in terms}
    return total, terms


def masked_mean_if_any(per_sample_fn, mask):
    """``masked_mean(per_sample_fn(), mask)``, without computing it when the mask is empty."""
    count = distribute.global_count(mask)  # outside the cond: every replica all-reduces
    return ops.cond(ops.any(mask > 0), lambda: weighted_sum(per_sample_fn(), mask, count),
                    lambda: ops.zeros((), dtype="float32"))


def present_mean_dice(truth, prediction):
    """Per-sample mean Dice over the foreground classes present in either one-hot map."""
    axes = tuple(range(1, len(truth.shape) - 1))
    scores = soft_dice_scores(truth, prediction, include_background=False)
    present = ops.cast(ops.sum(truth[..., 1:] + prediction[..., 1:], axis=axes) > 0, "float32")
    return ops.sum(scores * present, axis=-1) / ops.maximum(ops.sum(present, axis=-1), 1.0)


def exactly_one(batch):
    """Per-sample 1 where exactly one image of the pair is labelled."""
    moving, fixed = batch["moving_labelled"], batch["fixed_labelled"]
    return moving + fixed - 2.0 * moving * fixed


def select(flag, labelled, predicted):
    """Per sample: the manual label map where ``flag`` is 1, else the prediction."""
    flag = ops.reshape(ops.cast(flag, "float32"), (-1,) + (1,) * (len(labelled.shape) - 1))
    return flag * labelled + (1.0 - flag) * predicted


def image_terms(similarity, smoothness, fixed, moved, flow):
    """Per-sample similarity of ``(fixed, moved)`` and smoothness of ``flow``: the terms of
    the registration loss that need no labels (shared with test-time refinement,
    :func:`dazoo.refine.refine_velocity`)."""
    return per_sample(similarity.call(fixed, moved)), per_sample(smoothness.call(flow, flow))


def class_counts(classes, num_classes: int):
    """``(batch, K)`` voxels per class of an integer class map (ids outside ``0..K-1``
    count for no class): the sums of its one-hot map."""
    valid = ops.logical_and(classes >= 0, classes < num_classes)
    return class_sums(valid, ops.clip(classes, 0, num_classes - 1), num_classes)


# ---------------------------------------------------------------------------- the objective
class Objective:
    """The losses of DeepAtlas's two phases for one pair of networks.

    Args:
        registration_net: the :class:`~dazoo.RegistrationNet` (outputs ``moved``, ``flow``,
            ``displacement``).
        segmentation_net: the :class:`~dazoo.SegmentationNet` (class probabilities).
        networks: the networks the schedule trains (``{"registration", "segmentation"}``
            or one of them): without a segmenter in training, ``L_a`` of the registration
            phase uses manual labels only (pairs with both labelled).
        similarity, smoothness, anatomy, segmentation: the Keras losses.
        smoothness_weight, anatomy_weight: weights in the registration loss.
        synth_similarity_weight: weight of the image similarity on pairs that do not share
            their contrast (batch key ``"shared_contrast"`` 0: an image synthesised with its
            own intensities, SynthMorph-style, where the anatomy term is the reliable
            signal); 1 (default) weighs every pair alike. The logged ``reg_similarity`` is
            then the weighted mean: compare it only between runs of one weight.
        supervised_weight, segmentation_anatomy_weight: weights in the segmentation loss.
        recompute: U-Net levels recomputed in the backward pass (networks that support it).
        fast: use the losses' fast paths (see the module docstring); False: the plain
            computation.
    """

    def __init__(self, registration_net, segmentation_net, *, networks, similarity, smoothness,
                 anatomy, segmentation, smoothness_weight=1.0, anatomy_weight=1.0,
                 supervised_weight=1.0, segmentation_anatomy_weight=1.0, recompute=0,
                 fast=True, synth_similarity_weight=1.0):
        self.registration_net = registration_net
        self.segmentation_net = segmentation_net
        self.networks = frozenset(networks)
        self.similarity, self.smoothness = similarity, smoothness
        self.anatomy, self.segmentation = anatomy, segmentation
        self.smoothness_weight = float(smoothness_weight)
        self.anatomy_weight = float(anatomy_weight)
        self.synth_similarity_weight = float(synth_similarity_weight)
        if not (math.isfinite(self.synth_similarity_weight) and self.synth_similarity_weight >= 0):
            raise ValueError("synth_similarity_weight must be a finite number >= 0, got "
                             f"{synth_similarity_weight}")
        self.supervised_weight = float(supervised_weight)
        self.segmentation_anatomy_weight = float(segmentation_anatomy_weight)
        self.recompute = int(recompute)
        self.fast = bool(fast)
        self.num_classes = int(segmentation_net.outputs[0].shape[-1])
        self._head = self._features_model = None

    # ------------------------------------------------------------------ batches and passes
    def unpack(self, data):
        """The training batch as the losses use it: float images and flags, integer
        ``*_classes`` and one-hot ``*_labels`` maps."""
        if isinstance(data, (tuple, list)):
            data = data[0]
        missing = [key for key in BATCH_KEYS if key not in data]
        if missing:
            raise ValueError(f"DeepAtlas batches need the keys {BATCH_KEYS}; missing {missing}")
        batch = dict(data)
        for key, default in BATCH_DEFAULTS.items():
            if key not in batch:
                batch[key] = ops.full(ops.shape(batch["moving_labelled"]), default)
        for key in ("moving", "fixed", "moving_labelled", "fixed_labelled", *BATCH_DEFAULTS):
            batch[key] = ops.cast(batch[key], "float32")
        for side in SIDES:
            batch[f"{side}_classes"] = ops.cast(batch[f"{side}_labels"], "int32")
            batch[f"{side}_labels"] = ops.one_hot(batch[f"{side}_classes"], self.num_classes)
        return batch

    def _pass(self, net, inputs, *, training):
        """``net``'s outputs in a training pass, with ``recompute`` where the network
        supports it (``recomputed``)."""
        if self.recompute and hasattr(net, "recomputed"):
            return net.recomputed(inputs, training=training, recompute=self.recompute)
        return net(inputs, training=training)

    def _features(self, image, *, training):
        """The segmenter's head input (fused path; ``recompute`` as above)."""
        net = self.segmentation_net
        if self.recompute and hasattr(net, "unet_features"):
            return net.unet_features(image, training=training, recompute=self.recompute)
        return self._features_model(image, training=training)

    @property
    def fused(self) -> bool:
        """Whether the segmentation losses come from the head's chunked softmax sums
        (TensorFlow, losses with ``from_sums``, a segmenter with a ``"logits"`` head)."""
        if not (self.fast and keras.backend.backend() == "tensorflow"
                and has_fast_path(self.segmentation, "from_sums")
                and has_fast_path(self.anatomy, "from_sums")):
            return False
        if self._head is None:
            net = self.segmentation_net
            names = [layer.name for layer in net.layers]
            head = net.get_layer("logits") if "logits" in names else None
            ok = (head is not None and names[-1] == "probabilities"
                  and tuple(head.kernel.shape[:3]) == (1, 1, 1) and head.use_bias
                  and head.activation is keras.activations.linear)
            self._head = head if ok else False
            self._features_model = keras.Model(net.inputs, head.input,
                                               name="segmentation_features") if ok else None
        return bool(self._head)

    # ------------------------------------------------------------------ anatomy (L_a)
    def _dice_from_sums(self, intersection, true_sum, pred_sum):
        return self.anatomy.from_sums(intersection, true_sum, pred_sum)

    def _warped_anatomy(self, moving_segmentation, fixed_segmentation, displacement):
        """Per-sample ``L_a``: fixed label map vs the moving one warped onto it."""
        moved = spatial_ops.warp(moving_segmentation, displacement)
        return self.anatomy.call(fixed_segmentation, moved)

    def _one_hot_anatomy(self, moving_classes, fixed_segmentation, displacement):
        """``L_a`` with manual moving labels (integer classes), any anatomy loss: the warped
        one-hot map built by :func:`dazoo.ops.warped_one_hot` (a scatter of the corner
        weights, equal to warping the ``K`` one-hot channels)."""
        moved = spatial_ops.warped_one_hot(moving_classes, displacement, self.num_classes)
        return self.anatomy.call(fixed_segmentation, moved)

    def _manual_anatomy(self, moving_classes, fixed_segmentation, displacement):
        """Registration-phase ``L_a`` with manual moving labels. Fast: the label-overlap
        sums (:func:`dazoo.ops.warped_label_overlap`), in memory and time independent of
        ``K``; otherwise :meth:`_one_hot_anatomy`."""
        if self.fast and has_fast_path(self.anatomy, "from_sums"):
            intersection, moved_sum = spatial_ops.warped_label_overlap(
                moving_classes, displacement, fixed_segmentation, self.num_classes)
            fixed_sum = ops.sum(fixed_segmentation, axis=(1, 2, 3))
            return self._dice_from_sums(intersection, fixed_sum, moved_sum)
        return self._one_hot_anatomy(moving_classes, fixed_segmentation, displacement)

    def _adjoint_anatomy(self, moving_segmentation, batch, displacement):
        """Segmentation-phase ``L_a`` with manual fixed labels, gradient to the moving
        prediction only. Fast: the sums are linear in the prediction, ``sum_y p_k(y)
        A_k(y)`` with the adjoint warp of the fixed labels, so the ``K`` probability channels
        are not warped (nor their gradient scattered back). Otherwise the warp."""
        if not (self.fast and has_fast_path(self.anatomy, "from_sums")):
            return self._warped_anatomy(moving_segmentation, batch["fixed_labels"],
                                        displacement)
        adjoint, weight = spatial_ops.warp_adjoint_labels(batch["fixed_classes"], displacement,
                                                          self.num_classes)
        prediction = ops.cast(moving_segmentation, "float32")
        axes = (1, 2, 3)
        intersection = ops.sum(prediction * adjoint, axis=axes)
        moved_sum = ops.sum(prediction * weight[..., None], axis=axes)
        return self._dice_from_sums(intersection,
                                    class_counts(batch["fixed_classes"], self.num_classes),
                                    moved_sum)

    # ------------------------------------------------------------------ registration
    def registration_targets(self, batch):
        """``(moving, fixed, mask)``: the label maps of the registration phase's ``L_a`` and
        the samples that use it. Computed outside any gradient tape: the segmenter is fixed
        in this phase; its predictions are only computed for a side that lacks manual
        labels. Without a segmenter in training: manual labels, pairs with both labelled."""
        if SEGMENTATION not in self.networks or not self.anatomy_weight:
            mask = batch["moving_labelled"] * batch["fixed_labelled"]
            return batch["moving_labels"], batch["fixed_labels"], mask

        def manual_or_predicted(side):
            labels, flags = batch[f"{side}_labels"], batch[f"{side}_labelled"]

            def predicted():
                with no_grad():
                    prediction = self.segmentation_net(batch[side], training=False)
                return select(flags, labels, ops.stop_gradient(prediction))

            return ops.cond(ops.all(flags > 0), lambda: labels, predicted)

        return (manual_or_predicted("moving"), manual_or_predicted("fixed"),
                ops.ones_like(batch["moving_labelled"]))

    def registration_loss(self, batch, targets, *, training, out=None):
        """``(total, terms)`` of the registration phase: the network's pass (or its outputs
        ``out``) against the ``L_a`` targets of :meth:`registration_targets`."""
        if out is None:
            out = self._pass(self.registration_net, [batch["moving"], batch["fixed"]],
                             training=training)
        moving_seg, fixed_seg, anatomy_mask = targets
        every = ops.ones_like(batch["moving_labelled"])
        similarity, smoothness = image_terms(self.similarity, self.smoothness, batch["fixed"],
                                             out["moved"], out["flow"])
        if self.synth_similarity_weight != 1.0:
            shared = batch["shared_contrast"]
            similarity = similarity * (shared + (1.0 - shared) * self.synth_similarity_weight)
        similarity, smoothness = masked_mean(similarity, every), masked_mean(smoothness, every)
        if self.anatomy_weight:
            def per_sample_anatomy():
                displacement = out["displacement"]
                return ops.cond(
                    ops.all(batch["moving_labelled"] > 0),
                    lambda: self._manual_anatomy(batch["moving_classes"], fixed_seg,
                                                 displacement),
                    lambda: self._warped_anatomy(moving_seg, fixed_seg, displacement))

            anatomy = masked_mean_if_any(per_sample_anatomy, anatomy_mask)
        else:
            anatomy = ops.zeros(())
        total = similarity + self.smoothness_weight * smoothness + self.anatomy_weight * anatomy
        return total, dict(zip(REGISTRATION_METRICS, (total, similarity, smoothness, anatomy)))

    # ------------------------------------------------------------------ segmentation
    def segmentation_displacement(self, batch):
        """The fixed registration network's displacement for the segmentation phase's
        ``L_a``, outside any gradient tape; zeros (without running the network) when no pair
        has exactly one labelled image; None when ``L_a`` is off or there is no registration
        network in training."""
        if self.networks != {REGISTRATION, SEGMENTATION} or not self.segmentation_anatomy_weight:
            return None
        moving, fixed = batch["moving"], batch["fixed"]

        def register():
            with no_grad():
                out = self.registration_net([moving, fixed], training=False)
            return ops.stop_gradient(out["displacement"])

        def identity():
            return ops.repeat(ops.zeros_like(moving[..., :1]), 3, axis=-1)

        return ops.cond(ops.any(exactly_one(batch) > 0), register, identity)

    def segmentation_loss(self, batch, displacement, *, training):
        """``(total, terms)`` of the segmentation phase (both sides)."""
        return sum_parts([self.segmentation_side(batch, displacement, side, training=training)
                          for side in SIDES])

    def segmentation_side(self, batch, displacement, side, *, training, prediction=None,
                          features=None):
        """The part of the segmentation loss that depends on the prediction for ``side``.

        The loss is a sum of two such parts, one per image: the supervised loss of a labelled
        image, and ``L_a`` on pairs with exactly one labelled image, which depends only on the
        unlabelled image's prediction (the manual side is a constant). Their gradients can
        thus be taken one image at a time, which halves the peak memory of a segmentation
        step. ``prediction`` / ``features``: the segmenter's output / head input for
        ``side`` when already computed (the simultaneous step).
        """
        if prediction is None and self.fused:
            return self._fused_side(batch, displacement, side, training=training,
                                    features=features)
        other = "fixed" if side == "moving" else "moving"
        flags = batch[f"{side}_labelled"]
        if prediction is None:
            prediction = self._pass(self.segmentation_net, batch[side], training=training)
        labelled_count = distribute.global_count(
            ops.concatenate([batch["moving_labelled"], batch["fixed_labelled"]], axis=0))
        if self.fast and has_fast_path(self.segmentation, "call_on_classes"):
            loss = self.segmentation.call_on_classes(batch[f"{side}_classes"], prediction)
        else:
            loss = self.segmentation.call(batch[f"{side}_labels"], prediction)
        supervised = weighted_sum(loss, flags, labelled_count)
        if displacement is None:
            return self._segmentation_terms(batch, supervised)
        # This side unlabelled, the other labelled: the other's manual labels against this
        # side's prediction.
        mask = (1.0 - flags) * batch[f"{other}_labelled"]
        if side == "moving":
            def anatomy():
                return self._adjoint_anatomy(prediction, batch, displacement)
        else:
            def anatomy():
                return self._one_hot_anatomy(batch["moving_classes"], prediction,
                                             displacement)
        return self._segmentation_terms(batch, supervised, mask, anatomy)

    def _segmentation_terms(self, batch, supervised, mask=None, per_sample_anatomy=None):
        """``(total, terms)`` of one side: its supervised part and, on the pairs of ``mask``,
        ``L_a`` from ``per_sample_anatomy()``, only computed when some pair needs it."""
        if mask is None:
            anatomy = ops.zeros(())
        else:
            pairs_count = distribute.global_count(exactly_one(batch))  # outside the cond
            anatomy = ops.cond(
                ops.any(mask > 0),
                lambda: weighted_sum(per_sample_anatomy(), mask, pairs_count),
                lambda: ops.zeros((), dtype="float32"))
        total = self.supervised_weight * supervised + self.segmentation_anatomy_weight * anatomy
        return total, dict(zip(SEGMENTATION_METRICS, (total, supervised, anatomy)))

    def _fused_side(self, batch, displacement, side, *, training, features=None):
        """:meth:`segmentation_side` from :func:`dazoo.ops.softmax_class_sums`: the
        supervised loss and ``L_a`` from per-class sums (the warped manual labels as
        interpolation corners, or the adjoint warp of the other side's labels)."""
        other = "fixed" if side == "moving" else "moving"
        flags = batch[f"{side}_labelled"]
        k = self.num_classes
        if features is None:
            features = self._features(batch[side], training=training)
        kernel = ops.convert_to_tensor(self._head.kernel)
        bias = ops.convert_to_tensor(self._head.bias)
        classes = batch[f"{side}_classes"]
        n_vox = 1
        for size in classes.shape[1:]:
            n_vox *= int(size)
        flat = ops.reshape(classes, (-1, n_vox))
        valid = ops.cast(ops.logical_and(flat >= 0, flat < k), "float32")
        labelled_count = distribute.global_count(
            ops.concatenate([batch["moving_labelled"], batch["fixed_labelled"]], axis=0))
        loss = self.segmentation
        sums = spatial_ops.softmax_class_sums(
            features, kernel, bias, sparse=[(flat[..., None], valid[..., None])],
            log_classes=classes, epsilon=loss.epsilon)
        values = loss.from_sums(sums["sparse"][0], class_counts(classes, k), sums["sum"],
                                sums["log_likelihood"] / float(n_vox))
        supervised = weighted_sum(values, flags, labelled_count)
        if displacement is None:
            return self._segmentation_terms(batch, supervised)
        mask = (1.0 - flags) * batch[f"{other}_labelled"]

        def anatomy():
            if side == "fixed":  # the moving image's manual labels, warped
                labels, weights = spatial_ops.warped_label_corners(
                    batch["moving_classes"], displacement, k)
                parts = spatial_ops.softmax_class_sums(features, kernel, bias,
                                                       sparse=[(labels, weights)])
                moved_sum = spatial_ops.class_scatter(weights, labels, k)
                return self._dice_from_sums(parts["sparse"][0], parts["sum"], moved_sum)
            adjoint, weight = spatial_ops.warp_adjoint_labels(batch["fixed_classes"],
                                                              displacement, k)
            parts = spatial_ops.softmax_class_sums(features, kernel, bias, dense=adjoint,
                                                   weight=weight)
            return self._dice_from_sums(parts["dense"],
                                        class_counts(batch["fixed_classes"], k),
                                        parts["weighted"])

        return self._segmentation_terms(batch, supervised, mask, anatomy)

    # ------------------------------------------------------------------ both at once
    def simultaneous_loss(self, batch):
        """``(registration total, segmentation total, terms)`` from one forward pass of each
        network (``mode="simultaneous"``): the registration loss takes the segmenter's
        predictions (gradient stopped) as its ``L_a`` targets where an image has no manual
        labels, the segmentation loss the displacement (gradient stopped)."""
        out = self._pass(self.registration_net, [batch["moving"], batch["fixed"]],
                         training=True)
        features = {side: None for side in SIDES}
        if self.fused:
            # One pass of the segmenter's body per image; the targets are its probabilities
            # without gradient, the segmentation loss comes from the features.
            net = self.segmentation_net
            features = {side: self._features(batch[side], training=True) for side in SIDES}
            predictions = {side: ops.stop_gradient(net.get_layer("probabilities")(
                net.get_layer("logits")(features[side]))) for side in SIDES}
        else:
            predictions = {side: self._pass(self.segmentation_net, batch[side], training=True)
                           for side in SIDES}
        if self.anatomy_weight:
            targets = tuple(select(batch[f"{side}_labelled"], batch[f"{side}_labels"],
                                   ops.stop_gradient(predictions[side])) for side in SIDES)
            targets += (ops.ones_like(batch["moving_labelled"]),)
        else:
            targets = (batch["moving_labels"], batch["fixed_labels"],
                       ops.zeros_like(batch["moving_labelled"]))
        reg_total, reg_terms = self.registration_loss(batch, targets, training=True, out=out)
        displacement = (ops.stop_gradient(out["displacement"])
                        if self.segmentation_anatomy_weight else None)
        seg_total, seg_terms = sum_parts([
            self._fused_side(batch, displacement, side, training=True,
                             features=features[side]) if self.fused else
            self.segmentation_side(batch, displacement, side, training=True,
                                   prediction=predictions[side])
            for side in SIDES])
        return reg_total, seg_total, {**reg_terms, **seg_terms}

    # ------------------------------------------------------------------ validation
    def validation_dice(self, batch):
        """Hard-label Dice (background excluded) of registration and segmentation.

        Per sample, the mean over the classes present in either map; samples without the
        needed manual labels get weight 0 in the running means (they are not scored as 0).
        Returns ``{name: (per-sample Dice, per-sample weight)}``.
        """
        both = batch["moving_labelled"] * batch["fixed_labelled"]
        terms = {}
        if REGISTRATION in self.networks:
            out = self.registration_net([batch["moving"], batch["fixed"]], training=False)
            moved = spatial_ops.warp(batch["moving_labels"], out["displacement"],
                                     method="nearest")
            terms["warped_dice"] = (present_mean_dice(batch["fixed_labels"], moved), both)
        if SEGMENTATION in self.networks:
            flags, labels, predictions = [], [], []
            for side in SIDES:
                probabilities = self.segmentation_net(batch[side], training=False)
                predictions.append(ops.one_hot(ops.argmax(probabilities, axis=-1),
                                               self.num_classes))
                labels.append(batch[f"{side}_labels"])
                flags.append(batch[f"{side}_labelled"])
            terms["seg_dice"] = (present_mean_dice(ops.concatenate(labels, 0),
                                                   ops.concatenate(predictions, 0)),
                                 ops.concatenate(flags, 0))
        return terms
