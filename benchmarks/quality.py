"""Sample quality at equal compute: this project (through train.py and sample.py) against lucidrains'
denoising-diffusion-pytorch (or, with ``--peer rectified_flow``, his rectified-flow-pytorch) in a plain loop, on
Fashion-MNIST, scored on the features of a small classifier.

    python benchmarks/quality.py --device cuda --seconds 150                  # one GPU command, both systems
    python benchmarks/quality.py --device cuda --steps 2000                   # equal steps instead of equal time
    python benchmarks/quality.py --device cpu --seconds 1200 --samples 1000   # each system on its own pinned core
    python benchmarks/quality.py --seconds 30 --samples 200 -- model=tiny     # a smoke run (after --: train.py's)
    python benchmarks/quality.py --device cpu --seconds 1200 --samples 1000 --peer rectified_flow -- diffusion=flow

Both systems train on the Fashion-MNIST files of Debian's ``dataset-fashion-mnist`` at batch 128 (``--batch``), each
at its own learning rate (this project's for ``experiment=fashion``, lucidrains' ``Trainer`` default, 1e-4, read from
the library): on a GPU one after the other, on a CPU both at once, each
pinned to one core with one thread. The time budget counts from the start of each training process, so
compilation and start-up count as they do for a user. lucidrains' library runs with its own defaults
(``Unet(dim=64, dim_mults=(1, 2, 4))``, or dim 32 on a CPU, v-prediction, sigmoid schedule, Adam at its Trainer's lr
and betas (0.9, 0.99),
clipping at 1, ``EMA(beta=0.995, update_every=10)``) at 28x28; this project with ``experiment=fashion`` and any
overrides given.

rectified-flow-pytorch runs as its README trains it: ``RectifiedFlow(Unet(...))`` (velocity prediction, uniform
times, MSE) with its ``Trainer``'s defaults (Adam at lr 3e-4, clipping at 0.5, ema-pytorch's ``EMA`` with its
defaults, updated every step), the same Unet layout as above, and it samples with its own ODE solve (torchdiffeq's
midpoint over 16 times, 30 evaluations; ``--fast``: 11 times, 20 evaluations).

Each system then draws ``--samples`` images with DDIM-50 from seed 0 (this project's images do not depend on the batch
size; lucidrains' are drawn in fixed batches from a seeded global generator), and with ``--fast`` also with its best
20-step sampler: this project's default, DPM-Solver++(2M) at 20 steps, and lucidrains' DDIM at 20. They are
scored at 28x28 against the Fashion-MNIST test set on the penultimate features of a classifier that this script
trains once, seeded, and keeps in ``--cache`` (so the cache can travel to a GPU machine):
FID and KID (torchmetrics), precision and recall (Kynkaenniemi et al. 2019, k = 3), the class histogram of the
samples, and the noise of each FID (the FIDs of two disjoint halves of the samples). The same scores for real
held-out images (half of the test set against the other half) are the floor. It writes ``--out`` (JSON) and a PNG
of both systems' first 64 samples side by side.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import ROOT, launch, sample_command, train_hparams, write_json
from scoring import at_28, classifier, fashion, npz_images, scores

from diffusion.outputs.writers import grid_image, write_png

LR = train_hparams("experiment=fashion")["optimizer"]["lr"]  # this project's, for experiment=fashion


def lucidrains_default(name: str, peer: str = "denoising_diffusion"):
    """A default of the peer's own ``Trainer`` (denoising-diffusion-pytorch's: train_lr 1e-4, adam_betas (0.9,
    0.99); rectified-flow-pytorch's: learning_rate 3e-4, max_grad_norm 0.5), read from the installed library so that
    the peer runs as its users run it, not with this project's settings."""
    import inspect

    if peer == "rectified_flow":
        from rectified_flow_pytorch import Trainer
    else:
        from denoising_diffusion_pytorch import Trainer

    return inspect.signature(Trainer.__init__).parameters[name].default


# ---------------------------------------------------------------- the two systems


