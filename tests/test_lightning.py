"""PostHocLightningCallback: when it steps, what it evaluates, resume, and real Tune runs."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from ray import tune
from torch.utils.data import DataLoader, Dataset

import posthoc_tune as pht
from posthoc_tune import PredictionStore
from posthoc_tune.lightning import PostHocLightningCallback
from tests import reference as ref

DATA = ref.linear_teacher(6, 3, {"_train": 96, "_val": 48, "_test": 40}, noise=1.0)
Y_VAL, Y_TEST = DATA["y_val"].numpy(), DATA["y_test"].numpy()


class Dicts(Dataset[dict[str, torch.Tensor]]):
    """Rows as dicts, as Hugging Face datasets give them."""

    def __init__(self, split: str) -> None:
        self.x, self.y = DATA[f"x_{split}"], DATA[f"y_{split}"]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.x[i], "label": self.y[i]}


def loader(split: str) -> DataLoader[dict[str, torch.Tensor]]:
    return DataLoader(Dicts(split), batch_size=16)  # never shuffled: runs are reproducible


def xy(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["features"], batch["label"]


class Net(pl.LightningModule):
    def __init__(self, lr: float = 0.2, seed: int = 0, batchnorm: bool = False) -> None:
        super().__init__()
        self.lr = lr
        torch.manual_seed(seed)
        norm: list[torch.nn.Module] = [torch.nn.BatchNorm1d(16)] if batchnorm else []
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16), *norm, torch.nn.ReLU(), torch.nn.Linear(16, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = xy(batch)
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        x, y = xy(batch)
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y), batch_size=len(y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def trainer(epochs: int, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def fit(module: Net, epochs: int, callbacks: list[pl.Callback], **kwargs: Any) -> None:
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer(epochs, callbacks, **kwargs).fit(
        module, loader("train"), loader("val"), ckpt_path=ckpt_path
    )


class Recorder(pl.Callback):
    """Placed after the post-hoc callback: what it saw at each point of the fit."""

    def __init__(self, posthoc: PostHocLightningCallback) -> None:
        self.posthoc = posthoc
        self.weights: list[dict[str, torch.Tensor]] = []  # at fit start, then at epoch ends
        self.metrics: list[dict[str, float]] = []  # each epoch's reported metrics
        self.sanity_checks = 0
        self.start: tuple[int, int] | None = None  # (reporter epoch, trainer epoch)

    def _weights(self, module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.named_parameters()}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights.append(self._weights(pl_module))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sanity_checks += trainer.sanity_checking

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reporter = self.posthoc.reporter
        assert reporter is not None
        self.start = (reporter.epoch, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights.append(self._weights(pl_module))
        self.metrics.append(dict(self.posthoc.metrics))


def mean_weights(weights: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([w[k] for w in weights]).mean(0) for k in weights[0]}


def logits(module: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    module.eval()
    with torch.no_grad():
        return cast(np.ndarray, module(x).numpy())


# -- one step per epoch, after validation, never for the sanity check --------------------------


def test_one_step_per_epoch_after_validation_and_none_for_the_sanity_check(
    tmp_path: Path,
) -> None:
    posthoc = PostHocLightningCallback(
        {"seed": 0}, batch_to_xy=xy, test=loader("test"), store=tmp_path
    )
    recorder = Recorder(posthoc)
    module = Net()
    fit(module, 4, [posthoc, recorder], num_sanity_val_steps=2)
    assert recorder.sanity_checks == 1  # validation did run on the untrained weights

    # SWA is the mean of the weights at the ends of epochs 1..4, not of the initial ones.
    reporter = posthoc.reporter
    assert reporter is not None and reporter.epoch == 4 and reporter.swa.n_averaged == 4
    swa = dict(reporter.swa.model.named_parameters())
    with_initial = mean_weights(recorder.weights)
    for name, expected in mean_weights(recorder.weights[1:]).items():
        torch.testing.assert_close(swa[name], expected)
        assert not torch.allclose(swa[name], with_initial[name])

    # Each epoch's step evaluated the weights that epoch's validation ran on: Lightning's
    # val_loss (the trainer's dict-batch val loader) is the NLL of the stored base logits.
    store = PredictionStore.open(tmp_path)
    assert store.epochs("local") == [1, 2, 3, 4]
    np.testing.assert_array_equal(store.labels("val"), Y_VAL)
    np.testing.assert_array_equal(store.labels("test"), Y_TEST)
    for epoch, metrics in enumerate(recorder.metrics, start=1):
        nll = ref.nll(store.read("local", epoch, "val", "base"), Y_VAL)
        assert metrics["epoch"] == epoch
        assert metrics["val_loss"] == pytest.approx(nll, rel=1e-5)
        assert metrics["val/base/nll"] == pytest.approx(nll, rel=1e-5)
        assert metrics["train_loss"] > 0  # the epoch's training metrics reach the result too

    # The stored logits are those of the live model and of the mean weights (no BatchNorm).
    averaged = Net()
    averaged.load_state_dict(mean_weights(recorder.weights[1:]))
    for split, x in (("val", DATA["x_val"]), ("test", DATA["x_test"])):
        for variant, model in (("base", module), ("swa", averaged)):
            np.testing.assert_allclose(
                store.read("local", 4, split, variant), logits(model, x), rtol=1e-5, atol=1e-6
            )
    assert posthoc.metrics["test/swa/error"] == pytest.approx(
        ref.error(logits(averaged, DATA["x_test"]), Y_TEST)
    )


def test_the_reporter_is_built_on_the_module_as_lightning_prepared_it() -> None:
    """Lightning converts the module for "64-true" after the ``setup`` hook, as it moves it to
    its device: the reporter, built later, holds the trained module and a float64 SWA copy,
    and evaluates the trainer's val batches converted to float64 as Lightning converts them."""
    posthoc = PostHocLightningCallback({"seed": 0}, batch_to_xy=xy)
    assert posthoc.reporter is None
    module = Net()
    fit(module, 2, [posthoc], precision="64-true")
    reporter = posthoc.reporter
    assert reporter is not None and reporter.model is module
    pairs = zip(module.parameters(), reporter.swa.model.parameters(), strict=True)
    for live, swa in pairs:
        assert live.dtype == swa.dtype == torch.float64 and live.device == swa.device
    assert posthoc.metrics["val/base/nll"] == pytest.approx(
        ref.nll(logits(module, DATA["x_val"].double()), Y_VAL)
    )


