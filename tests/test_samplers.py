"""Samplers driven by the analytic optimal denoiser: each must reproduce the data distribution.

With N = 80,000 scalars the sampling noise is about 0.002 on the mean and std and 0.005 on the KS distance, so the
tolerances below catch a wrong coefficient (errors of 10-100%) while admitting each method's own discretisation
error at its default number of steps: DDIM, a first-order method, is checked for that order separately.
"""

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.distributions import Normal

from diffusion.core.denoiser import Prediction
from diffusion.core.drawing import CountedDenoiser
from diffusion.core.samplers import (
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    dpm_solver_sample,
    final,
    ode_sample,
    sde_sample,
)
from tests.analytic import GAUSSIAN, MIXTURE, schedule_levels

LINEAR = schedule_levels("linear")


# The configured spacings of DDIM (uniform) and DPM-Solver++ (log-SNR) were chosen for the samples of real networks
# (configs/sampler/*.yaml); evenly spaced in sqrt(t), the same steps solve the analytic ODE more accurately. The
# strict checks of the math use that spacing; test_the_configured_spacings_stay_close_to_the_data checks the
# configured ones with the bias they carry.
ACCURATE_SPACING = {"ddim": "quadratic", "dpm_solver": "quadratic"}


def default_sampler(name, spacing=None):
    """The sampler as configured in configs/sampler/NAME.yaml (what users get), its spacing replaced if given."""
    config = OmegaConf.load(f"configs/sampler/{name}.yaml")
    if spacing is not None:
        config.spacing = spacing
    return instantiate(config)


def mixture_cdf(data, x):
    return sum(w * Normal(m, s).cdf(x) for w, m, s in zip(data.weights, data.means, data.stds, strict=True))


def check_distribution(data, out, *, mean_tol, std_tol, ks_tol, weight_tol):
    flat = out.flatten()
    assert abs(flat.mean().item() - data.mean) < mean_tol
    assert abs(flat.std().item() - data.std) < std_tol
    x = flat.sort().values
    empirical = torch.arange(1, len(x) + 1, dtype=torch.float64) / len(x)
    assert (empirical - mixture_cdf(data, x)).abs().max().item() < ks_tol
    if len(data.weights) == 2:  # the weight of the first mode: the fraction of samples on its side of the valley
        assert abs((flat < -0.05).double().mean().item() - data.weights[0]) < weight_tol


def draw(data, sampler, shape=(20_000, 1, 2, 2), levels=LINEAR, seed=1, **options):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g, dtype=torch.float64)
    return final(sampler(data.denoiser(levels), x_T, generator=g, **options))


# name -> tolerances (mean, std, KS, mode weight); DDIM 50 and DPM-Solver++ 20 carry their known bias
TOLERANCES = {
    "ddpm": (0.008, 0.006, 0.007, 0.008),
    "sde": (0.008, 0.006, 0.007, 0.008),
    "ode": (0.008, 0.006, 0.007, 0.008),
    "dpm_solver": (0.008, 0.015, 0.012, 0.008),
    "ddim": (0.008, 0.025, 0.015, 0.008),
}


@pytest.mark.parametrize("data", [GAUSSIAN, MIXTURE], ids=["gaussian", "mixture"])
@pytest.mark.parametrize("name", list(TOLERANCES))
def test_sampler_at_its_defaults_reproduces_the_data(name, data):
    mean_tol, std_tol, ks_tol, weight_tol = TOLERANCES[name]
    out = draw(data, default_sampler(name, ACCURATE_SPACING.get(name)))
    check_distribution(data, out, mean_tol=mean_tol, std_tol=std_tol, ks_tol=ks_tol, weight_tol=weight_tol)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("name", list(ACCURATE_SPACING))
def test_the_configured_spacings_stay_close_to_the_data(name, schedule):
    """At the configured spacing the discretisation bias is larger (measured: a KS distance up to 0.026 and a std
    off by up to 0.029 of 0.5), but a wrong coefficient would still be far outside these bounds."""
    for data in (GAUSSIAN, MIXTURE):
        out = draw(data, default_sampler(name), levels=schedule_levels(schedule))
        check_distribution(data, out, mean_tol=0.01, std_tol=0.04, ks_tol=0.035, weight_tol=0.015)


