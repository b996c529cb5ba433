"""Replay a stored experiment through real Tune schedulers, with a simulated clock.

A full-budget experiment (every trial trained to the end) holds every learning curve a
scheduler could have seen. Replaying the curves through a scheduler object answers "what would
this strategy have chosen, and at what compute?" without retraining: each trial's stored
epochs are fed to the scheduler as Tune results, in the order a cluster with ``concurrency``
slots would produce them, its STOP decisions cut the curves short, and the cut experiment is
then selected from like any other. Results hold what :class:`~posthoc_tune.PostHocReporter`
reported, recomputed from the stored logits (with the recorded temperatures); group keys are
evaluated by PostHocASHA itself, from the store, as in a live run.
"""

from __future__ import annotations

import copy
import heapq
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import pandas as pd
from ray.tune.experiment import Trial
from ray.tune.result import SHOULD_CHECKPOINT
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from posthoc_tune.curves import (
    DEFAULT_METRICS,
    Curves,
    configurations,
    naive_ensembles,
    processed_epochs,
    scan,
)
from posthoc_tune.ensemble import EnsembleEvaluator, EnsembleValue
from posthoc_tune.keys import (
    TOKEN_METRICS,
    TOKEN_TRANSFORMS,
    TRIAL_TRANSFORMS,
    parse_metric_key,
    parse_transform,
)
from posthoc_tune.schedulers import PostHocASHA
from posthoc_tune.selection import open_store, summarise, table_metrics, table_row
from posthoc_tune.store import PredictionStore
from posthoc_tune.transforms import Combiner

Selection = Literal["naive", "posthoc"]
Shuffle = Literal["configs", "trials"]


@dataclass
class Replay:
    """What a scheduler did to the stored curves.

    Attributes:
        epochs: trial id -> epochs it ran before it stopped (or its stored epochs).
        order: the (trial id, epoch) results in the order the scheduler saw them.
        scheduler: the scheduler object after the replay (e.g. its ``decisions``).
        pauses: PAUSE decisions the scheduler made (each a pause/resume cycle in Tune).
    """

    epochs: dict[str, int]
    order: list[tuple[str, int]]
    scheduler: TrialScheduler | None
    pauses: int = 0

    @property
    def compute(self) -> int:
        """Epochs trained in all."""
        return sum(self.epochs.values())


@dataclass(frozen=True)
class Strategy:
    """A scheduler (None: every trial runs its full budget) and how the final model is
    selected from what it ran: by the base val metric (``naive``) or by the transformed
    model's (``posthoc``)."""

    scheduler: TrialScheduler | None
    selection: Selection = "posthoc"


