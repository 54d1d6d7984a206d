"""The EDM formulation (Karras et al. 2022): the preconditioning, the loss and its optimum, the sigma grid, and
EDM's Heun sampler on EDM and on discrete (VP) models, against the analytic denoisers of tests/analytic.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion.core.denoiser import NetworkDenoiser
from diffusion.core.levels import Level, karras_sigmas
from diffusion.core.objectives import EDM
from diffusion.core.objectives.edm import edm_loss, loss_weight, preconditioning
from diffusion.core.samplers import dpm_solver_sample, final, heun_sample
from diffusion.errors import SettingError
from sample import sample
from tests.analytic import GAUSSIAN, MIXTURE, GaussianMixture, schedule_levels
from tests.helpers import compose_config, load_state, resume_four_plus_four, run_script
from tests.test_multiprocess import TINY_FEATURES, assert_same_training_state
from tests.test_samplers import TOLERANCES, check_distribution, default_sampler
from train import train

D = 0.5  # sigma_data
OBJECTIVE = EDM(p_mean=-0.4, p_std=1.0, sigma_data=D, sigma_min=0.002, sigma_max=80.0, rho=7.0, learned_weighting=False)
EDM_LEVELS = OBJECTIVE.levels
LINEAR = schedule_levels("linear")
COSINE = schedule_levels("cosine")
SIGMAS = torch.tensor([0.002, 0.05, 0.5, 2.0, 80.0], dtype=torch.float64)
HEUN = dict(sigma_min=0.002, sigma_max=80.0, rho=7.0, s_churn=0.0, s_min=0.0, s_max=float("inf"), s_noise=1.0)


def optimal_D(data: GaussianMixture, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[y | y + sigma n = x]: the optimal denoiser of EDM's space, through the VP state x / sqrt(1 + sigma^2)."""
    level = Level.of_sigma(sigma)
    return data.denoiser(EDM_LEVELS)(x * level.a, level).x0


def test_the_preconditioning_gives_unit_variance_inputs_and_targets():
    """For data of standard deviation sigma_data, c_in x has unit variance, the effective target (y - c_skip x) /
    c_out has unit variance, and c_skip minimises it (the paper's Appendix B.6); and lambda c_out^2 = 1."""
    c_skip, c_out, c_in, c_noise = preconditioning(SIGMAS, D)
    d = D
    torch.testing.assert_close(c_in**2 * (d**2 + SIGMAS**2), torch.ones_like(SIGMAS))
    target_variance = ((1 - c_skip) ** 2 * d**2 + c_skip**2 * SIGMAS**2) / c_out**2
    torch.testing.assert_close(target_variance, torch.ones_like(SIGMAS))
    for shift in (-0.01, 0.01):  # any other skip weight leaves the target more variance
        other = ((1 - c_skip - shift) ** 2 * d**2 + (c_skip + shift) ** 2 * SIGMAS**2) / c_out**2
        assert (other > target_variance).all()
    torch.testing.assert_close(loss_weight(SIGMAS, D) * c_out**2, torch.ones_like(SIGMAS))
    torch.testing.assert_close(c_noise, SIGMAS.log() / 4)


def test_the_optimal_denoiser_of_gaussian_data_needs_no_network_output():
    """For y ~ N(0, sigma_data^2) the optimal D(x; sigma) is sigma_data^2 / (sigma^2 + sigma_data^2) x = c_skip x:
    the skip connection alone, F = 0."""
    data = GaussianMixture(weights=(1.0,), means=(0.0,), stds=(D,))
    x = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    for sigma in SIGMAS.tolist():
        optimum = optimal_D(data, x, sigma)
        c_skip = preconditioning(torch.tensor(sigma, dtype=torch.float64), D)[0]
        torch.testing.assert_close(optimum, c_skip * x)
        level = Level.of_sigma(sigma)  # the objective reads F = 0 as D = c_skip x
        torch.testing.assert_close(OBJECTIVE.prediction(torch.zeros_like(x), x * level.a, level).x0, optimum)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 5.0])
