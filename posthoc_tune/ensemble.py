"""Group (ensemble) metrics on the driver, computed from the prediction store.

The seeds of one configuration are its ensemble members; their ensemble exists only on the
driver, which alone can see every member's predictions. Schedulers (PostHocASHA) and
searchers (PostHocSearch) share this one implementation. An evaluation reads each member's
stored logits at one common epoch and applies the transform exactly as DESIGN.md defines it
(SWA variant -> member TS -> combine -> ensemble TS), reusing the member temperatures the
reporter recorded with the logits instead of refitting them. Values are cached per
(group, epoch, transform) and published to the store (``posthoc/ensembles/``), so tables see
them and a restarted driver does not recompute them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from posthoc_tune.keys import SPLITS, parse_transform
from posthoc_tune.metrics import evaluate
from posthoc_tune.store import PredictionStore
from posthoc_tune.transforms import Combiner, apply_transform

COLUMNS = ("group", "epoch", "transform", "combiner", "n_members", "members", "key", "value")


@dataclass(frozen=True)
class EnsembleValue:
    """One evaluated ensemble: its metric values by key (``val/swa+ens+ts/nll``, ...)."""

    group: str
    epoch: int
    transform: str
    combiner: str
    members: tuple[str, ...]
    values: dict[str, float]

    @property
    def n_members(self) -> int:
        return len(self.members)

    def rows(self) -> list[dict[str, Any]]:
        """Long-format rows, one per metric key (the persisted table's schema)."""
        return [
            {
                "group": self.group,
                "epoch": self.epoch,
                "transform": self.transform,
                "combiner": self.combiner,
                "n_members": self.n_members,
                "members": list(self.members),
                "key": key,
                "value": value,
            }
            for key, value in self.values.items()
        ]


def ensemble_metrics(
    store: PredictionStore,
    members: Iterable[str],
    epoch: int,
    transform: str,
    *,
    ensemble: Combiner = "logits",
) -> tuple[tuple[str, ...], dict[str, float]]:
    """Metrics of the ensemble of ``members`` at ``epoch`` under an ensemble ``transform``.

    Members without the epoch's logits of the transform's variant are left out. Returns the
    members used and every ``{split}/{transform}/{metric}`` value for the splits all used
    members stored (NaN values when no member has the epoch).
    """
    t = parse_transform(transform)
    if not t.ens:
        raise ValueError(
            f"transform {transform!r} is per-trial; ensemble_metrics takes one with 'ens'"
        )
    used, logits, temperatures = [], [], []
    for trial_id in sorted(set(members)):
        try:
            parts = store.read_variant(trial_id, epoch, t.variant)
        except KeyError:
            continue
        used.append(trial_id)
        logits.append(parts.logits)
        temperatures.append(parts.temperature)
    if not used:
        return (), {f"val/{transform}/{m}": math.nan for m in ("nll", "error", "ece", "brier")}
    splits = [s for s in SPLITS if all(s in parts for parts in logits)]
    y_val = store.labels("val")
    test = [parts["test"] for parts in logits] if "test" in splits else None
    val_z, test_z = apply_transform(
        transform,
        [parts["val"] for parts in logits],
        y_val,
        test,
        ensemble=ensemble,
        member_temperatures=temperatures,
    )
    values = {f"val/{transform}/{m}": v for m, v in evaluate(val_z, y_val).items()}
    if test_z is not None:
        y_test = store.labels("test")
        values.update({f"test/{transform}/{m}": v for m, v in evaluate(test_z, y_test).items()})
    return tuple(used), values


class EnsembleEvaluator:
    """Cached, persisted :func:`ensemble_metrics` for one experiment's store.

    Args:
        store: the experiment's prediction store.
        ensemble: ``"logits"`` (mean of logits, the paper) or ``"probs"``.
        persist: publish every evaluation to the store (``posthoc/ensembles/``).
    """

    def __init__(
        self, store: PredictionStore, *, ensemble: Combiner = "logits", persist: bool = True
    ) -> None:
        if ensemble not in ("logits", "probs"):
            raise ValueError(
                f"unknown ensemble combiner {ensemble!r}; expected 'logits' or 'probs'"
            )
        self.store = store
        self.ensemble: Combiner = ensemble
        self.persist = persist
        self._cache: dict[tuple[str, int, str], EnsembleValue] = {}

    def evaluate(
        self, group: str, epoch: int, members: Sequence[str], transform: str
    ) -> EnsembleValue:
        """The ensemble of ``members`` of ``group`` at ``epoch``; recomputed only when the
        member set differs from the cached evaluation's."""
        key = (group, epoch, transform)
        cached = self._cache.get(key)
        if cached is not None and set(cached.members) == set(members):
            return cached
        used, values = ensemble_metrics(
            self.store, members, epoch, transform, ensemble=self.ensemble
        )
        value = EnsembleValue(group, epoch, transform, self.ensemble, used, values)
        self._cache[key] = value
        if self.persist and used:
            self.store.write_ensemble_values(
                group, epoch, f"{transform.replace('+', '-')}.{self.ensemble}", _table([value])
            )
        return value

    def get(self, group: str, epoch: int, transform: str) -> EnsembleValue | None:
        """A cached evaluation, if any."""
        return self._cache.get((group, epoch, transform))

    def load(self) -> int:
        """Fill the cache from the values persisted in the store (after a driver restart);
        returns how many evaluations were loaded."""
        table = self.store.ensemble_values()
        if table is None:
            return 0
        frame = table.to_pandas()
        frame = frame[frame["combiner"] == self.ensemble]
        loaded = 0
        for (group, epoch, transform), rows in frame.groupby(
            ["group", "epoch", "transform"], sort=False
        ):
            members = tuple(rows["members"].iloc[0])
            values = dict(zip(rows["key"], rows["value"].astype(float), strict=True))
            self._cache[(group, int(epoch), transform)] = EnsembleValue(
                group, int(epoch), transform, self.ensemble, members, values
            )
            loaded += 1
        return loaded

    def table(self) -> pd.DataFrame:
        """Every cached evaluation in long format (columns :data:`COLUMNS`)."""
        rows = [row for value in self._cache.values() for row in value.rows()]
        return pd.DataFrame(rows, columns=list(COLUMNS))


def ensemble_table(store: PredictionStore) -> pd.DataFrame:
    """Every ensemble value persisted in an experiment's store (columns :data:`COLUMNS`)."""
    table = store.ensemble_values()
    if table is None:
        return pd.DataFrame(columns=list(COLUMNS))
    frame = table.to_pandas()
    frame["members"] = frame["members"].map(list)
    return frame.sort_values(["group", "epoch", "transform", "key"], ignore_index=True)


def _table(values: Sequence[EnsembleValue]) -> pa.Table:
    rows = [row for value in values for row in value.rows()]
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("group", pa.string()),
                ("epoch", pa.int32()),
                ("transform", pa.string()),
                ("combiner", pa.string()),
                ("n_members", pa.int32()),
                ("members", pa.list_(pa.string())),
                ("key", pa.string()),
                ("value", pa.float64()),
            ]
        ),
    )
