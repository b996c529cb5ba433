"""PostHocTrainerCallback: what it merges into HF's metrics, -100 rows, refusals, and a real
``Trainer.hyperparameter_search(backend="ray")`` with PostHocASHA (the example)."""

from __future__ import annotations

import importlib
import math
import os
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
import torch
from accelerate.state import GradientState
from peft import LoraConfig, get_peft_model
from ray import tune
from torch.utils.data import DataLoader, Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    default_data_collator,
)

import posthoc_tune as pht
from posthoc_tune import PredictionStore
from posthoc_tune.huggingface import PostHocTrainerCallback, posthoc_objective
from tests import reference as ref

VOCAB, LENGTH, CLASSES, EPOCHS = 32, 8, 3, 3


class Rows(Dataset[dict[str, torch.Tensor]]):
    """Token rows labelled by their first token's bucket with label noise; the rows in
    ``unlabelled`` carry -100, as HF marks examples without a label."""

    def __init__(self, n: int, seed: int, unlabelled: tuple[int, ...] = ()) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        self.labels = self.input_ids[:, 0] % CLASSES
        noisy = torch.rand(n, generator=g) < 0.3
        self.labels[noisy] = torch.randint(0, CLASSES, (int(noisy.sum()),), generator=g)
        self.labels[list(unlabelled)] = -100

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    def kept(self) -> tuple[torch.Tensor, np.ndarray]:
        """Inputs and labels of the labelled rows, in order."""
        keep = self.labels != -100
        return self.input_ids[keep], self.labels[keep].numpy()


TRAIN = Rows(96, seed=0)
VAL = Rows(48, seed=1, unlabelled=(0, 7, 30))
TEST = Rows(40, seed=2, unlabelled=(3, 17, 18, 39))


def tiny_config() -> BertConfig:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
    )
    config.num_labels = CLASSES  # a property: not a typed BertConfig argument
    return config


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_config())


def training_args(tmp_path: Path, **kwargs: Any) -> TrainingArguments:
    defaults: dict[str, Any] = {
        "output_dir": str(tmp_path / "hf"),
        "eval_strategy": "epoch",
        "save_strategy": "no",
        "num_train_epochs": EPOCHS,
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 64,  # val in one batch: HF's eval_loss is then its mean
        "report_to": [],
        "disable_tqdm": True,
        "logging_strategy": "no",
        "dataloader_pin_memory": False,  # CPU
    }
    return TrainingArguments(**{**defaults, **kwargs})


