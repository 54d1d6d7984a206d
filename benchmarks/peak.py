"""The machine's measured peak: the best GFLOP/s of conv2d at a network's own layer shapes and of large matmuls,
against which the benchmarks state what fraction of it a training step reaches."""

from __future__ import annotations

import torch
from common import interleaved
from peers import forward


def conv_shapes(models: list[torch.nn.Module], batch: int, device: torch.device, channels: int = 3) -> set[tuple]:
    """(in, out, kernel, stride, padding, H, W) of every Conv2d the models run on 32x32 inputs."""
    shapes: set[tuple] = set()

    def record(module, inputs, output):
        _, c, h, w = inputs[0].shape
        shapes.add((c, module.out_channels, module.kernel_size[0], module.stride[0], module.padding[0], h, w))

    for model in models:
        hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            x = torch.randn(1, channels, 32, 32, device=device)
            forward(model, x, torch.zeros(1, dtype=torch.long, device=device))
        for hook in hooks:
            hook.remove()
    return shapes


def measure_peak(
    shapes: set[tuple], batch: int, device: torch.device, channels_last: bool, dtype: torch.dtype = torch.float32
) -> dict[str, float]:
    """GFLOP/s of the best conv2d forward at the UNet's shapes and of the best large square matmul, in ``dtype``
    (the dtype the run computes in: bfloat16 under bf16 autocast, where a GPU's peak is many times its fp32 one)."""
    conv_best = 0.0
    for c_in, c_out, k, stride, pad, h, w in sorted(shapes):
        conv = torch.nn.Conv2d(c_in, c_out, k, stride, pad).to(device, dtype)
        x = torch.randn(batch, c_in, h, w, device=device, dtype=dtype)
        if channels_last:
            conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        flops = 2 * batch * c_in * c_out * k * k * ((h + 2 * pad - k) // stride + 1) * ((w + 2 * pad - k) // stride + 1)
        with torch.no_grad():
            seconds = interleaved({"conv": lambda conv=conv, x=x: conv(x)}, device, rounds=1, per_round=5)["conv"]
        conv_best = max(conv_best, flops / seconds / 1e9)
    matmul_best = 0.0
    for n in (1024, 2048) if device.type == "cpu" else (4096, 8192):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        seconds = interleaved({"mm": lambda a=a, b=b: a @ b}, device, rounds=1, per_round=5)["mm"]
        matmul_best = max(matmul_best, 2 * n**3 / seconds / 1e9)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "conv2d_gflops": conv_best,
        "matmul_gflops": matmul_best,
        "peak_gflops": max(conv_best, matmul_best),
    }
