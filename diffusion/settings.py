"""The settings of train.py and sample.py: their typed schema, and the checks of their ranges.

The schema is made of dataclasses that Hydra composes the YAML files onto (its "structured configs": the entry
points register them as ``train_schema`` and ``sample_schema``, first in the defaults lists), so a value of the
wrong type or a key that does not exist stops the run when the command line is read, with Hydra's message naming
the key. No field has a default here: every default lives in the YAML. Ranges and combinations, which a type
cannot say, are checked by :func:`check_train` and :func:`check_sample` on the plain resolved settings, before any
work starts; each problem is one :class:`~diffusion.errors.SettingError` that names the key, the value and the fix
(:mod:`diffusion.checks`).

The ``model`` and ``diffusion`` groups are the arguments of the classes they name as ``_target_`` (a network, an
objective: a user's own as well as this project's), so their keys and values are checked by those classes when
:func:`diffusion.models.building.build_model` builds them, before any work; here only the keys that the training
module reads itself are checked (the speed switches and ``diffusion.label_dropout``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args

from omegaconf import MISSING

from diffusion import checks
from diffusion.core.denoiser import check_dynamic_threshold
from diffusion.core.lr_schedule import LRShape
from diffusion.core.posthoc_ema import check_sigma_rel
from diffusion.core.reverse import Variance
from diffusion.core.samplers.ddim import check_eta
from diffusion.core.samplers.heun import check_churn
from diffusion.core.schedules import Spacing
from diffusion.errors import RunError, SettingError


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
class OptimizerSettings:
    lr: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    lr_schedule: str = MISSING
    min_lr_ratio: float = MISSING
    fused: bool = MISSING


@dataclass
class TrainSettings:
    seed: int = MISSING
    ckpt_path: str | None = MISSING
    resume: bool = MISSING
    cuda_matmul_precision: str = MISSING
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    # a network's and an objective's arguments: whatever their _target_ takes (see the module docstring)
    model: Any = MISSING
    diffusion: Any = MISSING
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
    ema_length: float | None = MISSING
    ema_snapshots: str | None = MISSING
    ema_save: bool = MISSING
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

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")  # where this project trains (Lightning names)


def config_options(group: str) -> str:
    """The options of a config group, for the --help text: ``cifar, digits, fashion, folder, mnist``."""
    return ", ".join(sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")))


def _get(settings: dict, key: str) -> Any:
    node: Any = settings
    for part in key.split("."):
        node = node[part]
    return node


def _integer(settings: dict, key: str, minimum: int, fix: str, *, allowed: tuple = ()) -> None:
    checks.whole_number(key, _get(settings, key), minimum, fix, allowed=allowed)


def _number(settings: dict, key: str, low: float, high: float, fix: str, **ends: bool) -> None:
    checks.number(key, _get(settings, key), low, high, fix, **ends)


def _choice(settings: dict, key: str, choices: tuple) -> None:
    checks.choice(key, _get(settings, key), choices)


def _by_the_core(key: str, value: Any, check: Callable[[Any], None]) -> None:
    """A setting checked by the core's own check of the argument it becomes (the one definition of its range),
    reported under the user's key."""
    try:
        check(value)
    except SettingError as error:
        raise SettingError(f"{key}={value!r}: {error}") from None


def check_sampler(settings: dict, key: str = "sampler") -> None:
    sampler = _get(settings, key)
    _integer(settings, f"{key}.steps", 1, f"give the sampler's number of steps, e.g. {key}.steps=50")
    if "spacing" in sampler:
        _choice(settings, f"{key}.spacing", get_args(Spacing))
    if "eta" in sampler:
        _by_the_core(f"{key}.eta", sampler["eta"], check_eta)
    if "variance" in sampler and sampler["variance"] is not None:
        _choice(settings, f"{key}.variance", get_args(Variance))
    if "s_churn" in sampler:
        churn = {k: sampler[k] for k in ("s_churn", "s_min", "s_max", "s_noise")}
        _by_the_core(f"{key}.s_churn", sampler["s_churn"], lambda _: check_churn(**churn))
    if "corrector_steps" in sampler:
        _integer(settings, f"{key}.corrector_steps", 0, f"0 runs no Langevin corrector, e.g. {key}.corrector_steps=1")
    if "snr" in sampler:
        _number(settings, f"{key}.snr", 0, float("inf"), "the corrector's signal-to-noise ratio, 0.16", open_low=True)


