"""Peak memory per image of a training step, for every model preset, with and without activation checkpointing.

    python benchmarks/memory.py --quick          # CPU, a minute or two: the 32x32 presets
    python benchmarks/memory.py --large          # CPU, about 25 minutes: 64, 128 and 256, checkpointing off and on
    python benchmarks/memory.py --device cuda --precision bf16 --large

The weights, gradients and optimizer state do not grow with the batch, the activations do: the memory per image is
the slope of the peak between two batch sizes, each measured in a fresh process. On a GPU the peak is the
allocator's (``torch.cuda.max_memory_allocated``). On a CPU it is the peak of the bytes held by tensors, counted by
PyTorch's ``MemTracker`` (which also splits them into weights, gradients, optimizer state and activations): the
process's resident size, the alternative, moves by tens of MB from run to run with what the C allocator keeps or
returns to the system. One training step is forward, loss, backward and a fused AdamW step on RGB images, as in
train_throughput.py. The 32x32 presets include EDM2's and U-ViT's (``model=edm2_*``, ``uvit_*``). ``--large``
measures the presets made for larger images (``experiment=folder``'s base UNet with its levels for the size, EDM2's
XS and S at 64, ``model=ddpm_128`` and ``model=ddpm_256``) at the sizes they are for, each without and with
``model.checkpointing``, and the median time of a training step at the larger batch (timed without the memory
tracker, which slows every operation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from common import ROOT, machine, setup_device, table, write_json

PRESETS = (("tiny", 32), ("small", 32), ("base", 32), ("ddpm_cifar", 32))
PRESETS += (("edm2_tiny", 32), ("uvit_tiny", 32), ("edm2_small", 32), ("uvit_small", 32))  # the other networks
LARGE = (("folder", 64), ("edm2_xs", 64), ("edm2_s", 64), ("folder", 128), ("ddpm_128", 128), ("folder", 256))
LARGE += (("ddpm_256", 256),)
LARGE_BATCHES = {64: (2, 4), 128: (1, 2), 256: (1, 2)}  # small enough for a CPU; the slope is what counts


def peak_bytes(
    preset: str, size: int, batch: int, device: str, precision: str, checkpointing: bool = False, repeats: int = 0
) -> dict[str, float]:
    """Runs in a fresh process: build, one training step to create the optimizer state, then the measured step.
    Returns the peak bytes, on a CPU the bytes of the activations at that peak, and with ``repeats`` the median
    seconds of that many further steps (timed without the tracker)."""
    import statistics
    import time

    import torch.nn.functional as F
    from common import preset_unet, synchronize

    torch.set_num_threads(1)
    net = preset_unet(preset, size, 3, checkpointing).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            loss = F.mse_loss(net(x, t).float(), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    times = []
    for _ in range(repeats):
        synchronize(torch.device(device))
        start = time.perf_counter()
        step()
        synchronize(torch.device(device))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times) if times else float("nan")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return {"peak": torch.cuda.max_memory_allocated(device), "activations": float("nan"), "seconds": seconds}
    from torch.distributed._tools.mem_tracker import MemTracker  # in PyTorch since 2.5; tracks any device

    tracker = MemTracker()
    tracker.track_external(net, optimizer)
    with tracker:
        step()
    (peak,) = tracker.get_tracker_snapshot("peak").values()  # the one device's bytes by kind, and "Total"
    activations = sum(v for k, v in peak.items() if str(k).endswith(("ACT", "TEMP")))
    return {"peak": peak["Total"], "activations": activations, "seconds": seconds}


def measure(
    preset: str, size: int, batch: int, device: str, precision: str, checkpointing: bool = False, repeats: int = 0
) -> dict[str, float]:
    bench = str(Path(__file__).parent)
    arguments = f"{preset!r}, {size}, {batch}, {device!r}, {precision!r}, {checkpointing}, {repeats}"
    code = (
        f"import json, sys; sys.path.insert(0, {bench!r}); sys.argv = ['memory.py'];"
        f"from memory import peak_bytes; print(json.dumps(peak_bytes({arguments})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def largest_batch(row: dict, gigabytes: float) -> int:
    """The largest batch whose estimated peak (fixed part + batch x per image) fits in ``gigabytes`` (10^9 bytes,
    as GPU memory is sold)."""
    return int((gigabytes * 1e9 / 2**20 - row["fixed_MB"]) // row["MB_per_image"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batches", type=int, nargs=2, default=None, help="the two batch sizes (default 8 32)")
    parser.add_argument("--quick", action="store_true", help="batches 4 and 8")
    parser.add_argument("--large", action="store_true", help="the 64, 128 and 256 presets, checkpointing off and on")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement with --large")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/memory[_large].json")
    args = parser.parse_args()
    out = args.out or ROOT / "benchmarks" / "results" / ("memory_large.json" if args.large else "memory.json")
    cases = [(p, s, c) for p, s in LARGE for c in (False, True)] if args.large else [(p, s, False) for p, s in PRESETS]
    rows = []
    for preset, size, checkpointing in cases:
        small, large = args.batches or (LARGE_BATCHES[size] if args.large else (4, 8) if args.quick else (8, 32))
        low = measure(preset, size, small, args.device, args.precision, checkpointing)
        repeats = args.repeats if args.large else 0
        high = measure(preset, size, large, args.device, args.precision, checkpointing, repeats)
        per_image = (high["peak"] - low["peak"]) / (large - small)
        row = {
            "preset": preset,
            "image_size": size,
            "checkpointing": checkpointing,
            "batches": [small, large],
            "peak_MB_small": low["peak"] / 2**20,
            "peak_MB_large": high["peak"] / 2**20,
            "MB_per_image": per_image / 2**20,
            "activation_MB_per_image": high["activations"] / large / 2**20,
            "fixed_MB": (low["peak"] - small * per_image) / 2**20,
        }
        if args.large:
            row["s_per_step"] = high["seconds"]
            row["largest_batch_80GB"], row["largest_batch_141GB"] = largest_batch(row, 80), largest_batch(row, 141)
            if checkpointing:  # against the row before it, the same preset without checkpointing
                row["memory_ratio"] = row["MB_per_image"] / rows[-1]["MB_per_image"]
                row["time_ratio"] = row["s_per_step"] / rows[-1]["s_per_step"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = machine(setup_device(args.device, 1, pin=False))
    print(f"\nTraining memory, {args.precision}, RGB, {info}")
    columns = ["preset", "image_size", "checkpointing", "batches", "MB_per_image", "activation_MB_per_image"]
    columns += ["fixed_MB"]
    if args.large:
        columns += ["s_per_step", "memory_ratio", "time_ratio", "largest_batch_80GB", "largest_batch_141GB"]
    print(table(rows, columns))
    write_json(out, {"machine": info, "precision": args.precision, "rows": rows})


if __name__ == "__main__":
    main()
