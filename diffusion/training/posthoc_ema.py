"""Post-hoc EMA (Karras et al. 2024, Section 3): track power-function averages of the weights during training and keep
their snapshots, from which ``sample.py ema_length=...`` reconstructs the average of any length afterwards
(:mod:`diffusion.core.posthoc_ema` has the math, :mod:`diffusion.models.posthoc_ema` the reconstruction).

The snapshots go to ``RUN/ema_snapshots/step_NNNNNNN.pt``, one file per snapshot time holding every tracked
average in a compact dtype, written by rank zero through a temporary file and one rename, like the checkpoints.
The averages themselves (float32, on the training device) are the callback's state in every checkpoint, so a
resume continues them exactly, and ``sample.py`` reconstructs at the checkpoint's own training time from them and
the snapshots before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from diffusion.core.posthoc_ema import gamma_of_sigma_rel, power_beta
from diffusion.errors import RunError, SettingError
from diffusion.models.posthoc_ema import STATE_KEY
from diffusion.outputs.writers import atomic_path

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class PostHocEMA(Callback):
    """Power-function averages of the weights, one per ``sigma_rels`` length, updated after every optimizer step
    with beta = (1 - B / t)^(gamma + 1) (B the step's global batch in images, t the images seen after it), and a
    snapshot of all of them every ``every_n_images`` training images.

    It sits beside :class:`diffusion.training.callbacks.EMA`, which still gives the previews, validation and the
    checkpoint's ``state_dict`` their average: this one only tracks and stores. Every process updates its own
    copy from the same synchronised weights (as the EMA does), and rank zero writes the snapshots.

    Args:
        sigma_rels: the tracked lengths (relative standard deviations of the profiles), e.g. ``[0.05, 0.10]``.
        every_n_images: training images between snapshots; 0 switches the callback off (nothing tracked).
        dirpath: the snapshots' folder.
        dtype: ``float16`` | ``bfloat16`` | ``float32``: the snapshots' dtype (the tracked averages stay float32).
    """

    def __init__(self, *, sigma_rels: list[float], every_n_images: int, dirpath: str | Path, dtype: str) -> None:
        # every_n_images and sigma_rels are in diffusion/settings.py's ranges, checked before any work
        if dtype not in DTYPES:
            raise SettingError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        sigma_rels = [float(s) for s in sigma_rels]
        self.sigma_rels, self.every_n_images, self.dtype = sigma_rels, every_n_images, dtype
        self.gammas = [float(gamma_of_sigma_rel(s)) for s in sigma_rels]
        self.dirpath = Path(dirpath)
        self.images = 0  # training images seen (global), after the latest update
        self._latest_update_step = 0
        self._names: list[str] = []
        self._averages: list[list[Tensor]] | None = None  # per tracked length, the parameters' averages
        self._loaded: list[dict[str, Tensor]] | None = None  # from a checkpoint, until training starts

    @property
    def enabled(self) -> bool:
        return self.every_n_images > 0

    @property
    def state_key(self) -> str:
        """Where sample.py finds this callback's state in a checkpoint
        (:data:`diffusion.models.posthoc_ema.STATE_KEY`)."""
        return STATE_KEY

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled:
            return
        named = [(n, p.detach()) for n, p in pl_module.named_parameters()]
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        if self._loaded is not None:  # a resume: continue the checkpoint's averages
            self._averages = [[saved[n].to(p.device, p.dtype) for n, p in named] for saved in self._loaded]
            self._loaded = None
        else:  # overwritten by the first step's copy (beta = 0)
            self._averages = [[p.clone() for p in self._params] for _ in self.sigma_rels]

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args) -> None:
        # once per optimizer step (with gradient accumulation, batches that did not step leave global_step alone)
        if self._averages is None or trainer.global_step <= self._latest_update_step:
            return
        images = len(batch[0]) * trainer.world_size * trainer.accumulate_grad_batches  # this step's global batch
        before, self.images = self.images, self.images + images
        for averages, gamma in zip(self._averages, self.gammas, strict=True):
            beta = power_beta(self.images, images, gamma)
            if beta == 0.0:
                torch._foreach_copy_(averages, self._params)
            else:
                torch._foreach_lerp_(averages, self._params, 1.0 - beta)
        self._latest_update_step = trainer.global_step
        if self.images // self.every_n_images > before // self.every_n_images and trainer.is_global_zero:
            self._write_snapshot(trainer.global_step)

    def _write_snapshot(self, step: int) -> None:
        assert self._averages is not None
        dtype = DTYPES[self.dtype]
        snapshot = {
            "step": step,
            "images": self.images,
            "sigma_rels": self.sigma_rels,
            "averages": [
                {n: a.to(dtype).cpu() for n, a in zip(self._names, averages, strict=True)}
                for averages in self._averages
            ],
        }
        with atomic_path(self.dirpath / f"step_{step:07d}.pt") as tmp:
            torch.save(snapshot, tmp)

    def averages(self) -> list[dict[str, Tensor]]:
        """The tracked averages now, by parameter name (float32, on the CPU)."""
        if self._averages is None:
            return [] if self._loaded is None else self._loaded
        return [
            {n: a.detach().cpu().clone() for n, a in zip(self._names, averages, strict=True)}
            for averages in self._averages
        ]

    def state_dict(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return {
            "images": self.images,
            "latest_update_step": self._latest_update_step,
            "sigma_rels": self.sigma_rels,
            "averages": self.averages(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if not state_dict:  # the checkpoint's run did not track: the averages (and their time) start at the resume
            rank_zero_info("post-hoc EMA: the checkpoint tracked no averages; they start at this resume")
            return
        if state_dict["sigma_rels"] != self.sigma_rels:
            raise RunError(
                f"the checkpoint tracked post-hoc EMA lengths {state_dict['sigma_rels']} and this run asks for "
                f"{self.sigma_rels}: its snapshots could not be combined with the new ones. Resume with "
                f"callbacks.posthoc_ema.sigma_rels=[{','.join(f'{s:g}' for s in state_dict['sigma_rels'])}]"
            )
        self.images = state_dict["images"]
        self._latest_update_step = state_dict["latest_update_step"]
        self._loaded = state_dict["averages"]
