"""The companion Tune callback of PostHocASHA and PostHocSearch.

Ray Tune checkpoints callbacks but never schedulers, so the callback carries the scheduler's
rungs and groups through ``Tuner.restore``. Callbacks run after the scheduler and the searcher
on each result and may change it before Tune stores it, so for group (ensemble) keys the
callback writes each seed group's ensemble values into its members' results, where
``ResultGrid.get_dataframe`` and ``get_best_result`` see them (see
:mod:`posthoc_tune.tune_results`). Searchers see no trial objects, so the callback finds the
experiment's prediction store and gives every component on a group key one evaluator on it,
and it tells a searcher the schedulers given with it (so that groups they pruned are told as
pruned). It meets its components only through :class:`~posthoc_tune._component.Component`.

When a trial stops, the callback records in the store the epoch of the last result Tune
processed from it: an epoch stored after that one (its result was on its way when the trial
was stopped) is kept but left out of selection, as no ResultGrid shows it.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from posthoc_tune._cluster import check_shared_storage
from posthoc_tune._component import (
    Component,
    Context,
    StatefulComponent,
    experiment_evaluator,
    experiment_store,
    on_group_key,
)
from posthoc_tune.tune_results import EnsembleResults


class PostHocCallback(Callback):
    """Add to ``RunConfig(callbacks=[...])``: ``PostHocCallback(scheduler, searcher)``, or
    ``scheduler.callback`` / ``searcher.callback`` for one of them."""

    def __init__(self, *components: Component) -> None:
        bad = [c for c in components if not isinstance(c, Component)]
        if bad or not components:
            raise TypeError(
                f"PostHocCallback takes PostHocASHA and PostHocSearch objects, got {bad or '()'}"
            )
        self.components = components
        self.schedulers = [c for c in components if isinstance(c, StatefulComponent)]
        self._grouped: list[Component] = []
        self._results: EnsembleResults | None = None
        self._found_store = False
        self._processed_recorded: set[str] = set()

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        # Metrics are known now: they may come from TuneConfig, set on the components before
        # callbacks are set up.
        context = Context(self.components, tuple(self.schedulers))
        if context.seeds is not None and len(self.schedulers) == len(self.components):
            raise ValueError(
                f"PostHocASHA(seeds={context.seeds}) grows seed groups, which only a searcher "
                f"can do: pass PostHocSearch to the same PostHocCallback(scheduler, searcher)"
            )
        for component in self.components:
            component.attach(context)
        self._grouped = [c for c in self.components if on_group_key(c)]
        self._results = self._ensemble_results()

    def _ensemble_results(self) -> EnsembleResults | None:
        """Group keys' values for the results."""
        if not self._grouped:
            return None
        for name in ("seed_key", "ensemble"):
            values = {getattr(c, name) for c in self._grouped}
            if len(values) > 1:
                raise ValueError(
                    f"PostHocCallback's components disagree on {name}: {sorted(values)}; "
                    f"one experiment's seed groups and ensembles must be defined one way"
                )
        roots = {c.store.root for c in self._grouped if c.store is not None}
        if len(roots) > 1:
            raise ValueError(
                f"PostHocCallback's components were given different stores: {sorted(roots)}; "
                f"they share one evaluator, so give them one store (or none: the experiment's)"
            )
        transforms = [o.transform.name for c in self._grouped if (o := c.parsed_metric)]
        sizes = {c.group_size for c in self.components if c.group_size is not None}
        return EnsembleResults(
            list(dict.fromkeys(transforms)),
            self._grouped[0].seed_key,
            group_size=sizes.pop() if len(sizes) == 1 else None,
        )

    def on_trial_start(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        experiment = None if self._found_store else experiment_store(trial)
        if experiment is None:
            return
        self._found_store = True
        check_shared_storage(experiment)  # on the driver, before any trial writes
        if self._results is not None:
            # The experiment's one evaluator, unless a component was given another store.
            store = next((c.store for c in self._grouped if c.store is not None), experiment)
            evaluator = experiment_evaluator(store, self._grouped[0].ensemble)
            for component in self._grouped:
                component.attach_evaluator(evaluator)
            self._results.attach_evaluator(evaluator)

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

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self._record_processed_epoch(trial)

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        # Final failures only: a trial Tune retries gets on_trial_recover instead.
        self._record_processed_epoch(trial)
        for scheduler in self.schedulers:
            scheduler.on_member_failed(trial)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        # Trials that were running or paused when the run ended (a time budget, a stopper)
        # were stopped without on_trial_complete.
        for trial in trials:
            if trial.trial_id not in self._processed_recorded:
                self._record_processed_epoch(trial)
        if self._results is not None:
            self._results.finish(trials)

    def _record_processed_epoch(self, trial: Trial) -> None:
        """Record in the store the epoch of the trial's last processed result (the
        reporter's ``epoch``), for a trial with a reporter."""
        self._processed_recorded.add(trial.trial_id)
        epoch = (trial.last_result or {}).get("epoch")
        store = experiment_store(trial)
        if epoch is None or store is None:
            return
        try:
            store.metadata(trial.trial_id)
        except KeyError:  # a trial without a reporter
            return
        store.write_processed_epoch(trial.trial_id, int(epoch))

    def get_state(self) -> dict[str, Any]:
        return {"schedulers": [s.get_state() for s in self.schedulers]}

    def set_state(self, state: dict[str, Any]) -> None:
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.set_state(saved)
