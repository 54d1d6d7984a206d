"""Integration tests of train.py: real runs of a few steps with the tiny model, on every dataset kind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion.errors import RunError
from diffusion.training.module import LossByQuartile
from tests.helpers import compose_config, load_state, run_script, write_cifar, write_image_folder, write_mnist
from train import train

FASHION = Path("/usr/share/datasets/fashion-mnist")
TINY_FEATURES = "callbacks.fid.feature={_target_:tests.helpers.TinyFeatures}"


def run_train(run_dir: Path, *overrides: str) -> dict[str, float]:
    return train(compose_config("train", ["debug=smoke", *overrides], run_dir))


def test_default_digits_run_writes_checkpoints_samples_and_tensorboard(tmp_path):
    run = tmp_path / "run"
    # batch 256: an epoch is 6 steps, so the epoch-level quartile losses are logged too
    metrics = run_train(run, "dataset.batch_size=256", "trainer.max_steps=8", "trainer.val_check_interval=4")
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert {p.name for p in (run / "checkpoints").glob("step_*.ckpt")} >= {"step_0000004.ckpt", "step_0000008.ckpt"}
    assert (run / "samples" / "step_0000008.png").is_file() and (run / "samples" / "step_0000008.gif").is_file()
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "val/loss"} | {f"train/loss_q{q}" for q in range(4)}
    assert expected <= scalars, expected - scalars
    assert "samples/grid" in images
    assert (run / "tensorboard" / "hparams.yaml").is_file()
    checkpoint = load_state(run / "checkpoints" / "last.ckpt")  # weights_only: plain containers throughout
    assert checkpoint["global_step"] == 8 and set(checkpoint["hyper_parameters"]) == {
        "model",
        "diffusion",
        "optimizer",
        "dataset",
    }


def test_the_loss_by_quartile_is_the_mean_of_each_quartile():
    metric = LossByQuartile()
    torch.manual_seed(0)
    losses, t = torch.rand(3, 64), torch.randint(0, 750, (3, 64))  # the last quartile never drawn
    for batch in range(3):
        metric.update(losses[batch], t[batch] * 4 // 1000)
    values = metric.compute()
    for q in range(3):
        torch.testing.assert_close(values[q], losses[t * 4 // 1000 == q].mean())
    assert values[3].isnan()
    with torch.device("meta"):  # an update reads nothing on the host (that would raise on meta): no GPU sync
        on_meta = LossByQuartile()
    on_meta.update(torch.rand(8, device="meta"), torch.zeros(8, dtype=torch.long, device="meta"))


def test_mnist_from_idx_files(tmp_path):
    write_mnist(tmp_path / "data")
    run = tmp_path / "run"
    run_train(
        run, "dataset=mnist", f"dataset.root={tmp_path / 'data'}", "dataset.download=false", "dataset.batch_size=16"
    )
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_cifar_from_python_pickles(tmp_path):
    write_cifar(tmp_path / "data")
    run = tmp_path / "run"
    run_train(
        run, "dataset=cifar", f"dataset.root={tmp_path / 'data'}", "dataset.download=false", "dataset.batch_size=16"
    )
    state = load_state(run / "checkpoints" / "last.ckpt")
    assert state["hyper_parameters"]["dataset"]["channels"] == 3


def test_folder_of_mixed_images_with_class_labels(tmp_path):
    write_image_folder(tmp_path / "images", {"cats": 12, "dogs": 12})
    run = tmp_path / "run"
    run_train(
        run,
        "dataset=folder",
        f"dataset.root={tmp_path / 'images'}",
        "dataset.image_size=32",
        "dataset.batch_size=8",
        "dataset.num_workers=0",
        "dataset.labels_from_subfolders=true",
        "model.num_classes=2",
    )
    assert (run / "samples" / "step_0000004.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("size", [128, 256])
def test_the_folder_preset_trains_and_previews_at_128_and_256(tmp_path, size):
    """experiment=folder at its layout for the size (five and six levels), narrowed to 8 base channels so that a
    CPU step at batch 1 takes seconds, for 2 steps with its preview and checkpoint."""
    write_image_folder(tmp_path / "images", {"all": 3})
    run = tmp_path / "run"
    run_train(
        run, "experiment=folder", f"dataset.root={tmp_path / 'images'}", f"dataset.image_size={size}",
        "dataset.batch_size=1", "model.base_channels=8", "trainer.max_steps=2", "trainer.limit_val_batches=1",
        "callbacks.previews.num_images=1", "callbacks.previews.gif_images=1", "callbacks.previews.steps=2",
    )  # fmt: skip
    state = load_state(run / "checkpoints" / "last.ckpt")
    levels = len(state["hyper_parameters"]["model"]["channel_mult"])
    assert state["global_step"] == 2 and levels == {128: 5, 256: 6}[size]
    assert (run / "samples" / "step_0000002.png").is_file()


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(tmp_path):
    run = tmp_path / "run"
    run_train(run, "dataset=fashion", f"dataset.root={tmp_path / 'data'}", "dataset.download=false")
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").stat().st_size == 47040016


@pytest.mark.parametrize("loader", [[], ["dataset.on_device=false", "dataset.hflip=true"]], ids=["device", "workers"])
def test_resume_continues_exactly(tmp_path, loader):
    """4 steps, stop, resume to 8 == 8 steps straight: model, EMA, optimizer, LR, RNG and data position resume.
    Batch 48 puts the stop in the middle of an epoch (35 batches of the 1,707 training digits). Through a DataLoader
    too, with random flips: its iterator, made after the RNG state was restored, drew from the global generator."""
    common = ["dataset.batch_size=48", "callbacks.model_checkpoint.every_n_train_steps=4", "~callbacks.previews"]
    common += loader
    straight = tmp_path / "straight"
    run_train(straight, *common, "trainer.max_steps=8")
    stopped = tmp_path / "stopped"
    run_train(stopped, *common, "trainer.max_steps=4")
    resumed = tmp_path / "resumed"
    run_train(resumed, *common, "trainer.max_steps=8", f"ckpt_path={stopped / 'checkpoints' / 'last.ckpt'}")
    a, b = load_state(straight / "checkpoints" / "last.ckpt"), load_state(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    for key in ("state_dict", "current_model_state"):  # the EMA and the raw weights
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 8


def test_help_lists_the_groups_each_script_takes():
    result = run_script("train.py", "--help")
    for group in ("dataset", "model", "diffusion", "sampler", "trainer", "callbacks", "logger", "experiment"):
        assert f"  {group}:" in result.stdout
    assert (
        "dataset: cifar, digits, fashion, folder, mnist, streaming" in result.stdout and "  eval:" not in result.stdout
    )
    result = run_script("sample.py", "--help")
    assert "  sampler: ddim, ddpm, dpm_solver, euler, heun, ode, sde" in result.stdout
    assert "  eval: fid, nll" in result.stdout
    assert "  dataset:" not in result.stdout and "  diffusion:" not in result.stdout


# ---------------------------------------------------------------- bad input: one-paragraph messages


def assert_one_paragraph_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-2000:]


def test_unknown_dataset_lists_the_valid_ones(tmp_path):
    result = run_script("train.py", "dataset=imagenet", f"hydra.run.dir={tmp_path}")
    assert "dataset" in result.stderr and "digits" in result.stderr and "cifar" in result.stderr


def test_a_missing_checkpoint_stops_with_a_message(tmp_path):
    result = run_script(
        "train.py", "debug=smoke", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert_one_paragraph_error(result, "error: no checkpoint at", "nope.ckpt")


def test_an_image_size_the_model_cannot_take(tmp_path):
    with pytest.raises(ValueError, match=r"image_size=28 does not fit .* near it: \[24, 32\]"):
        run_train(tmp_path / "run", "model=small", "dataset.image_size=28")


def test_a_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(RunError, match="not a readable checkpoint"):
        run_train(tmp_path / "run", f"ckpt_path={bad}")


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    run_train(tmp_path / "first", "~callbacks.previews")
    with pytest.raises(RunError, match=r"trained with other settings \(model.base_channels: 32 -> 16"):
        run_train(
            tmp_path / "second", "model.base_channels=16", f"ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}"
        )


def test_an_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match=r"holds no images: it looks for files ending in \.png"):
        run_train(tmp_path / "run", "dataset=folder", f"dataset.root={tmp_path / 'empty'}", "dataset.num_workers=0")


def test_an_unreadable_folder_is_refused(tmp_path):
    (tmp_path / "broken").mkdir()
    for i in range(3):
        (tmp_path / "broken" / f"x{i}.png").write_bytes(b"not a png")
    with pytest.raises(RunError, match=r"none of the 3 image files .* could be read"):
        run_train(tmp_path / "run", "dataset=folder", f"dataset.root={tmp_path / 'broken'}", "dataset.num_workers=0")


def test_offline_without_the_data_says_where_to_put_it(tmp_path):
    with pytest.raises(RunError, match=r"MNIST is not in .*MNIST/raw .* Place the four IDX files"):
        run_train(tmp_path / "run", "dataset=mnist", f"dataset.root={tmp_path / 'data'}", "dataset.download=false")
    with pytest.raises(RunError, match=r"CIFAR-10 is not in .*cifar-10-batches-py"):
        run_train(tmp_path / "run2", "dataset=cifar", f"dataset.root={tmp_path / 'data'}", "dataset.download=false")


@pytest.mark.parametrize(("diffusion", "what"), [("ddpm", "the loss"), ("edm", "the weights")])
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, diffusion, what):
    """A learning rate of 1e12 blows the weights up within a few steps; the run stops with a message, and the
    last checkpoint on disk holds finite weights. DDPM's loss turns NaN first; EDM's weights turn infinite one step
    before its loss does, so only a check of the weights keeps them out of the checkpoint."""
    run = tmp_path / "run"
    result = run_script(
        "train.py",
        "debug=smoke",
        f"diffusion={diffusion}",
        "~callbacks.previews",
        "optimizer.lr=1e12",
        "optimizer.warmup_steps=0",
        "trainer.gradient_clip_val=null",
        "trainer.max_steps=40",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "trainer.log_every_n_steps=5",
        f"hydra.run.dir={run}",
    )
    assert_one_paragraph_error(
        result, f"error: training stopped: {what} became NaN or infinite", "last good checkpoint"
    )
    state = load_state(run / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(v).all() for v in state["current_model_state"].values())
    assert state["global_step"] < 40


def test_tensorboard_holds_the_hyperparameters_and_the_training_fid(tmp_path):
    """With the default log_every_n_steps (25), a 7-step run still records its FID/KID (computed at the end of its
    one epoch of 7 batches, step 7) and the HPARAMS tab: the settings, with the final losses as its metrics."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "run"
    train(
        compose_config(
            "train",
            [
                "debug=smoke",
                "~callbacks.previews",
                "trainer.log_every_n_steps=25",
                "dataset.batch_size=256",
                "trainer.max_steps=7",
                "optimizer.lr=3e-4",  # not a default: the value the user set is the one recorded
                "callbacks.fid.every_n_epochs=1",
                "callbacks.fid.num_samples=8",
                "callbacks.fid.steps=2",
                "callbacks.fid.batch_size=8",
                "callbacks.fid.reference_images=32",
                TINY_FEATURES,
            ],
            run,
        )
    )
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/fid")] == [7] and events.Scalars("val/kid")
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["optimizer/lr"].number_value == pytest.approx(3e-4)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"train/loss", "val/fid"} <= {m.name.tag for m in experiment.metric_infos}
