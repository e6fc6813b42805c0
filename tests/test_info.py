"""``dsnet info`` and the MAC counter behind it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsnet.bench.complexity import count_macs, count_params
from dsnet.cli.main import main


class _Attention(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, heads, N, d)
        return F.scaled_dot_product_attention(x, x, x)


def test_count_macs_includes_attention():
    # q @ k^T and attn @ v: 2 · heads · N · N · d MACs per image
    heads, n, d = 2, 49, 32
    macs = count_macs(_Attention(), input_size=(heads, n, d))
    assert macs == 2 * heads * n * n * d


def test_count_macs_conv_and_linear_per_image():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    conv = 16 * 16 * 8 * 3 * 9
    linear = 8 * 16 * 16 * 10
    assert count_macs(model, (3, 16, 16), batch_size=3) == conv + linear
    assert count_params(model) == 8 * 27 + 8 + 8 * 256 * 10 + 10


def test_count_macs_restores_training_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model.train()
    count_macs(model, (3, 8, 8))
    assert model.training


def test_info_json_matches_the_paper(capsys):
    assert main(["info", "--models", "dsnet_tiny*", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"dsnet_tiny", "dsnet_tiny_concat"}
    for row in rows.values():
        assert row["params_m"] == pytest.approx(row["paper_params_m"], abs=0.06)
        assert row["gmacs"] == pytest.approx(row["paper_gmacs"], rel=0.05)
        assert row["source"]


def test_info_table_and_unknown_pattern(capsys):
    assert main(["info", "--models", "dsnet_tiny"]) == 0
    table = capsys.readouterr().out
    assert "dsnet_tiny" in table and "GMACs@224" in table
    assert main(["info", "--models", "resnet*"]) == 2
    assert "no model of the zoo matches 'resnet*'" in capsys.readouterr().err
