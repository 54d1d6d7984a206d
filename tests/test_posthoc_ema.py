"""Post-hoc EMA (Karras et al. 2024): the power-function profiles, the update, the reconstruction of any length from
snapshots, and the application (train.py keeps snapshots and resumes them exactly; sample.py ema_length=...)."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffusion.core.posthoc_ema import (
    gamma_of_sigma_rel,
    power_beta,
    profile_dot,
    profile_residual,
    profile_weights,
    reconstruction_coefficients,
    sigma_rel_of_gamma,
)
from diffusion.errors import SettingError
from diffusion.models.posthoc_ema import reconstruct, snapshot_paths
from diffusion.training.posthoc_ema import PostHocEMA
from sample import sample
from tests.helpers import compose_config, load_state, run_script
from train import train

# ---------------------------------------------------------------- the profiles


@pytest.mark.parametrize("gamma", [0.5, 2.0, 6.94, 16.97, 60.0])
def test_sigma_rel_is_the_relative_std_of_the_profile_and_gamma_its_inverse(gamma):
    """sigma_rel of p(tau) ~ tau^gamma on [0, 1], by a numerical integral of the profile, and back to gamma."""
    tau = np.linspace(0.0, 1.0, 2_000_001)
    density = (gamma + 1) * tau**gamma
    assert np.trapezoid(density, tau) == pytest.approx(1.0, rel=1e-6)
    mean = np.trapezoid(tau * density, tau)
    std = math.sqrt(np.trapezoid((tau - mean) ** 2 * density, tau))
    assert float(sigma_rel_of_gamma(gamma)) == pytest.approx(std, rel=1e-5)
    assert float(gamma_of_sigma_rel(sigma_rel_of_gamma(gamma))) == pytest.approx(gamma, rel=1e-9)


def test_the_papers_two_profiles():
    """Section 3: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94."""
    assert gamma_of_sigma_rel([0.05, 0.10]) == pytest.approx([16.97, 6.94], abs=0.005)


def test_lengths_out_of_range_are_refused():
    for bad in (0.0, 0.005, 0.3, -0.1):
        with pytest.raises(SettingError, match="sigma_rel"):
            gamma_of_sigma_rel(bad)


def test_the_inner_product_of_two_profiles_is_its_integral():
    t_a, g_a, t_b, g_b = 3.0, 6.94, 5.0, 16.97
    tau = np.linspace(0.0, 3.0, 2_000_001)
    product = (g_a + 1) * tau**g_a / t_a ** (g_a + 1) * (g_b + 1) * tau**g_b / t_b ** (g_b + 1)
    numeric = np.trapezoid(product, tau)
    assert float(profile_dot(t_a, g_a, t_b, g_b)) == pytest.approx(numeric, rel=1e-6)
    assert float(profile_dot(t_b, g_b, t_a, g_a)) == pytest.approx(numeric, rel=1e-6)  # symmetric


# ---------------------------------------------------------------- the update


class Vector(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))


HORIZON = 400  # steps of the trajectory's course (runs of fewer steps follow its start)


def trajectory(k: int, n: int) -> list[float]:
    """A known parameter trajectory: smooth, decaying, and oscillating components."""
    s = k / n
    return [math.sin(4 * s), math.exp(-3 * s), s**2]


def fake_trainer(step: int, world: int = 1, accumulate: int = 1) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, world_size=world, accumulate_grad_batches=accumulate, is_global_zero=True)


def run_callback(callback: PostHocEMA, module: Vector, batches: list[int], world: int = 1, accumulate: int = 1):
    """The callback over the steps of ``batches`` (their sizes), the weights following :func:`trajectory`."""
    callback.on_train_start(fake_trainer(0), module)
    for k, batch in enumerate(batches, start=1):
        with torch.no_grad():
            module.w.copy_(torch.tensor(trajectory(k, HORIZON), dtype=torch.float64))
        callback.on_train_batch_end(fake_trainer(k, world, accumulate), module, None, (torch.zeros(batch, 1),), k - 1)


@pytest.mark.parametrize(("world", "accumulate"), [(1, 1), (2, 3)])
def test_the_update_is_the_profile_integrated_over_each_step(tmp_path, world, accumulate):
    """beta = (1 - B/t)^(gamma + 1) makes the average sum_k c_k w_k with c_k the profile's integral over step k,
    (t_k^(g+1) - t_(k-1)^(g+1)) / t_n^(g+1), for any mix of batch sizes; B is the global batch."""
    module, batches = Vector(), [16, 16, 8, 16, 4] * 12
    callback = PostHocEMA(sigma_rels=[0.05, 0.10], every_n_images=10**9, dirpath=tmp_path, dtype="float32")
    run_callback(callback, module, batches, world, accumulate)
    ends = np.cumsum(batches) * world * accumulate
    weights = np.array([trajectory(k, HORIZON) for k in range(1, len(batches) + 1)])
    for sigma_rel, average in zip([0.05, 0.10], callback.averages(), strict=True):
        gamma = float(gamma_of_sigma_rel(sigma_rel))
        c = profile_weights(ends, gamma)
        tau = np.linspace(0.0, ends[-1], 400_001)  # the same weights from the continuous profile, numerically
        density = (gamma + 1) * tau**gamma / ends[-1] ** (gamma + 1)
        steps = zip([0, *ends[:-1]], ends, strict=True)
        numeric = [np.trapezoid(np.where((tau >= a) & (tau <= b), density, 0.0), tau) for a, b in steps]
        assert c == pytest.approx(numeric, abs=2e-4)
        np.testing.assert_allclose(average["w"].numpy(), c @ weights, rtol=1e-12)
    assert callback.images == ends[-1]
    assert power_beta(16, 16, 6.94) == 0.0  # the first step copies


# ---------------------------------------------------------------- the reconstruction


def tracked_run(tmp_path: Path, sigma_rels: list[float], steps: int = 400, every: int = 16 * 20) -> PostHocEMA:
    callback = PostHocEMA(sigma_rels=sigma_rels, every_n_images=every, dirpath=tmp_path, dtype="float32")
    run_callback(callback, Vector(), [16] * steps)
    return callback


def as_checkpoint(callback: PostHocEMA) -> dict:
    return {"callbacks": {"PostHocEMA": callback.state_dict()}}


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10])
def test_a_tracked_length_is_reconstructed_exactly(tmp_path, sigma_rel):
    callback = tracked_run(tmp_path / "snapshots", [0.05, 0.10])
    assert len(snapshot_paths(tmp_path / "snapshots")) == 20
    weights, info = reconstruct(as_checkpoint(callback), tmp_path, sigma_rel, tmp_path / "snapshots")
    tracked = callback.averages()[[0.05, 0.10].index(sigma_rel)]
    torch.testing.assert_close(weights["w"], tracked["w"].float(), rtol=1e-6, atol=1e-7)
    assert info["ema_snapshots"] == 19 and info["ema_profile_residual"] < 1e-6  # the last is the checkpoint's own


def test_a_tracked_length_at_a_snapshot_time_is_that_snapshot():
    times = [float(t) for t in range(1, 21) for _ in range(2)]
    lengths = [0.05, 0.10] * 20
    x = reconstruction_coefficients(times, lengths, 12.0, 0.05)
    expected = np.zeros(40)
    expected[2 * 11] = 1.0
    np.testing.assert_allclose(x, expected, atol=1e-8)


@pytest.mark.parametrize("sigma_rel", [0.03, 0.08, 0.15])
def test_an_untracked_length_matches_a_directly_tracked_average(tmp_path, sigma_rel):
    """From the 0.05 and 0.10 snapshots (20 of them), the average of another length agrees with the average of
    that length tracked directly, within 0.1% of the trajectory's range (measured: 0.02% at 0.03, 0.001% at 0.08),
    and the profile fit's residual is under 5% (2.6% at 0.03, 0.2% at 0.08)."""
    callback = tracked_run(tmp_path / "snapshots", [0.05, 0.10])
    direct = tracked_run(tmp_path / "direct", [sigma_rel], every=10**9).averages()[0]["w"]
    weights, info = reconstruct(as_checkpoint(callback), tmp_path, sigma_rel, tmp_path / "snapshots")
    spread = np.ptp(np.array([trajectory(k, HORIZON) for k in range(1, 401)]), axis=0)
    error = (weights["w"].double() - direct).abs().numpy() / spread
    assert error.max() < 1e-3, (error, info)
    assert info["ema_profile_residual"] < 0.05


