"""WeightAverager on large-model setups: trainable-only averaging, wrappers, FSDP refusal."""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterator
from typing import cast

import pytest
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, update_bn

from posthoc_tune.transforms import WeightAverager, unwrap_model


def _lora_gpt2() -> torch.nn.Module:
    """A 2-layer GPT-2 with LoRA adapters on the attention projections (no download)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )  # no dropout: two runs from one checkpoint take identical steps
    with warnings.catch_warnings():  # peft: Conv1D implies fan_in_fan_out
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(
            transformers.GPT2LMHeadModel(config), peft.LoraConfig(r=4, target_modules=["c_attn"])
        )
    assert isinstance(model, torch.nn.Module)
    return model


def _lm_step(model: torch.nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor) -> None:
    model.train()
    opt.zero_grad()
    model(tokens, labels=tokens).loss.backward()
    opt.step()


def _own_bytes(copy_: torch.nn.Module, live: torch.nn.Module) -> int:
    """Bytes of the storages ``copy_``'s parameters and buffers do not share with ``live``."""
    shared = {
        t.untyped_storage().data_ptr() for t in itertools.chain(live.parameters(), live.buffers())
    }
    own = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in itertools.chain(copy_.parameters(), copy_.buffers())
    }
    return sum(n for ptr, n in own.items() if ptr not in shared)


def _nbytes(tensors: Iterator[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_lora_swa_holds_only_the_adapters_and_evaluates_their_running_mean() -> None:
    model = _lora_gpt2()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and frozen
    swa = WeightAverager(model)
    expected = _nbytes(iter(trainable.values())) + _nbytes(model.buffers())
    assert _own_bytes(swa.model, model) == expected
    assert expected < _nbytes(model.parameters()) / 10
    for name, p in swa.model.named_parameters():
        assert (p is frozen[name]) if name in frozen else (p is not trainable[name])
    state = swa.state_dict()
    assert set(state["averaged"]) == set(trainable)
    assert set(state["buffers"]) == {n for n, _ in model.named_buffers()}

    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    tokens = torch.randint(0, 100, (4, 12))
    recorded = []
    for _ in range(4):
        for _ in range(2):
            _lm_step(model, opt, tokens)
        swa.update(model)
        recorded.append({n: p.detach().clone() for n, p in trainable.items()})
    mean = {n: torch.stack([r[n] for r in recorded]).mean(dim=0) for n in trainable}
    averaged = dict(swa.model.named_parameters())
    for name in trainable:
        torch.testing.assert_close(averaged[name], mean[name], rtol=1e-6, atol=1e-7)
    assert all(averaged[n] is p for n, p in frozen.items())  # still the live tensors

    reference = copy.deepcopy(model)  # a full, independent copy with the hand-computed mean
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name in mean:
                p.copy_(mean[name])
    swa.model.eval()
    reference.eval()
    with torch.no_grad():
        got, want = swa.model(tokens).logits, reference(tokens).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, model.eval()(tokens).logits)  # the average is not the last


def test_lora_swa_state_dict_continues_the_average_exactly() -> None:
    tokens = torch.randint(0, 100, (4, 12))
    model_a = _lora_gpt2()
    opt_a = torch.optim.SGD([p for p in model_a.parameters() if p.requires_grad], lr=0.5)
    swa_a = WeightAverager(model_a, start_epoch=2)
    for _ in range(3):
        _lm_step(model_a, opt_a, tokens)
        swa_a.update(model_a)
    state = copy.deepcopy(swa_a.state_dict())
    weights = copy.deepcopy(model_a.state_dict())
    for _ in range(2):
        _lm_step(model_a, opt_a, tokens)
        swa_a.update(model_a)

    model_b = _lora_gpt2()
    model_b.load_state_dict(weights)
    opt_b = torch.optim.SGD([p for p in model_b.parameters() if p.requires_grad], lr=0.5)
    swa_b = WeightAverager(model_b, start_epoch=2)
    swa_b.load_state_dict(state)
    for _ in range(2):
        _lm_step(model_b, opt_b, tokens)
        swa_b.update(model_b)
    assert (swa_b.epoch, swa_b.n_averaged) == (5, 4)
    for (k, a), b in zip(
        swa_a.model.state_dict().items(), swa_b.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)

    everything = WeightAverager(model_b, start_epoch=2, trainable_only=False)
    with pytest.raises(ValueError, match=r"averaged tensors differ .* in \d+ names"):
        everything.load_state_dict(state)  # built with the frozen parameters averaged too
    name = next(iter(state["averaged"]))
    state["averaged"][name] = state["averaged"][name][:1]
    with pytest.raises(ValueError, match=rf"{name!r} has shape \(1, 32\), this averager's has"):
        swa_b.load_state_dict(state)


def _conv_bn_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    )


