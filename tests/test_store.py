import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from posthoc_tune import PredictionStore, StoreError, group_key
from posthoc_tune.curves import processed_epochs
from posthoc_tune.store import Dtype
from tests import reference as ref

N_VAL, N_TEST, C = 50, 40, 7


def _epoch(rng: np.random.Generator) -> dict[tuple[str, str], np.ndarray]:
    return {
        (split, variant): rng.normal(scale=5.0, size=(n, C)).astype(np.float32)
        for split, n in (("val", N_VAL), ("test", N_TEST))
        for variant in ("base", "swa")
    }


@pytest.fixture
def store(tmp_path: Path) -> PredictionStore:
    s = PredictionStore.open(tmp_path / "exp")
    rng = np.random.default_rng(0)
    s.write_labels("val", rng.integers(0, C, N_VAL))
    s.write_labels("test", rng.integers(0, C, N_TEST))
    return s


def test_float32_round_trip_is_exact(store: PredictionStore) -> None:
    parts = _epoch(np.random.default_rng(1))
    parts[("val", "base")][0, :3] = [np.nan, 3.4e38, -1e-45]  # NaN, near-max, subnormal
    store.write_epoch("trial_a", 1, parts)
    for (split, variant), logits in parts.items():
        got = store.read("trial_a", 1, split, variant)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, logits)
    assert store.read_epoch("trial_a", 1).keys() == parts.keys()
    assert store.trials() == ["trial_a"] and store.epochs("trial_a") == [1]


def test_float16_option_halves_precision_and_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    parts = {("val", "base"): rng.normal(size=(2000, 10)).astype(np.float32)}
    sizes = {}
    dtypes: tuple[Dtype, ...] = ("float32", "float16")
    for dtype in dtypes:
        s = PredictionStore.open(tmp_path / dtype, dtype=dtype)
        s.write_epoch("t", 1, parts)
        got = s.read("t", 1, "val", "base")
        assert got.dtype == np.float32
        np.testing.assert_allclose(
            got, parts[("val", "base")], rtol=1e-3 if dtype == "float16" else 0
        )
        sizes[dtype] = (tmp_path / dtype / "posthoc/logits/t/epoch_000001.parquet").stat().st_size
    assert sizes["float16"] < 0.6 * sizes["float32"]


def test_single_part_writes_merge_into_one_epoch_file(store: PredictionStore) -> None:
    parts = _epoch(np.random.default_rng(3))
    for (split, variant), logits in parts.items():
        store.write("t", 2, split, variant, logits)
    assert store.epochs("t") == [2]
    for key, logits in parts.items():
        np.testing.assert_array_equal(store.read("t", 2, *key), logits)


def test_temperatures_travel_with_the_epoch_and_a_rewritten_part_drops_its_own(
    store: PredictionStore,
) -> None:
    parts = _epoch(np.random.default_rng(6))
    store.write_epoch("t", 1, parts, {"base": 1.5, "swa": 0.25})
    got = store.read_variant("t", 1, "swa")
    assert got.temperature == 0.25 and got.logits.keys() == {"val", "test"}
    for split, logits in got.logits.items():
        np.testing.assert_array_equal(logits, parts[(split, "swa")])
    assert store.temperatures("t", 1) == {"base": 1.5, "swa": 0.25}
    store.write("t", 1, "val", "base", parts[("val", "base")] + 1)
    assert store.temperatures("t", 1) == {"swa": 0.25}
    assert store.read_variant("t", 1, "base").temperature is None
    store.write_epoch("t", 2, {("val", "base"): parts[("val", "base")]})
    assert store.temperatures("t", 2) == {}
    with pytest.raises(KeyError, match="epoch 2 has no swa logits"):
        store.read_variant("t", 2, "swa")
    with pytest.raises(ValueError, match=r"temperature of 'base' must be finite and > 0, got nan"):
        store.write_epoch("t", 3, parts, {"base": float("nan")})
    with pytest.raises(ValueError, match="unknown variant 'ens'"):
        store.write_epoch("t", 3, parts, {"ens": 1.0})


def test_rewriting_an_epoch_replaces_it_without_duplicates(store: PredictionStore) -> None:
    first, second = _epoch(np.random.default_rng(4)), _epoch(np.random.default_rng(5))
    store.write_epoch("t", 1, first)
    store.write_epoch("t", 1, second)  # a retried trial re-runs epoch 1
    store.write_epoch("t", 1, second)
    assert [p.name for p in Path(store.root, "logits", "t").iterdir()] == ["epoch_000001.parquet"]
    np.testing.assert_array_equal(store.read("t", 1, "test", "swa"), second[("test", "swa")])


