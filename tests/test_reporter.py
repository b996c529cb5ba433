"""PostHocReporter outside Tune: it returns the metrics and writes to the store it is given."""

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import posthoc_tune as pht
from posthoc_tune import PostHocReporter, PredictionStore
from tests import reference as ref

N_IN, C = 6, 4


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    return ref.linear_teacher(N_IN, C, {"": 120, "_val": 60, "_test": 50}, noise=1.5, seed=seed)


def _model(batchnorm: bool = False) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(N_IN, 16)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(16))
    layers += [torch.nn.ReLU(), torch.nn.Linear(16, C)]
    return torch.nn.Sequential(*layers)


def _train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, d: dict[str, Any]) -> None:
    model.train()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(d["x"]), d["y"]).backward()
    opt.step()


def _reporter(model: torch.nn.Module, d: dict[str, Any], **kwargs: Any) -> PostHocReporter:
    return PostHocReporter(
        model,
        {"lr": 0.5, "seed": 0},
        val=(d["x_val"], d["y_val"]),
        test=(d["x_test"], d["y_test"]),
        **kwargs,
    )


def test_reported_metrics_equal_metrics_recomputed_from_the_store(tmp_path: Path) -> None:
    d, model = _data(), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    reporter = _reporter(model, d, store=tmp_path, trial_id="t0", eval_batch_size=16)
    results = []
    for _ in range(4):
        _train_epoch(model, opt, d)
        results.append(reporter.step({"train/loss": torch.tensor(1.5)}))

    expected_keys = set(pht.metric_keys()) | {
        "epoch",
        "temperature/base",
        "temperature/swa",
        "train/loss",
    }
    assert all(set(r) == expected_keys for r in results)
    store = PredictionStore.open(tmp_path)
    assert store.epochs("t0") == [1, 2, 3, 4]
    assert store.metadata("t0")["group"] == pht.group_key({"lr": 0.5})
    for epoch, result in enumerate(results, start=1):
        assert result["epoch"] == epoch and result["train/loss"] == 1.5
        for split in ("val", "test"):
            y = store.labels(split)
            for variant, ts_name in (("base", "ts"), ("swa", "swa+ts")):
                z = store.read("t0", epoch, split, variant)
                assert result[f"{split}/{variant}/nll"] == pytest.approx(ref.nll(z, y), rel=1e-6)
                assert result[f"{split}/{variant}/error"] == pytest.approx(ref.error(z, y))
                assert result[f"{split}/{variant}/ece"] == pytest.approx(ref.ece(z, y), abs=1e-6)
                assert result[f"{split}/{variant}/brier"] == pytest.approx(
                    ref.brier(z, y), rel=1e-6
                )
                # TS fit on val by brute force, applied to this split.
                z_val = store.read("t0", epoch, "val", variant)
                t = ref.grid_temperature(z_val, store.labels("val"))
                assert result[f"temperature/{variant}"] == pytest.approx(t, rel=0.01)
                # ... and the fitted temperature is recorded with the logits for the driver.
                parts = store.read_variant("t0", epoch, variant)
                assert parts.temperature == result[f"temperature/{variant}"]
                np.testing.assert_array_equal(parts.logits[split], z)
                assert result[f"{split}/{ts_name}/nll"] == pytest.approx(
                    ref.nll(z / t, y), rel=1e-3
                )
        assert all(math.isnan(result[k]) for k in pht.metric_keys() if "ens" in k)
    # SWA of epoch 1 is the epoch-1 model itself.
    np.testing.assert_array_equal(
        store.read("t0", 1, "val", "swa"), store.read("t0", 1, "val", "base")
    )
    assert not np.array_equal(store.read("t0", 4, "val", "swa"), store.read("t0", 4, "val", "base"))