@pytest.mark.parametrize("name", ["ddim", "dpm_solver", "ode"])
def test_fast_samplers_also_reproduce_the_data_on_the_cosine_schedule(name):
    _, std_tol, ks_tol, weight_tol = TOLERANCES[name]
    out = draw(MIXTURE, default_sampler(name, ACCURATE_SPACING.get(name)), levels=schedule_levels("cosine"))
    check_distribution(MIXTURE, out, mean_tol=0.01, std_tol=std_tol * 1.5, ks_tol=ks_tol, weight_tol=weight_tol * 1.5)


@pytest.mark.parametrize("data", [GAUSSIAN, MIXTURE], ids=["gaussian", "mixture"])
def test_predictor_corrector_sampling_reproduces_the_data(data):
    """Euler-Maruyama plus one Langevin step per level (Song et al. 2021, PC sampling), on 16x16 'images' so that
    the per-image norms in the corrector's step size are well defined."""
    out = draw(data, sde_sample, shape=(300, 1, 16, 16), steps=500, spacing="uniform", corrector_steps=1, snr=0.16)
    check_distribution(data, out, mean_tol=0.01, std_tol=0.01, ks_tol=0.01, weight_tol=0.01)


def _max_error(sampler, steps, reference, x_T, spacing):
    return (final(sampler(GAUSSIAN.denoiser(LINEAR), x_T, steps=steps, spacing=spacing)) - reference).abs().max()


@pytest.mark.parametrize(
    ("sampler", "spacing", "order"),
    [
        (lambda *a, **k: ddim_sample(*a, eta=0.0, **k), "quadratic", 1),
        (dpm_solver_sample, "quadratic", 2),
        (ode_sample, "logsnr", 2),
    ],
    ids=["ddim", "dpm_solver", "ode"],
)
def test_deterministic_samplers_converge_at_their_order(sampler, spacing, order):
    """All three solve the same probability-flow ODE: against a 1000-step Heun solution, doubling the steps divides
    the error by 2^order (DDIM is Euler's method; DPM-Solver++(2M) and Heun are second order). Gaussian data: its
    flow is smooth everywhere, where the mixture's separates the modes along a sharp ridge."""
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2000, 1, 2, 2, generator=g, dtype=torch.float64)
    reference = final(ode_sample(GAUSSIAN.denoiser(LINEAR), x_T, steps=1000, spacing="logsnr"))
    coarse, fine = (_max_error(sampler, n, reference, x_T, spacing) for n in (40, 80))
    assert 2**order * 0.8 < coarse / fine < 2**order * 1.35


def test_ddim_with_eta_one_is_ddpm_with_beta_tilde():
    """Song et al. 2021, eq. 16: eta = 1 gives sigma_t^2 = beta-tilde, i.e. ancestral sampling."""
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(64, 1, 4, 4, generator=g, dtype=torch.float64)
    den = MIXTURE.denoiser(LINEAR)
    a = final(ddim_sample(den, x_T, steps=25, spacing="uniform", eta=1.0, generator=torch.Generator().manual_seed(5)))
    b = final(
        ddpm_sample(
            den,
            x_T,
            steps=25,
            spacing="uniform",
            variance="beta_tilde",
            generator=torch.Generator().manual_seed(5),
        )
    )
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_learned_variance_at_its_ends_is_beta_tilde_and_beta():
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(16, 1, 4, 4, generator=g, dtype=torch.float64)
    oracle = GAUSSIAN.denoiser(LINEAR)

    class WithFrac:
        levels, rows_per_image = LINEAR, 1

        def __init__(self, frac):
            self.frac = frac

        def __call__(self, x, level):
            p = oracle(x, level)
            return Prediction(p.x0, p.eps, torch.full_like(x, self.frac))

    def with_frac(frac):
        return WithFrac(frac)

    def run(den, variance):
        return final(
            ddpm_sample(
                den,
                x_T,
                steps=20,
                spacing="uniform",
                variance=variance,
                generator=torch.Generator().manual_seed(1),
            )
        )

    torch.testing.assert_close(run(with_frac(0.0), None), run(oracle, "beta_tilde"))
    torch.testing.assert_close(run(with_frac(1.0), "learned"), run(oracle, "beta"))
    with pytest.raises(ValueError, match="learned"):
        run(oracle, "learned")


