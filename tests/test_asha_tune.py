"""PostHocASHA in real Tune runs: synthetic reversal curves, seed groups, failures, restore."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler

import posthoc_tune as pht
from posthoc_tune import PostHocASHA, PostHocReporter, PredictionStore
from posthoc_tune.replay import Experiment
from tests import reference as ref
from tests.interrupt import Interrupt

pytestmark = pytest.mark.slow

# -- synthetic learning curves: post-hoc reversal ----------------------------------------------

MAX_T = 16
REVERSAL = "reversal"


def curves(config: dict[str, Any]) -> None:
    """Deterministic curves. ``reversal``: its base loss is best early and overfits after
    epoch 3, while its post-hoc (SWA+TS) loss is the best of all and keeps improving. The
    others improve slowly and steadily on both."""
    for epoch in range(1, MAX_T + 1):
        if config["curve"] == REVERSAL:
            base = 0.8 - 0.1 * min(epoch, 3) + 0.15 * max(0, epoch - 3)
            posthoc = 0.5 - 0.2 * (1 - 0.8**epoch)
        else:
            k = int(config["curve"])
            base = 0.8 + 0.05 * k - 0.02 * epoch
            posthoc = 0.6 + 0.05 * k - 0.005 * epoch
        tune.report({"val/base/nll": base, "val/swa+ts/nll": posthoc, "epoch": epoch})


def _run_curves(run_tune: Any, scheduler: Any, name: str, **run: Any) -> dict[str, int]:
    space = {"curve": tune.grid_search([*map(str, range(7)), REVERSAL])}  # reversal starts last
    results = run_tune(
        curves,
        space,
        name=name,
        tune_config={"scheduler": scheduler, "max_concurrent_trials": 1},
        run_config=run,
    )
    assert not results.errors
    return {r.config["curve"]: r.metrics["training_iteration"] for r in results}


def test_posthoc_asha_keeps_the_reversal_configuration_that_stock_asha_prunes(
    run_tune: Any,
) -> None:
    asha: dict[str, Any] = dict(max_t=MAX_T, grace_period=1, reduction_factor=2, mode="min")
    stock = _run_curves(run_tune, ASHAScheduler(metric="val/base/nll", **asha), "stock")
    posthoc = PostHocASHA(metric="val/swa+ts/nll", **asha)
    ours = _run_curves(run_tune, posthoc, "posthoc", callbacks=[posthoc.callback])
    assert stock[REVERSAL] < MAX_T  # pruned on its overfitting base loss
    assert ours[REVERSAL] == MAX_T  # kept: its post-hoc loss is the best throughout
    assert sum(ours.values()) < len(ours) * MAX_T  # and still cheaper than running everything
    # Second implementation: stock ASHA on the per-trial post-hoc key decides the same.
    stock_posthoc = _run_curves(
        run_tune, ASHAScheduler(metric="val/swa+ts/nll", **asha), "stock_posthoc"
    )
    assert stock_posthoc == ours


# -- seed groups with the reporter -------------------------------------------------------------

SEEDS, EPOCHS = 3, 9
SEED_KEY = "_seed"  # sorts first, so Tune launches a configuration's seeds together
GROUP_KEY = "val/swa+ens+ts/nll"


def _wait_for_siblings(reporter: PostHocReporter, config: dict[str, Any]) -> None:
    """Start training only once every seed of the configuration has started: removes actor
    start-up skew, which in real runs is small next to an epoch."""
    store = reporter.store
    assert store is not None
    group = pht.group_key(config, SEED_KEY)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        started = [t for t in store.trials() if store.metadata(t)["group"] == group]
        if len(started) >= SEEDS:
            return
        time.sleep(0.02)
    raise TimeoutError(f"siblings of {config} did not start")


def train(config: dict[str, Any]) -> None:
    """Deterministic training once every seed of the configuration has started;
    ``__fail=(lr, seed, epoch)``: that member raises in that epoch."""

    def fail(epoch: int) -> None:
        if (config["lr"], config[SEED_KEY], epoch) == tuple(config.get("__fail", ())):
            raise RuntimeError("simulated member failure")
        time.sleep(0.02)

    ref.teacher_trial(
        config,
        epochs=EPOCHS,
        rows=(300, 120, 100),
        seed_key=SEED_KEY,
        checkpoint=True,
        on_start=lambda reporter: _wait_for_siblings(reporter, config),
        before_report=fail,
    )


def _scheduler() -> PostHocASHA:
    return PostHocASHA(
        metric=GROUP_KEY,
        mode="min",
        max_t=EPOCHS,
        grace_period=1,
        reduction_factor=3,
        seed_key=SEED_KEY,
    )


def _space(lrs: list[float], **extra: Any) -> dict[str, Any]:
    return pht.with_seeds({"lr": tune.grid_search(lrs), **extra}, SEEDS, SEED_KEY)


def _tune_kwargs(scheduler: PostHocASHA, **run: Any) -> dict[str, Any]:
    # Fresh actors: Tune hands a cached actor to *any* pending trial (a set pop), which would
    # mix configurations; new actors start pending trials in order, a configuration at a time.
    return {
        "tune_config": {"scheduler": scheduler, "reuse_actors": False},
        "run_config": {"callbacks": [scheduler.callback], **run},
    }


def _recomputed(store: PredictionStore, members: list[str], epoch: int) -> dict[str, float]:
    """The group key's values recomputed from the store by the brute-force pipeline."""
    val = [store.read(m, epoch, "val", "swa") for m in members]
    ev, _ = ref.ensemble(val, val, store.labels("val"))
    y = store.labels("val")
    return {"val/swa+ens+ts/nll": ref.nll(ev, y), "val/swa+ens+ts/brier": ref.brier(ev, y)}


