"""The preprocessing config: :class:`PreprocessConfig`, the declarative description of how a
preset expects its images (checked on construction)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from dazoo.errors import DazooInputError

AXES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0),
         "S": (2, 1.0), "I": (2, -1.0)}
INTENSITY_KEYS = {
    "percentile": {"method", "lower", "upper", "nonzero"},
    "minmax": {"method", "nonzero"},
    "zscore": {"method", "nonzero"},
    "none": {"method"},
}
ALIGNMENTS = ("affine", "rigid", "none")
METRICS = ("correlation", "mi")
CENTRES = ("mass", "bbox", "fov")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """How a preset expects its images: a declarative, JSON-serialisable description.

    Args:
        voxel_size: 3 floats. Model voxel size in mm along the model's axes.
        shape: 3 ints. Model grid shape ``(D, H, W)``; each a multiple of ``2**levels``.
        orientation: str. Axis codes of the model grid (nibabel's convention: ``"RAS"`` means
            the first axis points to the Right, the second Anterior, the third Superior).
        levels: int. Number of down-sampling levels of the network (shape check).
        intensity: dict. ``{"method": "percentile", "lower": 0.5, "upper": 99.5}`` (clip to
            the percentiles, scale to [0, 1]), ``{"method": "minmax"}``,
            ``{"method": "zscore"}`` or ``{"method": "none"}``; ``"nonzero": true`` computes
            the statistics on non-zero voxels only (skull-stripped or masked images).
        template: str or None. Reference image, a path relative to the preset folder (the
            ``root`` given to :class:`Preprocessor`). The model grid is centred on it.
        alignment: str. ``"affine"`` (12 parameters), ``"rigid"`` or ``"none"``. Anything but
            ``"none"`` needs a template.
        metric: str. Alignment similarity: ``"correlation"`` (same modality) or ``"mi"``
            (Mattes mutual information, any modality).
        centre: str. Without a template, where the model grid is centred on the image:
            ``"mass"`` (intensity centre of mass), ``"bbox"`` (foreground bounding box) or
            ``"fov"`` (centre of the field of view).
        mirror: str. ``"none"``, or ``"auto"``: the alignment is also tried on the image
            mirrored left-right, and the better of the two (correlation with the template
            after alignment) is kept, so that a left limb is processed on the (right)
            template's side; the reflection is part of the recorded alignment, so results go
            back onto the input's grid unmirrored. Needs an alignment. Only for label tables
            without left/right structures (knee: medial/lateral are kept by a reflection; a
            brain's Left-X/Right-X would be swapped): ``dazoo train`` refuses the others.
    """

    voxel_size: tuple[float, float, float]
    shape: tuple[int, int, int]
    orientation: str = "RAS"
    levels: int = 4
    intensity: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"method": "percentile", "lower": 0.5, "upper": 99.5}
    )
    template: str | None = None
    alignment: str = "none"
    metric: str = "correlation"
    centre: str = "mass"
    mirror: str = "none"

    def __post_init__(self):
        name = "preprocess config"
        set_ = lambda key, value: object.__setattr__(self, key, value)  # noqa: E731
        set_("voxel_size", floats3(self.voxel_size, "voxel_size", name))
        if not isinstance(self.levels, int) or isinstance(self.levels, bool) or self.levels < 0:
            raise DazooInputError(name, f"levels must be a non-negative int, got {self.levels!r}")
        set_("shape", shape3(self.shape, 2**self.levels, name))
        set_("orientation", check_orientation(self.orientation, name))
        set_("intensity", check_intensity(self.intensity, name))
        if self.template is not None and not isinstance(self.template, (str, os.PathLike)):
            raise DazooInputError(name, f"template must be a path or null, got {self.template!r}")
        if self.template is not None:
            set_("template", os.fspath(self.template))
        choice(self.alignment, ALIGNMENTS, "alignment", name)
        choice(self.metric, METRICS, "metric", name)
        choice(self.centre, CENTRES, "centre", name)
        if self.alignment != "none" and self.template is None:
            raise DazooInputError(name, f"alignment {self.alignment!r} needs a template")
        choice(self.mirror, ("none", "auto"), "mirror", name)
        if self.mirror != "none" and self.alignment == "none":
            raise DazooInputError(name, "mirror \"auto\" needs an alignment")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (lists for tuples)."""
        out = dataclasses.asdict(self)
        out["voxel_size"] = list(self.voxel_size)
        out["shape"] = list(self.shape)
        out["intensity"] = dict(self.intensity)
        if self.mirror == "none":  # the configs (and fingerprints) of presets before it
            del out["mirror"]
        return out

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, source: str = "preprocess config"):
        """Build from a dict; unknown or missing keys raise :class:`DazooInputError`."""
        if not isinstance(config, Mapping):
            raise DazooInputError(source, "must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise DazooInputError(
                source, f"unknown key(s) {', '.join(map(repr, unknown))}; known: {sorted(known)}"
            )
        missing = [k for k in ("voxel_size", "shape") if k not in config]
        if missing:
            raise DazooInputError(source, f"missing key(s) {', '.join(map(repr, missing))}")
        try:
            return cls(**config)
        except DazooInputError as err:
            raise DazooInputError(source, err.problem) from None

    def to_json(self) -> str:
        """The config as an indented JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> PreprocessConfig:
        """Read a JSON file (e.g. a preset's ``preprocess.json``)."""
        from dazoo.io import read_json

        return cls.from_dict(read_json(path), source=os.fspath(path))

    def fingerprint(self) -> str:
        """A short hash of the config (for cache keys)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def choice(value, choices, key, name):
    if value not in choices:
        raise DazooInputError(name, f"{key} must be one of {', '.join(choices)}; got {value!r}")


def floats3(value, key, name) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise DazooInputError(name, f"{key} must be 3 numbers, got {value!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) and v > 0 for v in out):
        raise DazooInputError(name, f"{key} must be 3 positive numbers, got {value!r}")
    return out


def shape3(value, multiple, name) -> tuple[int, int, int]:
    try:
        values = list(value)
        ok = len(values) == 3 and all(
            not isinstance(v, bool) and float(v) == int(v) and int(v) > 0 for v in values
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DazooInputError(name, f"shape must be 3 positive ints, got {value!r}")
    out = tuple(int(v) for v in values)
    bad = [n for n in out if n % multiple]
    if bad:
        raise DazooInputError(
            name, f"shape {list(out)}: each dimension must be a multiple of {multiple} (2**levels)"
        )
    return out


def check_orientation(code, name) -> str:
    if not isinstance(code, str) or len(code) != 3:
        raise DazooInputError(name, f"orientation must be 3 axis codes like 'RAS', got {code!r}")
    code = code.upper()
    if any(c not in AXES for c in code) or len({AXES[c][0] for c in code}) != 3:
        raise DazooInputError(name, f"orientation {code!r} is not a valid axis code")
    return code


def check_intensity(spec, name) -> dict[str, Any]:
    if isinstance(spec, str):
        spec = {"method": spec}
    if not isinstance(spec, Mapping) or "method" not in spec:
        raise DazooInputError(name, f"intensity must be a dict with a 'method', got {spec!r}")
    spec = dict(spec)
    method = spec["method"]
    if method not in INTENSITY_KEYS:
        raise DazooInputError(
            name, f"intensity method must be one of {sorted(INTENSITY_KEYS)}, got {method!r}"
        )
    unknown = sorted(set(spec) - INTENSITY_KEYS[method])
    if unknown:
        raise DazooInputError(name, f"unknown intensity key(s) {unknown} for method {method!r}")
    if method == "percentile":
        spec.setdefault("lower", 0.5)
        spec.setdefault("upper", 99.5)
        lower, upper = spec["lower"], spec["upper"]
        if not (isinstance(lower, (int, float)) and isinstance(upper, (int, float))
                and 0 <= lower < upper <= 100):
            raise DazooInputError(name, "intensity percentiles need 0 <= lower < upper <= 100")
    if "nonzero" in spec and not isinstance(spec["nonzero"], bool):
        raise DazooInputError(name, "intensity 'nonzero' must be true or false")
    return spec
