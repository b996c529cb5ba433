"""Multiple-choice evaluation of a causal LM: a tiny GPT-2 built from a config, a word-level
tokenizer built in memory (no downloads). Batched, padded choice logits are checked against an
unpadded forward pass per question and option."""

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from posthoc_tune import PostHocReporter, PredictionStore
from posthoc_tune.llm import LETTERS, MultipleChoice
from tests import reference as ref

WORDS = [f"w{i}" for i in range(30)]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[UNK]", *LETTERS, "Answer", ":", ".", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _model(vocab_size: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


def _questions(n: int, seed: int = 0) -> tuple[list[str], list[list[str]], list[int]]:
    """Questions and options of varied lengths (so batches are padded)."""
    rng = np.random.default_rng(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS, size=rng.integers(lo, hi)))

    questions = [text(2, 9) for _ in range(n)]
    options = [[text(1, 4) for _ in range(4)] for _ in range(n)]
    return questions, options, [int(a) for a in rng.integers(0, 4, n)]


def _forward(model: GPT2LMHeadModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_letter_logits_are_the_next_token_logits_after_each_prompt() -> None:
    tok = _tokenizer()
    model = _model(len(tok))
    questions, options, answers = _questions(7)
    choice = MultipleChoice(tok, questions, options, answers, batch_size=3)
    z = choice.predict(model)
    assert z.shape == (7, 4) and z.dtype == np.float32
    letters = [tok.encode(f" {x}", add_special_tokens=False)[0] for x in "ABCD"]
    for i, prompt in enumerate(choice.prompts):
        assert prompt.endswith("\nAnswer:") and f"\nB. {options[i][1]}\n" in prompt
        last = _forward(model, tok.encode(prompt, add_special_tokens=False))[-1]
        np.testing.assert_allclose(z[i], last[letters].numpy(), atol=1e-5)


def test_loglik_logits_are_summed_option_log_likelihoods() -> None:
    tok = _tokenizer()
    model = _model(len(tok))
    questions, options, answers = _questions(5, seed=1)
    choice = MultipleChoice(tok, questions, options, answers, scoring="loglik", batch_size=6)
    z = choice.predict(model)
    for i, prompt in enumerate(choice.prompts):
        context = tok.encode(prompt, add_special_tokens=False)
        for k, option in enumerate(options[i]):
            full = context + tok.encode(f" {option}", add_special_tokens=False)
            logp = torch.log_softmax(_forward(model, full), dim=-1)
            expected = sum(
                float(logp[t, full[t + 1]]) for t in range(len(context) - 1, len(full) - 1)
            )
            assert z[i, k] == pytest.approx(expected, abs=1e-4)


def test_the_reporter_scores_choices_like_any_classifier(tmp_path: Path) -> None:
    tok = _tokenizer()
    model = _model(len(tok))
    val = MultipleChoice(tok, *_questions(12, seed=2))
    test = MultipleChoice(tok, *_questions(10, seed=3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    reporter = PostHocReporter(
        model, {"seed": 0}, val=val.split, test=test.split, store=tmp_path, trial_id="t0"
    )
    for _ in range(2):
        model.train()
        ids = torch.tensor([tok.encode(p, add_special_tokens=False)[:8] for p in val.prompts[:4]])
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
        result = reporter.step()
    store = PredictionStore.open(tmp_path)
    z = store.read("t0", 2, "val", "base")
    assert z.shape == (12, 4)
    np.testing.assert_allclose(z, val.predict(model.eval()), atol=1e-5)
    assert result["val/base/error"] == pytest.approx(ref.error(z, val.labels))
    assert result["val/base/nll"] == pytest.approx(ref.nll(z, val.labels), rel=1e-5)
    assert np.isfinite(result["test/swa+ckpt+ts/nll"])


class _Chars:
    """A character-level tokenizer: ' A' is two tokens."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 97 for c in text]


def test_bad_input_is_refused_naming_what_and_why() -> None:
    tok = _tokenizer()
    questions, options, answers = _questions(3)
    with pytest.raises(ValueError, match=r"option 2 of question 1 \(' '\) tokenizes to nothing"):
        MultipleChoice(
            tok, questions, [options[0], [*options[1][:2], "", "w1"], options[2]], answers
        )
    with pytest.raises(ValueError, match=r"same number of options, 2 to 10; got \[3, 4\]"):
        MultipleChoice(tok, questions, [options[0][:3], options[1], options[2]], answers)
    with pytest.raises(ValueError, match=r"answers must be option indices in \[0, 4\)"):
        MultipleChoice(tok, questions, options, [0, 4, 1])
    with pytest.raises(ValueError, match=r"letters \['A', 'B', 'C', 'D'\] are not single tokens"):
        MultipleChoice(_Chars(), questions, options, answers)
    with pytest.raises(ValueError, match="as many options and answers as questions"):
        MultipleChoice(tok, questions, options, answers[:2])
    with pytest.raises(ValueError, match="scoring must be 'letters' or 'loglik'"):
        MultipleChoice(tok, questions, options, answers, scoring="mean")  # type: ignore[arg-type]
