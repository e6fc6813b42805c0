"""DS-FPN, detector builders, COCO data checks, metrics and the ``dsnet detect`` CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dsnet.cli.main import main
from dsnet.detection.builders import create_backbone, maskrcnn, retinanet
from dsnet.detection.data import CocoDetection, load_coco_json, make_fashion_detection, split_paths
from dsnet.detection.ds_fpn import DS_POSITIONS, DSFPN
from dsnet.detection.metrics import coco_evaluate, to_coco_results


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="session")
def fashion_det(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny built-in detection set: 64 px canvases, 12 train and 6 val images."""
    return make_fashion_detection(tmp_path_factory.mktemp("fashion_det"), train=12, val=6, size=64, empty_fraction=0.2)


# ---------------------------------------------------------------------------------------------------- DS-FPN


@pytest.mark.parametrize("position", DS_POSITIONS)
@pytest.mark.parametrize("extra_levels", ["p6p7", "maxpool"])
def test_dsfpn_levels_and_shapes(position, extra_levels):
    fpn = DSFPN([32, 64, 128], 64, position=position, extra_levels=extra_levels).eval()
    feats = {"0": torch.rand(2, 32, 12, 10), "1": torch.rand(2, 64, 6, 5), "2": torch.rand(2, 128, 3, 3)}
    out = fpn(feats)
    extra = ["p6", "p7"] if extra_levels == "p6p7" else ["pool"]
    assert list(out) == ["0", "1", "2", *extra]
    assert [tuple(v.shape[-2:]) for v in out.values()][:3] == [(12, 10), (6, 5), (3, 3)]
    assert all(v.shape[:2] == (2, 64) for v in out.values())
    out["0"].sum().backward()  # the whole neck is differentiable


def test_dsfpn_position_structure():
    """Where the blocks sit: their widths follow from the position."""

    def block_dims(fpn):
        return sorted(m.local_dim + m.global_dim for m in fpn.modules() if type(m).__name__ == "DSBlock")

    c = [32, 64, 128]
    assert block_dims(DSFPN(c, 64, position=None, extra_levels="p6p7")) == []
    assert block_dims(DSFPN(c, 64, position="last", extra_levels="p6p7")) == [64, 64, 64]
    assert block_dims(DSFPN(c, 64, position="lateral", extra_levels="p6p7")) == [32, 64, 128]
    assert block_dims(DSFPN(c, 64, position="lateral_rev", extra_levels="p6p7")) == [64, 64, 64]
    assert block_dims(DSFPN(c, 64, position="lateral_extra", extra_levels="p6p7")) == [32, 64, 64, 128]
    with pytest.raises(ValueError, match="unknown DS-FPN position 'top'"):
        DSFPN(c, 64, position="top")


def test_table6_parameter_counts():
    """RetinaNet + dsnet_tiny_concat, 80 classes: the paper's Table 6 figures (they truncate to 2 decimals)."""
    paper = {None: 18.83, "last": 19.59, "lateral": 23.72, "lateral_rev": 21.36, "lateral_extra": 24.43}
    for position, expected in paper.items():
        with torch.device("meta"):
            model = retinanet(
                "dsnet_tiny_concat",
                num_classes=80,
                neck="fpn" if position is None else "ds_fpn",
                position=position,
                norm="eval",  # keep BN affine parameters as parameters, as mmdet counts them
            )
        assert int(_params(model) / 1e4) / 100 == expected, position


# ------------------------------------------------------------------------------------------------ builders


def test_backbone_trainable_stages_and_norms():
    backbone = create_backbone("resnet18", neck="fpn", trainable_stages=2, norm="eval")
    trainable = {n.split(".")[0] for n, p in backbone.body.named_parameters() if p.requires_grad}
    frozen = {n.split(".")[0] for n, p in backbone.body.named_parameters() if not p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    assert frozen == {"conv1", "bn1", "layer1", "layer2"}  # the stem counts with stage 1
    backbone.train()
    assert all(not m.training for m in backbone.body.modules() if isinstance(m, nn.BatchNorm2d))
    assert backbone.fpn.training

    frozen_bn = create_backbone("resnet18", neck="fpn", norm="frozen")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen_bn.body.modules())
    assert all(p.requires_grad for p in create_backbone("resnet18", neck="fpn", trainable_stages=4).parameters())
    with pytest.raises(ValueError, match="trainable_stages"):
        create_backbone("resnet18", trainable_stages=5)
    with pytest.raises(ValueError, match="not a timm model"):
        create_backbone("no_such_net")


def test_dsnet_backbone_stages():
    backbone = create_backbone("dsnet_tiny", trainable_stages=1)
    trainable = {n for n, p in backbone.body.named_parameters() if p.requires_grad}
    assert trainable and all(".stages.3." in f".{n}" for n in trainable)
    assert all(p.requires_grad for p in backbone.fpn.parameters())