def test_all_trainable_batchnorm_net_is_averaged_as_before() -> None:
    """Every parameter trainable: the same average, buffers and BatchNorm pass as
    ``AveragedModel(use_buffers=False)``, the implementation this replaced."""
    model = _conv_bn_net()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    x_val = torch.randn(24, 3, 8, 8) * 2 + 1
    swa, old = WeightAverager(model), AveragedModel(model, use_buffers=False)
    assert _own_bytes(swa.model, model) == _nbytes(model.parameters()) + _nbytes(model.buffers())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    recorded = []
    for _ in range(5):
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        swa.update(model)
        old.update_parameters(model)
        recorded.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, p in swa.model.named_parameters():
        mean = torch.stack([r[name] for r in recorded]).mean(dim=0)
        torch.testing.assert_close(p, mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(p, old.module.get_parameter(name), rtol=1e-6, atol=1e-7)
    for name, b in swa.model.named_buffers():
        torch.testing.assert_close(b, model.get_buffer(name), rtol=0, atol=0)
    swa.update_bn([x_val[:12], x_val[12:]])
    update_bn([x_val[:12], x_val[12:]], old.module)
    for name, b in swa.model.named_buffers():
        torch.testing.assert_close(b, old.module.get_buffer(name), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(swa.model.eval()(x), old.module.eval()(x), rtol=1e-5, atol=1e-6)


def _half_frozen() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model[0].requires_grad_(False)
    return model


def _nudge(model: torch.nn.Module, step: float) -> None:
    """A stand-in optimizer step: add ``step`` to every parameter that requires gradients."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(step)


def test_averaged_set_is_fixed_at_construction() -> None:
    model = _half_frozen()
    w0 = model.get_parameter("2.weight").detach().clone()
    swa = WeightAverager(model)
    assert swa.model.get_parameter("0.weight") is model.get_parameter("0.weight")
    _nudge(model, 1.0)
    swa.update(model)
    model[2].requires_grad_(False)  # freezing an averaged layer: its constant value is averaged
    swa.update(model)
    torch.testing.assert_close(swa.model.get_parameter("2.weight"), w0 + 1.0)
    model[2].requires_grad_(True)
    _nudge(model, 3.0)  # now w0 + 4
    swa.update(model)
    torch.testing.assert_close(swa.model.get_parameter("2.weight"), w0 + 2.0)  # mean of +1, +1, +4

    model[0].requires_grad_(True)  # unfreezing a shared layer: its training would leak in
    with pytest.raises(RuntimeError, match=r"2 parameters were frozen .* \(e\.g\. '0\.weight'\)"):
        swa.update(model)
    assert (swa.epoch, swa.n_averaged) == (3, 3)


def test_trainable_only_false_averages_frozen_parameters_too() -> None:
    model = _half_frozen()
    w0 = model.get_parameter("0.weight").detach().clone()
    swa = WeightAverager(model, trainable_only=False)
    assert swa.model.get_parameter("0.weight") is not model.get_parameter("0.weight")
    assert _own_bytes(swa.model, model) == _nbytes(model.parameters())
    swa.update(model)
    model.requires_grad_(True)  # gradual unfreezing
    _nudge(model, 2.0)
    swa.update(model)
    torch.testing.assert_close(swa.model.get_parameter("0.weight"), w0 + 1.0)
    assert set(swa.state_dict()["averaged"]) == {n for n, _ in model.named_parameters()}


def test_unwrap_model_removes_data_parallel_and_compile_wrappers() -> None:
    model = _half_frozen()
    compiled = cast(torch.nn.Module, torch.compile(model))  # compiles lazily: on first call
    wrapped = cast(torch.nn.Module, torch.compile(torch.nn.DataParallel(compiled)))
    assert unwrap_model(torch.nn.DataParallel(model)) is model
    assert unwrap_model(wrapped) is model
    assert unwrap_model(model) is model
    swa = WeightAverager(wrapped)
    assert type(swa.model) is torch.nn.Sequential
    assert list(swa.model.state_dict()) == list(model.state_dict())
    assert swa.model.get_parameter("0.weight") is model.get_parameter("0.weight")
    _nudge(model, 1.0)
    swa.update(wrapped)
    torch.testing.assert_close(
        swa.model.get_parameter("2.weight"), model.get_parameter("2.weight"), rtol=0, atol=0
    )


@pytest.fixture(scope="module")
def process_group() -> Iterator[None]:
    """A one-process gloo group, enough to build DDP and FSDP modules on the CPU."""
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of its own")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_is_unwrapped(process_group: None) -> None:
    model = _half_frozen()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    assert unwrap_model(ddp) is model
    swa = WeightAverager(ddp)
    assert list(swa.model.state_dict()) == list(model.state_dict())


def test_fsdp_models_are_refused(process_group: None) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    with warnings.catch_warnings():  # world size 1: FSDP switches to NO_SHARD
        warnings.simplefilter("ignore")
        fsdp1 = FullyShardedDataParallel(
            _half_frozen().requires_grad_(True), device_id=torch.device("cpu")
        )
    fsdp2 = _half_frozen()
    fully_shard(fsdp2[2])  # one sharded layer is enough
    for model in (fsdp1, fsdp2, cast(torch.nn.Module, torch.compile(fsdp2))):
        with pytest.raises(TypeError, match="does not support FSDP-sharded models"):
            WeightAverager(model)
