"""Classification metrics on logits: NLL, error, ECE and Brier score.

Every function takes ``(logits, labels)`` as numpy arrays or torch tensors (any device) and
returns a Python float, computed in float64.

NaN behaviour (documented contract): if any logit is NaN or +-inf the model has diverged and
every metric is ``nan``; posthoc_tune's selection ranks NaN worst. Malformed input (wrong
shapes, labels out of range, empty splits, non-integer labels) raises ``ValueError`` or
``TypeError`` naming the value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from posthoc_tune._arrays import ArrayLike, as_labels, as_logits
from posthoc_tune.keys import METRICS, check_name

ECE_BINS = 15
"""Number of equal-width confidence bins for ECE."""


def _prepare(logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor] | None:
    z = as_logits(logits)
    y = as_labels(labels, z.shape[0], z.shape[1])
    if not bool(torch.isfinite(z).all()):
        return None
    return torch.log_softmax(z, dim=1), y


def _nll(log_probs: torch.Tensor, y: torch.Tensor) -> float:
    return float(-log_probs.gather(1, y[:, None]).mean())


def _error(log_probs: torch.Tensor, y: torch.Tensor) -> float:
    return float((log_probs.argmax(dim=1) != y).to(torch.float64).mean())


def _ece(log_probs: torch.Tensor, y: torch.Tensor) -> float:
    conf, pred = log_probs.exp().max(dim=1)
    # Bin b (0-based) holds confidences in (b/15, (b+1)/15]: right-closed bins.
    bins = (torch.ceil(conf * ECE_BINS) - 1).clamp_(0, ECE_BINS - 1).to(torch.int64)
    gap = torch.zeros(ECE_BINS, dtype=torch.float64)
    gap.index_add_(0, bins, (pred == y).to(torch.float64) - conf)
    # sum_b (n_b/N) |acc_b - conf_b| == sum_b |sum_{i in b} (correct_i - conf_i)| / N
    return float(gap.abs().sum() / y.shape[0])


def _brier(log_probs: torch.Tensor, y: torch.Tensor) -> float:
    probs = log_probs.exp()
    p_true = probs.gather(1, y[:, None]).squeeze(1)
    return float(((probs * probs).sum(dim=1) - 2.0 * p_true + 1.0).mean())


_IMPLS = {"nll": _nll, "error": _error, "ece": _ece, "brier": _brier}


def evaluate(
    logits: ArrayLike, labels: ArrayLike, metrics: Iterable[str] = METRICS
) -> dict[str, float]:
    """Compute several metrics at once, sharing one log-softmax pass."""
    names = [check_name("metric", m, METRICS) for m in metrics]
    prepared = _prepare(logits, labels)
    if prepared is None:
        return {m: math.nan for m in names}
    return {m: _IMPLS[m](*prepared) for m in names}


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
