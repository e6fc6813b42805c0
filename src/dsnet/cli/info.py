"""``dsnet info``: parameters and MACs of every model in the zoo beside the papers' figures."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any

import yaml

from dsnet.errors import DSNetError


@dataclass
class ModelInfo:
    """One row of ``dsnet info``."""

    model: str
    params_m: float
    gmacs: float
    paper_params_m: float | None
    paper_gmacs: float | None
    paper_top1: float | None
    source: str


def collect(pattern: str = "*", image_size: int = 224, model_kwargs: dict[str, Any] | None = None) -> list[ModelInfo]:
    """Measure every zoo model matching ``pattern`` (parameters, MACs at ``image_size``²) beside its paper figures.

    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``{"global_strides": (2, 2, 1, 1)}``).
    """
    import timm

    from dsnet.bench.complexity import count_macs, count_params
    from dsnet.models import PAPER_FIGURES
    from dsnet.models._zoo import list_zoo

    rows = []
    names = list_zoo(pattern)
    if not names:
        raise DSNetError(f"no model of the zoo matches {pattern!r}")
    for name in names:
        # on the meta device: shapes only, no memory, no arithmetic — the counts are exact and take a second
        model = timm.create_model(name, device="meta", **(model_kwargs or {}))
        paper = PAPER_FIGURES.get(name)
        rows.append(
            ModelInfo(
                model=name,
                params_m=count_params(model) / 1e6,
                gmacs=count_macs(model, (3, image_size, image_size)) / 1e9,
                paper_params_m=paper.params_m if paper else None,
                paper_gmacs=paper.gmacs if paper else None,
                paper_top1=paper.top1 if paper else None,
                source=paper.source if paper else "",
            )
        )
    return rows


def format_table(rows: list[ModelInfo], image_size: int = 224) -> str:
    """A fixed-width text table of ``rows``."""

    def fmt(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    macs = f"GMACs@{image_size}"
    header = f"{'model':<22} {'params (M)':>10} {'paper':>7} {macs:>11} {'paper':>7} {'top-1':>6}  source"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.model:<22} {r.params_m:>10.3f} {fmt(r.paper_params_m, '.2f'):>7} {r.gmacs:>11.3f} "
            f"{fmt(r.paper_gmacs, '.2f'):>7} {fmt(r.paper_top1, '.1f'):>6}  {r.source}"
        )
    return "\n".join(lines)


def stream_table(pattern: str, image_size: int, model_kwargs: dict[str, Any] | None = None) -> str:
    """Per stage of every DS-Net matching ``pattern``: the local map and the global token grid at ``image_size``²."""
    import timm

    from dsnet.models._zoo import list_zoo
    from dsnet.models.dsnet import DSNet

    lines = []
    for name in list_zoo(pattern):
        model = timm.create_model(name, device="meta", **(model_kwargs or {}))
        if not isinstance(model, DSNet):
            continue
        cells = []
        for shape in model.stream_shapes(image_size):
            grid = "—" if shape.global_grid is None else "×".join(map(str, shape.global_grid))
            cells.append(f"stage {shape.stage}: local {'×'.join(map(str, shape.local_map))} / global {grid}")
        lines.append(f"{name:<22} " + ", ".join(cells))
    if not lines:
        return ""
    return f"DS-Net streams at {image_size}×{image_size} (local map / global token grid):\n" + "\n".join(lines)


def _model_kwargs(items: list[str]) -> dict[str, Any]:
    kwargs = {}
    for item in items:
        if "=" not in item:
            raise DSNetError(f"--set {item!r} is not of the form key=value (e.g. global_strides=[2,2,1,1])")
        key, raw = item.split("=", 1)
        kwargs[key.strip()] = yaml.safe_load(raw)
    return kwargs


def run(args: argparse.Namespace) -> int:
    from dsnet._io import strict_json

    kwargs = _model_kwargs(args.set)
    try:
        rows = collect(args.models, args.image_size, kwargs)
    except TypeError as err:  # an unknown model argument in --set
        raise DSNetError(f"--set: {err}") from err
    if args.json:
        print(strict_json([asdict(r) for r in rows], indent=2))
        return 0
    print(format_table(rows, args.image_size))
    print('\nMACs = multiply-accumulates of one forward pass (the papers\' "FLOPs"), attention included.')
    streams = stream_table(args.models, args.image_size, kwargs)
    if streams:
        print("\n" + streams)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="parameters and MACs of every model beside the papers' figures")
    p.add_argument("--models", default="*", help="shell pattern of model names (default: all)")
    p.add_argument(
        "--input-size",
        "--image-size",
        dest="image_size",
        type=int,
        default=224,
        help="square input size for the MAC count and the streams' sizes (default 224)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model argument with a YAML value, e.g. --set global_strides=[2,2,1,1] (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
