"""The GPU path, checked on the CPU: the gpu and ddp presets at mixed precision with fused AdamW and clipping (Lightning
runs bf16-mixed and 16-mixed on CPUs through the same precision plugin), device placement on the ``meta`` device,
and optional end-of-training extras that fail without costing the run its weights."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback
from omegaconf import OmegaConf

from diffusion.core.denoiser import SamplingOptions
from diffusion.core.levels import DiscreteLevels
from diffusion.core.samplers import final
from diffusion.core.samplers.base import walked
from diffusion.core.schedules import NoiseSchedule, make_betas, spaced_timesteps
from diffusion.training.callbacks import Previews
from diffusion.training.module import DiffusionModule
from tests.helpers import compose_config, load_state, run_script
from train import hyperparameters, train


class GradProbe(Callback):
    """Records, for each optimizer step, the gradients Lightning hands over (still loss-scaled under fp16 with a
    fused optimizer) with the loss scale, and the gradients the optimizer then steps with."""

    records: ClassVar[list[dict]] = []

    def on_train_start(self, trainer, pl_module):
        GradProbe.records = []
        optimizer = trainer.optimizers[0]
        optimizer.register_step_post_hook(self._stepped)  # the step leaves the gradients as it used them

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        GradProbe.records.append(
            {
                "raw": [p.grad.detach().clone() for p in pl_module.parameters() if p.grad is not None],
                "scale": float(scaler.get_scale()) if scaler is not None else 1.0,
                "fused": bool(optimizer.defaults.get("fused")),
            }
        )

    def _stepped(self, optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        GradProbe.records[-1]["stepped"] = [p.grad.detach().clone() for p in params]


# Lightning turns 16-mixed into bf16-mixed on CPUs; its float16 plugin with a CPU GradScaler, given explicitly,
# runs the loss-scaling path that CUDA's 16-mixed takes.
FP16_WITH_SCALER = (
    "trainer.plugins=[{_target_: diffusion.training.checkpoint_writing.AtomicCheckpointIO}, {_target_: "
    "lightning.pytorch.plugins.precision.MixedPrecision, precision: 16-mixed, device: cpu, scaler: {_target_: "
    "torch.amp.GradScaler, device: cpu}}]"
)


@pytest.mark.parametrize(
    "precision",
    [["trainer.precision=bf16-mixed"], ["trainer.precision=null", FP16_WITH_SCALER], ["trainer.precision=32-true"]],
    ids=["bf16-mixed", "16-mixed", "32-true"],
)
def test_the_gpu_preset_clips_fused_adamw_like_clip_grad_norm(tmp_path, precision):
    """trainer=gpu on the CPU: fused AdamW, clipping at a norm the gradients exceed; the gradients the optimizer
    steps with equal clip_grad_norm_ applied to the unscaled gradients of the same batch."""
    clip = 0.05
    run = tmp_path / "run"
    train(
        compose_config(
            "train",
            [
                "debug=smoke",
                "trainer=gpu",
                "trainer.accelerator=cpu",
                *precision,
                f"trainer.gradient_clip_val={clip}",
                "~callbacks.previews",
                "+callbacks.probe._target_=tests.test_gpu_presets.GradProbe",
            ],
            run,
        )
    )
    scales = [record["scale"] for record in GradProbe.records]
    if "32-true" in precision[0] or "bf16" in precision[0]:
        assert set(scales) == {1.0}  # no loss scaling
    else:  # GradScaler's: it starts at 2^16 and halves after each overflowing step (which it skips), only then
        overflowed = [not all(torch.isfinite(g).all() for g in record["raw"]) for record in GradProbe.records]
        assert scales[0] == 65536.0
        for earlier, later, overflow in zip(scales, scales[1:], overflowed, strict=False):
            assert later == (earlier / 2 if overflow else earlier)
    assert load_state(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    checked = 0
    for record in GradProbe.records:
        assert record["fused"]
        raw = [g / record["scale"] for g in record["raw"]]
        if not all(torch.isfinite(g).all() for g in raw):
            continue  # an fp16 overflow: the scaler skips this step
        norm = torch.nn.utils.get_total_norm(raw)
        assert norm > clip
        expected = [g.clone() for g in raw]
        _clip(expected, clip)
        for got, want in zip(record["stepped"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
        checked += 1
    assert checked >= 2


def _clip(grads: list[torch.Tensor], max_norm: float) -> None:
    """clip_grad_norm_ on bare gradients, through stand-in parameters."""
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty_like(g))
        p.grad = g
        params.append(p)
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def test_the_ddp_preset_runs_on_the_cpu_at_bf16(tmp_path):
    run = tmp_path / "run"
    result = run_script(
        "train.py",
        "debug=smoke",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "~callbacks.previews",
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_state(run / "checkpoints" / "last.ckpt")["global_step"] == 4


# ---------------------------------------------------------------- device placement


def test_schedules_are_built_and_respaced_on_the_device_of_their_betas():
    """On ``meta`` (as on CUDA) a tensor created on the CPU and mixed with the tables raises."""
    meta = NoiseSchedule(make_betas("linear", 100).to("meta"))
    assert {t.device.type for t in meta.buffers()} == {"meta"}
    cpu = NoiseSchedule(make_betas("cosine", 100))
    moved = NoiseSchedule(make_betas("cosine", 100)).to("meta")
    for steps, spacing in [(10, "uniform"), (7, "quadratic")]:
        schedule = moved.respace(spaced_timesteps(cpu.alphas_cumprod, steps, spacing))
        assert len(schedule) == steps and {t.device.type for t in schedule.buffers()} == {"meta"}
    grid = [level for level in DiscreteLevels(cpu.alphas_cumprod).grid(5, "uniform")]
    assert {t.device.type for t in walked(grid, "meta").buffers()} == {"meta"}


@pytest.mark.parametrize(
    ("diffusion", "conditional"), [("ddpm", False), ("improved", True), ("edm", True), ("flow", True)]
)
def test_training_and_every_sampler_run_on_the_meta_device(tmp_path, diffusion, conditional):
    """Every tensor of the training loss and of each sampler's steps is made on the model's device, whatever the
    objective (a tensor made on the CPU and mixed in would raise here, as it would on CUDA)."""
    overrides = [f"diffusion={diffusion}", *(["model.num_classes=10"] if conditional else [])]
    module = DiffusionModule(**hyperparameters(compose_config("train", overrides, tmp_path))).to("meta")
    x0 = torch.empty(3, 1, 16, 16, device="meta")
    labels = torch.zeros(3, dtype=torch.long, device="meta")
    level = module.model.objective.training_levels(3, torch.device("meta"))
    drop = torch.zeros(3, dtype=torch.bool, device="meta") if conditional else None
    terms = module.losses(x0, labels, level, torch.empty_like(x0), drop)
    assert terms["loss"].device.type == "meta" and terms["loss"].shape == (3,)
    denoise = module.model.denoiser(
        SamplingOptions(guidance=2.0 if conditional else 1.0), labels if conditional else None
    )
    for name in ("ddpm", "ddim", "dpm_solver", "sde", "ode", "heun", "euler"):
        sampler = instantiate(OmegaConf.load(f"configs/sampler/{name}.yaml"), steps=3)
        assert final(sampler(denoise, torch.empty(3, 1, 16, 16, device="meta"))).device.type == "meta"


# ---------------------------------------------------------------- optional extras


def test_a_failing_final_preview_leaves_the_final_checkpoint(tmp_path, monkeypatch):
    """The end-of-training preview raises: the run still ends normally, with a warning, and last.ckpt holds the
    final step (5, past the periodic checkpoint at 4)."""

    def broken(self, trainer, pl_module):
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(Previews, "_draw", broken)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"sample preview at step 5 failed .*checkpoints are unaffected"):
        train(compose_config("train", ["debug=smoke", "trainer.max_steps=5"], run))
    state = load_state(run / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 5
