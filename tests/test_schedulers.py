"""PostHocASHA on per-trial keys: the same decisions as Ray's ASHAScheduler, and validation.

Result streams are fed through the schedulers' hooks exactly as Tune's controller calls them
(on_trial_add, on_trial_result until STOP or the stream's end, then on_trial_complete), with
real ``Trial`` objects; per-trial keys never touch the controller.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

import posthoc_tune as pht
from posthoc_tune import PostHocASHA, PredictionStore
from tests import reference as ref

KEY = "val/base/nll"
Event = tuple[int, dict[str, Any]]


def _streams(rng: np.random.Generator, n_trials: int, max_t: int) -> list[list[dict[str, Any]]]:
    """Random learning curves; time mostly advances by 1, sometimes jumps (skipping rungs)."""
    streams = []
    for _ in range(n_trials):
        t, rows = 0, []
        length = int(rng.integers(1, max_t + 3))
        level = rng.uniform(0.5, 2.0)
        for _ in range(length):
            t += int(rng.choice([1, 1, 1, 2, 3]))
            level *= rng.uniform(0.8, 1.1)
            rows.append({"training_iteration": t, KEY: level, "epoch": t})
        streams.append(rows)
    return streams


def _events(streams: list[list[dict[str, Any]]], concurrent: bool, seed: int) -> list[Event]:
    if not concurrent:
        return [(i, row) for i, rows in enumerate(streams) for row in rows]
    rng = np.random.default_rng(seed)
    cursors = [0] * len(streams)
    events = []
    while any(c < len(s) for c, s in zip(cursors, streams, strict=True)):
        live = [i for i, s in enumerate(streams) if cursors[i] < len(s)]
        i = int(rng.choice(live[:4]))  # about four trials in flight at once
        events.append((i, streams[i][cursors[i]]))
        cursors[i] += 1
    return events


def _drive(scheduler: TrialScheduler, events: list[Event], n_trials: int, seed: int) -> list[str]:
    """Feed events like Tune's controller; returns every decision in order."""
    np.random.seed(seed)  # bracket assignment draws from numpy's global RNG, as in Ray
    trials = [Trial("t", stub=True, trial_id=f"trial_{i:03d}", config={}) for i in range(n_trials)]
    added: set[int] = set()
    ended: set[int] = set()
    last_index = {i: max(j for j, (k, _) in enumerate(events) if k == i) for i, _ in events}
    decisions = []
    for j, (i, row) in enumerate(events):
        if i in ended:
            continue
        if i not in added:
            added.add(i)
            scheduler.on_trial_add(None, trials[i])  # type: ignore[arg-type]
        action = scheduler.on_trial_result(None, trials[i], dict(row))  # type: ignore[arg-type]
        decisions.append(f"{i}:{row['training_iteration']}:{action}")
        if action == TrialScheduler.STOP or j == last_index[i]:
            ended.add(i)
            scheduler.on_trial_complete(None, trials[i], dict(row))  # type: ignore[arg-type]
    return decisions


SETTINGS = [
    # (grace_period, reduction_factor, max_t, brackets, stop_last_trials, mode)
    (1, 4, 20, 1, True, "min"),
    (1, 2, 16, 1, True, "min"),
    (2, 3, 30, 2, True, "min"),
    (1, 2, 12, 3, False, "max"),
    (1, 1.5, 10, 1, True, "min"),
]


@pytest.mark.parametrize("concurrent", [False, True], ids=["sequential", "concurrent"])
@pytest.mark.parametrize("setting", SETTINGS, ids=[str(s) for s in SETTINGS])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decisions_equal_ray_asha_on_the_same_result_streams(
    setting: tuple[Any, ...], concurrent: bool, seed: int
) -> None:
    grace, rf, max_t, brackets, stop_last, mode = setting
    kwargs: dict[str, Any] = dict(
        metric=KEY,
        mode=mode,
        max_t=max_t,
        grace_period=grace,
        reduction_factor=rf,
        brackets=brackets,
        stop_last_trials=stop_last,
    )
    streams = _streams(np.random.default_rng(seed), 40, max_t)
    events = _events(streams, concurrent, seed)
    with pytest.warns(UserWarning, match="callback is not registered"):
        ours = _drive(PostHocASHA(**kwargs), events, len(streams), seed)
    ray = _drive(ASHAScheduler(**kwargs), events, len(streams), seed)
    assert ours == ray
    stops = sum(d.endswith(TrialScheduler.STOP) for d in ours)
    assert 0 < stops < len(streams) + 1  # the streams exercise both decisions


