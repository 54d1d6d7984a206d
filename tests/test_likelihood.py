"""Likelihoods through the probability-flow ODE (diffusion/core/likelihood.py): Gaussian data with its exact denoiser
gives the Gaussian's exact log-likelihood on EDM's, a flow's and a discrete model's levels; the trace estimate with a
Jacobian that is not diagonal; the 8-bit dequantization against the exact bin probabilities; sample.py eval=nll on
flow, EDM and discrete checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor

from diffusion.core.denoiser import NetworkDenoiser, Prediction
from diffusion.core.levels import Level, NoiseLevels
from diffusion.core.likelihood import BIN, bits_per_dim, dequantize, ode_log_likelihood
from diffusion.core.objectives.edm import EDM
from diffusion.core.objectives.flow import Flow
from diffusion.errors import SettingError
from diffusion.outputs.reports import results_table
from sample import sample
from tests.analytic import GaussianMixture, schedule_levels
from tests.helpers import compose_config
from tests.test_flow import SETTINGS, optimal_velocity
from tests.test_old_checkpoints import OLD

EDM_LEVELS = EDM(
    p_mean=-1.2, p_std=1.2, sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0, learned_weighting=False
).levels
FLOW_LEVELS = Flow(**SETTINGS).levels


def gaussian_log_density(x: Tensor, mean: float, variance: float) -> Tensor:
    """log N(x; mean, variance I) summed over all but the first dimension, ``(B,)``."""
    return (-0.5 * (x - mean) ** 2 / variance - 0.5 * math.log(2 * math.pi * variance)).flatten(1).sum(1)


def exact(x: Tensor, m: float, s: float, levels: NoiseLevels) -> Tensor:
    """What the ODE gives for Gaussian data N(m, s^2) with its exact denoiser, in closed form: x is a sample of
    p_{sigma_min} = N(m, s^2 + sigma_min^2), the exact flow carries it linearly to x_end = m + (x - m) r with
    r = sqrt((s^2 + sigma_max^2) / (s^2 + sigma_min^2)), and the model's prior N(0, 1 + sigma_max^2) stands in for
    the true p_{sigma_max} = N(m, s^2 + sigma_max^2) there."""
    low, high = s**2 + levels.sigma_min**2, s**2 + levels.sigma_max**2
    x_end = m + (x - m) * math.sqrt(high / low)
    prior = gaussian_log_density(x_end, 0.0, 1.0 + levels.sigma_max**2)
    return gaussian_log_density(x, m, low) + prior - gaussian_log_density(x_end, m, high)


@pytest.mark.parametrize("levels", [EDM_LEVELS, FLOW_LEVELS, schedule_levels("cosine")], ids=["edm", "flow", "ddpm"])
@pytest.mark.parametrize(("m", "s"), [(0.0, 1.0), (0.3, 0.5)], ids=["unit", "shifted"])
def test_gaussian_data_with_its_exact_denoiser_gives_its_exact_likelihood(levels, m, s):
    """With m = 0 and s = 1 the prior is exact and the answer is log N(x; 0, 1 + sigma_min^2) itself. A discrete
    model's denoiser is evaluated at its nearest row, so its figure is only near the closed form."""
    data = GaussianMixture(weights=(1.0,), means=(m,), stds=(s,))
    g = torch.Generator().manual_seed(0)
    x = data.sample((4, 1, 4, 4), g) + levels.sigma_min * torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    # A discrete model's field jumps between rows, which tighter tolerances resolve at great cost (1e-8: 25,000
    # evaluations, 1e-5: 300, within 0.005 nats).
    tol = 1e-5 if levels.max_steps else 1e-8
    log_p, evaluations = ode_log_likelihood(data.denoiser(levels), x, probes=1, rtol=tol, atol=tol, generator=g)
    expected = exact(x, m, s, levels)
    tolerance = 0.02 if levels.max_steps else 1e-4  # nats per image of 16 dimensions
    assert torch.allclose(log_p, expected, atol=tolerance, rtol=0), (log_p - expected).abs().max()
    assert evaluations > 10
    if m == 0.0:
        assert torch.allclose(expected, gaussian_log_density(x, 0.0, 1.0 + levels.sigma_min**2), atol=1e-12)


