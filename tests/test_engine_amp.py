"""``train.amp``: which autocast dtype each setting gives on which hardware (CPU flags read from a cpuinfo file)."""

from __future__ import annotations

import pytest
import torch

from dsnet.engine.runtime import cpu_has_native_bf16, resolve_amp

_LINE = "flags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}\n"


def _cpuinfo(tmp_path, extra: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: test\n" + _LINE.format(extra=extra) + "\nprocessor\t: 1\n")
    return str(path)


@pytest.mark.parametrize(
    ("extra", "native"), [("avx512_bf16", True), ("amx_bf16 amx_tile", True), ("avx512_vnni", False)]
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, extra, native):
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, extra)) is native


def test_unreadable_cpuinfo_means_no_native_bf16(tmp_path):
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize(
    ("amp", "extra", "expected"),
    [
        ("native", "avx512_bf16", torch.bfloat16),
        ("native", "avx512_vnni", None),  # emulated bf16 would be slower than fp32
        ("auto", "avx512_bf16", None),  # bf16 on CPU is never the default
        ("bf16", "avx512_vnni", torch.bfloat16),
        ("none", "avx512_bf16", None),
    ],
)
def test_amp_on_cpu(tmp_path, amp, extra, expected):
    assert resolve_amp(amp, torch.device("cpu"), cpuinfo=_cpuinfo(tmp_path, extra)) is expected


def test_fp16_on_cpu_and_unknown_values_are_refused():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_amp("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="expected auto, native, none, bf16 or fp16"):
        resolve_amp("bf17", torch.device("cpu"))