class Experiment:
    """A stored experiment's curves, scored once, to replay any number of strategies.

    Args:
        experiment: a ``tune.ResultGrid``, an experiment path/URI or a PredictionStore.
        transforms: seed-ensemble transforms to select on afterwards (the trial transforms,
            checkpoint ensembles included, are always scored: schedulers may use their keys).
        ensemble: ensemble combiner.
        select_by: ``"nll"``: one model per strategy, chosen by val nll, reported on test
            nll and error; ``"same"``: error chosen by val error (the paper's table).
        metrics: the metrics fed to schedulers and reported: class metrics (default
            ``("nll", "error")``) or a language model's token metrics (e.g.
            ``("token_nll", "perplexity", "token_error")``, from its stored token records;
            single-model transforms only), the first selecting under ``select_by="nll"``.
    """

    def __init__(
        self,
        experiment: Any,
        *,
        transforms: Sequence[str] = ("swa+ens+ts",),
        ensemble: Combiner = "logits",
        select_by: str = "nll",
        metrics: Sequence[str] = DEFAULT_METRICS,
    ) -> None:
        if select_by not in ("same", "nll"):
            raise ValueError(f"select_by must be 'same' or 'nll', got {select_by!r}")
        self.metrics = table_metrics(metrics)
        self.tokens = self.metrics[0] in TOKEN_METRICS
        self.store: PredictionStore = open_store(experiment)
        self.ensemble: Combiner = ensemble
        self.select_by = select_by
        groups = configurations(self.store)
        self.max_epochs, self._compacted, self._pruned = _budget(self.store, groups, self.tokens)
        self.seed_key = _seed_key(self.store, self.max_epochs)
        ens = [parse_transform(t).name for t in transforms]
        if self.tokens:
            ens = [t for t in ens if not parse_transform(t).combines]
        trial = TOKEN_TRANSFORMS if self.tokens else TRIAL_TRANSFORMS
        self._trial_transforms = trial
        self._transforms = list(dict.fromkeys([*trial, *ens]))
        self.curves: dict[str, Curves] = {}
        for group, (members, config) in groups.items():
            curves = scan(
                self.store, group, members, config, self._transforms, ensemble, self.metrics
            )
            naive_ensembles(self.store, curves, select_by, ensemble)
            self.curves[group] = curves
        # Trials start a configuration at a time (as PostHocSearch launches them), in the
        # order Tune created them (trial ids carry a running counter).
        first = {g: min(c.members) for g, c in self.curves.items()}
        self.trials = [
            m for g in sorted(self.curves, key=first.__getitem__) for m in self.curves[g].members
        ]
        meta = {m: self.store.metadata(m) for m in self.trials}
        self.configs = {m: meta[m]["config"] for m in self.trials}
        self._group = {m: str(meta[m]["group"]) for m in self.trials}
        self._seed = {m: meta[m]["seed"] for m in self.trials}
        self._subsets: dict[tuple[str, tuple[str, ...]], Curves] = {}

    @property
    def full_compute(self) -> int:
        """Epochs stored in all: the full budget's compute (a full-budget store only)."""
        self._check_replayable(clock=True)
        return sum(self.max_epochs.values())

    def _check_replayable(self, *, clock: bool) -> None:
        """A replay reads every epoch's logits (refused after a compaction); a clock replay
        also treats the stored epochs as each trial's whole budget (refused after pruning).
        Replaying a pruned live run in the order it ran (``order=``) needs neither."""
        problems = [self._compacted, self._pruned if clock else None]
        found = [p for p in problems if p is not None]
        if found:
            raise ValueError(
                "a replay needs a full-budget experiment, every trial trained to the same last "
                "epoch with every epoch stored; here " + "; and ".join(found) + ". Replay a "
                "run without early stopping, before compacting it"
            )

    def result(self, trial_id: str, epoch: int) -> dict[str, Any]:
        """The result Tune received from ``trial_id`` at ``epoch`` (flattened, as schedulers
        see it; ``time_total_s`` is the simulated clock: one unit per epoch). Every result
        carries a checkpoint, as a reporter's with ``checkpoint=`` does: a trial paused at an
        epoch resumes from the next one."""
        result: dict[str, Any] = {
            "trial_id": trial_id,
            "training_iteration": epoch,
            "epoch": epoch,
            "time_total_s": float(epoch),
            "done": False,
            SHOULD_CHECKPOINT: True,
        }
        for t in self._trial_transforms:
            result.update(self._single(t, trial_id).get(epoch, {}))
        return result

    def replay(
        self,
        scheduler: TrialScheduler | None,
        *,
        concurrency: int | None = None,
        order: Sequence[tuple[str, int]] | None = None,
        seed: int | None = None,
        shuffle: Shuffle = "configs",
    ) -> Replay:
        """Feed the stored results to ``scheduler`` (None: FIFO, everything runs).

        Args:
            scheduler: a fresh scheduler with its metric and mode set.
            concurrency: trials running at once (default: all). Each epoch takes one time
                unit; results due at the same time arrive in the order the trials started.
                A freed slot goes to the trial the scheduler's ``choose_trial_to_run``
                returns (Tune's FIFO: the first pending trial in start order); a PAUSE
                frees the trial's slot until it is chosen again.
            order: instead of the clock, the exact (trial id, epoch) sequence to feed, e.g.
                as a live run's scheduler saw it; a trial's results after its STOP are
                skipped.
            seed: start the configurations in a random order drawn with this seed instead
                of the order Tune created them in. A grid's order is arbitrary, and ASHA is
                sensitive to it (arms that arrive after better ones are cut, before them
                kept): average strategies over several seeds.
            shuffle: what ``seed`` shuffles: ``"configs"`` keeps a configuration's seeds
                consecutive (as ``PostHocSearch`` and a grid with the seed key first create
                them); ``"trials"`` shuffles every trial, as Tune starts pending trials when
                it hands reused actors to them in an arbitrary order.
        """
        self._check_replayable(clock=order is None)
        if scheduler is None:
            scheduler = FIFOScheduler()
        self._check_metric(scheduler)
        if isinstance(scheduler, PostHocASHA) and scheduler.seed_key != self.seed_key:
            raise ValueError(
                f"this experiment's trials were stored with the seed key {self.seed_key!r}, "
                f"but the PostHocASHA groups them by {scheduler.seed_key!r}: pass "
                f"PostHocASHA(seed_key={self.seed_key!r}) (Experiment.seed_key)"
            )
        if concurrency is not None and (isinstance(concurrency, bool) or concurrency < 1):
            raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if shuffle not in ("configs", "trials"):
            raise ValueError(f"shuffle must be 'configs' or 'trials', got {shuffle!r}")
        if isinstance(scheduler, PostHocASHA):
            # Evaluate as in a live run, but leave the stored experiment as it is, and take
            # the ensembles this experiment already scored instead of scoring them again.
            evaluator = EnsembleEvaluator(
                self.store, ensemble=scheduler.ensemble, splits=["val"], persist=False
            )
            if scheduler.ensemble == self.ensemble:
                evaluator.remember(self._ensemble_values(scheduler.metric))
            scheduler.attach_evaluator(evaluator)
        cluster = _Cluster(self, scheduler, self._start_order(seed, shuffle))
        if order is None:
            cluster.run_clock(concurrency or len(self.trials))
        else:
            cluster.run_order(order)
        return Replay(cluster.epochs, cluster.order, scheduler, cluster.pauses)

    def _ensemble_values(self, metric: str | None) -> list[EnsembleValue]:
        """The scanned ensembles of every group and epoch (all members), when they hold
        ``metric`` (a replay scans nll and error)."""
        if metric is None or parse_metric_key(metric)[2] not in self.metrics:
            return []
        return [
            EnsembleValue(group, epoch, t, self.ensemble, tuple(sorted(c.members)), scores)
            for group, c in self.curves.items()
            for t, by_epoch in c.ens.items()
            for epoch, scores in by_epoch.items()
        ]

    def group(self, trial_id: str) -> str:
        """The group key (configuration) of a trial."""
        return self._group[trial_id]

    def _start_order(self, seed: int | None, shuffle: Shuffle) -> list[str]:
        if seed is None:
            return self.trials
        rng = np.random.default_rng(seed)
        if shuffle == "trials":
            return [self.trials[i] for i in rng.permutation(len(self.trials))]
        groups = list(dict.fromkeys(self.group(m) for m in self.trials))
        shuffled = [groups[i] for i in rng.permutation(len(groups))]
        return [m for g in shuffled for m in self.curves[g].members]

    def select(
        self, replay: Replay | None, transform: str = "swa+ens+ts", selection: Selection = "posthoc"
    ) -> dict[str, Any]:
        """The model a strategy ends with: over configurations and the epochs each trial ran
        (all stored epochs for ``replay=None``), by ``transform``'s val metric (``posthoc``)
        or the base model's (``naive``), and its test metrics.

        Ensembles need every member at an epoch, as in the selection table.
        """
        name = parse_transform(transform).name
        if name not in self._transforms:
            raise ValueError(
                f"transform {transform!r} was not scored; pass it to Experiment(transforms=...)"
            )
        if selection not in ("naive", "posthoc"):
            raise ValueError(f"selection must be 'naive' or 'posthoc', got {selection!r}")
        kept = [k for c in self.curves.values() if (k := self._cut(c, replay)) is not None]
        summaries = [summarise(c, self._transforms, self.select_by, self.metrics) for c in kept]
        row = table_row(summaries, name, self.metrics)
        return {
            "config": json.loads(row[f"{selection}/config"]),
            "epoch": row[f"{selection}/epoch"],
            **{f"test/{m}": row[f"{selection}/test/{m}"] for m in self.metrics},
        }

    def _cut(self, curves: Curves, replay: Replay | None) -> Curves | None:
        """A configuration's curves as far as its members ran; None if none started. A
        configuration that ran some of its seeds (a seed schedule) is the ensemble of those."""
        if replay is None:
            return curves
        started = [m for m in curves.members if replay.epochs.get(m, 0) > 0]
        if not started:
            return None
        if len(started) < len(curves.members):
            curves = self._of_members(curves, started)
        ran = {m: replay.epochs[m] for m in curves.members}
        if all(ran[m] >= self.max_epochs[m] for m in curves.members):
            return curves
        cut = copy.copy(curves)
        cut.single = {
            t: {
                m: {e: s for e, s in by_epoch.items() if e <= ran[m]} for m, by_epoch in per.items()
            }
            for t, per in curves.single.items()
        }
        common = min(ran.values())
        cut.ens = {
            t: {e: s for e, s in per.items() if e <= common} for t, per in curves.ens.items()
        }
        cut.naive_ens = {}
        naive_ensembles(self.store, cut, self.select_by, self.ensemble)
        return cut

    def _of_members(self, curves: Curves, members: list[str]) -> Curves:
        """The curves of a configuration's ensemble of ``members`` only (scored once)."""
        key = (curves.group, tuple(members))
        if key not in self._subsets:
            part = scan(
                self.store,
                curves.group,
                members,
                curves.config,
                self._transforms,
                self.ensemble,
                self.metrics,
            )
            naive_ensembles(self.store, part, self.select_by, self.ensemble)
            self._subsets[key] = part
        return self._subsets[key]

    def seed(self, trial_id: str) -> int:
        """A trial's seed (its value at the experiment's seed key)."""
        return int(self._seed[trial_id])

    def _single(self, transform: str, trial_id: str) -> dict[int, dict[str, float]]:
        return self.curves[self.group(trial_id)].single[transform][trial_id]

    def _check_metric(self, scheduler: TrialScheduler) -> None:
        metric = getattr(scheduler, "metric", None)
        if metric is None or (isinstance(scheduler, PostHocASHA) and scheduler.is_group_metric):
            return
        _, transform, name = parse_metric_key(metric)
        if transform.ens or name not in self.metrics:
            raise ValueError(
                f"a replay feeds the {list(self.metrics)} keys of the transforms a trial "
                f"reports (Experiment(metrics=...)); {type(scheduler).__name__} asks for "
                f"{metric!r}"
            )


