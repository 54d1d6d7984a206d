"""Training ablations at equal steps (or, with ``--seconds``, equal time) on Fashion-MNIST, scored like
benchmarks/quality.py (issue 17).

    python benchmarks/ablation.py --device cpu --steps 1289 --batch 64 --jobs 2 \\
        --arm v_cosine_minsnr "diffusion=v_prediction" --arm v_linear "diffusion.target=v" \\
        -- model=tiny dataset.image_size=28 optimizer.lr_schedule=constant
    python benchmarks/ablation.py --device cuda --steps 2000 --jobs 4 --arm base "" --arm no_dropout "model.dropout=0"
    python benchmarks/ablation.py --device cpu --seconds 1200 --batch 128 --jobs 2 \\
        --arm unet_v "model=tiny" --arm edm2 "model=edm2_tiny diffusion=edm optimizer=edm2 optimizer.lr=1e-2" \\
        -- dataset.image_size=28

Each arm is ``train.py experiment=fashion`` at ``--batch`` and quality.py's learning rate, for ``--steps`` steps,
with the shared overrides (after ``--``) and then the arm's own (a space-separated string; an arm that sets its own
learning rate gives ``optimizer.lr`` after its ``optimizer=...``), followed by
``sample.py`` drawing ``--samples`` DDIM-50 images (``--spacing``) from seed 0, and as many with each of
``--samplers`` (arms of benchmarks/sampler_quality.py, e.g. ``heun18 dpm20_logsnr``); the images are scored on
quality.py's cached classifier against the Fashion-MNIST test set (a flow model's DDIM-50 is Euler-50, the same step
in exact arithmetic: configs/sampler/euler.yaml). ``--jobs`` arms run at once as separate
processes (on a CPU, each on its own core with one thread; on a GPU, sharing it). Writes one JSON of every arm's scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import ROOT, run_jobs, sample_command, train_hparams, write_json
from sampler_quality import ARMS as SAMPLERS
from scoring import at_28, classifier, fashion, npz_images, scores

LR = train_hparams("experiment=fashion")["optimizer"]["lr"]  # quality.py's, for both systems


def job(args: argparse.Namespace, name: str, arm: list[str], shared: list[str]) -> list[list[str]]:
    run = args.work / name
    device = ["trainer=gpu"] if args.device == "cuda" else ["trainer.accelerator=cpu"]
    if args.seconds is None:
        budget = [f"trainer.max_steps={args.steps}"]
    else:  # as quality.py: the budget counts from the start of the process, start-up and validation included
        budget = [
            f"+trainer.max_time=00:00:{args.seconds // 60:02d}:{args.seconds % 60:02d}",
            "trainer.max_steps=10000000",
        ]
    train = [
        sys.executable, str(ROOT / "train.py"), "experiment=fashion", *device, f"dataset.batch_size={args.batch}",
        f"optimizer.lr={LR}", *budget, "dataset.download=false",
        *shared, *arm, f"hydra.run.dir={run}",
    ]  # fmt: skip
    ddim = ["sampler=ddim", "sampler.steps=50", f"sampler.spacing={args.spacing}"]
    ckpt = run / "checkpoints" / "last.ckpt"
    return [
        train,
        sample_command(ckpt, run / "samples_ddim50", args.device, args.samples, ddim),
        *(sample_command(ckpt, run / f"samples_{s}", args.device, args.samples, SAMPLERS[s]) for s in args.samplers),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arm", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), required=True)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=None, help="equal training time per arm instead of --steps")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--spacing", default="uniform", help="DDIM-50's timestep spacing (configs/sampler/ddim.yaml's)")
    parser.add_argument("--samplers", nargs="*", choices=list(SAMPLERS), default=[], help="also these, after DDIM-50")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--first-core", type=int, default=0, help="on a CPU, the jobs' cores start here")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "cache")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "ablation")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ablation.json")
    args, shared = parser.parse_known_args()
    shared = [o for o in shared if o != "--"]
    arms = {name: overrides.split() for name, overrides in args.arm}
    device = torch.device(args.device)
    data = fashion(args.work / "data")
    net, accuracy = classifier(args.cache, data, device)
    started = time.perf_counter()
    jobs = {name: job(args, name, arm, shared) for name, arm in arms.items()}
    run_jobs(jobs, args.jobs, args.device == "cpu", args.work, args.first_core)
    reference = data[2][: len(data[2]) // 2]
    report = {
        "device": args.device,
        "steps": args.steps if args.seconds is None else None,
        "seconds": args.seconds,
        "batch": args.batch,
        "lr": LR,
        "samples": args.samples,
        "sampler": f"DDIM-50, {args.spacing} spacing",
        "samplers": {s: SAMPLERS[s] for s in args.samplers},
        "jobs": args.jobs,
        "shared_overrides": shared,
        "classifier_test_accuracy": accuracy,
        "wall_seconds": time.perf_counter() - started,
        "arms": {},
    }
    for name, arm in arms.items():
        images = at_28(npz_images(args.work / name / "samples_ddim50" / "samples.npz"))
        state = torch.load(args.work / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        r = report["arms"][name] = {
            "overrides": arm,
            "steps": state["global_step"],
            **scores(net, images, reference, device),
        }
        print(
            f"{name:>20}: FID {r['fid']:8.3f} (halves {r['fid_halves'][0]:.1f}, {r['fid_halves'][1]:.1f}) "
            f"KID {r['kid']:8.3f} precision {r['precision']:.3f} recall {r['recall']:.3f} steps {r['steps']}",
            flush=True,
        )
        for s in args.samplers:
            results = json.loads((args.work / name / f"samples_{s}" / "results.json").read_text())
            images = at_28(npz_images(args.work / name / f"samples_{s}" / "samples.npz"))
            r.setdefault("by_sampler", {})[s] = {"nfe": results["nfe"], **scores(net, images, reference, device)}
            print(f"{'':>20}  {s}: FID {r['by_sampler'][s]['fid']:8.3f} ({results['nfe']} NFE)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
