"""Export an S²FT adapter as a standard PEFT LoRA adapter that computes the same function
(SPEC §5), for serving stacks that speak LoRA (vLLM, TGI, PEFT itself).

Exact factorization, per module, with `E_R` (out, k_r) and `E_C` (in, k_c) one-hot selectors:

    ΔW = E_R D_r + D_c E_Cᵀ = [E_R | D_c] · [D_r ; E_Cᵀ] = B · A
    B = [E_R | D_c]   (out, k_r + k_c)        A = [D_r ; E_Cᵀ]   (k_r + k_c, in)

so the LoRA rank of a module is `k_r + k_c`, and `lora_alpha = rank` gives scale 1. A trained
bias `Δb = E_R d_b` becomes PEFT's `lora_bias` (a bias on `lora_B`). No approximation is
made: PEFT reproduces the S²FT model's logits to floating-point rounding.

Ranks differ per module (PEFT `rank_pattern`/`alpha_pattern`, which vLLM 0.32 honours). Engines
that need one rank for every module get `pad_to=R`: every module padded with zero rows/columns
to rank R — still exact. `engine="vllm"` refuses, before writing, what vLLM would refuse
(`s2ft.integrations.vllm`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from s2ft.adapter_io import AdapterError, atomic_write, read_adapter


def lora_factors(parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A, B)` with `B @ A = ΔW` for one module's S²FT parts; `shape` is the weight's (out, in)."""
    out_f, in_f = shape
    a_blocks, b_blocks = [], []
    dtype = next(t.dtype for k, t in parts.items() if k.endswith("delta"))
    if "row_idx" in parts:
        r = parts["row_idx"]
        e_r = torch.zeros(out_f, len(r), dtype=dtype)
        e_r[r, torch.arange(len(r))] = 1
        b_blocks.append(e_r)  # (out, k_r)
        a_blocks.append(parts["row_delta"])  # (k_r, in)
    if "col_idx" in parts:
        c = parts["col_idx"]
        e_ct = torch.zeros(len(c), in_f, dtype=dtype)
        e_ct[torch.arange(len(c)), c] = 1
        b_blocks.append(parts["col_delta"])  # (out, k_c)
        a_blocks.append(e_ct)  # (k_c, in)
    return torch.cat(a_blocks, 0), torch.cat(b_blocks, 1)  # (r, in), (out, r)


class ExportError(ValueError):
    """The export would not load (or not compute the same function) where it is going."""


def export_lora(
    adapter_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    pad_to: int | None = None,
    max_rank: int | None = None,
    engine: str = "peft",
    max_lora_rank: int | None = None,
) -> dict[str, Any]:
    """Write `out_dir/adapter_config.json` + `adapter_model.safetensors`; return a report with
    the rank of every module and, under "vllm", what vLLM would refuse.

    `engine="vllm"` checks vLLM's LoRA limits first (`s2ft.integrations.vllm`; `max_lora_rank`:
    the engine's `--max-lora-rank`, None for its largest) and raises `ExportError` naming every
    limit the adapter hits and the flag that fixes it; nothing is written then."""
    from s2ft.integrations.vllm import report as vllm_report

    if engine not in ("peft", "vllm"):
        raise ValueError(f"engine must be 'peft' or 'vllm', got {engine!r}")
    meta, modules = read_adapter(adapter_path)
    ranks = {path: info.get("rows", 0) + info.get("cols", 0) for path, info in meta["modules"].items()}
    ranks = {p: r for p, r in ranks.items() if r}
    if not ranks:
        raise AdapterError(f"{adapter_path}: the adapter trains nothing; there is nothing to export")
    lora_bias = any("row_bias" in modules[p] for p in ranks)
    stored = {p: max(r, pad_to or 0) for p, r in ranks.items()}  # the ranks as written (padded)
    vllm = vllm_report(meta, stored, lora_bias, max_lora_rank)
    if engine == "vllm" and vllm:
        raise ExportError(
            f"{adapter_path}: vLLM would refuse this export:\n  - " + "\n  - ".join(vllm) + "\nnothing was written"
        )
    top = max(ranks.values())
    if max_rank is not None and top > max_rank:
        worst = max(ranks, key=ranks.get)
        raise ValueError(
            f"module {worst} needs LoRA rank {top} > max rank {max_rank}; train with a smaller ratio, or serve "
            "with a larger max LoRA rank"
        )
    if pad_to is not None and pad_to < top:
        raise ValueError(f"pad_to={pad_to} is below the largest module rank {top}")

    tensors: dict[str, torch.Tensor] = {}
    for path, info in meta["modules"].items():
        if path not in ranks:
            continue
        parts = modules[path]
        a, b = lora_factors(parts, tuple(info["shape"]))
        if pad_to is not None and pad_to > a.shape[0]:
            extra = pad_to - a.shape[0]
            a = torch.cat([a, a.new_zeros(extra, a.shape[1])], 0)
            b = torch.cat([b, b.new_zeros(b.shape[0], extra)], 1)
        key = f"base_model.model.{path}"
        tensors[f"{key}.lora_A.weight"] = a.contiguous()
        tensors[f"{key}.lora_B.weight"] = b.contiguous()
        if "row_bias" in parts:
            bias = torch.zeros(info["shape"][0], dtype=b.dtype)
            bias[parts["row_idx"]] = parts["row_bias"].to(b.dtype)
            tensors[f"{key}.lora_B.bias"] = bias
    if lora_bias:  # PEFT creates lora_B with a bias on every targeted module: zeros where untrained
        for path in ranks:
            tensors.setdefault(f"base_model.model.{path}.lora_B.bias", torch.zeros(meta["modules"][path]["shape"][0]))

    uniform = pad_to or (top if len(set(ranks.values())) == 1 else None)
    base = meta["base_model"]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.get("name_or_path"),
        "r": uniform or top,
        "lora_alpha": uniform or top,
        "rank_pattern": {} if uniform else {p: r for p, r in ranks.items()},
        "alpha_pattern": {} if uniform else {p: r for p, r in ranks.items()},
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": lora_bias,
        "fan_in_fan_out": base.get("model_type") == "gpt2",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        atomic_write(tmp / "adapter_model.safetensors", st_save(tensors, metadata={"format": "pt"}))
        atomic_write(tmp / "adapter_config.json", (json.dumps(config, indent=2) + "\n").encode())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "modules": len(ranks),
        "rank_min": min(ranks.values()),
        "rank_max": top,
        "uniform_rank": uniform,
        "lora_bias": lora_bias,
        "parameters": sum(t.numel() for t in tensors.values()),
        "ranks": ranks,
        "vllm": vllm,
        "base": meta["base_model"].get("name_or_path"),
    }