def _iterations(results: Any) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial_id": r.metrics["trial_id"],
            "group": pht.group_key(r.config, SEED_KEY),
            "last": r.metrics["training_iteration"],
        }
        for r in results
    )


class Order(tune.Callback):
    """Records results in the order Tune handed them to the scheduler."""

    def __init__(self) -> None:
        self.order: list[tuple[str, int]] = []

    def on_trial_result(
        self, iteration: int, trials: Any, trial: Any, result: dict, **_: Any
    ) -> None:
        self.order.append((trial.trial_id, int(result["training_iteration"])))


def iterations_run(results: Any) -> dict[str, int]:
    return {r.metrics["trial_id"]: r.metrics["training_iteration"] for r in results}


def test_groups_are_decided_as_a_whole_on_values_recomputable_from_the_store(
    run_tune: Any,
) -> None:
    """Also the replay's check against a live run on a group key (one run serves both)."""
    scheduler, order = _scheduler(), Order()
    kwargs = _tune_kwargs(scheduler)
    kwargs["run_config"]["callbacks"].append(order)
    results = run_tune(
        tune.with_resources(train, {"cpu": 0.66}),  # one configuration's 3 seeds at a time
        _space([0.3, 0.003, 0.1]),
        **kwargs,
    )
    assert len(results) == 9 and not results.errors

    # A replay of the stored run in the live run's order makes the same decisions.
    replay = Experiment(results.experiment_path).replay(_scheduler(), order=order.order)
    assert replay.epochs == iterations_run(results)
    assert replay.order == order.order
    assert isinstance(replay.scheduler, PostHocASHA)
    columns = ["arm", "milestone", "epoch", "decision", "n_members"]
    pd.testing.assert_frame_equal(replay.scheduler.decisions[columns], scheduler.decisions[columns])
    assert list(replay.scheduler.decisions["value"]) == pytest.approx(
        list(scheduler.decisions["value"]), rel=1e-9
    )
    store = PredictionStore.open(results.experiment_path)
    decisions = scheduler.decisions
    assert set(decisions["n_members"]) == {SEEDS}

    # Whole-group decisions: a stopped group has every member stopped after the rung it lost
    # at and before max_t; a surviving group has every member at max_t.
    trials = _iterations(results)
    outcomes = {}
    for group, members in trials.groupby("group"):
        lost = decisions[(decisions["arm"] == group) & (decisions["decision"] == "STOP")]
        if lost.empty:
            assert (members["last"] == EPOCHS).all(), members
            outcomes[group] = "kept"
        else:
            milestone = lost["milestone"].iloc[0]
            assert members["last"].between(milestone, EPOCHS - 1).all(), members
            outcomes[group] = "stopped"
    assert set(outcomes.values()) == {"kept", "stopped"}  # both kinds of decision happened

    # Every persisted ensemble value (one per epoch all members reached) equals the
    # brute-force recomputation from the store, and equals the value the scheduler judged.
    table = pht.ensemble_table(store)
    assert len(table) and set(table["n_members"]) == {SEEDS}
    persisted = {}
    for (group, epoch), rows in table.groupby(["group", "epoch"]):
        values = dict(zip(rows["key"], rows["value"], strict=True))
        expected = _recomputed(store, list(rows["members"].iloc[0]), int(epoch))
        for key, value in expected.items():
            assert values[key] == pytest.approx(value, rel=1e-3), (group, epoch, key)
        persisted[(group, int(epoch))] = values[GROUP_KEY]
    for _, judged in decisions.iterrows():
        assert judged["value"] == persisted[(judged["arm"], judged["epoch"])]

    # The callback wrote each value into the result of the member that completed the rung.
    rows = pd.concat(
        r.metrics_dataframe.assign(group=pht.group_key(r.config, SEED_KEY)) for r in results
    )
    for (group, epoch), expected_rows in table[table["key"] == GROUP_KEY].groupby(
        ["group", "epoch"]
    ):
        logged = rows[(rows["group"] == group) & (rows["epoch"] == epoch)][GROUP_KEY]
        assert (logged == expected_rows["value"].iloc[0]).any()