def test_the_loss_of_the_optimal_denoiser_is_its_closed_form(sigma):
    """For y ~ N(m, s^2) the optimal D has mean squared error s^2 sigma^2 / (s^2 + sigma^2), the posterior
    variance: the EDM loss of F* = (D* - c_skip x) / c_out is lambda(sigma) times it, and a wrong denoiser scores
    higher."""
    g = torch.Generator().manual_seed(1)
    y = GAUSSIAN.sample((40_000, 1, 2, 2), g)
    x = y + sigma * torch.randn(y.shape, generator=g, dtype=torch.float64)
    sigmas = torch.full((len(y),), sigma, dtype=torch.float64)
    c_skip, c_out, _, _ = preconditioning(torch.tensor(sigma, dtype=torch.float64), D)
    optimum = optimal_D(GAUSSIAN, x, sigma)
    loss = edm_loss((optimum - c_skip * x) / c_out, y, x, sigmas, D).mean().item()
    s = GAUSSIAN.stds[0]
    closed = (loss_weight(torch.tensor(sigma), D) * s**2 * sigma**2 / (s**2 + sigma**2)).item()
    assert loss == pytest.approx(closed, rel=0.02)
    weighted = (loss_weight(sigmas, D).view(-1, 1, 1, 1) * (optimum - y) ** 2).flatten(1).mean(1).mean().item()
    assert loss == pytest.approx(weighted, rel=1e-9)  # the F form is lambda ||D - y||^2
    for wrong in (0.7 * optimum, optimum + 0.1):  # worse by about lambda E[(wrong - D*)^2]
        excess = (loss_weight(torch.tensor(sigma), D) * ((wrong - optimum) ** 2).mean()).item()
        assert edm_loss((wrong - c_skip * x) / c_out, y, x, sigmas, D).mean().item() > loss + 0.5 * excess


def optimal_F(data: GaussianMixture):
    """A stand-in network that computes the optimal F* from what the EDM objective gives it (c_in x and c_noise =
    ln sigma / 4): (D* - c_skip x) / c_out."""

    def network(x_in, c_noise, labels=None):
        sigma = (4 * c_noise.double()).exp().view(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = preconditioning(sigma, D)
        x = x_in / c_in
        alpha_bar = 1 / (1 + sigma**2)
        return (data.posterior_mean(x * alpha_bar.sqrt(), alpha_bar) - c_skip * x) / c_out

    return network


def test_the_objective_preconditions_the_network_at_every_level():
    """Through NetworkDenoiser, the optimal F* yields the analytic x0 at the levels of a grid and at any sigma: the
    input scaling, the noise input and the output conversion of sampling agree with each other."""
    denoise = NetworkDenoiser(
        optimal_F(MIXTURE), OBJECTIVE, labels=None, guidance=1.0, null_label=None, clip_x0=False, dynamic_threshold=None
    )
    for level in [*EDM_LEVELS.grid(5, "uniform"), EDM_LEVELS.nearest(1.7)]:
        x_t = torch.randn(4, 1, 2, 2, dtype=torch.float64)
        expected = MIXTURE.posterior_mean(x_t, torch.tensor(level.alpha_bar, dtype=torch.float64))
        torch.testing.assert_close(denoise(x_t, level).x0, expected)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 5.0])
def test_the_training_loss_of_the_optimal_network_is_its_closed_form(sigma):
    """The objective's own training path (noising, network input, loss) scores F* at lambda(sigma) times the posterior
    variance s^2 sigma^2 / (s^2 + sigma^2) of Gaussian data, within the Monte-Carlo error: the same inputs the
    sampling side gives the network (the test above)."""
    g = torch.Generator().manual_seed(2)
    y = GAUSSIAN.sample((20_000, 1, 2, 2), g)
    level = torch.full((len(y),), sigma, dtype=torch.float64)
    losses = OBJECTIVE.losses(optimal_F(GAUSSIAN), y, level, torch.randn(y.shape, generator=g, dtype=torch.float64))
    s = GAUSSIAN.stds[0]
    closed = (loss_weight(torch.tensor(sigma), D) * s**2 * sigma**2 / (s**2 + sigma**2)).item()
    stderr = losses["loss"].std().item() / len(y) ** 0.5
    assert abs(losses["loss"].mean().item() - closed) < 4 * stderr


def test_the_sigma_grid_runs_from_sigma_max_to_sigma_min():
    grid = karras_sigmas(18, 0.002, 80.0, 7.0)
    assert len(grid) == 18 and grid[0].item() == pytest.approx(80.0) and grid[-1].item() == pytest.approx(0.002)
    assert (grid[1:] < grid[:-1]).all()
    ramp = (grid ** (1 / 7)).diff()  # evenly spaced in sigma^(1/rho)
    torch.testing.assert_close(ramp, ramp.mean().expand_as(ramp))
    uniform = torch.tensor([level.sigma for level in EDM_LEVELS.grid(18, "uniform")], dtype=torch.float64)
    torch.testing.assert_close(uniform, grid.flip(0))  # EDM's time runs along the same grid
    with pytest.raises(SettingError):
        karras_sigmas(0, 0.002, 80.0, 7.0)


