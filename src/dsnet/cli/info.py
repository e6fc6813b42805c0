"""``dsnet info``: parameters and MACs of every model in the zoo beside the papers' figures."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass


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


def collect(pattern: str = "*", image_size: int = 224) -> list[ModelInfo]:
    """Measure every zoo model matching ``pattern`` (parameters, MACs at ``image_size``²) beside its paper figures."""
    import timm

    from dsnet.bench.complexity import count_macs, count_params
    from dsnet.models import PAPER_FIGURES
    from dsnet.models._zoo import list_zoo

    rows = []
    names = list_zoo(pattern)
    if not names:
        raise ValueError(f"no model of the zoo matches {pattern!r}")
    for name in names:
        # on the meta device: shapes only, no memory, no arithmetic — the counts are exact and take a second
        model = timm.create_model(name, device="meta")
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


def run(args: argparse.Namespace) -> int:
    rows = collect(args.models, args.image_size)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(format_table(rows, args.image_size))
        print('\nMACs = multiply-accumulates of one forward pass (the papers\' "FLOPs"), attention included.')
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="parameters and MACs of every model beside the papers' figures")
    p.add_argument("--models", default="*", help="shell pattern of model names (default: all)")
    p.add_argument("--image-size", type=int, default=224, help="square input size for the MAC count (default 224)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