def train_ours(args: argparse.Namespace, run: Path, overrides: list[str]) -> list[str]:
    """The command that trains this project, as a user runs it."""
    budget = (
        [f"+trainer.max_time=00:00:{args.seconds // 60:02d}:{args.seconds % 60:02d}", "trainer.max_steps=10000000"]
        if args.steps is None
        else [f"trainer.max_steps={args.steps}"]
    )
    return [
        sys.executable, str(ROOT / "train.py"), "experiment=fashion", f"dataset.root={run / 'data'}",
        "dataset.download=false", f"dataset.batch_size={args.batch}", f"optimizer.lr={LR}",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        *(["trainer=gpu"] if args.device == "cuda" else []), *budget, *overrides, f"hydra.run.dir={run}",
    ]  # fmt: skip


def sample_ours(args: argparse.Namespace, run: Path, fast: bool = False) -> list[str]:
    """sample.py's DDIM-50, or (``fast``) its default sampler, DPM-Solver++ at 20 steps."""
    sampler = ["sampler=dpm_solver", "sampler.steps=20"] if fast else ["sampler=ddim", "sampler.steps=50"]
    out = run / ("samples_fast" if fast else "samples_ddim50")
    return sample_command(run / "checkpoints" / "last.ckpt", out, args.device, args.samples, sampler)


