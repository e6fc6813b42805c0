"""A training-time budget (``sched.minutes``): the schedule's length in updates, re-estimated from the measured rate.

Comparing models "at equal training time" needs every run to stop, with its learning-rate schedule finished, when
the time is up. Rounding the budget to epochs, or fixing the update count from a separate speed probe, misses by
tens of percent on a busy CPU (warm-up, caches, other jobs). Here the run itself is the probe: after a few warm-up
updates, the trainer asks :meth:`TimeBudget.estimate` every :attr:`TimeBudget.every` updates how many updates fit
into the budget at the rate measured so far, and sets the schedule's length (timm's cosine ``t_initial``) to it.
The schedule thus ends when the time is up, within a few updates, whatever the speed drifts. The update count — and
so the result — depends on the machine: a budget run is a benchmark, not a reproducible recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TimeBudget", "updates_within"]


def updates_within(seconds: float, update: int, elapsed: float, mark_update: int, mark_elapsed: float) -> int:
    """Total updates that fit into ``seconds`` of training, at the rate measured since a mark.

    Args:
        seconds: the whole budget, in seconds of training (evaluation excluded).
        update: updates done so far.
        elapsed: training seconds spent so far.
        mark_update: the update count at the mark (the end of the warm-up), ``< update``.
        mark_elapsed: the training seconds at the mark.

    Returns:
        ``update`` plus the whole number of updates the remaining time holds at the measured rate; ``update`` itself
        when the budget is spent (so the run stops now).
    """
    if update <= mark_update:
        raise ValueError(f"the rate needs updates after the mark: update {update} <= mark {mark_update}")
    per_update = max(elapsed - mark_elapsed, 1e-9) / (update - mark_update)
    remaining = seconds - elapsed
    return update + max(0, math.floor(remaining / per_update))


@dataclass
class TimeBudget:
    """The length of a schedule that must end after ``seconds`` of training.

    Attributes:
        seconds: the budget.
        warmup: updates of this process run before the rate is measured (first steps are slow: allocation, caches).
        every: updates between two estimates.
    """

    seconds: float
    warmup: int = 3
    every: int = 10
    _mark: tuple[int, float] | None = None

    @property
    def first_estimate(self) -> int:
        """Updates a process runs before its first estimate (its schedule must not end sooner)."""
        return self.warmup + self.every

    def estimate(self, update: int, elapsed: float, first_update: int) -> int | None:
        """The new total update count, or None when no estimate is due at this update.

        Args:
            update: updates done so far (this process and any run it resumed).
            elapsed: training seconds so far (likewise).
            first_update: the update this process started at (0, or where it resumed).
        """
        if elapsed >= self.seconds:
            return update
        if update - first_update == self.warmup:
            self._mark = (update, elapsed)
            return None
        if self._mark is None or (update - self._mark[0]) % self.every:
            return None
        return updates_within(self.seconds, update, elapsed, *self._mark)
