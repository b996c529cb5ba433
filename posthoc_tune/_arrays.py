"""Validation and conversion of logits and labels shared by metrics, transforms and the store."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

import numpy as np
import torch

ArrayLike: TypeAlias = np.ndarray | torch.Tensor


def _cpu_tensor(x: object, name: str) -> torch.Tensor:
    """A CPU tensor sharing a numpy array's memory, or a detached tensor moved to the CPU."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu")
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:  # e.g. from Ray's object store: torch would warn and share
            x = np.array(x)
        try:
            return torch.from_numpy(np.ascontiguousarray(x))
        except TypeError:  # object, string, longdouble, ...: torch's message names no argument
            raise TypeError(
                f"{name} must be a numeric array (integer or float), got numpy dtype {x.dtype}"
            ) from None
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def as_logits(
    logits: object, name: str = "logits", dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Return ``logits`` as a CPU tensor of ``dtype`` and shape (N, C), N >= 1 and C >= 2.

    Non-finite values are allowed here: callers decide whether they mean NaN metrics or an error.
    """
    t = _cpu_tensor(logits, name)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must have a real numeric dtype, got {t.dtype}")
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape (n_rows, n_classes), got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows); an evaluation split needs at least one row")
    if t.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes, got shape {tuple(t.shape)}")
    return t.to(dtype)


def integer_tensor(x: object, name: str) -> torch.Tensor:
    """``x`` as a CPU tensor, which must have an integer dtype: a cast would silently turn
    float labels 1.9 into 1 and bools into 0/1."""
    t = _cpu_tensor(x, name)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    return t


def as_labels(labels: object, n_rows: int, n_classes: int, name: str = "labels") -> torch.Tensor:
    """Return integer class labels as an int64 CPU tensor, checking length and range."""
    t = integer_tensor(labels, name)
    if t.ndim != 1 or t.shape[0] != n_rows:
        raise ValueError(
            f"{name} must have shape ({n_rows},) to match the logits, got {tuple(t.shape)}"
        )
    t = t.to(torch.int64)
    if n_rows:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= n_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{name} contain class {bad}, outside [0, {n_classes - 1}] for logits "
                f"with {n_classes} classes"
            )
    return t


def to_numpy(x: ArrayLike, dtype: type = np.float32) -> np.ndarray:
    """Detach a tensor (any device) or pass an array through, as ``dtype``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu").numpy()
    return np.asarray(x, dtype=dtype)


def output_logits(output: object, where: str, hint: str = "") -> torch.Tensor:
    """The logits of a model's output: a tensor, or the ``logits`` of an output object (a
    Hugging Face ``ModelOutput``) or dict; ``where`` and ``hint`` complete the error."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else None
    logits = getattr(output, "logits", logits)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"the model returned a {type(output).__name__} {where}, not a logits tensor nor an "
        f"object with a .logits tensor{hint}"
    )
