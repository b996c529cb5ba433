"""Greedy ensemble selection against a brute-force numpy implementation of Caruana et al.'s
forward selection with replacement, on a store of known logits."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from posthoc_tune import PredictionStore
from posthoc_tune.greedy import greedy_ensemble
from tests import reference as ref

N_CLASSES, N_VAL, N_TEST, EPOCHS = 4, 120, 100, 5
TRIALS = {"a0": 0.1, "a1": 0.15, "b0": 0.25, "b1": 0.3, "c0": 0.4}  # trial -> signal strength


def _store(root: Path, nan_at: tuple[str, int] | None = None) -> tuple[PredictionStore, dict]:
    """Logits of known structure (base curves that peak then decline, SWA ones that improve)
    with val-fitted temperatures recorded as a reporter records them (by grid search here)."""
    rng = np.random.default_rng(0)
    store = PredictionStore.open(root)
    y = {"val": rng.integers(0, N_CLASSES, N_VAL), "test": rng.integers(0, N_CLASSES, N_TEST)}
    for split, labels in y.items():
        store.write_labels(split, labels)
    logits: dict[tuple[str, int, str], dict[str, np.ndarray]] = {}
    temperature: dict[tuple[str, int, str], float] = {}
    for trial, strength in TRIALS.items():
        store.write_metadata(trial, {"cfg": trial[0], "seed": int(trial[1])})
        for epoch in range(1, EPOCHS + 1):
            parts: dict[tuple[str, str], np.ndarray] = {}
            temperatures: dict[str, float] = {}
            for variant in ("base", "swa"):
                signal = strength * (np.sin(epoch / 2) + 1) if variant == "base" else strength
                by_split = {
                    split: (
                        signal * np.eye(N_CLASSES)[labels] * (1 + 0.2 * epoch)
                        + rng.normal(size=(len(labels), N_CLASSES))
                    ).astype(np.float32)
                    for split, labels in y.items()
                }
                if (trial, epoch) == nan_at and variant == "swa":
                    by_split["val"][0, 0] = np.nan
                    temperatures[variant] = 1.0
                else:
                    temperatures[variant] = ref.grid_temperature(by_split["val"], y["val"])
                logits[(trial, epoch, variant)] = by_split
                parts.update({(s, variant): z for s, z in by_split.items()})
            store.write_epoch(trial, epoch, parts, temperatures)
            for variant in ("base", "swa"):
                temperature[(trial, epoch, variant)] = temperatures[variant]
    return store, {"logits": logits, "T": temperature, "y": y}


def _brute_force(
    candidates: list[tuple[str, int, str]], data: dict, size: int
) -> tuple[dict[tuple[str, int, str], float], list[float]]:
    """Caruana: `size` picks with replacement, each minimising the val NLL of the mean of the
    picked members' scaled logits (float64); the best prefix's weights and the history."""
    scaled = {c: data["logits"][c]["val"] / data["T"][c] for c in candidates}
    total = np.zeros((N_VAL, N_CLASSES))
    picks, history = [], []
    for k in range(1, size + 1):
        values = [ref.nll((total + scaled[c]) / k, data["y"]["val"]) for c in candidates]
        best = int(np.argmin(values))
        picks.append(candidates[best])
        history.append(values[best])
        total += scaled[candidates[best]]
    kept = picks[: int(np.argmin(history)) + 1]
    return {c: kept.count(c) / len(kept) for c in set(kept)}, history


def _weights(result: object) -> dict[tuple[str, int, str], float]:
    members = result.members  # type: ignore[attr-defined]
    return {(r.trial_id, int(r.epoch), r.variant): float(r.weight) for r in members.itertuples()}


def test_posthoc_greedy_selection_matches_brute_force(tmp_path: Path) -> None:
    store, data = _store(tmp_path / "exp")
    everything = list(itertools.product(TRIALS, range(1, EPOCHS + 1), ("base", "swa")))
    result = greedy_ensemble(store, size=8, pool=2 * EPOCHS)  # the pool holds every model
    weights, history = _brute_force(everything, data, size=8)
    assert result.n_candidates == len(everything) and result.skipped == 0
    assert _weights(result) == pytest.approx(weights)
    np.testing.assert_allclose(result.history, history, rtol=1e-5)
    # The final model: the picked members' scaled logits averaged by weight, then TS on val.
    mean = {
        split: sum(w * data["logits"][c][split] / data["T"][c] for c, w in weights.items())
        for split in ("val", "test")
    }
    final = ref.grid_temperature(mean["val"], data["y"]["val"])
    assert result.temperature == pytest.approx(final, rel=2e-3)
    for split in ("val", "test"):
        expected = ref.nll(mean[split] / final, data["y"][split])
        assert result.value(split, "nll") == pytest.approx(expected, abs=1e-4)
        assert result.value(split, "error") == ref.error(mean[split] / final, data["y"][split])
    assert set(result.members.columns) >= {"trial_id", "epoch", "variant", "weight", "config/cfg"}


def test_a_pool_keeps_each_trials_best_candidates(tmp_path: Path) -> None:
    store, data = _store(tmp_path / "exp")
    result = greedy_ensemble(store, size=5, pool=2)
    own = {c: ref.nll(v["val"] / data["T"][c], data["y"]["val"]) for c, v in data["logits"].items()}
    pools = [sorted((c for c in own if c[0] == trial), key=own.__getitem__)[:2] for trial in TRIALS]
    weights, _ = _brute_force(sorted(itertools.chain(*pools), key=own.__getitem__), data, size=5)
    assert result.n_candidates == 2 * len(TRIALS)
    assert _weights(result) == pytest.approx(weights)
    capped = greedy_ensemble(store, size=5, pool=2, max_candidates=3)
    assert capped.n_candidates == 3
    best_three = sorted(itertools.chain(*pools), key=own.__getitem__)[:3]
    assert _weights(capped) == pytest.approx(_brute_force(best_three, data, size=5)[0])


def test_naive_greedy_takes_each_trial_at_its_base_best_epoch(tmp_path: Path) -> None:
    store, data = _store(tmp_path / "exp")
    best = {
        trial: min(
            range(1, EPOCHS + 1),
            key=lambda e: ref.nll(data["logits"][(trial, e, "base")]["val"], data["y"]["val"]),
        )
        for trial in TRIALS
    }
    candidates = [(t, e, "base") for t, e in best.items()]
    result = greedy_ensemble(store, flavour="naive", size=6)
    weights, _ = _brute_force(candidates, data, size=6)
    assert _weights(result) == pytest.approx(weights)
    assert {(t, e) for t, e, _ in _weights(result)} <= set(best.items())


def test_error_objective_and_diverged_candidates(tmp_path: Path) -> None:
    store, data = _store(tmp_path / "exp", nan_at=("c0", 3))
    result = greedy_ensemble(store, size=4, pool=2 * EPOCHS)
    assert result.skipped == 1 and ("c0", 3, "swa") not in _weights(result)
    by_error = greedy_ensemble(store, objective="error", size=4, pool=2 * EPOCHS)
    assert by_error.objective == "error"
    assert (
        by_error.history[0]
        <= min(
            ref.error(v["val"], data["y"]["val"])
            for c, v in data["logits"].items()
            if c != ("c0", 3, "swa")
        )
        + 1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"flavour": "best"}, "unknown flavour 'best'"),
        ({"objective": "ece"}, "unknown objective 'ece'"),
        ({"size": 0}, "size must be an int >= 1"),
        ({"pool": 1.5}, "pool must be an int >= 1"),
        ({"variants": []}, "variants must name at least one"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, message: str) -> None:
    store, _ = _store(tmp_path / "exp")
    with pytest.raises(ValueError, match=message):
        greedy_ensemble(store, **kwargs)


def test_stores_without_usable_candidates_or_with_other_val_rows_are_refused(
    tmp_path: Path,
) -> None:
    store = PredictionStore.open(tmp_path / "nan")
    store.write_labels("val", np.array([0, 1, 2]))
    store.write_metadata("t", {"seed": 0})
    store.write_epoch("t", 1, {("val", "base"): np.full((3, 3), np.nan, np.float32)}, {"base": 1.0})
    with pytest.raises(ValueError, match="no candidate to select from"):
        greedy_ensemble(store)
    other = PredictionStore.open(tmp_path / "rows")
    other.write_metadata("t", {"seed": 0})
    other.write_epoch("t", 1, {("val", "base"): np.zeros((4, 3), np.float32)}, {"base": 1.0})
    other.write_labels("val", np.array([0, 1, 2]))  # written after the logits: not checked then
    with pytest.raises(ValueError, match="has 4 val rows, the store's labels 3"):
        greedy_ensemble(other)


def test_the_table_leaderboard_and_command_show_both_flavours(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from posthoc_tune import leaderboard, selection_table
    from posthoc_tune.cli import main

    store, _ = _store(tmp_path / "exp")
    posthoc, naive = greedy_ensemble(store), greedy_ensemble(store, flavour="naive")
    table = selection_table(store, over="configs+epochs", greedy=True)
    row, base = table.loc["greedy"], table.loc["base", "naive/test/nll"]
    assert row["posthoc/test/nll"] == posthoc.value("test", "nll")
    assert row["naive/test/error"] == naive.value("test", "error")
    assert row["posthoc/gain/nll"] == pytest.approx(base - posthoc.value("test", "nll"))
    assert sorted(row["posthoc/epoch"]) == sorted(posthoc.members["epoch"])
    board = leaderboard(store, "test/swa+ens+ts/nll", greedy=True).set_index("group")
    assert board.loc["greedy", "test/swa+ens+ts/nll"] == posthoc.value("test", "nll")
    with pytest.raises(ValueError, match="needs over='configs\\+epochs'"):
        selection_table(store, greedy=True)
    assert main(["greedy", str(tmp_path / "exp"), "--size", "3", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("flavour,trial_id,ensemble_temperature,epoch,variant,weight")
    assert out.count("\nposthoc,") == len(greedy_ensemble(store, size=3).members)


def test_trials_with_other_classes_are_refused(tmp_path: Path) -> None:
    first = PredictionStore.open(tmp_path / "exp")
    first.write_labels("val", np.array([0, 1, 2]))
    for trial in ("a", "b"):
        first.write_metadata(trial, {"seed": int(trial == "b")})
    first.write_epoch("a", 1, {("val", "base"): np.eye(3, dtype=np.float32)}, {"base": 1.0})
    # A second writer that never saw the store's class count (as two trials racing to write
    # their first epoch can): its logits have 4 classes.
    other = PredictionStore.open(tmp_path / "exp")
    other._n_classes = 4
    other.write_epoch("b", 1, {("val", "base"): np.eye(3, 4, dtype=np.float32)}, {"base": 1.0})
    with pytest.raises(ValueError, match="must predict the same classes"):
        greedy_ensemble(first)
