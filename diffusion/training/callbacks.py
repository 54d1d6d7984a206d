"""Callbacks: the EMA of the weights, sample grids and GIFs, and the stop on a non-finite loss."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from tqdm import tqdm

from diffusion.core.denoiser import SamplingOptions
from diffusion.core.drawing import draw
from diffusion.core.ema import ema_decay
from diffusion.core.images import to_uint8
from diffusion.core.samplers import Sampler
from diffusion.errors import RunError
from diffusion.outputs.evaluation import ImageMetrics
from diffusion.outputs.writers import grid_image, write_gif, write_png
from diffusion.training.module import DiffusionModule


class EMA(WeightAveraging):
    """An exponential moving average of the weights with a warm-up (:func:`diffusion.core.ema.ema_decay`: EDM's
    half-life in images, capped at ``rampup_ratio`` of the images seen), on Lightning's ``WeightAveraging``, which
    keeps the average, swaps it in for validation and writes it to the checkpoint's ``state_dict`` (the raw weights
    going to ``current_model_state``).

    Where this differs from Lightning's ``EMAWeightAveraging``, and why:

    - The warm-up. Lightning's EMA applies its full decay from the first step, so after n steps decay^n of the
      random initial weights is still in the average (32% after 1,150 steps at 0.999): previews, validation and
      samples "with the EMA weights" are noise for the first thousands of steps.
    - The end of training leaves the raw weights in the model. Lightning copies the average into the model in
      ``on_train_end``, before the final checkpoint is written, so that checkpoint held the average twice and lost
      the trained weights: ``sample.py ema=false`` sampled the average, and a run extended from it did not continue
      from its own weights. The average is used where it is wanted: sampling (:attr:`averaged_module`),
      validation and the checkpoint's ``state_dict``.
    - The average lives on the training device: Lightning calls callback ``setup`` before it moves the model, so the
      parent would keep the copy on the CPU and copy every parameter there after each GPU step.
    - The update never waits for the device. ``AveragedModel.update_parameters`` tests its step counter, a tensor
      on the training device, twice per update (a host-device synchronisation on a GPU), regroups the parameters by
      device and dtype and copies every buffer. Here the parameter lists are gathered once and each update is one
      fused ``_foreach_lerp_`` (``_foreach_copy_`` at the first step), with beta a Python float.
      Buffers are neither averaged nor copied at each step: this model's are the noise schedule's constant tables,
      which the average's copy holds from the start (a network with running statistics would need them copied).

    Every process updates its own copy from the same synchronised weights with the same beta (the images per step
    are the global batch: batch size x processes x accumulation), so under DDP the averages stay identical.

    Args:
        half_life_images: the half-life of the average in training images, once warmed up.
        rampup_ratio: the half-life is at most this fraction of the images seen; ``None``: no warm-up.
    """

    def __init__(self, *, half_life_images: float, rampup_ratio: float | None) -> None:
        # both in diffusion/settings.py's ranges, checked before any work
        super().__init__(use_buffers=False)
        self.half_life_images, self.rampup_ratio = half_life_images, rampup_ratio
        self.beta = 0.0
        self._swapped = False
        self._pairs: tuple[list[Tensor], list[Tensor]] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._device is None:
            self._device = trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)
        self._pairs = None
        if isinstance(pl_module, DiffusionModule) and self.averaged_module is not None:
            pl_module.offer_weights_for_sampling(self.averaged_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if isinstance(pl_module, DiffusionModule):
            pl_module.offer_weights_for_sampling(None)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args) -> None:
        # once per optimizer step (with gradient accumulation, batches that did not step leave global_step alone)
        if self._average_model is None or trainer.global_step <= self._latest_update_step:
            return
        images = len(batch[0]) * trainer.world_size * trainer.accumulate_grad_batches  # this step's global batch
        self.beta = ema_decay((trainer.global_step - 1) * images, images, self.half_life_images, self.rampup_ratio)
        self.update(pl_module)
        self._latest_update_step = trainer.global_step

    def update(self, pl_module: LightningModule) -> None:
        """avg <- beta avg + (1 - beta) w over all parameters at once; no host-device synchronisation."""
        assert self._average_model is not None
        if self._pairs is None:
            averaged, current = list(self._average_model.module.parameters()), list(pl_module.parameters())
            self._pairs = ([p.detach() for p in averaged], [p.detach() for p in current])
        averaged, current = self._pairs
        if self._latest_update_step == 0 or self.beta == 0.0:  # the first update of the run copies, as Lightning's
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_lerp_(averaged, current, 1.0 - self.beta)
        self._average_model.n_averaged += 1  # kept for Lightning's averaging_state in the checkpoint; no sync

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keeps the raw weights in the model (see the class docstring)."""

    # Lightning swaps the average into the model for validation and back at its end. A run stopped during
    # validation (SIGTERM, Ctrl-C) never reaches that end: the swap is undone here, before the checkpoint callback
    # (which Lightning calls last) saves the stopped run, so that state_dict holds the average and
    # current_model_state the raw weights, as always.
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self._swapped = self._average_model is not None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        self._swapped = False

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._swapped:
            self._swap_models(pl_module)
            self._swapped = False

    @property
    def averaged_module(self) -> LightningModule | None:
        """The module holding the averaged weights (outside validation, during which the two are swapped)."""
        return None if self._average_model is None else self._average_model.module