def test_rung_value_best_judges_the_running_best() -> None:
    """Second implementation: Ray's ASHA fed the running minimum of the same curves."""
    rng = np.random.default_rng(7)
    streams = _streams(rng, 30, 16)
    for rows in streams:  # curves that overfit: late values are worse than early ones
        for k, row in enumerate(rows):
            row[KEY] = row[KEY] + 0.05 * k * rng.uniform()
    running_min = [
        [{**row, KEY: min(r[KEY] for r in rows[: k + 1])} for k, row in enumerate(rows)]
        for rows in streams
    ]
    kwargs: dict[str, Any] = dict(
        metric=KEY, mode="min", max_t=16, grace_period=1, reduction_factor=2
    )
    events = _events(streams, True, 3)
    with pytest.warns(UserWarning):
        ours = _drive(PostHocASHA(**kwargs, rung_value="best"), events, 30, 3)
    ray = _drive(ASHAScheduler(**kwargs), _events(running_min, True, 3), 30, 3)
    assert ours == ray
    with pytest.warns(UserWarning):
        last = _drive(PostHocASHA(**kwargs), events, 30, 3)
    assert last != ours  # "best" and "last" really differ on overfitting curves


def test_nan_ranks_worst_where_ray_lets_it_pass() -> None:
    trials = [Trial("t", stub=True, trial_id=f"t{i}", config={}) for i in range(3)]
    ours = PostHocASHA(metric=KEY, mode="min", max_t=4, grace_period=1, reduction_factor=2)
    ray = ASHAScheduler(metric=KEY, mode="min", max_t=4, grace_period=1, reduction_factor=2)
    for s in (ours, ray):
        for t in trials:
            s.on_trial_add(None, t)  # type: ignore[arg-type]
    first = {"training_iteration": 1, KEY: 0.5}
    nan = {"training_iteration": 1, KEY: math.nan}
    with pytest.warns(UserWarning, match="callback is not registered"):  # no Tune run here
        assert ours.on_trial_result(None, trials[0], first) == "CONTINUE"
    assert ray.on_trial_result(None, trials[0], first) == "CONTINUE"  # type: ignore[arg-type]
    assert ours.on_trial_result(None, trials[1], nan) == "STOP"
    assert ray.on_trial_result(None, trials[1], nan) == "CONTINUE"  # type: ignore[arg-type]
    # NaN values never enter a cutoff: a finite value still passes against 0.5.
    assert ours.on_trial_result(None, trials[2], first) == "CONTINUE"
    assert list(ours.decisions["decision"]) == ["CONTINUE", "STOP", "CONTINUE"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric": "val/base/loss"}, "unknown metric 'loss'"),
        ({"metric": "accuracy"}, "not of the form 'split/transform/metric'"),
        ({"metric": "val/ens+swa/nll"}, r"unknown transform 'ens\+swa'"),
        ({"mode": "minimize"}, "mode must be 'min' or 'max', got 'minimize'"),
        ({"max_t": 0}, "max_t must be a number > 0, got 0"),
        ({"grace_period": 5, "max_t": 4}, r"grace_period \(5\) must be <= max_t \(4\)"),
        ({"reduction_factor": 1}, "reduction_factor must be a number > 1, got 1"),
        ({"brackets": 0}, "brackets must be an int >= 1, got 0"),
        ({"rung_value": "mean"}, "rung_value must be 'last' or 'best', got 'mean'"),
        ({"seed_key": ""}, "seed_key must be a non-empty name or 'a/b' path"),
        ({"seed_key": "run//seed"}, "without empty levels, got 'run//seed'"),
        ({"ensemble": "votes"}, "ensemble must be 'logits' or 'probs', got 'votes'"),
        ({"time_attr": ""}, "time_attr must be a non-empty string"),
    ],
)
def test_arguments_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PostHocASHA(**kwargs)


