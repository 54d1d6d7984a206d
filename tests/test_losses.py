"""Losses and the variational bound: KL, discretized likelihood, min-SNR weighting, hybrid loss, bits/dim."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffusion.core.denoiser import Prediction
from diffusion.core.levels import DiscreteLevels
from diffusion.core.losses import (
    discretized_gaussian_log_likelihood,
    min_snr_weight,
    normal_kl,
    prior_bpd,
    training_losses,
    vb_terms_bpd,
)
from diffusion.core.objectives import DDPM
from diffusion.core.reverse import p_mean_variance
from diffusion.core.schedules import NoiseSchedule, make_betas
from diffusion.core.targets import TARGETS, eps_from_x0, from_x0_eps
from tests.analytic import GAUSSIAN

LEVELS = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 8-bit values, scaled to [-1, 1]


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(1000, generator=g, dtype=torch.float64), torch.randn(1000, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(1000, generator=g, dtype=torch.float64), torch.randn(1000, generator=g, dtype=torch.float64)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("mean", "scale"), [(0.0, 0.3), (0.93, 0.01), (-1.4, 0.2), (0.2, 1e-4), (0.5, 30.0)])
def test_discretized_likelihood_is_a_distribution_over_the_256_levels(mean, scale):
    x = LEVELS.view(-1, 1)
    log_p = discretized_gaussian_log_likelihood(
        x, torch.tensor(mean, dtype=torch.float64), torch.tensor(math.log(scale))
    )
    assert torch.isfinite(log_p).all() and (log_p <= 0).all()
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_integrates_the_density_over_each_bin():
    mean, scale = 0.1, 0.05
    dist = Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64))
    for level in LEVELS[[1, 100, 140, 200, 254]]:
        u = torch.linspace(level - 1 / 255, level + 1 / 255, 20_001, dtype=torch.float64)
        mass = torch.trapezoid(dist.log_prob(u).exp(), u)
        got = discretized_gaussian_log_likelihood(level, torch.tensor(mean), torch.tensor(math.log(scale)))
        assert got.exp().item() == pytest.approx(mass.item(), rel=1e-6, abs=1e-300)
    # the outer bins reach to infinity
    edge = discretized_gaussian_log_likelihood(torch.tensor(-1.0), torch.tensor(-1.5), torch.tensor(math.log(0.2)))
    assert edge.exp().item() == pytest.approx(
        dist.__class__(-1.5, 0.2).cdf(torch.tensor(-1 + 1 / 255)).item(), rel=1e-9
    )


def _eight_bit(data, n, seed=0, shape=(1, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x = data.sample((n, *shape), g).clamp(-1, 1)
    return ((x + 1) * 127.5).round() / 127.5 - 1


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_prior_term_is_near_zero_at_T_1000(name):
    schedule = NoiseSchedule(make_betas(name, 1000))
    prior = prior_bpd(schedule, _eight_bit(GAUSSIAN, 64))
    assert (prior >= 0).all() and prior.max().item() < 1e-4


def test_vb_terms_vanish_for_the_true_x0_with_the_true_variance():
    """With x0_pred = x0 and sigma^2 = beta-tilde, p(x_{t-1} | x_t) is q(x_{t-1} | x_t, x0): every KL is zero."""
    schedule = NoiseSchedule(make_betas("linear", 1000))
    x0 = _eight_bit(GAUSSIAN, 32)
    for step in (1, 2, 300, 999):
        t = torch.full((32,), step)
        x_t = schedule.q_sample(x0, t, torch.randn_like(x0))
        pred = Prediction(x0=x0, eps=eps_from_x0(schedule, x_t, t, x0))
        mean, log_var = p_mean_variance(schedule, pred, x_t, t, "beta_tilde")
        assert vb_terms_bpd(schedule, x0, x_t, t, mean, log_var).abs().max().item() < 1e-9


def test_vlb_is_an_upper_bound_on_the_entropy_of_8bit_data():
    """The negative VLB bounds -log p(x0) from above, so on 8-bit data it must exceed the data's entropy (here
    with the analytic denoiser of the continuous Gaussian); every term is finite and non-negative."""
    objective = DDPM(
        timesteps=1000, schedule="linear", target="eps", loss="mse", min_snr_gamma=None, learned_variance=False,
        vlb_weight=0.001,
    )  # fmt: skip
    x0 = _eight_bit(GAUSSIAN, 128)
    g = torch.Generator().manual_seed(1)
    for variance in ("beta", "beta_tilde"):
        terms = objective.vlb_terms_bpd(GAUSSIAN.denoiser(objective.levels), x0, variance, g)
        terms = torch.stack([term for _, term in terms])
        assert torch.isfinite(terms).all() and (terms >= 0).all()
        nll = (terms.sum(0) + objective.prior_bpd(x0)).mean().item()
        # entropy of N(0.3, 0.5^2) discretized to the 256 levels (outer bins reaching to infinity), in bits
        inner_edges = Normal(0.3, 0.5).cdf(LEVELS[:-1] + 1 / 255)
        mass = torch.diff(torch.cat([torch.zeros(1), inner_edges, torch.ones(1)]).double())
        entropy = -(mass * mass.log2()).sum().item()
        assert nll > entropy


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
@pytest.mark.parametrize("step", [1, 20, 300, 900])
def test_vb_term_matches_its_closed_form_for_gaussian_data(variance, step):
    """For x0 ~ N(m, s^2) and the optimal denoiser, mu_q - mu_p = coef1 (x0 - E[x0 | x_t]), so
    E[L_{t-1}] = 1/2 (log(sigma_p^2 / beta-tilde) + beta-tilde / sigma_p^2 - 1 + coef1^2 Var(x0 | x_t) / sigma_p^2),
    with Var(x0 | x_t) = s^2 sigma^2 / (a^2 s^2 + sigma^2), in nats (divided by ln 2 for bits)."""
    schedule = NoiseSchedule(make_betas("cosine", 1000))
    n = 100_000
    g = torch.Generator().manual_seed(step)
    x0 = GAUSSIAN.sample((n, 1, 1, 1), g)
    t = torch.full((n,), step)
    x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    oracle = GAUSSIAN.denoiser(DiscreteLevels(schedule.alphas_cumprod))
    mean, log_var = p_mean_variance(schedule, oracle(x_t, oracle.levels.level(step)), x_t, t, variance)
    got = vb_terms_bpd(schedule, x0, x_t, t, mean, log_var)
    abar, s2 = schedule.alphas_cumprod[step], GAUSSIAN.stds[0] ** 2
    posterior_var = s2 * (1 - abar) / (abar * s2 + 1 - abar)
    tilde, model_var = schedule.posterior_variance[step], log_var[0].exp().item()
    coef1 = schedule.posterior_mean_coef1[step]
    expected = 0.5 * (math.log(model_var / tilde) + tilde / model_var - 1 + coef1**2 * posterior_var / model_var)
    assert got.mean().item() == pytest.approx(expected.item() / math.log(2), rel=0.02)


@pytest.mark.parametrize("target", TARGETS)
def test_min_snr_weighting_is_min_snr_gamma_times_the_x0_loss(target):
    """Hang et al. 2023 define the weight in x0 space; for any target the weighted loss must equal it."""
    schedule = NoiseSchedule(make_betas("cosine", 1000))
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (64,), generator=g)
    x0 = torch.rand(64, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(64, 3, 8, 8, generator=g, dtype=torch.float64)
    x_t = schedule.q_sample(x0, t, noise)
    x0_pred = x0 + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    output = from_x0_eps(schedule, target, x0_pred, eps_from_x0(schedule, x_t, t, x0_pred), x_t, t)
    kw = dict(target=target, loss="mse", learned_variance=False, vlb_weight=0.0, min_snr_gamma=5.0)
    weighted = training_losses(schedule, output, x0, x_t, t, noise, **kw)["loss"]
    expected = schedule.snr[t].clamp(max=5.0) * ((x0_pred - x0) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(weighted, expected, rtol=1e-9, atol=1e-12)
    if target == "eps":  # the familiar closed form for eps-prediction
        torch.testing.assert_close(
            min_snr_weight(schedule, "eps", t, 5.0), schedule.snr[t].clamp(max=5.0) / schedule.snr[t]
        )


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_simple_loss_is_the_error_against_the_right_target(target, loss):
    schedule = NoiseSchedule(make_betas("linear", 1000))
    x0, noise = torch.rand(8, 1, 4, 4) * 2 - 1, torch.randn(8, 1, 4, 4)
    t = torch.arange(0, 1000, 125)
    x_t = schedule.q_sample(x0, t, noise)
    exact = from_x0_eps(schedule, target, x0, noise, x_t, t)
    kw = dict(target=target, loss=loss, learned_variance=False, vlb_weight=0.0, min_snr_gamma=None)
    assert training_losses(schedule, exact, x0, x_t, t, noise, **kw)["loss"].abs().max() < 1e-6
    off = training_losses(schedule, exact + 0.5, x0, x_t, t, noise, **kw)["loss"]
    torch.testing.assert_close(off, torch.full((8,), 0.25 if loss == "mse" else 0.5))


def test_hybrid_loss_trains_the_variance_only_through_the_vlb():
    """Nichol & Dhariwal 2021: L_hybrid = L_simple + lambda L_vlb, with the mean's output detached in L_vlb."""
    schedule = NoiseSchedule(make_betas("cosine", 1000))
    x0, noise = torch.rand(16, 3, 4, 4) * 2 - 1, torch.randn(16, 3, 4, 4)
    t = torch.randint(0, 1000, (16,))
    x_t = schedule.q_sample(x0, t, noise)
    output = torch.randn(16, 6, 4, 4, requires_grad=True)
    kw = dict(target="eps", loss="mse", learned_variance=True, vlb_weight=0.001, min_snr_gamma=None)
    terms = training_losses(schedule, output, x0, x_t, t, noise, **kw)
    torch.testing.assert_close(terms["loss"], terms["simple"] + 0.001 * 1000 * terms["vb"])
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    assert grad_vb[:, :3].abs().max() == 0 and grad_vb[:, 3:].abs().max() > 0
    (grad_simple,) = torch.autograd.grad(terms["simple"].sum(), output)
    assert grad_simple[:, 3:].abs().max() == 0


