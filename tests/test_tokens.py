"""Token-level evaluation: compact records against full-logit computations.

Every expected value is computed from the full (tokens x vocab) logits by another path: the
class-metric code (``posthoc_tune.metrics``), the exact temperature fit
(``TemperatureScaler``, Newton on the full logits) and PyTorch's ``cross_entropy`` with
``ignore_index=-100`` on the shifted logits of a tiny GPT-2 built from a config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from posthoc_tune import PostHocReporter, PredictionStore, leaderboard, metrics, selection_table
from posthoc_tune import tokens as tok
from posthoc_tune.curves import TOKEN_TABLE_METRICS
from posthoc_tune.keys import Objective, token_metric_keys
from posthoc_tune.transforms import TemperatureScaler


def _lm_logits(n: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LM-like logits: a Zipf-like prior over the vocabulary plus per-token noise, targets
    drawn from a sharper distribution than the logits' (so TS moves T away from 1)."""
    g = torch.Generator().manual_seed(seed)
    prior = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    z = prior[torch.randperm(vocab, generator=g)] + 1.5 * torch.randn(n, vocab, generator=g)
    y = torch.multinomial(torch.softmax(1.3 * z, dim=1), 1, generator=g).squeeze(1)
    return z, y


@pytest.fixture(scope="module")
def lm() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    z, y = _lm_logits(3000, 4000, seed=0)
    return z, y, tok.token_records(z, y).numpy()


def test_records_have_the_documented_width_and_exact_untransformed_metrics(
    lm: tuple[torch.Tensor, torch.Tensor, np.ndarray],
) -> None:
    z, y, records = lm
    assert records.shape == (3000, tok.RECORD_WIDTH) and tok.RECORD_WIDTH == 60
    expected = metrics.evaluate(z.double(), y)
    got = tok.token_metrics(records, 1.0)
    for name in ("nll", "error", "ece", "brier"):
        assert got[f"token_{name}"] == pytest.approx(expected[name], abs=2e-6)
    assert got["perplexity"] == pytest.approx(math.exp(expected["nll"]), rel=1e-5)


def test_temperature_is_fit_exactly_from_the_records(
    lm: tuple[torch.Tensor, torch.Tensor, np.ndarray],
) -> None:
    z, y, records = lm
    exact = TemperatureScaler(tol=1e-9).fit(z, y).temperature_
    assert abs(exact - 1 / 1.3) < 0.2  # the data were built to need TS
    assert tok.fit_temperature(records) == pytest.approx(exact, abs=1e-3)


@pytest.mark.parametrize("temperature", [0.3, 0.77, 1.6, 3.9])
def test_metrics_at_any_temperature_match_the_full_logits(
    lm: tuple[torch.Tensor, torch.Tensor, np.ndarray], temperature: float
) -> None:
    z, y, records = lm
    expected = metrics.evaluate(z.double() / temperature, y)
    got = tok.token_metrics(records, temperature)
    assert got["token_nll"] == pytest.approx(expected["nll"], abs=1e-4)
    assert got["token_error"] == expected["error"]
    assert got["token_ece"] == pytest.approx(expected["ece"], abs=1e-4)
    assert got["token_brier"] == pytest.approx(expected["brier"], abs=1e-4)


