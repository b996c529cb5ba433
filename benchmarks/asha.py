"""PostHocASHA figures for benchmarks/RESULTS.md (issue 3).

* Ensemble evaluation at one rung: K = 8 members, N = 10,000 val rows, C = 100, from the
  prediction store (target <= 50 ms), split into store reads and arithmetic, with and without
  the member temperatures the reporter records.
* Per-result decision latency (p50, p99, max) over 1,000 trials of synthetic results:
  per-trial key (next to Ray's ASHAScheduler on the same stream) and group key (125 groups of
  8 seeds; ensembles from a real store of N = 1,000, C = 10 written as the trials "train",
  outside the timed calls).

Results are fed through the schedulers' hooks in the order Tune's controller calls them;
a minimal controller stands in for Tune's ``stop_trial``.

Run: .venv/bin/python benchmarks/asha.py   (prints markdown tables)
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

import posthoc_tune as pht
from posthoc_tune import (
    METRICS,
    EnsembleEvaluator,
    PostHocASHA,
    PostHocCallback,
    PredictionStore,
    TemperatureScaler,
    ensemble_metrics,
)
from posthoc_tune.transforms import apply_transform


def median_ms(fn: Callable[[], object], repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def members_like(
    rng: np.random.Generator, k: int, n: int, c: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Seeds of one configuration: a shared signal plus member noise; labels drawn from the
    signal at temperature 2 (so TS has work to do)."""
    signal = rng.normal(scale=3.0, size=(n, c))
    p = np.exp(signal / 2.0)
    p /= p.sum(axis=1, keepdims=True)
    y = (p.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1).clip(0, c - 1)
    members = [(signal + rng.normal(size=(n, c))).astype(np.float32) for _ in range(k)]
    return members, y


def bench_ensemble(k: int = 8, n: int = 10_000, c: int = 100) -> None:
    rng = np.random.default_rng(0)
    store = PredictionStore.open(tempfile.mkdtemp())
    val, y = members_like(rng, k, n, c)
    test, _ = members_like(rng, k, n, c)
    store.write_labels("val", y)
    store.write_labels("test", y)
    ids = [f"m{i}" for i in range(k)]
    for trial_id, z_val, z_test in zip(ids, val, test, strict=True):
        parts = {(s, v): z for s, z in (("val", z_val), ("test", z_test)) for v in ("base", "swa")}
        t = TemperatureScaler().fit(z_val, y).temperature_
        store.write_epoch(trial_id, 1, parts, {"swa": t})  # base: no recorded temperature

    with ThreadPoolExecutor(8) as pool:
        reads = median_ms(
            lambda: list(pool.map(lambda m: store.read_variant(m, 1, "swa", ["val"]), ids))
        )
    read = [store.read_variant(m, 1, "swa", ["val"]) for m in ids]
    logits = [p.logits["val"] for p in read]
    temps = [p.temperature for p in read]
    math_ms = median_ms(lambda: apply_transform("swa+ens+ts", logits, y, member_temperatures=temps))
    full = median_ms(lambda: ensemble_metrics(store, ids, 1, "swa+ens+ts", splits=["val"]))
    # As PostHocASHA runs it: each member's read starts in the background when the member
    # reaches the rung, so the judgement waits only for what is still unread (here: nothing).
    evaluator = EnsembleEvaluator(store, splits=["val"], persist=False)
    decision_ms = []
    for g in range(15):
        for m in ids:
            evaluator.prefetch(m, 1, "swa")
        time.sleep(0.3)  # the members' reads finish while other trials train
        start = time.perf_counter()
        evaluator.evaluate(f"g{g}", 1, ids, "swa+ens+ts")
        decision_ms.append(1e3 * (time.perf_counter() - start))
    at_rung = statistics.median(decision_ms)
    refit = median_ms(lambda: ensemble_metrics(store, ids, 1, "ens+ts", splits=["val"]))
    both = median_ms(lambda: ensemble_metrics(store, ids, 1, "swa+ens+ts"))
    print(f"\n### Ensemble evaluation at one rung: K = {k}, N = {n:,}, C = {c}\n")
    print("| what | median ms |\n|---|---|")
    print(f"| store reads, {k} members' val logits (8 threads) | {reads:.1f} |")
    print(f"| transform + combine + ensemble TS (recorded member T) | {math_ms:.1f} |")
    print(f"| `val/swa+ens+ts/*`, end to end, cold (recorded member T) | {full:.1f} |")
    print(f"| **`val/swa+ens+ts/*` at the rung decision, reads prefetched** | **{at_rung:.1f}** |")
    print(f"| `val/ens+ts/*`, end to end, member T refit | {refit:.1f} |")
    print(f"| `val` and `test` `swa+ens+ts/*`, end to end | {both:.1f} |")


