"""CPU inference throughput of our models on every deployment path, beside the timm models a user would pick instead.

One run measures, at ``--size`` px (default 224) and ``--threads`` threads (default 2), images per second at batch 1
and 16 of:

* our models (``--models``; default dsnet_tiny, dsnet_small, transxnet_t, mixformer_b1, mobile_former_294m) and
* timm peers of similar ImageNet top-1 (``--peers``; default efficientformer_l1, fastvit_t12, pvt_v2_b1, deit_small,
  resnet50 at ~79-80 %; convnext_tiny, pvt_v2_b2, swin_tiny at ~82 %), FastViT reparameterised with timm's own
  ``reparameterize_model`` in every path,

on each path (``--variants`` for ours, ``--peer-variants`` for the peers; a path that fails to build is reported in
the table, not fatal):

==============  ========================================================================================================
eager           the model as ``timm.create_model`` builds it, eval mode, ``torch.inference_mode``
fused           :func:`dsnet.deploy.fuse` of it (BatchNorms folded, timm's reparameterisations): what ``dsnet predict``
                runs
channels_last   the fused model and its input in ``torch.channels_last``
math_attention  the fused model with PyTorch's unfused "math" attention forced (``sdpa_kernel(SDPBackend.MATH)``):
                the baseline of :func:`dsnet.layers.attention.attention`, which keeps the fused CPU kernel (before
                it, every attention call of TransXNet and MixFormer and DS-Net's co-attention ran this path)
compile         ``torch.compile`` of the fused model (inductor; only with ``--compile``: compiling takes minutes)
onnxruntime     the fused model exported by :func:`dsnet.export.onnx.export_onnx` (dynamic batch) in ONNX Runtime
openvino        that ONNX file in OpenVINO's CPU plugin, fp32 arithmetic
int8            that ONNX file quantized to int8 QDQ (:func:`dsnet.export.quantize.quantize_onnx_batches`) in ONNX
                Runtime; calibrated on random normal images, which sets the scales but not the speed
paddleclas      DS-Net only, with ``--paddle``: the PaddleClas model that defines the released weights (paddleclas
                2.6.0, dygraph, as PaddleClas runs it), given random weights of realistic scale; our model then gets
                *the same weights* through the real converter (every path of it times the same function), and the
                largest logit difference at batch 2 is printed as a check. Needs ``paddlepaddle`` and ``paddleclas``
                (``scripts/test.sh`` installs them). Paddle's OpenMP workers spin 200 ms after a call
                (``KMP_BLOCKTIME``), so ``--paddle`` raises ``--settle`` to at least 0.3 s.
==============  ========================================================================================================

and a GEMM probe: a ``--gemm-size``² fp32 matmul (default 2048) on the same threads, in GFLOP/s. Each model's
"% of GEMM" is ``2 · MACs · img/s / GEMM FLOP/s`` (MACs from :func:`dsnet.bench.complexity.count_macs`): the share
of the machine's dense-matmul rate that the model turns into useful arithmetic.

Timing: every measurement is ``--warmup`` untimed calls, then timed calls until ``--min-time`` seconds have passed
(at least one); seconds per call. All measurements (every model × path × batch, and the GEMM probe) are taken
round-robin, ``--repeats`` times, so that machine noise hits all alike; the median is reported. The machine idles
``--settle`` seconds before each measurement (ONNX Runtime's and OpenVINO's thread pools spin for a moment after a
call). The 1-minute load average is printed before and after the run: above ~0.5 on an idle machine, something else
ran.

Memory: ``--malloc`` sets up the CPU allocator as the ``dsnet`` command does (``DSNET_MALLOC``,
:func:`dsnet.engine.runtime.configure_memory`): ``hugepages`` (default) backs torch's large tensors with transparent
huge pages, ``retain`` also keeps freed memory for reuse, ``libc`` measures the C library's own behaviour. The table
header says which took effect. With ``retain`` the full default run grew to 23 GB: measure few models at a time
with it.

Results: ``benchmarks/results/throughput.md`` (the table, also printed) and ``throughput.json`` (every sample)::

    python benchmarks/throughput.py                              # the full table (~20 min on 2 cores)
    python benchmarks/throughput.py --models dsnet_tiny --peers efficientformer_l1 --repeats 3
    python benchmarks/throughput.py --models dsnet_tiny --peers --variants eager fused --size 64 --repeats 1
    python benchmarks/throughput.py --models dsnet_tiny dsnet_small --peers --variants eager channels_last --paddle
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dsnet.engine.runtime import MEMORY_MODES, configure_memory

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

OURS: tuple[str, ...] = ("dsnet_tiny", "dsnet_small", "transxnet_t", "mixformer_b1", "mobile_former_294m")
PEERS: tuple[str, ...] = (
    "efficientformer_l1",
    "fastvit_t12",
    "pvt_v2_b1",
    "deit_small_patch16_224",
    "resnet50",
    "convnext_tiny",
    "pvt_v2_b2",
    "swin_tiny_patch4_window7_224",
)
VARIANTS: tuple[str, ...] = (
    "eager",
    "fused",
    "channels_last",
    "math_attention",
    "compile",
    "onnxruntime",
    "openvino",
    "int8",
    "paddleclas",
)
DEFAULT_VARIANTS: tuple[str, ...] = tuple(v for v in VARIANTS if v not in ("compile", "paddleclas"))
#: the peers' paths by default: no int8 (its calibration and graph rewrite cost minutes per model)
DEFAULT_PEER_VARIANTS: tuple[str, ...] = ("eager", "fused", "channels_last", "onnxruntime", "openvino")
_ARTEFACT_VARIANTS = ("onnxruntime", "openvino", "int8")
#: our model → the PaddleClas builder of the same network
PADDLE_REFERENCES = {"dsnet_tiny": "DSNet_tiny", "dsnet_small": "DSNet_small", "dsnet_base": "DSNet_base"}
PADDLE_SETTLE = 0.3  # seconds: Paddle's Intel OpenMP workers spin this long (200 ms) after a parallel region


@dataclass(frozen=True)
class Settings:
    """What one run measures and how."""

    batches: tuple[int, ...] = (1, 16)  # batch sizes measured
    size: int = 224  # square input size (px)
    threads: int = 2  # CPU threads of every runtime and of the GEMM probe
    repeats: int = 5  # round-robin measurements per cell; the median is reported
    warmup: int = 1  # untimed calls before each measurement
    min_time: float = 0.5  # seconds of timed calls per measurement (at least one call)
    settle: float = 0.05  # idle seconds before each measurement
    gemm_size: int = 2048  # side of the square fp32 matmul of the GEMM probe
    calib_batches: int = 2  # random batches of 8 images calibrating int8


@dataclass
class Cell:
    """One model × path × batch: every measurement (seconds per call), or why the path could not run."""

    model: str
    variant: str
    batch: int
    seconds: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def images_per_second(self) -> float | None:
        return self.batch / statistics.median(self.seconds) if self.seconds and self.error is None else None


@dataclass
class Result:
    """Everything a run measured."""

    settings: Settings
    macs: dict[str, int]  # model → MACs per image at the measured size
    cells: list[Cell]
    gemm_seconds: list[float]
    load: tuple[float, float]  # 1-minute load average before / after
    versions: dict[str, str]
    checks: dict[str, float] = field(default_factory=dict)  # model → max |ours − PaddleClas| logit, batch 2

    @property
    def gemm_flops(self) -> float:
        """FLOP/s of the GEMM probe (median measurement)."""
        return 2 * self.settings.gemm_size**3 / statistics.median(self.gemm_seconds)

    def cell(self, model: str, variant: str, batch: int) -> Cell:
        return next(c for c in self.cells if (c.model, c.variant, c.batch) == (model, variant, batch))

    def gemm_share(self, cell: Cell) -> float | None:
        """Percent of the GEMM rate that ``cell`` turns into model arithmetic."""
        rate = cell.images_per_second
        return None if rate is None else 100 * 2 * self.macs[cell.model] * rate / self.gemm_flops


# ----------------------------------------------------------------------------------------------------------------------
# Building the paths


def build_model(name: str) -> nn.Module:
    """The eval-mode model as timm builds it, random weights (speed ignores them)."""
    import timm

    import dsnet  # noqa: F401  (registers our models)

    return timm.create_model(name).eval()


def _eager(name: str, model: nn.Module) -> nn.Module:
    """The eager path: FastViT reparameterised by timm (a copy: ``fuse`` reparameterises the model as built)."""
    from timm.utils.model import reparameterize_model

    return reparameterize_model(model) if name.startswith("fastvit") else model


def _paddle_reference() -> Any:
    """``tests/_paddle_reference.py``: the PaddleClas DS-Net loader, test-only code outside the package."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import _paddle_reference

    return _paddle_reference


