"""selection_table on a small store of known logits, against a numpy implementation of the
paper's selection procedures written here from their definitions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from ray import tune

from posthoc_tune import PredictionStore, StoreError, leaderboard, selection_table, with_seeds
from posthoc_tune.datasets import load
from posthoc_tune.demo import train_mlp
from tests import reference as ref

N_TEST, C, EPOCHS, SEEDS = 70, 4, 5, 3
CONFIGS = {"a": 0.3, "b": 0.7}  # signal strength: never separable, so TS is well posed


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> PredictionStore:
    return ref.synthetic_store(
        tmp_path_factory.mktemp("exp"), CONFIGS, SEEDS, EPOCHS, C, n_test=N_TEST
    )


def _single(store: PredictionStore, trial: str, epoch: int, transform: str) -> dict[str, float]:
    variant = "swa" if "swa" in transform else "base"
    val = store.read(trial, epoch, "val", variant)
    test = store.read(trial, epoch, "test", variant)
    if transform.endswith("ts"):
        t = ref.grid_temperature(val, store.labels("val"))
        val, test = val / t, test / t
    return _metrics(store, val, test)


def _ensemble(store: PredictionStore, at: dict[str, int], transform: str) -> dict[str, float]:
    variant = "swa" if "swa" in transform else "base"
    vals = [store.read(t, e, "val", variant) for t, e in at.items()]
    tests = [store.read(t, e, "test", variant) for t, e in at.items()]
    val, test = ref.ensemble(vals, tests, store.labels("val"), final_ts=transform.endswith("+ts"))
    return _metrics(store, val, test)


def _metrics(store: PredictionStore, val: np.ndarray, test: np.ndarray) -> dict[str, float]:
    yv, yt = store.labels("val"), store.labels("test")
    return {
        "val/nll": ref.nll(val, yv),
        "val/error": ref.error(val, yv),
        "test/nll": ref.nll(test, yt),
        "test/error": ref.error(test, yt),
    }


def _argmin(values: dict[int, float]) -> int:
    return min(values, key=lambda e: (values[e], e))


def _expected(store: PredictionStore, cfg: str, transform: str, metric: str, obj: str) -> Any:
    """(naive test value, post-hoc test value, naive rank value, post-hoc rank value)."""
    members = [f"{cfg}{s}" for s in range(SEEDS)]
    epochs = range(1, EPOCHS + 1)
    base = {m: {e: _single(store, m, e, "base") for e in epochs} for m in members}
    naive_at = {m: _argmin({e: base[m][e][f"val/{obj}"] for e in epochs}) for m in members}
    naive_rank = np.mean([base[m][naive_at[m]][f"val/{obj}"] for m in members])
    if "ens" in transform:
        naive = _ensemble(store, naive_at, transform)[f"test/{metric}"]
        curve = {e: _ensemble(store, dict.fromkeys(members, e), transform) for e in epochs}
        best = _argmin({e: curve[e][f"val/{obj}"] for e in epochs})
        return naive, curve[best][f"test/{metric}"], naive_rank, curve[best][f"val/{obj}"]
    curves = {m: {e: _single(store, m, e, transform) for e in epochs} for m in members}
    naive = float(np.mean([curves[m][naive_at[m]][f"test/{metric}"] for m in members]))
    picks = {m: _argmin({e: curves[m][e][f"val/{obj}"] for e in epochs}) for m in members}
    posthoc = np.mean([curves[m][picks[m]][f"test/{metric}"] for m in members])
    rank = np.mean([curves[m][picks[m]][f"val/{obj}"] for m in members])
    return naive, posthoc, naive_rank, rank


def _close(got: float, expected: float, metric: str) -> None:
    if metric == "nll":
        assert got == pytest.approx(expected, rel=2e-3)
    else:  # argmaxes inside ensembles can flip where grid and Newton temperatures differ
        assert got == pytest.approx(expected, abs=1.5 / N_TEST)


TRANSFORMS = ("base", "ts", "swa", "swa+ts", "ens", "ens+ts", "swa+ens+ts")


@pytest.mark.parametrize("select_by", ["same", "nll"])
def test_every_cell_over_epochs_equals_the_numpy_procedure(
    store: PredictionStore, select_by: str
) -> None:
    table = selection_table(store, over="epochs", select_by=select_by)
    assert table.index.names == ["config", "transform"]
    for cfg in CONFIGS:
        block = table.xs(json.dumps({"cfg": cfg}), level="config")
        assert list(block.index) == list(TRANSFORMS)
        for transform in TRANSFORMS:
            for metric in ("nll", "error"):
                obj = metric if select_by == "same" else "nll"
                naive, posthoc, _, _ = _expected(store, cfg, transform, metric, obj)
                _close(block.loc[transform, f"naive/test/{metric}"], naive, metric)
                _close(block.loc[transform, f"posthoc/test/{metric}"], posthoc, metric)
        base = block.loc["base"]
        assert base["naive/test/nll"] == base["posthoc/test/nll"]  # the procedures coincide
        row = block.loc["swa+ens+ts"]
        assert row["naive/gain/nll"] == pytest.approx(
            base["naive/test/nll"] - row["naive/test/nll"]
        )
        assert row["ratio"] == pytest.approx(row["posthoc/gain/nll"] / row["naive/gain/nll"])
        assert len(row["posthoc/epoch"]) == 1 and len(block.loc["swa", "posthoc/epoch"]) == SEEDS


def test_over_configs_and_epochs_chooses_the_configuration_too(store: PredictionStore) -> None:
    table = selection_table(
        store, over="configs+epochs", transforms=["base", "swa+ts", "swa+ens+ts"]
    )
    assert list(table.index) == ["base", "swa+ts", "swa+ens+ts"]
    # Naive selection chooses the configuration by the base val metric, whatever the row.
    assert (table["naive/config"] == table.loc["base", "naive/config"]).all()
    for transform in table.index:
        expected = {cfg: _expected(store, cfg, transform, "nll", "nll") for cfg in CONFIGS}
        naive_cfg = min(expected, key=lambda c: expected[c][2])
        posthoc_cfg = min(expected, key=lambda c: expected[c][3])
        assert table.loc[transform, "naive/config"] == json.dumps({"cfg": naive_cfg})
        assert table.loc[transform, "posthoc/config"] == json.dumps({"cfg": posthoc_cfg})
        _close(table.loc[transform, "naive/test/nll"], expected[naive_cfg][0], "nll")
        _close(table.loc[transform, "posthoc/test/nll"], expected[posthoc_cfg][1], "nll")


def test_progress_bar_counts_trials(
    store: PredictionStore, capsys: pytest.CaptureFixture[str]
) -> None:
    selection_table(store, transforms=["base"], progress=True)
    err = capsys.readouterr().err
    assert err.count("trials") == len(CONFIGS) and err.rstrip().endswith(
        f"{len(CONFIGS) * SEEDS}/{len(CONFIGS) * SEEDS} trials"
    )


def test_a_seed_key_path_forms_the_same_configurations(
    store: PredictionStore, tmp_path: Path
) -> None:
    """The same logits stored with the seed at ``run/seed``: the same groups and values as the
    flat store, whose values the tests above check against numpy."""
    nested = ref.synthetic_store(
        tmp_path, CONFIGS, SEEDS, EPOCHS, C, n_test=N_TEST, seed_key="run/seed"
    )
    transforms = ["swa+ts", "swa+ens+ts"]
    renamed = {json.dumps({"cfg": c}): json.dumps({"run": {"cfg": c}}) for c in CONFIGS}
    pd.testing.assert_frame_equal(
        selection_table(nested, transforms=transforms),
        selection_table(store, transforms=transforms)
        .rename(index=renamed, level="config")
        .replace(renamed),  # the naive/ and posthoc/ config columns
    )
    board = leaderboard(nested)
    groups = {
        hashlib.sha256(json.dumps({"run": {"cfg": c}}).encode()).hexdigest()[:16]: c
        for c in CONFIGS
    }
    assert dict(zip(board["group"], board["config/run/cfg"], strict=True)) == groups
    assert list(board["n_members"]) == [SEEDS] * len(CONFIGS)
    flat = leaderboard(store)
    pd.testing.assert_series_equal(board["val/swa+ens+ts/nll"], flat["val/swa+ens+ts/nll"])


def test_bad_arguments(store: PredictionStore, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="over must be 'epochs' or 'configs\\+epochs'"):
        selection_table(store, over="configs")
    with pytest.raises(ValueError, match="select_by must be 'same' or 'nll'"):
        selection_table(store, select_by="error")
    with pytest.raises(ValueError, match="unknown transform 'ens\\+swa'"):
        selection_table(store, transforms=["ens+swa"])
    with pytest.raises(StoreError, match="holds no prediction store"):
        selection_table(tmp_path)


@pytest.mark.slow
def test_post_hoc_selection_beats_naive_on_a_real_noisy_label_run(run_tune: Any) -> None:
    """MNIST-1D generated offline (8,000 samples), 40% symmetric label noise on train and
    val: 2 learning rates x 4 seeds x 20 epochs of a real Tune run with the reporter, full
    budget. Measured there: swa+ens+ts test NLL 2.070 naive (lr 0.03, epochs 13-17) against
    2.009 post hoc (lr 0.1, epoch 20)."""
    data = load("mnist1d", noise=0.4, n_samples=8000)
    space = with_seeds(
        {
            "lr": tune.grid_search([0.03, 0.1]),
            "width": 256,
            "weight_decay": 5e-4,
            "batch_size": 128,
            "epochs": 20,
        },
        n=4,
    )
    results = run_tune(tune.with_parameters(train_mlp, data=data), space, name="real")
    assert len(results) == 8 and not results.errors
    table = selection_table(results, over="configs+epochs")
    row = table.loc["swa+ens+ts"]
    assert row["posthoc/test/nll"] < row["naive/test/nll"]
    assert row["posthoc/epoch"][0] > max(row["naive/epoch"])  # reversal: it trains longer
    assert (table["naive/config"] == table.loc["base", "naive/config"]).all()
