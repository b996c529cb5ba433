import math

import numpy as np
import pytest
import torch

import posthoc_tune as pht
from posthoc_tune import metrics
from tests import reference as ref


def test_hand_computed_values() -> None:
    # Row 0: p = (1/4, 3/4), label 1 (right, conf 0.75). Row 1: p = (3/4, 1/4), label 1 (wrong).
    z = np.array([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    y = np.array([1, 1])
    assert metrics.nll(z, y) == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2, abs=1e-12)
    assert metrics.error(z, y) == 0.5
    # Brier: row 0: 0.25^2 + 0.25^2 = 0.125; row 1: 0.75^2 + 0.75^2 = 1.125.
    assert metrics.brier(z, y) == pytest.approx(0.625, abs=1e-12)
    # Both rows in bin (0.7333, 0.8]: accuracy 0.5, confidence 0.75.
    assert metrics.ece(z, y) == pytest.approx(0.25, abs=1e-12)


def test_ece_bins_are_right_closed() -> None:
    # Confidence exactly 0.8 = 12/15 belongs to bin (11/15, 12/15], with confidence 0.77 (same
    # bin). A left-closed rule would split them and give a different ECE.
    z = np.log(np.array([[0.8, 0.2], [0.77, 0.23]]))
    y = np.array([0, 1])
    expected = abs(0.5 - (0.8 + 0.77) / 2)
    assert metrics.ece(z, y) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("n_classes", [2, 10, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_numpy_reference(n_classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=(500, n_classes))
    y = rng.integers(0, n_classes, size=500)
    got = metrics.evaluate(z, y)
    assert got["nll"] == pytest.approx(ref.nll(z, y), rel=1e-10)
    assert got["error"] == pytest.approx(ref.error(z, y), abs=1e-12)
    assert got["ece"] == pytest.approx(ref.ece(z, y), abs=1e-10)
    assert got["brier"] == pytest.approx(ref.brier(z, y), rel=1e-10)


def test_torch_and_numpy_inputs_agree_and_return_floats() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(size=(64, 5)).astype(np.float32)
    y = rng.integers(0, 5, size=64)
    from_numpy = metrics.evaluate(z, y)
    from_torch = metrics.evaluate(torch.from_numpy(z), torch.from_numpy(y))
    assert from_numpy == from_torch
    assert all(type(v) is float for v in from_numpy.values())


def test_error_breaks_ties_towards_the_first_class() -> None:
    assert metrics.error(np.zeros((3, 4)), np.array([0, 1, 0])) == pytest.approx(1 / 3)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_give_nan_metrics(bad: float) -> None:
    z = np.ones((4, 3))
    z[2, 1] = bad
    result = metrics.evaluate(z, np.array([0, 1, 2, 0]))
    assert all(math.isnan(v) for v in result.values())


def test_bad_input_errors_name_the_value() -> None:
    z = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"class 7, outside \[0, 3\]"):
        metrics.nll(z, np.array([0, 7, 1]))
    with pytest.raises(ValueError, match=r"class -1"):
        metrics.nll(z, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        metrics.nll(z, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"\(n_rows, n_classes\), got \(3,\)"):
        metrics.nll(np.zeros(3), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="empty"):
        metrics.nll(np.zeros((0, 4)), np.array([], dtype=int))
    with pytest.raises(TypeError, match="integer dtype"):
        metrics.nll(z, np.array([0.0, 1.0, 1.0]))
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        metrics.nll([[0.0, 1.0]], np.array([0]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        metrics.evaluate(z, np.array([0, 1, 1]), ["nll", "auc"])


def test_metric_keys_and_names() -> None:
    keys = pht.metric_keys()
    assert len(keys) == len(set(keys)) == 2 * 12 * 4  # 8 transforms of the paper, 4 ckpt
    assert "val/swa+ens+ts/nll" in keys and "test/base/brier" in keys
    split, transform, metric = pht.parse_metric_key("val/swa+ens+ts/nll")
    assert (split, metric) == ("val", "nll")
    assert (transform.swa, transform.ens, transform.ts, transform.variant) == (
        True,
        True,
        True,
        "swa",
    )
    with pytest.raises(ValueError, match=r"unknown transform 'ts\+swa'"):
        pht.parse_metric_key("val/ts+swa/nll")
    with pytest.raises(ValueError, match="unknown metric 'loss'"):
        pht.metric_key("val", "base", "loss")
    with pytest.raises(ValueError, match="not of the form"):
        pht.parse_metric_key("val_base_nll")