def check_known_keys(settings: dict, group: str, schema: type) -> None:
    """Keys added with ``+group.key=...`` (Hydra's own hint for a key it does not know) that the group does not
    have: a typo would otherwise reach a constructor as an unexpected argument."""
    checks.known_keys(group, settings[group], [f.name for f in fields(schema)])


def check_module_keys(settings: dict) -> None:
    """The keys of ``model`` and ``diffusion`` that the training module reads itself, not the network or the
    objective."""
    for key in ("compile", "channels_last", "checkpointing"):
        checks.flag(f"model.{key}", settings["model"].get(key))
    _number(
        settings, "diffusion.label_dropout", 0, 1,
        "it is the share of labels dropped for classifier-free guidance, e.g. 0.1 (1 or more would drop them all)",
        open_high=True,
    )  # fmt: skip


def check_optimizer(settings: dict) -> None:
    _number(settings, "optimizer.lr", 0, float("inf"), "give a learning rate, e.g. optimizer.lr=2e-4", open_low=True)
    betas = settings["optimizer"]["betas"]
    ok = isinstance(betas, list) and len(betas) == 2 and all(checks.is_number(b) and 0 <= b < 1 for b in betas)
    if not ok:
        checks.fail("optimizer.betas", betas, "is not two numbers in [0, 1)", "e.g. optimizer.betas=[0.9,0.999]")
    _number(settings, "optimizer.eps", 0, float("inf"), "e.g. 1e-8", open_low=True)
    _number(settings, "optimizer.weight_decay", 0, float("inf"), "0 for none")
    _integer(settings, "optimizer.warmup_steps", 0, "0 starts at the full learning rate")
    _choice(settings, "optimizer.lr_schedule", get_args(LRShape))
    _number(settings, "optimizer.min_lr_ratio", 0, 1, "e.g. 0.05")


def check_dataset(settings: dict) -> None:
    _integer(settings, "dataset.batch_size", 1, "give the images per batch and device, e.g. dataset.batch_size=64")
    _integer(settings, "dataset.image_size", 4, "give the image side in pixels, e.g. dataset.image_size=32")
    _number(settings, "dataset.val_fraction", 0, 1, "the share held out for val/loss, e.g. 0.05", open_high=True)
    _integer(settings, "dataset.num_workers", 0, "0 loads in the training process")
    _integer(settings, "dataset.num_classes", 1, "null for a dataset without classes", allowed=(None,))
    background = settings["dataset"]["background"]
    if not (isinstance(background, list) and len(background) == 3 and all(0 <= v <= 255 for v in background)):
        checks.fail(
            "dataset.background", background, "is not an RGB colour", "three values in 0-255, e.g. [255,255,255]"
        )


def check_callbacks(settings: dict) -> None:
    """The settings of the project's own callbacks; Lightning's own are checked by Lightning (see train.build)."""
    callbacks = settings.get("callbacks") or {}
    if callbacks.get("ema"):
        _number(settings, "callbacks.ema.half_life_images", 0, float("inf"), "e.g. 8850", open_low=True)
        _number(settings, "callbacks.ema.rampup_ratio", 0, 1, "null for no warm-up, e.g. 0.05", open_low=True)
    if callbacks.get("fid"):
        _integer(settings, "callbacks.fid.every_n_epochs", 0, "0 switches the training FID off")
        for key in ("num_samples", "reference_images", "batch_size"):
            _integer(settings, f"callbacks.fid.{key}", 1, f"e.g. callbacks.fid.{key}=1000")
        _integer(settings, "callbacks.fid.kid_subset_size", 2, "e.g. callbacks.fid.kid_subset_size=1000")
        _integer(settings, "callbacks.fid.steps", 1, "or null for the sampler's own", allowed=(None,))
        check_sampler(settings, "callbacks.fid.sampler")
    if callbacks.get("model_checkpoint"):
        _integer(settings, "callbacks.model_checkpoint.every_n_train_steps", 0, "0: only last.ckpt, e.g. 1000")
        _integer(settings, "callbacks.model_checkpoint.save_top_k", -1, "-1 keeps every periodic checkpoint")
    if callbacks.get("previews"):
        for key in ("num_images", "gif_images"):
            _integer(settings, f"callbacks.previews.{key}", 1, f"e.g. callbacks.previews.{key}=16")
        _integer(settings, "callbacks.previews.gif_frames", 0, "0 writes no GIF, e.g. callbacks.previews.gif_frames=40")
        _integer(settings, "callbacks.previews.steps", 1, "or null for the sampler's own", allowed=(None,))
        _number(settings, "callbacks.previews.guidance", 0, float("inf"), "1 is no guidance, e.g. 3.0")


