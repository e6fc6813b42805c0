"""Parameter and MAC counting.

MACs are multiply-accumulates of one forward pass, what most vision papers call "FLOPs".
They are counted with :class:`torch.utils.flop_counter.FlopCounterMode` (which reports 2 × MACs for
matmuls and convolutions). On CPU that counter sees ``scaled_dot_product_attention`` only when the
math kernel runs, so the count is taken under ``sdpa_kernel(SDPBackend.MATH)``: attention is included.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (buffers such as BN running statistics are not counted)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224), batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on a zero input of ``input_size``, per image.

    The model is put in eval mode for the count and returned to its previous mode afterwards.

    Example:
        >>> import timm, dsnet
        >>> m = timm.create_model("dsnet_tiny")
        >>> round(count_macs(m) / 1e9, 2)
        1.83
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        x = torch.zeros((batch_size, *input_size), device=device, dtype=dtype)
        counter = FlopCounterMode(display=False)
        with sdpa_kernel(SDPBackend.MATH), counter:
            model(x)
        return counter.get_total_flops() // 2 // batch_size
    finally:
        model.train(was_training)