def _budget(
    store: PredictionStore, groups: Mapping[str, tuple[list[str], Any]], tokens: bool
) -> tuple[dict[str, int], str | None, str | None]:
    """Each trial's stored epoch count (of its token records for token metrics, else of its
    logits), and what keeps the store from being a full-budget run (None when nothing does):
    epochs removed by a compaction, trials stopped early."""
    epochs = {
        m: processed_epochs(store, m, tokens=tokens)
        for members, _ in groups.values()
        for m in members
    }
    last = max((e[-1] for e in epochs.values() if e), default=0)
    gaps = sorted(m for m, e in epochs.items() if e != list(range(1, len(e) + 1)))
    short = sorted(m for m, e in epochs.items() if m not in gaps and len(e) < last)
    compacted = pruned = None
    if gaps or any(store.scores(g) is not None for g in groups):
        where = f": trials {', '.join(gaps[:3])}{', ...' if len(gaps) > 3 else ''}" if gaps else ""
        compacted = f"epochs were removed by compact{where}"
    if short:
        shown = ", ".join(f"{m} at epoch {len(epochs[m])}" for m in short[:3])
        more = ", ..." if len(short) > 3 else ""
        pruned = (
            f"{len(short)} trials stopped before epoch {last} ({shown}{more}): was the "
            f"experiment pruned (e.g. by ASHA)?"
        )
    return {m: len(e) for m, e in epochs.items()}, compacted, pruned


