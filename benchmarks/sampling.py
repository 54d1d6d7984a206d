"""Sampling speed: seconds per network evaluation and images per second, for every sampler.

    python benchmarks/sampling.py --quick                  # one pinned CPU core, 10 steps each, a minute or two
    python benchmarks/sampling.py --device cuda --threads 0 --batch 256 --precision bf16 --compile --channels-last
    python benchmarks/sampling.py --device cuda --threads 0 --batch 500 --lucidrains   # DDIM-50 against lucidrains'

Samples go through ``diffusion.core.drawing.draw``, the code that the training callbacks and sample.py use, under
``torch.inference_mode``, with the UNet of ``--model`` (random weights: speed does not depend on them). In
--quick mode every sampler runs --steps steps and its images per second at its default number of steps is
derived from the measured seconds per evaluation (marked "derived"); otherwise each runs its default steps.

With ``--lucidrains`` a second table times DDIM-50 (--steps in --quick mode) of this project's UNet through ``draw``
against lucidrains' ``GaussianDiffusion(Unet(dim=64, dim_mults=(1, 2, 4))).sample`` (its DDIM, ``sampling_timesteps``
50) at the same batch, precision and image size, interleaved (its ``pip install -r benchmarks/requirements.txt``).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
from common import ROOT, interleaved, machine, setup_device, table, train_hparams, write_json
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion.core.denoiser import Prediction
from diffusion.core.drawing import CountedDenoiser, draw
from diffusion.core.model import DiffusionModel
from diffusion.core.samplers import final
from diffusion.models.building import build_model

SAMPLERS = ("ddpm", "ddim", "dpm_solver", "sde", "ode")


def build(model: str, compile: bool, channels_last: bool, device: torch.device) -> DiffusionModel:
    """``model=MODEL`` for 32x32 RGB images with the DDPM objective, in eval mode on ``device``."""
    torch.manual_seed(0)
    hparams = train_hparams(
        f"model={model}", f"model.compile={compile}", f"model.channels_last={channels_last}", "diffusion=ddpm",
        "dataset.image_size=32", "dataset.channels=3", "model.num_classes=null",
    )  # fmt: skip
    return build_model(hparams).to(device).eval()


class Zero:
    """A trivial denoiser at a model's levels, to count a sampler's network evaluations cheaply."""

    rows_per_image = 1

    def __init__(self, levels) -> None:
        self.levels = levels

    def __call__(self, x, level):
        return Prediction(x0=torch.zeros_like(x), eps=torch.zeros_like(x))


def evaluations_at(sampler, levels, steps: int) -> int:
    """Network evaluations of a run of ``steps`` steps, counted with a trivial denoiser on a 1-pixel image."""
    counted = CountedDenoiser(Zero(levels))
    final(sampler(counted, torch.zeros(1, 1, 1, 1), steps=steps))
    return counted.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (pinned to as many cores); 0: all")
    parser.add_argument("--model", default="small", help="a configs/model preset")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="steps of every sampler in --quick mode")
    parser.add_argument("--lucidrains", action="store_true", help="also DDIM against lucidrains' at the same batch")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sampling.json")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    device = setup_device(args.device, threads, pin=args.device == "cpu" and args.threads > 0)
    module = build(args.model, args.compile, args.channels_last, device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    samplers = {name: instantiate(OmegaConf.load(ROOT / "configs" / "sampler" / f"{name}.yaml")) for name in SAMPLERS}
    default_steps = {name: sampler.keywords["steps"] for name, sampler in samplers.items()}

    def run(name: str) -> float:
        sampler = functools.partial(samplers[name], steps=args.steps) if args.quick else samplers[name]
        with module.sampling(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            samples = draw(
                module.denoiser_for(),
                sampler,
                n=args.batch,
                batch_size=args.batch,
                shape=(3, 32, 32),
                seed=1,
                device=device,
            )
        return samples.nfe

    nfe = {name: run(name) for name in SAMPLERS}  # warm-up (and compilation), counting the network evaluations
    seconds = interleaved({name: lambda name=name: run(name) for name in SAMPLERS}, device, 2 if args.quick else 3, 1)
    rows = []
    for name in SAMPLERS:
        per_evaluation = seconds[name] / nfe[name]
        default_nfe = evaluations_at(samplers[name], module.objective.levels, default_steps[name])
        rows.append(
            {
                "sampler": name,
                "steps": args.steps if args.quick else default_steps[name],
                "nfe": nfe[name],
                "s_per_nfe": per_evaluation,
                "img_per_s": args.batch / seconds[name],
                "default_steps": default_steps[name],
                "default_nfe": default_nfe,
                "img_per_s_at_default": args.batch / (per_evaluation * default_nfe),
                "at_default": "derived" if args.quick else "measured",
            }
        )
    peers = against_lucidrains(args, module, samplers["ddim"], device, dtype) if args.lucidrains else []
    info = machine(device)
    print(
        f"\nSampling, {args.model} UNet, batch {args.batch}, {args.precision}"
        f"{', compiled' if args.compile else ''}{', channels-last' if args.channels_last else ''}, {info}"
    )
    print(
        table(
            rows,
            [
                "sampler",
                "steps",
                "nfe",
                "s_per_nfe",
                "img_per_s",
                "default_steps",
                "default_nfe",
                "img_per_s_at_default",
                "at_default",
            ],
        )
    )
    if peers:
        print(f"\nDDIM-{peers[0]['steps']} at batch {args.batch}, {args.precision}")
        print(table(peers, ["system", "steps", "img_per_s", "vs_lucidrains"]))
    write_json(
        args.out,
        {
            "machine": info,
            "model": args.model,
            "batch": args.batch,
            "precision": args.precision,
            "compile": args.compile,
            "channels_last": args.channels_last,
            "rows": rows,
            "against_lucidrains": peers,
        },
    )


def against_lucidrains(args, module, ddim, device: torch.device, dtype) -> list[dict]:
    """DDIM of this project's UNet (through ``draw``) and of lucidrains' library at the same batch, interleaved."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    steps = args.steps if args.quick else 50
    torch.manual_seed(0)
    unet = Unet(dim=64, dim_mults=(1, 2, 4), channels=3)
    theirs = GaussianDiffusion(unet, image_size=32, timesteps=1000, sampling_timesteps=steps).to(device).eval()
    if args.compile:
        theirs.model = torch.compile(theirs.model)
    ours = functools.partial(ddim, steps=steps)

    def run_ours() -> None:
        with module.sampling(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            draw(module.denoiser_for(), ours, n=args.batch, batch_size=args.batch,
                 shape=(3, 32, 32), seed=1, device=device)  # fmt: skip

    def run_theirs() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            theirs.sample(batch_size=args.batch)

    cases = {"ours": run_ours, "lucidrains": run_theirs}
    for fn in cases.values():  # warm-up (and compilation)
        fn()
    seconds = interleaved(cases, device, 2 if args.quick else 3, 1)
    return [
        {"system": name, "steps": steps, "img_per_s": args.batch / seconds[name],
         "vs_lucidrains": seconds["lucidrains"] / seconds[name]}
        for name in cases
    ]  # fmt: skip


if __name__ == "__main__":
    main()
