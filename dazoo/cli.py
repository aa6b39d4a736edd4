"""The ``dazoo`` command line.

Every verb only parses its arguments and calls library functions. Heavy imports (Keras,
TensorFlow) happen inside the verbs, so ``dazoo --help`` is fast. Errors in the user's input
are printed as one line (``dazoo: error: <file>: <problem>``) with exit status 2, never as a
traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Sequence

from dazoo import __version__
from dazoo.errors import DazooInputError
from dazoo.startup import quiet_tensorflow, tensorflow

__all__ = ["main"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _note(path: str, notes) -> None:
    """What was decided for an input (e.g. the skull-strip decision), one line each."""
    for line in notes:
        print(f"note: {path}: {line}", file=sys.stderr, flush=True)


def _warn(path: str, warnings) -> None:
    """The input's failed sanity checks, one ``warning: FILE: ...`` line each."""
    for line in warnings:
        print(f"warning: {path}: {line}", file=sys.stderr, flush=True)


def _add_skull_strip(p) -> None:
    p.add_argument("--skull-strip", choices=("auto", "on", "off"), default=None,
                   help="brain extraction before the networks (presets trained on "
                        "skull-stripped brains: brain): auto (default) strips a head and "
                        "leaves a brain as it is, saying which on a note line; on; off")


_STRICT_HELP = ("make a failed input sanity check (implausible size, failed alignment, not "
                "skull-stripped, ...: printed as a warning otherwise) an error: exit 2, "
                "nothing written for that input")


