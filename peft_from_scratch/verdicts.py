"""Paper vs ours: intervals for what we measured, and the one rule that turns them into a verdict.

A paper's claim, as a notebook tests it, is an inequality about a quantity we can measure: "LoRA's
BLEU minus full fine-tuning's is at least -1" (it matches), "NF4's error minus FP4's is below 0" (it
is better), "DoRA's accuracy minus LoRA's is above 0". We measure the quantity with an interval
(a bootstrap over the evaluation examples, or the spread over seeds) and apply **the rule**:

* **reproduced**: the whole 95% interval satisfies the inequality;
* **direction reproduced**: the point estimate satisfies it, the interval does not (the effect
  points the paper's way, but this run cannot tell it from noise);
* **not reproduced**: the point estimate does not satisfy it;
* **not testable at this scale**: the quantity cannot be measured meaningfully here (e.g. every
  method solves 0 of 24 problems, or the claim is about 10B-parameter models), with the reason.

``verdict(interval, at_least=...)`` / ``verdict(interval, at_most=...)`` apply it; the notebook
records the claim, its paper numbers (from ``references/claims.toml``), the interval and the rule.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

VERDICTS = ("reproduced", "direction reproduced", "not reproduced", "not testable at this scale")
RULE = ("reproduced if the whole 95% interval satisfies the claim's inequality; direction reproduced if "
        "only the point estimate does; not reproduced if the point estimate does not")


@dataclass(frozen=True)
class Interval:
    """A point estimate with a 95% interval, and how the interval was obtained."""
    estimate: float
    low: float
    high: float
    method: str          # e.g. "paired bootstrap over 200 sentences (2000 resamples)", "3 seeds, t-interval"

    def __str__(self) -> str:
        return f"{self.estimate:.3g} [{self.low:.3g}, {self.high:.3g}]"

    def to_dict(self) -> dict:
        return asdict(self)


def exact(value: float, why: str = "a deterministic quantity, no sampling") -> Interval:
    """An interval of zero width: for quantities with no sampling noise (an error on fixed weights)."""
    return Interval(value, value, value, why)


def bootstrap(statistic: Callable[[list[int]], float], n: int, resamples: int = 2000, seed: int = 0,
              what: str = "examples") -> Interval:
    """Percentile bootstrap of ``statistic(indices)`` over ``n`` evaluation items (resampled with
    replacement, the same indices for every method in a paired comparison)."""
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 {what}, got {n}")
    rng = random.Random(seed)
    full = statistic(list(range(n)))
    values = sorted(statistic([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    low, high = values[int(0.025 * resamples)], values[min(resamples - 1, int(0.975 * resamples))]
    return Interval(full, low, high, f"paired bootstrap over {n} {what} ({resamples} resamples)")


def mean_difference(a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0,
                    what: str = "examples") -> Interval:
    """mean(a) - mean(b) for per-example scores of two methods on the same examples, bootstrapped."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same examples: {len(a)} vs {len(b)}")
    return bootstrap(lambda idx: sum(a[i] - b[i] for i in idx) / len(idx), len(a), resamples, seed, what)


def mean_difference_over_tasks(a: dict[str, Sequence[float]], b: dict[str, Sequence[float]], resamples: int = 2000,
                               seed: int = 0) -> Interval:
    """The mean over tasks of mean(a[task]) - mean(b[task]): per-example scores of two methods on each
    task's examples, every task resampled within itself (a stratified, paired bootstrap), so each task
    keeps its weight 1 / tasks whatever its size."""
    if set(a) != set(b) or any(len(a[t]) != len(b[t]) or len(a[t]) < 2 for t in a):
        raise ValueError("paired scores need the same tasks and, per task, the same examples (at least 2)")
    rng = random.Random(seed)
    gap = lambda pick: sum(sum(a[t][i] - b[t][i] for i in pick(t)) / len(a[t]) for t in a) / len(a)  # noqa: E731
    full = gap(lambda t: range(len(a[t])))
    values = sorted(gap(lambda t: [rng.randrange(len(a[t])) for _ in a[t]]) for _ in range(resamples))
    low, high = values[int(0.025 * resamples)], values[min(resamples - 1, int(0.975 * resamples))]
    sizes = ", ".join(f"{t} {len(v)}" for t, v in a.items())
    return Interval(full, low, high, f"paired bootstrap within each task ({sizes} examples; {resamples} resamples)")


def mean_of(a: Sequence[float], resamples: int = 2000, seed: int = 0, what: str = "examples") -> Interval:
    """mean(a), bootstrapped over its examples."""
    return bootstrap(lambda idx: sum(a[i] for i in idx) / len(idx), len(a), resamples, seed, what)


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def over_seeds(values: Sequence[float]) -> Interval:
    """Mean over seeds with a Student-t 95% interval (at least 2 seeds)."""
    k = len(values)
    if k < 2:
        raise ValueError("an interval over seeds needs at least 2 seeds")
    mean = sum(values) / k
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
    half = T_975.get(k - 1, 1.96) * sd / math.sqrt(k)
    return Interval(mean, mean - half, mean + half, f"{k} seeds, mean and t-interval")


def verdict(interval: Interval, at_least: float | None = None, at_most: float | None = None) -> str:
    """The rule (module docstring) for the claim ``quantity >= at_least`` or ``quantity <= at_most``."""
    if (at_least is None) == (at_most is None):
        raise ValueError("give exactly one of at_least and at_most")
    if at_least is not None:
        holds = lambda x: x >= at_least   # noqa: E731
        whole = interval.low >= at_least
    else:
        holds = lambda x: x <= at_most    # noqa: E731
        whole = interval.high <= at_most
    if whole:
        return "reproduced"
    return "direction reproduced" if holds(interval.estimate) else "not reproduced"
