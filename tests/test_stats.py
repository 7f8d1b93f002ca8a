"""Bootstrap intervals: they cover a known mean at about the nominal rate, pair differences, and
average over tasks."""

import numpy as np
import pytest

from cgclora_lite.stats import Bootstrap, Interval


def test_intervals_cover_a_known_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    p, n, trials = 0.3, 120, 300
    covered = 0
    for trial in range(trials):
        values = (rng.random(n) < p).astype(float)  # accuracy-like 0/1 scores
        interval = Bootstrap({"t": n}, seeds=1, replicates=400, rng_seed=trial).score("t", values)
        covered += interval.low <= p <= interval.high
    assert 0.90 <= covered / trials <= 0.99  # nominal 0.95 (percentile bootstrap runs a bit low)


def test_seeds_widen_the_interval_when_seeds_disagree():
    rng = np.random.default_rng(0)
    base = (rng.random(200) < 0.5).astype(float)
    agreeing = np.stack([base, base, base])
    disagreeing = np.stack([base, np.ones(200), np.zeros(200)])
    boot = Bootstrap({"t": 200}, seeds=3)
    narrow, wide = boot.score("t", agreeing), boot.score("t", disagreeing)
    assert wide.high - wide.low > 2 * (narrow.high - narrow.low)


def test_paired_difference_is_narrower_than_the_scores_and_can_exclude_zero():
    rng = np.random.default_rng(0)
    reference = (rng.random(300) < 0.6).astype(float)
    better = reference.copy()
    better[np.flatnonzero(reference == 0)[:30]] = 1.0  # 30 more right answers, nothing else changes
    boot = Bootstrap({"t": 300}, seeds=1)
    diff = boot.difference("t", better, reference)
    assert diff.mean == pytest.approx(0.1) and diff.excludes_zero()
    a, b = boot.score("t", better), boot.score("t", reference)
    assert a.low < b.high  # the two scores' intervals overlap ...
    assert diff.high - diff.low < (a.high - a.low)  # ... the paired one is narrower
    same = boot.difference("t", reference, reference)
    assert same == Interval(0.0, 0.0, 0.0)


def test_average_over_tasks_and_input_checks():
    boot = Bootstrap({"x": 4, "y": 2}, seeds=2)
    per_task = {"x": [[1, 1, 0, 0], [1, 1, 1, 1]], "y": [[0, 0], [0, 1]]}
    average = boot.average(per_task)
    assert average.mean == pytest.approx((0.75 + 0.25) / 2)
    assert average.low <= average.mean <= average.high
    assert f"{average:.2f}" == f"0.50 [{average.low:.2f}, {average.high:.2f}]"
    with pytest.raises(ValueError, match="examples"):
        boot.score("x", [1, 0])
    with pytest.raises(ValueError, match="seeds"):
        boot.score("x", [[1, 0, 1, 0]] * 3)
