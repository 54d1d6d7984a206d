"""The EDM formulation (Karras et al. 2022): the preconditioning, the loss and its optimum, the sigma grid, and
EDM's Heun sampler on EDM and on discrete (VP) models, against the analytic denoisers of tests/analytic.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion.core import edm
from diffusion.core.denoiser import network_denoiser
from diffusion.core.samplers import dpm_solver_sample, final, heun_sample
from diffusion.core.schedules import NoiseSchedule, make_betas
from diffusion.errors import SettingError
from sample import sample
from tests.analytic import GAUSSIAN, MIXTURE
from tests.helpers import compose_config, load_state, run_script
from tests.test_multiprocess import TINY_FEATURES, assert_same_training_state
from tests.test_samplers import TOLERANCES, check_distribution, default_sampler
from train import train

EDM = NoiseSchedule(make_betas("edm", 1000))
LINEAR = NoiseSchedule(make_betas("linear", 1000))
COSINE = NoiseSchedule(make_betas("cosine", 1000))
SIGMAS = torch.tensor([0.002, 0.05, 0.5, 2.0, 80.0], dtype=torch.float64)


def test_the_preconditioning_gives_unit_variance_inputs_and_targets():
    """For data of standard deviation sigma_data, c_in x has unit variance, the effective target (y - c_skip x) /
    c_out has unit variance, and c_skip minimises it (the paper's Appendix B.6); and lambda c_out^2 = 1."""
    c_skip, c_out, c_in, c_noise = edm.preconditioning(SIGMAS)
    d = edm.SIGMA_DATA
    torch.testing.assert_close(c_in**2 * (d**2 + SIGMAS**2), torch.ones_like(SIGMAS))
    target_variance = ((1 - c_skip) ** 2 * d**2 + c_skip**2 * SIGMAS**2) / c_out**2
    torch.testing.assert_close(target_variance, torch.ones_like(SIGMAS))
    for shift in (-0.01, 0.01):  # any other skip weight leaves the target more variance
        other = ((1 - c_skip - shift) ** 2 * d**2 + (c_skip + shift) ** 2 * SIGMAS**2) / c_out**2
        assert (other > target_variance).all()
    torch.testing.assert_close(edm.loss_weight(SIGMAS) * c_out**2, torch.ones_like(SIGMAS))
    torch.testing.assert_close(c_noise, SIGMAS.log() / 4)


def test_the_optimal_denoiser_of_gaussian_data_needs_no_network_output():
    """For y ~ N(0, sigma_data^2) the optimal D(x; sigma) is sigma_data^2 / (sigma^2 + sigma_data^2) x = c_skip x:
    the skip connection alone, F = 0."""
    d = edm.SIGMA_DATA
    data = type(GAUSSIAN)(weights=(1.0,), means=(0.0,), stds=(d,))
    x = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    for sigma in SIGMAS.tolist():
        optimum = data.edm_denoiser(EDM).at_sigma(x, sigma)
        c_skip = edm.preconditioning(torch.tensor(sigma, dtype=torch.float64))[0]
        torch.testing.assert_close(optimum, edm.denoised(torch.zeros_like(x), x, torch.tensor(sigma)))
        torch.testing.assert_close(optimum, c_skip * x)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 5.0])
def test_the_loss_of_the_optimal_denoiser_is_its_closed_form(sigma):
    """For y ~ N(m, s^2) the optimal D has mean squared error s^2 sigma^2 / (s^2 + sigma^2), the posterior
    variance: the EDM loss of F* = (D* - c_skip x) / c_out is lambda(sigma) times it, and a wrong denoiser scores
    higher."""
    g = torch.Generator().manual_seed(1)
    y = GAUSSIAN.sample((40_000, 1, 2, 2), g)
    x = y + sigma * torch.randn(y.shape, generator=g, dtype=torch.float64)
    sigmas = torch.full((len(y),), sigma, dtype=torch.float64)
    c_skip, c_out, _, _ = edm.preconditioning(torch.tensor(sigma, dtype=torch.float64))
    optimum = GAUSSIAN.edm_denoiser(EDM).at_sigma(x, sigma)
    loss = edm.edm_loss((optimum - c_skip * x) / c_out, y, x, sigmas).mean().item()
    s = GAUSSIAN.stds[0]
    closed = (edm.loss_weight(torch.tensor(sigma)) * s**2 * sigma**2 / (s**2 + sigma**2)).item()
    assert loss == pytest.approx(closed, rel=0.02)
    weighted = (edm.loss_weight(sigmas).view(-1, 1, 1, 1) * (optimum - y) ** 2).flatten(1).mean(1).mean().item()
    assert loss == pytest.approx(weighted, rel=1e-9)  # the F form is lambda ||D - y||^2
    for wrong in (0.7 * optimum, optimum + 0.1):  # worse by about lambda E[(wrong - D*)^2]
        excess = (edm.loss_weight(torch.tensor(sigma)) * ((wrong - optimum) ** 2).mean()).item()
        assert edm.edm_loss((wrong - c_skip * x) / c_out, y, x, sigmas).mean().item() > loss + 0.5 * excess


