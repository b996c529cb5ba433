"""Post-hoc transforms: temperature scaling, SWA weight averaging, ensembling, and composition.

Pure PyTorch/numpy: nothing here knows about Ray. Definitions follow the paper's code
(rishabh-ranjan/post-hoc-reversal ``src/expt/calibrate.py``, ``utils.py``, ``ensemble.py``; see
``docs/sources.md``): TS is one temperature fit by minimising val NLL and applied unchanged to
test; SWA is the equal-weight mean of end-of-epoch weights; an ensemble averages its members'
temperature-scaled logits at one common epoch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, TypeVar, cast

import numpy as np
import torch
from torch.optim.swa_utils import get_swa_multi_avg_fn, update_bn

from posthoc_tune._arrays import ArrayLike, as_labels, as_logits, to_numpy
from posthoc_tune.keys import Transform, parse_transform

A = TypeVar("A", np.ndarray, torch.Tensor)

Combiner = Literal["logits", "probs"]


class TemperatureScaler:
    """Single-temperature calibration, scikit-learn style.

    ``fit`` minimises the mean NLL of ``logits / T`` over ``u = log T`` with a safeguarded
    Newton method (analytic first and second derivatives, backtracking line search). The
    objective is convex in ``1/T``, so the minimiser is unique; ``T`` is kept within ``bounds``
    because fully separable data drive the unconstrained optimum to ``T -> 0``.

    Fitted attributes: ``temperature_``, ``n_iter_``, ``converged_`` and ``fallback_`` (True when
    the input was non-finite or the fit failed and ``T = 1`` was used instead; never NaN).

    Args:
        warm_start: start from the previous ``temperature_`` (the paper's per-epoch reuse).
        max_iter: Newton iterations before the fit counts as failed.
        tol: stop when ``|d NLL / d log T| < tol``.
        bounds: ``(min_T, max_T)``.
    """

    temperature_: float
    n_iter_: int
    converged_: bool
    fallback_: bool

    def __init__(
        self,
        *,
        warm_start: bool = False,
        max_iter: int = 100,
        tol: float = 1e-5,
        bounds: tuple[float, float] = (1e-2, 1e2),
    ) -> None:
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol!r}")
        lo, hi = bounds
        if not 0 < lo < 1 < hi < math.inf:
            raise ValueError(f"bounds must satisfy 0 < min_T < 1 < max_T < inf, got {bounds!r}")
        self.warm_start = warm_start
        self.max_iter = max_iter
        self.tol = tol
        self.bounds = (float(lo), float(hi))

    @classmethod
    def from_temperature(cls, temperature: float, **params: Any) -> TemperatureScaler:
        """A scaler fitted to a known temperature (one recorded earlier, e.g. with the
        logits in the store), without refitting."""
        if isinstance(temperature, bool) or not (
            isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
        ):
            raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
        scaler = cls(**params)
        scaler.temperature_ = float(temperature)
        scaler.n_iter_, scaler.converged_, scaler.fallback_ = 0, True, False
        return scaler

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> TemperatureScaler:
        """Fit the temperature on (validation) logits and labels; returns ``self``."""
        z = as_logits(logits, dtype=torch.float32)
        y = as_labels(labels, z.shape[0], z.shape[1])
        start = 0.0
        if self.warm_start and getattr(self, "fallback_", True) is False:
            start = math.log(self.temperature_)
        u, n_iter, converged = _newton_log_temperature(
            z, y, start, self.max_iter, self.tol, tuple(math.log(b) for b in self.bounds)
        )
        if not converged:
            # Non-finite logits make the objective NaN at once; only then pay for the check.
            if not bool(torch.isfinite(z).all()):
                return self._fall_back("logits contain NaN or inf")
            return self._fall_back(f"Newton did not converge in {self.max_iter} iterations")
        # exp(log(b)) can round one ulp past a bound (exp(log(100)) = 100.00000000000004).
        self.temperature_ = min(max(math.exp(u), self.bounds[0]), self.bounds[1])
        self.n_iter_ = n_iter
        self.converged_ = True
        self.fallback_ = False
        return self

    def transform(self, logits: A) -> A:
        """Divide logits by the fitted temperature (same array type as the input)."""
        if not hasattr(self, "temperature_"):
            raise RuntimeError("TemperatureScaler is not fitted; call fit(logits, labels) first")
        return logits / self.temperature_

    def fit_transform(self, logits: A, labels: ArrayLike) -> A:
        """``fit`` then ``transform`` the same logits."""
        return self.fit(logits, labels).transform(logits)

    def _fall_back(self, why: str) -> TemperatureScaler:
        warnings.warn(f"temperature scaling fell back to T=1: {why}", RuntimeWarning, stacklevel=3)
        self.temperature_ = 1.0
        self.n_iter_ = 0
        self.converged_ = False
        self.fallback_ = True
        return self


class _TSObjective:
    """Mean NLL of softmax(z / e^u) and its first two derivatives in ``u = log T``.

    Logits are shifted by their row maximum once (NLL is shift-invariant), so each evaluation
    is one exp pass plus three row reductions in float32, with float64 means over rows.
    With ``b = e^-u``: dNLL/db = mean(E_p[d] - d_y) and d2NLL/db2 = mean(Var_p[d]); the chain
    rule gives d/du = -b dNLL/db and d2/du2 = b^2 d2NLL/db2 + b dNLL/db.
    """

    def __init__(self, z: torch.Tensor, y: torch.Tensor) -> None:
        self.d = z - z.max(dim=1, keepdim=True).values
        self.d_true = self.d.gather(1, y[:, None]).squeeze(1).to(torch.float64)
        # Preallocated work buffers: fresh multi-MB temporaries per call cost 4x the math.
        self._e = torch.empty_like(self.d)
        self._e_d = torch.empty_like(self.d)

    def __call__(self, u: float) -> tuple[float, float, float]:
        b = math.exp(-u)
        e, e_d = self._e, self._e_d
        torch.mul(self.d, b, out=e).exp_()
        torch.mul(e, self.d, out=e_d)
        norm = e.sum(dim=1).to(torch.float64)
        mean_d = e_d.sum(dim=1).to(torch.float64) / norm
        mean_d2 = e_d.mul_(self.d).sum(dim=1).to(torch.float64) / norm
        f = float((torch.log(norm) - b * self.d_true).mean())
        g_b = float((mean_d - self.d_true).mean())
        h_b = float((mean_d2 - mean_d * mean_d).mean())
        return f, -b * g_b, b * b * h_b + b * g_b


def _newton_log_temperature(
    z: torch.Tensor,
    y: torch.Tensor,
    u: float,
    max_iter: int,
    tol: float,
    bounds: tuple[float, ...],
) -> tuple[float, int, bool]:
    """Safeguarded Newton on u = log T; returns (u, iterations, converged)."""
    lo, hi = bounds
    objective = _TSObjective(z, y)
    u = min(max(u, lo), hi)
    f, g, h = objective(u)
    for it in range(1, max_iter + 1):
        if not (math.isfinite(f) and math.isfinite(g) and math.isfinite(h)):
            return u, it, False
        if abs(g) < tol or (u <= lo and g > 0) or (u >= hi and g < 0):
            return u, it - 1, True
        step = max(-1.0, min(1.0, -g / h if h > 0 else -math.copysign(1.0, g)))
        if abs(step) < 1e-6:  # Newton step below the float32 resolution of the objective
            return min(max(u + step, lo), hi), it, True
        while True:  # backtrack until the NLL decreases (Armijo) or the gradient vanishes
            u_new = min(max(u + step, lo), hi)
            f_new, g_new, h_new = objective(u_new)
            # Near the optimum the float32 NLL is flat to within its rounding noise, so Armijo
            # can reject an exact Newton step; a vanished gradient is then the better test.
            if f_new <= f + 1e-4 * g * (u_new - u) or abs(g_new) < tol or abs(step) < 1e-6:
                break
            step /= 2
        u, f, g, h = u_new, f_new, g_new, h_new
    return u, max_iter, False


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode without gradients, restoring the caller's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The trained module inside ``DistributedDataParallel``, ``DataParallel`` and
    ``torch.compile`` wrappers (nested in any order).

    A copy of the wrapper would carry its process group, hooks or compiled graphs, and its state
    dict would prefix every name with ``module.`` or ``_orig_mod.``.
    """
    compiled = _loaded_class("torch._dynamo.eval_frame", "OptimizedModule")
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif compiled is not None and isinstance(model, compiled):
            model = cast(torch.nn.Module, model._orig_mod)
        else:
            return model


def _loaded_class(module: str, name: str) -> type | None:
    """``module.name`` if ``module`` is already imported, else None. Importing torch._dynamo or
    FSDP costs about a second, and a model that is an instance of such a class implies that its
    module was loaded."""
    return getattr(sys.modules.get(module), name, None)


def _refuse_fsdp(model: torch.nn.Module) -> None:
    """Refuse FSDP (1 or 2) models: their parameters are shards, and a copy's forward hooks
    would gather the live model's parameters, not the averaged ones."""
    sharded = tuple(
        cls
        for cls in (
            _loaded_class("torch.distributed.fsdp", "FullyShardedDataParallel"),
            _loaded_class("torch.distributed.fsdp", "FSDPModule"),
            _loaded_class("torch.distributed._composable.fsdp", "FSDPModule"),  # torch < 2.6
        )
        if cls is not None
    )
    if sharded and any(isinstance(m, sharded) for m in model.modules()):
        raise TypeError(
            "WeightAverager does not support FSDP-sharded models (each rank holds parameter "
            "shards that a copy cannot evaluate); average an unsharded model instead"
        )


class WeightAverager:
    """Stochastic weight averaging read-out: the equal-weight mean of end-of-epoch weights.

    Call :meth:`update` once per epoch (epochs count from 1); epochs before ``start_epoch`` are
    skipped, so the average covers epochs ``start_epoch..t``. Training is unaffected: SWA here is
    a pure read-out, averaged with :func:`torch.optim.swa_utils.get_swa_multi_avg_fn` on the
    live model's device.

    Only parameters that require gradients at construction are averaged (all of them with
    ``trainable_only=False``); the SWA model's frozen parameters are the live model's own
    tensors, so a LoRA model's average costs its adapters, not a second base model. Hence build
    the averager after moving the model to its device, and never move or cast :attr:`model`
    (that would move the live model's frozen parameters). The averaged set is fixed: a
    parameter frozen later keeps being averaged (its constant value joins the mean); one
    unfrozen later makes :meth:`update` raise, as its training would reach the SWA model
    unaveraged (use ``trainable_only=False`` for gradual unfreezing).

    Buffers are the SWA model's own, copied from the live model on each update; call
    :meth:`update_bn` to re-estimate BatchNorm statistics for the averaged weights (the paper
    uses the val inputs). DDP and ``torch.compile`` wrappers are removed (:func:`unwrap_model`);
    FSDP models are refused.

    Attributes:
        epoch: epochs recorded by :meth:`update`.
        n_averaged: how many end-of-epoch weight sets the average holds.
    """

    def __init__(
        self, model: torch.nn.Module, *, start_epoch: int = 1, trainable_only: bool = True
    ) -> None:
        if not isinstance(start_epoch, int) or isinstance(start_epoch, bool) or start_epoch < 1:
            raise ValueError(f"start_epoch must be an int >= 1, got {start_epoch!r}")
        live = unwrap_model(model)
        _refuse_fsdp(live)
        self.start_epoch = start_epoch
        self.epoch = 0
        self.n_averaged = 0
        shared = {id(p): p for p in live.parameters() if trainable_only and not p.requires_grad}
        # deepcopy takes what its memo already maps as the copy: the frozen tensors themselves.
        self._model = copy.deepcopy(live, memo=dict(shared))
        own = dict(self._model.named_parameters())
        self._averaged = {n: own[n] for n, p in live.named_parameters() if id(p) not in shared}
        self._frozen = {
            n for n, p in live.named_parameters(remove_duplicate=False) if id(p) in shared
        }
        self._buffers = dict(self._model.named_buffers())

    @property
    def model(self) -> torch.nn.Module:
        """The SWA model: a copy of the (unwrapped) live model sharing its frozen parameters."""
        return self._model

    @property
    def active(self) -> bool:
        """Whether the average holds at least one epoch (before that SWA is undefined)."""
        return self.n_averaged > 0

    @property
    def has_batchnorm(self) -> bool:
        """Whether BatchNorm statistics need re-estimating after each update."""
        return any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules()
        )

    def update(self, model: torch.nn.Module) -> None:
        """Record the end of an epoch; its weights join the average from ``start_epoch`` on."""
        live = unwrap_model(model)
        params = dict(live.named_parameters())
        unfrozen = [n for n, p in params.items() if p.requires_grad and n not in self._averaged]
        if unfrozen:
            raise RuntimeError(
                f"{len(unfrozen)} parameters were frozen when the WeightAverager was built but "
                f"now require gradients (e.g. {unfrozen[0]!r}); the SWA model shares them "
                f"unaveraged. Build it with trainable_only=False to average every parameter"
            )
        self.epoch += 1
        if self.epoch < self.start_epoch:
            return
        averaged = [p.detach() for p in self._averaged.values()]
        current = [params[n].detach() for n in self._averaged]
        buffers = dict(live.named_buffers())
        with torch.no_grad():
            if self.n_averaged == 0:
                for a, c in zip(averaged, current, strict=True):
                    a.copy_(c)
            elif averaged:
                get_swa_multi_avg_fn()(averaged, current, self.n_averaged)
            for name, b in self._buffers.items():
                b.copy_(buffers[name])
        self.n_averaged += 1

    def export(self) -> torch.nn.Module:
        """A copy of the SWA model that shares no tensor with the live model: to save, to move,
        or to merge adapters into (merging into :attr:`model` itself would rewrite the live
        model's frozen weights)."""
        return copy.deepcopy(self._model)

    def trained_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The part of the live ``model``'s state dict that training changes: every entry but
        the frozen parameters this averager shares (a LoRA model's: its adapters and buffers,
        not the base model). With :meth:`load_trained_state`, a checkpoint of the live model."""
        live = unwrap_model(model)
        return {k: v for k, v in live.state_dict().items() if k not in self._frozen}

    def load_trained_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`trained_state` into the live ``model``; its frozen parameters are the
        ones it was built with."""
        missing, unexpected = unwrap_model(model).load_state_dict(state, strict=False)
        unknown = sorted(set(unexpected) | (set(missing) - self._frozen))
        if unknown:
            raise ValueError(
                f"checkpoint's model state differs from this model's trained state in "
                f"{len(unknown)} names, e.g. {unknown[0]!r} (was it built with other trainable "
                f"parameters?)"
            )

    def update_bn(self, loader: Iterable[Any]) -> None:
        """Re-estimate BatchNorm statistics of the averaged model on ``loader``'s inputs."""
        device = next(iter(self.model.parameters()), torch.empty(0)).device
        update_bn(loader, self.model, device=device)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the average exactly after a restart: the averaged
        parameters and the buffers (not the shared frozen parameters)."""
        return {
            "averaged": {n: p.detach() for n, p in self._averaged.items()},
            "buffers": {n: b.detach() for n, b in self._buffers.items()},
            "n_averaged": self.n_averaged,
            "epoch": self.epoch,
            "start_epoch": self.start_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; ``start_epoch`` and the averaged parameters' names and
        shapes must match this averager's."""
        if state["start_epoch"] != self.start_epoch:
            raise ValueError(
                f"checkpoint has start_epoch={state['start_epoch']}, "
                f"this averager has start_epoch={self.start_epoch}"
            )
        pairs = []
        for kind, own in (("averaged", self._averaged), ("buffers", self._buffers)):
            saved: dict[str, torch.Tensor] = state[kind]
            if saved.keys() != own.keys():
                diff = sorted(saved.keys() ^ own.keys())
                raise ValueError(
                    f"checkpoint's {kind} tensors differ from this averager's in {len(diff)} "
                    f"names, e.g. {diff[0]!r} (was it built with other trainable parameters?)"
                )
            for name, tensor in own.items():
                if saved[name].shape != tensor.shape:
                    raise ValueError(
                        f"checkpoint's {name!r} has shape {tuple(saved[name].shape)}, "
                        f"this averager's has {tuple(tensor.shape)}"
                    )
                pairs.append((tensor, saved[name]))
        with torch.no_grad():
            for tensor, value in pairs:
                tensor.copy_(value)
        self.n_averaged = int(state["n_averaged"])
        self.epoch = int(state["epoch"])


