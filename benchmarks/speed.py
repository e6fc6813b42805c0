"""CPU speed of our models against the reference code that defines the released weights, side by side in one run.

Each of our models is paired with the PaddleClas model its weights come from (``dsnet_tiny`` ↔ ``DSNet_tiny`` …,
paddleclas 2.6.0 loaded by path through :mod:`dsnet.convert._paddle_reference`). The reference gets random weights
of realistic scale (activations of order 1, as in the parity test; its own initialisation gives logits of order
1e7) and our model gets *the same weights* through the real converter
(:func:`dsnet.convert.dsnet_reference.reference_to_dsnet`), so both time the same function; the largest logit
difference at batch 2 is printed as a check. MixFormer has no counterpart here: paddleclas 2.6.0 ships no MixFormer
(the official code is PaddleClas PR #1820, unreleased) and the test suite loads none.

Measured, fp32, at ``--size`` px (default 224):

* eval forward throughput at ``--batch`` (img/s; ``torch.no_grad`` / ``paddle.no_grad``, eval mode);
* eval latency at batch 1 (ms);
* one train step at ``--batch``: forward, cross-entropy, backward, gradients released (no optimizer step), train
  mode, drop path 0.1 in both (the reference's default).

Timing: each measurement is ``--warmup`` untimed calls then ``--iters`` timed calls (time per call); the measurements
of ours, ours in ``channels_last`` and the reference are interleaved, ``--repeats`` times, and the median is kept.
Before each measurement the machine idles ``--settle`` seconds: Paddle's Intel OpenMP runtime keeps its workers
spinning for 200 ms after a parallel region (``KMP_BLOCKTIME``) and would otherwise steal the cores PyTorch's GNU
OpenMP runtime is about to use.

Threads: the same count for both frameworks (``--threads``, default all cores): ``torch.set_num_threads(n)`` and
Paddle's ``core.set_num_threads(n)`` (its MKL/OpenMP threads; Paddle starts with 1 whatever ``OMP_NUM_THREADS``
says). ``OMP_NUM_THREADS`` is also set to n while the libraries load; ``os.environ`` is otherwise left as it was.
Paddle runs with its default dygraph flags (``FLAGS_use_mkldnn`` off), as PaddleClas runs it.

Results: ``benchmarks/results/speed.md`` (markdown table, also printed)::

    python benchmarks/speed.py                       # dsnet_tiny and dsnet_small, a few minutes on 2 cores
    python benchmarks/speed.py --quick               # smoke run, seconds
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: our model → the PaddleClas builder of the same network
REFERENCES = {"dsnet_tiny": "DSNet_tiny", "dsnet_small": "DSNet_small", "dsnet_base": "DSNet_base"}
DEFAULT_MODELS = ("dsnet_tiny", "dsnet_small")
DROP_PATH_RATE = 0.1  # the reference's default; only active in the train step


@dataclass(frozen=True)
class Settings:
    """What one run measures and how."""

    batch: int = 8  # batch of the eval-throughput and train-step measurements
    size: int = 224  # square input size (px)
    threads: int = 2  # CPU threads, for both frameworks
    repeats: int = 5  # interleaved measurements per column; the median is reported
    warmup: int = 2  # untimed calls before each measurement
    iters: int = 3  # timed calls per measurement
    settle: float = 0.3  # idle seconds before each measurement (OpenMP spin-down)
    channels_last: bool = True  # also measure our model in torch.channels_last


#: smoke run; 128 px is the smallest size at which the reference and ours compute the same function (below it some
#: stage's global grid is 1 pixel, where Paddle's bilinear resize takes the corner pixel and PyTorch's the centre)
QUICK = Settings(batch=2, size=128, repeats=2, warmup=1, iters=1, settle=0.0)


@dataclass(frozen=True)
class Row:
    """One measure of one model: median figures per column, ``ratio`` = ours / ref of those figures."""

    model: str
    reference: str
    measure: str  # "eval b8", ...
    unit: str  # "img/s" (higher is faster) or "ms" (lower is faster)
    ours: float
    ref: float
    ours_cl: float | None  # ours in channels_last, None when not measured
    samples: dict[str, list[float]]  # column → every measurement (seconds per call)

    @property
    def ratio(self) -> float:
        return self.ours / self.ref

    @property
    def ratio_cl(self) -> float | None:
        return None if self.ours_cl is None else self.ours_cl / self.ref


def setup_threads(threads: int) -> Any:
    """The same thread count for PyTorch and Paddle; returns the paddle module (imported with the env kept)."""
    from dsnet.convert._paddle_reference import import_paddle, set_paddle_threads

    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the OpenMP runtimes when paddle loads them
    try:
        paddle = import_paddle()
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    torch.set_num_threads(threads)
    set_paddle_threads(threads)
    paddle.set_device("cpu")
    return paddle


def build_pair(name: str, size: int, seed: int = 0) -> tuple[torch.nn.Module, Any, float]:
    """Our model and the PaddleClas reference with the same weights, and their largest logit difference."""
    import timm

    import dsnet  # noqa: F401  (registers our models)
    from dsnet.convert._paddle_reference import (
        import_paddle,
        load_reference_dsnet,
        randomize_reference,
        set_reference_input_size,
    )
    from dsnet.convert.dsnet_reference import reference_to_dsnet

    if name not in REFERENCES:
        raise ValueError(f"no reference for {name!r}; choose from {sorted(REFERENCES)}")
    paddle = import_paddle()
    ref = getattr(load_reference_dsnet(), REFERENCES[name])(img_size=size, drop_path_rate=DROP_PATH_RATE)
    randomize_reference(ref, seed)
    set_reference_input_size(ref, size, size)
    ours = timm.create_model(name, drop_path_rate=DROP_PATH_RATE)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    ours.load_state_dict(reference_to_dsnet(state, layout="paddle"), strict=True)
    ours.eval()
    ref.eval()
    x = np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad(), paddle.no_grad():
        diff = np.abs(ours(torch.from_numpy(x)).numpy() - ref(paddle.to_tensor(x)).numpy()).max()
    return ours, ref, float(diff)


def torch_steps(model: torch.nn.Module, batch: int, size: int, channels_last: bool) -> dict[str, Callable[[], None]]:
    """One call per measure for our model (the input, labels and memory format are prepared outside the call)."""
    x1, xb = torch.randn(1, 3, size, size), torch.randn(batch, 3, size, size)
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x1, xb = (t.contiguous(memory_format=torch.channels_last) for t in (x1, xb))
    labels = torch.randint(0, 1000, (batch,))

    def infer(x: torch.Tensor) -> Callable[[], None]:
        def step() -> None:
            model.eval()
            with torch.no_grad():
                model(x).numpy()

        return step

    def train() -> None:
        model.train()
        F.cross_entropy(model(xb), labels).backward()
        model.zero_grad(set_to_none=True)

    return {"eval": infer(xb), "latency": infer(x1), "train": train}


def paddle_steps(paddle: Any, model: Any, batch: int, size: int) -> dict[str, Callable[[], None]]:
    """The same calls for the Paddle reference."""
    rng = np.random.default_rng(0)
    x1 = paddle.to_tensor(rng.standard_normal((1, 3, size, size)).astype(np.float32))
    xb = paddle.to_tensor(rng.standard_normal((batch, 3, size, size)).astype(np.float32))
    labels = paddle.to_tensor(rng.integers(0, 1000, (batch,)).astype(np.int64))

    def infer(x: Any) -> Callable[[], None]:
        def step() -> None:
            model.eval()
            with paddle.no_grad():
                model(x).numpy()

        return step

    def train() -> None:
        model.train()
        paddle.nn.functional.cross_entropy(model(xb), labels).backward()
        model.clear_gradients(set_to_zero=False)

    return {"eval": infer(xb), "latency": infer(x1), "train": train}


def time_call(step: Callable[[], None], settings: Settings) -> float:
    """Seconds per call: ``settings.warmup`` untimed calls, then the mean of ``settings.iters`` timed ones."""
    if settings.settle:
        time.sleep(settings.settle)
    for _ in range(settings.warmup):
        step()
    start = time.perf_counter()
    for _ in range(settings.iters):
        step()
    return (time.perf_counter() - start) / settings.iters


def measure_pair(name: str, settings: Settings, paddle: Any) -> tuple[list[Row], float]:
    """Rows (eval, latency, train) for ``name`` against its reference, and the logit check of the pair."""
    ours, ref, diff = build_pair(name, settings.size)
    columns: dict[str, dict[str, Callable[[], None]]] = {
        "ours": torch_steps(ours, settings.batch, settings.size, channels_last=False),
        "ref": paddle_steps(paddle, ref, settings.batch, settings.size),
    }
    if settings.channels_last:
        columns["ours_cl"] = torch_steps(ours, settings.batch, settings.size, channels_last=True)
    rows = []
    for measure in ("eval", "latency", "train"):
        samples: dict[str, list[float]] = {column: [] for column in columns}
        for _ in range(settings.repeats):  # ours, ours_cl, ref, ours, ours_cl, ref, ...
            for column in ("ours", "ours_cl", "ref"):
                if column in columns:
                    samples[column].append(time_call(columns[column][measure], settings))
        median = {column: statistics.median(values) for column, values in samples.items()}
        if measure == "latency":
            unit, figure = "ms", {column: 1e3 * seconds for column, seconds in median.items()}
            label = "eval latency b1"
        else:
            unit, figure = "img/s", {column: settings.batch / seconds for column, seconds in median.items()}
            label = f"{measure} b{settings.batch}"
        rows.append(
            Row(name, REFERENCES[name], label, unit, figure["ours"], figure["ref"], figure.get("ours_cl"), samples)
        )
    return rows, diff


def format_table(rows: Sequence[Row], checks: dict[str, float], settings: Settings, load: Sequence[str] = ()) -> str:
    """Markdown table with a header that says how the figures were obtained."""
    header = (
        f"CPU speed, fp32, {settings.size} px, {settings.threads} thread(s) in both frameworks "
        f"(torch {torch.__version__}, paddle {_paddle_version()}); median of {settings.repeats} interleaved "
        f"measurements of {settings.iters} call(s) after {settings.warmup} warm-up call(s). "
        "ratio = ours / ref of the figure in the row: above 1 is faster for img/s, below 1 is faster for ms. "
        "Same weights in both (max |logit difference| at batch 2: "
        + ", ".join(f"{name} {diff:.1e}" for name, diff in checks.items())
        + f"). Load average before/after the run: {' / '.join(load)} (other processes skew the figures)."
    )
    cl = settings.channels_last
    lines = [
        header,
        "",
        "| model | reference (PaddleClas) | measure | ours | "
        + ("ours channels_last | " if cl else "")
        + "ref | ours / ref | "
        + ("ours channels_last / ref |" if cl else ""),
        "|---|---|---|---|---|---|" + ("---|---|" if cl else ""),
    ]
    for row in rows:
        cells = [row.model, row.reference, f"{row.measure} ({row.unit})", f"{row.ours:.1f}"]
        if cl:
            cells.append(f"{row.ours_cl:.1f}")
        cells += [f"{row.ref:.1f}", f"{row.ratio:.2f}"]
        if cl:
            cells.append(f"{row.ratio_cl:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paddle_version() -> str:
    from dsnet.convert._paddle_reference import import_paddle

    return import_paddle().__version__


def run(models: Sequence[str], settings: Settings, output: Path | None = RESULTS / "speed.md") -> tuple[list[Row], str]:
    """Measure every model against its reference; print the table and write it to ``output`` (unless None)."""
    load = [f"{os.getloadavg()[0]:.2f}"]
    paddle = setup_threads(settings.threads)
    rows: list[Row] = []
    checks: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="When training, we now always track global mean and variance")
        for name in models:
            pair_rows, checks[name] = measure_pair(name, settings, paddle)
            rows += pair_rows
    load.append(f"{os.getloadavg()[0]:.2f}")
    table = format_table(rows, checks, settings, load)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(table + "\n")
    print(table)
    return rows, table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help=f"ours, from {sorted(REFERENCES)}")
    parser.add_argument("--batch", type=int, default=None, help="batch of eval throughput and train step (8)")
    parser.add_argument("--size", type=int, default=None, help="input size in px (224)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both frameworks (all cores)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved measurements per column (5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before each measurement (2)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per measurement (3)")
    parser.add_argument("--settle", type=float, default=None, help="idle seconds before each measurement (0.3)")
    parser.add_argument("--no-channels-last", action="store_true", help="skip the channels_last column")
    parser.add_argument("--quick", action="store_true", help="smoke run: dsnet_tiny, 128 px, batch 2, 2 repeats")
    parser.add_argument("--output", type=Path, default=RESULTS / "speed.md")
    args = parser.parse_args(argv)

    base = QUICK if args.quick else Settings()
    given = {
        "batch": args.batch,
        "size": args.size,
        "threads": args.threads or len(os.sched_getaffinity(0)),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "iters": args.iters,
        "settle": args.settle,
    }
    settings = replace(base, **{k: v for k, v in given.items() if v is not None})
    if args.no_channels_last:
        settings = replace(settings, channels_last=False)
    models = args.models or (["dsnet_tiny"] if args.quick else list(DEFAULT_MODELS))
    run(models, settings, args.output)


if __name__ == "__main__":
    main()