# --------------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    """Train a tiny DeepAtlas on synthetic anatomies and write its results as NIfTI."""
    tensorflow()  # its start-up quiet (main asked for it)
    import numpy as np

    from dazoo.demo import run_demo

    started = time.perf_counter()
    report = run_demo(args.out, steps=args.steps, size=args.size, seed=args.seed, log=_log)
    _log(f"done in {time.perf_counter() - started:.0f} s")
    print(f"registration Dice (held-out pair, foreground mean): identity "
          f"{report['identity_dice']:.3f} -> DeepAtlas {report['registered_dice']:.3f}")
    print(f"segmentation Dice (held-out image, foreground mean): "
          f"{report['segmentation_dice']:.3f}")
    print(f"folding voxels: {100 * report['folding_fraction']:.3f} %")
    print(f"outputs in {os.path.abspath(args.out)}: "
          + ", ".join(sorted(os.path.basename(p) for p in report['files'])))
    return 0 if np.isfinite(report["registered_dice"]) else 1


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="train a tiny DeepAtlas on synthetic volumes and write NIfTI results",
        description="Generates synthetic labelled anatomies, trains a small DeepAtlas (joint "
                    "registration + segmentation, half of the subjects labelled) for a few "
                    "steps on the CPU, then registers and segments held-out subjects and "
                    "writes the images, label maps, displacement field and model to --out.",
    )
    p.add_argument("--out", default="dazoo-demo", help="output folder (default: dazoo-demo)")
    p.add_argument("--steps", type=int, default=240, help="training steps (default: 240)")
    p.add_argument("--size", type=int, default=32, choices=(32, 48, 64),
                   help="cubic volume size in voxels (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(run=_demo)


# --------------------------------------------------------------------------- segment
def _expand_inputs(inputs: Sequence[str], *, keep_going: bool,
                   outputs: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Files as given and the NIfTI/MGZ files inside folders (sorted); with ``keep_going``,
    paths that do not exist are returned apart (reported later) instead of raising. In a
    folder that is also an output folder, dazoo's own outputs (``*_seg``, ``*_prob``) are
    not inputs."""
    from dazoo.io import WRITABLE, stem

    own = {os.path.realpath(o) for o in outputs if o}
    files, missing = [], []
    for path in inputs:
        if os.path.isdir(path):
            mine = os.path.realpath(path) in own
            found = sorted(os.path.join(path, name) for name in os.listdir(path)
                           if name.endswith(WRITABLE) and not name.startswith(".")
                           and os.path.isfile(os.path.join(path, name))
                           and not (mine and stem(name).endswith(("_seg", "_prob"))))
            if not found:
                raise DazooInputError(path, "folder holds no .nii, .nii.gz or .mgz file")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        elif keep_going:
            missing.append(path)
        else:
            raise DazooInputError(path, "no such file or folder")
    return files, missing


def _missing_inputs(inputs: Sequence[str], missing: Sequence[str], verb: str) -> list:
    """The inputs that do not exist (``--continue-on-error``), each reported in one line, as
    ``[(path, error)]``; with no input left at all, the first of them (or "no input") is the
    error."""
    failed = [(path, DazooInputError(path, "no such file or folder")) for path in missing]
    if not inputs and not failed:
        raise DazooInputError(verb, "no input")
    _report_failed(failed, nothing_left=not inputs)
    return failed


def _report_failed(failed: Sequence, *, nothing_left: bool) -> None:
    """Prints each ``(what, error)`` of ``failed`` in one line; with nothing left to do, the
    first error is raised instead (main prints it: once)."""
    for _, err in failed[1:] if nothing_left else failed:
        print(f"dazoo: error: {err}", file=sys.stderr)
    if nothing_left:
        raise failed[0][1]


def _finish(done: int, verb: str, failed: Sequence, keep_going: bool) -> int:
    """The summary line of a many-input verb (with --continue-on-error or a failure) and
    its exit status: 2 if any input failed."""
    if keep_going or failed:
        _log(f"{done} {verb}, {len(failed)} failed"
             + (": " + ", ".join(p for p, _ in failed) if failed else ""))
    return 2 if failed else 0


def _file_or_folder(out: str, count: int, what: str) -> bool:
    """Whether ``out`` names a file (one input, a .nii/.nii.gz/.mgz name); refuses a name
    with another extension instead of making a folder of it."""
    from dazoo.io import WRITABLE

    if out.endswith(WRITABLE):
        if count != 1:
            raise DazooInputError(out, f"is a file name, but there are {count} inputs: give a "
                                       f"folder for the {what}")
        return True
    name = os.path.basename(out.rstrip("/"))
    suffix = name.rsplit(".", 1)[-1] if "." in name.strip(".") else ""
    if suffix and suffix.isalnum() and len(suffix) <= 6 and not os.path.isdir(out):
        raise DazooInputError(out, f"unsupported file extension '.{suffix}': use .nii, "
                                   f".nii.gz or .mgz, or a folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise DazooInputError(out, "is a file; give a folder for several inputs")
    return False


#: Fields of an output pattern (``-o 'segs/{subject}_seg.nii.gz'``) and ``--name-from``.
NAME_FIELDS = ("name", "parent", "subject", "path")


def _name_fields(inputs: Sequence[str]) -> list[dict]:
    """Per input: ``name`` (file name without its ending), ``parent`` (its folder's name),
    ``subject`` (the first folder below the inputs' common folder, e.g. ``bert`` of
    ``fs/bert/mri/T1.mgz``, ``sub-01`` of a BIDS path; the parent when all inputs share one
    folder) and ``path`` (the path below the common folder, ``/`` -> ``_``, no ending)."""
    from dazoo.io import stem

    absolute = [os.path.abspath(p) for p in inputs]
    common = os.path.commonpath([os.path.dirname(p) for p in absolute]) if absolute else ""
    fields = []
    for path in absolute:
        relative = os.path.relpath(os.path.dirname(path), common)
        parts = [] if relative == "." else relative.split(os.sep)
        parent = os.path.basename(os.path.dirname(path))
        fields.append({"name": stem(path), "parent": parent,
                       "subject": parts[0] if parts else parent,
                       "path": "_".join(parts + [stem(path)])})
    return fields


def _targets(inputs: Sequence[str], out: str, suffix: str, what: str,
             name_from: str = "name") -> list[str]:
    """Output path per input: ``out`` itself (one input, a NIfTI/MGZ name), ``out`` as a
    pattern with ``{name}``, ``{parent}``, ``{subject}``, ``{path}`` fields, or
    ``out/<field name_from><suffix>``. Two inputs given one output are refused."""
    fields = _name_fields(inputs)
    if "{" in out:
        from dazoo.io import WRITABLE

        try:
            targets = [out.format(**f) for f in fields]
        except (KeyError, IndexError, ValueError) as err:
            raise DazooInputError(out, f"bad output pattern ({err}); its fields are "
                                       + ", ".join("{%s}" % f for f in NAME_FIELDS)) from None
        if not out.endswith(WRITABLE):
            raise DazooInputError(out, "an output pattern must end in .nii, .nii.gz or .mgz")
    elif _file_or_folder(out, len(inputs), what):
        return [out]
    else:
        targets = [os.path.join(out, f"{f[name_from]}{suffix}") for f in fields]
    for number, target in enumerate(targets):
        first = targets.index(target)
        if first < number:
            hint = ("; name outputs after their folders: --name-from subject (or parent, path), "
                    "or a pattern such as -o 'segs/{subject}_seg.nii.gz'")
            raise DazooInputError(inputs[number], f"{inputs[first]} would also be written to "
                                                  f"{target}" + hint)
    return targets


def _pictures(inputs, targets, out, folder) -> list:
    """QC picture per input in ``folder``: named after its label map (``<input>_seg.png``
    for one output file), after the whole input path where those names would clash."""
    from dazoo.io import stem

    if not folder:
        return [None] * len(inputs)
    single = len(inputs) == 1 and "{" not in out
    names = [f"{stem(p)}_seg" if single else stem(t) for p, t in zip(inputs, targets)]
    if len(set(names)) < len(names):
        names = [f"{f['path']}_seg" for f in _name_fields(inputs)]
    return [os.path.join(folder, f"{n}.png") for n in names]


def _segment_targets(inputs: Sequence[str], out: str, name_from: str = "name") -> list[str]:
    return _targets(inputs, out, "_seg.nii.gz", "label maps", name_from)


def _check_outputs(outputs: Sequence[str | None], inputs: Sequence[str]) -> None:
    """Refuses, before any work, an output path that names an input file or that cannot be
    written (see :func:`_check_writable`)."""
    from dazoo.io import same_file

    for path in outputs:
        if path is not None and any(same_file(path, p) for p in inputs):
            raise DazooInputError(path, "refusing to overwrite an input file")
    for path in outputs:
        if path is not None:
            _check_writable(path)


def _check_writable(path: str) -> None:
    """Refuses an output whose folder cannot take it: the nearest existing folder above it
    must be a folder (not a file) in which a file can be created (tried: a probe file,
    removed at once; permissions alone do not tell, e.g. for root in /proc)."""
    import tempfile

    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise DazooInputError(path, f"cannot be written: {probe} is a file, not a folder")
    try:
        handle, name = tempfile.mkstemp(prefix=".dazoo-probe-", dir=probe)
        os.close(handle)
        os.remove(name)
    except OSError as err:
        raise DazooInputError(path, f"cannot be written in {probe} "
                                    f"({err.strerror or err})") from None


def _load(preset: str):
    """The preset's pipeline: its name or folder checked first (no TensorFlow needed), then
    TensorFlow started (quietly) and the networks loaded."""
    from dazoo.hub import load
    from dazoo.presets import DEEPATLAS, get_preset

    get_preset(preset).require(DEEPATLAS)
    tensorflow()
    return load(preset)


def _device() -> str:
    """Where the networks run, for the first result line (an error stays one line)."""
    from dazoo.startup import device_summary

    return device_summary()


def _write_qc_scores(path: str, rows: list[dict], names: dict) -> None:
    """One row per scan: the per-scan QC measures of ``Segmentation.measures`` (see the
    guide's "QC scores" for what predicts a bad result), then each region's confidence."""
    import csv
    import io as stringio

    from dazoo.io import write_text_atomic

    ids = sorted(i for i in names if i != 0)
    columns = ["confidence", "flip_agreement", "alignment", "outside", "scale"]
    buffer = stringio.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "warnings", *columns, "extent_R_mm", "extent_A_mm",
                     "extent_S_mm"] + [f"{names[i]} ({i}) confidence" for i in ids])

    def shown(value):
        return "" if value is None else f"{value:.4f}"

    for row in rows:
        m = row["measures"]
        extent = m.get("extent_mm") or [None] * 3
        regions = m.get("region_confidence", {})
        writer.writerow([row["image"], row["warnings"], *[shown(m.get(c)) for c in columns],
                         *[shown(v) for v in extent],
                         *[shown(regions.get(str(i))) for i in ids]])
    write_text_atomic(path, buffer.getvalue())


def _parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N`` (argparse type)."""
    index, _, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N, e.g. 0/8") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text!r}: I counts from 0 to N-1")
    return index, count


def _shard(inputs: list[str], missing: list[str], shard: tuple[int, int]):
    """Shard ``I`` of ``N``: every N-th input of the list sorted by path, from the I-th
    (nnU-Net's ``-part_id/-num_parts``): the shards of one input list are disjoint, cover it,
    and do not depend on the order the inputs were given in."""
    index, count = shard
    everything = sorted(set(inputs) | set(missing), key=os.path.abspath)
    mine = set(everything[index::count])
    return [p for p in inputs if p in mine], [p for p in missing if p in mine]


def _write_volumes(path: str, rows: list[dict], names: dict,
                   groups: dict | None = None) -> None:
    """One row per scan: the file, mm^3 per region (named columns), then the total of each
    structure group (``total <group> mm3``) where the table has groups."""
    import csv
    import io as stringio

    from dazoo.io import write_text_atomic
    from dazoo.labels import group_members

    ids = sorted(i for i in names if i != 0)
    members = group_members(groups or {})
    buffer = stringio.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image"] + [f"{names[i]} ({i}) mm3" for i in ids]
                    + [f"total {group} mm3" for group in members])
    for row in rows:
        volumes = row["volumes"]
        writer.writerow([row["image"]] + [f"{volumes.get(i, 0.0):.1f}" for i in ids]
                        + [f"{sum(volumes.get(i, 0.0) for i in group):.1f}"
                           for group in members.values()])
    write_text_atomic(path, buffer.getvalue())


def _segment(args: argparse.Namespace) -> int:
    keep_going = args.continue_on_error
    inputs, missing = _expand_inputs(args.inputs, keep_going=keep_going,
                                     outputs=[args.output, args.probabilities])
    targets = _segment_targets(inputs, args.output, args.name_from) if inputs else []
    if args.probabilities and args.probabilities.endswith(".mgz"):
        raise DazooInputError(args.probabilities, "probabilities are written as .nii or .nii.gz")
    probabilities = (_targets(inputs, args.probabilities, "_prob.nii.gz", "probabilities",
                              args.name_from)
                     if args.probabilities and inputs else [None] * len(inputs))
    pictures = _pictures(inputs, targets, args.output, args.qc)
    if args.shard:  # after naming: an output's name does not depend on the shard
        kept, missing = _shard(inputs, missing, args.shard)
        keep = [n for n, p in enumerate(inputs) if p in set(kept)]
        inputs, targets, probabilities, pictures = (
            [x[n] for n in keep] for x in (inputs, targets, probabilities, pictures))
        _log(f"shard {args.shard[0]}/{args.shard[1]}: {len(inputs) + len(missing)} inputs")
        if not inputs and not missing:
            return 0
    for table, what in ((args.volumes, "the volumes table"), (args.qc_scores, "the QC scores")):
        if table and not table.endswith(".csv"):
            raise DazooInputError(table, f"{what} is written as .csv")
    outputs = targets + [p for p in probabilities if p] + [
        t for t in (args.volumes, args.qc_scores) if t]
    _check_outputs(outputs, inputs)
    seen = set()
    for path in outputs:
        real = os.path.realpath(path)
        if real in seen:
            raise DazooInputError(path, "is asked for as two outputs")
        seen.add(real)
    failed = _missing_inputs(inputs, missing, "segment")
    pipeline = _load(args.preset)
    rows = []
    for number, (path, target, prob, picture) in enumerate(
            zip(inputs, targets, probabilities, pictures), 1):
        try:
            result = pipeline.segment(
                path, probabilities=args.probabilities_dtype if prob is not None else False,
                strict=args.strict, flip=args.flip, skull_strip=args.skull_strip)
            _note(path, result.notes)
            _warn(path, result.warnings)
            result.save(target, protect=inputs)
            if prob is not None:
                result.save_probabilities(prob, dtype=args.probabilities_dtype, protect=inputs)
            if args.qc:
                from dazoo.qc import label_overlay

                os.makedirs(args.qc, exist_ok=True)
                label_overlay(path, result.labels, picture,
                              title=f"{os.path.basename(path)}: {pipeline.name}",
                              names=pipeline.label_names, groups=pipeline.label_groups)
        except DazooInputError as err:
            if not keep_going:
                raise
            print(f"dazoo: error: {err}", file=sys.stderr)
            failed.append((path, err))
            continue
        rows.append({"image": path, "volumes": result.volumes(), "measures": result.measures,
                     "warnings": len(result.warnings)})
        _log(f"[{number}/{len(inputs)}] {path} -> {target} ({result.seconds:.1f} s"
             + (f", {pipeline.name}, {_device()})" if len(rows) == 1 else ")"))
    if args.volumes and rows:
        _write_volumes(args.volumes, rows, pipeline.label_names, pipeline.label_groups)
        _log(f"volumes: {args.volumes}")
    if args.qc_scores and rows:
        _write_qc_scores(args.qc_scores, rows, pipeline.label_names)
        _log(f"QC scores: {args.qc_scores}")
    return _finish(len(rows), "segmented", failed, keep_going)


def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment images in their native space",
                       description="Segments each input with a pretrained preset; the label "
                                   "maps are written on each input's own grid and affine.")
    p.add_argument("inputs", nargs="+", metavar="IN",
                   help="NIfTI (.nii, .nii.gz) or MGZ images, or folders of them")
    p.add_argument("-o", "--output", required=True,
                   help="output file (one input), folder (<name>_seg.nii.gz per input), or a "
                        "pattern with {name} {parent} {subject} {path}, e.g. "
                        "'segs/{subject}_seg.nii.gz' for subject/t1.nii.gz inputs")
    p.add_argument("--name-from", choices=NAME_FIELDS, default="name",
                   help="name outputs in a folder after the file name (default), its parent "
                        "folder, the subject folder (first folder below the inputs' common "
                        "folder) or the whole path below it")
    p.add_argument("--preset", default="brain", help="preset name or folder (default: brain)")
    p.add_argument("--probabilities", metavar="OUT",
                   help="also write class probabilities (4D NIfTI on the input's grid, channel "
                        "k = class k of the label table): a file (one input) or a folder "
                        "(<name>_prob.nii.gz)")
    p.add_argument("--probabilities-dtype", choices=("uint8", "float32"), default="uint8",
                   help="uint8: p x 255 (default; stated in the header), or float32")
    p.add_argument("--volumes", metavar="CSV",
                   help="write a table of region volumes (mm^3, one row per scan)")
    p.add_argument("--qc", metavar="DIR",
                   help="write a picture per scan (three slices, labels overlaid) to DIR")
    p.add_argument("--qc-scores", metavar="CSV",
                   help="write a table of per-scan QC scores (segmenter confidence overall "
                        "and per region, flip agreement with --flip, the input checks' "
                        "measurements); low confidence predicts a poor segmentation (see "
                        "docs/guide.md for how well)")
    p.add_argument("--continue-on-error", action="store_true",
                   help="skip a bad input (its one-line error is printed), process the rest, "
                        "print a summary; exit status 2 if any failed")
    p.add_argument("--shard", type=_parse_shard, metavar="I/N",
                   help="process only shard I (0..N-1) of N: every N-th input of the list "
                        "sorted by path, for N cluster array jobs (names as for the whole "
                        "list; one --volumes table per shard)")
    p.add_argument("--strict", action="store_true", help=_STRICT_HELP)
    _add_skull_strip(p)
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="left-right test-time augmentation: average with the mirrored scan "
                        "(left/right labels swapped back; twice the network time). Default: "
                        "the preset's choice")
    p.set_defaults(run=_segment)


