"""U-ViT: the paper's size, the fold of the patch tokens back into pixels, the long skips, activation checkpointing,
and its settings checks."""

import pytest
import torch

from diffusion.core.networks.uvit import Block, UViT
from diffusion.errors import SettingError
from tests.helpers import network_preset


def preset(name, **overrides):
    return network_preset(UViT, name, **overrides)


def test_uvit_small_is_the_papers_44m_network():
    """U-ViT-S/2 on CIFAR-10 (Bao et al. 2023, Table 1 and Sec. 4.1): 44M parameters."""
    with torch.device("meta"):
        net = preset("uvit_small", image_size=32, in_channels=3, out_channels=3)
    assert len(net.in_blocks) == len(net.out_blocks) == 6
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(44e6, rel=0.02)


def test_the_patch_tokens_fold_back_into_their_pixels():
    """Token (i, j)'s p x p x C prediction lands on pixels (i p + a, j p + b) in channel c, as the reference code's
    einops rearrange 'B (h w) (p1 p2 C) -> B C (h p1) (w p2)' does: checked by hand, element by element."""
    torch.manual_seed(0)
    net = preset("uvit_tiny", image_size=8, in_channels=3, out_channels=3, patch_size=2)
    seen = {}
    net.decoder_pred.register_forward_hook(lambda m, i, out: seen.update(tokens=out))
    net.final_layer.register_forward_hook(lambda m, i, out: seen.update(image=i[0]))
    net(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 500.0]))
    tokens, image = seen["tokens"][:, net.extras :], seen["image"]
    p, grid = 2, 4
    expected = torch.empty_like(image)
    for i in range(grid):
        for j in range(grid):
            for a in range(p):
                for b in range(p):
                    for c in range(3):
                        expected[:, c, i * p + a, j * p + b] = tokens[:, i * grid + j, (a * p + b) * 3 + c]
    torch.testing.assert_close(image, expected, rtol=0, atol=0)


def test_the_long_skips_join_each_out_block_to_its_mirror():
    """The first out block takes the last in block's output, the last out block the first's."""
    net = preset("uvit_tiny", num_blocks=5)
    outputs, skips = {}, []
    for k, block in enumerate(net.in_blocks):
        block.register_forward_hook(lambda m, i, out, k=k: outputs.update({k: out}))
    for block in net.out_blocks:
        block.register_forward_hook(lambda m, i, out: skips.append(i[1]))
    net(torch.randn(2, 1, 16, 16), torch.tensor([3.0, 900.0]))
    assert [s is outputs[k] for s, k in zip(skips, (1, 0), strict=True)] == [True, True]


def test_activation_checkpointing_gives_the_same_gradients_and_recomputes_the_blocks(monkeypatch):
    calls = []
    forward = Block.forward

    def counted(self, *args):
        calls.append(1)
        return forward(self, *args)

    monkeypatch.setattr(Block, "forward", counted)
    x, c, labels = torch.randn(2, 1, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([0, 10])
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = preset("uvit_tiny", num_classes=10)
        net.checkpointing = checkpointing
        calls.clear()
        loss = net(x, c, labels).square().mean()
        loss.backward()
        assert len(calls) == 7 * (2 if checkpointing else 1)
        results.append((loss.detach(), {name: p.grad.clone() for name, p in net.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_labels_and_the_noise_level_reach_the_output():
    torch.manual_seed(0)
    net = preset("uvit_tiny", num_classes=3)
    x, c = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 10.0])
    out = net(x, c, torch.tensor([0, 3]))  # 3: the null label
    assert not torch.allclose(out, net(x, c + 100, torch.tensor([0, 3])), atol=1e-4)
    assert not torch.allclose(out, net(x, c, torch.tensor([1, 3])), atol=1e-4)
    with pytest.raises(ValueError, match="class-conditional and needs labels"):
        net(x, c, None)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(patch_size=3), r"model.patch_size=3 does not divide dataset.image_size=16 into whole patches; use one"),
        (dict(width=90), r"model.width=90 is not a multiple of model.num_heads=4; e.g. model.width=88"),
        (dict(num_blocks=6), r"model.num_blocks=6 is even: .* use an odd number, e.g. 7"),
        (dict(mlp_ratio=0), r"model.mlp_ratio=0 is not a number in \(0, 64\]"),
    ],
)
def test_bad_settings_are_refused_with_one_paragraph(overrides, message):
    with pytest.raises(SettingError, match=message):
        preset("uvit_tiny", **overrides)


@pytest.mark.slow
def test_uvit_trains_with_labels_and_checkpointing_resumes_exactly_and_samples(tmp_path):
    """train.py with model=uvit_tiny under v-prediction, class labels, activation checkpointing and the EMA: 4 + 4 = 8
    steps equal 8 straight; then sample.py from the checkpoint with guidance."""
    from tests.helpers import load_state, resume_four_plus_four, run_script
    from tests.test_multiprocess import assert_same_training_state

    common = [
        "debug=smoke", "model=uvit_tiny", "diffusion=v_prediction", "model.num_classes=10",
        "model.checkpointing=true", "~callbacks.previews",
    ]  # fmt: skip
    straight, resumed = resume_four_plus_four(common, tmp_path)
    assert_same_training_state(
        load_state(straight / "checkpoints" / "last.ckpt"), load_state(resumed / "checkpoints" / "last.ckpt")
    )
    result = run_script(
        "sample.py", f"ckpt={straight / 'checkpoints' / 'last.ckpt'}", "sampler=dpm_solver", "sampler.steps=4", "n=4",
        "guidance=2.0", f"out_dir={tmp_path / 'samples'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
