"""The UNet: the paper's parameter count, input validation, conditioning, and that it learns."""

import pytest
import torch
from omegaconf import OmegaConf

from diffusion.core.losses import training_losses
from diffusion.core.networks.unet import Downsample, ResBlock, UNet, timestep_embedding
from diffusion.core.schedules import NoiseSchedule, make_betas


def preset(name, checkpointing=False, **overrides):
    """A UNet built from configs/model/NAME.yaml with the settings every network shares (configs/train.yaml's
    model.num_classes), as the training application builds it."""
    config = OmegaConf.to_container(OmegaConf.load(f"configs/model/{name}.yaml"))
    config.pop("_target_")
    config.update(num_classes=None, image_size=32, in_channels=3)
    config.update(overrides)
    config.setdefault("out_channels", config["in_channels"])
    net = UNet(**config)
    net.checkpointing = checkpointing
    return net


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_ddpm_cifar_preset_is_the_papers_35_7M_network():
    assert n_params(preset("ddpm_cifar")) == pytest.approx(35.7e6, rel=0.01)


def test_ddpm_256_preset_is_the_papers_114M_network():
    """Ho et al. 2020's 256x256 model (LSUN, CelebA-HQ): 114M parameters; its six levels reach 8x8 at 256."""
    with torch.device("meta"):  # the count needs no memory
        net = preset("ddpm_256", image_size=256)
    assert n_params(net) == pytest.approx(114e6, rel=0.01)


def test_ddpm_128_preset_has_guided_diffusions_levels_for_128():
    with torch.device("meta"):
        net = preset("ddpm_128", image_size=128)
    assert len([m for m in net.modules() if isinstance(m, Downsample)]) == 4  # five levels: 128 down to 8
    assert 80e6 < n_params(net) < 90e6


def test_activation_checkpointing_recomputes_the_blocks_and_gives_the_same_gradients(monkeypatch):
    """With dropout, so the recomputation must draw the same mask: loss and every gradient equal; each ResBlock
    runs twice per step (forward, then again in the backward pass) instead of once."""
    calls = []
    forward = ResBlock.forward

    def counted(self, *args):
        calls.append(1)
        return forward(self, *args)

    monkeypatch.setattr(ResBlock, "forward", counted)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = preset("tiny", image_size=16, in_channels=1, dropout=0.3, checkpointing=checkpointing)
        calls.clear()
        torch.manual_seed(1)
        loss = net(x, t).square().mean()
        loss.backward()
        blocks = len([m for m in net.modules() if isinstance(m, ResBlock)])
        assert len(calls) == blocks * (2 if checkpointing else 1) and net.checkpointing == checkpointing
        results.append((loss.detach(), {name: p.grad.clone() for name, p in net.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_tiny_preset_is_about_one_to_two_million_parameters():
    assert 1e6 <= n_params(preset("tiny", image_size=16, in_channels=1)) <= 2e6


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_presets_build_and_run(name):
    net = preset(name, image_size=16, in_channels=1, dropout=0.0)
    x = torch.randn(2, 1, 16, 16)
    assert net(x, torch.tensor([0, 999])).shape == (2, 1, 16, 16)


@pytest.mark.parametrize(("size", "channels", "mult"), [(28, 1, [1, 2, 2]), (16, 3, [1, 2, 2, 2]), (12, 1, [1, 2, 2])])
def test_any_divisible_size_and_1_or_3_channels_work(size, channels, mult):
    net = preset("tiny", image_size=size, in_channels=channels, channel_mult=mult)
    assert net(torch.randn(3, channels, size, size), torch.tensor([1, 2, 3])).shape == (3, channels, size, size)


def test_a_size_the_network_cannot_take_names_the_sizes_that_work():
    with pytest.raises(ValueError, match=r"image_size=30 .* multiple of 2\^3 = 8.* near it: \[24, 32\]"):
        preset("small", image_size=30)
    with pytest.raises(ValueError, match=r"near it: \[8\]"):
        preset("small", image_size=4)


def test_a_bad_channel_count_or_attention_resolution_is_refused():
    with pytest.raises(ValueError, match="1 \\(grayscale\\) or 3 \\(RGB\\)"):
        preset("tiny", in_channels=4)
    with pytest.raises(ValueError, match=r"attention_resolutions \[10\] .* they are \[32, 16, 8\]"):
        preset("tiny", attention_resolutions=[10])
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        preset("tiny", num_heads=3, attention_resolutions=[8])


def test_wrong_inputs_get_clear_errors():
    net = preset("tiny", image_size=16, in_channels=1)
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 1, 16, 16\), got \(2, 3, 16, 16\)"):
        net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="one noise level per image"):
        net(torch.randn(2, 1, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1]))
    conditional = preset("tiny", image_size=16, in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="needs labels"):
        conditional(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))


def test_the_output_has_the_channels_the_objective_asks_for():
    net = preset("tiny", image_size=16, in_channels=3, out_channels=6)
    assert net(torch.randn(1, 3, 16, 16), torch.tensor([5])).shape == (1, 6, 16, 16)


def test_residual_branches_start_at_zero_so_the_initial_output_is_zero():
    """DDPM zero-initialises the last layer of every residual branch and the output layer."""
    net = preset("small", image_size=16, in_channels=1)
    assert net(torch.randn(2, 1, 16, 16), torch.tensor([3, 700])).abs().max() == 0


def test_time_and_label_change_the_output():
    torch.manual_seed(0)
    net = preset("tiny", image_size=16, in_channels=1, num_classes=3, scale_shift=True)
    for p in net.parameters():  # move every weight away from its (partly zero) initial value
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(1, 1, 16, 16).repeat(4, 1, 1, 1)
    out = net(x, torch.tensor([10, 900, 10, 10]), torch.tensor([0, 0, 1, 3]))
    assert (out[0] - out[1]).abs().max() > 1e-3  # timestep
    assert (out[0] - out[2]).abs().max() > 1e-3  # label
    assert (out[0] - out[3]).abs().max() > 1e-3  # the null label (3 = num_classes) is a label of its own


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0.0, 1.0, 2.5]), 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 3)
    torch.testing.assert_close(emb[2], torch.cat([torch.sin(2.5 * freqs), torch.cos(2.5 * freqs)]))
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(4), torch.ones(4)]))


def test_tiny_unet_overfits_four_images():
    """The real objective (fresh timesteps and noise every step) on four digits: the loss falls at least 10x."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = torch.tensor(load_digits().images[:4], dtype=torch.float32)[:, None] / 16 * 2 - 1
    x0 = torch.nn.functional.interpolate(digits, size=16, mode="bilinear").repeat(4, 1, 1, 1)  # (16, 1, 16, 16)
    schedule = NoiseSchedule(make_betas("linear", 1000))
    net = preset("tiny", image_size=16, in_channels=1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(250):
        t, noise = torch.randint(0, 1000, (16,)), torch.randn_like(x0)
        x_t = schedule.q_sample(x0, t, noise)
        loss = training_losses(
            schedule,
            net(x_t, t),
            x0,
            x_t,
            t,
            noise,
            target="eps",
            loss="mse",
            learned_variance=False,
            vlb_weight=0.0,
            min_snr_gamma=None,
        )["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-20:]) / 20
    assert first / last >= 10, f"loss went from {first:.3f} to {last:.3f}"