KILL_MID_WRITE = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import pyarrow.parquet as pq
    from posthoc_tune import store as store_module

    class DiesMidWrite(pq.ParquetWriter):
        def write_table(self, table, *args, **kwargs):
            super().write_table(table, *args, **kwargs)
            os._exit(9)  # like SIGKILL: no cleanup, no exception handlers

    store_module.pq.ParquetWriter = DiesMidWrite
    s = store_module.PredictionStore.open(sys.argv[1])
    rng = np.random.default_rng(0)
    s.write_epoch("t", int(sys.argv[2]), {
        ("val", "base"): rng.normal(size=(50, 7)).astype(np.float32),
        ("val", "swa"): rng.normal(size=(50, 7)).astype(np.float32),
    })
    """
)


def test_a_writer_killed_mid_write_leaves_no_readable_partial_file(store: PredictionStore) -> None:
    good = _epoch(np.random.default_rng(6))
    store.write_epoch("t", 1, good)
    for epoch in (1, 2):  # overwrite an existing epoch, and write a new one
        proc = subprocess.run(
            [sys.executable, "-c", KILL_MID_WRITE, store.experiment_path, str(epoch)],
            capture_output=True,
        )
        assert proc.returncode == 9, proc.stderr.decode()
    leftovers = [p.name for p in Path(store.root, "logits", "t").iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 2  # the partial files exist on disk ...
    assert store.epochs("t") == [1]  # ... but are never listed,
    np.testing.assert_array_equal(store.read("t", 1, "val", "base"), good[("val", "base")])
    with pytest.raises(KeyError, match="no stored epoch 2"):
        store.read("t", 2, "val", "base")
    # and the dataset glob from docs/store.md does not pick them up.
    dataset = ds.dataset(
        str(Path(store.root, "logits")), format="parquet", exclude_invalid_files=False
    )
    assert all(Path(f).name.startswith("epoch_") for f in dataset.files)


def test_plain_pyarrow_reads_the_store_as_documented(store: PredictionStore) -> None:
    """Follows docs/store.md without posthoc_tune: glob the epoch files, join the labels."""
    rng = np.random.default_rng(7)
    written = {(t, e): _epoch(rng) for t in ("a", "b") for e in (1, 2, 3)}
    for (trial, epoch), parts in written.items():
        store.write_epoch(trial, epoch, parts)
    store.write_metadata("a", {"lr": np.float64(0.1), "seed": 0, "__trial_index__": 3})

    root = Path(store.root)
    table = ds.dataset(str(root / "logits"), format="parquet").to_table()
    df = table.to_pandas()
    assert len(df) == 2 * 3 * 2 * (N_VAL + N_TEST)
    labels = pq.read_table(root / "labels" / "val.parquet").to_pandas()
    sel = df[(df.trial_id == "b") & (df.epoch == 3) & (df.split == "val") & (df.variant == "base")]
    sel = sel.merge(labels, on="row").sort_values("row")
    z = np.stack(sel.logits.to_numpy())
    expected = written[("b", 3)][("val", "base")]
    np.testing.assert_array_equal(z, expected)
    assert ref.nll(z, sel.label.to_numpy()) == pytest.approx(ref.nll(expected, store.labels("val")))
    meta = json.loads((root / "meta" / "a.json").read_text())
    assert meta["config"] == {"lr": 0.1, "seed": 0, "__trial_index__": 3}
    assert meta["seed"] == 0 and meta["group"] == group_key({"lr": 0.1, "seed": 5})
    assert store.metadata("a") == meta
    schema = pq.read_schema(root / "logits" / "a" / "epoch_000001.parquet")
    assert schema.metadata[b"posthoc_tune.format_version"] == b"1"
    assert str(schema.field("logits").type) == "fixed_size_list<element: float not null>[7]"


def test_the_files_hold_the_encoding_docs_store_md_states(store: PredictionStore) -> None:
    """PLAIN logits and LZ4 everywhere, as documented; a file that another writer encoded with
    BYTE_STREAM_SPLIT (the encoding is per file) reads the same."""
    parts = _epoch(np.random.default_rng(10))
    store.write_epoch("t", 1, parts)
    path = Path(store.root, "logits", "t", "epoch_000001.parquet")
    meta = pq.ParquetFile(path).metadata
    for i in range(meta.num_row_groups):
        columns = [meta.row_group(i).column(j) for j in range(meta.num_columns)]
        assert {c.compression for c in columns} == {"LZ4"}
        (logits,) = [c for c in columns if c.path_in_schema == "logits.list.element"]
        assert set(logits.encodings) == {"RLE", "PLAIN"}  # RLE: the list's levels
    doc = " ".join((Path(__file__).parents[1] / "docs" / "store.md").read_text().split())
    assert "the logits (leaf column `logits.list.element`) are PLAIN-encoded" in doc

    bss = {"logits.list.element": "BYTE_STREAM_SPLIT"}
    pq.write_table(pq.read_table(path), path, use_dictionary=False, column_encoding=bss)
    encodings = pq.ParquetFile(path).metadata.row_group(0).column(5).encodings
    assert "BYTE_STREAM_SPLIT" in encodings
    for key, logits in store.read_epoch("t", 1).items():
        np.testing.assert_array_equal(logits, parts[key])


def test_an_epoch_file_written_by_another_tool_reads_the_same(store: PredictionStore) -> None:
    """Parts in any row-group arrangement (here: one row group, rows interleaved) read back
    like the store's own one-part-per-row-group files."""
    parts = _epoch(np.random.default_rng(8))
    store.write_epoch("mine", 1, parts)
    own = pq.read_table(Path(store.root, "logits", "mine", "epoch_000001.parquet"))
    shuffled = own.take(np.random.default_rng(9).permutation(own.num_rows))
    foreign = Path(store.root, "logits", "foreign", "epoch_000001.parquet")
    foreign.parent.mkdir(parents=True)
    pq.write_table(shuffled.cast(own.schema), foreign, row_group_size=own.num_rows)
    assert pq.ParquetFile(foreign).metadata.num_row_groups == 1
    got = store.read_epoch("foreign", 1)
    assert got.keys() == parts.keys()
    for key, logits in parts.items():
        order = np.argsort(
            shuffled.filter(
                pc.and_(pc.equal(shuffled["split"], key[0]), pc.equal(shuffled["variant"], key[1]))
            )["row"].to_numpy()
        )
        np.testing.assert_array_equal(got[key][order], logits)
    np.testing.assert_array_equal(
        np.sort(store.read("foreign", 1, "val", "swa"), axis=0),
        np.sort(parts[("val", "swa")], axis=0),
    )


