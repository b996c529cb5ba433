"""Greedy ensemble selection (``posthoc_tune.greedy_ensemble``): its cost at scale, and how
much of its val gain over the seed ensemble survives on test.

Sections:

  scale    a synthetic store of 200 trials x 50 epochs (C = 10, 5,000 val + 5,000 test rows,
           base and SWA variants with recorded temperatures, ~8 GB float32) under ``--root``;
           ``greedy_ensemble(store)`` (defaults: posthoc flavour, nll, size 20, pool 5,
           1,000 candidates at most) timed on the first 50, 100 and 200 trials at 50 epochs
           and on 200 trials at 25 epochs (``--trials`` / ``--epochs`` scale these; a view
           of the same store that lists only those trials / epochs), each in a fresh
           subprocess: wall time, the time spent in its phases, and the process's peak RSS
           (``ru_maxrss``) before and after the call.
  overfit  three stored experiments (the checkpoint benchmark's full grids on MNIST-1D and
           digits, and the demo's run): the best single configuration (``swa+ts``), the best
           seed ensemble (``swa+ens+ts``), greedy naive and greedy post-hoc; val and test nll,
           test error, and the greedy rows' gains over the seed ensemble on val and on test
           (val gain minus test gain: how much of the selection's val gain is overfit).

Synthetic logits (``scale``): per configuration a signal strength s and an overconfidence
rate, per epoch a learning curve g(e) and a scale k(e) growing with e; ``logits = k(e) * (s *
g(e) * onehot(y) + shared + 0.6 trial + 0.4 epoch)``, each noise standard-normal float32
(``shared``: the same for every trial, as real models share their hard rows; SWA: a better
curve, half the epoch noise). Single models reach val nll ~0.1-1.4 after TS. The
recorded temperatures are real fits, ``TemperatureScaler().fit`` on the first 1,000 val rows
of each (trial, epoch, variant) (a fit on all 5,000 rows took ~75 ms on the shared, loaded
2-core machine: 20,000 fits would dominate the generation, ~6 minutes for 200 x 50).

Run: .venv/bin/python benchmarks/greedy.py [scale] [overfit]   (both when none is named)
     scale:   [--root DIR] [--reuse] [--keep] [--generate-only] [--cold] [--threads N]
              [--trials 200] [--epochs 50]
              (--root defaults to a new folder under /tmp; the store is deleted at the end
              unless --keep; --reuse times an existing store under --root without
              generating it (then --trials / --epochs must match it); --cold
              evicts the store's files from the page cache before each timing; --threads
              sets torch's threads in the timed processes)
     overfit: [--grids /tmp/ckpt_bench] [--demo PATH]
(prints markdown; a timing alone: ``greedy.py scale --root DIR --reuse --measure T E``
prints one JSON line for the first T trials at their first E epochs)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import pandas as pd
import torch

import posthoc_tune.greedy as greedy_module
from posthoc_tune import PredictionStore, TemperatureScaler
from posthoc_tune.curves import configurations
from posthoc_tune.greedy import GreedyEnsemble, greedy_ensemble
from posthoc_tune.groups import flatten_config
from posthoc_tune.selection import leaderboard, open_store, selection_table

C = 10
N = 5_000
SEEDS = 4  # trials per configuration
TS_ROWS = 1_000  # val rows the recorded temperatures are fit on
GRIDS = "/tmp/ckpt_bench"
DEMOS = [
    "/tmp/fresh_demo/demo_output/ray_results/demo",
    "/tmp/fresh_demo2/demo_output/ray_results/demo",
]
DEMO_RUN = "/tmp/greedy_demo"  # where the demo is run when none of DEMOS holds a store


# -- scale: the synthetic store ------------------------------------------------------------


def generate(root: Path, trials: int, epochs: int) -> float:
    """Write the synthetic experiment under ``root``; returns the seconds it took."""
    start = time.perf_counter()
    torch.set_num_threads(1)  # small fits: threads only contend (the timings run elsewhere)
    store = PredictionStore.open(root)
    rng = np.random.default_rng(0)
    labels = {split: rng.integers(0, C, N) for split in ("val", "test")}
    onehot = {split: np.eye(C, dtype=np.float32)[y] for split, y in labels.items()}
    for split, y in labels.items():
        store.write_labels(split, y)
    shared = {s: rng.standard_normal((N, C), dtype=np.float32) for s in labels}
    scaler = TemperatureScaler()
    for t in range(trials):
        config_rng = np.random.default_rng(1_000 + t // SEEDS)  # shared by a config's seeds
        strength = config_rng.uniform(2.0, 4.0)
        overconfidence = config_rng.uniform(0.0, 2.0)
        config = {"lr": float(10 ** config_rng.uniform(-3, 0)), "width": 64, "seed": t % SEEDS}
        trial_id = f"t{t:04d}"
        store.write_metadata(trial_id, config)
        strength *= rng.uniform(0.9, 1.1)  # the seed's own luck
        trial_noise = {
            s: shared[s] + np.float32(0.6) * rng.standard_normal((N, C), dtype=np.float32)
            for s in labels
        }
        for epoch in range(1, epochs + 1):
            learned = 1.0 - math.exp(-epoch / 8)
            scale = np.float32(1.0 + overconfidence * epoch / epochs)
            logits = {}
            for variant, curve, noise in (("base", learned, 0.4), ("swa", learned**0.7, 0.2)):
                signal = np.float32(strength * curve)
                for split in labels:
                    epoch_noise = rng.standard_normal((N, C), dtype=np.float32)
                    epoch_noise *= np.float32(noise)
                    epoch_noise += trial_noise[split]
                    epoch_noise += signal * onehot[split]
                    epoch_noise *= scale
                    logits[(split, variant)] = epoch_noise
            temperatures = {
                v: scaler.fit(logits[("val", v)][:TS_ROWS], labels["val"][:TS_ROWS]).temperature_
                for v in ("base", "swa")
            }
            store.write_epoch(trial_id, epoch, logits, temperatures)
        if (t + 1) % 10 == 0:
            elapsed = time.perf_counter() - start
            print(f"generated {t + 1}/{trials} trials in {elapsed:.0f} s", file=sys.stderr)
    return time.perf_counter() - start


class _View(PredictionStore):
    """A store that lists only its first ``keep_trials`` trials and their first
    ``max_epoch`` epochs: a smaller experiment, read from the same files."""

    keep_trials: int = 0
    max_epoch: int = 0

    def trials(self) -> list[str]:
        return super().trials()[: self.keep_trials]

    def epochs(self, trial_id: str) -> list[int]:
        return [e for e in super().epochs(trial_id) if e <= self.max_epoch]


def _timed(
    fn: Callable[..., Any], totals: dict[str, float], name: str, calls: dict[str, int]
) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
            calls[name] = calls.get(name, 0) + 1

    return wrapper


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(root: Path, trials: int, epochs: int) -> dict[str, Any]:
    """Time one ``greedy_ensemble`` call on a view of the store (run in a fresh process)."""
    opened = PredictionStore.open(root, must_exist=True)
    store = _View(opened.filesystem, opened.experiment_path)
    store.keep_trials, store.max_epoch = trials, epochs
    listed = store.trials()
    n_epochs = sum(len(store.epochs(t)) for t in listed)
    for split in ("val", "test"):
        store.labels(split)  # read (and cached) before the memory baseline
    # Phases: the streaming pool pass (reading + each candidate's own objective + the rest),
    # the selection loop, and the final scoring of the picked members.
    totals: dict[str, float] = {}
    calls: dict[str, int] = {}
    read_split = store.read_split
    store.read_split = _timed(read_split, totals, "read", calls)  # type: ignore[method-assign]
    for name, attr in (
        ("pool", "_posthoc_pool"),
        ("own", "_own_objective"),
        ("select", "_select"),
        ("members", "_read_members"),
        ("score", "score"),
    ):
        setattr(greedy_module, attr, _timed(getattr(greedy_module, attr), totals, name, calls))
    before = _maxrss_mb()
    start = time.perf_counter()
    result = greedy_ensemble(store)
    wall = time.perf_counter() - start
    after = _maxrss_mb()
    return {
        "trials": len(listed),
        "epochs": epochs,
        "stored_epochs": n_epochs,
        "wall_s": wall,
        "rss_before_mb": before,
        "rss_peak_mb": after,
        "candidates": result.n_candidates,
        "members": len(result.members),
        "val_nll": result.value("val", "nll"),
        "phases": totals,
        "calls": calls,
    }


def _evict(root: Path) -> None:
    """Drop the store's files (only those) from the page cache."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _disk_gb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e9


