"""The settings of train.py and sample.py: their typed schema, and the checks of their ranges.

The schema is made of dataclasses that Hydra composes the YAML files onto (its "structured configs": the entry
points register them as ``train_schema`` and ``sample_schema``, first in the defaults lists), so a value of the
wrong type or a key that does not exist stops the run when the command line is read, with Hydra's message naming
the key. No field has a default here: every default lives in the YAML. Ranges and combinations, which a type
cannot say, are checked by :func:`check_train` and :func:`check_sample` on the plain resolved settings, before any
work starts; each problem is one :class:`~diffusion.errors.SettingError` that names the key, the value and the fix
(:mod:`diffusion.checks`). Every number has its range in one table, :data:`TRAIN_RANGES`, :data:`SAMPLER_RANGES`
and :data:`SAMPLE_RANGES` (tests/test_settings.py fails on a numeric setting of any config without one); a few
settings whose check is more than a range (lists, choices, combinations) are checked in code, and named in
:data:`CHECKED_IN_CODE`.

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
from diffusion.checks import Range
from diffusion.core.denoiser import check_dynamic_threshold
from diffusion.core.lr_schedule import LRShape
from diffusion.core.posthoc_ema import check_sigma_rel
from diffusion.core.reverse import Variance
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
    t_ref: int = MISSING
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
FEATURES = (64, 192, 768, 2048)  # torch-fidelity's Inception-v3 feature sizes, for FID and KID

DROPOUT = "the share of labels dropped for classifier-free guidance, e.g. 0.1 (1 or more would drop them all)"
EVERY_N_EPOCHS = "e.g. trainer.check_val_every_n_epoch=5, or null with trainer.val_check_interval=STEPS"

# The options of a sampler, wherever one is configured: sampler, callbacks.previews.sampler, callbacks.fid.sampler.
SAMPLER_RANGES = {
    "steps": Range(1, whole=True, fix="give the sampler's number of steps, e.g. {key}=50"),
    "eta": Range(0, 1, fix="0 is deterministic DDIM, 1 ancestral"),
    "corrector_steps": Range(0, whole=True, fix="0 runs no Langevin corrector, e.g. {key}=1"),
    "snr": Range(0, open_low=True, fix="the corrector's signal-to-noise ratio, e.g. 0.16"),
    "sigma_min": Range(0, open_low=True, fix="the smallest sigma of Heun's grid, e.g. 0.002"),
    "sigma_max": Range(0, open_low=True, fix="the largest sigma of Heun's grid, e.g. 80"),
    "rho": Range(0, open_low=True, fix="the exponent of Heun's grid, EDM's 7"),
    "s_churn": Range(0, fix="the total churn, 0 for the deterministic Algorithm 1"),
    "s_min": Range(0, fix="the smallest sigma that churns, e.g. 0.05"),
    "s_max": Range(0, fix="the largest sigma that churns, e.g. 50 (.inf: all)"),
    "s_noise": Range(0, open_low=True, fix="the scale of the churn's noise, e.g. 1.003"),
}
SAMPLERS = ("sampler", "callbacks.previews.sampler", "callbacks.fid.sampler")

TRAIN_RANGES = {
    "seed": Range(0, 2**32 - 1, whole=True, fix="e.g. seed=0"),
    "dataset.image_size": Range(4, whole=True, fix="give the image side in pixels, e.g. dataset.image_size=32"),
    "dataset.channels": Range(1, 3, whole=True, fix="1 (grayscale) or 3 (RGB)"),
    "dataset.num_classes": Range(1, whole=True, allowed=(None,), fix="null for a dataset without classes"),
    "dataset.batch_size": Range(1, whole=True, fix="give the images per batch and device, e.g. dataset.batch_size=64"),
    "dataset.val_fraction": Range(0, 1, open_low=True, open_high=True, fix="the share held out, e.g. 0.05"),
    "dataset.num_workers": Range(0, whole=True, fix="0 loads in the training process"),
    "diffusion.label_dropout": Range(0, 1, open_high=True, fix=DROPOUT),
    "optimizer.lr": Range(0, open_low=True, fix="give a learning rate, e.g. optimizer.lr=2e-4"),
    "optimizer.eps": Range(0, open_low=True, fix="e.g. 1e-8"),
    "optimizer.weight_decay": Range(0, fix="0 for none"),
    "optimizer.warmup_steps": Range(0, whole=True, fix="0 starts at the full learning rate"),
    "optimizer.min_lr_ratio": Range(0, 1, fix="e.g. 0.05"),
    "optimizer.t_ref": Range(1, whole=True, fix="the optimizer step where the inv_sqrt decay starts, e.g. 70000"),
    "trainer.max_steps": Range(1, whole=True, allowed=(-1,), fix="give the number of optimizer steps, e.g. {key}=2500"),
    "trainer.max_epochs": Range(1, whole=True, allowed=(-1, None), fix="-1 for no limit (trainer.max_steps ends it)"),
    "trainer.devices": Range(1, whole=True, allowed=(-1,), others="Lightning", fix="e.g. {key}=2, or -1 for all"),
    "trainer.num_nodes": Range(1, whole=True, fix="e.g. {key}=1"),
    "trainer.log_every_n_steps": Range(1, whole=True, fix="e.g. {key}=25"),
    "trainer.accumulate_grad_batches": Range(1, whole=True, fix="1 steps after every batch"),
    "trainer.gradient_clip_val": Range(0, allowed=(None,), fix="null or 0 for no clipping, e.g. 1.0"),
    "trainer.check_val_every_n_epoch": Range(1, whole=True, allowed=(None,), fix=EVERY_N_EPOCHS),
    "trainer.val_check_interval": Range(0, open_low=True, allowed=(None,), fix="steps (an int) or a share of an epoch"),
    "trainer.limit_val_batches": Range(0, fix="batches (an int) or a share of the validation split (a float to 1.0)"),
    "trainer.num_sanity_val_steps": Range(-1, whole=True, fix="0 for none, -1 for all"),
    "callbacks.ema.half_life_images": Range(0, open_low=True, fix="e.g. 8850"),
    "callbacks.ema.rampup_ratio": Range(0, 1, open_low=True, allowed=(None,), fix="null for no warm-up, e.g. 0.05"),
    "callbacks.posthoc_ema.every_n_images": Range(0, whole=True, fix="0 switches post-hoc EMA off, e.g. 131072"),
    "callbacks.previews.every_n_steps": Range(0, whole=True, fix="0 draws only at the end, e.g. {key}=500"),
    "callbacks.previews.steps": Range(1, whole=True, allowed=(None,), fix="or null for the sampler's own"),
    "callbacks.previews.num_images": Range(1, whole=True, fix="e.g. {key}=64"),
    "callbacks.previews.gif_images": Range(1, whole=True, fix="e.g. {key}=16"),
    "callbacks.previews.gif_frames": Range(0, whole=True, fix="0 writes no GIF, e.g. {key}=40"),
    "callbacks.previews.guidance": Range(0, fix="1 is no guidance, e.g. 3.0"),
    "callbacks.previews.seed": Range(0, 2**32 - 1, whole=True, fix="e.g. {key}=0"),
    "callbacks.fid.every_n_epochs": Range(0, whole=True, fix="0 switches the training FID off"),
    "callbacks.fid.steps": Range(1, whole=True, allowed=(None,), fix="or null for the sampler's own"),
    "callbacks.fid.num_samples": Range(1, whole=True, fix="e.g. {key}=1000"),
    "callbacks.fid.reference_images": Range(1, whole=True, fix="e.g. {key}=10000"),
    "callbacks.fid.batch_size": Range(1, whole=True, fix="e.g. {key}=250"),
    "callbacks.fid.kid_subset_size": Range(2, whole=True, fix="e.g. {key}=1000"),
    "callbacks.fid.seed": Range(0, 2**32 - 1, whole=True, fix="e.g. {key}=0"),
    "callbacks.model_checkpoint.every_n_train_steps": Range(0, whole=True, fix="0: only last.ckpt, e.g. 1000"),
    "callbacks.model_checkpoint.save_top_k": Range(-1, whole=True, fix="-1 keeps every periodic checkpoint"),
    "callbacks.progress_bar.refresh_rate": Range(0, whole=True, fix="steps between updates, 0 for no bar"),
}

SAMPLE_RANGES = {
    "n": Range(1, whole=True, fix="give the number of images, e.g. n=64"),
    "batch_size": Range(1, whole=True, fix="give the images per batch, e.g. batch_size=64"),
    "guidance": Range(0, fix="1 is no guidance, 0 the unconditional model, e.g. 3.0"),
    "seed": Range(0, 2**32 - 1, whole=True, fix="e.g. seed=0"),
    "grid_images": Range(1, whole=True, fix="give the images in grid.png, e.g. grid_images=64"),
    "gif_images": Range(1, whole=True, fix="give the images in process.gif, e.g. gif_images=16"),
    "gif_frames": Range(2, whole=True, fix="give the frames of process.gif, e.g. gif_frames=60"),
    "eval.batches": Range(1, whole=True, allowed=(None,), fix="null for the whole split, e.g. eval.batches=10"),
    "eval.reference_images": Range(1, whole=True, allowed=(None,), fix="null for all the training images"),
    "eval.kid_subset_size": Range(2, whole=True, fix="e.g. eval.kid_subset_size=1000"),
    "eval.probes": Range(1, whole=True, fix="e.g. eval.probes=1 (more: a less noisy trace, slower)"),
    "eval.rtol": Range(0, 1, open_low=True, open_high=True, fix="e.g. {key}=1e-5 (Song et al.'s)"),
    "eval.atol": Range(0, 1, open_low=True, open_high=True, fix="e.g. {key}=1e-5 (Song et al.'s)"),
}

# Numeric settings checked in code rather than by a range: lists, choices among numbers, and settings whose range
# is the core's own check (one definition, the one the code that uses them runs).
CHECKED_IN_CODE = (
    "dataset.background",  # three values in 0-255
    "optimizer.betas",  # two numbers in [0, 1)
    "callbacks.posthoc_ema.sigma_rels",  # lengths in the post-hoc EMA's range (diffusion.core.posthoc_ema)
    "callbacks.fid.feature",  # an Inception feature size, or a feature network
    "eval.feature",
    "ema_length",  # sample.py: a length in the post-hoc EMA's range
    "dynamic_threshold",  # sample.py: a percentile (diffusion.core.denoiser)
)


def config_options(group: str) -> str:
    """The options of a config group, for the --help text: ``cifar, digits, fashion, folder, mnist``."""
    return ", ".join(sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")))


def _lookup(settings: dict, key: str) -> tuple[bool, Any]:
    """(found, value) of a dotted ``key``; not found when a group on the way is absent (``~callbacks.fid``)."""
    node: Any = settings
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_ranges(settings: dict, table: dict[str, Range]) -> None:
    """Every setting of ``table`` that ``settings`` has, in its range."""
    for key, allowed in table.items():
        found, value = _lookup(settings, key)
        if found:
            allowed.check(key, value)


def _by_the_core(key: str, value: Any, check: Callable[[Any], None]) -> None:
    """A setting checked by the core's own check of the argument it becomes (the one definition of its range),
    reported under the user's key."""
    try:
        check(value)
    except SettingError as error:
        raise SettingError(f"{key}={value!r}: {error}") from None