def test_the_processed_epoch_bounds_the_epochs_selection_reads(store: PredictionStore) -> None:
    rng = np.random.default_rng(2)
    for epoch in (1, 2, 3):
        store.write_epoch("trial_a", epoch, _epoch(rng))
    store.write_metadata("trial_a", {"seed": 0})
    assert store.processed_epoch("trial_a") is None
    assert processed_epochs(store, "trial_a") == [1, 2, 3]  # no record: every stored epoch
    store.write_processed_epoch("trial_a", 2)
    assert store.processed_epoch("trial_a") == 2
    assert json.loads((Path(store.root) / "processed" / "trial_a.json").read_text()) == {"epoch": 2}
    assert store.epochs("trial_a") == [1, 2, 3]  # kept ...
    assert processed_epochs(store, "trial_a") == [1, 2]  # ... and left out of selection
    store.write_processed_epoch("trial_a", 0)  # failed before its first result
    assert processed_epochs(store, "trial_a") == []
    store.clear_processed_epoch("trial_a")
    store.clear_processed_epoch("trial_a")  # nothing to clear: no error
    assert processed_epochs(store, "trial_a") == [1, 2, 3]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"epoch must be an int >= 0, got {bad}"):
            store.write_processed_epoch("trial_a", bad)  # type: ignore[arg-type]
    store.write_processed_epoch("trial_a", 3)
    store.delete_trial("trial_a")
    assert store.processed_epoch("trial_a") is None and store.trials() == []


def test_metadata_of_a_seed_at_a_path_round_trips(store: PredictionStore) -> None:
    config = {"train_loop_config": {"lr": 0.1, "seed": np.int64(2)}, "__trial_index__": 0}
    store.write_metadata("a", config, "train_loop_config/seed")
    store.write_metadata("b", {"train_loop_config": {"lr": 0.1}}, "train_loop_config/seed")
    meta = store.metadata("a")
    assert meta["seed_key"] == "train_loop_config/seed" and meta["seed"] == 2
    assert meta["config"] == {"train_loop_config": {"lr": 0.1, "seed": 2}, "__trial_index__": 0}
    canonical = json.dumps({"train_loop_config": {"lr": 0.1}}, sort_keys=True)
    assert meta["group"] == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    # A config without the seed (a trial run outside with_seeds) is stored with seed None.
    assert store.metadata("b")["seed"] is None and store.metadata("b")["group"] == meta["group"]


