"""Post-hoc EMA at sampling time (Karras et al. 2024, Section 3, Algorithm 3): the average of any length, reconstructed
at a checkpoint's training time from the power-function averages it holds and the snapshots its run wrote before it
(:mod:`diffusion.core.posthoc_ema` has the math, :class:`diffusion.training.posthoc_ema.PostHocEMA` tracks the
averages and writes the snapshots)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion.core.model import DiffusionModel
from diffusion.core.posthoc_ema import check_sigma_rel, profile_residual, reconstruction_coefficients
from diffusion.errors import RunError
from diffusion.models.checkpoints import model_weights, upgrade_weights

STATE_KEY = "PostHocEMA"  # the tracking callback's state in a checkpoint's "callbacks" (its Lightning state_key)
SNAPSHOT_GLOB = "step_*.pt"


def snapshot_paths(folder: Path) -> list[Path]:
    return sorted(folder.glob(SNAPSHOT_GLOB))


def tracked_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The post-hoc EMA callback's state in a checkpoint (empty when its run tracked none)."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.split("{")[0] == STATE_KEY and state:
            return state
    return {}


def read_snapshot(file: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The snapshot ``file`` (its tensors memory-mapped, not read), checked to be one of the run whose tracking
    ``state`` a checkpoint holds: readable, of this project's layout, of the same tracked lengths, and with the same
    parameters and shapes. A :class:`RunError` naming the file, and whether to remove it, otherwise."""
    try:
        snapshot = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # garbage makes torch.load raise many kinds
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
        raise RunError(
            f"the post-hoc EMA snapshot {file} is not readable ({reason}): it is truncated or corrupt. Remove it; "
            f"the reconstruction then uses the other snapshots (sample.py reports how well they fit)."
        ) from None
    kinds = {"step": int, "images": int, "sigma_rels": list, "averages": list}
    if not isinstance(snapshot, dict) or not all(isinstance(snapshot.get(k), t) for k, t in kinds.items()):
        raise RunError(f"{file} is not a post-hoc EMA snapshot of this project (a {SNAPSHOT_GLOB} file of "
                       f"ema_snapshots/): move it out of the folder")  # fmt: skip
    another = "it is another run's: move it out of the folder, or give this run's snapshots with ema_snapshots=PATH"
    tracked = [float(s) for s in state["sigma_rels"]]
    if [float(s) for s in snapshot["sigma_rels"]] != tracked or len(snapshot["averages"]) != len(tracked):
        raise RunError(f"{file} tracks the EMA lengths {snapshot['sigma_rels']}, this checkpoint {tracked}: {another}")
    expected = {name: tuple(value.shape) for name, value in upgrade_weights(state["averages"][0]).items()}
    for average in snapshot["averages"]:
        shapes = {name: tuple(value.shape) for name, value in upgrade_weights(average).items()}
        if shapes != expected:
            raise RunError(f"{file} holds the weights of another network (other parameters or shapes): {another}")
    return snapshot


def reconstruct(
    checkpoint: dict[str, Any], path: Path, sigma_rel: float, folder: Path
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The average of length ``sigma_rel`` at the checkpoint's training time (Algorithm 3): the least-squares
    combination of the averages the checkpoint holds (float32, at its own time) and of the snapshots in ``folder``
    taken before it (later ones, from training that went on past this checkpoint, are left out). Returns the
    parameters by name (float32, the training module's names) and what was combined."""
    check_sigma_rel(sigma_rel)
    state = tracked_state(checkpoint)
    if not state:
        raise RunError(
            f"{path} holds no post-hoc EMA: its run did not track power-function averages, so no EMA length can be "
            f"chosen after training. Sample with the run's own EMA (leave out ema_length), or train with "
            f"callbacks.posthoc_ema.every_n_images=N (e.g. 131072) to keep snapshots."
        )
    tracked, now = [float(s) for s in state["sigma_rels"]], state["images"]
    used = []  # the snapshot files taken before the checkpoint
    for file in snapshot_paths(folder):
        snapshot = read_snapshot(file, state)
        if snapshot["images"] < now:
            used.append((file, snapshot["images"]))
    times = [t for _, t in used for _ in tracked] + [now] * len(tracked)
    lengths = tracked * (len(used) + 1)
    x = reconstruction_coefficients(times, lengths, now, sigma_rel)
    weights: dict[str, Tensor] = {}
    for k, source in enumerate([file for file, _ in used] + [None]):  # a file at a time: they need not all fit
        averages = (
            state["averages"]
            if source is None
            else torch.load(source, map_location="cpu", weights_only=True)["averages"]
        )
        for i, average in enumerate(averages):
            c = float(x[k * len(tracked) + i])
            for name, value in upgrade_weights(average).items():  # accumulated in float64
                weights[name] = weights[name] + c * value.double() if name in weights else c * value.double()
    info = {
        "ema_length": sigma_rel,
        "ema_images": now,
        "ema_snapshots": len(used),
        "ema_profile_residual": profile_residual(times, lengths, now, sigma_rel),
    }
    return {name: value.float() for name, value in weights.items()}, info


def load_posthoc(
    model: DiffusionModel, checkpoint: dict[str, Any], path: Path, sigma_rel: float, folder: Path
) -> dict[str, Any]:
    """Puts the reconstructed average of length ``sigma_rel`` (:func:`reconstruct`) into ``model``'s parameters;
    returns what was combined."""
    if not folder.is_dir() and tracked_state(checkpoint):
        raise RunError(
            f"no post-hoc EMA snapshots in {folder}: ema_length reconstructs from the run's ema_snapshots/ folder. "
            f"Give its place with ema_snapshots=PATH if the run folder was moved or split."
        )
    weights, info = reconstruct(checkpoint, path, sigma_rel, folder)
    weights = model_weights(weights)
    parameters = dict(model.named_parameters())
    if set(weights) != set(parameters):
        raise RunError(f"the post-hoc EMA averages in {path} do not fit the model its hyperparameters describe")
    with torch.no_grad():
        for name, value in weights.items():
            parameters[name].copy_(value)
    return info
