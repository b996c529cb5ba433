"""The prediction store: every trial's per-epoch val/test logits, in open Parquet files.

The store is the contract between the trial side (the reporter writes) and the driver side
(schedulers, searchers and tables read). It works on any ``pyarrow.fs`` filesystem: a local
path, ``s3://...``, GCS, HDFS, or a ``SubTreeFileSystem``. Layout and schema are documented in
``docs/store.md`` so pandas, pyarrow or DuckDB can read a store without this package.

Guarantees: one file per (trial, epoch); each file is published atomically (written under a
hidden temporary name, then moved; object stores publish on close), so readers never see a
partial file and a retried epoch replaces the old file instead of duplicating it. Nothing is
unpickled: data is Parquet, metadata JSON. A stored file that cannot be read raises
:class:`StoreError` naming it (and its trial, epoch or split); reads never delete anything.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from posthoc_tune._arrays import ArrayLike, integer_tensor, to_numpy
from posthoc_tune.groups import get_path, group_key, jsonable
from posthoc_tune.keys import SPLITS, VARIANTS, check_name
from posthoc_tune.tokens import GRID, TokenParts, check_records

FORMAT_VERSION = 1
STORE_DIR = "posthoc"
_CLASSES_FILE = "classes.json"
_TOKENS_FILE = "tokens.json"
_EPOCH_FILE = re.compile(r"^epoch_(\d{6})\.parquet$")
_META_FILE = re.compile(r"^([^.].*)\.json$")
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # used with fullmatch
_TMP = ".tmp-"  # in the names of files being written: ".<name>.tmp-<uuid>"
_ATOMIC_PUT = {"s3", "gcs", "abfs"}  # filesystems whose uploads become visible only on close

_TEMPERATURES = b"posthoc_tune.temperatures"
_GRID = b"posthoc_tune.token_grid"
# Errors of a stored file that exists but does not read as this format (truncated, corrupt,
# foreign, or a failing disk or connection).
_READ_ERRORS = (pa.ArrowException, OSError, ValueError, KeyError)

Dtype = Literal["float32", "float16"]
PartKey = tuple[str, str]  # (split, variant)
Kind = Literal["logits", "tokens"]
_COLUMN: dict[Kind, str] = {"logits": "logits", "tokens": "record"}  # a kind's values column
_WHAT: dict[Kind, str] = {"logits": "epoch", "tokens": "token records of epoch"}


class VariantParts(NamedTuple):
    """One variant's stored logits for an epoch, by split, with its val-fitted temperature
    (None when the writer recorded none)."""

    logits: dict[str, np.ndarray]
    temperature: float | None


class StoreError(OSError):
    """The store cannot be reached or holds something other than this format expects."""


class PredictionStore:
    """Read and write an experiment's stored predictions.

    Use :meth:`open` with an experiment path or URI; the store lives in its ``posthoc/``
    folder. ``dtype`` sets how new logits are written (``float16`` halves the disk footprint;
    values beyond +-65504 become inf). Reads always return float32.
    """

    def __init__(
        self, filesystem: pafs.FileSystem, experiment_path: str, *, dtype: Dtype = "float32"
    ) -> None:
        if dtype not in ("float32", "float16"):
            raise ValueError(f"unknown store dtype {dtype!r}; expected 'float32' or 'float16'")
        self.filesystem = filesystem
        self.experiment_path = experiment_path.rstrip("/")
        self.root = posixpath.join(self.experiment_path, STORE_DIR)
        self.dtype: Dtype = dtype
        self._labels: dict[str, np.ndarray] = {}
        self._n_classes: int | None = None  # the store's class count, once read or written
        self._atomic_put = _base_type_name(filesystem) in _ATOMIC_PUT
        self.is_local = _base_type_name(filesystem) == "local"

    @classmethod
    def open(
        cls,
        experiment: str | os.PathLike[str],
        *,
        filesystem: pafs.FileSystem | None = None,
        dtype: Dtype = "float32",
        must_exist: bool = False,
    ) -> PredictionStore:
        """Open an experiment's store, given a local path, a URI, or a path on ``filesystem``.

        ``experiment`` is the experiment folder (Tune's ``storage_path/name``) or its
        ``posthoc/`` folder. Writers may open a path that does not exist yet (the first write
        creates it); readers pass ``must_exist=True``, so that a wrong path raises a
        :class:`StoreError` naming it instead of reading as an empty store. Raises
        :class:`StoreError` naming the location when it cannot be reached.
        """
        path = os.fspath(experiment)
        try:
            if filesystem is None:
                if "://" not in path:
                    path = os.path.abspath(os.path.expanduser(path))
                filesystem, path = pafs.FileSystem.from_uri(path)
            path = path.rstrip("/")
            filesystem.get_file_info(path)
            if posixpath.basename(path) == STORE_DIR and not _exists(
                filesystem, posixpath.join(path, STORE_DIR)
            ):
                path = posixpath.dirname(path)  # the store folder itself, not an experiment
        except Exception as err:
            raise StoreError(f"cannot reach the prediction store at {experiment!r}: {err}") from err
        store = cls(filesystem, path, dtype=dtype)
        if must_exist:
            store._check_exists()
        return store

    def _check_exists(self) -> None:
        """Tell a wrong path (missing, or a folder without a store) from an empty store."""
        if self._exists(self.root):
            return
        if not self._exists(self.experiment_path):
            raise StoreError(f"no experiment at {self.experiment_path!r}: the path does not exist")
        raise StoreError(
            f"{self.experiment_path!r} holds no prediction store (no {STORE_DIR}/ folder): "
            "expected the folder of an experiment (Tune's storage_path/name) whose trials "
            "reported through PostHocReporter"
        )

    # -- labels -----------------------------------------------------------------------------

    def write_labels(self, split: str, labels: ArrayLike) -> None:
        """Store a split's labels; re-writing identical labels is a no-op, different ones an error.

        Every trial of an experiment must share the val and test rows: ensembles and tables
        compare trials row by row.
        """
        check_name("split", split, SPLITS)
        y = integer_tensor(labels, f"{split} labels").numpy().astype(np.int64, copy=False)
        if y.ndim != 1 or y.size == 0:
            raise ValueError(f"{split} labels must be a non-empty 1-D array, got shape {y.shape}")
        if y.min() < 0:
            raise ValueError(f"{split} labels must be >= 0, got {int(y.min())}")
        existing = self._read_labels(split)
        if existing is not None:
            if not np.array_equal(existing, y):
                raise ValueError(
                    f"{split} labels differ from those already stored in {self.root!r} "
                    f"({y.size} vs {existing.size} rows): all trials must share the {split} rows "
                    f"in the same order"
                )
            return
        table = pa.table({"row": pa.array(np.arange(y.size, dtype=np.int32)), "label": y})
        self._write_parquet(self._labels_path(split), table)
        self._labels[split] = y

    def labels(self, split: str) -> np.ndarray:
        """A split's labels as an int64 array."""
        check_name("split", split, SPLITS)
        y = self._read_labels(split)
        if y is None:
            raise KeyError(f"no {split} labels in the store at {self.root!r}")
        return y

    def _read_labels(self, split: str) -> np.ndarray | None:
        if split not in self._labels:
            path = self._labels_path(split)
            if not self._exists(path):
                return None
            try:
                table = pq.read_table(path, filesystem=self.filesystem)
                self._labels[split] = table.column("label").to_numpy().astype(np.int64)
            except _READ_ERRORS as err:
                raise _unreadable(f"the {split} labels", path, err) from err
        return self._labels[split]

    # -- metadata ---------------------------------------------------------------------------

    def write_metadata(
        self, trial_id: str, config: Mapping[str, Any], seed_key: str = "seed"
    ) -> None:
        """Store a trial's config, group key, ``seed_key`` (a name or "a/b" path, as given) and
        the seed at it (``None`` when the config has no seed)."""
        _check_id(trial_id)
        meta = {
            "format_version": FORMAT_VERSION,
            "trial_id": trial_id,
            "group": group_key(config, seed_key),
            "seed_key": seed_key,
            "seed": jsonable(get_path(config, seed_key)),
            "config": jsonable(dict(config)),
        }
        data = json.dumps(meta, sort_keys=True, indent=1).encode()
        self._publish(self._meta_path(trial_id), _write_bytes(data))

    def metadata(self, trial_id: str) -> dict[str, Any]:
        """A trial's metadata: trial_id, group, seed_key, seed, config, format_version."""
        _check_id(trial_id)
        path = self._meta_path(trial_id)
        try:
            with self.filesystem.open_input_stream(path) as f:
                return dict(json.loads(f.read()))
        except FileNotFoundError:
            raise KeyError(f"no metadata for trial {trial_id!r} in {self.root!r}") from None
        except (OSError, ValueError, TypeError) as err:
            raise _unreadable(f"the metadata of trial {trial_id!r}", path, err) from err

    # -- the epochs Tune processed -----------------------------------------------------------

    def write_processed_epoch(self, trial_id: str, epoch: int) -> None:
        """Record the epoch of the last result Tune processed from a trial that stopped
        (PostHocCallback, on the driver). Epochs stored after it were trained, but their
        results never reached Tune, so no ResultGrid shows them: they stay in the store, and
        selection leaves them out (:func:`posthoc_tune.curves.processed_epochs`)."""
        _check_id(trial_id)
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        data = json.dumps({"epoch": int(epoch)}).encode()
        self._publish(self._processed_path(trial_id), _write_bytes(data))

    def processed_epoch(self, trial_id: str) -> int | None:
        """The epoch :meth:`write_processed_epoch` recorded, None when none is (the trial
        runs, or ran without PostHocCallback)."""
        _check_id(trial_id)
        path = self._processed_path(trial_id)
        try:
            with self.filesystem.open_input_stream(path) as f:
                return int(json.loads(f.read())["epoch"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise _unreadable(f"the processed epoch of trial {trial_id!r}", path, err) from err

    def clear_processed_epoch(self, trial_id: str) -> None:
        """Forget the record: the reporter calls this when a trial (re)starts, as it may now
        store, and Tune process, epochs past it."""
        _check_id(trial_id)
        with contextlib.suppress(FileNotFoundError):
            self.filesystem.delete_file(self._processed_path(trial_id))

    # -- logits -----------------------------------------------------------------------------

    def write_epoch(
        self,
        trial_id: str,
        epoch: int,
        logits: Mapping[PartKey, ArrayLike],
        temperatures: Mapping[str, float] | None = None,
    ) -> None:
        """Write all of one epoch's logits as one file, replacing any earlier file for the epoch.

        ``logits`` maps ``(split, variant)`` to an (N, C) array; N must match the split's
        stored labels when they exist, and C the store's class count (recorded by the first
        epoch written to the store: ensembles combine trials class by class). ``temperatures``
        maps a variant to the temperature fit on its val logits this epoch; stored in the
        file's metadata so ensembles on the driver need not refit each member.
        """
        _check_id(trial_id)
        _check_epoch(epoch)
        if not logits:
            raise ValueError(f"nothing to write for trial {trial_id!r} epoch {epoch}")
        parts = {}
        n_classes = None
        for (split, variant), value in logits.items():
            check_name("split", split, SPLITS)
            check_name("variant", variant, VARIANTS)
            arr = to_numpy(value, np.float32)
            if arr.ndim != 2 or arr.shape[0] == 0:
                raise ValueError(
                    f"{split}/{variant} logits must have shape (n_rows, n_classes) with rows, "
                    f"got {arr.shape}"
                )
            if n_classes is not None and arr.shape[1] != n_classes:
                raise ValueError(
                    f"{split}/{variant} logits have {arr.shape[1]} classes, other parts of the "
                    f"same epoch have {n_classes}"
                )
            n_classes = arr.shape[1]
            y = self._read_labels(split)
            if y is not None and (y.size != arr.shape[0] or y.max() >= n_classes):
                raise ValueError(
                    f"{split}/{variant} logits of shape {arr.shape} do not fit the stored "
                    f"{split} labels ({y.size} rows, classes up to {int(y.max())})"
                )
            parts[(split, variant)] = arr
        metadata = {}
        if temperatures:
            metadata[_TEMPERATURES] = json.dumps(_checked_temperatures(temperatures))
        assert n_classes is not None  # logits is not empty
        self._check_classes(trial_id, epoch, n_classes)
        self._write_parquet(
            self._epoch_path(trial_id, epoch),
            self._epoch_table(trial_id, epoch, parts),
            metadata,
        )

    def write(self, trial_id: str, epoch: int, split: str, variant: str, logits: ArrayLike) -> None:
        """Write one (split, variant) part of an epoch, keeping the epoch's other parts.

        The epoch file is rewritten whole (read, merge, publish) to keep one atomic file per
        epoch; prefer :meth:`write_epoch` when all parts are at hand.
        """
        merged: dict[PartKey, ArrayLike] = {}
        temperatures: dict[str, float] = {}
        with contextlib.suppress(KeyError):  # no file yet for this epoch
            merged.update(self.read_epoch(trial_id, epoch))
            temperatures = self.temperatures(trial_id, epoch)
        merged[(split, variant)] = logits
        temperatures.pop(variant, None)  # new logits: the old temperature no longer applies
        self.write_epoch(trial_id, epoch, merged, temperatures)

    def temperatures(self, trial_id: str, epoch: int) -> dict[str, float]:
        """The val-fitted temperatures recorded with an epoch, by variant (may be empty)."""
        _check_id(trial_id)
        _check_epoch(epoch)
        path = self._epoch_path(trial_id, epoch)
        try:
            schema = pq.read_schema(path, filesystem=self.filesystem)
            recorded = json.loads((schema.metadata or {}).get(_TEMPERATURES, b"{}"))
        except FileNotFoundError:
            raise KeyError(
                f"trial {trial_id!r} has no stored epoch {epoch} in {self.root!r}"
            ) from None
        except _READ_ERRORS as err:
            raise _unreadable(f"epoch {epoch} of trial {trial_id!r}", path, err) from err
        return {str(k): float(v) for k, v in recorded.items()}

    def read_epoch(self, trial_id: str, epoch: int) -> dict[PartKey, np.ndarray]:
        """All stored parts of one epoch as ``{(split, variant): float32 (N, C) array}``."""
        return self._read_parts(trial_id, epoch, lambda key: True)[0]

    def read_variant(
        self, trial_id: str, epoch: int, variant: str, splits: Iterable[str] = SPLITS
    ) -> VariantParts:
        """One variant's logits for the stored ``splits``, with its recorded temperature, in
        one read; ``KeyError`` if the epoch has none of them."""
        check_name("variant", variant, VARIANTS)
        wanted = {check_name("split", s, SPLITS) for s in splits}
        parts, metadata = self._read_parts(
            trial_id, epoch, lambda key: key[0] in wanted and key[1] == variant
        )
        if not parts:
            raise KeyError(f"trial {trial_id!r} epoch {epoch} has no {variant} logits")
        t = json.loads(metadata.get(_TEMPERATURES, b"{}")).get(variant)
        logits = {split: arr for (split, _), arr in parts.items()}
        return VariantParts(logits, None if t is None else float(t))

    def read_split(self, trial_id: str, epoch: int, split: str) -> dict[str, VariantParts]:
        """Every variant's logits of one split of an epoch, with their recorded temperatures,
        in one read (e.g. the val parts of the base and SWA model)."""
        check_name("split", split, SPLITS)
        parts, metadata = self._read_parts(trial_id, epoch, lambda key: key[0] == split)
        recorded = json.loads(metadata.get(_TEMPERATURES, b"{}"))
        return {
            variant: VariantParts(
                {split: z}, None if variant not in recorded else float(recorded[variant])
            )
            for (_, variant), z in parts.items()
        }

    def read(self, trial_id: str, epoch: int, split: str, variant: str) -> np.ndarray:
        """One part's logits as a float32 (N, C) array; ``KeyError`` if absent."""
        check_name("split", split, SPLITS)
        check_name("variant", variant, VARIANTS)
        parts, _ = self._read_parts(trial_id, epoch, lambda key: key == (split, variant))
        if not parts:
            raise KeyError(f"trial {trial_id!r} epoch {epoch} has no {split}/{variant} logits")
        return parts[(split, variant)]

    # -- token records ----------------------------------------------------------------------

    def write_tokens(
        self,
        trial_id: str,
        epoch: int,
        records: Mapping[PartKey, ArrayLike],
        temperatures: Mapping[str, float] | None = None,
        *,
        vocab_size: int,
    ) -> None:
        """Write one epoch's token records (:mod:`posthoc_tune.tokens`) as one file.

        ``records`` maps ``(split, variant)`` to an ``(n_tokens, RECORD_WIDTH)`` array;
        ``temperatures`` the variants' token-level temperatures. Records are always float32
        (float16 would move the NLL by ~1e-2). Every trial of the experiment must score the
        same number of tokens per split with the same ``vocab_size`` (recorded by the first
        write, in ``tokens.json``): their metrics are compared.
        """
        _check_id(trial_id)
        _check_epoch(epoch)
        if not records:
            raise ValueError(f"no token records to write for trial {trial_id!r} epoch {epoch}")
        parts = {}
        for (split, variant), value in records.items():
            check_name("split", split, SPLITS)
            check_name("variant", variant, VARIANTS)
            parts[(split, variant)] = check_records(
                to_numpy(value), f"{split}/{variant} token records"
            )
        counts = {split: len(r) for (split, _), r in parts.items()}
        self._check_tokens(trial_id, epoch, vocab_size, counts)
        metadata = {_GRID: json.dumps(GRID.tolist())}
        if temperatures:
            metadata[_TEMPERATURES] = json.dumps(_checked_temperatures(temperatures))
        self._write_parquet(
            self._epoch_path(trial_id, epoch, "tokens"),
            self._epoch_table(trial_id, epoch, parts, "tokens"),
            metadata,
        )

    def read_tokens(
        self, trial_id: str, epoch: int, variant: str, splits: Iterable[str] = SPLITS
    ) -> TokenParts:
        """One variant's token records of ``splits`` with its token temperature; KeyError if
        the epoch has none."""
        check_name("variant", variant, VARIANTS)
        wanted = {check_name("split", s, SPLITS) for s in splits}
        parts, metadata = self._read_parts(
            trial_id, epoch, lambda key: key[0] in wanted and key[1] == variant, "tokens"
        )
        if not parts:
            raise KeyError(f"trial {trial_id!r} epoch {epoch} has no {variant} token records")
        grid = json.loads(metadata.get(_GRID, b"[]"))
        if not np.allclose(grid, GRID, rtol=0, atol=1e-12):
            path = self._epoch_path(trial_id, epoch, "tokens")
            raise StoreError(
                f"token records at {path!r} were computed on another grid of inverse "
                f"temperatures ({len(grid)} points) than this version's ({len(GRID)}): "
                f"re-evaluate them with this version"
            )
        t = json.loads(metadata.get(_TEMPERATURES, b"{}")).get(variant)
        records = {split: arr for (split, _), arr in parts.items()}
        return TokenParts(records, None if t is None else float(t))

    def token_epochs(self, trial_id: str) -> list[int]:
        """The epochs of a trial with stored token records, ascending."""
        return self._epochs(trial_id, "tokens")

    def trials(self) -> list[str]:
        """Ids of the trials with metadata or logits in the store, sorted (none when the store
        does not exist: see ``must_exist`` in :meth:`open`)."""
        with_logits = {
            i.base_name
            for i in self._list(posixpath.join(self.root, "logits"))
            if i.type == pafs.FileType.Directory
        }
        names = (i.base_name for i in self._list(posixpath.join(self.root, "meta")))
        with_meta = {m.group(1) for m in map(_META_FILE.match, names) if m}
        return sorted(with_logits | with_meta)

    def epochs(self, trial_id: str) -> list[int]:
        """The published epochs of a trial's logits, ascending (temporary files are never
        listed)."""
        return self._epochs(trial_id, "logits")

    def _epochs(self, trial_id: str, kind: Kind) -> list[int]:
        _check_id(trial_id)
        names = (i.base_name for i in self._list(self._dir(trial_id, kind)))
        return sorted(int(m.group(1)) for m in map(_EPOCH_FILE.match, names) if m)

    # -- retention --------------------------------------------------------------------------

    def delete_epochs(self, trial_id: str, epochs: Iterable[int]) -> None:
        """Delete some of a trial's epoch files (see :mod:`posthoc_tune.retention`)."""
        _check_id(trial_id)
        for epoch in epochs:
            _check_epoch(epoch)
            with contextlib.suppress(FileNotFoundError):
                self.filesystem.delete_file(self._epoch_path(trial_id, epoch))

    def delete_trial(self, trial_id: str) -> None:
        """Delete a trial's logits, token records, metadata and processed epoch: it leaves the
        experiment's tables."""
        _check_id(trial_id)
        for kind in _COLUMN:
            with contextlib.suppress(FileNotFoundError):
                self.filesystem.delete_dir(self._dir(trial_id, kind))
        for path in (self._meta_path(trial_id), self._processed_path(trial_id)):
            with contextlib.suppress(FileNotFoundError):
                self.filesystem.delete_file(path)

    def discard_partial_writes(self, trial_id: str) -> list[str]:
        """Delete the temporary files a killed writer of ``trial_id`` left; return their paths.

        A file store publishes by renaming a finished temporary file (readers never list
        those), so a worker killed mid-write leaves one behind; object stores upload whole
        files and leave none. The reporter calls this when a trial (re)starts: no other
        writer uses a trial's names, and its earlier attempt is dead by then.
        """
        _check_id(trial_id)
        if self._atomic_put:
            return []
        stale = [
            info.path
            for kind in _COLUMN
            for info in self._list(self._dir(trial_id, kind))
            if info.base_name.startswith(".epoch_") and _TMP in info.base_name
        ]
        meta_prefix = f".{posixpath.basename(self._meta_path(trial_id))}{_TMP}"
        stale += [
            info.path
            for info in self._list(posixpath.dirname(self._meta_path(trial_id)))
            if info.base_name.startswith(meta_prefix)
        ]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                self.filesystem.delete_file(path)
        return stale

    # -- driver-side ensemble values --------------------------------------------------------

    def write_ensemble_values(self, group: str, epoch: int, name: str, table: pa.Table) -> None:
        """Publish one evaluation's ensemble values (see :mod:`posthoc_tune.ensemble`) as
        ``ensembles/<group>/epoch_NNNNNN.<name>.parquet``, replacing an earlier one."""
        _check_id(group)
        _check_epoch(epoch)
        _check_id(name)
        path = posixpath.join(self.root, "ensembles", group, f"epoch_{epoch:06d}.{name}.parquet")
        self._write_parquet(path, table)

    def ensemble_values(self) -> pa.Table | None:
        """Every published ensemble-values file as one table, or None when there is none."""
        directory = posixpath.join(self.root, "ensembles")
        files = [
            i.path
            for i in self.filesystem.get_file_info(
                pafs.FileSelector(directory, recursive=True, allow_not_found=True)
            )
            if i.type == pafs.FileType.File
            and i.base_name.endswith(".parquet")
            and not i.base_name.startswith(".")
        ]
        if not files:
            return None
        tables = []
        for path in sorted(files):
            try:
                tables.append(pq.read_table(path, filesystem=self.filesystem))
            except _READ_ERRORS as err:
                raise _unreadable("ensemble values", path, err) from err
        return pa.concat_tables(tables).replace_schema_metadata(None)

    # -- scored curves of a compacted configuration -----------------------------------------

    def write_scores(self, group: str, table: pa.Table) -> None:
        """Publish a configuration's scored curves as ``scores/<group>.parquet`` (written by
        :func:`posthoc_tune.retention.compact` before it deletes logits, so that tables and
        plots keep every epoch's values)."""
        _check_id(group)
        self._write_parquet(self._scores_path(group), table, dict(table.schema.metadata or {}))

    def scores(self, group: str) -> pa.Table | None:
        """A configuration's scored curves (with the file's schema metadata), or None when
        it was never compacted."""
        _check_id(group)
        path = self._scores_path(group)
        try:
            return pq.read_table(path, filesystem=self.filesystem)
        except FileNotFoundError:
            return None
        except _READ_ERRORS as err:
            raise _unreadable(f"the scored curves of configuration {group!r}", path, err) from err

    # -- internals --------------------------------------------------------------------------

    def _scores_path(self, group: str) -> str:
        return posixpath.join(self.root, "scores", f"{group}.parquet")

    def _dir(self, trial_id: str, kind: Kind = "logits") -> str:
        return posixpath.join(self.root, kind, trial_id)

    def _epoch_path(self, trial_id: str, epoch: int, kind: Kind = "logits") -> str:
        return posixpath.join(self._dir(trial_id, kind), f"epoch_{epoch:06d}.parquet")

    def _meta_path(self, trial_id: str) -> str:
        return posixpath.join(self.root, "meta", f"{trial_id}.json")

    def _processed_path(self, trial_id: str) -> str:
        return posixpath.join(self.root, "processed", f"{trial_id}.json")

    def _labels_path(self, split: str) -> str:
        return posixpath.join(self.root, "labels", f"{split}.parquet")

    def _check_classes(self, trial_id: str, epoch: int, n_classes: int) -> None:
        """Refuse logits whose class count differs from the store's, recording it on the
        store's first write; read once per instance, so later writes cost nothing."""
        path = posixpath.join(self.root, _CLASSES_FILE)
        if self._n_classes is None:
            try:
                with self.filesystem.open_input_stream(path) as f:
                    self._n_classes = int(json.loads(f.read())["n_classes"])
            except FileNotFoundError:
                data = json.dumps({"n_classes": n_classes}).encode()
                self._publish(path, _write_bytes(data))
                self._n_classes = n_classes
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise _unreadable("the class count", path, err) from err
        if n_classes != self._n_classes:
            raise ValueError(
                f"trial {trial_id!r} epoch {epoch}: logits with {n_classes} classes, but the "
                f"store records {self._n_classes} ({path!r}, from its first epoch written): "
                "all trials of an experiment must predict the same classes"
            )

    def _check_tokens(
        self, trial_id: str, epoch: int, vocab_size: int, counts: Mapping[str, int]
    ) -> None:
        """Refuse token records whose vocabulary or token counts differ from the store's,
        recording them on the first write (later splits are added when first written)."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
        path = posixpath.join(self.root, _TOKENS_FILE)
        try:
            with self.filesystem.open_input_stream(path) as f:
                recorded = json.loads(f.read())
        except FileNotFoundError:
            recorded = {"vocab_size": vocab_size, "n_tokens": {}}
        except (OSError, ValueError, TypeError) as err:
            raise _unreadable("the token counts", path, err) from err
        where = f"trial {trial_id!r} epoch {epoch}"
        if recorded["vocab_size"] != vocab_size:
            raise ValueError(
                f"{where}: token records of a {vocab_size}-token vocabulary, but the store "
                f"records {recorded['vocab_size']} ({path!r}): all trials must share the "
                f"vocabulary"
            )
        for split, n in counts.items():
            stored = recorded["n_tokens"].get(split)
            if stored is not None and stored != n:
                raise ValueError(
                    f"{where}: {n} scored {split} tokens, but the store records {stored} "
                    f"({path!r}): all trials must score the same {split} tokens"
                )
        if any(split not in recorded["n_tokens"] for split in counts):
            recorded["n_tokens"] = {**counts, **recorded["n_tokens"]}
            self._publish(path, _write_bytes(json.dumps(recorded).encode()))

    def _exists(self, path: str) -> bool:
        return _exists(self.filesystem, path)

    def _list(self, directory: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(directory, allow_not_found=True)
        return list(self.filesystem.get_file_info(selector))

    def _epoch_table(
        self,
        trial_id: str,
        epoch: int,
        parts: Mapping[PartKey, np.ndarray],
        kind: Kind = "logits",
    ) -> list[pa.Table]:
        half = self.dtype == "float16" and kind == "logits"  # records stay float32
        value_type = pa.float16() if half else pa.float32()
        np_type = np.float16 if half else np.float32
        tables = []
        for (split, variant), arr in sorted(parts.items(), key=_part_order):
            n, c = arr.shape
            flat = pa.array(arr.astype(np_type, copy=False).ravel(), type=value_type)
            tables.append(
                pa.table(
                    {
                        "trial_id": _constant_string(trial_id, n),
                        "epoch": pa.array(np.full(n, epoch, dtype=np.int32)),
                        "split": _constant_string(split, n),
                        "variant": _constant_string(variant, n),
                        "row": pa.array(np.arange(n, dtype=np.int32)),
                        _COLUMN[kind]: pa.FixedSizeListArray.from_arrays(
                            flat, type=_logits_type(value_type, c)
                        ),
                    }
                )
            )
        return tables

    def _write_parquet(
        self,
        path: str,
        tables: pa.Table | list[pa.Table],
        metadata: Mapping[bytes, str | bytes] | None = None,
    ) -> None:
        """Write tables (one row group each) with LZ4, published atomically."""
        tables = tables if isinstance(tables, list) else [tables]
        schema = tables[0].schema.with_metadata(
            {b"posthoc_tune.format_version": str(FORMAT_VERSION), **(metadata or {})}
        )

        # Logits are PLAIN-encoded: dictionary encoding only bloats float logits, and
        # BYTE_STREAM_SPLIT (column "logits.list.element") makes float32 files ~8% smaller but
        # reads up to ~20% slower; the driver reads on its hot path. LZ4 rather than zstd:
        # files ~9% larger, writes and reads several times faster (benchmarks/RESULTS.md).
        dictionary = [f.name for f in schema if pa.types.is_dictionary(f.type)]

        def write(sink: Any) -> None:
            with pq.ParquetWriter(
                sink, schema, compression="lz4", use_dictionary=dictionary
            ) as writer:
                for t in tables:
                    writer.write_table(t.cast(schema))

        self._publish(path, write)

    def _publish(self, path: str, write: Callable[[Any], None]) -> None:
        parent = posixpath.dirname(path)
        self.filesystem.create_dir(parent, recursive=True)
        if self._atomic_put:
            # An object is published when its stream closes, and a stream closes (it cannot
            # abort) even when the write fails: ParquetWriter's exit would then finish a
            # valid file holding only the parts written so far. Build the file in memory,
            # so a failed write uploads nothing.
            buffer = pa.BufferOutputStream()
            write(buffer)
            with self.filesystem.open_output_stream(path) as sink:
                sink.write(buffer.getvalue())
            return
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}{_TMP}{uuid.uuid4().hex}")
        try:
            with self.filesystem.open_output_stream(tmp) as sink:
                write(sink)
            self.filesystem.move(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                self.filesystem.delete_file(tmp)
            raise

    def _read_parts(
        self,
        trial_id: str,
        epoch: int,
        wanted: Callable[[PartKey], bool],
        kind: Kind = "logits",
    ) -> tuple[dict[PartKey, np.ndarray], dict[bytes, bytes]]:
        """The wanted parts of an epoch file and its metadata.

        Each part is one row group whose statistics name its split and variant, so only the
        wanted row groups are decoded (a row-level filter decodes all of them). Row groups
        without such statistics are decoded and split by value.
        """
        _check_id(trial_id)
        _check_epoch(epoch)
        path = self._epoch_path(trial_id, epoch, kind)
        column = _COLUMN[kind]
        try:
            with self.filesystem.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                chunks: dict[PartKey, list[pa.ChunkedArray]] = {}
                for i in range(pf.metadata.num_row_groups):
                    key = _row_group_part(pf.metadata.row_group(i))
                    if key is None:
                        table = pf.read_row_group(i, columns=["split", "variant", column])
                        for k in _parts_in(table):
                            if wanted(k):
                                mask = pc.and_(
                                    pc.equal(table["split"], k[0]), pc.equal(table["variant"], k[1])
                                )
                                chunks.setdefault(k, []).append(table.filter(mask)[column])
                    elif wanted(key):
                        chunks.setdefault(key, []).append(
                            pf.read_row_group(i, columns=[column])[column]
                        )
                metadata = dict(pf.schema_arrow.metadata or {})
        except FileNotFoundError:
            raise KeyError(
                f"trial {trial_id!r} has no stored {_WHAT[kind]} {epoch} in {self.root!r}"
            ) from None
        except _READ_ERRORS as err:
            raise _unreadable(f"epoch {epoch} of trial {trial_id!r}", path, err) from err
        parts = {
            k: _logits_to_numpy(pa.chunked_array([a for c in cs for a in c.chunks]))
            for k, cs in chunks.items()
        }
        return parts, metadata


def _checked_temperatures(temperatures: Mapping[str, float]) -> dict[str, float]:
    for variant, t in temperatures.items():
        check_name("variant", variant, VARIANTS)
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"temperature of {variant!r} must be finite and > 0, got {t!r}")
    return {v: float(t) for v, t in temperatures.items()}


def _row_group_part(row_group: pq.RowGroupMetaData) -> PartKey | None:
    """(split, variant) of a row group holding exactly one part, from its statistics."""
    found = {}
    for j in range(row_group.num_columns):
        column = row_group.column(j)
        if column.path_in_schema in ("split", "variant"):
            stats = column.statistics
            if stats is None or not stats.has_min_max or stats.min != stats.max:
                return None
            found[column.path_in_schema] = str(stats.min)
    if len(found) != 2:
        return None
    return found["split"], found["variant"]


def _parts_in(table: pa.Table) -> set[PartKey]:
    pairs = zip(table["split"].to_pylist(), table["variant"].to_pylist(), strict=True)
    return set(pairs)


def _logits_type(value_type: pa.DataType, n_classes: int) -> pa.DataType:
    """Non-null elements: NaN logits are values, and Parquet decodes non-null lists ~25%
    faster (no definition levels per element)."""
    return pa.list_(pa.field("element", value_type, nullable=False), n_classes)


def _constant_string(value: str, n: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(np.zeros(n, dtype=np.int32), pa.array([value]))


def _write_bytes(data: bytes) -> Callable[[Any], None]:
    return lambda sink: sink.write(data)


def _part_order(item: tuple[PartKey, np.ndarray]) -> tuple[int, int]:
    (split, variant), _ = item
    return SPLITS.index(split), VARIANTS.index(variant)


def _logits_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    width = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def _unreadable(what: str, path: str, err: BaseException) -> StoreError:
    """A one-line error (the CLI prints it as is) naming a stored file that does not read."""
    detail = " ".join(str(err).split()) or type(err).__name__
    return StoreError(f"cannot read {what} from {path!r}: {detail}")


def _base_type_name(fs: pafs.FileSystem) -> str:
    while isinstance(fs, pafs.SubTreeFileSystem):
        fs = fs.base_fs
    return str(fs.type_name)


def _check_id(trial_id: object) -> None:
    """Trial ids become path components: allow only names that cannot escape the store."""
    if not isinstance(trial_id, str) or not _SAFE_ID.fullmatch(trial_id) or ".." in trial_id:
        raise ValueError(
            f"invalid trial id {trial_id!r}: expected 1-128 characters from [A-Za-z0-9_.-] "
            f"starting with a letter or digit, without '..'"
        )


def _check_epoch(epoch: object) -> None:
    is_int = isinstance(epoch, (int, np.integer)) and not isinstance(epoch, bool)
    if not is_int or not 1 <= epoch < 10**6:  # type: ignore[operator]
        raise ValueError(
            f"epoch must be an int in [1, 999999] (epochs count from 1), got {epoch!r}"
        )


__all__ = ["FORMAT_VERSION", "PredictionStore", "StoreError"]
