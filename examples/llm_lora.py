"""Instruction-tune a tiny GPT-2 with LoRA and select it post hoc: choice and token metrics.

The paper's language-model setting (LoRA instruction tuning, scored by MMLU-style multiple
choice, several seeds per configuration) at toy scale, offline, on 2 CPU cores. Everything
here is synthetic and built in memory, nothing is downloaded:

* the language: a word-level vocabulary of 85 tokens (four categories of 16 words: fruits,
  animals, colours, tools; the option letters A-D; a few function words), tokenized by a
  ``tokenizers`` WordLevel model wrapped in ``transformers.PreTrainedTokenizerFast``;
* the "pretrained" model: a 2-layer GPT-2 (width 48) built from a ``GPT2Config`` and trained
  for a few seconds in the driver, once, as a next-token model of the language: category facts
  ("plum is a fruit.") and multiple-choice prompts in the task's format whose answer letters
  are random (it learns the format and the facts, not the task);
* the instruction task: "Question: which of these is a fruit?" with four options, one fruit
  and three words of the other categories, in random order; the answer is the fruit's letter,
  a deterministic function of the prompt. 35% of the fine-tuning answers are wrong (symmetric
  noise: a wrong letter drawn uniformly from the other three); the val and test answers are
  clean. The last 4 words of each category occur in val and test only, never in pretraining or
  fine-tuning: as a benchmark asks about things a model never learnt, no model answers every
  question, so val is not separable and temperature scaling stays finite (with every question
  answerable, TS drives the clean val NLL to 0 and selection by NLL means nothing).

Each trial wraps the pretrained model with peft LoRA on the attention projections (``c_attn``)
and fine-tunes the adapters on the training prompts and their (noisy) answer letters, the
causal-LM loss on the answer token alone. ``posthoc_tune.llm.MultipleChoice`` turns the model's
next-token logits of " A".." D" after "Answer:" into 4-class choice logits, so the reporter
computes choice NLL and error for the base model, SWA (of the adapters only: the frozen base is
shared), TS and the seed ensembles like for any classifier. The same clean val and test
examples, as causal-LM batches scored on the response (the answer letter, over the whole
vocabulary), are the reporter's ``tokens=`` splits: it also reports perplexity and next-token
error (``posthoc_tune.tokens``), storing 60 numbers per scored token instead of the
vocabulary's logits. PostHocASHA prunes whole seed groups on the ensemble's post-hoc loss
``val/swa+ens+ts/nll``; at the end two selection tables compare naive with post-hoc selection
(choice NLL and error; perplexity and next-token error), and the post-hoc pick's seeds, rebuilt
from their checkpoints, are evaluated as a token-level SWA ensemble
(``posthoc_tune.tokens.evaluate_ensemble``).

The loop is plain PyTorch, not the Hugging Face Trainer: an epoch here takes a fraction of a
second, so a plain loop keeps the per-epoch overhead small (the whole run takes about half a
minute on 2 idle cores, Ray's start-up included), and it shows the reporter's three lines
directly. The Trainer integration (``PostHocTrainerCallback``) is in ``examples/hf_trainer.py``.

    python examples/llm_lora.py                                   # about 30 s on 2 idle cores
    python examples/llm_lora.py --epochs 6 --pretrain-steps 100   # a smoke run

The real recipe (not run here)
------------------------------

The paper's setting is LLaMA-2-7B instruction-tuned on Guanaco with LoRA, evaluated by
perplexity, causal-LM error and MMLU, with 8 runs per configuration. Its fine-tuning
hyperparameters were not released; ``search_spaces/llm_lora.py`` takes QLoRA's recipe for this
model and data as the centre of a search space (its docstring gives the numbers and sources).
To run it, on GPUs and with downloads (the model is gated: accept its licence on the Hub and log
in), change this file as follows:

1. Tokenizer: ``AutoTokenizer.from_pretrained("meta-llama/Llama-2-7b-hf")`` with
   ``tokenizer.pad_token = tokenizer.eos_token``, instead of ``build_tokenizer()``.
2. Model: drop ``pretrain()`` and the state dict passed with ``tune.with_parameters``; in the
   trial, ``AutoModelForCausalLM.from_pretrained(config["model"], torch_dtype=torch.bfloat16,
   device_map={"": 0})`` (QLoRA's way: ``quantization_config=BitsAndBytesConfig(
   load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)``, then
   ``peft.prepare_model_for_kbit_training(model)``).
3. LoRA: ``LoraConfig(r=config["lora_r"], lora_alpha=config["lora_alpha"],
   lora_dropout=config["lora_dropout"], target_modules=["q_proj", "k_proj", "v_proj",
   "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")``: LLaMA's linear
   layers are ``nn.Linear``, so no ``fan_in_fan_out``.
4. Training data: ``datasets.load_dataset("timdettmers/openassistant-guanaco")``, its
   ``"text"`` conversations tokenized as causal-LM examples (``labels = input_ids`` with the
   padding at -100), batches of ``config["batch_size"]`` (16; gradient accumulation where it
   does not fit), ``AdamW(lr=config["lr"], weight_decay=config["weight_decay"])``,
   ``transformers.get_constant_schedule_with_warmup`` over ``config["warmup_ratio"]`` of the
   steps, ``clip_grad_norm_(trainable, config["max_grad_norm"])``; ``checkpoint={"optimizer":
   opt, "scheduler": sched}``. With 3 epochs, call ``reporter.step()`` every few hundred
   optimiser steps, not once per epoch, so that selection has checkpoints to choose from.
5. MMLU instead of the synthetic questions: ``load_dataset("cais/mmlu", "all")``, its
   ``"validation"`` split for ``val`` and ``"test"`` for ``test``, each as
   ``MultipleChoice(tokenizer, rows["question"], rows["choices"], rows["answer"],
   scoring="letters")`` (for the usual 5-shot score, prepend each subject's 5 ``"dev"``
   questions with their answers to the question text). Letters scoring needs " A".." D" to be
   one token each, and ``MultipleChoice`` refuses a tokenizer for which they are not: check
   that first (SentencePiece tokenizers may encode the leading space as a token of its own).
6. Perplexity and causal-LM (next-token) error on held-out Guanaco conversations: pass
   ``tokens={"val": val_loader, "test": test_loader}`` to the reporter, loaders of tokenized
   conversations (``input_ids``, ``attention_mask``, ``labels`` with -100 on padding, and on
   the human turns to score the responses only); e.g. 2,000 held-out conversations. The
   records are computed on the GPU batch by batch (60 numbers per token are stored, not 32,000
   logits); rank on ``val/swa+ts/perplexity`` or keep ranking on MMLU and read perplexity in
   ``selection_table(path, metrics=("token_nll", "perplexity", "token_error"))``.
7. Search: ``param_space=lora_space()`` (``search_spaces.llm_lora``: rank, alpha, dropout and
   lr are random domains, so let ``pht.PostHocSearch(metric=METRIC, mode="min", n_seeds=8)``
   add the seeds instead of ``with_seeds``), ``num_samples=configurations * 8``,
   ``tune.with_resources(train, {"cpu": 8, "gpu": 1})``, ``max_concurrent_trials`` = the GPUs,
   ``callbacks=[pht.PostHocCallback(scheduler, searcher)]``, and ``storage_path`` on storage
   every node reaches (NFS, S3, GCS).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from ray import tune
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import posthoc_tune as pht
from posthoc_tune import tokens as tok
from posthoc_tune.curves import configurations
from posthoc_tune.display import leaderboard_view, render, selection_view
from posthoc_tune.llm import LETTERS, MultipleChoice
from posthoc_tune.reporter import STATE_FILE
from posthoc_tune.tokens import evaluate_ensemble

METRIC = "val/swa+ens+ts/nll"  # PostHocASHA prunes seed groups on it
TOKEN_METRICS = ("token_nll", "perplexity", "token_error")
SEED_KEY = "seed"
N_OPTIONS = 4


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


CATEGORIES = {
    "fruit": _words(
        "apple pear plum grape lemon cherry peach mango melon lime kiwi fig date olive berry banana"
    ),
    "animal": _words(
        "cat dog horse cow sheep goat pig mouse lion tiger bear wolf fox deer rabbit duck"
    ),
    "color": _words(
        "red blue green yellow purple black white brown grey pink gold silver violet cyan teal navy"
    ),
    "tool": _words(
        "hammer saw drill wrench chisel spade rake axe knife file clamp pliers ladder "
        "shovel hoe vice"
    ),
}
UNSEEN = 4  # the last words of each category: in val and test only, never in any training
TARGET = "fruit"  # the category the question asks for
QUESTION = f"Question: which of these is a {TARGET}?"
FUNCTION_WORDS = ("Question", "Answer", "which", "of", "these", "is", "a", "an", ":", ".", "?")


# -- the synthetic language -----------------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of the whole language; " A".." D" are single tokens."""
    words = [w for category, members in CATEGORIES.items() for w in (category, *members)]
    vocab = ["[PAD]", "[UNK]", *LETTERS[:N_OPTIONS], *FUNCTION_WORDS, *words]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()  # "Answer:" -> "Answer", ":"
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", pad_token="[PAD]")