def test_metric_and_mode_from_tune_config_and_missing_ones() -> None:
    scheduler = PostHocASHA()
    assert scheduler.set_search_properties("val/swa+ens+ts/nll", "min")
    assert scheduler.is_group_metric
    assert not scheduler.set_search_properties("val/base/nll", None)  # already has a metric
    with pytest.raises(ValueError, match="unknown split 'train'"):
        PostHocASHA().set_search_properties("train/base/nll", "min")
    trial = Trial("t", stub=True, trial_id="t0", config={"seed": 0})
    with pytest.raises(ValueError, match="needs a metric key and a mode"):
        PostHocASHA(metric=KEY).on_trial_add(None, trial)
    no_seed = Trial("t", stub=True, trial_id="t1", config={"lr": 0.1})
    group_scheduler = PostHocASHA(metric="val/ens+ts/nll", mode="min")
    with pytest.raises(ValueError, match="config has no seed key 'seed'"):
        group_scheduler.on_trial_add(None, no_seed)


# -- group keys, hook by hook ------------------------------------------------------------------

N_VAL, C = 60, 4


class _Controller:
    """Tune's controller on ``stop_trial``: end the trial and tell the scheduler."""

    def __init__(self, scheduler: PostHocASHA) -> None:
        self.scheduler = scheduler
        self.stopped: list[str] = []
        self.trials: list[Trial] = []

    def get_trials(self) -> list[Trial]:
        return self.trials

    def stop_trial(self, trial: Trial) -> None:
        self.stopped.append(trial.trial_id)
        was_running = trial.status == Trial.RUNNING
        trial.status = Trial.TERMINATED
        if was_running:
            self.scheduler.on_trial_complete(self, trial, None)
        else:
            self.scheduler.on_trial_remove(self, trial)


@pytest.fixture
def group_store(tmp_path: Path) -> PredictionStore:
    """Two configurations x 3 seeds, 9 epochs. Configuration "good" predicts the labels
    ever better; "bad" predicts noise. No temperatures are recorded: the driver fits them."""
    rng = np.random.default_rng(0)
    store = PredictionStore.open(tmp_path)
    y = rng.integers(0, C, N_VAL)
    store.write_labels("val", y)
    for config in ("good", "bad"):
        for seed in range(3):
            for epoch in range(1, 10):
                signal = np.eye(C)[y] * (epoch if config == "good" else 0.0)
                z = (signal + rng.normal(size=(N_VAL, C))).astype(np.float32)
                store.write_epoch(f"{config}_{seed}", epoch, {("val", "swa"): z})
    return store


def _member(config: str, seed: int) -> Trial:
    trial = Trial("t", stub=True, trial_id=f"{config}_{seed}", config={"c": config, "seed": seed})
    trial.status = Trial.RUNNING
    return trial


def _result(epoch: int) -> dict[str, Any]:
    return {"training_iteration": epoch, "epoch": epoch, "val/swa+ens+ts/nll": math.nan}


def _scheduled(
    store: PredictionStore, *configs: str, run_ahead: int | None = None
) -> tuple[PostHocASHA, _Controller, list[list[Trial]]]:
    """PostHocASHA on the group key over ``store`` (rungs 1, 3, 9), with the 3 seeds
    of each configuration added as running trials (members run ahead unless ``run_ahead``
    is set)."""
    scheduler = PostHocASHA(
        metric="val/swa+ens+ts/nll",
        mode="min",
        max_t=9,
        reduction_factor=3,
        store=store,
        run_ahead=run_ahead,
    )
    scheduler.callback.setup()
    tc = _Controller(scheduler)
    groups = [[_member(config, s) for s in range(3)] for config in configs]
    tc.trials = [t for group in groups for t in group]
    for trial in tc.trials:
        scheduler.on_trial_add(tc, trial)
    return scheduler, tc, groups


