"""COCO-format detection data: a validated dataset (boxes, masks) and a built-in Fashion-MNIST detection set.

:class:`CocoDetection` reads an image folder and a COCO ``instances`` JSON (boxes; masks as polygons, RLE or
uncompressed RLE through pycocotools) and returns what torchvision's detectors take: a float image ``(3, H, W)``
in [0, 1] and a target dict with ``boxes`` (xyxy, float), ``labels`` (1 … K, 0 is the background), ``masks``
(``(N, H, W)`` uint8, when asked) and ``image_id``. Category ids are mapped to contiguous labels in sorted id order.
Annotations are checked when the dataset is built; a bad file raises ``DSNetError``/``FileNotFoundError`` naming
the file and the annotation or image id. Crowd annotations (``iscrowd=1``) are kept for evaluation by pycocotools
but left out of training targets. Images without objects are kept (empty targets).

:func:`make_fashion_detection` writes the built-in set: real Fashion-MNIST items (train items for ``train``, test
items for ``val``) scaled, tinted and pasted without overlap onto noisy canvases; each item's silhouette is its
instance mask. It is deterministic for a given seed.

Example:
    >>> from dsnet.detection.data import make_fashion_detection, CocoDetection, split_paths
    >>> root = make_fashion_detection("/tmp/fashion_det", train=8, val=4, size=128)
    >>> ds = CocoDetection(*split_paths(root, "val"), masks=True)
    >>> image, target = ds[0]
    >>> image.shape, sorted(target)
    (torch.Size([3, 128, 128]), ['area', 'boxes', 'image_id', 'iscrowd', 'labels', 'masks'])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dsnet._io import atomic_write_text
from dsnet.data.datasets import sample_seed
from dsnet.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from dsnet.data.images import ImageLoadError, open_image
from dsnet.detection.metrics import coco_from_dict
from dsnet.errors import DSNetError

__all__ = ["CocoDetection", "collate", "load_coco_json", "make_fashion_detection", "split_paths"]

_BOX_TOLERANCE = 1.0  # pixels a box may exceed the image by (rounding in converted annotations)


def split_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """Image folder and annotation file of ``split`` in a set written by :func:`make_fashion_detection`.

    Layout: ``root/<split>/*.png`` and ``root/annotations/instances_<split>.json``.
    """
    root = Path(root)
    return root / split, root / "annotations" / f"instances_{split}.json"


def load_coco_json(ann_file: str | Path) -> dict[str, Any]:
    """Read and validate a COCO ``instances`` file; errors name the file and the offending id."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    try:
        data = json.loads(ann_file.read_text())
    except json.JSONDecodeError as err:
        raise DSNetError(f"{ann_file}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(data, dict):
        raise DSNetError(f"{ann_file}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DSNetError(f"{ann_file}: missing or non-list '{key}' (a COCO instances file needs it)")
    if not data["categories"]:
        raise DSNetError(f"{ann_file}: 'categories' is empty")
    cat_ids = {c.get("id") for c in data["categories"]}
    images = {}
    for img in data["images"]:
        for key in ("id", "file_name", "width", "height"):
            if key not in img:
                raise DSNetError(f"{ann_file}: image entry {img.get('id', img)} has no '{key}'")
        if img["id"] in images:
            raise DSNetError(f"{ann_file}: image id {img['id']} appears twice")
        images[img["id"]] = img
    seen = set()
    for ann in data["annotations"]:
        aid = ann.get("id")
        where = f"{ann_file}: annotation id {aid}"
        if aid is None:
            raise DSNetError(f"{ann_file}: an annotation has no 'id' (image {ann.get('image_id')})")
        if aid in seen:
            raise DSNetError(f"{where} appears twice")
        seen.add(aid)
        if ann.get("image_id") not in images:
            raise DSNetError(f"{where}: image_id {ann.get('image_id')} is not in 'images'")
        if ann.get("category_id") not in cat_ids:
            raise DSNetError(f"{where}: unknown category_id {ann.get('category_id')} (known: {sorted(cat_ids)})")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DSNetError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
        x, y, w, h = bbox
        img = images[ann["image_id"]]
        if w <= 0 or h <= 0:
            raise DSNetError(f"{where}: box {bbox} has non-positive width or height")
        t = _BOX_TOLERANCE
        if x < -t or y < -t or x + w > img["width"] + t or y + h > img["height"] + t:
            raise DSNetError(
                f"{where}: box {bbox} (x, y, w, h) lies outside image {img['id']} of size "
                f"{img['width']}×{img['height']}"
            )
    return data


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset for torchvision's detectors (see the module docstring).

    Args:
        image_dir: folder holding the images named by ``file_name``.
        ann_file: COCO ``instances`` JSON.
        masks: also return instance masks (Mask R-CNN).
        hflip: probability of a random horizontal flip (training augmentation). Whether sample ``i`` is flipped in
            ``epoch`` is drawn from :func:`dsnet.data.datasets.sample_seed` ``(seed, epoch, i)``: items may be
            indexed by ``(index, epoch)`` keys (as :class:`~dsnet.data.datasets.ShardedEpochSampler` yields), and
            the flip does not depend on the rank, the worker or a resume.
        seed: the run's seed, for the flips.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        *,
        masks: bool = False,
        hflip: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        self.data = load_coco_json(self.ann_file)
        self.masks = masks
        self.hflip = hflip
        self.seed = seed
        self.images = sorted(self.data["images"], key=lambda i: i["id"])
        for img in self.images:
            if not (self.image_dir / img["file_name"]).is_file():
                raise FileNotFoundError(
                    f"image file {self.image_dir / img['file_name']} (image id {img['id']}, listed in "
                    f"{self.ann_file}) not found"
                )
        self.cat_ids = sorted(c["id"] for c in self.data["categories"])
        names = {c["id"]: c.get("name", str(c["id"])) for c in self.data["categories"]}
        #: category names in label order; label ``i`` (1-based) is ``categories[i - 1]``
        self.categories = [names[c] for c in self.cat_ids]
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.anns: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in self.images}
        for ann in self.data["annotations"]:
            self.anns[ann["image_id"]].append(ann)
        self._coco = None

    @property
    def num_classes(self) -> int:
        """Categories + 1 (background): the ``num_classes`` of torchvision's detectors."""
        return len(self.cat_ids) + 1

    def label_to_category_id(self, label: int) -> int:
        return self.cat_ids[label - 1]

    @property
    def coco(self) -> Any:
        """The annotations as a ``pycocotools.coco.COCO`` object (for evaluation)."""
        if self._coco is None:
            self._coco = coco_from_dict(self.data)
        return self._coco

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict[str, Tensor]]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        info = self.images[index]
        path = self.image_dir / info["file_name"]
        try:
            with open_image(path) as im:  # refuses decompression bombs from the header
                pil = im.convert("RGB")
        except (OSError, ImageLoadError) as err:
            raise DSNetError(f"cannot read image {path} (image id {info['id']}): {err}") from None
        width, height = pil.size
        if (width, height) != (info["width"], info["height"]):
            raise DSNetError(
                f"image {path} (image id {info['id']}) is {width}×{height} but {self.ann_file} says "
                f"{info['width']}×{info['height']}"
            )
        image = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)  # (3, H, W)
        anns = [a for a in self.anns[info["id"]] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(info["id"]),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        if self.masks:
            target["masks"] = self._masks(anns, height, width)
        flip = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        if self.hflip > 0 and torch.rand((), generator=flip) < self.hflip:
            image = image.flip(-1)
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target

    def _masks(self, anns: list[dict[str, Any]], height: int, width: int) -> Tensor:
        from pycocotools import mask as mask_utils

        masks = np.zeros((len(anns), height, width), dtype=np.uint8)
        for i, ann in enumerate(anns):
            seg = ann.get("segmentation")
            if not seg:
                raise DSNetError(f"{self.ann_file}: annotation id {ann['id']} has no segmentation (masks requested)")
            try:
                if isinstance(seg, list):  # polygons
                    rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
                elif isinstance(seg.get("counts"), list):  # uncompressed RLE
                    rle = mask_utils.frPyObjects(seg, height, width)
                else:
                    rle = seg
                masks[i] = mask_utils.decode(rle)
            except (TypeError, ValueError, AttributeError, KeyError) as err:
                raise DSNetError(
                    f"{self.ann_file}: annotation id {ann['id']} has a broken segmentation: {err}"
                ) from None
        return torch.from_numpy(masks)


def collate(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Keep images and targets as lists (sizes differ), as torchvision's detectors take them."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def _paste_items(
    rng: np.random.Generator, items: np.ndarray, size: int, max_objects: int, empty_fraction: float
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One canvas ``(size, size, 3)`` uint8 and its objects as (item index, full-size boolean mask)."""
    background = rng.uniform(0, 90, size=3)
    canvas = background + rng.normal(0, 12, size=(size, size, 3))  # (H, W, 3)
    objects: list[tuple[int, np.ndarray]] = []
    n = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_objects + 1))
    occupied = np.zeros((size, size), dtype=bool)
    for _ in range(n):
        index = int(rng.integers(len(items)))
        side = int(rng.uniform(0.18, 0.5) * size)
        for _attempt in range(20):
            y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if not occupied[max(0, y - 2) : y + side + 2, max(0, x - 2) : x + side + 2].any():
                break
        else:
            continue
        item = np.asarray(Image.fromarray(items[index]).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255
        silhouette = item > 0.08
        if silhouette.sum() < 16:
            continue
        color = rng.uniform(120, 255, size=3)
        alpha = item[..., None] * silhouette[..., None]  # (side, side, 1)
        patch = canvas[y : y + side, x : x + side]
        canvas[y : y + side, x : x + side] = patch * (1 - alpha) + color * alpha
        mask = np.zeros((size, size), dtype=bool)
        mask[y : y + side, x : x + side] = silhouette
        occupied[y : y + side, x : x + side] = True
        objects.append((index, mask))
    return np.clip(canvas, 0, 255).astype(np.uint8), objects


def make_fashion_detection(
    out: str | Path,
    *,
    train: int = 2000,
    val: int = 500,
    size: int = 128,
    max_objects: int = 4,
    empty_fraction: float = 0.05,
    seed: int = 0,
    fashion_mnist_root: str | Path | None = None,
) -> Path:
    """Write the built-in Fashion-MNIST detection set (COCO format) under ``out``; returns ``out``.

    Each image is ``size``×``size`` RGB with 0 … ``max_objects`` garments (about ``empty_fraction`` of the images
    have none) of 18–50 % of the canvas side; masks are stored as compressed RLE. Splits ``train`` and ``val``
    (items from the Fashion-MNIST train / test split); layout as :func:`split_paths`. Same seed, same files.
    """
    from pycocotools import mask as mask_utils

    if size < 32:
        raise DSNetError(f"size must be at least 32 px, got {size}")
    if train < 0 or val < 0 or train + val == 0:
        raise DSNetError(f"need a positive number of images, got train={train}, val={val}")
    out = Path(out)
    categories = [
        {"id": i + 1, "name": name, "supercategory": "fashion"} for i, name in enumerate(FASHION_MNIST_CLASSES)
    ]
    for split_index, (split, count, source) in enumerate((("train", train, "train"), ("val", val, "test"))):
        if count == 0:
            continue
        items, labels = load_fashion_mnist(source, root=fashion_mnist_root)
        image_dir, ann_file = split_paths(out, split)
        image_dir.mkdir(parents=True, exist_ok=True)
        ann_file.parent.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split_index, i])
            canvas, objects = _paste_items(rng, items, size, max_objects, empty_fraction)
            file_name = f"{i:06d}.png"
            Image.fromarray(canvas).save(image_dir / file_name)
            image_id = i + 1
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for index, mask in objects:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(labels[index]) + 1,
                        "bbox": [x, y, w, h],
                        "area": float(mask_utils.area(rle)),
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                        "iscrowd": 0,
                    }
                )
        meta = {"description": f"dsnet Fashion-MNIST detection, {split}", "seed": seed, "size": size}
        atomic_write_text(
            ann_file, json.dumps({"info": meta, "images": images, "annotations": annotations, "categories": categories})
        )
    return out
