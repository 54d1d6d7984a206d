"""The one exception the application reports to its user as a message, without a traceback."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


class RunError(Exception):
    """Something about the user's input stops the run: the message says what is wrong and how to fix it."""


PACKAGE = Path(__file__).resolve().parent  # diffusion/


def raised_by_the_project(error: BaseException) -> bool:
    """Whether the innermost frame of the error's traceback is in the ``diffusion`` package (an argument check of
    the core, such as an unknown schedule name), rather than elsewhere (where a ValueError is a bug to show)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE)


def report_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps an entry point: a :class:`RunError`, or a ``ValueError`` raised by the project's own argument checks,
    ends the program with ``error: MESSAGE`` on stderr and exit status 1. A ``ValueError`` from inside a library is
    a bug and keeps its traceback; ``HYDRA_FULL_ERROR=1`` shows the traceback of every error."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except (RunError, ValueError) as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            if not isinstance(error, RunError) and not raised_by_the_project(error):
                raise
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper
