"""Rectified flow (diffusion=flow): the optimal velocity of a Gaussian mixture through every sampler, the training
loss of the optimum against its closed form, Euler against diffusers' FlowMatchEulerDiscreteScheduler, and the
application end to end."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion.core.denoiser import NetworkDenoiser
from diffusion.core.levels import Level
from diffusion.core.objectives.flow import TIMESTEP_SCALE, Flow, shifted, unshifted
from diffusion.core.samplers import final
from diffusion.core.samplers.euler import euler_sample
from sample import sample
from tests.analytic import GAUSSIAN, MIXTURE, GaussianMixture
from tests.helpers import compose_config, load_state, resume_four_plus_four
from tests.test_multiprocess import assert_same_training_state
from tests.test_samplers import default_sampler

SETTINGS = dict(
    t_sampling="logit_normal",
    logit_mean=0.0,
    logit_std=1.0,
    shift=1.0,
    t_min=0.001,
    t_max=0.999,
    learned_weighting=False,
)
FLOW = Flow(**SETTINGS)


def optimal_velocity(data: GaussianMixture):
    """A stand-in network that computes the optimal velocity E[eps - x_0 | x_t] = (x_t - E[x_0 | x_t]) / t from what
    the flow objective gives it, x_t = (1 - t) x_0 + t eps and 1000 t, for data whose posterior mean is known in
    closed form (tests/analytic.py, in the VP space where x_VP = x_t / n, n = sqrt((1 - t)^2 + t^2))."""

    def network(x, noise_conditioning, labels=None):
        t = (noise_conditioning.double() / TIMESTEP_SCALE).view(-1, *([1] * (x.ndim - 1)))
        n = ((1 - t) ** 2 + t**2).sqrt()
        x0 = data.posterior_mean(x / n, ((1 - t) / n) ** 2)
        return (x - x0) / t

    return network


def denoiser(data: GaussianMixture, objective: Flow = FLOW, clip_x0: bool = False) -> NetworkDenoiser:
    return NetworkDenoiser(
        optimal_velocity(data), objective, labels=None, guidance=1.0, null_label=None, clip_x0=clip_x0,
        dynamic_threshold=None,
    )  # fmt: skip


def check_within(data: GaussianMixture, out: torch.Tensor, std_share: float = 0.02) -> None:
    """Mean within 2% of the data's standard deviation, the standard deviation within ``std_share`` of it, mode
    weights within 0.02."""
    flat = out.flatten()
    assert abs(flat.mean().item() - data.mean) < 0.02 * data.std, flat.mean().item()
    assert abs(flat.std().item() - data.std) < std_share * data.std, flat.std().item()
    if len(data.weights) == 2:  # the first mode's share: the samples on its side of the valley
        assert abs((flat < -0.05).double().mean().item() - data.weights[0]) < 0.02


def draw(data: GaussianMixture, name: str, **options) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(20_000, 1, 2, 2, generator=g, dtype=torch.float64)
    sampler = default_sampler(name)
    return final((functools.partial(sampler, **options) if options else sampler)(denoiser(data), x_T, generator=g))


# The standard deviation's discretisation bias of the few-step samplers at their config defaults on these
# one-dimensional oracles, measured (Gaussian, mixture): Euler and DDIM 50 (the same step) -3.1%, -2.0%; DPM-Solver++
# 20 +2.5%, +2.3%; Heun 18 +5.4%, +3.7% (as on EDM's levels, tests/test_edm.py). First and second order: at more
# steps (the test below) each is within 2%.
STD_BIAS = {"euler": 0.035, "ddim": 0.035, "dpm_solver": 0.03, "heun": 0.06, "ddpm": 0.02, "sde": 0.02, "ode": 0.02}


@pytest.mark.parametrize("name", list(STD_BIAS))
@pytest.mark.parametrize("data", [GAUSSIAN, MIXTURE], ids=["gaussian", "mixture"])
def test_the_optimal_velocity_reproduces_the_data_through_every_sampler(name, data):
    """At each sampler's config defaults (configs/sampler/*.yaml) on the flow's levels, from t_max = 0.999."""
    check_within(data, draw(data, name), STD_BIAS[name])


@pytest.mark.parametrize(("name", "steps"), [("euler", 100), ("ddim", 100), ("dpm_solver", 30), ("heun", 32)])
def test_at_more_steps_every_few_step_sampler_is_within_two_percent(name, steps):
    for data in (GAUSSIAN, MIXTURE):
        check_within(data, draw(data, name, steps=steps))


def test_euler_converges_at_first_order():
    """Against a 2000-step solution, doubling Euler's steps halves the error (Gaussian data)."""
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2000, 1, 2, 2, generator=g, dtype=torch.float64)
    reference = final(euler_sample(denoiser(GAUSSIAN), x_T, steps=2000, spacing="uniform"))
    coarse, fine = ((final(euler_sample(denoiser(GAUSSIAN), x_T, steps=n, spacing="uniform")) - reference).abs().max()
                    for n in (50, 100))  # fmt: skip
    assert 2 * 0.8 < coarse / fine < 2 * 1.25


