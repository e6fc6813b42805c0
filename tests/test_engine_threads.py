"""``auto_threads``: torch threads from the cores other work leaves free, measured now rather than a minute ago."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from dsnet.engine import trainer


@pytest.mark.parametrize(
    ("busy", "local", "expected"),
    [(0.0, 1, 4), (1.6, 1, 2), (3.9, 1, 1), (99.0, 1, 1), (0.0, 2, 2), (0.0, 3, 1), (2.0, 2, 1)],
)
def test_auto_threads_leaves_busy_cores_alone(monkeypatch, busy, local, expected):
    """On 4 cores: the free ones (rounded, at least 1), split between the processes of this machine."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(trainer, "busy_cores", lambda: busy)
    assert trainer.auto_threads(local) == expected


def test_busy_cores_sees_a_spinning_thread_and_not_a_finished_one():
    stop = time.monotonic() + 1.0

    def spin() -> None:
        while time.monotonic() < stop:
            pass

    worker = threading.Thread(target=spin)
    worker.start()
    during = trainer.busy_cores(0.4)
    worker.join()
    after = trainer.busy_cores(0.4)
    assert during > after + 0.5  # one core spun during the first window only, whatever the 1-minute load says
