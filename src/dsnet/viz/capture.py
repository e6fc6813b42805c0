"""Capture attention weights and intermediate maps from a model's own forward pass.

Every attention of the zoo (DS-Net's self- and co-attention, TransXNet's OSRA, MixFormer's window attention) and of
timm's ViTs goes through :func:`torch.nn.functional.scaled_dot_product_attention` (SDPA). :class:`AttentionCapture`
switches, only while it is active, every SDPA call of the forward pass to an explicit computation,
``softmax(q kᵀ · scale + mask) v``, and keeps the softmax weights together with the name of the module that made the
call. The weights are therefore the ones that produced the logits, not a parallel re-implementation; the explicit
path gives the same outputs as SDPA to float rounding (``tests/test_viz.py`` checks the logits to 1e-5).

Example:
    >>> model = timm.create_model("dsnet_tiny").eval()  # doctest: +SKIP
    >>> with AttentionCapture(model) as capture:  # doctest: +SKIP
    ...     logits = model(images)
    >>> [(r.module, tuple(r.weights.shape)) for r in capture.records][:1]  # doctest: +SKIP
    [('stages.0.blocks.0', (1, 1, 49, 49))]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dsnet.errors import DSNetError

__all__ = ["AttentionCapture", "AttentionRecord", "ModuleOutputs", "explicit_attention"]


@dataclass
class AttentionRecord:
    """One SDPA call: the innermost module that made it, its call number within that module's forward, and the
    attention weights ``(B, heads, queries, keys)``."""

    module: str
    call: int
    weights: torch.Tensor


def explicit_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA written out: ``(softmax(q kᵀ · scale + mask) v, softmax weights)``, same arguments as
    :func:`torch.nn.functional.scaled_dot_product_attention` (eval only: no dropout, causal or grouped heads)."""
    if dropout_p > 0.0 or is_causal or enable_gqa:
        raise DSNetError("attention capture needs an eval-mode model (no attention dropout, causal mask or GQA)")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    logits = (query @ key.transpose(-2, -1)) * scale  # (B, heads, Nq, Nk)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    weights = logits.softmax(dim=-1)
    return weights @ value, weights


class _ExplicitSDPA(TorchFunctionMode):
    def __init__(self, capture: AttentionCapture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            output, weights = explicit_attention(*args, **kwargs)
            self.capture._record(weights)
            return output
        return func(*args, **kwargs)


class AttentionCapture:
    """Context manager: SDPA calls of ``model`` go through :func:`explicit_attention` and their weights are kept.

    Attributes:
        records: the :class:`AttentionRecord` of every call, in call order.
        input_shapes: the shape of the first positional input of every module in its last call (for the geometry
            of the maps: a block's local map, a MixFormer block's unpadded size).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.records: list[AttentionRecord] = []
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self._stack: list[str] = []
        self._calls: dict[str, int] = {}
        self._handles: list[Any] = []
        self._fused: list[tuple[nn.Module, bool]] = []
        self._mode = _ExplicitSDPA(self)

    def _record(self, weights: torch.Tensor) -> None:
        name = self._stack[-1] if self._stack else ""
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        self.records.append(AttentionRecord(name, call, weights.detach()))

    def by_module(self, name: str) -> list[torch.Tensor]:
        """Weights recorded for module ``name``, in call order."""
        return [r.weights for r in self.records if r.module == name]

    def __enter__(self) -> AttentionCapture:
        if self.model.training:
            raise DSNetError("attention capture needs model.eval() (attention dropout would change the weights)")
        for name, module in self.model.named_modules():

            def push(mod: nn.Module, args: tuple, name: str = name) -> None:
                self._stack.append(name)
                self._calls[name] = 0
                if args and isinstance(args[0], torch.Tensor):
                    self.input_shapes[name] = tuple(args[0].shape)

            def pop(mod: nn.Module, args: tuple, output: Any) -> None:
                self._stack.pop()

            self._handles.append(module.register_forward_pre_hook(push))
            self._handles.append(module.register_forward_hook(pop))
            if hasattr(module, "fused_attn"):  # timm attention: take its SDPA path so the weights pass through here
                self._fused.append((module, module.fused_attn))
                module.fused_attn = True
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        for module, fused in self._fused:
            module.fused_attn = fused
        self._handles.clear()
        self._fused.clear()
        self._stack.clear()


class ModuleOutputs:
    """Context manager keeping the output and the first input of named submodules (``outputs`` / ``inputs``)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.model = model
        self.names = names
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> ModuleOutputs:
        modules = dict(self.model.named_modules())
        for name in self.names:
            if name not in modules:
                raise DSNetError(f"{type(self.model).__name__} has no module {name!r}")

            def keep(mod: nn.Module, args: tuple, output: torch.Tensor, name: str = name) -> None:
                self.inputs[name] = args[0].detach()
                self.outputs[name] = output.detach()

            self._handles.append(modules[name].register_forward_hook(keep))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
