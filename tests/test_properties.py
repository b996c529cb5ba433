"""Property tests (hypothesis) for bad and extreme input: metrics, temperature scaling, ensemble
combiners, the prediction store, and the NaN-ranks-worst rule of the decision code.

Every property runs >= 500 derandomized examples with no example database, so CI sees the same
examples on every run. Expected values come from ``tests/reference.py`` (plain float64 numpy)
or are computed here from the definitions, never from the library's own code paths.

Documented behaviours asserted here (see the module docstrings):

* metrics: any NaN or +-inf logit means a diverged model and every metric is ``nan``; malformed
  input (shapes, labels, dtypes, empty splits) raises ``ValueError``/``TypeError`` naming it.
  Elementwise work runs in float64 for float64 and integer logits, in float32 otherwise.
* TemperatureScaler: non-finite logits fall back to ``T = 1`` with a ``RuntimeWarning``.
* combine: a member with a NaN or +-inf logit makes the affected rows of the ensemble
  non-finite, so the ensemble's metrics are NaN like the member's.
* Bracket (ASHA rungs): a NaN score stops whenever the rung holds a finite value; the cutoff
  ignores NaN values. ``curves.argbest`` ignores non-finite values.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from posthoc_tune import PredictionStore, TemperatureScaler, apply_transform, combine, metrics
from posthoc_tune._rungs import Bracket
from posthoc_tune.curves import argbest
from tests import reference as ref

PROPERTY = settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
"""Reproducible in CI: the same 500 examples on every run, nothing read from or saved to disk."""

MAX_ROWS, MAX_CLASSES, MAX_MEMBERS = 64, 12, 5
EPS32 = float(np.finfo(np.float32).eps)
F32_1E30 = float(np.float32(1e30))
F16_MAX = 65504.0
F16_OVERFLOW = 65520.0  # the smallest magnitude that rounds to inf in float16

METRIC_FUNCTIONS: dict[str, Callable[[Any, Any], float]] = {
    "nll": metrics.nll,
    "error": metrics.error,
    "ece": metrics.ece,
    "brier": metrics.brier,
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Thousands of calls on arrays of at most 64 x 12: handing each op to a second thread costs
    far more than the math (40x on a busy two-core machine). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- strategies ------------------------------------------------------------------------------


@st.composite
def shapes(draw: st.DrawFn, max_rows: int = MAX_ROWS) -> tuple[int, int]:
    return draw(st.integers(1, max_rows)), draw(st.integers(2, MAX_CLASSES))


@st.composite
def labels_for(draw: st.DrawFn, n: int, c: int) -> np.ndarray:
    return draw(hnp.arrays(np.int64, n, elements=st.integers(0, c - 1)))


@st.composite
def finite32(draw: st.DrawFn, bound: float | None = None) -> np.ndarray:
    """Finite float32 logits of a random shape, magnitudes up to ``bound`` (drawn if None)."""
    n, c = draw(shapes())
    if bound is None:
        bound = draw(st.sampled_from([1.0, 30.0, 1e4, 1e30]))
    bound = float(np.float32(bound))  # the nearest float32: hypothesis wants exact bounds
    elements = st.floats(-bound, bound, width=32)
    return draw(hnp.arrays(np.float32, (n, c), elements=elements))


@st.composite
def logits_and_labels(draw: st.DrawFn, bound: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    z = draw(finite32(bound))
    return z, draw(labels_for(*z.shape))


def spread(z: np.ndarray) -> float:
    """The largest within-row logit difference: what log-softmax rounding scales with."""
    z = np.asarray(z, np.float64)
    return float((z.max(axis=1) - z.min(axis=1)).max())


def ref_log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


# -- 1. metrics ------------------------------------------------------------------------------


@PROPERTY
@given(data=logits_and_labels(), wide=st.booleans(), as_torch=st.booleans())
def test_metrics_match_the_reference_and_stay_in_range(
    data: tuple[np.ndarray, np.ndarray], wide: bool, as_torch: bool
) -> None:
    """float32 and float64 logits (float32-representable values, so that ties and near-ties
    survive the float64 reference), numpy or torch: each metric equals the float64 reference
    within the rounding of the input's precision, and lies in its mathematical range."""
    z, y = data
    x: Any = z.astype(np.float64) if wide else z
    eps = 1e-15 if wide else EPS32
    got = metrics.evaluate(torch.from_numpy(x) if as_torch else x, y)
    assert set(got) == {"nll", "error", "ece", "brier"}
    assert all(type(v) is float for v in got.values())

    scale = spread(z) + 3.0
    assert got["nll"] == pytest.approx(ref.nll(z, y), rel=0, abs=16 * eps * scale)
    assert got["error"] == ref.error(z, y)  # the argmax of the logits, first index on ties
    assert got["brier"] == pytest.approx(ref.brier(z, y), rel=0, abs=64 * eps * MAX_CLASSES)
    assert got["nll"] >= 0.0
    assert 0.0 <= got["error"] <= 1.0
    assert 0.0 <= got["brier"] <= 2.0
    assert 0.0 <= got["ece"] <= 1.0
    assert got["error"] * len(y) == pytest.approx(round(got["error"] * len(y)), abs=1e-9)

    # ECE bins rows by confidence: compare only where no confidence sits on a bin edge (within
    # rounding) and the reference's float64 probabilities keep the logits' argmax.
    p = ref.softmax(z)
    edge = np.abs(p.max(axis=1) * 15 - np.round(p.max(axis=1) * 15)).min()
    if edge > 1e3 * eps and np.array_equal(p.argmax(axis=1), z.argmax(axis=1)):
        assert got["ece"] == pytest.approx(ref.ece(z, y), rel=0, abs=64 * eps * MAX_CLASSES)


