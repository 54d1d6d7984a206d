"""The one sampling pipeline (diffusion.core.drawing.draw): image k depends only on (seed, k), whatever the batch size
or the process that draws it; network evaluations are counted; GIF frames are thinned. And its callers agree: the
training preview equals sample.py's first images from the same checkpoint and seed."""

from __future__ import annotations

import imageio.v3 as iio
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion.core.drawing import BLOCK, ImageNoise, draw
from sample import sample
from tests.analytic import MIXTURE, schedule_levels
from tests.helpers import CONFIGS, compose_config
from train import train

LEVELS = schedule_levels("linear", 200)
SAMPLERS = ["ddpm", "ddim", "dpm_solver", "sde", "ode", "heun"]


def configured(name: str, **options):
    cfg = OmegaConf.load(CONFIGS / "sampler" / f"{name}.yaml")
    cfg.steps = 6
    if name == "ddim":
        cfg.eta = 0.7  # stochastic, so that the per-step noise is checked too
    if name == "sde":
        cfg.corrector_steps = 1
    if name == "heun":
        cfg.s_churn = 10.0  # stochastic too
    return instantiate(cfg)


def oracle(labels):
    return MIXTURE.denoiser(LEVELS)


@pytest.mark.parametrize("name", SAMPLERS)
def test_image_k_depends_only_on_the_seed_and_k(name):
    n, sampler = 70, configured(name)
    common = dict(n=n, shape=(1, 3, 3), seed=5, device="cpu")
    runs = {b: draw(oracle, sampler, batch_size=b, **common).images for b in (1, 7, 64)}
    assert torch.equal(runs[1], runs[7]) and torch.equal(runs[1], runs[64])
    # two processes, each drawing every other image in batches of its own size
    shares = [
        draw(oracle, sampler, batch_size=b, indices=range(r, n, 2), **{**common, "n": len(range(r, n, 2))})
        for r, b in ((0, 9), (1, 4))
    ]
    together = torch.empty_like(runs[1])
    together[0::2], together[1::2] = shares[0].images, shares[1].images
    assert torch.equal(together, runs[1])
    other_seed = draw(oracle, sampler, batch_size=64, **{**common, "seed": 6}).images
    assert not torch.equal(other_seed, runs[1])


def test_the_noise_of_an_image_is_the_same_in_every_batch():
    whole = ImageNoise(3, range(100), "cpu")
    first, second = whole.randn((100, 2)), whole.randn((100, 2))
    part = ImageNoise(3, [5, 40, 99, BLOCK], "cpu")
    assert torch.equal(part.randn((4, 2)), first[[5, 40, 99, BLOCK]])
    assert torch.equal(part.randn((4, 2)), second[[5, 40, 99, BLOCK]])  # and at every later draw
    assert part.randn((4, 2), torch.bfloat16).dtype == torch.bfloat16


def test_network_evaluations_are_counted_and_frames_thinned():
    steps = []
    samples = draw(
        oracle,
        configured("ode"),
        n=5,
        batch_size=2,
        shape=(1, 2, 2),
        seed=0,
        device="cpu",
        frames=4,
        frame_images=2,
        on_step=steps.append,
    )
    assert samples.nfe == 2 * 6 - 1  # Heun: two evaluations per step but the last
    assert len(steps) == 3 * 6  # every step of the three batches
    assert len(samples.frames) == 4 and all(f.shape == (2, 1, 2, 2) for f in samples.frames)
    assert torch.equal(samples.frames[-1], samples.images[:2])  # the last frame is the final image


def test_labels_reach_the_denoiser_with_their_images():
    seen = []

    def denoiser_for(labels):
        seen.append(labels.tolist())
        return MIXTURE.denoiser(LEVELS)

    labels = torch.arange(5)
    draw(
        denoiser_for,
        configured("ddim"),
        n=5,
        batch_size=2,
        shape=(1, 1, 1),
        seed=0,
        device="cpu",
        labels=labels,
    )
    assert seen == [[0, 1], [2, 3], [4]]


def test_the_preview_equals_sample_py_from_the_same_checkpoint_and_seed(tmp_path):
    """The final preview of a run (drawn with the EMA weights at the last step) and sample.py's first images from
    that run's last.ckpt, same sampler, steps and seed: the same pixels."""
    run = tmp_path / "run"
    train(compose_config("train", ["debug=smoke", "trainer.max_steps=5", "callbacks.previews.num_images=9"], run))
    preview = iio.imread(run / "samples" / "step_0000005.png")
    overrides = [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "sampler=ddpm", "sampler.steps=4", "n=9", "batch_size=4"]
    overrides.append("grid_images=9")
    sample(compose_config("sample", overrides, tmp_path / "sampled"))
    assert (iio.imread(tmp_path / "sampled" / "grid.png") == preview).all()
