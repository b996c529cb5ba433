"""The prediction store end to end on S3: a real S3-compatible server (moto's server mode,
started here on 127.0.0.1) reached through pyarrow's ``S3FileSystem``, from the store alone and
from a real Ray Tune run whose ``storage_filesystem`` is that S3 filesystem."""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from ray import tune

import posthoc_tune as pht
from posthoc_tune import PostHocASHA, PostHocReporter, PredictionStore, StoreError
from posthoc_tune import store as store_module
from posthoc_tune.selection import open_store
from tests import reference as ref

moto_server = pytest.importorskip("moto.server", reason="moto[server] runs the S3 server")

BUCKET = "posthoc-test"
CREDENTIALS = {"access_key": "testing", "secret_key": "testing"}


@dataclass(frozen=True)
class S3:
    fs: pafs.S3FileSystem
    bucket: str
    endpoint: str


def _s3fs(endpoint: str, **options: Any) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        **CREDENTIALS,
        endpoint_override=endpoint,
        scheme="http",
        region="us-east-1",
        allow_bucket_creation=True,
        **options,
    )


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """A moto S3 server on a free port of 127.0.0.1 with one bucket.

    The filesystem object carries its credentials and endpoint, and Tune pickles it to the
    workers. The environment below only keeps this process (the driver) off real AWS
    credentials and the EC2 metadata service: Ray workers inherit the environment of
    ``ray.init``, which the session fixture may have called before this module starts.
    """
    werkzeug = logging.getLogger("werkzeug")  # one log line per request otherwise
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["access_key"])
        mp.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["secret_key"])
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"{host}:{port}"
            fs = _s3fs(endpoint)
            fs.create_dir(BUCKET)
            yield S3(fs, BUCKET, endpoint)
        finally:
            server.stop()
            werkzeug.setLevel(level)


# -- the store on S3 ----------------------------------------------------------------------------

N_VAL, N_TEST, C, EPOCHS_STORED = 60, 50, 4, 4
CONFIGS = {"weak": 0.5, "strong": 1.5}
SEEDS = 2


@dataclass
class Written:
    labels: dict[str, np.ndarray]
    configs: dict[str, dict[str, Any]]
    epochs: dict[tuple[str, int], dict[tuple[str, str], np.ndarray]]
    temperatures: dict[tuple[str, int], dict[str, float]]


def _synthetic() -> Written:
    """Known logits: base curves that go up and down, SWA curves that keep improving."""
    rng = np.random.default_rng(0)
    labels = {"val": rng.integers(0, C, N_VAL), "test": rng.integers(0, C, N_TEST)}
    configs, epochs, temperatures = {}, {}, {}
    for name, strength in CONFIGS.items():
        for seed in range(SEEDS):
            trial = f"{name}_{seed:05d}"
            configs[trial] = {"cfg": name, "lr": strength / 10, "seed": seed}
            for epoch in range(1, EPOCHS_STORED + 1):
                parts = {}
                for split, y in labels.items():
                    onehot = np.eye(C)[y]
                    drift = strength * np.sin(epoch + seed) + 0.8
                    parts[(split, "base")] = drift * onehot + rng.normal(size=onehot.shape)
                    swa = (strength + 0.2 * epoch) * onehot + 2 * rng.normal(size=onehot.shape)
                    parts[(split, "swa")] = swa
                epochs[(trial, epoch)] = {k: v.astype(np.float32) for k, v in parts.items()}
                temperatures[(trial, epoch)] = {"base": 1.0 + 0.1 * epoch, "swa": 0.9}
    return Written(labels, configs, epochs, temperatures)


def _fill(store: PredictionStore, data: Written) -> None:
    for split, y in data.labels.items():
        store.write_labels(split, y)
    for trial, config in data.configs.items():
        store.write_metadata(trial, config)
    for (trial, epoch), parts in data.epochs.items():
        store.write_epoch(trial, epoch, parts, data.temperatures[(trial, epoch)])


@pytest.fixture(scope="module")
def written() -> Written:
    return _synthetic()


@pytest.fixture(scope="module")
def s3_store(s3: S3, written: Written) -> PredictionStore:
    store = PredictionStore.open(f"{s3.bucket}/exp", filesystem=s3.fs)
    _fill(store, written)
    return store