@PROPERTY
@given(
    data=logits_and_labels(bound=1e4),
    name=st.sampled_from(sorted(METRIC_FUNCTIONS)),
)
def test_single_metric_functions_equal_evaluate(
    data: tuple[np.ndarray, np.ndarray], name: str
) -> None:
    """Each single-metric function returns exactly what ``evaluate`` returns for it."""
    z, y = data
    assert METRIC_FUNCTIONS[name](z, y) == metrics.evaluate(z, y)[name]
    assert metrics.evaluate(z, y, [name]) == {name: metrics.evaluate(z, y)[name]}


_INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16]


@st.composite
def extreme_logits(draw: st.DrawFn) -> tuple[np.ndarray, str]:
    """Logits at the edges of their dtype: every finite float16, float32 up to +-1e30 and up to
    the float32 maximum, float64 up to +-1e300, and integers of any width and value."""
    n, c = draw(shapes())
    kind = draw(st.sampled_from(["float16", "float32", "float32max", "float64", "int"]))
    if kind == "float16":
        z = draw(
            hnp.arrays(
                np.float16,
                (n, c),
                elements=st.floats(width=16, allow_nan=False, allow_infinity=False),
            )
        )
    elif kind == "float32":
        z = draw(hnp.arrays(np.float32, (n, c), elements=st.floats(-F32_1E30, F32_1E30, width=32)))
    elif kind == "float32max":
        finite = st.floats(width=32, allow_nan=False, allow_infinity=False)
        z = draw(hnp.arrays(np.float32, (n, c), elements=finite))
    elif kind == "float64":
        z = draw(hnp.arrays(np.float64, (n, c), elements=st.floats(-1e300, 1e300)))
    else:
        z = draw(hnp.arrays(draw(st.sampled_from(_INT_DTYPES)), (n, c)))
    return z, kind


@PROPERTY
@given(data=extreme_logits(), seed=st.integers(0, 2**16))
def test_extreme_logits_never_give_nan(data: tuple[np.ndarray, str], seed: int) -> None:
    """Finite logits of any dtype and magnitude never give NaN. NLL is finite whenever its
    row terms fit the working precision (float64 for float64 and integer logits, float32 for
    float16/float32): always for float16, integers, float32 up to 1e30 and float64 up to 1e300.
    Only float32 logits whose within-row spread exceeds the float32 maximum (~3.4e38) may give
    ``+inf`` (the true label's log-probability underflows to -inf). Error is exact against the
    reference on the input's own values (integers included), since it needs no rounding."""
    z, kind = data
    n, c = z.shape
    y = np.asarray(np.random.default_rng(seed).integers(0, c, size=n))
    got = metrics.evaluate(z, y)
    assert not any(math.isnan(v) for v in got.values()), got
    assert got["nll"] >= 0.0
    if kind == "float32max" and spread(z) > float(np.finfo(np.float32).max):
        assert got["nll"] == math.inf or math.isfinite(got["nll"])
    else:
        assert math.isfinite(got["nll"]), got
        # Row terms are exact to the working precision relative to the spread.
        eps = EPS32 if kind in ("float16", "float32", "float32max") else 1e-15
        assert got["nll"] == pytest.approx(ref.nll(z, y), rel=16 * eps, abs=16 * eps * 3)
    assert got["error"] == ref.error(z.astype(np.float64), y)
    assert 0.0 <= got["brier"] <= 2.0 and 0.0 <= got["ece"] <= 1.0