def check_sampler(settings: dict, key: str) -> None:
    """A sampler's choices and combinations (its numbers are in :data:`SAMPLER_RANGES`)."""
    found, sampler = _lookup(settings, key)
    if not found:
        return
    if "spacing" in sampler:
        checks.choice(f"{key}.spacing", sampler["spacing"], get_args(Spacing))
    if "variance" in sampler and sampler["variance"] is not None:
        checks.choice(f"{key}.variance", sampler["variance"], get_args(Variance))
    if "s_churn" in sampler:
        churn = {k: sampler[k] for k in ("s_churn", "s_min", "s_max", "s_noise")}
        _by_the_core(f"{key}.s_churn", sampler["s_churn"], lambda _: check_churn(**churn))
    if "sigma_min" in sampler and sampler["sigma_min"] > sampler["sigma_max"]:
        checks.fail(f"{key}.sigma_min", sampler["sigma_min"], f"lies above {key}.sigma_max", "lower it")


def check_known_keys(settings: dict, group: str, schema: type) -> None:
    """Keys added with ``+group.key=...`` (Hydra's own hint for a key it does not know) that the group does not
    have: a typo would otherwise reach a constructor as an unexpected argument."""
    checks.known_keys(group, settings[group], [f.name for f in fields(schema)])


def check_background(settings: dict) -> None:
    background = settings["dataset"]["background"]
    ok = isinstance(background, list) and len(background) == 3
    if not (ok and all(checks.is_number(v) and 0 <= v <= 255 for v in background)):
        checks.fail(
            "dataset.background", background, "is not an RGB colour", "three values in 0-255, e.g. [255,255,255]"
        )