@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 0.95])
def test_the_training_loss_of_the_optimal_velocity_is_its_closed_form(t):
    """For x_0 ~ N(m, s^2) the optimal velocity's error is eps - x_0 - E[eps - x_0 | x_t] = (E[x_0 | x_t] - x_0) / t,
    so the loss at t is Var(x_0 | x_t) / t^2 = s^2 / ((1 - t)^2 s^2 + t^2), which the objective's own training path
    (its noising, its network inputs, its loss) estimates within its standard error; a wrong velocity scores higher."""
    g = torch.Generator().manual_seed(3)
    x0 = GAUSSIAN.sample((20_000, 1, 2, 2), g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    level = torch.full((len(x0),), t, dtype=torch.float64)
    loss = FLOW.losses(lambda x, c: optimal_velocity(GAUSSIAN)(x, c), x0, level, noise)["loss"]
    s = GAUSSIAN.stds[0]
    closed = s**2 / ((1 - t) ** 2 * s**2 + t**2)
    assert abs(loss.mean().item() - closed) < 4 * loss.std().item() / math.sqrt(len(loss))
    worse = FLOW.losses(lambda x, c: 1.05 * optimal_velocity(GAUSSIAN)(x, c), x0, level, noise)["loss"]
    assert worse.mean() > loss.mean()


def test_the_time_shift_is_sd3s_and_moves_training_and_sampling_toward_noise():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shifted(t, 3.0), 3 * t / (1 + 2 * t))
    torch.testing.assert_close(unshifted(shifted(t, 3.0), 3.0), t)
    flow3 = Flow(**{**SETTINGS, "shift": 3.0})
    times = flow3.training_levels(100_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert 0.7 < times.median().item() < 0.8  # the logit-normal's median 0.5, shifted to 0.75
    plain, moved = (torch.tensor([lv.sigma for lv in f.levels.grid(9, "uniform")]) for f in (FLOW, flow3))
    assert (moved[1:-1] > plain[1:-1]).all()  # the same grid, noisier


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_agrees_with_diffusers_flow_match_euler(shift):
    """diffusers' FlowMatchEulerDiscreteScheduler and euler_sample on one velocity model, on the same time grid
    (diffusers' own: from t = 1, its smallest time the shifted 1 / 1000, shifted again at set_timesteps, which a
    flow with that t_min and t_max = 1 reproduces), with and without the shift: the same samples to float32's
    precision."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    objective = Flow(**{**SETTINGS, "shift": shift, "t_min": scheduler.sigma_min, "t_max": 1.0})
    scheduler.set_timesteps(12)
    model = optimal_velocity(MIXTURE)
    noise = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x = noise.clone()
    for timestep in scheduler.timesteps:
        x = scheduler.step(model(x, timestep.expand(len(x))).float(), timestep, x).prev_sample
    ours = final(euler_sample(denoiser(MIXTURE, objective), noise.double(), steps=12, spacing="uniform"))
    ours_times = [TIMESTEP_SCALE * lv.s / (lv.a + lv.s) for lv in objective.levels.grid(12, "uniform")]
    np.testing.assert_allclose(ours_times[::-1], scheduler.timesteps.numpy(), rtol=1e-6)
    torch.testing.assert_close(ours.float(), x, rtol=1e-4, atol=1e-5)


def test_every_sampler_refuses_or_samples_pure_noise():
    """With t_max = 1 the noisiest level is pure noise (sigma = inf): Euler, DDIM, DPM-Solver++ and DDPM start there
    (diffusers' grid does); the probability-flow ODE and the SDE, whose steps divide by a, and a grid even in log
    sigma, say so in one paragraph."""
    objective = Flow(**{**SETTINGS, "t_max": 1.0})
    assert math.isinf(objective.levels.sigma_max) and objective.sampling_level(1.0) == Level.of_sigma(math.inf)
    x_T = torch.randn(20_000, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, spacing in (("euler", "uniform"), ("ddim", "uniform"), ("dpm_solver", "quadratic"), ("ddpm", "uniform")):
        sampler = default_sampler(name, spacing)  # not logsnr: even in log sigma, which has no end here
        g = torch.Generator().manual_seed(1)
        check_within(GAUSSIAN, final(sampler(denoiser(GAUSSIAN, objective), x_T, generator=g)), STD_BIAS[name])
    with pytest.raises(ValueError, match=r"spacing=logsnr .* reach pure noise"):
        final(default_sampler("dpm_solver")(denoiser(GAUSSIAN, objective), x_T))
    for name in ("ode", "sde"):
        with pytest.raises(ValueError, match=f"sampler={name} cannot start from pure noise.*diffusion.t_max"):
            final(default_sampler(name)(denoiser(GAUSSIAN, objective), x_T))


# ---------------------------------------------------------------- the application: train.py and sample.py


def test_a_flow_model_trains_with_labels_resumes_exactly_and_samples(tmp_path):
    """diffusion=flow with labels and label dropout: 4 + 4 = 8 equals 8 straight (model, EMA, AdamW, RNG, data
    position); the previews are drawn by Euler with guidance; the loss by quarter of the training times reaches
    TensorBoard; sample.py draws from the checkpoint with Euler and Heun."""
    common = ["debug=smoke", "diffusion=flow", "model.num_classes=10", "sampler=euler", "sampler.steps=3",
              "callbacks.previews.guidance=2.0", "dataset.batch_size=48"]  # fmt: skip
    straight, resumed = resume_four_plus_four(common, tmp_path)
    a, b = load_state(straight / "checkpoints" / "last.ckpt"), load_state(resumed / "checkpoints" / "last.ckpt")
    assert_same_training_state(a, b)
    assert (straight / "samples" / "step_0000008.png").exists() and (straight / "samples" / "step_0000008.gif").exists()
    events = EventAccumulator(str(straight / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/loss_q0", "train/loss_q3", "samples/grid"} <= {
        *events.Tags()["scalars"],
        *events.Tags()["images"],
    }
    last = straight / "checkpoints" / "last.ckpt"
    for name, steps, nfe in (("euler", 4, 2 * 4), ("heun", 3, 2 * 5)):  # guided: two rows through the network
        out = tmp_path / name
        overrides = [f"ckpt={last}", f"sampler={name}", f"sampler.steps={steps}", "guidance=2.0", "n=4"]
        results = sample(compose_config("sample", overrides, out))
        assert results["nfe"] == nfe
        images = np.load(out / "samples.npz")["arr_0"]
        assert images.shape == (4, 16, 16, 1) and images.std() > 0
    out = tmp_path / "nll"  # the likelihood through the probability-flow ODE (tests/test_likelihood.py)
    overrides = [f"ckpt={last}", "n=2", "eval=nll", "eval.batches=1", "batch_size=8", "eval.rtol=1e-3"]
    results = sample(compose_config("sample", [*overrides, "eval.atol=1e-3"], out))
    assert math.isfinite(results["ode_nll_bpd"]) and results["images"] == 8 and "nll_bpd" not in results
