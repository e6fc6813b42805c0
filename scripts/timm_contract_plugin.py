"""pytest plugin: run timm's own ``tests/test_models.py`` (from the installed timm's sdist) on dsnet's zoo only.

Loaded with ``-p timm_contract_plugin`` by ``scripts/timm_suite.sh``. Importing dsnet registers the zoo in timm
before timm's test module is collected, so its parametrised tests include our models; this keeps the items whose
``model_name`` is one of ours and drops those that need TorchScript or download weights (the zoo has none).
"""

from __future__ import annotations

import os
import re

import pytest

import dsnet  # noqa: F401  (registers the zoo into timm)
from dsnet.models import list_zoo

ZOO = frozenset(list_zoo())
#: Tests left out: TorchScript (the zoo is not scriptable by design) and anything loading pretrained weights.
EXCLUDED = re.compile(r"torchscript|pretrained|checkpoint_loading")
#: "contract" (CI): the API and config checks, one small model per family for the forward/backward passes;
#: "full": every zoo model in every test.
MODE = os.environ.get("DSNET_TIMM_SUITE", "contract")
SMALL = frozenset({"dsnet_tiny", "transxnet_t", "mixformer_b0"})
CHEAP = re.compile(r"default_cfgs|reset_classifier|head_hidden_size|prune|features_only|forward_intermediates")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("model_name") if callspec is not None else None
        ours = name in ZOO and not EXCLUDED.search(item.name)
        if ours and MODE != "full":
            ours = name in SMALL or bool(CHEAP.search(item.name))
        (keep if ours else drop).append(item)
    if not keep:
        raise pytest.UsageError("no timm model test selected for the dsnet zoo: did timm rename its tests?")
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
