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

SCOPES: tuple[str, ...] = ("trial", "group")
"""Whose predictions a transform combines: one trial's own, or a seed group's (the seeds of
one configuration, which only the driver sees together)."""

CHECKPOINT_WINDOW = 10
"""Epochs in a checkpoint ensemble: the member's last ten end-of-epoch models (fewer in its
first epochs), as snapshot ensembles average the last snapshots of one run (Huang et al.,
2017). Measured on three noisy-label experiments (``benchmarks/RESULTS.md``), post-hoc
selection gains with the window (test NLL better by 0.012-0.014 at 10 than at 5, in all
three; 20 gained a little more on two), while naive selection, at early base-best epochs,
prefers short ones (3 better than 10 by 0.008-0.019). Longer windows cost the reporter memory
(it holds the window's logits) for little more gain."""


def check_name(kind: str, value: object, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``; otherwise raise a ``ValueError`` naming it."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {list(allowed)}")
    return value


@dataclass(frozen=True)
class Transform:
    """A post-hoc transform, declared once in :data:`REGISTRY`.

    Every transform is one pipeline, in the order of the paper's code: take the ``variant``'s
    logits of each member (one model, the ``window`` last epochs of one trial, or the seeds
    of a group at one common epoch), temperature-scale each member and average them when there
    are several, then fit one more temperature on the result when ``ts`` is set. For a single
    model ``ts`` is its own temperature scaling.

    Attributes:
        name: the key's middle part (``val/<name>/nll``).
        variant: the stored per-trial model it starts from: ``"base"`` or ``"swa"``.
        scope: ``"trial"`` (reported by the trial itself) or ``"group"`` (the seed ensemble,
            computed on the driver).
        window: epochs of one trial combined (1: the epoch alone; see
            :data:`CHECKPOINT_WINDOW`).
        ts: temperature scaling of the final model.
    """

    name: str
    variant: str = "base"
    scope: str = "trial"
    window: int = 1
    ts: bool = False

    def __post_init__(self) -> None:
        check_name("variant", self.variant, VARIANTS)
        check_name("scope", self.scope, SCOPES)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")

    @property
    def ens(self) -> bool:
        """Whether it is a seed-group transform (a group key: evaluated on the driver)."""
        return self.scope == "group"

    @property
    def swa(self) -> bool:
        return self.variant == "swa"

    @property
    def combines(self) -> bool:
        """Whether members are combined (temperature-scaled, then averaged)."""
        return self.ens or self.window > 1

    def epochs(self, epoch: int) -> range:
        """The epochs of one trial whose models it combines when judged at ``epoch``."""
        return range(max(1, epoch - self.window + 1), epoch + 1)


REGISTRY: tuple[Transform, ...] = (
    Transform("base"),
    Transform("ts", ts=True),
    Transform("swa", variant="swa"),
    Transform("swa+ts", variant="swa", ts=True),
    Transform("ens", scope="group"),
    Transform("ens+ts", scope="group", ts=True),
    Transform("swa+ens", variant="swa", scope="group"),
    Transform("swa+ens+ts", variant="swa", scope="group", ts=True),
    Transform("ckpt", window=CHECKPOINT_WINDOW),
    Transform("ckpt+ts", window=CHECKPOINT_WINDOW, ts=True),
    Transform("swa+ckpt", variant="swa", window=CHECKPOINT_WINDOW),
    Transform("swa+ckpt+ts", variant="swa", window=CHECKPOINT_WINDOW, ts=True),
)
"""Every post-hoc transform. Adding one is a line here (plus its math in
:func:`posthoc_tune.transforms.apply_transform` if the pipeline above does not cover it):
keys, reports, stores, schedulers, searchers, tables and plots all read this registry."""

_BY_NAME: dict[str, Transform] = {t.name: t for t in REGISTRY}
assert len(_BY_NAME) == len(REGISTRY), "transform names must be unique"

TRANSFORMS: tuple[str, ...] = tuple(_BY_NAME)
"""Every transform's name, in the registry's order."""

TRIAL_TRANSFORMS: tuple[str, ...] = tuple(t.name for t in REGISTRY if t.scope == "trial")
"""The transforms a trial reports itself (the others are its group's, from the driver)."""

METRICS: tuple[str, ...] = ("nll", "error", "ece", "brier")
"""Metrics of class logits (one row per example)."""

