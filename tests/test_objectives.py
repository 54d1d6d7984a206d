"""The objective interface: every configured objective trains and samples the network through the same contract, its
levels are what the samplers walk, and each refuses a bad setting of its own with the one paragraph."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusion.core.levels import ContinuousLevels, DiscreteLevels, karras_sigmas
from diffusion.core.objectives import DDPM, EDM, Objective
from diffusion.core.schedules import spaced_timesteps
from diffusion.errors import SettingError
from diffusion.models.building import build
from diffusion.models.hparams import TRAINING_KEYS
from tests.helpers import CONFIGS, compose_config
from train import train  # noqa: F401  (registers train.py's schema, which the composed config starts from)

OPTIONS = sorted(p.stem for p in (CONFIGS / "diffusion").glob("*.yaml"))


@functools.cache
def objective(name: str) -> Objective:
    """The objective of ``diffusion=NAME``, as train.py builds it."""
    settings = OmegaConf.to_container(compose_config("train", [f"diffusion={name}"], Path("unused")).diffusion)
    return build("diffusion", {k: v for k, v in settings.items() if k not in TRAINING_KEYS})


@pytest.mark.parametrize("name", OPTIONS)
def test_training_and_sampling_give_the_network_the_same_input(name):
    """For the same image, noise and level, the network sees in training (the objective's own noising) what the
    sampling side gives it for the state x_t = a x_0 + s eps of that level: the same input and the same noise
    conditioning. So a network trained by `losses` is evaluated by the samplers on what it learned."""
    obj = objective(name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    levels = obj.training_levels(6, torch.device("cpu"), g)
    seen = []

    def network(x_in, noise_conditioning):
        seen.append((x_in, noise_conditioning))
        return torch.zeros(x_in.shape[0], obj.output_channels(1), *x_in.shape[2:], dtype=x_in.dtype)

    obj.losses(network, x0, levels, noise)
    ((x_in, conditioning),) = seen
    for i in range(6):
        level = obj.sampling_level(float(levels[i]))
        x_t = level.a * x0[i : i + 1] + level.s * noise[i : i + 1]
        sampled_in, sampled_conditioning = obj.network_input(x_t, level)
        torch.testing.assert_close(sampled_in, x_in[i : i + 1], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(sampled_conditioning, conditioning[i : i + 1].float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", OPTIONS)
def test_the_prediction_is_a_consistent_pair_for_any_output(name):
    """Whatever the network answers, the objective reads it as (x0, eps) with x_t = a x0 + s eps at the level."""
    obj = objective(name)
    for level in obj.levels.grid(4, "uniform"):
        x_t = torch.randn(3, 1, 4, 4, dtype=torch.float64)
        output = torch.randn(3, obj.output_channels(1), 4, 4, dtype=torch.float64)
        prediction = obj.prediction(output, x_t, level)
        torch.testing.assert_close(level.a * prediction.x0 + level.s * prediction.eps, x_t)
        assert (prediction.var_frac is not None) == obj.learned_variance


def test_what_each_objective_supports_is_declared():
    supports = {name: (objective(name).has_variational_bound, objective(name).learned_variance) for name in OPTIONS}
    assert supports == {"ddpm": (True, False), "edm": (False, False), "flow": (False, False),
                        "improved": (True, True), "v_prediction": (True, False)}  # fmt: skip
    assert objective("improved").output_channels(3) == 6 and objective("edm").output_channels(3) == 3
    with pytest.raises(NotImplementedError, match="no variational bound"):
        objective("edm").prior_bpd(torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("name", OPTIONS)
def test_the_quarters_cut_the_training_distribution_in_four(name):
    obj = objective(name)
    levels = obj.training_levels(100_000, torch.device("cpu"), torch.Generator().manual_seed(1))
    shares = torch.bincount(obj.quartile(levels), minlength=4) / len(levels)
    torch.testing.assert_close(shares, torch.full((4,), 0.25), atol=0.01, rtol=0)


def test_a_discrete_objectives_levels_are_its_rows():
    obj = objective("ddpm")
    assert isinstance(obj.levels, DiscreteLevels) and obj.levels.max_steps == 1000
    grid = obj.levels.grid(10, "quadratic")
    assert [level.timestep for level in grid] == spaced_timesteps(obj.schedule.alphas_cumprod, 10, "quadratic")
    for level in grid:
        t = level.timestep
        assert level.alpha_bar == obj.schedule.alphas_cumprod[t].item()
        assert level.sigma == pytest.approx(math.sqrt((1 - level.alpha_bar) / level.alpha_bar), rel=1e-12)
    assert obj.levels.nearest(grid[4].sigma * 1.0001).timestep == grid[4].timestep


def test_a_continuous_objectives_grids_follow_their_spacings():
    obj = objective("edm")
    levels = obj.levels
    assert isinstance(levels, ContinuousLevels) and levels.max_steps is None
    assert (levels.sigma_min, levels.sigma_max) == pytest.approx((0.002, 80.0))

    def sigmas(spacing, steps=9):
        return torch.tensor([level.sigma for level in levels.grid(steps, spacing)], dtype=torch.float64)

    torch.testing.assert_close(sigmas("uniform"), karras_sigmas(9, 0.002, 80.0, 7.0).flip(0))  # EDM's eq. 5
    log = sigmas("logsnr").log()
    torch.testing.assert_close(log.diff(), log.diff().mean().expand(8))  # even in log sigma
    trailing = sigmas("trailing")
    assert trailing[0] > 0.002 * 1.01 and trailing[-1] == pytest.approx(80.0)  # the data end left out
    assert sigmas("quadratic")[1] < sigmas("uniform")[1]  # denser near the data
    assert all(s.alpha_bar == pytest.approx(1 / (1 + s.sigma**2)) for s in levels.grid(5, "uniform"))
    assert levels.nearest(3.3).sigma == 3.3
    with pytest.raises(SettingError, match="at least 1"):
        levels.grid(0, "uniform")


DDPM_SETTINGS = dict(timesteps=1000, schedule="linear", target="eps", loss="mse", min_snr_gamma=None,
                     learned_variance=False, vlb_weight=0.001)  # fmt: skip
EDM_SETTINGS = dict(
    p_mean=-0.4, p_std=1.0, sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0, learned_weighting=False
)


@pytest.mark.parametrize(
    ("cls", "bad", "message"),
    [
        (DDPM, {"timesteps": 1}, "diffusion.timesteps=1 is not a whole number of at least 2"),
        (DDPM, {"schedule": "edm"}, "diffusion.schedule='edm' is not one of its choices"),
        (DDPM, {"target": "edm"}, "diffusion.target='edm' is not one of its choices"),
        (DDPM, {"loss": "l1", "min_snr_gamma": 5.0}, "diffusion.min_snr_gamma=5.0 weights the mse loss only"),
        (DDPM, {"learned_variance": "yes"}, "diffusion.learned_variance='yes' is not true or false"),
        (EDM, {"p_std": 0}, "diffusion.p_std=0 is not a number in (0, 10]"),
        (EDM, {"sigma_max": 0.001}, "diffusion.sigma_max=0.001 is not a number in (0.002, 10000]"),
        (EDM, {"p_mean": None}, "diffusion.p_mean=None and diffusion.p_std must be given"),
        (EDM, {"learned_weighting": "yes"}, "diffusion.learned_weighting='yes' is not true or false"),
    ],
)
def test_each_objective_refuses_its_bad_settings(cls, bad, message):
    settings = {**(DDPM_SETTINGS if cls is DDPM else EDM_SETTINGS), **bad}
    with pytest.raises(SettingError) as raised:
        cls(**settings)
    assert str(raised.value).startswith(message)