def test_splits_in_the_reporters_own_forms(tmp_path: Path) -> None:
    """``(x, y)`` tensors and ``(predict, labels)`` pass to the reporter as they are."""

    def predict(model: torch.nn.Module, split: str) -> torch.Tensor:
        assert split == "test"
        return cast(torch.Tensor, model(DATA["x_test"]))

    posthoc = PostHocLightningCallback(
        {"seed": 0},
        val=(DATA["x_val"], DATA["y_val"]),
        test=(predict, DATA["y_test"]),
        store=tmp_path,
    )
    module = Net()
    fit(module, 2, [posthoc])
    store = PredictionStore.open(tmp_path)
    for split, x in (("val", DATA["x_val"]), ("test", DATA["x_test"])):
        np.testing.assert_allclose(
            store.read("local", 2, split, "base"), logits(module, x), rtol=1e-5, atol=1e-6
        )
    assert posthoc.metrics["test/base/nll"] == pytest.approx(
        ref.nll(logits(module, DATA["x_test"]), Y_TEST), rel=1e-5
    )


def test_val_none_without_a_val_dataloader_says_to_pass_val() -> None:
    posthoc = PostHocLightningCallback({"seed": 0}, batch_to_xy=xy)
    with pytest.raises(ValueError, match=r"trainer's val dataloader.*has none.*pass val="):
        trainer(1, [posthoc]).fit(Net(), loader("train"))


# -- resume from Lightning checkpoints ----------------------------------------------------------


