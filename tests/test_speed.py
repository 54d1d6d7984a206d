"""Speed switches compute what the plain path computes: mixed precision, channels-last, torch.compile, fused
AdamW, and the UNet's cheaper CPU dropout."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion.core.drawing import draw
from diffusion.core.networks.unet import Dropout, UNet
from diffusion.training.module import DiffusionModule
from tests.helpers import compose_config
from train import hyperparameters


def module(tmp_path, *overrides: str) -> DiffusionModule:
    torch.manual_seed(0)
    net = DiffusionModule(**hyperparameters(compose_config("train", ["model.dropout=0.0", *overrides], tmp_path)))
    for p in net.model.network.parameters():  # away from the zero initialisation, so that every layer matters
        p.data.add_(0.02 * torch.randn(p.shape))  # drawn in logical order, whatever the memory format
    return net


def loss_of(net: DiffusionModule) -> torch.Tensor:
    """The per-image losses of a fixed batch, at fixed noise levels and noise."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1
    level = net.model.objective.training_levels(8, torch.device("cpu"), g)
    return net.losses(x0, torch.zeros(8, dtype=torch.long), level, torch.randn(8, 1, 16, 16, generator=g), None)["loss"]


def test_bf16_autocast_gives_the_fp32_loss_within_bf16_tolerance(tmp_path):
    net = module(tmp_path)
    plain = loss_of(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss_of(net)
    torch.testing.assert_close(mixed.float(), plain, rtol=3e-2, atol=1e-3)


def test_channels_last_gives_the_same_loss_and_gradients(tmp_path):
    plain, fast = module(tmp_path), module(tmp_path, "model.channels_last=true")
    assert fast.model.network.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    a, b = loss_of(plain), loss_of(fast)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a.mean().backward()
    b.mean().backward()
    for (name, p), q in zip(plain.model.network.named_parameters(), fast.model.network.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_adamw_takes_the_same_step_as_the_plain_one(tmp_path):
    net = module(tmp_path)
    other = copy.deepcopy(net)
    settings = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    fused = torch.optim.AdamW(net.parameters(), fused=True, **settings)
    plain = torch.optim.AdamW(other.parameters(), foreach=False, **settings)
    for model, optimizer in ((net, fused), (other, plain)):  # identical gradients, one step each
        optimizer.zero_grad()
        loss_of(model).mean().backward()
        optimizer.step()
    for p, q in zip(net.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-3 * settings["lr"])  # a thousandth of a step


@pytest.mark.slow
def test_compiled_and_eager_agree_on_loss_and_samples(tmp_path):
    """One compilation (inference, ~25 s on 2 CPU cores) serves both checks."""
    eager, compiled = module(tmp_path), module(tmp_path, "model.compile=true")
    with torch.inference_mode():
        torch.testing.assert_close(loss_of(compiled), loss_of(eager), rtol=1e-4, atol=1e-5)
    sampler = functools.partial(instantiate(OmegaConf.load("configs/sampler/ddim.yaml")), steps=5)
    a, b = [], []
    for m, out in ((eager.model, a), (compiled.model, b)):
        with m.sampling():
            out.append(
                draw(m.denoiser_for(), sampler, n=8, batch_size=8, shape=m.image_shape, seed=2, device="cpu").images
            )
    a, b = a[0], b[0]
    assert (a.int() - b.int()).abs().max() <= 1  # uint8 images: at most one level apart from rounding
    copy_ = copy.deepcopy(compiled)  # an EMA copy compiles its own function, bound to its own weights
    assert "_compiled_network" in compiled.model.__dict__ and "_compiled_network" not in copy_.model.__dict__


def test_cpu_dropout_keeps_the_right_fraction_and_the_mean():
    drop = Dropout(0.1)
    torch.manual_seed(0)
    x = torch.ones(2_000_000)
    y = drop(x)
    kept = (y != 0).double().mean().item()
    assert abs(kept - 0.9) < 1e-3 and abs(y.double().mean().item() - 1.0) < 2e-3
    values = torch.unique(y).tolist()
    assert values[0] == 0.0 and values[1:] == [pytest.approx(1 / (1 - round(0.1 * 65536) / 65536))]
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # seeded like every other random draw
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    low = x[:1000].bfloat16()
    torch.manual_seed(0)
    expected = torch.nn.functional.dropout(low, 0.1)
    torch.manual_seed(0)
    assert torch.equal(drop(low), expected)  # other dtypes: PyTorch's own dropout, which scales in float


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_cpu_dropout_scales_what_it_keeps_and_its_gradient_is_the_same_mask(memory_format):
    p = 0.25
    scale = 1 / (1 - round(p * 65536) / 65536)
    x = (torch.rand(4, 8, 16, 16) + 0.5).contiguous(memory_format=memory_format).requires_grad_()
    torch.manual_seed(0)
    y = Dropout(p)(x)
    assert y.is_contiguous(memory_format=memory_format)
    kept = y != 0
    # The mask is laid out like x (the product is then one vectorized pass): the i-th element in memory is kept
    # when the i-th 16-bit integer of the random stream is at least -32768 + round(p * 65536).
    torch.manual_seed(0)
    stream = torch.empty(x.numel() // 4, dtype=torch.int64).random_(-(2**63), None).view(torch.int16)
    in_memory_order = kept.permute(0, 2, 3, 1) if memory_format == torch.channels_last else kept
    assert torch.equal(in_memory_order.flatten(), stream >= round(p * 65536) - 32768)
    assert abs(kept.double().mean().item() - (1 - p)) < 0.02
    torch.testing.assert_close(y[kept], x[kept] * scale, rtol=1e-6, atol=0)
    upstream = torch.randn(y.shape)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, upstream * kept * scale, rtol=1e-6, atol=0)


def test_the_unet_compiles_to_one_graph_while_training_with_dropout():
    """The CPU dropout's in-place ``random_`` would split the compiled graph at every ResBlock; under
    ``torch.compile`` the standard dropout takes its place."""
    torch.manual_seed(0)
    settings = OmegaConf.to_container(OmegaConf.load("configs/model/small.yaml"))
    settings.pop("_target_")
    settings.update(num_classes=None, base_channels=32)
    unet = UNet(image_size=16, in_channels=1, out_channels=1, **settings).train()
    assert settings["dropout"] > 0
    explanation = torch._dynamo.explain(unet)(torch.randn(2, 1, 16, 16), torch.tensor([3, 700]))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
