"""EDM2's magnitude-preserving network and its training recipe: the layers keep unit variance, forced weight
normalization keeps the stored weights' norms, the paper's sizes, the learned loss weighting's optimum, and the
network trained end to end with a resume that continues exactly."""

import math

import pytest
import torch

from diffusion.core.networks.edm2 import EDM2UNet, MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize
from diffusion.core.objectives import EDM
from diffusion.core.objectives.weighting import LearnedWeighting, uncertainty_weighted
from diffusion.errors import SettingError
from tests.helpers import load_state, network_preset, resume_four_plus_four, run_script


def preset(name, **overrides):
    return network_preset(EDM2UNet, name, **overrides)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_the_magnitude_preserving_operations_keep_unit_variance():
    a, b = torch.randn(2, 400_000, generator=gen())
    assert mp_silu(a).square().mean().sqrt() == pytest.approx(1.0, abs=0.01)
    for t in (0.0, 0.3, 0.5, 0.9):
        assert mp_sum(a, b, t).var() == pytest.approx(1.0, abs=0.01)
    x, y = torch.randn(1000, 24, 4, generator=gen(1)), torch.randn(1000, 8, 4, generator=gen(2))
    joined = mp_cat(x, y, 0.3)
    assert joined.shape == (1000, 32, 4) and joined.var() == pytest.approx(1.0, abs=0.01)
    # b's share of the energy is t^2 / ((1 - t)^2 + t^2), whatever the widths
    share = joined[:, 24:].square().sum() / joined.square().sum()
    assert share == pytest.approx(0.09 / (0.49 + 0.09), abs=0.01)
    # pixel norm: unit RMS over the channels at every pixel
    z = normalize(torch.randn(4, 16, 5, 5, generator=gen(3)) * 7, dim=[1])
    torch.testing.assert_close(z.square().mean(1), torch.ones(4, 5, 5), rtol=1e-3, atol=1e-3)


def test_the_fourier_features_have_unit_mean_square_over_every_scale():
    """In expectation over the random phases; features of a low bandwidth are nearly constant over a small range of
    c, so the mean square over many features is checked."""
    fourier = MPFourier(4096, (1e-3, 1.0), generator=gen())
    for c in (torch.randn(2000, generator=gen(1)), 1000 * torch.rand(2000, generator=gen(2))):
        assert fourier(c).square().mean() == pytest.approx(1.0, abs=0.05)
    paper = MPFourier(64, (1.0, 1.0), generator=gen())
    assert paper.frequencies.std() == pytest.approx(2 * math.pi, rel=0.3)  # the paper's: 2 pi N(0, 1)


def test_mpconv_keeps_unit_variance_and_forced_weight_normalization_keeps_the_norms():
    torch.manual_seed(0)
    conv = MPConv(64, 32, (3, 3))
    with torch.no_grad():
        conv.weight.mul_(torch.rand(32, 1, 1, 1) * 10 + 0.5)  # rows of very different norms
    x = torch.randn(8, 64, 12, 12)
    conv.eval()
    assert conv(x)[:, :, 1:-1, 1:-1].var().item() == pytest.approx(1.0, abs=0.05)  # inside the zero padding
    row_norms = conv.weight.flatten(1).norm(dim=1)
    assert not torch.allclose(row_norms, row_norms[0].expand(32), rtol=0.1)  # eval leaves the stored weights
    conv.train()
    optimizer = torch.optim.Adam(conv.parameters(), lr=0.5)
    for _ in range(3):
        conv(x).square().mean().backward()  # the forward pass first normalizes the stored weights
        # every output channel's stored weight is at unit RMS (norm sqrt(fan-in)) as the step begins
        torch.testing.assert_close(conv.weight.flatten(1).norm(dim=1), torch.full((32,), 24.0), rtol=1e-3, atol=0)
        optimizer.step()
        optimizer.zero_grad()
        assert (conv.weight.flatten(1).norm(dim=1) - 24.0).abs().max() > 0.1  # the step moved them off it
    fresh = torch.randn(8, 64, 12, 12)  # the steps fitted the weights to x: a new unit-variance input
    assert conv(fresh)[:, :, 1:-1, 1:-1].var().item() == pytest.approx(1.0, abs=0.05)  # still unit variance out


