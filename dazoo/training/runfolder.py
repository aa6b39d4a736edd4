"""The run folder of ``dazoo train``: created new or resumed, the log that goes to both the
caller and ``RUN/train.log``, and the run's record (``RUN/run.json``). See
:mod:`dazoo.training.engine` for what the folder holds.
"""
from __future__ import annotations

import datetime
import json
import pathlib
from collections.abc import Callable

from dazoo import io
from dazoo.errors import DazooInputError
from dazoo.training.recipe import Recipe

__all__ = ["RunFolder", "worker", "now", "write_json"]


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def write_json(path: pathlib.Path, data) -> None:
    io.write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def worker(strategy) -> tuple[bool, int, int]:
    """``(is chief, task index, workers)`` of a ``tf.distribute`` strategy (None or a single
    process: the chief)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True, 0, 1
    spec = resolver.cluster_spec().as_dict()
    workers = sum(len(v) for k, v in spec.items() if k in ("chief", "worker"))
    kind, index = resolver.task_type, int(resolver.task_id or 0)
    chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in spec)
    return chief, index, workers


class RunFolder:
    """A run folder, opened new (``recipe`` written as ``RUN/recipe.json``) or to resume (its
    own ``recipe.json`` and ``run.json`` read back). Under a multi-worker strategy a worker
    other than the chief uses ``out/.worker-i``.

    Attributes:
        path: the folder.
        recipe: the recipe (the run's own copy when resuming).
        record: the ``run.json`` record, or None for a new run.
        chief, task, workers: see :func:`worker`.
    """

    def __init__(self, out, *, recipe: Recipe | None, resume: bool, strategy=None,
                 log: Callable[[str], None]):
        self.chief, self.task, self.workers = (worker(strategy) if strategy is not None
                                               else (True, 0, 1))
        folder = pathlib.Path(out)
        self.path = folder if self.chief else folder / f".worker-{self.task}"
        self._log = log
        self.created = False
        if resume:
            if not (self.path / "run.json").is_file():
                raise DazooInputError(self.path, "is not a run folder (no run.json) to resume")
            self.recipe = Recipe.load(self.path / "recipe.json")
            self.record = json.loads((self.path / "run.json").read_text())
        else:
            if (self.path / "run.json").exists() or (self.path / "checkpoint.keras").exists():
                raise DazooInputError(self.path, "holds a run already: resume it (--resume) "
                                                 "or choose another folder")
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            io.write_text_atomic(self.path / "recipe.json", recipe.to_json() + "\n")
            self.recipe, self.record = recipe, None
        self._file = open(self.path / "train.log", "a", buffering=1, encoding="utf-8")

    def say(self, message: str) -> None:
        """To the caller's log and ``RUN/train.log`` (with the time)."""
        import time

        self._log(message)
        self._file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def write_record(self, record: dict) -> None:
        self.record = record
        write_json(self.path / "run.json", record)

    def close(self) -> None:
        self._file.close()

    def discard(self) -> bool:
        """After a failure before the run started (no ``run.json`` written): removes the
        folder this call created unless it holds preprocessed volumes worth keeping (the
        same ``-o`` reuses them). Returns whether it was removed."""
        import shutil

        self.close()
        cache = self.path / "cache"
        if (not self.created or self.record is not None or (self.path / "run.json").exists()
                or (cache.is_dir() and any(cache.iterdir()))):
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        return True
