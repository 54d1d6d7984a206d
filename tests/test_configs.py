"""Every option of every config group composes and builds what it describes."""

from __future__ import annotations

import inspect

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback, Trainer
from omegaconf import OmegaConf

from diffusion.core.ema import ema_decay
from diffusion.core.networks.unet import UNet
from diffusion.core.objectives import DDPM, EDM, Objective
from diffusion.core.schedules import make_betas
from diffusion.data.datamodule import DiffusionDataModule
from diffusion.models.building import build as build_network
from diffusion.models.hparams import SPEED_SWITCHES
from diffusion.training.module import DiffusionModule
from tests.helpers import CONFIGS, compose_config
from train import hyperparameters


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def build(cfg):
    hparams = hyperparameters(cfg)
    return DiffusionModule(**hparams), DiffusionDataModule(**hparams["dataset"])


PAPER_SIZED = {"edm2_xs", "edm2_s"}  # 125M and 280M: built on the meta device, without memory or a real forward pass


@pytest.mark.parametrize("option", [o for o in options("model") if o != "custom"])  # custom: tests/test_networks.py
def test_model_options(option, tmp_path):
    config = compose_config("train", [f"model={option}", "dataset=cifar"], tmp_path)
    if option in PAPER_SIZED:  # the network alone, as build_model builds it
        settings = OmegaConf.to_container(config.model, resolve=True)
        settings = {k: v for k, v in settings.items() if k not in SPEED_SWITCHES}
        with torch.device("meta"):
            network = build_network("model", settings, image_size=32, in_channels=3, out_channels=3)
            out = network(torch.zeros(1, 3, 32, 32), torch.tensor([10.0]), None)
    else:
        module, _ = build(config)
        out = module.model.network(torch.zeros(1, 3, 32, 32), torch.tensor([10.0]), None)
    assert out.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("option", options("diffusion"))
def test_diffusion_options(option, tmp_path):
    module, _ = build(compose_config("train", [f"diffusion={option}"], tmp_path))
    objective = module.model.objective
    assert isinstance(objective, Objective)
    batch = (torch.rand(4, 1, 16, 16) * 2 - 1, torch.zeros(4, dtype=torch.long))
    levels = objective.training_levels(4, torch.device("cpu"))
    assert torch.isfinite(module.losses(*batch, levels, torch.randn(4, 1, 16, 16), None)["loss"]).all()


@pytest.mark.parametrize("option", options("dataset"))
def test_dataset_options(option, tmp_path):
    extra = [f"dataset.root={tmp_path}"] if option == "folder" else []
    module, datamodule = build(compose_config("train", [f"dataset={option}", *extra], tmp_path))
    # the default UNet takes this dataset's images as configured
    x = torch.zeros(2, datamodule.channels, datamodule.image_size, datamodule.image_size)
    assert module.model.network(x, torch.tensor([1.0, 500.0]), None).shape == x.shape


@pytest.mark.parametrize("option", options("sampler"))
def test_sampler_options(option, tmp_path):
    cfg = compose_config("train", [f"sampler={option}"], tmp_path)
    sampler = instantiate(cfg.sampler)
    # every sampler takes its steps; those that walk the schedule's rows a spacing, Heun its own sigma grid
    grid = {"sigma_min", "sigma_max", "rho"} if option == "heun" else {"spacing"}
    assert {"steps", *grid} <= set(sampler.keywords) and callable(sampler)


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options_are_trainer_arguments(option, tmp_path):
    cfg = compose_config("train", [f"trainer={option}"], tmp_path)
    accepted = set(inspect.signature(Trainer.__init__).parameters)
    assert set(cfg.trainer) - {"_target_"} <= accepted
    if cfg.trainer.accelerator in ("cpu", "auto"):  # the GPU presets need a GPU to be built
        assert isinstance(instantiate(cfg.trainer, logger=False, enable_checkpointing=False), Trainer)


def test_callback_and_logger_options(tmp_path):
    cfg = compose_config("train", [], tmp_path)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert len(callbacks) == 8 and all(isinstance(c, Callback) for c in callbacks)
    assert [type(instantiate(c)).__name__ for c in cfg.logger.values()] == ["TensorBoardLogger"]


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_options(option, tmp_path):
    extra = [f"dataset.root={tmp_path}"] if option == "folder" else []
    cfg = compose_config("train", [f"experiment={option}", *extra], tmp_path)
    module, datamodule = build(cfg)
    assert module.model.image_shape == (datamodule.channels, datamodule.image_size, datamodule.image_size)


@pytest.mark.parametrize(
    ("size", "levels"),
    [(32, [1, 2, 2, 2]), (64, [1, 2, 3, 4]), (128, [1, 1, 2, 3, 4]), (256, [1, 1, 2, 2, 4, 4])],
)
def test_the_folder_preset_lays_the_unet_out_for_the_image_size(tmp_path, size, levels):
    """experiment=folder at each size with no other override: the reference implementations' levels (four at 32,
    five at 128, six at 256), attention at 16x16 and 8x8 inside the network, the smallest feature map 4 or 8."""
    from diffusion.core.networks.unet import Attention
    from diffusion.models.building import build_model

    overrides = ["experiment=folder", f"dataset.root={tmp_path}", f"dataset.image_size={size}"]
    hparams = hyperparameters(compose_config("train", overrides, tmp_path))
    assert hparams["model"]["channel_mult"] == levels
    with torch.device("meta"):  # the whole network, laid out without memory
        unet = build_model(hparams).network
    assert unet.image_size == size and size // 2 ** (len(levels) - 1) == (4 if size == 32 else 8)
    attention_blocks = sum(isinstance(m, Attention) for m in unet.modules())
    assert attention_blocks > 1  # the middle block's, and those at 16x16 and 8x8


def test_the_paper_preset_is_the_paper_setup(tmp_path):
    cfg = compose_config("train", ["experiment=ddpm_cifar10"], tmp_path)
    module, datamodule = build(cfg)
    assert sum(p.numel() for p in module.model.network.parameters()) == pytest.approx(35.7e6, rel=0.01)
    objective = module.model.objective
    assert isinstance(objective, DDPM) and (objective.target, len(objective), objective.loss) == ("eps", 1000, "mse")
    assert torch.equal(objective.schedule.betas, make_betas("linear", 1000))
    assert (cfg.optimizer.lr, cfg.dataset.batch_size) == (2e-4, 128)
    assert ema_decay(1e9, 128, cfg.callbacks.ema.half_life_images, cfg.callbacks.ema.rampup_ratio) == pytest.approx(
        0.9999, abs=1e-9
    )
    assert datamodule.hflip and cfg.model.dropout == 0.1


def test_every_default_lives_in_the_yaml(tmp_path):
    """Constructors of the configured classes take no defaults of their own (style: one place per default)."""
    for cls in (DiffusionModule, DiffusionDataModule, DDPM, EDM, UNet):
        params = inspect.signature(cls.__init__).parameters.values()
        assert all(p.default is inspect.Parameter.empty for p in params if p.name != "self"), cls
