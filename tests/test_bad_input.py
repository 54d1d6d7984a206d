"""Every bad input a clear error: each one drives the real entry point and must end with status 1, an `error:` (or
Hydra's own composition message) naming the key, and no Python traceback. The catalogue is the one place to add a
new bad input: one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.data.prepare import main as prepare_main
from sample import main as sample_main
from tests.helpers import ROOT, compose_config, run_script, write_image_folder
from train import main as train_main
from train import train

OWN_NETWORK = ["model=custom", "model._target_=tests.test_networks.TinyConvNet", "+model.width=4"]

# (script, arguments, fragments the message must hold); CKPT stands for a real checkpoint, RUN for a fresh folder
CATALOGUE = [
    ("sample.py", [], ["error: sample.py needs a checkpoint", "ckpt=PATH"]),
    ("sample.py", ["ckpt=EMPTY"], ["error:", "is not a readable checkpoint (the file is empty)"]),
    ("train.py", ["trainer.max_steps=abc"], ["error: trainer.max_steps='abc'"]),
    ("train.py", ["trainer.max_steps=-1"], ["error: trainer.max_steps=-1", "optimizer.lr_schedule=constant"]),
    ("train.py", ["dataset.batch_size=0"], ["error: dataset.batch_size=0"]),
    ("train.py", ["dataset.batch_size=-4"], ["error: dataset.batch_size=-4"]),
    ("train.py", ["dataset.batch_size=abc"], ["dataset.batch_size", "could not be converted to Integer"]),
    ("train.py", ["+dataset.batchsize=8"], ["error: dataset.batchsize is not a setting", "dataset.batch_size"]),
    ("train.py", ["dataset.batchsize=8"], ["dataset.batchsize", "Key 'batchsize' not in 'DatasetSettings'"]),
    ("train.py", ["diffusion.label_dropout=2"], ["error: diffusion.label_dropout=2 ", "[0, 1)"]),
    ("train.py", ["optimizer.warmup_steps=-5"], ["error: optimizer.warmup_steps=-5"]),
    ("train.py", ["optimizer.lr=0"], ["error: optimizer.lr=0.0"]),
    ("train.py", ["callbacks.previews.guidance=-2"], ["error: callbacks.previews.guidance=-2"]),
    ("train.py", ["callbacks.previews.gif_frames=-1"], ["error: callbacks.previews.gif_frames=-1"]),
    ("train.py", ["dataset=folder"], ["error: dataset.root must be given", "dataset.root=/path/to/images"]),
    ("train.py", ["trainer=gpu", "trainer.accelerator=gpu"], ["error: trainer.accelerator='gpu'", "trainer=cpu"]),
    ("train.py", ["dataset=folder", "dataset.root=RUN/broken", "dataset.strict=true"], ["dataset.strict=false"]),
    (
        "train.py",
        ["dataset=streaming", "dataset.root=RUN/broken"],
        ["error: dataset=streaming reads a folder written by", "python -m diffusion.data.prepare"],
    ),
    ("sample.py", ["ckpt=CKPT", "sampler.steps=abc"], ["error: sampler.steps='abc'"]),
    ("sample.py", ["ckpt=FLOW1", "eval=nll"], ["error: the likelihood integrates the probability-flow ODE", "t_max"]),
    ("sample.py", ["ckpt=EDM", "eval=nll", "eval.probes=0"], ["error: eval.probes=0", "eval.probes=1"]),
    ("sample.py", ["ckpt=EDM", "eval=nll", "eval.rtol=0"], ["error: eval.rtol=0", "1e-5"]),
    ("sample.py", ["ckpt=CKPT", "sampler=heun", "sampler.s_churn=-1"], ["error: sampler.s_churn=-1", "total churn"]),
    ("train.py", ["diffusion=edm", "diffusion.learned_variance=true"], ["diffusion.learned_variance", "not in struct"]),
    (
        "train.py",
        ["diffusion=edm", "+diffusion.learned_variance=true"],
        ["error: diffusion.learned_variance is not a setting of diffusion (diffusion.core.objectives.EDM)", "p_mean"],
    ),
    (
        "train.py",
        ["callbacks.posthoc_ema.every_n_images=-1"],
        ["error: callbacks.posthoc_ema.every_n_images=-1", "0 switches post-hoc EMA off"],
    ),
    (
        "train.py",
        ["callbacks.posthoc_ema.sigma_rels=[0.05,0.5]"],
        ["error: callbacks.posthoc_ema.sigma_rels=[0.05, 0.5]", "[0.01, 0.28]"],
    ),
    ("sample.py", ["ckpt=CKPT", "ema_length=0.5"], ["error: ema_length=0.5", "[0.01, 0.28]"]),
    ("sample.py", ["ckpt=CKPT", "ema_length=0.08", "ema=false"], ["error: ema=False", "leave ema=true"]),
    ("train.py", ["diffusion=edm", "diffusion.p_std=0"], ["error: diffusion.p_std=0", "(0, 10]"]),
    (
        "train.py",
        ["diffusion=ddpm", "+diffusion.p_mean=-0.4"],
        ["error: diffusion.p_mean is not a setting of diffusion (diffusion.core.objectives.DDPM)", "timesteps"],
    ),
    ("sample.py", ["ckpt=CKPT", "sampler.steps=0"], ["error: sampler.steps=0"]),
    ("sample.py", ["ckpt=CKPT", "batch_size=0"], ["error: batch_size=0"]),
    ("sample.py", ["ckpt=CKPT", "grid_images=0"], ["error: grid_images=0"]),
    ("sample.py", ["ckpt=CKPT", "gif_frames=0"], ["error: gif_frames=0"]),
    ("sample.py", ["ckpt=CKPT", "n=0"], ["error: n=0"]),
    ("sample.py", ["ckpt=CKPT", "n=-5"], ["error: n=-5"]),
    ("sample.py", ["ckpt=CKPT", "precision=64"], ["error: precision='64'"]),
    ("sample.py", ["ckpt=CKPT", "device=foo"], ["error: device='foo'"]),
    ("sample.py", ["ckpt=CKPT", "device=cuda"], ["error: device=cuda was asked for"]),
    ("sample.py", ["ckpt=CKPT", "guidance=-1"], ["error: guidance=-1.0"]),
    ("sample.py", ["ckpt=CKPT", "sampler=dpm_solver", "sampler.eta=0.5"], ["sampler.eta", "not in struct"]),
    ("sample.py", ["ckpt=CKPT", "sampler=ddim", "sampler.eta=3"], ["error: sampler.eta=3"]),
    ("sample.py", ["ckpt=CKPT", "sampler.spacing=leading"], ["error: sampler.spacing='leading'", "trailing"]),
    ("sample.py", ["ckpt=CKPT", "dynamic_threshold=99.5"], ["error: dynamic_threshold=99.5", "0.995"]),
    ("sample.py", ["ckpt=CKPT", "sampler=ddpm", "sampler.variance=big"], ["error: sampler.variance='big'", "beta"]),
    # every closed choice, list and range, checked before any work
    (
        "train.py",
        ["diffusion=ddpm", "diffusion.target=epsilon"],
        ["error: diffusion.target='epsilon'", "did you mean eps?"],
    ),
    ("train.py", ["diffusion=ddpm", "diffusion.loss=l3"], ["error: diffusion.loss='l3'", "mse, l1"]),
    ("train.py", ["diffusion=ddpm", "diffusion.schedule=wavy"], ["error: diffusion.schedule='wavy'", "linear, cosine"]),
    ("train.py", ["diffusion=ddpm", "diffusion.timesteps=1"], ["error: diffusion.timesteps=1"]),
    (
        "train.py",
        ["diffusion=ddpm", "diffusion.timesteps=10"],
        ["error: diffusion.schedule='linear'", "more than 20 steps"],
    ),
    (
        "train.py",
        ["diffusion=ddpm", "diffusion.loss=l1", "diffusion.min_snr_gamma=5"],
        ["error: diffusion.min_snr_gamma=5 ", "mse"],
    ),
    (
        "train.py",
        ["diffusion=edm", "diffusion.sigma_max=0.001"],
        ["error: diffusion.sigma_max=0.001", "above sigma_min"],
    ),
    ("train.py", ["diffusion=flow", "diffusion.t_sampling=beta"], ["error: diffusion.t_sampling='beta'", "uniform"]),
    ("train.py", ["diffusion=flow", "diffusion.shift=0"], ["error: diffusion.shift=0", "1 for none"]),
    ("train.py", ["diffusion=flow", "diffusion.logit_std=-1"], ["error: diffusion.logit_std=-1", "SD3's is 1"]),
    ("train.py", ["diffusion=flow", "diffusion.t_min=0"], ["error: diffusion.t_min=0", "0.001"]),
    ("train.py", ["diffusion=flow", "diffusion.t_max=1.5"], ["error: diffusion.t_max=1.5", "at most 1"]),
    ("sample.py", ["ckpt=FLOW1", "sampler=ode"], ["error: sampler=ode cannot start from pure noise", "t_max"]),
    ("train.py", ["optimizer.lr_schedule=linear"], ["error: optimizer.lr_schedule='linear'", "constant, cosine"]),
    ("train.py", ["optimizer.betas=[0.9]"], ["error: optimizer.betas=[0.9]", "two numbers"]),
    ("train.py", ["model.channel_mult=[]"], ["error: model.channel_mult=[]", "at least 1 whole numbers"]),
    ("train.py", ["model.channel_mult=[1,0]"], ["error: model.channel_mult=[1, 0]"]),
    ("train.py", ["model.attention_resolutions=[5]"], ["error: model.attention_resolutions [5] are not feature-map"]),
    ("train.py", ["model.dropout=1.5"], ["error: model.dropout=1.5", "[0, 1)"]),
    ("train.py", ["model=uvit_tiny", "model.patch_size=3"], ["error: model.patch_size=3 does not divide", "use one"]),
    ("train.py", ["model=uvit_tiny", "model.num_heads=5"], ["error: model.width=88 is not a multiple of", "=80"]),
    ("train.py", ["model=uvit_tiny", "model.num_blocks=6"], ["error: model.num_blocks=6 is even", "e.g. 7"]),
    ("train.py", ["model=edm2_tiny", "model.res_balance=1.5"], ["error: model.res_balance=1.5", "[0, 1]"]),
    ("train.py", ["model=edm2_tiny", "model.fourier_bandwidths=[1]"], ["error: model.fourier_bandwidths=[1]"]),
    ("train.py", ["diffusion=edm", "diffusion.learned_weighting=maybe"], ["error: diffusion.learned_weighting="]),
    ("train.py", ["optimizer.t_ref=0"], ["error: optimizer.t_ref=0", "70000"]),
    ("train.py", ["dataset.channels=2"], ["error: dataset.channels", "1 (grayscale) or 3 (RGB)"]),
    ("train.py", ["dataset.background=[1,2]"], ["error: dataset.background=[1, 2]", "RGB"]),
    (
        "train.py",
        ["diffusion=ddpm", "callbacks.previews.steps=5000"],
        ["error: callbacks.previews.steps=5000", "diffusion.timesteps"],
    ),
    ("train.py", ["callbacks.ema.half_life_images=-5"], ["error: callbacks.ema.half_life_images=-5"]),
    ("train.py", ["callbacks.fid.kid_subset_size=1"], ["error: callbacks.fid.kid_subset_size=1"]),
    ("train.py", ["trainer.accelerator=tpu"], ["error: trainer.accelerator='tpu'", "auto, cpu, gpu"]),
    ("train.py", ["trainer.gradient_clip_val=-1"], ["error: trainer.gradient_clip_val=-1"]),
    # values a library refuses: the project's paragraph, naming the key, not Hydra's "Error in call to target"
    ("train.py", ["trainer.precision=bogus"], ["error: trainer: Precision 'bogus' is invalid", "trainer.KEY"]),
    ("train.py", ["+callbacks.ema.foo=1"], ["error: callbacks.ema:", "unexpected keyword argument 'foo'"]),
    # the prepare command: train.py's typed dataset settings and ranges, and its two folders
    ("prepare", ["IMAGES", "OUT", "dataset.image_size=abc"], ["error:", "image_size=abc", "converted to Integer"]),
    ("prepare", ["IMAGES", "OUT", "dataset.image_size=0"], ["error: dataset.image_size=0 is not a whole number"]),
    ("prepare", ["IMAGES", "OUT", "dataset.val_fraction=1.5"], ["error: dataset.val_fraction=1.5 is not a number"]),
    ("prepare", ["IMAGES", "OUT", "dataset.size=8"], ["error: 'dataset.size=8' is not a setting", "image_size"]),
    ("prepare", ["IMAGES", "OUT", "dataset.strict=maybe"], ["error:", "dataset.strict=maybe", "not a valid bool"]),
    ("prepare", ["IMAGES", "FILE", "dataset.image_size=8"], ["error: the output", "is a file"]),
    ("prepare", ["RUN/nothing", "OUT", "dataset.image_size=8"], ["error: the source", "does not exist"]),
    ("prepare", ["IMAGES", "RUN", "dataset.image_size=8"], ["error:", "already holds files"]),
    ("prepare", ["IMAGES", "OUT", "dataset.image_size=8"], ["error:", "1 usable image(s): too few", "val_fraction"]),
    # files read back: each checked before it is used, a damaged one named with what to do
    (
        "sample.py",
        ["ckpt=SNAPSHOT_CUT", "ema_length=0.08"],
        ["error: the post-hoc EMA snapshot", "step_0000002.pt is not readable", "Remove it"],
    ),
    (
        "sample.py",
        ["ckpt=SNAPSHOT_LENGTHS", "ema_length=0.08"],
        ["error:", "step_0000002.pt tracks the EMA lengths [0.05, 0.2]", "another run's", "ema_snapshots=PATH"],
    ),
    (
        "sample.py",
        ["ckpt=SNAPSHOT_SHAPES", "ema_length=0.08"],
        ["error:", "step_0000002.pt holds the weights of another network", "move it out of the folder"],
    ),
    *(
        (
            "train.py",
            ["dataset=streaming", f"dataset.root=STREAM_{name}", "dataset.image_size=8", "model.channel_mult=[1]"],
            ["error:", file, "is damaged", "python -m diffusion.data.prepare"],
        )
        for name, file in (("JSON", "dataset.json"), ("INDEX", "index.json"), ("CHUNK", ".bin"))
    ),
    # every number in its range (diffusion/settings.py's tables), samplers', callbacks' and trainer's included
    ("sample.py", ["ckpt=CKPT", "sampler=heun", "sampler.rho=0"], ["error: sampler.rho=0 is not a number in (0, inf]"]),
    ("sample.py", ["ckpt=CKPT", "sampler=heun", "sampler.sigma_min=100"], ["error: sampler.sigma_min=100", "above"]),
    ("train.py", ["trainer.check_val_every_n_epoch=0"], ["error: trainer.check_val_every_n_epoch=0"]),
    ("train.py", ["trainer.devices=0"], ["error: trainer.devices=0", "-1 for all"]),
    ("train.py", ["callbacks.previews.every_n_steps=abc"], ["error: callbacks.previews.every_n_steps='abc'"]),
    ("train.py", ["callbacks.previews.every_n_steps=-1"], ["error: callbacks.previews.every_n_steps=-1"]),
    ("train.py", ["sampler=sde", "sampler.snr=0"], ["error: sampler.snr=0", "signal-to-noise"]),
    ("train.py", ["seed=-3"], ["error: seed=-3"]),
    ("sample.py", ["ckpt=CKPT", "eval=fid", "eval.feature=100"], ["error: eval.feature=100", "2048"]),
    # a run that would do nothing
    (
        "train.py",
        ["ckpt_path=CKPT", "trainer.max_steps=1"],
        ["error:", "is at step 1, and trainer.max_steps=1: resuming it would train nothing", "trainer.max_steps=1001"],
    ),
    # the network and the objective are the classes their _target_ names, with those classes' settings
    ("train.py", ["model=custom"], ["error: model._target_ must be given", "model._target_=mypackage.MyNet"]),
    ("train.py", ["model._target_=nowhere.Net"], ["error: model._target_='nowhere.Net' cannot be imported"]),
    ("train.py", ["diffusion._target_=torch.nn.Identity"], ["error: diffusion._target_='torch.nn.Identity' does not"]),
    ("train.py", ["diffusion._target_=torch.nn.Linear"], ["error: diffusion.p_mean is not a setting of diffusion"]),
    ("train.py", ["+model.widht=3"], ["error: model.widht is not a setting of model", "UNet"]),
    ("train.py", ["model.compile=maybe"], ["error: model.compile='maybe' is not true or false"]),
    ("train.py", ["model=custom", "model._target_=torch.nn.Identity"], ["error: model._target_", "num_classes"]),
    (
        "train.py",
        [*OWN_NETWORK, "model.checkpointing=true"],
        ["error: model.checkpointing=true", "leave model.checkpointing=false"],
    ),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    run = root / "trained"
    train(compose_config("train", ["debug=smoke", "~callbacks.previews", "trainer.max_steps=1"], run))
    edm = root / "edm"
    train(compose_config("train", ["debug=smoke", "~callbacks.previews", "trainer.max_steps=1", "diffusion=edm"], edm))
    flow = root / "flow"  # a flow whose noisiest level is pure noise
    overrides = ["debug=smoke", "~callbacks.previews", "trainer.max_steps=1", "diffusion=flow", "diffusion.t_max=1"]
    train(compose_config("train", overrides, flow))
    (root / "empty.ckpt").write_bytes(b"")
    broken = root / "broken"
    broken.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(broken / "ok.png")
    (broken / "cut.png").write_bytes((broken / "ok.png").read_bytes()[:2000])  # a header, then nothing
    (root / "a_file").write_text("not a folder")
    snapshots = {}  # an old run's post-hoc EMA snapshots, one of them cut short or another run's
    for name in ("cut", "lengths", "shapes"):
        old_run = shutil.copytree(ROOT / "tests" / "data" / "checkpoints_38efebf" / "edm", root / f"snapshots_{name}")
        snapshot = old_run / "ema_snapshots" / "step_0000002.pt"
        if name == "cut":
            snapshot.write_bytes(snapshot.read_bytes()[:5000])
        else:
            state = torch.load(snapshot, weights_only=True)
            if name == "lengths":
                state["sigma_rels"] = [0.05, 0.2]
            else:
                key = next(iter(state["averages"][0]))
                state["averages"][0][key] = torch.zeros(3)
            torch.save(state, snapshot)
        snapshots[f"SNAPSHOT_{name.upper()}"] = old_run / "checkpoints" / "last.ckpt"
    streams = {}  # a prepared folder, and copies with a damaged description, index or chunk
    write_image_folder(root / "images", {"a": 6})
    prepare_main([str(root / "images"), str(root / "stream"), "dataset.image_size=8", "--workers", "1"])
    for name, file, damage in [("JSON", "dataset.json", b"{bad"), ("INDEX", "train/index.json", b"[]")]:
        copy = shutil.copytree(root / "stream", root / f"stream_{name.lower()}")
        (copy / file).write_bytes(damage)
        streams[f"STREAM_{name}"] = copy
    copy = shutil.copytree(root / "stream", root / "stream_chunk")
    chunk = next((copy / "train").glob("*.bin"))
    chunk.write_bytes(chunk.read_bytes()[:100])
    streams["STREAM_CHUNK"] = copy
    return {
        **snapshots,
        **streams,
        "IMAGES": broken,
        "FILE": root / "a_file",
        "CKPT": run / "checkpoints" / "last.ckpt",
        "EDM": edm / "checkpoints" / "last.ckpt",
        "FLOW1": flow / "checkpoints" / "last.ckpt",
        "EMPTY": root / "empty.ckpt",
        "RUN": root,
    }


def run_entry_point(script: str, arguments: list[str], out: Path, capsys) -> tuple[int, str]:
    """The entry point's task as Hydra's command line runs it (composition, then the error reporter around the
    task), in this process: (exit status, stderr). Composition errors are reported as Hydra reports them. The
    prepare command is its own main (python -m diffusion.data.prepare)."""
    if script == "prepare":
        try:
            return prepare_main([a.replace("OUT", str(out)) for a in arguments]), capsys.readouterr().err
        except SystemExit as stop:
            return int(stop.code or 0), capsys.readouterr().err
    name = script.removesuffix(".py")
    try:
        cfg = compose_config(name, arguments, out)
    except Exception as error:  # Hydra prints the message and exits with status 1
        return 1, f"{error}\n{error.__cause__ or ''}"
    entry = {"train": train_main, "sample": sample_main}[name].__wrapped__  # the task without @hydra.main
    try:
        entry(cfg)
    except SystemExit as stop:
        return int(stop.code or 0), capsys.readouterr().err
    return 0, capsys.readouterr().err


@pytest.mark.parametrize(("script", "arguments", "fragments"), CATALOGUE, ids=[" ".join(c[1]) for c in CATALOGUE])
def test_bad_input_gives_a_one_paragraph_error(tmp_path, files, capsys, script, arguments, fragments):
    def fill(text: str) -> str:
        for name, path in files.items():
            text = text.replace(name, str(path))
        return text

    extra = ["debug=smoke"] if script == "train.py" and "trainer=gpu" not in arguments else []
    out = tmp_path / "out"
    status, message = run_entry_point(script, [*extra, *(fill(a) for a in arguments)], out, capsys)
    assert status == 1, message[-2000:]
    for fragment in fragments:
        assert fragment in message, message[-2000:]
    assert not out.exists() or script == "train.py"  # a failed sample.py leaves no folder


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "arguments", "fragment"),
    [
        ("sample.py", [], "error: sample.py needs a checkpoint"),
        ("train.py", ["debug=smoke", "dataset.batch_size=abc"], "could not be converted to Integer"),
        ("train.py", ["debug=smoke", "+dataset.batchsize=8"], "error: dataset.batchsize is not a setting"),
    ],
)
def test_the_command_line_reports_without_a_traceback(tmp_path, script, arguments, fragment):
    """The same, through the real command line (Hydra's own reporting included), for a few of the inputs."""
    where = f"hydra.run.dir={tmp_path / 'run'}" if script == "train.py" else f"out_dir={tmp_path / 'out'}"
    result = run_script(script, *arguments, where)
    assert result.returncode == 1 and "Traceback" not in result.stderr and fragment in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "arguments", "key"),
    [
        ("train.py", ["debug=smoke", "hydra.run.dir=FILE/run"], "hydra.run.dir"),
        ("train.py", ["-m", "debug=smoke", "seed=1,2", "hydra.sweep.dir=FILE/sweep"], "hydra.sweep.dir"),
        ("sample.py", ["ckpt=FILE.ckpt", "out_dir=FILE/out"], "out_dir"),
    ],
)
def test_an_output_folder_that_cannot_be_made_is_one_paragraph(tmp_path, script, arguments, key):
    """Hydra makes the run's folder before the task starts; one that cannot be made (here through a file, as on a
    read-only or virtual filesystem) is said in one paragraph naming the setting, before Hydra's traceback could."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_script(script, *(a.replace("FILE", str(blocker)) for a in arguments))
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"error: cannot write to {blocker}" in result.stderr and f"{key}=PATH" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_errors_are_the_users_by_their_type_not_by_where_they_were_raised():
    """A SettingError or RunError is reported as one paragraph wherever it comes from; any other error, a
    ValueError of the project's own core included, keeps its traceback."""
    from diffusion.core.networks.unet import UNet
    from diffusion.core.objectives import DDPM
    from diffusion.errors import RunError, SettingError, report_errors

    ddpm = dict(timesteps=100, target="eps", loss="mse", min_snr_gamma=None, learned_variance=False, vlb_weight=0.0)
    with pytest.raises(SystemExit):
        report_errors(lambda: DDPM(schedule="wavy", **ddpm))()  # the core's check of a closed choice: reported
    with pytest.raises(SystemExit):
        report_errors(lambda: (_ for _ in ()).throw(RunError("no data")))()
    with pytest.raises(ValueError, match="invalid literal"):
        report_errors(lambda: int("abc"))()  # Python's own: raised, with its traceback
    net = UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=[1], num_res_blocks=1,
               attention_resolutions=[], num_heads=1, dropout=0.0, scale_shift=False, num_classes=None,
               out_channels=1)  # fmt: skip
    with pytest.raises(ValueError, match="expects images of shape") as raised:
        report_errors(lambda: net(torch.zeros(1, 3, 8, 8), torch.zeros(1)))()  # a shape check in the network: a bug
    assert not isinstance(raised.value, SettingError)


def test_a_value_error_inside_the_network_mid_run_shows_its_traceback(tmp_path, monkeypatch, capsys):
    """A bug that makes the UNet's own shape check (in diffusion/core/networks/unet.py) raise ValueError during a
    training step is not taken for a user's error: it keeps its traceback."""
    from diffusion.core.model import DiffusionModel

    def cropped(self, x_in, noise_conditioning, labels):  # a bug: the images lose a row on their way to the network
        return self.network(x_in[:, :, 1:], noise_conditioning, labels)

    monkeypatch.setattr(DiffusionModel, "network_output", cropped)
    cfg = compose_config("train", ["debug=smoke", "~callbacks.previews"], tmp_path / "run")
    with pytest.raises(ValueError, match="the UNet expects images of shape"):
        train_main.__wrapped__(cfg)  # the task under report_errors, as the command line runs it
    assert "error:" not in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.num_classes=5"], "error: model.num_classes is 5 but the dataset has 10 classes"),
        (["dataset=cifar", "dataset.root=FILE/cifar"], "error: CIFAR-10 is not in"),
    ],
    ids=["in-setup", "in-prepare-data"],
)
def test_a_bad_input_under_two_processes_prints_one_message(tmp_path, overrides, message):
    """Both processes of a two-process run meet the bad input after the second process started: a class count the
    data does not have (found in setup, on every process), or data that cannot be downloaded (found in
    prepare_data, which Lightning runs on the first process only while the second waits): one message, no traceback
    (the second process's connection error included), status 1."""
    (tmp_path / "file").write_text("not a folder")  # the data's folder cannot be made in it, online or not
    overrides = [o.replace("FILE", str(tmp_path / "file")) for o in overrides]
    result = run_script("train.py", "debug=smoke", "trainer.devices=2", *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1" in result.stdout + result.stderr  # it got that far
    assert result.stderr.count(message) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