@pytest.mark.parametrize("name", list(TOLERANCES))
def test_samplers_are_deterministic_given_a_seed_and_count_their_evaluations(name):
    sampler = default_sampler(name)
    oracle = MIXTURE.denoiser(LINEAR)
    counting = CountedDenoiser(oracle)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        x_T = torch.randn(8, 1, 4, 4, generator=g)
        return list(sampler(counting, x_T, generator=g, steps=10))

    steps = run(3)
    assert len(steps) == 10 and steps[-1].level.timestep == 0 and steps[0].level.timestep == 999
    expected_calls = {"ode": 19}.get(name, 10)
    assert counting.rows == 8 * expected_calls
    again, other = final(run(3)), final(run(4))
    assert torch.equal(steps[-1].x, again) and not torch.equal(again, other)
    # with the same x_T, only the stochastic samplers depend on the generator
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    one, two = (final(sampler(oracle, x_T, steps=10, generator=torch.Generator().manual_seed(s))) for s in (1, 2))
    assert torch.equal(one, two) == (name in ("ddim", "dpm_solver", "ode"))
    assert all(s.x.dtype == torch.float32 for s in steps)


@pytest.mark.parametrize("name", list(TOLERANCES))
def test_one_step_returns_the_prediction_of_x0(name):
    """Respaced to one step, every sampler jumps from t = T - 1 to the data: one network evaluation (two for the
    second-order ODE's Heun step), and DDPM's posterior mean at alpha-bar_prev = 1 is the predicted x0 itself."""
    x_T = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    oracle = GAUSSIAN.denoiser(LINEAR)
    steps = list(default_sampler(name)(oracle, x_T, steps=1, generator=torch.Generator().manual_seed(1)))
    assert len(steps) == 1 and steps[0].level.timestep == 999
    if name in ("ddpm", "ddim", "dpm_solver"):
        expected = oracle(x_T, LINEAR.level(999)).x0.clamp(-1, 1)
        torch.testing.assert_close(steps[0].x.double(), expected)


def test_ddim_inversion_then_sampling_returns_the_image():
    g = torch.Generator().manual_seed(2)
    images = GAUSSIAN.sample((256, 1, 4, 4), g)
    den = GAUSSIAN.denoiser(LINEAR)
    errors = []
    for steps in (50, 100, 200):
        noise = final(ddim_invert(den, images, steps=steps, spacing="quadratic"))
        back = final(ddim_sample(den, noise, steps=steps, spacing="quadratic", eta=0.0))
        errors.append((back - images).abs().mean().item())
        assert abs(noise.std().item() - 1) < 0.06  # the codes are standard normal
    assert errors[-1] < 0.01 and (back - images).abs().max() < 0.05
    assert 1.7 < errors[0] / errors[1] < 2.3 and 1.7 < errors[1] / errors[2] < 2.3  # first order, like DDIM


def test_float32_sampling_matches_float64():
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(500, 1, 2, 2, generator=g, dtype=torch.float64)
    for name in ("ddim", "dpm_solver", "ode"):
        sampler = default_sampler(name)
        hi = final(sampler(MIXTURE.denoiser(LINEAR), x_T))
        lo = final(sampler(MIXTURE.denoiser(LINEAR), x_T.float()))
        assert (hi - lo.double()).abs().max() < 1e-4


def test_bad_sampler_options_are_refused():
    x_T = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match="eta must lie in"):
        final(ddim_sample(GAUSSIAN.denoiser(LINEAR), x_T, steps=10, spacing="uniform", eta=1.5))
    with pytest.raises(ValueError, match="between 1 and T"):
        final(dpm_solver_sample(GAUSSIAN.denoiser(LINEAR), x_T, steps=0, spacing="uniform"))
    assert math.isfinite(final(ode_sample(GAUSSIAN.denoiser(LINEAR), x_T, steps=1, spacing="uniform")).sum().item())