@pytest.mark.parametrize("levels", [EDM_LEVELS, LINEAR], ids=["edm", "linear"])
def test_heun_makes_2n_minus_1_evaluations_over_the_clipped_grid(levels):
    """N steps: a correction at every step but the last; the grid starts at min(80, the model's largest sigma) and
    ends at max(0.002, its smallest) (the linear schedule's sigma runs from 0.01 to 157)."""
    seen = []
    denoise = GAUSSIAN.denoiser(levels)

    class Recording:
        rows_per_image = 1

        def __init__(self):
            self.levels = levels

        def __call__(self, x_t, level):
            seen.append(level.sigma)
            return denoise(x_t, level)

    x_T = torch.randn(10, 1, 2, 2, dtype=torch.float64)
    steps = list(heun_sample(Recording(), x_T, steps=10, **HEUN))
    assert len(steps) == 10 and len(seen) == 19
    assert seen[0] == pytest.approx(80.0, rel=0.02) and seen[-1] == pytest.approx(
        max(0.002, levels.sigma_min), rel=0.02
    )


def draw(data, sampler, levels, *, seed=1, shape=(20_000, 1, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g, dtype=torch.float64)
    return final(sampler(data.denoiser(levels), x_T, generator=g))


@pytest.mark.parametrize("data", [GAUSSIAN, MIXTURE], ids=["gaussian", "mixture"])
@pytest.mark.parametrize("levels", [EDM_LEVELS, LINEAR, COSINE], ids=["edm", "vp-linear", "vp-cosine"])
def test_heun_reproduces_the_data_on_edm_and_vp_models(data, levels):
    """On an EDM-parameterised oracle at continuous sigmas, and on VP oracles through the sigma mapping at the
    nearest of their own sigmas. At 32 steps (63 evaluations) within DPM-Solver++ 20's own tolerances. At its
    default 18 steps (35 evaluations) its discretisation bias is larger on these one-dimensional oracles (measured:
    std off by 0.017-0.027 of 0.5, KS up to 0.023, against DPM-Solver++ 20's 0.005-0.015 and 0.026 at its configured
    spacing), within the bounds DPM-Solver++ is held to at its configured spacing."""
    mean_tol, std_tol, ks_tol, weight_tol = TOLERANCES["dpm_solver"]
    out = draw(data, lambda *a, **k: heun_sample(*a, **{**HEUN, "steps": 32}, **k), levels)
    check_distribution(data, out, mean_tol=mean_tol, std_tol=std_tol, ks_tol=ks_tol, weight_tol=weight_tol)
    out = draw(data, default_sampler("heun"), levels)
    check_distribution(data, out, mean_tol=0.01, std_tol=0.04, ks_tol=0.035, weight_tol=0.015)


@pytest.mark.parametrize("name", ["ddim", "dpm_solver", "ddpm", "ode"])
def test_the_grid_samplers_sample_an_edm_model_at_its_levels(name):
    """DDIM, DPM-Solver++, ancestral sampling and the probability-flow ODE at their configured steps and spacings walk
    a grid of EDM's continuous levels as they walk a VP schedule's rows, within the bounds they are held to there
    (tests/test_samplers.py, configured spacings)."""
    for data in (GAUSSIAN, MIXTURE):
        out = draw(data, default_sampler(name), EDM_LEVELS)
        check_distribution(data, out, mean_tol=0.01, std_tol=0.04, ks_tol=0.035, weight_tol=0.015)


def test_heun_with_churn_still_reproduces_the_data():
    """Algorithm 2: the churn's added noise and the larger sigma_hat must cancel out in distribution."""
    churn = {**HEUN, "steps": 32, "s_churn": 20, "s_min": 0.01, "s_max": 50}
    for levels in (EDM_LEVELS, LINEAR):
        out = draw(MIXTURE, lambda *a, **k: heun_sample(*a, **churn, **k), levels)
        check_distribution(MIXTURE, out, mean_tol=0.01, std_tol=0.02, ks_tol=0.015, weight_tol=0.012)
    with pytest.raises(SettingError, match="s_churn"):
        list(heun_sample(GAUSSIAN.denoiser(EDM_LEVELS), torch.zeros(1, 1, 1, 1), **{**HEUN, "steps": 4, "s_churn": -1}))


def test_heun_converges_at_second_order():
    """Against a 1000-step solution, doubling the steps divides the error by about 4 (Gaussian data)."""
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2000, 1, 2, 2, generator=g, dtype=torch.float64)
    denoise = GAUSSIAN.denoiser(EDM_LEVELS)
    reference = final(heun_sample(denoise, x_T, **{**HEUN, "steps": 1000}))
    coarse, fine = (
        (final(heun_sample(denoise, x_T, **{**HEUN, "steps": n})) - reference).abs().max() for n in (40, 80)
    )
    assert 4 * 0.7 < coarse / fine < 4 * 1.35


def test_dpm_solver_and_heun_agree_on_an_edm_model():
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(500, 1, 2, 2, generator=g, dtype=torch.float64)
    a = final(heun_sample(GAUSSIAN.denoiser(EDM_LEVELS), x_T, **{**HEUN, "steps": 200}))
    b = final(dpm_solver_sample(GAUSSIAN.denoiser(EDM_LEVELS), x_T, steps=200, spacing="uniform"))
    assert (a - b).abs().max().item() < 0.01


