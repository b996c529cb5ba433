"""Group (ensemble) metrics on the driver, computed from the prediction store.

The seeds of one configuration are its ensemble members; their ensemble exists only on the
driver, which alone can see every member's predictions. Schedulers (PostHocASHA) and
searchers (PostHocSearch) share this one implementation. An evaluation reads each member's
stored logits at one common epoch and applies the transform in the order of the paper's code
(its ``base+swa+ts+ens+ts`` pipeline: SWA variant -> member TS -> combine -> ensemble TS; see
``docs/sources.md``), reusing the member temperatures the reporter recorded with the logits
instead of refitting them. Values are cached per (group, epoch, transform) and published to the
store (``posthoc/ensembles/``), so tables see them and a restarted driver does not recompute
them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from posthoc_tune.keys import METRICS, SPLITS, Transform, check_name, parse_transform
from posthoc_tune.scoring import score, store_labels
from posthoc_tune.store import PredictionStore, VariantParts
from posthoc_tune.transforms import Combiner

_READ_THREADS = 8
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
    splits: Sequence[str] = SPLITS,
) -> tuple[tuple[str, ...], dict[str, float]]:
    """Metrics of the ensemble of ``members`` at ``epoch`` under an ensemble ``transform``.

    Members without the epoch's logits of the transform's variant are left out; members are
    read in parallel threads (decoding releases the GIL). Returns the members used and every
    ``{split}/{transform}/{metric}`` value for those of ``splits`` (val is always read: the
    temperatures are fit on it) that all used members stored; NaN values when no member has
    the epoch.
    """
    variant = _ensemble_transform(transform).variant
    ids = sorted(set(members))
    with ThreadPoolExecutor(max_workers=min(_READ_THREADS, max(1, len(ids)))) as pool:
        parts = list(pool.map(lambda m: _read(store, m, epoch, variant, splits), ids))
    return _metrics(store, dict(zip(ids, parts, strict=True)), transform, ensemble, splits)


def _ensemble_transform(transform: str) -> Transform:
    t = parse_transform(transform)
    if not t.ens:
        raise ValueError(
            f"transform {transform!r} is per-trial; ensemble_metrics takes one with 'ens'"
        )
    return t


def _read(
    store: PredictionStore, trial_id: str, epoch: int, variant: str, splits: Sequence[str]
) -> VariantParts | None:
    """A member's logits for ``splits`` plus val, or None when it lacks the epoch."""
    try:
        parts = store.read_variant(trial_id, epoch, variant, {"val", *splits})
    except KeyError:
        return None
    return parts if "val" in parts.logits else None


def _metrics(
    store: PredictionStore,
    parts: Mapping[str, VariantParts | None],
    transform: str,
    ensemble: Combiner,
    splits: Sequence[str],
) -> tuple[tuple[str, ...], dict[str, float]]:
    """The ensemble's metrics from its members' read parts (members read as None left out)."""
    found = {m: p for m, p in sorted(parts.items()) if p is not None}
    if not found:
        return (), {f"val/{transform}/{m}": math.nan for m in METRICS}
    labels = store_labels(store, ["val", *splits])
    values = score(transform, list(found.values()), labels, ensemble=ensemble, splits=splits)
    return tuple(found), values


class EnsembleEvaluator:
    """Cached, persisted :func:`ensemble_metrics` for one experiment's store.

    Args:
        store: the experiment's prediction store.
        ensemble: ``"logits"`` (mean of logits, the paper) or ``"probs"``.
        splits: splits to evaluate; schedulers decide on val alone, so reading test too
            would double the driver's work at every rung.
        persist: publish every evaluation to the store (``posthoc/ensembles/``).
    """

    def __init__(
        self,
        store: PredictionStore,
        *,
        ensemble: Combiner = "logits",
        splits: Sequence[str] = SPLITS,
        persist: bool = True,
    ) -> None:
        if ensemble not in ("logits", "probs"):
            raise ValueError(
                f"unknown ensemble combiner {ensemble!r}; expected 'logits' or 'probs'"
            )
        self.store = store
        self.ensemble: Combiner = ensemble
        self.splits = tuple(check_name("split", s, SPLITS) for s in splits)
        self.persist = persist
        self._cache: dict[tuple[str, int, str], EnsembleValue] = {}
        self._pending: dict[tuple[str, int, str], Future[VariantParts | None]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def prefetch(self, trial_id: str, epoch: int, variant: str) -> None:
        """Start reading a member's logits in a background thread, so that the read is done
        when its group is judged (the driver is not blocked meanwhile)."""
        key = (trial_id, epoch, variant)
        if key not in self._pending:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="posthoc-read")
            self._pending[key] = self._pool.submit(
                _read, self.store, trial_id, epoch, variant, self.splits
            )

    def discard(self, members: Iterable[str], up_to_epoch: int | None = None) -> None:
        """Drop prefetched reads of ``members`` (those up to an epoch, or all)."""
        gone = set(members)
        for key in [k for k in self._pending if k[0] in gone]:
            if up_to_epoch is None or key[1] <= up_to_epoch:
                self._pending.pop(key).cancel()

    def evaluate(
        self, group: str, epoch: int, members: Sequence[str], transform: str
    ) -> EnsembleValue:
        """The ensemble of ``members`` of ``group`` at ``epoch``; recomputed only when the
        member set differs from the cached evaluation's."""
        key = (group, epoch, transform)
        cached = self._cache.get(key)
        if cached is not None and set(cached.members) == set(members):
            return cached
        variant = _ensemble_transform(transform).variant
        ids = sorted(set(members))
        for m in ids:
            self.prefetch(m, epoch, variant)  # a no-op for reads already under way
        parts = {m: self._pending[(m, epoch, variant)].result() for m in ids}
        self.discard(ids, up_to_epoch=epoch)
        used, values = _metrics(self.store, parts, transform, self.ensemble, self.splits)
        value = EnsembleValue(group, epoch, transform, self.ensemble, used, values)
        self._cache[key] = value
        if self.persist and used:
            self.store.write_ensemble_values(
                group, epoch, f"{transform.replace('+', '-')}.{self.ensemble}", _table([value])
            )
        return value

    def remember(self, values: Iterable[EnsembleValue]) -> None:
        """Cache evaluations computed elsewhere (a replay's scan of the same logits), so
        that they are not computed again."""
        for value in values:
            if value.combiner != self.ensemble:
                raise ValueError(
                    f"evaluation of group {value.group!r} used the {value.combiner!r} "
                    f"combiner, this evaluator {self.ensemble!r}"
                )
            self._cache[(value.group, value.epoch, value.transform)] = value

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