def _seed_key(store: PredictionStore, trials: Iterable[str]) -> str:
    """The config key the reporter recorded as the seed (one per experiment)."""
    keys = {str(store.metadata(m)["seed_key"]) for m in trials}
    if len(keys) != 1:
        raise ValueError(f"the experiment's trials were stored with several seed keys: {keys}")
    return keys.pop()


def compare(
    experiment: Experiment,
    strategies: Mapping[str, Strategy],
    *,
    transform: str = "swa+ens+ts",
    concurrency: int | None = None,
    seed: int | None = None,
) -> pd.DataFrame:
    """Replay every strategy and select its final model: one row per strategy with the
    selected configuration and epoch, the test metrics of ``transform`` (nll and error, or
    the experiment's ``metrics``), and the compute
    (epochs, and the fraction of the full budget). ``seed``: see :meth:`Experiment.replay`."""
    rows = []
    for name, strategy in strategies.items():
        replay = (
            None
            if strategy.scheduler is None
            else experiment.replay(strategy.scheduler, concurrency=concurrency, seed=seed)
        )
        compute = experiment.full_compute if replay is None else replay.compute
        rows.append(
            {
                "strategy": name,
                **experiment.select(replay, transform, strategy.selection),
                "compute": compute,
                "compute_fraction": compute / experiment.full_compute,
            }
        )
    return pd.DataFrame(rows).set_index("strategy")