def bench_scale(args: argparse.Namespace) -> None:
    if args.measure:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps({**measure(args.root, *args.measure), "threads": torch.get_num_threads()}))
        return
    root: Path = args.root or Path(tempfile.mkdtemp(prefix="greedy_scale_", dir="/tmp"))
    root = root.resolve()
    print(f"\n### Greedy ensemble at scale: {args.trials} trials x {args.epochs} epochs\n")
    free = shutil.disk_usage(root.parent if not root.exists() else root).free / 1e9
    if args.reuse and (root / "posthoc").exists():
        print(f"Reusing the store at `{root}` ({_disk_gb(root):.2f} GB).\n")
    else:
        need = args.trials * args.epochs * 4 * N * C * 4 / 1e9
        if need > free - 5:
            raise SystemExit(f"{need:.1f} GB needed, {free:.1f} GB free under {root.parent}")
        seconds = generate(root, args.trials, args.epochs)
        print(
            f"Generated `{root}`: {_disk_gb(root):.2f} GB in {seconds:.0f} s ({free:.0f} GB "
            "free before).\n"
        )
    if args.generate_only:
        return
    rows = []
    t, e = args.trials, args.epochs  # timed: a quarter, half and all trials; half the epochs
    sizes = [(max(1, t // 4), e), (max(1, t // 2), e), (t, e), (t, max(1, e // 2))]
    for trials, epochs in sizes:
        if args.cold:
            _evict(root)
        command = [sys.executable, __file__, "scale", "--root", str(root), "--reuse"]
        command += ["--measure", str(trials), str(epochs)]
        command += ["--threads", str(args.threads)] if args.threads else []
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        p = r["phases"]
        rows.append(
            {
                "trials": r["trials"],
                "epochs": r["epochs"],
                "stored models": 2 * r["stored_epochs"],
                "candidates": r["candidates"],
                "wall (s)": r["wall_s"],
                "pool pass (s)": p.get("pool", math.nan),
                "of which read (s)": p.get("read", math.nan),
                "of which own objective (s)": p.get("own", math.nan),
                "selection (s)": p.get("select", math.nan),
                "final (s)": p.get("members", 0.0) + p.get("score", 0.0),
                "RSS before (MB)": r["rss_before_mb"],
                "peak RSS (MB)": r["rss_peak_mb"],
                "growth (MB)": r["rss_peak_mb"] - r["rss_before_mb"],
            }
        )
        print(f"timed {trials} x {epochs}: {r['wall_s']:.1f} s", file=sys.stderr)
    cache = "cold (the store's files evicted before each run)" if args.cold else "warm"
    print(
        f"`greedy_ensemble(store)` with its defaults, each in a fresh process with "
        f"{r['threads']} torch threads ({os.cpu_count()} CPUs); page cache: {cache}. Stored "
        "models: (trial, epoch, variant) triples scanned; pool pass: the streaming scan "
        "(reading val logits, each candidate's own objective, the per-trial heap); final: "
        "reading the picked members' val + test logits and scoring `ens+ts`; RSS before: "
        "after imports and the labels, growth: peak minus that.\n"
    )
    frame = pd.DataFrame(rows)
    print(frame.to_markdown(index=False, floatfmt=[".0f"] * 4 + [".1f"] * (frame.shape[1] - 4)))
    if args.keep:
        print(f"\nKept `{root}`.")
    else:
        shutil.rmtree(root)
        print(f"\nDeleted `{root}`.")


# -- overfit: val gain vs test gain on stored experiments ---------------------------------


def _demo_path(given: Path | None) -> Path:
    if given is not None:
        return given
    for candidate in DEMOS:
        if (Path(candidate) / "posthoc").is_dir():
            return Path(candidate)
    path = Path(DEMO_RUN) / "ray_results" / "demo"
    if not (path / "posthoc").is_dir():
        exe = Path(sys.executable).parent / "posthoc-tune"
        command = [str(exe), "demo", "--storage", str(Path(DEMO_RUN) / "ray_results")]
        command += ["--out", str(Path(DEMO_RUN) / "out"), "--no-plots"]
        subprocess.run(command, check=True, cwd="/tmp")
    return path


def _composition(path: Path, g: GreedyEnsemble) -> dict[str, Any]:
    store = open_store(str(path))
    groups = {store.metadata(t)["group"] for t in g.members["trial_id"]}
    kept = int(np.argmin(g.history)) + 1
    return {
        "members": len(g.members),
        "picks kept": kept,
        "configs": len(groups),
        "trials": g.members["trial_id"].nunique(),
        "epochs": g.members["epoch"].nunique(),
        "variants": ",".join(sorted(set(g.members["variant"]))),
        "candidates": g.n_candidates,
    }


def _shown(config: dict[str, Any], varying: list[str]) -> str:
    return " ".join(
        f"{k}={config[k]:.3g}" if isinstance(config[k], float) else f"{k}={config[k]}"
        for k in varying
    )


def _chosen(row: pd.Series, board: pd.DataFrame, varying: list[str]) -> str:
    """The table row's configuration (its varying keys) and epochs; the leaderboard's best
    configuration too when it is another one."""
    config = flatten_config(json.loads(row["posthoc/config"]))
    epochs = ",".join(str(e) for e in row["posthoc/epoch"])
    text = f"{_shown(config, varying)} @ {epochs}"
    best = {k: board.loc[0, f"config/{k}"] for k in varying}
    if any(best[k] != config[k] for k in varying):
        text += f" (leaderboard's best: {_shown(best, varying)} @ {board.loc[0, 'epoch']})"
    return text


def overfit_table(name: str, path: Path) -> None:
    store = open_store(str(path))
    n_trials = len(store.trials())
    configs = [flatten_config(c) for _, c in configurations(store).values()]
    varying = [k for k in configs[0] if len({json.dumps(c.get(k)) for c in configs}) > 1]
    start = time.perf_counter()
    single_lb = leaderboard(str(path), "val/swa+ts/nll")
    ens_lb = leaderboard(str(path), "val/swa+ens+ts/nll")
    table = selection_table(
        str(path), transforms=["swa+ts", "swa+ens+ts"], over="configs+epochs", progress=False
    )
    tables_s = time.perf_counter() - start
    results: dict[str, tuple[GreedyEnsemble, float]] = {}
    for flavour in ("naive", "posthoc"):
        start = time.perf_counter()
        results[flavour] = (greedy_ensemble(str(path), flavour=flavour), 0.0)
        results[flavour] = (results[flavour][0], time.perf_counter() - start)
    ens_val = float(ens_lb.loc[0, "val/swa+ens+ts/nll"])
    ens_test = float(table.loc["swa+ens+ts", "posthoc/test/nll"])
    ens_error = float(table.loc["swa+ens+ts", "posthoc/test/error"])
    rows: list[dict[str, Any]] = [
        {
            "model": "best single config (swa+ts)",
            "val nll": float(single_lb.loc[0, "val/swa+ts/nll"]),
            "test nll": float(table.loc["swa+ts", "posthoc/test/nll"]),
            "test error": float(table.loc["swa+ts", "posthoc/test/error"]),
            "selected": _chosen(table.loc["swa+ts"], single_lb, varying),
        },
        {
            "model": "best seed ensemble (swa+ens+ts)",
            "val nll": ens_val,
            "test nll": ens_test,
            "test error": ens_error,
            "selected": _chosen(table.loc["swa+ens+ts"], ens_lb, varying),
        },
    ]
    compositions = []
    for flavour, (g, seconds) in results.items():
        val, test = g.value("val", "nll"), g.value("test", "nll")
        rows.append(
            {
                "model": f"greedy {flavour}",
                "val nll": val,
                "test nll": test,
                "test error": g.value("test", "error"),
                "val gain": ens_val - val,
                "test gain": ens_test - test,
                "val gain - test gain": (ens_val - val) - (ens_test - test),
                "test error gain": ens_error - g.value("test", "error"),
                "selected": f"{len(g.members)} members, T = {g.temperature:.3f}",
            }
        )
        compositions.append({"greedy": flavour, **_composition(path, g), "time (s)": seconds})
    print(f"\n### {name}: `{path}` ({n_trials} trials)\n")
    print(
        "Val nll: the leaderboard's best row (`val/swa+ts/nll`: the members' mean at the "
        "configuration's best common epoch; `val/swa+ens+ts/nll`), or the greedy ensemble's "
        "own (selected and temperature-scaled on val). Test nll / error: "
        '`selection_table(path, over="configs+epochs")` post-hoc rows (error selected by val '
        "error, as the table does), or the greedy ensemble's. Gains: the seed ensemble's value "
        f"minus the row's (positive: greedy is better). Tables in {tables_s:.0f} s.\n"
    )
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f"))
    print()
    print(pd.DataFrame(compositions).to_markdown(index=False, floatfmt=".1f"))
    for flavour, (g, _) in results.items():
        shown = [c for c in g.members.columns if c.startswith("config/") and c != "config/seed"]
        members = g.members[["trial_id", "epoch", "variant", "weight", "temperature", *shown]]
        varying = [c for c in shown if members[c].nunique() > 1]
        members = members.drop(columns=[c for c in shown if c not in varying])
        print(f"\nGreedy {flavour} members (history: {_history(g.history)}):\n")
        print(members.to_markdown(index=False, floatfmt=".4g"))
    sys.stdout.flush()


def _history(history: list[float]) -> str:
    return " ".join(f"{v:.4f}" for v in history)


def bench_overfit(args: argparse.Namespace) -> None:
    experiments = {
        "MNIST-1D grid": args.grids / "grid_mnist1d",
        "digits grid": args.grids / "grid_digits",
        "demo": _demo_path(args.demo),
    }
    for name, path in experiments.items():
        overfit_table(name, path)


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {
    "scale": bench_scale,
    "overfit": bench_overfit,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sections", nargs="*", help=f"any of {list(SECTIONS)} (default: all)")
    parser.add_argument("--root", type=Path, default=None, help="the synthetic store's folder")
    parser.add_argument("--reuse", action="store_true", help="time an existing store")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic store")
    parser.add_argument("--generate-only", action="store_true", help="write the store, keep it")
    parser.add_argument("--cold", action="store_true", help="evict the store before each run")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--measure", type=int, nargs=2, metavar=("TRIALS", "EPOCHS"))
    parser.add_argument("--grids", type=Path, default=Path(GRIDS))
    parser.add_argument("--demo", type=Path, default=None, help="the demo's experiment path")
    args = parser.parse_args()
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; expected any of {list(SECTIONS)}")
    if args.measure and args.root is None:
        parser.error("--measure needs --root")
    for section in args.sections or list(SECTIONS):
        SECTIONS[section](args)


if __name__ == "__main__":
    main()
