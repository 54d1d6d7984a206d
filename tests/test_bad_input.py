"""Every bad input a clear error: each one drives the real entry point and must end with status 1, an `error:` (or
Hydra's own composition message) naming the key, and no Python traceback. The catalogue is the one place to add a
new bad input: one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sample import main as sample_main
from tests.helpers import compose_config, run_script
from train import main as train_main
from train import train

# (script, arguments, fragments the message must hold); CKPT stands for a real checkpoint, RUN for a fresh folder
CATALOGUE = [
    ("sample.py", [], ["error: sample.py needs a checkpoint", "ckpt=PATH"]),
    ("sample.py", ["ckpt=EMPTY"], ["error:", "is not a readable checkpoint (the file is empty)"]),
    ("train.py", ["trainer.max_steps=abc"], ["error: trainer.max_steps='abc'"]),
    ("train.py", ["trainer.max_steps=-1"], ["error: trainer.max_steps=-1", "optimizer.schedule=constant"]),
    ("train.py", ["dataset.batch_size=0"], ["error: dataset.batch_size=0"]),
    ("train.py", ["dataset.batch_size=-4"], ["error: dataset.batch_size=-4"]),
    ("train.py", ["dataset.batch_size=abc"], ["dataset.batch_size", "could not be converted to Integer"]),
    ("train.py", ["+dataset.batchsize=8"], ["error: dataset.batchsize is not a setting", "dataset.batch_size"]),
    ("train.py", ["dataset.batchsize=8"], ["dataset.batchsize", "Key 'batchsize' not in 'DatasetSettings'"]),
    ("train.py", ["diffusion.label_dropout=2"], ["error: diffusion.label_dropout=2.0", "[0, 1)"]),
    ("train.py", ["optimizer.warmup_steps=-5"], ["error: optimizer.warmup_steps=-5"]),
    ("train.py", ["optimizer.lr=0"], ["error: optimizer.lr=0.0"]),
    ("train.py", ["callbacks.previews.guidance=-2"], ["error: callbacks.previews.guidance=-2"]),
    ("train.py", ["callbacks.previews.gif_frames=-1"], ["error: callbacks.previews.gif_frames=-1"]),
    ("train.py", ["dataset=folder"], ["error: dataset.root must be given", "dataset.root=/path/to/images"]),
    ("train.py", ["trainer=gpu", "trainer.accelerator=gpu"], ["error: trainer.accelerator='gpu'", "trainer=cpu"]),
    ("train.py", ["dataset=folder", "dataset.root=RUN/broken", "dataset.strict=true"], ["dataset.strict=false"]),
    ("sample.py", ["ckpt=CKPT", "sampler.steps=abc"], ["error: sampler.steps='abc'"]),
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
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    run = root / "trained"
    train(compose_config("train", ["debug=smoke", "~callbacks.previews", "trainer.max_steps=1"], run))
    (root / "empty.ckpt").write_bytes(b"")
    broken = root / "broken"
    broken.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(broken / "ok.png")
    (broken / "cut.png").write_bytes((broken / "ok.png").read_bytes()[:2000])  # a header, then nothing
    return {"CKPT": run / "checkpoints" / "last.ckpt", "EMPTY": root / "empty.ckpt", "RUN": root}


def run_entry_point(script: str, arguments: list[str], out: Path, capsys) -> tuple[int, str]:
    """The entry point's task as Hydra's command line runs it (composition, then the error reporter around the
    task), in this process: (exit status, stderr). Composition errors are reported as Hydra reports them."""
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


def test_a_value_error_inside_a_library_keeps_its_traceback():
    """Only the project's own checks become one-paragraph errors; a ValueError raised inside a library is a bug."""
    from diffusion.core.schedules import make_betas
    from diffusion.errors import report_errors

    with pytest.raises(SystemExit):
        report_errors(lambda: make_betas("wavy", 100))()  # the project's check: reported
    with pytest.raises(ValueError, match="invalid literal"):
        report_errors(lambda: int("abc"))()  # Python's own: raised, with its traceback
