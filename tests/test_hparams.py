"""One home for each setting: the checkpoint's hyperparameters in one layout, under the names the user types; the
model built from them alone; sampling options kept out of the model, so a resume may change them; checkpoints of
the earlier layouts still load, resume and sample (tests/test_old_checkpoints.py: those of the last one, as written)."""

from __future__ import annotations

import re

import pytest
import torch

from diffusion.errors import RunError
from diffusion.models.hparams import GROUPS, upgrade
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
    assert set(saved) == set(GROUPS) == {"model", "diffusion", "optimizer", "dataset"}
    cfg = compose_config("train", SMOKE, trained.parents[1])
    assert saved == hyperparameters(cfg)  # what train.py builds is what the checkpoint holds
    assert saved["dataset"]["seed"] == cfg.seed and "clip_x0" not in saved["diffusion"]


def test_the_checkpoint_alone_builds_its_model(trained):
    """The network and the objective are the classes the hyperparameters name, built with their settings, and the
    weights are the checkpoint's EMA weights."""
    from diffusion.core.networks.unet import UNet
    from diffusion.core.objectives import DDPM
    from diffusion.models.checkpoints import load_model

    state = load_state(trained)
    saved = state["hyper_parameters"]
    model = load_model(trained, ema=True)
    assert type(model.network) is UNet and type(model.objective) is DDPM
    assert model.objective.target == saved["diffusion"]["target"] and len(model.objective) == 1000
    assert model.network.base_channels == saved["model"]["base_channels"] and model.image_shape == (1, 16, 16)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state["state_dict"][f"model.{name}"])


def test_sample_py_never_writes_into_the_model():
    """sample.py passes its sampling options to the sampling side: no assignment to an attribute or item of the
    module (or of anything reached through it) in its source."""
    source = (ROOT / "sample.py").read_text()
    assert not re.findall(r"^\s*model\.[\w.\[\]\"']+\s*=[^=]", source, flags=re.MULTILINE)


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
    """The hyperparameters as the first versions wrote them: the dataset under "data", clip_x0 a diffusion setting,
    no dataset.strict, dataset.background, model.checkpointing or diffusion.p_mean/p_std, and no _target_ (the UNet
    was the only network, the objective a diffusion.target)."""
    diffusion = {k: v for k, v in hparams["diffusion"].items() if k != "_target_"}
    old = {**hparams, "diffusion": {**diffusion, "clip_x0": True}}
    old["model"] = {k: v for k, v in hparams["model"].items() if k not in ("_target_", "checkpointing")}
    old["data"] = {k: v for k, v in old.pop("dataset").items() if k not in ("strict", "background")}
    return old


def test_a_checkpoint_of_the_first_layout_loads_resumes_and_samples(tmp_path, trained):
    checkpoint = load_state(trained)
    checkpoint["hyper_parameters"] = old_layout(checkpoint["hyper_parameters"])
    for key in ("state_dict", "current_model_state"):  # the module held the UNet itself
        checkpoint[key] = {name.replace("model.network.", "unet."): value for name, value in checkpoint[key].items()}
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    assert upgrade(checkpoint["hyper_parameters"]) == load_state(trained)["hyper_parameters"]
    run_train(tmp_path / "resumed", "trainer.max_steps=6", f"ckpt_path={old}")
    assert load_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["hyper_parameters"]["dataset"]["seed"] == 0
    result = run_script("sample.py", f"ckpt={old}", "n=2", "sampler.steps=2", f"out_dir={tmp_path / 'samples'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "samples" / "grid.png").is_file()