def test_a_group_is_judged_once_per_rung_when_all_live_members_reach_it(
    group_store: PredictionStore,
) -> None:
    scheduler, tc, (good, bad) = _scheduled(group_store, "good", "bad")

    # good_0 and good_1 run ahead to epoch 3: no judgement until good_2 reaches rung 1.
    for epoch in (1, 2, 3):
        for trial in good[:2]:
            assert scheduler.on_trial_result(tc, trial, _result(epoch)) == "CONTINUE"
    assert scheduler.decisions.empty
    assert scheduler.on_trial_result(tc, good[2], _result(1)) == "CONTINUE"
    rung1 = scheduler.decisions.iloc[-1]
    assert (rung1["milestone"], rung1["epoch"], rung1["n_members"]) == (1, 1, 3)
    expected = ref.ensemble(
        [group_store.read(t.trial_id, 1, "val", "swa") for t in good],
        [group_store.read(t.trial_id, 1, "val", "swa") for t in good],
        group_store.labels("val"),
    )[0]
    assert rung1["value"] == pytest.approx(ref.nll(expected, group_store.labels("val")), rel=1e-3)

    # The bad configuration loses at rung 1 as a whole: its last member's result is STOP, and
    # its two running siblings get STOP at their next result (which Tune then processes).
    for trial in bad[:2]:
        assert scheduler.on_trial_result(tc, trial, _result(1)) == "CONTINUE"
    assert scheduler.on_trial_result(tc, bad[2], _result(1)) == "STOP"
    assert tc.stopped == []
    assert [scheduler.on_trial_result(tc, t, _result(2)) for t in bad[:2]] == ["STOP"] * 2
    assert list(scheduler.decisions["decision"]) == ["CONTINUE", "STOP"]

    # good_1 fails: rung 3 is judged on the two others, once, however many results follow.
    scheduler.on_trial_error(tc, good[1])
    for epoch in (2, 3):
        scheduler.on_trial_result(tc, good[2], _result(epoch))
    for epoch in (4, 5):
        scheduler.on_trial_result(tc, good[0], _result(epoch))
        scheduler.on_trial_result(tc, good[2], _result(epoch))
    rows = scheduler.decisions[scheduler.decisions["arm"] == rung1["arm"]]
    assert list(rows["milestone"]) == [1, 3] and list(rows["n_members"]) == [3, 2]
    assert rows.iloc[-1]["members"] == ["good_0", "good_2"]
    assert len(pht.ensemble_table(group_store)) == 3 * 4  # 3 evaluations x 4 metrics


def test_a_retried_member_is_waited_for_and_one_failed_for_good_is_left_out(
    group_store: PredictionStore,
) -> None:
    scheduler, tc, (good,) = _scheduled(group_store, "good")
    for epoch in (1, 2):
        for trial in good:
            scheduler.on_trial_result(tc, trial, _result(epoch))
    for trial in good[:2]:
        scheduler.on_trial_result(tc, trial, _result(3))

    # good_2 dies in epoch 3 and Tune retries it: on_trial_error, then at once on_trial_add.
    # Rung 3 waits for the resumed member instead of being judged on the two others.
    scheduler.on_trial_error(tc, good[2])
    scheduler.on_trial_add(tc, good[2])
    assert list(scheduler.decisions["milestone"]) == [1]
    scheduler.on_trial_result(tc, good[2], _result(3))
    assert list(scheduler.decisions["n_members"]) == [3, 3]

    # good_1 fails for good while the others finish: Tune's scheduler hook alone does not
    # judge (it cannot tell a final failure from a retry); the callback's hook, called for
    # final failures only, judges the max_t rung on the two others, which prunes nothing.
    for trial in (good[0], good[2]):
        for epoch in range(4, 10):
            scheduler.on_trial_result(tc, trial, _result(epoch))
        trial.status = Trial.TERMINATED
        scheduler.on_trial_complete(tc, trial, _result(9))
    scheduler.on_trial_error(tc, good[1])
    assert list(scheduler.decisions["milestone"]) == [1, 3]
    scheduler.callback.on_trial_error(0, [], good[1])
    last = scheduler.decisions.iloc[-1]
    assert (last["milestone"], last["n_members"], last["decision"]) == (9, 2, "FINAL")
    assert last["members"] == ["good_0", "good_2"]
    assert not scheduler.pruned_trials


def _checkpointed(epoch: int) -> dict[str, Any]:
    """A result that carries a checkpoint, as Tune flags one (``should_checkpoint``)."""
    return {**_result(epoch), "should_checkpoint": True}


