"""See what the two streams see: the DS-Net paper's Figure 1 for any image and model of the zoo.

Mao et al., "Dual-stream Network for Visual Recognition" (NeurIPS 2021), Fig. 1: the attention of a query point in
DeiT and in DS-Net's low-resolution global stream, and the local / global / fused feature maps of a block. The maps
are read from the model's own forward pass (:mod:`dsnet.viz.capture`), never recomputed. ``dsnet viz`` is the
command line over :mod:`dsnet.viz.figures`.

Example:
    >>> from dsnet.viz import load_viz_model, attention_figure  # doctest: +SKIP
    >>> vm = load_viz_model("runs/demo-20260101-000000")  # doctest: +SKIP
    >>> attention_figure(vm, "shoe.png", "attention.png", point="14,10", block="1.2")  # doctest: +SKIP
"""

from dsnet.viz.capture import AttentionCapture, AttentionRecord, ModuleOutputs, explicit_attention
from dsnet.viz.figures import (
    VizModel,
    attention_figure,
    cam_figure,
    features_figure,
    load_baseline,
    load_viz_model,
    parse_point,
    streams_figure,
)
from dsnet.viz.maps import Panel, attention_panels, block_names, feature_panels, model_family, run_with_capture

__all__ = [
    "AttentionCapture",
    "AttentionRecord",
    "ModuleOutputs",
    "Panel",
    "VizModel",
    "attention_figure",
    "attention_panels",
    "block_names",
    "cam_figure",
    "explicit_attention",
    "feature_panels",
    "features_figure",
    "load_baseline",
    "load_viz_model",
    "model_family",
    "parse_point",
    "run_with_capture",
    "streams_figure",
]
