"""The learning-rate schedule's warm-up and cosine curve, against their closed forms."""

import itertools
import math

import pytest

from diffusion.core.lr_schedule import lr_factor


def test_the_warm_up_is_linear_and_reaches_one():
    shape = dict(warmup_steps=4, total_steps=100, shape="constant", min_lr_ratio=0.1, t_ref=1)
    factors = [lr_factor(s, **shape) for s in range(6)]
    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_the_cosine_runs_from_one_to_the_floor():
    shape = dict(warmup_steps=10, total_steps=110, shape="cosine", min_lr_ratio=0.05, t_ref=1)
    assert lr_factor(10, **shape) == pytest.approx(1.0)
    assert lr_factor(60, **shape) == pytest.approx(0.05 + 0.95 * 0.5)  # half-way: cos(pi / 2) = 0
    assert lr_factor(35, **shape) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, **shape) == pytest.approx(0.05) and lr_factor(500, **shape) == pytest.approx(0.05)
    assert lr_factor(4, **shape) == pytest.approx(0.5 * 1.0)  # the ramp multiplies the (still 1) cosine
    values = [lr_factor(s, **shape) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # never rises after the warm-up


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="constant, cosine or inv_sqrt"):
        lr_factor(0, warmup_steps=0, total_steps=10, shape="linear", min_lr_ratio=0.0, t_ref=1)


def test_inv_sqrt_is_edm2s_decay_after_its_warm_up():
    """EDM2 (Karras et al. 2024, eq. 16): alpha_ref / sqrt(max(t / t_ref, 1)), here times the linear warm-up; the run's
    length and min_lr_ratio do not enter."""
    shape = dict(warmup_steps=100, shape="inv_sqrt", min_lr_ratio=0.5, t_ref=1000)
    for total in (10, 10**6):
        assert lr_factor(49, total_steps=total, **shape) == pytest.approx(0.5)  # the ramp, below t_ref
        assert lr_factor(500, total_steps=total, **shape) == 1.0
        assert lr_factor(1000, total_steps=total, **shape) == 1.0
        assert lr_factor(4000, total_steps=total, **shape) == pytest.approx(0.5)  # 1 / sqrt(4)
        assert lr_factor(90_000, total_steps=total, **shape) == pytest.approx(1 / math.sqrt(90))
    # a warm-up longer than t_ref multiplies the decay already under way
    assert lr_factor(1999, total_steps=1, warmup_steps=4000, shape="inv_sqrt", min_lr_ratio=0, t_ref=500) == (
        pytest.approx((2000 / 4000) / math.sqrt(1999 / 500))
    )
