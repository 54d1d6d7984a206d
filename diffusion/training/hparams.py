"""The checkpoint's hyperparameters: the one definition of their layout, and the frozen model specification built
from them.

A checkpoint's ``hyper_parameters`` are plain data (``torch.load(weights_only=True)`` reads nothing else), one dict
per config group, each under the name the user types: ``model``, ``diffusion``, ``optimizer`` and ``dataset``
(plus ``dataset.seed``, the run's seed, from which the validation split follows). train.py builds them with
:func:`from_settings`, the loader reads older checkpoints through :func:`upgrade`, the resume check compares them
with :func:`resume_conflicts`, and the module turns them into a :class:`ModelSpec`, which is frozen: what defines
the network and its training objective is read from it and never written. How samples are drawn (clipping of
x0, guidance, the sampler) is not part of it: those are the sampling side's options
(:class:`diffusion.core.denoiser.SamplingOptions`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any

from diffusion.core import edm as edm_loss

GROUPS = ("model", "diffusion", "optimizer", "dataset")  # the checkpoint's keys, each the user's config group
SPEED_SWITCHES = ("compile", "channels_last", "checkpointing")  # how fast and in how much memory, not what
IMAGE_FORMAT = ("image_size", "channels")  # the dataset settings that shape the network


@dataclass(frozen=True)
class Network:
    """The UNet (``configs/model``) for images of ``image_size`` x ``image_size`` with ``in_channels`` channels."""

    image_size: int
    in_channels: int
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_heads: int
    dropout: float
    scale_shift: bool
    num_classes: int | None


@dataclass(frozen=True)
class Objective:
    """What the network is trained to do (``configs/diffusion``)."""

    timesteps: int
    schedule: str
    target: str
    loss: str
    min_snr_gamma: float | None
    learned_variance: bool
    vlb_weight: float
    p_mean: float | None
    p_std: float | None
    label_dropout: float


@dataclass(frozen=True)
class ModelSpec:
    """The network and its objective: what a checkpoint's weights mean."""

    network: Network
    objective: Objective

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> ModelSpec:
        model, dataset = hparams["model"], hparams["dataset"]
        net = {f.name: model[f.name] for f in fields(Network) if f.name in model}
        net.update(image_size=dataset["image_size"], in_channels=dataset["channels"])
        net.update(channel_mult=tuple(net["channel_mult"]), attention_resolutions=tuple(net["attention_resolutions"]))
        objective = {f.name: hparams["diffusion"][f.name] for f in fields(Objective)}
        return cls(Network(**net), Objective(**objective))


def from_settings(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The hyperparameters of train.py's plain, resolved settings."""
    hparams = {group: copy.deepcopy(settings[group]) for group in GROUPS}
    hparams["dataset"]["seed"] = settings["seed"]  # the validation split follows from it: sample.py finds it again
    return hparams


def upgrade(hparams: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a checkpoint of an earlier version in today's layout: the dataset was stored as
    ``data``; ``diffusion.clip_x0`` (and ``dynamic_threshold``, which sample.py wrote into the model) are sampling
    options now; ``optimizer.schedule`` is ``optimizer.lr_schedule``; ``dataset.strict``, ``dataset.background``
    ``model.checkpointing`` and ``diffusion.p_mean``/``p_std`` came later, with the defaults given here."""
    hparams = copy.deepcopy(hparams)
    if "dataset" not in hparams and "data" in hparams:
        hparams["dataset"] = hparams.pop("data")
    for key in ("clip_x0", "dynamic_threshold"):
        hparams.get("diffusion", {}).pop(key, None)
    if "schedule" in hparams.get("optimizer", {}):
        hparams["optimizer"]["lr_schedule"] = hparams["optimizer"].pop("schedule")
    if "dataset" in hparams:
        hparams["dataset"] = {"strict": False, "background": [255, 255, 255], **hparams["dataset"]}
    if "model" in hparams:
        hparams["model"].setdefault("checkpointing", False)
    if "diffusion" in hparams:  # EDM's training distribution of noise levels was fixed at the paper's
        edm = hparams["diffusion"].get("target") == "edm"
        hparams["diffusion"].setdefault("p_mean", edm_loss.P_MEAN if edm else None)
        hparams["diffusion"].setdefault("p_std", edm_loss.P_STD if edm else None)
    return hparams


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings that define the model and differ between a checkpoint's hyperparameters (upgraded) and this
    run's, as ``group.key: old -> new`` in the user's spelling: the network (less its speed switches), the whole
    objective, and the image format. Optimizer, trainer and sampling settings may change on resume."""
    keys = [("model", k) for k in current["model"] if k not in SPEED_SWITCHES]
    keys += [("diffusion", k) for k in current["diffusion"]] + [("dataset", k) for k in IMAGE_FORMAT]
    return [
        f"{group}.{key}: {saved[group].get(key)!r} -> {current[group].get(key)!r}"
        for group, key in keys
        if saved[group].get(key) != current[group].get(key)
    ]
