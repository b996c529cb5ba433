"""Core performance figures for benchmarks/RESULTS.md (issue 2).

For 10,000 val + 10,000 test rows at C = 10 and C = 100:
  * temperature-scaling fit time (target <= 20 ms at C = 100);
  * prediction-store write and read throughput (MB/s of logits), float32 and float16;
  * the reporter's per-epoch overhead beyond the forward passes it must make (base and SWA
    model over val and test, plus SWA's BatchNorm pass), for a CIFAR-shaped CNN and an MLP
    (target <= 10% of those passes).

Run: .venv/bin/python benchmarks/core.py [ts] [store] [reporter]   (prints markdown tables;
times are medians; all three sections when none is named)
"""

from __future__ import annotations

import functools
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from posthoc_tune import PostHocReporter, PredictionStore, TemperatureScaler, WeightAverager
from posthoc_tune.keys import CHECKPOINT_WINDOW, TRIAL_TRANSFORMS, parse_transform
from posthoc_tune.reporter import _EvalSplit
from posthoc_tune.store import Dtype

N = 10_000


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synthetic(n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=(N, n_classes)).astype(np.float32)
    p = np.exp(z / 2.0)
    p /= p.sum(axis=1, keepdims=True)
    y = (p.cumsum(axis=1) < rng.random((N, 1))).sum(axis=1).clip(0, n_classes - 1)
    return z, y


def bench_ts() -> None:
    print("\n### Temperature scaling fit, 10,000 rows\n")
    print("| C | fit time (ms) | Newton iterations | fitted T (true 2.0) |")
    print("|---|---|---|---|")
    for c in (10, 100):
        z, y = synthetic(c)
        scaler = TemperatureScaler()
        t = median_s(functools.partial(scaler.fit, z, y), repeats=20)
        print(f"| {c} | {t * 1e3:.1f} | {scaler.n_iter_} | {scaler.temperature_:.3f} |")


def _epoch_writer(
    store: PredictionStore, parts: dict[tuple[str, str], np.ndarray]
) -> Callable[[], None]:
    """Each call writes the next epoch (so every write publishes a new file)."""
    epochs = itertools.count(1)
    return lambda: store.write_epoch("t", next(epochs), parts)


def bench_store() -> None:
    print("\n### Prediction store, one epoch = val+test x base+swa = 40,000 rows of logits\n")
    print("| C | dtype | logits MB | file MB | write MB/s | read epoch MB/s | read one part MB/s |")
    print("|---|---|---|---|---|---|---|")
    for c in (10, 100):
        parts = {
            (s, v): synthetic(c, seed=i)[0]
            for i, (s, v) in enumerate((s, v) for s in ("val", "test") for v in ("base", "swa"))
        }
        mb = sum(a.nbytes for a in parts.values()) / 1e6
        dtypes: tuple[Dtype, ...] = ("float32", "float16")
        for dtype in dtypes:
            with tempfile.TemporaryDirectory() as d:
                store = PredictionStore.open(d, dtype=dtype)
                w = median_s(_epoch_writer(store, parts), 7)
                r = median_s(functools.partial(store.read_epoch, "t", 1), 7)
                r1 = median_s(functools.partial(store.read, "t", 1, "val", "swa"), 7)
                size = os.path.getsize(f"{store.root}/logits/t/epoch_000001.parquet")
            print(
                f"| {c} | {dtype} | {mb:.1f} | {size / 1e6:.1f} | {mb / w:.0f} | {mb / r:.0f} "
                f"| {mb / 4 / r1:.0f} |"
            )


def cnn(n_classes: int) -> torch.nn.Module:
    """A small CIFAR-shaped CNN with BatchNorm (32x32x3 inputs, 16-32-64 channels)."""

    def block(i: int, o: int) -> list[torch.nn.Module]:
        return [torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]

    return torch.nn.Sequential(
        *block(3, 16),
        torch.nn.MaxPool2d(2),
        *block(16, 32),
        torch.nn.MaxPool2d(2),
        *block(32, 64),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, n_classes),
    )