def test_a_network_with_target_edm_is_preconditioned_on_every_row():
    """A stand-in network that computes the optimal F* from what it is given (c_in x and c_noise = ln sigma / 4)
    yields the analytic x0 through network_denoiser: the input scaling, the noise input and the output conversion
    agree, on the EDM table and on a VP table alike, and at continuous sigmas (at_sigma)."""
    for schedule in (EDM, COSINE):

        def net(x_in, c_noise, labels):
            sigma = (4 * c_noise.double()).exp().view(-1, 1, 1, 1)
            c_skip, c_out, c_in, _ = edm.preconditioning(sigma)
            x = x_in / c_in
            alpha_bar = 1 / (1 + sigma**2)
            return (MIXTURE.posterior_mean(x * alpha_bar.sqrt(), alpha_bar) - c_skip * x) / c_out

        denoise = network_denoiser(net, schedule, target="edm", learned_variance=False, clip_x0=False)
        t = torch.tensor([0, 100, 500, 999])
        x_t = torch.randn(4, 1, 2, 2, dtype=torch.float64)
        alpha_bar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(denoise(x_t, t).x0, MIXTURE.posterior_mean(x_t, alpha_bar))
        x = torch.randn(3, 1, 2, 2, dtype=torch.float64) * 2
        torch.testing.assert_close(denoise.at_sigma(x, 1.7), MIXTURE.edm_denoiser(schedule).at_sigma(x, 1.7))


def test_the_sigma_grid_runs_from_sigma_max_to_sigma_min():
    grid = edm.karras_sigmas(18, 0.002, 80.0)
    assert len(grid) == 18 and grid[0].item() == pytest.approx(80.0) and grid[-1].item() == pytest.approx(0.002)
    assert (grid[1:] < grid[:-1]).all()
    ramp = (grid ** (1 / 7)).diff()  # evenly spaced in sigma^(1/rho)
    torch.testing.assert_close(ramp, ramp.mean().expand_as(ramp))
    table = EDM.sqrt_one_minus_alphas_cumprod / EDM.sqrt_alphas_cumprod  # the EDM table is the same grid
    torch.testing.assert_close(table, edm.karras_sigmas(1000, 0.002, 80.0).flip(0))
    with pytest.raises(SettingError):
        edm.karras_sigmas(0, 0.002, 80.0)


@pytest.mark.parametrize("schedule", [EDM, LINEAR], ids=["edm", "linear"])
def test_heun_makes_2n_minus_1_evaluations_over_the_clipped_grid(schedule):
    """N steps: a correction at every step but the last; the grid starts at min(80, the model's largest sigma) and
    ends at max(0.002, its smallest) (the linear schedule's sigma runs from 0.01 to 157)."""
    seen = []
    denoise = GAUSSIAN.denoiser(schedule)

    def counting(x_t, t):
        seen.append(t[0].item())
        return denoise(x_t, t)

    x_T = torch.randn(10, 1, 2, 2, dtype=torch.float64)
    steps = list(heun_sample(counting, schedule, x_T, steps=10))
    assert len(steps) == 10 and len(seen) == 19
    sigmas = schedule.sqrt_one_minus_alphas_cumprod / schedule.sqrt_alphas_cumprod
    first, last = sigmas[seen[0]].item(), sigmas[seen[-1]].item()
    assert first == pytest.approx(80.0, rel=0.02) and last == pytest.approx(max(0.002, sigmas[0].item()), rel=0.02)


