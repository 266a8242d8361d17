"""The divergence guard's decisions and the strict summary JSON, in-process (the launch test is in
test_recipes_launch.py)."""

from __future__ import annotations

import json
import math

from tests.recipes.helpers import RECIPES  # noqa: F401  (puts recipes/ on sys.path)

import common  # noqa: E402  isort: skip
from divergence import DivergenceGuard  # noqa: E402  isort: skip


def test_a_non_finite_loss_diverges_at_once():
    guard = DivergenceGuard(max_skipped_steps=2, loss_ratio=0)
    assert guard.check(1, 2.2, skipped=False) is None
    assert "the training loss is nan at step 2" in guard.check(2, float("nan"), skipped=False)
    assert guard.diverged_at == 2
    assert guard.check(3, float("inf"), skipped=False) is None  # reported once
    assert "is inf at step 1" in DivergenceGuard().check(1, math.inf, skipped=False)


def test_skipped_steps_beyond_the_tolerance_diverge():
    guard = DivergenceGuard(max_skipped_steps=2)
    assert [guard.check(s, 2.0, skipped=True) for s in (1, 2)] == [None, None]
    assert "3 optimizer steps were skipped by step 3" in guard.check(3, 2.0, skipped=True)
    assert guard.skipped_steps == 3


def test_a_loss_blow_up_diverges():
    guard = DivergenceGuard(loss_ratio=10)
    assert guard.check(1, 2.0, skipped=False) is None and guard.check(2, 19.9, skipped=False) is None
    assert "more than --divergence_loss_ratio 10 x the first step's 2" in guard.check(3, 1092.0, skipped=False)
    assert DivergenceGuard(loss_ratio=0).check(2, 1e9, skipped=False) is None  # 0: no check


def test_the_summary_is_strict_json():
    clean = common.finite_or_none({"loss": [[1, float("nan")], [2, 1.5]], "x": float("inf"), "ok": 1})
    assert clean == {"loss": [[1, None], [2, 1.5]], "x": None, "ok": 1}
    json.dumps(clean, allow_nan=False)
