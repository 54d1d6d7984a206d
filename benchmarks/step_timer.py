"""A callback that times train.py's steady state for benchmarks/train_app.py: added on the command line as
``+callbacks.step_timer={_target_:step_timer.StepTimer,start:S,steps:N,path:FILE}`` with benchmarks/ on PYTHONPATH.

It waits for the device only at the two ends of its window (after step ``start`` and after step ``start + steps``),
so it adds no synchronisation to the steps it times, and writes ``{"steps", "images", "seconds"}`` to ``path``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class StepTimer(Callback):
    def __init__(self, *, start: int, steps: int, path: str) -> None:
        self.start, self.steps, self.path = start, steps, Path(path)
        self._t0: float | None = None
        self._images = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *_) -> None:
        step = trainer.global_step
        if step == self.start and self._t0 is None:
            self._sync(pl_module)
            self._t0 = time.perf_counter()
        elif self._t0 is not None and step <= self.start + self.steps:
            self._images += len(batch[0]) * trainer.world_size
            if step == self.start + self.steps:
                self._sync(pl_module)
                seconds = time.perf_counter() - self._t0
                self.path.write_text(json.dumps({"steps": self.steps, "images": self._images, "seconds": seconds}))

    @staticmethod
    def _sync(pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
