"""What PostHocCallback wires together: the schedulers and searchers of one experiment.

The callback meets PostHocASHA and PostHocSearch only through :class:`Component`, so it
imports neither (their ``.callback`` properties import it lazily). At setup it gives each
component a :class:`Context` (the others: a searcher tells the groups a scheduler stopped
as pruned); once the experiment's store is known it gives every component on a group key,
and its own ensemble results, one :class:`~posthoc_tune.ensemble.EnsembleEvaluator`, so a
group's ensemble at an epoch is read and computed once however many components ask for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from posthoc_tune.ensemble import EnsembleEvaluator
from posthoc_tune.store import PredictionStore

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

    from posthoc_tune.groups import Status
    from posthoc_tune.keys import Objective
    from posthoc_tune.transforms import Combiner


@runtime_checkable
class Component(Protocol):
    """A scheduler or searcher on a post-hoc metric key that PostHocCallback can serve."""

    seed_key: str
    ensemble: Combiner

    @property
    def parsed_metric(self) -> Objective | None:
        """The metric key and mode, parsed (None until both are known)."""

    @property
    def group_size(self) -> int | None:
        """Members per seed group when the component creates them one by one (None: every
        trial Tune creates joins its group at once)."""

    @property
    def store(self) -> PredictionStore | None:
        """The store group keys read, when the component was given one."""

    @property
    def pruned_trials(self) -> Set[str]:
        """The trials the component stopped early."""

    def attach(self, context: Context) -> None:
        """Called when the callback is set up in a Tune run (it is registered)."""

    def attach_evaluator(self, evaluator: EnsembleEvaluator) -> None:
        """Evaluate group keys with ``evaluator``."""


@runtime_checkable
class StatefulComponent(Component, Protocol):
    """A scheduler: Tune saves no scheduler state (the callback carries it through
    ``Tuner.restore``), and its hooks cannot tell a final failure from a retry (the
    callback's can)."""

    def on_member_failed(self, trial: Trial) -> None:
        """A trial failed for good."""

    def get_state(self) -> dict[str, Any]:
        """Plain, picklable data."""

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`get_state`."""

    @property
    def seeds(self) -> tuple[int, ...] | None:
        """The seed schedule: members a group needs at each rung (None: none)."""

    def seeds_wanted(self, trial_id: str) -> int | None:
        """Members the seed group of ``trial_id`` should have now (None: no schedule)."""

    def member_status(self, trial_id: str) -> Status | None:
        """A member's status as the scheduler knows it (None: unknown)."""


@dataclass(frozen=True)
class Context:
    """What a callback tells each of its components: all of them."""

    components: tuple[Component, ...]
    schedulers: tuple[StatefulComponent, ...] = ()  # those of the components

    def pruned(self, trial_ids: Iterable[str]) -> bool:
        """Whether a component stopped one of ``trial_ids`` early."""
        ids = set(trial_ids)
        return any(not ids.isdisjoint(c.pruned_trials) for c in self.components)

    @property
    def seeds(self) -> tuple[int, ...] | None:
        """The schedulers' seed schedule, None without one (one per experiment)."""
        schedules = {c.seeds for c in self.schedulers}
        schedules.discard(None)
        if len(schedules) > 1:
            raise ValueError(
                f"PostHocCallback's schedulers have different seed schedules: {schedules}"
            )
        return schedules.pop() if schedules else None

    def seeds_wanted(self, trial_id: str) -> int | None:
        """Members the seed group of ``trial_id`` should have now under the seed schedule
        (the most any scheduler asks for); None without one."""
        wanted = [n for c in self.schedulers if (n := c.seeds_wanted(trial_id)) is not None]
        return max(wanted, default=None)

    def member_status(self, trial_id: str) -> Status | None:
        """A member's status as a scheduler knows it (None: no scheduler knows the trial)."""
        return next(
            (s for c in self.schedulers if (s := c.member_status(trial_id)) is not None), None
        )


def on_group_key(component: Component) -> bool:
    """Whether a component's metric is a group (ensemble) key."""
    objective = component.parsed_metric
    return objective is not None and objective.transform.ens


def experiment_store(trial: Trial) -> PredictionStore | None:
    """The store of the experiment a trial belongs to (None for a trial without storage)."""
    storage = trial.storage
    if storage is None:
        return None
    return PredictionStore(storage.storage_filesystem, storage.experiment_fs_path)


def experiment_evaluator(store: PredictionStore, ensemble: Combiner) -> EnsembleEvaluator:
    """An experiment's evaluator, loaded with the values its store holds (a restored driver
    recomputes nothing). It reads val alone: decisions are taken on val, and reading test
    too would double the driver's work at every rung."""
    evaluator = EnsembleEvaluator(store, ensemble=ensemble, splits=["val"])
    evaluator.load()
    return evaluator


class Ensembles:
    """A component's evaluator: the one attached (PostHocCallback's, a replay's), else one
    made on first use, for a component run without the callback."""

    def __init__(self, store: PredictionStore | None, ensemble: Combiner) -> None:
        self._given = store
        self.ensemble: Combiner = ensemble
        self.evaluator: EnsembleEvaluator | None = None

    @property
    def store(self) -> PredictionStore | None:
        """The store given, else the attached evaluator's."""
        if self._given is None and self.evaluator is not None:
            return self.evaluator.store
        return self._given

    def get(self, experiment: Callable[[], PredictionStore]) -> EnsembleEvaluator:
        """The evaluator; made on the store given or, without one, on ``experiment()``."""
        if self.evaluator is None:
            self.evaluator = experiment_evaluator(self._given or experiment(), self.ensemble)
        return self.evaluator