def test_loader_and_predict_forms_give_the_same_metrics() -> None:
    d = _data()
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(d["x_val"], d["y_val"]), batch_size=7
    )

    def predict(model: torch.nn.Module, split: str) -> torch.Tensor:
        assert split in ("val", "test") and not model.training
        return model(d[f"x_{split}"])

    forms: dict[str, dict[str, Any]] = {
        "tensors": {"val": (d["x_val"], d["y_val"]), "test": (d["x_test"], d["y_test"])},
        "loader": {"val": val_loader, "test": (d["x_test"], d["y_test"])},
        "predict": {"val": (predict, d["y_val"]), "test": (predict, d["y_test"].numpy())},
    }
    results = {}
    for name, splits in forms.items():
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        reporter = PostHocReporter(model, {"seed": 0}, **splits)
        for _ in range(2):
            _train_epoch(model, opt, d)
            results[name] = reporter.step()
    for name in ("loader", "predict"):
        for key, value in results["tensors"].items():
            assert results[name][key] == pytest.approx(value, rel=1e-5, nan_ok=True), (name, key)


def test_evaluation_restores_the_callers_mode_and_keeps_no_gradients() -> None:
    d, model = _data(), _model(batchnorm=True)
    reporter = _reporter(model, d)
    model.train()
    reporter.step()
    assert model.training
    model.eval()
    reporter.step()
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_swa_batchnorm_statistics_come_from_the_val_inputs() -> None:
    d, model = _data(), _model(batchnorm=True)
    reporter = _reporter(model, d, eval_batch_size=1000)  # one batch: exact mean
    reporter.step()
    averaged = reporter.swa.model
    assert isinstance(averaged, torch.nn.Sequential)
    bn = averaged[1]
    with torch.no_grad():
        h = averaged[0](d["x_val"])
    torch.testing.assert_close(bn.running_mean, h.mean(dim=0))


def test_test_split_is_optional_and_its_keys_stay_nan(tmp_path: Path) -> None:
    d = _data()
    reporter = PostHocReporter(_model(), {"seed": 1}, val=(d["x_val"], d["y_val"]), store=tmp_path)
    result = reporter.step()
    assert not math.isnan(result["val/swa+ts/nll"])
    assert all(math.isnan(v) for k, v in result.items() if k.startswith("test/"))
    assert set(PredictionStore.open(tmp_path).read_epoch("local", 1)) == {
        ("val", "base"),
        ("val", "swa"),
    }


def test_swa_start_epoch_leaves_swa_undefined_before_it(tmp_path: Path) -> None:
    d = _data()
    reporter = _reporter(_model(), d, store=tmp_path, swa_start_epoch=3)
    results = [reporter.step() for _ in range(3)]
    assert math.isnan(results[1]["val/swa/nll"]) and not math.isnan(results[2]["val/swa/nll"])
    store = PredictionStore.open(tmp_path)
    assert ("val", "swa") not in store.read_epoch("local", 2)
    assert ("val", "swa") in store.read_epoch("local", 3)


def test_a_diverged_model_reports_nan_instead_of_crashing(tmp_path: Path) -> None:
    d, model = _data(), _model()
    first = model[0]
    assert isinstance(first, torch.nn.Linear)
    with torch.no_grad():
        first.weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="fell back to T=1"):
        result = _reporter(model, d, store=tmp_path).step()
    assert math.isnan(result["val/base/nll"]) and math.isnan(result["test/swa+ts/brier"])
    assert result["temperature/base"] == 1.0
    assert np.isnan(PredictionStore.open(tmp_path).read("local", 1, "val", "base")).all()


