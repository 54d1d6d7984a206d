"""Noise schedules, the forward process and its posterior, against closed forms and Bayes' rule."""

import math

import pytest
import torch

from diffusion.core.schedules import SCHEDULES, NoiseSchedule, make_betas, spaced_timesteps

ALL = sorted(SCHEDULES)


def test_linear_schedule_is_ho_et_al_and_scales_with_T():
    betas = make_betas("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    # improved-diffusion's scaling: the same total noise for other T
    for T in (250, 4000):
        b = make_betas("linear", T)
        assert b[0].item() == pytest.approx(1e-4 * 1000 / T) and b[-1].item() == pytest.approx(0.02 * 1000 / T)
        assert b.sum().item() == pytest.approx(betas.sum().item(), rel=1e-3)


def test_cosine_schedule_follows_its_alpha_bar_until_the_clip():
    T, s = 1000, 0.008
    schedule = NoiseSchedule(make_betas("cosine", T))
    t = torch.arange(1, T + 1, dtype=torch.float64)
    f = lambda u: torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = f(t) / f(torch.zeros(1, dtype=torch.float64))
    unclipped = schedule.betas < 0.999
    torch.testing.assert_close(schedule.alphas_cumprod[unclipped], expected[unclipped], rtol=1e-10, atol=0)
    assert schedule.betas.max().item() == pytest.approx(0.999)


def test_sigmoid_and_quadratic_schedules_follow_their_definitions():
    T = 500
    quad = make_betas("quadratic", T)
    roots = quad.sqrt()
    torch.testing.assert_close(roots.diff(), roots.diff().mean().expand(T - 1), rtol=1e-9, atol=0)
    schedule = NoiseSchedule(make_betas("sigmoid", T))
    tau = torch.arange(1, T + 1, dtype=torch.float64) / T
    sig = torch.sigmoid
    expected = (sig(torch.tensor(3.0)) - sig(-3 + 6 * tau)) / (sig(torch.tensor(3.0)) - sig(torch.tensor(-3.0)))
    ok = schedule.betas < 0.999
    torch.testing.assert_close(schedule.alphas_cumprod[ok], expected[ok].double(), rtol=1e-8, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_tables_are_float64_and_consistent(name):
    schedule = NoiseSchedule(make_betas(name, 1000))
    assert all(buf.dtype == torch.float64 for n, buf in schedule.named_buffers() if n != "network_timesteps")
    b = schedule.betas
    assert ((b > 0) & (b <= 0.999)).all()
    # independent recomputation of the products, in exact rational steps via log-sums
    torch.testing.assert_close(schedule.alphas_cumprod, torch.exp(torch.log1p(-b).cumsum(0)), rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.snr, schedule.alphas_cumprod / (1 - schedule.alphas_cumprod))
    assert (schedule.alphas_cumprod.diff() < 0).all()
    # the tables hold no state in checkpoints: they follow from the config
    assert schedule.state_dict() == {}


def test_float32_use_is_the_rounded_float64_table():
    """alpha_bar cumulated in float32 drifts; the float64 table cast at the point of use does not."""
    schedule = NoiseSchedule(make_betas("linear", 1000))
    x = torch.zeros(1000, 1, dtype=torch.float32)
    used = NoiseSchedule.at(schedule.alphas_cumprod, torch.arange(1000), x).flatten()
    assert torch.equal(used, schedule.alphas_cumprod.float())
    half_ulp = 2.0**-24
    drifted = torch.cumprod(1 - schedule.betas.float(), 0)
    assert ((drifted.double() - schedule.alphas_cumprod).abs() / schedule.alphas_cumprod).max() > 4 * half_ulp
    assert ((used.double() - schedule.alphas_cumprod).abs() / schedule.alphas_cumprod).max() <= half_ulp


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_sample_matches_closed_form_moments(name):
    schedule = NoiseSchedule(make_betas(name, 1000))
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.tensor([-0.8, 0.1, 0.9], dtype=torch.float64).view(1, 3, 1, 1).expand(n, 3, 1, 1)
    for step in (0, 50, 500, 999):
        t = torch.full((n,), step)
        x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        mean, var = schedule.q_mean_variance(x0[:1], t[:1])
        se = var[0].sqrt() / math.sqrt(n)
        assert ((x_t.mean(0) - mean[0]).abs() < 5 * se).all()
        assert ((x_t.var(0) / var[0] - 1).abs() < 5 * math.sqrt(2 / n)).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("step", [1, 10, 500, 999])
def test_posterior_matches_bayes_rule_numerically(name, step):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), normalised on a fine grid."""
    schedule = NoiseSchedule(make_betas(name, 1000))
    beta, abar, abar_prev = schedule.betas[step], schedule.alphas_cumprod[step], schedule.alphas_cumprod_prev[step]
    x0 = torch.tensor(0.35, dtype=torch.float64)
    x_t = abar.sqrt() * x0 + 0.7 * (1 - abar).sqrt()  # a typical x_t: 0.7 noise stds from its mean
    # the grid spans +-12 stds of both factors, as functions of x_{t-1}; 400k points resolve the product
    prior_mean, prior_std = abar_prev.sqrt() * x0, (1 - abar_prev).sqrt()
    like_mean, like_std = x_t / (1 - beta).sqrt(), (beta / (1 - beta)).sqrt()
    lo = min(prior_mean - 12 * prior_std, like_mean - 12 * like_std)
    hi = max(prior_mean + 12 * prior_std, like_mean + 12 * like_std)
    grid = torch.linspace(lo, hi, 400_001, dtype=torch.float64)
    log_p = -0.5 * (x_t - (1 - beta).sqrt() * grid) ** 2 / beta - 0.5 * (grid - prior_mean) ** 2 / (1 - abar_prev)
    p = torch.exp(log_p - log_p.max())
    p = p / torch.trapezoid(p, grid)
    mean = torch.trapezoid(p * grid, grid)
    var = torch.trapezoid(p * (grid - mean) ** 2, grid)
    t = torch.tensor([step])
    m, v, log_v = schedule.q_posterior_mean_variance(x0.view(1, 1), x_t.view(1, 1), t)
    assert m.item() == pytest.approx(mean.item(), rel=1e-6, abs=1e-9)
    assert v.item() == pytest.approx(var.item(), rel=1e-5)
    assert log_v.item() == pytest.approx(math.log(var.item()), abs=1e-5)


def test_posterior_at_t0_is_the_data_point():
    schedule = NoiseSchedule(make_betas("linear", 1000))
    x0, x_t = torch.randn(4, 3), torch.randn(4, 3)
    mean, var, log_var = schedule.q_posterior_mean_variance(x0, x_t, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert (var == 0).all() and torch.isfinite(log_var).all()  # the log is clipped to the value at t = 1


def test_respacing_keeps_alpha_bar_at_the_chosen_steps():
    schedule = NoiseSchedule(make_betas("cosine", 1000))
    chosen = [0, 3, 40, 41, 400, 999]
    respaced = schedule.respace(chosen)
    torch.testing.assert_close(respaced.alphas_cumprod, schedule.alphas_cumprod[chosen], rtol=1e-12, atol=0)
    assert respaced.network_timesteps.tolist() == chosen
    full = schedule.respace(range(1000))
    torch.testing.assert_close(full.betas, schedule.betas, rtol=1e-10, atol=0)
    # respacing a respaced schedule maps back to the network's timesteps
    assert respaced.respace([1, 4, 5]).network_timesteps.tolist() == [3, 400, 999]
    for bad in ([], [5, 5], [3, 2], [0, 1000], [-1, 4]):
        with pytest.raises(ValueError):
            schedule.respace(bad)


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "logsnr", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 10, 50, 999, 1000])
def test_spaced_timesteps_are_distinct_and_span_the_schedule(spacing, steps):
    schedule = NoiseSchedule(make_betas("linear", 1000))
    ts = spaced_timesteps(schedule.alphas_cumprod, steps, spacing)
    assert len(ts) == steps and ts == sorted(set(ts))
    first = 1000 // steps - 1 if spacing == "trailing" else 0  # trailing leaves out the first T/steps - 1
    assert ts[-1] == 999 and (steps == 1 or ts[0] == first)


def test_spacings_follow_their_rule():
    schedule = NoiseSchedule(make_betas("linear", 1000))
    uni = torch.tensor(spaced_timesteps(schedule.alphas_cumprod, 10, "uniform"), dtype=torch.float64)
    assert (uni.diff() - 111).abs().max() <= 1
    quad = torch.tensor(spaced_timesteps(schedule.alphas_cumprod, 10, "quadratic"), dtype=torch.float64)
    assert (quad.sqrt().diff() - math.sqrt(999) / 9).abs().max() < 0.05
    # Lin et al. 2024, Table 2: trailing with T = 1000 and 10 steps is 999, 899, ..., 99
    assert spaced_timesteps(schedule.alphas_cumprod, 10, "trailing") == list(range(99, 1000, 100))
    log_snr = schedule.snr.log()[spaced_timesteps(schedule.alphas_cumprod, 10, "logsnr")]
    step = (log_snr[0] - log_snr[-1]) / 9
    assert ((-log_snr.diff() - step).abs() / step).max() < 0.05


def test_bad_schedule_arguments_are_refused():
    """(An unknown schedule and T < 2 are the DDPM objective's settings checks: tests/test_objectives.py.)"""
    with pytest.raises(ValueError, match="more than 20 steps"):
        make_betas("linear", 10)
    assert make_betas("cosine", 10).max() <= 0.999
    with pytest.raises(ValueError, match="between 1 and T"):
        spaced_timesteps(NoiseSchedule(make_betas("linear", 100)).alphas_cumprod, 101, "uniform")
