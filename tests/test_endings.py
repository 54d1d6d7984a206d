"""Nothing lost: every way a run ends keeps its last finished step in last.ckpt, checkpoint files are whole or
absent, resumes resume what was asked, and sweeps and sample.py results do not overwrite each other."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from diffusion.errors import RunError
from diffusion.training.checkpoint_writing import AtomicCheckpointIO
from tests.helpers import ROOT, compose_config, load_state, run_script
from train import train


def run_train(run_dir, *overrides):
    return train(compose_config("train", ["debug=smoke", *overrides], run_dir))


def start_training(run, every_n_steps: int, *overrides: str, **popen) -> subprocess.Popen:
    """train.py in a subprocess, as a user starts it, for many steps with a checkpoint every ``every_n_steps``."""
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "~callbacks.previews",
            "trainer.max_steps=100000",
            f"callbacks.model_checkpoint.every_n_train_steps={every_n_steps}",
            "dataset.batch_size=16",
            *overrides,
            f"hydra.run.dir={run}",
        ],
        cwd=ROOT,
        **popen,
    )


def test_last_checkpoint_holds_the_final_step_after_an_earlier_periodic_one(tmp_path):
    run = tmp_path / "run"
    run_train(run, "trainer.max_steps=7", "callbacks.model_checkpoint.every_n_train_steps=3")
    assert load_state(run / "checkpoints" / "last.ckpt")["global_step"] == 7
    steps = sorted(load_state(p)["global_step"] for p in (run / "checkpoints").glob("step_*.ckpt"))
    assert steps == [3, 6]  # the periodic files keep their own steps
    assert (run / "samples" / "step_0000007.png").is_file()


def test_the_periodic_checkpoints_keep_the_five_most_recent(tmp_path):
    run = tmp_path / "run"
    run_train(run, "~callbacks.previews", "trainer.max_steps=7", "callbacks.model_checkpoint.every_n_train_steps=1")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.ckpt",
        *(f"step_{step:07d}.ckpt" for step in range(3, 8)),
    ]


def test_max_time_ends_the_run_with_its_last_step_saved(tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level("INFO"):
        run_train(run, "~callbacks.previews", "trainer.max_steps=100000", "+trainer.max_time=00:00:00:05")
    final = int(re.search(r"Training finished at step (\d+)", caplog.text).group(1))
    assert 0 < final < 100000 and load_state(run / "checkpoints" / "last.ckpt")["global_step"] == final


@pytest.mark.slow
@pytest.mark.parametrize(("how", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_at_a_step_saves_it_and_says_how_to_resume(tmp_path, how, status):
    run = tmp_path / "run"
    process = start_training(run, 7, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step_0000007.ckpt").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # a few steps past the periodic checkpoint
    process.send_signal(how)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == status, output[-3000:]
    stopped = re.search(r"Training stopped by (\w+) at step (\d+)", output)
    assert stopped is not None and stopped.group(1) == signal.Signals(how).name, output[-3000:]
    assert load_state(run / "checkpoints" / "last.ckpt")["global_step"] == int(stopped.group(2)) > 7
    assert f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in output and "Resume with: python train.py" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_and_keeps_the_previous_checkpoint(tmp_path):
    """The second Ctrl-C comes once the first is acknowledged, inside the same step (steps of 512 images take about
    a second): the run ends without reaching a step boundary, and last.ckpt keeps the periodic step 2."""
    run = tmp_path / "run"
    process = start_training(
        run, 2, "dataset.batch_size=512", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:  # written after step 2
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output = ""
    for line in process.stdout:
        output += line
        if "Ctrl-C again aborts now" in line:
            break
    process.send_signal(signal.SIGINT)
    output += process.communicate(timeout=120)[0]
    assert process.returncode not in (0, 130), output[-3000:]
    assert "Training stopped by" not in output, output[-3000:]
    assert load_state(run / "checkpoints" / "last.ckpt")["global_step"] == 2  # the periodic one, whole


@pytest.mark.slow
def test_a_killed_run_keeps_a_loadable_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    process = start_training(run, 5, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step_0000010.ckpt").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.7)  # land somewhere inside later saves
    process.kill()
    process.wait(timeout=60)
    state = load_state(run / "checkpoints" / "last.ckpt")
    assert state["global_step"] >= 10 and state["global_step"] % 5 == 0


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_a_checkpoint_write_cut_short_leaves_the_previous_one(tmp_path, monkeypatch, failure):
    """The file is staged beside its target, never in $TMPDIR (a move from another filesystem is a copy that a
    kill truncates): a write that dies half-way leaves the previous last.ckpt whole, and no temporary anywhere."""
    folder, elsewhere = tmp_path / "checkpoints", tmp_path / "tmpdir"
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, folder / "last.ckpt")
    real_save = torch.save

    def cut_short(obj, f, *args, **kwargs):
        real_save({"w": torch.zeros(10)}, f)  # some bytes reach the staging file ...
        with open(f, "r+b") as handle:
            handle.truncate(100)
        assert os.path.dirname(f) == str(folder)  # ... which lies beside the target
        raise failure  # ... then the process is interrupted or the disk is full

    monkeypatch.setattr("diffusion.training.checkpoint_writing.torch.save", cut_short)
    expected = KeyboardInterrupt if failure is KeyboardInterrupt else RunError
    with pytest.raises(expected, match=None if expected is KeyboardInterrupt else "previous checkpoint there"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, folder / "last.ckpt")
    assert load_state(folder / "last.ckpt")["global_step"] == 1
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"] and not list(elsewhere.iterdir())


def test_resume_true_without_a_checkpoint_does_not_take_another_run(tmp_path):
    first, common = tmp_path / "outputs" / "a", ["~callbacks.previews", f"paths.log_dir={tmp_path / 'outputs'}"]
    run_train(first, *common)
    with pytest.raises(RunError, match=r"resume=true found nothing to resume.*The newest run's checkpoint is .*a/"):
        run_train(tmp_path / "outputs" / "b", *common, "resume=true")
    assert not (tmp_path / "outputs" / "b" / "checkpoints").exists()
    run_train(first, *common, "resume=true", "trainer.max_steps=6")  # this run's own directory resumes
    assert load_state(first / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_a_resume_with_a_new_learning_rate_trains_at_that_rate(tmp_path):
    common = ["~callbacks.previews", "optimizer.warmup_steps=0", "optimizer.lr_schedule=constant"]
    first = tmp_path / "first"
    run_train(first, *common, "optimizer.lr=1e-3")
    resumed = tmp_path / "resumed"
    run_train(
        resumed, *common, "optimizer.lr=2e-5", "trainer.max_steps=6", f"ckpt_path={first / 'checkpoints/last.ckpt'}"
    )
    state = load_state(resumed / "checkpoints" / "last.ckpt")
    assert state["hyper_parameters"]["optimizer"]["lr"] == 2e-5
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(2e-5)
    assert state["lr_schedulers"][0]["base_lrs"] == [pytest.approx(2e-5)]
    # the weights moved by steps of the new size: AdamW's update is about lr per element
    before = load_state(first / "checkpoints" / "last.ckpt")["current_model_state"]
    after = state["current_model_state"]
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert 0 < moved < 2e-4  # an AdamW step moves a weight by at most about 3 lr; 1e-3 moved them by more


@pytest.mark.slow
def test_the_readme_sweep_runs_from_any_working_directory(tmp_path):
    """The README's `python train.py -m ...` line, run as written (plus the smoke settings) in a fresh folder."""
    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("python train.py -m "))
    command = shlex.split(line.split("#")[0])
    assert command[:2] == ["python", "train.py"]
    result = run_script("train.py", *command[2:], "debug=smoke", "~callbacks.previews", cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(tmp_path.glob("multirun/*/*/*/checkpoints/last.ckpt"))
    assert len(jobs) == 3, list(tmp_path.rglob("*"))[:20]
    objectives = {load_state(j)["hyper_parameters"]["diffusion"].get("target", "edm") for j in jobs}
    assert objectives == {"eps", "v", "edm"}  # DDPM's eps and v targets, and EDM (which has no target)


def test_an_unwritable_run_folder_is_found_before_training(tmp_path, monkeypatch):
    """The folders are probed before the first step (root ignores file modes, so the probe itself is made to
    fail, as it does for a user without write access); the previous checkpoint is untouched."""

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("diffusion.outputs.folders.tempfile.TemporaryFile", denied)
    with pytest.raises(RunError, match=r"cannot write to .*run \(Permission denied\).*hydra.run.dir"):
        run_train(tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_too_little_disk_space_is_found_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr("train.shutil.disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=10**5))
    with pytest.raises(RunError, match=r"MB free, too little for this model's checkpoints"):
        run_train(tmp_path / "run")