# --------------------------------------------------------------------------- strip
def _strip(args: argparse.Namespace) -> int:
    from dazoo.io import stem
    from dazoo.presets import EXTRACTOR, get_preset

    keep_going = args.continue_on_error
    inputs, missing = _expand_inputs(args.inputs, keep_going=keep_going,
                                     outputs=[args.output, args.mask])
    targets = _targets(inputs, args.output, "_brain.nii.gz", "brains") if inputs else []
    masks = (_targets(inputs, args.mask, "_mask.nii.gz", "masks") if args.mask and inputs
             else [None] * len(inputs))
    _check_outputs(targets + [m for m in masks if m], inputs)
    failed = _missing_inputs(inputs, missing, "strip")
    get_preset(args.preset).require(EXTRACTOR)
    tensorflow()
    from dazoo.preprocess.skullstrip import BrainExtractor

    extractor = BrainExtractor.from_preset(args.preset)
    done = 0
    for number, (path, target, mask) in enumerate(zip(inputs, targets, masks), 1):
        try:
            result = extractor.extract(path)
            written = result.save(target, mask, protect=inputs)
            if args.qc:
                from dazoo.qc import label_overlay

                os.makedirs(args.qc, exist_ok=True)
                written.append(label_overlay(path, result.mask,
                                             os.path.join(args.qc, f"{stem(target)}.png"),
                                             names={1: "brain"}, alpha=0.25))
        except DazooInputError as err:
            if not keep_going:
                raise
            print(f"dazoo: error: {err}", file=sys.stderr)
            failed.append((path, err))
            continue
        done += 1
        _log(f"[{number}/{len(inputs)}] {path} -> {', '.join(written)} (brain "
             f"{result.volume_ml:.0f} mL, {result.seconds:.1f} s"
             + (f", {_device()})" if done == 1 else ")"))
    return _finish(done, "stripped", failed, keep_going)


