"""Multi-process training as a user runs it: `python train.py trainer.accelerator=cpu trainer.devices=2` (DDP over
two CPU processes, gloo), one run directory, the FID reduced over processes, and exact resumes, also after SIGTERM
and onto another number of processes."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import ROOT, load_state, run_script

pytestmark = pytest.mark.slow

TINY_FEATURES = "callbacks.fid.feature={_target_:tests.helpers.TinyFeatures}"
# Batch 48 per process: an epoch of the 1,707 training digits is 18 steps on two processes, 36 on one, so every
# stop below falls inside an epoch.
COMMON = ["debug=smoke", "trainer.accelerator=cpu", "dataset.batch_size=48", "~callbacks.previews"]


def train_on(devices: int, run: Path, *overrides: str, timeout: float = 400) -> subprocess.CompletedProcess:
    result = run_script(
        "train.py", *COMMON, f"trainer.devices={devices}", *overrides, f"hydra.run.dir={run}", timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_same_training_state(a: dict, b: dict) -> None:
    """Raw weights, EMA, AdamW's moments, LR schedule, step, data position and every process's RNG state."""
    assert a["global_step"] == b["global_step"]
    for key in ("state_dict", "current_model_state"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")
    for slot, state in a["optimizer_states"][0]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(b["optimizer_states"][0]["state"][slot][name], state[name], rtol=1e-5, atol=1e-8)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    assert loader_state(a) == loader_state(b)
    for name, states in a["rng_states"].items():
        assert len(states) == len(b["rng_states"][name])
        for rank, state in enumerate(states):
            assert torch.equal(state, b["rng_states"][name][rank]), f"the {name} RNG of rank {rank}"


def loader_state(checkpoint: dict) -> dict:
    """The train loader's position (epoch, batches served), as Lightning stores it in the fit loop's state."""
    return checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]


def test_two_cpu_processes_with_ddp_share_one_run_directory_and_the_fid(tmp_path):
    """DDP over two CPU processes (gloo); FID/KID drawn and reduced over both at the end of the first epoch."""
    run = tmp_path / "run"
    fid = [
        "callbacks.fid.every_n_epochs=1",
        "callbacks.fid.num_samples=8",
        "callbacks.fid.steps=3",
        "callbacks.fid.batch_size=4",
        "callbacks.fid.reference_images=40",
        TINY_FEATURES,
    ]
    result = train_on(2, run, "dataset.batch_size=256", *fid)
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    # the epoch's loss quartiles, already summed over the processes by their metric, log without Lightning's warning
    assert "sync_dist=True" not in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
    state = load_state(run / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 4 and len(state["rng_states"]["cpu"]) == 2  # one RNG state per process
    writers = {p.name.split(".")[-2] for p in (run / "tensorboard").glob("events.out.tfevents.*")}
    assert len(writers) == 1  # one process (rank zero) alone writes
    assert len(list(tmp_path.iterdir())) == 1  # no second run directory
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"val/fid", "val/kid", "train/loss_q0", "train/loss_q3"} <= set(events.Tags()["scalars"])


@pytest.fixture(scope="module")
def four_steps_on_two(tmp_path_factory) -> Path:
    """The last.ckpt of 4 steps on two processes."""
    run = tmp_path_factory.mktemp("four_steps_on_two") / "run"
    train_on(2, run, "trainer.max_steps=4", POSTHOC, FLOW)
    return run / "checkpoints" / "last.ckpt"


POSTHOC = "callbacks.posthoc_ema.every_n_images=192"  # a snapshot every 2 steps of 2 x 48 images
FLOW = "diffusion=flow"  # the resumes across processes train the newest objective (EDM: tests/test_edm.py)


def test_a_two_process_resume_continues_exactly(tmp_path, four_steps_on_two):
    """4 steps, stop, resume to 8 == 8 straight steps, on two processes. Each process's checkpointed RNG state is a
    tensor of its own: a view into the gathered states (storage offset n for rank 1) crashed torch.set_rng_state."""
    first = load_state(four_steps_on_two)
    assert all(s.storage_offset() == 0 for s in first["rng_states"]["cpu"])
    assert not torch.equal(*first["rng_states"]["cpu"])  # each process draws its own timesteps and noise
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_on(2, straight, "trainer.max_steps=8", POSTHOC, FLOW)
    train_on(2, resumed, "trainer.max_steps=8", POSTHOC, FLOW, f"ckpt_path={four_steps_on_two}")
    a, b = load_state(straight / "checkpoints" / "last.ckpt"), load_state(resumed / "checkpoints" / "last.ckpt")
    assert_same_training_state(a, b)
    # post-hoc EMA: the images of both processes count, and rank zero alone wrote the same snapshots
    assert a["callbacks"]["PostHocEMA"]["images"] == b["callbacks"]["PostHocEMA"]["images"] == 8 * 96
    for x, y in zip(a["callbacks"]["PostHocEMA"]["averages"], b["callbacks"]["PostHocEMA"]["averages"], strict=True):
        for name, value in x.items():
            torch.testing.assert_close(y[name], value, rtol=1e-5, atol=1e-6)
    written = sorted(p.name for p in (straight / "ema_snapshots").iterdir())
    assert written == [f"step_000000{k}.pt" for k in (2, 4, 6, 8)]
    for name in ("step_0000006.pt", "step_0000008.pt"):
        x, y = (load_state(run / "ema_snapshots" / name) for run in (straight, resumed))
        assert x["images"] == y["images"]
        for p, q in zip(x["averages"], y["averages"], strict=True):
            for key, value in p.items():
                torch.testing.assert_close(q[key], value, rtol=1e-3, atol=1e-5)


NEW_NETWORKS = {
    "edm2": ["model=edm2_tiny", "model.channel_mult=[1,2]", "diffusion=edm", "diffusion.learned_weighting=true",
             "optimizer=edm2", "model.num_classes=10"],
    "uvit": ["model=uvit_tiny", "model.num_blocks=3", "model.checkpointing=true", "model.num_classes=10"],
}  # fmt: skip


@pytest.mark.parametrize("network", sorted(NEW_NETWORKS))
def test_the_new_networks_resume_exactly_on_two_processes(tmp_path, network):
    """EDM2's network with its recipe (the learned weighting's head is a parameter DDP must reduce too, and forced
    weight normalization rewrites the weights in the forward pass) and U-ViT with labels and checkpointing: 4 steps
    straight on two processes, against the straight run's step-2 checkpoint resumed to 4, the EMA and the post-hoc
    EMA's averages too."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_on(2, straight, "trainer.max_steps=4", POSTHOC, *NEW_NETWORKS[network])
    halfway = straight / "checkpoints" / "step_0000002.ckpt"
    train_on(2, resumed, "trainer.max_steps=4", POSTHOC, *NEW_NETWORKS[network], f"ckpt_path={halfway}")
    a, b = load_state(straight / "checkpoints" / "last.ckpt"), load_state(resumed / "checkpoints" / "last.ckpt")
    assert_same_training_state(a, b)
    for x, y in zip(a["callbacks"]["PostHocEMA"]["averages"], b["callbacks"]["PostHocEMA"]["averages"], strict=True):
        for name, value in x.items():  # the post-hoc EMA's tracked averages
            torch.testing.assert_close(y[name], value, rtol=1e-5, atol=1e-6)
    assert any(name.startswith("model.objective.weighting.") for name in a["state_dict"]) == (network == "edm2")


