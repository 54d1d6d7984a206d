"""Writing checkpoints: every file whole or absent, and the last finished step kept however a run ends.

Lightning 2.6 leaves three gaps, each of which lost finished work:

- Its ``ModelCheckpoint`` writes the end-of-training ``last.ckpt`` only when no checkpoint was written before, so a
  run of 2,500 steps with a checkpoint every 1,000 kept step 2,000.
- It saves nothing on Ctrl-C, and on SIGTERM (what cluster schedulers send before they kill a job) it stops but
  saves nothing either.
- Its checkpoint writer stages the file in ``$TMPDIR`` and moves it into place: across filesystems that is a copy,
  and a kill or a full disk during it truncates ``last.ckpt``, destroying the previous good one.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusion.errors import RunError
from diffusion.writers import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with the file staged beside its target and renamed into place
    (:func:`diffusion.writers.atomic_path`): a checkpoint is whole or absent, on every filesystem."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        try:
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except OSError as error:
            raise RunError(
                f"could not write the checkpoint {path} ({error.strerror or error}); the previous checkpoint there, if "
                f"any, is intact. Free some space or fix the folder's permissions, then resume from the last "
                f"checkpoint with ckpt_path=PATH."
            ) from None


class Checkpoints(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` holds the last finished step at every ending of a run.

    - ``max_steps``, ``max_time`` or the last epoch: ``last.ckpt`` is written at the final step, in
      ``on_train_batch_end`` (before any end-of-training preview or metric, which callbacks draw in
      ``on_train_end``: Lightning runs checkpoint callbacks after all others in each hook, so a preview that
      failed there used to end the run before anything was saved), and again in ``on_train_end`` if the run
      ended some other way.
    - SIGTERM and Ctrl-C: Lightning's own SIGTERM handling stops the run between two steps, on every process at the
      same step; ``last.ckpt`` is written then. A first Ctrl-C is turned into that same SIGTERM, so that it too
      ends at a step boundary (never between the weights' update and the EMA's); a second Ctrl-C aborts at once,
      leaving the previous ``last.ckpt``.

    The periodic ``step_NNNNNNN.ckpt`` files keep their own steps, as before. A crash inside a training step
    writes nothing: the weights may be half-updated (and the non-finite-loss guard keeps NaN weights out).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.signal_received: int | None = None
        self._last_saved_step: int | None = None
        self._previous_sigint: Any = None

    # ------------------------------------------------------------------ signals
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C aborts at once
        self.signal_received = signal.SIGINT
        rank_zero_info("\nCtrl-C: stopping after this step and saving checkpoints/last.ckpt (Ctrl-C again aborts now)")
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler stops the run at the next step boundary

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    # ------------------------------------------------------------------ the final step
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if _training_ends(trainer):
            self.save_final(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.save_final(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            if self.signal_received is None:
                self.signal_received = signal.SIGTERM
            self.save_final(trainer)

    def save_final(self, trainer: Trainer) -> None:
        """Writes ``last.ckpt`` at the current step unless it already holds it."""
        if not self.save_last or self._last_saved_step == trainer.global_step or trainer.sanity_checking:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_saved_step = trainer.global_step


def _training_ends(trainer: Trainer) -> bool:
    """Whether the step just finished is the run's last: ``max_steps`` reached, a stop requested (``max_time``,
    early stopping), or the last batch of the last epoch."""
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    if trainer.should_stop:
        return True
    epochs = trainer.max_epochs
    last_batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready >= trainer.num_training_batches
    return epochs not in (None, -1) and trainer.current_epoch + 1 >= epochs and last_batch
