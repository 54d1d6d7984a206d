"""Generate images from a checkpoint and evaluate them: ``python sample.py ckpt=PATH [key=value ...]``; see
configs/sample.yaml."""

from __future__ import annotations

import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from diffusion.core.denoiser import SamplingOptions
from diffusion.core.drawing import Samples, draw
from diffusion.core.likelihood import check_likelihood
from diffusion.core.model import DiffusionModel
from diffusion.errors import RunError, report_errors
from diffusion.models.checkpoints import MODEL_PREFIX, load_checkpoint, load_model
from diffusion.models.posthoc_ema import load_posthoc
from diffusion.outputs.evaluation import fid_against, nll_bits_per_dim, ode_nll_bits_per_dim
from diffusion.outputs.reports import results_table
from diffusion.outputs.writers import atomic_path, write_gif, write_grid, write_images, write_json, write_npz
from diffusion.settings import SampleSettings, check_sample, config_options

ConfigStore.instance().store(name="sample_schema", node=SampleSettings)
OmegaConf.register_new_resolver("options", config_options, replace=True)  # for --help

# The results folder is named after the checkpoint; without one (an error, said by check_sample) a placeholder.
OmegaConf.register_new_resolver("parent", lambda path: str(Path(path).parent) if path else ".", replace=True)
OmegaConf.register_new_resolver("stem", lambda path: Path(path).stem if path else "no_checkpoint", replace=True)
OmegaConf.register_new_resolver("suffix", lambda text: f"_{folder_name(text)}" if text else "", replace=True)

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def folder_name(text: str) -> str:
    """``text`` (the settings that name a results folder) in the characters Hydra's grammar reads as a plain value,
    so that a path printed with it can be passed back as ``ckpt=PATH``: a list's commas become ``-`` and its
    brackets, quotes and spaces are dropped (``labels-[3,5]`` -> ``labels-3-5``)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "", text.replace(",", "-"))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device={name} was asked for, but PyTorch sees no CUDA device here; use device=cpu or auto")
    return torch.device(name)


def class_labels(cfg: DictConfig, model: DiffusionModel) -> torch.Tensor | None:
    """``(n,)`` labels for a class-conditional model: ``cfg.labels`` (one class, or a list cycled), or every
    class in turn."""
    if not model.conditional:
        if cfg.labels is not None or cfg.guidance != 1.0:
            raise RunError("labels and guidance need a class-conditional model; this one was trained without labels")
        return None
    classes = model.num_classes
    chosen = list(cfg.labels) if isinstance(cfg.labels, ListConfig) else [cfg.labels] if cfg.labels is not None else []
    chosen = chosen or list(range(classes))
    if any(not isinstance(c, int) or not 0 <= c < classes for c in chosen):
        raise RunError(f"labels must be class indices in [0, {classes - 1}], got {chosen}")
    return torch.tensor(chosen).repeat(math.ceil(cfg.n / len(chosen)))[: cfg.n]


def generate(model: DiffusionModel, cfg: DictConfig, device: torch.device, labels: torch.Tensor | None) -> Samples:
    """All ``n`` images, with a progress bar; image k depends only on (seed, k), whatever the batch size."""
    sampler = instantiate(cfg.sampler)
    batches = math.ceil(cfg.n / cfg.batch_size)
    autocast = PRECISIONS[str(cfg.precision)]
    with (
        tqdm(total=batches * cfg.sampler.steps, desc="sampling", unit="step", file=sys.stderr) as progress,
        model.sampling(),
        torch.autocast(device.type, dtype=autocast, enabled=autocast is not None),
    ):
        return draw(
            model.denoiser_for(sampling_options(cfg)),
            sampler,
            n=cfg.n,
            batch_size=cfg.batch_size,
            shape=model.image_shape,
            seed=cfg.seed,
            device=device,
            labels=labels,
            frames=cfg.gif_frames,
            frame_images=cfg.gif_images,
            on_step=lambda _: progress.update(1),
        )


def sampling_options(cfg: DictConfig) -> SamplingOptions:
    return SamplingOptions(guidance=cfg.guidance, clip_x0=cfg.clip_x0, dynamic_threshold=cfg.dynamic_threshold)


def dataset_for(hparams: dict[str, Any], cfg: DictConfig) -> Any:
    """The training run's dataset and split (its seed is in the checkpoint), from ``data_root`` when given: its
    DataModule, imported here, since only the evaluation reads data (drawing images needs no Lightning)."""
    from diffusion.data.datamodule import DiffusionDataModule

    dataset = dict(hparams["dataset"])
    if cfg.data_root is not None:
        dataset["root"] = cfg.data_root
    return DiffusionDataModule(**dataset)


def evaluate(
    cfg: DictConfig, model: DiffusionModel, hparams: dict[str, Any], images: torch.Tensor, device: torch.device
) -> dict:
    """The metrics of the ``eval`` group: FID/KID of the images against the training images, or the NLL."""
    datamodule = dataset_for(hparams, cfg)
    if cfg.eval.name == "fid":
        feature = instantiate(cfg.eval.feature) if isinstance(cfg.eval.feature, DictConfig) else int(cfg.eval.feature)
        count = datamodule.split_size("train")
        count = count if cfg.eval.reference_images is None else min(count, cfg.eval.reference_images)
        real = datamodule.batches("train", cfg.batch_size, count)
        return fid_against(images, real, count, feature, cfg.eval.kid_subset_size, device)
    limit = None if cfg.eval.batches is None else cfg.eval.batches * cfg.batch_size

    def batches():
        return ((x0.to(device), y.to(device)) for x0, y in datamodule.batches(cfg.eval.split, cfg.batch_size, limit))

    def denoiser_for(options: SamplingOptions):  # no guidance: the model's own likelihood
        return lambda labels: model.denoiser(options, labels if model.conditional else None)

    results: dict[str, Any] = {"split": datamodule.split_name(cfg.eval.split)}
    if model.objective.has_variational_bound:
        variance = cfg.eval.variance or ("learned" if model.objective.learned_variance else "beta")
        bound = SamplingOptions(clip_x0=cfg.clip_x0, dynamic_threshold=cfg.dynamic_threshold)
        with model.sampling():
            g = torch.Generator(device=device).manual_seed(cfg.seed)
            results |= nll_bits_per_dim(denoiser_for(bound), model.objective, batches(), variance, g) | {
                "variance": variance
            }
    # The ODE integrates the model's own field: x_0 unclipped, and autograd on for the divergence.
    with model.sampling(inference=False):
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        field = denoiser_for(SamplingOptions(clip_x0=False))
        e = cfg.eval
        results |= ode_nll_bits_per_dim(field, batches(), probes=e.probes, rtol=e.rtol, atol=e.atol, generator=g)
        results |= {"ode_probes": e.probes, "ode_rtol": e.rtol, "ode_atol": e.atol}
    return results


def use_posthoc_ema(model: DiffusionModel, checkpoint: dict[str, Any], cfg: DictConfig, out: Path) -> dict[str, Any]:
    """The post-hoc EMA of length ``cfg.ema_length`` in ``model`` (from ``checkpoint``, the file ``cfg.ckpt``), and
    with ``ema_save`` its checkpoint, written as posthoc_ema.ckpt in ``out`` (the checkpoint with these weights as its
    EMA weights, for sample.py ckpt=)."""
    ckpt = Path(cfg.ckpt)
    folder = Path(cfg.ema_snapshots) if cfg.ema_snapshots else ckpt.resolve().parent.parent / "ema_snapshots"
    info = load_posthoc(model, checkpoint, ckpt, cfg.ema_length, folder)
    print(
        f"Post-hoc EMA of length {cfg.ema_length:g} at {info['ema_images']:,} training images, from "
        f"{info['ema_snapshots']} snapshots and the checkpoint's averages (profile fit residual "
        f"{info['ema_profile_residual']:.2%})"
    )
    if cfg.ema_save:
        state = {key: checkpoint[key] for key in ("hyper_parameters", "current_model_state") if key in checkpoint}
        weights = {MODEL_PREFIX + name: value for name, value in model.state_dict().items()}  # the module's names
        state |= {"state_dict": weights, "posthoc_ema": info}
        with atomic_path(out / "posthoc_ema.ckpt") as tmp:
            torch.save(state, tmp)
        saved = out / "posthoc_ema.ckpt"
        print(f"Wrote the post-hoc EMA's weights; sample from them with: python sample.py ckpt={saved}")
    return info


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Generates ``cfg.n`` images, writes grid.png, process.gif and samples.npz (and images/), evaluates when asked,
    and writes results.json; returns the results."""
    check_sample(OmegaConf.to_container(cfg, resolve=True))
    out = Path(HydraConfig.get().runtime.output_dir)
    if (out / "results.json").exists() and not cfg.overwrite:
        raise RunError(
            f"{out} already holds the results of a run with these settings (results.json, samples.npz, grid.png); "
            f"pass overwrite=true to replace them, or out_dir=PATH to write elsewhere"
        )
    device = pick_device(cfg.device)
    checkpoint = load_checkpoint(cfg.ckpt)
    model = load_model(cfg.ckpt, cfg.ema, compile=cfg.compile, channels_last=cfg.channels_last, checkpoint=checkpoint)
    if cfg.eval is not None and cfg.eval.name == "nll":
        check_likelihood(model.objective.levels)  # before the images are drawn
    posthoc = {} if cfg.ema_length is None else use_posthoc_ema(model, checkpoint, cfg, out)
    model = model.to(device)
    labels = class_labels(cfg, model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    samples = generate(model, cfg, device, labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    written = [
        write_grid(samples.images[: cfg.grid_images], out / "grid.png"),
        write_gif(samples.frames, out / "process.gif"),
        write_npz(samples.images, out / "samples.npz", labels),
    ]
    if cfg.save_images:
        written.append(write_images(samples.images, out / "images"))
    results: dict[str, Any] = {
        "ckpt": str(Path(cfg.ckpt).resolve()),
        "sampler": HydraConfig.get().runtime.choices.get("sampler"),
        "steps": cfg.sampler.steps,
        "nfe": samples.nfe,
        "n": cfg.n,
        "seconds": seconds,
        "images_per_second": cfg.n / seconds,
        "seed": cfg.seed,
        "ema": cfg.ema,
        **posthoc,
        "guidance": cfg.guidance,
        "eta": cfg.sampler.get("eta"),
        "clip_x0": cfg.clip_x0,
        "dynamic_threshold": cfg.dynamic_threshold,
        "device": str(device),
        "precision": str(cfg.precision),
    }
    print(f"Wrote {', '.join(str(p.relative_to(out)) for p in written)} to {out}")
    print(
        f"Sampling took {seconds:.1f} s: {cfg.n / seconds:.2f} images/s ({samples.nfe:g} network evaluations per image)"
    )
    try:
        if cfg.get("eval") is not None:  # the `eval` group, when one was chosen
            results.update(evaluate(cfg, model, checkpoint["hyper_parameters"], samples.images, device))
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
    return results.get("fid", results.get("nll_bpd", results.get("ode_nll_bpd")))


def remove_if_empty(folder: Path) -> None:
    """Removes a results folder that a failed run left with nothing but Hydra's own records in it."""
    if folder.is_dir() and all(p.name in (".hydra", "sample.log") for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
