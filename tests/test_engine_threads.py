"""``auto_threads``: torch threads from the cores other work leaves free, measured now rather than a minute ago."""

from __future__ import annotations

import os

import pytest
import torch

from dsnet.engine import runtime


@pytest.mark.parametrize(
    ("busy", "local", "expected"),
    [(0.0, 1, 4), (1.6, 1, 2), (3.9, 1, 1), (99.0, 1, 1), (0.0, 2, 2), (0.0, 3, 1), (2.0, 2, 1)],
)
def test_auto_threads_leaves_busy_cores_alone(monkeypatch, busy, local, expected):
    """On 4 cores: the free ones (rounded, at least 1), split between the processes of this machine."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(runtime, "busy_cores", lambda: busy)
    assert runtime.auto_threads(local) == expected


def _readings(*times: tuple[int, int]):
    """A ``read_times`` that returns the given (total, idle) readings in turn."""
    it = iter(times)
    return lambda: next(it)


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ((1000, 900), (1200, 1100), 0.0),  # all 200 new ticks idle
        ((1000, 900), (1200, 1000), 1.0),  # half of them busy, on 2 cores: one core
        ((1000, 900), (1200, 900), 2.0),  # none idle: both cores
        ((1000, 900), (1000, 900), 0.0),  # no tick between the readings (coarse clock): nothing known, not busy
        ((1000, 900), (1200, 1300), 0.0),  # a counter that went backwards is clipped, never negative
    ],
)
def test_busy_cores_from_two_readings(first, second, expected):
    slept = []
    got = runtime.busy_cores(0.25, read_times=_readings(first, second), sleep=slept.append, cores=2)
    assert got == pytest.approx(expected)
    assert slept == [0.25]  # the readings are one window apart


def test_busy_cores_falls_back_to_the_load_average(monkeypatch):
    def unreadable() -> tuple[int, int]:
        raise OSError("no /proc/stat")

    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    assert runtime.busy_cores(read_times=unreadable, sleep=lambda _: None) == 1.5


def test_cpu_times_parses_the_cpu_line(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 1 5 100 4 0 2 0 0 0\ncpu0 5 0 2 50 2 0 1 0 0 0\n")
    assert runtime.cpu_times(str(stat)) == (122, 104)  # total of the first 8 fields; idle + iowait
    stat.write_text("intr 1 2\n")
    with pytest.raises(ValueError):
        runtime.cpu_times(str(stat))