def with_steps(sampler: Sampler, steps: int | None) -> Sampler:
    """``sampler`` with its number of steps replaced (``None`` keeps its own)."""
    return sampler if steps is None else functools.partial(sampler, steps=steps)


class Previews(Callback):
    """Every ``every_n_steps`` optimizer steps and at the end of training, draws ``num_images`` samples from fixed
    noise with the EMA weights and writes ``samples/step_NNNNNNN.png`` (a grid) and ``.gif`` (the reverse process of
    the first ``gif_images``, noise dissolving into images), and logs the grid to TensorBoard (``samples/grid``).

    Args:
        sampler: the configured sampler (``configs/sampler``).
        dirpath: where the files go.
        every_n_steps: how often; 0 draws only at the end.
        steps: the sampler's number of steps for these previews; ``None`` keeps the sampler's own.
        num_images: images in the grid.
        gif_images: images in the GIF (the first of the grid).
        gif_frames: frames of the GIF.
        guidance: classifier-free guidance scale for a class-conditional model (labels cycle through the classes).
        clip_x0: clamp the predicted x0 to [-1, 1] while drawing (a sampling option, like ``sample.py clip_x0``).
        seed: seeds the fixed noise, so that successive grids show the same samples improving.
    """

    def __init__(
        self,
        *,
        sampler: Sampler,
        dirpath: str,
        every_n_steps: int,
        steps: int | None,
        num_images: int,
        gif_images: int,
        gif_frames: int,
        guidance: float,
        clip_x0: bool,
        seed: int,
    ) -> None:
        self.sampler, self.dirpath = sampler, Path(dirpath)
        self.every_n_steps, self.steps, self.num_images = every_n_steps, steps, num_images
        self.gif_images, self.gif_frames, self.guidance, self.seed = gif_images, gif_frames, guidance, seed
        self.clip_x0 = clip_x0
        self._last_step = -1

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        final = trainer.max_steps not in (None, -1) and step >= trainer.max_steps  # drawn in on_train_end instead
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step and not final:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The final preview, after the final checkpoint (written at the last step's batch end), from its weights."""
        if trainer.global_step != self._last_step:
            self.draw(trainer, pl_module)

    def draw(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Samples on rank zero only; the other ranks carry on until the next collective. A preview is optional: if
        drawing or writing it fails, the run goes on (or ends) with its checkpoints, and a warning says why."""
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        try:
            self._draw(trainer, pl_module)
        except Exception as error:  # an optional extra must not cost the run its weights
            optional_failed(f"the sample preview at step {trainer.global_step}", "~callbacks.previews", error)

    def _draw(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert isinstance(pl_module, DiffusionModule)
        model = pl_module.weights_for_sampling()
        labels, guidance = None, 1.0
        if model.conditional:  # the classes in turn
            labels, guidance = torch.arange(self.num_images) % model.num_classes, self.guidance
        progress = tqdm(desc=f"preview at step {trainer.global_step}", unit="step", leave=False, file=sys.stderr)
        with progress, model.sampling(), trainer.precision_plugin.forward_context():
            samples = draw(
                model.denoiser_for(SamplingOptions(guidance=guidance, clip_x0=self.clip_x0)),
                with_steps(self.sampler, self.steps),
                n=self.num_images,
                batch_size=self.num_images,
                shape=model.image_shape,
                seed=self.seed,
                device=pl_module.device,
                labels=labels,
                frames=self.gif_frames,
                frame_images=self.gif_images,
                on_step=lambda _: progress.update(1),
            )
        images, frames = samples.images, samples.frames
        stem = self.dirpath / f"step_{trainer.global_step:07d}"
        picture = grid_image(images.cpu())
        write_png(picture, stem.with_suffix(".png"))
        if frames:  # gif_frames=0: no GIF
            write_gif(frames, stem.with_suffix(".gif"))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples/grid", picture, trainer.global_step, dataformats="HWC")


class NonFiniteLossGuard(Callback):
    """Stops training with a message when the loss becomes NaN or infinite, before any checkpoint holds the damage.

    The check reads the loss on the host only every ``trainer.log_every_n_steps`` steps (when Lightning syncs to log
    anyway) and before every checkpoint is written, so it adds no synchronisation to the other steps. A NaN step
    between two checks therefore never reaches a checkpoint: the last one written holds good weights.

    Before a checkpoint the weights are checked too: an optimizer step can make them infinite while the loss that
    produced it was still finite (EDM at a huge learning rate does so one step before its loss turns NaN), and a
    guard that watched only the loss would save them.
    """

    def __init__(self) -> None:
        self._bad: torch.Tensor | None = None
        self._checked_step = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        bad = ~torch.isfinite(loss.detach())
        self._bad = bad if self._bad is None else self._bad | bad
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._check(trainer)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._check(trainer, pl_module)

    def _check(self, trainer: Trainer, module: LightningModule | None = None) -> None:
        decide = functools.partial(trainer.strategy.reduce_boolean_decision, all=False)  # over all processes
        bad = decide(self._bad is not None and bool(self._bad.item()))
        what = "the loss"
        if module is not None and not bad:  # every process takes this branch together, as the decision is shared
            # one fused reduction (the largest magnitude per tensor is NaN or inf exactly when an element is), read
            # once; a sharded strategy checks its own shards
            peaks = [p.detach().abs().amax().float() for p in module.parameters() if p.numel()]
            bad = decide(bool(peaks) and not bool(torch.isfinite(torch.stack(peaks)).all().item()))
            what = "the weights"
        if bad:
            last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
            raise RunError(
                f"training stopped: {what} became NaN or infinite between steps {self._checked_step} and "
                f"{trainer.global_step}; nothing after step {self._checked_step} was saved and {kept}. Usual causes: "
                f"a learning rate too high (optimizer.lr), float16 overflow (try trainer.precision=bf16-mixed or "
                f"32-true), or no gradient clipping (trainer.gradient_clip_val). Fix the setting and resume with "
                f"ckpt_path=<checkpoint>."
            )
        self._checked_step = trainer.global_step


class FIDMonitor(Callback):
    """FID and KID during training, every ``every_n_epochs`` epochs (0: off), logged as ``val/fid`` and ``val/kid``.

    ``num_samples`` images are drawn with the EMA weights and a fast sampler, each process drawing its share; the real
    features of ``reference_images`` training images are computed once, also shared out; torchmetrics reduces the
    states over the processes. (Computing a large FID on rank zero alone is what makes multi-GPU runs time out.)

    Args:
        sampler: a configured sampler (``configs/sampler``); ``steps`` overrides its number of steps.
        feature: Inception-v3 feature size, or an ``nn.Module`` (see
            :class:`diffusion.outputs.evaluation.ImageMetrics`).
        clip_x0: clamp the predicted x0 to [-1, 1] while drawing (no guidance: the FID is the model's own).
    """

    def __init__(
        self,
        *,
        every_n_epochs: int,
        sampler: Sampler,
        steps: int | None,
        num_samples: int,
        reference_images: int,
        batch_size: int,
        feature: Any,
        kid_subset_size: int,
        clip_x0: bool,
        seed: int,
    ) -> None:
        self.every_n_epochs, self.sampler, self.steps, self.clip_x0 = every_n_epochs, sampler, steps, clip_x0
        self.num_samples, self.reference_images, self.batch_size = num_samples, reference_images, batch_size
        self.feature, self.kid_subset_size, self.seed = feature, kid_subset_size, seed
        self.metrics: ImageMetrics | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.every_n_epochs:
            return
        datamodule = trainer.datamodule
        reference = min(self.reference_images, datamodule.split_size("train"))
        subset = min(self.kid_subset_size, reference, self.num_samples)
        self.metrics = ImageMetrics(self.feature, kid_subset_size=max(2, subset)).to(pl_module.device)
        shard = {"rank": trainer.global_rank, "world_size": trainer.world_size}
        batches = datamodule.batches("train", self.batch_size, reference, **shard)
        with torch.inference_mode():
            for x0, _ in tqdm(batches, desc="FID: real features", unit="batch", leave=False, file=sys.stderr):
                self.metrics.update(to_uint8(x0.to(pl_module.device)), real=True)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        """Runs after the last batch of every ``every_n_epochs``-th epoch. Not in ``on_train_epoch_end``: there,
        Lightning's progress bar (on rank zero only) first reduces the epoch's logged metrics across processes,
        while the other ranks would already be in this callback's collectives."""
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready == trainer.num_training_batches
        if self.metrics is None or not last_batch or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        try:
            values = self._compute(trainer, pl_module)
        except Exception as error:  # an optional extra must not cost the run its weights
            optional_failed(f"FID/KID at epoch {trainer.current_epoch}", "callbacks.fid.every_n_epochs=0", error)
            return
        # Straight to the loggers at this step: logged through the module from a batch hook they would reach
        # TensorBoard only when the step falls on trainer.log_every_n_steps.
        scores = {"val/fid": values["fid"], "val/kid": values["kid"]}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(scores, step=trainer.global_step)
        for name, value in scores.items():
            pl_module.log(name, value, logger=False, sync_dist=False)  # for trainer.callback_metrics

    def _compute(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        assert self.metrics is not None
        assert isinstance(pl_module, DiffusionModule)
        model = pl_module.weights_for_sampling()
        mine = range(trainer.global_rank, self.num_samples, trainer.world_size)  # this process's share of the images
        labels = None
        if model.conditional:  # image k's class depends on (seed, k) only, like its noise
            g = torch.Generator().manual_seed(self.seed)
            labels = torch.randint(0, model.num_classes, (self.num_samples,), generator=g)[list(mine)]
        with model.sampling(), trainer.precision_plugin.forward_context():
            samples = draw(
                model.denoiser_for(SamplingOptions(clip_x0=self.clip_x0)),
                with_steps(self.sampler, self.steps),
                n=len(mine),
                batch_size=self.batch_size,
                shape=model.image_shape,
                seed=self.seed,
                device=pl_module.device,
                labels=labels,
                indices=mine,
            )
        for start in range(0, len(samples.images), self.batch_size):
            self.metrics.update(samples.images[start : start + self.batch_size].to(pl_module.device), real=False)
        values = self.metrics.compute()  # a collective: every process takes part
        self.metrics.reset_fake()
        return values


def optional_failed(what: str, switch_off: str, error: Exception) -> None:
    """Reports the failure of an optional extra (a preview, a metric) without ending the run."""
    rank_zero_warn(
        f"{what} failed and was skipped ({type(error).__name__}: {error}). Training goes on and its checkpoints are "
        f"unaffected; draw samples from a checkpoint with sample.py, or switch this off with {switch_off}."
    )