def _add_strip(sub) -> None:
    p = sub.add_parser("strip", help="brain extraction (skull stripping) of T1 head scans",
                       description="Extracts the brain of each T1-weighted head scan with the "
                                   "brainmask preset (deepbet's networks in Keras): the "
                                   "stripped image and, with --mask, the brain mask, both on "
                                   "the input's own grid and affine.")
    p.add_argument("inputs", nargs="+", metavar="IN",
                   help="NIfTI (.nii, .nii.gz) or MGZ images, or folders of them")
    p.add_argument("-o", "--output", required=True,
                   help="stripped image: a file (one input) or a folder (<name>_brain.nii.gz)")
    p.add_argument("--mask", metavar="OUT",
                   help="also write the brain mask (uint8 0/1): a file or a folder "
                        "(<name>_mask.nii.gz)")
    p.add_argument("--preset", default="brainmask",
                   help="brain-extraction preset (default: brainmask)")
    p.add_argument("--qc", metavar="DIR", help="write a picture per scan (mask outlined)")
    p.add_argument("--continue-on-error", action="store_true",
                   help="skip a bad input (one-line error), process the rest; exit 2 if any "
                        "failed")
    p.set_defaults(run=_strip)


# --------------------------------------------------------------------------- register
def _register(args: argparse.Namespace) -> int:
    outputs = {"moved": args.moved, "warp": args.warp, "moved_labels": args.moved_labels,
               "jacobian": args.jacobian}
    if not (any(outputs.values()) or args.qc):
        raise DazooInputError("register", "nothing to write: give --moved, --warp, "
                                          "--moved-labels, --jacobian and/or --qc")
    if args.warp and not args.warp.endswith((".nii", ".nii.gz")):
        raise DazooInputError(args.warp, "displacement fields are written as .nii or .nii.gz")
    if args.pairs:
        if args.moving or args.fixed or args.moving_labels:
            raise DazooInputError("--pairs", "takes the images from the pairs file: give no "
                                             "MOVING FIXED or --moving-labels with it")
        jobs = _pair_jobs(args.pairs, outputs, args.qc, args.name_from)
    else:
        if not (args.moving and args.fixed):
            raise DazooInputError("register", "needs MOVING and FIXED images (or --pairs CSV)")
        if args.continue_on_error or args.name_from != "name":
            raise DazooInputError("register", "--continue-on-error and --name-from go with "
                                              "--pairs")
        if args.moved_labels and not args.moving_labels:
            raise DazooInputError("--moved-labels", "needs --moving-labels")
        for path in (args.moved, args.moved_labels, args.jacobian):
            if path:
                _file_or_folder(path, 1, "output")
        picture = None
        if args.qc:
            from dazoo.io import stem

            picture = os.path.join(args.qc, f"{stem(args.moving)}_to_{stem(args.fixed)}.png")
        jobs = [{"moving": args.moving, "fixed": args.fixed,
                 "moving_labels": args.moving_labels, "outputs": outputs, "qc": picture}]
    inputs = sorted({p for job in jobs for p in (job["moving"], job["fixed"],
                                                 job["moving_labels"]) if p})
    keep_going = args.continue_on_error
    failed, ready = [], []
    for job in jobs:
        absent = [p for p in (job["moving"], job["fixed"], job["moving_labels"])
                  if p and not os.path.isfile(p)]
        if absent and not keep_going:
            raise DazooInputError(absent[0], "no such file")
        if absent:
            failed.append((f"{job['moving']} -> {job['fixed']}",
                           DazooInputError(absent[0], "no such file")))
        else:
            ready.append(job)
    written_paths = [p for job in jobs for p in list(job["outputs"].values()) + [job["qc"]] if p]
    _check_outputs(written_paths, inputs)
    _report_failed(failed, nothing_left=not ready)
    # Scans in more than one pair are kept once prepared (see Pipeline.reusing_inputs).
    counts = {}
    for job in ready:
        for path in {os.path.realpath(job["moving"]), os.path.realpath(job["fixed"])}:
            counts[path] = counts.get(path, 0) + 1
    shared = {path for path, count in counts.items() if count > 1}
    pipeline = _load(args.preset)
    done = 0
    with pipeline.reusing_inputs(only=shared):  # a scan in several pairs: prepared once
        for number, job in enumerate(ready, 1):
            try:
                _register_pair(pipeline, args, job, inputs,
                               f"[{number}/{len(ready)}] " if args.pairs else "")
            except DazooInputError as err:
                if not keep_going:
                    raise
                print(f"dazoo: error: {err}", file=sys.stderr)
                failed.append((f"{job['moving']} -> {job['fixed']}", err))
                continue
            done += 1
    if args.pairs:
        return _finish(done, "registered", failed, keep_going)
    return 0


