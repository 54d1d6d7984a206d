"""What the benchmarks share: pinning, the machine's description, interleaved timing, tables and JSON."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks run as plain scripts: python benchmarks/NAME.py


def setup_device(device: str, threads: int, pin: bool) -> torch.device:
    """On a CPU: ``threads`` threads, pinned to the first ``threads`` cores when ``pin`` (a shared machine is
    noisy; one pinned core is the most repeatable measurement)."""
    if device == "cpu":
        torch.set_num_threads(threads)
        if pin and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))
    elif not torch.cuda.is_available():
        raise SystemExit(f"--device {device} asked for, but PyTorch sees no CUDA device")
    return torch.device(device)


def machine(device: torch.device) -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "threads": str(torch.get_num_threads()), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def train_hparams(*overrides: str) -> dict:
    """The checkpoint hyperparameters of ``python train.py OVERRIDES``, composed by Hydra from configs/ as train.py
    composes them (diffusion.training.hparams is their one layout)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    from train import hyperparameters  # registers train.py's schema

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):  # the paths resolve as in a run started from ROOT
        cfg.hydra.runtime.output_dir, cfg.hydra.runtime.cwd = str(ROOT / "benchmarks" / "work"), str(ROOT)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return hyperparameters(cfg)


def preset_unet(preset: str, image_size: int, channels: int, checkpointing: bool = False) -> torch.nn.Module:
    """The network of ``model=PRESET`` for images of that size and channel count, unconditional, fixed variance
    (``preset`` ``folder``: ``experiment=folder``'s, with its resolutions for the size), with
    ``model.checkpointing``."""
    from diffusion.models.building import build_model

    chosen = ["experiment=folder", "dataset.root=unused"] if preset == "folder" else [f"model={preset}"]
    hparams = train_hparams(
        *chosen, f"dataset.image_size={image_size}", f"dataset.channels={channels}", "model.num_classes=null",
        "diffusion=ddpm", f"model.checkpointing={checkpointing}",
    )  # fmt: skip
    return build_model(hparams).network


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds per call, each call timed on its own (after the device finished the previous one)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def interleaved(
    cases: dict[str, Callable[[], object]], device: torch.device, rounds: int, per_round: int
) -> dict[str, float]:
    """Median seconds per call of each case, measured in rounds A, B, C, A, B, C, ... so that a slow spell of a
    shared machine lands on every case alike."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name] += time_call(fn, device, per_round)
    return {name: statistics.median(values) for name, values in samples.items()}


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def provenance() -> dict[str, str]:
    """What a result file needs to be reproduced: the commit (``+changes`` when the tree differs from it), the
    full command and the machine."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+changes"
    command = shlex.join(["python", str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"commit": commit, "command": command, **{f"machine_{k}": v for k, v in machine(device).items()}}


def write_json(path: Path, data: dict) -> None:
    """``data`` as JSON at ``path``, with the :func:`provenance` of the run under ``"provenance"``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"provenance": provenance(), **data}, indent=2) + "\n")
    print(f"\nwrote {path}")


def launch(command: list[str], core: int | None, log: Path) -> subprocess.Popen:
    """A subprocess writing to ``log``, pinned to ``core`` with one thread when a core is given (on a CPU)."""
    env = dict(os.environ)
    if core is not None:
        command = ["taskset", "-c", str(core), *command]
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def run_jobs(jobs: dict[str, list[list[str]]], slots: int, pin: bool, logs: Path, first_core: int = 0) -> None:
    """Runs each job (a list of commands, one after the other) in its own process, ``slots`` jobs at a time; with
    ``pin`` (on a CPU) each slot runs on its own core (from ``first_core`` on) with one thread. A failing job stops
    the whole run with its log's end."""
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, free = list(jobs), {}, list(range(first_core, first_core + slots))
    while pending or running:
        while pending and free:
            name, slot = pending.pop(0), free.pop(0)
            script = " && ".join(shlex.join(command) for command in jobs[name])
            running[name] = (launch(["bash", "-c", script], slot if pin else None, logs / f"{name}.log"), slot)
            print(f"started {name}" + (f" on core {slot}" if pin else ""), flush=True)
        time.sleep(2)
        for name, (process, slot) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            free.append(slot)
            if process.returncode != 0:
                tail = (logs / f"{name}.log").read_text()[-3000:]
                raise SystemExit(f"{name} failed; its output is in {logs / name}.log:\n{tail}")
            print(f"finished {name}", flush=True)


def sample_command(ckpt: Path, out: Path, device: str, samples: int, sampler: list[str]) -> list[str]:
    """``sample.py`` drawing ``samples`` images from seed 0 with the ``sampler`` overrides into ``out``, as the
    benchmarks run it (batch 500 on a GPU, 100 on a CPU; the images do not depend on it)."""
    return [
        sys.executable, str(ROOT / "sample.py"), f"ckpt={ckpt}", *sampler, f"n={samples}",
        f"batch_size={500 if device == 'cuda' else 100}", "seed=0", f"device={device}", f"out_dir={out}",
        "overwrite=true",
    ]  # fmt: skip
