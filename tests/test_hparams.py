"""One home for each setting: the checkpoint's hyperparameters in one layout, under the names the user types; the
model's definition frozen; sampling options kept out of the model, so a resume may change them; checkpoints of
the earlier layout still load, resume and sample."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from diffusion.errors import RunError
from diffusion.training import hparams as layout
from tests.helpers import ROOT, compose_config, load_state, run_script
from train import hyperparameters, train

# A discrete model, as every checkpoint of the earlier layouts was (the default run is now EDM's)
SMOKE = ["debug=smoke", "diffusion=ddpm"]


def run_train(run_dir, *overrides):
    return train(compose_config("train", [*SMOKE, "~callbacks.previews", *overrides], run_dir))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("hparams") / "run"
    run_train(run)
    return run / "checkpoints" / "last.ckpt"


def test_the_checkpoint_keeps_each_group_under_the_users_name(trained, tmp_path):
    saved = load_state(trained)["hyper_parameters"]
    assert set(saved) == set(layout.GROUPS) == {"model", "diffusion", "optimizer", "dataset"}
    cfg = compose_config("train", SMOKE, trained.parents[1])
    assert saved == hyperparameters(cfg)  # what train.py builds is what the checkpoint holds
    assert saved["dataset"]["seed"] == cfg.seed and "clip_x0" not in saved["diffusion"]


def test_the_model_specification_is_frozen(trained):
    from diffusion.training.checkpoint_reading import load_model

    module = load_model(trained, ema=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        module.objective.target = "x0"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        module.spec.network.image_size = 32  # type: ignore[misc]
    assert module.spec.network.channel_mult == tuple(load_state(trained)["hyper_parameters"]["model"]["channel_mult"])


def test_sample_py_never_writes_into_the_model():
    """sample.py passes its sampling options to the sampling side: no assignment to an attribute or item of the
    module (or of anything reached through it) in its source."""
    source = (ROOT / "sample.py").read_text()
    assert not re.findall(r"^\s*module\.[\w.\[\]\"']+\s*=[^=]", source, flags=re.MULTILINE)


def test_a_resume_that_changes_only_how_samples_are_drawn_is_accepted(tmp_path, trained):
    resumed = tmp_path / "resumed"
    overrides = [
        "trainer.max_steps=6",
        "sampler=ddim",
        "callbacks.previews.clip_x0=false",
        "callbacks.fid.clip_x0=false",
    ]
    train(compose_config("train", [*SMOKE, *overrides, f"ckpt_path={trained}"], resumed))
    assert load_state(resumed / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert (resumed / "samples" / "step_0000006.png").is_file()  # drawn by DDIM without clipping


def test_activation_checkpointing_is_a_switch_a_resume_may_change(tmp_path, trained):
    """model.checkpointing changes the memory and time of a step, not what is computed: a run with it trains, and a
    checkpoint without it resumes with it."""
    run_train(tmp_path / "resumed", "model.checkpointing=true", "trainer.max_steps=6", f"ckpt_path={trained}")
    state = load_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 6 and state["hyper_parameters"]["model"]["checkpointing"] is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset.image_size=32", "dataset.image_size: 16 -> 32"),
        ("diffusion.target=v", "diffusion.target: 'eps' -> 'v'"),
        ("model.num_res_blocks=2", "model.num_res_blocks: 1 -> 2"),
    ],
)
def test_a_resume_that_changes_the_model_or_its_objective_is_refused(tmp_path, trained, override, message):
    with pytest.raises(RunError, match=re.escape(message)):
        run_train(tmp_path / "run", override, f"ckpt_path={trained}")


def old_layout(hparams: dict) -> dict:
    """The hyperparameters as the version before this layout wrote them: the dataset under "data", clip_x0 a
    diffusion setting, no dataset.strict, dataset.background or diffusion.p_mean/p_std."""
    diffusion = {k: v for k, v in hparams["diffusion"].items() if k not in ("p_mean", "p_std")}
    old = {**hparams, "diffusion": {**diffusion, "clip_x0": True}}
    old["data"] = {k: v for k, v in old.pop("dataset").items() if k not in ("strict", "background")}
    return old


def test_a_checkpoint_of_the_earlier_layout_loads_resumes_and_samples(tmp_path, trained):
    checkpoint = load_state(trained)
    checkpoint["hyper_parameters"] = old_layout(checkpoint["hyper_parameters"])
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    assert layout.upgrade(checkpoint["hyper_parameters"]) == load_state(trained)["hyper_parameters"]
    run_train(tmp_path / "resumed", "trainer.max_steps=6", f"ckpt_path={old}")
    assert load_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["hyper_parameters"]["dataset"]["seed"] == 0
    result = run_script("sample.py", f"ckpt={old}", "n=2", "sampler.steps=2", f"out_dir={tmp_path / 'samples'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "samples" / "grid.png").is_file()