def test_records_are_computed_in_chunks_without_changing_them(
    lm: tuple[torch.Tensor, torch.Tensor, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    z, y, records = lm
    monkeypatch.setattr(tok, "_CHUNK_ELEMENTS", 7 * z.shape[1])  # 7 rows per chunk
    np.testing.assert_array_equal(tok.token_records(z, y).numpy(), records)


def test_diverged_records_give_nan_metrics_and_ts_falls_back(
    lm: tuple[torch.Tensor, torch.Tensor, np.ndarray],
) -> None:
    z, y, _ = lm
    z = z[:50].clone()
    z[3, 7] = math.nan
    records = tok.token_records(z, y[:50]).numpy()
    assert all(math.isnan(v) for v in tok.token_metrics(records).values())
    with pytest.warns(RuntimeWarning, match="fell back to T=1"):
        assert tok.fit_temperature(records) == 1.0


# -- a tiny causal LM ---------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
VOCAB = 40


def _gpt2(seed: int, vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _trained_gpt2(seed: int, batches: list[dict[str, torch.Tensor]]) -> torch.nn.Module:
    """A tiny GPT-2 after a few Adam steps (an untrained one predicts near uniformly, a long
    trained one overfits these few sequences: TS would push T to an end of its range)."""
    model = _gpt2(seed).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for batch in batches:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
    return model.eval()


def _batches(seed: int, n: int = 12, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Right-padded sequences of varied lengths whose first two tokens (a "prompt") and
    padding are labelled -100."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n, batch_size):
        lengths = rng.integers(5, 12, size=min(batch_size, n - start))
        ids = torch.zeros(len(lengths), int(lengths.max()), dtype=torch.long)
        labels = torch.full_like(ids, tok.IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for i, length in enumerate(lengths):
            ids[i, :length] = torch.from_numpy(_markov(rng, int(length)))
            labels[i, 2:length] = ids[i, 2:length]  # two prompt tokens, then scored ones
            mask[i, :length] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _markov(rng: np.random.Generator, length: int) -> np.ndarray:
    """A learnable language: the next token is 3 * token + 1 (mod VOCAB) 80% of the time."""
    out = [int(rng.integers(VOCAB))]
    for _ in range(length - 1):
        follow = rng.random() < 0.8
        out.append((3 * out[-1] + 1) % VOCAB if follow else int(rng.integers(VOCAB)))
    return np.array(out)


def _full_logits(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> Any:
    """Every scored position's logits and target, from one unpadded forward per sequence."""
    zs, ys = [], []
    with torch.no_grad():
        for batch in batches:
            for ids, mask, labels in zip(
                *(batch[k] for k in ("input_ids", "attention_mask", "labels")), strict=True
            ):
                n = int(mask.sum())
                logits = model(input_ids=ids[None, :n]).logits[0]
                keep = labels[1:n] != tok.IGNORE_INDEX
                zs.append(logits[: n - 1][keep])
                ys.append(labels[1:n][keep])
    return torch.cat(zs), torch.cat(ys)


def test_a_token_split_scores_each_labelled_next_token_once() -> None:
    model, batches = _gpt2(0), _batches(1)
    records = tok.TokenSplit("val", batches).records(model)
    z, y = _full_logits(model, batches)
    assert len(records) == len(y) == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    expected = metrics.evaluate(z.double(), y)
    assert tok.token_metrics(records)["token_nll"] == pytest.approx(expected["nll"], abs=1e-5)


def test_reporter_reports_token_metrics_and_stores_records_not_logits(tmp_path: Path) -> None:
    model = _gpt2(0)
    val, test = _batches(1), _batches(2)
    store = PredictionStore.open(tmp_path / "exp")
    reporter = PostHocReporter(
        model, {"seed": 0}, tokens={"val": val, "test": test}, store=store, trial_id="t0"
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    results = []
    for _ in range(3):
        model.train()
        for batch in val:  # a few steps on val: the loss must move for the test to mean much
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
        results.append(reporter.step())
    last = results[-1]
    assert set(token_metric_keys()) <= set(last) and "val/base/nll" not in last
    model.eval()
    for split, batches in (("val", val), ("test", test)):
        z, y = _full_logits(model, batches)
        nll = float(torch.nn.functional.cross_entropy(z.double(), y))
        assert last[f"{split}/base/token_nll"] == pytest.approx(nll, abs=1e-5)
        assert last[f"{split}/base/perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
        exact_t = TemperatureScaler(tol=1e-9).fit(*_full_logits(model, val)).temperature_
        scaled = metrics.evaluate(z.double() / exact_t, y)
        assert last[f"{split}/ts/token_nll"] == pytest.approx(scaled["nll"], abs=1e-4)
    assert last["token_temperature/base"] == pytest.approx(exact_t, abs=1e-3)
    # SWA of epochs 1-3: its own records, and its metrics are not the base model's.
    assert last["val/swa/token_nll"] != last["val/base/token_nll"]
    # The store: 60 float32 numbers per token and variant, no logits.
    parts = store.read_tokens("t0", 3, "swa")
    assert parts.records["val"].shape == (len(_full_logits(model, val)[1]), 60)
    assert parts.temperature == pytest.approx(last["token_temperature/swa"])
    assert store.token_epochs("t0") == [1, 2, 3] and store.epochs("t0") == []
    # Tables and the leaderboard rescore the stored records: the same values as reported.
    board = leaderboard(store, "val/swa+ts/perplexity")
    reported = min(r["val/swa+ts/perplexity"] for r in results)
    assert board["val/swa+ts/perplexity"].iloc[0] == pytest.approx(reported, rel=1e-9)
    table = selection_table(store, metrics=TOKEN_TABLE_METRICS)
    assert list(table.index) == ["base", "ts", "swa", "swa+ts"]
    best = min(range(3), key=lambda i: results[i]["val/ts/token_nll"])
    assert table.loc["ts", "posthoc/test/perplexity"] == pytest.approx(
        results[best]["test/ts/perplexity"], rel=1e-9
    )
    assert table.loc["ts", "posthoc/epoch"] == [best + 1]


def test_token_ensembles_are_exact_against_the_full_logit_ensemble() -> None:
    val, test = _batches(1), _batches(2)
    members = [_trained_gpt2(s, _batches(10 + s)) for s in (0, 1, 2)]
    temperatures = [tok.fit_temperature(tok.TokenSplit("val", val).records(m)) for m in members]
    got = tok.evaluate_ensemble(members, val, test, transform="ens+ts")

    def mean_scaled(batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [_full_logits(m, batches) for m in members]
        z = torch.stack([o[0].double() / t for o, t in zip(outs, temperatures, strict=True)])
        return z.mean(0), outs[0][1]

    zv, yv = mean_scaled(val)
    final = TemperatureScaler(tol=1e-9).fit(zv, yv).temperature_
    for split, (z, y) in (("val", (zv, yv)), ("test", mean_scaled(test))):
        expected = metrics.evaluate(z / final, y)
        assert got[f"{split}/ens+ts/token_nll"] == pytest.approx(expected["nll"], abs=1e-3)
        assert got[f"{split}/ens+ts/token_error"] == pytest.approx(expected["error"])


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda b: b.update(labels=torch.full_like(b["labels"], -100)), "no position to score"),
        (lambda b: b["labels"].__setitem__((0, 3), VOCAB + 5), r"label 45 is outside"),
        (lambda b: b.pop("labels"), "must be a mapping with input_ids and labels"),
        (lambda b: b.update(labels=b["labels"][:, :-1]), "must both have shape"),
    ],
)
def test_bad_token_batches_are_named(edit: Callable[[dict[str, Any]], Any], message: str) -> None:
    batches = _batches(1)
    edit(batches[1])
    with pytest.raises(ValueError, match=message) as info:
        tok.TokenSplit("val", batches).records(_gpt2(0))
    assert "batch 1 of the val tokens" in str(info.value)


def test_a_vocabulary_change_between_epochs_or_members_is_refused() -> None:
    split = tok.TokenSplit("val", _batches(1))
    split.records(_gpt2(0))
    with pytest.raises(ValueError, match=r"predicts 41 tokens.*40"):
        split.records(_gpt2(0, vocab=VOCAB + 1))
    with pytest.raises(ValueError, match="vocabulary must be the same"):
        members = [_gpt2(0), _gpt2(1, vocab=VOCAB + 1)]
        tok.evaluate_ensemble(members, _batches(1), temperatures=[1.0, 1.0])


def test_a_sharded_token_loader_is_refused() -> None:
    dataset = torch.utils.data.TensorDataset(torch.zeros(8, 4, dtype=torch.long))
    sampler: torch.utils.data.DistributedSampler[Any] = torch.utils.data.DistributedSampler(
        dataset, num_replicas=2, rank=0
    )
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler)
    with pytest.raises(ValueError, match="evaluated by rank 0 alone"):
        PostHocReporter(_gpt2(0), {"seed": 0}, tokens={"val": loader})


def test_the_store_refuses_another_vocabulary_or_token_count(tmp_path: Path) -> None:
    store = PredictionStore.open(tmp_path / "exp")
    records = np.zeros((10, tok.RECORD_WIDTH), np.float32)
    store.write_tokens("a", 1, {("val", "base"): records}, vocab_size=40)
    with pytest.raises(ValueError, match="50-token vocabulary, but the store records 40"):
        store.write_tokens("b", 1, {("val", "base"): records}, vocab_size=50)
    with pytest.raises(ValueError, match="9 scored val tokens, but the store records 10"):
        store.write_tokens("b", 1, {("val", "base"): records[:9]}, vocab_size=40)
    with pytest.raises(ValueError, match=r"shape \(n_tokens, 60\)"):
        store.write_tokens("b", 1, {("val", "base"): records[:, :40]}, vocab_size=40)


def test_token_ensembles_are_refused_where_records_cannot_give_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rank by a single-model key such as val/swa"):
        Objective.parse("val/swa+ens+ts/perplexity", "min")
    with pytest.raises(ValueError, match="combine models, which token records cannot score"):
        selection_table(tmp_path, transforms=["ens+ts"], metrics=["token_nll"])
    with pytest.raises(ValueError, match="mix class and token metrics"):
        selection_table(tmp_path, metrics=["nll", "perplexity"])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        PostHocReporter(_gpt2(0), {"seed": 0})


# -- under Tune ---------------------------------------------------------------------------------


def _lm_trainable(config: dict[str, Any]) -> None:
    model = _gpt2(config["seed"]).train()
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    train, val, test = _batches(100 + config["seed"], n=16), _batches(1), _batches(2)
    reporter = PostHocReporter(model, config, tokens={"val": val, "test": test})
    for _ in range(reporter.epoch, 3):
        model.train()
        for batch in train:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
        reporter.step()


@pytest.mark.slow
def test_posthoc_asha_prunes_language_models_on_a_token_key(
    run_tune: Callable[..., Any],
) -> None:
    from ray import tune

    import posthoc_tune as pht

    key = "val/swa+ts/perplexity"
    scheduler = pht.PostHocASHA(metric=key, mode="min", max_t=3, grace_period=1, reduction_factor=2)
    results = run_tune(
        _lm_trainable,
        pht.with_seeds({"lr": tune.grid_search([2e-2, 4e-2])}, 2),
        tune_config={"scheduler": scheduler},
        run_config={"callbacks": [scheduler.callback]},
    )
    assert len(results) == 4 and not results.errors
    # The leaderboard rescores the stored records; the same values as the members' mean
    # reported perplexity (a trial cut while its next epoch was being written may have one
    # stored epoch more than its results: the leaderboard can only be lower there).
    board = leaderboard(results, key).set_index("config/lr")
    for lr in (2e-2, 4e-2):
        frames = [
            r.metrics_dataframe.set_index("epoch")[key] for r in results if r.config["lr"] == lr
        ]
        common = set.intersection(*(set(f.index) for f in frames))
        curve = {e: float(np.mean([f[e] for f in frames])) for e in common}
        value, epoch = board.loc[lr, key], board.loc[lr, "epoch"]
        assert value <= min(curve.values()) + 1e-12
        if epoch in curve:
            assert value == pytest.approx(curve[epoch], rel=1e-9)


def test_a_replay_feeds_and_selects_by_token_keys(tmp_path: Path) -> None:
    from ray.tune.schedulers import ASHAScheduler

    from posthoc_tune.replay import Experiment

    store = PredictionStore.open(tmp_path / "exp")
    reported: dict[str, list[dict[str, float]]] = {}
    for i, (lr, seed) in enumerate([(2e-2, 0), (2e-2, 1), (4e-2, 0), (4e-2, 1)]):
        model = _gpt2(seed).train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        reporter = PostHocReporter(
            model,
            {"lr": lr, "seed": seed},
            tokens={"val": _batches(1), "test": _batches(2)},
            store=store,
            trial_id=f"t{i}",
        )
        reported[f"t{i}"] = []
        for _ in range(3):
            for batch in _batches(100 + seed, n=16):
                opt.zero_grad()
                model(**batch).loss.backward()
                opt.step()
            reported[f"t{i}"].append(reporter.step())
    experiment = Experiment(store, transforms=(), metrics=TOKEN_TABLE_METRICS)
    key = "val/swa+ts/perplexity"
    for trial, results in reported.items():  # replayed results: rescored from the records
        for epoch, result in enumerate(results, start=1):
            assert experiment.result(trial, epoch)[key] == pytest.approx(result[key], rel=1e-9)
    asha = ASHAScheduler(metric=key, mode="min", max_t=3, grace_period=1, reduction_factor=2)
    replay = experiment.replay(asha, concurrency=2)
    assert replay.compute < 12 and set(replay.epochs.values()) <= {1, 2, 3}
    # The final model of the full budget: the table's post-hoc pick, by the same records.
    chosen = experiment.select(None, "swa+ts")
    table = selection_table(
        store, metrics=TOKEN_TABLE_METRICS, over="configs+epochs", select_by="nll"
    )
    assert chosen["test/perplexity"] == pytest.approx(
        table.loc["swa+ts", "posthoc/test/perplexity"]
    )
    with pytest.raises(ValueError, match="a replay feeds the"):
        experiment.replay(ASHAScheduler(metric="val/swa+ts/nll", mode="min", max_t=3))
