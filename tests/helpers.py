"""Test helpers: composing and running the real configs, and dataset files in the formats torchvision reads."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def compose_config(config_name: str, overrides: list[str], run_dir: Path) -> DictConfig:
    """The config ``python {config_name}.py OVERRIDES`` would run with, its outputs in ``run_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = str(run_dir.parent)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # a task function never sees this node; ${hydra:...} resolves through HydraConfig
    return cfg


def run_script(script: str, *args: str, cwd: Path = ROOT, timeout: float = 300, env: dict | None = None):
    """Runs ``python SCRIPT ARGS`` as a user would, returning the completed process (output captured)."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    environment.pop("HYDRA_FULL_ERROR", None)  # the tests read the one-paragraph messages users see
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (the MNIST format): magic 0x0000 08 NDIM, big-endian dimensions, then uint8 data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 96, n_test: int = 32, seed: int = 0) -> np.ndarray:
    """Random 28x28 digits as torchvision's MNIST (or FashionMNIST) raw files; returns the training images."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    write_idx(raw / "train-images-idx3-ubyte", train)
    write_idx(raw / "train-labels-idx1-ubyte", rng.integers(0, 10, n_train, dtype=np.uint8))
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test, dtype=np.uint8))
    return train


def write_cifar(root: Path, per_batch: int = 20, seed: int = 0) -> np.ndarray:
    """Random images as the ``cifar-10-batches-py`` pickles (dicts with 'data' (N, 3072) uint8 and 'labels');
    returns the first training batch's images as (N, 3, 32, 32)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        entry = {"batch_label": name, "data": data, "labels": rng.integers(0, 10, per_batch).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        first = data if first is None else first
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch}, f, protocol=2)
    return first.reshape(-1, 3, 32, 32)


def write_image_folder(root: Path, classes: dict[str, int], seed: int = 0) -> None:
    """Sub-folders of PNG, JPEG and WebP images of mixed sizes and modes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    formats = [("png", "RGB"), ("jpg", "RGB"), ("jpeg", "L"), ("webp", "RGB"), ("png", "RGBA")]
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            ext, mode = formats[i % len(formats)]
            w, h = int(rng.integers(20, 70)), int(rng.integers(20, 70))
            channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
            pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8).squeeze()
            Image.fromarray(pixels, mode=mode if mode != "L" else None).save(root / name / f"img{i}.{ext}")


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class TinyFeatures(torch.nn.Module):
    """A small, fixed feature network for FID in tests (Inception's weights cannot be downloaded here):
    uint8 ``(N, 3, H, W)`` -> ``(N, 16)``."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("weight", torch.randn(16, 3, 3, 3, generator=generator))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1
        return torch.nn.functional.conv2d(x, self.weight, padding=1).relu().mean(dim=(2, 3))


def resume_four_plus_four(overrides: list[str], root: Path) -> tuple[Path, Path]:
    """train.py with ``overrides`` for 8 steps straight (``root/straight``), and for 4 then resumed to 8 from that
    checkpoint (``root/resumed``): the two run folders, whose checkpoints an exact resume makes equal."""
    from train import train  # here, not at the top: tests/test_networks.py's module must not import Lightning

    straight, stopped, resumed = root / "straight", root / "stopped", root / "resumed"
    train(compose_config("train", [*overrides, "trainer.max_steps=8"], straight))
    train(compose_config("train", [*overrides, "trainer.max_steps=4"], stopped))
    ckpt = stopped / "checkpoints" / "last.ckpt"
    train(compose_config("train", [*overrides, "trainer.max_steps=8", f"ckpt_path={ckpt}"], resumed))
    return straight, resumed


def network_preset(cls: type, name: str, **overrides) -> torch.nn.Module:
    """``cls`` built from configs/model/NAME.yaml as train.py builds it (unconditional, one channel, 16x16 unless
    ``overrides`` say otherwise)."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{name}.yaml"))
    config.pop("_target_")
    return cls(**{**config, "num_classes": None, "image_size": 16, "in_channels": 1, "out_channels": 1, **overrides})
