"""Typed run configs, train / evaluate loops, checkpoints and distributed helpers."""