def test_retinanet_and_maskrcnn_forward():
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an image without objects
    ]
    model = retinanet("dsnet_tiny", num_classes=3, min_size=64, max_size=64)
    losses = model(images, targets)
    assert set(losses) == {"classification", "bbox_regression"} and all(torch.isfinite(v) for v in losses.values())
    for t, im in zip(targets, images):
        t["masks"] = torch.zeros(len(t["boxes"]), *im.shape[-2:], dtype=torch.uint8)
    model = maskrcnn("resnet18", num_classes=3, neck="ds_fpn", min_size=64, max_size=64)
    assert "loss_mask" in model(images, targets)
    out = model.eval()(images)
    assert len(out) == 2 and {"boxes", "labels", "scores", "masks"} <= set(out[0])


@pytest.mark.parametrize("backbone", ["dsnet_tiny_concat", "transxnet_t", "mixformer_b0", "mobile_former_26m"])
def test_every_family_backs_a_detector(backbone):
    """The whole zoo, not only DS-Net, trains under DS-FPN: losses are finite and reach the deepest stage."""
    model = retinanet(backbone, num_classes=3, min_size=64, max_size=64, trainable_stages=4, norm="train")
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    body = dict(model.backbone.body.named_parameters())
    deepest = [p for n, p in body.items() if re.search(r"(^|\.)stages[._]3\.", n)]  # timm wraps: model.stages.3
    assert deepest and all(p.grad is not None and p.grad.abs().sum() > 0 for p in deepest if p.dim() > 1)


# ---------------------------------------------------------------------------------------------------- data


def test_generated_set_is_deterministic_and_consistent(fashion_det, tmp_path):
    again = make_fashion_detection(tmp_path / "again", train=12, val=6, size=64, empty_fraction=0.2)
    for split in ("train", "val"):
        a, b = split_paths(fashion_det, split)[1], split_paths(again, split)[1]
        assert a.read_bytes() == b.read_bytes()
    ds = CocoDetection(*split_paths(fashion_det, "train"), masks=True)
    assert len(ds) == 12 and ds.num_classes == 11 and ds.categories[0] == "T-shirt/top"
    sizes = []
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 64, 64) and image.min() >= 0 and image.max() <= 1
        sizes.append(len(target["boxes"]))
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert 0 in sizes and max(sizes) > 1  # empty images and several objects per image


def _write_coco(folder: Path, images, annotations, categories=None) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for img in images:
        Image.fromarray(np.zeros((img["height"], img["width"], 3), np.uint8)).save(folder / img["file_name"])
    ann = folder / "instances.json"
    categories = categories or [{"id": 7, "name": "bag"}, {"id": 3, "name": "coat"}]
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return folder, ann


def test_polygon_masks_and_empty_images(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30} for i in (1, 2)]
    poly = [[10, 5, 20, 5, 20, 15, 10, 15]]
    anns = [{"id": 5, "image_id": 1, "category_id": 7, "bbox": [10, 5, 10, 10], "segmentation": poly, "iscrowd": 0}]
    ds = CocoDetection(*_write_coco(tmp_path, images, anns), masks=True)
    _, target = ds[0]
    assert target["labels"].tolist() == [2]  # ids 3, 7 -> labels 1, 2
    assert target["boxes"].tolist() == [[10, 5, 20, 15]]
    assert 90 <= int(target["masks"].sum()) <= 121
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 30, 40)


def test_bad_annotations_are_named(tmp_path):
    img = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}]

    def ann(**kw):
        return [{"id": 9, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5], **kw}]

    with pytest.raises(ValueError, match=r"instances.json: annotation id 9: box \[30, 20, 20, 5\].*outside.*40×30"):
        load_coco_json(_write_coco(tmp_path / "box", img, ann(bbox=[30, 20, 20, 5]))[1])
    with pytest.raises(ValueError, match="annotation id 9: unknown category_id 4"):
        load_coco_json(_write_coco(tmp_path / "cat", img, ann(category_id=4))[1])
    with pytest.raises(ValueError, match="annotation id 9: image_id 2 is not in 'images'"):
        load_coco_json(_write_coco(tmp_path / "img", img, ann(image_id=2))[1])
    with pytest.raises(ValueError, match=r"annotation id 9: box .* non-positive"):
        load_coco_json(_write_coco(tmp_path / "neg", img, ann(bbox=[1, 1, 0, 5]))[1])
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [}')
    with pytest.raises(ValueError, match=r"broken.json: not valid JSON .*line 1"):
        load_coco_json(broken)
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        load_coco_json(tmp_path / "nope.json")
    folder, ann_file = _write_coco(tmp_path / "missing", img, ann())
    (folder / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"a.png \(image id 1"):
        CocoDetection(folder, ann_file)


