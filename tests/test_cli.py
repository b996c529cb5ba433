import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from posthoc_tune import PredictionStore, selection_table
from posthoc_tune.cli import main


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_a_real_search_end_to_end(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--dataset", "digits", "--configs", "3", "--seeds", "2", "--epochs", "5"]
    argv += ["--grace-period", "1", "--storage", str(tmp_path / "ray"), "--out", str(tmp_path)]
    assert main([*argv, "--name", "small"]) == 0
    out = capsys.readouterr().out
    assert "swa+ens+ts test nll: naive selection" in out and "naive_rank" in out
    store = PredictionStore.open(tmp_path / "ray" / "small")
    groups: dict[str, list[dict]] = {}
    for trial in store.trials():
        meta = store.metadata(trial)
        groups.setdefault(meta["group"], []).append(meta["config"])
        assert store.epochs(trial) == list(range(1, len(store.epochs(trial)) + 1))
    assert len(groups) == 3  # PostHocSearch: 3 configurations x 2 seeds, seeds 0 and 1
    for configs in groups.values():
        assert sorted(c["seed"] for c in configs) == [0, 1]
        assert len({json.dumps({**c, "seed": 0}, sort_keys=True) for c in configs}) == 1
    # The written table is the selection table of the stored experiment.
    written = pd.read_csv(tmp_path / "selection_table.csv", index_col=0)
    expected = selection_table(tmp_path / "ray" / "small", over="configs+epochs")
    np.testing.assert_allclose(written["posthoc/test/nll"], expected["posthoc/test/nll"])
    assert (tmp_path / "leaderboard.md").exists()
    assert len(list((tmp_path / "plots").glob("*.png"))) == 3 + 1  # configurations + leaderboard


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    """A stored experiment: 2 configurations x 2 seeds x 3 epochs of known logits."""
    rng = np.random.default_rng(0)
    store = PredictionStore.open(tmp_path / "exp")
    y = {"val": rng.integers(0, 3, 60), "test": rng.integers(0, 3, 50)}
    for split, labels in y.items():
        store.write_labels(split, labels)
    for lr in (0.1, 0.3):
        for seed in (0, 1):
            trial_id = f"t{lr}_{seed}".replace(".", "")
            store.write_metadata(trial_id, {"lr": lr, "seed": seed})
            for epoch in (1, 2, 3):
                parts = {
                    (s, v): (np.eye(3)[y[s]] * lr * epoch + rng.normal(size=(len(y[s]), 3)))
                    for s in y
                    for v in ("base", "swa")
                }
                store.write_epoch(trial_id, epoch, parts)
    return tmp_path / "exp"


def test_table_formats_carry_the_same_numbers(
    experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = selection_table(experiment, over="configs+epochs")
    assert main(["table", str(experiment), "--over", "configs+epochs", "--format", "csv"]) == 0
    got = pd.read_csv(io.StringIO(capsys.readouterr().out), index_col=0)
    np.testing.assert_allclose(got["posthoc/test/nll"], expected["posthoc/test/nll"], rtol=1e-12)
    out = tmp_path / "table.parquet"
    assert (
        main(
            [
                "table",
                str(experiment),
                "--over",
                "configs+epochs",
                "--format",
                "parquet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    pd.testing.assert_frame_equal(pd.read_parquet(out), expected, check_dtype=False)
    assert main(["table", str(experiment), "--transforms", "swa+ens+ts", "--format", "md"]) == 0
    md = capsys.readouterr().out
    assert "swa+ens+ts" in md and "naive/test/nll" in md and "| ts " not in md
    assert main(["table", str(experiment), "--format", "latex"]) == 0
    assert "\\begin{tabular}" in capsys.readouterr().out


def test_leaderboard_command(experiment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["leaderboard", str(experiment), "--metric", "val/swa+ens+ts/nll"]) == 0
    out = capsys.readouterr().out
    assert "config/lr" in out and "naive_rank" in out


def test_plot_command_writes_png_and_svg(experiment: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures"
    assert main(["plot", str(experiment), "--out", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2 * 3  # 2 configurations + the leaderboard, each as PNG and SVG
    assert {f.rsplit(".", 1)[1] for f in files} == {"png", "svg"}
    for path in out.glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for path in out.glob("*.svg"):
        assert "<svg" in path.read_text()[:500]
    assert "naive epoch" in (out / sorted(files)[1]).read_text()  # the first curves SVG


def test_replay_command_compares_the_strategies(
    experiment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["replay", str(experiment), "--grace-period", "1", "--reduction-factor", "2"]
    assert main([*argv, "--format", "csv"]) == 0
    got = pd.read_csv(io.StringIO(capsys.readouterr().out), index_col=0)
    assert len(got) == 5 and (got["compute"] <= 2 * 2 * 3).all()
    full = selection_table(experiment, ["swa+ens+ts"], over="configs+epochs", select_by="nll")
    row = full.loc["swa+ens+ts"]
    assert got.loc["full budget, naive", "test/nll"] == pytest.approx(row["naive/test/nll"])
    assert got.loc["full budget, post-hoc", "test/nll"] == pytest.approx(row["posthoc/test/nll"])
    assert json.loads(got.loc["full budget, post-hoc", "config"]) == json.loads(
        row["posthoc/config"]
    )


@pytest.mark.parametrize(
    "command", [["table"], ["leaderboard"], ["replay"], ["plot", "--out", "{tmp}/f"]]
)
def test_a_path_that_is_not_an_experiment_gets_one_line(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [command[0], str(tmp_path / "nowhere")] + [a.format(tmp=tmp_path) for a in command[1:]]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no trials" in err
    with pytest.raises(SystemExit):
        main(["table", str(tmp_path), "--format", "parquet"])
    assert "needs --out FILE" in capsys.readouterr().err
