"""Tables for reading: short configuration labels, only the hyperparameters that vary, and
numbers with just enough digits to tell them apart.

The selection table and the leaderboard carry every detail for csv and Parquet (whole
configurations as JSON, floats at full precision, a column per statistic); printed as they
are, they run to hundreds of characters a line. The views here keep the headline columns and
name each configuration ``c1``, ``c2``, ... in the store's order, so that the tables, the
leaderboard and the plots of one experiment use the same labels, with a legend of the
hyperparameters that tell the configurations apart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from posthoc_tune.groups import flatten_config

Configurations = Mapping[str, tuple[Sequence[str], Mapping[str, Any]]]
"""group -> (members, configuration), as :func:`posthoc_tune.selection.configurations` gives."""

MIN_DIGITS = 3
FLOAT_DIGITS = 12  # values that agree to 12 significant digits differ by float rounding only


def significant_digits(values: Iterable[float]) -> int:
    """The fewest significant digits (at least 3, and enough for the integer part) at which
    the values that differ beyond float rounding still print differently."""
    finite = [float(v) for v in values if math.isfinite(v)]
    if not finite:
        return MIN_DIGITS
    distinct = len({f"{v:.{FLOAT_DIGITS}g}" for v in finite})
    largest = max(map(abs, finite))
    integer_digits = math.floor(math.log10(largest)) + 1 if largest >= 1 else 0
    return next(
        (
            d
            for d in range(max(MIN_DIGITS, integer_digits), FLOAT_DIGITS)
            if len({f"{v:.{d}g}" for v in finite}) == distinct
        ),
        FLOAT_DIGITS,
    )


def format_column(column: pd.Series) -> pd.Series:
    """A column as text: floats with :func:`significant_digits`, missing values as ``-``."""
    if pd.api.types.is_float_dtype(column):
        digits = significant_digits(column)
        return column.map(lambda v: "-" if pd.isna(v) else f"{v:.{digits}g}")
    return column.map(lambda v: "-" if _missing(v) else str(v))


def _missing(value: Any) -> bool:
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def render(frames: Sequence[pd.DataFrame], fmt: str) -> str:
    """Markdown or LaTeX tables, one per frame: index levels become columns (no tuple
    reprs), numbers are right-aligned and formatted by :func:`format_column`."""
    tables = []
    for frame in frames:
        flat = frame.reset_index(drop=frame.index.names == [None])
        text = flat.apply(format_column)
        right = [_numeric(flat[c]) for c in flat.columns]
        if fmt == "md":
            align = ["right" if r else "left" for r in right]
            tables.append(text.to_markdown(index=False, disable_numparse=True, colalign=align))
        elif fmt == "latex":
            column_format = "".join("r" if r else "l" for r in right)
            tables.append(text.to_latex(index=False, escape=True, column_format=column_format))
        else:
            raise ValueError(f"unknown format {fmt!r} for reading; expected 'md' or 'latex'")
    return "\n\n".join(t.rstrip("\n") for t in tables)


def _numeric(column: pd.Series) -> bool:
    """Numbers, or numbers already formatted as text (as the legend holds them)."""
    return pd.api.types.is_numeric_dtype(column) or all(map(_number_text, column))


def _number_text(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return value == "-"  # a missing value
    return True


def config_legend(configs: Configurations) -> pd.DataFrame:
    """One row per configuration, indexed by group, in the given order: its label
    (``config``: ``c1``, ``c2``, ...) and, as text, the hyperparameters that vary between the
    configurations (nested ones as ``a/b``). Their digits are chosen over all the
    configurations, so a configuration prints the same wherever a subset of them is shown."""
    flat = pd.DataFrame(
        [flatten_config(config) for _, config in configs.values()],
        index=pd.Index(list(configs), name="group"),
    )
    legend = flat.loc[:, flat.astype(str).nunique() > 1].apply(format_column)  # str: lists too
    legend.insert(0, "config", [f"c{i}" for i in range(1, len(flat) + 1)])
    return legend


def config_titles(configs: Configurations) -> dict[str, str]:
    """group -> ``"c3: lr=0.0257, width=64"``: a configuration's label and what sets it apart."""
    text = config_legend(configs)
    titles = {}
    for group, row in text.iterrows():
        values = ", ".join(f"{name}={row[name]}" for name in text.columns[1:])
        titles[str(group)] = f"{row['config']}: {values}" if values else row["config"]
    return titles


