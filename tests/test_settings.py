"""Every numeric setting has its range, in one table (diffusion/settings.py), checked before any work; a number added
to a config without one fails here. The network's and the objective's numbers are checked by their own classes:
each refuses a value far out of range with the paragraph naming its key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from diffusion import settings as schema
from diffusion.errors import SettingError
from diffusion.models.building import build_model
from sample import sample  # noqa: F401  (registers sample.py's schema)
from tests.helpers import CONFIGS, compose_config
from train import hyperparameters

UNUSED = Path("/nonexistent/run")  # composition needs a run folder; nothing is written


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def numeric_keys(node, prefix: str = "") -> set[str]:
    """The dotted keys of the numbers in ``node`` (a list of numbers counts as one key)."""
    if isinstance(node, dict):
        return set().union(*(numeric_keys(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in node.items()))
    if isinstance(node, list):
        return set().union(*(numeric_keys(v, prefix) for v in node))
    return {prefix} if isinstance(node, int | float) and not isinstance(node, bool) else set()


def composed(config: str, overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose_config(config, overrides, UNUSED), resolve=True)


def train_configs() -> list[list[str]]:
    """Every option of every group train.py composes (the folder datasets given a root)."""
    runs = [[]]
    for group in ("dataset", "sampler", "trainer", "callbacks", "experiment", "debug", "optimizer", "diffusion"):
        runs += [[f"{group}={option}"] for option in options(group)]
    return [[*run, "dataset.root=/tmp"] if run and run[0].endswith("=folder") else run for run in runs]


def schema_numbers(cls: type, prefix: str = "") -> set[str]:
    """The fields of a settings dataclass typed int or float (or either | None)."""
    keys = set()
    for field in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[field.name]
        if dataclasses.is_dataclass(kind):
            keys |= schema_numbers(kind, f"{prefix}{field.name}.")
        elif set(typing.get_args(kind) or (kind,)) - {type(None)} <= {int, float}:
            keys.add(f"{prefix}{field.name}")
    return keys


def ranged(key: str, table: dict) -> bool:
    sampler = next((where for where in schema.SAMPLERS if key.startswith(f"{where}.")), None)
    if sampler is not None:
        return key.removeprefix(f"{sampler}.") in schema.SAMPLER_RANGES
    return key in table or key in schema.CHECKED_IN_CODE


def test_every_number_of_every_config_has_its_range():
    found = set()
    for overrides in train_configs():
        found |= {("train", k) for k in numeric_keys(composed("train", overrides))}
    for overrides in [[], *([f"sampler={o}"] for o in options("sampler")), *([f"eval={o}"] for o in options("eval"))]:
        found |= {("sample", k) for k in numeric_keys(composed("sample", ["ckpt=x.ckpt", *overrides]))}
    found |= {("train", k) for k in schema_numbers(schema.TrainSettings)}
    found |= {("sample", k) for k in schema_numbers(schema.SampleSettings)}
    tables = {"train": schema.TRAIN_RANGES, "sample": schema.SAMPLE_RANGES}
    # the network's and the objective's numbers are their classes' (the test below), but the module's own
    missing = [
        f"{script}: {key}"
        for script, key in sorted(found)
        if not key.startswith(("model.", "diffusion.")) or key == "diffusion.label_dropout"
        if not ranged(key, tables[script])
    ]
    assert not missing, f"numeric settings without a range in diffusion/settings.py: {missing}"
    assert len(found) > 80


def out_of_range(allowed: schema.Range) -> object:
    return allowed.low - 1 if allowed.low > -1e18 else "abc"


@pytest.mark.parametrize("key", sorted(schema.TRAIN_RANGES))
def test_each_range_of_train_py_refuses_a_value_outside_it(key):
    settings = composed("train", ["dataset=folder", "dataset.root=/tmp"])
    node = settings
    *groups, name = key.split(".")
    for group in groups:
        node = node[group]
    allowed = schema.TRAIN_RANGES[key]
    for value in (out_of_range(allowed), "abc")[: 1 if allowed.others else 2]:  # a string: the library's to check
        node[name] = value
        with pytest.raises(SettingError) as raised:
            schema.check_train(settings, cuda_available=False)
        assert str(raised.value).startswith(f"{key}={value!r}"), raised.value


@pytest.mark.parametrize("key", [*sorted(schema.SAMPLE_RANGES), *(f"sampler.{n}" for n in schema.SAMPLER_RANGES)])
def test_each_range_of_sample_py_refuses_a_value_outside_it(key):
    evaluation = "eval=nll" if key in ("eval.probes", "eval.rtol", "eval.atol") else "eval=fid"
    settings = composed("sample", ["ckpt=x.ckpt", "sampler=heun", evaluation])
    settings["sampler"].update(eta=0.0, corrector_steps=0, snr=0.16)  # every sampler option at once
    settings["eval"].update(batches=10)
    table = schema.SAMPLE_RANGES | {f"sampler.{n}": r for n, r in schema.SAMPLER_RANGES.items()}
    *groups, name = key.split(".")
    node = settings
    for group in groups:
        node = node[group]
    for value in (out_of_range(table[key]), "abc"):
        node[name] = value
        with pytest.raises(SettingError) as raised:
            schema.check_sample(settings)
        assert str(raised.value).startswith(f"{key}={value!r}"), raised.value


PRESETS = [[f"model={o}"] for o in options("model") if o != "custom"]
PRESETS += [[f"diffusion={o}"] for o in options("diffusion")]


@pytest.mark.parametrize("overrides", PRESETS)
def test_the_network_and_the_objective_refuse_numbers_far_out_of_range(overrides):
    """Each number of a model or diffusion preset, set to -10^9 or a string, is refused by its class with the
    paragraph that names it, before any weight is made."""
    hparams = hyperparameters(compose_config("train", [*overrides, "dataset=cifar"], UNUSED))
    group = overrides[0].split("=")[0]
    for key in sorted(numeric_keys(hparams[group])):
        if key in schema.TRAIN_RANGES or f"{group}.{key}" in schema.TRAIN_RANGES:
            continue
        for value in (-(10**9), "abc"):
            bad = {**hparams, group: {**hparams[group], key: value}}
            with pytest.raises(SettingError) as raised:
                build_model(bad)
            assert f"{group}.{key}" in str(raised.value), raised.value
