"""The timm model API shared by the zoo's four-stage pyramids (DS-Net, TransXNet, MixFormer).

Every family is a stem, a ``stages`` sequence (each stage: an optional ``downsample``, then ``blocks``), a final
norm and a head. :class:`StagedBackboneMixin` implements the timm methods that only depend on that layout, once:
``group_matcher``, ``set_grad_checkpointing``, ``get_classifier``, ``reset_classifier``, ``no_weight_decay``,
``forward_intermediates`` and ``prune_intermediate_layers``. A family keeps its own ``__init__``,
``forward_features``, ``forward_head`` and ``forward``, and overrides a hook only where it really differs.

Contract (what the model provides)::

    stages            nn.Sequential of stages, stage i registered as ``stages.{i}`` and producing
                      ``feature_info[i]``; every stage has a ``grad_checkpointing`` flag, parameters under
                      ``stages.{i}.blocks.{j}`` and the ones matched by ``_stage_entry_regex`` (run before them)
    norm              the final norm, applied by ``_final_norm`` to the last stage's (B, C, H, W) output
    head              classifier head with ``fc`` and ``reset(num_classes, pool_type, device=, dtype=)``
                      (timm's ``ClassifierHead`` or any head with that interface)
    feature_info      one ``dict(num_chs=, reduction=, module=)`` per stage
    num_classes, num_features, head_hidden_size    as in timm

    _stem_group_regex   class attribute: the parameters of the stem group (default ``^stem``)
    _stage_entry_regex  class attribute: a stage's parameters outside its blocks (default ``downsample``)
    _forward_stem(x)    images → input of stage 0 (default ``self.stem(x)``)
    _final_norm(x)      the final norm on (B, C, H, W) (default ``self.norm(x)``)
    _prune_head()       drop the classifier, the head now fed with ``num_features`` channels
                        (default: ``ClassifierHead.reset(0, "", in_features=num_features)``)
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import get_device_dtype
from timm.models._features import feature_take_indices
from timm.models._manipulate import MATCH_PREV_GROUP
from torch import nn

from dsnet.errors import DSNetError

__all__ = ["StagedBackboneMixin"]


class StagedBackboneMixin:
    """timm model API of a stem → ``stages`` → final norm → head pyramid; mix in before ``nn.Module``.

    Used as ``class TransXNet(StagedBackboneMixin, nn.Module)``; the module docstring lists the attributes and
    hooks the model provides.
    """

    stages: nn.Sequential
    norm: nn.Module
    head: nn.Module
    feature_info: list[dict[str, Any]]
    num_classes: int
    num_features: int
    head_hidden_size: int

    #: Regex of the parameters in the first group of ``group_matcher`` (the stem).
    _stem_group_regex: str = r"^stem"
    #: Regex (after ``stages.{i}.``) of a stage's parameters outside its blocks; grouped with the stage's block 0.
    _stage_entry_regex: str = "downsample"

    # --- hooks --------------------------------------------------------------------------------------------------------

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → input of the first stage (default: the model's ``stem`` module)."""
        return self.stem(x)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm on the last stage's output (B, C, H, W)."""
        return self.norm(x)

    def _prune_head(self) -> None:
        """Remove the classifier and pooling; the head is now fed with ``num_features`` channels."""
        self.num_classes = 0
        self.head_hidden_size = self.num_features
        self.head.reset(0, "", in_features=self.num_features)

    # --- timm API -----------------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay beyond what timm's optimizer factory exempts (1-D parameters): none."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay: stem, then stages or blocks (the final norm last)."""
        return dict(
            stem=self._stem_group_regex,
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (rf"^stages\.(\d+)\.{self._stage_entry_regex}", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", MATCH_PREV_GROUP),  # the final norm joins the last block's group
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the blocks' activations in the backward pass instead of storing them."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: none); optionally change pooling.

        The new classifier is created on the device and in the dtype of the model's parameters, and in the
        model's train/eval mode (a fresh module is in train mode; an eval model must not get a training head).
        """
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))
        self.head.train(self.training)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (the feature pyramid) along the forward pass, and the final features.

        Args:
            x: images (B, C, H, W).
            indices: take the last ``n`` stages if an int, the listed stages if a list, all if None.
            norm: apply the final norm to the last stage's output when it is taken.
            stop_early: stop after the last stage that is taken.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of stage outputs.

        Returns:
            The stage outputs (B, C_i, H_i, W_i), or ``(final, stage outputs)`` where ``final`` is the last
            stage's output after the final norm (without it when ``stop_early`` ended the pass before).
        """
        if output_fmt != "NCHW":
            raise DSNetError(f"{type(self).__name__} features are NCHW; output_fmt={output_fmt!r} is not supported")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        x = self._forward_stem(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        intermediates = []
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self._final_norm(x) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self._final_norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and final norm / classifier) not needed for the intermediates ``indices``.

        Ending before the last stage always removes the final norm and the classifier, and leaves
        ``num_features`` (and the head's input width) at the channels of the new last stage.

        Returns:
            The stage indices ``forward_intermediates(indices=...)`` takes.
        """
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        # slicing builds a new Sequential and Identity() is new: both start in train mode, match the model's
        self.stages = self.stages[: max_index + 1]
        self.stages.training = self.training
        if prune_norm or prune_end:
            self.norm = nn.Identity().train(self.training)
        if prune_end:
            self.num_features = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self._prune_head()
            self.head.train(self.training)  # a rebuilt head starts in train mode
        return take_indices
