"""A network of one's own, defined here and nowhere in the project, trains, resumes and samples through train.py and
sample.py as the README's "Adding a network" says; and sample.py draws from a checkpoint with Lightning not
importable. (This module imports no Lightning itself, as a module holding a user's network would not: sample.py
imports it to rebuild the network.)"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from tests.helpers import ROOT, load_state, resume_four_plus_four, run_script


class TinyConvNet(nn.Module):
    """Two convolutions, conditioned by a per-channel shift computed from the noise conditioning (Fourier features of
    whatever scale the objective gives) and the class label: the interface of diffusion/core/networks/__init__.py."""

    def __init__(
        self, *, image_size: int, in_channels: int, out_channels: int, num_classes: int | None, width: int
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.frequencies = nn.Parameter(torch.randn(8) * math.pi, requires_grad=False)
        self.noise_embed = nn.Linear(16, width)
        self.label_embed = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x: Tensor, noise_conditioning: Tensor, labels: Tensor | None) -> Tensor:
        angles = noise_conditioning.float()[:, None] * self.frequencies[None] / 100  # (B, 8)
        shift = self.noise_embed(torch.cat([angles.sin(), angles.cos()], dim=1))  # (B, width)
        if self.label_embed is not None:
            shift = shift + self.label_embed(labels)
        return self.conv_out(torch.relu(self.conv_in(x) + shift[:, :, None, None]))


OWN = ["model=custom", "model._target_=tests.test_networks.TinyConvNet", "+model.width=8"]


@pytest.mark.parametrize("diffusion", ["v_prediction", "edm"])
def test_an_own_network_trains_class_conditionally_and_resumes_exactly(tmp_path, diffusion):
    """4 + 4 = 8 steps of the network above with labels, label dropout and the EMA: the same model, EMA, AdamW state
    and random-number states as 8 steps straight, for a discrete and a continuous objective."""
    from tests.test_multiprocess import assert_same_training_state

    common = ["debug=smoke", *OWN, f"diffusion={diffusion}", "model.num_classes=10", "~callbacks.previews"]
    straight, resumed = resume_four_plus_four(common, tmp_path)
    a, b = load_state(straight / "checkpoints" / "last.ckpt"), load_state(resumed / "checkpoints" / "last.ckpt")
    assert_same_training_state(a, b)
    assert a["hyper_parameters"]["model"]["_target_"] == "tests.test_networks.TinyConvNet"
    assert {name.split(".")[2] for name in a["state_dict"]} == {
        "frequencies", "noise_embed", "label_embed", "conv_in", "conv_out"
    }  # fmt: skip


BLOCK_LIGHTNING = (
    "import runpy, sys\n"
    "for name in ('lightning', 'pytorch_lightning', 'lightning_fabric'):\n"
    "    sys.modules[name] = None  # `import lightning` raises ImportError\n"
    "sys.argv = ['sample.py', *sys.argv[1:]]\n"
    "runpy.run_path('sample.py', run_name='__main__')\n"
)


@pytest.mark.slow
def test_an_own_network_from_the_command_line_and_sample_py_without_lightning(tmp_path):
    """train.py as a user types it, with the network's class named on the command line; then sample.py from its
    checkpoint alone, with Lightning blocked, by Heun and by DPM-Solver++, with guidance."""
    run = tmp_path / "run"
    result = run_script(
        "train.py", "debug=smoke", *OWN, "model.num_classes=10", "~callbacks.previews", f"hydra.run.dir={run}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    for sampler, steps in (("heun", 3), ("dpm_solver", 4)):
        out = tmp_path / sampler
        args = [f"ckpt={ckpt}", f"sampler={sampler}", f"sampler.steps={steps}", "n=4", "guidance=2.0", f"out_dir={out}"]
        blocked = subprocess.run(
            [sys.executable, "-c", BLOCK_LIGHTNING, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert blocked.returncode == 0, blocked.stderr[-3000:]
        images = np.load(out / "samples.npz")["arr_0"]
        assert images.shape == (4, 16, 16, 1) and images.std() > 0
    blocked_train = subprocess.run(
        [sys.executable, "-c", BLOCK_LIGHTNING.replace("sample.py", "train.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert blocked_train.returncode != 0 and "lightning" in blocked_train.stderr  # the block is real
