"""The verdict rule and the intervals it reads (peft_from_scratch/verdicts.py)."""
from __future__ import annotations

import random

import pytest

from peft_from_scratch import verdicts


def test_the_rule_reads_the_whole_interval_then_the_estimate():
    assert verdicts.verdict(verdicts.Interval(0.02, 0.01, 0.03, ""), at_least=0.0) == "reproduced"
    assert verdicts.verdict(verdicts.Interval(0.02, -0.01, 0.05, ""), at_least=0.0) == "direction reproduced"
    assert verdicts.verdict(verdicts.Interval(-0.02, -0.05, 0.01, ""), at_least=0.0) == "not reproduced"
    assert verdicts.verdict(verdicts.exact(4e-7), at_most=1e-5) == "reproduced"
    with pytest.raises(ValueError, match="exactly one"):
        verdicts.verdict(verdicts.exact(0.0), at_least=0.0, at_most=1.0)


def test_mean_difference_over_tasks_weighs_every_task_equally():
    rng = random.Random(0)
    a = {"big": [1] * 900 + [0] * 100, "small": [rng.random() < 0.5 for _ in range(40)]}
    b = {"big": [1] * 800 + [0] * 200, "small": list(a["small"])}
    gap = verdicts.mean_difference_over_tasks(a, b)
    assert gap.estimate == pytest.approx((0.9 - 0.8 + 0.0) / 2)          # not the pooled 100 / 1040
    assert gap.low <= gap.estimate <= gap.high and gap.low > 0           # 100 more right on 1000 paired examples
    same = verdicts.mean_difference_over_tasks(a, a)
    assert (same.estimate, same.low, same.high) == (0, 0, 0)
    with pytest.raises(ValueError, match="the same tasks"):
        verdicts.mean_difference_over_tasks(a, {"big": b["big"]})
    with pytest.raises(ValueError, match="the same examples"):
        verdicts.mean_difference_over_tasks(a, {"big": b["big"], "small": [1, 0]})