def test_learned_variance_interpolates_between_beta_and_beta_tilde():
    schedule = NoiseSchedule(make_betas("linear", 1000))
    x_t, t = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.tensor([5, 500, 999])
    pred = lambda v: Prediction(x_t, x_t, torch.full_like(x_t, v))  # noqa: E731
    _, low = p_mean_variance(schedule, pred(0.0), x_t, t, "learned")
    _, high = p_mean_variance(schedule, pred(1.0), x_t, t, "learned")
    _, tilde = p_mean_variance(schedule, pred(0.0), x_t, t, "beta_tilde")
    _, beta = p_mean_variance(schedule, pred(0.0), x_t, t, "beta")
    torch.testing.assert_close(low, tilde)
    torch.testing.assert_close(high, beta)
    _, half = p_mean_variance(schedule, pred(0.5), x_t, t, "learned")
    torch.testing.assert_close(half, (low + high) / 2)


def test_bad_shapes_are_refused():
    schedule = NoiseSchedule(make_betas("linear", 100))
    x0 = torch.zeros(2, 1, 4, 4)
    t = torch.tensor([1, 2])
    kw = dict(target="eps", learned_variance=False, vlb_weight=0.0)
    with pytest.raises(ValueError, match="2 x 1 channels"):
        training_losses(schedule, x0, x0, x0, t, x0, loss="mse", min_snr_gamma=None, **{**kw, "learned_variance": True})
    with pytest.raises(ValueError, match="learned_variance=true"):
        p_mean_variance(schedule, Prediction(x0, x0), x0, t, "learned")