def _brute_force_curves(results: Any) -> dict[str, dict[int, float]]:
    """Each group's GROUP_KEY value at every epoch all its members reached, recomputed from
    the store by the brute-force pipeline."""
    store = PredictionStore.open(results.experiment_path)
    members: dict[str, list[Any]] = {}
    for r in results:
        members.setdefault(pht.group_key(r.config, SEED_KEY), []).append(r)
    curves = {}
    for group, rs in members.items():
        ids = [r.metrics["trial_id"] for r in rs]
        common = min(r.metrics["epoch"] for r in rs)
        curves[group] = {e: _recomputed(store, ids, e)[GROUP_KEY] for e in range(1, common + 1)}
    return curves


def test_result_grid_ranks_groups_by_their_ensemble_values(run_tune: Any) -> None:
    # The Ray convention: metric and mode in TuneConfig. Rungs at 1, 2, 4, 8: the last
    # epoch (9) is not a rung, and cut groups' members may run past their cut rung.
    scheduler = PostHocASHA(max_t=EPOCHS, grace_period=1, reduction_factor=2, seed_key=SEED_KEY)
    results = run_tune(
        tune.with_resources(train, {"cpu": 0.66}),
        _space([0.3, 0.003, 0.1]),
        tune_config={
            "scheduler": scheduler,
            "reuse_actors": False,
            "metric": GROUP_KEY,
            "mode": "min",
        },
        run_config={"callbacks": [scheduler.callback]},
    )
    assert len(results) == 9 and not results.errors
    curves = _brute_force_curves(results)
    assert sorted(map(len, curves.values()))[-1] == EPOCHS  # a group ran to the end

    # Every member's last result holds its group's value at the group's last common epoch.
    epoch_key = pht.ensemble_epoch_key("swa+ens+ts")
    for r in results:
        curve = curves[pht.group_key(r.config, SEED_KEY)]
        assert r.metrics[epoch_key] == max(curve)
        assert r.metrics[GROUP_KEY] == pytest.approx(curve[max(curve)], rel=1e-3)
    # get_dataframe() reads each trial's logged results back (Ray's result.json), so a row
    # holds the group's value known when the member logged its last result, with its epoch.
    frame = results.get_dataframe()
    for _, row in frame.iterrows():
        curve = curves[pht.group_key({"lr": row["config/lr"]}, SEED_KEY)]
        if np.isnan(row[epoch_key]):  # stopped before its group was first evaluated
            assert np.isnan(row[GROUP_KEY]) and max(curve) < EPOCHS
        else:
            assert row[epoch_key] <= row["epoch"]
            assert row[GROUP_KEY] == pytest.approx(curve[int(row[epoch_key])], rel=1e-3)

    # get_best_result ranks groups: "last" by the last common epoch's value, "all" by the
    # best common epoch's value, which is what the leaderboard ranks by.
    last = {g: c[max(c)] for g, c in curves.items()}
    best = {g: min(c.values()) for g, c in curves.items()}
    assert pht.group_key(results.get_best_result().config, SEED_KEY) == min(
        last, key=last.__getitem__
    )
    best_all = pht.group_key(results.get_best_result(scope="all").config, SEED_KEY)
    assert best_all == min(best, key=best.__getitem__)
    assert pht.leaderboard(results, GROUP_KEY)["group"].iloc[0] == best_all
    # Tune's analysis holds one value per common epoch, as if each member had reported them.
    mean = {g: float(np.mean(list(c.values()))) for g, c in curves.items()}
    best_avg = pht.group_key(results.get_best_result(scope="avg").config, SEED_KEY)
    assert best_avg == min(mean, key=mean.__getitem__)


