"""Driver-side ensembles from the store, against a brute-force numpy pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from posthoc_tune import EnsembleEvaluator, PredictionStore, ensemble_metrics, ensemble_table
from tests import reference as ref

N_VAL, N_TEST, C, K = 400, 300, 6, 3


@pytest.fixture
def store(tmp_path: Path) -> PredictionStore:
    """Three members, two epochs, both variants; member 2 has no epoch 2."""
    rng = np.random.default_rng(0)
    s = PredictionStore.open(tmp_path / "exp")
    signal = {"val": rng.normal(scale=2.0, size=(N_VAL, C)), "test": rng.normal(size=(N_TEST, C))}
    for split, z in signal.items():
        s.write_labels(split, ref.sample_labels(z, 0.7, rng))
    for k in range(K):
        for epoch in (1, 2):
            if k == 2 and epoch == 2:
                continue
            parts = {
                (split, variant): (z + rng.normal(size=z.shape)) * rng.uniform(0.5, 3.0)
                for split, z in signal.items()
                for variant in ("base", "swa")
            }
            temps = {v: ref.grid_temperature(parts[("val", v)], s.labels("val")) for v in ("base",)}
            s.write_epoch(f"m{k}", epoch, parts, temps)  # swa has no recorded temperature
    return s


def _expected(
    store: PredictionStore, members: list[str], epoch: int, variant: str, how: str, final: bool
) -> dict[str, float]:
    val = [store.read(m, epoch, "val", variant) for m in members]
    test = [store.read(m, epoch, "test", variant) for m in members]
    y_val, y_test = store.labels("val"), store.labels("test")
    ev, et = ref.ensemble(val, test, y_val, how=how, final_ts=final)
    out = {}
    for split, z, y in (("val", ev, y_val), ("test", et, y_test)):
        out[f"{split}/nll"] = ref.nll(z, y)
        out[f"{split}/error"] = ref.error(z, y)
        out[f"{split}/brier"] = ref.brier(z, y)
    return out


@pytest.mark.parametrize("how", ["logits", "probs"])
@pytest.mark.parametrize("transform", ["ens", "ens+ts", "swa+ens", "swa+ens+ts"])
def test_ensemble_metrics_equal_the_brute_force_pipeline(
    store: PredictionStore, transform: str, how: str
) -> None:
    used, values = ensemble_metrics(store, ["m1", "m0", "m2"], 1, transform, ensemble=how)  # type: ignore[arg-type]
    assert used == ("m0", "m1", "m2")
    variant = "swa" if transform.startswith("swa") else "base"
    expected = _expected(store, list(used), 1, variant, how, transform.endswith("+ts"))
    assert set(values) == {
        f"{s}/{transform}/{m}" for s in ("val", "test") for m in ("nll", "error", "ece", "brier")
    }
    for name, value in expected.items():
        split, metric = name.split("/")
        got = values[f"{split}/{transform}/{metric}"]
        if metric == "error":  # an argmax can flip where the grid and Newton temperatures differ
            assert got == pytest.approx(value, abs=2 / N_VAL)
        else:
            assert got == pytest.approx(value, rel=2e-3)


def test_members_without_the_epoch_are_left_out(store: PredictionStore) -> None:
    used, values = ensemble_metrics(store, ["m0", "m1", "m2"], 2, "ens+ts")
    assert used == ("m0", "m1")
    expected = _expected(store, ["m0", "m1"], 2, "base", "logits", True)
    assert values["val/ens+ts/nll"] == pytest.approx(expected["val/nll"], rel=2e-3)
    used, values = ensemble_metrics(store, ["m0"], 7, "ens+ts")
    assert used == () and np.isnan(values["val/ens+ts/nll"])
    with pytest.raises(ValueError, match="'swa\\+ts' is per-trial"):
        ensemble_metrics(store, ["m0"], 1, "swa+ts")


def test_evaluator_caches_persists_and_reloads(store: PredictionStore) -> None:
    evaluator = EnsembleEvaluator(store)
    first = evaluator.evaluate("g", 1, ["m0", "m1", "m2"], "swa+ens+ts")
    assert evaluator.evaluate("g", 1, ["m2", "m1", "m0"], "swa+ens+ts") is first  # cached
    fewer = evaluator.evaluate("g", 1, ["m0", "m1"], "swa+ens+ts")  # a member errored
    assert fewer.n_members == 2 and fewer.values != first.values
    evaluator.evaluate("g", 2, ["m0", "m1", "m2"], "swa+ens+ts")

    table = ensemble_table(store)
    assert list(table.columns) == [
        "group",
        "epoch",
        "transform",
        "combiner",
        "n_members",
        "members",
        "key",
        "value",
    ]
    assert sorted(set(zip(table["epoch"], table["n_members"], strict=True))) == [(1, 2), (2, 2)]
    row = table[(table["epoch"] == 1) & (table["key"] == "val/swa+ens+ts/nll")].iloc[0]
    assert row["members"] == ["m0", "m1"] and row["value"] == fewer.values["val/swa+ens+ts/nll"]
    assert evaluator.table().shape == table.shape

    restarted = EnsembleEvaluator(store)
    assert restarted.load() == 2
    for member in ("m0", "m1"):  # a loaded value is not recomputed: it needs no logits
        store.delete_epochs(member, [1])
    again = restarted.evaluate("g", 1, ["m0", "m1"], "swa+ens+ts")
    assert again.values == fewer.values and again.members == ("m0", "m1")
    assert EnsembleEvaluator(store, ensemble="probs").load() == 0  # another combiner's values
    with pytest.raises(ValueError, match="unknown ensemble combiner 'mean'"):
        EnsembleEvaluator(store, ensemble="mean")  # type: ignore[arg-type]
