"""Retention: compacting a store keeps every selection, and dropping trials removes them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from posthoc_tune import PredictionStore, leaderboard, selection_table
from posthoc_tune.cli import main
from posthoc_tune.retention import compact
from tests import reference as ref

CONFIGS = {"a": 0.3, "b": 0.7}
SEEDS, EPOCHS, C = 3, 8, 4


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    ref.synthetic_store(tmp_path / "exp", CONFIGS, SEEDS, EPOCHS, C)
    return tmp_path / "exp"


def _tables(path: Path) -> list[pd.DataFrame]:
    tables = [
        selection_table(path, over=over, select_by=by)
        for over in ("epochs", "configs+epochs")
        for by in ("same", "nll")
    ]
    for metric in ("val/swa+ens+ts/nll", "val/swa+ts/error", "val/ens/nll"):
        board = leaderboard(path, metric)
        tables.append(board.drop(columns=["naive_value", "naive_epochs", "naive_rank"]))
    return tables


def test_keeping_selectable_epochs_keeps_every_selection(experiment: Path) -> None:
    before = _tables(experiment)
    report = compact(experiment, keep="selectable")
    store = PredictionStore.open(experiment)
    assert report.n_dropped_files > 0
    for trial in store.trials():
        assert store.epochs(trial) == report.kept_epochs[trial]
        assert len(store.epochs(trial)) < EPOCHS
    for got, expected in zip(_tables(experiment), before, strict=True):
        pd.testing.assert_frame_equal(got, expected)
    # Every epoch a table picked is still stored, for the member that picked it.
    members = {c: [f"{c}{s}" for s in range(SEEDS)] for c in CONFIGS}
    table = before[0]
    for (config, _), row in table.iterrows():
        cfg = "a" if '"a"' in config else "b"
        for kind in ("naive", "posthoc"):
            epochs = row[f"{kind}/epoch"]
            picks = epochs if len(epochs) == SEEDS else epochs * SEEDS
            for member, epoch in zip(members[cfg], picks, strict=True):
                assert epoch in store.epochs(member)


def test_dropping_trials_equals_a_store_without_them(experiment: Path, tmp_path: Path) -> None:
    expected_path = tmp_path / "by_hand"
    shutil.copytree(experiment, expected_path)
    for trial in ("a1", "b0"):  # the documented layout: logits/<trial>/, meta/<trial>.json
        shutil.rmtree(expected_path / "posthoc" / "logits" / trial)
        (expected_path / "posthoc" / "meta" / f"{trial}.json").unlink()
    report = compact(experiment, keep="all", drop_trials=["b0", "a1"])
    assert report.dropped_trials == ["a1", "b0"] and report.n_dropped_files == 0
    assert PredictionStore.open(experiment).trials() == ["a0", "a2", "b1", "b2"]
    for got, expected in zip(_tables(experiment), _tables(expected_path), strict=True):
        pd.testing.assert_frame_equal(got, expected)


def test_a_dry_run_deletes_nothing(experiment: Path) -> None:
    files = sorted(experiment.rglob("*.parquet"))
    report = compact(experiment, drop_trials=["a0"], dry_run=True)
    assert report.dropped_trials == ["a0"] and report.n_dropped_files > 0
    assert sorted(experiment.rglob("*.parquet")) == files


def test_bad_arguments(experiment: Path) -> None:
    with pytest.raises(ValueError, match="keep must be 'all' or 'selectable', got 'some'"):
        compact(experiment, keep="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"does not hold: \['zz'\]"):
        compact(experiment, drop_trials=["zz"])


def test_compact_command(experiment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = selection_table(experiment, over="configs+epochs")
    assert main(["compact", str(experiment), "--dry-run"]) == 0
    assert "would delete 0 trials and" in capsys.readouterr().out
    assert main(["compact", str(experiment)]) == 0
    out = capsys.readouterr().out
    kept = sum(len(PredictionStore.open(experiment).epochs(t)) for t in ("a0", "a1", "a2"))
    assert "deleted 0 trials" in out and kept < SEEDS * EPOCHS
    pd.testing.assert_frame_equal(selection_table(experiment, over="configs+epochs"), before)
