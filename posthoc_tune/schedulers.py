"""PostHocASHA: asynchronous successive halving on post-hoc metrics, group-aware for ensembles.

Stock ASHA prunes on whatever a trial reports; with noisy labels that kills the long runs
that become best after SWA, ensembling and TS. PostHocASHA prunes on the metric that ships:

* a per-trial key (``val/swa+ts/nll``) is judged exactly as Ray's ``AsyncHyperBandScheduler``
  judges a reported metric, trial by trial;
* a group key (``val/swa+ens+ts/nll``) makes each seed group one arm, judged at each rung on
  its ensemble from the prediction store and stopped as a whole when it loses. Members that
  reach a rung before their siblings are paused there, and the siblings of waiting members
  start first, so that a group's members do not train on while it waits to be judged.

The scheduler validates its arguments, parses the metric key once both it and the mode are
known (either may come from ``TuneConfig``) and hands Tune's hooks to the matching policy
(:mod:`posthoc_tune._policies`). Tune does not save scheduler state, so
:attr:`PostHocASHA.callback` (a ``tune.Callback``, add it to ``RunConfig(callbacks=[...])``)
carries it through ``Tuner.restore`` and writes the driver's ensemble values into the trials'
results.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Mapping, Sequence, Set
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from ray.tune.experiment import Trial
from ray.tune.result import DEFAULT_METRIC
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from posthoc_tune._component import Context, Ensembles, on_group_key
from posthoc_tune._policies import GroupPolicy, RungPolicy, RungValue, Settings, TrialPolicy
from posthoc_tune.ensemble import EnsembleEvaluator
from posthoc_tune.groups import Status, check_seed_key
from posthoc_tune.keys import Objective, check_objective
from posthoc_tune.store import PredictionStore

if TYPE_CHECKING:
    from posthoc_tune.callback import PostHocCallback
    from posthoc_tune.transforms import Combiner

_DECISION_COLUMNS = [
    "arm",
    "bracket",
    "milestone",
    "epoch",
    "value",
    "cutoff",
    "decision",
    "n_members",
    "members",
]
_STATE = ("metric", "mode", "num_stopped", "policy")


class PostHocASHA(FIFOScheduler):
    """Asynchronous successive halving on a post-hoc metric key.

    Args:
        metric: a metric key (``"{split}/{transform}/{metric}"``); keys whose transform
            contains ``ens`` are group keys. May come from ``TuneConfig`` instead.
        mode: ``"min"`` or ``"max"``; may come from ``TuneConfig``.
        time_attr: the progress attribute of results (as in Ray's ASHA).
        max_t: time units after which trials stop.
        grace_period: first rung; no arm is stopped before it.
        reduction_factor: rung spacing and the kept fraction (1 / reduction_factor).
        brackets: number of ASHA brackets (arms are assigned at random, as in Ray).
        rung_value: ``"last"``: an arm's value at the milestone; ``"best"``: its best value up
            to the milestone, as post-hoc selection keeps the best epoch. For group keys
            ``"best"`` is the best over the rungs evaluated so far (ensembles are computed only
            at rungs).
        seed_key: the config key (or "a/b" path) that separates the members of one group.
        ensemble: ensemble combiner for group keys: ``"logits"`` (the paper) or ``"probs"``.
        stop_last_trials: stop trials at ``max_t`` (as in Ray).
        run_ahead: group keys: how many results a member may report past a rung its group
            has not decided while a sibling has not reached it, before it is paused there
            (Tune's PAUSE) until the group is judged. ``0``: pause at the rung, so that a cut
            group's members stop exactly at it; ``1`` (default): one more epoch, so that
            members within an epoch of each other never pause, and a cut group's members
            train at most one epoch past its rung; ``None``: never pause (members run ahead
            until the slowest reaches the rung). A member is paused only on a result that
            carries a checkpoint (``PostHocReporter(checkpoint=...)``): Tune restarts a
            function trainable without one from scratch, so it runs ahead, with a warning.
        seeds: group keys: a seed schedule, the members a group needs at each rung (the
            last entry for every later rung), e.g. ``(1, 2, 4)``: a configuration starts as
            one seed, is judged at the first rung on it alone, gains a seed when it passes
            and is judged at the second rung on two, and so on, so only configurations that
            survive pay for their ensembles. All groups at a rung have the same number of
            members, so each is compared with its like. A searcher must add the seeds
            (:class:`PostHocSearch`, linked by one :class:`PostHocCallback`; a replay does it
            itself): :meth:`seeds_wanted` says how many. New seeds train from epoch 1 (SWA
            needs the whole trajectory); members ahead wait paused (``run_ahead``). None:
            a group is every trial Tune creates for it, from the start.
        store: where group keys read members' predictions: a :class:`PredictionStore`, an
            experiment path or URI, or None for the experiment's own storage (found from the
            trials). Per-trial keys never read the store.
    """

    def __init__(
        self,
        metric: str | None = None,
        mode: str | None = None,
        time_attr: str = "training_iteration",
        max_t: float = 100,
        grace_period: float = 1,
        reduction_factor: float = 4,
        brackets: int = 1,
        rung_value: RungValue = "last",
        seed_key: str = "seed",
        ensemble: Combiner = "logits",
        stop_last_trials: bool = True,
        run_ahead: int | None = 1,
        seeds: Sequence[int] | None = None,
        store: PredictionStore | str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        check_objective(metric, mode)
        if not isinstance(time_attr, str) or not time_attr:
            raise ValueError(f"time_attr must be a non-empty string, got {time_attr!r}")
        for name, value in (("max_t", max_t), ("grace_period", grace_period)):
            if not _is_real(value) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if grace_period > max_t:
            raise ValueError(f"grace_period ({grace_period}) must be <= max_t ({max_t})")
        if not _is_real(reduction_factor) or not reduction_factor > 1:
            raise ValueError(f"reduction_factor must be a number > 1, got {reduction_factor!r}")
        if isinstance(brackets, bool) or not isinstance(brackets, int) or brackets < 1:
            raise ValueError(f"brackets must be an int >= 1, got {brackets!r}")
        if rung_value not in ("last", "best"):
            raise ValueError(f"rung_value must be 'last' or 'best', got {rung_value!r}")
        check_seed_key(seed_key)
        if ensemble not in ("logits", "probs"):
            raise ValueError(f"ensemble must be 'logits' or 'probs', got {ensemble!r}")
        if not isinstance(stop_last_trials, bool):
            raise TypeError(f"stop_last_trials must be a bool, got {stop_last_trials!r}")
        if run_ahead is not None and (
            isinstance(run_ahead, bool) or not isinstance(run_ahead, int) or run_ahead < 0
        ):
            raise ValueError(f"run_ahead must be an int >= 0 or None, got {run_ahead!r}")
        if seeds is not None:
            seeds = _check_seeds(seeds)
        self._metric = metric
        self._mode = mode
        self._settings = Settings(
            time_attr,
            max_t,
            grace_period,
            reduction_factor,
            brackets,
            rung_value,
            stop_last_trials,
            run_ahead,
            seeds,
        )
        self.seed_key = seed_key
        self.ensemble: Combiner = ensemble
        if isinstance(store, (str, os.PathLike)):
            store = PredictionStore.open(store)
        self._ensembles = Ensembles(store, ensemble)
        self._num_stopped = 0
        self._policy = self._make_policy()
        self._callback: PostHocCallback | None = None
        self._attached = False
        self._warned_no_callback = False

    # -- configuration ----------------------------------------------------------------------

    @property
    def parsed_metric(self) -> Objective | None:
        """The metric key and mode, parsed (None until both are known)."""
        return None if self._policy is None else self._policy.objective

    @property
    def is_group_metric(self) -> bool:
        """Whether the metric is an ensemble (group) key."""
        return on_group_key(self)

    @property
    def group_size(self) -> None:
        """None: every trial Tune creates joins its group at once."""
        return None

    @property
    def seeds(self) -> tuple[int, ...] | None:
        """The seed schedule (``seeds=``), None without one."""
        return self._settings.seeds

    def seeds_wanted(self, trial_id: str) -> int | None:
        """How many members the seed group of ``trial_id`` should have now under the seed
        schedule: a searcher adds seeds up to it. None without a schedule."""
        if isinstance(self._policy, GroupPolicy):
            return self._policy.seeds_wanted(trial_id)
        return None

    def member_status(self, trial_id: str) -> Status | None:
        """A seed group member's status (live, done or error) as the scheduler knows it; None
        for per-trial keys and unknown trials. Tune re-adds finished trials to schedulers on
        a restore, but never tells searchers: a searcher learns them here."""
        if isinstance(self._policy, GroupPolicy):
            return self._policy.member_status(trial_id)
        return None

    @property
    def store(self) -> PredictionStore | None:
        """The store group keys read: the one given, else the attached evaluator's (None:
        the experiment's, found from the trials on first use)."""
        return self._ensembles.store

    @property
    def pruned_trials(self) -> Set[str]:
        """The trials stopped by a rung decision (not at ``max_t``)."""
        return frozenset() if self._policy is None else self._policy.pruned

    @property
    def callback(self) -> PostHocCallback:
        """The companion ``tune.Callback``; add it to ``RunConfig(callbacks=[...])``."""
        if self._callback is None:
            from posthoc_tune.callback import PostHocCallback

            self._callback = PostHocCallback(self)
        return self._callback

    def attach(self, context: Context) -> None:
        """Called by a PostHocCallback that Tune set up: the callback is registered."""
        self._attached = True

    def attach_evaluator(self, evaluator: EnsembleEvaluator) -> None:
        """Evaluate group keys with ``evaluator`` (PostHocCallback's, shared by the
        experiment's components; a replay's, which leaves the stored experiment as it is)
        instead of making one on first use."""
        self._ensembles.evaluator = evaluator

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        check_objective(metric or None, mode or None)
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        if self._metric is None and self._mode:
            self._metric = DEFAULT_METRIC
        if self._policy is None:
            self._policy = self._make_policy()
        return True

    def _make_policy(self) -> RungPolicy | None:
        """The policy of the metric key, once it and the mode are known."""
        if not self._metric or self._metric == DEFAULT_METRIC or not self._mode:
            return None
        objective = Objective.parse(self._metric, self._mode)
        if objective.transform.ens:
            return GroupPolicy(objective, self._settings, self.seed_key, self._ensembles)
        if self._settings.seeds is not None:
            raise ValueError(
                f"seeds={self._settings.seeds} grows seed groups judged on their ensemble, but "
                f"{self._metric!r} is a per-trial key: use a group key (e.g. "
                f"'val/swa+ens+ts/nll'), or no seed schedule"
            )
        return TrialPolicy(objective, self._settings)

    def _ready(self) -> RungPolicy:
        if self._policy is None:
            raise ValueError(
                f"PostHocASHA needs a metric key and a mode, got metric={self._metric!r}, "
                f"mode={self._mode!r}: pass them to PostHocASHA(...) or tune.TuneConfig(...)"
            )
        return self._policy

    # -- Tune hooks -------------------------------------------------------------------------

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self._ready().on_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        if not self._attached and not self._warned_no_callback:
            # Checked here, not in on_trial_add: on a restore, trials are re-added before
            # callbacks are set up.
            self._warned_no_callback = True
            warnings.warn(
                "PostHocASHA's callback is not registered: add it with "
                "RunConfig(callbacks=[scheduler.callback]) so its state survives "
                "Tuner.restore and ensemble values reach the results",
                UserWarning,
                stacklevel=2,
            )
        if self._settings.time_attr not in result:
            return TrialScheduler.CONTINUE
        action = self._ready().on_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
        return action

    def on_trial_complete(
        self, tune_controller: Any, trial: Trial, result: dict[str, Any] | None
    ) -> None:
        timed = result if result and self._settings.time_attr in result else None
        self._ready().on_complete(tune_controller, trial, timed)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self._ready().on_error(trial)

    def on_member_failed(self, trial: Trial) -> None:
        """Judge the group of a member that failed for good (called by PostHocCallback:
        Tune calls ``on_trial_error`` before a retry too)."""
        self._ready().on_failed(trial)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._ready().on_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        """Group keys: pending siblings of groups being judged first, then paused members
        their group passed, then Tune's order; members held at a rung are never resumed.
        Per-trial keys: Tune's order.

        Tune starts the trial returned here first. With a grid (``BasicVariantGenerator``)
        Tune also requests resources for every pending trial at once, in the order it created
        them, and a freed slot goes to the oldest request unless an actor is reused; so name
        the seed key to sort first in grids (``with_seeds(..., key="_seed")``) to create a
        configuration's seeds consecutively.
        """
        if isinstance(self._policy, GroupPolicy):
            return self._policy.choose(tune_controller)
        return super().choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        if self._policy is None:
            return f"Using PostHocASHA: no metric key and mode yet (metric={self._metric!r})"
        lines = [
            f"Using PostHocASHA on {self._metric} ({self._policy.arms}): "
            f"num_stopped={self._num_stopped}"
        ]
        for b in self._policy.brackets:
            cutoffs = " | ".join(
                f"t={m:g}: {b.cutoff(i)}" for i, m in enumerate(b.milestones) if b.recorded[i]
            )
            lines.append(f"Bracket: {cutoffs}")
        return "\n".join(lines)

    @property
    def decisions(self) -> pd.DataFrame:
        """Every rung decision: arm (trial id or group key), bracket, milestone, epoch (group
        keys), value and cutoff in the metric's own units, decision (``CONTINUE``, ``STOP``,
        or ``FINAL`` for a finished trial's last value, recorded as Ray's ASHA records it, and
        for a group's value at a rung at ``max_t``), and the members used."""
        rows = [] if self._policy is None else self._policy.decisions
        return pd.DataFrame(rows, columns=_DECISION_COLUMNS)

    # -- state (Tune never saves schedulers; the callback does) -------------------------------

    def get_state(self) -> dict[str, Any]:
        """The objective, rungs, arms, groups and decisions (plain data; picklable)."""
        return {
            "metric": self._metric,
            "mode": self._mode,
            "num_stopped": self._num_stopped,
            "policy": None if self._policy is None else self._policy.get_state(),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`get_state`; trials are re-attached as Tune re-adds them."""
        missing = [name for name in _STATE if name not in state]
        if missing:
            raise ValueError(f"not a PostHocASHA state: missing {missing}")
        self._metric, self._mode = state["metric"], state["mode"]
        self._num_stopped = state["num_stopped"]
        self._policy = self._make_policy()
        if self._policy is not None:
            self._policy.set_state(state["policy"])


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    """A seed schedule: a non-empty, non-decreasing sequence of ints >= 1."""
    values = tuple(seeds) if isinstance(seeds, Sequence) and not isinstance(seeds, str) else ()
    ok = values and all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1 for n in values
    )
    if not ok or any(b < a for a, b in itertools.pairwise(values)):
        raise ValueError(
            f"seeds must be a non-empty, non-decreasing sequence of ints >= 1 (members per "
            f"rung), got {seeds!r}"
        )
    return tuple(int(n) for n in values)
