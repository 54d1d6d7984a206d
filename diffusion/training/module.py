"""The LightningModule: a :class:`~diffusion.core.model.DiffusionModel` (a network under an objective) trained with
the objective's losses."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import Metric

from diffusion.core.lr_schedule import lr_factor
from diffusion.core.model import DiffusionModel
from diffusion.errors import RunError
from diffusion.models.building import build_model
from diffusion.models.checkpoints import upgrade_checkpoint


class LossByQuartile(Metric):
    """The mean of per-image losses in each of ``groups`` groups (the timestep quartiles), summed over processes.

    Accumulated on the device with two ``index_add_``, so an update never waits for it: torchmetrics' ``MeanMetric``
    tests every update for NaN on the host (a synchronisation per update on a GPU), and with that test switched off
    (``nan_strategy="disable"``) torchmetrics 1.9 drops the weights that would pick out a quartile. A group that
    saw no image is NaN.
    """

    full_state_update = False

    def __init__(self, groups: int = 4) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(groups), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(groups), dist_reduce_fx="sum")

    def update(self, losses: Tensor, group: Tensor) -> None:
        """losses: ``(B,)``; group: ``(B,)`` int64 in ``[0, groups)``."""
        self.total.index_add_(0, group, losses.float())
        self.count.index_add_(0, group, torch.ones_like(losses, dtype=self.count.dtype))

    def compute(self) -> Tensor:
        return self.total / self.count


def own_storage(state: Tensor) -> Tensor:
    """A random-number state as ``torch.set_rng_state`` can take it: uint8, contiguous, in a storage of its own.

    Checkpoints of multi-process runs may hold each process's state as a view into one shared storage; loaded, rank
    k's view starts at offset k * n, and ``torch.set_rng_state`` of a tensor with a non-zero storage offset segfaults
    (PyTorch 2.14: ``s = torch.get_rng_state(); torch.set_rng_state(torch.cat([s, s])[len(s):])``).
    """
    return state.to(torch.uint8).clone(memory_format=torch.contiguous_format)


class DiffusionModule(LightningModule):
    """Trains :attr:`model`, the network of ``configs/model`` under the objective of ``configs/diffusion``. Every
    argument is a plain dict saved with ``save_hyperparameters`` in the layout of :mod:`diffusion.models.hparams`, so
    a checkpoint alone rebuilds the model (:func:`diffusion.models.checkpoints.load_model`, which needs no Lightning).
    How samples are drawn is passed to the model's ``denoiser`` and never stored here.

    Args:
        model: the network's ``_target_`` and settings (``configs/model``), plus the speed switches ``compile``,
            ``channels_last`` and ``checkpointing`` (activation checkpointing: less memory, more time).
        diffusion: the objective's ``_target_`` and settings (``configs/diffusion``), plus ``label_dropout``.
        optimizer: AdamW and learning-rate schedule settings (``configs/optimizer``).
        dataset: the dataset's settings (``configs/dataset``) and the run's seed; image_size and channels shape the
            network, the rest lets ``sample.py`` find the training and test images again.
    """

    def __init__(self, *, model: dict, diffusion: dict, optimizer: dict, dataset: dict) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(self.hparams)
        self.label_dropout = diffusion["label_dropout"]
        self.optimizer_settings = dict(optimizer)
        self.loss_by_quartile = LossByQuartile()

    # The weights to sample with: a seam between the EMA callback, which offers its averaged copy of this module,
    # and the callbacks that draw samples, which need not know about each other. Kept out of the registered
    # children (no second copy of the weights in state_dict) and out of copies (__getstate__).
    def offer_weights_for_sampling(self, module: DiffusionModule | None) -> None:
        self.__dict__["_sampling_weights"] = module

    def weights_for_sampling(self) -> DiffusionModel:
        """The model to sample with: the averaged weights' when an EMA offered them, else this module's."""
        return (self.__dict__.get("_sampling_weights") or self).model

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_sampling_weights", None)
        return state

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.world_size > 1:
            # seed_everything gives every process the same seed, so without this the processes of a data-parallel
            # run would draw the same noise levels, noise, label dropout and dropout masks for their different
            # images. Rank 0 keeps the seed of a one-process run; a resume then restores each process's own state.
            torch.manual_seed(self.hparams["dataset"]["seed"] + 1_000_003 * self.global_rank)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not self.model.conditional:
            return
        if datamodule.num_classes != self.model.num_classes:
            raise RunError(
                f"model.num_classes is {self.model.num_classes} but the dataset has {datamodule.num_classes} classes; "
                f"set model.num_classes={datamodule.num_classes} (or null for an unconditional model)"
            )

    def losses(
        self, x0: Tensor, labels: Tensor, level: Tensor, noise: Tensor, drop: Tensor | None
    ) -> dict[str, Tensor]:
        """The objective's per-image losses of the network on ``x0`` at ``level`` with ``noise``; the class labels
        where ``drop`` is true replaced by the null label (classifier-free guidance: Ho & Salimans 2022, Alg. 1)."""
        model = self.model
        if not model.conditional:
            labels = None
        elif drop is not None:
            labels = torch.where(drop, torch.full_like(labels, model.num_classes), labels)
        return model.objective.losses(lambda x, c: model.network_output(x, c, labels), x0, level, noise)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        objective = self.model.objective
        level = objective.training_levels(x0.shape[0], x0.device)
        drop = torch.rand(x0.shape[0], device=x0.device) < self.label_dropout if self.model.conditional else None
        terms = self.losses(x0, labels, level, torch.randn_like(x0), drop)
        loss = terms["loss"].mean()
        self.log("train/loss", loss, prog_bar=True)
        for name in sorted(terms.keys() - {"loss"}):  # the parts (vb), and a learned weighting's unweighted loss and u
            self.log(f"train/{name}", terms[name].mean())
        self.loss_by_quartile.update(terms.get("unweighted", terms["loss"]).detach(), objective.quartile(level))
        return loss

    def on_train_epoch_end(self) -> None:
        """The epoch's loss by quarter of the training noise levels, as improved-diffusion logs it by timestep
        quartile: which noise levels the model still gets wrong (``train/loss_q0`` nearest the data)."""
        if self.loss_by_quartile.update_count == 0:  # a resumed run that starts at the end of an epoch
            return
        # compute() has already summed the metric over the processes, so every process logs the same values;
        # sync_dist averages those equal values (four scalars once an epoch) and keeps Lightning from warning, on
        # every multi-process run, that an epoch-level value is logged unsynchronised
        for q, value in enumerate(self.loss_by_quartile.compute()):
            self.log(f"train/loss_q{q}", value, sync_dist=True)
        self.loss_by_quartile.reset()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """The training loss on held-out images, with noise levels and noise fixed per batch, so that values from
        one validation to the next differ only through the model."""
        x0, labels = batch
        g = torch.Generator(device=x0.device).manual_seed(1_000_003 * batch_idx + self.global_rank)
        level = self.model.objective.training_levels(x0.shape[0], x0.device, g)
        noise = torch.randn(x0.shape, device=x0.device, generator=g)
        loss = self.losses(x0, labels, level, noise, None)["loss"].mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x0.shape[0])

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clips the gradients (``trainer.gradient_clip_val``); logs their norm before clipping (``train/grad_norm``).

        Done here rather than by Lightning's precision plugin, which refuses to clip for any optimizer that unscales
        its gradients itself, such as fused AdamW, under every ``*-mixed`` precision. That refusal is only needed for
        float16: there the gradients are still multiplied by the loss scale when this hook runs (Lightning unscales
        them beforehand only for optimizers that do not do it themselves). So under a ``GradScaler`` the gradients
        of such an optimizer are unscaled here first, once; the scaler then hands the fused kernel no scale and only
        its found-inf flag, and skips the step on overflow as usual. bf16 and fp32 have no loss scale. The fused
        kernel is kept in every case.
        """
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)
        if gradient_clip_val is not None and gradient_clip_val > 0 and gradient_clip_algorithm in (None, "norm"):
            norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)  # the norm before clipping
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            if gradient_clip_val is not None and gradient_clip_val > 0:  # "value"
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
        self.log("train/grad_norm", norm)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (fused on CPU and CUDA when ``fused``), with linear warm-up then a constant, cosine or
        inverse-square-root learning rate."""
        s = self.optimizer_settings
        optimizer = torch.optim.AdamW(
            self.parameters(),
            lr=s["lr"],
            betas=tuple(s["betas"]),
            eps=s["eps"],
            weight_decay=s["weight_decay"],
            fused=s["fused"] and self.device.type in ("cuda", "cpu"),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        shape = {key: s[key] for key in ("warmup_steps", "min_lr_ratio", "t_ref")} | {"shape": s["lr_schedule"]}
        lr_factor(0, total_steps=total, **shape)  # checks the settings before training starts

        def factor(step: int) -> float:
            return lr_factor(step, total_steps=total, **shape)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    # ------------------------------------------------------------------ exact resumption
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Stores every process's random-number generators (CPU, and CUDA when used): all the randomness of a training
        step (timesteps, noise, label dropout, flips, dropout) comes from them, so a resumed run draws what the
        uninterrupted one would have."""
        states = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        gathered = {}
        for name, state in states.items():
            if self.trainer.world_size > 1:
                every = self.all_gather(state.to(self.device)).cpu()  # (world, n)
                # One tensor with its own storage per process: rows of `every` are views into one storage, and a
                # view with a non-zero storage offset makes torch.set_rng_state segfault (PyTorch 2.14).
                gathered[name] = [row.clone() for row in every.unbind(0)]
            else:
                gathered[name] = [state]
        checkpoint["rng_states"] = gathered

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before Lightning loads the weights and the callbacks' states: brings a checkpoint of an earlier version to
        today's names, applies this run's optimizer settings, and restores the random-number states."""
        upgrade_checkpoint(checkpoint)
        self._apply_optimizer_settings(checkpoint)
        states = checkpoint.get("rng_states")
        if states is None:
            return
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if len(states["cpu"]) != world:
            rank_zero_warn(
                f"the checkpoint holds random-number states of {len(states['cpu'])} processes, this run has {world}: "
                "training continues from the same model, EMA, optimizer, step and count of images into the epoch, but "
                "draws fresh random numbers, so it is not the run that would have continued on as many processes"
            )
            return
        torch.set_rng_state(own_storage(states["cpu"][rank]))
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(own_storage(states["cuda"][rank]), self.trainer.strategy.root_device)

    def _apply_optimizer_settings(self, checkpoint: dict[str, Any]) -> None:
        """On resume, the optimizer settings of this run replace the checkpoint's, with a message: AdamW's
        hyperparameters in its saved parameter groups and the schedule's base learning rate (the warm-up, schedule
        and total steps come from this run's schedule function already; :meth:`on_train_start` sets the rate of the
        current step). The optimizer's moments and the step count are kept. So fixing the learning rate that made a
        run diverge and resuming trains at the new rate, and the new checkpoint's hyperparameters say so."""
        saved = checkpoint.get("hyper_parameters", {}).get("optimizer", {})
        changed = {k: (saved.get(k), v) for k, v in self.optimizer_settings.items() if saved.get(k) != v}
        if not changed or not checkpoint.get("optimizer_states"):
            return
        s = self.optimizer_settings
        for state in checkpoint["optimizer_states"]:
            for group in state["param_groups"]:
                group.update(lr=s["lr"], initial_lr=s["lr"], betas=tuple(s["betas"]), eps=s["eps"])
                group.update(weight_decay=s["weight_decay"])
        for scheduler in checkpoint.get("lr_schedulers", []):
            scheduler["base_lrs"] = [s["lr"] for _ in scheduler.get("base_lrs", [])]
        described = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        rank_zero_info(f"Resuming with new optimizer settings ({described}), from step {checkpoint['global_step']}")

    def on_train_start(self) -> None:
        """Sets each parameter group's learning rate to the schedule's value at the current step: the same value on
        a fresh start or a plain resume, this run's value after a resume with other optimizer settings."""
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            rates = [
                base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
            ]
            for group, lr in zip(scheduler.optimizer.param_groups, rates, strict=True):
                group["lr"] = lr
            scheduler._last_lr = rates  # what LearningRateMonitor and get_last_lr() report