def _register_pair(pipeline, args, job: dict, inputs: Sequence[str], prefix: str) -> None:
    """Registers one pair of :func:`_register`'s jobs and writes its outputs."""
    moving, fixed, out = job["moving"], job["fixed"], job["outputs"]
    _log(f"{prefix}registering {moving} -> {fixed}")
    result = pipeline.register(moving, fixed, moving_labels=job["moving_labels"],
                               strict=args.strict, refine=args.refine,
                               skull_strip=args.skull_strip)
    for line in result.notes:
        role, _, text = line.partition(": ")
        _note(moving if role == "moving" else fixed, [text])
    for line in result.warnings:
        role, _, text = line.partition(": ")
        _warn(moving if role == "moving" else fixed, [text])
    written = result.save(moved=out["moved"], warp=out["warp"], moved_labels=out["moved_labels"],
                          warp_convention=args.warp_convention, warp_dtype=args.warp_dtype,
                          jacobian=out["jacobian"], protect=inputs)
    if job["qc"]:
        from dazoo.qc import registration_overlay

        os.makedirs(os.path.dirname(job["qc"]) or ".", exist_ok=True)
        written.append(registration_overlay(
            fixed, result.moved, result.displacement, job["qc"],
            title=f"{os.path.basename(moving)} -> {os.path.basename(fixed)}"))
    _log(f"{prefix}done in {result.seconds:.1f} s ({pipeline.name}, {_device()}); "
         f"{_folding_line(result, out['jacobian'])}; wrote {', '.join(written)}")


#: Columns of ``dazoo register --pairs``'s CSV (``moving_labels`` optional).
PAIR_COLUMNS = ("moving", "fixed", "moving_labels")


