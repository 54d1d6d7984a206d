"""Train a diffusion model: ``python train.py [group=option ...] [key=value ...]``; see configs/train.yaml."""

from __future__ import annotations

import shlex
import shutil
import signal
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.tensorboard.summary import hparams as tensorboard_hparams

from diffusion.core.networks.unet import channel_mult_for
from diffusion.data.datamodule import DiffusionDataModule
from diffusion.errors import RunError, UserError, report_errors
from diffusion.models.building import instantiate_setting
from diffusion.models.checkpoints import check_resumable, find_last_checkpoint, load_checkpoint
from diffusion.models.hparams import from_settings
from diffusion.outputs.folders import check_writable
from diffusion.settings import TrainSettings, check_sampling_steps, check_train, config_options
from diffusion.training.module import DiffusionModule

ConfigStore.instance().store(name="train_schema", node=TrainSettings)
OmegaConf.register_new_resolver("options", config_options, replace=True)  # for --help
OmegaConf.register_new_resolver("unet_channel_mult", channel_mult_for, replace=True)  # experiment=folder


def hyperparameters(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The plain-dict settings that define the model: what the checkpoint keeps to rebuild it."""
    return from_settings(OmegaConf.to_container(cfg, resolve=True))


def checkpoint_to_resume(cfg: DictConfig, hparams: dict[str, Any]) -> str | None:
    """``ckpt_path``, or with ``resume=true`` this run directory's last.ckpt; checked to load safely and to match
    this run's model."""
    if cfg.ckpt_path is None and not cfg.resume:
        return None
    if cfg.ckpt_path is not None:
        path = Path(cfg.ckpt_path)
    else:
        path = find_last_checkpoint(Path(cfg.paths.output_dir), Path(cfg.paths.log_dir))
    checkpoint = load_checkpoint(path)
    check_resumable(checkpoint, hparams, path)
    step, max_steps = checkpoint["global_step"], cfg.trainer.max_steps
    if max_steps != -1 and step >= max_steps:
        raise RunError(
            f"{path} is at step {step}, and trainer.max_steps={max_steps}: resuming it would train nothing. To "
            f"continue training, give a larger number of steps, e.g. trainer.max_steps={max(2 * step, step + 1000)}"
        )
    rank_zero_info(f"Resuming from {path}")
    return str(path)


def check_settings(cfg: DictConfig) -> None:
    """Stops with a message on a setting that has no value (``???``) or lies out of its range."""
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        settings = OmegaConf.to_container(cfg, resolve=True) if not missing else {}
    except OmegaConfBaseException as error:  # a resolver's own check (unet_channel_mult): said as the project says it
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, UserError):  # OmegaConf wraps it more than once
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise
    if missing:
        examples = {"dataset.root": "dataset.root=/path/to/images", "model._target_": "model._target_=mypackage.MyNet"}
        example = examples.get(missing[0], f"{missing[0]}=VALUE")
        raise RunError(
            f"{', '.join(missing)} must be given (it has no default): add it to the command line, e.g. {example}"
        )
    check_train(settings, torch.cuda.is_available())


def train(cfg: DictConfig) -> dict[str, float]:
    """Builds the data, model, callbacks, loggers and trainer from ``cfg`` and fits; returns the last metrics.

    A run stopped by SIGTERM or Ctrl-C saves its last finished step to ``last.ckpt``, says how to resume, and exits
    with status 128 + the signal's number (143 or 130), as a shell reports a process ended by that signal."""
    check_settings(cfg)
    seed_everything(cfg.seed, workers=True)
    hparams = hyperparameters(cfg)
    datamodule = DiffusionDataModule(**hparams["dataset"])
    module = DiffusionModule(**hparams)  # builds the network and the objective, which check their own settings
    check_sampling_steps(OmegaConf.to_container(cfg, resolve=True), module.model.objective.levels.max_steps)
    ckpt_path = checkpoint_to_resume(cfg, hparams)
    callbacks = [build(f"callbacks.{k}", c) for k, c in (cfg.get("callbacks") or {}).items() if c is not None]
    loggers = [build(f"logger.{k}", c) for k, c in (cfg.get("logger") or {}).items() if c is not None]
    trainer: Trainer = build("trainer", cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if isinstance(trainer.accelerator, CUDAAccelerator):
        torch.set_float32_matmul_precision(cfg.cuda_matmul_precision)
    run_dir = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        check_run_folders(run_dir, [c.dirpath for c in trainer.checkpoint_callbacks], module)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    stopped_by = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        stopped_by = getattr(trainer.checkpoint_callback, "signal_received", None) or signal.SIGTERM
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        record_hyperparameters(trainer, hparams, metrics)
    last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
    state = f"stopped by {signal.Signals(stopped_by).name}" if stopped_by else "finished"
    rank_zero_info(
        f"Training {state} at step {trainer.global_step}. Run directory: {run_dir}\n"
        f"  checkpoint: {last or '(none written)'}\n  samples: {run_dir / 'samples'}\n"
        f"  TensorBoard: tensorboard --logdir {run_dir}"
    )
    if stopped_by:
        if last:
            rank_zero_info(f"Resume with: {resume_command(run_dir, last)}")
        raise SystemExit(128 + stopped_by)
    return metrics


def build(key: str, node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate(node)``, a value that the class refuses reported as one paragraph naming the key
    (:func:`diffusion.models.building.instantiate_setting`), Lightning's ``MisconfigurationException`` included."""
    return instantiate_setting(key, node, refusals=(MisconfigurationException,), **kwargs)


def record_hyperparameters(trainer: Trainer, hparams: dict[str, dict[str, Any]], metrics: dict[str, float]) -> None:
    """TensorBoard's HPARAMS tab: the run's settings with its final losses and metrics, written at the end (at the
    start there are no metrics to show, and Lightning's placeholder hp_metric is off)."""
    shown = {name: value for name, value in metrics.items() if name.startswith(("train/loss", "val/"))}
    flat = {
        f"{group}/{key}": value if isinstance(value, int | float | str | bool) else str(value)
        for group, settings in hparams.items()
        for key, value in settings.items()
    }
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and shown:
            writer = logger.experiment._get_file_writer()  # reopened: Lightning closes it when training ends
            for summary in tensorboard_hparams(flat, shown):
                writer.add_summary(summary)
            writer.flush()


def resume_command(run_dir: Path, last: str) -> str:
    """The shell command that resumes this run in its own directory: its command-line overrides (less any earlier
    ``ckpt_path``/``resume``/``hydra.run.dir``), quoted for a POSIX shell."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "resume")]
    words = ["python", "train.py", *kept, f"hydra.run.dir={run_dir}", f"ckpt_path={last}"]
    return " ".join(shlex.quote(word) for word in words)


def check_run_folders(run_dir: Path, folders: list[str | None], module: DiffusionModule) -> None:
    """Fails before training, with a message, when the run's folders cannot be written or the disk cannot hold a
    checkpoint (the weights, their average and AdamW's two moments: 16 bytes per parameter, twice, for the file
    being written beside the last one)."""
    needed = 2 * 16 * sum(p.numel() for p in module.parameters())
    for folder in [run_dir, *(Path(f) for f in folders if f)]:
        check_writable(folder, "hydra.run.dir")
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise RunError(
                f"{folder} has {free / 2**20:.0f} MB free, too little for this model's checkpoints (about "
                f"{needed / 2**20:.0f} MB while one is written). Free some space or set hydra.run.dir=PATH elsewhere."
            )


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@report_errors
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get("val/loss")  # the value a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