def _report(scheduler: PostHocASHA, tc: _Controller, trial: Trial, epoch: int) -> str:
    """One result, and the status Tune gives the trial for the decision."""
    decision = scheduler.on_trial_result(tc, trial, _checkpointed(epoch))
    if decision == "PAUSE":
        trial.status = Trial.PAUSED
    elif decision == "STOP":
        trial.status = Trial.TERMINATED
        scheduler.on_trial_complete(tc, trial, _checkpointed(epoch))
    return decision


def _resume(scheduler: PostHocASHA, tc: _Controller) -> Trial | None:
    """Tune starting the trial the scheduler chooses."""
    trial = scheduler.choose_trial_to_run(tc)
    if trial is not None:
        trial.status = Trial.RUNNING
    return trial


def test_members_ahead_of_their_group_wait_paused_at_the_rung_until_it_is_judged(
    group_store: PredictionStore,
) -> None:
    scheduler, tc, (good, bad) = _scheduled(group_store, "good", "bad", run_ahead=0)
    # Rung 1: the first two members to reach it pause there; nothing may resume them while
    # good_2, the slowest, has not reached it.
    assert [_report(scheduler, tc, t, 1) for t in good[:2]] == ["PAUSE", "PAUSE"]
    assert scheduler.choose_trial_to_run(tc) is None and scheduler.decisions.empty
    assert _report(scheduler, tc, good[2], 1) == "CONTINUE"  # the last one completes the rung
    assert list(scheduler.decisions["n_members"]) == [3]
    assert [_resume(scheduler, tc) for _ in range(3)] == [good[0], good[1], None]

    # Between rungs nobody waits; at rung 3 the two ahead pause again.
    assert [_report(scheduler, tc, t, 2) for t in good[1:]] == ["CONTINUE"] * 2
    assert [_report(scheduler, tc, t, 3) for t in good[1:]] == ["PAUSE"] * 2
    assert scheduler.choose_trial_to_run(tc) is None
    assert _report(scheduler, tc, good[0], 2) == "CONTINUE"
    assert _report(scheduler, tc, good[0], 3) == "CONTINUE"
    assert list(scheduler.decisions["milestone"]) == [1, 3]
    assert {_resume(scheduler, tc), _resume(scheduler, tc)} == {good[1], good[2]}

    # The bad configuration loses at rung 1: its paused members stop at once, at the rung.
    assert [_report(scheduler, tc, t, 1) for t in bad] == ["PAUSE", "PAUSE", "STOP"]
    assert tc.stopped == ["bad_0", "bad_1"]
    assert all(t.status == Trial.TERMINATED for t in bad)
    assert scheduler.pruned_trials == {"bad_0", "bad_1", "bad_2"}


def test_run_ahead_lets_a_member_train_that_many_epochs_past_an_undecided_rung(
    group_store: PredictionStore,
) -> None:
    scheduler, tc, (good,) = _scheduled(group_store, "good", run_ahead=1)
    # In step, within an epoch of each other: nobody pauses.
    assert [_report(scheduler, tc, t, 1) for t in good] == ["CONTINUE"] * 3
    assert list(scheduler.decisions["n_members"]) == [3]
    # good_0 and good_1 reach rung 3 while good_2 is still at epoch 1: one epoch later, at
    # epoch 4, they pause; good_2 completes the rung and they resume.
    for epoch in (2, 3):
        assert [_report(scheduler, tc, t, epoch) for t in good[:2]] == ["CONTINUE"] * 2
    assert [_report(scheduler, tc, t, 4) for t in good[:2]] == ["PAUSE"] * 2
    assert scheduler.choose_trial_to_run(tc) is None
    assert [_report(scheduler, tc, good[2], e) for e in (2, 3)] == ["CONTINUE"] * 2
    rung3 = scheduler.decisions.iloc[-1]
    assert (rung3["milestone"], rung3["epoch"]) == (3, 3)
    assert {_resume(scheduler, tc), _resume(scheduler, tc)} == {good[0], good[1]}


