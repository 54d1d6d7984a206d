"""8-bit images <-> the model's range [-1, 1]."""

import pytest
import torch

from diffusion.core.images import to_model_range, to_nhwc, to_uint8


def test_every_8bit_level_round_trips_exactly():
    levels = torch.arange(256, dtype=torch.uint8)
    x = to_model_range(levels)
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), levels)


def test_out_of_range_values_are_clamped_and_rounded():
    assert to_uint8(torch.tensor([-3.0, 3.0, 0.0, 1 / 255])).tolist() == [0, 255, 128, 128]


def test_layout_and_type_checks():
    assert to_nhwc(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)
    with pytest.raises(TypeError, match="expected uint8"):
        to_model_range(torch.zeros(3))
