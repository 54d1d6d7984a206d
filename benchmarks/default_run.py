"""The default run (``python train.py``, the embedded digits): its time and its samples' quality, for versions and
variants side by side (issue 22).

    python benchmarks/default_run.py --arm today 40f5273 "" --arm now . ""          # one after the other, 2 cores
    python benchmarks/default_run.py --pin --jobs 2 --arm ddpm_800 . "trainer.max_steps=800" \\
        --arm v_800 . "diffusion=v_prediction trainer.max_steps=800"                   # variants, a core each

Each arm is ``python train.py OVERRIDES`` run from a checkout of COMMIT (``.``: this one; another commit is
checked out with ``git worktree`` under ``--work``), timed from its start to its exit as the user waits for it
(start-up, previews and the final checkpoint included). Then that checkout's ``sample.py`` draws ``--samples``
images from seed 0 with its own default sampler and with DDIM-50 (or with each ``--sampler NAME OVERRIDES``;
``--reuse`` samples runs already trained under ``--work`` again, untimed), and the images are scored at 28x28 on the
features of a small classifier trained once on the digits (``scoring.digits``; cached in ``--cache``) against all
1,797 digits at the run's 16x16, which the runs train on (there is no test set): FID, KID, precision, recall and
the FIDs of two halves. Half of the digits against the other half is the floor. Without ``--pin`` the arms run one
after the other on the whole machine, as a newcomer runs them; with it, ``--jobs`` at a time, each on one core
with one thread (a fair comparison of quality; the times are then one core's).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import ROOT, launch, write_json
from scoring import at_28, classifier, digits, npz_images, scores


def checkout(commit: str, work: Path) -> Path:
    """This checkout for ``.``, else a detached worktree of ``commit`` under ``work``."""
    if commit == ".":
        return ROOT
    tree = work / f"src_{commit}"
    if not tree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True)
    return tree


SAMPLERS = {"default": [], "ddim50": ["sampler=ddim", "sampler.steps=50"]}  # each checkout's default, and DDIM-50


def commands(
    source: Path, run: Path, overrides: list[str], samples: int, samplers: dict[str, list[str]]
) -> dict[str, list[str]]:
    ckpt = run / "checkpoints" / "last.ckpt"
    sample = [sys.executable, str(source / "sample.py"), f"ckpt={ckpt}", f"n={samples}", "batch_size=100", "seed=0",
              "device=cpu", "overwrite=true"]  # fmt: skip
    jobs = {"train": [sys.executable, str(source / "train.py"), *overrides, f"hydra.run.dir={run}"]}
    return jobs | {name: [*sample, *o, f"out_dir={run / f'samples_{name}'}"] for name, o in samplers.items()}


def run_arm(name: str, jobs: dict[str, list[str]], core: int | None, logs: Path, reuse: bool) -> dict:
    """Trains (timed) then samples, in one process slot; returns the training's wall time and its last step. With
    ``reuse``, a run already trained under ``logs`` is only sampled again."""
    samplers = [key for key in jobs if key != "train"]
    if reuse and (logs / name / "checkpoints" / "last.ckpt").is_file():
        for key in samplers:
            if launch(jobs[key], core, logs / f"{name}_{key}.log").wait() != 0:
                raise SystemExit(f"{name}'s {key} sampling failed:\n{(logs / f'{name}_{key}.log').read_text()[-3000:]}")
        return {"train_seconds": None, "steps": None}
    started = time.perf_counter()
    process = launch(jobs["train"], core, logs / f"{name}_train.log")
    process.wait()
    seconds = time.perf_counter() - started
    log = (logs / f"{name}_train.log").read_text()
    if process.returncode != 0:
        raise SystemExit(f"{name}'s training failed:\n{log[-3000:]}")
    step = re.findall(r"Training finished at step (\d+)", log)
    for key in samplers:
        sampler = launch(jobs[key], core, logs / f"{name}_{key}.log")
        if sampler.wait() != 0:
            raise SystemExit(f"{name}'s {key} sampling failed:\n{(logs / f'{name}_{key}.log').read_text()[-3000:]}")
    return {"train_seconds": seconds, "steps": int(step[-1]) if step else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", nargs=3, action="append", metavar=("NAME", "COMMIT", "OVERRIDES"), required=True)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--pin", action="store_true", help="each arm on its own core with one thread, --jobs at once")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument(
        "--sampler",
        nargs=2,
        action="append",
        metavar=("NAME", "OVERRIDES"),
        help="sample.py settings to score (default: the checkout's own default sampler, and DDIM-50)",
    )
    parser.add_argument("--reuse", action="store_true", help="only sample the runs already trained under --work")
    parser.add_argument("--first-core", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "cache")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "default_run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "default_run.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    data = digits()
    net, accuracy = classifier(args.cache, data, device, name="digits", epochs=10)
    reference = torch.cat([data[0], data[2]])
    arms = {name: (commit, shlex.split(overrides)) for name, commit, overrides in args.arm}
    samplers = {n: shlex.split(o) for n, o in args.sampler} if args.sampler else SAMPLERS
    jobs = {
        name: commands(checkout(commit, args.work), args.work / name, overrides, args.samples, samplers)
        for name, (commit, overrides) in arms.items()
    }
    timings: dict[str, dict] = {}
    if args.pin:
        from concurrent.futures import ThreadPoolExecutor

        cores = iter(range(args.first_core, args.first_core + args.jobs))
        free = [next(cores) for _ in range(args.jobs)]

        def slot(name: str) -> None:
            core = free.pop(0)
            try:
                timings[name] = run_arm(name, jobs[name], core, args.work, args.reuse)
            finally:
                free.append(core)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(slot, arms))
    else:
        for name in arms:
            timings[name] = run_arm(name, jobs[name], None, args.work, args.reuse)
            print(f"{name}: trained in {timings[name]['train_seconds'] or 0:.0f} s", flush=True)
    half = len(reference) // 2
    order = torch.randperm(len(reference), generator=torch.Generator().manual_seed(1))
    floor = scores(net, reference[order[:half]], reference[order[half:]], device)
    report = {
        "samples": args.samples,
        "pinned": args.pin,
        "jobs": args.jobs if args.pin else 1,
        "classifier_test_accuracy": accuracy,
        "real_half_against_half": {k: floor[k] for k in ("fid", "kid", "precision", "recall")},
        "samplers": samplers,
        "arms": {},
    }
    for name, (commit, overrides) in arms.items():
        row = report["arms"][name] = {"commit": commit, "overrides": overrides, **timings[name]}
        for key in samplers:
            images = at_28(npz_images(args.work / name / f"samples_{key}" / "samples.npz"))
            row[key] = scores(net, images, reference, device)
        halves = {key: row[key]["fid_halves"] for key in samplers}
        fids = ", ".join(f"{k} {row[k]['fid']:.2f} ({h[0]:.1f}, {h[1]:.1f})" for k, h in halves.items())
        print(f"{name:>16}: {row['train_seconds'] or 0:6.0f} s, {row['steps']} steps; FID {fids}", flush=True)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