class _Controller:
    """What Tune's controller does on ``stop_trial``: end the trial, tell the scheduler."""

    def __init__(self, scheduler: TrialScheduler) -> None:
        self.scheduler = scheduler
        self.last: dict[str, dict[str, Any]] = {}

    def stop_trial(self, trial: Trial) -> None:
        if trial.status == Trial.RUNNING:
            trial.status = Trial.TERMINATED
            last = self.last.get(trial.trial_id, {})
            self.scheduler.on_trial_complete(self, trial, last)  # type: ignore[arg-type]
        else:
            trial.status = Trial.TERMINATED
            self.scheduler.on_trial_remove(self, trial)  # type: ignore[arg-type]


def run_stream(
    scheduler: TrialScheduler,
    configs: list[dict[str, Any]],
    value: Callable[[int, int], float],
    max_t: int,
    in_flight: int,
    before_result: Callable[[str, int], None] | None = None,
    callback: PostHocCallback | None = None,
    callback_times: list[float] | None = None,
) -> tuple[list[float], int]:
    """Trials start ``in_flight`` at a time and report round-robin. Returns per-result
    on_trial_result latencies (s) and the total epochs run. With ``callback``, it sees each
    result after the scheduler, as in Tune, and its latencies go to ``callback_times``."""
    np.random.seed(0)
    trials = [
        Trial("t", stub=True, trial_id=f"t{i:05d}", config=cfg) for i, cfg in enumerate(configs)
    ]
    controller = _Controller(scheduler)
    waiting, running = list(trials), list[Trial]()
    times, epochs = [], 0
    while waiting or running:
        while waiting and len(running) < in_flight:
            trial = waiting.pop(0)
            trial.status = Trial.RUNNING
            scheduler.on_trial_add(controller, trial)  # type: ignore[arg-type]
            if callback is not None:
                callback.on_trial_start(0, trials, trial)
            running.append(trial)
        for trial in list(running):
            if trial.status != Trial.RUNNING:
                running.remove(trial)
                continue
            i = int(trial.trial_id[1:])
            epoch = int(controller.last.get(trial.trial_id, {}).get("epoch", 0)) + 1
            if before_result is not None:
                before_result(trial.trial_id, epoch)
            result = {"training_iteration": epoch, "epoch": epoch, "val/base/nll": value(i, epoch)}
            start = time.perf_counter()
            action = scheduler.on_trial_result(controller, trial, result)  # type: ignore[arg-type]
            times.append(time.perf_counter() - start)
            if callback is not None and callback_times is not None:
                start = time.perf_counter()
                callback.on_trial_result(0, trials, trial, result)
                callback_times.append(time.perf_counter() - start)
                trial.update_last_result(result)
            controller.last[trial.trial_id] = result
            epochs += 1
            if action == TrialScheduler.STOP or epoch >= max_t:
                trial.status = Trial.TERMINATED
                scheduler.on_trial_complete(controller, trial, result)  # type: ignore[arg-type]
                running.remove(trial)
    return times, epochs


def _row(name: str, times: list[float], epochs: int, extra: str = "") -> str:
    ms = 1e3 * np.asarray(times)
    p50, p99 = np.percentile(ms, [50, 99])
    return f"| {name} | {len(ms):,} | {epochs:,} | {p50:.3f} | {p99:.3f} | {ms.max():.1f} |{extra}"


