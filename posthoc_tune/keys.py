"""Public names: splits, variants, transforms, metrics and the metric keys built from them.

Every metric key has the form ``"{split}/{transform}/{metric}"`` (e.g. ``val/swa+ts/nll``).
These names are a public contract shared by the reporter, the store, the schedulers and the
tables, so they live in one place and every entry point validates against them. The module
imports nothing heavy: the command line builds its parser (choices, defaults) from it.
"""

from __future__ import annotations

from dataclasses import dataclass

SPLITS: tuple[str, ...] = ("val", "test")
"""Evaluation splits. TS is always fit on ``val`` and applied unchanged to ``test``."""

VARIANTS: tuple[str, ...] = ("base", "swa")
"""Per-trial models whose logits are stored: the live model and its SWA average."""

TRANSFORMS: tuple[str, ...] = (
    "base",
    "ts",
    "swa",
    "swa+ts",
    "ens",
    "ens+ts",
    "swa+ens",
    "swa+ens+ts",
)
"""Post-hoc transforms, composed in the order SWA -> member TS -> combine -> ensemble TS."""

METRICS: tuple[str, ...] = ("nll", "error", "ece", "brier")

TABLE_TRANSFORMS: tuple[str, ...] = ("base", "ts", "swa", "swa+ts", "ens", "ens+ts", "swa+ens+ts")
"""The selection table's default rows."""

PLOT_TRANSFORMS: tuple[str, ...] = ("swa", "swa+ts", "ens+ts", "swa+ens+ts")
"""The transforms plotted by default; the leaderboard chart ranks by the last one."""

DATASETS: tuple[str, ...] = ("mnist1d", "digits", "spirals")
"""The offline datasets of :func:`posthoc_tune.datasets.load`."""

FORMATS: tuple[str, ...] = ("md", "latex", "csv", "parquet")
"""Table output formats: md and LaTeX for reading, csv and Parquet with every column."""


@dataclass(frozen=True)
class Transform:
    """A parsed transform name.

    ``ts`` is the *final* temperature scaling: for a single model it scales that model, for an
    ensemble it is the ensemble-level TS. Ensemble members are always temperature-scaled
    before they are combined (the paper's "Ens" is TS-then-average).
    """

    name: str
    swa: bool
    ens: bool
    ts: bool

    @property
    def variant(self) -> str:
        """The stored per-trial variant this transform starts from."""
        return "swa" if self.swa else "base"


def parse_transform(name: str) -> Transform:
    """Parse a transform name such as ``"swa+ens+ts"``; unknown names raise ``ValueError``."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; expected one of {list(TRANSFORMS)}")
    parts = set(name.split("+"))
    return Transform(name=name, swa="swa" in parts, ens="ens" in parts, ts="ts" in parts)


def metric_key(split: str, transform: str, metric: str) -> str:
    """Build ``"{split}/{transform}/{metric}"`` after validating each part."""
    check_name("split", split, SPLITS)
    check_name("transform", transform, TRANSFORMS)
    check_name("metric", metric, METRICS)
    return f"{split}/{transform}/{metric}"


def parse_metric_key(key: str) -> tuple[str, Transform, str]:
    """Split a metric key into ``(split, Transform, metric)``; malformed keys raise ValueError."""
    parts = key.split("/") if isinstance(key, str) else []
    if len(parts) != 3:
        raise ValueError(
            f"metric key {key!r} is not of the form 'split/transform/metric', "
            f"e.g. 'val/swa+ens+ts/nll'"
        )
    split, transform, metric = parts
    metric_key(split, transform, metric)
    return split, parse_transform(transform), metric


def check_objective(metric: str | None, mode: str | None) -> None:
    """Validate an optional metric key and an optional mode, as schedulers and searchers
    take them (from their arguments or from ``TuneConfig``)."""
    if metric is not None:
        parse_metric_key(metric)
    if mode is not None and mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")


def metric_keys() -> list[str]:
    """Every metric key a trial reports, in a stable order."""
    return [f"{s}/{t}/{m}" for s in SPLITS for t in TRANSFORMS for m in METRICS]


def ensemble_epoch_key(transform: str) -> str:
    """The result key holding the epoch of a group's latest ensemble value under a
    transform (members run ahead of their group, so it can be earlier than ``epoch``)."""
    if not parse_transform(transform).ens:
        raise ValueError(f"transform {transform!r} is per-trial; ensemble epochs need 'ens'")
    return f"ensemble_epoch/{transform}"


def check_name(kind: str, value: object, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``; otherwise raise a ``ValueError`` naming it."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {list(allowed)}")
    return value
