"""The settings of train.py and sample.py: their typed schema, and the checks of their ranges.

The schema is made of dataclasses that Hydra composes the YAML files onto (its "structured configs": the entry
points register them as ``train_schema`` and ``sample_schema``, first in the defaults lists), so a value of the
wrong type or a key that does not exist stops the run when the command line is read, with Hydra's message naming
the key. No field has a default here: every default lives in the YAML. Ranges and combinations, which a type
cannot say, are checked by :func:`check_train` and :func:`check_sample` on the plain resolved settings, before any
work starts; each problem is one :class:`~diffusion.errors.RunError` that names the key, the value and the fix.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args

from omegaconf import MISSING

from diffusion.core.schedules import Spacing
from diffusion.errors import RunError


@dataclass
class DatasetSettings:
    name: str = MISSING
    root: str = MISSING
    image_size: int = MISSING
    channels: int = MISSING
    num_classes: int | None = MISSING
    labels_from_subfolders: bool = MISSING
    batch_size: int = MISSING
    val_fraction: float = MISSING
    hflip: bool = MISSING
    on_device: bool = MISSING
    num_workers: int = MISSING
    pin_memory: bool = MISSING
    persistent_workers: bool = MISSING
    download: bool = MISSING
    strict: bool = MISSING
    background: list[int] = MISSING


@dataclass
class ModelSettings:
    base_channels: int = MISSING
    channel_mult: list[int] = MISSING
    num_res_blocks: int = MISSING
    attention_resolutions: list[int] = MISSING
    num_heads: int = MISSING
    dropout: float = MISSING
    scale_shift: bool = MISSING
    num_classes: int | None = MISSING
    compile: bool = MISSING
    channels_last: bool = MISSING


@dataclass
class DiffusionSettings:
    timesteps: int = MISSING
    schedule: str = MISSING
    target: str = MISSING
    loss: str = MISSING
    min_snr_gamma: float | None = MISSING
    learned_variance: bool = MISSING
    vlb_weight: float = MISSING
    label_dropout: float = MISSING


@dataclass
class OptimizerSettings:
    lr: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    schedule: str = MISSING
    min_lr_ratio: float = MISSING
    fused: bool = MISSING


@dataclass
class TrainSettings:
    seed: int = MISSING
    ckpt_path: str | None = MISSING
    resume: bool = MISSING
    cuda_matmul_precision: str = MISSING
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    diffusion: DiffusionSettings = field(default_factory=DiffusionSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    # Lightning's and the callbacks' own arguments, checked by check_train and by the classes themselves
    sampler: Any = MISSING
    trainer: Any = MISSING
    callbacks: Any = None
    logger: Any = None
    paths: Any = MISSING


@dataclass
class SampleSettings:
    ckpt: str | None = MISSING
    n: int = MISSING
    batch_size: int = MISSING
    guidance: float = MISSING
    labels: Any = MISSING
    seed: int = MISSING
    ema: bool = MISSING
    device: str = MISSING
    precision: str = MISSING
    clip_x0: bool = MISSING
    dynamic_threshold: float | None = MISSING
    compile: bool = MISSING
    channels_last: bool = MISSING
    save_images: bool = MISSING
    grid_images: int = MISSING
    gif_images: int = MISSING
    gif_frames: int = MISSING
    data_root: str | None = MISSING
    overwrite: bool = MISSING
    out_dir: str = MISSING
    sampler: Any = MISSING
    eval: Any = None


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config_options(group: str) -> str:
    """The options of a config group, for the --help text: ``cifar, digits, fashion, folder, mnist``."""
    return ", ".join(sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")))


def _fail(key: str, value: Any, why: str, fix: str) -> None:
    raise RunError(f"{key}={value!r} {why}; {fix}")


def _integer(settings: dict, key: str, minimum: int, fix: str, *, allowed: tuple = ()) -> None:
    value = _get(settings, key)
    if value in allowed and not isinstance(value, bool):
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(key, value, f"is not a whole number of at least {minimum}", fix)


def _get(settings: dict, key: str) -> Any:
    node: Any = settings
    for part in key.split("."):
        node = node[part]
    return node


def check_sampler(settings: dict, key: str = "sampler") -> None:
    sampler = _get(settings, key)
    _integer(settings, f"{key}.steps", 1, f"give the sampler's number of steps, e.g. {key}.steps=50")
    spacings = get_args(Spacing)
    if "spacing" in sampler and sampler["spacing"] not in spacings:
        _fail(f"{key}.spacing", sampler["spacing"], "is not a timestep spacing", f"choose one of {', '.join(spacings)}")
    if "eta" in sampler and not (isinstance(sampler["eta"], int | float) and 0 <= sampler["eta"] <= 1):
        _fail(f"{key}.eta", sampler["eta"], "is not a number in [0, 1]", "0 is deterministic DDIM, 1 ancestral")


def check_known_keys(settings: dict, group: str, schema: type) -> None:
    """Keys added with ``+group.key=...`` (Hydra's own hint for a key it does not know) that the group does not
    have: a typo would otherwise reach a constructor as an unexpected argument."""
    known = [f.name for f in fields(schema)]
    for key in settings[group]:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {group}.{close[0]}?" if close else f"its settings are {', '.join(known)}"
            raise RunError(f"{group}.{key} is not a setting of {group}; {hint}")


def check_train(settings: dict, cuda_available: bool) -> None:
    """The ranges of train.py's settings (plain, resolved)."""
    for group, schema in (
        ("dataset", DatasetSettings),
        ("model", ModelSettings),
        ("diffusion", DiffusionSettings),
        ("optimizer", OptimizerSettings),
    ):
        check_known_keys(settings, group, schema)
    trainer, optimizer, diffusion = settings["trainer"], settings["optimizer"], settings["diffusion"]
    max_steps = trainer.get("max_steps")
    if max_steps == -1:
        if optimizer["schedule"] == "cosine":
            _fail(
                "trainer.max_steps",
                -1,
                "(no limit) leaves the cosine learning-rate schedule without a length",
                "give the run a length (trainer.max_steps=N) or use optimizer.schedule=constant",
            )
    else:
        _integer(settings, "trainer.max_steps", 1, "give the number of optimizer steps, e.g. trainer.max_steps=2500")
    _integer(settings, "dataset.batch_size", 1, "give the images per batch and device, e.g. dataset.batch_size=64")
    _integer(settings, "dataset.image_size", 4, "give the image side in pixels, e.g. dataset.image_size=32")
    _integer(settings, "optimizer.warmup_steps", 0, "0 starts at the full learning rate")
    if not optimizer["lr"] > 0:
        _fail("optimizer.lr", optimizer["lr"], "is not positive", "give a learning rate, e.g. optimizer.lr=2e-4")
    if not 0 <= optimizer["min_lr_ratio"] <= 1:
        _fail("optimizer.min_lr_ratio", optimizer["min_lr_ratio"], "is not in [0, 1]", "e.g. 0.05")
    if not 0 <= diffusion["label_dropout"] < 1:
        _fail(
            "diffusion.label_dropout",
            diffusion["label_dropout"],
            "is not a probability in [0, 1)",
            "it is the share of labels dropped for classifier-free guidance, e.g. 0.1 (1 or more would drop them all)",
        )
    check_sampler(settings)
    samples = (settings.get("callbacks") or {}).get("previews")
    if samples:
        for key in ("num_images", "gif_images"):
            _integer(settings, f"callbacks.previews.{key}", 1, f"e.g. callbacks.previews.{key}=16")
        _integer(settings, "callbacks.previews.gif_frames", 0, "0 writes no GIF, e.g. callbacks.previews.gif_frames=40")
        if samples.get("steps") is not None:
            _integer(settings, "callbacks.previews.steps", 1, "or null for the sampler's own")
        guidance = samples["guidance"]
        if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not guidance >= 0:
            _fail("callbacks.previews.guidance", guidance, "is not a number >= 0", "1 is no guidance, e.g. 3.0")
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not cuda_available:
        _fail(
            "trainer.accelerator",
            accelerator,
            "asks for a GPU, but PyTorch sees no CUDA device here",
            "train on the CPU with trainer=cpu (or trainer.accelerator=cpu), or check the NVIDIA driver and the "
            "CUDA build of PyTorch (python -c 'import torch; print(torch.cuda.is_available())')",
        )


def check_sample(settings: dict) -> None:
    """The ranges of sample.py's settings (plain, resolved)."""
    if settings["ckpt"] is None:
        raise RunError(
            "sample.py needs a checkpoint: give it as ckpt=PATH, e.g. "
            "ckpt=outputs/2026-11-22/10-00-00/checkpoints/last.ckpt"
        )
    _integer(settings, "n", 1, "give the number of images, e.g. n=64")
    _integer(settings, "batch_size", 1, "give the images per batch, e.g. batch_size=64")
    _integer(settings, "grid_images", 1, "give the images in grid.png, e.g. grid_images=64")
    _integer(settings, "gif_images", 1, "give the images in process.gif, e.g. gif_images=16")
    _integer(settings, "gif_frames", 2, "give the frames of process.gif, e.g. gif_frames=60")
    if not settings["guidance"] >= 0:
        _fail("guidance", settings["guidance"], "is negative", "1 is no guidance, 0 the unconditional model, e.g. 3.0")
    threshold = settings["dynamic_threshold"]
    if threshold is not None and not 0 < threshold <= 1:
        _fail("dynamic_threshold", threshold, "is not a percentile in (0, 1]", "Imagen's is 0.995; null for none")
    if str(settings["precision"]) not in ("32", "bf16", "16"):
        _fail("precision", settings["precision"], "is not one of 32, bf16, 16", "e.g. precision=bf16 on a GPU")
    device = str(settings["device"])
    if device not in ("auto", "cpu", "cuda", "mps") and not (device.startswith("cuda:") and device[5:].isdigit()):
        _fail("device", device, "is not a device", "use auto, cpu, cuda or cuda:N")
    check_sampler(settings)
