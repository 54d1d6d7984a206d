"""The errors the application reports to its user as one paragraph, without a traceback, and the reporter.

Which errors are the user's is decided by their type, never by where they were raised: :class:`UserError` and its
two kinds. Every other exception, a ``ValueError`` of the project's own included (a shape check in the network hit
by a bug), keeps its traceback. Plain Python, so that every layer, the core included, can raise them.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn


class UserError(Exception):
    """Something the user gave stops the run: the message says what is wrong and how to fix it."""


class RunError(UserError):
    """The run cannot go on as asked: a missing or unreadable file, data that does not fit, a checkpoint of
    another model, a device that is not there."""


class SettingError(UserError, ValueError):
    """A setting or an argument outside what it can be: an unknown choice, a number out of its range. Also a
    ``ValueError``, so that code calling the core as a library catches it as one."""


def is_rank_zero() -> bool:
    """Whether this process is the first of its run (or the only one), from the variables that the launchers set:
    Lightning's (``LOCAL_RANK``, ``NODE_RANK``), torchrun's (``RANK``) and SLURM's (``SLURM_PROCID``)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def report_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps an entry point: a :class:`UserError` ends the program with ``error: MESSAGE`` on stderr and exit
    status 1; in a multi-process run only the first process prints it (each process meets the same bad input, so
    the others leave with the same status, silently). ``HYDRA_FULL_ERROR=1`` shows the traceback of every error."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except UserError as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            exit_with(error)

    return wrapper


def exit_with(error: UserError) -> NoReturn:
    """Ends the program with ``error: MESSAGE`` on stderr (the first process of a run only) and exit status 1."""
    if is_rank_zero():
        print(f"error: {error}", file=sys.stderr)
    raise SystemExit(1) from None