def _read_pairs(path: str) -> list[dict]:
    """The pairs of a CSV with the columns ``moving``, ``fixed`` and optionally
    ``moving_labels`` (other columns are ignored); relative paths are relative to the CSV's
    folder."""
    import csv

    if not os.path.isfile(path):
        raise DazooInputError(path, "no such pairs file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = []
            for row in reader:  # extra fields (a trailing comma) are under the key None
                rows.append((reader.line_num, {k.strip(): (v or "").strip()
                                               for k, v in row.items() if k is not None}))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DazooInputError(path, f"cannot be read as CSV ({err})") from None
    if not {"moving", "fixed"} <= set(columns):
        raise DazooInputError(path, "needs a header line with the columns moving and fixed "
                                    "(and optionally moving_labels); found "
                                    + (", ".join(columns) or "none"))
    base = os.path.dirname(os.path.abspath(path))
    pairs = []
    for line, row in rows:
        if not any(row.get(c) for c in PAIR_COLUMNS):
            continue  # a blank line
        if not (row.get("moving") and row.get("fixed")):
            raise DazooInputError(path, f"line {line}: needs both a moving and a fixed image")
        pairs.append({c: os.path.normpath(os.path.join(base, row[c])) if row.get(c) else None
                      for c in PAIR_COLUMNS})
    if not pairs:
        raise DazooInputError(path, "holds no pairs")
    return pairs


def _pair_jobs(path: str, outputs: dict, qc: str | None, name_from: str) -> list[dict]:
    """:func:`_read_pairs` with each output pattern filled in per pair: ``{moving}`` and
    ``{fixed}`` are the images' names (``name_from``: file name, parent folder, subject
    folder or path, see :func:`_name_fields`); every pair must get its own outputs."""
    from dazoo.io import WRITABLE

    pairs = _read_pairs(path)
    if outputs["moved_labels"] and not all(p["moving_labels"] for p in pairs):
        raise DazooInputError(path, "--moved-labels needs a moving_labels for every pair")
    names = {role: [f[name_from] for f in _name_fields([p[role] for p in pairs])]
             for role in ("moving", "fixed")}
    jobs = []
    for n, pair in enumerate(pairs):
        fields = {"moving": names["moving"][n], "fixed": names["fixed"][n]}
        filled = {}
        for key, pattern in outputs.items():
            if not pattern:
                filled[key] = None
                continue
            if not pattern.endswith(WRITABLE):
                raise DazooInputError(pattern, "with --pairs, outputs are patterns ending in "
                                               ".nii, .nii.gz or .mgz, e.g. "
                                               "'out/{moving}_to_{fixed}.nii.gz'")
            try:
                filled[key] = pattern.format(**fields)
            except (KeyError, IndexError, ValueError) as err:
                raise DazooInputError(pattern, f"bad output pattern ({err}); its fields are "
                                               "{moving} and {fixed}") from None
        picture = (os.path.join(qc, f"{fields['moving']}_to_{fields['fixed']}.png")
                   if qc else None)
        jobs.append({**pair, "outputs": filled, "qc": picture})
    seen = {}
    for job in jobs:
        for target in [*job["outputs"].values(), job["qc"]]:
            if target is None:
                continue
            real = os.path.realpath(target)
            if real in seen and seen[real] == f"{job['moving']} -> {job['fixed']}":
                raise DazooInputError(target, "is asked for as two outputs of one pair")
            if real in seen:
                raise DazooInputError(
                    target, f"would be written for two pairs ({seen[real]} and "
                            f"{job['moving']} -> {job['fixed']}): put {{moving}} and {{fixed}} "
                            "in the output patterns, or name them by folder: --name-from "
                            "subject (or parent, path)")
            seen[real] = f"{job['moving']} -> {job['fixed']}"
    return jobs


def _folding_line(result, jacobian_path) -> str:
    """Folding as measured where it is: the network's deformation on the model grid, and,
    when the Jacobian map was written, that map's own count on the fixed image's grid (the
    whole transform resampled there can fold where the model grid's does not)."""
    line = (f"folding {100 * result.folding_fraction:.4f} % of model-grid voxels (the "
            f"deformable part)")
    if jacobian_path:
        det = result.jacobian_map().array
        line += (f"; {os.path.basename(jacobian_path)} (fixed grid, affine included): "
                 f"{int((det <= 0).sum())} voxels <= 0, min {float(det.min()):.3g}")
    return line


def _add_register(sub) -> None:
    p = sub.add_parser("register", help="register a moving image onto a fixed image",
                       description="Affine pre-alignment and deformable registration with a "
                                   "pretrained preset. Outputs are on the FIXED image's own "
                                   "grid and affine.")
    p.add_argument("moving", nargs="?", help="image to deform")
    p.add_argument("fixed", nargs="?", help="reference image")
    p.add_argument("--pairs", metavar="CSV",
                   help="register many pairs in one run (the networks load and trace once): "
                        "a CSV with the columns moving, fixed and optionally moving_labels "
                        "(paths relative to the CSV's folder); the outputs are then patterns "
                        "with {moving} and {fixed}, e.g. --moved 'out/{moving}_to_{fixed}.nii.gz'")
    p.add_argument("--name-from", choices=NAME_FIELDS, default="name",
                   help="with --pairs: what {moving} and {fixed} name: the file name "
                        "(default), its parent folder, the subject folder or the whole path")
    p.add_argument("--continue-on-error", action="store_true",
                   help="with --pairs: report a pair that fails and go on with the others "
                        "(exit status 2 at the end)")
    p.add_argument("--moved", help="output: the moved image")
    p.add_argument("--warp", help="output: displacement field in mm (5D NIfTI vector image), "
                                  "fixed -> moving, on the fixed grid")
    p.add_argument("--warp-convention", choices=("itk", "ras"), default="itk",
                   help="vector components in LPS (itk: ITK/ANTs/Slicer, default) or RAS")
    p.add_argument("--warp-dtype", choices=("float32", "int16"), default="float32",
                   help="int16 halves the warp file: 16-bit integers with the NIfTI scale "
                        "factor, resolution max|d|/32000 mm (NIfTI has no 16-bit float)")
    p.add_argument("--moving-labels", help="label map of the moving image to carry along")
    p.add_argument("--moved-labels", help="output: the moved label map")
    p.add_argument("--jacobian", help="output: Jacobian determinant map of the transform on "
                                      "the fixed grid (affine included; <= 0: folding)")
    p.add_argument("--qc", metavar="DIR", help="write a picture (checkerboard, deformed grid, "
                                               "Jacobian) to DIR")
    p.add_argument("--preset", default="brain", help="preset name or folder (default: brain)")
    p.add_argument("--strict", action="store_true", help=_STRICT_HELP)
    _add_skull_strip(p)
    p.add_argument("--refine", type=int, metavar="N",
                   help="iterations of anatomy-guided test-time refinement of the network's "
                        "velocity (image similarity + smoothness + soft Dice of the warped "
                        "segmentations; --moving-labels guide it when given); default: the "
                        "preset's (0: the network alone)")
    p.set_defaults(run=_register)


# --------------------------------------------------------------------------- warp
def _warp(args: argparse.Namespace) -> int:
    from dazoo import io
    from dazoo.postprocess import warp_native

    for path in (args.image, args.warp, args.reference):
        if not os.path.isfile(path):
            raise DazooInputError(path, "no such file")
    _file_or_folder(args.output, 1, "output")
    _check_outputs([args.output], [args.image, args.warp, args.reference])
    field = io.read_displacement(args.warp)
    reference = io.read_image(args.reference)
    if not io.same_grid(field, reference):
        raise DazooInputError(args.warp, f"is not on the grid of {args.reference} (a warp "
                                         "from dazoo register lives on the fixed image's grid)")
    started = time.perf_counter()
    if args.labels:
        moving = io.read_labels(args.image)
        moved = warp_native(moving, field, reference.affine, order=0)
        io.write_labels((moved, reference.affine), args.output,
                        protect=[args.image, args.warp, args.reference])
    else:
        moved = warp_native(io.read_image(args.image), field, reference.affine,
                            order=args.order)
        io.write_image((moved, reference.affine), args.output,
                       protect=[args.image, args.warp, args.reference])
    _log(f"{args.image} -> {args.output} ({time.perf_counter() - started:.1f} s)")
    return 0


def _add_warp(sub) -> None:
    p = sub.add_parser("warp", help="apply a warp written by dazoo register to an image or "
                                    "label map",
                       description="Resamples IMAGE (in its own native space) through a "
                                   "displacement field written by dazoo register --warp (its "
                                   "ITK/RAS convention is read from the file) onto the "
                                   "reference (fixed) grid.")
    p.add_argument("image", help="image or label map to move (the moving image's space)")
    p.add_argument("--warp", required=True, help="displacement field from dazoo register")
    p.add_argument("--reference", required=True, help="the fixed image (grid of the output)")
    p.add_argument("-o", "--output", required=True, help="output NIfTI/MGZ")
    p.add_argument("--labels", action="store_true",
                   help="IMAGE is a label map: nearest neighbour, ids kept")
    p.add_argument("--order", type=int, choices=(0, 1, 3), default=1,
                   help="interpolation order for images (default 1, linear)")
    p.set_defaults(run=_warp)


# --------------------------------------------------------------------------- qc
def _qc(args: argparse.Namespace) -> int:
    from dazoo import io
    from dazoo.qc import label_overlay, registration_overlay

    for path in (args.image, args.labels, args.warp, args.moved):
        if path and not os.path.isfile(path):
            raise DazooInputError(path, "no such file")
    if not args.output.endswith(".png"):
        raise DazooInputError(args.output, "QC pictures are written as .png")
    if args.warp:
        field = io.read_displacement(args.warp)
        if not io.same_grid(field, io.read_image(args.image)):
            raise DazooInputError(args.warp, f"is not on the grid of {args.image} (the fixed "
                                             "image of dazoo register)")
        registration_overlay(args.image, args.moved, field, args.output, title=args.title)
    else:
        label_overlay(args.image, args.labels, args.output, title=args.title)
    _log(f"wrote {args.output}")
    return 0


def _add_qc(sub) -> None:
    p = sub.add_parser("qc", help="a QC picture of an image, its labels or a registration",
                       description="Three orthogonal slices of IMAGE in world orientation "
                                   "with --labels overlaid; or, with --warp and --moved, a "
                                   "registration check on the fixed image IMAGE "
                                   "(checkerboard, deformed grid, Jacobian determinant).")
    p.add_argument("image", help="the image (the fixed image for a registration)")
    p.add_argument("--labels", help="label map on IMAGE's grid")
    p.add_argument("--warp", help="displacement field from dazoo register (on IMAGE's grid)")
    p.add_argument("--moved", help="the moved image from dazoo register (with --warp: a "
                                   "fixed/moved checkerboard)")
    p.add_argument("--title", help="picture title (default: the file name)")
    p.add_argument("-o", "--output", required=True, help="output .png")
    p.set_defaults(run=_qc)


# --------------------------------------------------------------------------- evaluate
def _evaluate(args: argparse.Namespace) -> int:
    import json

    from dazoo.training import load_subjects
    from dazoo.evaluate import evaluate_registration, evaluate_segmentation, summarise
    subjects = [s for s in load_subjects(args.data, image=args.image, labels=args.labels)
                if s.labels]
    if not subjects:
        raise DazooInputError(args.data, "no subject has a label map to evaluate against")
    pipeline = _load(args.preset)
    report = {"preset": pipeline.name, "data": os.path.abspath(args.data),
              "subjects": [s.name for s in subjects]}
    ids = _scored_ids(pipeline, subjects, args.data)
    if not args.skip_segmentation:
        _log(f"segmentation of {len(subjects)} subjects ({pipeline.name}, {_device()})")
        per_subject = evaluate_segmentation(pipeline, subjects, log=_log, ids=ids)
        report["segmentation"] = {"summary": summarise(per_subject), "subjects": per_subject}
    if args.pairs != 0 and len(subjects) > 1:
        import itertools

        pairs = list(itertools.permutations(range(len(subjects)), 2))
        if args.pairs > 0:
            pairs = pairs[: args.pairs]
        _log(f"registration of {len(pairs)} ordered pairs")
        per_pair = evaluate_registration(pipeline, subjects, pairs=pairs, log=_log, ids=ids)
        report["registration"] = {"summary": summarise(per_pair), "pairs": per_pair}
    for task in ("segmentation", "registration"):
        if task in report:
            summary = report[task]["summary"]
            line = (f"{task}: mean Dice {summary['mean_dice']:.3f} over {summary['count']} "
                    f"(left/right merged {summary['mean_merged_dice']:.3f}), "
                    f"{summary['seconds']:.1f} s each")
            if "folding_fraction" in summary:
                line += f", folding {100 * summary['folding_fraction']:.4f} % of voxels"
            print(line)
            for group, value in summary.get("group_dice", {}).items():
                print(f"  {group}: mean Dice {value:.3f}")
    if args.output:
        from dazoo.io import write_text_atomic

        write_text_atomic(args.output, json.dumps(report, indent=1))
        _log(f"report: {args.output}")
    return 0


def _scored_ids(pipeline, subjects, data) -> list[int]:
    """The preset's label ids that some subject's label map has: a structure that no map of
    the data set labels (another protocol: e.g. cortex-only DKT maps against a whole-brain
    preset) is left out of the scores, with a note, instead of scoring 0 everywhere."""
    import numpy as np

    from dazoo import io

    table = [int(i) for i in pipeline.class_ids if i != 0]
    present = set()
    for subject in subjects:
        present.update(np.unique(io.read_labels(subject.labels).array).tolist())
    ids = [i for i in table if i in present]
    if not ids:
        raise DazooInputError(data, f"no label map has any of the {pipeline.name} preset's "
                                    f"{len(table)} label ids")
    if len(ids) < len(table):
        missing = [pipeline.label_names.get(i, str(i)) for i in table if i not in present]
        _note(data, [f"{len(missing)} of the preset's {len(table)} structures are in none of "
                     f"the label maps, left out of the scores: {', '.join(missing[:5])}"
                     + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")])
    return ids


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="Dice per region and folding of a preset on a labelled folder",
        description="Segments every labelled subject and registers ordered pairs of them "
                    "with a preset, scoring at the scans' native resolution against their "
                    "manual labels. DATA is a CSV manifest (image,labels) or a folder: "
                    "images/ + labels/, or one subfolder per subject (--image/--labels "
                    "patterns).")
    p.add_argument("data", help="CSV manifest or data folder")
    p.add_argument("--preset", default="brain", help="preset name or folder (default: brain)")
    p.add_argument("--image", default="image.*",
                   help="image file pattern inside subject folders (default: image.*)")
    p.add_argument("--labels", default="labels.*",
                   help="label file pattern inside subject folders (default: labels.*)")
    p.add_argument("--pairs", type=int, default=-1,
                   help="number of ordered pairs to register (-1: all, 0: none)")
    p.add_argument("--skip-segmentation", action="store_true")
    p.add_argument("-o", "--output", help="write the full report (JSON) here")
    p.set_defaults(run=_evaluate)


# --------------------------------------------------------------------------- list
def _list(args: argparse.Namespace) -> int:
    from dazoo.presets import get_preset, list_presets

    if args.card:
        print(get_preset(args.card).file("README.md").read_text())
        return 0
    presets = list_presets()
    if not presets:
        print("no presets installed")
    for preset in presets:
        meta = preset.metadata
        made = f", dazoo {meta['dazoo_version']}" if meta.get("dazoo_version") else ""
        print(f"{preset.name}  (version {meta.get('version', '?')}{made}, "
              f"{meta.get('license', '?')})")
        print(f"    {preset.description}")
        for key, value in meta.get("summary", {}).items():
            print(f"    {key}: " + (f"{value:.3f}" if isinstance(value, float) else f"{value}"))
        print(f"    model card: dazoo list --card {preset.name}   folder: {preset.path}")
    return 0


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list the pretrained presets and their model cards")
    p.add_argument("--card", metavar="PRESET", help="print this preset's full model card")
    p.set_defaults(run=_list)


# --------------------------------------------------------------------------- train
def _add_patterns(p) -> None:
    p.add_argument("--image", help="image file pattern inside each subject folder, may name "
                                   "subfolders, e.g. 'mri/T1.mgz' (default: image.*; BIDS: "
                                   "*_T1w.nii*)")
    p.add_argument("--labels", help="label file pattern likewise; subjects without one are "
                                    "unlabelled (default: labels.*; BIDS: *_dseg.nii*, also "
                                    "under derivatives/)")


def _command_line() -> str:
    import shlex

    return "dazoo " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _precision_arg(value):
    """``--precision``'s value (a name or a JSON object), checked; None when not given."""
    import json

    from dazoo.training.precision import network_precisions

    if value is None:
        return None
    try:
        precision = json.loads(value) if value.lstrip().startswith("{") else value
        network_precisions(precision)
    except ValueError as e:
        raise DazooInputError("--precision", str(e)) from None
    return precision


def _train(args: argparse.Namespace) -> int:
    tensorflow()  # its start-up quiet (main asked for it)
    from dazoo.training.engine import make_strategy, train

    strategy = make_strategy(args.strategy) if args.strategy else None  # before any TF op
    if args.resume:
        if args.recipe is not None or args.output is not None:
            raise DazooInputError("--resume", "give only the run folder: dazoo train --resume RUN/")
        if args.data is not None or args.image is not None or args.labels is not None:
            raise DazooInputError("--resume", "a resumed run keeps its data")
        run = train(None, args.resume, resume=True, strategy=strategy,
                    precision=_precision_arg(args.precision), overrides=list(args.set or ()),
                    log=_log)
    else:
        if args.precision is not None:
            raise DazooInputError("--precision", "is for --resume; a new run takes the "
                                  "recipe's (--set precision=...)")
        if args.recipe is None or args.output is None:
            raise DazooInputError("train", "needs RECIPE.json and -o RUN/ (or --resume RUN/)")
        from dazoo.training.recipe import Recipe

        _check_writable(os.path.join(args.output, "run.json"))
        recipe = Recipe.load(args.recipe)
        overrides = list(args.set or ())
        if args.data is not None:
            if not os.path.exists(args.data):
                raise DazooInputError(args.data, "no such file or folder")
            overrides.append(f"data.train={os.path.abspath(args.data)}")
        for key in ("image", "labels"):
            if getattr(args, key) is not None:
                overrides.append(f"data.{key}={getattr(args, key)}")
        if overrides:
            recipe = recipe.with_overrides(overrides)
        run = train(recipe, args.output, command=_command_line(), strategy=strategy, log=_log)
    print(f"{run.folder}: {run.steps} steps")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a DeepAtlas from a JSON recipe into a run folder",
        description="Trains the model a recipe declares (data, labels, preprocessing, "
                    "networks, losses, schedule, optimizers, augmentation; see "
                    "dazoo.training.recipe). The run folder gets checkpoints (resumable "
                    "exactly after a kill), CSV / TensorBoard logs and the validation scores; "
                    "`dazoo export RUN/ -o PRESET/` turns it into a preset.")
    p.add_argument("recipe", nargs="?", help="recipe file (JSON)")
    p.add_argument("-o", "--output", metavar="RUN", help="run folder (new)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder")
    p.add_argument("--precision", metavar="P",
                   help="with --resume: continue in this precision (float32, mixed_bfloat16 "
                        "or a JSON object per network), e.g. float32 on a machine that "
                        "emulates bfloat16; recorded in the run")
    p.add_argument("--data", help="training data (CSV manifest or folder) instead of the "
                                  "recipe's data.train")
    _add_patterns(p)
    p.add_argument("--strategy", choices=("mirrored", "multi_worker"),
                   help="tf.distribute: all local GPUs (mirrored) or several machines "
                        "(multi_worker, cluster in TF_CONFIG); batch_size is the global batch")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set training.steps=300 (JSON values; "
                        "repeatable); with --resume only training.checkpoint_every, "
                        "training.validate_every and training.validation_pairs")
    p.set_defaults(run=_train)


def _export(args: argparse.Namespace) -> int:
    tensorflow()  # its start-up quiet (main asked for it)
    from dazoo.training.exporter import export

    preset = export(args.run_folder, args.output, checkpoint=args.checkpoint,
                    command=_command_line(), log=_log)
    print(f"preset {preset.name}: {preset.path}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a preset folder from a training run",
                       description="Writes a preset (config, weights with sha256, "
                                   "preprocessing, template, labels, recipe, model card) from "
                                   "a run folder's best (or last) checkpoint and its record.")
    p.add_argument("run_folder", metavar="RUN", help="run folder of dazoo train / finetune")
    p.add_argument("-o", "--output", required=True, metavar="PRESET", help="preset folder")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="best validation score (default) or the last checkpoint")
    p.set_defaults(run=_export)


def _finetune(args: argparse.Namespace) -> int:
    tensorflow()  # its start-up quiet (main asked for it)
    from dazoo.training.engine import finetune, make_strategy

    strategy = make_strategy(args.strategy) if args.strategy else None  # before any TF op
    for path in [args.data] + ([args.validation] if args.validation else []):
        if not os.path.exists(path):
            raise DazooInputError(path, "no such file or folder")
    for path in (args.output, args.run_dir or f"{args.output.rstrip('/')}.run"):
        _check_writable(os.path.join(path, "x"))
    preset = finetune(args.parent, args.data, args.output, steps=args.steps,
                      validation=args.validation, image=args.image, labels=args.labels,
                      data_terms=args.data_terms,
                      labels_from_data=args.labels_from_data,
                      freeze=args.freeze or (), learning_rate=args.lr, seed=args.seed,
                      run=args.run_dir, resume=args.resume, strategy=strategy,
                      command=_command_line(), log=_log)
    print(f"preset {preset.name}: {preset.path}")
    return 0


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a preset on your own scans (labelled and unlabelled)",
        description="Fine-tunes a preset (architecture, weights, preprocessing and training "
                    "options of the parent) on a cohort: a CSV manifest image,labels (an "
                    "empty labels cell for an unlabelled image) or a data folder. Labelled "
                    "and unlabelled images are both used. The result is a preset folder for "
                    "dazoo segment/register --preset and dazoo.load().")
    p.add_argument("--from", dest="parent", default="brain",
                   help="parent preset name or folder (default: brain)")
    p.add_argument("--data", required=True,
                   help="cohort: CSV manifest or data folder (images/ + labels/, one subfolder "
                        "per subject with --image/--labels patterns, or BIDS sub-*/anat/)")
    _add_patterns(p)
    p.add_argument("-o", "--output", required=True, metavar="PRESET", help="new preset folder")
    p.add_argument("--steps", type=int, default=400, help="training steps (default: 400)")
    p.add_argument("--validation", help="labelled validation scans (CSV manifest or folder, "
                                        "same patterns): scored at native resolution, the "
                                        "best checkpoint is exported")
    p.add_argument("--data-terms", metavar="TEXT",
                   help="the cohort's license or terms of use, written into the new preset's "
                        "card (the weights derive from the cohort too)")
    p.add_argument("--labels-from-data", action="store_true",
                   help="the cohort's own label ids as the label table (re-initialises the "
                        "segmenter's last layer); default: the parent's, unknown ids -> "
                        "background")
    p.add_argument("--freeze", action="append", choices=("registration", "segmentation"),
                   help="keep this network fixed (train only the other)")
    p.add_argument("--lr", type=float, help="learning rate of both optimizers (default: the "
                                            "parent recipe's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--run", dest="run_dir", help="run folder for checkpoints and logs (default: PRESET.run)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted fine-tuning")
    p.add_argument("--strategy", choices=("mirrored", "multi_worker"),
                   help="tf.distribute, as for dazoo train")
    p.set_defaults(run=_finetune)


# --------------------------------------------------------------------------- main
#: Verbs that run TensorFlow (imported quietly before them).
_TENSORFLOW_VERBS = {"segment", "register", "strip", "evaluate", "train", "finetune", "export",
                     "demo"}


_VERBS: list[Callable] = [_add_segment, _add_register, _add_strip, _add_warp, _add_qc, _add_evaluate,
                          _add_train, _add_finetune, _add_export, _add_list, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dazoo",
        description="DeepAtlas joint registration and segmentation (Keras 3).",
    )
    parser.add_argument("--version", action="version", version=f"dazoo {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's own log messages (hidden by default)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads dazoo may use: TensorFlow's, and the resampling's "
                             "and compression's (DAZOO_THREADS; default: all cores, at most 16 "
                             "for the latter)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for add in _VERBS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 ok, 1 failure, 2 bad input or usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.threads is not None:  # dazoo.parallel's threads (NumPy / SciPy / zlib)
        os.environ["DAZOO_THREADS"] = str(args.threads)
    if args.verb in _TENSORFLOW_VERBS:  # imported by the verb once its arguments are checked
        quiet_tensorflow(verbose=args.verbose, threads=args.threads, now=False)
    try:
        return args.run(args)
    except DazooInputError as err:
        print(f"dazoo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dazoo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