def test_the_flow_objective_end_to_end_gives_the_exact_likelihood():
    """Through the objective's own network input and output (the optimal velocity as the network, in float32): the
    chain x -> x_t -> velocity -> x_0 is differentiated, not the oracle's x_0."""
    m, s = 0.3, 0.5
    data = GaussianMixture(weights=(1.0,), means=(m,), stds=(s,))
    flow = Flow(**SETTINGS)
    network = optimal_velocity(data)
    denoise = NetworkDenoiser(
        lambda x, c, labels: network(x, c).float(), flow, labels=None, guidance=1.0, null_label=None, clip_x0=False,
        dynamic_threshold=None,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x = data.sample((3, 1, 4, 4), g).float()
    log_p, _ = ode_log_likelihood(denoise, x, probes=1, rtol=1e-6, atol=1e-6, generator=g)
    assert torch.allclose(log_p, exact(x.double(), m, s, flow.levels), atol=2e-3, rtol=0)


class CorrelatedGaussian:
    """x_0 ~ N(0, C) with C = Q diag(v) Q^T not diagonal: the exact denoiser D(x; sigma) = C (C + sigma^2 I)^-1 x has a
    full Jacobian, so one Rademacher probe estimates its trace with an error, unbiased."""

    rows_per_image = 1

    def __init__(self, levels: NoiseLevels, dims: int = 8) -> None:
        g = torch.Generator().manual_seed(3)
        q, _ = torch.linalg.qr(torch.randn(dims, dims, generator=g, dtype=torch.float64))
        self.variances = torch.linspace(0.05, 1.5, dims, dtype=torch.float64)
        self.q, self.levels, self.dims = q, levels, dims

    def __call__(self, x_t: Tensor, level: Level) -> Prediction:
        x = x_t.flatten(1) / level.a
        shrink = self.variances / (self.variances + level.sigma**2)
        x0 = (x @ self.q) * shrink @ self.q.T
        return Prediction.of_x0(x0.view_as(x_t), x_t, level)

    def log_density(self, x: Tensor, sigma: float) -> Tensor:
        variances = self.variances + sigma**2
        y = x.flatten(1) @ self.q
        return (-0.5 * y**2 / variances - 0.5 * (2 * math.pi * variances).log()).sum(1)


def test_the_trace_estimate_is_unbiased_and_more_probes_reduce_its_spread():
    levels = EDM_LEVELS
    data = CorrelatedGaussian(levels)
    g = torch.Generator().manual_seed(4)
    one = torch.randn(1, data.dims, generator=g, dtype=torch.float64) * data.variances.sqrt()
    x = one.repeat(64, 1).view(64, 1, 2, 4)  # the same image 64 times, each with its own probes
    exact_log_p = data.log_density(x[:1], levels.sigma_min)  # the prior is N(0, 1 + 80^2): off by < 1e-3 here
    single, _ = ode_log_likelihood(data, x, probes=1, rtol=1e-6, atol=1e-6, generator=g)
    many, _ = ode_log_likelihood(data, x[:8], probes=16, rtol=1e-6, atol=1e-6, generator=g)
    assert single.std() > 0.05  # one probe per image: the estimate varies
    stderr = single.std() / math.sqrt(len(single))
    assert abs(single.mean() - exact_log_p) < 3 * stderr + 0.01
    assert many.std() < single.std() / 2  # 16 probes: a quarter of the spread, in theory
    assert abs(many.mean() - exact_log_p) < 3 * many.std() / math.sqrt(8) + 0.01


def test_dequantized_bits_bound_and_approximate_the_exact_8_bit_likelihood():
    """For 8-bit data under a continuous density p (a Gaussian of std 0.5), -log2 P(bin) per dimension is bounded by
    and close to E_u[-log2 p(x + u)] + log2(127.5), u uniform within the bin (Theis et al. 2016; Ho et al. 2020)."""
    s = 0.5
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0  # every 8-bit value in [-1, 1]
    normal = torch.distributions.Normal(0.0, s)
    exact_bits = -(normal.cdf(values + BIN / 2) - normal.cdf(values - BIN / 2)).log2()  # (256,)
    g = torch.Generator().manual_seed(5)
    x = values.repeat(2000, 1)
    u = dequantize(x, g)
    assert ((u - x).abs() <= BIN / 2).all() and abs((u - x).var().item() - BIN**2 / 12) < 0.02 * BIN**2 / 12
    log_p = normal.log_prob(u)  # each row: one draw per value
    dequantized_bits = bits_per_dim(log_p, 1, dequantized=True)  # one dimension: bits of each value, (2000, 256)
    mean_bits = dequantized_bits.mean(0)
    assert (mean_bits >= exact_bits - 3 * dequantized_bits.std(0) / math.sqrt(2000)).all()  # the bound
    assert torch.allclose(mean_bits, exact_bits, atol=2e-3, rtol=0)  # and near: p is smooth on a bin's scale


def test_a_flow_reaching_pure_noise_is_refused():
    flow = Flow(**(SETTINGS | {"t_max": 1.0}))
    with pytest.raises(SettingError, match=r"diffusion\.t_max=0\.999"):
        ode_log_likelihood(GaussianMixture((1.0,), (0.0,), (1.0,)).denoiser(flow.levels), torch.zeros(1, 1, 2, 2),
                           probes=1, rtol=1e-3, atol=1e-3)  # fmt: skip


@pytest.mark.parametrize("name", ["edm", "improved"])
def test_sample_nll_on_continuous_and_discrete_checkpoints(name, tmp_path):
    """eval=nll on an EDM checkpoint (refused before) gives the ODE's figure; on a discrete one both, the bound and
    the ODE (their values on a trained model: tests/test_sample.py)."""
    out = tmp_path / name
    ckpt = OLD / name / "checkpoints" / "last.ckpt"
    args = ["n=4", "gif_frames=2", "eval=nll", "eval.batches=1", "batch_size=8", "eval.rtol=1e-3"]
    sample(compose_config("sample", [f"ckpt={ckpt}", *args, "eval.atol=1e-3"], out))
    results = json.loads((out / "results.json").read_text())
    assert math.isfinite(results["ode_nll_bpd"]) and results["images"] == 8 and results["ode_nfe"] > 10
    assert ("nll_bpd" in results) == (name == "improved")
    assert results["ode_probes"] == 1 and results["ode_rtol"] == 1e-3


def test_the_results_table_shows_the_ode_figure():
    """sample.py prints it, and a sweep's summary.md holds it, beside the bound's."""
    table = results_table([{"sampler": "heun", "steps": 18, "nll_bpd": 3.5, "ode_nll_bpd": 3.25}])
    header, _, row = table.splitlines()
    assert header.endswith("| nll_bpd | ode_nll_bpd |") and row.endswith("| 3.5 | 3.25 |")
