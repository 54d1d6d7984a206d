"""Training throughput of this project's UNet next to lucidrains' and diffusers' UNets, and what fraction of the
machine's measured peak each reaches; with ``--networks``, this project's networks side by side instead (the UNet,
EDM2's and U-ViT at each size, and EDM2's XS and S at 64x64).

    pip install -r benchmarks/requirements.txt
    python benchmarks/train_throughput.py --quick                       # one pinned CPU core, a few minutes
    python benchmarks/train_throughput.py --device cuda --threads 0 --gpu-features
    python benchmarks/train_throughput.py --networks --quick --out benchmarks/results/networks_cpu.json
    python benchmarks/train_throughput.py --networks --large --device cuda --threads 0 --precision bf16 \
        --out benchmarks/results/networks_gpu.json

Every model trains under the same step (fp32 unless --precision bf16: forward, MSE loss, backward, fused AdamW) on
a fixed batch of 32x32x3 images; the runs are interleaved and the medians reported. GFLOP/img is the forward pass
counted by ``torch.utils.flop_counter`` (training is 3x that). The peak is the best of large matmuls and of
conv2d at the UNet's own layer shapes, measured on this machine in the same run in the run's dtype (bf16 with
--precision bf16). A last table times a step fed by
the project's device-held data loader against one on a ready-made batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ROOT, interleaved, machine, preset_unet, setup_device, table, write_json
from peak import conv_shapes, measure_peak
from peers import diffusers_ddpm, forward, lucidrains
from torch.utils.flop_counter import FlopCounterMode

from diffusion.core.images import to_model_range
from diffusion.data.datamodule import random_hflip
from diffusion.data.loaders import ShardedBatchSampler, device_loader


def ours(preset: str, size: int = 32) -> torch.nn.Module:
    return preset_unet(preset, size, 3)


# --networks: this project's networks, in groups of about one compute per image (configs/model/*.yaml), the UNet first
NETWORKS = [
    (32, [("tiny", "tiny"), ("edm2_tiny", "edm2_tiny"), ("uvit_tiny", "uvit_tiny")]),
    (32, [("small", "small"), ("edm2_small", "edm2_small"), ("uvit_small", "uvit_small (U-ViT-S/2)")]),
    (64, [("base", "base (improved-DDPM layout, width 96)"), ("edm2_xs", "edm2_xs (EDM2-XS)"),
          ("edm2_s", "edm2_s (EDM2-S)")]),
]  # fmt: skip


class Case:
    """One model trained on a fixed batch: its step, forward FLOPs and parameter count."""

    def __init__(self, name, model, batch, device, *, precision="fp32", channels_last=False, compile=False, size=32):
        torch.manual_seed(0)
        self.name, self.batch, self.device, self.precision = name, batch, device, precision
        self.model = model.to(device)
        self.x = torch.randn(batch, 3, size, size, device=device)
        self.t = torch.randint(0, 1000, (batch,), device=device)
        self.target = torch.randn(batch, 3, size, size, device=device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.params = sum(p.numel() for p in self.model.parameters())
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            forward(self.model, self.x, self.t)
        self.gflop_per_image = counter.get_total_flops() / batch / 1e9
        self.net = torch.compile(self.model) if compile else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(self, x: torch.Tensor | None = None) -> None:
        with self.autocast:
            loss = F.mse_loss(forward(self.net, self.x if x is None else x, self.t).float(), self.target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def data_pipeline_overhead(case: Case, device: torch.device, rounds: int, per_round: int) -> dict[str, float]:
    """A training step fed by the device-held loader (uint8 gather, [-1, 1], random flips) against one on a batch
    that is already there."""
    n = 4096
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    loader = device_loader(
        images,
        torch.zeros(n, dtype=torch.long, device=device),
        ShardedBatchSampler(n, case.batch, shuffle=True, full_batches=True, seed=0, rank=0, world_size=1),
    )
    batches = iter(())

    def from_loader() -> None:
        nonlocal batches
        try:
            uint8, _ = next(batches)
        except StopIteration:
            batches = iter(loader)
            uint8, _ = next(batches)
        case.step(random_hflip(to_model_range(uint8)))

    times = interleaved({"ready": case.step, "loader": from_loader}, device, rounds, per_round)
    return {**times, "overhead_percent": 100 * (times["loader"] / times["ready"] - 1)}


def networks(args, device: torch.device, build, rounds: int, per_round: int) -> None:
    """The --networks tables: per group of about one compute per image, parameters, forward GFLOP per image, images
    per second and the speed against the group's UNet (its first row), each group in interleaved rounds."""
    rows = []
    for size, presets in NETWORKS:
        if size == 64 and not args.large:
            continue
        batch = max(1, args.batch // 4) if size == 64 else args.batch
        group = [build(name, ours(preset, size), batch, size=size) for preset, name in presets]
        for case in group:
            for _ in range(2):
                case.step()
        seconds = interleaved({c.name: c.step for c in group}, device, rounds, per_round)
        for case in group:
            rows.append(
                {
                    "model": case.name,
                    "image_size": size,
                    "batch": case.batch,
                    "params_M": case.params / 1e6,
                    "fwd_GFLOP_per_img": case.gflop_per_image,
                    "img_per_s": case.batch / seconds[case.name],
                    "vs_unet": seconds[group[0].name] / seconds[case.name],
                    "precision": case.precision,
                }
            )
    info = machine(device)
    print(f"\nTraining throughput of the networks, 3 channels, {args.precision}, {info}")
    print(table(rows, ["model", "image_size", "batch", "params_M", "fwd_GFLOP_per_img", "img_per_s", "vs_unet"]))
    write_json(args.out, {"machine": info, "precision": args.precision, "quick": args.quick, "networks": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (pinned to as many cores); 0: all")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument(
        "--channels-last", action="store_true", help="also run this project's and diffusers' UNets channels-last"
    )
    parser.add_argument("--compile", action="store_true", help="also run this project's UNet compiled")
    parser.add_argument("--gpu-features", action="store_true", help="ddpm_cifar with bf16 + compile + channels-last")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, ddpm_cifar at a quarter of the batch")
    parser.add_argument("--networks", action="store_true", help="this project's networks side by side, no peers")
    parser.add_argument("--large", action="store_true", help="with --networks: also the 64x64 group")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_throughput.json")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    device = setup_device(args.device, threads, pin=args.device == "cpu" and args.threads > 0)
    rounds, per_round = (2, 2) if args.quick else (5, 3)
    big_batch = max(1, args.batch // 4) if args.quick else args.batch

    def build(name, model, batch, **switches):
        return Case(name, model, batch, device, precision=args.precision, **switches)

    if args.networks:
        return networks(args, device, build, rounds, per_round)

    small = [
        build("ours small (DDPM layout, width 64)", ours("small"), args.batch),
        build("diffusers UNet2DModel (DDPM layout, width 64)", diffusers_ddpm(64), args.batch),
        build("lucidrains Unet(dim=64, dim_mults=(1,2,2,2))", lucidrains(), args.batch),
    ]
    if args.channels_last:  # both, so that the comparison holds layout for layout
        small.append(build("ours small, channels-last", ours("small"), args.batch, channels_last=True))
        small.append(build("diffusers UNet2DModel, channels-last", diffusers_ddpm(64), args.batch, channels_last=True))
    if args.compile:
        small.append(build("ours small, compiled", ours("small"), args.batch, compile=True))
    large = [
        build("ours ddpm_cifar (width 128, 35.7M)", ours("ddpm_cifar"), big_batch),
        build("diffusers UNet2DModel (DDPM layout, width 128)", diffusers_ddpm(128), big_batch),
    ]
    if args.gpu_features:
        fast = Case(
            "ours ddpm_cifar, bf16 + compile + channels-last",
            ours("ddpm_cifar"),
            big_batch,
            device,
            precision="bf16",
            channels_last=True,
            compile=True,
        )
        large.append(fast)
    for case in small + large:  # warm-up, and compilation where asked
        for _ in range(2):
            case.step()
    shapes = conv_shapes([small[0].model, large[0].model], args.batch, device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {  # each row's fraction is of the peak in the dtype it computes in
        p: measure_peak(shapes, args.batch, device, False, dtypes[p])
        for p in sorted({c.precision for c in small + large})
    }
    rows = []
    for group in (small, large):
        seconds = interleaved({c.name: c.step for c in group}, device, rounds, per_round)
        reference = seconds[group[1].name]  # diffusers
        for case in group:
            images_per_second = case.batch / seconds[case.name]
            achieved = 3 * case.gflop_per_image * images_per_second
            rows.append(
                {
                    "model": case.name,
                    "batch": case.batch,
                    "params_M": case.params / 1e6,
                    "fwd_GFLOP_per_img": case.gflop_per_image,
                    "img_per_s": images_per_second,
                    "vs_diffusers": reference / seconds[case.name],
                    "train_GFLOP_per_s": achieved,
                    "precision": case.precision,
                    "percent_of_peak": 100 * achieved / peaks[case.precision]["peak_gflops"],
                }
            )
    pipeline = data_pipeline_overhead(small[0], device, rounds, per_round)
    columns = [
        "model",
        "batch",
        "params_M",
        "fwd_GFLOP_per_img",
        "img_per_s",
        "vs_diffusers",
        "train_GFLOP_per_s",
        "precision",
        "percent_of_peak",
    ]
    info = machine(device)
    print(f"\nTraining throughput, {args.precision}, {info}")
    for p, peak in peaks.items():
        print(f"Peak {p}: conv2d {peak['conv2d_gflops']:.1f} GFLOP/s, matmul {peak['matmul_gflops']:.1f} GFLOP/s")
    print(table(rows, columns))
    print(
        f"\nData pipeline: a step fed by the device-held loader takes {pipeline['loader'] * 1000:.1f} ms against "
        f"{pipeline['ready'] * 1000:.1f} ms on a ready batch ({pipeline['overhead_percent']:+.1f}%)"
    )
    write_json(
        args.out,
        {
            "machine": info,
            "precision": args.precision,
            "quick": args.quick,
            "peaks": peaks,
            "rows": rows,
            "data_pipeline": pipeline,
        },
    )


if __name__ == "__main__":
    main()