def test_profiles_far_from_the_tracked_ones_fit_worse():
    times = [float(t) for t in range(1, 21) for _ in range(2)]
    lengths = [0.05, 0.10] * 20
    near, far = profile_residual(times, lengths, 20.0, 0.08), profile_residual(times, lengths, 20.0, 0.25)
    assert near < far


def test_snapshots_after_the_checkpoint_are_left_out(tmp_path):
    """A checkpoint at step 200 of a run that went on to 400: the reconstruction is at the checkpoint's time, from
    the snapshots before it (9 of the 20), and for a tracked length it is the checkpoint's average."""
    early = tracked_run(tmp_path / "early", [0.05, 0.10], steps=200)
    tracked_run(tmp_path / "snapshots", [0.05, 0.10], steps=400)  # the same run, gone on
    weights, info = reconstruct(as_checkpoint(early), tmp_path, 0.10, tmp_path / "snapshots")
    assert info["ema_images"] == 200 * 16 and info["ema_snapshots"] == 9
    torch.testing.assert_close(weights["w"], early.averages()[1]["w"].float(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the application


def run_train(run_dir: Path, *overrides: str):
    return train(compose_config("train", ["debug=smoke", *overrides], run_dir))


POSTHOC = ["callbacks.posthoc_ema.every_n_images=128", "dataset.batch_size=64", "~callbacks.previews"]


def test_snapshots_resume_exactly_and_sample_py_reconstructs_any_length(tmp_path, capsys):
    """4 + 4 = 8 steps with snapshots every 2 steps: the same snapshot files and tracked averages as 8 straight;
    then sample.py ema_length= samples a reconstruction into its own folder, a sweep tabulates the lengths, and
    ema_save writes the weights, which for a tracked length are the tracked average."""
    straight, stopped, resumed = tmp_path / "straight", tmp_path / "stopped", tmp_path / "resumed"
    run_train(straight, *POSTHOC, "trainer.max_steps=8")
    run_train(stopped, *POSTHOC, "trainer.max_steps=4")
    run_train(resumed, *POSTHOC, "trainer.max_steps=8", f"ckpt_path={stopped / 'checkpoints' / 'last.ckpt'}")
    assert [p.name for p in snapshot_paths(straight / "ema_snapshots")] == [f"step_000000{k}.pt" for k in (2, 4, 6, 8)]
    assert [p.name for p in snapshot_paths(resumed / "ema_snapshots")] == ["step_0000006.pt", "step_0000008.pt"]
    for name in ("step_0000006.pt", "step_0000008.pt"):
        a, b = (load_state(run / "ema_snapshots" / name) for run in (straight, resumed))
        assert a["images"] == b["images"] == int(name[5:12]) * 64 and a["sigma_rels"] == [0.05, 0.1]
        for x, y in zip(a["averages"], b["averages"], strict=True):
            assert next(iter(x.values())).dtype == torch.float16
            for key, value in x.items():
                torch.testing.assert_close(y[key], value, rtol=1e-3, atol=1e-5)
    a, b = (load_state(run / "checkpoints" / "last.ckpt")["callbacks"]["PostHocEMA"] for run in (straight, resumed))
    assert a["images"] == b["images"] == 8 * 64
    for x, y in zip(a["averages"], b["averages"], strict=True):
        for key, value in x.items():
            torch.testing.assert_close(y[key], value, rtol=1e-5, atol=1e-6)

    ckpt = straight / "checkpoints" / "last.ckpt"
    out = tmp_path / "sampled"
    result = run_script("sample.py", f"ckpt={ckpt}", "n=4", "sampler.steps=2", "ema_length=0.1", "ema_save=true",
                        f"out_dir={out}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Post-hoc EMA of length 0.1 at 512 training images, from 3 snapshots" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["ema_length"] == 0.1 and results["ema_images"] == 512
    saved = load_state(out / "posthoc_ema.ckpt")["state_dict"]
    for key, value in a["averages"][1].items():
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-6)

    result = run_script("sample.py", "-m", f"ckpt={ckpt}", "n=4", "sampler.steps=2", "ema_length=0.03,0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = next((straight / "checkpoints").glob("sweep_*/summary.md")).read_text()
    assert "ema_length" in summary and "| 0.03 |" in summary and "| 0.2 |" in summary
    folders = sorted(p.name for p in next((straight / "checkpoints").glob("sweep_*")).iterdir() if p.is_dir())
    assert folders == ["dpm_solver_2steps_ema_length-0.03_n-4", "dpm_solver_2steps_ema_length-0.2_n-4"]

    # the folder named after the settings: its printed command, pasted back as it is (through Hydra's grammar, as
    # the command line reads it), samples the saved weights
    overrides = [f"ckpt={ckpt}", "n=2", "sampler.steps=2", "ema_length=0.05", "ema_save=true"]
    named = ckpt.parent / "last_dpm_solver_2steps_ema_length-0.05_n-2"
    capsys.readouterr()
    sample(compose_config("sample", overrides, named))
    printed = next(line for line in capsys.readouterr().out.splitlines() if "sample from them with: " in line)
    command = shlex.split(printed.split("sample from them with: ")[1])
    assert command == ["python", "sample.py", f"ckpt={named / 'posthoc_ema.ckpt'}"]
    again = sample(compose_config("sample", [*command[2:], "n=2", "sampler.steps=2"], tmp_path / "again"))
    assert "ema_length" not in again and again["n"] == 2  # the saved weights, as they are

    moved = tmp_path / "moved_snapshots"  # a run folder split up: the snapshots found with ema_snapshots=
    (straight / "ema_snapshots").rename(moved)
    args = [f"ckpt={ckpt}", "n=2", "sampler.steps=2", "ema_length=0.08", f"out_dir={tmp_path / 'moved'}"]
    result = run_script("sample.py", *args)
    assert (
        result.returncode == 1 and "no post-hoc EMA snapshots in" in result.stderr and "ema_snapshots=" in result.stderr
    )
    result = run_script("sample.py", *args, f"ema_snapshots={moved}")
    assert result.returncode == 0 and "from 3 snapshots" in result.stdout, result.stderr[-3000:]


def test_a_run_without_snapshots_says_so(tmp_path):
    run_train(tmp_path / "run", "~callbacks.previews", "trainer.max_steps=1")
    result = run_script("sample.py", f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "n=2", "ema_length=0.08")
    assert result.returncode == 1
    assert "holds no post-hoc EMA" in result.stderr and "callbacks.posthoc_ema.every_n_images" in result.stderr
    assert "Traceback" not in result.stderr
