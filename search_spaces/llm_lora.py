"""LoRA instruction-tuning space for a causal LLM, for the paper's LLM setting.

What the paper gives: its abstract reports a >1.5x MMLU improvement of post-hoc over naive
selection on LLM instruction tuning; a third-party, AI-written summary of its figures and tables
(a weak source; see ``docs/sources.md``) names LLaMA-2-7B instruction-tuned on Guanaco,
evaluated by perplexity, causal-LM error and MMLU, with 8 runs per configuration. Its code for
this was not released: the fine-tuning method, optimiser, lr, epochs and checkpoint frequency
are unknown.

So the fixed values and the centre of each range come from another source: QLoRA's recipe for
this very model and data (artidoro/qlora ``scripts/finetune_llama2_guanaco_7b.sh``: LoRA rank
64, alpha 16, dropout 0.1 on all linear layers, lr 2e-4 constant after 3% warm-up, weight decay
0, max grad norm 0.3, 16 sequences per optimiser step, 1,875 steps on OASST1). Whether the paper
followed it is not known. Our choices: the ranges searched (rank {8, 16, 32, 64}, alpha
{8, 16, 32}, dropout {0, 0.05, 0.1}, lr log-uniform in [5e-5, 5e-4]) and the default 3 epochs
(QLoRA's 1,875 x 16 sequences are about three passes over the ~9.8k training conversations of
``timdettmers/openassistant-guanaco``). With so few epochs, consider calling
``PostHocReporter.step()`` several times per epoch (it counts each call as one "epoch"), so that
post-hoc selection has more checkpoints to choose from. The reporter's SWA averages only the
parameters that require gradients (the adapters) and shares the frozen base with the live
model; give it ``tokens=`` loaders for perplexity (``posthoc_tune.tokens``) and
``posthoc_tune.llm.MultipleChoice`` splits for MMLU. ``examples/llm_lora.py`` runs the whole
setting offline on a tiny model and writes out this recipe.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from search_spaces._checks import check_epochs

LLAMA2_7B = "meta-llama/Llama-2-7b-hf"


def lora_space(model: str = LLAMA2_7B, epochs: int = 3) -> dict[str, Any]:
    """LoRA rank in {8, 16, 32, 64}, alpha in {8, 16, 32}, dropout in {0, 0.05, 0.1}, lr
    log-uniform in [5e-5, 5e-4]; batch size 16, warm-up ratio 0.03, weight decay 0, max grad
    norm 0.3, ``epochs`` epochs; ``model`` is a Hugging Face model id or path."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a Hugging Face model id or path, got {model!r}")
    return {
        "model": model,
        "lora_r": tune.choice([8, 16, 32, 64]),
        "lora_alpha": tune.choice([8, 16, 32]),
        "lora_dropout": tune.choice([0.0, 0.05, 0.1]),
        "lr": tune.loguniform(5e-5, 5e-4),
        "batch_size": 16,
        "warmup_ratio": 0.03,
        "weight_decay": 0.0,
        "max_grad_norm": 0.3,
        "epochs": check_epochs(epochs),
    }
