"""The learning-rate schedule's warm-up and cosine curve, against their closed forms."""

import itertools
import math

import pytest

from diffusion.core.lr_schedule import lr_factor


def test_the_warm_up_is_linear_and_reaches_one():
    factors = [lr_factor(s, warmup_steps=4, total_steps=100, shape="constant", min_lr_ratio=0.1) for s in range(6)]
    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_the_cosine_runs_from_one_to_the_floor():
    shape = dict(warmup_steps=10, total_steps=110, shape="cosine", min_lr_ratio=0.05)
    assert lr_factor(10, **shape) == pytest.approx(1.0)
    assert lr_factor(60, **shape) == pytest.approx(0.05 + 0.95 * 0.5)  # half-way: cos(pi / 2) = 0
    assert lr_factor(35, **shape) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, **shape) == pytest.approx(0.05) and lr_factor(500, **shape) == pytest.approx(0.05)
    assert lr_factor(4, **shape) == pytest.approx(0.5 * 1.0)  # the ramp multiplies the (still 1) cosine
    values = [lr_factor(s, **shape) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # never rises after the warm-up


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="constant or cosine"):
        lr_factor(0, warmup_steps=0, total_steps=10, shape="linear", min_lr_ratio=0.0)