@st.composite
def with_non_finite(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Finite logits with one to a few entries replaced by NaN, +inf or -inf."""
    z, y = draw(logits_and_labels())
    z = z.copy()
    n, c = z.shape
    for _ in range(draw(st.integers(1, 3))):
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, c - 1))
        z[i, j] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return z, y


@PROPERTY
@given(data=with_non_finite(), wide=st.booleans())
def test_non_finite_logits_give_nan_for_every_metric(
    data: tuple[np.ndarray, np.ndarray], wide: bool
) -> None:
    """Documented contract (metrics module): one NaN or +-inf logit means the model diverged
    and every metric is NaN; selection then ranks it worst (tested below)."""
    z, y = data
    got = metrics.evaluate(z.astype(np.float64) if wide else z, y)
    assert all(math.isnan(v) for v in got.values()), got
    for f in METRIC_FUNCTIONS.values():
        assert math.isnan(f(z, y))


BadCase = tuple[Any, Any, type[Exception], str]


@st.composite
def malformed(draw: st.DrawFn) -> BadCase:
    """One corruption of otherwise valid (logits, labels) and the error it must raise: type and
    a regex that names the problem. Logits may also hold a NaN: a malformed call must raise,
    never hide behind the NaN-metrics rule."""
    z, y = draw(logits_and_labels(bound=1e4))
    n, c = z.shape
    if draw(st.booleans()):
        z = z.copy()
        z[draw(st.integers(0, n - 1)), draw(st.integers(0, c - 1))] = math.nan
    kind = draw(
        st.sampled_from(
            [
                "label_high",
                "label_negative",
                "label_count",
                "labels_2d",
                "labels_empty",
                "logits_1d",
                "logits_3d",
                "one_class",
                "no_class",
                "empty",
                "float_labels",
                "bool_labels",
                "bool_logits",
                "complex_logits",
                "list_logits",
                "list_labels",
                "object_logits",
                "object_labels",
                "string_labels",
            ]
        )
    )
    y = y.copy()
    i = draw(st.integers(0, n - 1))
    if kind == "label_high":
        y[i] = bad = c + draw(st.integers(0, 10**6))
        return z, y, ValueError, rf"labels contain class {bad}, outside \[0, {c - 1}\]"
    if kind == "label_negative":
        y[i] = bad = -draw(st.integers(1, 10**6))
        return z, y, ValueError, rf"labels contain class {bad}, outside \[0, {c - 1}\]"
    if kind == "label_count":
        m = draw(st.integers(1, MAX_ROWS + 3).filter(lambda m: m != n))
        y = np.resize(y, m)
        return (
            z,
            y,
            ValueError,
            rf"labels must have shape \({n},\) to match the logits, got \({m},\)",
        )
    if kind == "labels_2d":
        return z, y[:, None], ValueError, rf"labels must have shape \({n},\).*got \({n}, 1\)"
    if kind == "labels_empty":
        return z, y[:0], ValueError, rf"labels must have shape \({n},\).*got \(0,\)"
    if kind == "logits_1d":
        return (
            z[:, 0],
            y,
            ValueError,
            rf"logits must have shape \(n_rows, n_classes\), got \({n},\)",
        )
    if kind == "logits_3d":
        return z[None], y, ValueError, rf"\(n_rows, n_classes\), got \(1, {n}, {c}\)"
    if kind == "one_class":
        return z[:, :1], y * 0, ValueError, rf"at least 2 classes, got shape \({n}, 1\)"
    if kind == "no_class":
        return z[:, :0], y * 0, ValueError, rf"at least 2 classes, got shape \({n}, 0\)"
    if kind == "empty":
        return z[:0], y[:0], ValueError, r"logits is empty \(0 rows\)"
    if kind == "float_labels":
        return z, y + 0.5, TypeError, r"labels must have an integer dtype, got torch.float64"
    if kind == "bool_labels":
        return z, y > 0, TypeError, r"labels must have an integer dtype, got torch.bool"
    if kind == "bool_logits":
        return z > 0, y, TypeError, r"logits must have a real numeric dtype, got torch.bool"
    if kind == "complex_logits":
        return z + 1j, y, TypeError, r"logits must have a real numeric dtype, got torch.complex"
    if kind == "list_logits":
        return z.tolist(), y, TypeError, r"logits must be a numpy array or torch tensor, got list"
    if kind == "list_labels":
        return z, y.tolist(), TypeError, r"labels must be a numpy array or torch tensor, got list"
    if kind == "object_logits":
        return z.astype(object), y, TypeError, r"logits .*dtype.*object"
    if kind == "object_labels":
        return z, y.astype(object), TypeError, r"labels .*dtype.*object"
    assert kind == "string_labels"
    return z, y.astype(str), TypeError, r"labels .*dtype.*<U"


@settings(PROPERTY, max_examples=1000)
@given(case=malformed(), entry=st.sampled_from(["nll", "error", "ece", "brier", "evaluate", "ts"]))
def test_malformed_input_raises_a_clear_error(case: BadCase, entry: str) -> None:
    """Malformed input raises ValueError/TypeError whose message names the bad value and what
    was expected, from every metric entry point and from TemperatureScaler.fit; never NaN."""
    z, y, exc, message = case
    with pytest.raises(exc, match=message):
        if entry == "evaluate":
            metrics.evaluate(z, y)
        elif entry == "ts":
            TemperatureScaler().fit(z, y)
        else:
            METRIC_FUNCTIONS[entry](z, y)


# -- 2. temperature scaling ------------------------------------------------------------------

_T_GRID = np.exp(np.linspace(np.log(0.01), np.log(100.0), 141))


def _ts_tolerance(z: np.ndarray, nll_at_1: float) -> float:
    """Rounding of the float32 objective: NLL terms scale with the spread over T (T >= 0.01)."""
    return 1e-5 * (1.0 + nll_at_1) + 8 * EPS32 * spread(z) * 100


@PROPERTY
@given(data=logits_and_labels())
def test_temperature_scaling_is_finite_optimal_and_never_worse(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    """For any finite float32 logits (|z| up to 1e30): the fitted temperature is finite, within
    the bounds and never NaN; the fit converges (no fallback); the val NLL after TS is no worse
    than at T = 1 and no worse than any point of a 141-point log grid over the bounds (up to the
    documented stopping tolerance); and the transform keeps every row's winning class a
    maximum."""
    z, y = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning here is a failure
        scaler = TemperatureScaler().fit(z, y)
    t = scaler.temperature_
    assert math.isfinite(t) and 0.01 <= t <= 100.0
    assert scaler.converged_ and not scaler.fallback_
    z64 = z.astype(np.float64)
    nll_1 = ref.nll(z64, y)
    nll_t = ref.nll(z64 / t, y)
    tol = _ts_tolerance(z, nll_1)
    assert nll_t <= nll_1 + tol
    # The fit stops where |dNLL/dlog T| < tol_newton (documented), not at the exact optimum.
    # NLL is convex in b = 1/T with dNLL/db = -T dNLL/dlog T, so a grid point b_g can beat the
    # fit by at most tol_newton * T * |b_g - 1/T| (plus float32 rounding).
    grid_nll = np.array([ref.nll(z64 / g, y) for g in _T_GRID])
    slack = scaler.tol * t * np.abs(1 / _T_GRID - 1 / t)
    assert (nll_t <= grid_nll + slack + tol).all()
    out = scaler.transform(z)
    assert out.dtype == z.dtype and out.shape == z.shape
    winners = z.argmax(axis=1)
    rows = np.arange(len(z))
    # Division may merge near-ties (float rounding) but never demotes the winner.
    assert np.array_equal(out[rows, winners], out.max(axis=1))


@st.composite
def calibration_data(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Logits with labels drawn from softmax(z / T_true): an interior NLL optimum is likely."""
    n, c = draw(st.integers(16, MAX_ROWS)), draw(st.integers(2, MAX_CLASSES))
    z = draw(hnp.arrays(np.float32, (n, c), elements=st.floats(-10, 10, width=32)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return z, ref.sample_labels(z, draw(st.floats(0.3, 3.0)), rng)


@PROPERTY
@given(data=calibration_data(), c=st.floats(0.1, 10.0))
def test_temperature_scales_with_the_logits(data: tuple[np.ndarray, np.ndarray], c: float) -> None:
    """Scale invariance: the NLL-optimal temperature of ``c * z`` is ``c`` times that of ``z``
    when both optima lie inside the bounds; the two fits reach the same NLL."""
    z, y = data
    z64 = z.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = TemperatureScaler().fit(z, y).temperature_
        zc = (z64 * c).astype(np.float32)
        tc = TemperatureScaler().fit(zc, y).temperature_
    assume(0.02 < t < 50 and 0.02 < t * c < 50 and 0.02 < tc < 50)
    nll_t, nll_tc = ref.nll(z64 / t, y), ref.nll(zc.astype(np.float64) / tc, y)
    assert nll_tc == pytest.approx(nll_t, rel=1e-5, abs=1e-5)

    # Where the optimum is curved enough to pin T down (second derivative in log T), the
    # temperatures themselves agree.
    def f(u: float) -> float:
        return ref.nll(z64 * math.exp(-u), y)

    u, h = math.log(t), 1e-2
    curvature = (f(u + h) - 2 * f(u) + f(u - h)) / h**2
    if curvature > 1e-2:
        assert math.log(tc) == pytest.approx(math.log(c * t), abs=1e-2)


@PROPERTY
@given(data=with_non_finite(), warm=st.booleans())
def test_non_finite_logits_fall_back_to_t_one(
    data: tuple[np.ndarray, np.ndarray], warm: bool
) -> None:
    """Documented fallback: NaN or +-inf logits give T = 1 (never NaN) with a RuntimeWarning,
    transform is then the identity; a warm-started scaler recovers on the next finite fit."""
    z, y = data
    scaler = TemperatureScaler(warm_start=warm)
    with pytest.warns(RuntimeWarning, match=r"fell back to T=1: logits contain NaN or inf"):
        scaler.fit(z, y)
    assert scaler.temperature_ == 1.0 and scaler.fallback_ and not scaler.converged_
    np.testing.assert_array_equal(scaler.transform(z), z)
    finite = np.nan_to_num(z, nan=0.0, posinf=5.0, neginf=-5.0)
    scaler.fit(finite, y)
    assert scaler.converged_ and not scaler.fallback_
    cold = TemperatureScaler().fit(finite, y)
    assert scaler.temperature_ == pytest.approx(cold.temperature_, rel=1e-3)


# -- 3. ensemble combiners -------------------------------------------------------------------


@st.composite
def members(draw: st.DrawFn, bound: float = 50.0) -> list[np.ndarray]:
    """Two to MAX_MEMBERS float32 members of one shape (up to 32 rows: K arrays to generate)."""
    n, c = draw(shapes(max_rows=MAX_ROWS // 2))
    k = draw(st.integers(2, MAX_MEMBERS))
    elements = st.floats(-bound, bound, width=32)
    return [draw(hnp.arrays(np.float32, (n, c), elements=elements)) for _ in range(k)]


def ref_combine(parts: list[np.ndarray], how: str) -> np.ndarray:
    stacked = np.stack([np.asarray(p, np.float64) for p in parts])
    if how == "logits":
        return stacked.mean(axis=0)
    return np.log(np.mean([ref.softmax(p) for p in stacked], axis=0))


@PROPERTY
@given(parts=members(), how=st.sampled_from(["logits", "probs"]), data=st.data())
def test_combine_matches_reference_and_ignores_member_order(
    parts: list[np.ndarray], how: str, data: st.DataObject
) -> None:
    """Both combiners equal the definition (mean of logits; log of the mean probability), do
    not depend on the members' order, keep float32, and the probability combiner returns
    normalised log-probabilities."""
    out = combine(parts, how)  # type: ignore[arg-type]
    assert out.dtype == np.float32 and out.shape == parts[0].shape
    np.testing.assert_allclose(out, ref_combine(parts, how), rtol=1e-6, atol=1e-5)
    order = data.draw(st.permutations(range(len(parts))))
    np.testing.assert_allclose(
        combine([parts[i] for i in order], how),  # type: ignore[arg-type]
        out,
        rtol=1e-6,
        atol=1e-6,
    )
    if how == "probs":
        lse = np.log(np.exp(out.astype(np.float64)).sum(axis=1))
        np.testing.assert_allclose(lse, 0.0, atol=1e-5)
    as_torch = combine([torch.from_numpy(p) for p in parts], how)  # type: ignore[arg-type]
    assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.float32
    np.testing.assert_array_equal(as_torch.numpy(), out)


@PROPERTY
@given(z=finite32(), k=st.integers(1, MAX_MEMBERS))
def test_one_member_and_identical_members(z: np.ndarray, k: int) -> None:
    """One member is itself (logits) or its log-softmax (probs); K identical members equal
    one member, in probability space for both combiners. Logits up to +-1e30."""
    single = combine([z], "logits")
    np.testing.assert_array_equal(single, z)
    tol = 16 * EPS32 * (spread(z) + 3)
    np.testing.assert_allclose(combine([z], "probs"), ref_log_softmax(z), rtol=0, atol=tol)
    same = [z.copy() for _ in range(k)]
    for how in ("logits", "probs"):
        out = combine(same, how)
        assert np.isfinite(out).all()
        np.testing.assert_allclose(ref.softmax(out), ref.softmax(z), rtol=0, atol=1e-5)
    np.testing.assert_allclose(combine(same, "logits"), z, rtol=1e-6, atol=0)


@PROPERTY
@given(
    a=shapes(),
    b=shapes(),
    k=st.integers(0, MAX_MEMBERS - 2),
    how=st.sampled_from(["logits", "probs"]),
)
def test_members_of_different_shapes_are_rejected(
    a: tuple[int, int], b: tuple[int, int], k: int, how: str
) -> None:
    """Class-count (or row-count) mismatch between members raises a ValueError listing both
    shapes, from combine and from apply_transform's ensemble path; an empty member list and an
    unknown combiner are errors too."""
    assume(a != b)
    parts = [np.zeros(a, np.float32)] * (k + 1) + [np.zeros(b, np.float32)]
    shapes_text = re.escape(str(sorted({a, b})))
    with pytest.raises(
        ValueError, match=r"must share one \(n_rows, n_classes\) shape, got " + shapes_text
    ):
        combine(parts, how)  # type: ignore[arg-type]
    n = min(a[0], b[0])
    labels = np.zeros(n, np.int64)
    same_rows = [p[:n] for p in parts]
    if a[1] != b[1]:
        with pytest.raises(ValueError, match=r"must share one \(n_rows, n_classes\) shape"):
            apply_transform("ens", same_rows, labels, ensemble=how)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one member, got an empty sequence"):
        combine([], how)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown combiner 'median'"):
        combine(parts[:1], "median")  # type: ignore[arg-type]


@PROPERTY
@given(parts=members(bound=1e4), how=st.sampled_from(["logits", "probs"]), data=st.data())
def test_a_non_finite_member_is_never_hidden(
    parts: list[np.ndarray], how: str, data: st.DataObject
) -> None:
    """A member with a NaN or +-inf logit (diverged, so its own metrics are NaN) makes the
    affected ensemble rows non-finite, so the ensemble's metrics are NaN too: a diverged member
    can never steer a decision through a finite-looking ensemble. Other rows are unaffected."""
    parts = [p.copy() for p in parts]
    n, c = parts[0].shape
    bad_rows = set()
    for _ in range(data.draw(st.integers(1, 3))):
        m = data.draw(st.integers(0, len(parts) - 1))
        i, j = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, c - 1))
        parts[m][i, j] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        bad_rows.add(i)
    y = np.zeros(n, np.int64)
    assert any(math.isnan(metrics.nll(p, y)) for p in parts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = combine(parts, how)  # type: ignore[arg-type]
    finite_rows = np.isfinite(out).all(axis=1)
    for i in range(n):
        assert finite_rows[i] == (i not in bad_rows), (i, out[i])
    assert all(math.isnan(v) for v in metrics.evaluate(out, y).values())


# -- 4. prediction store ---------------------------------------------------------------------

_counter = itertools.count()


def _fresh(root: Path) -> PredictionStore:
    return PredictionStore.open(root / f"ex{next(_counter)}")


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("properties")


@st.composite
def epoch_parts(
    draw: st.DrawFn, elements: st.SearchStrategy[float]
) -> dict[tuple[str, str], np.ndarray]:
    """One to four (split, variant) parts of one epoch: per-split row counts (up to 32: up to
    four arrays to generate), one class count."""
    c = draw(st.integers(2, MAX_CLASSES))
    rows = {"val": draw(st.integers(1, MAX_ROWS // 2)), "test": draw(st.integers(1, MAX_ROWS // 2))}
    keys = draw(
        st.lists(
            st.sampled_from([("val", "base"), ("val", "swa"), ("test", "base"), ("test", "swa")]),
            min_size=1,
            max_size=4,
            unique=True,
        )
    )
    return {(s, v): draw(hnp.arrays(np.float32, (rows[s], c), elements=elements)) for s, v in keys}


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


@PROPERTY
@given(parts=epoch_parts(st.floats(width=32)), epoch=st.integers(1, 999_999))
def test_float32_store_round_trip_is_bit_exact(
    store_root: Path, parts: dict[tuple[str, str], np.ndarray], epoch: int
) -> None:
    """Any float32 logits (NaN, +-inf, -0.0, subnormals, extremes) read back bit for bit, from
    every read path, as float32."""
    store = _fresh(store_root)
    trial = f"t{next(_counter)}"
    store.write_epoch(trial, epoch, parts)
    assert store.epochs(trial) == [epoch]
    back = store.read_epoch(trial, epoch)
    assert back.keys() == parts.keys()
    for (split, variant), arr in parts.items():
        got = back[(split, variant)]
        assert got.dtype == np.float32 and got.shape == arr.shape
        np.testing.assert_array_equal(_bits(got), _bits(arr))
    # The single-part read paths (one row group each), on one part per example.
    (split, variant), arr = next(iter(parts.items()))
    np.testing.assert_array_equal(_bits(store.read(trial, epoch, split, variant)), _bits(arr))
    got = store.read_variant(trial, epoch, variant, [split]).logits[split]
    np.testing.assert_array_equal(_bits(got), _bits(arr))


@PROPERTY
@given(parts=epoch_parts(st.floats(width=32)))
def test_float16_store_rounds_and_overflows_as_documented(
    store_root: Path, parts: dict[tuple[str, str], np.ndarray]
) -> None:
    """A float16 store reads back float32 values within float16 rounding (half a float16 ulp:
    relative 2**-11, absolute 2**-25 below the normal range); magnitudes from 65520 on (those
    that round beyond the float16 maximum 65504) become +-inf of the same sign; NaN stays
    NaN."""
    store = PredictionStore.open(store_root / f"f16_{next(_counter)}", dtype="float16")
    trial = f"t{next(_counter)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflow-in-cast
        store.write_epoch(trial, 1, parts)
    back = store.read_epoch(trial, 1)
    for key, arr in parts.items():
        got = back[key]
        assert got.dtype == np.float32
        x = arr.astype(np.float64)
        g = got.astype(np.float64)
        nan = np.isnan(x)
        np.testing.assert_array_equal(np.isnan(g), nan)
        overflow = np.abs(x) >= F16_OVERFLOW
        assert (np.isinf(g[overflow]) & (np.sign(g[overflow]) == np.sign(x[overflow]))).all()
        ok = ~nan & ~overflow
        assert (np.abs(g[ok]) <= F16_MAX).all()
        err = np.abs(g[ok] - x[ok])
        assert (err <= np.maximum(np.abs(x[ok]) * 2.0**-11, 2.0**-25)).all()


_ID_CHARS = "abcXYZ019_.-"


@st.composite
def bad_trial_ids(draw: st.DrawFn) -> object:
    kind = draw(st.sampled_from(["empty", "slash", "dotdot", "start", "long", "char", "other"]))
    good = draw(st.text(_ID_CHARS, min_size=0, max_size=20).map(lambda s: "a" + s))
    if kind == "empty":
        return ""
    if kind == "slash":
        return good + draw(st.sampled_from(["/", "\\", "/../x", "/x"])) + good
    if kind == "dotdot":
        return draw(st.sampled_from(["..", "../x", "a/../../etc", good + ".." + good]))
    if kind == "start":
        return draw(st.sampled_from(".-_")) + good
    if kind == "long":
        return "a" * draw(st.integers(129, 300))
    if kind == "char":
        # Any character outside the allowed set (a trailing newline, too).
        bad = draw(st.characters().filter(lambda ch: not re.fullmatch(r"[A-Za-z0-9_.\-]", ch)))
        return good + bad + draw(st.text(_ID_CHARS, min_size=1, max_size=5))
    return draw(st.sampled_from([None, 1, 1.5, b"abc", ["a"], ("a",)]))


@PROPERTY
@given(trial=bad_trial_ids())
def test_bad_trial_ids_are_rejected_before_touching_the_filesystem(
    store_root: Path, trial: object
) -> None:
    """Path traversal, separators, empty, over-long, odd characters and non-strings raise a
    ValueError naming the id and the allowed pattern, from writes and reads alike."""
    store = PredictionStore.open(store_root / "ids")
    parts = {("val", "base"): np.zeros((2, 3), np.float32)}
    message = r"invalid trial id .*expected 1-128 characters from \[A-Za-z0-9_.-\]"
    for call in (
        lambda: store.write_epoch(trial, 1, parts),  # type: ignore[arg-type]
        lambda: store.write_metadata(trial, {"seed": 0}),  # type: ignore[arg-type]
        lambda: store.read(trial, 1, "val", "base"),  # type: ignore[arg-type]
        lambda: store.epochs(trial),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match=message):
            call()
    assert not Path(store.experiment_path).exists()  # nothing was created anywhere


@PROPERTY
@given(
    trial=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z").filter(lambda s: ".." not in s)
)
def test_every_documented_trial_id_round_trips(store_root: Path, trial: str) -> None:
    store = _fresh(store_root)
    store.write_epoch(trial, 7, {("val", "base"): np.ones((1, 2), np.float32)})
    store.write_metadata(trial, {"seed": 3})
    assert store.trials() == [trial]
    assert store.epochs(trial) == [7]
    assert store.metadata(trial)["seed"] == 3


@st.composite
def bad_epochs(draw: st.DrawFn) -> object:
    return draw(
        st.one_of(
            st.integers(max_value=0),
            st.integers(min_value=10**6),
            st.booleans(),
            st.floats(),
            st.integers(1, 10).map(float),
            st.sampled_from([None, "1", np.bool_(True), np.float64(2.0), [1]]),
        )
    )


@PROPERTY
@given(epoch=bad_epochs())
def test_bad_epochs_are_rejected(store_root: Path, epoch: object) -> None:
    store = PredictionStore.open(store_root / "epochs")
    parts = {("val", "base"): np.zeros((2, 3), np.float32)}
    message = r"epoch must be an int in \[1, 999999\] \(epochs count from 1\), got "
    for call in (
        lambda: store.write_epoch("t", epoch, parts),  # type: ignore[arg-type]
        lambda: store.read_epoch("t", epoch),  # type: ignore[arg-type]
        lambda: store.temperatures("t", epoch),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match=message + re.escape(repr(epoch))):
            call()


@PROPERTY
@given(epoch=st.one_of(st.integers(1, 999_999), st.integers(1, 999_999).map(np.int32)))
def test_valid_epochs_of_any_integer_type_are_accepted(store_root: Path, epoch: int) -> None:
    store = PredictionStore.open(store_root / "valid_epochs")
    trial = f"t{next(_counter)}"
    store.write_epoch(trial, epoch, {("test", "swa"): np.ones((1, 2), np.float32)})
    assert store.epochs(trial) == [int(epoch)]


@PROPERTY
@given(
    labels=hnp.arrays(np.int64, st.integers(1, MAX_ROWS), elements=st.integers(0, MAX_CLASSES)),
    other=hnp.arrays(np.int64, st.integers(1, MAX_ROWS), elements=st.integers(0, MAX_CLASSES)),
    rows=st.integers(1, MAX_ROWS + 2),
    classes=st.integers(2, MAX_CLASSES + 2),
    split=st.sampled_from(["val", "test"]),
)
def test_logits_that_do_not_fit_the_stored_labels_are_rejected(
    store_root: Path,
    labels: np.ndarray,
    other: np.ndarray,
    rows: int,
    classes: int,
    split: str,
) -> None:
    """Once a split's labels are stored, logits must have its row count and more classes than
    its largest label; other labels for the split are rejected; nothing bad is written."""
    store = _fresh(store_root)
    store.write_labels(split, labels)
    store.write_labels(split, labels.copy())  # identical labels: a no-op
    logits = np.zeros((rows, classes), np.float32)
    fits = rows == len(labels) and classes > labels.max()
    if fits:
        store.write_epoch("t", 1, {(split, "base"): logits})
        np.testing.assert_array_equal(store.read("t", 1, split, "base"), logits)
    else:
        message = (
            rf"{split}/base logits of shape \({rows}, {classes}\) do not fit the stored {split} "
            rf"labels \({len(labels)} rows, classes up to {labels.max()}\)"
        )
        with pytest.raises(ValueError, match=message):
            store.write_epoch("t", 1, {(split, "base"): logits})
        assert store.epochs("t") == []
    if np.array_equal(other, labels):
        store.write_labels(split, other)
    else:
        with pytest.raises(ValueError, match=rf"{split} labels differ from those already stored"):
            store.write_labels(split, other)
    np.testing.assert_array_equal(store.labels(split), labels)


def test_a_trial_id_with_a_trailing_newline_is_rejected(tmp_path: Path) -> None:
    store = PredictionStore.open(tmp_path)
    with pytest.raises(ValueError, match="invalid trial id"):
        store.write_epoch("abc\n", 1, {("val", "base"): np.zeros((2, 3), np.float32)})


@pytest.mark.parametrize("labels", [np.array([0.7, 1.9, 2.2]), np.array([True, False, True])])
def test_non_integer_labels_are_rejected_by_the_store(tmp_path: Path, labels: np.ndarray) -> None:
    store = PredictionStore.open(tmp_path)
    with pytest.raises(TypeError, match="integer dtype"):
        store.write_labels("val", labels)


# -- 5. NaN ranks worst in decisions ---------------------------------------------------------


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), written from the definition."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    a, b = sorted_values[lo], sorted_values[hi]
    if frac == 0 or a == b or a == -math.inf:  # -inf + anything finite is -inf
        return a
    if b == math.inf:  # and so is +inf
        return b
    return a + (b - a) * frac


_SCORE = st.one_of(
    st.floats(-1e6, 1e6),
    st.integers(-5, 5).map(float),  # ties, and cutoffs that land on recorded values
    st.just(math.nan),
)


@PROPERTY
@given(
    scores=st.lists(_SCORE, min_size=1, max_size=30),
    rf=st.sampled_from([2, 3, 4]),
)
def test_rung_decisions_rank_nan_worst(scores: list[float], rf: int) -> None:
    """ASHA rung (higher is better): the cutoff is the (1 - 1/rf) quantile of the finite scores
    recorded before; the first finite score passes; NaN values never move the cutoff; a NaN
    score stops whenever the rung holds a finite value. Hence a NaN arm is kept only while the
    rung has no finite value yet (arrival order: no decision can look ahead), and once a finite
    score has been recorded no NaN arm is ever kept, whatever finite arms are stopped."""
    bracket = Bracket(grace_period=1, max_t=100, reduction_factor=rf, s=0)
    finite_before: list[float] = []
    seen_finite = False
    for i, score in enumerate(scores):
        stop, cutoff = bracket.record(f"arm{i}", 0, score)
        if not finite_before:
            assert cutoff is None and not stop
        else:
            expected = _quantile(sorted(finite_before), 1 - 1 / rf)
            assert cutoff is not None
            assert cutoff == pytest.approx(expected, rel=1e-12, abs=1e-9)
            assert stop == (math.isnan(score) or score < cutoff)
        if math.isnan(score):
            assert stop == seen_finite  # kept only before any finite value
        else:
            finite_before.append(score)
            seen_finite = True
    assert bracket.recorded[0].keys() == {f"arm{i}" for i in range(len(scores))}


@PROPERTY
@given(
    scores=st.lists(st.one_of(_SCORE, st.just(-math.inf), st.just(math.inf)), max_size=30),
    rf=st.sampled_from([2, 3, 4]),
)
def test_rung_decisions_with_infinite_scores(scores: list[float], rf: int) -> None:
    """-inf scores (an NLL of +inf in ``min`` mode) and +inf scores are comparable values: the
    decision of every arm equals the one from the mathematically exact cutoff, and NaN still
    stops once the rung holds a non-NaN value."""
    bracket = Bracket(grace_period=1, max_t=100, reduction_factor=rf, s=0)
    before: list[float] = []
    for i, score in enumerate(scores):
        stop, _ = bracket.record(f"arm{i}", 0, score)
        if not before:
            assert not stop
        elif math.isnan(score):
            assert stop
        else:
            exact = _quantile(sorted(before), 1 - 1 / rf)
            if not math.isclose(score, exact, rel_tol=1e-9, abs_tol=1e-9):
                assert stop == (score < exact), (score, exact, before)
        if not math.isnan(score):
            before.append(score)


def test_a_plus_infinite_score_does_not_disable_the_rung() -> None:
    bracket = Bracket(grace_period=1, max_t=100, reduction_factor=2, s=0)
    bracket.record("a", 0, 1.0)
    bracket.record("b", 0, math.inf)
    stop, cutoff = bracket.record("c", 0, 2.0)  # the median of {1, inf} is inf: 2 must stop
    assert cutoff == math.inf and stop


@PROPERTY
@given(
    values=st.dictionaries(
        st.integers(1, 50),
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(-3, 3).map(float),
            st.none(),
        ),
        max_size=20,
    )
)
def test_argbest_never_picks_a_nan_epoch(values: dict[int, float | None]) -> None:
    """``argbest`` returns the earliest epoch with the lowest finite value, None when no epoch
    has one; NaN, +-inf and a missing key are never picked over a finite value."""
    curve = {
        e: ({"val/nll": v} if v is not None else {"val/error": 0.0}) for e, v in values.items()
    }
    finite = {e: v for e, v in values.items() if v is not None and math.isfinite(v)}
    got = argbest(curve, "val/nll")
    if not finite:
        assert got is None
        return
    assert got is not None
    assert math.isfinite(curve[got]["val/nll"])
    best = min(finite.values())
    assert finite[got] == best
    assert got == min(e for e, v in finite.items() if v == best)


# -- regressions: the bugs these properties found, as plain examples -------------------------


def test_error_and_ece_predict_the_argmax_of_the_logits() -> None:
    # float32 logits 2 and 1 ulp below 0.5: log_softmax rounds all three to -log(3), and the
    # tie used to pick class 0 although class 2 has the largest logit.
    top = np.float32(0.5)
    below = np.nextafter(top, np.float32(0))
    z = np.array([[np.nextafter(below, np.float32(0)), below, top]], np.float32)
    y = np.array([2])
    assert metrics.error(z, y) == 0.0
    assert metrics.ece(z, y) == pytest.approx(2 / 3, abs=1e-6)  # correct at confidence 1/3


def test_integer_logits_are_evaluated_without_float32_rounding() -> None:
    z = np.array([[2**40, 2**40 + 1], [0, 3]], np.int64)  # 2**40 + 1 is not a float32
    y = np.array([1, 1])
    assert metrics.error(z, y) == 0.0
    assert metrics.nll(z, y) == pytest.approx(ref.nll(z, y), rel=1e-14)
    assert metrics.nll(torch.from_numpy(z), y) == metrics.nll(z, y)


def test_unsupported_numpy_dtypes_name_the_argument() -> None:
    with pytest.raises(TypeError, match=r"logits must be a numeric array .*got numpy dtype object"):
        metrics.nll(np.zeros((2, 2), dtype=object), np.array([0, 1]))
    with pytest.raises(TypeError, match=r"labels must be a numeric array .*got numpy dtype <U1"):
        metrics.nll(np.zeros((2, 2)), np.array(["a", "b"]))


def test_probability_combiner_does_not_hide_a_minus_infinite_member() -> None:
    diverged = np.array([[-math.inf, 0.0], [1.0, 0.0]], np.float32)
    fine = np.zeros((2, 2), np.float32)
    out = combine([diverged, fine], "probs")
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
    assert math.isnan(metrics.nll(out, np.array([1, 0])))
    with pytest.warns(RuntimeWarning, match="fell back to T=1: logits contain NaN or inf"):
        val, _ = apply_transform("ens+ts", [diverged, fine], np.array([1, 0]), ensemble="probs")
    assert math.isnan(metrics.nll(val, np.array([1, 0])))


def test_temperature_stays_within_its_bounds() -> None:
    # Every row wrong: the optimum is T = max_T, and exp(log(100)) is 100.00000000000004.
    scaler = TemperatureScaler().fit(np.array([[0.0, 1.0]], np.float32), np.array([0]))
    assert scaler.temperature_ == 100.0
    custom = TemperatureScaler(bounds=(0.1, 3.0)).fit(np.array([[0.0, 1.0]]), np.array([0]))
    assert custom.temperature_ == 3.0
