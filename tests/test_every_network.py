"""Every network preset with every objective: built from the composed config as train.py builds it, trained one
step with class labels (a learned variance doubling the output where the objective asks), and sampled with guidance
through the common denoiser. The end-to-end runs of train.py and sample.py are in tests/test_edm2.py (EDM2 with its
recipe, resumed) and tests/test_train.py (U-ViT)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusion.core.denoiser import SamplingOptions
from diffusion.core.drawing import draw
from diffusion.core.samplers.dpm_solver import dpm_solver_sample
from diffusion.models.building import build_model
from diffusion.models.hparams import from_settings
from tests.helpers import CONFIGS, compose_config
from train import train  # noqa: F401  (registers train.py's schema, which the composed config starts from)

OBJECTIVES = sorted(p.stem for p in (CONFIGS / "diffusion").glob("*.yaml"))
NETWORKS = ["tiny", "edm2_tiny", "uvit_tiny"]


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("network", NETWORKS)
def test_every_network_trains_and_samples_under_every_objective(network, objective):
    overrides = [f"model={network}", f"diffusion={objective}", "model.num_classes=3", "dataset.image_size=8"]
    settings = OmegaConf.to_container(compose_config("train", overrides, Path("unused")), resolve=True)
    torch.manual_seed(0)
    model = build_model(from_settings(settings))
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3])  # 3: the null label of classifier-free guidance
    level = model.objective.training_levels(4, x0.device)
    terms = model.objective.losses(lambda x, c: model.network_output(x, c, labels), x0, level, torch.randn_like(x0))
    terms["loss"].mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(terms["loss"]).all() and grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    with model.sampling():
        samples = draw(
            model.denoiser_for(SamplingOptions(guidance=2.0)),
            functools.partial(dpm_solver_sample, steps=3, spacing="uniform"),
            n=3, batch_size=3, shape=(1, 8, 8), seed=0, device="cpu", labels=torch.tensor([0, 1, 2]),
        )  # fmt: skip
    assert samples.images.shape == (3, 1, 8, 8) and samples.nfe == 6  # guided: two rows per image and step


@pytest.mark.parametrize("network", NETWORKS)
def test_every_network_trains_in_bf16_mixed_precision(network):
    """The training step under CPU bf16 autocast, as trainer.precision=bf16-mixed runs it: the loss (computed in
    float32 by the objectives) and every gradient finite, and the loss near the float32 one."""
    overrides = [f"model={network}", "diffusion=edm", "dataset.image_size=8"]
    settings = OmegaConf.to_container(compose_config("train", overrides, Path("unused")), resolve=True)
    torch.manual_seed(0)
    model = build_model(from_settings(settings))
    x0, noise = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    level = torch.tensor([0.05, 0.5, 2.0, 20.0])
    full = model.objective.losses(lambda x, c: model.network_output(x, c, None), x0, level, noise)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.objective.losses(lambda x, c: model.network_output(x, c, None), x0, level, noise)["loss"]
    assert mixed.dtype == torch.float32
    mixed.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(mixed.detach(), full.detach(), rtol=0.05, atol=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("network", ["edm2_tiny", "uvit_tiny"])
def test_the_new_networks_compile_and_train_as_they_do_eagerly(network):
    """``model.compile=true``: a training step of the compiled network gives the eager loss and gradients, and,
    for EDM2, its forced weight normalization (a no-grad copy into each stored weight, inside the compiled forward)
    still rewrites the stored weights; in eval mode the outputs agree too. Two levels, one block each: the compile
    time grows with the layers (~40 s each on 2 CPU cores). No dropout: compiled code draws other masks."""
    layout = {"edm2_tiny": ["model.channel_mult=[1]", "model.dropout=0"], "uvit_tiny": ["model.num_blocks=3"]}[network]
    models = []
    for compiled in (False, True):
        overrides = [f"model={network}", "model.num_classes=3", "dataset.image_size=8", f"model.compile={compiled}"]
        settings = OmegaConf.to_container(compose_config("train", [*overrides, *layout], Path("unused")), resolve=True)
        torch.manual_seed(0)
        models.append(build_model(from_settings(settings)))
    eager, compiled = models
    for p in eager.parameters():  # weights away from unit norm: forced weight normalization has work to do
        p.data.mul_(1.5)
    compiled.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randn(4, 1, 8, 8, generator=g)
    level, labels = eager.objective.training_levels(4, x0.device, g), torch.tensor([0, 1, 2, 3])
    losses = []
    for model in models:
        model.train()
        terms = model.objective.losses(lambda x, c, m=model: m.network_output(x, c, labels), x0, level, noise)
        terms["loss"].mean().backward()
        losses.append(terms["loss"].detach())
    assert "_compiled_network" in compiled.__dict__
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.data, p.data, rtol=1e-5, atol=1e-6, msg=name)  # the stored weights, rewritten
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    if network == "edm2_tiny":
        weights = [p for n, p in compiled.network.named_parameters() if p.ndim > 1 and "emb_fourier" not in n]
        norms = [w.flatten(1).norm(dim=1) / w[0].numel() ** 0.5 for w in weights]
        assert all(torch.allclose(n, torch.ones_like(n), atol=1e-3) for n in norms)  # unit RMS (eps 1e-4)
    with torch.no_grad():
        for model in models:
            model.eval()
        c = torch.full((4,), 0.5)
        torch.testing.assert_close(compiled.network_output(x0, c, labels), eager.network_output(x0, c, labels),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
