"""Sample quality of one checkpoint under several sampler settings ("arms"), scored like benchmarks/quality.py.

    python benchmarks/sampler_quality.py --ckpt benchmarks/work/quality/ours/checkpoints/last.ckpt --device cpu \
        --samples 1000 --jobs 2 --out benchmarks/results/sampler_quality_cpu.json
    python benchmarks/sampler_quality.py --ckpt ... --device cuda --arms ddim50_quadratic dpm20_quadratic ddim250

Each arm is ``sample.py`` run as a user runs it (seed 0, so every arm starts from the same noise), with the
overrides of ``ARMS``; its images are scored at 28x28 against the Fashion-MNIST test set on the cached classifier of
benchmarks/quality.py: FID, KID, precision, recall, the class histogram and the FIDs of the two halves (the noise of
the FID). The arms look at what issue 17 names for the speckled outliers: the timestep spacing of DDIM and
DPM-Solver++, x0 clipping against dynamic thresholding and none, the final step (``trailing`` spacing ends with a
network evaluation at t = T/steps - 1 rather than at 0), the EMA against the raw weights, and DDIM-250 as the
reference for the 20-step samplers. On a CPU, ``--jobs`` arms run at once, each pinned to its own core with one
thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import ROOT, run_jobs, sample_command, write_json
from scoring import at_28, classifier, fashion, npz_images, scores

ARMS = {
    # DDIM (eta 0) at 50 steps: the spacings, then clipping with the quadratic spacing (the default was quadratic when
    # these arms were first run; configs/sampler/ddim.yaml now spaces uniformly)
    "ddim50_quadratic": ["sampler=ddim", "sampler.steps=50", "sampler.spacing=quadratic"],
    "ddim50_uniform": ["sampler=ddim", "sampler.steps=50", "sampler.spacing=uniform"],
    "ddim50_trailing": ["sampler=ddim", "sampler.steps=50", "sampler.spacing=trailing"],
    "ddim50_quadratic_noclip": ["sampler=ddim", "sampler.steps=50", "sampler.spacing=quadratic", "clip_x0=false"],
    "ddim50_quadratic_dynamic": [
        "sampler=ddim", "sampler.steps=50", "sampler.spacing=quadratic", "dynamic_threshold=0.995",
    ],
    "ddim50_quadratic_raw": ["sampler=ddim", "sampler.steps=50", "sampler.spacing=quadratic", "ema=false"],
    # DPM-Solver++(2M) at 20 steps
    "dpm20_quadratic": ["sampler=dpm_solver", "sampler.steps=20", "sampler.spacing=quadratic"],
    "dpm20_logsnr": ["sampler=dpm_solver", "sampler.steps=20", "sampler.spacing=logsnr"],
    "dpm20_uniform": ["sampler=dpm_solver", "sampler.steps=20", "sampler.spacing=uniform"],
    "dpm20_trailing": ["sampler=dpm_solver", "sampler.steps=20", "sampler.spacing=trailing"],
    "dpm20_quadratic_dynamic": [
        "sampler=dpm_solver", "sampler.steps=20", "sampler.spacing=quadratic", "dynamic_threshold=0.995",
    ],
    # EDM's Heun sampler (configs/sampler/heun.yaml): 2N - 1 network evaluations; 18 steps are the paper's 35
    "heun10": ["sampler=heun", "sampler.steps=10"],
    "heun18": ["sampler=heun", "sampler.steps=18"],
    "heun32": ["sampler=heun", "sampler.steps=32"],
    # the reference for the 20-step samplers (issue 17: within 10% of DDIM-250's FID)
    "ddim250": ["sampler=ddim", "sampler.steps=250", "sampler.spacing=quadratic"],
}  # fmt: skip
SLOW = ("ddim250", "heun10", "heun18", "heun32")  # on a CPU: ask for them by name
DEFAULT_ARMS = [name for name in ARMS if name not in SLOW]


def run_arms(args: argparse.Namespace) -> dict[str, dict]:
    """Runs the arms, ``--jobs`` at a time; returns each arm's sample.py results.json."""
    jobs = {
        arm: [sample_command(args.ckpt, args.work / arm, args.device, args.samples, ARMS[arm])] for arm in args.arms
    }
    run_jobs(jobs, args.jobs, args.device == "cpu", args.work, args.first_core)
    return {arm: json.loads((args.work / arm / "results.json").read_text()) for arm in args.arms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=DEFAULT_ARMS)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--jobs", type=int, default=1, help="arms at once (on a CPU: one pinned core each)")
    parser.add_argument("--first-core", type=int, default=0, help="on a CPU, the jobs' cores start here")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "cache")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "sampler_quality")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sampler_quality.json")
    args = parser.parse_args()
    args.ckpt = args.ckpt.resolve()
    device = torch.device(args.device)
    data = fashion(args.work / "data")
    net, accuracy = classifier(args.cache, data, device)
    started = time.perf_counter()
    results = run_arms(args)
    test = data[2]
    reference = test[: len(test) // 2]
    state = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    report = {
        "ckpt": str(args.ckpt),
        "global_step": state["global_step"],
        "device": args.device,
        "samples": args.samples,
        "jobs": args.jobs,
        "classifier_test_accuracy": accuracy,
        "wall_seconds": None,
        "arms": {},
    }
    for arm in args.arms:
        images = at_28(npz_images(args.work / arm / "samples.npz"))
        sample = results[arm]
        report["arms"][arm] = {
            "overrides": ARMS[arm],
            **scores(net, images, reference, device),
            "nfe": sample["nfe"],
            "sampling_seconds": sample["seconds"],
        }
        r = report["arms"][arm]
        print(
            f"{arm:>26}: FID {r['fid']:8.3f} (halves {r['fid_halves'][0]:.1f}, {r['fid_halves'][1]:.1f}) "
            f"KID {r['kid']:8.3f} precision {r['precision']:.3f} recall {r['recall']:.3f} NFE {r['nfe']:g}",
            flush=True,
        )
    report["wall_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
