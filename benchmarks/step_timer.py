"""Callbacks that time and profile train.py's steady state for benchmarks/train_app.py: added on the command line as
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


class StepProfiler(Callback):
    """``torch.profiler`` over train.py's steps ``start`` to ``start + steps``: writes the operators sorted by their
    own device time (CPU time on a CPU) to ``path``, and a Chrome trace beside it. Added like :class:`StepTimer`:
    ``+callbacks.step_profiler={_target_:step_timer.StepProfiler,start:S,steps:N,path:FILE}``."""

    def __init__(self, *, start: int, steps: int, path: str, rows: int = 40) -> None:
        self.start, self.steps, self.path, self.rows = start, steps, Path(path), rows
        self._profiler: torch.profiler.profile | None = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *_) -> None:
        step = trainer.global_step
        cuda = pl_module.device.type == "cuda"
        if step == self.start and self._profiler is None:
            kinds = torch.profiler.ProfilerActivity
            self._profiler = torch.profiler.profile(activities=[kinds.CPU, *([kinds.CUDA] if cuda else [])])
            self._profiler.__enter__()
        elif self._profiler is not None and step == self.start + self.steps:
            StepTimer._sync(pl_module)
            self._profiler.__exit__(None, None, None)
            sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            table = self._profiler.key_averages().table(sort_by=sort, row_limit=self.rows)
            self.path.write_text(f"{self.steps} steps from step {self.start}\n{table}\n")
            self._profiler.export_chrome_trace(str(self.path.with_suffix(".trace.json")))
            self._profiler = None