def test_a_failing_member_leaves_its_group_decided_on_the_others(run_tune: Any) -> None:
    scheduler = _scheduler()
    results = run_tune(
        tune.with_resources(train, {"cpu": 0.66}),
        _space([0.3, 0.1], __fail=(0.3, 1, 2)),
        **_tune_kwargs(scheduler),
    )
    assert len(results) == 6 and len(results.errors) == 1
    failed = next(r for r in results if r.error is not None)
    assert (failed.config["lr"], failed.config[SEED_KEY]) == (0.3, 1)
    group = pht.group_key(failed.config, SEED_KEY)
    rows = scheduler.decisions[scheduler.decisions["arm"] == group]
    # Rung 1 had all three members; every later rung was decided on the two survivors.
    assert list(rows["n_members"]) == [3, *[2] * (len(rows) - 1)] and len(rows) > 1
    failed_id = failed.metrics["trial_id"]
    assert all(failed_id not in members for members in rows["members"].iloc[1:])
    survivors = [
        r for r in results if r.error is None and pht.group_key(r.config, SEED_KEY) == group
    ]
    assert len(survivors) == 2


def test_rung_records_survive_tuner_restore(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")  # checkpoint the experiment every step
    scheduler = _scheduler()
    trainable = tune.with_resources(train, {"cpu": 0.66})
    tuner = tune.Tuner(
        trainable,
        param_space=_space([0.3, 0.003]),  # the good configuration runs first
        # One configuration at a time: members paused at a rung stay live trials, so the
        # bad configuration cannot start in their slots before the crash.
        tune_config=tune.TuneConfig(
            scheduler=scheduler, reuse_actors=False, time_budget_s=180, max_concurrent_trials=SEEDS
        ),
        run_config=tune.RunConfig(
            name="exp",
            storage_path=str(tmp_path / "ray"),
            verbose=0,
            callbacks=[scheduler.callback, Interrupt(tmp_path / "crashed", after=SEEDS)],
        ),
    )
    with pytest.raises(Exception, match="simulated driver crash"):
        tuner.fit()
    before = scheduler.decisions
    assert set(before["n_members"]) == {SEEDS}
    assert set(before["decision"]) == {"CONTINUE", "FINAL"}  # passed every rung to max_t

    path = str(tmp_path / "ray" / "exp")
    results = tune.Tuner.restore(path, trainable, resume_unfinished=True).fit()
    assert len(results) == 2 * SEEDS and not results.errors
    trials = _iterations(results)
    good, bad = (pht.group_key({"lr": lr}, SEED_KEY) for lr in (0.3, 0.003))
    assert (trials[trials["group"] == good]["last"] == EPOCHS).all()
    # The bad configuration ran only after the restore. It lost at the first rung against
    # the good one's record from before the crash; had the records been lost, it would have
    # been the first group at that rung, which always passes.
    assert (trials[trials["group"] == bad]["last"] < EPOCHS).all()
    # The restored run's ResultGrid ranks groups by their ensembles, those that ended before
    # the crash included.
    metrics = [results[i].metrics for i in range(len(results))]
    assert all(m is not None and np.isfinite(m[GROUP_KEY]) for m in metrics)
    best = results.get_best_result(GROUP_KEY, "min", scope="all").config
    assert best is not None and pht.group_key(best, SEED_KEY) == good
    assert pht.leaderboard(results, GROUP_KEY)["group"].iloc[0] == good
    table = pht.ensemble_table(PredictionStore.open(path))
    first = table[(table["group"] == bad) & (table["key"] == GROUP_KEY)]
    assert list(first["epoch"]) == [1]
    assert not np.isnan(first["value"].iloc[0])


# -- scarce trial slots: a group's members do not train on unjudged -------------------------------


class _Starts(tune.Callback):
    """Counts trial starts: first starts and resumes after a pause."""

    def __init__(self) -> None:
        self.starts = 0

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.starts += 1


def _scattered(config: dict[str, Any]) -> None:
    """Members that start whenever Tune gives them a slot (no waiting for siblings)."""
    ref.teacher_trial(
        config,
        epochs=8,
        rows=(300, 120, 100),
        seed_key=SEED_KEY,
        checkpoint=True,
        before_report=lambda epoch: time.sleep(0.05),
    )


def test_no_member_of_a_cut_group_trains_more_than_one_epoch_past_its_rung(
    run_tune: Any,
) -> None:
    # 4 slots for groups of 3 seeds, actors handed to pending trials in an arbitrary order:
    # a group's members start apart, and those ahead would train on while it waits.
    scheduler = PostHocASHA(
        metric=GROUP_KEY, mode="min", max_t=8, grace_period=1, reduction_factor=2, seed_key=SEED_KEY
    )
    starts = _Starts()
    results = run_tune(
        tune.with_resources(_scattered, {"cpu": 0.5}),
        _space([0.3, 0.003, 0.1, 0.01]),
        tune_config={"scheduler": scheduler},
        run_config={"callbacks": [scheduler.callback, starts]},
    )
    assert len(results) == 12 and not results.errors
    store = PredictionStore.open(results.experiment_path)
    decisions = scheduler.decisions
    cut = decisions[decisions["decision"] == "STOP"].set_index("arm")["milestone"].to_dict()
    assert cut  # some group lost
    for r in results:
        trial_id, last = r.metrics["trial_id"], r.metrics["epoch"]
        stored = store.epochs(trial_id)
        # Every epoch a member trained reached Tune: its results end where its logits do.
        assert stored == list(range(1, last + 1)) and store.processed_epoch(trial_id) == last
        group = pht.group_key(r.config, SEED_KEY)
        assert last <= cut[group] + 1 if group in cut else last == 8
    assert starts.starts > len(results)  # members ahead of their group were paused


# -- epochs stored but never processed by Tune ----------------------------------------------------


def _late_result(config: dict[str, Any]) -> None:
    """``slow`` stores epoch 3, then its result takes long to reach Tune; ``fast`` waits until
    that epoch is stored, then reports the result on which the run ends (_EndRun)."""
    d = ref.linear_teacher(
        ref.TEACHER_IN, ref.TEACHER_CLASSES, {"": 100, "_val": 60, "_test": 50}, noise=2.0
    )
    torch.manual_seed(config[SEED_KEY])
    model = ref.bn_mlp(ref.TEACHER_IN, ref.TEACHER_CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reporter = PostHocReporter(
        model,
        config,
        val=(d["x_val"], d["y_val"]),
        test=(d["x_test"], d["y_test"]),
        seed_key=SEED_KEY,
        report=False,
    )
    store = reporter.store
    assert store is not None
    for epoch in range(1, 6):
        ref.full_batch_step(model, opt, d["x"], d["y"])
        result = reporter.step({"fast": float(config["role"] == "fast")})
        if config["role"] == "slow" and epoch == 3:
            time.sleep(120)  # cut short when the run ends
        if config["role"] == "fast" and epoch == 2:
            deadline = time.monotonic() + 60
            while not any(
                3 in store.epochs(t)
                for t in store.trials()
                if store.metadata(t)["config"]["role"] == "slow"
            ):
                assert time.monotonic() < deadline, "the slow trial never stored epoch 3"
                time.sleep(0.05)
        tune.report(result)


class _EndRun(tune.Stopper):
    """Ends the run at the fast trial's second epoch."""

    def __init__(self) -> None:
        self.end = False

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self.end = self.end or (result.get("fast") == 1.0 and result["epoch"] >= 2)
        return False

    def stop_all(self) -> bool:
        return self.end


def test_an_epoch_stored_but_never_processed_is_kept_and_left_out_of_selection(
    run_tune: Any,
) -> None:
    scheduler = PostHocASHA(metric="val/swa+ts/nll", mode="min", max_t=5, seed_key=SEED_KEY)
    results = run_tune(
        _late_result,
        {"role": tune.grid_search(["slow", "fast"]), SEED_KEY: 0},
        tune_config={"scheduler": scheduler},
        run_config={"callbacks": [scheduler.callback], "stop": _EndRun()},
    )
    assert not results.errors
    last = {r.config["role"]: r.metrics for r in results}
    slow = last["slow"]["trial_id"]
    store = PredictionStore.open(results.experiment_path)
    assert last["slow"]["epoch"] == 2  # the ResultGrid never saw epoch 3 ...
    assert store.epochs(slow) == [1, 2, 3]  # ... which the store keeps,
    assert store.processed_epoch(slow) == 2  # marked as past the last processed result

    # The tables select from what the ResultGrid shows. The slow trial's SWA+TS val loss
    # still improves at epoch 3, so post-hoc selection picks it once the record is gone.
    def picked() -> Any:  # the epochs of the selected model, one per member
        table = pht.selection_table(store, over="epochs", transforms=["swa+ts"])
        return table.loc[(json.dumps({"role": "slow"}), "swa+ts"), "posthoc/epoch"]

    assert picked() == [2]
    store.clear_processed_epoch(slow)
    assert picked() == [3]
