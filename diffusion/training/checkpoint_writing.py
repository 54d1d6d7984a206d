"""Writing checkpoints: every file whole or absent, and the last finished step kept however a run ends.

Lightning 2.6 leaves three gaps, each of which lost finished work:

- Its ``ModelCheckpoint`` writes the end-of-training ``last.ckpt`` only when no checkpoint was written before, so a
  run of 2,500 steps with a checkpoint every 1,000 kept step 2,000.
- It saves nothing on Ctrl-C, and on SIGTERM (what cluster schedulers send before they kill a job) it stops but
  saves nothing either.
- Its checkpoint writer stages the file in ``$TMPDIR`` and moves it into place: across filesystems that is a copy,
  and a kill or a full disk during it truncates ``last.ckpt``, destroying the previous good one.

And its SIGTERM handling does not stop a multi-process run at one step: the handler forwards the signal to the
processes it launched and runs a collective broadcast from inside the signal handler, and each process stops at the
end of whichever step it is in when its own flag is set. Collectives then meet out of order (rank 0 gathering the
checkpoint's RNG states while rank 1 broadcasts or reduces gradients), and the run hangs.
"""

from __future__ import annotations

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
from diffusion.outputs.writers import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with the file staged beside its target and renamed into place
    (:func:`diffusion.outputs.writers.atomic_path`): a checkpoint is whole or absent, on every filesystem."""

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
      failed there would end the run before anything was saved), and again in ``on_train_end`` if the run
      ended some other way.
    - SIGTERM and Ctrl-C: the handlers only note the signal. At the end of each training step (after the EMA's
      update) the processes agree whether any of them received one (an all-reduce; Lightning 2.6 already
      synchronises every DDP step for its own SIGTERM broadcast), and if so every process stops at that step,
      through Lightning's own ``SIGTERMException``, and ``last.ckpt`` is written. A second Ctrl-C aborts at once,
      leaving the previous ``last.ckpt``.

    The periodic ``step_NNNNNNN.ckpt`` files keep their own steps, as before. A crash inside a training step
    writes nothing: the weights may be half-updated (and the non-finite-loss guard keeps NaN weights out).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.signal_received: int | None = None  # the signal that stopped the run, for train.py's message
        self._requested: int | None = None  # a signal noted by this process, not yet acted on
        self._last_saved_step: int | None = None
        self._previous_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ signals
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if threading.current_thread() is threading.main_thread():  # Lightning registered its own handlers before
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        again = ""
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C aborts at once
            again = " (Ctrl-C again aborts now)"
        rank_zero_info(f"\n{name}: stopping after this step and saving checkpoints/last.ckpt{again}")
        if self._requested is None:
            self._requested = signum

    def _stop_if_signalled(self, trainer: Trainer) -> None:
        """Stops every process at this step when any of them received a signal."""
        requested = self._requested is not None
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            self.signal_received = self._requested or signal.SIGTERM  # a process that was only told: SIGTERM
            trainer._signal_connector.received_sigterm = True  # Lightning raises SIGTERMException after this step

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)
        self._previous_handlers = {}

    # ------------------------------------------------------------------ the final step
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        self._stop_if_signalled(trainer)
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
