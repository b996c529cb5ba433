"""Token-level records against full logits (issue 17) for benchmarks/RESULTS.md.

1. The reporter's step, token-level mode against the full-logit path, on a val set of
   ``--tokens`` positions with a ``--vocab`` vocabulary (synthetic LM-like logits served by a
   lookup "model", so both paths see the same logits): step time and stored bytes per epoch.
   Both report the base model's ``base`` and ``ts`` transforms (SWA off), the work a step does
   per model variant.
2. Exactness on the same logits: the records' temperature and metrics against the exact fit
   (``TemperatureScaler``, Newton on the full logits) and the class metrics of ``z / T``.
3. Exactness of token ensembles on a tiny GPT-2 (members trained briefly, 12k scored tokens):
   ``evaluate_ensemble`` against the full-logit ensemble, and its time against one member's
   records.

Run: .venv/bin/python benchmarks/tokens.py [--tokens 20000] [--vocab 32000] [--epochs 3]
(needs ~12 GB of memory at the defaults: the full-logit path holds several copies of the logits)
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from posthoc_tune import PostHocReporter, PredictionStore, metrics
from posthoc_tune import tokens as tok
from posthoc_tune.transforms import TemperatureScaler

SEQUENCE = 200  # scored positions per sequence


def lm_logits(n: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """LM-like logits: a Zipf-like prior over the vocabulary plus per-token noise, targets
    drawn from a sharper distribution (so TS moves T away from 1)."""
    g = torch.Generator().manual_seed(seed)
    prior = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    z = prior[torch.randperm(vocab, generator=g)] + 1.5 * torch.randn(n, vocab, generator=g)
    y = torch.empty(n, dtype=torch.long)
    for start in range(0, n, 1000):  # softmax of all rows at once would double the memory
        p = torch.softmax(1.3 * z[start : start + 1000], dim=1)
        y[start : start + 1000] = torch.multinomial(p, 1, generator=g).squeeze(1)
    return z, y


class Lookup(torch.nn.Module):
    """A "language model" whose logits at position ``(b, t)`` are row ``input_ids[b, t]`` of a
    fixed table: the table is a frozen parameter, so the reporter's SWA shares it."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.scale = torch.nn.Parameter(torch.ones(()))  # something to train and average

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        return self.table[input_ids] * self.scale


def token_batches(y: torch.Tensor, per_batch: int = 4) -> list[dict[str, torch.Tensor]]:
    """Sequences of SEQUENCE + 1 positions: position t of sequence s looks up logits row
    s * SEQUENCE + t and is labelled with that row's target at t + 1 (the first is unlabelled,
    as a causal LM's first token)."""
    n = len(y) // SEQUENCE
    rows = torch.arange(n * SEQUENCE).reshape(n, SEQUENCE)
    ids = torch.cat([rows, rows[:, -1:]], dim=1)  # the last input is never scored
    labels = torch.full_like(ids, tok.IGNORE_INDEX)
    labels[:, 1:] = y[: n * SEQUENCE].reshape(n, SEQUENCE)
    return [
        {"input_ids": ids[i : i + per_batch], "labels": labels[i : i + per_batch]}
        for i in range(0, n, per_batch)
    ]


def store_bytes(root: str) -> int:
    return sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(root)
        for f in files
        if f.startswith("epoch_")
    )


def peak_rss_gb() -> float:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_steps(reporter: PostHocReporter, epochs: int) -> list[float]:
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        reporter.step()
        times.append(time.perf_counter() - start)
    return times


