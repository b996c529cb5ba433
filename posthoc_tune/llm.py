"""Language models: multiple-choice evaluation (MMLU-style) as ordinary class logits.

A causal language model answers a multiple-choice question with a distribution over its
options. :class:`MultipleChoice` turns prompts and options into ``(N, n_choices)`` logits, so
that everything the project has (the store, TS, SWA, seed and checkpoint ensembles,
PostHocASHA, tables, plots) works on choice accuracy and choice NLL unchanged: pass it to the
reporter as a ``(predict, labels)`` split, ``val=MultipleChoice(...).split``.

Two scorings, as evaluation harnesses use them:

* ``"letters"`` (how MMLU is usually scored): the prompt lists the options under letters and
  ends with ``"Answer:"``; a choice's logit is the model's next-token logit of its letter.
* ``"loglik"``: a choice's logit is the summed log-likelihood of its option text after the
  prompt (the continuation tokenized on its own, as lm-evaluation-harness does, so the
  prompt's tokens are the same for every option).

The model is any causal LM called as ``model(input_ids=..., attention_mask=...)`` that returns
``(batch, length, vocab)`` logits or an object with ``.logits`` (a Hugging Face model, a peft
model); the tokenizer anything with ``encode(text, add_special_tokens=False)``. Sequences are
right-padded, so positions are those of the unpadded text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import numpy as np
import torch

from posthoc_tune._arrays import output_logits

Scoring = Literal["letters", "loglik"]
LETTERS = tuple("ABCDEFGHIJ")


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class MultipleChoice:
    """One multiple-choice split: questions, their options and the index of the right one.

    Args:
        tokenizer: encodes text to token ids (``encode(text, add_special_tokens=False)``).
        questions: the question texts.
        options: each question's options; every question has the same number (2 to 10).
        answers: the index of each question's correct option (the labels).
        scoring: ``"letters"`` or ``"loglik"`` (see the module docstring).
        batch_size: sequences per forward pass.

    Attributes:
        labels: ``answers`` as int64, the split's labels.
        prompts: the prompt of each question (options listed under letters for
            ``"letters"``; the question then ``"Answer:"`` for ``"loglik"``).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        questions: Sequence[str],
        options: Sequence[Sequence[str]],
        answers: Sequence[int],
        *,
        scoring: Scoring = "letters",
        batch_size: int = 8,
    ) -> None:
        if scoring not in ("letters", "loglik"):
            raise ValueError(f"scoring must be 'letters' or 'loglik', got {scoring!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not questions or not (len(questions) == len(options) == len(answers)):
            raise ValueError(
                f"need as many options and answers as questions (at least one), got "
                f"{len(questions)} questions, {len(options)} option lists, {len(answers)} answers"
            )
        counts = {len(o) for o in options}
        n_choices = counts.pop() if len(counts) == 1 else None
        if n_choices is None or not 2 <= n_choices <= len(LETTERS):
            raise ValueError(
                f"every question needs the same number of options, 2 to {len(LETTERS)}; "
                f"got {sorted({len(o) for o in options})}"
            )
        labels = np.asarray(answers)
        if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= n_choices:
            raise ValueError(
                f"answers must be option indices in [0, {n_choices}), got {list(answers)[:8]}"
            )
        self.scoring: Scoring = scoring
        self.batch_size = batch_size
        self.n_choices = n_choices
        self.labels = labels.astype(np.int64)
        self.prompts = [_prompt(q, o, scoring) for q, o in zip(questions, options, strict=True)]
        self._prompt_ids = [
            _encode(tokenizer, p, f"prompt {i}") for i, p in enumerate(self.prompts)
        ]
        # Every option must be text, whichever the scoring (an empty one lists as "C. ").
        self._option_ids = [
            [
                _encode(tokenizer, f" {text}", f"option {k} of question {i}")
                for k, text in enumerate(o)
            ]
            for i, o in enumerate(options)
        ]
        if scoring == "letters":
            letters = [_encode(tokenizer, f" {x}", f"letter {x}") for x in LETTERS[:n_choices]]
            several = [x for x, ids in zip(LETTERS, letters, strict=False) if len(ids) != 1]
            if several:
                raise ValueError(
                    f"the option letters {several} are not single tokens for this tokenizer "
                    f"(' A' must encode to one id); use scoring='loglik'"
                )
            self._letter_ids = torch.tensor([ids[0] for ids in letters])

    @property
    def split(self) -> tuple[Callable[[torch.nn.Module, str], np.ndarray], np.ndarray]:
        """The ``(predict, labels)`` pair that :class:`~posthoc_tune.PostHocReporter` takes."""
        return self.predict, self.labels

    def predict(self, model: torch.nn.Module, split: str = "") -> np.ndarray:
        """The ``(N, n_choices)`` choice logits of ``model`` (float32)."""
        if self.scoring == "letters":
            ends = _batched_last_logits(model, self._prompt_ids, self.batch_size)
            return ends[:, self._letter_ids].numpy()
        sequences = [
            (prompt, option)
            for prompt, options in zip(self._prompt_ids, self._option_ids, strict=True)
            for option in options
        ]
        scores = _batched_loglik(model, sequences, self.batch_size)
        return scores.reshape(len(self.labels), self.n_choices).numpy()


def _prompt(question: str, options: Sequence[str], scoring: Scoring) -> str:
    if scoring == "loglik":
        return f"{question}\nAnswer:"
    listed = "\n".join(f"{x}. {text}" for x, text in zip(LETTERS, options, strict=False))
    return f"{question}\n{listed}\nAnswer:"


def _encode(tokenizer: Tokenizer, text: str, what: str) -> list[int]:
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise ValueError(f"{what} ({text!r}) tokenizes to nothing; it needs at least one token")
    return ids


def _forward(model: torch.nn.Module, rows: Sequence[list[int]]) -> tuple[torch.Tensor, list[int]]:
    """The logits (float32, CPU) of right-padded ``rows``, and the rows' lengths."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    lengths = [len(r) for r in rows]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    with torch.no_grad():
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
    return output_logits(
        out, "on token ids (a causal LM's (batch, length, vocab))"
    ).float().cpu(), lengths


def _batched_last_logits(
    model: torch.nn.Module, prompts: Sequence[list[int]], batch_size: int
) -> torch.Tensor:
    """The next-token logits after each prompt: (N, vocab)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        logits, lengths = _forward(model, prompts[start : start + batch_size])
        out.append(logits[torch.arange(len(lengths)), torch.tensor(lengths) - 1])
    return torch.cat(out)


def _batched_loglik(
    model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int
) -> torch.Tensor:
    """Summed log-probabilities of each continuation after its prompt: (len(pairs),)."""
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        logits, _ = _forward(model, [p + c for p, c in batch])
        logp = torch.log_softmax(logits, dim=-1)
        for i, (prompt, continuation) in enumerate(batch):
            # Position t predicts token t + 1: the continuation's tokens from the prompt's last.
            where = torch.arange(len(prompt) - 1, len(prompt) + len(continuation) - 1)
            out.append(logp[i, where, torch.tensor(continuation)].sum())
    return torch.stack(out)


__all__ = ["LETTERS", "MultipleChoice"]