def test_bad_inputs_get_clear_errors() -> None:
    d = _data()
    with pytest.raises(ValueError, match="class 9, outside \\[0, 3\\]"):
        _reporter(_model(), {**d, "y_val": d["y_val"] + 6}).step()
    with pytest.raises(ValueError, match="val inputs have 60 rows but val labels have 59"):
        PostHocReporter(_model(), {}, val=(d["x_val"], d["y_val"][:-1]))
    with pytest.raises(TypeError, match="val must be an \\(x, y\\) tuple"):
        PostHocReporter(_model(), {}, val=42)
    with pytest.raises(ValueError, match="has BatchNorm layers and val is a \\(predict, labels\\)"):
        PostHocReporter(_model(batchnorm=True), {}, val=(lambda m, s: m(d["x_val"]), d["y_val"]))
    with pytest.raises(ValueError, match="clash with keys the reporter sets"):
        _reporter(_model(), d).step({"val/base/nll": 1.0})
    with pytest.raises(TypeError, match="extra metric 'hist' must be a scalar"):
        _reporter(_model(), d).step({"hist": [1, 2]})
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 1"):
        _reporter(_model(), d, checkpoint_every=0)
    with pytest.raises(ValueError, match="which report=False never calls"):
        _reporter(_model(), d, checkpoint={}, report=False)
    with pytest.raises(TypeError, match="report must be a bool, got 'no'"):
        _reporter(_model(), d, report="no")


NON_INTEGER_LABELS = {
    "float32 + 0.5": lambda y: y.float() + 0.5,
    "float64": lambda y: y.double(),
    "bool": lambda y: y > 1,
    "numpy object": lambda y: y.numpy().astype(object),
    "numpy float16": lambda y: y.numpy().astype(np.float16),
}


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("form", ["tensors", "predict", "loader"])
@pytest.mark.parametrize("kind", list(NON_INTEGER_LABELS))
def test_non_integer_labels_are_refused_naming_split_and_dtype(
    split: str, form: str, kind: str
) -> None:
    d = _data()
    y = NON_INTEGER_LABELS[kind](d[f"y_{split}"])
    x = d[f"x_{split}"]
    dtype = str(torch.as_tensor(y).dtype if not isinstance(y, np.ndarray) else y.dtype)
    spec: Any = {
        "tensors": (x, y),
        "predict": (lambda m, s: m(x), y),
        "loader": [(x[:20], y[:20]), (x[20:40], y[20:40]), (x[40:], y[40:])],
    }[form]
    splits = {"val": (d["x_val"], d["y_val"]), "test": (d["x_test"], d["y_test"]), split: spec}
    message = f"{split} labels must (be a numeric array|have an integer dtype).*{dtype}"
    with pytest.raises(TypeError, match=message):
        PostHocReporter(_model(), {"seed": 0}, **splits).step()


