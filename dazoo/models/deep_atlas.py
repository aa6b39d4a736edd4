"""DeepAtlas: joint semi-supervised training of a registration and a segmentation network.

Xu & Niethammer, "DeepAtlas: Joint Semi-Supervised Learning of Image Registration and
Segmentation", MICCAI 2019. The two networks are trained alternately, each with its own
optimizer, while the other is held fixed: a registration step (similarity + smoothness +
the anatomy loss ``L_a`` against manual or predicted labels) updates the registration
network, a segmentation step (supervised + ``L_a`` on half-labelled pairs) the segmenter.
The losses are :class:`dazoo.models.objective.Objective` (``model.objective`` after
``compile``); gradients come from :mod:`dazoo.backend`; which networks a step updates is
:class:`dazoo.batch.Schedule`'s answer. This module is the model: the networks, ``compile``
and a ``train_step`` that reads top to bottom.

Training batches follow the contract of :mod:`dazoo.batch` (:data:`BATCH_KEYS`):
images ``"moving"``/``"fixed"`` ``(batch, D, H, W, 1)``, class maps ``"moving_labels"``/
``"fixed_labels"`` ``(batch, D, H, W)`` and per-sample flags ``"moving_labelled"``/
``"fixed_labelled"`` (1 where the label map is a manual one).
"""
from __future__ import annotations

import keras
from keras import ops

from dazoo import backend
from dazoo.backend import distribute
from dazoo.batch import BATCH_KEYS, MODES, REGISTRATION, SEGMENTATION, Schedule
from dazoo.layers import SpatialTransformer
from dazoo.losses import NCC, DiceCE, Grad, SoftDice
from dazoo.models.objective import (
    REGISTRATION_METRICS,
    SEGMENTATION_METRICS,
    VALIDATION_METRICS,
    Objective,
    sum_parts,
)

__all__ = ["DeepAtlas", "BATCH_KEYS", "MODES"]


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
            for name in REGISTRATION_METRICS + SEGMENTATION_METRICS + VALIDATION_METRICS
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
        synth_similarity_weight: float = 1.0,
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
            synth_similarity_weight: weight of the image similarity on pairs whose images do
                not share a contrast (batch key ``"shared_contrast"`` 0, see
                :mod:`dazoo.batch`): SynthMorph trains such pairs on the anatomy term alone
                (0); 1 (default) weighs every pair alike.
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
        self.objective = Objective(
            self.registration_net, self.segmentation_net, networks=self.schedule.networks,
            similarity=self.similarity_loss, smoothness=self.smoothness_loss,
            anatomy=self.anatomy_loss, segmentation=self.segmentation_loss,
            smoothness_weight=self.smoothness_weight, anatomy_weight=self.anatomy_weight,
            supervised_weight=self.supervised_weight,
            segmentation_anatomy_weight=self.segmentation_anatomy_weight,
            recompute=self.recompute, synth_similarity_weight=synth_similarity_weight)
        self._dazoo_compile_config = {
            "smoothness_weight": self.smoothness_weight,
            "anatomy_weight": self.anatomy_weight,
            "supervised_weight": self.supervised_weight,
            "segmentation_anatomy_weight": self.segmentation_anatomy_weight,
            "synth_similarity_weight": self.objective.synth_similarity_weight,
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

    # ------------------------------------------------------------------ steps
    def _update(self, loss_fns, network, optimizer, *, after=()):
        """One optimizer update of ``network`` from the summed gradient of ``loss_fns``
        (see :func:`dazoo.backend.gradients`); logs their terms, returns the total."""
        variables = network.trainable_variables
        gradients, parts = backend.gradients(loss_fns, variables, after=after)
        backend.apply(optimizer, gradients, variables)
        total, terms = sum_parts(parts)
        self._update_trackers(terms)
        return total

    def _registration_step(self, batch):
        targets = self.objective.registration_targets(batch)
        return self._update(
            [lambda: self.objective.registration_loss(batch, targets, training=True)],
            self.registration_net, self.reg_optimizer, after=targets)

    def _segmentation_step(self, batch):
        displacement = self.objective.segmentation_displacement(batch)
        return self._update(
            [lambda side=side: self.objective.segmentation_side(batch, displacement, side,
                                                                training=True)
             for side in ("moving", "fixed")],
            self.segmentation_net, self.seg_optimizer, after=displacement)

    def _simultaneous_step(self, batch):
        """One update of each network from shared forward passes: the gradient of the sum of
        the two losses, taken once, splits into each network's own gradient (each loss reaches
        the other network only through a stopped gradient); each optimizer applies its part."""
        reg_variables = self.registration_net.trainable_variables
        seg_variables = self.segmentation_net.trainable_variables

        def both():
            reg_total, seg_total, terms = self.objective.simultaneous_loss(batch)
            return reg_total + seg_total, terms

        gradients, [(total, terms)] = backend.gradients([both], reg_variables + seg_variables)
        count = len(reg_variables)
        backend.apply(self.reg_optimizer, gradients[:count], reg_variables)
        backend.apply(self.seg_optimizer, gradients[count:], seg_variables)
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
        if (distribute.multi_worker(self) and self.built
                and getattr(self, "compiled", False)):
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
        batch = self.objective.unpack(data)
        updates = self.schedule.networks
        # Joint: the phase the TensorFlow train function was traced for (see
        # make_train_function), else chosen in the graph.
        phase = next(iter(updates)) if len(updates) == 1 else getattr(self, "_traced_phase",
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
        return ((REGISTRATION_METRICS if REGISTRATION in networks else ())
                + (SEGMENTATION_METRICS if SEGMENTATION in networks else ()))

    def test_step(self, data):
        objective = self.objective
        batch = objective.unpack(data)
        networks = self.schedule.networks
        if REGISTRATION in networks:
            _, terms = objective.registration_loss(
                batch, objective.registration_targets(batch), training=False)
            self._update_trackers(terms)
        if SEGMENTATION in networks:
            _, terms = objective.segmentation_loss(
                batch, objective.segmentation_displacement(batch), training=False)
            self._update_trackers(terms)
        dice = objective.validation_dice(batch)
        self._update_trackers(dice)
        return self._logs(self._training_metric_names() + tuple(dice))

    def _update_trackers(self, terms):
        """Adds values to the running means; a ``(values, weights)`` pair is weighted.

        Under a ``tf.distribute`` strategy each replica's loss is its share of the global
        batch's value; the trackers average over replicas, so the shares are scaled by the
        replica count to log the global value (:mod:`dazoo.backend.distribute`).
        """
        replicas = distribute.replicas()
        for name, value in terms.items():
            if isinstance(value, tuple):
                self._trackers[name].update_state(value[0], sample_weight=value[1])
            else:
                self._trackers[name].update_state(value * replicas if replicas > 1 else value)

    def _logs(self, names):
        return distribute.worker_logs(
            self, {name: self._trackers[name].result() for name in names})