def test_a_store_on_s3_reads_back_exactly_what_was_written(
    s3: S3, s3_store: PredictionStore, written: Written
) -> None:
    # A fresh store object on a fresh filesystem object: nothing comes from a cache.
    store = PredictionStore.open(f"{s3.bucket}/exp", filesystem=_s3fs(s3.endpoint))
    assert store.filesystem.type_name == "s3"
    assert store.trials() == sorted(written.configs)
    for split, y in written.labels.items():
        np.testing.assert_array_equal(store.labels(split), y)
    for trial, config in written.configs.items():
        meta = store.metadata(trial)
        assert meta["config"] == config and meta["seed"] == config["seed"]
        assert meta["group"] == pht.group_key(config)
        assert store.epochs(trial) == list(range(1, EPOCHS_STORED + 1))
    for (trial, epoch), parts in written.epochs.items():
        stored = store.read_epoch(trial, epoch)
        assert set(stored) == set(parts)
        for key, arr in parts.items():
            assert stored[key].dtype == np.float32
            np.testing.assert_array_equal(stored[key], arr)
        assert store.temperatures(trial, epoch) == pytest.approx(
            written.temperatures[(trial, epoch)]
        )
        variant = store.read_variant(trial, epoch, "swa")
        np.testing.assert_array_equal(variant.logits["test"], parts[("test", "swa")])
        assert variant.temperature == pytest.approx(0.9)

    # The documented layout, read with plain pyarrow through the same S3 filesystem.
    files = [
        i.path
        for i in s3.fs.get_file_info(pafs.FileSelector(store.root, recursive=True))
        if i.type == pafs.FileType.File
    ]
    names = sorted(f.removeprefix(store.root + "/") for f in files)
    expected = sorted(
        ["classes.json", "labels/val.parquet", "labels/test.parquet"]
        + [f"meta/{t}.json" for t in written.configs]
        + [f"logits/{t}/epoch_{e:06d}.parquet" for t, e in written.epochs]
    )
    assert names == expected  # no temporary or partial objects
    dataset = ds.dataset(f"{store.root}/logits", filesystem=s3.fs, format="parquet")
    assert dataset.count_rows() == len(written.epochs) * 2 * (N_VAL + N_TEST)


def test_a_float16_store_on_s3_stores_half_precision(s3: S3, written: Written) -> None:
    store = PredictionStore.open(f"{s3.bucket}/exp16", filesystem=s3.fs, dtype="float16")
    (trial, epoch), parts = next(iter(written.epochs.items()))
    store.write_epoch(trial, epoch, parts)
    schema = pq.read_schema(
        f"{store.root}/logits/{trial}/epoch_{epoch:06d}.parquet", filesystem=s3.fs
    )
    assert schema.field("logits").type.value_type == pa.float16()
    for key, arr in parts.items():
        got = PredictionStore(_s3fs(s3.endpoint), f"{s3.bucket}/exp16").read(trial, epoch, *key)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, arr.astype(np.float16).astype(np.float32))
        assert not np.array_equal(got, arr)  # it really was rounded


def test_ensemble_values_persist_on_s3_and_equal_a_recomputation(s3: S3, written: Written) -> None:
    store = PredictionStore.open(f"{s3.bucket}/ens", filesystem=s3.fs)
    assert store.ensemble_values() is None
    members = sorted(t for t, c in written.configs.items() if c["cfg"] == "strong")
    store.write_labels("val", written.labels["val"])
    for m in members:
        store.write_metadata(m, written.configs[m])
        for epoch in (1, 2):  # no recorded temperatures: the evaluator fits each member's
            store.write_epoch(m, epoch, written.epochs[(m, epoch)])
    group = pht.group_key(written.configs[members[0]])
    evaluator = pht.EnsembleEvaluator(store, splits=["val"])
    for epoch in (1, 2):
        evaluator.evaluate(group, epoch, members, "swa+ens+ts")
    evaluator.evaluate(group, 2, members[:1], "swa+ens+ts")  # a re-evaluation replaces it

    table = pht.ensemble_table(PredictionStore(_s3fs(s3.endpoint), store.experiment_path))
    nll = table[table["key"] == "val/swa+ens+ts/nll"]
    assert list(nll["epoch"]) == [1, 2] and list(nll["n_members"]) == [2, 1]
    assert list(nll["members"]) == [members, members[:1]]
    for (epoch, n), value in zip(((1, 2), (2, 1)), nll["value"], strict=True):
        val = [written.epochs[(m, epoch)][("val", "swa")] for m in members[:n]]
        ensemble, _ = ref.ensemble(val, val, written.labels["val"])
        assert value == pytest.approx(ref.nll(ensemble, written.labels["val"]), rel=1e-3)


