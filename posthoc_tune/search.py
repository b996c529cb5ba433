"""PostHocSearch: Optuna proposes configurations, each runs as K seeds, Optuna learns the
configuration's post-hoc objective.

Ray's ``OptunaSearch`` tells Optuna one trial's metric and its ``Repeater`` averages only
final values and loses its groups on restore; neither can tell a *seed group's* ensemble
loss. Here one Optuna trial is one configuration: each ``ask`` becomes K Tune trials with
identical values and seeds ``0..K-1``. Every epoch that all of a group's members (failed ones
excepted) have reached is scored (the ensemble from the prediction store for group keys, the
members' mean for per-trial keys) and reported to the Optuna trial, and when the group ends
its objective (best or last epoch) is told.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from posthoc_tune import keys
from posthoc_tune._component import Context, Ensembles, on_group_key
from posthoc_tune.curves import best_epoch, members_mean
from posthoc_tune.ensemble import EnsembleEvaluator
from posthoc_tune.groups import (
    DONE,
    ERROR,
    LIVE,
    SeedGroup,
    check_seed_key,
    flatten_config,
    has_path,
    unflatten_config,
    with_path,
)
from posthoc_tune.keys import check_objective
from posthoc_tune.store import PredictionStore

if TYPE_CHECKING:
    from posthoc_tune.callback import PostHocCallback
    from posthoc_tune.transforms import Combiner

Objective = Literal["best", "last"]
Distributions = dict[str, optuna.distributions.BaseDistribution]


@dataclass
class _Configuration:
    """One Optuna trial: a configuration, its seed group and its scored epochs."""

    number: int
    storage_id: int  # Optuna's internal trial id, to report intermediate values after a restore
    params: dict[str, Any]
    group: SeedGroup = field(default_factory=SeedGroup)
    reported: dict[str, dict[int, float]] = field(default_factory=dict)  # per-trial keys
    values: dict[int, float] = field(default_factory=dict)  # scored epochs
    key: str | None = None  # the reporter's group key, read once from the store
    told: bool = False
    scored_with: tuple[str, ...] = ()  # the members ``values`` were scored with


class PostHocSearch(Searcher):
    """Optuna search over seed groups, told each configuration's post-hoc objective.

    Args:
        space: the search space: Ray Tune domains (``tune.loguniform``, ``tune.choice``, ...,
            nested dicts allowed) or a flat dict of Optuna distributions; None takes Tune's
            ``param_space``. Grid search is not supported (Optuna samples).
        metric: a metric key; group keys (``ens``) are scored on the ensemble of the group's
            members, per-trial keys on the mean over members. May come from ``TuneConfig``.
        mode: ``"min"`` or ``"max"``; may come from ``TuneConfig``.
        n_seeds: K, the seeds (ensemble members) per configuration; ``num_samples`` must be
            configurations x K. With a linked PostHocASHA's seed schedule (``seeds=``), the
            most seeds a configuration can earn: it starts with the schedule's first entry and
            gains seeds as the scheduler asks (:meth:`PostHocASHA.seeds_wanted`).
        n_configs: the configurations to propose, after which the search finishes once every
            one has ended; None: as many as ``num_samples`` allows. With a seed schedule the
            number of trials depends on the seeds configurations earn: set this and
            ``num_samples=-1``.
        seed_key: the config key (or "a/b" path, e.g. ``"train_loop_config/seed"``)
            receiving the seed; it must not be in the space.
        sampler: an Optuna sampler; default ``TPESampler(seed=0)``.
        objective: ``"best"``: the best scored epoch (post-hoc selection over epochs);
            ``"last"``: the last scored epoch.
        points_to_evaluate: configurations to try first (dicts of parameter values).
        storage: an Optuna storage URL (e.g. ``sqlite:///study.db``) or storage object, so
            optuna-dashboard and Optuna's visualisations work on the study; None keeps it in
            memory.
        study_name: the study's name (loaded if it exists in ``storage``).
        ensemble: ensemble combiner for group keys: ``"logits"`` or ``"probs"``.
        store: where group keys read predictions; None: the experiment's store, which
            :attr:`callback` finds from the trials.

    A group stopped by a linked :class:`PostHocASHA` (pass both to one
    :class:`PostHocCallback`) is told ``PRUNED``: TPE ranks pruned trials below completed ones,
    by the last epoch reached and the value reported there, so it still learns from them.
    Other groups are told ``COMPLETE`` with their objective, or ``FAIL`` when every member
    errored or the objective is not finite (no finite epoch for ``best``, a diverged last
    epoch for ``last``): a NaN never makes a group look better than it is.
    """

    def __init__(
        self,
        space: Mapping[str, Any] | None = None,
        metric: str | None = None,
        mode: str | None = None,
        n_seeds: int = 4,
        n_configs: int | None = None,
        seed_key: str = "seed",
        sampler: optuna.samplers.BaseSampler | None = None,
        objective: Objective = "best",
        points_to_evaluate: Sequence[Mapping[str, Any]] | None = None,
        storage: str | optuna.storages.BaseStorage | None = None,
        study_name: str | None = None,
        ensemble: Combiner = "logits",
        store: PredictionStore | str | os.PathLike[str] | None = None,
    ) -> None:
        check_objective(metric, mode)
        if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
            raise ValueError(f"n_seeds must be an int >= 1, got {n_seeds!r}")
        if n_configs is not None and (
            isinstance(n_configs, bool) or not isinstance(n_configs, int) or n_configs < 1
        ):
            raise ValueError(f"n_configs must be an int >= 1 or None, got {n_configs!r}")
        check_seed_key(seed_key)
        if sampler is not None and not isinstance(sampler, optuna.samplers.BaseSampler):
            raise TypeError(f"sampler must be an optuna sampler, got {type(sampler).__name__}")
        if objective not in ("best", "last"):
            raise ValueError(f"objective must be 'best' or 'last', got {objective!r}")
        if ensemble not in ("logits", "probs"):
            raise ValueError(f"ensemble must be 'logits' or 'probs', got {ensemble!r}")
        if storage is not None and not isinstance(storage, (str, optuna.storages.BaseStorage)):
            raise TypeError(f"storage must be an Optuna storage URL or object, got {storage!r}")
        super().__init__(metric=metric, mode=mode)
        self.n_seeds = n_seeds
        self.n_configs = n_configs
        self.seed_key = seed_key
        self.objective: Objective = objective
        self.ensemble: Combiner = ensemble
        self._sampler = sampler
        self._storage = storage
        self._study_name = study_name
        self._points = [flatten_config(p) for p in points_to_evaluate or []]
        self._space: Distributions | None = None
        if space is not None:
            self._space = self._convert(space)
        self._study: optuna.Study | None = None
        self._queue: list[tuple[int, int]] = []  # (configuration number, seed) still to suggest
        self._configs: dict[int, _Configuration] = {}
        self._trial_config: dict[str, int] = {}
        if isinstance(store, (str, os.PathLike)):
            store = PredictionStore.open(store)
        self._ensembles = Ensembles(store, ensemble)
        self._parsed: keys.Objective | None = None
        self._context: Context | None = None
        self._callback: PostHocCallback | None = None

    # -- configuration ----------------------------------------------------------------------

    @property
    def parsed_metric(self) -> keys.Objective | None:
        """The metric key and mode, parsed (None until both are known: either may come from
        ``TuneConfig``, and a restore brings them back)."""
        metric, mode = self._metric, self._mode
        if not metric or not mode:
            return None
        if self._parsed is None or (self._parsed.key, self._parsed.mode) != (metric, mode):
            self._parsed = keys.Objective.parse(metric, mode)
        return self._parsed

    @property
    def is_group_metric(self) -> bool:
        """Whether the metric is an ensemble (group) key."""
        return on_group_key(self)

    @property
    def group_size(self) -> int | None:
        """K: each configuration's members are created one by one, as Tune asks (None under
        a seed schedule: a configuration has the seeds it earned)."""
        return None if self._schedule() is not None else self.n_seeds

    @property
    def study(self) -> optuna.Study:
        """The Optuna study (one trial per configuration)."""
        if self._study is None:
            raise RuntimeError("PostHocSearch has no study yet: it is created with the space")
        return self._study

    @property
    def callback(self) -> PostHocCallback:
        """A ``tune.Callback`` that gives this searcher the experiment's store; to link it to
        a PostHocASHA, use ``PostHocCallback(scheduler, searcher)`` instead."""
        if self._callback is None:
            from posthoc_tune.callback import PostHocCallback

            self._callback = PostHocCallback(self)
        return self._callback

    @property
    def store(self) -> PredictionStore | None:
        """The store group keys read: the one given, or the experiment's once attached."""
        return self._ensembles.store

    @property
    def pruned_trials(self) -> Set[str]:
        """Empty: a searcher stops no trial (a scheduler does)."""
        return frozenset()

    def attach(self, context: Context) -> None:
        """Learn the callback's other components: a group one of them pruned is told PRUNED,
        and a scheduler's seed schedule says how many seeds each configuration gets."""
        seeds = context.seeds
        if seeds is not None and max(seeds) > self.n_seeds:
            raise ValueError(
                f"the scheduler's seed schedule {seeds} asks for up to {max(seeds)} seeds, but "
                f"PostHocSearch(n_seeds={self.n_seeds}) creates at most {self.n_seeds}"
            )
        if seeds is not None and self.n_configs is None:
            raise ValueError(
                f"with a seed schedule ({seeds}) the number of trials depends on the seeds "
                f"configurations earn: pass PostHocSearch(n_configs=...) and num_samples=-1"
            )
        self._context = context

    def _schedule(self) -> tuple[int, ...] | None:
        return None if self._context is None else self._context.seeds

    def _expected(self, config: _Configuration) -> int:
        """The members a configuration should have now: K, or what the seed schedule wants
        for it (at most K)."""
        if self._schedule() is None or self._context is None or not config.group.members:
            return self.n_seeds
        wanted = self._context.seeds_wanted(next(iter(config.group.members)))
        return min(self.n_seeds, max(wanted or 0, len(config.group.members)))

    def _growth(self) -> list[tuple[int, int]]:
        """(configuration, seed) for the seeds a seed schedule wants that no trial has yet,
        configurations in the order they were proposed."""
        if self._schedule() is None:
            return []
        return [
            (config.number, seed)
            for config in self._configs.values()
            if not config.told and config.group.members
            for seed in range(len(config.group.members), self._expected(config))
        ]

    def attach_evaluator(self, evaluator: EnsembleEvaluator) -> None:
        """Evaluate group keys with ``evaluator`` (PostHocCallback's, on the experiment's
        store, shared with its other components)."""
        self._ensembles.evaluator = evaluator

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict[str, Any], **spec: Any
    ) -> bool:
        num_samples = spec.get("num_samples")
        by_samples = self.n_configs is None  # else the searcher bounds the search itself
        if (
            by_samples
            and isinstance(num_samples, int)
            and num_samples > 0
            and num_samples % self.n_seeds
        ):
            raise ValueError(
                f"num_samples={num_samples} is not a multiple of n_seeds={self.n_seeds}: each "
                f"configuration runs as {self.n_seeds} trials, so set num_samples = "
                f"configurations x {self.n_seeds}"
            )
        if self._space is not None:
            return False
        self._space = self._convert(config)
        check_objective(metric or None, mode or None)
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def _convert(self, space: Mapping[str, Any]) -> Distributions:
        # The shape of the configs suggest() builds: parameters nested at their "a/b" paths.
        shape = unflatten_config(flatten_config(space))
        if has_path(shape, self.seed_key):
            raise ValueError(
                f"the search space contains the seed key {self.seed_key!r}: PostHocSearch "
                f"assigns seeds 0..{self.n_seeds - 1} itself; remove it (or use another seed_key)"
            )
        with_path(shape, self.seed_key, 0)  # refuses a parameter where the path needs a dict
        if all(isinstance(v, optuna.distributions.BaseDistribution) for v in space.values()):
            return dict(space)
        return dict(OptunaSearch.convert_search_space(dict(space)))

    def _ensure_study(self) -> optuna.Study:
        if self._study is None:
            if not self._space:
                raise ValueError(
                    "PostHocSearch has no search space: pass space=... or a Tuner param_space "
                    "with Tune domains (tune.loguniform, tune.choice, ...)"
                )
            if not self._metric or not self._mode:
                raise ValueError(
                    f"PostHocSearch needs a metric key and a mode, got metric={self._metric!r}, "
                    f"mode={self._mode!r}: pass them to PostHocSearch(...) or tune.TuneConfig(...)"
                )
            self._study = optuna.create_study(
                storage=self._storage,
                study_name=self._study_name,
                sampler=self._sampler or optuna.samplers.TPESampler(seed=0),
                direction="minimize" if self._mode == "min" else "maximize",
                load_if_exists=True,
            )
            for point in self._points:
                self._study.enqueue_trial(point)
        return self._study

    # -- Tune hooks -------------------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if not self._queue:
            self._queue = self._growth()
        if not self._queue:
            if self.n_configs is not None and len(self._configs) >= self.n_configs:
                self._reconcile()
                done = all(c.told for c in self._configs.values())
                if done:  # Ray's annotation omits the sentinel it documents and handles
                    return Searcher.FINISHED  # type: ignore[return-value]
                return None  # seeds may still be wanted
            trial = self._ensure_study().ask(fixed_distributions=self._space)
            self._configs[trial.number] = _Configuration(
                trial.number, trial._trial_id, dict(trial.params)
            )
            first = self.n_seeds if (seeds := self._schedule()) is None else seeds[0]
            self._queue = [(trial.number, seed) for seed in range(first)]
        number, seed = self._queue.pop(0)
        config = self._configs[number]
        config.group.join(trial_id)
        self._trial_config[trial_id] = number
        return with_path(unflatten_config(config.params), self.seed_key, seed)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        config = self._config_of(trial_id)
        if config is not None and not config.told:
            self._record(config, trial_id, result)
            self._score_ready_epochs(config)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        config = self._config_of(trial_id)
        if config is None or config.told:
            return
        if result:
            self._record(config, trial_id, result)
        config.group.members[trial_id].status = ERROR if error else DONE
        self._score_ready_epochs(config)
        if len(config.group.members) >= self._expected(config) and not config.group.ids(LIVE):
            self._tell(config)

    def _reconcile(self) -> None:
        """End the members a linked scheduler knows ended: after a restore, Tune re-adds
        the trials that finished before the driver stopped to schedulers but tells searchers
        nothing, and this searcher's last saved state may predate their end."""
        if self._context is None:
            return
        for config in self._configs.values():
            if config.told:
                continue
            for trial_id, member in config.group.members.items():
                status = self._context.member_status(trial_id)
                if member.status == LIVE and status in (DONE, ERROR):
                    member.status = status
            self._score_ready_epochs(config)
            if len(config.group.members) >= self._expected(config) and not config.group.ids(LIVE):
                self._tell(config)

    # -- scoring ----------------------------------------------------------------------------

    def _metric_objective(self) -> keys.Objective:
        objective = self.parsed_metric
        assert objective is not None  # trials run only once the study exists, which needs it
        return objective

    def _config_of(self, trial_id: str) -> _Configuration | None:
        number = self._trial_config.get(trial_id)
        return None if number is None else self._configs[number]

    def _record(self, config: _Configuration, trial_id: str, result: Mapping[str, Any]) -> None:
        if "epoch" not in result:
            return
        epoch = int(result["epoch"])
        config.group.report(trial_id, epoch)
        objective = self._metric_objective()
        if objective.transform.ens:
            self._evaluator().prefetch(trial_id, epoch, objective.transform.variant)
        elif objective.key in result:
            config.reported.setdefault(trial_id, {})[epoch] = float(result[objective.key])

    def _score_ready_epochs(self, config: _Configuration) -> None:
        """Score, in order, each epoch that every member has reached (failed members
        excluded), once all the members it should have (K, or what the seed schedule wants)
        have started. Epochs that a member stopped before are never scored: an ensemble of
        fewer members is a different model. A member joining (a seed earned) rescores."""
        if len(config.group.members) < self._expected(config):
            return
        members = config.group.ids(LIVE, DONE)
        if tuple(members) != config.scored_with:
            config.values, config.scored_with = {}, tuple(members)
        epochs = range(max(config.values, default=0) + 1, config.group.common_epoch() + 1)
        if not epochs:
            return
        curve = self._curve(config, members, epochs)
        for epoch in epochs:
            config.values[epoch] = curve.get(epoch, math.nan)
            self._report(config, epoch)

    def _curve(self, config: _Configuration, members: list[str], epochs: range) -> dict[int, float]:
        """The configuration's values by epoch, ``epochs`` among them: its ensemble's for
        group keys, the members' mean for per-trial keys (NaN where a member's value is)."""
        objective = self._metric_objective()
        if not objective.transform.ens:
            return members_mean({m: config.reported.get(m, {}) for m in members})
        evaluator = self._evaluator()
        # The reporter's group key (of the full config, constants included): the scheduler's
        # key too, so both share one cached and persisted evaluation.
        if config.key is None:
            config.key = str(evaluator.store.metadata(members[0])["group"])
        curve = {}
        for epoch in epochs:
            value = evaluator.evaluate(config.key, epoch, members, objective.transform.name)
            curve[epoch] = float(value.values.get(objective.key, math.nan))
        return curve

    def _report(self, config: _Configuration, epoch: int) -> None:
        """Report an epoch's value to the Optuna trial; not under a seed schedule, where a
        later seed would change values already reported (the objective is told at the end)."""
        value = config.values[epoch]
        if math.isfinite(value) and self._schedule() is None:
            optuna.trial.Trial(self.study, config.storage_id).report(value, step=epoch)

    def _tell(self, config: _Configuration) -> None:
        config.told = True
        value = self._objective_of(config.values)
        if self._context is not None and self._context.pruned(config.group.members):
            self.study.tell(config.number, state=optuna.trial.TrialState.PRUNED)
        elif not math.isfinite(value) or not config.group.ids(LIVE, DONE):
            self.study.tell(config.number, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(config.number, value)

    def _objective_of(self, values: Mapping[int, float]) -> float:
        """The objective over the scored epochs; NaN when it has no finite value (a diverged
        last epoch included: an earlier finite value would rank the group too well)."""
        if self.objective == "last":
            return values[max(values)] if values else math.nan
        return best_epoch(values, self._metric_objective().mode)[1]

    def _evaluator(self) -> EnsembleEvaluator:
        return self._ensembles.get(self._no_store)

    def _no_store(self) -> PredictionStore:
        raise RuntimeError(
            f"PostHocSearch on the group key {self._metric!r} reads the prediction "
            "store: add PostHocCallback(searcher) (or searcher.callback) to "
            "RunConfig(callbacks=[...]), or pass PostHocSearch(store=...)"
        )

    # -- state ------------------------------------------------------------------------------

    def told_values(self) -> dict[int, float | None]:
        """Optuna trial number -> the value told (None for pruned or failed groups)."""
        return {
            t.number: t.value
            for t in self.study.get_trials(deepcopy=False)
            if t.state.is_finished()
        }

    def save(self, checkpoint_path: str) -> None:
        state: dict[str, Any] = {
            "queue": self._queue,
            "configs": self._configs,
            "trial_config": self._trial_config,
            "space": self._space,
            "metric": self._metric,
            "mode": self._mode,
            "points": self._points,
        }
        if self._storage is None:
            state["study"] = self._study  # in memory: Optuna's storage pickles with it
        elif self._study is not None:
            # The study lives in the storage; the sampler (and its RNG state) does not, and a
            # sampler rebuilt from its seed would propose the same configurations again.
            state["study_name"] = self._study.study_name
            state["sampler"] = self._study.sampler
        with open(checkpoint_path, "wb") as f:
            pickle.dump(copy.copy(state), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)  # Tune's own searcher checkpoint, written by save()
        self._queue = state["queue"]
        self._configs = state["configs"]
        self._trial_config = state["trial_config"]
        self._space = state["space"]
        self._metric = state["metric"]
        self._mode = state["mode"]
        self._points = []  # already enqueued in the study
        if "study" in state:
            self._study = state["study"]
        elif "study_name" in state and self._storage is not None:
            self._study = optuna.load_study(
                study_name=state["study_name"], storage=self._storage, sampler=state["sampler"]
            )