@dataclass(frozen=True)
class Questions:
    """Multiple-choice questions: four options each, exactly one of them a fruit."""

    questions: list[str]
    options: list[list[str]]
    answers: list[int]  # the fruit's index: the clean answers


def fruit_index(options: Sequence[str]) -> int:
    """The rule: the index of the option that is a fruit."""
    return [o in CATEGORIES[TARGET] for o in options].index(True)


def make_questions(n: int, rng: np.random.Generator, unseen: bool) -> Questions:
    """``n`` questions; their words drawn from every word (``unseen=True``: val and test) or
    from those that training may see (pretraining and fine-tuning)."""
    words = {c: members[: None if unseen else -UNSEEN] for c, members in CATEGORIES.items()}
    others = [w for c, members in words.items() if c != TARGET for w in members]
    options = []
    for _ in range(n):
        row = [str(w) for w in rng.choice(others, N_OPTIONS - 1, replace=False)]
        row.insert(int(rng.integers(N_OPTIONS)), str(rng.choice(words[TARGET])))
        options.append(row)
    return Questions([QUESTION] * n, options, [fruit_index(o) for o in options])


def symmetric_noise(answers: Sequence[int], rate: float, rng: np.random.Generator) -> np.ndarray:
    """Each answer replaced, with probability ``rate``, by one of the other options, uniformly."""
    noisy = np.asarray(answers, dtype=np.int64).copy()
    flip = rng.random(len(noisy)) < rate
    noisy[flip] = (noisy[flip] + rng.integers(1, N_OPTIONS, int(flip.sum()))) % N_OPTIONS
    return noisy


def pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and their attention mask."""
    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


@dataclass(frozen=True)
class Task:
    """What every trial gets: the pretrained model and the three splits."""

    model_config: GPT2Config
    pretrained: dict[str, torch.Tensor]  # the pretrained GPT-2's state dict
    questions: dict[str, Questions]  # "train", "val", "test", with their clean answers
    train_answers: np.ndarray  # the training answers, noisy: what the trials learn from
    input_ids: torch.Tensor  # training prompts + their (noisy) answer letter, right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # the answer letter's id at its position, -100 elsewhere
    val: MultipleChoice  # clean answers
    test: MultipleChoice
    tokens: dict[str, list[dict[str, torch.Tensor]]]  # val and test as causal-LM batches


def training_tensors(
    tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], answers: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + answer letter as causal-LM examples whose loss is on the letter alone."""
    letters = [tokenizer.encode(f" {x}", add_special_tokens=False)[0] for x in LETTERS]
    rows = [
        [*tokenizer.encode(p, add_special_tokens=False), letters[a]]
        for p, a in zip(prompts, answers, strict=True)
    ]
    ids, mask = pad(rows, tokenizer.pad_token_id)
    labels = torch.full_like(ids, -100)
    ends = torch.tensor([len(r) - 1 for r in rows])
    labels[torch.arange(len(rows)), ends] = ids[torch.arange(len(rows)), ends]
    return ids, mask, labels


