"""Token-level evaluation of language models without storing (tokens x vocabulary) logits.

A causal LM's val set of 200k tokens at a 32k vocabulary is 26 GB of float32 logits per model
and epoch: too much to store, gather or re-read. Temperature scaling and every token metric
only need, per token, the log-partition function of the temperature-scaled logits as a
function of the inverse temperature ``b = 1/T``. So each token is reduced, batch by batch on
the model's device, to a compact *record* (:data:`RECORD_WIDTH` = 60 float32 numbers):

* ``g_k = logsumexp(b_k (z - max z))`` and ``h_k = dg/db = E_p[z - max z]`` (p the softmax at
  ``b_k``) at the 29 log-spaced points ``b_k = 0.125 * 2**(k/4)`` of :data:`GRID` (0.125 to
  16);
* ``z_y - max z`` (the target token's logit) and whether the argmax is the target.

Between grid points ``g`` is rebuilt by cubic Hermite interpolation in ``log b`` (the
derivative there is ``b h``). Then, at ``b = 1/T``:

* NLL = ``g(b) - b (z_y - max z)``; perplexity = exp(mean NLL);
* top-label confidence = ``exp(-g(b))`` (ECE); the error does not depend on ``T``;
* sum of squared probabilities = ``exp(g(2b) - 2 g(b))`` (Brier), hence ``T >= 0.125`` needs
  the grid up to ``b = 16``.

The interpolant is linear in the records, so the mean NLL at any ``T`` comes from the column
means alone: temperature scaling is a 1-D minimisation over those 59 numbers, fit within
:data:`FIT_RANGE` (``0.125 <= T <= 8``: small or early models can need either end). The
grid's spacing was chosen by measuring the interpolation error on synthetic LM-like logits
(V = 32k, Zipf-like tail): 16 points over [0.25, 4] kept the mean NLL within ~3e-4 and T within
~1e-4 of the exact values; this grid is a little denser. ``tests/test_tokens.py`` and
``benchmarks/RESULTS.md`` measure it against full logits.

Combining models (seed or checkpoint ensembles) is not a function of their records: the
ensemble's logits are a mean over members inside the softmax. :func:`evaluate_ensemble`
therefore evaluates the members' models together on the same batches and records the mean of
their temperature-scaled logits (exact, at the cost of one forward pass per member).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from posthoc_tune._arrays import output_logits
from posthoc_tune.keys import SPLITS, TOKEN_METRICS, Transform, check_name, parse_transform
from posthoc_tune.metrics import binned_ece
from posthoc_tune.transforms import evaluating

GRID: np.ndarray = 0.125 * 2.0 ** (np.arange(29) / 4)
"""Inverse temperatures ``b = 1/T`` of a record's statistics: 0.125 to 16, four per octave, so
that ``2b`` is on the grid for every fitted ``b`` (Brier) and ``b = 1`` is a node (the
untransformed model's metrics are exact up to float32)."""

FIT_RANGE: tuple[float, float] = (0.125, 8.0)
"""The temperatures token-level TS chooses among (``b`` in [0.125, 8]; a fit at either end
warns). Fine-tuned LMs' fitted temperatures are usually between 0.7 and 2; small models early
in training are far less or far more confident."""

G = len(GRID)
RECORD_WIDTH = 2 * G + 2
"""Numbers per token: g and h at each grid point, the target's logit gap, the correct bit."""

IGNORE_INDEX = -100
"""Target value of positions not scored (prompt tokens, padding): PyTorch's and Hugging
Face's convention."""

_LOG_GRID = np.log(GRID)
_STEP = math.log(2.0) / 4  # log-spacing of GRID
_SQUARES = 4  # GRID[k + 4] == 2 GRID[k]: exp(2 b d) = exp(b d) ** 2, no new exp
_CHUNK_ELEMENTS = 1 << 18
"""Logits per chunk of record computation on a CPU: each chunk is passed over ~90 times, and
1 MB of float32 stays in cache (measured 3x faster than 32 MB chunks, ``benchmarks/RESULTS.md``).
Accelerators take :data:`_DEVICE_CHUNK_ELEMENTS`: fewer, larger kernels."""
_DEVICE_CHUNK_ELEMENTS = 1 << 24


class TokenParts(NamedTuple):
    """One variant's token records of an epoch, by split, with its val-fitted temperature
    (None when none was recorded)."""

    records: dict[str, np.ndarray]
    temperature: float | None


# -- records -----------------------------------------------------------------------------------


def token_records(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The records (``(n, RECORD_WIDTH)`` float32, on the logits' device) of ``n`` scored
    positions: ``logits`` ``(n, vocab)`` and their ``targets`` ``(n,)``, all in range.

    Runs in chunks of rows (of at most ~64 MB on accelerators, 1 MB on CPUs, or one row), so
    memory stays flat whatever the number of positions.
    """
    n, vocab = logits.shape
    out = torch.empty(n, RECORD_WIDTH, dtype=torch.float32, device=logits.device)
    grid = torch.as_tensor(GRID[:_SQUARES], dtype=torch.float32, device=logits.device)
    elements = _CHUNK_ELEMENTS if logits.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    rows = max(1, elements // max(vocab, 1))
    for start in range(0, n, rows):
        z = logits[start : start + rows].float()
        y = targets[start : start + rows]
        top = z.max(dim=1, keepdim=True).values
        d = z - top  # <= 0, so exp never overflows
        chunk = out[start : start + rows]
        powers = [torch.exp(b * d) for b in grid]  # exp(b_k d) for the first octave
        for k in range(G):
            e = powers[k % _SQUARES]
            if k >= _SQUARES:
                e.square_()
            total = e.sum(dim=1)  # >= 1: the max term is exp(0)
            chunk[:, k] = total.log()
            chunk[:, G + k] = torch.linalg.vecdot(e, d) / total
        chunk[:, 2 * G] = d.gather(1, y[:, None]).squeeze(1)
        chunk[:, 2 * G + 1] = (z.argmax(dim=1) == y).float()
    return out


def _interpolate(values: np.ndarray, slopes: np.ndarray, b: float) -> np.ndarray:
    """Cubic Hermite interpolation in ``log b`` of ``g`` (``values`` ``(..., G)``) with
    ``dg/db`` (``slopes``); exact at the grid points."""
    if not GRID[0] <= b <= GRID[-1]:
        raise ValueError(
            f"inverse temperature {b!r} is outside the records' grid [{GRID[0]}, {GRID[-1]}]"
        )
    s = math.log(b)
    k = min(int((s - _LOG_GRID[0]) / _STEP), G - 2)
    t = (s - _LOG_GRID[k]) / _STEP
    h00, h10 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t
    h01, h11 = -2 * t**3 + 3 * t**2, t**3 - t**2
    # d g / d log b = b dg/db
    m0, m1 = GRID[k] * slopes[..., k], GRID[k + 1] * slopes[..., k + 1]
    ends = h00 * values[..., k] + h01 * values[..., k + 1]
    out: np.ndarray = ends + _STEP * (h10 * m0 + h11 * m1)
    return out


def _columns(records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r = np.asarray(records, dtype=np.float64)
    return r[..., :G], r[..., G : 2 * G], r[..., 2 * G], r[..., 2 * G + 1]


def check_records(records: np.ndarray, what: str = "token records") -> np.ndarray:
    """``records`` as a float32 ``(n, RECORD_WIDTH)`` array with rows, or a ValueError."""
    arr = np.asarray(records, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != RECORD_WIDTH or arr.shape[0] == 0:
        raise ValueError(
            f"{what} must have shape (n_tokens, {RECORD_WIDTH}) with tokens, got {arr.shape}"
        )
    return arr


# -- temperature scaling and metrics --------------------------------------------------------------


def fit_temperature(records: np.ndarray) -> float:
    """The temperature in :data:`FIT_RANGE` minimising the records' mean NLL.

    The mean NLL is ``G(b) - b D`` with ``G`` the interpolant of the column means, convex in
    ``b`` up to interpolation error: golden-section search on ``log b``, bracketed by the grid
    point with the lowest value. Non-finite records (a diverged model) fall back to ``T = 1``
    with a warning, as :class:`~posthoc_tune.transforms.TemperatureScaler` does.
    """
    g, h, dy, _ = _columns(check_records(records))
    mean_g, mean_h, mean_dy = g.mean(axis=0), h.mean(axis=0), float(dy.mean())
    if not (np.isfinite(mean_g).all() and np.isfinite(mean_h).all() and math.isfinite(mean_dy)):
        warnings.warn(
            "token-level temperature scaling fell back to T=1: the records are not finite",
            RuntimeWarning,
            stacklevel=2,
        )
        return 1.0

    def nll(s: float) -> float:
        b = math.exp(s)
        return float(_interpolate(mean_g, mean_h, b)) - b * mean_dy

    lo, hi = math.log(1 / FIT_RANGE[1]), math.log(1 / FIT_RANGE[0])
    nodes = [s for s in _LOG_GRID if lo - 1e-12 <= s <= hi + 1e-12]
    best = min(range(len(nodes)), key=lambda i: nll(nodes[i]))
    a, c = nodes[max(best - 1, 0)], nodes[min(best + 1, len(nodes) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    x1, x2 = c - ratio * (c - a), a + ratio * (c - a)
    f1, f2 = nll(x1), nll(x2)
    while c - a > 1e-10:
        if f1 <= f2:
            c, x2, f2 = x2, x1, f1
            x1 = c - ratio * (c - a)
            f1 = nll(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + ratio * (c - a)
            f2 = nll(x2)
    s = (a + c) / 2
    temperature = min(max(math.exp(-s), FIT_RANGE[0]), FIT_RANGE[1])
    if math.isclose(s, lo, abs_tol=1e-6) or math.isclose(s, hi, abs_tol=1e-6):
        warnings.warn(
            f"token-level temperature scaling stopped at T={temperature:.4g}, the end of its "
            f"range {list(FIT_RANGE)}",
            RuntimeWarning,
            stacklevel=2,
        )
    return temperature


def token_metrics(
    records: np.ndarray, temperature: float = 1.0, metrics: Sequence[str] = TOKEN_METRICS
) -> dict[str, float]:
    """Token metrics (``token_nll``, ``perplexity``, ``token_error``, ``token_ece``,
    ``token_brier``) of the records' model at ``temperature`` (in :data:`FIT_RANGE`)."""
    names = [check_name("metric", m, TOKEN_METRICS) for m in metrics]
    if not (FIT_RANGE[0] <= temperature <= FIT_RANGE[1]):
        raise ValueError(f"temperature must be in {list(FIT_RANGE)}, got {temperature!r}")
    g, h, dy, correct = _columns(check_records(records))
    if not (np.isfinite(g).all() and np.isfinite(h).all() and np.isfinite(dy).all()):
        return dict.fromkeys(names, math.nan)  # a diverged model, as for class logits
    b = 1.0 / temperature
    g_b = _interpolate(g, h, b)
    nll = float(np.mean(g_b - b * dy))
    out = {"token_nll": nll, "perplexity": math.exp(nll), "token_error": 1 - correct.mean()}
    if "token_ece" in names:
        confidence = torch.from_numpy(np.exp(-g_b))
        out["token_ece"] = binned_ece(confidence, torch.from_numpy(correct))
    if "token_brier" in names:
        squares = np.exp(_interpolate(g, h, 2 * b) - 2 * g_b)
        out["token_brier"] = float(np.mean(squares - 2 * np.exp(b * dy - g_b) + 1))
    return {m: float(out[m]) for m in names}


def score(
    transform: str | Transform,
    parts: TokenParts,
    *,
    metrics: Sequence[str] = TOKEN_METRICS,
    splits: Sequence[str] = SPLITS,
) -> dict[str, float]:
    """Token metrics (keys ``{split}/{transform}/{metric}``) of a single-model transform of
    one variant's records: its temperature is the recorded one, else fit on the val records,
    and applies unchanged to test. Combining transforms are refused (see the module
    docstring)."""
    t = parse_transform(transform)
    if t.combines:
        raise ValueError(
            f"transform {t.name!r} combines models, which token records cannot do; "
            f"evaluate it with posthoc_tune.tokens.evaluate_ensemble"
        )
    return _score_records(t.name, parts, t.ts, metrics, splits)


def _score_records(
    name: str,
    parts: TokenParts,
    ts: bool,
    metrics: Sequence[str],
    splits: Sequence[str],
) -> dict[str, float]:
    temperature = 1.0
    if ts:
        recorded = parts.temperature
        temperature = recorded if recorded is not None else fit_temperature(parts.records["val"])
    return {
        f"{split}/{name}/{metric}": value
        for split in splits
        if split in parts.records
        for metric, value in token_metrics(parts.records[split], temperature, metrics).items()
    }


# -- evaluating a model on token splits -----------------------------------------------------------


class TokenSplit:
    """One token-level evaluation split: a loader of causal-LM batches, scored position by
    position.

    Each batch is a mapping with ``input_ids`` ``(batch, length)``, ``labels`` of the same
    shape (the Hugging Face convention: the inputs, with :data:`IGNORE_INDEX` at positions not
    to score, e.g. prompts and padding) and optionally ``attention_mask``. Position ``t``'s
    logits predict ``labels[t + 1]``. The loader must yield the same batches every epoch. In
    a multi-worker trial rank 0 evaluates it alone, so it must not be sharded.
    """

    def __init__(self, split: str, loader: Iterable[Any]) -> None:
        self.split = check_name("split", split, SPLITS)
        if isinstance(loader, (str, bytes, Mapping)) or not isinstance(loader, Iterable):
            raise TypeError(
                f"the {split} tokens must be an iterable of batches (e.g. a DataLoader) with "
                f"input_ids and labels, got {type(loader).__name__}"
            )
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, torch.utils.data.DistributedSampler) and sampler.num_replicas > 1:
            raise ValueError(
                f"the {split} tokens' loader is sharded by a DistributedSampler, but token "
                f"splits are evaluated by rank 0 alone: pass a loader over every {split} "
                f"sequence (no DistributedSampler)"
            )
        self.loader = loader
        self.vocab_size: int | None = None  # fixed by the first evaluation
        self.n_tokens: int | None = None

    def records(self, model: torch.nn.Module) -> np.ndarray:
        """``model``'s records of every scored position, in the loader's order (float32)."""
        with evaluating(model):
            chunks = [token_records(*outs[0]).cpu() for outs in self.scored_batches([model])]
        return self._counted(torch.cat(chunks).numpy())

    def scored_batches(
        self, models: Sequence[torch.nn.Module]
    ) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per batch, each model's logits ``(n, vocab)`` of the scored positions and their
        targets ``(n,)`` (on the model's device); callers set eval mode."""
        for i, batch in enumerate(self.loader):
            where = f"batch {i} of the {self.split} tokens"
            if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
                raise ValueError(
                    f"{where} must be a mapping with input_ids and labels (and optionally "
                    f"attention_mask), got {_describe(batch)}"
                )
            outs = [_scored(model, batch, where) for model in models]
            for z, _ in outs:
                self._check_vocab(z.shape[1], where)
            yield outs

    def _check_vocab(self, vocab: int, where: str) -> None:
        if self.vocab_size is None:
            self.vocab_size = vocab
        elif vocab != self.vocab_size:
            raise ValueError(
                f"a model predicts {vocab} tokens on {where}, another evaluation "
                f"{self.vocab_size}: the vocabulary must be the same at every epoch and for "
                f"every model"
            )

    def _counted(self, records: np.ndarray) -> np.ndarray:
        if self.n_tokens is None:
            self.n_tokens = len(records)
        elif len(records) != self.n_tokens:
            raise ValueError(
                f"the {self.split} tokens gave {len(records)} scored positions, "
                f"{self.n_tokens} in the first evaluation: the loader must yield the same "
                f"batches every epoch"
            )
        return records


def _scored(
    model: torch.nn.Module, batch: Mapping[str, Any], where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits ``(n, vocab)`` of a batch's scored positions and their targets ``(n,)``."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    ids = torch.as_tensor(batch["input_ids"]).to(device)
    labels = torch.as_tensor(batch["labels"]).to(device)
    if ids.ndim != 2 or labels.shape != ids.shape:
        raise ValueError(
            f"{where}: input_ids and labels must both have shape (batch, length), got "
            f"{tuple(ids.shape)} and {tuple(labels.shape)}"
        )
    mask = batch.get("attention_mask")
    kwargs = {"attention_mask": torch.as_tensor(mask).to(device)} if mask is not None else {}
    logits = output_logits(
        model(input_ids=ids, **kwargs), f"on {where}", " of shape (batch, length, vocab)"
    )
    if logits.ndim != 3 or logits.shape[:2] != ids.shape:
        raise ValueError(
            f"{where}: the model's logits have shape {tuple(logits.shape)}, expected "
            f"(batch, length, vocab) = ({ids.shape[0]}, {ids.shape[1]}, vocab)"
        )
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):
        raise ValueError(
            f"{where} has no position to score: every label after the first is "
            f"{IGNORE_INDEX}; drop such batches from the evaluation loader"
        )
    y = targets[keep]
    vocab = logits.shape[2]
    bad = y[(y < 0) | (y >= vocab)]
    if bad.numel():
        raise ValueError(
            f"{where}: label {int(bad[0])} is outside the vocabulary [0, {vocab - 1}] and is "
            f"not the ignored {IGNORE_INDEX}"
        )
    return logits[:, :-1][keep], y


def _describe(batch: object) -> str:
    if isinstance(batch, Mapping):
        return f"a mapping with keys {sorted(map(str, batch))}"
    return type(batch).__name__


# -- ensembles ------------------------------------------------------------------------------------


def evaluate_ensemble(
    models: Sequence[torch.nn.Module],
    val: Iterable[Any],
    test: Iterable[Any] | None = None,
    *,
    transform: str = "swa+ens+ts",
    temperatures: Sequence[float] | None = None,
    metrics: Sequence[str] = TOKEN_METRICS,
) -> dict[str, float]:
    """Token metrics of an ensemble of ``models`` (keys ``{split}/{transform}/{metric}``),
    exact: every batch goes through every member, and the records are those of the mean of
    the members' temperature-scaled logits, as for class logits (the members are in memory
    together, one batch of logits each).

    Args:
        models: the members, e.g. each seed's SWA model for ``swa+ens+ts``, rebuilt from its
            reporter checkpoint (which variant the members are is the caller's choice;
            ``transform`` names the keys and says whether a final TS is fit).
        val, test: loaders of causal-LM batches (see :class:`TokenSplit`).
        transform: a seed-group transform: ``ens``, ``ens+ts``, ``swa+ens``, ``swa+ens+ts``.
        temperatures: the members' val-fitted token temperatures (e.g. the
            ``token_temperature/swa`` they reported); fit here on val when None (one more
            pass over val per member).
    """
    t = parse_transform(transform)
    if not t.ens:
        raise ValueError(
            f"transform {t.name!r} is not a seed ensemble; expected ens, ens+ts, swa+ens or "
            f"swa+ens+ts"
        )
    if not models:
        raise ValueError("an ensemble needs at least one model, got none")
    splits = {"val": TokenSplit("val", val)}
    if test is not None:
        splits["test"] = TokenSplit("test", test)
    if temperatures is None:
        temperatures = [fit_temperature(splits["val"].records(m)) for m in models]
    if len(temperatures) != len(models):
        raise ValueError(f"got {len(temperatures)} temperatures for {len(models)} models")
    records = {}
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(evaluating(model))
        for split, source in splits.items():
            chunks = []
            for outs in source.scored_batches(models):
                scaled = [z.float() / temp for (z, _), temp in zip(outs, temperatures, strict=True)]
                chunks.append(token_records(torch.stack(scaled).mean(0), outs[0][1]).cpu())
            records[split] = torch.cat(chunks).numpy()
    return _score_records(t.name, TokenParts(records, None), t.ts, metrics, list(splits))


__all__ = [
    "FIT_RANGE",
    "GRID",
    "IGNORE_INDEX",
    "RECORD_WIDTH",
    "TokenParts",
    "TokenSplit",
    "evaluate_ensemble",
    "fit_temperature",
    "score",
    "token_metrics",
    "token_records",
]
