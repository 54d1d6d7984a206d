"""The application's training speed next to its own bare step and the peers' plain loops, in one run (issue 11).

    python benchmarks/train_app.py --device cuda                               # batch 128, trainer=gpu
    python benchmarks/train_app.py --device cuda --compile -- model.compile=true model.channels_last=true
    python benchmarks/train_app.py --device cuda --batch-sizes 128 512 1024   # how images/s scales with the batch
    python benchmarks/train_app.py --device cpu --quick                        # a smoke run: tiny model, few steps
    python benchmarks/train_app.py --device cuda --profile 20                  # and torch.profiler's top operators

Rows, all at the same batch of 32x32 one-channel images (Fashion-MNIST from Debian's ``dataset-fashion-mnist``):

- ``app``: ``python train.py experiment=fashion trainer=gpu dataset.batch_size=B`` (and any overrides after
  ``--``), run as a user runs it: its callbacks, logging, EMA, checkpointing and device-held data. The callback of
  benchmarks/step_timer.py times steps ``--warmup`` to ``--warmup + --steps``, so start-up and compilation are
  left out; it waits for the GPU only at the two ends of that window.
- ``bare``: the same UNet preset in a plain loop: the forward process, the network, the MSE to the noise, backward,
  clipping at 1, fused AdamW and a foreach EMA, under the run's autocast (compiled with ``--compile``).
- ``lucidrains``: ``GaussianDiffusion(Unet(dim=64, dim_mults=(1, 2, 4)))`` in the plain loop of its README, with
  ``EMA(beta=0.995, update_every=10)`` and clipping at 1, under the same autocast.
- ``diffusers``: ``UNet2DModel`` in the DDPM CIFAR-10 layout at width 64, in the same plain loop as ``bare``.

Each round runs the app once (a fresh process), then the three loops interleaved, ``--steps`` steps each timed as
one block; the medians over ``--rounds`` rounds are reported. GFLOP/img is the forward pass counted by
``torch.utils.flop_counter`` (training is 3x that), and the peak is measured in the run's dtype (bf16 on a GPU):
the best of large matmuls and of conv2d at the UNet's layer shapes. Runs by hand or on a GPU, never in the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ROOT, machine, preset_unet, setup_device, table, time_call, write_json
from peak import conv_shapes, measure_peak
from peers import diffusers_ddpm
from torch.utils.flop_counter import FlopCounterMode

from diffusion.core.networks.unet import UNet
from diffusion.core.schedules import NoiseSchedule, make_betas
from diffusion.data.datasets import load_fashion

SIZE, CHANNELS = 32, 1


def fashion_images(device: torch.device) -> torch.Tensor:
    """Fashion-MNIST's training images at 32x32 in [0, 1], ``(60000, 1, 32, 32)`` float32 on ``device``."""
    with tempfile.TemporaryDirectory() as root:
        images = load_fashion(Path(root), False)[0].images
    images = F.interpolate(images.float() / 255, size=(SIZE, SIZE), mode="bilinear", antialias=True)
    return images.clamp(0, 1).to(device)


def unet(preset: str) -> UNet:
    return preset_unet(preset, SIZE, CHANNELS)


class PlainLoop:
    """A hand-written eps-prediction training loop around ``network(x_t, t)``: what a user writes without a
    framework. One :meth:`step` is one optimizer step on a random batch of ``images``."""

    def __init__(self, network: torch.nn.Module, images: torch.Tensor, batch: int, bf16: bool, compile: bool) -> None:
        device = images.device
        torch.manual_seed(0)
        self.network, self.images, self.batch = network.to(device), images, batch
        self.flops = forward_flops(self.network, batch, device)
        self.call = torch.compile(self.network) if compile else self.network
        self.schedule = NoiseSchedule(make_betas("linear", 1000)).to(device)
        self.params = [p for p in self.network.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=2e-4, fused=True)
        self.ema = [p.detach().clone() for p in self.params]
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step(self) -> None:
        device = self.images.device
        x0 = self.images[torch.randint(0, len(self.images), (self.batch,), device=device)] * 2 - 1
        t = torch.randint(0, 1000, (self.batch,), device=device)
        noise = torch.randn_like(x0)
        with self.autocast:
            out = self.call(self.schedule.q_sample(x0, t, noise), t)
        out = out.sample if hasattr(out, "sample") else out
        loss = F.mse_loss(out.float(), noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.optimizer.step()
        torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - 0.999)