def check_sampling_steps(settings: dict, max_steps: int | None) -> None:
    """The steps the callbacks draw with (their own, or the sampler's), at most ``max_steps``, the levels of the
    objective (its rows, for a discrete one; ``None``: any number)."""
    if max_steps is None:
        return
    for name in ("previews", "fid"):
        callback = (settings.get("callbacks") or {}).get(name)
        steps = callback and (callback.get("steps") or settings["sampler"]["steps"])
        if steps and steps > max_steps:
            key = f"callbacks.{name}.steps" if callback.get("steps") else "sampler.steps"
            checks.fail(
                key, steps, f"is more than the {max_steps} noise levels of this model (diffusion.timesteps)", "lower it"
            )


def check_train(settings: dict, cuda_available: bool) -> None:
    """The ranges of train.py's settings (plain, resolved), but for the network's and the objective's own (see the
    module docstring)."""
    for group, schema in (("dataset", DatasetSettings), ("optimizer", OptimizerSettings)):
        check_known_keys(settings, group, schema)
    check_dataset(settings)
    check_module_keys(settings)
    check_optimizer(settings)
    check_callbacks(settings)
    check_sampler(settings)
    trainer, optimizer = settings["trainer"], settings["optimizer"]
    if trainer.get("max_steps") == -1:
        if optimizer["lr_schedule"] == "cosine":
            checks.fail(
                "trainer.max_steps",
                -1,
                "(no limit) leaves the cosine learning-rate schedule without a length",
                "give the run a length (trainer.max_steps=N) or use optimizer.lr_schedule=constant",
            )
    else:
        _integer(settings, "trainer.max_steps", 1, "give the number of optimizer steps, e.g. trainer.max_steps=2500")
    accelerator = str(trainer.get("accelerator", "auto"))
    checks.choice("trainer.accelerator", accelerator, ACCELERATORS)
    for key in ("log_every_n_steps", "accumulate_grad_batches"):
        if key in trainer:
            _integer(settings, f"trainer.{key}", 1, f"e.g. trainer.{key}=1")
    if "gradient_clip_val" in trainer:
        _number(settings, "trainer.gradient_clip_val", 0, float("inf"), "null or 0 for no clipping, e.g. 1.0")
    if accelerator in ("gpu", "cuda") and not cuda_available:
        checks.fail(
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
        checks.fail(
            "guidance", settings["guidance"], "is negative", "1 is no guidance, 0 the unconditional model, e.g. 3.0"
        )
    _by_the_core("dynamic_threshold", settings["dynamic_threshold"], check_dynamic_threshold)
    if str(settings["precision"]) not in ("32", "bf16", "16"):
        checks.fail("precision", settings["precision"], "is not one of 32, bf16, 16", "e.g. precision=bf16 on a GPU")
    device = str(settings["device"])
    if device not in ("auto", "cpu", "cuda", "mps") and not (device.startswith("cuda:") and device[5:].isdigit()):
        checks.fail("device", device, "is not a device", "use auto, cpu, cuda or cuda:N")
    if settings["ema_length"] is not None:
        _by_the_core("ema_length", settings["ema_length"], check_sigma_rel)
        if not settings["ema"]:
            checks.fail(
                "ema", False, "samples the raw weights, and ema_length reconstructs an average", "leave ema=true"
            )
    check_sampler(settings)
