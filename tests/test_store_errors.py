"""What a user sees when a store is missing, corrupt or inconsistent: errors that name the
path, the file and what it holds, and nothing deleted."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from posthoc_tune import PredictionStore, StoreError, selection_table
from posthoc_tune.cli import main

C = 3


def _parts(rng: np.random.Generator, c: int = C) -> dict[tuple[str, str], np.ndarray]:
    return {
        (split, variant): rng.normal(size=(n, c)).astype(np.float32)
        for split, n in (("val", 30), ("test", 20))
        for variant in ("base", "swa")
    }


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    """2 configurations x 2 seeds x 2 epochs, with labels: enough for a selection table."""
    rng = np.random.default_rng(0)
    store = PredictionStore.open(tmp_path / "exp")
    store.write_labels("val", rng.integers(0, C, 30))
    store.write_labels("test", rng.integers(0, C, 20))
    for lr in (1, 3):
        for seed in (0, 1):
            store.write_metadata(f"t{lr}_{seed}", {"lr": lr, "seed": seed})
            for epoch in (1, 2):
                store.write_epoch(f"t{lr}_{seed}", epoch, _parts(rng))
    return tmp_path / "exp"


def _truncate(path: Path) -> bytes:
    """Cut a file in half, as an interrupted copy or a full disk would; return the rest."""
    data = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(data)
    return data


# -- 6. unreadable files are named and kept --------------------------------------------------


def test_a_truncated_epoch_file_is_named_with_its_trial_and_epoch(experiment: Path) -> None:
    path = experiment / "posthoc/logits/t3_1/epoch_000002.parquet"
    left = _truncate(path)
    store = PredictionStore.open(experiment)
    reads = [
        lambda: store.read_epoch("t3_1", 2),
        lambda: store.read("t3_1", 2, "val", "swa"),
        lambda: store.read_variant("t3_1", 2, "base"),
        lambda: store.temperatures("t3_1", 2),
        lambda: store.write("t3_1", 2, "val", "base", np.zeros((30, C), np.float32)),
    ]
    for read in reads:
        with pytest.raises(StoreError) as info:
            read()
        message = str(info.value)
        assert message.startswith(f"cannot read epoch 2 of trial 't3_1' from '{path}': ")
        assert "magic bytes not found" in message and "\n" not in message
    assert path.read_bytes() == left  # nothing deleted or rewritten
    assert store.epochs("t3_1") == [1, 2]
    np.testing.assert_array_equal(store.read_epoch("t3_1", 1)[("val", "base")].shape, (30, C))


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (b'{"trial_id": "t1_0\x01"}', "Invalid control character at: line 1 column 19"),
        (b'{"trial_id": "t1_0", "gro', "Unterminated string"),
        (b"[1, 2]", "cannot convert dictionary update sequence"),
    ],
)
def test_corrupt_metadata_is_named_with_its_trial(
    experiment: Path, content: bytes, detail: str
) -> None:
    path = experiment / "posthoc/meta/t1_0.json"
    path.write_bytes(content)
    with pytest.raises(StoreError) as info:
        PredictionStore.open(experiment).metadata("t1_0")
    message = str(info.value)
    assert message.startswith(f"cannot read the metadata of trial 't1_0' from '{path}': ")
    assert detail in message and "\n" not in message
    assert path.read_bytes() == content


def test_corrupt_labels_and_ensemble_values_are_named(experiment: Path) -> None:
    labels = experiment / "posthoc/labels/test.parquet"
    left = _truncate(labels)
    store = PredictionStore.open(experiment)
    with pytest.raises(StoreError, match=f"cannot read the test labels from '{labels}': "):
        store.labels("test")
    with pytest.raises(StoreError, match="cannot read the test labels"):
        store.write_labels("test", np.zeros(20, np.int64))
    assert labels.read_bytes() == left
    np.testing.assert_array_equal(store.labels("val").shape, (30,))

    table = pa.table({"group": ["g"], "key": ["val/ens/nll"], "value": [1.5]})
    store.write_ensemble_values("g", 2, "ens.logits", table)
    store.write_ensemble_values("g", 4, "ens.logits", table)
    values = experiment / "posthoc/ensembles/g/epoch_000004.ens.logits.parquet"
    values.write_bytes(b"not parquet at all")
    with pytest.raises(StoreError, match=f"cannot read ensemble values from '{values}': "):
        store.ensemble_values()
    assert values.read_bytes() == b"not parquet at all"


@pytest.mark.parametrize("broken", ["logits/t1_1/epoch_000001.parquet", "meta/t1_1.json"])
def test_the_cli_names_a_corrupt_file_in_one_line(
    experiment: Path, broken: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = experiment / "posthoc" / broken
    left = _truncate(path)
    with pytest.raises(SystemExit) as exit_info:
        main(["table", str(experiment)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    what = "epoch 1 of trial 't1_1'" if broken.startswith("logits") else "the metadata of trial"
    assert err.startswith(f"posthoc-tune table: error: cannot read {what}")
    assert f"from '{path}': " in err and err.count("\n") == 1
    assert path.read_bytes() == left


# -- 7. missing experiments and the posthoc/ folder ------------------------------------------


def test_a_missing_path_is_an_error_for_readers_and_a_new_store_for_writers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo"
    expected = f"no experiment at '{missing}': the path does not exist"
    with pytest.raises(StoreError, match=expected):
        PredictionStore.open(missing, must_exist=True)
    with pytest.raises(StoreError, match=expected):
        selection_table(missing)
    with pytest.raises(SystemExit) as exit_info:
        main(["leaderboard", str(missing)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"posthoc-tune leaderboard: error: {expected}\n"
    assert not missing.exists()  # reading created nothing

    writer = PredictionStore.open(missing)  # the reporter outside Tune: a new experiment
    assert writer.trials() == []
    writer.write_epoch("t", 1, _parts(np.random.default_rng(1)))
    assert PredictionStore.open(missing, must_exist=True).epochs("t") == [1]


def test_a_folder_without_a_store_says_so(tmp_path: Path) -> None:
    (tmp_path / "tune_only" / "trial_0").mkdir(parents=True)  # Tune's files, no reporter
    with pytest.raises(StoreError) as info:
        PredictionStore.open(tmp_path / "tune_only", must_exist=True)
    assert str(info.value).startswith(
        f"'{tmp_path / 'tune_only'}' holds no prediction store (no posthoc/ folder): "
    )


def test_the_posthoc_folder_opens_the_same_store(experiment: Path, tmp_path: Path) -> None:
    via_experiment = PredictionStore.open(experiment, must_exist=True)
    for path in (experiment / "posthoc", f"{experiment}/posthoc/"):
        store = PredictionStore.open(path, must_exist=True)
        assert store.root == via_experiment.root == f"{experiment}/posthoc"
        assert store.trials() == via_experiment.trials() == ["t1_0", "t1_1", "t3_0", "t3_1"]
    expected = selection_table(experiment)
    got = selection_table(experiment / "posthoc")
    np.testing.assert_array_equal(got["posthoc/test/nll"], expected["posthoc/test/nll"])

    # A writer given a new .../posthoc path writes there, not to .../posthoc/posthoc; an
    # experiment that is itself named "posthoc" (it holds a posthoc/ folder) stays one.
    PredictionStore.open(tmp_path / "new" / "posthoc").write_metadata("t", {"seed": 0})
    assert (tmp_path / "new/posthoc/meta/t.json").is_file()
    in_tune = PredictionStore(pafs.LocalFileSystem(), str(tmp_path / "runs" / "posthoc"))
    in_tune.write_metadata("t", {"seed": 0})  # as the reporter writes inside Tune
    reopened = PredictionStore.open(tmp_path / "runs" / "posthoc", must_exist=True)
    assert reopened.root == str(tmp_path / "runs/posthoc/posthoc")
    assert reopened.trials() == ["t"]


# -- 8. one class count per store -------------------------------------------------------------


def test_the_first_write_with_another_class_count_fails(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    store = PredictionStore.open(tmp_path / "exp")  # no labels: only the class count can tell
    store.write_epoch("seed0", 1, _parts(rng, 10))
    classes = tmp_path / "exp/posthoc/classes.json"
    assert json.loads(classes.read_text()) == {"n_classes": 10}
    store.write_epoch("seed0", 2, _parts(rng, 10))
    for writer in (store, PredictionStore.open(tmp_path / "exp")):  # same process, new worker
        with pytest.raises(ValueError) as info:
            writer.write_epoch("seed1", 3, _parts(rng, 11))
        assert str(info.value).startswith(
            f"trial 'seed1' epoch 3: logits with 11 classes, but the store records 10 "
            f"('{classes}', from its first epoch written)"
        )
    with pytest.raises(ValueError, match="logits with 11 classes, but the store records 10"):
        store.write("seed0", 3, "test", "swa", np.zeros((20, 11), np.float32))
    assert store.trials() == ["seed0"] and store.epochs("seed0") == [1, 2]
    assert store.read("seed0", 2, "test", "swa").shape == (20, 10)


def test_the_class_count_is_read_once_per_store_object(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    store = PredictionStore.open(tmp_path / "exp")
    store.write_epoch("a", 1, _parts(rng))
    classes = tmp_path / "exp/posthoc/classes.json"
    classes.write_bytes(b"\x00garbage")
    store.write_epoch("a", 2, _parts(rng))  # cached: the file is not read again
    with pytest.raises(StoreError, match=f"cannot read the class count from '{classes}': "):
        PredictionStore.open(tmp_path / "exp").write_epoch("b", 1, _parts(rng))
    assert classes.read_bytes() == b"\x00garbage"
