"""COCO detection metrics (AP, AP50, AP75, APs/m/l for boxes and masks) through pycocotools.

Example:
    >>> from dsnet.detection.metrics import COCO_METRIC_NAMES
    >>> COCO_METRIC_NAMES[:3]
    ('AP', 'AP50', 'AP75')
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dsnet.errors import DSNetError

__all__ = ["COCO_METRIC_NAMES", "coco_evaluate", "coco_from_dict", "to_coco_results"]

#: The first six numbers of ``COCOeval.stats``, in order.
COCO_METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_from_dict(data: dict[str, Any]) -> Any:
    """A ``pycocotools.coco.COCO`` index built from an in-memory instances dict (quietly)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = copy.deepcopy(data)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def to_coco_results(
    outputs: list[dict[str, Tensor]],
    image_ids: list[int],
    label_to_category_id: Any,
    *,
    masks: bool = False,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """torchvision detector outputs (xyxy boxes, labels, scores, soft masks) → COCO result dicts."""
    from pycocotools import mask as mask_utils

    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().cpu().float()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        scores = out["scores"].detach().cpu().tolist()
        labels = out["labels"].detach().cpu().tolist()
        rles = None
        if masks:
            binary = (out["masks"].detach().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)  # (N, H, W)
            rles = [mask_utils.encode(np.asfortranarray(m)) for m in binary]
        for k, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            row = {
                "image_id": int(image_id),
                "category_id": int(label_to_category_id(int(label))),
                "bbox": box,
                "score": score,
            }
            if rles is not None:
                rle = rles[k]
                row["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            results.append(row)
    return results


def coco_evaluate(
    coco_gt: Any, results: list[dict[str, Any]], iou_types: tuple[str, ...] = ("bbox",)
) -> dict[str, float]:
    """COCO metrics of ``results`` against ``coco_gt``: keys like ``bbox_AP``, ``segm_AP50`` (fractions in [0, 1]).

    No detections at all gives 0 for every metric (pycocotools itself refuses an empty result list).
    """
    from pycocotools.cocoeval import COCOeval

    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise DSNetError(f"unknown iou_type {iou_type!r}; expected 'bbox' or 'segm'")
        if not results:
            metrics.update({f"{iou_type}_{name}": 0.0 for name in COCO_METRIC_NAMES})
            continue
        rows = results
        if iou_type == "bbox":
            rows = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(copy.deepcopy(rows))
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for name, value in zip(COCO_METRIC_NAMES, evaluator.stats[:6]):
            # pycocotools reports -1 when a size range has no ground truth; report 0 would hide that, keep NaN
            metrics[f"{iou_type}_{name}"] = float(value) if value >= 0 else float("nan")
    return metrics
