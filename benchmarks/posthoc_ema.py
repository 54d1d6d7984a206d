"""Post-hoc EMA on Fashion-MNIST (issue 24): one training run with snapshots, then FID against the EMA length.

    python benchmarks/posthoc_ema.py --device cpu --steps 1289 --batch 64 --samples 1000 --every 2560 --jobs 2 \\
        --lengths 0.02,0.03,0.05,0.07,0.10,0.13,0.17,0.22 -- model=tiny dataset.image_size=28 \\
        optimizer.lr_schedule=constant

Trains ``train.py experiment=fashion`` at ``--batch`` and quality.py's learning rate for ``--steps`` steps with
``callbacks.posthoc_ema.every_n_images=--every`` and the overrides after ``--``, then draws ``--samples`` DDIM-50
images from seed 0 with every ``ema_length`` of ``--lengths`` (``sample.py ema_length=...``), with the run's own
EMA (``callbacks.ema``) and with the raw weights, all from the same checkpoint, and scores them on quality.py's
cached classifier against the Fashion-MNIST test set. Also times the post-hoc EMA's update and snapshot for this
network, and measures the snapshots' disk. ``--reuse`` samples a run trained before under ``--work`` again (its
training time then from its run folder's first and last files). Writes a JSON and a PNG plot of FID against the
EMA length.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import ROOT, run_jobs, sample_command, train_hparams, write_json
from omegaconf import OmegaConf
from scoring import at_28, classifier, fashion, npz_images, scores

from diffusion.models.posthoc_ema import snapshot_paths
from diffusion.training.module import DiffusionModule
from diffusion.training.posthoc_ema import PostHocEMA

LR = train_hparams("experiment=fashion")["optimizer"]["lr"]  # quality.py's


def exponential_sigma_rel(half_life: float, rampup: float | None, images: float) -> float:
    """The relative standard deviation of the run's own EMA at the end: an exponential average of half-life h
    (capped by the warm-up at rampup x images) weighs age a by exp(-a ln2 / h), whose standard deviation is its mean
    h / ln 2; relative to the training time."""
    h = half_life if rampup is None else min(half_life, rampup * images)
    return h / 0.6931471805599453 / images


def update_cost(overrides: list[str], every: int, repeats: int = 30) -> dict[str, float]:
    """Median seconds of the callback's update (two tracked lengths) and of one snapshot, for this network."""
    from types import SimpleNamespace

    module = DiffusionModule(**train_hparams("experiment=fashion", *overrides))
    callback = PostHocEMA(
        sigma_rels=[0.05, 0.10], every_n_images=10**12, dirpath=ROOT / ".posthoc_timing", dtype="float16"
    )
    callback.on_train_start(None, module)
    batch = (torch.zeros(64, 1),)
    times = []
    for step in range(1, repeats + 1):
        trainer = SimpleNamespace(global_step=step, world_size=1, accumulate_grad_batches=1, is_global_zero=True)
        start = time.perf_counter()
        callback.on_train_batch_end(trainer, module, None, batch, step - 1)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    callback._write_snapshot(0)
    snapshot = time.perf_counter() - start
    for path in snapshot_paths(ROOT / ".posthoc_timing"):
        path.unlink()
    (ROOT / ".posthoc_timing").rmdir()
    return {"update_seconds": statistics.median(times), "snapshot_seconds": snapshot,
            "parameters": sum(p.numel() for p in module.parameters())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=1289)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--every", type=int, default=2560, help="training images between snapshots")
    parser.add_argument("--lengths", default="0.02,0.03,0.05,0.07,0.10,0.13,0.17,0.22")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--first-core", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="sample the run already trained under --work again")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "cache")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "posthoc_ema")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "posthoc_ema.json")
    args, shared = parser.parse_known_args()
    shared = [o for o in shared if o != "--"]
    lengths = [float(s) for s in args.lengths.split(",")]
    device = torch.device(args.device)
    data = fashion(args.work / "data")
    net, accuracy = classifier(args.cache, data, device)
    run = args.work / "run"
    on = ["trainer=gpu"] if args.device == "cuda" else ["trainer.accelerator=cpu"]
    train = [
        sys.executable, str(ROOT / "train.py"), "experiment=fashion", *on, f"dataset.batch_size={args.batch}",
        f"optimizer.lr={LR}", f"trainer.max_steps={args.steps}", "dataset.download=false",
        f"callbacks.posthoc_ema.every_n_images={args.every}", *shared, f"hydra.run.dir={run}",
    ]  # fmt: skip
    ckpt = run / "checkpoints" / "last.ckpt"
    started = time.perf_counter()
    if args.reuse and ckpt.is_file():  # trained before: its time from the run folder's first and last files
        train_seconds = ckpt.stat().st_mtime - (run / ".hydra" / "config.yaml").stat().st_mtime
    else:
        run_jobs({"train": [train]}, 1, args.device == "cpu", args.work, args.first_core)
        train_seconds = time.perf_counter() - started
    ddim = ["sampler=ddim", "sampler.steps=50"]
    arms = {f"length_{s:g}": [f"ema_length={s}"] for s in lengths} | {"run_ema": [], "raw": ["ema=false"]}
    jobs = {
        name: [sample_command(ckpt, args.work / name, args.device, args.samples, ddim + o)] for name, o in arms.items()
    }
    run_jobs(jobs, args.jobs, args.device == "cpu", args.work, args.first_core)
    reference = data[2][: len(data[2]) // 2]
    images_seen = args.steps * args.batch
    ema = OmegaConf.load(run / ".hydra" / "config.yaml").callbacks.get("ema")  # the run's own EMA, as it ran
    snapshots = snapshot_paths(run / "ema_snapshots")
    report = {
        "device": args.device, "steps": args.steps, "batch": args.batch, "lr": LR, "samples": args.samples,
        "sampler": "DDIM-50", "every_n_images": args.every, "shared_overrides": shared,
        "classifier_test_accuracy": accuracy, "train_seconds": train_seconds,
        "snapshots": len(snapshots), "snapshot_bytes": sum(p.stat().st_size for p in snapshots),
        "checkpoint_bytes": ckpt.stat().st_size, **update_cost(shared, args.every), "arms": {},
    }  # fmt: skip
    report["seconds_per_step"] = train_seconds / args.steps
    if ema is not None:
        report["run_ema_sigma_rel"] = exponential_sigma_rel(ema["half_life_images"], ema["rampup_ratio"], images_seen)
    for name, overrides in arms.items():
        images = at_28(npz_images(args.work / name / "samples.npz"))
        r = report["arms"][name] = {"overrides": overrides, **scores(net, images, reference, device)}
        print(f"{name:>14}: FID {r['fid']:7.2f} (halves {r['fid_halves'][0]:.1f}, {r['fid_halves'][1]:.1f}) "
              f"precision {r['precision']:.3f} recall {r['recall']:.3f}", flush=True)  # fmt: skip
    write_json(args.out, report)
    plot(report, lengths, args.out.with_suffix(".png"))


def plot(report: dict, lengths: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = report["arms"]
    fids = [arms[f"length_{s:g}"]["fid"] for s in lengths]
    halves = [arms[f"length_{s:g}"]["fid_halves"] for s in lengths]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(lengths, fids, "o-", label="post-hoc EMA, reconstructed")
    ax.vlines(
        lengths, [min(h) for h in halves], [max(h) for h in halves], color="C0", alpha=0.4, label="FID of each half"
    )
    run_ema = arms["run_ema"]["fid"]
    label = "the run's EMA (callbacks.ema)"
    if "run_ema_sigma_rel" in report:
        ax.plot(
            [report["run_ema_sigma_rel"]],
            [run_ema],
            "s",
            color="C1",
            label=f"{label}, sigma_rel ~ {report['run_ema_sigma_rel']:.3f}",
        )
    ax.axhline(run_ema, color="C1", lw=0.8, ls="--")
    ax.plot([], [], " ", label=f"raw weights: FID {arms['raw']['fid']:.1f}")  # off the scale: in the legend only
    ax.set_xscale("log")
    ax.set_xlabel("EMA length sigma_rel")
    ax.set_ylabel(f"FID ({report['samples']} samples, DDIM-50)")
    ax.set_title(f"Fashion-MNIST, {report['steps']} steps of {report['batch']}, one run")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