# ---------------------------------------------------------------- the application: train.py and sample.py


def test_an_edm_model_trains_class_conditionally_resumes_exactly_and_samples_with_every_sampler(tmp_path):
    """diffusion=edm with labels and label dropout: 4 steps, stop, resume to 8 == 8 straight (model, EMA, AdamW,
    RNG, data position); previews drawn by Heun with guidance; sample.py draws from it with Heun (guided, with
    churn) and DPM-Solver++, and Heun also samples a discrete model's checkpoint."""
    common = ["debug=smoke", "diffusion=edm", "model.num_classes=10", "dataset.batch_size=48", "sampler=heun",
              "sampler.steps=3", "callbacks.previews.guidance=2.0"]  # fmt: skip
    straight, resumed = resume_four_plus_four(common, tmp_path)
    a, b = load_state(straight / "checkpoints" / "last.ckpt"), load_state(resumed / "checkpoints" / "last.ckpt")
    assert_same_training_state(a, b)
    assert a["hyper_parameters"]["diffusion"]["_target_"] == "diffusion.core.objectives.EDM"
    assert (straight / "samples" / "step_0000008.png").exists() and (straight / "samples" / "step_0000008.gif").exists()
    last = straight / "checkpoints" / "last.ckpt"
    heun = sample(compose_config("sample", [f"ckpt={last}", "sampler=heun", "sampler.steps=4", "sampler.s_churn=5",
                                            "guidance=2.0", "n=6", "batch_size=4"], tmp_path / "heun"))  # fmt: skip
    assert heun["nfe"] == 2 * (2 * 4 - 1)  # guided: two rows through the network per image
    dpm = sample(
        compose_config("sample", [f"ckpt={last}", "sampler=dpm_solver", "sampler.steps=4", "n=6"], tmp_path / "d")
    )
    assert dpm["nfe"] == 4
    for run in (tmp_path / "heun", tmp_path / "d"):
        images = np.load(run / "samples.npz")["arr_0"]
        assert images.shape == (6, 16, 16, 1) and images.std() > 0  # the digits at the default 16x16
    discrete = tmp_path / "discrete"
    train(compose_config("train", ["debug=smoke", "diffusion=v_prediction", "~callbacks.previews"], discrete))
    on_vp = sample(compose_config("sample", [f"ckpt={discrete / 'checkpoints' / 'last.ckpt'}", "sampler=heun",
                                             "sampler.steps=5", "n=4"], tmp_path / "vp"))  # fmt: skip
    assert on_vp["nfe"] == 9


@pytest.mark.slow
def test_an_edm_model_trains_on_two_processes_with_the_fid(tmp_path):
    """DDP over two CPU processes, the training FID drawn by Heun and reduced over both."""
    run = tmp_path / "run"
    fid = ["callbacks.fid.every_n_epochs=1", "callbacks.fid.num_samples=8", "callbacks.fid.steps=3", "sampler=heun",
           "callbacks.fid.batch_size=4", "callbacks.fid.reference_images=40", TINY_FEATURES]  # fmt: skip
    result = run_script(
        "train.py", "debug=smoke", "diffusion=edm", "trainer.accelerator=cpu", "trainer.devices=2",
        "dataset.batch_size=256", "~callbacks.previews", *fid, f"hydra.run.dir={run}", timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_state(run / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 4 and len(state["rng_states"]["cpu"]) == 2
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"val/fid", "val/kid", "train/loss_q0", "train/loss_q3"} <= set(events.Tags()["scalars"])


@pytest.mark.parametrize(("p_mean", "p_std"), [(-1.2, 1.2), (-0.4, 1.0)])
def test_the_training_noise_levels_follow_p_mean_and_p_std(p_mean, p_std, tmp_path):
    """ln sigma of the training draws is N(p_mean, p_std^2), and the loss-by-quartile groups cut that distribution
    at its quartiles, from the settings (not the paper's constants)."""
    from tests.test_configs import build

    overrides = ["diffusion=edm", f"diffusion.p_mean={p_mean}", f"diffusion.p_std={p_std}"]
    module, _ = build(compose_config("train", overrides, tmp_path))
    objective = module.model.objective
    sigma = objective.training_levels(200_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    log_sigma = sigma.double().log()
    assert abs(log_sigma.mean().item() - p_mean) < 0.01 and abs(log_sigma.std().item() - p_std) < 0.01
    quarters = torch.bincount(objective.quartile(sigma), minlength=4) / len(sigma)
    assert torch.allclose(quarters, torch.full((4,), 0.25), atol=0.005)
