"""sample.py: images, GIFs and metrics from a checkpoint, loaded safely."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException

from diffusion.errors import RunError
from diffusion.training.module import DiffusionModule
from sample import sample
from tests.helpers import compose_config, run_script
from train import train

TINY_FEATURES = "eval.feature={_target_:tests.helpers.TinyFeatures}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A class-conditional discrete (eps, linear) model of the default run's size, trained 60 steps on digits
    (T = 100 keeps the NLL, which needs a discrete model, quick), and checkpoints derived from it: the same model
    untrained, and an unconditional one. EDM models are sampled in tests/test_edm.py."""
    root = tmp_path_factory.mktemp("trained")
    run = root / "run"
    train(
        compose_config(
            "train",
            [
                "debug=smoke",
                "~callbacks.previews",
                "trainer.max_steps=60",
                "diffusion=ddpm",
                "diffusion.timesteps=100",
                "model.num_classes=10",
                "callbacks.model_checkpoint.every_n_train_steps=60",
                "optimizer.warmup_steps=10",
            ],
            run,
        )
    )
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    fresh = DiffusionModule(**state["hyper_parameters"]).state_dict()
    untrained = root / "untrained.ckpt"
    torch.save({**state, "state_dict": fresh, "current_model_state": fresh}, untrained)
    hparams = {**state["hyper_parameters"], "model": {**state["hyper_parameters"]["model"], "num_classes": None}}
    unconditional = DiffusionModule(**hparams).state_dict()
    plain = root / "unconditional.ckpt"
    torch.save(
        {**state, "hyper_parameters": hparams, "state_dict": unconditional, "current_model_state": unconditional}, plain
    )
    return {"ckpt": ckpt, "untrained": untrained, "unconditional": plain, "root": root}


def run_sample(out: Path, ckpt: Path, *overrides: str) -> dict:
    return sample(compose_config("sample", [f"ckpt={ckpt}", "n=6", "batch_size=4", *overrides], out))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver", "sde", "ode"])
def test_every_sampler_writes_grid_gif_and_npz(trained, tmp_path, sampler):
    results = run_sample(tmp_path, trained["ckpt"], f"sampler={sampler}", "sampler.steps=4", "save_images=true")
    data = np.load(tmp_path / "samples.npz")
    assert data["arr_0"].shape == (6, 16, 16, 1) and data["arr_0"].dtype == np.uint8
    assert data["labels"].tolist() == [0, 1, 2, 3, 4, 5]  # every class in turn
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "process.gif").is_file()
    assert len(list((tmp_path / "images").glob("*.png"))) == 6
    assert results["nfe"] == (7 if sampler == "ode" else 4) and results["steps"] == 4
    assert json.loads((tmp_path / "results.json").read_text())["sampler"] == sampler


