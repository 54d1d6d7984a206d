"""A network as a denoiser: target resolution, classifier-free guidance and clipping."""

import pytest
import torch

from diffusion.core.denoiser import dynamic_thresholding, network_denoiser
from diffusion.core.schedules import NoiseSchedule, make_betas
from diffusion.core.targets import from_x0_eps

SCHEDULE = NoiseSchedule(make_betas("linear", 1000))


def fake_net(per_label):
    """A 'network' whose eps-output is a fixed image per label (label index into per_label) plus x_t."""

    def net(x, t, labels):
        return x + per_label[labels].view(-1, 1, 1, 1)

    return net


def test_guidance_mixes_conditional_and_unconditional_outputs():
    per_label = torch.tensor([0.1, -0.3, 0.7])  # labels 0, 1 and the null label 2
    x, t, labels = torch.randn(2, 1, 4, 4), torch.tensor([100, 600]), torch.tensor([0, 1])

    def eps(guidance):
        den = network_denoiser(
            fake_net(per_label),
            SCHEDULE,
            target="eps",
            learned_variance=False,
            clip_x0=False,
            labels=labels,
            guidance=guidance,
            null_label=2,
        )
        return den(x, t).eps

    torch.testing.assert_close(eps(1.0), x + per_label[labels].view(-1, 1, 1, 1))
    torch.testing.assert_close(eps(0.0), x + 0.7)
    torch.testing.assert_close(eps(3.0), x + 0.7 + 3.0 * (per_label[labels].view(-1, 1, 1, 1) - 0.7))


@pytest.mark.parametrize("target", ["eps", "x0", "v", "mu"])
def test_the_prediction_is_consistent_with_x_t(target):
    x0, noise, t = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4), torch.tensor([0, 10, 500, 999])
    x_t = SCHEDULE.q_sample(x0, t, noise)
    exact = from_x0_eps(SCHEDULE, target, x0, noise, x_t, t)
    den = network_denoiser(lambda x, tt, y: exact, SCHEDULE, target=target, learned_variance=False, clip_x0=False)
    pred = den(x_t, t)
    torch.testing.assert_close(pred.x0, x0, atol=2e-3, rtol=0)
    torch.testing.assert_close(pred.eps, noise, atol=1e-4, rtol=0)


def test_clipping_bounds_x0_and_keeps_eps_consistent():
    x_t, t = 3 * torch.randn(2, 1, 4, 4), torch.tensor([50, 50])
    den = network_denoiser(
        lambda x, tt, y: torch.zeros_like(x), SCHEDULE, target="eps", learned_variance=False, clip_x0=True
    )
    pred = den(x_t, t)
    assert pred.x0.abs().max() <= 1
    a, s = SCHEDULE.alphas_cumprod[50].sqrt(), (1 - SCHEDULE.alphas_cumprod[50]).sqrt()
    torch.testing.assert_close(a.float() * pred.x0 + s.float() * pred.eps, x_t)


def test_learned_variance_is_read_from_the_second_half():
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([1, 2])
    out = torch.cat([torch.zeros_like(x), torch.full_like(x, 0.5)], dim=1)
    den = network_denoiser(lambda *_: out, SCHEDULE, target="eps", learned_variance=True, clip_x0=False)
    torch.testing.assert_close(den(x, t).var_frac, torch.full_like(x, 0.75))


def test_guidance_without_labels_is_refused():
    with pytest.raises(ValueError, match="needs class labels"):
        network_denoiser(
            fake_net(torch.zeros(3)), SCHEDULE, target="eps", learned_variance=False, clip_x0=False, guidance=2.0
        )


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
    x_t, t = 3 * torch.randn(2, 1, 4, 4), torch.tensor([50, 50])
    den = network_denoiser(
        lambda x, tt, y: torch.zeros_like(x),
        SCHEDULE,
        target="eps",
        learned_variance=False,
        clip_x0=True,
        dynamic_threshold=0.995,
    )
    pred = den(x_t, t)
    a, s = SCHEDULE.alphas_cumprod[50].sqrt().float(), (1 - SCHEDULE.alphas_cumprod[50]).sqrt().float()
    torch.testing.assert_close(pred.x0, dynamic_thresholding(x_t / a, 0.995))
    assert not torch.equal(pred.x0, (x_t / a).clamp(-1, 1))  # the threshold, not the plain clip
    torch.testing.assert_close(a * pred.x0 + s * pred.eps, x_t)
    with pytest.raises(ValueError, match="percentile"):
        network_denoiser(
            lambda *_: x_t, SCHEDULE, target="eps", learned_variance=False, clip_x0=False, dynamic_threshold=99.5
        )