class OurUNet(torch.nn.Module):
    """The project's UNet called as ``network(x_t, t)``."""

    def __init__(self, preset: str) -> None:
        super().__init__()
        self.unet = unet(preset)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, None)


class LucidrainsLoop:
    """lucidrains' README loop: ``loss = diffusion(images)`` on [0, 1] images, with its EMA and clipping at 1."""

    def __init__(self, images: torch.Tensor, batch: int, bf16: bool) -> None:
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet
        from ema_pytorch import EMA

        device = images.device
        torch.manual_seed(0)
        self.images, self.batch = images, batch
        model = Unet(dim=64, dim_mults=(1, 2, 4), channels=CHANNELS)
        self.flops = forward_flops(model.to(device), batch, device)
        self.diffusion = GaussianDiffusion(model, image_size=SIZE, timesteps=1000).to(device)
        self.ema = EMA(self.diffusion, beta=0.995, update_every=10).to(device)
        self.optimizer = torch.optim.Adam(self.diffusion.parameters(), lr=2e-4, betas=(0.9, 0.99))
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step(self) -> None:
        batch = self.images[torch.randint(0, len(self.images), (self.batch,), device=self.images.device)]
        with self.autocast:
            loss = self.diffusion(batch)
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.diffusion.parameters(), 1.0)
        self.optimizer.step()
        self.ema.update()


