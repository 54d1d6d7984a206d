"""Reading checkpoints safely, and finding the one to resume from.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only, so a file that
carries pickled code is refused before any of it runs. The training side saves nothing else (its hyperparameters
are plain dicts).
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from diffusion.errors import RunError
from diffusion.training import hparams as layout
from diffusion.training.module import DiffusionModule


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
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    hparams = layout.upgrade(hparams) if isinstance(hparams, dict) else None
    if hparams is None or not all(key in hparams for key in layout.GROUPS) or "state_dict" not in checkpoint:
        raise RunError(
            f"{path} is a PyTorch file but not a checkpoint of this project's diffusion models (it lacks the "
            f"state_dict and the hyperparameters {', '.join(layout.GROUPS)}); use a checkpoint written by train.py"
        )
    checkpoint["hyper_parameters"] = hparams  # in today's layout, whatever version wrote it
    return checkpoint


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


def check_resumable(checkpoint: dict[str, Any], hparams: dict[str, Any], path: Path) -> None:
    """Refuses to resume a run whose model, training objective or image format differ from the checkpoint's."""
    changed = layout.resume_conflicts(checkpoint["hyper_parameters"], hparams)
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
) -> DiffusionModule:
    """The module of a checkpoint, with its EMA weights (``ema``; the checkpoint's ``state_dict``) or its raw
    trained weights (``current_model_state``, which the EMA callback keeps beside them), and the speed switches
    ``compile`` and ``channels_last`` of the sampling run (they change how fast, not what is computed).
    ``checkpoint``: the file at ``path`` already read with :func:`load_checkpoint`."""
    checkpoint = load_checkpoint(path) if checkpoint is None else checkpoint
    hparams = checkpoint["hyper_parameters"]
    hparams["model"].update(compile=compile, channels_last=channels_last)
    module = DiffusionModule(**hparams)
    has_ema = "current_model_state" in checkpoint
    if ema and not has_ema:
        warnings.warn("the checkpoint holds no EMA weights; sampling with the trained weights", stacklevel=2)
    weights = checkpoint["state_dict"] if ema or not has_ema else checkpoint["current_model_state"]
    try:
        module.load_state_dict(weights)
    except RuntimeError as error:
        raise RunError(f"the weights in {path} do not fit the model its hyperparameters describe: {error}") from None
    return module
