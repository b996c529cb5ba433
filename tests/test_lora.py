"""LoRA under the reporter: SWA averages the adapters only, the SWA'd peft model evaluates as
the model with averaged adapters (merged or not), and the checkpoint holds the adapters, not
the base model. A tiny GPT-2 built from a config; nothing is downloaded."""

import copy
from typing import Any

import pytest
import torch

pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from posthoc_tune import PostHocReporter

VOCAB, LENGTH = 40, 8


def _gpt2() -> GPT2LMHeadModel:
    """No dropout: training is deterministic, so a resumed run can equal an uninterrupted one."""
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


def _lora_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same base weights in every call
    base = _gpt2()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    return get_peft_model(base, config)


def _next_token(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The classifier the reporter sees: next-token logits after each sequence."""
    return model(input_ids=ids).logits[:, -1]


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = {s: torch.randint(0, VOCAB, (n, LENGTH), generator=g) for s, n in (("x", 16), ("v", 12))}
    return {**ids, "y": torch.randint(0, VOCAB, (12,), generator=g)}


def _reporter(model: torch.nn.Module, d: dict[str, torch.Tensor]) -> PostHocReporter:
    predict = lambda m, split: _next_token(m, d["v"])  # noqa: E731
    return PostHocReporter(model, {"seed": 0}, val=(predict, d["y"]), transforms=["base", "swa"])


def _train_epoch(
    model: torch.nn.Module, opt: torch.optim.Optimizer, d: dict[str, torch.Tensor]
) -> None:
    model.train()
    opt.zero_grad()
    model(input_ids=d["x"], labels=d["x"]).loss.backward()
    opt.step()
    model.eval()


def _adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_swa_of_a_lora_model_is_the_model_with_averaged_adapters() -> None:
    d = _data()
    model = _lora_model()
    base_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    reporter = _reporter(model, d)
    seen = []
    for _ in range(3):
        _train_epoch(model, opt, d)
        reporter.step()
        seen.append(_adapters(model))
    # Brute force: a copy of the model with each adapter set to its mean over the epochs.
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in by_hand.named_parameters():
            if p.requires_grad:
                p.copy_(torch.stack([s[name] for s in seen]).mean(dim=0))
    with torch.no_grad():
        expected = _next_token(by_hand, d["v"])
        swa = _next_token(reporter.swa.model.eval(), d["v"])
        exported: Any = reporter.swa.export()  # a PeftModel
        merged = _next_token(exported.merge_and_unload(), d["v"])
    torch.testing.assert_close(swa, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)
    # Only the adapters are averaged, the base is shared, and merging a copy left it as it was.
    averaged = set(reporter.swa.state_dict()["averaged"])
    assert averaged == set(seen[0]) and all("lora_" in n for n in averaged)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[name]), name
    assert sum(
        p.data_ptr() == q.data_ptr()
        for p, q in zip(model.parameters(), reporter.swa.model.parameters(), strict=True)
    ) == len(base_before)


def test_the_checkpoint_holds_the_adapters_and_resumes_exactly() -> None:
    d = _data()
    model = _lora_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    reporter = _reporter(model, d)
    for _ in range(2):
        _train_epoch(model, opt, d)
        reporter.step()
    state = copy.deepcopy(reporter.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()} & set(model.state_dict())
    assert set(state["model"]) == trainable | buffers
    saved = sum(t.numel() for t in state["model"].values())
    assert saved < sum(p.numel() for p in model.parameters()) / 10  # adapters, not the base
    for _ in range(2):
        _train_epoch(model, opt, d)
        uninterrupted = reporter.step()

    fresh = _lora_model()  # same base weights, different (re-initialised) adapters
    opt2 = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=0.5)
    resumed = _reporter(fresh, d)
    resumed.load_state_dict(state)
    for _ in range(2):
        _train_epoch(fresh, opt2, d)
        result = resumed.step()
    assert result == pytest.approx(uninterrupted, rel=1e-5, nan_ok=True)
    other = _gpt2()
    with pytest.raises(ValueError, match="differs from this model's trained state"):
        _reporter(other, d).load_state_dict(state)
