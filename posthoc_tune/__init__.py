"""posthoc_tune: post-hoc selection (temperature scaling, SWA, seed ensembles) for Ray Tune.

Trials report naive *and* post-hoc metrics every epoch and store their predictions, so that
epochs, pruning decisions and configurations can be chosen by the metric of the model that
will actually ship.

The names below are imported on first use (PEP 562): the package itself imports neither Ray
nor PyTorch nor Optuna, so ``posthoc-tune --help`` and the light modules load at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from posthoc_tune import metrics
    from posthoc_tune.callback import PostHocCallback
    from posthoc_tune.ensemble import EnsembleEvaluator, ensemble_metrics, ensemble_table
    from posthoc_tune.greedy import GreedyEnsemble, greedy_ensemble
    from posthoc_tune.groups import group_key, member_seed, with_seeds
    from posthoc_tune.keys import (
        METRICS,
        REGISTRY,
        SPLITS,
        TABLE_TRANSFORMS,
        TOKEN_METRICS,
        TOKEN_TRANSFORMS,
        TRANSFORMS,
        TRIAL_TRANSFORMS,
        VARIANTS,
        Transform,
        ensemble_epoch_key,
        metric_key,
        metric_keys,
        parse_metric_key,
        parse_transform,
    )
    from posthoc_tune.reporter import PostHocReporter
    from posthoc_tune.schedulers import PostHocASHA
    from posthoc_tune.search import PostHocSearch
    from posthoc_tune.selection import leaderboard, selection_table
    from posthoc_tune.store import PredictionStore, StoreError
    from posthoc_tune.transforms import (
        TemperatureScaler,
        WeightAverager,
        apply_transform,
        combine,
        unwrap_model,
    )

__version__ = "0.1.0"

_MODULES = {
    "metrics": "metrics",
    "PostHocCallback": "callback",
    "EnsembleEvaluator": "ensemble",
    "ensemble_metrics": "ensemble",
    "ensemble_table": "ensemble",
    "GreedyEnsemble": "greedy",
    "greedy_ensemble": "greedy",
    "group_key": "groups",
    "member_seed": "groups",
    "with_seeds": "groups",
    "METRICS": "keys",
    "REGISTRY": "keys",
    "SPLITS": "keys",
    "TABLE_TRANSFORMS": "keys",
    "TOKEN_METRICS": "keys",
    "TOKEN_TRANSFORMS": "keys",
    "TRANSFORMS": "keys",
    "TRIAL_TRANSFORMS": "keys",
    "Transform": "keys",
    "VARIANTS": "keys",
    "ensemble_epoch_key": "keys",
    "metric_key": "keys",
    "metric_keys": "keys",
    "parse_metric_key": "keys",
    "parse_transform": "keys",
    "PostHocReporter": "reporter",
    "PostHocASHA": "schedulers",
    "PostHocSearch": "search",
    "leaderboard": "selection",
    "selection_table": "selection",
    "PredictionStore": "store",
    "StoreError": "store",
    "TemperatureScaler": "transforms",
    "WeightAverager": "transforms",
    "apply_transform": "transforms",
    "combine": "transforms",
    "unwrap_model": "transforms",
}
"""Where each public name lives (a module's own name: the module itself)."""

__all__ = [
    "METRICS",
    "REGISTRY",
    "SPLITS",
    "TABLE_TRANSFORMS",
    "TOKEN_METRICS",
    "TOKEN_TRANSFORMS",
    "TRANSFORMS",
    "TRIAL_TRANSFORMS",
    "VARIANTS",
    "EnsembleEvaluator",
    "GreedyEnsemble",
    "PostHocASHA",
    "PostHocCallback",
    "PostHocReporter",
    "PostHocSearch",
    "PredictionStore",
    "StoreError",
    "TemperatureScaler",
    "Transform",
    "WeightAverager",
    "apply_transform",
    "combine",
    "ensemble_epoch_key",
    "ensemble_metrics",
    "ensemble_table",
    "greedy_ensemble",
    "group_key",
    "leaderboard",
    "member_seed",
    "metric_key",
    "metric_keys",
    "metrics",
    "parse_metric_key",
    "parse_transform",
    "selection_table",
    "unwrap_model",
    "with_seeds",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    value = module if _MODULES[name] == name else getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
