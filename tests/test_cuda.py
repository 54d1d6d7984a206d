"""The GPU path on a real CUDA device: `pytest -m cuda` on a machine with a GPU; skipped everywhere else.

The CPU suite catches the same bugs where a CPU can (tests/test_gpu_presets.py); these check what only a GPU shows:
CUDA kernels (fused AdamW, autocast, SDPA), tensors meeting on the device, compiled code and exact resumes there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion.core.samplers import ddim_sample, ddpm_sample, dpm_solver_sample, ode_sample, sde_sample
from diffusion.core.schedules import NoiseSchedule, make_betas
from sample import sample
from tests.analytic import MIXTURE
from tests.helpers import compose_config, load_state
from train import train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU = ["debug=smoke", "trainer=gpu", "trainer.accelerator=gpu", "~callbacks.previews"]


def run_train(run_dir, *overrides):
    return train(compose_config("train", [*GPU, *overrides], run_dir))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
def test_training_steps_at_each_precision(tmp_path, precision):
    run = tmp_path / "run"
    run_train(run, f"trainer.precision={precision}", "model.num_classes=10", "trainer.max_steps=5")
    state = load_state(run / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 5 and all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_compiled_channels_last_training_with_previews(tmp_path):
    run = tmp_path / "run"
    train(
        compose_config(
            "train",
            [
                "debug=smoke",
                "trainer=gpu",
                "trainer.accelerator=gpu",
                "model=small",
                "dataset.image_size=16",
                "model.compile=true",
                "model.channels_last=true",
                "trainer.max_steps=5",
            ],
            run,
        )
    )
    assert load_state(run / "checkpoints" / "last.ckpt")["global_step"] == 5
    assert (run / "samples" / "step_0000005.png").is_file()


def test_resume_on_the_gpu_is_exact(tmp_path):
    common = ["dataset.batch_size=48", "callbacks.model_checkpoint.every_n_train_steps=4"]
    straight, stopped, resumed = tmp_path / "straight", tmp_path / "stopped", tmp_path / "resumed"
    run_train(straight, *common, "trainer.max_steps=8")
    run_train(stopped, *common, "trainer.max_steps=4")
    run_train(resumed, *common, "trainer.max_steps=8", f"ckpt_path={stopped / 'checkpoints' / 'last.ckpt'}")
    a, b = load_state(straight / "checkpoints" / "last.ckpt"), load_state(resumed / "checkpoints" / "last.ckpt")
    for key in ("state_dict", "current_model_state"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
    assert set(a["rng_states"]) == {"cpu", "cuda"}  # the CUDA generator's state is saved and restored too
    for name in ("cpu", "cuda"):
        assert torch.equal(a["rng_states"][name][0], b["rng_states"][name][0]), name


def test_the_cuda_rng_state_of_a_second_process_restores():
    """A multi-process checkpoint stores rank 1's CUDA state after rank 0's; as a view (storage offset n) it made
    torch.set_rng_state crash on the CPU; the loader hands the CUDA generator a tensor of its own."""
    from diffusion.training.module import own_storage

    state = torch.cuda.get_rng_state()
    rank1 = torch.stack([torch.zeros_like(state), state]).unbind(0)[1]
    torch.cuda.manual_seed(123)
    torch.cuda.set_rng_state(own_storage(rank1))
    assert torch.equal(torch.cuda.get_rng_state(), state)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("gpu") / "run"
    run_train(run, "trainer.max_steps=6", "model.num_classes=10", "diffusion.timesteps=100")
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver", "sde", "ode"])
@pytest.mark.parametrize(
    "speed", [[], ["precision=bf16", "compile=true", "channels_last=true"]], ids=["fp32", "bf16-compiled"]
)
def test_every_sampler_through_sample_py(tmp_path, checkpoint, sampler, speed):
    out = tmp_path / "out"
    overrides = [
        f"ckpt={checkpoint}",
        f"sampler={sampler}",
        "sampler.steps=4",
        "n=8",
        "batch_size=8",
        "device=cuda",
        *speed,
    ]
    results = sample(compose_config("sample", overrides, out))
    assert results["device"].startswith("cuda")
    images = np.load(out / "samples.npz")["arr_0"]
    assert images.shape == (8, 16, 16, 1) and images.std() > 0


def test_nll_on_the_gpu(tmp_path, checkpoint):
    overrides = [
        f"ckpt={checkpoint}",
        "n=4",
        "batch_size=4",
        "sampler.steps=2",
        "eval=nll",
        "eval.batches=1",
        "eval.rtol=1e-3",
        "eval.atol=1e-3",
        "device=cuda",
    ]
    results = sample(compose_config("sample", overrides, tmp_path))
    assert np.isfinite(results["nll_bpd"]) and np.isfinite(results["ode_nll_bpd"])


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample, dpm_solver_sample, sde_sample, ode_sample])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_samplers_keep_their_state_on_the_device_and_in_its_dtype(sampler, dtype):
    device = torch.device("cuda")
    schedule = NoiseSchedule(make_betas("linear", 200)).to(device)
    x_T = torch.randn(16, 1, 4, 4, device=device, dtype=dtype)
    options = {
        "ddpm_sample": {"variance": None},
        "ddim_sample": {"eta": 0.5},
        "sde_sample": {"corrector_steps": 1, "snr": 0.16},
    }.get(sampler.__name__, {})
    g = torch.Generator(device=device).manual_seed(0)
    for step in sampler(MIXTURE.denoiser(schedule), schedule, x_T, steps=5, spacing="uniform", generator=g, **options):
        assert step.x.device == device and step.x.dtype == dtype
        assert step.x0_pred.device == device
