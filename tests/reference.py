"""Independent reference implementations (plain numpy, brute force) that tests compare against.

Written from the definitions, not from the library's code paths.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posthoc_tune import PostHocReporter, PredictionStore


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def nll(z: np.ndarray, y: np.ndarray) -> float:
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    log_p = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    return float(-np.mean(log_p[np.arange(len(y)), y]))


def error(z: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(z, axis=1) != y))


def brier(z: np.ndarray, y: np.ndarray) -> float:
    p = softmax(z)
    onehot = np.eye(z.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def ece(z: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    p = softmax(z)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs(np.mean(pred[in_bin] == y[in_bin]) - conf[in_bin].mean())
    return float(total)


def grid_temperature(z: np.ndarray, y: np.ndarray, lo: float = 0.01, hi: float = 100.0) -> float:
    """NLL-minimising temperature by exhaustive search on a log grid (coarse, then fine)."""
    grid = np.exp(np.linspace(np.log(lo), np.log(hi), 141))  # step 0.066 in log T
    best = grid[np.argmin([nll(z / t, y) for t in grid])]
    fine = np.clip(best * np.exp(np.linspace(-0.07, 0.07, 281)), lo, hi)  # step 5e-4
    return float(fine[np.argmin([nll(z / t, y) for t in fine])])


def sample_labels(z: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """Labels drawn from softmax(z / temperature): data whose true temperature is known."""
    p = softmax(z / temperature)
    u = rng.random((len(z), 1))
    return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), z.shape[1] - 1)


def linear_teacher(
    n_in: int, n_classes: int, sizes: dict[str, int], noise: float, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs ``x{suffix}`` and labels ``y{suffix}`` (argmax of a random linear map plus
    Gaussian noise) for each ``suffix: n_rows``: learnable data, so temperatures are finite."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n_in, n_classes, generator=g)
    out = {}
    for suffix, n in sizes.items():
        x = torch.randn(n, n_in, generator=g)
        out[f"x{suffix}"] = x
        out[f"y{suffix}"] = (x @ teacher + noise * torch.randn(n, n_classes, generator=g)).argmax(1)
    return out


def ensemble(
    val: list[np.ndarray],
    test: list[np.ndarray],
    y_val: np.ndarray,
    *,
    how: str = "logits",
    final_ts: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's ensemble by brute force: grid-TS each member on val, average logits (or
    probabilities), then grid-TS the ensemble on val; returns (val, test) logits."""
    temps = [grid_temperature(v, y_val) for v in val]

    def combine(parts: list[np.ndarray]) -> np.ndarray:
        scaled = [np.asarray(p, np.float64) / t for p, t in zip(parts, temps, strict=True)]
        if how == "logits":
            return np.mean(scaled, axis=0)
        return np.log(np.mean([softmax(s) for s in scaled], axis=0))

    ens_val, ens_test = combine(val), combine(test)
    if final_ts:
        t = grid_temperature(ens_val, y_val)
        ens_val, ens_test = ens_val / t, ens_test / t
    return ens_val, ens_test


def bn_mlp(n_in: int, n_classes: int, width: int = 32) -> torch.nn.Module:
    """A small BatchNorm MLP: SWA then needs its BatchNorm statistics re-estimated."""
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, width),
        torch.nn.BatchNorm1d(width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, n_classes),
    )


def full_batch_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> float:
    """One deterministic full-batch training step; returns the loss."""
    model.train()
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.item())


TEACHER_IN, TEACHER_CLASSES = 8, 5


def teacher_trial(
    config: Mapping[str, Any],
    *,
    epochs: int,
    rows: tuple[int, int, int] = (200, 80, 70),
    seed_key: str = "seed",
    checkpoint: bool = False,
    on_start: Callable[[PostHocReporter], None] | None = None,
    before_report: Callable[[int], None] | None = None,
) -> None:
    """The body of the real-Tune tests' trainables: deterministic full-batch training of
    :func:`bn_mlp` on the :func:`linear_teacher` task (train/val/test ``rows``) at
    ``config["lr"]`` (default 0.1) with the reporter, resuming from its checkpoint, so
    retries and re-runs reproduce the same weights. ``on_start(reporter)`` runs once the
    reporter exists and ``before_report(epoch)`` between each epoch's training step and the
    reporter's step: where tests wait for siblings and inject faults."""
    n_train, n_val, n_test = rows
    d = linear_teacher(
        TEACHER_IN, TEACHER_CLASSES, {"": n_train, "_val": n_val, "_test": n_test}, noise=2.0
    )
    torch.manual_seed(config[seed_key])
    model = bn_mlp(TEACHER_IN, TEACHER_CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=config.get("lr", 0.1), momentum=0.9)
    reporter = PostHocReporter(
        model,
        config,
        val=(d["x_val"], d["y_val"]),
        test=(d["x_test"], d["y_test"]),
        seed_key=seed_key,
        checkpoint={"optimizer": opt} if checkpoint else None,
    )
    if on_start is not None:
        on_start(reporter)
    for epoch in range(reporter.epoch + 1, epochs + 1):
        loss = full_batch_step(model, opt, d["x"], d["y"])
        if before_report is not None:
            before_report(epoch)
        reporter.step({"train/loss": loss})


def synthetic_store(
    root: Path,
    configs: Mapping[str, float],
    seeds: int,
    epochs: int,
    n_classes: int,
    n_val: int = 80,
    n_test: int = 70,
    seed_key: str = "seed",
) -> PredictionStore:
    """A store of known random logits: for each configuration (name -> signal strength, never
    separable so TS is well posed) and seed, base curves that go up and down and SWA curves
    that keep improving. Metadata configs are ``{"cfg": name, "seed": seed}``, nested in the
    dicts a ``seed_key`` path names (``"run/seed"``: ``{"run": {"cfg": name, "seed": seed}}``);
    the logits do not depend on ``seed_key``."""
    rng = np.random.default_rng(0)
    s = PredictionStore.open(root)
    y = {"val": rng.integers(0, n_classes, n_val), "test": rng.integers(0, n_classes, n_test)}
    for split, labels in y.items():
        s.write_labels(split, labels)
    for name, strength in configs.items():
        for seed in range(seeds):
            trial_id = f"{name}{seed}"
            *parents, leaf = seed_key.split("/")
            config: dict[str, Any] = {"cfg": name, leaf: seed}
            for parent in reversed(parents):
                config = {parent: config}
            s.write_metadata(trial_id, config, seed_key)
            for epoch in range(1, epochs + 1):
                parts = {}
                for split, labels in y.items():
                    onehot = np.eye(n_classes)[labels]
                    drift = strength * np.sin(epoch + seed)
                    noise = rng.normal(size=onehot.shape)
                    parts[(split, "base")] = (drift + 0.8) * onehot + noise
                    swa_noise = 2 * rng.normal(size=onehot.shape)
                    parts[(split, "swa")] = (strength + 0.2 * epoch) * onehot + swa_noise
                s.write_epoch(trial_id, epoch, {k: v.astype(np.float32) for k, v in parts.items()})
    return s
