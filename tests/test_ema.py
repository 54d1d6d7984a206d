"""The EMA of the weights: its warm-up (EDM's half-life in images), and final checkpoints that keep both weight
sets, so that sampling the raw weights and extending a finished run both work."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule

from diffusion.core.ema import ema_decay, half_life_of_decay
from diffusion.training.callbacks import EMA
from diffusion.training.module import DiffusionModule
from sample import sample
from tests.helpers import compose_config, load_state, run_script
from train import hyperparameters, train


def run_train(run_dir, *overrides):
    return train(compose_config("train", ["debug=smoke", *overrides], run_dir))


# ---------------------------------------------------------------- the decay sequence


def decays(steps: int, batch: int, half_life: float, rampup: float | None) -> list[float]:
    """beta of updates 2..steps (update 1 copies the weights)."""
    return [ema_decay((k - 1) * batch, batch, half_life, rampup) for k in range(2, steps + 1)]


def test_the_default_average_has_forgotten_the_initial_weights_by_the_first_preview(tmp_path):
    """The weight the average still gives to its starting point (the first step's weights) is the product of the
    decays since; below 1% at the default run's first preview, and far below what the fixed per-step decay of the
    half-life (0.995 at batch 64) leaves there."""
    cfg = compose_config("train", [], tmp_path)
    ema, batch, first_preview = cfg.callbacks.ema, cfg.dataset.batch_size, cfg.callbacks.previews.every_n_steps
    share = math.prod(decays(first_preview, batch, ema.half_life_images, ema.rampup_ratio))
    assert share < 0.01
    without_warmup = math.prod(decays(first_preview, batch, ema.half_life_images, None))
    fixed = 0.5 ** (batch / ema.half_life_images)  # the per-step decay without the warm-up
    assert without_warmup == pytest.approx(fixed ** (first_preview - 1), rel=1e-9) and share < without_warmup * 1e-6


def test_the_half_life_counts_images_not_steps():
    """Past the warm-up, four steps of 32 images decay the average exactly as one step of 128 does."""
    one = ema_decay(1e6, 128, 5e4, 0.05)
    four = math.prod(ema_decay(1e6 + 32 * k, 32, 5e4, 0.05) for k in range(4))
    assert four == pytest.approx(one, rel=1e-12) and one == pytest.approx(0.5 ** (128 / 5e4))
    assert ema_decay(0, 128, 5e4, 0.05) == 0.0  # the first step starts the average at the trained weights
    assert ema_decay(1000 * 128, 128, 5e4, 0.05) == pytest.approx(0.5 ** (1 / 50))  # h = 5% of 128k images


@pytest.mark.parametrize(
    ("experiment", "decay"), [("ddpm_cifar10", 0.9999), ("fashion", 0.999), ("mnist", 0.999), ("cifar", 0.9995)]
)
def test_the_presets_reach_their_published_decay_after_the_warm_up(tmp_path, experiment, decay):
    cfg = compose_config("train", [f"experiment={experiment}"], tmp_path)
    ema, batch = cfg.callbacks.ema, cfg.dataset.batch_size
    end = cfg.trainer.max_steps * batch
    assert ema_decay(end, batch, ema.half_life_images, ema.rampup_ratio) == pytest.approx(decay, abs=1e-7)
    assert half_life_of_decay(decay, batch) == pytest.approx(ema.half_life_images, rel=1e-4)


# ---------------------------------------------------------------- the callback on a toy model


class Scalar(LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


def fake_trainer(step: int, world_size: int = 1, accumulate: int = 1):
    return SimpleNamespace(
        global_step=step,
        world_size=world_size,
        accumulate_grad_batches=accumulate,
        strategy=SimpleNamespace(root_device="cpu"),
    )


@pytest.mark.parametrize(("rampup", "world", "accumulate"), [(0.05, 1, 1), (None, 1, 1), (0.05, 2, 3)])
def test_the_callback_averages_a_known_trajectory_with_those_decays(rampup, world, accumulate):
    """Raw weights w_k = sin(k) after step k; the average must be the recursion with the decay sequence, and
    the first step's weight in it the product of the decays. An optimizer step's images are the global batch:
    per-device batch x processes x accumulated batches (``trainer.accumulate_grad_batches``)."""
    module, batch, steps, half_life = Scalar(), 16, 60, 200.0
    ema = EMA(half_life_images=half_life, rampup_ratio=rampup)
    ema.setup(fake_trainer(0), module, "fit")
    expected = None
    for k in range(1, steps + 1):
        with torch.no_grad():
            module.w.fill_(math.sin(k))
        ema.on_train_batch_end(fake_trainer(k, world, accumulate), module, None, (torch.zeros(batch, 1),), k - 1)
        images = batch * world * accumulate
        beta = ema_decay((k - 1) * images, images, half_life, rampup)
        expected = math.sin(k) if expected is None else beta * expected + (1 - beta) * math.sin(k)
    assert ema.averaged_module.w.item() == pytest.approx(expected, abs=1e-6)
    first_share = math.prod(decays(steps, batch * world * accumulate, half_life, rampup))
    if rampup is None:
        assert first_share > 0.03  # no warm-up: the start lingers (0.5 ** (59 * 16 / 200))
    else:
        assert first_share < 1e-6
    ema.on_train_end(fake_trainer(steps), module)
    assert module.w.item() == pytest.approx(math.sin(steps))  # the raw weights stay in the model


def test_the_update_never_reads_a_device_value_on_the_host(tmp_path):
    """On the meta device every read of a tensor's value on the host raises, so an update that runs there cannot
    wait for a GPU. AveragedModel's own update reads its step counter twice per step, and fails here."""
    module = DiffusionModule(**hyperparameters(compose_config("train", ["model=tiny"], tmp_path))).to("meta")
    ema = EMA(half_life_images=1000.0, rampup_ratio=0.05)
    on_meta = SimpleNamespace(
        **{**vars(fake_trainer(0)), "strategy": SimpleNamespace(root_device=torch.device("meta"))}
    )
    ema.setup(on_meta, module, "fit")
    assert next(ema.averaged_module.parameters()).device.type == "meta"
    for step in (1, 2, 3):
        ema.on_train_batch_end(fake_trainer(step), module, None, (torch.zeros(8, 1),), step - 1)
    assert ema.beta > 0 and ema._latest_update_step == 3
    with pytest.raises((NotImplementedError, RuntimeError), match="meta"):
        torch.optim.swa_utils.AveragedModel(module, device=torch.device("meta")).update_parameters(module)


def test_the_ema_offers_its_weights_for_sampling(tmp_path):
    module = DiffusionModule(**hyperparameters(compose_config("train", [], tmp_path)))
    assert module.weights_for_sampling() is module.model
    ema = EMA(half_life_images=100, rampup_ratio=0.05)
    ema.setup(fake_trainer(0), module, "fit")
    assert module.weights_for_sampling() is ema.averaged_module.model
    assert copy.deepcopy(module).weights_for_sampling() is not ema.averaged_module.model  # copies do not carry it
    ema.teardown(fake_trainer(0), module, "fit")
    assert module.weights_for_sampling() is module.model


# ---------------------------------------------------------------- whole runs


def test_without_the_ema_the_checkpoint_holds_the_trained_weights_and_samples_say_so(tmp_path):
    """`~callbacks.ema` trains without an average: state_dict holds the trained weights, and sample.py, which
    samples the EMA by default, warns that there is none and samples them."""
    run = tmp_path / "run"
    run_train(run, "~callbacks.ema", "~callbacks.previews")
    state = load_state(run / "checkpoints" / "last.ckpt")
    assert "current_model_state" not in state and "averaging_state" not in state
    overrides = [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "sampler=ddim", "sampler.steps=2", "n=2"]
    result = run_script("sample.py", *overrides, f"out_dir={tmp_path / 'samples'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "holds no EMA weights; sampling with the trained weights" in result.stderr


def test_a_finished_run_keeps_the_average_and_the_raw_weights(tmp_path):
    """No periodic checkpoint, so last.ckpt is written at the end of training: the average in state_dict, the raw
    weights in current_model_state, and ema=false samples the raw ones."""
    run = tmp_path / "run"
    run_train(run, "~callbacks.previews", "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=100")
    state = load_state(run / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 6
    differences = [(state["state_dict"][k] - state["current_model_state"][k]).abs().max() for k in state["state_dict"]]
    assert max(differences) > 0
    images = {}
    for ema in ("true", "false"):
        overrides = [
            f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
            "sampler=ddim",
            "sampler.steps=3",
            "n=4",
            f"ema={ema}",
        ]
        sample(compose_config("sample", overrides, tmp_path / ema))
        images[ema] = np.load(tmp_path / ema / "samples.npz")["arr_0"]
    assert (images["true"] != images["false"]).any()


def test_a_finished_run_extends_exactly(tmp_path):
    """8 steps to the end, then 8 more from that final last.ckpt with max_steps=16, equal 16 straight steps in the
    raw and the averaged weights."""
    common = ["dataset.batch_size=48", "callbacks.model_checkpoint.every_n_train_steps=100", "~callbacks.previews"]
    straight, first, extended = tmp_path / "straight", tmp_path / "first", tmp_path / "extended"
    run_train(straight, *common, "trainer.max_steps=16")
    run_train(first, *common, "trainer.max_steps=8")
    run_train(extended, *common, "trainer.max_steps=16", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    a, b = load_state(straight / "checkpoints" / "last.ckpt"), load_state(extended / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 16
    for key in ("state_dict", "current_model_state"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")


@pytest.mark.slow
def test_two_processes_keep_the_same_average(tmp_path):
    """A 2-process DDP run on the CPU: each rank writes its averaged weights at the end; they are equal."""
    run = tmp_path / "run"
    result = run_script(
        "train.py",
        "debug=smoke",
        "~callbacks.previews",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "dataset.batch_size=32",
        "+callbacks.dump._target_=tests.test_ema.DumpAverage",
        f"+callbacks.dump.folder={tmp_path}",
        f"hydra.run.dir={run}",
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"average_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    raw = load_state(run / "checkpoints" / "last.ckpt")["current_model_state"]
    assert any(not torch.equal(raw[name], value) for name, value in ranks[0].items())


class DumpAverage(Callback):
    """A test callback: at the end of training each rank saves its EMA's averaged weights."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
        state = {k: v.detach().cpu().clone() for k, v in ema.averaged_module.state_dict().items()}
        torch.save(state, f"{self.folder}/average_rank{trainer.global_rank}.pt")


def test_a_run_stopped_during_validation_saves_the_weights_unswapped(tmp_path, monkeypatch):
    """SIGTERM lands while the average is swapped in for validation: the saved checkpoint still has the average in
    state_dict and the raw weights in current_model_state (compared with a run stopped just before validation)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from diffusion.training.module import DiffusionModule as Module

    def stop(self, batch, batch_idx):
        raise SIGTERMException()

    common = [
        "~callbacks.previews",
        "optimizer.lr_schedule=constant",
        "callbacks.model_checkpoint.every_n_train_steps=100",
        "callbacks.ema.rampup_ratio=null",  # an average that differs clearly from the raw weights at step 3
    ]
    run = tmp_path / "run"
    monkeypatch.setattr(Module, "validation_step", stop)
    with pytest.raises(SystemExit, match="143"):
        run_train(
            run, *common, "trainer.max_steps=4", "trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=3"
        )
    state = load_state(run / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 3
    monkeypatch.undo()
    reference = tmp_path / "reference"
    run_train(reference, *common, "trainer.max_steps=3")
    expected = load_state(reference / "checkpoints" / "last.ckpt")
    for key in ("state_dict", "current_model_state"):
        for name, value in expected[key].items():
            torch.testing.assert_close(state[key][name], value, msg=f"{key}.{name}")
