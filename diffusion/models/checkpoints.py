"""Reading checkpoints safely, loading the model to sample from, and finding the one to resume from.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only, so a file that
carries pickled code is refused before any of it runs. The training side saves nothing else (its hyperparameters
are plain dicts). A checkpoint's weights are the training module's: the model's under ``model.`` (the network's
under ``model.network.``); :func:`upgrade_checkpoint` brings those of earlier versions to today's names.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from diffusion.core.model import DiffusionModel
from diffusion.errors import RunError
from diffusion.models import hparams
from diffusion.models.building import build_model

MODEL_PREFIX = "model."  # the training module holds the model as `model`
OLD_PREFIXES = {"unet.": "model.network."}  # the training module held the UNet itself until 2026-12-03


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint at ``path``, checked to be one of this project's; :class:`RunError` with the reason if not."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise RunError(_unreadable(path, "the file is empty"))
    if not path.is_file():
        raise RunError(
            f"no checkpoint at {path}: the file does not exist. Check the path (runs keep theirs in "
            f"outputs/DATE/TIME/checkpoints/last.ckpt)"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None:  # not a forbidden object but bytes that are no pickle at all
            raise RunError(_unreadable(path, "not a PyTorch file")) from None
        raise RunError(
            f"refusing to load {path}: it holds a Python object other than tensors and plain containers "
            f"({found.group(1).rstrip('.')}), which can carry code; none of it was run. Only load checkpoints "
            f"written by this project's train.py, or re-save the weights you trust as plain tensors."
        ) from None
    except Exception as error:  # garbage makes torch.load raise many kinds: EOFError, IndexError, KeyError, ...
        first_line = (str(error).splitlines() or ["(no message)"])[0][:200]
        raise RunError(_unreadable(path, f"{type(error).__name__}: {first_line}")) from None
    saved = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    groups = hparams.upgrade(saved) if isinstance(saved, dict) else {}
    if not all(key in groups for key in hparams.GROUPS) or "state_dict" not in checkpoint:
        raise RunError(
            f"{path} is a PyTorch file but not a checkpoint of this project's diffusion models (it lacks the "
            f"state_dict and the hyperparameters {', '.join(hparams.GROUPS)}); use a checkpoint written by train.py"
        )
    return upgrade_checkpoint(checkpoint)  # in today's layout, whatever version wrote it


def upgrade_weights(weights: dict[str, Any]) -> dict[str, Any]:
    """Parameters named by an earlier version of the training module, by today's names."""
    renamed = {}
    for name, value in weights.items():
        old = next((p for p in OLD_PREFIXES if name.startswith(p)), None)
        renamed[OLD_PREFIXES[old] + name[len(old) :] if old else name] = value
    return renamed


def upgrade_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` in today's layout, changed in place: its hyperparameters (:func:`diffusion.models.hparams.
    upgrade`), and the names of its weights, the raw ones beside them and the post-hoc EMA's averages."""
    checkpoint["hyper_parameters"] = hparams.upgrade(checkpoint["hyper_parameters"])
    for key in ("state_dict", "current_model_state"):
        if key in checkpoint:
            checkpoint[key] = upgrade_weights(checkpoint[key])
    for state in checkpoint.get("callbacks", {}).values():
        if isinstance(state, dict) and isinstance(state.get("averages"), list):  # PostHocEMA's
            state["averages"] = [upgrade_weights(average) for average in state["averages"]]
    return checkpoint


def model_weights(weights: dict[str, Any]) -> dict[str, Any]:
    """The model's own weights (``network.*``) among the training module's (``model.network.*``)."""
    return {name[len(MODEL_PREFIX) :]: value for name, value in weights.items() if name.startswith(MODEL_PREFIX)}


def _unreadable(path: Path, reason: str) -> str:
    return (
        f"{path} is not a readable checkpoint ({reason}): it is truncated, corrupt or not a PyTorch file. Use another "
        f"checkpoint, e.g. an earlier one from the same checkpoints/ folder."
    )


def find_last_checkpoint(run_dir: Path, runs_root: Path) -> Path:
    """``run_dir/checkpoints/last.ckpt``; a :class:`RunError` when there is none. Another run's checkpoint is never
    taken silently: the message names the newest one under ``runs_root``, for the user to pass as ``ckpt_path``."""
    own = run_dir / "checkpoints" / "last.ckpt"
    if own.is_file():
        return own
    candidates = [p for p in runs_root.glob("**/checkpoints/last.ckpt") if p.is_file()] if runs_root.is_dir() else []
    newest = max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
    hint = f" The newest run's checkpoint is {newest}: to continue it, pass ckpt_path={newest}." if newest else ""
    raise RunError(
        f"resume=true found nothing to resume: there is no checkpoints/last.ckpt in this run's directory {run_dir}. "
        f"To resume a run, point hydra.run.dir at its directory (e.g. hydra.run.dir=outputs/DATE/TIME) or give its "
        f"checkpoint with ckpt_path=PATH.{hint}"
    )


def check_resumable(checkpoint: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuses to resume a run whose model, training objective or image format differ from the checkpoint's."""
    changed = hparams.resume_conflicts(checkpoint["hyper_parameters"], current)
    if changed:
        raise RunError(
            f"cannot resume from {path}: it was trained with other settings ({'; '.join(changed)}). Resume with the "
            f"checkpoint's settings (its run's .hydra/config.yaml), or start a new run without ckpt_path."
        )


def load_model(
    path: str | Path,
    ema: bool,
    *,
    compile: bool = False,
    channels_last: bool = False,
    checkpoint: dict[str, Any] | None = None,
) -> DiffusionModel:
    """The model of a checkpoint, with its EMA weights (``ema``; the checkpoint's ``state_dict``) or its raw
    trained weights (``current_model_state``, which the EMA callback keeps beside them), and the speed switches
    ``compile`` and ``channels_last`` of the sampling run (they change how fast, not what is computed).
    ``checkpoint``: the file at ``path`` already read with :func:`load_checkpoint`."""
    checkpoint = load_checkpoint(path) if checkpoint is None else checkpoint
    settings = {**checkpoint["hyper_parameters"]}
    settings["model"] = {**settings["model"], "compile": compile, "channels_last": channels_last}
    model = build_model(settings)
    has_ema = "current_model_state" in checkpoint
    if ema and not has_ema:
        warnings.warn("the checkpoint holds no EMA weights; sampling with the trained weights", stacklevel=2)
    weights = checkpoint["state_dict"] if ema or not has_ema else checkpoint["current_model_state"]
    try:
        model.load_state_dict(model_weights(weights))
    except RuntimeError as error:
        raise RunError(f"the weights in {path} do not fit the model its hyperparameters describe: {error}") from None
    return model
