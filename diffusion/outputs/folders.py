"""The output folders of a run, checked before anything is written into them.

Hydra makes the run's folder (``hydra.run.dir``, sample.py's ``out_dir``; ``hydra.sweep.dir`` for ``-m``) before the
task starts, and a folder it cannot make or write (a read-only or virtual filesystem, a path through a file) ends
in its traceback. :class:`OutputFolders`, a Hydra callback of both entry points, makes and probes the folder first
and stops with one paragraph that names the setting to change.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from diffusion.errors import RunError, exit_with


def check_writable(folder: Path, key: str) -> None:
    """Makes ``folder`` (with its parents) and writes a file in it; a :class:`RunError` naming ``key`` if either
    fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise RunError(
            f"cannot write to {folder} ({error.strerror or error}): the run keeps its results there. Fix the "
            f"folder's permissions or choose another with {key}=PATH."
        ) from None


class OutputFolders(Callback):
    """Checks the folder of a run (``run_key``: the setting the user gives it by) or of a sweep before Hydra makes it.

    Args:
        run_key: ``hydra.run.dir`` for train.py, ``out_dir`` for sample.py.
    """

    def __init__(self, run_key: str) -> None:
        self.run_key = run_key

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, self.run_key)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(folder: str, key: str) -> None:
        try:
            check_writable(Path(folder), key)
        except RunError as error:  # Hydra would print a traceback for an error raised here
            exit_with(error)
