"""dataset=streaming: a folder prepared once into LitData chunks (`python -m diffusion.data.prepare`), read back
exactly as dataset=folder reads the images, trained from, and resumed exactly mid-epoch on one and two processes."""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import pytest
import torch

from diffusion.data.datamodule import DiffusionDataModule
from diffusion.data.prepare import main as prepare_main
from diffusion.errors import RunError
from tests.helpers import load_state, run_script, write_image_folder
from tests.test_multiprocess import assert_same_training_state

SIZE = 16
# A 16x16 UNet of two levels, four steps a run; 120 training images are 7 steps an epoch in batches of 16 on one
# process and of 8 on two, so each resume below starts inside the first epoch and runs into the second (which
# LitData's loader, left to itself, replayed instead of reshuffling).
TRAIN = [
    "experiment=folder",
    "dataset=streaming",
    f"dataset.image_size={SIZE}",
    "debug=smoke",
    "model=tiny",
    "model.channel_mult=[1,2]",
    "model.attention_resolutions=[]",
    "dataset.batch_size=8",
    "trainer.accelerator=cpu",
    "~callbacks.previews",
]


def options(name: str, root: Path, **changes) -> dict:
    return dict(
        name=name, root=str(root), image_size=SIZE, channels=3, num_classes=None, labels_from_subfolders=True,
        batch_size=8, val_fraction=0.05, hflip=False, on_device=False, num_workers=0, pin_memory=False,
        persistent_workers=False, download=False, strict=False, background=[255, 255, 255], seed=0,
    ) | changes  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of mixed images (PNG, JPEG, WebP, grayscale, RGBA; two classes) and its preparation."""
    base = tmp_path_factory.mktemp("streaming")
    write_image_folder(base / "images", {"cats": 64, "dogs": 62})
    status = prepare_main(
        [str(base / "images"), str(base / "chunks"), f"dataset.image_size={SIZE}",
         "dataset.labels_from_subfolders=true", "--workers", "2"]
    )  # fmt: skip
    assert status == 0
    return base / "images", base / "chunks"


def items(data: DiffusionDataModule, split: str) -> collections.Counter:
    """The split's images and labels, as a multiset (the chunks' order is LitData's)."""
    data.setup()
    split = data.splits[data.split_name(split)]
    return collections.Counter((bytes(split[i][0].numpy()), int(split[i][1])) for i in range(len(split)))


def test_prepared_images_are_the_folders_images_in_the_same_split(prepared):
    """Every image of each split is, bit for bit and with its label, the one dataset=folder serves for that split:
    the same modes conversion, resize and crop, the same seeded split."""
    images, chunks = prepared
    folder = DiffusionDataModule(**options("folder", images))
    stream = DiffusionDataModule(**options("streaming", chunks))
    for split in ("train", "val"):
        expected = items(folder, split)
        assert items(stream, split) == expected and sum(expected.values()) == folder.split_size(split)
    assert stream.classes == folder.classes == ["cats", "dogs"]
    assert stream.split_size("train") == 120 and stream.split_size("test") == 6  # the test split is val


def test_a_run_trains_from_it_and_resumes_exactly(prepared, tmp_path):
    """4 steps, stop, resume to 8 == 8 straight steps: LitData's loader state is in the checkpoint."""
    _, chunks = prepared
    common = [*TRAIN, f"dataset.root={chunks}", "dataset.batch_size=16"]
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    for run, extra in ((straight, ["trainer.max_steps=8"]), (first, [])):
        result = run_script("train.py", *common, *extra, f"hydra.run.dir={run}")
        assert result.returncode == 0, result.stderr[-3000:]
    ckpt = first / "checkpoints" / "last.ckpt"
    result = run_script("train.py", *common, "trainer.max_steps=8", f"ckpt_path={ckpt}", f"hydra.run.dir={resumed}")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_state(straight / "checkpoints" / "last.ckpt"), load_state(resumed / "checkpoints" / "last.ckpt")
    assert_same_training_state(a, b)
    assert a["epoch"] == 1 and a["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["num_samples_yielded"] == 16


@pytest.mark.slow
def test_a_two_process_run_resumes_exactly(prepared, tmp_path):
    """The same on two processes (DDP, gloo): LitData shards the chunks over them; 4 + 4 steps == 8."""
    _, chunks = prepared
    common = [*TRAIN, f"dataset.root={chunks}", "trainer.devices=2"]
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    for run, extra in ((straight, ["trainer.max_steps=8"]), (first, [])):
        result = run_script("train.py", *common, *extra, f"hydra.run.dir={run}", timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
    ckpt = first / "checkpoints" / "last.ckpt"
    result = run_script(
        "train.py", *common, "trainer.max_steps=8", f"ckpt_path={ckpt}", f"hydra.run.dir={resumed}", timeout=400
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training_state(
        load_state(straight / "checkpoints" / "last.ckpt"), load_state(resumed / "checkpoints" / "last.ckpt")
    )


def test_an_unprepared_folder_a_wrong_size_and_a_used_output_are_refused(prepared, tmp_path):
    images, chunks = prepared
    (tmp_path / "copied").mkdir()
    for root, why in ((tmp_path / "copied", "holds no finished preparation"), (tmp_path / "nothing", "not exist")):
        with pytest.raises(RunError, match=rf"{why}.*python -m diffusion.data.prepare /path/to/images"):
            DiffusionDataModule(**options("streaming", root)).setup()
    with pytest.raises(RunError, match=r"holds 16x16 images with 3 channel\(s\), but .* dataset.image_size=32"):
        DiffusionDataModule(**options("streaming", chunks, image_size=32)).setup()
    with pytest.raises(RunError, match=r"prepared with 2 class\(es\); set dataset.num_classes=2"):
        DiffusionDataModule(**options("streaming", chunks, num_classes=5)).setup()
    with pytest.raises(SystemExit):  # holds files: refused (tests/test_bad_input.py has the other bad inputs)
        prepare_main([str(images), str(chunks), f"dataset.image_size={SIZE}"])
    assert (chunks / "dataset.json").is_file()


def test_prepared_labels_count_in_a_conditional_run(prepared, tmp_path):
    """Class labels from the prepared folder train a class-conditional model."""
    _, chunks = prepared
    run = tmp_path / "run"
    result = run_script("train.py", *TRAIN, f"dataset.root={chunks}", "model.num_classes=2", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_state(run / "checkpoints" / "last.ckpt")["hyper_parameters"]["model"]["num_classes"] == 2
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_a_chunk_damaged_mid_run_is_named(prepared, tmp_path):
    """A folder checked whole at the start, then cut short while training reads it (a copy still running, a disk
    failing): the read that fails stops with the paragraph naming the chunk, not LitData's timeout or NumPy's short
    buffer; a damaged chunk found at the start is named the same way."""
    _, chunks = prepared
    copy = shutil.copytree(chunks, tmp_path / "chunks")
    data = DiffusionDataModule(**options("streaming", copy))
    data.setup()
    chunk = next((copy / "train").glob("*.bin"))
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(RunError, match=rf"{chunk.name} is damaged \(100 bytes of .*python -m diffusion.data.prepare"):
        for _ in data.train_dataloader():
            pass
    with pytest.raises(RunError, match=rf"{chunk.name} is damaged"):
        DiffusionDataModule(**options("streaming", copy)).setup()
