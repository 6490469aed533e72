"""Tests for visrl.rollout.badbox: disjointness, image bounds, determinism, the spread schedule, snapping."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from visrl.data.box_formats import GridFormat
from visrl.data.boxes import Box, iou
from visrl.rollout.badbox import format_snap, maybe_replace_bad, overlaps, random_disjoint_box

torch.set_num_threads(1)

unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def boxes(draw: st.DrawFn, min_side: float = 0.01) -> Box:
    x1, x2 = sorted((draw(unit), draw(unit)))
    y1, y2 = sorted((draw(unit), draw(unit)))
    x2, y2 = max(x2, min(1.0, x1 + min_side)), max(y2, min(1.0, y1 + min_side))
    x1, y1 = min(x1, x2 - min_side), min(y1, y2 - min_side)
    return Box(x1, y1, x2, y2)


def _inside(b: Box) -> bool:
    return 0.0 <= b.x1 < b.x2 <= 1.0 and 0.0 <= b.y1 < b.y2 <= 1.0


class RecordingRng:
    """A stand-in rng: returns ``lo`` for every uniform(lo, hi) and records the bounds."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []

    def uniform(self, lo: float, hi: float) -> float:
        self.calls.append((lo, hi))
        return lo


@settings(max_examples=200)
@given(good=boxes(), like=boxes(), seed=st.integers(0, 2**32 - 1))
def test_never_overlaps_and_stays_in_image(good: Box, like: Box, seed: int) -> None:
    bad = random_disjoint_box(good, like, random.Random(seed))
    if bad is not None:
        assert _inside(bad)
        assert not overlaps(bad, good)
        assert iou(bad, good) == 0.0


@settings(max_examples=100)
@given(good=boxes(), like=boxes(), seed=st.integers(0, 2**32 - 1))
def test_deterministic_with_seed(good: Box, like: Box, seed: int) -> None:
    assert random_disjoint_box(good, like, random.Random(seed)) == random_disjoint_box(
        good, like, random.Random(seed)
    )
    a = random_disjoint_box(good, like, np.random.default_rng(seed))
    assert a == random_disjoint_box(good, like, np.random.default_rng(seed))


def test_small_good_box_is_always_solvable() -> None:
    good = Box(0.4, 0.4, 0.5, 0.5)
    found = [random_disjoint_box(good, good, random.Random(s)) for s in range(50)]
    assert all(b is not None for b in found)
    assert len({b.as_tuple() for b in found}) == 50  # really random


def test_none_when_good_covers_the_image() -> None:
    assert random_disjoint_box(Box(0, 0, 1, 1), Box(0.1, 0.1, 0.2, 0.2), random.Random(0)) is None
    # almost everything covered: no box of >= min_size fits in the 0.005 strip
    assert random_disjoint_box(Box(0.005, 0, 1, 1), Box(0, 0, 0.3, 0.3), random.Random(0)) is None


def test_huge_like_is_clipped_to_the_image() -> None:
    good = Box(0.0, 0.0, 0.05, 0.05)
    bad = random_disjoint_box(good, Box(0, 0, 1, 1), random.Random(3), spread=0.5, max_tries=1000)
    assert bad is not None and _inside(bad) and not overlaps(bad, good)


def test_spread_schedule() -> None:
    """d = 0.3 for tries 0..19, 0.4 for 20..39 (the reference already uses 0.4 at try 0)."""
    good = Box(0.0, 0.0, 0.5, 0.5)  # the stub always places the box at (0, 0): every try overlaps
    rng = RecordingRng()
    assert random_disjoint_box(good, Box(0.2, 0.2, 0.4, 0.6), rng, max_tries=41) is None
    assert len(rng.calls) == 41 * 4  # w, h, x1, y1 per try
    widths, heights = rng.calls[0::4], rng.calls[1::4]
    assert widths[0] == pytest.approx((0.2 * 0.7, 0.2 * 1.3))
    assert heights[19] == pytest.approx((0.4 * 0.7, 0.4 * 1.3))
    assert widths[20] == pytest.approx((0.2 * 0.6, 0.2 * 1.4))
    assert heights[40] == pytest.approx((0.4 * 0.5, 0.4 * 1.5))
    # x1 ~ U(0, 1 - w) with w = lo = 0.14
    assert rng.calls[2] == pytest.approx((0.0, 1 - 0.14))


def test_grid_snap_gives_grid_boxes_disjoint_after_snapping() -> None:
    fmt = GridFormat(grid=4)
    snap = format_snap(fmt, (64, 64))
    good = Box(0.25, 0.25, 0.5, 0.75)
    for seed in range(30):
        bad = random_disjoint_box(good, good, random.Random(seed), snap=snap)
        assert bad is not None
        assert not overlaps(bad, good)
        for v in bad.as_tuple():
            assert v * 4 == pytest.approx(round(v * 4))  # on the 4x4 grid
        assert fmt.parse(fmt.format(bad, (64, 64)), (64, 64)).box == bad


def test_snap_that_rejects_everything_gives_none() -> None:
    assert (
        random_disjoint_box(Box(0, 0, 0.1, 0.1), Box(0, 0, 0.1, 0.1), random.Random(0), snap=lambda b: None)
        is None
    )


def test_bad_arguments() -> None:
    g = Box(0, 0, 0.1, 0.1)
    for kwargs in ({"spread": -0.1}, {"step_every": 0}, {"max_tries": 0}, {"min_size": 0.0}):
        with pytest.raises(ValueError, match="badbox"):
            random_disjoint_box(g, g, random.Random(0), **kwargs)
    with pytest.raises(ValueError, match="iou_threshold"):
        maybe_replace_bad(g, g, random.Random(0), iou_threshold=2.0)


def test_maybe_replace_bad_keeps_a_distinct_box() -> None:
    good, other = Box(0, 0, 0.5, 0.5), Box(0.5, 0.5, 1, 1)  # IoU 0
    assert maybe_replace_bad(good, other, random.Random(0)) == (other, False)
    # IoU of (0,0,.5,.5) and (.4,0,.9,.5): inter .1*.5 = .05, union .25 + .25 - .05 = .45 -> 0.111 > 0.05
    near = Box(0.4, 0, 0.9, 0.5)
    assert maybe_replace_bad(good, near, random.Random(0), iou_threshold=0.2) == (near, False)
    out = maybe_replace_bad(good, near, random.Random(0))
    assert out.synthetic and out.box is not None and not overlaps(out.box, good)


def test_maybe_replace_bad_threshold_is_strict() -> None:
    # (0,0,1,.2) vs (0,.1,1,.3): inter .1, union .3 -> IoU 1/3; replaced only when IoU > threshold
    a, b = Box(0, 0, 1, 0.2), Box(0, 0.1, 1, 0.3)
    assert iou(a, b) == pytest.approx(1 / 3)
    assert not maybe_replace_bad(a, b, random.Random(0), iou_threshold=0.34).synthetic
    assert maybe_replace_bad(a, b, random.Random(0), iou_threshold=0.33).synthetic


def test_maybe_replace_bad_uses_good_size_by_default() -> None:
    good = Box(0.0, 0.0, 0.2, 0.4)
    rng = RecordingRng()
    maybe_replace_bad(good, good, rng, max_tries=1)
    assert rng.calls[0] == pytest.approx((0.2 * 0.7, 0.2 * 1.3))
    rng = RecordingRng()
    maybe_replace_bad(good, good, rng, like=Box(0, 0, 0.5, 0.5), max_tries=1)
    assert rng.calls[0] == pytest.approx((0.5 * 0.7, 0.5 * 1.3))
