"""Prediction targets of the DDPM family: exact conversions between eps, x0, v and mu, for every schedule."""

import itertools

import pytest
import torch

from diffusion.core.schedules import SCHEDULES, NoiseSchedule, make_betas
from diffusion.core.targets import TARGETS, eps_from_x0, from_x0_eps, to_x0_eps, x0_error_scale

PAIRS = list(itertools.product(TARGETS, TARGETS))


def _setup(name, dtype=torch.float64, T=1000):
    schedule = NoiseSchedule(make_betas(name, T))
    g = torch.Generator().manual_seed(0)
    t = torch.arange(T)
    x0 = torch.rand(T, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(T, 3, 4, 4, generator=g, dtype=torch.float64)
    return schedule, t, x0, eps, schedule.q_sample(x0, t, eps)


def _per_sample_max(x):
    return x.abs().flatten(1).max(1).values


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_target_recovers_x0_and_eps_exactly(name):
    schedule, t, x0, eps, x_t = _setup(name)
    for target in TARGETS:
        got_x0, got_eps = to_x0_eps(schedule, target, from_x0_eps(schedule, target, x0, eps, x_t, t), x_t, t)
        torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-9)


def test_targets_are_the_published_definitions():
    schedule, t, x0, eps, x_t = _setup("cosine")
    a, s = (
        schedule.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1),
        (1 - schedule.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1),
    )
    torch.testing.assert_close(from_x0_eps(schedule, "v", x0, eps, x_t, t), a * eps - s * x0)  # Salimans & Ho
    mu, _, _ = schedule.q_posterior_mean_variance(x0, x_t, t)
    torch.testing.assert_close(from_x0_eps(schedule, "mu", x0, eps, x_t, t), mu)  # Ho et al. eq. 7
    torch.testing.assert_close(eps_from_x0(schedule, x_t, t, x0), eps)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_float32_round_trips_are_exact_to_float32_precision(name):
    """A -> B -> A in float32 loses only the rounding of the float32 intermediate B, amplified by the conversion:
    |dA| = (k_A / k_B) |dB| at fixed x_t, with k the x0-error scale. The bound is 16 roundings of that."""
    schedule, t, x0, eps, x_t = _setup(name)
    unit = torch.finfo(torch.float32).eps
    x_t32 = x_t.float()
    for a_kind, b_kind in PAIRS:
        a = from_x0_eps(schedule, a_kind, x0, eps, x_t, t)
        b = from_x0_eps(schedule, b_kind, *to_x0_eps(schedule, a_kind, a.float(), x_t32, t), x_t32, t)
        assert b.dtype == torch.float32
        back = from_x0_eps(schedule, a_kind, *to_x0_eps(schedule, b_kind, b, x_t32, t), x_t32, t)
        gain = x0_error_scale(schedule, a_kind, t) / x0_error_scale(schedule, b_kind, t)
        scale = torch.stack([_per_sample_max(a), _per_sample_max(b.double()), _per_sample_max(x_t)]).max(0).values
        bound = 16 * unit * (1 + gain) * scale
        error = _per_sample_max(back.double() - a)
        worst = (error / bound).max().item()
        assert worst <= 1.0, f"{a_kind} -> {b_kind} -> {a_kind}: error {worst:.2f} x the float32 bound"


@pytest.mark.parametrize("target", TARGETS)
def test_x0_error_scale_is_the_derivative_of_the_target(target):
    """Moving x0_pred by d at fixed x_t moves the target by k d."""
    schedule, t, x0, eps, x_t = _setup("linear")
    d = 1e-3 * torch.randn_like(x0)
    moved = from_x0_eps(schedule, target, x0 + d, eps_from_x0(schedule, x_t, t, x0 + d), x_t, t)
    delta = moved - from_x0_eps(schedule, target, x0, eps, x_t, t)
    ratio = _per_sample_max(delta) / _per_sample_max(d)
    torch.testing.assert_close(ratio, x0_error_scale(schedule, target, t).abs(), rtol=1e-6, atol=0)


def test_unknown_target_is_refused():
    schedule, t, x0, eps, x_t = _setup("linear", T=100)
    with pytest.raises(ValueError, match="unknown prediction target"):
        to_x0_eps(schedule, "score", x0, x_t, t)
    with pytest.raises(ValueError, match="unknown prediction target"):
        from_x0_eps(schedule, "score", x0, eps, x_t, t)