class Recorder(TrainerCallback):
    """Copies the metrics of every on_evaluate, after PostHocTrainerCallback (listed first)."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        assert metrics is not None
        self.metrics.append(dict(metrics))


def train(
    tmp_path: Path, posthoc: PostHocTrainerCallback, eval_dataset: Any = VAL, **kwargs: Any
) -> tuple[Trainer, Recorder]:
    recorder = Recorder()
    trainer = Trainer(
        model=tiny_bert(),
        args=training_args(tmp_path, **kwargs),
        train_dataset=TRAIN,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        callbacks=[posthoc, recorder],
    )
    trainer.train()
    assert trainer.model is not None
    return trainer, recorder


def logits_of(model: torch.nn.Module | None, input_ids: torch.Tensor) -> np.ndarray:
    assert model is not None
    model.eval()
    with torch.no_grad():
        return cast(np.ndarray, model(input_ids=input_ids).logits.numpy())


# -- one step per evaluation, merged into HF's metrics ----------------------------------------


def test_each_evaluation_gets_the_post_hoc_metrics_of_its_weights_without_unlabelled_rows(
    tmp_path: Path,
) -> None:
    test_loader = DataLoader(TEST, batch_size=16, collate_fn=default_data_collator)
    posthoc = PostHocTrainerCallback({"seed": 0}, test=test_loader, store=tmp_path)
    trainer, recorder = train(tmp_path, posthoc)

    store = PredictionStore.open(tmp_path)
    (x_val, y_val), (x_test, y_test) = VAL.kept(), TEST.kept()
    np.testing.assert_array_equal(store.labels("val"), y_val)  # -100 rows dropped
    np.testing.assert_array_equal(store.labels("test"), y_test)
    assert store.epochs("local") == [1, 2, 3] and len(recorder.metrics) == EPOCHS
    for epoch, metrics in enumerate(recorder.metrics, start=1):
        # The reporter's epoch replaces HF's fractional one, kept as trainer_epoch; the keys
        # arrive unprefixed, next to HF's own eval_ metrics.
        assert metrics["epoch"] == epoch and metrics["trainer_epoch"] == float(epoch)
        assert not any(key.startswith("eval_val/") for key in metrics)
        base = store.read("local", epoch, "val", "base")
        assert metrics["val/base/nll"] == pytest.approx(ref.nll(base, y_val), rel=1e-5)
        # HF's own loss on the same weights, over the labelled rows (CrossEntropy's -100).
        assert metrics["eval_loss"] == pytest.approx(metrics["val/base/nll"], rel=1e-4)
        temperatures = store.temperatures("local", epoch)
        assert metrics["temperature/swa"] == pytest.approx(temperatures["swa"])
        swa_val = store.read("local", epoch, "val", "swa") / temperatures["swa"]
        assert metrics["val/swa+ts/nll"] == pytest.approx(ref.nll(swa_val, y_val), rel=1e-5)
        test_ts = store.read("local", epoch, "test", "base") / temperatures["base"]
        assert metrics["test/ts/nll"] == pytest.approx(ref.nll(test_ts, y_test), rel=1e-5)
        assert math.isnan(metrics["val/swa+ens+ts/nll"])  # the driver's, in Tune
    # SWA of one epoch is the model itself; the last epoch's stored rows are the final
    # model's logits on the labelled rows, in order.
    np.testing.assert_allclose(
        store.read("local", 1, "val", "swa"), store.read("local", 1, "val", "base"), atol=1e-6
    )
    np.testing.assert_allclose(
        store.read("local", EPOCHS, "test", "base"), logits_of(trainer.model, x_test), atol=1e-5
    )
    np.testing.assert_allclose(
        store.read("local", EPOCHS, "val", "base"), logits_of(trainer.model, x_val), atol=1e-5
    )
    assert posthoc.metrics == {
        k: v for k, v in recorder.metrics[-1].items() if k in posthoc.metrics
    }

    # evaluate() after train() is HF's alone: no step, no post-hoc keys.
    after = trainer.evaluate()
    assert "val/base/nll" not in after and "eval_loss" in after
    assert posthoc.reporter is not None and posthoc.reporter.epoch == EPOCHS
    assert store.epochs("local") == [1, 2, 3]


def test_several_eval_datasets_step_once_per_evaluation_and_the_pair_forms_pass_through(
    tmp_path: Path,
) -> None:
    """The reporter steps at the first dataset's on_evaluate and every dataset's metrics get
    its values; a (input_ids, labels) pair goes to the reporter, which reads .logits."""
    other = Rows(32, seed=3)
    x_test, y_test = TEST.kept()  # the reporter's pairs refuse -100
    posthoc = PostHocTrainerCallback({"seed": 0}, test=(x_test, y_test), store=tmp_path)
    trainer, recorder = train(tmp_path, posthoc, eval_dataset={"a": VAL, "b": other})

    assert posthoc.reporter is not None and posthoc.reporter.epoch == EPOCHS
    store = PredictionStore.open(tmp_path)
    np.testing.assert_array_equal(store.labels("val"), VAL.kept()[1])
    assert len(recorder.metrics) == 2 * EPOCHS
    for epoch in range(1, EPOCHS + 1):
        a, b = recorder.metrics[2 * epoch - 2], recorder.metrics[2 * epoch - 1]
        assert "eval_a_loss" in a and "eval_b_loss" in b
        assert a["epoch"] == b["epoch"] == epoch and a["val/base/nll"] == b["val/base/nll"]
        assert a["eval_a_loss"] == pytest.approx(a["val/base/nll"], rel=1e-4)
    np.testing.assert_allclose(
        store.read("local", EPOCHS, "test", "base"), logits_of(trainer.model, x_test), atol=1e-5
    )


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft
def test_a_lora_models_swa_copy_shares_the_frozen_weights(tmp_path: Path) -> None:
    lora = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    model = get_peft_model(tiny_bert(), lora)
    posthoc = PostHocTrainerCallback({"seed": 0}, store=tmp_path)
    recorder = Recorder()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, num_train_epochs=2),
        train_dataset=TRAIN,
        eval_dataset=VAL,
        data_collator=default_data_collator,
        callbacks=[posthoc, recorder],
    )
    trainer.train()
    assert posthoc.reporter is not None
    swa = dict(posthoc.reporter.swa.model.named_parameters())
    for name, live in model.named_parameters():
        assert (swa[name].data_ptr() == live.data_ptr()) == (not live.requires_grad), name
    x_val, y_val = VAL.kept()
    stored = PredictionStore.open(tmp_path).read("local", 2, "val", "base")
    np.testing.assert_allclose(stored, logits_of(model, x_val), atol=1e-5)
    assert recorder.metrics[-1]["val/base/nll"] == pytest.approx(ref.nll(stored, y_val), rel=1e-5)


# -- what it refuses ---------------------------------------------------------------------------


def test_token_level_labels_are_refused_naming_the_shape(tmp_path: Path) -> None:
    class Tokens(Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = TRAIN.input_ids[i]
            return {"input_ids": ids, "labels": torch.where(ids > 20, -100, ids % CLASSES)}

    torch.manual_seed(0)
    trainer = Trainer(
        model=BertForTokenClassification(tiny_config()),
        args=training_args(tmp_path, num_train_epochs=1),
        train_dataset=Tokens(),
        eval_dataset=Tokens(),
        data_collator=default_data_collator,
        callbacks=[PostHocTrainerCallback({"seed": 0})],
    )
    with pytest.raises(ValueError, match=r"shape \(32, 8\), not one label per row.*per-example"):
        trainer.train()


@pytest.mark.parametrize(
    ("args", "state", "error", "match"),
    [
        ({"eval_strategy": "no"}, {}, ValueError, "eval_strategy='no'"),
        ({"eval_on_start": True}, {}, ValueError, "eval_on_start=True evaluates the untrained"),
        ({}, {"global_step": 5}, RuntimeError, "resumes from a checkpoint at step 5"),
        ({}, {"config": None}, ValueError, "needs the trial's config: pass config="),
    ],
)
def test_runs_it_cannot_serve_are_refused_with_the_reason(
    tmp_path: Path, args: dict[str, Any], state: dict[str, Any], error: type, match: str
) -> None:
    config = state.pop("config", {"seed": 0})
    callback = PostHocTrainerCallback(config)
    with pytest.raises(error, match=match):
        callback.on_train_begin(
            training_args(tmp_path, **args), TrainerState(**state), TrainerControl()
        )


def test_resuming_a_hf_checkpoint_is_refused_before_any_step(tmp_path: Path) -> None:
    """HF restores the step count before on_train_begin; its checkpoints lack the average."""
    train(tmp_path, PostHocTrainerCallback({"seed": 0}), save_strategy="epoch", num_train_epochs=1)
    checkpoint = tmp_path / "hf" / "checkpoint-6"  # 96 rows / 16 per step = 6 steps per epoch
    posthoc = PostHocTrainerCallback({"seed": 0}, store=tmp_path / "store")
    with pytest.raises(RuntimeError, match="resumes from a checkpoint at step 6"):
        Trainer(
            model=tiny_bert(),
            args=training_args(tmp_path, save_strategy="epoch"),
            train_dataset=TRAIN,
            eval_dataset=VAL,
            data_collator=default_data_collator,
            callbacks=[posthoc],
        ).train(resume_from_checkpoint=str(checkpoint))
    assert posthoc.reporter is None and not (tmp_path / "store").exists()


def test_more_than_one_process_is_refused() -> None:
    args = cast(TrainingArguments, SimpleNamespace(world_size=2))
    with pytest.raises(RuntimeError, match="world_size=2: every rank would"):
        PostHocTrainerCallback({"seed": 0}).on_train_begin(args, TrainerState(), TrainerControl())


def test_the_trial_params_of_hyperparameter_search_are_the_default_config(tmp_path: Path) -> None:
    callback = PostHocTrainerCallback(store=tmp_path, seed_key="_seed")
    state = TrainerState()
    state.trial_params = {"_seed": 1, "learning_rate": 0.1}
    callback.on_train_begin(training_args(tmp_path), state, TrainerControl())
    metrics: dict[str, float] = {}
    loader = DataLoader(VAL, batch_size=16, collate_fn=default_data_collator)
    callback.on_evaluate(
        training_args(tmp_path),
        state,
        TrainerControl(),
        metrics,
        model=tiny_bert(),
        eval_dataloader=loader,
    )
    meta = PredictionStore.open(tmp_path).metadata("local")
    assert meta["seed"] == 1 and meta["config"] == {"_seed": 1, "learning_rate": 0.1}
    assert metrics["epoch"] == 1 and math.isfinite(metrics["val/base/nll"])


# -- the objective; the optional dependency -----------------------------------------------------


def test_posthoc_objective_reads_a_per_trial_key_and_refuses_group_keys() -> None:
    objective = posthoc_objective("val/swa+ts/nll")
    assert objective({"val/swa+ts/nll": 0.5, "eval_loss": 0.9}) == 0.5
    assert pickle.loads(pickle.dumps(objective))({"val/swa+ts/nll": 0.25}) == 0.25  # Ray pickles
    with pytest.raises(KeyError, match="add PostHocTrainerCallback"):
        objective({"eval_loss": 0.9})
    with pytest.raises(ValueError, match="group key, NaN in a trial's own metrics"):
        posthoc_objective("val/swa+ens+ts/nll")
    with pytest.raises(ValueError, match="not of the form 'split/transform/metric'"):
        posthoc_objective("eval_loss")


# -- hyperparameter_search(backend="ray") with PostHocASHA: the example ------------------------


def _example() -> Any:
    return importlib.import_module("examples.hf_trainer")


def test_hf_example_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _example().main(["--help"])
    assert exit_info.value.code == 0
    assert "PostHocTrainerCallback" in capsys.readouterr().out


@pytest.mark.slow
def test_hyperparameter_search_with_posthoc_asha_on_the_ensemble_key(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """2 configurations x 2 seeds through HF's Ray backend: one Tune result and one stored
    file per evaluation, the post-hoc keys in HF's report, distinct members, and group values
    equal to a brute-force ensemble of the stored logits."""
    # Earlier tests' Trainers left weakrefs to their train loaders in Accelerate's process-wide
    # GradientState, which the search pickles with the trainer: clear them, as a fresh process is.
    GradientState().dataloader_references = [None]
    example = _example()
    argv = ["--epochs", "3", "--lrs", "3e-4", "3e-3", "--train-rows", "256"]
    best = example.main([*argv, "--storage", str(tmp_path)])
    grid = tune.ResultGrid(best.run_summary)
    assert len(grid) == 4 and not grid.errors
    trials = []
    for i in range(len(grid)):
        config, metrics, frame = grid[i].config, grid[i].metrics, grid[i].metrics_dataframe
        assert config is not None and metrics is not None and frame is not None
        trials.append((config, metrics, frame))
    store = PredictionStore.open(grid.experiment_path)
    y_val = store.labels("val")
    np.testing.assert_array_equal(y_val, example.TokenSequences(256, seed=1, noise=0.3).labels)
    seed_key, group_key = example.SEED_KEY, example.METRIC
    groups: dict[str, list[tuple[str, int]]] = {}
    for config, metrics, frame in trials:
        trial_id, last = metrics["trial_id"], int(metrics["epoch"])
        groups.setdefault(pht.group_key(config, seed_key), []).append((trial_id, last))
        assert store.metadata(trial_id)["seed"] == config[seed_key]
        # One result per evaluation (HF's report, carrying the post-hoc keys), and exactly one
        # file per stored epoch; a stopped trial may have stored one epoch more than Tune got.
        assert list(frame["epoch"]) == list(frame["training_iteration"]) == [*range(1, last + 1)]
        stored = store.epochs(trial_id)
        assert stored == [*range(1, len(stored) + 1)] and last <= len(stored) <= last + 1
        files = os.listdir(Path(grid.experiment_path) / "posthoc" / "logits" / trial_id)
        assert sorted(files) == [f"epoch_{e:06d}.parquet" for e in stored]
        for _, row in frame.iterrows():
            epoch = int(row["epoch"])
            nll = ref.nll(store.read(trial_id, epoch, "val", "base"), y_val)
            assert row["val/base/nll"] == pytest.approx(nll, rel=1e-5)
            assert row["eval_loss"] == pytest.approx(nll, rel=1e-4)  # HF's, same weights
            assert row["objective"] == row["val/swa+ts/nll"]  # posthoc_objective
            assert math.isfinite(row["test/swa+ts/nll"])

    curves = {}
    for group, members in groups.items():
        assert len(members) == 2
        # Seeded from the trial in model_init: the members are different models.
        first = [store.read(t, 1, "val", "base") for t, _ in members]
        assert not np.allclose(first[0], first[1])
        common = min(last for _, last in members)
        curves[group] = {
            epoch: ref.nll(
                ref.ensemble(
                    [store.read(t, epoch, "val", "swa") for t, _ in members],
                    [store.read(t, epoch, "val", "swa") for t, _ in members],
                    y_val,
                )[0],
                y_val,
            )
            for epoch in range(1, common + 1)
        }
    for config, metrics, _ in trials:
        curve = curves[pht.group_key(config, seed_key)]
        assert metrics[group_key] == pytest.approx(curve[max(curve)], rel=1e-3)
    # HF's BestRun: the trial with the lowest last val/swa+ts/nll (RAY_SCOPE "last").
    final = {metrics["trial_id"]: metrics["val/swa+ts/nll"] for _, metrics, _ in trials}
    assert best.run_id == min(final, key=lambda t: final[t])
    assert best.objective == pytest.approx(min(final.values()))
    assert "val/swa+ens+ts/nll" in capsys.readouterr().out  # the leaderboard


def test_reporter_options_pass_through_and_unknown_ones_are_refused() -> None:
    callback = PostHocTrainerCallback({"seed": 0}, transforms=["base", "swa"], swa_start_epoch=2)
    assert callback._reporter_kwargs == {"transforms": ["base", "swa"], "swa_start_epoch": 2}
    with pytest.raises(
        TypeError, match=r"PostHocTrainerCallback got unknown reporter options \['seed_keyy'\]"
    ):
        PostHocTrainerCallback({"seed": 0}, seed_keyy="run/seed")
    with pytest.raises(TypeError, match=r"unknown reporter options \['report'\]"):
        PostHocTrainerCallback({"seed": 0}, report=True)  # the callback reports through HF