def test_a_checkpoint_written_before_the_fix_still_resumes(tmp_path):
    """Checkpoints of two processes written before the fix hold rank 1's RNG state as a view at storage offset n;
    loading one restores the state (checked in a subprocess, since the bug was a segfault)."""
    script = (
        "import torch\n"
        "from diffusion.training.module import own_storage\n"
        "s = torch.get_rng_state()\n"
        "views = list(torch.stack([s, s]).unbind(0))\n"
        f"torch.save(views, {str(tmp_path / 'states.pt')!r})\n"
        f"loaded = torch.load({str(tmp_path / 'states.pt')!r}, weights_only=True)\n"
        "assert loaded[1].storage_offset() == s.numel()\n"
        "torch.manual_seed(123)\n"
        "torch.set_rng_state(own_storage(loaded[1]))\n"
        "assert torch.equal(torch.get_rng_state(), s)\n"
        "print('restored')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "restored" in result.stdout, (result.returncode, result.stderr[-2000:])


def test_sigterm_to_the_main_process_stops_both_and_the_printed_command_resumes(tmp_path):
    """A preempted cluster job: SIGTERM to the process the user started (rank 0, which launched rank 1) stops both
    at one step, writes last.ckpt and prints the resume command; that command, run as printed, finishes."""
    run = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *COMMON,
        "trainer.devices=2",
        "dataset.batch_size=16",
        "trainer.max_steps=40",
        "callbacks.model_checkpoint.every_n_train_steps=5",
        f"hydra.run.dir={run}",
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step_0000005.ckpt").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before it could be stopped"
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 143, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    stopped = re.search(r"Training stopped by SIGTERM at step (\d+)", output)
    assert stopped is not None, output[-3000:]
    step = int(stopped.group(1))
    assert 5 <= step < 40 and load_state(run / "checkpoints" / "last.ckpt")["global_step"] == step
    printed = re.search(r"Resume with: (python train\.py .*)", output)
    assert printed is not None, output[-3000:]
    resume = shlex.split(printed.group(1))
    assert resume[:2] == ["python", "train.py"] and f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in resume
    result = run_script("train.py", *resume[2:], cwd=tmp_path, timeout=400)  # in its own run directory again
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training finished at step 40" in result.stdout + result.stderr
    assert load_state(run / "checkpoints" / "last.ckpt")["global_step"] == 40


def test_a_checkpoint_resumes_on_another_number_of_processes(tmp_path, four_steps_on_two):
    """Two processes' checkpoint resumed on one, then that one's on two: the model, EMA, optimizer and step continue,
    the data continues at the same count of images into the epoch, and a warning says that the random numbers are
    drawn afresh."""
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    for before, after, ckpt, steps, served in [(2, 1, four_steps_on_two, 6, 8 + 2), (1, 2, last, 8, 5 + 2)]:
        # `served` batches of 48 per process: 4 on each of two are 8 on one; 10 on one are 5 on each of two
        result = train_on(after, run, f"trainer.max_steps={steps}", FLOW, f"ckpt_path={ckpt}")
        output = result.stdout + result.stderr
        assert f"holds random-number states of {before} processes, this run has {after}" in output, output[-3000:]
        state = load_state(last)
        assert state["global_step"] == steps and len(state["rng_states"]["cpu"]) == after
        assert state["lr_schedulers"][0]["last_epoch"] == steps
        assert loader_state(state)["served"] == served and loader_state(state)["world_size"] == after


def test_torchrun_launches_the_processes_and_the_batch_size_is_per_process(tmp_path):
    """The README's torchrun launch on one machine (`--standalone` for its rendezvous): two processes compose the
    same configuration, share the run directory and train as one run. With 256 images per process and step, an
    epoch of the 1,707 training digits (854 per process) is 4 steps, so step 5 is the first of the second epoch."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    overrides = [*COMMON, "trainer.devices=2", "dataset.batch_size=256", "trainer.max_steps=5", f"hydra.run.dir={run}"]
    result = subprocess.run(
        [*command, str(ROOT / "train.py"), *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    state = load_state(run / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 5 and len(state["rng_states"]["cpu"]) == 2
    assert loader_state(state) == {"epoch": 1, "served": 1, "batch_size": 256, "world_size": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # one run directory, wherever torchrun started


def test_a_folder_is_checked_by_both_processes_which_skip_the_same_broken_file(tmp_path):
    """dataset=folder on two processes: each decodes half of the files, they agree on the one that cannot be
    decoded (a warning, once), and both train on the same list."""
    from tests.helpers import write_image_folder

    write_image_folder(tmp_path / "images", {"all": 40})
    good = tmp_path / "images" / "all" / "img0.png"
    (tmp_path / "images" / "all" / "cut.png").write_bytes(good.read_bytes()[:200])
    run = tmp_path / "run"
    result = train_on(
        2, run, "dataset=folder", f"dataset.root={tmp_path / 'images'}", "dataset.image_size=16",
        "dataset.batch_size=4", "dataset.num_workers=1", "trainer.max_steps=2",
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert output.count("skipping 1 image file(s) that cannot be decoded") == 1 and "cut.png" in output
    assert load_state(run / "checkpoints" / "last.ckpt")["global_step"] == 2
