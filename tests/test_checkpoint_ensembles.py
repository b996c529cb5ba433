"""Checkpoint ensembles (``ckpt*``): a trial's own last epochs, everywhere a transform is.

Values are checked against the brute-force ensemble of :mod:`tests.reference` (grid-searched
temperatures, float64), which shares no code with the library's scoring path.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import posthoc_tune as pht
from posthoc_tune import PostHocASHA, PostHocReporter, PredictionStore
from posthoc_tune.curves import configurations, scan
from posthoc_tune.keys import CHECKPOINT_WINDOW, parse_transform
from posthoc_tune.plots import experiment_figures
from posthoc_tune.replay import Experiment
from posthoc_tune.retention import compact
from tests import reference as ref

N_IN, C = 6, 4
EPOCHS = CHECKPOINT_WINDOW + 2
CKPT = ("ckpt", "ckpt+ts", "swa+ckpt", "swa+ckpt+ts")


def _train(
    root: Path, lr: float = 0.5, seed: int = 0, trial_id: str = "t0", **kwargs: object
) -> list[dict[str, float]]:
    """EPOCHS epochs of a small MLP with the reporter writing to ``root``."""
    d = ref.linear_teacher(N_IN, C, {"": 120, "_val": 60, "_test": 50}, noise=1.5)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(N_IN, 16), torch.nn.ReLU(), torch.nn.Linear(16, C))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    reporter = PostHocReporter(
        model,
        {"lr": lr, "seed": seed},
        val=(d["x_val"], d["y_val"]),
        test=(d["x_test"], d["y_test"]),
        store=root,
        trial_id=trial_id,
        **kwargs,  # type: ignore[arg-type]
    )
    results = []
    for _ in range(EPOCHS):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(d["x"]), d["y"]).backward()
        opt.step()
        results.append(reporter.step())
    return results


def _brute_force(store: PredictionStore, trial: str, epoch: int, name: str) -> dict[str, float]:
    """The checkpoint ensemble at ``epoch`` by brute force: grid-TS each of the window's
    stored models on val, average the logits, grid-TS the average for ``+ts``."""
    t = parse_transform(name)
    window = range(max(1, epoch - CHECKPOINT_WINDOW + 1), epoch + 1)
    val = [store.read(trial, e, "val", t.variant) for e in window]
    test = [store.read(trial, e, "test", t.variant) for e in window]
    y_val, y_test = store.labels("val"), store.labels("test")
    z_val, z_test = ref.ensemble(val, test, y_val, final_ts=t.ts)
    return {"val": ref.nll(z_val, y_val), "test": ref.nll(z_test, y_test)}


def test_the_reporter_reports_checkpoint_ensembles_of_its_last_epochs(tmp_path: Path) -> None:
    results = _train(tmp_path)
    store = PredictionStore.open(tmp_path)
    for epoch in (1, 3, EPOCHS):  # one member, a partial window, a full one
        result = results[epoch - 1]
        for name in CKPT:
            expected = _brute_force(store, "t0", epoch, name)
            for split in ("val", "test"):
                assert result[f"{split}/{name}/nll"] == pytest.approx(expected[split], rel=2e-3)
    # Five epochs of a still-improving model are a different model from the last epoch's.
    last = results[-1]
    assert last["val/ckpt/nll"] != pytest.approx(last["val/ts/nll"], rel=1e-3)
    # One member: the checkpoint ensemble is the temperature-scaled model itself.
    assert results[0]["val/ckpt/nll"] == pytest.approx(results[0]["val/ts/nll"], rel=1e-6)


def test_stored_experiments_get_checkpoint_ensembles_without_retraining(tmp_path: Path) -> None:
    """A store written without the ``ckpt*`` keys (as by an older reporter) scores them from
    its logits, equal to what a reporter computing them reported."""
    reported = _train(tmp_path / "full")
    lean = _train(tmp_path / "lean", transforms=["base", "ts", "swa", "swa+ts"])
    assert all(np.isnan(r[f"val/{name}/nll"]) for r in lean for name in CKPT)
    store = PredictionStore.open(tmp_path / "lean")
    [(group, (members, config))] = configurations(store).items()
    curves = scan(store, group, members, config, CKPT, "logits")
    for name in CKPT:
        scanned = curves.single[name]["t0"]
        assert sorted(scanned) == list(range(1, EPOCHS + 1))
        for epoch, scores in scanned.items():
            for split in ("val", "test"):
                key = f"{split}/{name}/nll"
                assert scores[key] == pytest.approx(reported[epoch - 1][key], rel=1e-6)


CONFIGS = {"a": 0.5, "b": 0.1}  # trial "a0": lr 0.5, seed 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two configurations x two seeds, trained with the reporter (a stored experiment)."""
    root = tmp_path_factory.mktemp("ckpt")
    for name, lr in CONFIGS.items():
        for seed in (0, 1):
            _train(root, lr=lr, seed=seed, trial_id=f"{name}{seed}")
    return root