class _DiesAfterOnePart(pq.ParquetWriter):
    """A writer that fails after its first row group (one (split, variant) part)."""

    def write_table(self, table: pa.Table, *args: Any, **kwargs: Any) -> None:
        super().write_table(table, *args, **kwargs)
        raise RuntimeError("simulated failure mid-write")


def test_a_write_that_fails_midway_publishes_nothing_on_s3(
    s3: S3, written: Written, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Object stores publish on close; a failed write must not publish the parts so far."""
    store = PredictionStore.open(f"{s3.bucket}/atomic", filesystem=s3.fs)
    (trial, _), good = next(iter(written.epochs.items()))
    other = written.epochs[(trial, 2)]
    store.write_epoch(trial, 1, good)
    monkeypatch.setattr(store_module.pq, "ParquetWriter", _DiesAfterOnePart)
    for epoch in (1, 2):  # overwrite an existing epoch, and write a new one
        with pytest.raises(RuntimeError, match="mid-write"):
            store.write_epoch(trial, epoch, other)
    monkeypatch.undo()
    fresh = PredictionStore(_s3fs(s3.endpoint), store.experiment_path)
    assert fresh.epochs(trial) == [1]
    stored = fresh.read_epoch(trial, 1)
    assert set(stored) == set(good)
    for key, arr in good.items():
        np.testing.assert_array_equal(stored[key], arr)
    listed = s3.fs.get_file_info(pafs.FileSelector(store.root, recursive=True))
    files = [i.base_name for i in listed if i.type == pafs.FileType.File]
    assert files == ["classes.json", "epoch_000001.parquet"]


def test_tables_from_the_s3_store_equal_those_from_a_local_copy(
    s3_store: PredictionStore, written: Written, tmp_path: Path
) -> None:
    local = PredictionStore.open(tmp_path / "exp")
    _fill(local, written)
    assert local.filesystem.type_name == "local" and s3_store.filesystem.type_name == "s3"

    from_s3 = pht.selection_table(s3_store, over="configs+epochs", progress=False)
    from_local = pht.selection_table(local, over="configs+epochs", progress=False)
    assert len(from_s3) == len(pht.TABLE_TRANSFORMS)
    assert np.isfinite(from_s3.select_dtypes("number").to_numpy(dtype=float)).any()
    pd.testing.assert_frame_equal(from_s3, from_local)

    board_s3 = pht.leaderboard(s3_store, metric="val/swa+ens+ts/nll")
    board_local = pht.leaderboard(local, metric="val/swa+ens+ts/nll")
    assert len(board_s3) == len(CONFIGS)
    assert board_s3["val/swa+ens+ts/nll"].map(math.isfinite).all()
    pd.testing.assert_frame_equal(board_s3, board_local)


def test_an_unreachable_s3_endpoint_fails_at_once_naming_the_location() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fs = _s3fs(
        f"127.0.0.1:{port}",
        connect_timeout=1,
        request_timeout=1,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    with pytest.raises(StoreError, match=rf"'{BUCKET}/exp'.*127\.0\.0\.1:{port}"):
        PredictionStore.open(f"{BUCKET}/exp", filesystem=fs)
    # A store made without open() (as the reporter makes one) fails at its first write.
    with pytest.raises(OSError, match=BUCKET):
        PredictionStore(fs, f"{BUCKET}/exp").write_labels("val", np.array([0, 1]))


# -- a real Tune run with S3 storage ------------------------------------------------------------

TUNE_EPOCHS, TUNE_SEEDS = 3, 2
SEED_KEY = "_seed"
GROUP_KEY = "val/swa+ens+ts/nll"


def _data() -> dict[str, torch.Tensor]:
    """The rows ``ref.teacher_trial`` trains and evaluates on."""
    return ref.linear_teacher(
        ref.TEACHER_IN, ref.TEACHER_CLASSES, {"": 200, "_val": 80, "_test": 70}, noise=2.0
    )


def _on_s3(reporter: PostHocReporter) -> None:
    assert reporter.store is not None and reporter.store.filesystem.type_name == "s3"


def train(config: dict[str, Any]) -> None:
    """Deterministic training with the reporter; the store is Tune's storage, on S3."""
    ref.teacher_trial(config, epochs=TUNE_EPOCHS, seed_key=SEED_KEY, on_start=_on_s3)


@pytest.mark.slow
def test_a_tune_run_stores_on_s3_and_prunes_on_ensembles_read_from_it(
    ray_session: None, s3: S3
) -> None:
    """Workers get the S3 filesystem only as Tune's pickled ``storage_filesystem`` (they
    inherit the environment of ``ray.init``, not this module's). Actors are reused: it halves
    the run, and a configuration's seeds need not start together for the checks below."""
    scheduler = PostHocASHA(
        metric=GROUP_KEY,
        mode="min",
        max_t=TUNE_EPOCHS,
        grace_period=1,
        reduction_factor=2,
        seed_key=SEED_KEY,
    )
    tuner = tune.Tuner(
        tune.with_resources(train, {"cpu": 1}),
        param_space=pht.with_seeds({"lr": tune.grid_search([0.3, 0.01])}, TUNE_SEEDS, SEED_KEY),
        tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True, time_budget_s=180),
        run_config=tune.RunConfig(
            name="exp",
            storage_path=f"{s3.bucket}/tune",
            storage_filesystem=s3.fs,
            callbacks=[scheduler.callback],
            verbose=0,
        ),
    )
    results = tuner.fit()
    assert len(results) == 2 * TUNE_SEEDS and not results.errors
    trials: list[Any] = [results[i] for i in range(len(results))]

    store = open_store(results)  # through results.filesystem
    assert store.filesystem.type_name == "s3"
    assert store.experiment_path == f"{s3.bucket}/tune/exp"
    d = _data()
    labels = {"val": d["y_val"].numpy(), "test": d["y_test"].numpy()}
    for split, y in labels.items():
        np.testing.assert_array_equal(store.labels(split), y)
    trial_ids = sorted(r.metrics["trial_id"] for r in trials)
    assert store.trials() == trial_ids

    for result in trials:
        frame = result.metrics_dataframe
        trial_id = result.metrics["trial_id"]
        reported, stored = list(frame["epoch"]), store.epochs(trial_id)
        assert reported == list(range(1, len(reported) + 1))
        group = pht.group_key(result.config, SEED_KEY)
        if stored != reported:
            # A member stopped with its group may have stored the epoch it was computing
            # (written before tune.report), whose result Tune never took.
            assert stored == [*reported, len(reported) + 1], (stored, reported)
            decisions = scheduler.decisions
            assert (decisions[decisions["arm"] == group]["decision"] == "STOP").any()
        assert store.metadata(trial_id)["group"] == group
        for row in frame.to_dict("records"):
            for split in ("val", "test"):
                for variant in ("base", "swa"):
                    z = store.read(trial_id, int(row["epoch"]), split, variant)
                    assert row[f"{split}/{variant}/nll"] == pytest.approx(
                        ref.nll(z, labels[split]), rel=1e-6
                    )

    # The driver read the members' logits from S3 at each epoch all members reached (rungs
    # included) and persisted its ensembles there; each value equals a brute-force
    # recomputation from the S3 logits, and is the value the scheduler judged at a rung.
    table = pht.ensemble_table(store)
    assert set(table["n_members"]) == {TUNE_SEEDS}
    groups = {pht.group_key(r.config, SEED_KEY) for r in trials}
    first_rung = table.groupby("group")["epoch"].min()
    assert first_rung.to_dict() == dict.fromkeys(groups, 1)  # every group judged at rung 1
    for (group, epoch), rows in table.groupby(["group", "epoch"]):
        values = dict(zip(rows["key"], rows["value"], strict=True))
        members = list(rows["members"].iloc[0])
        val = [store.read(m, int(epoch), "val", "swa") for m in members]
        ensemble, _ = ref.ensemble(val, val, labels["val"])
        assert values[GROUP_KEY] == pytest.approx(ref.nll(ensemble, labels["val"]), rel=1e-3)
        judged = scheduler.decisions
        judged = judged[(judged["arm"] == group) & (judged["epoch"] == epoch)]
        assert judged.empty or judged["value"].iloc[0] == values[GROUP_KEY]
    decided = scheduler.decisions[["arm", "epoch"]].itertuples(index=False)
    persisted = set(zip(table["group"], table["epoch"], strict=True))
    assert {(arm, epoch) for arm, epoch in decided} <= persisted  # every rung was persisted
    ensemble_files = s3.fs.get_file_info(
        pafs.FileSelector(f"{store.root}/ensembles", recursive=True)
    )
    assert any(i.base_name.endswith(".parquet") for i in ensemble_files)

    board = pht.leaderboard(results, metric=GROUP_KEY)  # from the ResultGrid, on S3
    assert sorted(board["group"]) == sorted(groups)