TOKEN_METRICS: tuple[str, ...] = (
    "token_nll",
    "perplexity",
    "token_error",
    "token_ece",
    "token_brier",
)
"""Metrics of a language model's next-token predictions, averaged over scored tokens
(:mod:`posthoc_tune.tokens`): NLL per token, its exponential (perplexity), next-token error,
ECE and Brier score. They sit beside the class metrics (e.g. a multiple-choice task's) in the
same results."""

TOKEN_TRANSFORMS: tuple[str, ...] = tuple(t.name for t in REGISTRY if not t.combines)
"""The transforms a trial's stored token records give (single models: base, TS, SWA, SWA+TS).
Combining token-level predictions needs the members' full logits on the same batches, so
their ensembles are evaluated from the members' weights
(:func:`posthoc_tune.tokens.evaluate_ensemble`), not from the store."""

TABLE_TRANSFORMS: tuple[str, ...] = ("base", "ts", "swa", "swa+ts", "ens", "ens+ts", "swa+ens+ts")
"""The selection table's default rows (the paper's)."""

PLOT_TRANSFORMS: tuple[str, ...] = ("swa", "swa+ts", "ens+ts", "swa+ens+ts")
"""The transforms plotted by default; the leaderboard chart ranks by the last one."""

DATASETS: tuple[str, ...] = ("mnist1d", "digits", "spirals")
"""The offline datasets of :func:`posthoc_tune.datasets.load`."""

FORMATS: tuple[str, ...] = ("md", "latex", "csv", "parquet")
"""Table output formats: md and LaTeX for reading, csv and Parquet with every column."""


def parse_transform(name: str | Transform) -> Transform:
    """The registered transform of a name such as ``"swa+ens+ts"`` (a Transform is returned
    as it is); unknown names raise ``ValueError``."""
    if isinstance(name, Transform):
        return name
    transform = _BY_NAME.get(name) if isinstance(name, str) else None
    if transform is None:
        raise ValueError(f"unknown transform {name!r}; expected one of {list(TRANSFORMS)}")
    return transform


def metric_key(split: str, transform: str, metric: str) -> str:
    """Build ``"{split}/{transform}/{metric}"`` after validating each part."""
    check_name("split", split, SPLITS)
    check_name("transform", transform, TRANSFORMS)
    check_name("metric", metric, METRICS + TOKEN_METRICS)
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
        split, transform, name = parse_metric_key(metric)
        if name in TOKEN_METRICS and transform.combines:
            raise ValueError(
                f"{metric!r} combines token-level predictions, which no trial reports and the "
                f"store cannot rebuild (it keeps compact token records, not logits): rank by a "
                f"single-model key such as {split}/swa+ts/{name} (any of "
                f"{list(TOKEN_TRANSFORMS)}); evaluate token-level ensembles from the members' "
                f"weights with posthoc_tune.tokens.evaluate_ensemble"
            )
    if mode is not None and mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")


def metric_keys() -> list[str]:
    """Every class-metric key a trial reports, in a stable order."""
    return [f"{s}/{t}/{m}" for s in SPLITS for t in TRANSFORMS for m in METRICS]


def token_metric_keys() -> list[str]:
    """Every token-metric key a trial with token-level splits reports, in a stable order."""
    return [f"{s}/{t}/{m}" for s in SPLITS for t in TOKEN_TRANSFORMS for m in TOKEN_METRICS]


def token_temperature_key(variant: str) -> str:
    """The result key of a variant's token-level temperature (fit on the val tokens)."""
    return f"token_temperature/{check_name('variant', variant, VARIANTS)}"


@dataclass(frozen=True)
class Objective:
    """A metric key and a mode, parsed once: what a scheduler or searcher optimises.

    ``score(value)`` maps a value to higher-is-better (``-value`` for ``mode="min"``), the
    convention of Ray's ASHA, so comparisons never branch on the mode.
    """

    key: str
    mode: str
    split: str
    transform: Transform
    metric: str

    @classmethod
    def parse(cls, key: str, mode: str) -> Objective:
        split, transform, metric = parse_metric_key(key)
        check_objective(key, mode)
        return cls(key, mode, split, transform, metric)

    @property
    def sign(self) -> float:
        return 1.0 if self.mode == "max" else -1.0

    def score(self, value: float) -> float:
        return self.sign * value


def ensemble_epoch_key(transform: str) -> str:
    """The result key holding the epoch of a group's latest ensemble value under a
    transform (members run ahead of their group, so it can be earlier than ``epoch``)."""
    if not parse_transform(transform).ens:
        raise ValueError(
            f"transform {transform!r} is per-trial; ensemble epochs are a seed group's"
        )
    return f"ensemble_epoch/{transform}"
