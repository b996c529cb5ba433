"""Readable tables (posthoc_tune.display) and the figures of posthoc_tune.plots, checked on the
drawn artists: where markers sit, what the axes say, which artists exist."""

import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from posthoc_tune import PredictionStore, leaderboard
from posthoc_tune.display import config_legend, epoch_range, significant_digits
from posthoc_tune.plots import experiment_figures
from tests.reference import nll, synthetic_store


@pytest.mark.parametrize(
    ("values", "digits"),
    [
        ([1.2e-05, 3.4e-05, 5e-4], 3),  # 4 decimals would print all three as 0.0000
        ([0.01231, 0.01234, 0.0512], 4),  # 0.0123 twice at 3
        ([0.01234, 0.01236], 3),  # 0.0123 and 0.0124: distinct
        ([1234.5, 1.0], 4),  # the integer part is never cut
        ([0.1 + 0.2, 0.3, math.nan], 3),  # differ by float rounding only; NaN ignored
        ([], 3),
    ],
)
def test_significant_digits(values: list[float], digits: int) -> None:
    assert significant_digits(values) == digits


def test_config_legend_keeps_only_what_varies() -> None:
    configs = {
        "g1": (["a"], {"lr": 0.01231, "opt": {"wd": 1e-5, "momentum": 0.9}, "width": 64}),
        "g2": (["b"], {"lr": 0.01234, "opt": {"wd": 1e-5, "momentum": 0.8}, "width": 64}),
    }
    legend = config_legend(configs)
    assert legend.index.tolist() == ["g1", "g2"]
    assert legend.to_dict("list") == {
        "config": ["c1", "c2"],
        "lr": ["0.01231", "0.01234"],
        "opt/momentum": ["0.9", "0.8"],
    }


def test_epoch_range() -> None:
    assert [epoch_range(e) for e in ([12, 9, 9, 12], [4], [None, 3], [None])] == [
        "9-12",
        "4",
        "3",
        "-",
    ]


# -- figures ------------------------------------------------------------------------------------


def _figures(root: Path) -> dict[str, Figure]:
    return dict(experiment_figures(root, transforms=["swa+ts", "swa+ens+ts"]))


def _xy(line: Line2D) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)


def _base_nll(store: PredictionStore, trial: str, epoch: int, split: str) -> float:
    return nll(store.read(trial, epoch, split, "base"), store.labels(split))


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> PredictionStore:
    """Two configurations x 3 seeds x 6 epochs; two members of "a" pruned early (epochs 2
    and 4), as a scheduler leaves them."""
    root = tmp_path_factory.mktemp("pruned")
    store = synthetic_store(root, {"a": 0.5, "b": 1.5}, seeds=3, epochs=6, n_classes=4)
    store.delete_epochs("a0", range(3, 7))
    store.delete_epochs("a1", range(5, 7))
    return store


def test_naive_epochs_are_each_members_own_and_within_its_data(pruned: PredictionStore) -> None:
    figures = _figures(Path(pruned.experiment_path))
    assert list(figures) == [
        "curves_c1_" + pruned.metadata("a0")["group"],
        "curves_c2_" + pruned.metadata("b0")["group"],
        "leaderboard",
    ]
    for name, figure in figures.items():
        if name == "leaderboard":
            continue
        val_ax, test_ax = figure.axes
        markers = {str(line.get_gid()): line for line in val_ax.get_lines() if line.get_gid()}
        members = [t for t in pruned.trials() if pruned.metadata(t)["group"] in name]
        assert sorted(markers) == [f"naive:{m}" for m in members]
        for member in members:
            epochs = pruned.epochs(member)
            val = {e: _base_nll(pruned, member, e, "val") for e in epochs}
            best = min(val, key=val.__getitem__)
            (x,), (y,) = _xy(markers[f"naive:{member}"])
            assert x == best and int(x) in epochs  # a whole epoch of this member's own data
            assert y == pytest.approx(val[best], rel=1e-6)
            (test_marker,) = (
                line for line in test_ax.get_lines() if line.get_gid() == f"naive:{member}"
            )
            assert _xy(test_marker)[1][0] == pytest.approx(
                _base_nll(pruned, member, best, "test"), rel=1e-6
            )
        for ax in (val_ax, test_ax):
            ticks = ax.get_xticks()
            assert len(ticks) and np.all(ticks == np.round(ticks))  # whole epochs
            (posthoc,) = (line for line in ax.get_lines() if line.get_linestyle() == ":")
            (x,) = _xy(posthoc)[0][:1]
            assert x == round(x) and all(int(x) in pruned.epochs(m) for m in members)