def mlp(n_classes: int) -> torch.nn.Module:
    """A 3x1024 BatchNorm MLP on 784 inputs (a tabular / MNIST-sized model)."""
    layers: list[torch.nn.Module] = []
    width_in = 784
    for _ in range(3):
        layers += [torch.nn.Linear(width_in, 1024), torch.nn.BatchNorm1d(1024), torch.nn.ReLU()]
        width_in = 1024
    return torch.nn.Sequential(*layers, torch.nn.Linear(1024, n_classes))


class _PassTimer:
    """Wraps the forward passes the reporter must make, to time them inside one step()."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._originals = (_EvalSplit.predict, WeightAverager.update_bn)

    def __enter__(self) -> _PassTimer:
        predict, update_bn = self._originals

        def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any) -> Any:
                start = time.perf_counter()
                try:
                    return fn(*args)
                finally:
                    self.seconds += time.perf_counter() - start

            return wrapper

        _EvalSplit.predict = timed(predict)  # type: ignore[method-assign]
        WeightAverager.update_bn = timed(update_bn)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        _EvalSplit.predict, WeightAverager.update_bn = self._originals  # type: ignore[method-assign]


PAPER = ["base", "ts", "swa", "swa+ts"]  # what the reporter computed before checkpoint ensembles


def _overhead(
    model: torch.nn.Module, data: dict[str, Any], transforms: list[str], epochs: int
) -> tuple[float, float]:
    """Median forward-pass and overhead seconds of ``step()`` once every window is full."""
    passes, overheads = [], []
    with tempfile.TemporaryDirectory() as d:
        reporter = PostHocReporter(
            model, {"seed": 0}, store=d, eval_batch_size=1000, transforms=transforms, **data
        )
        for _ in range(max(parse_transform(t).window for t in transforms) - 1 or 1):
            reporter.step()  # warm-up: labels write, allocations, full checkpoint windows
        for _ in range(epochs):
            with _PassTimer() as timer:
                start = time.perf_counter()
                reporter.step()
                total = time.perf_counter() - start
            passes.append(timer.seconds)
            overheads.append(total - timer.seconds)
    return statistics.median(passes), statistics.median(overheads)


def bench_reporter(epochs: int = 3) -> None:
    print("\n### Reporter per-epoch overhead, 10,000 val + 10,000 test rows\n")
    print(
        "Forward passes = base and SWA model over val and test, plus SWA's BatchNorm pass over "
        "val; overhead = the rest of step() (SWA update, 2 TS fits, the transforms' metrics, "
        f"store write), both timed inside the same step() call; medians over {epochs} epochs. "
        f"Transforms: {', '.join(PAPER)} (32 metrics), or all of {', '.join(TRIAL_TRANSFORMS)} "
        f"(64 metrics, the checkpoint windows full: {CHECKPOINT_WINDOW} epochs), timed on the "
        "MLP only (the overhead depends on N and C, not on the model).\n"
    )
    print(
        "| model | C | forward passes (s) | overhead, 4 transforms (s) | ratio | "
        "overhead, 8 transforms (s) | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for name, build, shape in (("CNN 32x32x3", cnn, (3, 32, 32)), ("MLP 3x1024", mlp, (784,))):
        for c in (10, 100):
            model = build(c)
            x_val, x_test = torch.randn(N, *shape), torch.randn(N, *shape)
            y_val, y_test = torch.randint(0, c, (N,)), torch.randint(0, c, (N,))
            data: dict[str, Any] = {"val": (x_val, y_val), "test": (x_test, y_test)}
            fwd, lean = _overhead(model, data, PAPER, epochs)
            full = "-", "-"
            if name.startswith("MLP"):
                extra = _overhead(model, data, list(TRIAL_TRANSFORMS), epochs)[1]
                full = f"{extra:.3f}", f"{extra / fwd:.1%}"
            print(
                f"| {name} | {c} | {fwd:.3f} | {lean:.3f} | {lean / fwd:.1%} | {' | '.join(full)} |"
            )


SECTIONS = {"ts": bench_ts, "store": bench_store, "reporter": bench_reporter}

if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for section in sys.argv[1:] or SECTIONS:
        SECTIONS[section]()