def drawn_in_batches(sample: Callable[[int], torch.Tensor], samples: int, batch: int) -> torch.Tensor:
    """A peer's ``samples`` images in [0, 1], drawn ``batch`` at a time from the seeded global generator, as uint8."""
    torch.manual_seed(0)
    with torch.inference_mode():
        drawn = [sample(min(batch, samples - s)) for s in range(0, samples, batch)]
    return (torch.cat(drawn).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def train_for_budget(
    args: argparse.Namespace, start: float, model: torch.nn.Module, optimizer, ema, clip: float, images: torch.Tensor
) -> tuple[int, float]:
    """A peer's plain loop, as its Trainer steps (loss, backward, clipping at ``clip``, Adam, EMA), on random batches
    of ``images``, until the budget (seconds since ``start``, or steps) is spent; bf16 autocast on a GPU. Returns the
    steps made and the seconds since ``start``."""
    device = torch.device(args.device)
    images = images.to(device)
    steps = 0
    while (time.perf_counter() - start < args.seconds) if args.steps is None else steps < args.steps:
        batch = images[torch.randint(0, len(images), (args.batch,), device=device)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        ema.update()
        steps += 1
    return steps, time.perf_counter() - start


def lucidrains_worker(args: argparse.Namespace) -> None:
    """Trains lucidrains' model in a plain loop for the budget, then draws the samples (a subprocess)."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA

    start = time.perf_counter()
    device = torch.device(args.device)
    run = Path(args.worker_dir)
    images = fashion(run / "data")[0].float().div(255)  # [0, 1]: the library normalises itself
    torch.manual_seed(0)
    model = Unet(dim=args.lucidrains_dim, dim_mults=(1, 2, 4), channels=1)
    diffusion = GaussianDiffusion(model, image_size=28, timesteps=1000, sampling_timesteps=50).to(device)
    ema = EMA(diffusion, beta=0.995, update_every=10).to(device)
    optimizer = torch.optim.Adam(
        diffusion.parameters(), lr=lucidrains_default("train_lr"), betas=lucidrains_default("adam_betas")
    )
    steps, trained = train_for_budget(args, start, diffusion, optimizer, ema, 1.0, images)
    batch = 500 if device.type == "cuda" else 100

    def draw(sampling_steps: int) -> torch.Tensor:
        """Its DDIM at ``sampling_timesteps`` steps (the library reads the attribute when it samples)."""
        ema.ema_model.sampling_timesteps = sampling_steps
        return drawn_in_batches(lambda size: ema.ema_model.sample(batch_size=size), args.samples, batch)

    result = {"images": draw(50), "steps": steps, "seconds": trained}
    if args.fast:
        result["fast_images"] = draw(20)
    torch.save(result, run / "samples.pt")


def rectified_flow_worker(args: argparse.Namespace) -> None:
    """Trains lucidrains' rectified flow as its Trainer does (one step: loss, backward, clipping, Adam, EMA) in a
    plain loop for the budget, then draws the samples with the EMA model's own ODE solve (a subprocess)."""
    from ema_pytorch import EMA
    from rectified_flow_pytorch import RectifiedFlow, Unet

    start = time.perf_counter()
    device = torch.device(args.device)
    run = Path(args.worker_dir)
    images = fashion(run / "data")[0].float().div(255)  # [0, 1]: the library normalises itself
    torch.manual_seed(0)
    flow = RectifiedFlow(Unet(dim=args.lucidrains_dim, dim_mults=(1, 2, 4), channels=1)).to(device)
    ema = EMA(flow, forward_method_names=("sample",)).to(device)  # the Trainer's, with its defaults
    optimizer = torch.optim.Adam(flow.parameters(), lr=lucidrains_default("learning_rate", "rectified_flow"))
    clip = lucidrains_default("max_grad_norm", "rectified_flow")
    steps, trained = train_for_budget(args, start, flow, optimizer, ema, clip, images)
    batch = 500 if device.type == "cuda" else 100

    def draw(times: int) -> torch.Tensor:
        return drawn_in_batches(
            lambda size: ema.sample(batch_size=size, steps=times, data_shape=(1, 28, 28)), args.samples, batch
        )

    result = {"images": draw(16), "steps": steps, "seconds": trained}  # its default: 16 times, 30 evaluations
    if args.fast:
        result["fast_images"] = draw(11)  # 20 evaluations
    torch.save(result, run / "samples.pt")


def finish(process: subprocess.Popen, what: str, log: Path) -> None:
    if process.wait() != 0:
        raise SystemExit(f"{what} failed; its output is in {log}:\n{log.read_text()[-3000:]}")


def run_pair(args: argparse.Namespace, overrides: list[str]) -> dict:
    """Trains and samples both systems; returns their uint8 images and training figures."""
    work = args.work
    ours, theirs = work / "ours", work / "lucidrains"
    for folder in (ours, theirs):
        folder.mkdir(parents=True, exist_ok=True)
    for stale in ("checkpoints", "samples_ddim50", "samples_fast", "tensorboard", "samples"):
        stale = ours / stale
        shutil.rmtree(stale, ignore_errors=True)  # an earlier run's results (the data stays)
    worker = [sys.executable, __file__, "--worker-dir", str(theirs), "--device", args.device]
    worker += ["--batch", str(args.batch), "--samples", str(args.samples), "--seconds", str(args.seconds)]
    worker += ["--lucidrains-dim", str(args.lucidrains_dim), "--peer", args.peer]
    worker += ["--steps", str(args.steps)] if args.steps else []
    worker += ["--fast"] if args.fast else []
    cpu = args.device == "cpu"
    started = time.perf_counter()
    a = launch(train_ours(args, ours, overrides), 0 if cpu else None, work / "ours_train.log")
    if not cpu:
        finish(a, "train.py", work / "ours_train.log")
    b = launch(worker, 1 if cpu else None, work / "lucidrains.log")
    if cpu:
        finish(a, "train.py", work / "ours_train.log")
    sampling = launch(sample_ours(args, ours), 0 if cpu else None, work / "ours_sample.log")
    finish(sampling, "sample.py", work / "ours_sample.log")
    if args.fast:
        sampling = launch(sample_ours(args, ours, fast=True), 0 if cpu else None, work / "ours_sample_fast.log")
        finish(sampling, "sample.py", work / "ours_sample_fast.log")
    finish(b, "lucidrains", work / "lucidrains.log")
    state = torch.load(ours / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    other = torch.load(theirs / "samples.pt", weights_only=True)
    results = {
        "ours": {"images": npz_images(ours / "samples_ddim50" / "samples.npz"), "steps": state["global_step"]},
        "lucidrains": {"images": other["images"], "steps": other["steps"], "train_seconds": other["seconds"]},
    }
    if args.fast:
        results["ours_fast"] = {"images": npz_images(ours / "samples_fast" / "samples.npz"), "sampler": "DPM++ 20"}
        peer_fast = "midpoint, 11 times (20 NFE)" if args.peer == "rectified_flow" else "DDIM-20"
        results["lucidrains_fast"] = {"images": other["fast_images"], "sampler": peer_fast}
    # what our run trained with, overrides included (the preset's lr unless one was given after --)
    return {"systems": results, "wall_seconds": time.perf_counter() - started, "hparams": state["hyper_parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=int, default=150, help="equal wall-clock budget per system")
    parser.add_argument("--steps", type=int, default=None, help="equal steps instead of equal time")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lucidrains-dim", type=int, default=None, help="its Unet's dim; default 64 (GPU), 32 (CPU)")
    parser.add_argument("--peer", choices=["denoising_diffusion", "rectified_flow"], default="denoising_diffusion")
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "cache")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "quality")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json")
    parser.add_argument("--fast", action="store_true", help="also each system's best 20-step sampler")
    parser.add_argument("--worker-dir", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    args.lucidrains_dim = args.lucidrains_dim or (64 if args.device == "cuda" else 32)
    if args.worker_dir:
        return rectified_flow_worker(args) if args.peer == "rectified_flow" else lucidrains_worker(args)
    device = torch.device(args.device)
    data_root = args.work / "ours" / "data"
    data = fashion(data_root)
    net, accuracy = classifier(args.cache, data, device)
    print(f"classifier test accuracy: {accuracy:.4f}", flush=True)
    run = run_pair(args, overrides)
    results = run["systems"]
    test = data[2]
    reference, held_out = test[: len(test) // 2], test[len(test) // 2 :][: args.samples]
    peer_lr = "learning_rate" if args.peer == "rectified_flow" else "train_lr"
    report = {
        "device": args.device,
        "budget": {"seconds": args.seconds} if args.steps is None else {"steps": args.steps},
        "batch": args.batch,
        "lucidrains_dim": args.lucidrains_dim,
        "peer": args.peer,
        "lr": {"ours": run["hparams"]["optimizer"]["lr"], "lucidrains": lucidrains_default(peer_lr, args.peer)},
        "diffusion": run["hparams"]["diffusion"],
        "samples": args.samples,
        "overrides": overrides,
        "classifier_test_accuracy": accuracy,
        "real_floor": scores(net, held_out, reference, device),
        "wall_seconds": run["wall_seconds"],
    }
    for name, result in results.items():
        result["images"] = at_28(result["images"])
        report[name] = {**scores(net, result["images"], reference, device)}
        report[name].update({k: v for k, v in result.items() if k in ("steps", "sampler")})
    report["fid_ratio_ours_over_lucidrains"] = report["ours"]["fid"] / report["lucidrains"]["fid"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    side = [grid_image(results[name]["images"][:64]) for name in ("ours", "lucidrains")]
    gap = np.full((side[0].shape[0], 16, 3), 255, dtype=np.uint8)
    write_png(np.concatenate([side[0], gap, side[1]], axis=1), args.out.with_suffix(".png"))
    if args.fast:
        report["fast_fid_ratio_ours_over_lucidrains"] = report["ours_fast"]["fid"] / report["lucidrains_fast"]["fid"]
        write_json(args.out, report)
    for name in ("real_floor", *results):
        r = report[name]
        print(
            f"{name:>15}: FID {r['fid']:8.3f} (halves {r['fid_halves'][0]:.3f}, {r['fid_halves'][1]:.3f}) "
            f"KID {r['kid']:.4f} precision {r['precision']:.3f} recall {r['recall']:.3f}"
            + (f" steps {r['steps']}" if "steps" in r else "")
        )
    print(f"FID ours / lucidrains: {report['fid_ratio_ours_over_lucidrains']:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
