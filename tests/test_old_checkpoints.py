"""Checkpoints written before objectives and networks were interfaces (commit 38efebf; tests/data/checkpoints_38efebf
says how they were made) load, sample the images that commit sampled for the same seed, and resume into the run that
commit trained straight."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sample import sample
from tests.helpers import ROOT, compose_config, load_state
from train import train

OLD = ROOT / "tests" / "data" / "checkpoints_38efebf"
REFERENCE = np.load(OLD / "samples.npz")

# (checkpoint, what that commit's sample.py was given, the images' largest difference in 8-bit levels, the share of
# pixels that may differ). The discrete models sample exactly what they did. An EDM model's levels are no longer rows
# of a 1000-row table of EDM's sigmas but any sigma of its range: a 10-step uniform grid is the same (999 / 9 rows
# apart), DPM-Solver++'s 20 levels even in log sigma move by up to 0.5% and Heun's by the table's rounding, which
# sample.py applied to Heun's grid too (its pipeline's denoiser lost the continuous entry point on the way).
CASES = [
    ("ddpm", "dpm_solver", [], 0, 0.0),
    ("ddpm", "ddpm", ["sampler=ddpm", "sampler.steps=10"], 0, 0.0),
    ("ddpm", "raw", ["ema=false"], 0, 0.0),
    ("v_prediction", "guided", ["guidance=2.0", "labels=[3,5]"], 0, 0.0),
    ("v_prediction", "heun", ["sampler=heun", "sampler.steps=5"], 0, 0.0),
    ("v_prediction", "sde", ["sampler=sde", "sampler.steps=10", "sampler.corrector_steps=1"], 0, 0.0),
    ("improved", "ddpm", ["sampler=ddpm", "sampler.steps=10"], 0, 0.0),
    ("edm", "ddpm", ["sampler=ddpm", "sampler.steps=10"], 0, 0.0),
    ("edm", "heun0", ["sampler=heun", "sampler.steps=5"], 1, 0.2),
    ("edm", "dpm_solver", [], 1, 0.05),
    ("edm", "posthoc", ["ema_length=0.08"], 1, 0.05),
]


@pytest.fixture(scope="module")
def old_runs(tmp_path_factory) -> Path:
    """A copy of the old run folders: sampling writes its results beside the checkpoint."""
    return Path(shutil.copytree(OLD, tmp_path_factory.mktemp("old") / "runs"))


@pytest.mark.parametrize(("name", "tag", "overrides", "levels", "share"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_an_old_checkpoint_samples_the_images_it_sampled(old_runs, tmp_path, name, tag, overrides, levels, share):
    ckpt = old_runs / name / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    sample(compose_config("sample", [f"ckpt={ckpt}", "n=8", "gif_frames=2", *overrides], out))
    images, reference = np.load(out / "samples.npz")["arr_0"].astype(int), REFERENCE[f"{name}/{tag}"].astype(int)
    difference = np.abs(images - reference)
    assert difference.max() <= levels and (difference > 0).mean() <= share, (difference.max(), (difference > 0).mean())


def test_an_old_checkpoint_evaluates_the_likelihood_it_evaluated(old_runs, tmp_path):
    ckpt = old_runs / "improved" / "checkpoints" / "last.ckpt"
    out = tmp_path / "nll"
    sample(compose_config("sample", [f"ckpt={ckpt}", "n=8", "eval=nll", "eval.batches=1", "batch_size=8"], out))
    # 1e-9 on the machine the figure was made on; an Intel Xeon with AVX-512 and AMX gave 7.866032302 (other kernels)
    assert json.loads((out / "results.json").read_text())["nll_bpd"] == pytest.approx(7.866032898426056, rel=1e-6)


@pytest.fixture
def two_threads():
    """The straight runs were made with two torch threads, and a convolution's gradient sums in an order that depends
    on their number: bit for bit needs the same two (tests/conftest.py gives each xdist worker fewer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["ddpm", "v_prediction", "improved", "edm"])
def test_an_old_checkpoint_resumes_into_the_run_it_would_have_been(old_runs, tmp_path, name, two_threads):
    """The 6-step checkpoint resumed to 8 steps: the EMA weights that commit reached training 8 steps straight (the
    same losses, random numbers, optimizer and EMA, under the new parameter names). Bit for bit on the machine type
    the fixtures were made on; another CPU's kernels round differently (up to 1.2e-7 on an Intel Xeon with AVX-512 and
    AMX), so the bound is 1e-6, where the two steps themselves move the weights by up to 1.4e-4."""
    extra = {"v_prediction": ["model.num_classes=10"], "edm": ["callbacks.posthoc_ema.every_n_images=256"]}
    overrides = ["debug=smoke", "model.base_channels=8", "model.channel_mult=[1]", "~callbacks.previews",
                 "trainer.max_steps=8", f"diffusion={name}", *extra.get(name, [])]  # fmt: skip
    ckpt = old_runs / name / "checkpoints" / "last.ckpt"
    train(compose_config("train", [*overrides, f"ckpt_path={ckpt}"], tmp_path / "resumed"))
    resumed = load_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    straight = torch.load(OLD / "resumed_to_8.pt", weights_only=True)[name]
    assert resumed["global_step"] == 8
    assert set(resumed["state_dict"]) == {name.replace("unet.", "model.network.") for name in straight}
    for old_name, value in straight.items():
        new_name = old_name.replace("unet.", "model.network.")
        torch.testing.assert_close(resumed["state_dict"][new_name], value, rtol=0, atol=1e-6, msg=old_name)