def test_the_same_seed_gives_the_same_images_and_another_seed_others(trained, tmp_path):
    run_sample(tmp_path / "a", trained["ckpt"], "sampler.steps=5", "seed=3")
    run_sample(tmp_path / "b", trained["ckpt"], "sampler.steps=5", "seed=3")
    run_sample(tmp_path / "c", trained["ckpt"], "sampler.steps=5", "seed=4")
    a, b, c = (np.load(tmp_path / x / "samples.npz")["arr_0"] for x in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_conditional_sampling_with_labels_and_guidance(trained, tmp_path):
    run_sample(tmp_path / "g", trained["ckpt"], "sampler=ddim", "sampler.steps=5", "labels=[3,7]", "guidance=3.0")
    run_sample(tmp_path / "p", trained["ckpt"], "sampler=ddim", "sampler.steps=5", "labels=[3,7]", "guidance=1.0")
    guided, plain = (np.load(tmp_path / x / "samples.npz") for x in "gp")
    assert guided["labels"].tolist() == [3, 7, 3, 7, 3, 7]
    assert not np.array_equal(guided["arr_0"], plain["arr_0"])
    nfe = [json.loads((tmp_path / x / "results.json").read_text())["nfe"] for x in "gp"]
    assert nfe == [10, 5]  # rows through the network per image: guidance runs the conditional and null passes


def test_labels_are_refused_by_an_unconditional_model_and_checked(trained, tmp_path):
    with pytest.raises(RunError, match="class-conditional model"):
        run_sample(tmp_path / "u", trained["unconditional"], "labels=3")
    with pytest.raises(RunError, match=r"class indices in \[0, 9\]"):
        run_sample(tmp_path / "c", trained["ckpt"], "labels=12")
    with pytest.raises(ConfigCompositionException, match="eta"):  # an option that sampler does not have
        run_sample(tmp_path / "e", trained["ckpt"], "sampler=dpm_solver", "sampler.eta=0.5")


def test_ema_and_raw_weights_give_different_images(trained, tmp_path):
    run_sample(tmp_path / "ema", trained["ckpt"], "sampler=ddim", "sampler.steps=5")
    run_sample(tmp_path / "raw", trained["ckpt"], "sampler=ddim", "sampler.steps=5", "ema=false")
    assert not np.array_equal(*(np.load(tmp_path / x / "samples.npz")["arr_0"] for x in ("ema", "raw")))


def test_nll_is_finite_and_lower_after_training(trained, tmp_path):
    # the ODE's figure beside the bound, at a loose tolerance (its accuracy is tests/test_likelihood.py's)
    args = ("eval=nll", "eval.batches=1", "sampler.steps=2", "batch_size=32", "eval.rtol=1e-3", "eval.atol=1e-3")
    good = run_sample(tmp_path / "t", trained["ckpt"], *args)
    bad = run_sample(tmp_path / "u", trained["untrained"], *args)
    assert np.isfinite(good["nll_bpd"]) and good["images"] == 32 and good["split"] == "val"  # digits: no test split
    assert good["nll_bpd"] < bad["nll_bpd"] and good["ode_nll_bpd"] < bad["ode_nll_bpd"]
    assert good["nll_bpd"] == pytest.approx(good["prior_bpd"] + good["decoder_bpd"] + good["kl_bpd"])


def test_fid_with_a_supplied_feature_network(trained, tmp_path):
    results = run_sample(
        tmp_path, trained["ckpt"], "eval=fid", TINY_FEATURES, "eval.reference_images=64", "n=16", "sampler.steps=4"
    )
    assert np.isfinite(results["fid"]) and results["fid"] > 0 and np.isfinite(results["kid"])
    assert json.loads((tmp_path / "results.json").read_text())["reference_images"] == 64


def test_fid_offline_stops_cleanly_and_keeps_the_samples(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached Inception weights
    with pytest.raises(RunError, match=r"Inception-v3 weights .* could not be downloaded.*put it at"):
        run_sample(tmp_path / "out", trained["ckpt"], "eval=fid", "sampler.steps=2")
    assert (tmp_path / "out" / "samples.npz").is_file() and (tmp_path / "out" / "results.json").is_file()


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # creates the file, if ever unpickled

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Payload()}, evil)
    with pytest.raises(RunError, match=r"refusing to load .* \(io\.open\), which can carry code; none of it"):
        run_sample(tmp_path / "out", evil)
    assert not marker.exists()


