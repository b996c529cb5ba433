"""examples/llm_lora.py: the synthetic task it builds, and a real Tune run with a small budget.

The run's stored choice logits, reported metrics, ensemble values and checkpoints are checked
against recomputations from the store and from the example's own building blocks (a fresh LoRA
model on the same pretrained weights), not against the library's code paths.
"""

import importlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

import posthoc_tune as pht
from posthoc_tune import PredictionStore
from posthoc_tune.reporter import STATE_FILE
from tests import reference as ref

GROUP_KEY = "val/swa+ens+ts/nll"
# Small: the run costs Ray's start-up and each worker's transformers import, not training.
N_TRAIN, N_EVAL, NOISE, PRETRAIN_STEPS, EPOCHS = 128, 64, 0.35, 50, 5


def _example() -> Any:
    return importlib.import_module("examples.llm_lora")


def _fruit(options: list[str], fruits: set[str]) -> int:
    """The task's rule, written out: the index of the one option that is a fruit."""
    (index,) = [i for i, o in enumerate(options) if o in fruits]
    return index


def test_the_task_has_clean_eval_answers_noisy_training_answers_and_unseen_words() -> None:
    ex = _example()
    task = ex.make_task(n_train=4000, n_eval=500, noise=NOISE, pretrain_steps=0)
    fruits = set(ex.CATEGORIES["fruit"])
    unseen = {w for members in ex.CATEGORIES.values() for w in members[-ex.UNSEEN :]}
    train, val, test = (task.questions[s] for s in ("train", "val", "test"))
    for split, questions in (("val", val), ("test", test)):
        clean = [_fruit(o, fruits) for o in questions.options]
        assert questions.answers == clean
        assert list(getattr(task, split).labels) == clean
        assert unseen & {w for o in questions.options for w in o}  # asked about in eval only
    assert not unseen & {w for o in train.options for w in o}
    # Symmetric noise: about NOISE of the answers wrong, each wrong letter equally likely.
    truth = np.array([_fruit(o, fruits) for o in train.options])
    assert train.answers == list(truth)  # the questions keep the clean answers
    wrong = task.train_answers != truth
    assert wrong.mean() == pytest.approx(NOISE, abs=0.03)
    shifts = np.bincount((task.train_answers - truth)[wrong] % 4, minlength=4)
    assert shifts[0] == 0 and np.allclose(shifts[1:] / wrong.sum(), 1 / 3, atol=0.04)
    # Causal-LM examples: the loss is on the (noisy) answer letter after "Answer:", nothing else.
    tokenizer = ex.build_tokenizer()
    letters = [tokenizer.convert_tokens_to_ids(x) for x in "ABCD"]
    for i in range(0, 4000, 397):
        labelled = (task.labels[i] != -100).nonzero().flatten().tolist()
        end = int(task.attention_mask[i].sum()) - 1
        assert labelled == [end] and int(task.labels[i, end]) == letters[task.train_answers[i]]
        tokens = tokenizer.convert_ids_to_tokens(task.input_ids[i, :end].tolist())
        assert tokens[:9] == ["Question", ":", "which", "of", "these", "is", "a", "fruit", "?"]
        assert tokens[-2:] == ["Answer", ":"]
        assert [tokens[tokens.index(x) + 2] for x in "ABCD"] == train.options[i]


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
        (["--noise", "0.8"], "--noise must be in [0, 0.75)"),
        (["--epochs", "3", "--grace-period", "4"], "--grace-period (4) must be in [1, --epochs]"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            _example().main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_llm_lora_example_runs_with_a_small_budget(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ex = _example()
    argv = ["--epochs", str(EPOCHS), "--grace-period", "2", "--noise", str(NOISE)]
    argv += ["--train-questions", str(N_TRAIN), "--eval-questions", str(N_EVAL)]
    argv += ["--pretrain-steps", str(PRETRAIN_STEPS), "--storage", str(tmp_path)]
    results = ex.main(argv)
    assert len(results) == 4 and not results.errors
    assert sorted((r.config["lr"], r.config["seed"]) for r in results) == [
        (0.003, 0),
        (0.003, 1),
        (0.01, 0),
        (0.01, 1),
    ]
    out = capsys.readouterr().out
    assert "naive/nll" in out and "posthoc/error" in out
    assert "posthoc/perplexity" in out and "their SWA ensemble + TS" in out
    for transform in ("base", "ts", "swa", "swa+ts", "ens", "ens+ts", "swa+ens+ts"):
        assert f"| {transform} " in out

    # The same task, rebuilt: deterministic, so the same pretrained weights and questions.
    task = ex.make_task(N_TRAIN, N_EVAL, NOISE, PRETRAIN_STEPS)
    fruits = set(ex.CATEGORIES["fruit"])
    store = PredictionStore.open(results.experiment_path)
    labels = {s: store.labels(s) for s in ("val", "test")}
    for split in labels:
        clean = [_fruit(o, fruits) for o in task.questions[split].options]
        assert list(labels[split]) == clean  # val and test are clean

    groups: dict[str, list[tuple[str, int]]] = {}
    checkpointed = 0
    for result in results:
        trial_id, last = result.metrics["trial_id"], int(result.metrics["epoch"])
        groups.setdefault(pht.group_key(result.config, "seed"), []).append((trial_id, last))
        # One stored file per epoch (a trial ASHA stopped may have stored one epoch more), each
        # holding (N, 4) choice logits of the base and the SWA model.
        epochs = store.epochs(trial_id)
        assert epochs == [*range(1, len(epochs) + 1)] and last <= len(epochs) <= last + 1
        for epoch in epochs:
            for split in ("val", "test"):
                for variant in ("base", "swa"):
                    z = store.read(trial_id, epoch, split, variant)
                    assert z.shape == (N_EVAL, 4) and z.dtype == np.float32
        # Every reported choice error and NLL is the stored logits' (numpy, from scratch).
        frame = result.metrics_dataframe
        assert frame is not None and list(frame["epoch"]) == [*range(1, last + 1)]
        for _, row in frame.iterrows():
            for variant in ("base", "swa"):
                z = store.read(trial_id, int(row["epoch"]), "test", variant)
                error = np.mean(z.argmax(axis=1) != labels["test"])
                assert row[f"test/{variant}/error"] == pytest.approx(error, abs=1e-12)
                assert row[f"test/{variant}/nll"] == pytest.approx(
                    ref.nll(z, labels["test"]), rel=1e-5
                )
        # The checkpoint (epoch 5) holds the adapters, and the SWA model is the pretrained
        # base with the averaged adapters: rebuilt by hand, it gives the stored SWA logits.
        if result.checkpoint is None:
            continue
        checkpointed += 1
        with result.checkpoint.as_directory() as directory:
            state = torch.load(os.path.join(directory, STATE_FILE), weights_only=True)
        assert state["epoch"] == EPOCHS
        model = ex.lora_model(result.config, task)
        averaged = state["swa"]["averaged"]
        assert len(averaged) == 2 * 2 and all(".lora_" in name for name in averaged)  # A, B x 2
        buffers = {name for name, _ in model.named_buffers()}
        assert {name for name in state["model"] if ".lora_" not in name} <= buffers
        missing, unexpected = model.load_state_dict(averaged, strict=False)
        assert not unexpected and not any(".lora_" in name for name in missing)
        swa = task.val.predict(model.eval())
        np.testing.assert_allclose(swa, store.read(trial_id, EPOCHS, "val", "swa"), atol=1e-4)
        # Token level: the reported test/swa/token_nll is the cross-entropy of the rebuilt SWA
        # model's full next-token logits on the scored (response) test positions.
        zs, ys = [], []
        with torch.no_grad():
            for batch in task.tokens["test"]:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                targets = batch["labels"][:, 1:]
                zs.append(out.logits[:, :-1][targets != -100])
                ys.append(targets[targets != -100])
        nll = float(torch.nn.functional.cross_entropy(torch.cat(zs).double(), torch.cat(ys)))
        reported = frame.set_index("epoch").loc[EPOCHS]
        assert reported["test/swa/token_nll"] == pytest.approx(nll, abs=1e-4)
        assert reported["test/swa/perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
        assert len(store.read_tokens(trial_id, EPOCHS, "swa").records["test"]) == N_EVAL
    assert checkpointed >= 2  # the members of at least one group reached epoch 5

    # The group values written into the results are the ensembles of the stored SWA logits at
    # the group's last common epoch (brute force: grid TS, logit average, grid TS).
    for result in results:
        members = groups[pht.group_key(result.config, "seed")]
        common = min(last for _, last in members)
        assert result.metrics[pht.ensemble_epoch_key("swa+ens+ts")] == common
        parts = [store.read(t, common, "val", "swa") for t, _ in members]
        ens_val, _ = ref.ensemble(parts, parts, labels["val"])
        value = result.metrics[GROUP_KEY]
        assert math.isfinite(value) and value == pytest.approx(
            ref.nll(ens_val, labels["val"]), rel=1e-3
        )
