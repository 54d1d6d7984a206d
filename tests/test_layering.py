"""Imports point one way: the pure math and the network know nothing of Lightning, Hydra or torchvision."""

import subprocess
import sys

PURE = [
    "diffusion.schedules",
    "diffusion.targets",
    "diffusion.reverse",
    "diffusion.losses",
    "diffusion.denoiser",
    "diffusion.samplers",
    "diffusion.unet",
    "diffusion.images",
    "diffusion.sampling",
    "diffusion.ema",
    "diffusion.lr_schedule",
]
FORBIDDEN = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "torchvision")


def test_pure_modules_import_no_framework():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in PURE)
        + f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