@pytest.mark.parametrize("on_train_epoch_end", [True, False], ids=["epoch_end", "val_end"])
def test_resuming_from_a_lightning_checkpoint_matches_an_uninterrupted_run(
    tmp_path: Path, on_train_epoch_end: bool
) -> None:
    """Train 3 epochs, resume to 5 in a new Trainer from the epoch-3 checkpoint: the same
    logits, temperatures and SWA average as 5 epochs in one go. ModelCheckpoint saves at the
    end of the training epoch (after the callback's step) by default, or at validation end
    (before it): Lightning then runs that epoch's ``on_train_epoch_end`` on resume."""

    def callback(store: Path) -> PostHocLightningCallback:
        return PostHocLightningCallback(
            {"seed": 0}, batch_to_xy=xy, test=loader("test"), store=store
        )

    full = callback(tmp_path / "full")
    fit(Net(), 5, [full])

    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        filename="{epoch}",
        save_top_k=-1,
        save_on_train_epoch_end=on_train_epoch_end,
    )
    fit(Net(), 3, [callback(tmp_path / "resumed"), checkpoints])
    resumed = callback(tmp_path / "resumed")
    recorder = Recorder(resumed)
    ckpt_path = tmp_path / "ckpt" / "epoch=2.ckpt"  # Lightning counts epochs from 0
    fit(Net(seed=1), 5, [resumed, recorder], ckpt_path=ckpt_path)

    # The reporter resumes at the trainer's epoch: 3 done, or 2 with epoch 3's hook to come.
    assert recorder.start == ((3, 3) if on_train_epoch_end else (2, 2))
    assert len(recorder.metrics) == (2 if on_train_epoch_end else 3)
    assert resumed.reporter is not None and full.reporter is not None
    assert resumed.reporter.epoch == 5 and resumed.reporter.swa.n_averaged == 5
    swa = dict(resumed.reporter.swa.model.named_parameters())
    for name, expected in full.reporter.swa.model.named_parameters():
        torch.testing.assert_close(swa[name], expected)

    a, b = PredictionStore.open(tmp_path / "full"), PredictionStore.open(tmp_path / "resumed")
    assert a.epochs("local") == b.epochs("local") == [1, 2, 3, 4, 5]
    for epoch in range(1, 6):
        for split in ("val", "test"):
            for variant in ("base", "swa"):
                np.testing.assert_allclose(
                    b.read("local", epoch, split, variant),
                    a.read("local", epoch, split, variant),
                    rtol=1e-5,
                    atol=1e-6,
                )
        assert b.temperatures("local", epoch) == pytest.approx(a.temperatures("local", epoch))
    for key in ("val/swa+ts/nll", "test/swa+ts/nll", "temperature/swa"):
        assert resumed.metrics[key] == pytest.approx(full.metrics[key], rel=1e-5)


def test_a_further_fit_of_the_same_trainer_continues_the_average(tmp_path: Path) -> None:
    posthoc = PostHocLightningCallback({"seed": 0}, batch_to_xy=xy, store=tmp_path)
    recorder = Recorder(posthoc)
    module = Net()
    twice = trainer(2, [posthoc, recorder])
    twice.fit(module, loader("train"), loader("val"))
    twice.fit_loop.max_epochs = 4
    twice.fit(module, loader("train"), loader("val"))
    assert recorder.start == (2, 2)
    reporter = posthoc.reporter
    assert reporter is not None and reporter.epoch == 4 and reporter.swa.n_averaged == 4
    ends = [w for i, w in enumerate(recorder.weights) if i not in (0, 3)]  # not the fit starts
    swa = dict(reporter.swa.model.named_parameters())
    for name, expected in mean_weights(ends).items():
        torch.testing.assert_close(swa[name], expected)
    assert PredictionStore.open(tmp_path).epochs("local") == [1, 2, 3, 4]