def setup_paddle(threads: int) -> Any:
    """Import paddle with ``threads`` OpenMP/MKL threads (``os.environ`` is left as it was); returns the module."""
    import_paddle, set_paddle_threads = _paddle_reference().import_paddle, _paddle_reference().set_paddle_threads

    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the OpenMP runtimes when paddle loads them
    try:
        paddle = import_paddle()
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    set_paddle_threads(threads)
    paddle.set_device("cpu")
    return paddle


def build_paddle_pair(name: str, size: int, seed: int = 0) -> tuple[nn.Module, Any, float]:
    """Our eval model and the PaddleClas reference with the same weights, and their largest logit difference."""
    import timm

    import dsnet  # noqa: F401

    ref = _paddle_reference()
    import_paddle, load_reference_dsnet = ref.import_paddle, ref.load_reference_dsnet
    randomize_reference, set_reference_input_size = ref.randomize_reference, ref.set_reference_input_size
    from dsnet.convert.dsnet_reference import reference_to_dsnet

    paddle = import_paddle()
    reference = getattr(load_reference_dsnet(), PADDLE_REFERENCES[name])(img_size=size)
    randomize_reference(reference, seed)
    set_reference_input_size(reference, size, size)
    ours = timm.create_model(name)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    ours.load_state_dict(reference_to_dsnet(state, layout="paddle"), strict=True)
    ours.eval()
    reference.eval()
    x = np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad(), paddle.no_grad():
        diff = np.abs(ours(torch.from_numpy(x)).numpy() - reference(paddle.to_tensor(x)).numpy()).max()
    return ours, reference, float(diff)


