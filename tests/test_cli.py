import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from posthoc_tune import PredictionStore, leaderboard, selection_table
from posthoc_tune.cli import _parser, main

COMMANDS = ("demo", "table", "leaderboard", "greedy", "replay", "compact", "plot")


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet); return its last line."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_help_imports_neither_ray_nor_torch_nor_optuna() -> None:
    code = f"""
import sys
from posthoc_tune.cli import main
for argv in (["--help"], *([command, "--help"] for command in {COMMANDS!r})):
    try:
        main(argv)
    except SystemExit as exit:
        assert exit.code == 0, argv
print(sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "torch", "optuna")))
"""
    assert _fresh_python(code) == "[]"


def test_every_public_name_imports_lazily() -> None:
    code = """
import importlib, sys
import posthoc_tune as pht
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "torch", "optuna"))
for name in pht.__all__:
    namespace = {}
    exec(f"from posthoc_tune import {name}", namespace)
    assert namespace[name] is getattr(pht, name), name
assert pht.PostHocReporter is importlib.import_module("posthoc_tune.reporter").PostHocReporter
assert pht.metrics is importlib.import_module("posthoc_tune.metrics")
print(heavy, sorted(pht.__all__) == sorted(pht._MODULES), "torch" in sys.modules)
"""
    assert _fresh_python(code) == "[] True True"


def test_every_option_has_a_help_text() -> None:
    parser = _parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == set(COMMANDS)
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, command in commands.choices.items()
        for action in command._actions
        if not action.help
    ]
    assert missing == []


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
    assert "swa+ens+ts" in md and "naive/nll" in md and "| ts " not in md
    assert main(["table", str(experiment), "--format", "latex"]) == 0
    assert "\\begin{tabular}" in capsys.readouterr().out


def test_leaderboard_command(experiment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["leaderboard", str(experiment), "--metric", "val/swa+ens+ts/nll"]) == 0
    out = capsys.readouterr().out
    assert " lr |" in out and "naive_rank" in out


# Configurations as a search draws them: lr needs 4 digits to tell two apart, and weight
# decays below 1e-4 print as 0.0000 at 4 decimals; batch size never varies.
GRID = [
    {"batch_size": 128, "lr": 0.01231, "weight_decay": 1.2e-05, "width": 64},
    {"batch_size": 128, "lr": 0.01234, "weight_decay": 3.4e-05, "width": 64},
    {"batch_size": 128, "lr": 0.0512, "weight_decay": 5e-4, "width": 128},
]


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    """A stored experiment of the GRID configurations x 2 seeds x 3 epochs; trial ids sort
    in GRID order."""
    rng = np.random.default_rng(1)
    store = PredictionStore.open(tmp_path / "grid")
    y = {"val": rng.integers(0, 3, 60), "test": rng.integers(0, 3, 50)}
    for split, labels in y.items():
        store.write_labels(split, labels)
    for i, config in enumerate(GRID):
        for seed in (0, 1):
            store.write_metadata(f"t{i}_{seed}", {**config, "seed": seed})
            for epoch in (1, 2, 3):
                parts = {
                    (s, v): np.eye(3)[y[s]] * (0.2 + i) * epoch + rng.normal(size=(len(y[s]), 3))
                    for s in y
                    for v in ("base", "swa")
                }
                store.write_epoch(f"t{i}_{seed}", epoch, parts)
    return tmp_path / "grid"


def _md_tables(text: str) -> list[pd.DataFrame]:
    """Parse markdown tables (separated by blank lines) into frames of their cell text."""
    frames = []
    for block in text.strip().split("\n\n"):
        rows = [
            [c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()
        ]
        frames.append(pd.DataFrame(rows[2:], columns=rows[0]))
    return frames


def _label(config_json: str) -> str:
    return f"c{GRID.index(json.loads(config_json)) + 1}"


def _close(cell: str, value: float) -> bool:
    """``cell`` shows ``value`` to at least 3 significant digits."""
    if value == 0:
        return float(cell) == 0
    return abs(float(cell) - value) <= 0.5 * 10 ** (np.floor(np.log10(abs(value))) - 2)


@pytest.mark.parametrize("over", ["epochs", "configs+epochs"])
def test_md_table_is_readable(grid: Path, over: str, capsys: pytest.CaptureFixture[str]) -> None:
    full = selection_table(grid, over=over)
    assert main(["table", str(grid), "--over", over]) == 0
    md = capsys.readouterr().out
    assert max(map(len, md.splitlines())) <= 120
    assert "{" not in md and "('" not in md  # no JSON, no tuple reprs
    view, legend = _md_tables(md)
    assert list(view["transform"]) == list(full.index.get_level_values("transform"))
    for (_, row), (_, cells) in zip(full.iterrows(), view.iterrows(), strict=True):
        for kind in ("naive", "posthoc"):
            for metric in ("nll", "error"):
                assert _close(cells[f"{kind}/{metric}"], row[f"{kind}/test/{metric}"])
            epochs = row[f"{kind}/epoch"]
            span = f"{min(epochs)}-{max(epochs)}" if min(epochs) < max(epochs) else str(epochs[0])
            assert cells[f"{kind}/selected"] == f"{_label(row[f'{kind}/config'])} @ {span}"
    # The legend: the labels used, with only the hyperparameters that vary, told apart.
    used = sorted({_label(c) for kind in ("naive", "posthoc") for c in full[f"{kind}/config"]})
    assert list(legend["config"]) == used
    assert list(legend.columns) == ["config", "lr", "weight_decay", "width"]
    shown = {
        "lr": ["0.01231", "0.01234", "0.0512"],
        "weight_decay": ["1.2e-05", "3.4e-05", "0.0005"],
    }
    for name, texts in shown.items():
        assert list(legend[name]) == [texts[int(label[1:]) - 1] for label in used]


def test_md_leaderboard_is_readable(grid: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full = leaderboard(grid)
    assert main(["leaderboard", str(grid)]) == 0
    md = capsys.readouterr().out
    assert max(map(len, md.splitlines())) <= 120
    (view,) = _md_tables(md)
    columns = ["rank", "config", "lr", "weight_decay", "width", "epoch", "val/swa+ens+ts/nll"]
    assert list(view.columns) == [*columns, "naive", "naive_rank"]
    for (_, row), (_, cells) in zip(full.iterrows(), view.iterrows(), strict=True):
        config = {k: row[f"config/{k}"] for k in GRID[0]}
        i = GRID.index(config)
        assert cells["config"] == f"c{i + 1}"
        assert [float(cells["lr"]), float(cells["weight_decay"])] == [
            GRID[i]["lr"],
            GRID[i]["weight_decay"],
        ]
        assert int(cells["rank"]) == row["rank"] and int(cells["epoch"]) == row["epoch"]
        assert _close(cells["val/swa+ens+ts/nll"], row["val/swa+ens+ts/nll"])
        assert _close(cells["naive"], row["naive_value"])
        assert int(cells["naive_rank"]) == row["naive_rank"]
    assert main(["leaderboard", str(grid), "--format", "latex"]) == 0
    latex = capsys.readouterr().out
    assert "weight\\_decay" in latex and "1.2e-05" in latex and "3.4e-05" in latex


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
    assert err.count("\n") == 1 and "does not exist" in err
    with pytest.raises(SystemExit):
        main(["table", str(tmp_path), "--format", "parquet"])
    assert "needs --out FILE" in capsys.readouterr().err