def selection_view(table: pd.DataFrame, configs: Configurations) -> list[pd.DataFrame]:
    """The readable form of :func:`~posthoc_tune.selection.selection_table`: its test metrics
    (nll and error by default), naive and post-hoc, and what each selected (``c3 @ 20-29``:
    configuration and the members' range of epochs), followed by the legend of the labels
    when there are several configurations."""
    legend = config_legend(configs)
    keys = [json.dumps(config, sort_keys=True) for _, config in configs.values()]  # as the table
    labels = dict(zip(keys, legend["config"], strict=True))
    rows = table.reset_index()
    view = pd.DataFrame({"transform": rows["transform"]})
    metrics = [
        c.removeprefix("naive/test/")
        for c in table.columns
        if c.startswith("naive/test/") and not c.endswith("_std")
    ]
    for metric in metrics:  # nll and error, or the token metrics of a token-level table
        for kind in ("naive", "posthoc"):
            view[f"{kind}/{metric}"] = rows[f"{kind}/test/{metric}"]
    greedy = rows["transform"] == "greedy"  # members across configurations
    for kind in ("naive", "posthoc"):
        selected = rows[f"{kind}/epoch"].map(epoch_range)
        if len(configs) > 1:
            selected = rows[f"{kind}/config"].map(labels).fillna("") + " @ " + selected
        selected[greedy] = [
            f"{len(e)} models, {len(json.loads(c))} configs"
            for e, c in zip(
                rows.loc[greedy, f"{kind}/epoch"], rows.loc[greedy, f"{kind}/config"], strict=True
            )
        ]
        view[f"{kind}/selected"] = selected
    if len(configs) == 1:
        return [view]
    used = set(rows["naive/config"]) | set(rows["posthoc/config"])
    return [view, legend[[key in used for key in keys]].reset_index(drop=True)]


def leaderboard_view(board: pd.DataFrame, configs: Configurations) -> list[pd.DataFrame]:
    """The readable form of :func:`~posthoc_tune.selection.leaderboard`: configurations by
    label with the hyperparameters that vary, ``naive`` for ``naive_value``, the member
    count only where it varies, and the naive epochs left to the selection table (its
    ``naive/selected``)."""
    legend = config_legend(configs).reindex(board["group"]).reset_index(drop=True)
    legend.loc[(board["group"] == "greedy").to_numpy(), "config"] = "greedy"  # not a config
    drop = {"rank", "group", "naive_epochs"} | (
        {"n_members"} if board["n_members"].nunique() == 1 else set()
    )
    rest = [c for c in board if c not in drop and not c.startswith("config/")]
    view = pd.concat([board[["rank"]], legend, board[rest]], axis=1)
    return [view.rename(columns={"naive_value": "naive"})]


def replay_view(frame: pd.DataFrame, configs: Configurations) -> list[pd.DataFrame]:
    """The readable form of :func:`~posthoc_tune.replay.compare`: per strategy what it
    selected (``c3 @ 20``), its test metrics (nll and error) and the compute it spent,
    followed by the legend of the configurations it selected."""
    legend = config_legend(configs)
    keys = [json.dumps(config, sort_keys=True) for _, config in configs.values()]
    labels = dict(zip(keys, legend["config"], strict=True))
    chosen = [json.dumps(c, sort_keys=True) for c in frame["config"]]
    view = pd.DataFrame(
        {
            "strategy": frame.index,
            "selected": [
                f"{labels[c]} @ {epoch_range(e)}"
                for c, e in zip(chosen, frame["epoch"], strict=True)
            ],
            **{c: frame[c].to_numpy() for c in frame.columns if c.startswith("test/")},
            "compute": frame["compute"].to_numpy(),
            "fraction": frame["compute_fraction"].to_numpy(),
        }
    )
    return [view, legend[[key in set(chosen) for key in keys]].reset_index(drop=True)]


def epoch_range(epochs: Sequence[int | None]) -> str:
    """Selected epochs as ``"9-12"`` (the members' range) or ``"12"``; ``-`` when none."""
    known = [e for e in epochs if e is not None]
    if not known:
        return "-"
    lo, hi = min(known), max(known)
    return str(lo) if lo == hi else f"{lo}-{hi}"
