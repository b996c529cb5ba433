"""posthoc_tune: post-hoc selection (temperature scaling, SWA, seed ensembles) for Ray Tune.

Trials report naive *and* post-hoc metrics every epoch and store their predictions, so that
epochs, pruning decisions and configurations can be chosen by the metric of the model that
will actually ship.
"""

from posthoc_tune import metrics
from posthoc_tune.callback import PostHocCallback
from posthoc_tune.ensemble import EnsembleEvaluator, ensemble_metrics, ensemble_table
from posthoc_tune.groups import group_key, member_seed, with_seeds
from posthoc_tune.keys import (
    METRICS,
    SPLITS,
    TRANSFORMS,
    VARIANTS,
    metric_key,
    metric_keys,
    parse_metric_key,
    parse_transform,
)
from posthoc_tune.reporter import PostHocReporter
from posthoc_tune.schedulers import PostHocASHA
from posthoc_tune.search import PostHocSearch
from posthoc_tune.selection import TABLE_TRANSFORMS, leaderboard, selection_table
from posthoc_tune.store import PredictionStore, StoreError
from posthoc_tune.transforms import TemperatureScaler, WeightAverager, apply_transform, combine

__version__ = "0.1.0"

__all__ = [
    "METRICS",
    "SPLITS",
    "TABLE_TRANSFORMS",
    "TRANSFORMS",
    "VARIANTS",
    "EnsembleEvaluator",
    "PostHocASHA",
    "PostHocCallback",
    "PostHocReporter",
    "PostHocSearch",
    "PredictionStore",
    "StoreError",
    "TemperatureScaler",
    "WeightAverager",
    "apply_transform",
    "combine",
    "ensemble_metrics",
    "ensemble_table",
    "group_key",
    "leaderboard",
    "member_seed",
    "metric_key",
    "metric_keys",
    "metrics",
    "parse_metric_key",
    "parse_transform",
    "selection_table",
    "with_seeds",
]
