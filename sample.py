"""Generate images from a checkpoint and evaluate them: ``python sample.py ckpt=PATH [key=value ...]``; see
configs/sample.yaml."""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from diffusion.checkpoints import load_checkpoint
from diffusion.data import DiffusionDataModule
from diffusion.datasets import ImageTensors
from diffusion.errors import RunError, report_errors
from diffusion.evaluation import ImageMetrics, nll_bits_per_dim
from diffusion.images import to_model_range
from diffusion.module import DiffusionModule
from diffusion.reports import results_table
from diffusion.writers import write_gif, write_grid, write_images, write_json, write_npz

OmegaConf.register_new_resolver("parent", lambda path: str(Path(path).parent), replace=True)
OmegaConf.register_new_resolver("stem", lambda path: Path(path).stem, replace=True)
OmegaConf.register_new_resolver("suffix", lambda text: f"_{text}" if text else "", replace=True)

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device={name} was asked for, but PyTorch sees no CUDA device here; use device=cpu or auto")
    return torch.device(name)


def load_model(path: str, ema: bool) -> tuple[DiffusionModule, dict[str, Any]]:
    """The module of a checkpoint, with its EMA weights (``ema``) or its raw trained weights."""
    checkpoint = load_checkpoint(path)
    module = DiffusionModule(**checkpoint["hyper_parameters"])
    has_ema = "current_model_state" in checkpoint  # Lightning's EMA puts the average in state_dict, the rest here
    if ema and not has_ema:
        warnings.warn("the checkpoint holds no EMA weights; sampling with the trained weights", stacklevel=2)
    weights = checkpoint["state_dict"] if ema or not has_ema else checkpoint["current_model_state"]
    try:
        module.load_state_dict(weights)
    except RuntimeError as error:
        raise RunError(f"the weights in {path} do not fit the model its hyperparameters describe: {error}") from None
    return module, checkpoint["hyper_parameters"]


def class_labels(cfg: DictConfig, module: DiffusionModule) -> torch.Tensor | None:
    """``(n,)`` labels for a class-conditional model: ``cfg.labels`` (one class, or a list cycled), or every
    class in turn."""
    if not module.conditional:
        if cfg.labels is not None or cfg.guidance != 1.0:
            raise RunError("labels and guidance need a class-conditional model; this one was trained without labels")
        return None
    classes = module.unet.num_classes
    chosen = list(cfg.labels) if isinstance(cfg.labels, ListConfig) else [cfg.labels] if cfg.labels is not None else []
    chosen = chosen or list(range(classes))
    if any(not isinstance(c, int) or not 0 <= c < classes for c in chosen):
        raise RunError(f"labels must be class indices in [0, {classes - 1}], got {chosen}")
    return torch.tensor(chosen).repeat(math.ceil(cfg.n / len(chosen)))[: cfg.n]


def generate(module: DiffusionModule, cfg: DictConfig, device: torch.device, labels: torch.Tensor | None):
    """All ``n`` images in batches; returns (uint8 images on the CPU, GIF frames, seconds, network evaluations per
    image). Batch i starts from noise seeded by (seed, i), so a seed and batch size give the same images."""
    sampler = instantiate(cfg.sampler)
    options: dict[str, Any] = {"steps": cfg.steps}
    if cfg.eta is not None:
        if "eta" not in sampler.keywords:
            raise RunError("eta is an option of the ddim sampler only; drop it or use sampler=ddim")
        options["eta"] = cfg.eta
    unet = module.unet
    evaluations = [0]
    hook = unet.register_forward_hook(lambda *_: evaluations.__setitem__(0, evaluations[0] + 1))
    batches = math.ceil(cfg.n / cfg.batch_size)
    images, frames = [], []
    autocast = PRECISIONS[str(cfg.precision)]
    progress = tqdm(total=batches * cfg.steps, desc="sampling", unit="step", file=sys.stderr)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        for b in range(batches):
            size = min(cfg.batch_size, cfg.n - b * cfg.batch_size)
            g = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + b)
            x_T = torch.randn(size, unet.in_channels, unet.image_size, unet.image_size, generator=g, device=device)
            batch_labels = None if labels is None else labels[b * cfg.batch_size : b * cfg.batch_size + size].to(device)
            with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                batch, kept = module.sample(
                    sampler,
                    x_T,
                    labels=batch_labels,
                    guidance=cfg.guidance,
                    generator=g,
                    frames=cfg.gif_frames if b == 0 else 0,
                    frame_images=cfg.gif_images,
                    on_step=lambda _: progress.update(1),
                    **options,
                )
            images.append(batch.cpu())
            frames = frames or kept
    finally:
        hook.remove()
        progress.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return torch.cat(images), frames, seconds, evaluations[0] / batches


def dataset_for(hparams: dict[str, Any], cfg: DictConfig) -> DiffusionDataModule:
    data = dict(hparams["data"])
    if cfg.data_root is not None:
        data["root"] = cfg.data_root
    datamodule = DiffusionDataModule(**data)
    datamodule.setup("fit")
    return datamodule