def combine(members: Sequence[A], how: Combiner = "logits") -> A:
    """Combine ensemble members' logits into ensemble logits.

    ``how="logits"``: mean of logits (the paper's choice). ``how="probs"``: log of the mean of
    the members' softmax probabilities. Members must all have the same shape (N, C).

    A member with a NaN or +-inf logit has diverged (its metrics are NaN): the ensemble's rows
    that hold such a value are never finite either, so the ensemble's metrics are NaN too.
    (Without this, ``how="probs"`` would read a -inf logit as probability 0 and hide it.)
    """
    if how not in ("logits", "probs"):
        raise ValueError(f"unknown combiner {how!r}; expected 'logits' or 'probs'")
    if len(members) == 0:
        raise ValueError("combine needs at least one member, got an empty sequence")
    tensors = [as_logits(m, f"member {i}") for i, m in enumerate(members)]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(
            f"ensemble members must share one (n_rows, n_classes) shape, got {sorted(shapes)}"
        )
    stacked = torch.stack(tensors)
    if how == "logits":
        out = stacked.mean(dim=0)
    else:
        out = torch.logsumexp(torch.log_softmax(stacked, dim=2), dim=0) - math.log(len(members))
        if not math.isfinite(float(stacked.sum())):  # cheap test first, as in metrics
            out[~torch.isfinite(stacked).all(dim=2).all(dim=0)] = math.nan
    first = members[0]
    if isinstance(first, torch.Tensor):
        return out.to(dtype=first.dtype, device=first.device)
    return out.numpy().astype(np.result_type(first.dtype, np.float32))


