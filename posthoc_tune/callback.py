"""The companion Tune callback of PostHocASHA and PostHocSearch.

Ray Tune checkpoints callbacks but never schedulers, so the callback carries the scheduler's
rungs and groups through ``Tuner.restore``. Callbacks run after the scheduler and the searcher
on each result and may change it before Tune stores it, so for group (ensemble) keys the
callback writes each seed group's ensemble values into its members' results, where
``ResultGrid.get_dataframe`` and ``get_best_result`` see them (see
:mod:`posthoc_tune.tune_results`). Searchers see no trial objects, so the callback hands them
the experiment's prediction store, and links a searcher to the schedulers given with it (so
that groups the scheduler pruned are told as pruned).
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from posthoc_tune._cluster import check_shared_storage
from posthoc_tune.ensemble import shared_evaluator
from posthoc_tune.keys import parse_metric_key
from posthoc_tune.schedulers import PostHocASHA
from posthoc_tune.search import PostHocSearch
from posthoc_tune.store import PredictionStore
from posthoc_tune.tune_results import EnsembleResults


class PostHocCallback(Callback):
    """Add to ``RunConfig(callbacks=[...])``: ``PostHocCallback(scheduler, searcher)``, or
    ``scheduler.callback`` / ``searcher.callback`` for one of them."""

    def __init__(self, *components: PostHocASHA | PostHocSearch) -> None:
        bad = [c for c in components if not isinstance(c, (PostHocASHA, PostHocSearch))]
        if bad or not components:
            raise TypeError(
                f"PostHocCallback takes PostHocASHA and PostHocSearch objects, got {bad or '()'}"
            )
        self.schedulers = [c for c in components if isinstance(c, PostHocASHA)]
        self.searchers = [c for c in components if isinstance(c, PostHocSearch)]
        self._checked_storage = False
        self._results: EnsembleResults | None = None
        for searcher in self.searchers:
            for scheduler in self.schedulers:
                searcher.link(scheduler)

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        for scheduler in self.schedulers:
            scheduler._callback_attached = True
        self._results = self._ensemble_results()

    def _grouped(self) -> list[PostHocASHA | PostHocSearch]:
        """The components on a group (ensemble) key."""
        components: list[PostHocASHA | PostHocSearch] = [*self.schedulers, *self.searchers]
        return [c for c in components if c.is_group_metric]

    def _ensemble_results(self) -> EnsembleResults | None:
        """Group keys' values for the results, once metrics are known (they may come from
        ``TuneConfig``, set on the components before callbacks are set up)."""
        grouped = self._grouped()
        if not grouped:
            return None
        for name in ("seed_key", "ensemble"):
            values = {getattr(c, name) for c in grouped}
            if len(values) > 1:
                raise ValueError(
                    f"PostHocCallback's components disagree on {name}: {sorted(values)}; "
                    f"one experiment's seed groups and ensembles must be defined one way"
                )
        transforms = [parse_metric_key(c.metric)[1].name for c in grouped]
        sizes = {s.n_seeds for s in self.searchers}
        return EnsembleResults(
            list(dict.fromkeys(transforms)),
            grouped[0].seed_key,
            group_size=sizes.pop() if len(sizes) == 1 else None,
        )

    def on_trial_start(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        storage = trial.storage
        experiment = None
        if storage is not None:
            experiment = PredictionStore(storage.storage_filesystem, storage.experiment_fs_path)
            if not self._checked_storage:  # on the driver, before any trial writes
                check_shared_storage(experiment)
                self._checked_storage = True
            for searcher in self.searchers:
                searcher.attach_store(experiment)
        if self._results is not None and not self._results.attached:
            grouped = self._grouped()
            store = next((c.store for c in grouped if c.store is not None), experiment)
            if store is not None:  # the store the components read, shared with them
                self._results.attach_evaluator(
                    shared_evaluator(store, ensemble=grouped[0].ensemble, splits=["val"])
                )

    def on_trial_result(
        self,
        iteration: int,
        trials: list[Trial],
        trial: Trial,
        result: dict[str, Any],
        **info: Any,
    ) -> None:
        if self._results is not None:
            self._results.on_result(trials, trial, result)

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        # Final failures only: a trial Tune retries gets on_trial_recover instead.
        for scheduler in self.schedulers:
            scheduler.on_member_failed(trial)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        if self._results is not None:
            self._results.finish(trials)

    def get_state(self) -> dict[str, Any]:
        return {"schedulers": [s.get_state() for s in self.schedulers]}

    def set_state(self, state: dict[str, Any]) -> None:
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.set_state(saved)
