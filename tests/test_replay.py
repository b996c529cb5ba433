"""Replays: the simulated clock, selection on cut curves, and equality with live Tune runs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from posthoc_tune import PostHocASHA, PredictionStore, selection_table
from posthoc_tune.cli import main
from posthoc_tune.replay import Experiment, Replay, Strategy, compare, default_strategies
from posthoc_tune.retention import compact
from tests import reference as ref
from tests import test_asha_tune as live

CONFIGS = {"a": 0.3, "b": 0.7, "c": 0.5}
SEEDS, EPOCHS, C = 2, 6, 4


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Experiment:
    root = tmp_path_factory.mktemp("exp")
    ref.synthetic_store(root, CONFIGS, SEEDS, EPOCHS, C)
    return Experiment(root, transforms=["swa+ens+ts", "ens+ts"])


def test_the_clock_runs_concurrency_trials_at_a_time_in_start_order(
    experiment: Experiment,
) -> None:
    replay = experiment.replay(None, concurrency=2)
    trials = [f"{c}{s}" for c in CONFIGS for s in range(SEEDS)]
    # Brute force: pairs of trials run side by side, epoch by epoch, pair after pair.
    expected = [
        (trials[i + k], e)
        for i in range(0, len(trials), 2)
        for e in range(1, EPOCHS + 1)
        for k in (0, 1)
    ]
    assert replay.order == expected
    assert replay.compute == experiment.full_compute == len(trials) * EPOCHS


def test_a_seed_starts_the_configurations_in_a_random_order(experiment: Experiment) -> None:
    def configs_in_start_order(seed: int) -> tuple[str, ...]:
        replay = experiment.replay(None, concurrency=SEEDS, seed=seed)
        started = [trial for trial, epoch in replay.order if epoch == 1]
        # A configuration's seeds start together: one block of SEEDS per configuration.
        assert [t[0] for t in started] == [t[0] for t in started[::SEEDS] for _ in range(SEEDS)]
        return tuple(dict.fromkeys(t[0] for t in started))

    assert configs_in_start_order(1) == configs_in_start_order(1)
    orders = {configs_in_start_order(seed) for seed in range(12)}
    assert all(sorted(o) == sorted(CONFIGS) for o in orders) and len(orders) > 1


def test_a_stopped_trial_frees_its_slot_for_the_next(experiment: Experiment) -> None:
    # grace 1, rf 2: a trial judged at t=1 below the running median stops there.
    replay = experiment.replay(
        ASHAScheduler(metric="val/base/nll", mode="min", max_t=EPOCHS, grace_period=1),
        concurrency=1,
    )
    trials = [f"{c}{s}" for c in CONFIGS for s in range(SEEDS)]
    expected = [(t, e) for t in trials for e in range(1, replay.epochs[t] + 1)]
    assert replay.order == expected  # one slot: each trial runs until stopped, in order
    assert replay.epochs["a0"] == EPOCHS  # the first arm always survives
    assert min(replay.epochs.values()) < EPOCHS  # and some were stopped
    assert replay.compute == sum(replay.epochs.values())


def _cut_copy(experiment: Experiment, epochs: dict[str, int], to: Path) -> Path:
    """The experiment as it would be stored had each trial stopped where the replay did
    (the documented layout: posthoc/logits/<trial>/epoch_NNNNNN.parquet)."""
    source = Path(experiment.store.root).parent
    shutil.copytree(source, to)
    for trial, ran in epochs.items():
        for file in (to / "posthoc" / "logits" / trial).glob("epoch_*.parquet"):
            if int(file.stem.split("_")[1]) > ran:
                file.unlink()
    return to


@pytest.mark.parametrize("transform", ["swa+ens+ts", "ens+ts", "swa+ts"])
def test_selection_after_a_replay_equals_the_table_of_the_cut_experiment(
    experiment: Experiment, tmp_path: Path, transform: str
) -> None:
    replay = experiment.replay(
        ASHAScheduler(
            metric="val/swa/nll", mode="min", max_t=EPOCHS, grace_period=1, reduction_factor=2
        ),
        concurrency=3,
    )
    assert 0 < replay.compute < experiment.full_compute
    cut = _cut_copy(experiment, replay.epochs, tmp_path / "cut")
    table = selection_table(cut, [transform], over="configs+epochs", select_by="nll")
    for selection in ("naive", "posthoc"):
        got = experiment.select(replay, transform, selection)
        row = table.loc[transform]
        assert got["test/nll"] == pytest.approx(row[f"{selection}/test/nll"], rel=1e-9)
        assert got["test/error"] == pytest.approx(row[f"{selection}/test/error"], rel=1e-9)
        assert got["epoch"] == row[f"{selection}/epoch"]


def test_compare_reports_each_strategy_against_the_full_budget(experiment: Experiment) -> None:
    strategies = default_strategies(EPOCHS, grace_period=1, reduction_factor=2)
    frame = compare(experiment, strategies, concurrency=2)
    assert list(frame.index) == list(strategies)
    full = selection_table(
        experiment.store, ["swa+ens+ts"], over="configs+epochs", select_by="nll"
    ).loc["swa+ens+ts"]
    for selection in ("naive", "posthoc"):
        row = frame.loc[f"full budget, {'post-hoc' if selection == 'posthoc' else 'naive'}"]
        assert row["test/nll"] == pytest.approx(full[f"{selection}/test/nll"], rel=1e-9)
        assert row["compute"] == experiment.full_compute and row["compute_fraction"] == 1.0
    pruned = frame.drop(index=["full budget, naive", "full budget, post-hoc"])
    assert (pruned["compute"] < experiment.full_compute).all()
    assert (pruned["compute_fraction"] == pruned["compute"] / experiment.full_compute).all()
    # A group key stops whole groups: every member of a configuration ran as long.
    group = strategies["PostHocASHA on val/swa+ens+ts/nll"].scheduler
    assert isinstance(group, PostHocASHA) and not group.decisions.empty


def test_a_replay_leaves_the_stored_experiment_as_it_was(experiment: Experiment) -> None:
    before = sorted(p.name for p in Path(experiment.store.root).rglob("*"))
    experiment.replay(
        PostHocASHA(metric="val/swa+ens+ts/nll", mode="min", max_t=EPOCHS, reduction_factor=2)
    )
    assert sorted(p.name for p in Path(experiment.store.root).rglob("*")) == before


def test_shuffling_trials_starts_every_trial_once_in_a_random_order(
    experiment: Experiment,
) -> None:
    def started(seed: int) -> list[str]:
        replay = experiment.replay(None, concurrency=2, seed=seed, shuffle="trials")
        return [trial for trial, epoch in replay.order if epoch == 1]

    orders = [started(seed) for seed in range(8)]
    assert all(sorted(o) == sorted(experiment.trials) for o in orders)
    # Unlike shuffle="configs", a configuration's seeds are not always started side by side.
    assert any(o[i][0] != o[i + 1][0] for o in orders for i in range(0, len(o), SEEDS))


@pytest.mark.parametrize("run_ahead", [0, 1])
def test_members_of_a_cut_group_train_at_most_run_ahead_epochs_past_its_rung(
    experiment: Experiment, run_ahead: int
) -> None:
    def scheduler(run_ahead: int | None) -> PostHocASHA:
        return PostHocASHA(
            metric="val/swa+ens+ts/nll",
            mode="min",
            max_t=EPOCHS,
            reduction_factor=2,
            run_ahead=run_ahead,
        )

    def past_cut_rung(replay: Replay) -> dict[str, int]:
        assert isinstance(replay.scheduler, PostHocASHA)
        d = replay.scheduler.decisions
        cut = d[d["decision"] == "STOP"].set_index("arm")["milestone"].to_dict()
        return {
            t: replay.epochs[t] - int(cut[g])
            for t in experiment.trials
            if (g := experiment.group(t)) in cut
        }

    free_past = paused = 0
    for concurrency in (2, 3):
        for seed in range(6):
            kwargs: dict[str, Any] = {"concurrency": concurrency, "seed": seed}
            free = experiment.replay(scheduler(None), shuffle="trials", **kwargs)
            held = experiment.replay(scheduler(run_ahead), shuffle="trials", **kwargs)
            for replay in (free, held):
                # A paused trial resumes where it stopped: each trial ran 1, 2, ... in order.
                for trial in experiment.trials:
                    ran = [e for t, e in replay.order if t == trial]
                    assert ran == list(range(1, replay.epochs[trial] + 1))
                assert isinstance(replay.scheduler, PostHocASHA)
                assert set(replay.scheduler.decisions["n_members"]) == {SEEDS}
            past = past_cut_rung(held)
            assert set(past.values()) <= set(range(run_ahead + 1))
            assert all(held.epochs[t] == EPOCHS for t in experiment.trials if t not in past)
            free_past += sum(past_cut_rung(free).values())
            paused += held.pauses
    assert free_past > 0 and paused > 0  # the setting is one where members do run ahead


def test_a_seed_schedule_starts_seeds_only_when_the_scheduler_wants_them(
    experiment: Experiment, tmp_path: Path
) -> None:
    schedule = (1, 2)  # rungs 1, 2, 4 (grace 1, rf 2): one seed at the first, two after
    for seed in range(4):
        scheduler = PostHocASHA(
            metric="val/swa+ens+ts/nll",
            mode="min",
            max_t=EPOCHS,
            reduction_factor=2,
            seeds=schedule,
        )
        replay = experiment.replay(scheduler, concurrency=3, seed=seed)
        decisions = scheduler.decisions
        for _, row in decisions.iterrows():
            assert row["n_members"] == schedule[min([1, 2, 4].index(row["milestone"]), 1)]
        cut = decisions[decisions["decision"] == "STOP"].set_index("arm")["milestone"]
        for group, curves in experiment.curves.items():
            first, second = sorted(curves.members, key=experiment.seed)
            if cut.get(group) == 1:  # lost on its one seed: the second never started
                assert replay.epochs[second] == 0 and replay.epochs[first] == 1
            else:  # the second seed started once the first passed rung 1
                assert replay.order.index((second, 1)) > replay.order.index((first, 1))
        assert replay.compute < experiment.full_compute

        # Selection uses the ensemble of the seeds each configuration earned: as the table
        # of a store holding only what ran says.
        ran = _cut_copy(experiment, replay.epochs, tmp_path / f"cut{seed}")
        store = PredictionStore.open(ran)
        for trial, epochs in replay.epochs.items():
            if epochs == 0:
                store.delete_trial(trial)
        table = selection_table(ran, ["swa+ens+ts"], over="configs+epochs", select_by="nll")
        got = experiment.select(replay, "swa+ens+ts")
        row = table.loc["swa+ens+ts"]
        assert got["test/nll"] == pytest.approx(row["posthoc/test/nll"], rel=1e-9)
        assert got["epoch"] == row["posthoc/epoch"]


def test_bad_arguments(experiment: Experiment) -> None:
    with pytest.raises(ValueError, match="concurrency must be an int >= 1, got 0"):
        experiment.replay(None, concurrency=0)
    with pytest.raises(ValueError, match="shuffle must be 'configs' or 'trials', got 'seeds'"):
        experiment.replay(None, seed=0, shuffle="seeds")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"order names trials .*\['zz'\]"):
        experiment.replay(None, order=[("zz", 1)])
    with pytest.raises(ValueError, match="order feeds trial a0 epoch 2 after epoch 0"):
        experiment.replay(None, order=[("a0", 2)])
    with pytest.raises(ValueError, match=r"HyperBandScheduler asks for 'val/swa\+ens\+ts/nll'"):
        experiment.replay(ASHAScheduler(metric="val/swa+ens+ts/nll", mode="min"))
    with pytest.raises(ValueError, match="'ens' was not scored"):
        experiment.select(None, "ens")
    with pytest.raises(ValueError, match="selection must be 'naive' or 'posthoc', got 'best'"):
        experiment.select(None, "swa+ens+ts", "best")  # type: ignore[arg-type]
    assert Strategy(FIFOScheduler()).selection == "posthoc"


def test_a_pruned_or_compacted_experiment_is_refused_with_the_reason(
    experiment: Experiment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def asha() -> Any:
        return default_strategies(EPOCHS, reduction_factor=2)["ASHA on val/base/nll"].scheduler

    replay = experiment.replay(asha(), concurrency=2)
    pruned = _cut_copy(experiment, replay.epochs, tmp_path / "pruned")
    stopped = sorted(t for t, e in replay.epochs.items() if e < EPOCHS)
    first = f"{stopped[0]} at epoch {replay.epochs[stopped[0]]}"
    message = f"{len(stopped)} trials stopped before epoch {EPOCHS} \\({first}.*pruned"
    cut = Experiment(pruned)  # selecting from it is fine; simulating a budget is not
    with pytest.raises(ValueError, match=message):
        cut.replay(None, concurrency=2)
    with pytest.raises(ValueError, match=message):
        compare(cut, default_strategies(EPOCHS, reduction_factor=2))
    # Replaying the pruned run in the order it ran needs no more than it stored.
    again = cut.replay(asha(), order=replay.order)
    assert again.epochs == replay.epochs
    compacted = tmp_path / "compacted"
    shutil.copytree(Path(experiment.store.root).parent, compacted)
    compact(compacted)
    for order in (None, replay.order):
        with pytest.raises(ValueError, match="epochs were removed by compact"):
            Experiment(compacted).replay(None, order=order)
    with pytest.raises(SystemExit) as exit_info:  # the CLI says it in one line
        main(["replay", str(compacted)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "removed by compact" in err


@pytest.mark.parametrize("seed_key", ["_seed", "train_loop_config/seed"])
def test_the_seed_key_comes_from_the_store(
    experiment: Experiment, tmp_path: Path, capsys: pytest.CaptureFixture[str], seed_key: str
) -> None:
    """A run built with ``with_seeds(..., key="_seed")`` (as the README advises), or with the
    seed at a path (Ray Train's ``train_loop_config``), replays without being told the key
    again."""
    path = tmp_path / "exp"
    shutil.copytree(Path(experiment.store.root).parent, path)
    store = PredictionStore.open(path)
    for trial in store.trials():
        config = store.metadata(trial)["config"]
        if seed_key == "_seed":
            renamed = {"cfg": config["cfg"], "_seed": config["seed"]}
        else:
            renamed = {"train_loop_config": {"cfg": config["cfg"], "seed": config["seed"]}}
        store.write_metadata(trial, renamed, seed_key)
    replayed = Experiment(path)
    assert replayed.seed_key == seed_key and experiment.seed_key == "seed"
    ours = default_strategies(EPOCHS, reduction_factor=2, seed_key=replayed.seed_key)
    theirs = default_strategies(EPOCHS, reduction_factor=2)
    key = "PostHocASHA on val/swa+ens+ts/nll"
    # Same groups, same decisions as on the store with the default key.
    assert (
        replayed.replay(ours[key].scheduler, concurrency=2).epochs
        == experiment.replay(theirs[key].scheduler, concurrency=2).epochs
    )
    expected = f"stored with the seed key '{seed_key}'.*seed_key='{seed_key}'"
    with pytest.raises(ValueError, match=expected):
        replayed.replay(PostHocASHA(metric="val/swa+ens+ts/nll", mode="min", max_t=EPOCHS))
    assert main(["replay", str(path), "--grace-period", "1", "--reduction-factor", "2"]) == 0
    assert "PostHocASHA on val/swa+ens+ts/nll" in capsys.readouterr().out


# -- against live Tune runs ---------------------------------------------------------------------


# The replay of a live run on a group key is checked on test_asha_tune's group run
# (test_groups_are_decided_as_a_whole_on_values_recomputable_from_the_store).


@pytest.mark.slow
def test_replay_makes_the_decisions_of_a_live_run_of_stock_asha(run_tune: Any) -> None:
    def asha() -> ASHAScheduler:
        return ASHAScheduler(
            metric="val/base/nll", mode="min", max_t=live.EPOCHS, grace_period=1, reduction_factor=2
        )

    order = live.Order()
    results = run_tune(
        tune.with_resources(live.train, {"cpu": 0.66}),
        live._space([0.3, 0.003, 0.1]),
        tune_config={"scheduler": asha(), "reuse_actors": False},
        run_config={"callbacks": [order]},
    )
    assert not results.errors
    ran = live.iterations_run(results)
    assert min(ran.values()) < live.EPOCHS  # ASHA stopped some trials
    replay = Experiment(results.experiment_path).replay(asha(), order=order.order)
    assert replay.epochs == ran
    assert replay.order == order.order
