"""sched.minutes: the schedule's length follows the measured rate so a run ends, cosine finished, when time is up.

The clock is faked (every ``time.perf_counter()`` call of the trainer advances it by a fixed step), so these tests
depend on the trainer's arithmetic only, never on the speed or load of the machine.
"""

from __future__ import annotations

import json
import types

import pytest

from _engine_helpers import fast_overrides, make_imagefolder
from dsnet.engine import fit, trainer
from dsnet.engine.budget import TimeBudget, updates_within
from dsnet.engine.config import load_config


def test_updates_within_is_the_remaining_time_over_the_measured_rate():
    # 10 updates in 10 s after the mark (1 s each), 88 s left -> 88 more updates
    assert updates_within(100, update=20, elapsed=12, mark_update=10, mark_elapsed=2) == 108
    assert updates_within(100, update=20, elapsed=12, mark_update=10, mark_elapsed=7) == 20 + 176  # 0.5 s each
    assert updates_within(100, update=20, elapsed=130, mark_update=10, mark_elapsed=2) == 20  # spent: stop now
    with pytest.raises(ValueError, match="after the mark"):
        updates_within(100, update=10, elapsed=12, mark_update=10, mark_elapsed=2)


def test_time_budget_marks_after_its_warmup_then_estimates_at_its_cadence():
    budget = TimeBudget(60.0, warmup=3, every=10)
    answers = {u: budget.estimate(u, elapsed=2.0 * u, first_update=0) for u in range(1, 30)}
    assert [u for u, a in answers.items() if a is not None] == [13, 23]
    assert answers[13] == 30 and answers[23] == 30  # 2 s per update: 60 s hold 30 updates
    assert budget.estimate(31, elapsed=61.0, first_update=0) == 31  # over budget: stop at once, off cadence too
    resumed = TimeBudget(60.0, warmup=3, every=10)  # a resumed process measures its own rate, from its first update
    assert resumed.estimate(103, 20.0, first_update=100) is None
    assert resumed.estimate(113, 30.0, first_update=100) == 143


def test_minutes_and_updates_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"sched.minutes=1.0 and sched.updates=5 both set"):
        load_config(None, fast_overrides(tmp_path, tmp_path, **{"sched.minutes": 1.0, "sched.updates": 5}))
    with pytest.raises(ValueError, match=r"sched.minutes=-2.0 is out of range; expected > 0"):
        load_config(None, fast_overrides(tmp_path, tmp_path, **{"sched.minutes": -2.0}))


class _FakeClock:
    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def perf_counter(self) -> float:
        self.now += self.step
        return self.now


def test_a_budget_run_trains_past_its_provisional_schedule_and_ends_on_time(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "data")
    clock = _FakeClock(0.25)
    monkeypatch.setattr(fit, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))  # the loop's clock
    minutes = 0.25  # 15 s of fake training time
    overrides = {"sched.minutes": minutes, "sched.epochs": 1, "train.eval_interval": 100, "sched.min_lr": 1e-5}
    run_dir = trainer.train(load_config(None, fast_overrides(root, tmp_path / "runs", **overrides)), log=lambda s: None)

    summary = json.loads((run_dir / "summary.json").read_text())
    provisional = 4  # sched.epochs=1: 25 images // batch 6
    assert summary["updates"] > 3 * provisional  # the budget, not the epoch count, set the length
    assert summary["epochs"] == pytest.approx(summary["updates"] / provisional)
    assert abs(summary["train_seconds"] - minutes * 60) <= 2.0  # within a couple of fake updates of the budget
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["update"] for r in steps] == list(range(1, summary["updates"] + 1))
    assert steps[-1]["lr"] == pytest.approx(1e-5)  # the cosine finished exactly at the last update
    assert steps[len(steps) // 2]["lr"] > 1e-3  # and was not finished early
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == -(-summary["updates"] // provisional) and "top1" in epochs[-1]  # evaluated once, at the end
