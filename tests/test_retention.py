"""Retention: compacting a store keeps every selection, and dropping trials removes them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from posthoc_tune import PostHocASHA, PredictionStore, leaderboard, selection_table
from posthoc_tune.cli import main
from posthoc_tune.plots import experiment_figures
from posthoc_tune.replay import Experiment
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
    for metric in ("val/swa+ens+ts/nll", "val/swa+ts/error", "val/ens/nll", "val/base/nll"):
        tables.append(leaderboard(path, metric))
    return tables


def _pixels(path: Path) -> dict[str, np.ndarray]:
    """Every figure plot_experiment draws, rendered."""
    out = {}
    for stem, figure in experiment_figures(path):
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        out[stem] = np.asarray(canvas.buffer_rgba()).copy()
    return out


@pytest.fixture
def pruned(tmp_path: Path) -> Path:
    """A store as a run that PostHocASHA pruned leaves it: PostHocASHA on the ensemble key,
    fed the full synthetic curves, decides which groups stop and when; the store keeps only
    the epochs each trial ran, and one member of a stopped group ran two epochs past its
    group's stop (members train on while the driver judges their group)."""
    configs = {"a": 0.3, "b": 0.7, "c": 0.5, "d": 0.1}
    store = ref.synthetic_store(tmp_path / "exp", configs, SEEDS, EPOCHS, C)
    asha = PostHocASHA(
        metric="val/swa+ens+ts/nll", mode="min", max_t=EPOCHS, grace_period=1, reduction_factor=2
    )
    ran = Experiment(store).replay(asha, concurrency=2 * SEEDS).epochs
    stopped = sorted(t for t, e in ran.items() if e < EPOCHS)
    assert stopped and len(stopped) < len(ran)  # some groups pruned, some not
    ran[stopped[0]] += 2
    for trial, epochs in ran.items():
        store.delete_epochs(trial, range(epochs + 1, EPOCHS + 1))
    return tmp_path / "exp"


def test_compacting_a_pruned_run_keeps_tables_leaderboards_and_plots(pruned: Path) -> None:
    tables, pixels = _tables(pruned), _pixels(pruned)
    store = PredictionStore.open(pruned)
    stored = {t: store.epochs(t) for t in store.trials()}
    report = compact(pruned)
    assert report.n_dropped_files > 0
    assert {t: store.epochs(t) for t in store.trials()} != stored
    for got, expected in zip(_tables(pruned), tables, strict=True):
        pd.testing.assert_frame_equal(got, expected)
    after = _pixels(pruned)
    assert after.keys() == pixels.keys()
    for stem, image in pixels.items():
        np.testing.assert_array_equal(after[stem], image, err_msg=stem)
    # A second compaction finds nothing more to delete and changes nothing.
    assert compact(pruned).n_dropped_files == 0
    for got, expected in zip(_tables(pruned), tables, strict=True):
        pd.testing.assert_frame_equal(got, expected)


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