def draw(data, sampler, schedule, *, edm_model, seed=1, shape=(20_000, 1, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g, dtype=torch.float64)
    denoise = data.edm_denoiser(schedule) if edm_model else data.denoiser(schedule)
    return final(sampler(denoise, schedule, x_T, generator=g))


@pytest.mark.parametrize("data", [GAUSSIAN, MIXTURE], ids=["gaussian", "mixture"])
@pytest.mark.parametrize(
    ("schedule", "edm_model"), [(EDM, True), (LINEAR, False), (COSINE, False)], ids=["edm", "vp-linear", "vp-cosine"]
)
def test_heun_reproduces_the_data_on_edm_and_vp_models(data, schedule, edm_model):
    """On an EDM-parameterised oracle at continuous sigmas, and on VP oracles through the sigma mapping at the
    nearest of their own sigmas. At 32 steps (63 evaluations) within DPM-Solver++ 20's own tolerances. At its
    default 18 steps (35 evaluations) its discretisation bias is larger on these one-dimensional oracles (measured:
    std off by 0.017-0.027 of 0.5, KS up to 0.023, against DPM-Solver++ 20's 0.005-0.015 and 0.026 at its configured
    spacing), within the bounds DPM-Solver++ is held to at its configured spacing."""
    mean_tol, std_tol, ks_tol, weight_tol = TOLERANCES["dpm_solver"]
    out = draw(data, lambda *a, **k: heun_sample(*a, steps=32, **k), schedule, edm_model=edm_model)
    check_distribution(data, out, mean_tol=mean_tol, std_tol=std_tol, ks_tol=ks_tol, weight_tol=weight_tol)
    out = draw(data, default_sampler("heun"), schedule, edm_model=edm_model)
    check_distribution(data, out, mean_tol=0.01, std_tol=0.04, ks_tol=0.035, weight_tol=0.015)


def test_row_samplers_sample_an_edm_model_on_its_table():
    """DDIM and DPM-Solver++ at their configured steps and spacings walk the EDM table's rows as they walk a VP
    schedule's, within the bounds they are held to there (tests/test_samplers.py, configured spacings)."""
    for name in ("ddim", "dpm_solver"):
        for data in (GAUSSIAN, MIXTURE):
            out = draw(data, default_sampler(name), EDM, edm_model=True)
            check_distribution(data, out, mean_tol=0.01, std_tol=0.04, ks_tol=0.035, weight_tol=0.015)


def test_heun_with_churn_still_reproduces_the_data():
    """Algorithm 2: the churn's added noise and the larger sigma_hat must cancel out in distribution."""
    sampler = lambda *a, **k: heun_sample(*a, steps=32, s_churn=20, s_min=0.01, s_max=50, s_noise=1.0, **k)  # noqa: E731
    for schedule, edm_model in ((EDM, True), (LINEAR, False)):
        out = draw(MIXTURE, sampler, schedule, edm_model=edm_model)
        check_distribution(MIXTURE, out, mean_tol=0.01, std_tol=0.02, ks_tol=0.015, weight_tol=0.012)
    with pytest.raises(SettingError, match="s_churn"):
        list(heun_sample(GAUSSIAN.denoiser(EDM), EDM, torch.zeros(1, 1, 1, 1), steps=4, s_churn=-1))


def test_heun_converges_at_second_order():
    """Against a 1000-step solution, doubling the steps divides the error by about 4 (Gaussian data)."""
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2000, 1, 2, 2, generator=g, dtype=torch.float64)
    denoise = GAUSSIAN.edm_denoiser(EDM)
    reference = final(heun_sample(denoise, EDM, x_T, steps=1000))
    coarse, fine = ((final(heun_sample(denoise, EDM, x_T, steps=n)) - reference).abs().max() for n in (40, 80))
    assert 4 * 0.7 < coarse / fine < 4 * 1.35


def test_dpm_solver_and_heun_agree_on_an_edm_model():
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(500, 1, 2, 2, generator=g, dtype=torch.float64)
    a = final(heun_sample(GAUSSIAN.edm_denoiser(EDM), EDM, x_T, steps=200))
    b = final(dpm_solver_sample(GAUSSIAN.edm_denoiser(EDM), EDM, x_T, steps=200, spacing="uniform"))
    assert (a - b).abs().max().item() < 0.01


# ---------------------------------------------------------------- the application: train.py and sample.py


def test_an_edm_model_trains_class_conditionally_resumes_exactly_and_samples_with_every_sampler(tmp_path):
    """diffusion=edm with labels and label dropout: 4 steps, stop, resume to 8 == 8 straight (model, EMA, AdamW,
    RNG, data position); previews drawn by Heun with guidance; sample.py draws from it with Heun (guided, with
    churn) and DPM-Solver++, and Heun also samples a discrete model's checkpoint."""
    common = ["debug=smoke", "diffusion=edm", "model.num_classes=10", "dataset.batch_size=48", "sampler=heun",
              "sampler.steps=3", "callbacks.previews.guidance=2.0"]  # fmt: skip
    straight, stopped, resumed = tmp_path / "straight", tmp_path / "stopped", tmp_path / "resumed"
    train(compose_config("train", [*common, "trainer.max_steps=8"], straight))
    train(compose_config("train", common, stopped))
    ckpt = stopped / "checkpoints" / "last.ckpt"
    train(compose_config("train", [*common, "trainer.max_steps=8", f"ckpt_path={ckpt}"], resumed))
    a, b = load_state(straight / "checkpoints" / "last.ckpt"), load_state(resumed / "checkpoints" / "last.ckpt")
    assert_same_training_state(a, b)
    assert a["hyper_parameters"]["diffusion"]["target"] == "edm"
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
    sigma = module._levels(200_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    log_sigma = sigma.double().log()
    assert abs(log_sigma.mean().item() - p_mean) < 0.01 and abs(log_sigma.std().item() - p_std) < 0.01
    quarters = torch.bincount(module._quartile(sigma), minlength=4) / len(sigma)
    assert torch.allclose(quarters, torch.full((4,), 0.25), atol=0.005)
