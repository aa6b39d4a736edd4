"""dazoo's own exception types."""
from __future__ import annotations

import os


class DazooInputError(ValueError):
    """Bad user input (a file, an array or an argument), described in one line.

    The message names the offending file (or argument) and the problem, e.g.
    ``"scan.nii.gz: contains 12 NaN values"``. The CLI prints it without a traceback
    and exits with a non-zero status.

    Args:
        source: the file path or a short name of the input (``None`` when unknown).
        problem: what is wrong with it, one line.
    """

    def __init__(self, source: str | os.PathLike | None, problem: str):
        self.source = None if source is None else os.fspath(source)
        self.problem = problem
        super().__init__(problem if self.source is None else f"{self.source}: {problem}")