def apply_transform(
    name: str | Transform,
    val_members: Sequence[ArrayLike],
    val_labels: ArrayLike,
    test_members: Sequence[ArrayLike] | None = None,
    *,
    ensemble: Combiner = "logits",
    member_temperatures: Sequence[float | None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply a registered transform to its members' logits; returns (val, test).

    ``val_members``/``test_members`` hold one entry per member, already of the transform's
    variant (SWA logits for ``swa*`` names): the seeds of a group, the epochs of a checkpoint
    window, or the one model of a single-model transform. Combining transforms
    (:attr:`~posthoc_tune.keys.Transform.combines`) temperature-scale each member on val and
    average them; with ``ts`` one more temperature is fit on the result. All temperatures are
    fit on val and applied unchanged to test. Outputs are float32 arrays.

    ``member_temperatures`` supplies temperatures already fit on each member's val logits,
    e.g. recorded by the reporter, so they are not fit again (``None`` entries are fit here);
    a single model's own TS is its member temperature.
    """
    t = parse_transform(name)
    if test_members is not None and len(test_members) != len(val_members):
        raise ValueError(f"got {len(val_members)} val members but {len(test_members)} test members")
    if not t.combines and len(val_members) != 1:
        raise ValueError(f"transform {t.name!r} takes exactly one member, got {len(val_members)}")
    if member_temperatures is not None and len(member_temperatures) != len(val_members):
        raise ValueError(
            f"got {len(member_temperatures)} member temperatures for {len(val_members)} members"
        )
    vals = [to_numpy(v) for v in val_members]
    tests = [to_numpy(v) for v in test_members] if test_members is not None else None
    known = member_temperatures or [None] * len(vals)
    if t.combines:
        scalers = [_scaler(v, val_labels, k) for v, k in zip(vals, known, strict=True)]

        def ensemble_of(parts: list[np.ndarray]) -> list[np.ndarray]:
            if ensemble == "logits":  # one fused pass per member, no stacked copy
                return [_scaled_mean(parts, [s.temperature_ for s in scalers])]
            scaled = [s.transform(p) for s, p in zip(scalers, parts, strict=True)]
            return [combine(scaled, ensemble)]

        vals = ensemble_of(vals)
        tests = ensemble_of(tests) if tests is not None else None
    val, test = vals[0], (tests[0] if tests is not None else None)
    if t.ts:
        scaler = _scaler(val, val_labels, None if t.combines else known[0])
        val = scaler.transform(val)
        test = scaler.transform(test) if test is not None else None
    return val, test


def _scaler(val: np.ndarray, labels: ArrayLike, temperature: float | None) -> TemperatureScaler:
    """A scaler fit on ``val``, or one set to an already-fit ``temperature``."""
    if temperature is None:
        return TemperatureScaler().fit(val, labels)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"member temperature must be finite and > 0, got {temperature!r}")
    return TemperatureScaler.from_temperature(temperature)


def _scaled_mean(parts: Sequence[np.ndarray], temperatures: Sequence[float]) -> np.ndarray:
    """``mean_k(parts[k] / temperatures[k])``, accumulated in place (float32)."""
    shapes = {p.shape for p in parts}
    if len(shapes) > 1:
        raise ValueError(
            f"ensemble members must share one (n_rows, n_classes) shape, got {sorted(shapes)}"
        )
    out = torch.zeros(parts[0].shape, dtype=torch.float32)
    for part, temperature in zip(parts, temperatures, strict=True):
        out.add_(torch.from_numpy(part), alpha=1.0 / (len(parts) * temperature))
    return out.numpy()
