"""Peak memory per image of a training step, for every model preset.

    python benchmarks/memory.py --quick          # CPU, a minute or two
    python benchmarks/memory.py --device cuda --precision bf16

The weights, gradients and optimizer state do not grow with the batch, the activations do: the memory per image is
the slope of the peak between two batch sizes, each measured in a fresh process (on a GPU the allocator's peak,
``torch.cuda.max_memory_allocated``; on a CPU the process's peak resident size). One training step is forward,
loss, backward and a fused AdamW step on 32x32x3 images, as in train_throughput.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
from common import ROOT, machine, setup_device, table, write_json

PRESETS = ("tiny", "small", "base", "ddpm_cifar")


def peak_bytes(preset: str, batch: int, device: str, precision: str) -> int:
    """Runs in a fresh process: build, two training steps, report the peak."""
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from diffusion.unet import UNet

    torch.set_num_threads(1)
    settings = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{preset}.yaml"))
    settings.pop("num_classes")
    net = UNet(image_size=32, in_channels=3, num_classes=None, learned_variance=False, **settings).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        with autocast:
            loss = F.mse_loss(net(x, t).float(), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure(preset: str, batch: int, device: str, precision: str) -> int:
    bench = str(Path(__file__).parent)
    code = (
        f"import sys; sys.path.insert(0, {bench!r}); sys.argv = ['memory.py'];"
        f"from memory import peak_bytes; print(peak_bytes({preset!r}, {batch}, {device!r}, {precision!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


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
        per_image = (high - low) / (large - small)
        rows.append(
            {
                "preset": preset,
                f"peak_MB_at_{small}": low / 2**20,
                f"peak_MB_at_{large}": high / 2**20,
                "MB_per_image": per_image / 2**20,
                "fixed_MB": (low - small * per_image) / 2**20,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    info = machine(setup_device(args.device, 1, pin=False))
    print(f"\nTraining memory, {args.precision}, 32x32x3, {info}")
    print(table(rows, ["preset", f"peak_MB_at_{small}", f"peak_MB_at_{large}", "MB_per_image", "fixed_MB"]))
    write_json(args.out, {"machine": info, "precision": args.precision, "batches": [small, large], "rows": rows})


if __name__ == "__main__":
    main()