def check_lists(settings: dict) -> None:
    """The numeric lists and choices of :data:`CHECKED_IN_CODE` that train.py takes."""
    betas = settings["optimizer"]["betas"]
    ok = isinstance(betas, list) and len(betas) == 2 and all(checks.is_number(b) and 0 <= b < 1 for b in betas)
    if not ok:
        checks.fail("optimizer.betas", betas, "is not two numbers in [0, 1)", "e.g. optimizer.betas=[0.9,0.999]")
    check_background(settings)
    callbacks = settings.get("callbacks") or {}
    if callbacks.get("posthoc_ema"):
        lengths = callbacks["posthoc_ema"]["sigma_rels"]
        if not isinstance(lengths, list) or not lengths or len(set(lengths)) != len(lengths):
            why = "is not a list of different lengths"
            checks.fail("callbacks.posthoc_ema.sigma_rels", lengths, why, "e.g. [0.05,0.1]")
        _by_the_core("callbacks.posthoc_ema.sigma_rels", lengths, check_sigma_rel)
    if callbacks.get("fid"):
        check_feature(settings, "callbacks.fid.feature")


def check_feature(settings: dict, key: str) -> None:
    """FID's features: an Inception-v3 size of torch-fidelity's, or a feature network (a node with ``_target_``)."""
    found, feature = _lookup(settings, key)
    if found and not isinstance(feature, dict):
        checks.choice(key, feature, FEATURES)