def forward_flops(network: torch.nn.Module, batch: int, device: torch.device) -> float:
    """Forward GFLOP per image."""
    x = torch.randn(batch, CHANNELS, SIZE, SIZE, device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network(x, t)
    return counter.get_total_flops() / batch / 1e9


def run_app(args: argparse.Namespace, batch: int, name: str, overrides: list[str], profile: bool = False) -> float:
    """One train.py process; returns its images/s over the timed window (with ``profile``, writes the profiler's
    table to ``--work``/profile.txt instead, over ``--profile`` steps, and returns 0)."""
    work = args.work / name
    timer = work.with_suffix(".json")
    timer.unlink(missing_ok=True)
    device = ["trainer=gpu"] if args.device == "cuda" else ["trainer.accelerator=cpu"]
    if profile:
        steps, callback = args.profile, f"step_profiler={{_target_:step_timer.StepProfiler,start:{args.warmup}"
        callback += f",steps:{args.profile},path:'{args.work / 'profile.txt'}'}}"
    else:
        steps, callback = args.steps, f"step_timer={{_target_:step_timer.StepTimer,start:{args.warmup}"
        callback += f",steps:{args.steps},path:'{timer}'}}"
    command = [
        sys.executable, str(ROOT / "train.py"), "experiment=fashion", *device, f"dataset.batch_size={batch}",
        f"trainer.max_steps={args.warmup + steps}", "dataset.download=false", f"+callbacks.{callback}",
        *overrides, f"hydra.run.dir={work}",
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), env.get("PYTHONPATH")]))
    if args.device == "cpu":  # as many threads as the in-process loops
        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    log = work.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if profile and done.returncode == 0:
        return 0.0
    if done.returncode != 0 or not timer.is_file():
        tail = log.read_text()[-3000:]
        raise SystemExit(f"train.py failed (exit {done.returncode}); its output is in {log}:\n{tail}")
    timed = json.loads(timer.read_text())
    return timed["images"] / timed["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads; 0: all")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--model", default="small", help="the UNet preset of the app (experiment=fashion: small)")
    parser.add_argument("--compile", action="store_true", help="compile the bare step too")
    parser.add_argument("--warmup", type=int, default=100, help="steps before the timed window")
    parser.add_argument("--steps", type=int, default=300, help="steps in the timed window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0, help="also profile this many app steps (an extra run)")
    parser.add_argument("--quick", action="store_true", help="a CPU smoke run: tiny model, 5 + 10 steps, batch 16")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "train_app")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_app.json")
    args, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    if args.quick:
        args.model, args.warmup, args.steps, args.rounds, args.batch_sizes = "tiny", 5, 10, 2, [16]
    if args.model != "small":
        overrides = [f"model={args.model}", *overrides]
    device = setup_device(args.device, args.threads or torch.get_num_threads(), pin=False)
    bf16 = device.type == "cuda"  # trainer=gpu's bf16-mixed; the CPU preset trains in fp32
    images = fashion_images(device)
    rows, info = [], machine(device)
    for batch in args.batch_sizes:
        loops = {
            "bare": PlainLoop(OurUNet(args.model), images, batch, bf16, args.compile),
            "lucidrains": LucidrainsLoop(images, batch, bf16),
            "diffusers": PlainLoop(diffusers_ddpm(64, channels=CHANNELS), images, batch, bf16, False),
        }
        for loop in loops.values():  # warm-up, and compilation where asked
            for _ in range(3):
                loop.step()
        samples: dict[str, list[float]] = {"app": [], **{name: [] for name in loops}}
        for round_ in range(args.rounds):
            samples["app"].append(run_app(args, batch, f"app_b{batch}_r{round_}", overrides))
            for name, loop in loops.items():
                seconds = time_call(lambda loop=loop: [loop.step() for _ in range(args.steps)], device, 1)[0]
                samples[name].append(batch * args.steps / seconds)
            print(f"batch {batch}, round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in samples.items()))
        medians = {name: statistics.median(values) for name, values in samples.items()}
        flops = {"app": loops["bare"].flops, **{name: loop.flops for name, loop in loops.items()}}
        for name, images_per_second in medians.items():
            rows.append(
                {
                    "system": name,
                    "batch": batch,
                    "img_per_s": images_per_second,
                    "vs_lucidrains": images_per_second / medians["lucidrains"],
                    "vs_bare": images_per_second / medians["bare"],
                    "fwd_GFLOP_per_img": flops[name],
                    "train_GFLOP_per_s": 3 * flops[name] * images_per_second,
                    "all_rounds": samples[name],
                }
            )
    if args.profile:
        run_app(args, args.batch_sizes[0], "profile", overrides, profile=True)
        print(f"\nProfile of {args.profile} app steps at batch {args.batch_sizes[0]}:")
        print("\n".join((args.work / "profile.txt").read_text().splitlines()[:30]))
    dtype = torch.bfloat16 if bf16 else torch.float32
    shapes = conv_shapes([OurUNet(args.model).to(device)], args.batch_sizes[0], device, CHANNELS)
    peak = measure_peak(shapes, args.batch_sizes[0], device, False, dtype)
    for row in rows:
        row["percent_of_peak"] = 100 * row["train_GFLOP_per_s"] / peak["peak_gflops"]
    columns = ["system", "batch", "img_per_s", "vs_lucidrains", "vs_bare", "train_GFLOP_per_s", "percent_of_peak"]
    print(f"\nTraining speed, {info}; app overrides: {' '.join(overrides) or '(none)'}")
    print(f"Peak ({peak['dtype']}): conv2d {peak['conv2d_gflops']:.0f} GFLOP/s, matmul {peak['matmul_gflops']:.0f}")
    print(table(rows, columns))
    write_json(args.out, {"machine": info, "args": {**vars(args), "work": str(args.work), "out": str(args.out)},
                          "overrides": overrides, "peak": peak, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