# ------------------------------------------------------------------------------------------------- metrics


def test_coco_metrics_perfect_and_empty(fashion_det):
    ds = CocoDetection(*split_paths(fashion_det, "val"), masks=True)
    outputs, ids = [], []
    for i in range(len(ds)):
        _, t = ds[i]
        n = len(t["labels"])
        outputs.append({**t, "scores": torch.ones(n), "masks": t["masks"][:, None].float()})
        ids.append(int(t["image_id"]))
    results = to_coco_results(outputs, ids, ds.label_to_category_id, masks=True)
    metrics = coco_evaluate(ds.coco, results, ("bbox", "segm"))
    assert metrics["bbox_AP"] == pytest.approx(1.0) and metrics["segm_AP"] == pytest.approx(1.0)
    shifted = [{**r, "bbox": [r["bbox"][0] + r["bbox"][2] / 2, *r["bbox"][1:]]} for r in results]
    assert coco_evaluate(ds.coco, shifted)["bbox_AP50"] < 0.5  # half-box shift: IoU 1/3
    assert coco_evaluate(ds.coco, [])["bbox_AP"] == 0.0


# ----------------------------------------------------------------------------------------------------- CLI


def _train_args(root: Path, out: Path, *extra: str) -> list[str]:
    sets = [
        f"data.root={root}",
        f"train.output_dir={out}",
        "train.name=run",
        "train.progress=false",
        "train.batch_size=4",
        "optim.warmup_iters=2",
        "model.min_size=64",
        "model.max_size=64",
        *extra,
    ]
    return ["detect", "train"] + [a for s in sets for a in ("--set", s)]


def test_cli_train_eval_predict(fashion_det, tmp_path, capsys):
    assert main(_train_args(fashion_det, tmp_path, "sched.epochs=1")) == 0
    (run,) = tmp_path.glob("run-*")  # train.name + a timestamp, as classification runs
    assert {"config.yaml", "metrics.jsonl", "checkpoints", "summary.json"} <= {p.name for p in run.iterdir()}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "epoch" and records[-1]["epoch"] == 1 and "bbox_AP" in records[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["bbox_AP"] == records[-1]["bbox_AP"] and summary["updates"] == 3  # 12 images // batch 4
    capsys.readouterr()
    assert main(["detect", "eval", str(run), "--tag", "last"]) == 0
    assert json.loads(capsys.readouterr().out)["bbox_AP"] == pytest.approx(summary["bbox_AP"], abs=1e-6)
    out_png = tmp_path / "pred.png"
    image = split_paths(fashion_det, "val")[0] / "000000.png"
    assert main(["detect", "predict", str(run), str(image), "--out", str(out_png), "--score-thresh", "0"]) == 0
    assert Image.open(out_png).size == (64, 64)
    drawn, original = (np.asarray(Image.open(p).convert("RGB")) for p in (out_png, image))
    assert not np.array_equal(drawn, original)  # boxes were drawn


def test_cli_errors(fashion_det, tmp_path, capsys):
    assert main(_train_args(fashion_det, tmp_path, "optim.nope=1")) == 2
    assert "unknown config key 'optim.nope'" in capsys.readouterr().err
    assert main(_train_args(tmp_path / "absent", tmp_path)) == 2
    assert "not found" in capsys.readouterr().err
    assert main([*_train_args(fashion_det, tmp_path), "--resume", str(tmp_path)]) == 2
    assert "do not combine it with --config/--set" in capsys.readouterr().err
    assert main(["detect", "train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_maskrcnn_trains_and_reports_mask_ap(fashion_det, tmp_path):
    from dsnet.detection.engine import load_detection_config, train

    root = tmp_path / "data"
    shutil.copytree(fashion_det, root)
    cfg = load_detection_config(
        None,
        [
            f"data.root={root}",
            f"train.output_dir={tmp_path}",
            "train.progress=false",
            "model.arch=maskrcnn",
            "model.backbone=dsnet_tiny",
            "model.min_size=64",
            "model.max_size=64",
            "train.batch_size=4",
            "sched.epochs=1",
            "optim.warmup_iters=1",
            "data.max_train_samples=8",
            "data.max_val_samples=3",
            "model.score_thresh=0.0",
        ],
    )
    run_dir = train(cfg)
    result = json.loads((run_dir / "summary.json").read_text())
    for key in ("segm_AP", "segm_AP50", "bbox_AP"):
        assert 0.0 <= result[key] <= 1.0
    assert Path(run_dir, "checkpoints", "last.safetensors").is_file()
