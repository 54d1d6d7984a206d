"""Train a diffusion model: ``python train.py [group=option ...] [key=value ...]``; see configs/train.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from diffusion.checkpoints import check_resumable, find_last_checkpoint, load_checkpoint
from diffusion.data import DiffusionDataModule
from diffusion.errors import report_errors
from diffusion.module import DiffusionModule


def hyperparameters(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The plain-dict settings that define the model: what the checkpoint keeps to rebuild it."""
    groups = {"model": "model", "diffusion": "diffusion", "optimizer": "optimizer", "data": "dataset"}
    hparams = {name: OmegaConf.to_container(cfg[key], resolve=True) for name, key in groups.items()}
    hparams["data"]["seed"] = cfg.seed  # the validation split follows from it: sample.py finds the same test images
    return hparams


def checkpoint_to_resume(cfg: DictConfig, hparams: dict[str, Any]) -> str | None:
    """``ckpt_path``, or with ``resume=true`` the run's (or the newest run's) last.ckpt; checked to load safely and
    to match this run's model."""
    if cfg.ckpt_path is None and not cfg.resume:
        return None
    if cfg.ckpt_path is not None:
        path = Path(cfg.ckpt_path)
    else:
        path = find_last_checkpoint(Path(cfg.paths.output_dir), Path(cfg.paths.log_dir))
    check_resumable(load_checkpoint(path), hparams, path)
    rank_zero_info(f"Resuming from {path}")
    return str(path)


def train(cfg: DictConfig) -> dict[str, float]:
    """Builds the data, model, callbacks, loggers and trainer from ``cfg`` and fits; returns the last metrics."""
    seed_everything(cfg.seed, workers=True)
    hparams = hyperparameters(cfg)
    datamodule = DiffusionDataModule(**hparams["data"])
    module = DiffusionModule(**hparams)
    ckpt_path = checkpoint_to_resume(cfg, hparams)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    run_dir = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
    state = "interrupted" if trainer.interrupted else "finished"
    rank_zero_info(
        f"Training {state} at step {trainer.global_step}. Run directory: {run_dir}\n"
        f"  checkpoint: {last or '(none written)'}\n  samples: {run_dir / 'samples'}\n"
        f"  TensorBoard: tensorboard --logdir {run_dir}"
    )
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@report_errors
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get("val/loss")  # the value a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
