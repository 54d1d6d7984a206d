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
