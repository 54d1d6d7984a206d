"""Building the model from its hyperparameters: the objective of ``diffusion._target_`` and the network of
``model._target_``, each built by Hydra's ``instantiate`` from the plain settings and checked by its own class."""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn

from diffusion import checks
from diffusion.core.model import DiffusionModel
from diffusion.core.objectives import Objective
from diffusion.errors import SettingError, UserError
from diffusion.models.hparams import SPEED_SWITCHES, TRAINING_KEYS

NAMES_A_KEY = re.compile(r"[a-z_]+\.[a-z_]+")  # a message that begins with the key it is about: model.num_heads=3 ...


def instantiate_setting(key: str, node: Any, *, refusals: tuple[type[Exception], ...] = (), **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)`` (a Hydra config node or a plain dict with ``_target_``), with a value that the
    class refuses reported as one paragraph that names the settings' key, instead of Hydra's "Error in call to
    target" and a traceback: the project's own settings errors, a ``ValueError``, a ``TypeError`` (an argument it
    does not take) or one of ``refusals``, prefixed with ``key`` unless they begin with the key they are about. Any
    other failure is a bug and keeps its traceback."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if not isinstance(cause, (UserError, ValueError, TypeError, *refusals)):
            raise
        if isinstance(cause, UserError) and NAMES_A_KEY.match(str(cause)):
            raise cause from None
        raise SettingError(
            f"{key}: {cause} (the settings are {key}.KEY=VALUE; python train.py --cfg job shows them all)"
        ) from None


KINDS = {
    "model": (
        nn.Module,
        "a network (an nn.Module of diffusion/core/networks/__init__.py's interface)",
        "Adding a network",
    ),
    "diffusion": (Objective, "an objective (a diffusion.core.objectives.Objective)", "Adding an objective"),
}


def locate(key: str, target: str) -> type:
    """The class at the dotted path ``target`` (``mypackage.nets.MyNet``), or the one paragraph that says why it cannot
    be imported: its module missing, failing on import (the error as it was raised), or holding no such class.
    (Hydra's ``get_class`` does the same but also logs each failure as an error of its own.)"""
    module_name, _, name = target.rpartition(".")
    fix = "give a class's full dotted path, e.g. mypackage.nets.MyNet"
    try:
        found = getattr(importlib.import_module(module_name), name, None) if module_name else None
    except Exception as error:  # ModuleNotFoundError, or the user's module failing: said as it was raised
        checks.fail(key, target, f"cannot be imported ({type(error).__name__}: {error})", fix)
    if not isinstance(found, type):
        checks.fail(key, target, f"is not a class in {module_name or 'a module'}", fix)
    return found


def build(group: str, settings: dict[str, Any], **given: Any) -> Any:
    """The object of ``settings['_target_']`` (a class), built with the other settings and ``given``; its settings
    are checked to be arguments it takes, and the object to be of the group's kind (:data:`KINDS`)."""
    target = settings.get("_target_")
    if not isinstance(target, str) or not target:
        checks.fail(
            f"{group}._target_",
            target,
            "names no class",
            f"give the class's dotted path, e.g. {group}._target_=mypackage.MyClass",
        )
    cls = locate(f"{group}._target_", target)
    parameters = inspect.signature(cls).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        known = [p.name for p in parameters if p.name not in given]
        checks.known_keys(group, [k for k in settings if k != "_target_"], known, what=target)
    built = instantiate_setting(group, {**settings, **given})
    kind, what, section = KINDS[group]
    if not isinstance(built, kind):
        checks.fail(f"{group}._target_", target, f"does not build {what}", f"see the README, '{section}'")
    return built


def build_model(hparams: dict[str, Any]) -> DiffusionModel:
    """The model of a checkpoint's (or train.py's) hyperparameters (:mod:`diffusion.models.hparams`), with fresh
    weights."""
    model, diffusion, dataset = hparams["model"], hparams["diffusion"], hparams["dataset"]
    objective = build("diffusion", {k: v for k, v in diffusion.items() if k not in TRAINING_KEYS})
    channels, size = dataset["channels"], dataset["image_size"]
    network = build(
        "model",
        {k: v for k, v in model.items() if k not in SPEED_SWITCHES},
        image_size=size,
        in_channels=channels,
        out_channels=objective.output_channels(channels),
    )
    switches = {key: model.get(key, False) for key in SPEED_SWITCHES}
    return DiffusionModel(network, objective, (channels, size, size), **switches)
