"""Stage 2 of the `brain` preset (and of the one-shot experiment): DeepAtlas training.

Trains on the subjects preprocessed by ``prepare.py`` (model grid 2 mm, 80x96x80), logs to
``<out>/train.log``, checkpoints ``<out>/checkpoint.keras`` (both optimizers' state
included) and resumes from it when restarted with the same command.

    python examples/brain/train.py --work work_cache/brain --out work_cache/brain/run \
        --steps 6000                                   # the preset: all labels, joint
    python examples/brain/train.py ... --labelled 1 --mode registration_only  # one-shot runs

Only the 62 DKT31 cortical regions are classes (1..62, sorted ids); the ids 1032/1033/2032/
2033 (frontal and temporal poles, not part of DKT31, present in 3 subjects) become
background.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

DKT31_IDS = [i for i in range(1002, 1036) if i not in (1004, 1032, 1033)]
DKT31_IDS += [i + 1000 for i in DKT31_IDS]
NUM_CLASSES = len(DKT31_IDS) + 1  # 63


def id_to_class(ids: np.ndarray) -> np.ndarray:
    lookup = np.zeros(max(DKT31_IDS) + 1, np.int32)
    lookup[DKT31_IDS] = np.arange(1, NUM_CLASSES)
    ids = np.asarray(ids, np.int64)
    return np.where((ids >= 0) & (ids <= max(DKT31_IDS)), lookup[np.clip(ids, 0, None)
                                                                 .clip(max=max(DKT31_IDS))], 0)


def build_model(shape, mode, registration_steps, segmentation_steps):
    from dazoo import DeepAtlas, RegistrationNet, SegmentationNet

    registration = RegistrationNet(shape)  # VoxelMorph VxmDense defaults, diffeomorphic
    # bfloat16 arithmetic for the segmenter only (its training step ran 2.2x faster on this
    # AVX512-BF16 CPU); the registration network stays float32 (sub-voxel displacements).
    segmentation = SegmentationNet(
        shape, NUM_CLASSES, conv_per_level=2, normalization="instance",
        features=((16, 16, 32, 32, 64, 64, 96, 96), (96, 96, 64, 64, 32, 32, 16, 16, 16)),
        compute_dtype="mixed_bfloat16",
    )
    return DeepAtlas(registration, segmentation, mode=mode,
                     registration_steps=registration_steps, segmentation_steps=segmentation_steps)


class Augmenter:
    """Random small affine (rotation, scale, shift) + intensity (gamma) per volume."""

    def __init__(self, *, rotation_deg=4.0, scale=0.04, shift_vox=2.0, gamma=0.2):
        self.rotation = np.deg2rad(rotation_deg)
        self.scale, self.shift, self.gamma = scale, shift_vox, gamma

    def __call__(self, image, classes, rng):
        from scipy import ndimage
        from scipy.spatial.transform import Rotation

        rot = Rotation.from_rotvec(rng.uniform(-1, 1, 3) * self.rotation).as_matrix()
        matrix = rot * (1 + rng.uniform(-self.scale, self.scale, 3))
        centre = (np.array(image.shape) - 1) / 2
        offset = centre - matrix @ centre + rng.uniform(-self.shift, self.shift, 3)
        image = ndimage.affine_transform(image, matrix, offset, order=1, mode="constant")
        classes = ndimage.affine_transform(classes, matrix, offset, order=0, mode="constant")
        image = np.clip(image, 0, 1) ** np.exp(rng.uniform(-self.gamma, self.gamma))
        return image.astype(np.float32), classes.astype(np.int32)


def sample_pair(rng, labelled, registration_turn):
    """(moving, fixed) indices: any two subjects for a registration step; for a segmentation
    step one of them (either side) is labelled, so that every step has a supervised target."""
    count = len(labelled)
    if registration_turn or all(labelled):
        return tuple(int(i) for i in rng.choice(count, 2, replace=False))
    anchor = int(rng.choice(np.flatnonzero(labelled)))
    other = int(rng.choice([i for i in range(count) if i != anchor]))
    return (anchor, other) if rng.random() < 0.5 else (other, anchor)


def load_subjects(work: pathlib.Path, names):
    out = []
    for name in names:
        data = np.load(work / "cache" / f"{name}.npz")
        out.append((data["image"].astype(np.float32), id_to_class(data["labels"])))
    return out


def make_batch(subjects, pair, labelled, augment, rng):
    items = []
    for index in pair:
        image, classes = subjects[index]
        if augment is not None:
            image, classes = augment(image, classes, rng)
        if not labelled[index]:
            classes = np.zeros_like(classes)
        items.append((image, classes, float(labelled[index])))
    (mi, ml, mf), (fi, fl, ff) = items
    return {"moving": mi[None, ..., None], "fixed": fi[None, ..., None],
            "moving_labels": ml[None], "fixed_labels": fl[None],
            "moving_labelled": np.array([mf], np.float32),
            "fixed_labelled": np.array([ff], np.float32)}


def validation_batch(subjects):
    pairs = [(i, j) for i in range(len(subjects)) for j in range(len(subjects)) if i != j]
    return make_batch_many(subjects, pairs)


def make_batch_many(subjects, pairs):
    batches = [make_batch(subjects, p, [True] * len(subjects), None, None) for p in pairs]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def save_checkpoint(model, out: pathlib.Path):
    tmp = out / "checkpoint.tmp.keras"
    model.save(tmp)
    os.replace(tmp, out / "checkpoint.keras")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="work_cache/brain")
    parser.add_argument("--out", default="work_cache/brain/run")
    parser.add_argument("--steps", type=int, default=6000, help="total training steps")
    parser.add_argument("--mode", default="joint",
                        choices=("joint", "registration_only", "segmentation_only"))
    parser.add_argument("--labelled", default="all",
                        help="'all', or k: the first k training subjects (sorted) keep labels")
    parser.add_argument("--registration-steps", type=int, default=1)
    parser.add_argument("--segmentation-steps", type=int, default=1)
    parser.add_argument("--reg-lr", type=float, default=3e-4)
    parser.add_argument("--seg-lr", type=float, default=1e-3)
    parser.add_argument("--anatomy-weight", type=float, default=1.0)
    parser.add_argument("--smoothness-weight", type=float, default=1.0)
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--init-registration",
                        help="start the registration network from this run's checkpoint.keras")
    parser.add_argument("--init-segmentation",
                        help="start the segmentation network from this run's checkpoint.keras")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--validate-every", type=int, default=500)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    import keras

    import dazoo.models  # noqa: F401  (registers dazoo's classes for load_model)

    work, out = pathlib.Path(args.work), pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "train.log", "a", buffering=1)

    def log(message):
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        print(line, flush=True)
        log_file.write(line + "\n")

    split = json.loads((work / "split.json").read_text())
    train = load_subjects(work, split["train"])
    val = validation_batch(load_subjects(work, split["validation"]))
    labelled = ([True] * len(train) if args.labelled == "all"
                else [i < int(args.labelled) for i in range(len(train))])
    shape = train[0][0].shape

    checkpoint = out / "checkpoint.keras"
    if checkpoint.exists():
        model = keras.saving.load_model(checkpoint)
        log(f"resumed from {checkpoint}")
    else:
        keras.utils.set_random_seed(args.seed)
        model = build_model(shape, args.mode, args.registration_steps, args.segmentation_steps)
        for net, source in (("registration_net", args.init_registration),
                            ("segmentation_net", args.init_segmentation)):
            if source:
                trained = getattr(keras.saving.load_model(source, compile=False), net)
                getattr(model, net).set_weights(trained.get_weights())
                log(f"{net} initialised from {source}")
        model.compile(reg_optimizer=keras.optimizers.Adam(args.reg_lr),
                      seg_optimizer=keras.optimizers.Adam(args.seg_lr),
                      anatomy_weight=args.anatomy_weight,
                      smoothness_weight=args.smoothness_weight)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))
        log(f"new run: {json.dumps(vars(args))}; labelled {sum(labelled)}/{len(train)}")

    augment = None if args.no_augment else Augmenter()
    step = int(model.reg_optimizer.iterations) + int(model.seg_optimizer.iterations)
    sums, counts, started = {}, {}, time.perf_counter()
    while step < args.steps:
        rng = np.random.default_rng([args.seed, step])
        registration_turn = bool(model.is_registration_turn())
        pair = sample_pair(rng, labelled, registration_turn)
        # Registration steps see real affinely pre-aligned pairs, as at inference time;
        # segmentation steps see augmented images.
        spatial = None if registration_turn else augment
        logs = model.train_on_batch(make_batch(train, pair, labelled, spatial, rng),
                                    return_dict=True)
        step += 1
        for key, value in logs.items():
            if value != 0.0:
                sums[key] = sums.get(key, 0.0) + float(value)
                counts[key] = counts.get(key, 0) + 1
        if step % 25 == 0:
            seconds = (time.perf_counter() - started) / 25
            log(f"step {step} ({seconds:.2f} s/step) "
                + " ".join(f"{k} {sums[k] / counts[k]:.4f}" for k in sorted(sums)))
            sums, counts, started = {}, {}, time.perf_counter()
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_checkpoint(model, out)
        if step % args.validate_every == 0 or step == args.steps:
            result = model.evaluate(val, batch_size=1, verbose=0, return_dict=True)
            log(f"validation step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in
                                                        sorted(result.items())))
            started = time.perf_counter()
    log("done")


if __name__ == "__main__":
    sys.exit(main())