def _paddle_call(reference: Any, batch: int, size: int) -> Callable[[], None]:
    import_paddle = _paddle_reference().import_paddle

    paddle = import_paddle()
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32))

    def call() -> None:
        with paddle.no_grad():
            reference(x).numpy()

    return call


def _torch_call(model: nn.Module, x: torch.Tensor, math_attention: bool = False) -> Callable[[], None]:
    def call() -> None:
        with torch.inference_mode():
            if math_attention:
                with sdpa_kernel(SDPBackend.MATH):
                    model(x)
            else:
                model(x)

    return call


def _runtime_call(runner: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        runner(x)  # numpy in and out: no copy of the input, one of the logits

    return call


def _random_batches(settings: Settings) -> Iterator[np.ndarray]:
    generator = np.random.default_rng(0)
    for _ in range(settings.calib_batches):
        yield generator.standard_normal((8, 3, settings.size, settings.size), dtype=np.float32)


def build_calls(
    name: str,
    model: nn.Module,
    variants: Sequence[str],
    settings: Settings,
    workdir: Path,
    reference: Any = None,
) -> dict[tuple[str, int], Callable[[], None] | str]:
    """For every (path, batch): a zero-argument call that runs one forward pass, or the error that prevented it.

    ``reference``: the PaddleClas model of the ``paddleclas`` path (None: that path reports it has none).
    """
    from dsnet.deploy import fuse
    from dsnet.deploy.runtime import OnnxRuntimeModel, OpenVINOModel
    from dsnet.export.onnx import export_onnx
    from dsnet.export.quantize import quantize_onnx_batches

    inputs = {b: torch.randn(b, 3, settings.size, settings.size) for b in settings.batches}
    calls: dict[tuple[str, int], Callable[[], None] | str] = {}
    built: dict[str, nn.Module | str] = {}

    def attempt(key: str, make: Callable[[], nn.Module]) -> nn.Module | str:
        if key not in built:
            try:
                built[key] = make()
            except Exception as err:  # a path that cannot be built is a table entry, not the end of the run
                built[key] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                print(f"[throughput] {name} {key}: {built[key]}", file=sys.stderr)
        return built[key]

    onnx_path = workdir / f"{name}_{settings.size}px.onnx"

    def export() -> nn.Module:
        if not onnx_path.is_file():  # an ``--artefacts`` folder keeps the files of an earlier run
            export_onnx(fused_model(), onnx_path, image_size=(settings.size, settings.size), check=False)
        return nn.Identity()  # the file is the product

    def fused_model() -> nn.Module:
        result = attempt("fused", lambda: fuse(model))
        if isinstance(result, str):
            raise RuntimeError(f"fuse failed ({result})")
        return result

    def compiled() -> nn.Module:
        return torch.compile(fused_model())

    def channels_last() -> nn.Module:
        return copy.deepcopy(fused_model()).to(memory_format=torch.channels_last)

    def artefact(variant: str) -> nn.Module:
        exported = attempt("export", export)
        if isinstance(exported, str):
            raise RuntimeError(f"ONNX export failed ({exported})")
        if variant == "onnxruntime":
            return OnnxRuntimeModel(onnx_path, settings.threads)
        if variant == "openvino":
            return OpenVINOModel(onnx_path, settings.threads)
        int8_path = onnx_path.with_suffix(".int8.onnx")
        if not int8_path.is_file():
            quantize_onnx_batches(onnx_path, int8_path, lambda: _random_batches(settings))
        return OnnxRuntimeModel(int8_path, settings.threads)

    makers: dict[str, Callable[[], nn.Module]] = {
        "eager": lambda: _eager(name, model),
        "fused": fused_model,
        "channels_last": channels_last,
        "math_attention": fused_model,
        "compile": compiled,
    }
    for variant in variants:
        if variant == "paddleclas":
            for batch in settings.batches:
                calls[(variant, batch)] = (
                    f"no PaddleClas reference for {name} (only {', '.join(PADDLE_REFERENCES)})"
                    if reference is None
                    else _paddle_call(reference, batch, settings.size)
                )
            continue
        runner = attempt(variant, (lambda v=variant: artefact(v)) if variant in _ARTEFACT_VARIANTS else makers[variant])
        for batch, x in inputs.items():
            if isinstance(runner, str):
                calls[(variant, batch)] = runner
            elif variant in _ARTEFACT_VARIANTS:
                calls[(variant, batch)] = _runtime_call(runner, x)
            elif variant == "channels_last":
                calls[(variant, batch)] = _torch_call(runner, x.contiguous(memory_format=torch.channels_last))
            else:
                calls[(variant, batch)] = _torch_call(runner, x, math_attention=variant == "math_attention")
    return calls


def gemm_call(size: int) -> Callable[[], None]:
    """One ``size``² fp32 matmul into a preallocated output."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator) for _ in range(2))
    out = torch.empty(size, size)

    def call() -> None:
        torch.mm(a, b, out=out)

    return call


# ----------------------------------------------------------------------------------------------------------------------
# Timing


def time_call(call: Callable[[], None], settings: Settings) -> float:
    """Seconds per call: ``settings.warmup`` untimed calls, then timed calls for at least ``settings.min_time``."""
    if settings.settle:
        time.sleep(settings.settle)
    for _ in range(settings.warmup):
        call()
    calls, start = 0, time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= settings.min_time:
            return elapsed / calls


def _versions(paddle: bool, memory: str) -> dict[str, str]:
    import timm

    versions = {"torch": torch.__version__, "timm": timm.__version__}
    for module in ("onnxruntime", "openvino") + (("paddle",) if paddle else ()):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = "not installed"
    versions["malloc"] = memory
    return versions


def run(
    models: Sequence[str],
    peers: Sequence[str],
    settings: Settings,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    peer_variants: Sequence[str] = DEFAULT_PEER_VARIANTS,
    output: Path | None = RESULTS / "throughput.md",
    artefacts: Path | None = None,
    memory: str = "as the process found it",
) -> tuple[Result, str]:
    """Build every path, measure them round-robin, print the table and write it (and the samples) beside ``output``.

    ``artefacts``: a folder that keeps the ONNX and int8 files (reused when present: delete them after changing a
    model); default a temporary folder. ``memory``: the allocator set-up, for the header (what
    :func:`~dsnet.engine.runtime.configure_memory` returned).
    """
    from dsnet._io import strict_json
    from dsnet.bench.complexity import count_macs

    for chosen in (variants, peer_variants):
        unknown = sorted(set(chosen) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown path(s) {unknown}; choose from {', '.join(VARIANTS)}")
    use_paddle = "paddleclas" in variants or "paddleclas" in peer_variants
    if use_paddle:
        setup_paddle(settings.threads)
        settings = replace(settings, settle=max(settings.settle, PADDLE_SETTLE))
    load_before = os.getloadavg()[0]
    print(f"[throughput] load average before: {load_before:.2f}", file=sys.stderr)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    cells: list[Cell] = []
    calls: dict[tuple[str, str, int], Callable[[], None]] = {}
    macs: dict[str, int] = {}
    checks: dict[str, float] = {}
    try:
        if artefacts is not None:
            artefacts.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="dsnet-throughput-") as tmp, warnings.catch_warnings():
            workdir = artefacts or Path(tmp)
            warnings.simplefilter("ignore")  # exporters' and quantizer's chatter
            logging.disable(logging.WARNING)  # onnxruntime.quantization logs a line per weight it keeps per-tensor
            for name in [*models, *peers]:
                print(f"[throughput] building {name}", file=sys.stderr)
                paths = variants if name in models else peer_variants
                reference = None
                if "paddleclas" in paths and name in PADDLE_REFERENCES:
                    model, reference, checks[name] = build_paddle_pair(name, settings.size)
                else:
                    model = build_model(name)
                macs[name] = count_macs(model, (3, settings.size, settings.size))
                built = build_calls(name, model, paths, settings, workdir, reference)
                for (variant, batch), call in built.items():
                    cell = Cell(name, variant, batch)
                    if isinstance(call, str):
                        cell.error = call
                    else:
                        calls[(name, variant, batch)] = call
                    cells.append(cell)
            gemm = gemm_call(settings.gemm_size)
            gemm_seconds: list[float] = []
            by_key = {(c.model, c.variant, c.batch): c for c in cells}
            for repeat in range(settings.repeats):
                print(f"[throughput] round {repeat + 1}/{settings.repeats}", file=sys.stderr)
                gemm_seconds.append(time_call(gemm, settings))
                for key, call in calls.items():
                    by_key[key].seconds.append(time_call(call, settings))
    finally:
        logging.disable(logging.NOTSET)
        torch.set_num_threads(previous_threads)
    load_after = os.getloadavg()[0]
    result = Result(
        settings, macs, cells, gemm_seconds, (load_before, load_after), _versions(use_paddle, memory), checks
    )
    table = format_table(result, models, peers)
    print(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(table + "\n")
        samples = {
            "settings": settings.__dict__ | {"batches": list(settings.batches)},
            "gemm_seconds": gemm_seconds,
            "load": list(result.load),
            "macs": macs,
            "cells": [c.__dict__ for c in cells],
        }
        output.with_suffix(".json").write_text(strict_json(samples, indent=1) + "\n")
    return result, table


# ----------------------------------------------------------------------------------------------------------------------
# Table


def _figure(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def format_table(result: Result, models: Sequence[str], peers: Sequence[str]) -> str:
    """Markdown: a header saying how the figures were obtained, one row per model × path, the failures below."""
    s = result.settings
    versions = ", ".join(f"{k} {v}" for k, v in result.versions.items())
    header = (
        f"CPU inference throughput (img/s), {s.size} px, {s.threads} thread(s), fp32 except int8 ({versions}). "
        f"Median of {s.repeats} round-robin measurements ({s.warmup} warm-up call(s), then ≥ {s.min_time:g} s of "
        f"calls). GEMM probe: {s.gemm_size}² fp32 matmul at {result.gemm_flops / 1e9:.1f} GFLOP/s; "
        "% GEMM = 2 · MACs · img/s / GEMM FLOP/s. "
        f"Load average (1 min) before / after: {result.load[0]:.2f} / {result.load[1]:.2f}."
    )
    if result.checks:
        header += (
            " paddleclas: the PaddleClas reference with our model's weights (max |logit difference| at batch 2: "
            + ", ".join(f"{name} {diff:.1e}" for name, diff in result.checks.items())
            + ")."
        )
    last = s.batches[-1]
    columns = ["model", "group", "path", "GMACs"]
    columns += [f"img/s b{b}" for b in s.batches] + [f"% GEMM b{b}" for b in s.batches] + [f"× eager b{last}"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    failures = []
    for name in [*models, *peers]:
        group = "ours" if name in models else "peer"
        variants = [c.variant for c in result.cells if c.model == name and c.batch == s.batches[0]]
        eager = next((c for c in result.cells if (c.model, c.variant, c.batch) == (name, "eager", last)), None)
        for variant in variants:
            row = [result.cell(name, variant, b) for b in s.batches]
            ratio = None
            if eager is not None and eager.images_per_second and row[-1].images_per_second:
                ratio = row[-1].images_per_second / eager.images_per_second
            cells = [name, group, variant, f"{result.macs[name] / 1e9:.2f}"]
            cells += [_figure(c.images_per_second) for c in row]
            cells += [_figure(result.gemm_share(c), 0) for c in row]
            cells.append(_figure(ratio, 2))
            lines.append("| " + " | ".join(cells) + " |")
            if row[0].error:
                failures.append(f"- {name} {variant}: {row[0].error}")
    if failures:
        lines += ["", "Paths that could not run (—):", *failures]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(OURS), help="our models (default: %(default)s)")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), help="timm peers (default: %(default)s)")
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS, help="paths of our models")
    parser.add_argument("--peer-variants", nargs="*", default=None, choices=VARIANTS, help="paths of the peers")
    parser.add_argument("--compile", action="store_true", help="add torch.compile to both lists of paths")
    parser.add_argument("--paddle", action="store_true", help="add the PaddleClas reference path (DS-Net models)")
    parser.add_argument("--batches", nargs="+", type=int, default=list(Settings.batches))
    parser.add_argument("--size", type=int, default=Settings.size, help="input size in px (%(default)s)")
    parser.add_argument("--threads", type=int, default=Settings.threads, help="CPU threads (%(default)s)")
    parser.add_argument("--repeats", type=int, default=Settings.repeats, help="round-robin repeats (%(default)s)")
    parser.add_argument("--warmup", type=int, default=Settings.warmup, help="untimed calls per measurement")
    parser.add_argument("--min-time", type=float, default=Settings.min_time, help="timed seconds per measurement")
    parser.add_argument("--settle", type=float, default=Settings.settle, help="idle seconds before each measurement")
    parser.add_argument("--gemm-size", type=int, default=Settings.gemm_size, help="GEMM probe side (%(default)s)")
    parser.add_argument("--output", type=Path, default=RESULTS / "throughput.md")
    parser.add_argument("--artefacts", type=Path, default=None, help="keep (and reuse) the ONNX/int8 files here")
    parser.add_argument(
        "--malloc",
        choices=MEMORY_MODES,
        default="hugepages",
        help="CPU allocator, as DSNET_MALLOC of the dsnet command: hugepages (default), retain (also keep freed "
        "memory; the process keeps its peak), libc (the C library's own behaviour)",
    )
    args = parser.parse_args(argv)
    if min(args.batches) < 1 or args.repeats < 1 or args.threads < 1 or args.size < 32:
        parser.error("batches, repeats and threads must be positive and --size at least 32")

    variants = list(args.variants or DEFAULT_VARIANTS)
    peer_variants = list(DEFAULT_PEER_VARIANTS if args.peer_variants is None else args.peer_variants)
    if args.compile:
        variants += [] if "compile" in variants else ["compile"]
        peer_variants += [] if "compile" in peer_variants else ["compile"]
    if args.paddle and "paddleclas" not in variants:
        variants.append("paddleclas")
    memory = configure_memory(args.malloc)  # before the first tensor: torch reads its huge page switch once
    settings = replace(
        Settings(),
        batches=tuple(args.batches),
        size=args.size,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        min_time=args.min_time,
        settle=args.settle,
        gemm_size=args.gemm_size,
    )
    run(args.models, args.peers, settings, variants, peer_variants, args.output, args.artefacts, memory)


if __name__ == "__main__":
    main()