def test_legend_is_outside_the_axes(pruned: PredictionStore) -> None:
    figure = _figures(Path(pruned.experiment_path))["curves_c1_" + pruned.metadata("a0")["group"]]
    figure.draw_without_rendering()
    (legend,) = figure.legends
    box = legend.get_window_extent()
    for ax in figure.axes:
        assert ax.get_legend() is None
        assert not box.overlaps(ax.get_window_extent())


def test_leaderboard_chart_shows_dots_with_the_members_range(pruned: PredictionStore) -> None:
    root = Path(pruned.experiment_path)
    (ax,) = _figures(root)["leaderboard"].axes
    key = "val/swa+ens+ts/nll"
    board = leaderboard(root, key)
    assert key in ax.get_title()
    assert not [c for c in ax.containers if isinstance(c, BarContainer)] and not ax.patches
    labels = [t.get_text() for t in ax.get_yticklabels()]
    ranked = [
        "c1: cfg=a" if g == pruned.metadata("a0")["group"] else "c2: cfg=b" for g in board["group"]
    ]
    ticks = list(ax.get_yticks())
    assert [labels[ticks.index(y)] for y in sorted(ticks, reverse=True)] == ranked  # best on top
    (posthoc,) = (line for line in ax.get_lines() if line.get_marker() == "D")
    np.testing.assert_allclose(_xy(posthoc)[0], board[key])
    (errorbar,) = ax.containers
    dots, _, (bars,) = errorbar
    for group, x, segment in zip(
        board["group"], dots.get_xdata(), bars.get_segments(), strict=True
    ):
        members = [t for t in pruned.trials() if pruned.metadata(t)["group"] == group]
        best = [min(_base_nll(pruned, m, e, "val") for e in pruned.epochs(m)) for m in members]
        assert x == pytest.approx(np.mean(best), rel=1e-6)
        assert sorted(segment[:, 0]) == pytest.approx([min(best), max(best)], rel=1e-6)


def _nan_store(root: Path, finite_epoch: int | None) -> PredictionStore:
    """Group "a" with NaN logits at every epoch but ``finite_epoch``; group "b" untouched."""
    store = synthetic_store(root, {"a": 0.5, "b": 1.0}, seeds=2, epochs=4, n_classes=4)
    for trial in ("a0", "a1"):
        for epoch in store.epochs(trial):
            if epoch != finite_epoch:
                parts = store.read_epoch(trial, epoch)
                store.write_epoch(
                    trial, epoch, {k: np.full_like(v, np.nan) for k, v in parts.items()}
                )
    return store


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_single_finite_point_is_drawn(tmp_path: Path) -> None:
    store = _nan_store(tmp_path, finite_epoch=3)
    figure = _figures(tmp_path)["curves_c1_" + store.metadata("a0")["group"]]
    for ax in figure.axes:
        curves = [line for line in ax.get_lines() if line.get_label() in ("swa+ts", "swa+ens+ts")]
        assert len(curves) == 2
        for line in curves:
            y = np.asarray(line.get_ydata(), float)
            assert list(np.asarray(line.get_xdata())[np.isfinite(y)]) == [3]
            assert line.get_marker() not in ("", "None", None)  # a line alone would not show


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_curves_without_a_finite_value_are_named_on_the_figure(tmp_path: Path) -> None:
    store = _nan_store(tmp_path, finite_epoch=None)
    figures = _figures(tmp_path)
    for ax in figures["curves_c1_" + store.metadata("a0")["group"]].axes:
        texts = [t.get_text() for t in ax.texts]
        assert texts == [f"no finite {ax.get_title()}"]
    for ax in figures["curves_c2_" + store.metadata("b0")["group"]].axes:
        assert not ax.texts and "no finite" not in ax.get_title()
    (board,) = figures["leaderboard"].axes
    labels = [t.get_text() for t in board.get_yticklabels()]
    assert "c1: cfg=a (no finite value)" in labels and "c2: cfg=b" in labels


def test_a_transform_without_a_finite_value_is_named_in_the_title(tmp_path: Path) -> None:
    store = synthetic_store(tmp_path, {"a": 0.5}, seeds=2, epochs=3, n_classes=4)
    store.delete_epochs("a1", [3])  # no ensemble at epoch 3
    store.delete_epochs("a0", [1, 2])  # nor at 1 and 2: no common epoch at all
    (figure, _) = _figures(tmp_path).values()
    for ax in figure.axes:
        title = " ".join(ax.get_title().split())  # wrapped to fit
        assert title.endswith("nll no finite values: base (members' mean), swa+ts, swa+ens+ts")
        assert len([line for line in ax.get_lines() if line.get_gid()]) == 2  # members drawn
