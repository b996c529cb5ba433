"""The companion Tune callback of PostHocASHA and PostHocSearch.

Ray Tune checkpoints callbacks but never schedulers, so the callback carries the scheduler's
rungs and groups through ``Tuner.restore``. Callbacks run after the scheduler on each result,
so it also writes the ensemble values the scheduler just computed into that result, where
``ResultGrid`` dataframes and the logs show them. Searchers see no trial objects, so the
callback hands them the experiment's prediction store, and links a searcher to the
schedulers given with it (so that groups the scheduler pruned are told as pruned).
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from posthoc_tune._cluster import check_shared_storage
from posthoc_tune.schedulers import PostHocASHA
from posthoc_tune.search import PostHocSearch
from posthoc_tune.store import PredictionStore


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

    def on_trial_start(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        storage = trial.storage
        if storage is not None:
            store = PredictionStore(storage.storage_filesystem, storage.experiment_fs_path)
            if not self._checked_storage:  # on the driver, before any trial writes
                check_shared_storage(store)
                self._checked_storage = True
            for searcher in self.searchers:
                searcher.attach_store(store)

    def on_trial_result(
        self,
        iteration: int,
        trials: list[Trial],
        trial: Trial,
        result: dict[str, Any],
        **info: Any,
    ) -> None:
        for scheduler in self.schedulers:
            scheduler.annotate(trial, result)

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        # Final failures only: a trial Tune retries gets on_trial_recover instead.
        for scheduler in self.schedulers:
            scheduler.on_member_failed(trial)

    def get_state(self) -> dict[str, Any]:
        return {"schedulers": [s.get_state() for s in self.schedulers]}

    def set_state(self, state: dict[str, Any]) -> None:
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.set_state(saved)
