"""The checkpoint's hyperparameters: the one definition of their layout, and the upgrade of older layouts.

A checkpoint's ``hyper_parameters`` are plain data (``torch.load(weights_only=True)`` reads nothing else), one dict
per config group, each under the name the user types: ``model`` (the network's ``_target_`` and arguments, and the
speed switches), ``diffusion`` (the objective's ``_target_`` and arguments, and ``label_dropout``), ``optimizer``
and ``dataset`` (plus ``dataset.seed``, the run's seed, from which the validation split follows). train.py builds
them with :func:`from_settings`, the loader reads older checkpoints through :func:`upgrade`, the resume check compares
them with :func:`resume_conflicts`, and :func:`diffusion.models.building.build_model` turns them into the model. How
samples are drawn (clipping of x0, guidance, the sampler) is not part of them: those are the sampling side's options
(:class:`diffusion.core.denoiser.SamplingOptions`).
"""

from __future__ import annotations

import copy
from typing import Any

GROUPS = ("model", "diffusion", "optimizer", "dataset")  # the checkpoint's keys, each the user's config group
SPEED_SWITCHES = ("compile", "channels_last", "checkpointing")  # model.*: how fast and in how much memory, not what
TRAINING_KEYS = ("label_dropout",)  # diffusion.*: how the module trains the objective, not an argument of it
IMAGE_FORMAT = ("image_size", "channels")  # the dataset settings that shape the network

UNET = "diffusion.core.networks.unet.UNet"
DDPM = "diffusion.core.objectives.DDPM"
EDM = "diffusion.core.objectives.EDM"
FLOW = "diffusion.core.objectives.flow.Flow"


def from_settings(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The hyperparameters of train.py's plain, resolved settings."""
    hparams = {group: copy.deepcopy(settings[group]) for group in GROUPS}
    hparams["dataset"]["seed"] = settings["seed"]  # the validation split follows from it: sample.py finds it again
    return hparams


def upgrade(hparams: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a checkpoint of an earlier version in today's layout. Until 2026-12-03 the network was
    always the UNet and the objective a ``diffusion.target`` (``edm`` for EDM, whose rows then were a table of EDM's
    sigma grid from 0.002 to 80 with rho 7); before that, the dataset was stored as ``data``;
    ``diffusion.clip_x0`` (and ``dynamic_threshold``, which sample.py wrote into the model) became sampling options;
    ``optimizer.schedule`` became ``optimizer.lr_schedule``; ``dataset.strict``, ``dataset.background``,
    ``model.checkpointing``, EDM's ``p_mean``/``p_std``, ``optimizer.t_ref`` and EDM's and flow matching's
    ``learned_weighting`` came later, with the values given
    here (``t_ref`` is read by ``lr_schedule=inv_sqrt`` only, which such a run cannot have used)."""
    hparams = copy.deepcopy(hparams)
    if "dataset" not in hparams and "data" in hparams:
        hparams["dataset"] = hparams.pop("data")
    for key in ("clip_x0", "dynamic_threshold"):
        hparams.get("diffusion", {}).pop(key, None)
    if "schedule" in hparams.get("optimizer", {}):
        hparams["optimizer"]["lr_schedule"] = hparams["optimizer"].pop("schedule")
    if "optimizer" in hparams:
        hparams["optimizer"] = {"t_ref": 70000, **hparams["optimizer"]}
    if "dataset" in hparams:
        hparams["dataset"] = {"strict": False, "background": [255, 255, 255], **hparams["dataset"]}
    if "model" in hparams and "_target_" not in hparams["model"]:
        hparams["model"] = {"_target_": UNET, "checkpointing": False, **hparams["model"]}
    if "diffusion" in hparams and "_target_" not in hparams["diffusion"]:
        hparams["diffusion"] = _objective_of_target(hparams["diffusion"])
    if hparams.get("diffusion", {}).get("_target_") in (EDM, FLOW):
        hparams["diffusion"] = {"learned_weighting": False, **hparams["diffusion"]}
    return hparams


def _objective_of_target(old: dict[str, Any]) -> dict[str, Any]:
    """The objective's settings for a ``diffusion`` group of the layout with ``target``."""
    training = {key: old[key] for key in TRAINING_KEYS if key in old}
    if old.get("target") == "edm":  # p_mean and p_std were the paper's (-1.2, 1.2) before they were settings
        p_mean, p_std = old.get("p_mean", -1.2), old.get("p_std", 1.2)
        edm = {"p_mean": p_mean, "p_std": p_std, "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
        return {"_target_": EDM, **edm, **training}
    keys = ("timesteps", "schedule", "target", "loss", "min_snr_gamma", "learned_variance", "vlb_weight")
    return {"_target_": DDPM, **{key: old[key] for key in keys}, **training}


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings that define the model and differ between a checkpoint's hyperparameters (upgraded) and this
    run's, as ``group.key: old -> new`` in the user's spelling: the network (less its speed switches), the whole
    objective, and the image format. Optimizer, trainer and sampling settings may change on resume."""
    keys = [("model", k) for k in {**saved["model"], **current["model"]} if k not in SPEED_SWITCHES]
    keys += [("diffusion", k) for k in {**saved["diffusion"], **current["diffusion"]}]
    keys += [("dataset", k) for k in IMAGE_FORMAT]
    return [
        f"{group}.{key}: {saved[group].get(key)!r} -> {current[group].get(key)!r}"
        for group, key in keys
        if saved[group].get(key) != current[group].get(key)
    ]