# -- pretraining (once, in the driver) -------------------------------------------------------------


def gpt2_config(vocab_size: int) -> GPT2Config:
    """A 2-layer, 2-head GPT-2 of width 48; no dropout (a tiny model, few epochs)."""
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=32,
        n_embd=48,
        n_layer=2,
        n_head=2,
        n_inner=96,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )


def pretraining_texts(
    tokenizer: PreTrainedTokenizerFast, n: int, rng: np.random.Generator
) -> list[str]:
    """The pretraining corpus: lines of four category facts, and multiple-choice prompts in the
    task's format answered by a random letter (the format is learnt, the rule is not)."""
    facts = [
        f"{word} is {'an' if category[0] in 'aeiou' else 'a'} {category}."
        for category, members in CATEGORIES.items()
        for word in members[:-UNSEEN]
    ]
    lines = [" ".join(str(f) for f in rng.choice(facts, 4)) for _ in range(n // 2)]
    questions = make_questions(n - n // 2, rng, unseen=False)
    prompts = MultipleChoice(
        tokenizer, questions.questions, questions.options, questions.answers
    ).prompts
    return lines + [f"{p} {LETTERS[rng.integers(N_OPTIONS)]}" for p in prompts]


def pretrain(
    tokenizer: PreTrainedTokenizerFast, steps: int, seed: int = 0
) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """Train a GPT-2 from scratch as a next-token model of the synthetic language."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = gpt2_config(len(tokenizer))
    model = GPT2LMHeadModel(config)
    texts = pretraining_texts(tokenizer, 4000, rng)
    rows = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    ids, mask = pad(rows, tokenizer.pad_token_id)
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(ids), (64,), generator=g)
        loss = model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return config, {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_task(n_train: int, n_eval: int, noise: float, pretrain_steps: int, seed: int = 0) -> Task:
    """The pretrained model, the noisy training split and clean val and test splits."""
    tokenizer = build_tokenizer()
    config, state = pretrain(tokenizer, pretrain_steps, seed)
    rng = np.random.default_rng(seed + 1)
    train = make_questions(n_train, rng, unseen=False)
    val, test = make_questions(n_eval, rng, unseen=True), make_questions(n_eval, rng, unseen=True)
    noisy = symmetric_noise(train.answers, noise, rng)
    prompts = MultipleChoice(tokenizer, train.questions, train.options, noisy.tolist()).prompts
    ids, mask, labels = training_tensors(tokenizer, prompts, noisy)

    def split(q: Questions) -> MultipleChoice:
        return MultipleChoice(
            tokenizer, q.questions, q.options, q.answers, scoring="letters", batch_size=128
        )

    def token_batches(choice: MultipleChoice) -> list[dict[str, torch.Tensor]]:
        """The clean examples as causal-LM batches scored on the answer letter."""
        ids, mask, labels = training_tensors(tokenizer, choice.prompts, choice.labels)
        keys = ("input_ids", "attention_mask", "labels")
        return [
            dict(zip(keys, (t[i : i + 128] for t in (ids, mask, labels)), strict=True))
            for i in range(0, len(ids), 128)
        ]

    questions = {"train": train, "val": val, "test": test}
    choices = {"val": split(val), "test": split(test)}
    tokens = {name: token_batches(choice) for name, choice in choices.items()}
    return Task(
        config, state, questions, noisy, ids, mask, labels, choices["val"], choices["test"], tokens
    )


# -- the trial ------------------------------------------------------------------------------------


def lora_model(config: dict[str, Any], task: Task) -> torch.nn.Module:
    """The pretrained GPT-2 with fresh LoRA adapters (seeded by the trial's seed) on c_attn."""
    torch.manual_seed(config[SEED_KEY])
    base = GPT2LMHeadModel(task.model_config)
    base.load_state_dict(task.pretrained)
    lora = LoraConfig(
        r=config["lora_r"],
        lora_alpha=config["lora_alpha"],
        target_modules=["c_attn"],
        lora_dropout=0.0,
        fan_in_fan_out=True,  # GPT-2's Conv1D stores its weight transposed
        task_type="CAUSAL_LM",
    )
    model: torch.nn.Module = get_peft_model(base, lora)
    return model


def train(config: dict[str, Any], task: Task) -> None:
    """Plain PyTorch fine-tuning of the adapters; the reporter is the only addition."""
    model = lora_model(config, task)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["lr"])
    reporter = pht.PostHocReporter(  # posthoc_tune (1/3): SWA averages the adapters only
        model,
        config,
        val=task.val.split,  # (predict, labels): choice logits of " A".." D" after "Answer:"
        test=task.test.split,
        tokens=task.tokens,  # causal-LM batches: perplexity and next-token error
        # Adapters, SWA average and optimizer, for retries: every 5 epochs (an epoch takes a
        # fraction of a second; Tune keeps every checkpoint, about 100 kB each).
        checkpoint={"optimizer": opt},
        checkpoint_every=5,
    )
    n = len(task.input_ids)
    for epoch in range(reporter.epoch, config["epochs"]):  # posthoc_tune (2/3)
        # The epoch's order depends on seed and epoch only: a retry resumes it exactly.
        g = torch.Generator().manual_seed(1000 * config[SEED_KEY] + epoch)
        model.train()
        total = 0.0
        for batch in torch.randperm(n, generator=g).split(config["batch_size"]):
            loss = model(
                input_ids=task.input_ids[batch],
                attention_mask=task.attention_mask[batch],
                labels=task.labels[batch],
            ).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        reporter.step({"train/loss": total / n})  # posthoc_tune (3/3)


# -- the search -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> tune.ResultGrid:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=2, help="seeds (ensemble members) each")
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=[3e-3, 1e-2], help="one config each"
    )
    parser.add_argument("--noise", type=float, default=0.35, help="training answers' noise")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--train-questions", type=int, default=256)
    parser.add_argument("--eval-questions", type=int, default=256, help="val and test each")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--grace-period", type=int, default=4)
    parser.add_argument("--storage", default="example_output")
    args = parser.parse_args(argv)
    if not 0 <= args.noise < 1 - 1 / N_OPTIONS:
        parser.error(
            f"--noise must be in [0, 0.75), the right answer the most common, got {args.noise}"
        )
    if not 1 <= args.grace_period <= args.epochs:
        parser.error(f"--grace-period ({args.grace_period}) must be in [1, --epochs]")

    start = time.perf_counter()
    task = make_task(args.train_questions, args.eval_questions, args.noise, args.pretrain_steps)
    pretrained = GPT2LMHeadModel(task.model_config)
    pretrained.load_state_dict(task.pretrained)
    before = np.mean(task.val.predict(pretrained.eval()).argmax(1) != task.val.labels)
    wrong = np.mean(task.train_answers != task.questions["train"].answers)
    print(
        f"pretrained in {time.perf_counter() - start:.0f} s: val choice error {before:.3f} "
        f"(chance {1 - 1 / N_OPTIONS:.2f}); {wrong:.0%} of the training answers are wrong"
    )
    scheduler = pht.PostHocASHA(
        metric=METRIC,
        mode="min",
        max_t=args.epochs,
        grace_period=args.grace_period,
        reduction_factor=2,
        seed_key=SEED_KEY,
        time_attr="epoch",  # the reporter's epoch, which a retry resumes from its checkpoint
        # Epochs take a fraction of a second, less than a pause/resume (a new actor): seeds
        # ahead of their group train on instead of pausing.
        run_ahead=None,
    )
    space = {
        "lr": tune.grid_search(args.lrs),
        "lora_r": args.lora_r,
        "lora_alpha": 2 * args.lora_r,
        "batch_size": 32,
        "epochs": args.epochs,
    }
    tuner = tune.Tuner(
        tune.with_parameters(train, task=task),
        param_space=pht.with_seeds(space, n=args.seeds, key=SEED_KEY),
        tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True),
        run_config=tune.RunConfig(
            name="llm_lora",
            storage_path=os.path.abspath(args.storage),
            callbacks=[scheduler.callback],  # scheduler state and ensemble values in results
            failure_config=tune.FailureConfig(max_failures=1),  # retried from its checkpoint
            verbose=0,
        ),
    )
    results = tuner.fit()

    store = pht.PredictionStore.open(results.experiment_path)
    groups = configurations(store)
    table = pht.selection_table(store, over="configs+epochs")
    epochs_run = int(results.get_dataframe()["training_iteration"].sum())
    budget = len(args.lrs) * args.seeds * args.epochs
    print(
        f"\n{len(groups)} configurations x {args.seeds} seeds, PostHocASHA on {METRIC}: "
        f"{epochs_run} of {budget} epochs trained; {time.perf_counter() - start:.0f} s.\n"
    )
    print("Naive vs post-hoc selection, choice NLL and error on the clean test answers:\n")
    print(render(selection_view(table, groups), "md"))
    tokens = pht.selection_table(store, over="configs+epochs", metrics=TOKEN_METRICS)
    print("\nThe same, token-level: NLL, perplexity and next-token error of the answers:\n")
    print(render(selection_view(tokens, groups), "md"))
    print(f"\nConfigurations ranked by {METRIC} (naive rank beside):\n")
    board = pht.leaderboard(store, METRIC)
    print(render(leaderboard_view(board, groups), "md"))
    print_token_ensemble(results, board.loc[0, "group"], task)
    return results


def swa_models(results: tune.ResultGrid, group: str, task: Task) -> tuple[list[Any], set[int]]:
    """The SWA models of a configuration's seeds, rebuilt from their last checkpoints (the
    adapters' average on the pretrained base), and the epochs of those checkpoints."""
    models, epochs = [], set()
    for result in (results[i] for i in range(len(results))):
        config = result.config or {}
        if pht.group_key(config, SEED_KEY) != group or result.checkpoint is None:
            continue
        with result.checkpoint.as_directory() as directory:
            state = torch.load(os.path.join(directory, STATE_FILE), weights_only=True)
        swa = pht.WeightAverager(lora_model(config, task))
        swa.load_state_dict(state["swa"])
        models.append(swa.model)
        epochs.add(int(state["epoch"]))
    return models, epochs


def print_token_ensemble(results: tune.ResultGrid, group: str, task: Task) -> None:
    """Token-level ensembles cannot come from stored records: evaluate the leader's seeds'
    SWA models together (exact), beside each one's SWA+TS."""
    models, epochs = swa_models(results, group, task)
    if len(models) < 2 or len(epochs) != 1:
        print(f"\n(no common checkpoint epoch of the leader's seeds: {sorted(epochs)})")
        return
    val, test = task.tokens["val"], task.tokens["test"]
    ensemble = evaluate_ensemble(models, val, test, transform="swa+ens+ts")
    singles = [
        tok.score(
            "swa+ts",
            tok.TokenParts(
                {s: tok.TokenSplit(s, b).records(m) for s, b in (("val", val), ("test", test))},
                None,
            ),
        )
        for m in models
    ]
    single = np.mean([v["test/swa+ts/perplexity"] for v in singles])
    print(
        f"\nThe leader's {len(models)} seeds at their last checkpoint (epoch {epochs.pop()}), "
        f"token-level test perplexity: SWA+TS members {single:.4f} (mean), their SWA ensemble "
        f"+ TS {ensemble['test/swa+ens+ts/perplexity']:.4f}"
    )


if __name__ == "__main__":
    main()