def test_missing_and_corrupt_checkpoints_give_their_messages(trained, tmp_path):
    result = run_script("sample.py", f"ckpt={tmp_path / 'missing.ckpt'}", f"out_dir={tmp_path / 'o'}")
    assert result.returncode == 1 and "error: no checkpoint at" in result.stderr and "Traceback" not in result.stderr
    corrupt = tmp_path / "corrupt.ckpt"
    rng = np.random.default_rng(0)
    for size in (1, 10, 100, 1000, 10_000):  # garbage of every length makes torch.load fail in its own way
        corrupt.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        with pytest.raises(RunError, match="not a readable checkpoint"):
            run_sample(tmp_path / "out", corrupt)
    real = Path(trained["ckpt"]).read_bytes()
    corrupt.write_bytes(real[: len(real) // 2])  # a copy cut short
    with pytest.raises(RunError, match="not a readable checkpoint"):
        run_sample(tmp_path / "out", corrupt)
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(RunError, match="not a checkpoint of this project"):
        run_sample(tmp_path / "out2", other)


@pytest.mark.slow
def test_a_sweep_writes_its_summary_table(trained):
    result = run_script(
        "sample.py",
        "-m",
        f"ckpt={trained['ckpt']}",
        "sampler=ddim,dpm_solver",
        "sampler.steps=3",
        "n=4",
        "batch_size=4",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    sweeps = sorted(trained["ckpt"].parent.glob("sweep_*"))
    summary = (sweeps[-1] / "summary.md").read_text().splitlines()
    assert summary[0].startswith("| sampler | steps | nfe | seconds")
    assert [line.split("|")[1].strip() for line in summary[2:]] == ["ddim", "dpm_solver"]
    assert {p.name for p in sweeps[-1].iterdir() if p.is_dir()} == {
        "ddim_3steps_n-4",
        "dpm_solver_3steps_n-4",
    }


def test_the_default_output_folder_is_beside_the_checkpoint(trained):
    result = run_script(
        "sample.py", f"ckpt={trained['ckpt']}", "sampler=dpm_solver", "sampler.steps=3", "n=2", "batch_size=2"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = trained["ckpt"].parent / "last_dpm_solver_3steps_n-2"
    assert (out / "samples.npz").is_file()
    assert "Wrote grid.png, process.gif, samples.npz" in result.stdout and "images/s" in result.stdout
    assert (out / "samples.npz").stat().st_mode & 0o044 == 0o044  # readable by group and others, as usual


@pytest.mark.slow
def test_results_that_differ_get_their_own_folders_and_none_is_overwritten(trained):
    """Runs differing only in labels or seed keep both results; the same run again refuses to overwrite, unless
    told to; a failed run leaves no empty folder."""
    base = [f"ckpt={trained['ckpt']}", "sampler=ddim", "sampler.steps=2", "n=2", "batch_size=2"]
    folders = []
    for extra in (["labels=3", "guidance=3.0"], ["labels=7", "guidance=3.0"], ["seed=1", "ema=false"]):
        result = run_script("sample.py", *base, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        folders.append(next(line for line in result.stdout.splitlines() if line.startswith("Wrote")).split(" to ")[-1])
    assert len(set(folders)) == 3 and all((Path(f) / "results.json").is_file() for f in folders)
    again = run_script("sample.py", *base, "labels=3", "guidance=3.0")
    assert again.returncode == 1 and "already holds the results" in again.stderr and "overwrite=true" in again.stderr
    assert run_script("sample.py", *base, "labels=3", "guidance=3.0", "overwrite=true").returncode == 0
    failed = run_script("sample.py", *base, "labels=99")
    assert failed.returncode == 1 and "labels must be class indices" in failed.stderr
    assert not (trained["ckpt"].parent / "last_ddim_2steps_labels-99_n-2").exists()


def test_evaluation_finds_the_split_of_the_training_run(trained):
    """The validation split follows from the training seed, which the checkpoint keeps with the data settings."""
    from omegaconf import OmegaConf

    from diffusion.data.datamodule import DiffusionDataModule
    from sample import dataset_for

    hparams = torch.load(trained["ckpt"], weights_only=True)["hyper_parameters"]
    assert hparams["dataset"]["seed"] == 0
    other = {**hparams, "dataset": {**hparams["dataset"], "seed": 7}}

    def val_images(datamodule):
        return torch.cat([x0 for x0, _ in datamodule.batches("val", 64)])

    rebuilt = dataset_for(other, OmegaConf.create({"data_root": None}))
    trained_with_7 = DiffusionDataModule(**{**hparams["dataset"], "seed": 7})
    trained_with_7.setup("fit")
    assert torch.equal(val_images(rebuilt), val_images(trained_with_7))
    assert not torch.equal(val_images(rebuilt), val_images(dataset_for(hparams, OmegaConf.create({"data_root": None}))))
