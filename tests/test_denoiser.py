"""A network as a denoiser: the objective's reading of its output, classifier-free guidance and clipping."""

import pytest
import torch

from diffusion.core.denoiser import NetworkDenoiser, dynamic_thresholding
from diffusion.core.objectives import DDPM
from diffusion.core.targets import from_x0_eps


def ddpm(target="eps", learned_variance=False):
    return DDPM(
        timesteps=1000, schedule="linear", target=target, loss="mse", min_snr_gamma=None,
        learned_variance=learned_variance, vlb_weight=0.001,
    )  # fmt: skip


OBJECTIVE = ddpm()
SCHEDULE = OBJECTIVE.schedule


def denoiser(net, objective=OBJECTIVE, **options):
    settings = dict(labels=None, guidance=1.0, null_label=None, clip_x0=False, dynamic_threshold=None)
    return NetworkDenoiser(net, objective, **{**settings, **options})


def fake_net(per_label):
    """A 'network' whose eps-output is a fixed image per label (label index into per_label) plus x_t."""

    def net(x, noise_conditioning, labels):
        return x + per_label[labels].view(-1, 1, 1, 1)

    return net


def test_guidance_mixes_conditional_and_unconditional_outputs():
    per_label = torch.tensor([0.1, -0.3, 0.7])  # labels 0, 1 and the null label 2
    x, labels = torch.randn(2, 1, 4, 4), torch.tensor([0, 1])

    def eps(guidance):
        den = denoiser(fake_net(per_label), labels=labels, guidance=guidance, null_label=2)
        return den(x, OBJECTIVE.levels.level(600)).eps

    torch.testing.assert_close(eps(1.0), x + per_label[labels].view(-1, 1, 1, 1))
    torch.testing.assert_close(eps(0.0), x + 0.7)
    torch.testing.assert_close(eps(3.0), x + 0.7 + 3.0 * (per_label[labels].view(-1, 1, 1, 1) - 0.7))
    assert denoiser(fake_net(per_label), labels=labels, guidance=3.0, null_label=2).rows_per_image == 2


@pytest.mark.parametrize("target", ["eps", "x0", "v", "mu"])
def test_the_prediction_is_consistent_with_x_t(target):
    objective = ddpm(target)
    for step in (0, 10, 500, 999):
        t = torch.full((4,), step)
        x0, noise = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4)
        x_t = SCHEDULE.q_sample(x0, t, noise)
        exact = from_x0_eps(SCHEDULE, target, x0, noise, x_t, t)
        pred = denoiser(lambda x, c, y, exact=exact: exact, objective)(x_t, objective.levels.level(step))
        torch.testing.assert_close(pred.x0, x0, atol=2e-3, rtol=0)
        torch.testing.assert_close(pred.eps, noise, atol=1e-4, rtol=0)


def test_the_network_sees_the_timestep_of_the_level():
    seen = []

    def net(x, noise_conditioning, labels):
        seen.append(noise_conditioning)
        return torch.zeros_like(x)

    denoiser(net)(torch.zeros(3, 1, 2, 2), OBJECTIVE.levels.level(417))
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == [417.0] * 3


def test_clipping_bounds_x0_and_keeps_eps_consistent():
    x_t = 3 * torch.randn(2, 1, 4, 4)
    pred = denoiser(lambda x, c, y: torch.zeros_like(x), clip_x0=True)(x_t, OBJECTIVE.levels.level(50))
    assert pred.x0.abs().max() <= 1
    a, s = SCHEDULE.alphas_cumprod[50].sqrt(), (1 - SCHEDULE.alphas_cumprod[50]).sqrt()
    torch.testing.assert_close(a.float() * pred.x0 + s.float() * pred.eps, x_t)


def test_learned_variance_is_read_from_the_second_half():
    x = torch.randn(2, 1, 4, 4)
    out = torch.cat([torch.zeros_like(x), torch.full_like(x, 0.5)], dim=1)
    den = denoiser(lambda *_: out, ddpm(learned_variance=True))
    torch.testing.assert_close(den(x, OBJECTIVE.levels.level(1)).var_frac, torch.full_like(x, 0.75))


def test_guidance_without_labels_is_refused():
    with pytest.raises(ValueError, match="needs class labels"):
        denoiser(fake_net(torch.zeros(3)), guidance=2.0)


def test_dynamic_thresholding_follows_saharia_et_al():
    torch.manual_seed(0)
    inside = torch.rand(1, 1, 10, 10) * 1.6 - 0.8  # within [-1, 1]: unchanged
    wide = torch.linspace(-4, 4, 100).view(1, 1, 10, 10)  # its 0.9 quantile of |x| is 3.6
    out = dynamic_thresholding(torch.cat([inside, wide]), 0.9)
    torch.testing.assert_close(out[0], inside[0])
    s = torch.quantile(wide.abs().flatten(), 0.9)
    torch.testing.assert_close(s, torch.tensor(3.6), atol=0.05, rtol=0)
    torch.testing.assert_close(out[1], wide[0].clamp(-s, s) / s)
    assert out[1].abs().max() == 1 and (out[1].abs() == 1).sum() == 10  # the top 10% saturate, the rest scale down
    # with percentile 1 nothing is clipped: the image is scaled by its largest |x0|
    torch.testing.assert_close(dynamic_thresholding(wide, 1.0), wide / 4)


def test_the_denoiser_thresholds_x0_and_keeps_eps_consistent():
    x_t = 3 * torch.randn(2, 1, 4, 4)
    den = denoiser(lambda x, c, y: torch.zeros_like(x), clip_x0=True, dynamic_threshold=0.995)
    pred = den(x_t, OBJECTIVE.levels.level(50))
    a, s = SCHEDULE.alphas_cumprod[50].sqrt().float(), (1 - SCHEDULE.alphas_cumprod[50]).sqrt().float()
    torch.testing.assert_close(pred.x0, dynamic_thresholding(x_t / a, 0.995))
    assert not torch.equal(pred.x0, (x_t / a).clamp(-1, 1))  # the threshold, not the plain clip
    torch.testing.assert_close(a * pred.x0 + s * pred.eps, x_t)
    with pytest.raises(ValueError, match="percentile"):
        denoiser(lambda *_: x_t, dynamic_threshold=99.5)