class _Output:
    """What a Hugging Face model returns: an output object with a ``logits`` tensor."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class _OutputModel(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, wrap: Any) -> None:
        super().__init__()
        self.inner, self.wrap = inner, wrap

    def forward(self, x: torch.Tensor) -> Any:
        return self.wrap(self.inner(x))


def test_models_returning_output_objects_are_evaluated_on_their_logits() -> None:
    d = _data()
    plain = _reporter(_model(), d).step()
    for wrap in (_Output, lambda z: {"logits": z, "loss": None}):
        wrapped = _reporter(_OutputModel(_model(), wrap), d).step()
        assert wrapped == pytest.approx(plain, nan_ok=True)
    with pytest.raises(TypeError, match=r"returned a tuple on the val inputs.*val=\(predict"):
        _reporter(_OutputModel(_model(), lambda z: (z, z)), d).step()


def test_a_shuffling_val_loader_is_rejected() -> None:
    d = _data()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(d["x_val"], d["y_val"]), batch_size=8, shuffle=True
    )
    reporter = PostHocReporter(_model(), {}, val=loader)
    with pytest.raises(ValueError, match="must not shuffle"):
        reporter.step()  # the base and SWA passes of one epoch already disagree


def test_state_dict_resumes_exactly() -> None:
    """3 epochs, checkpoint, fresh objects, 2 more epochs == 5 uninterrupted epochs."""
    d = _data()
    model = _model(batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    reporter = _reporter(model, d, checkpoint={"optimizer": opt})
    for _ in range(3):
        _train_epoch(model, opt, d)
        reporter.step()
    state = copy.deepcopy(reporter.state_dict())
    for _ in range(2):
        _train_epoch(model, opt, d)
        uninterrupted = reporter.step()

    model2 = _model(batchnorm=True)
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)  # different weights: the state must overwrite them
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.3, momentum=0.9)
    resumed = _reporter(model2, d, checkpoint={"optimizer": opt2})
    resumed.load_state_dict(state)
    assert resumed.epoch == 3
    for _ in range(resumed.epoch, 5):
        _train_epoch(model2, opt2, d)
        result = resumed.step()
    assert result == uninterrupted
    for a, b in zip(reporter.swa.model.parameters(), resumed.swa.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="checkpoint holds objects \\['optimizer'\\]"):
        _reporter(_model(batchnorm=True), d).load_state_dict(state)


def _shard_worker(rank: int, world: int, init: str, out: str) -> None:
    """One rank of a sharded evaluation: a DistributedSampler deals rows round-robin and
    pads the last round; rank 0 gathers the logits back in row order."""
    import torch.distributed as dist

    from posthoc_tune.reporter import _EvalSplit

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        x = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
        y = torch.arange(10) % 3
        dataset = torch.utils.data.TensorDataset(x, y)
        sampler: torch.utils.data.Sampler[int] = torch.utils.data.DistributedSampler(
            dataset, world, rank, shuffle=False
        )
        split = _EvalSplit("val", torch.utils.data.DataLoader(dataset, 2, sampler=sampler), 2)
        assert split.sharded
        gathered = split.predict(torch.nn.Identity())
        if rank == 0:
            assert gathered is not None
            np.save(out, np.concatenate([gathered[0], gathered[1][:, None]], axis=1))
        else:
            assert gathered is None
    finally:
        dist.destroy_process_group()


def test_a_sharded_split_is_gathered_on_rank_0_in_row_order(tmp_path: Path) -> None:
    out = str(tmp_path / "gathered.npy")
    init = f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.spawn(_shard_worker, args=(3, init, out), nprocs=3)  # 10 rows, 3 ranks
    gathered = np.load(out)
    expected = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    np.testing.assert_array_equal(gathered[:, :3], expected)
    np.testing.assert_array_equal(gathered[:, 3], np.arange(10) % 3)


def test_sharded_loaders_that_reorder_or_drop_rows_are_refused() -> None:
    d = _data()
    dataset = torch.utils.data.TensorDataset(d["x_val"], d["y_val"])
    for kwargs, message in (
        ({"shuffle": True}, "DistributedSampler shuffles"),
        ({"shuffle": False, "drop_last": True}, "drops the last rows"),
    ):
        sampler: torch.utils.data.Sampler[int] = torch.utils.data.DistributedSampler(
            dataset, 2, 0, **kwargs
        )
        loader = torch.utils.data.DataLoader(dataset, 8, sampler=sampler)
        with pytest.raises(ValueError, match=message):
            PostHocReporter(_model(), {"seed": 0}, val=loader)


def test_ranks_other_than_0_write_nothing_and_return_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from posthoc_tune import _session

    store = PredictionStore.open(tmp_path)
    session = _session.Session("local", "t1", store, rank=1, world_size=2)
    monkeypatch.setattr("posthoc_tune.reporter.current_session", lambda *a: session)
    d = _data()
    reporter = _reporter(_model(), d)
    assert reporter.step() == {} and reporter.epoch == 1
    assert not (tmp_path / "posthoc").exists()  # no metadata, labels or logits


def test_a_train_worker_without_its_trial_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from posthoc_tune import _session

    monkeypatch.setattr(_session, "_train_worker", lambda: (1, 2))
    with pytest.raises(RuntimeError, match=r"Ray Train worker \(rank 1 of 2\) without its Tune"):
        _reporter(_model(), _data())