def test_resuming_from_a_checkpoint_without_the_callbacks_state_is_refused(
    tmp_path: Path,
) -> None:
    """Without its state the SWA average would silently miss the epochs already trained."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}")
    fit(Net(), 2, [checkpoints])
    posthoc = PostHocLightningCallback({"seed": 0}, batch_to_xy=xy)
    with pytest.raises(RuntimeError, match="reporter has 0 epochs but the trainer starts at"):
        fit(Net(), 3, [posthoc], ckpt_path=tmp_path / "epoch=1.ckpt")


# -- one process only; the optional dependency -------------------------------------------------


def test_more_than_one_process_is_refused() -> None:
    posthoc = PostHocLightningCallback({"seed": 0})
    ddp = cast(pl.Trainer, SimpleNamespace(world_size=2, global_rank=1))
    with pytest.raises(RuntimeError, match=r"world_size=2 \(global rank 1\): every rank would"):
        posthoc.setup(ddp, Net(), "fit")
    posthoc.setup(cast(pl.Trainer, SimpleNamespace(world_size=1, global_rank=0)), Net(), "fit")


# -- real Tune runs ------------------------------------------------------------------------------

SEED_KEY, EPOCHS, GROUP_KEY = "_seed", 3, "val/swa+ens+ts/nll"


def tune_trial(config: dict[str, Any]) -> None:
    posthoc = PostHocLightningCallback(
        config, batch_to_xy=xy, test=loader("test"), seed_key=SEED_KEY
    )
    module = Net(lr=config["lr"], seed=config[SEED_KEY], batchnorm=True)
    trainer(EPOCHS, [posthoc]).fit(module, loader("train"), loader("val"))


@pytest.mark.slow
def test_posthoc_asha_on_the_ensemble_key_with_lightning_trials(run_tune: Any) -> None:
    scheduler = pht.PostHocASHA(max_t=EPOCHS, grace_period=1, reduction_factor=2, seed_key=SEED_KEY)
    results = run_tune(
        tune_trial,
        pht.with_seeds({"lr": tune.grid_search([0.3, 0.003])}, n=2, key=SEED_KEY),
        tune_config={"scheduler": scheduler, "metric": GROUP_KEY, "mode": "min"},
        run_config={"callbacks": [scheduler.callback]},
    )
    assert len(results) == 4 and not results.errors
    store = PredictionStore.open(results.experiment_path)
    groups: dict[str, list[tuple[str, int]]] = {}
    for result in results:
        trial_id, last = result.metrics["trial_id"], int(result.metrics["epoch"])
        groups.setdefault(pht.group_key(result.config, SEED_KEY), []).append((trial_id, last))
        # One Tune result per epoch, holding both Lightning's val_loss and the post-hoc keys,
        # computed on the same weights, and one stored file per epoch. A stopped trial may
        # have stored one epoch more than Tune received: it writes before tune.report and
        # trains on while the driver decides.
        frame = result.metrics_dataframe
        assert list(frame["epoch"]) == list(frame["training_iteration"]) == [*range(1, last + 1)]
        stored = store.epochs(trial_id)
        assert stored == [*range(1, len(stored) + 1)] and last <= len(stored) <= last + 1
        for _, row in frame.iterrows():
            nll = ref.nll(store.read(trial_id, int(row["epoch"]), "val", "base"), Y_VAL)
            assert row["val/base/nll"] == pytest.approx(nll, rel=1e-5)
            assert row["val_loss"] == pytest.approx(nll, rel=1e-4)
            assert math.isfinite(row["val/swa+ts/nll"]) and math.isfinite(row["test/swa+ts/nll"])

    # The ensemble values, recomputed from the store by brute force, rank the groups.
    curves = {}
    for group, members in groups.items():
        common = min(last for _, last in members)
        curves[group] = {
            epoch: ref.nll(
                ref.ensemble(
                    [store.read(t, epoch, "val", "swa") for t, _ in members],
                    [store.read(t, epoch, "val", "swa") for t, _ in members],
                    Y_VAL,
                )[0],
                Y_VAL,
            )
            for epoch in range(1, common + 1)
        }
    for result in results:
        curve = curves[pht.group_key(result.config, SEED_KEY)]
        assert result.metrics[GROUP_KEY] == pytest.approx(curve[max(curve)], rel=1e-3)
    best = results.get_best_result(scope="all")
    assert best.config is not None
    best_group = min(curves, key=lambda group: min(curves[group].values()))
    assert pht.group_key(best.config, SEED_KEY) == best_group


# -- the example ---------------------------------------------------------------------------------


def _example() -> Any:
    return importlib.import_module("examples.lightning_trainable")


def test_lightning_example_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _example().main(["--help"])
    assert exit_info.value.code == 0
    assert "PostHocLightningCallback" in capsys.readouterr().out


@pytest.mark.slow
def test_lightning_example_runs_with_a_small_budget(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--epochs", "2", "--lrs", "0.1", "--width", "16", "--storage", str(tmp_path)]
    results = _example().main(argv)
    assert len(results) == 2 and not results.errors
    store = PredictionStore.open(results.experiment_path)
    for result in results:
        assert store.epochs(result.metrics["trial_id"]) == [1, 2]
        assert math.isfinite(result.metrics["val_loss"])
    out = capsys.readouterr().out
    assert "best by val/swa+ens+ts/nll: lr=0.1" in out


def test_reporter_options_reach_the_reporter_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"unknown reporter options \['swa_start'\]"):
        PostHocLightningCallback({"seed": 0}, swa_start=2)
    posthoc = PostHocLightningCallback(
        {"seed": 0}, batch_to_xy=xy, store=tmp_path, transforms=["base", "ts"]
    )
    fit(Net(), 1, [posthoc])
    assert posthoc.reporter is not None and posthoc.reporter.transforms == ("base", "ts")
    assert math.isnan(posthoc.metrics["val/swa+ts/nll"])
    assert math.isfinite(posthoc.metrics["val/ts/nll"])
