"""SWA memory with trainable-only averaging, for benchmarks/RESULTS.md ("SWA that fits large
models").

For LoRA GPT-2 models (random init, no download) and the CIFAR-N example's ResNet-18: the bytes
the SWA copy allocates beyond the live model (storages it does not share with it), for
``WeightAverager`` and for the whole-model ``AveragedModel(use_buffers=False)`` copy it used
before, and the time of one update after the first (median of 5, CPU).

Run: .venv/bin/python benchmarks/swa_memory.py   (prints a markdown table)
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers
from torch.optim.swa_utils import AveragedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for examples/

from examples.cifar10n import resnet18
from posthoc_tune.transforms import WeightAverager


def own_bytes(copy: torch.nn.Module, live: torch.nn.Module) -> int:
    """Bytes of the storages ``copy``'s parameters and buffers do not share with ``live``."""
    tensors = itertools.chain(live.parameters(), live.buffers())
    shared = {t.untyped_storage().data_ptr() for t in tensors}
    own = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in itertools.chain(copy.parameters(), copy.buffers())
    }
    return sum(n for ptr, n in own.items() if ptr not in shared)


def update_ms(update: Callable[[], object]) -> float:
    update()  # the first update copies; later ones average
    times = []
    for _ in range(5):
        start = time.perf_counter()
        update()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def lora_gpt2(
    n_layer: int, n_embd: int, vocab: int, r: int, targets: list[str], dtype: torch.dtype
) -> torch.nn.Module:
    config = transformers.GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=max(1, n_embd // 64),
        vocab_size=vocab,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    base = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with warnings.catch_warnings():  # peft: Conv1D implies fan_in_fan_out
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.LoraConfig(r=r, target_modules=targets))
    assert isinstance(model, torch.nn.Module)
    return model


def old_swa(model: torch.nn.Module) -> tuple[float, float]:
    """MiB and update ms of the whole-model copy (the code path WeightAverager replaced)."""
    old = AveragedModel(model, use_buffers=False)
    return own_bytes(old.module, model) / 2**20, update_ms(lambda: old.update_parameters(model))


def new_swa(model: torch.nn.Module) -> tuple[float, float]:
    """MiB and update ms of WeightAverager's copy."""
    new = WeightAverager(model)
    return own_bytes(new.model, model) / 2**20, update_ms(lambda: new.update(model))


def row(name: str, model: torch.nn.Module) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    (old_mib, old_ms), (new_mib, new_ms) = old_swa(model), new_swa(model)
    return (
        f"| {name} | {n_params / 1e6:,.2f} M | {100 * n_trainable / n_params:.2f}% "
        f"| {old_mib:,.3f} | {new_mib:,.3f} | {100 * new_mib / old_mib:.2f}% "
        f"| {old_ms:,.1f} | {new_ms:,.1f} |"
    )


def main() -> None:
    torch.manual_seed(0)
    gpt2_vocab = 50_257
    cases: list[tuple[str, Callable[[], torch.nn.Module]]] = [
        (
            "GPT-2 2x32, vocab 100, LoRA r=4 on c_attn",
            lambda: lora_gpt2(2, 32, 100, 4, ["c_attn"], torch.float32),
        ),
        (
            "GPT-2 6x512, LoRA r=8 on c_attn",
            lambda: lora_gpt2(6, 512, gpt2_vocab, 8, ["c_attn"], torch.float32),
        ),
        (
            "GPT-2 small (12x768), LoRA r=16 on c_attn, c_proj, c_fc",
            lambda: lora_gpt2(12, 768, gpt2_vocab, 16, ["c_attn", "c_proj", "c_fc"], torch.float32),
        ),
        (
            "same, bf16 base (fp32 adapters)",
            lambda: lora_gpt2(
                12, 768, gpt2_vocab, 16, ["c_attn", "c_proj", "c_fc"], torch.bfloat16
            ),
        ),
        ("ResNet-18 (CIFAR, width 64), all trainable", lambda: resnet18(64, 10)),
    ]
    print(
        "| model | parameters | trainable | old SWA copy MiB | new SWA copy MiB | new/old "
        "| old update ms | new update ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, build in cases:
        print(row(name, build()), flush=True)


if __name__ == "__main__":
    main()
