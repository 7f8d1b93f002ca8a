"""Intervals: percentile-bootstrap 95% confidence intervals for scores and paired differences.

A task's score is the mean of per-example values (accuracy 0/1, ROUGE-L, exact match) over its
test set; with several training seeds the values form an array (S seeds, N examples), every seed
scoring the same N test examples. One bootstrap replicate draws S seeds with replacement and N
examples with replacement (the same examples for every drawn seed) and takes the mean: the
interval covers both the luck of the test sample and the luck of the training seed (with one seed,
only the first).

**Paired differences.** Two methods scored on the same examples with the same seeds are compared
with the *same* draws: ``method - reference`` per replicate. The interval of a paired difference
is much narrower than the two scores' intervals suggest, because most of the test-sample luck is
shared (an easy test set is easy for both).

**Averages over tasks.** Each task is drawn independently within a replicate (with the same seed
draw), and the replicate's task means are averaged: the interval of the average score.

``Bootstrap(per_task)`` fixes the draws for a set of tasks (sizes and seed count), so every
method's intervals and every paired difference use the same replicates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REPLICATES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval."""

    mean: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __format__(self, spec: str) -> str:
        spec = spec or ".3f"
        return f"{self.mean:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def _interval(mean: float, replicates: np.ndarray, confidence: float) -> Interval:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Interval(float(mean), float(low), float(high))


def as_array(values) -> np.ndarray:
    """Per-example values as (seeds, examples): one list of N values is one seed."""
    array = np.asarray(values, dtype=float)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"per-example values must be (seeds, examples) with examples > 0, got {array.shape}")
    return array


class Bootstrap:
    """Fixed bootstrap draws for tasks of known sizes and a number of seeds.

    ``sizes``: ``{task: N examples}``; ``seeds``: S. ``replicates`` draws of seeds (R, S) and, per
    task, examples (R, N) come from ``numpy.random.default_rng(rng_seed)``.
    """

    def __init__(self, sizes: dict[str, int], seeds: int, replicates: int = REPLICATES,
                 confidence: float = CONFIDENCE, rng_seed: int = 0):
        if seeds < 1 or not sizes or min(sizes.values()) < 1:
            raise ValueError(f"need at least one seed and one example per task, got {seeds}, {sizes}")
        rng = np.random.default_rng(rng_seed)
        self.sizes, self.seeds, self.confidence = dict(sizes), seeds, confidence
        self.seed_draws = rng.integers(0, seeds, size=(replicates, seeds))  # (R, S)
        self.example_draws = {task: rng.integers(0, n, size=(replicates, n))  # (R, N)
                              for task, n in self.sizes.items()}

    def _replicates(self, task: str, values) -> np.ndarray:
        """(R,) replicate means of one task's (S', N) values (S' = 1 for a seed-free method such
        as the zero-shot base model: every seed draw then picks its single row)."""
        values = as_array(values)
        if values.shape[1] != self.sizes[task]:
            raise ValueError(f"task {task!r}: {values.shape[1]} examples, the bootstrap was set up "
                             f"for {self.sizes[task]}")
        if values.shape[0] not in (1, self.seeds):
            raise ValueError(f"task {task!r}: {values.shape[0]} seeds, expected 1 or {self.seeds}")
        rows = self.seed_draws % values.shape[0]  # (R, S)
        drawn = values[rows[:, :, None], self.example_draws[task][:, None, :]]  # (R, S, N)
        return drawn.mean(axis=(1, 2))

    def score(self, task: str, values) -> Interval:
        """A task's mean score and its interval."""
        return _interval(as_array(values).mean(), self._replicates(task, values), self.confidence)

    def difference(self, task: str, values, reference) -> Interval:
        """``values - reference`` on one task, paired (the same draws for both)."""
        delta = self._replicates(task, values) - self._replicates(task, reference)
        return _interval(as_array(values).mean() - as_array(reference).mean(), delta, self.confidence)

    def average(self, per_task: dict) -> Interval:
        """The mean over tasks of the task scores, and its interval."""
        reps = np.mean([self._replicates(t, v) for t, v in per_task.items()], axis=0)
        return _interval(np.mean([as_array(v).mean() for v in per_task.values()]), reps, self.confidence)

    def average_difference(self, per_task: dict, reference: dict) -> Interval:
        """The mean over tasks of ``per_task - reference``, paired, and its interval."""
        tasks = list(per_task)
        reps = np.mean([self._replicates(t, per_task[t]) - self._replicates(t, reference[t])
                        for t in tasks], axis=0)
        mean = np.mean([as_array(per_task[t]).mean() - as_array(reference[t]).mean() for t in tasks])
        return _interval(mean, reps, self.confidence)
