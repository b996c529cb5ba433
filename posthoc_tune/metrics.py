"""Classification metrics on logits: NLL, error, ECE and Brier score.

Every function takes ``(logits, labels)`` as numpy arrays or torch tensors (any device) and
returns a Python float. Elementwise work runs in float64 for float64 and integer input (integers
are exact in float64 up to 2**53, not in float32) and in float32 otherwise (model outputs);
means over rows are always accumulated in float64. Predictions are the argmax of the logits
themselves (first index on ties), so rounding in the softmax never changes a prediction.

NaN behaviour (documented contract): if any logit is NaN or +-inf the model has diverged and
every metric is ``nan``; posthoc_tune's selection ranks NaN worst. Malformed input (wrong
shapes, labels out of range, empty splits, non-integer labels) raises ``ValueError`` or
``TypeError`` naming the value.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import numpy as np
import torch

from posthoc_tune._arrays import ArrayLike, as_labels, as_logits
from posthoc_tune.keys import METRICS, check_name

ECE_BINS = 15
"""Number of equal-width confidence bins for ECE."""


class _Scores:
    """Logits, log-probabilities and labels of one evaluation; probabilities and predictions
    computed once."""

    def __init__(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.logits = logits
        self.log_probs = torch.log_softmax(logits, dim=1)
        self.labels = labels

    @functools.cached_property
    def probs(self) -> torch.Tensor:
        return self.log_probs.exp()

    @functools.cached_property
    def pred(self) -> torch.Tensor:
        # From the logits: log_softmax can round distinct near-equal logits to a tie (e.g.
        # float32 [0.49999997, 0.5] -> [-0.6931472, -0.6931472]), and the tie would pick the
        # smaller logit.
        return self.logits.argmax(dim=1)


def _all_finite(z: torch.Tensor) -> bool:
    # NaN and +-inf propagate into a sum, so a finite sum proves every entry finite; this is
    # an order of magnitude cheaper than torch.isfinite, which then only runs on the rare rest.
    return math.isfinite(float(z.sum())) or bool(torch.isfinite(z).all())


def _mean(x: torch.Tensor) -> float:
    return float(x.to(torch.float64).mean())


def _nll(s: _Scores) -> float:
    return -_mean(s.log_probs.gather(1, s.labels[:, None]))


def _error(s: _Scores) -> float:
    return _mean(s.pred != s.labels)


def _ece(s: _Scores) -> float:
    # The top-label probability is the predicted class's (exp and the shift are monotone).
    return binned_ece(s.probs.max(dim=1).values, s.pred == s.labels)


def binned_ece(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """ECE of top-label ``confidence`` values and whether each prediction was ``correct``
    (one place for the binning: class logits and token records both use it)."""
    conf = confidence.to(torch.float64)
    # Bin b (0-based) holds confidences in (b/15, (b+1)/15]: right-closed bins.
    bins = (torch.ceil(conf * ECE_BINS) - 1).clamp_(0, ECE_BINS - 1).to(torch.int64)
    gap = torch.zeros(ECE_BINS, dtype=torch.float64)
    gap.index_add_(0, bins, correct.to(torch.float64) - conf)
    # sum_b (n_b/N) |acc_b - conf_b| == sum_b |sum_{i in b} (correct_i - conf_i)| / N
    return float(gap.abs().sum() / conf.shape[0])


def _brier(s: _Scores) -> float:
    p_true = s.probs.gather(1, s.labels[:, None]).squeeze(1)
    return _mean(torch.linalg.vecdot(s.probs, s.probs) - 2.0 * p_true + 1.0)


_IMPLS = {"nll": _nll, "error": _error, "ece": _ece, "brier": _brier}


def evaluate(
    logits: ArrayLike, labels: ArrayLike, metrics: Iterable[str] = METRICS
) -> dict[str, float]:
    """Compute several metrics at once, sharing one log-softmax pass."""
    names = [check_name("metric", m, METRICS) for m in metrics]
    # Elementwise work in the input's precision (float32 for model outputs), means in float64.
    z = as_logits(logits, dtype=torch.float64 if _is_wide(logits) else torch.float32)
    y = as_labels(labels, z.shape[0], z.shape[1])
    if not _all_finite(z):
        return {m: math.nan for m in names}
    scores = _Scores(z, y)
    return {m: _IMPLS[m](scores) for m in names}


def _is_wide(logits: object) -> bool:
    """float64 and integer logits are evaluated in float64 (float32 would round integers)."""
    dtype = getattr(logits, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype == torch.float64 or not (dtype.is_floating_point or dtype.is_complex)
    return isinstance(dtype, np.dtype) and (dtype == np.float64 or dtype.kind in "iu")


def nll(logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood (cross-entropy, natural log) of the labels."""
    return evaluate(logits, labels, ("nll",))["nll"]


def error(logits: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of rows whose argmax (first index on ties) differs from the label."""
    return evaluate(logits, labels, ("error",))["error"]


def ece(logits: ArrayLike, labels: ArrayLike) -> float:
    """Expected calibration error over 15 equal-width, right-closed bins of top-label confidence.

    Bin ``b`` holds the rows whose top-label probability lies in ``(b/15, (b+1)/15]``;
    ECE = sum over bins of (rows in bin / N) * |accuracy in bin - mean confidence in bin|.
    """
    return evaluate(logits, labels, ("ece",))["ece"]


def brier(logits: ArrayLike, labels: ArrayLike) -> float:
    """Brier score: sum over classes of the squared probability error, averaged over rows."""
    return evaluate(logits, labels, ("brier",))["brier"]