def block_outputs(net, x, sigma):
    """The standard deviation of every residual block's output for input ``x`` at noise level ``sigma``."""
    stds, hooks = [], []
    for name, module in net.named_modules():
        if type(module).__name__ == "Block":
            hooks.append(module.register_forward_hook(lambda m, i, out, name=name: stds.append((name, out.std()))))
    with torch.no_grad():
        net(x, torch.full((x.shape[0],), math.log(sigma) / 4))
    for hook in hooks:
        hook.remove()
    return stds


def test_every_block_keeps_unit_variance_at_initialization_and_after_training():
    """A unit-variance input stays near unit variance through every block, before and after 25 steps at EDM2's
    learning rate: within a factor 2 (the modulation by the noise level and the concatenation of correlated skips
    move it; a layer without its normalization would scale it by the square root of its fan-in)."""
    torch.manual_seed(0)
    net = preset("edm2_tiny", model_channels=16, attn_resolutions=[8])
    objective = EDM(
        p_mean=-0.4, p_std=1.0, sigma_data=0.5, sigma_min=0.002, sigma_max=80, rho=7, learned_weighting=True
    )
    x = torch.randn(16, 1, 16, 16)
    for stage in ("init", "trained"):
        if stage == "trained":
            data = torch.rand(64, 1, 16, 16).round() * 2 - 1  # a binary "dataset"
            params = [*net.parameters(), *objective.parameters()]
            optimizer = torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.99))
            net.train(), objective.train()
            for _ in range(25):
                level = objective.training_levels(16, x.device)
                x0 = data[torch.randint(0, 64, (16,))]
                objective.losses(lambda a, c: net(a, c), x0, level, torch.randn_like(x0))["loss"].mean().backward()
                optimizer.step(), optimizer.zero_grad()
            net.eval()
        for sigma in (0.05, 1.0, 20.0):
            stds = block_outputs(net, x, sigma)
            assert len(stds) == 15  # 5 in the encoder, 10 in the decoder
            for name, std in stds:
                assert 0.5 < std < 2.0, f"{stage}, sigma {sigma}: block {name} has std {std:.3f}"


def test_the_output_starts_at_zero_and_labels_and_noise_level_change_it():
    torch.manual_seed(0)
    net = preset("edm2_tiny", num_classes=3)
    x, c = torch.randn(4, 1, 16, 16), torch.zeros(4)
    assert net(x, c, torch.tensor([0, 1, 2, 3])).abs().max() == 0  # the output gain starts at 0
    with torch.no_grad():
        net.out_gain.fill_(1.0)
        for block in net.modules():
            if hasattr(block, "emb_gain"):
                block.emb_gain.fill_(1.0)
    out = net(x, c, torch.tensor([0, 1, 2, 3]))  # label 3 is the null label: the zero vector
    assert out.shape == (4, 1, 16, 16) and 0.3 < out.std() < 3
    assert not torch.allclose(out, net(x, c + 0.5, torch.tensor([0, 1, 2, 3])), atol=1e-3)
    assert not torch.allclose(out, net(x, c, torch.tensor([1, 1, 2, 3])), atol=1e-3)


@pytest.mark.parametrize(("name", "millions"), [("edm2_xs", 125), ("edm2_s", 280)])
def test_the_paper_sized_presets_have_the_papers_parameter_counts(name, millions):
    """Karras et al. 2024, Table 2 (4 latent channels at 64x64, 1000 classes): XS 125M, S 280M (within 2%)."""
    with torch.device("meta"):
        net = preset(name, image_size=64, in_channels=4, out_channels=4, num_classes=1000)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(millions * 1e6, rel=0.02)


def test_bad_layouts_are_refused_with_one_paragraph():
    with pytest.raises(SettingError, match=r"dataset.image_size=28 does not fit .* multiple of 2\^3 = 8"):
        preset("edm2_small", image_size=28)
    with pytest.raises(SettingError, match=r"model.res_balance=1.5 is not a number in \[0, 1\]"):
        preset("edm2_tiny", res_balance=1.5)
    with pytest.raises(SettingError, match=r"model\.attn_resolutions"):
        preset("edm2_tiny", attn_resolutions=[5])
    with pytest.raises(SettingError, match=r"model\.fourier_bandwidths"):
        preset("edm2_tiny", fourier_bandwidths=[0.0, 1.0])