def default_strategies(
    max_t: int,
    *,
    grace_period: int = 1,
    reduction_factor: float = 3,
    transform: str = "swa+ens+ts",
    seed_key: str = "seed",
) -> dict[str, Strategy]:
    """The comparison of the project's strategy benchmark: the full budget with naive and
    with post-hoc selection, stock ASHA on the base key (transforms applied afterwards,
    selected post hoc), and PostHocASHA on the ensemble key and on the per-trial SWA+TS key."""
    asha: dict[str, Any] = {
        "mode": "min",
        "max_t": max_t,
        "grace_period": grace_period,
        "reduction_factor": reduction_factor,
    }
    return {
        "full budget, naive": Strategy(None, "naive"),
        "full budget, post-hoc": Strategy(None, "posthoc"),
        "ASHA on val/base/nll": Strategy(ASHAScheduler(metric="val/base/nll", **asha)),
        f"PostHocASHA on val/{transform}/nll": Strategy(
            PostHocASHA(metric=f"val/{transform}/nll", seed_key=seed_key, **asha)
        ),
        "PostHocASHA on val/swa+ts/nll": Strategy(
            PostHocASHA(metric="val/swa+ts/nll", seed_key=seed_key, **asha)
        ),
    }


# -- the simulated cluster ---------------------------------------------------------------------


@dataclass(order=True)
class _Event:
    time: int
    start: int  # start order breaks ties
    trial_id: str = field(compare=False)
    epoch: int = field(compare=False)