def bench_latency(n_trials: int = 1000) -> None:
    rng = np.random.default_rng(1)
    quality = rng.uniform(0.5, 1.5, n_trials)
    noise = 0.01 * rng.normal(size=(n_trials, 101))  # fixed: every scheduler sees one stream

    def curve(i: int, epoch: int) -> float:
        return float(quality[i] * (1 + 1 / epoch) + noise[i, epoch])

    print(f"\n### Per-result decision latency, {n_trials:,} trials\n")
    print("| scheduler | results | epochs run | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|")
    kwargs: dict[str, Any] = dict(mode="min", max_t=100, grace_period=1, reduction_factor=4)
    configs: list[dict[str, Any]] = [{} for _ in range(n_trials)]
    for name, scheduler in (
        ("Ray ASHAScheduler, `val/base/nll`", ASHAScheduler(metric="val/base/nll", **kwargs)),
        ("PostHocASHA, `val/base/nll`", PostHocASHA(metric="val/base/nll", **kwargs)),
    ):
        if isinstance(scheduler, PostHocASHA):
            scheduler.callback.setup()  # as Tune does; no Tune run here
        times, epochs = run_stream(scheduler, configs, curve, 100, in_flight=16)
        print(_row(name, times, epochs))

    # Group key: 125 configurations x 8 seeds, logits written as the trials "train".
    k, n, c, max_t = 8, 1000, 10, 27
    store = PredictionStore.open(tempfile.mkdtemp())
    signal = rng.normal(scale=3.0, size=(n, c))
    y = signal.argmax(axis=1)
    flip = rng.random(n) < 0.3
    y[flip] = rng.integers(0, c, flip.sum())
    store.write_labels("val", y)
    n_groups = n_trials // k
    group_configs = [{"g": g, "seed": s} for g in range(n_groups) for s in range(k)]
    sharpness = rng.uniform(0.3, 2.0, n_groups)

    def write(trial_id: str, epoch: int) -> None:
        g = int(trial_id[1:]) // k
        z = signal * sharpness[g] * (1 + 0.05 * epoch) + rng.normal(size=signal.shape)
        store.write_epoch(trial_id, epoch, {("val", "swa"): z.astype(np.float32)}, {"swa": 1.0})

    group = PostHocASHA(
        metric="val/swa+ens+ts/nll",
        mode="min",
        max_t=max_t,
        grace_period=1,
        reduction_factor=3,
        store=store,
    )
    callback = group.callback
    callback.setup()
    callback_times: list[float] = []
    times, epochs = run_stream(
        group,
        group_configs,
        curve,
        max_t,
        in_flight=2 * k,
        before_result=write,
        callback=callback,
        callback_times=callback_times,
    )
    name = f"({n_groups} groups x {k}; N = {n:,}, C = {c})"
    print(_row(f"PostHocASHA, `val/swa+ens+ts/nll` {name}", times, epochs))
    print(_row(f"its callback (values into results) {name}", callback_times, epochs))
    start = time.perf_counter()
    callback.on_experiment_end([])  # the end-of-run pass over the groups it has seen
    end_ms = 1e3 * (time.perf_counter() - start)
    rungs = len(group.decisions)
    evaluations = len(pht.ensemble_table(store)) // len(METRICS)
    print(
        f"\nGroup run: {epochs:,} of {n_groups * k * max_t:,} epochs run; {rungs} rung "
        f"decisions; {evaluations} ensemble evaluations in all (one per group and epoch all "
        f"its members reached); the callback's end-of-run pass took {end_ms:.1f} ms."
    )
    total = {name: 1e3 * sum(t) for name, t in (("s", times), ("c", callback_times))}
    print(
        f"Driver time over the run: scheduler {total['s']:.0f} ms, callback {total['c']:.0f} ms "
        f"({total['c'] / epochs:.2f} ms per result)."
    )


if __name__ == "__main__":
    bench_ensemble()
    bench_latency()