def bench_reporter(z: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    model = Lookup(z)
    before = peak_rss_gb()
    common: dict[str, Any] = {"swa_start_epoch": 10**6, "transforms": ["base", "ts"]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = PredictionStore.open(os.path.join(tmp, "tokens"))
        reporter = PostHocReporter(
            model, {"seed": 0}, tokens={"val": token_batches(y)}, store=store, **common
        )
        token_times = time_steps(reporter, epochs)
        rows.append(("token records", token_times, store_bytes(store.root) / epochs, peak_rss_gb()))
        del reporter

        store = PredictionStore.open(os.path.join(tmp, "logits"))
        reporter = PostHocReporter(
            model, {"seed": 0}, val=(lambda m, split: z, y.numpy()), store=store, **common
        )
        logit_times = time_steps(reporter, epochs)
        rows.append(("full logits", logit_times, store_bytes(store.root) / epochs, peak_rss_gb()))
    print(f"\n### Reporter step: {len(y):,} val tokens, vocabulary {z.shape[1]:,}\n")
    print(
        f"(the logits themselves: {z.numel() * 4 / 1e9:.2f} GB; peak memory before the "
        f"steps {before:.2f} GB)\n"
    )
    print("| path | step time, median (s) | steps (s) | stored per epoch | peak memory after |")
    print("|---|---|---|---|---|")
    for name, times, nbytes, peak in rows:
        steps = " / ".join(f"{t:.1f}" for t in times)
        print(
            f"| {name} | {statistics.median(times):.2f} | {steps} | {nbytes / 1e6:,.1f} MB "
            f"| {peak:.2f} GB |"
        )
    ratio = rows[0][2] / rows[1][2]
    per_token = rows[0][2] / len(y)
    print(
        f"\nrecords: {per_token:.0f} bytes per token on disk ({tok.RECORD_WIDTH} float32 "
        f"numbers and the row's other columns), {100 * ratio:.2f}% of the full-logit bytes"
    )


def bench_exactness(z: torch.Tensor, y: torch.Tensor) -> None:
    records = tok.token_records(z, y).numpy()
    exact = TemperatureScaler(tol=1e-9).fit(z, y).temperature_
    fitted = tok.fit_temperature(records)
    print(f"\n### Exactness on the same logits ({len(y):,} tokens x {z.shape[1]:,})\n")
    print(f"fitted T {fitted:.6f}, exact T {exact:.6f}: |error| {abs(fitted - exact):.1e}\n")
    print("| T | NLL error | ECE error | Brier error | error (token) |")
    print("|---|---|---|---|---|")
    for temperature in (0.5, 1.0, exact, 2.0, 3.5):
        got = tok.token_metrics(records, temperature)
        want = metrics.evaluate(z / temperature, y)
        cells = [abs(got[f"token_{m}"] - want[m]) for m in ("nll", "ece", "brier", "error")]
        print(f"| {temperature:.3f} | " + " | ".join(f"{c:.1e}" for c in cells) + " |")


def _tiny_lm(seed: int, vocab: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _markov_batches(
    seed: int, n: int, vocab: int, length: int = 49
) -> list[dict[str, torch.Tensor]]:
    """A learnable language: next token 3 * token + 1 (mod vocab) 80% of the time."""
    rng = np.random.default_rng(seed)
    seqs = np.empty((n, length), dtype=np.int64)
    seqs[:, 0] = rng.integers(vocab, size=n)
    for t in range(1, length):
        follow = rng.random(n) < 0.8
        seqs[:, t] = np.where(follow, (3 * seqs[:, t - 1] + 1) % vocab, rng.integers(vocab, size=n))
    ids = torch.from_numpy(seqs)
    return [{"input_ids": ids[i : i + 16], "labels": ids[i : i + 16]} for i in range(0, n, 16)]


def _full(
    models: Sequence[Any], batches: list[dict[str, torch.Tensor]]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    with torch.no_grad():
        zs = [
            torch.cat(
                [
                    m(input_ids=b["input_ids"]).logits[:, :-1].reshape(-1, m.config.vocab_size)
                    for b in batches
                ]
            ).double()
            for m in models
        ]
    y = torch.cat([b["labels"][:, 1:].reshape(-1) for b in batches])
    return zs, y


def bench_ensemble(members: int = 4, vocab: int = 512) -> None:
    train = _markov_batches(100, 256, vocab)
    val, test = _markov_batches(1, 256, vocab), _markov_batches(2, 256, vocab)
    models = []
    for seed in range(members):
        model = _tiny_lm(seed, vocab)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for batch in train:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
        models.append(model.eval())
    start = time.perf_counter()
    one = tok.TokenSplit("val", val).records(models[0])
    single_s = time.perf_counter() - start
    start = time.perf_counter()
    got = tok.evaluate_ensemble(models, val, test, transform="ens+ts")
    ensemble_s = time.perf_counter() - start
    (zv, yv), (zt, yt) = _full(models, val), _full(models, test)
    temps = [TemperatureScaler(tol=1e-9).fit(z, yv).temperature_ for z in zv]
    mean_v = torch.stack([z / t for z, t in zip(zv, temps, strict=True)]).mean(0)
    mean_t = torch.stack([z / t for z, t in zip(zt, temps, strict=True)]).mean(0)
    final = TemperatureScaler(tol=1e-9).fit(mean_v, yv).temperature_
    print(
        f"\n### Token ensembles: {members} tiny GPT-2 members, vocabulary {vocab}, "
        f"{len(one):,} val and {len(yt):,} test tokens\n"
    )
    print("| split | ens+ts NLL, evaluate_ensemble | exact (full logits) | |error| |")
    print("|---|---|---|---|")
    for split, mean, y in (("val", mean_v, yv), ("test", mean_t, yt)):
        want = metrics.evaluate(mean / final, y)["nll"]
        have = got[f"{split}/ens+ts/token_nll"]
        print(f"| {split} | {have:.6f} | {want:.6f} | {abs(have - want):.1e} |")
    print(
        f"\ntime: one member's val records {single_s:.2f} s; the ensemble (member "
        f"temperatures on val, then val and test through every member) {ensemble_s:.2f} s"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["reporter", "exact", "ensemble"])
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    warnings.simplefilter("ignore", RuntimeWarning)
    sections: list[tuple[str, Callable[[], None]]] = []
    if {"reporter", "exact"} - set(args.skip):
        z, y = lm_logits(args.tokens, args.vocab)
        if "reporter" not in args.skip:
            sections.append(("reporter", lambda: bench_reporter(z, y, args.epochs)))
        if "exact" not in args.skip:
            sections.append(("exact", lambda: bench_exactness(z, y)))
    if "ensemble" not in args.skip:
        sections.append(("ensemble", bench_ensemble))
    for _, run in sections:
        run()


if __name__ == "__main__":
    main()