def test_siblings_of_a_group_being_judged_start_first_also_after_a_restore(
    group_store: PredictionStore,
) -> None:
    scheduler, tc, (good, bad) = _scheduled(group_store, "good", "bad", run_ahead=0)
    for trial in tc.trials:
        trial.status = Trial.PENDING
    tc.trials = [*bad[:1], *good, *bad[1:]]  # Tune's order: bad_0 was created first
    assert scheduler.choose_trial_to_run(tc) is bad[0]  # no group is being judged yet
    good[0].status = Trial.RUNNING
    assert scheduler.choose_trial_to_run(tc) is good[1]
    assert _report(scheduler, tc, good[0], 1) == "PAUSE"  # good_1 and good_2 are behind
    assert scheduler.choose_trial_to_run(tc) is good[1]  # its siblings still come first

    # Tune never saves schedulers: a restored one gets its state from the callback, and
    # Tune re-adds the unfinished trials as pending.
    restored = PostHocASHA(
        metric="val/swa+ens+ts/nll", mode="min", max_t=9, reduction_factor=3, store=group_store
    )
    restored.set_state(scheduler.get_state())
    tc2 = _Controller(restored)
    tc2.trials = tc.trials
    for trial in tc2.trials:
        trial.status = Trial.PENDING
        restored.on_trial_add(tc2, trial)
    bad[2].status = Trial.RUNNING
    assert restored.choose_trial_to_run(tc2) is bad[0]  # the sibling, not Tune's next (good_0)


def test_a_member_without_a_checkpoint_runs_ahead_with_one_warning(
    group_store: PredictionStore,
) -> None:
    scheduler, tc, (good,) = _scheduled(group_store, "good", run_ahead=0)
    with pytest.warns(
        UserWarning, match="good_0 ran past a rung its group has not decided.*carries no checkpoint"
    ):
        assert scheduler.on_trial_result(tc, good[0], _result(1)) == "CONTINUE"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scheduler.on_trial_result(tc, good[1], _result(1)) == "CONTINUE"
    for bad in (-1, 0.5, True):
        with pytest.raises(ValueError, match=f"run_ahead must be an int >= 0 or None, got {bad}"):
            PostHocASHA(run_ahead=bad)  # type: ignore[arg-type]


def test_a_ray_train_member_ahead_of_its_group_is_told_to_use_run_ahead_none(
    group_store: PredictionStore,
) -> None:
    """Ray Train results (they name the Train checkpoint) carry no Tune checkpoint, and no
    reporter option would give them one: the warning says so instead."""
    scheduler, tc, (good,) = _scheduled(group_store, "good", run_ahead=0)
    result = {**_result(1), "checkpoint_path": "/exp/train/good_0/checkpoint_000000"}
    with pytest.warns(UserWarning) as warned:
        assert scheduler.on_trial_result(tc, good[0], result) == "CONTINUE"
    (message,) = (str(w.message) for w in warned)
    assert "good_0 ran past a rung" in message and "a Ray Train trial, which Tune cannot" in message
    assert message.endswith("Pass PostHocASHA(run_ahead=None) for Ray Train trials")
    assert "PostHocReporter(checkpoint=...)" not in message


def test_a_seed_key_path_groups_members_by_the_rest_of_their_config(
    group_store: PredictionStore,
) -> None:
    """Ray Train's TorchTrainer: the seed sits in the trainable's ``train_loop_config``."""
    scheduler = PostHocASHA(
        metric="val/swa+ens+ts/nll",
        mode="min",
        max_t=9,
        reduction_factor=3,
        seed_key="train_loop_config/seed",
        store=group_store,
        run_ahead=None,
    )
    scheduler.callback.setup()
    tc = _Controller(scheduler)
    groups = {
        name: [
            Trial("t", stub=True, trial_id=f"{name}_{s}", config={"train_loop_config": config})
            for s, config in enumerate({"c": name, "seed": s} for s in range(3))
        ]
        for name in ("good", "bad")
    }
    for trial in (t for members in groups.values() for t in members):
        trial.status = Trial.RUNNING
        scheduler.on_trial_add(tc, trial)
    actions = [scheduler.on_trial_result(tc, t, _result(1)) for t in groups["good"] + groups["bad"]]
    assert actions == ["CONTINUE"] * 5 + ["STOP"]
    assert sorted(scheduler.pruned_trials) == ["bad_0", "bad_1", "bad_2"]
    arms = [
        hashlib.sha256(json.dumps({"train_loop_config": {"c": c}}).encode()).hexdigest()[:16]
        for c in ("good", "bad")
    ]
    assert list(scheduler.decisions["arm"]) == arms
    assert list(scheduler.decisions["n_members"]) == [3, 3]
