"""The one exception the application reports to its user as a message, without a traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any


class RunError(Exception):
    """Something about the user's input stops the run: the message says what is wrong and how to fix it."""


def report_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps an entry point: a :class:`RunError`, or a ``ValueError`` from the core's argument checks, ends the
    program with ``error: MESSAGE`` on stderr and exit status 1. ``HYDRA_FULL_ERROR=1`` shows the traceback."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except (RunError, ValueError) as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper
