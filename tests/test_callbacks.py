"""Callbacks and writers: the non-finite guard, grids, GIFs and npz files (the EMA: test_ema.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.errors import RunError
from diffusion.outputs.writers import grid_image, write_gif, write_grid, write_npz
from diffusion.training.callbacks import NonFiniteLossGuard


def fake_trainer(**fields):
    strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce_boolean_decision=lambda flag, all=True: flag)
    defaults = dict(global_step=0, log_every_n_steps=5, strategy=strategy, checkpoint_callback=None, callbacks=[])
    return SimpleNamespace(**{**defaults, **fields})


def test_nonfinite_guard_stops_at_its_next_check_and_names_the_last_checkpoint():
    guard = NonFiniteLossGuard()
    checkpoint = SimpleNamespace(last_model_path="run/checkpoints/last.ckpt")
    for step, loss in enumerate([1.0, 0.5, float("nan"), 0.4], start=1):
        trainer = fake_trainer(global_step=step, checkpoint_callback=checkpoint)
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, 0)  # no check before step 5
    with pytest.raises(RunError, match=r"between steps 0 and 4.*last good checkpoint is run/checkpoints/last.ckpt"):
        guard.on_save_checkpoint(fake_trainer(global_step=4, checkpoint_callback=checkpoint), None, {})


def test_nonfinite_guard_lets_finite_losses_through():
    guard = NonFiniteLossGuard()
    for step in range(1, 12):
        guard.on_train_batch_end(fake_trainer(global_step=step), None, {"loss": torch.tensor(0.1)}, None, 0)
    guard.on_save_checkpoint(fake_trainer(global_step=11), None, {})


def test_grid_enlarges_small_images_and_lays_them_out(tmp_path):
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    grid = grid_image(images, nrow=3)
    assert grid.shape == (2 * 66 + 2, 3 * 66 + 2, 3) and grid.dtype == np.uint8  # 16 px x4 + 2 px padding
    path = write_grid(images, tmp_path / "grid.png", nrow=3)
    assert Image.open(path).size == (3 * 66 + 2, 2 * 66 + 2)


def test_gif_holds_the_last_frame_and_loops(tmp_path):
    frames = [torch.full((2, 3, 8, 8), v, dtype=torch.uint8) for v in (0, 100, 255)]
    path = write_gif(frames, tmp_path / "process.gif", seconds=3.0, hold_last=2.0)
    read = iio.imread(path, index=None)
    assert read.shape[0] == 3
    durations = [iio.immeta(path, index=i)["duration"] for i in range(3)]
    assert durations[0] == 1000 and durations[-1] == 3000
    assert iio.immeta(path, index=0).get("loop", 0) == 0
    assert read[-1].mean() > 200 and read[0][8:-8, 8:-8].mean() < 60


def test_npz_has_the_evaluation_suite_layout(tmp_path):
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    path = write_npz(images, tmp_path / "samples.npz", labels=torch.arange(5))
    data = np.load(path)
    assert data["arr_0"].shape == (5, 8, 8, 3) and data["arr_0"].dtype == np.uint8
    assert np.array_equal(data["arr_0"], images.permute(0, 2, 3, 1).numpy()) and data["labels"].tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = write_grid(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), tmp_path / "grid.png")
    before = path.read_bytes()

    def interrupted(target, *args, **kwargs):
        Path(target).write_bytes(b"half a PNG")
        raise KeyboardInterrupt

    monkeypatch.setattr("diffusion.outputs.writers.iio.imwrite", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_grid(torch.full((1, 1, 8, 8), 255, dtype=torch.uint8), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