class _Cluster:
    """The slice of Tune's controller that schedulers call (``get_trials``,
    ``stop_trial``), driving trials through the stored results."""

    def __init__(
        self, experiment: Experiment, scheduler: TrialScheduler, start_order: list[str]
    ) -> None:
        self._experiment = experiment
        self._scheduler = scheduler
        # A seed schedule starts each configuration's first seeds; the others wait in
        # seed order until the scheduler wants them (as PostHocSearch adds them).
        seeds = scheduler.seeds if isinstance(scheduler, PostHocASHA) else None
        self._reserve: dict[str, list[str]] = {}
        for m in start_order:
            self._reserve.setdefault(experiment.group(m), []).append(m)
        first: set[str] = set()
        for members in self._reserve.values():
            members.sort(key=experiment.seed)
            n = len(members) if seeds is None else seeds[0]
            first.update(members[:n])
            del members[:n]
        self._trials: dict[str, Trial] = {}  # insertion order: the order trials were added
        self._last: dict[str, dict[str, Any]] = {}
        self._controller: Any = cast(Any, self)  # what schedulers take for the controller
        self._stopping: set[str] = set()
        self.epochs: dict[str, int] = {m: 0 for m in experiment.trials}
        self.order: list[tuple[str, int]] = []
        self.pauses = 0
        for m in start_order:
            if m in first:
                self._add(m)

    def _add(self, trial_id: str) -> None:
        config = self._experiment.configs[trial_id]
        trial = Trial("replay", config=config, trial_id=trial_id, stub=True)
        self._trials[trial_id] = trial
        with _quiet():
            self._scheduler.on_trial_add(self._controller, trial)

    def _grow(self, trial_id: str) -> None:
        """Add the seeds the scheduler now wants for the group of ``trial_id``."""
        reserve = self._reserve[self._experiment.group(trial_id)]
        if not reserve:
            return
        assert isinstance(self._scheduler, PostHocASHA)
        wanted = self._scheduler.seeds_wanted(trial_id) or 0
        members = len(self._experiment.curves[self._experiment.group(trial_id)].members)
        while reserve and members - len(reserve) < wanted:
            self._add(reserve.pop(0))

    # -- what schedulers call ---------------------------------------------------------------

    def get_trials(self) -> list[Trial]:
        return list(self._trials.values())

    def get_live_trials(self) -> set[Trial]:
        return {t for t in self._trials.values() if t.status not in (Trial.TERMINATED, Trial.ERROR)}

    def stop_trial(self, trial: Trial) -> None:
        """As Tune's ``stop_trial``: a running trial completes, a pending one is removed."""
        if trial.status in (Trial.ERROR, Trial.TERMINATED) or trial.trial_id in self._stopping:
            return
        self._stopping.add(trial.trial_id)
        if trial.status in (Trial.PENDING, Trial.PAUSED):
            self._scheduler.on_trial_remove(self._controller, trial)
        else:
            self._scheduler.on_trial_complete(
                self._controller, trial, self._last.get(trial.trial_id, {})
            )
        trial.set_status(Trial.TERMINATED)

    # -- driving ----------------------------------------------------------------------------

    def run_clock(self, concurrency: int) -> None:
        running: list[_Event] = []
        started = 0

        def fill(now: int) -> None:
            nonlocal started
            while len(running) < concurrency:
                with _quiet():
                    trial = self._scheduler.choose_trial_to_run(self._controller)
                if trial is None:
                    return
                trial.set_status(Trial.RUNNING)
                epoch = self.epochs[trial.trial_id] + 1
                heapq.heappush(running, _Event(now + 1, started, trial.trial_id, epoch))
                started += 1

        fill(0)
        while running:
            event = heapq.heappop(running)
            if self._trials[event.trial_id].status == Trial.RUNNING and self._feed(
                event.trial_id, event.epoch
            ):
                heapq.heappush(
                    running, _Event(event.time + 1, event.start, event.trial_id, event.epoch + 1)
                )
            running = [e for e in running if self._trials[e.trial_id].status == Trial.RUNNING]
            heapq.heapify(running)
            fill(event.time)
        left = [
            t.trial_id for t in self._trials.values() if t.status in (Trial.PENDING, Trial.PAUSED)
        ]
        if left:
            raise RuntimeError(
                f"{type(self._scheduler).__name__} left trials {left[:5]} pending or paused "
                f"with no trial running and never chose them: Tune would wait forever"
            )

    def run_order(self, order: Sequence[tuple[str, int]]) -> None:
        unknown = sorted({t for t, _ in order} - set(self._trials))
        if unknown:
            raise ValueError(f"order names trials the experiment does not hold: {unknown[:5]}")
        for trial_id, epoch in order:
            trial = self._trials[trial_id]
            if trial.status in (Trial.PENDING, Trial.PAUSED):
                trial.set_status(Trial.RUNNING)
            if trial.status != Trial.RUNNING:
                continue
            if epoch != self.epochs[trial_id] + 1:
                raise ValueError(
                    f"order feeds trial {trial_id} epoch {epoch} after epoch "
                    f"{self.epochs[trial_id]}; expected {self.epochs[trial_id] + 1}"
                )
            self._feed(trial_id, epoch)

    def _feed(self, trial_id: str, epoch: int) -> bool:
        """One result; returns whether the trial goes on. A decision it brings about may want
        more seeds of the trial's configuration: they are added, pending."""
        goes_on = self._result(trial_id, epoch)
        self._grow(trial_id)
        return goes_on

    def _result(self, trial_id: str, epoch: int) -> bool:
        trial = self._trials[trial_id]
        result = self._experiment.result(trial_id, epoch)
        self.order.append((trial_id, epoch))
        self.epochs[trial_id] = epoch
        with _quiet():
            decision = self._scheduler.on_trial_result(self._controller, trial, result)
        self._last[trial_id] = result
        if decision == TrialScheduler.STOP:
            self.stop_trial(trial)
            return False
        if decision == TrialScheduler.PAUSE:
            trial.set_status(Trial.PAUSED)
            self.pauses += 1
            return False
        if epoch >= self._experiment.max_epochs[trial_id]:
            # The function returned: Tune sends the last result again, marked done.
            with _quiet():
                self._scheduler.on_trial_result(self._controller, trial, {**result, "done": True})
            self.stop_trial(trial)
            return False
        return True


@contextmanager
def _quiet() -> Iterator[None]:
    """PostHocASHA warns when its Tune callback is missing; a replay runs no Tune."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PostHocASHA's callback is not registered")
        yield