def split_batches(datamodule: DiffusionDataModule, split: str, batch_size: int, limit: int | None):
    """``(uint8 images, labels)`` batches of the first ``limit`` images of a split (the splits are in a seeded
    random order), from memory or decoded by DataLoader workers for an image folder."""
    data = datamodule.splits[split]
    total = len(data) if limit is None else min(limit, len(data))
    if isinstance(data, ImageTensors):
        for start in range(0, total, batch_size):
            yield (
                data.images[start : min(total, start + batch_size)],
                data.labels[start : min(total, start + batch_size)],
            )
    else:
        subset = torch.utils.data.Subset(data, range(total))
        yield from torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=min(4, os.cpu_count() or 1))


def evaluate_fid(cfg: DictConfig, images: torch.Tensor, hparams: dict[str, Any], device: torch.device) -> dict:
    feature = cfg.eval.feature
    feature = instantiate(feature) if isinstance(feature, DictConfig) else int(feature)
    datamodule = dataset_for(hparams, cfg)
    reference = len(datamodule.splits["train"]) if cfg.eval.reference_images is None else cfg.eval.reference_images
    subset = max(2, min(cfg.eval.kid_subset_size, len(images), reference))
    metrics = ImageMetrics(feature, kid_subset_size=subset).to(device)
    with torch.inference_mode():
        for real, _ in split_batches(datamodule, "train", cfg.batch_size, reference):
            metrics.update(real.to(device), real=True)
        for start in range(0, len(images), cfg.batch_size):
            metrics.update(images[start : start + cfg.batch_size].to(device), real=False)
    return {**metrics.compute(), "reference_images": min(reference, len(datamodule.splits["train"]))}


def evaluate_nll(cfg: DictConfig, module: DiffusionModule, hparams: dict[str, Any], device: torch.device) -> dict:
    datamodule = dataset_for(hparams, cfg)
    limit = None if cfg.eval.batches is None else cfg.eval.batches * cfg.batch_size
    variance = cfg.eval.variance or ("learned" if module.diffusion["learned_variance"] else "beta")
    batches = (
        (to_model_range(images.to(device)), labels.to(device))
        for images, labels in split_batches(datamodule, cfg.eval.split, cfg.batch_size, limit)
    )
    g = torch.Generator(device=device).manual_seed(cfg.seed)

    def denoise_for(labels: torch.Tensor):
        return module.denoiser(labels=labels if module.conditional else None)

    with torch.inference_mode():
        result = nll_bits_per_dim(denoise_for, module.schedule, batches, variance, g)
    return {**result, "split": cfg.eval.split, "variance": variance}


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Generates ``cfg.n`` images, writes grid.png, process.gif and samples.npz (and images/), evaluates when asked,
    and writes results.json; returns the results."""
    out = Path(HydraConfig.get().runtime.output_dir)
    if (out / "results.json").exists() and not cfg.overwrite:
        raise RunError(
            f"{out} already holds the results of a run with these settings (results.json, samples.npz, grid.png); "
            f"pass overwrite=true to replace them, or out_dir=PATH to write elsewhere"
        )
    device = pick_device(cfg.device)
    module, hparams = load_model(cfg.ckpt, cfg.ema)
    module.compile_network, module.channels_last = cfg.compile, cfg.channels_last
    if cfg.channels_last:
        module.unet.to(memory_format=torch.channels_last)
    module.to(device).eval()
    labels = class_labels(cfg, module)
    images, frames, seconds, nfe = generate(module, cfg, device, labels)
    written = [
        write_grid(images[: cfg.grid_images], out / "grid.png"),
        write_gif(frames, out / "process.gif"),
        write_npz(images, out / "samples.npz", labels),
    ]
    if cfg.save_images:
        written.append(write_images(images, out / "images"))
    sampler_name = HydraConfig.get().runtime.choices.get("sampler")
    results: dict[str, Any] = {
        "ckpt": str(Path(cfg.ckpt).resolve()),
        "sampler": sampler_name,
        "steps": cfg.steps,
        "nfe": nfe,
        "n": cfg.n,
        "seconds": seconds,
        "images_per_second": cfg.n / seconds,
        "seed": cfg.seed,
        "ema": cfg.ema,
        "guidance": cfg.guidance,
        "eta": cfg.eta,
        "device": str(device),
        "precision": str(cfg.precision),
    }
    print(f"Wrote {', '.join(str(p.relative_to(out)) for p in written)} to {out}")
    print(f"Sampling took {seconds:.1f} s: {cfg.n / seconds:.2f} images/s ({nfe:g} network evaluations per image)")
    evaluation = cfg.get("eval")  # the `eval` group, when one was chosen
    try:
        if evaluation is not None and evaluation.name == "fid":
            results.update(evaluate_fid(cfg, images, hparams, device))
        elif evaluation is not None and evaluation.name == "nll":
            results.update(evaluate_nll(cfg, module, hparams, device))
    finally:
        write_json(results, out / "results.json")
    print(results_table([results]))
    return results


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
@report_errors
def main(cfg: DictConfig) -> float | None:
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = sample(cfg)
    except BaseException:
        remove_if_empty(out)
        raise
    return results.get("fid", results.get("nll_bpd"))


def remove_if_empty(folder: Path) -> None:
    """Removes a results folder that a failed run left with nothing but Hydra's own records in it."""
    if folder.is_dir() and all(p.name in (".hydra", "sample.log") for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
