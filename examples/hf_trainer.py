"""Tune a Hugging Face Trainer on post-hoc metrics with PostHocTrainerCallback.

The model, datasets and Trainer below are ordinary Hugging Face. posthoc_tune adds one callback:
at every evaluation it folds the weights into the SWA average, evaluates, fits temperature
scaling, stores the logits and adds the post-hoc keys to the evaluation's metrics, which the
Trainer reports to Ray Tune itself. ``Trainer.hyperparameter_search(backend="ray")`` runs each
configuration as several seeds (``with_seeds`` in the ``hp_space``), PostHocASHA prunes whole
seed groups on the ensemble's post-hoc loss ``val/swa+ens+ts/nll``, and HF's ``BestRun`` is
chosen by the per-trial post-hoc loss ``val/swa+ts/nll`` (``posthoc_objective``).

Offline: a tiny BERT built from a config (no download) classifies synthetic token sequences
(the label is the first token's bucket) with 30% symmetric label noise:

    python examples/hf_trainer.py --epochs 4
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import torch
from ray import tune
from torch.utils.data import DataLoader, Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import BestRun

import posthoc_tune as pht
from posthoc_tune.huggingface import PostHocTrainerCallback, posthoc_objective

SEED_KEY = "_seed"  # sorts first in the grid, so a configuration's seeds start together
METRIC = "val/swa+ens+ts/nll"  # PostHocASHA prunes groups on it
OBJECTIVE = "val/swa+ts/nll"  # HF's BestRun: a per-trial key
VOCAB, LENGTH, CLASSES = 48, 16, 3


class TokenSequences(Dataset[dict[str, torch.Tensor]]):
    """Random token sequences labelled by the bucket (id mod 3) of their first token, a fraction
    of the labels replaced by uniform noise; rows are dicts, as tokenizers give them."""

    def __init__(self, n: int, seed: int, noise: float) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        self.labels = self.input_ids[:, 0] % CLASSES
        noisy = torch.rand(n, generator=g) < noise
        self.labels[noisy] = torch.randint(0, CLASSES, (int(noisy.sum()),), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def model_init(trial: dict[str, Any] | None) -> BertForSequenceClassification:
    """A fresh tiny BERT. ``train()`` seeds with ``args.seed`` before calling this, the same for
    every trial, so the member's seed must come from the trial (the Tune config with the Ray
    backend; None when the Trainer is built): otherwise all seeds of a group are one model."""
    set_seed(0 if trial is None else pht.member_seed(trial, SEED_KEY))
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
    )
    config.num_labels = CLASSES  # a property: not a typed BertConfig argument
    return BertForSequenceClassification(config)


def main(argv: Sequence[str] | None = None) -> BestRun:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 3e-3])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--train-rows", type=int, default=512)
    parser.add_argument("--storage", default="example_output")
    args = parser.parse_args(argv)

    storage = os.path.abspath(args.storage)
    test = TokenSequences(256, seed=2, noise=0.3)
    trainer = Trainer(
        model_init=model_init,
        args=TrainingArguments(
            output_dir=os.path.join(storage, "hf_trainer_output"),
            eval_strategy="epoch",  # one evaluation, so one post-hoc step and result, per epoch
            save_strategy="no",
            per_device_train_batch_size=32,
            per_device_eval_batch_size=128,
            report_to=[],
            disable_tqdm=True,
        ),
        train_dataset=TokenSequences(args.train_rows, seed=0, noise=0.3),
        eval_dataset=TokenSequences(256, seed=1, noise=0.3),  # val: the trainer's eval loader
        data_collator=default_data_collator,
        # posthoc_tune: config=None takes the trial's Tune config; a plain DataLoader for test
        # (trainer.get_test_dataloader's Accelerate loader does not pickle into Ray's trials).
        callbacks=[
            PostHocTrainerCallback(
                test=DataLoader(test, batch_size=128, collate_fn=default_data_collator),
                seed_key=SEED_KEY,
            )
        ],
    )
    scheduler = pht.PostHocASHA(
        metric=METRIC,
        mode="min",
        max_t=args.epochs,
        grace_period=1,
        reduction_factor=2,
        seed_key=SEED_KEY,
        run_ahead=None,  # the Trainer cannot resume the SWA average: never pause members
    )
    space = {"learning_rate": tune.grid_search(args.lrs), "num_train_epochs": args.epochs}
    best = trainer.hyperparameter_search(
        hp_space=lambda _: pht.with_seeds(space, n=args.seeds, key=SEED_KEY),
        compute_objective=posthoc_objective(OBJECTIVE),
        n_trials=1,  # Tune samples: the grid already holds every configuration x seed
        direction="minimize",
        backend="ray",
        # The rest goes to ray.tune.run as it is:
        scheduler=scheduler,
        callbacks=[scheduler.callback],  # scheduler state and ensemble values in results
        storage_path=storage,
        name="hf_trainer",
        resources_per_trial={"cpu": 1},
        reuse_actors=True,  # one transformers import per worker, not per trial
        verbose=0,
    )
    assert isinstance(best, BestRun) and best.run_summary is not None
    print(f"best trial by {OBJECTIVE}: {best.hyperparameters} ({best.objective:.4f})")
    board = pht.leaderboard(best.run_summary.experiment_path, metric=METRIC)
    print(board.to_string(index=False))
    return best


if __name__ == "__main__":
    main()
