"""vLLM's LoRA limits, checked by `s2ft export-lora` before anything is written.

vLLM loads a PEFT LoRA adapter with its own loader, whose limits differ from PEFT's. Read from
vLLM 0.32's source and checked against a real vLLM (`bench/vllm_parity.py`):

- rank: every module's rank (`r` and `rank_pattern`) must be <= the engine's `--max-lora-rank`,
  one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (default 16) (`vllm/config/lora.py`,
  `PEFTHelper.validate_legal`). `rank_pattern`/`alpha_pattern` are honoured, so no padding is
  needed (`--pad-to` still works);
- `lora_bias` (a trained bias) is refused: "vLLM does not support LoRA bias";
- the model class must implement LoRA (`SupportsLoRA`): GPT-2 does not;
- a module is LoRA-able only where the model has a LoRA layer for it (`packed_modules_mapping`
  and the model's linear layers); an adapter naming another module fails to load;
- DoRA, `modules_to_save` and non-default inits are refused (never written by s2ft).

Each of those refuses to load, loudly. The one silent failure found is in vLLM's CPU kernels, not
in the adapter: with every LoRA slot in use, a base-model request batched with adapter requests
decodes with the last slot's adapter, so serve with `--max-loras` above the number of adapters
(`serve_hint` says so).
"""

from __future__ import annotations

from typing import Any

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 16
_LLAMA_LIKE = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
LORA_MODULES: dict[str, frozenset[str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),  # fused in the checkpoint too
    "opt": frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
}
NO_LORA = {
    "gpt2": "vLLM's GPT2LMHeadModel does not implement LoRA (no SupportsLoRA in vllm/model_executor/models/gpt2.py)",
}


def smallest_max_lora_rank(rank: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts that fits `rank` (None above 512)."""
    return next((r for r in MAX_LORA_RANKS if r >= rank), None)


def vllm_problems(
    model_type: str | None, ranks: dict[str, int], lora_bias: bool, max_lora_rank: int | None = None
) -> list[str]:
    """Why vLLM would refuse this export, one message per limit, each naming the fix. `ranks`:
    module path -> LoRA rank; `max_lora_rank`: the engine's `--max-lora-rank` (None: any it
    accepts, i.e. 512)."""
    problems = []
    if model_type in NO_LORA:
        problems.append(f"model type {model_type!r}: {NO_LORA[model_type]}; serve it merged (`s2ft merge`) instead")
    elif model_type not in LORA_MODULES:
        problems.append(
            f"model type {model_type!r}: not among the architectures whose vLLM LoRA support s2ft checks "
            f"({', '.join(sorted(LORA_MODULES))}); export without --for vllm at your own risk"
        )
    else:
        allowed = LORA_MODULES[model_type]
        bad = sorted({p.rsplit(".", 1)[-1] for p in ranks} - allowed)
        if bad:
            problems.append(
                f"modules {bad}: vLLM's {model_type} has no LoRA layer for them (it has {sorted(allowed)}); "
                "train without them (--ffn-modules/--attn-modules)"
            )
    if lora_bias:
        problems.append(
            "lora_bias: the adapter trains biases, and vLLM does not support LoRA bias; retrain with "
            "`s2ft train --no-train-bias` (S2FTConfig(train_bias=False))"
        )
    if max_lora_rank is not None and max_lora_rank not in MAX_LORA_RANKS:
        problems.append(f"--max-lora-rank {max_lora_rank}: vLLM accepts only {', '.join(map(str, MAX_LORA_RANKS))}")
    elif ranks:
        top_path = max(ranks, key=ranks.get)
        top, limit = ranks[top_path], max_lora_rank or MAX_LORA_RANKS[-1]
        if top > limit:
            fits = smallest_max_lora_rank(top)
            fix = (
                f"serve with --max-lora-rank {fits} and export with --max-lora-rank {fits}"
                if fits
                else "train with a smaller --ffn-ratio/--attn-ratio (vLLM's largest rank is 512)"
            )
            problems.append(f"rank: module {top_path} needs LoRA rank {top} > vLLM --max-lora-rank {limit}; {fix}")
    return problems


def serve_hint(base: str | None, out_dir: str, ranks: dict[str, int], adapters: int = 1) -> str:
    """The `vllm serve` flags this export needs."""
    rank = smallest_max_lora_rank(max(ranks.values())) if ranks else DEFAULT_MAX_LORA_RANK
    return (
        f"vllm serve {base or 'BASE'} --enable-lora --max-lora-rank {rank} --max-loras {adapters + 1} "
        f"--lora-modules NAME={out_dir}   (--max-loras above the number of adapters: vLLM's CPU kernels apply "
        "the last slot's adapter to base-model requests when every slot is in use)"
    )


def report(meta: dict[str, Any], ranks: dict[str, int], lora_bias: bool, max_lora_rank: int | None) -> list[str]:
    """`vllm_problems` for an adapter's metadata (as `read_adapter` returns it)."""
    return vllm_problems(meta.get("base_model", {}).get("model_type"), ranks, lora_bias, max_lora_rank)