def _copy(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path / "exp")
    return tmp_path / "exp"


def test_selection_table_rows_select_checkpoint_ensembles_post_hoc(trained: Path) -> None:
    store = PredictionStore.open(trained)
    table = pht.selection_table(trained, transforms=["ckpt+ts", "swa+ckpt+ts"], over="epochs")
    for (config, name), row in table.iterrows():
        cfg = "a" if json.loads(config)["lr"] == CONFIGS["a"] else "b"
        tests = []
        for member, epoch in zip((f"{cfg}0", f"{cfg}1"), row["posthoc/epoch"], strict=True):
            curve = {e: _brute_force(store, member, e, name) for e in range(1, EPOCHS + 1)}
            best = min(v["val"] for v in curve.values())
            # The table's epoch is the best by val (up to the brute force's grid resolution).
            assert curve[epoch]["val"] == pytest.approx(best, rel=1e-3)
            tests.append(curve[epoch]["test"])
        assert row["posthoc/test/nll"] == pytest.approx(np.mean(tests), rel=2e-3)


def test_compact_keeps_the_epochs_a_window_needs(trained: Path, tmp_path: Path) -> None:
    path = _copy(trained, tmp_path)
    rows = ["base", "swa+ts", "ckpt+ts", "swa+ckpt+ts"]
    before = pht.selection_table(path, transforms=rows, over="epochs")
    result = compact(path, transforms=["base", "ckpt+ts"])
    store = PredictionStore.open(path)
    for (config, name), row in before.iterrows():
        if name != "ckpt+ts":
            continue
        cfg = "a" if json.loads(config)["lr"] == CONFIGS["a"] else "b"
        for member, epoch in zip((f"{cfg}0", f"{cfg}1"), row["posthoc/epoch"], strict=True):
            window = parse_transform(name).epochs(epoch)
            assert set(window) <= set(store.epochs(member)), (member, name, epoch)
    assert result.n_dropped_files > 0  # something was deleted, yet the table is the same
    after = pht.selection_table(path, transforms=rows, over="epochs")
    pd.testing.assert_frame_equal(before, after)


def test_post_hoc_asha_judges_trials_on_a_checkpoint_ensemble_key(trained: Path) -> None:
    store = PredictionStore.open(trained)
    experiment = Experiment(trained)
    key = "val/ckpt+ts/nll"
    scheduler = PostHocASHA(key, "min", max_t=EPOCHS, grace_period=2, reduction_factor=2)
    experiment.replay(scheduler, concurrency=1)  # later trials meet earlier ones' cutoffs
    decisions = scheduler.decisions
    assert decisions["cutoff"].notna().any()
    # Each judgement is the trial's reported value at the milestone, as replayed from the
    # scan that the tests above check against the brute-force ensemble.
    for _, d in decisions.iterrows():
        group = store.metadata(d["arm"])["group"]
        scores = experiment.curves[group].single["ckpt+ts"][d["arm"]][int(d["milestone"])]
        assert d["value"] == scores[key]


def test_a_large_window_is_announced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("posthoc_tune.reporter.WINDOW_WARNING_BYTES", 1000)
    with pytest.warns(UserWarning, match=r"keep 0\.0 GiB of past logits.*transforms="):
        _train(tmp_path)


def test_plots_draw_checkpoint_ensembles_as_the_members_mean(trained: Path) -> None:
    store = PredictionStore.open(trained)
    stem, figure = next(experiment_figures(trained, transforms=["swa+ts", "ckpt+ts"]))
    cfg = "a" if stem.endswith(store.metadata("a0")["group"]) else "b"
    val_ax = figure.axes[0]
    (line,) = (ln for ln in val_ax.get_lines() if ln.get_label() == "ckpt+ts")
    expected = [
        np.mean([_brute_force(store, f"{cfg}{s}", e, "ckpt+ts")["val"] for s in (0, 1)])
        for e in range(1, EPOCHS + 1)
    ]
    np.testing.assert_allclose(np.asarray(line.get_ydata(), float), np.array(expected), rtol=2e-3)


def test_reporter_transforms_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"transforms \['ens\+ts'\] combine a seed group"):
        _train(tmp_path, transforms=["base", "ens+ts"])
    with pytest.raises(ValueError, match="unknown transform 'ckpt\\+swa'"):
        _train(tmp_path, transforms=["ckpt+swa"])
    with pytest.raises(ValueError, match="non-empty list of names, got 'ckpt'"):
        _train(tmp_path, transforms="ckpt")