def test_works_through_a_subtree_filesystem(tmp_path: Path) -> None:
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    s = PredictionStore.open("bucket/exp", filesystem=fs)
    parts = _epoch(np.random.default_rng(8))
    s.write_labels("val", np.arange(N_VAL) % C)
    s.write_epoch("t", 1, parts)
    assert (tmp_path / "bucket/exp/posthoc/logits/t/epoch_000001.parquet").is_file()
    reopened = PredictionStore.open(tmp_path / "bucket" / "exp")
    np.testing.assert_array_equal(reopened.read("t", 1, "val", "swa"), parts[("val", "swa")])
    np.testing.assert_array_equal(reopened.labels("val"), np.arange(N_VAL) % C)


def test_labels_must_agree_across_trials(store: PredictionStore) -> None:
    same = store.labels("val").copy()
    store.write_labels("val", same)  # identical: no-op
    same[0] = (same[0] + 1) % C
    with pytest.raises(ValueError, match="val labels differ from those already stored"):
        store.write_labels("val", same)


def test_bad_writes_raise_clear_errors(store: PredictionStore) -> None:
    z = np.zeros((N_VAL, C), dtype=np.float32)
    with pytest.raises(ValueError, match=r"shape \(49, 7\) do not fit the stored val labels"):
        store.write_epoch("t", 1, {("val", "base"): z[:-1]})
    with pytest.raises(ValueError, match="5 classes, other parts of the same epoch have 7"):
        store.write_epoch("t", 1, {("val", "base"): z, ("val", "swa"): z[:, :5]})
    with pytest.raises(ValueError, match="unknown split 'train'"):
        store.write_epoch("t", 1, {("train", "base"): z})
    with pytest.raises(ValueError, match="unknown variant 'ema'"):
        store.write("t", 1, "val", "ema", z)
    with pytest.raises(ValueError, match="epochs count from 1"):
        store.write_epoch("t", 0, {("val", "base"): z})
    for bad_id in ("../escape", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(ValueError, match="invalid trial id"):
            store.write_epoch(bad_id, 1, {("val", "base"): z})
    assert not Path(store.experiment_path, "escape").exists()
    assert store.trials() == []  # nothing half-written


def test_reads_of_missing_things_raise_key_errors(store: PredictionStore) -> None:
    with pytest.raises(KeyError, match="no stored epoch 1"):
        store.read("ghost", 1, "val", "base")
    with pytest.raises(KeyError, match="no metadata for trial 'ghost'"):
        store.metadata("ghost")
    store.write_epoch("t", 1, {("val", "base"): np.zeros((N_VAL, C), np.float32)})
    with pytest.raises(KeyError, match="no val/swa logits"):
        store.read("t", 1, "val", "swa")
    assert store.epochs("ghost") == []
    store.write_metadata("configured_only", {"seed": 1})  # listed before its first epoch
    assert store.trials() == ["configured_only", "t"]


def test_unreachable_storage_names_the_location() -> None:
    with pytest.raises(
        StoreError, match="cannot reach the prediction store at 'nosuch://bucket/exp'"
    ):
        PredictionStore.open("nosuch://bucket/exp")
    with pytest.raises(ValueError, match="unknown store dtype 'float64'"):
        PredictionStore.open("/tmp", dtype="float64")  # type: ignore[arg-type]


def test_partial_writes_of_a_killed_attempt_are_discarded_for_that_trial_only(
    store: PredictionStore,
) -> None:
    parts = _epoch(np.random.default_rng(5))
    for trial in ("a", "ab"):
        store.write_metadata(trial, {"seed": 0})
        store.write_epoch(trial, 1, parts)
    root = Path(store.root)
    # What a writer killed between opening and renaming its temporary file leaves behind.
    leftovers = {
        trial: [
            root / "logits" / trial / ".epoch_000002.parquet.tmp-0f0f",
            root / "meta" / f".{trial}.json.tmp-0f0f",
        ]
        for trial in ("a", "ab")
    }
    for path in (p for paths in leftovers.values() for p in paths):
        path.write_bytes(b"PAR1 half an epoch")
    assert store.epochs("a") == [1]  # never listed

    removed = store.discard_partial_writes("a")
    assert sorted(map(Path, removed)) == sorted(leftovers["a"])
    assert not any(p.exists() for p in leftovers["a"])
    assert all(p.exists() for p in leftovers["ab"])  # another trial's names: untouched
    assert store.epochs("a") == [1] and store.metadata("a")["seed"] == 0
    assert store.discard_partial_writes("a") == []
