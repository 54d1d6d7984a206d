"""Peak memory per image of a training step, for every model preset.

    python benchmarks/memory.py --quick          # CPU, a minute or two
    python benchmarks/memory.py --device cuda --precision bf16

The weights, gradients and optimizer state do not grow with the batch, the activations do: the memory per image is
the slope of the peak between two batch sizes, each measured in a fresh process. On a GPU the peak is the
allocator's (``torch.cuda.max_memory_allocated``). On a CPU it is the peak of the bytes held by tensors, counted by
PyTorch's ``MemTracker`` (which also splits them into weights, gradients, optimizer state and activations): the
process's resident size, the alternative, moves by tens of MB from run to run with what the C allocator keeps or
returns to the system. One training step is forward, loss, backward and a fused AdamW step on 32x32x3 images, as in
train_throughput.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from common import ROOT, machine, setup_device, table, write_json

PRESETS = ("tiny", "small", "base", "ddpm_cifar")


def peak_bytes(preset: str, batch: int, device: str, precision: str) -> dict[str, float]:
    """Runs in a fresh process: build, one training step to create the optimizer state, then the measured step.
    Returns the peak bytes, and on a CPU the bytes of the activations at that peak."""
    import torch.nn.functional as F
    from common import preset_unet

    torch.set_num_threads(1)
    net = preset_unet(preset, 32, 3).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            loss = F.mse_loss(net(x, t).float(), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return {"peak": torch.cuda.max_memory_allocated(device), "activations": float("nan")}
    from torch.distributed._tools.mem_tracker import MemTracker  # in PyTorch since 2.5; tracks any device

    tracker = MemTracker()
    tracker.track_external(net, optimizer)
    with tracker:
        step()
    (peak,) = tracker.get_tracker_snapshot("peak").values()  # the one device's bytes by kind, and "Total"
    activations = sum(v for k, v in peak.items() if str(k).endswith(("ACT", "TEMP")))
    return {"peak": peak["Total"], "activations": activations}


def measure(preset: str, batch: int, device: str, precision: str) -> dict[str, float]:
    bench = str(Path(__file__).parent)
    code = (
        f"import json, sys; sys.path.insert(0, {bench!r}); sys.argv = ['memory.py'];"
        f"from memory import peak_bytes; print(json.dumps(peak_bytes({preset!r}, {batch}, {device!r}, {precision!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batches", type=int, nargs=2, default=None, help="the two batch sizes (default 8 32)")
    parser.add_argument("--quick", action="store_true", help="batches 4 and 8")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory.json")
    args = parser.parse_args()
    small, large = args.batches or ((4, 8) if args.quick else (8, 32))
    rows = []
    for preset in PRESETS:
        low, high = (
            measure(preset, small, args.device, args.precision),
            measure(preset, large, args.device, args.precision),
        )
        per_image = (high["peak"] - low["peak"]) / (large - small)
        rows.append(
            {
                "preset": preset,
                f"peak_MB_at_{small}": low["peak"] / 2**20,
                f"peak_MB_at_{large}": high["peak"] / 2**20,
                "MB_per_image": per_image / 2**20,
                "activation_MB_per_image": high["activations"] / large / 2**20,
                "fixed_MB": (low["peak"] - small * per_image) / 2**20,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    info = machine(setup_device(args.device, 1, pin=False))
    print(f"\nTraining memory, {args.precision}, 32x32x3, {info}")
    columns = [
        "preset",
        f"peak_MB_at_{small}",
        f"peak_MB_at_{large}",
        "MB_per_image",
        "activation_MB_per_image",
        "fixed_MB",
    ]
    print(table(rows, columns))
    write_json(args.out, {"machine": info, "precision": args.precision, "batches": [small, large], "rows": rows})


if __name__ == "__main__":
    main()