def test_the_u_that_minimizes_the_uncertainty_weighted_loss_is_ln_l():
    """L / e^u + u has its minimum at u = ln L; of a batch of losses at one level, at ln of their mean."""
    losses = torch.tensor([0.01, 0.3, 1.0, 7.0], dtype=torch.float64)
    u = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([u], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        value = uncertainty_weighted(losses, u).sum()
        value.backward()
        return value

    optimizer.step(closure)
    torch.testing.assert_close(u.detach(), losses.log(), rtol=0, atol=1e-6)
    batch = torch.tensor([0.5, 1.5, 4.0], dtype=torch.float64)
    grid = torch.linspace(-2, 3, 50_001, dtype=torch.float64)
    best = grid[uncertainty_weighted(batch[:, None], grid[None]).mean(0).argmin()]
    assert best.item() == pytest.approx(math.log(2.0), abs=1e-4)


def test_the_learned_weighting_learns_the_log_of_the_expected_loss_per_level():
    """With a network that outputs zeros and data at 0, EDM's loss at sigma has the expectation
    sigma_data^2 / (sigma^2 + sigma_data^2) (the effective target is -c_skip sigma n / c_out); the head, trained
    alone, learns its logarithm over the bulk of the training levels."""
    torch.manual_seed(0)
    objective = EDM(
        p_mean=-0.4, p_std=1.0, sigma_data=0.5, sigma_min=0.002, sigma_max=80, rho=7, learned_weighting=True
    )
    optimizer = torch.optim.Adam(objective.parameters(), lr=3e-2)
    x0 = torch.zeros(512, 1, 4, 4)
    for _ in range(300):
        level = objective.training_levels(512, x0.device)
        terms = objective.losses(lambda a, c: torch.zeros_like(a), x0, level, torch.randn_like(x0))
        terms["loss"].mean().backward()
        optimizer.step(), optimizer.zero_grad()
    sigma = torch.tensor([0.2, 0.67, 2.0])  # p_mean -0.4 +- 1.1 std
    learned = objective.weighting(sigma.log() / 4)
    torch.testing.assert_close(learned, (0.25 / (sigma**2 + 0.25)).log(), rtol=0, atol=0.1)
    assert set(terms) == {"loss", "unweighted", "u"}


def test_the_learned_weighting_of_flow_matching_and_the_head_alone():
    from diffusion.core.objectives.flow import Flow

    flow = Flow(
        t_sampling="uniform", logit_mean=0, logit_std=1, shift=1, t_min=0.001, t_max=0.999, learned_weighting=True
    )
    x0 = torch.randn(8, 1, 4, 4)
    terms = flow.losses(lambda a, c: torch.zeros_like(a), x0, torch.rand(8), torch.randn_like(x0))
    u = flow.weighting(1000 * torch.rand(8))
    assert u.shape == (8,) and terms["loss"].shape == (8,)
    torch.testing.assert_close(terms["loss"], terms["unweighted"] / terms["u"].exp() + terms["u"])
    assert isinstance(flow.weighting, LearnedWeighting) and sum(p.numel() for p in flow.parameters()) == 128


@pytest.mark.slow
def test_edm2_trains_with_its_recipe_resumes_exactly_and_samples(tmp_path):
    """train.py with model=edm2_tiny, diffusion=edm with the learned weighting, optimizer=edm2, labels and the EMA:
    4 + 4 = 8 steps equal 8 straight (the forced weight normalization is part of the state); then sample.py from the
    checkpoint."""
    from tests.test_multiprocess import assert_same_training_state

    common = [
        "debug=smoke", "model=edm2_tiny", "diffusion=edm", "diffusion.learned_weighting=true", "optimizer=edm2",
        "optimizer.t_ref=3", "model.num_classes=10", "~callbacks.previews",
    ]  # fmt: skip
    straight, resumed = resume_four_plus_four(common, tmp_path)
    a, b = load_state(straight / "checkpoints" / "last.ckpt"), load_state(resumed / "checkpoints" / "last.ckpt")
    assert_same_training_state(a, b)
    assert any(".weighting." in name for name in a["state_dict"])
    e = a["lr_schedulers"][0]["last_epoch"]  # optimizer steps taken: EDM2's decay after t_ref = 3, in the warm-up
    assert e == 8 and a["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(1e-2 * (9 / 200) / math.sqrt(8 / 3))
    result = run_script(
        "sample.py", f"ckpt={straight / 'checkpoints' / 'last.ckpt'}", "sampler=heun", "sampler.steps=3", "n=4",
        f"out_dir={tmp_path / 'samples'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
