"""Published figures of every model in the zoo, shown beside our measurements by ``dsnet info``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperFigures:
    """What a paper reports for one model.

    Attributes:
        params_m: parameters in millions.
        gmacs: multiply-accumulates at 224×224 in billions (what most papers call "FLOPs").
        top1: ImageNet-1k top-1 accuracy in percent, or None when the paper gives none.
        source: where the figures come from, e.g. ``"DS-Net paper, Table 1 (DS-Net-T*)"``.
    """

    params_m: float
    gmacs: float
    top1: float | None
    source: str


#: Model name (as registered in timm) → published figures. Each model file adds its own entries.
PAPER_FIGURES: dict[str, PaperFigures] = {}