def check_module_keys(settings: dict) -> None:
    """The keys of ``model`` that the training module reads itself, not the network."""
    for key in ("compile", "channels_last", "checkpointing"):
        checks.flag(f"model.{key}", settings["model"].get(key))


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
            why = f"is more than the {max_steps} noise levels of this model (diffusion.timesteps)"
            checks.fail(key, steps, why, "lower it")


def check_train(settings: dict, cuda_available: bool) -> None:
    """The ranges of train.py's settings (plain, resolved), but for the network's and the objective's own (see the
    module docstring)."""
    for group, schema in (("dataset", DatasetSettings), ("optimizer", OptimizerSettings)):
        check_known_keys(settings, group, schema)
    check_ranges(settings, TRAIN_RANGES | {f"{at}.{name}": r for at in SAMPLERS for name, r in SAMPLER_RANGES.items()})
    check_lists(settings)
    check_module_keys(settings)
    checks.choice("optimizer.lr_schedule", settings["optimizer"]["lr_schedule"], get_args(LRShape))
    for key in SAMPLERS:
        check_sampler(settings, key)
    trainer = settings["trainer"]
    if trainer.get("max_steps") == -1 and settings["optimizer"]["lr_schedule"] == "cosine":
        checks.fail(
            "trainer.max_steps",
            -1,
            "(no limit) leaves the cosine learning-rate schedule without a length",
            "give the run a length (trainer.max_steps=N) or use optimizer.lr_schedule=constant",
        )
    accelerator = str(trainer.get("accelerator", "auto"))
    checks.choice("trainer.accelerator", accelerator, ACCELERATORS)
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
    check_ranges(settings, SAMPLE_RANGES | {f"sampler.{name}": r for name, r in SAMPLER_RANGES.items()})
    check_sampler(settings, "sampler")
    check_feature(settings, "eval.feature")
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
