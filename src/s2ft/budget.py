"""Budgets by parameter count: "train as many parameters as LoRA rank r on modules M".

LoRA of rank r on a weight (out, in) trains r·(in + out) parameters; on a role inside a fused
projection (Phi-3 `qkv_proj`, GPT-2 `c_attn`) we count that role's rows only, as if the role
were its own matrix. S²FT trains, per FFN channel, one row of each of up/gate (plus its bias
entry, when trained) and one column of down; per query head, head_dim rows/columns of the
trained attention roles. `match_lora` solves for the per-layer count that comes closest to
LoRA's per-layer count (so the total is within one channel per matrix per layer) and returns
a config with that exact ratio.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from torch import nn

from s2ft.config import ATTN_ROLES, FFN_ROLES, S2FTConfig
from s2ft.selection import layer_counts
from s2ft.structures import ModelStructure, module_shape, resolve, structure_map_for


def lora_parameters(model: nn.Module, structure: ModelStructure, rank: int, roles: Iterable[str]) -> list[int]:
    """LoRA's trainable parameters per layer for `rank` on `roles` (names from up/gate/down/q/k/v/o)."""
    roles = list(roles)
    bad = [r for r in roles if r not in FFN_ROLES + ATTN_ROLES]
    if bad:
        raise ValueError(f"unknown LoRA target role(s) {bad}; use {list(FFN_ROLES + ATTN_ROLES)}")
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    out = []
    for block in structure.blocks:
        total = 0
        for part, names in ((block.ffn, FFN_ROLES), (block.attn, ATTN_ROLES)):
            if part is None:
                continue
            for role in roles:
                if role in names and role in part.slots:
                    o, i = _role_shape(model, part, role)
                    total += rank * (o + i)
        out.append(total)
    return out


def s2ft_parameters(model: nn.Module, structure: ModelStructure, config: S2FTConfig) -> list[int]:
    """Trainable parameters per layer that `config` gives (before any selection is made)."""
    ffn_k = layer_counts(structure, config, "ffn")
    attn_k = layer_counts(structure, config, "attn")
    return [
        ffn_k[b.index] * _unit_cost(model, b.ffn, config.ffn_modules, config.train_bias, "ffn")
        + attn_k[b.index] * _unit_cost(model, b.attn, config.attn_modules, config.train_bias, "attn")
        for b in structure.blocks
    ]


def match_lora(model: nn.Module, config: S2FTConfig, rank: int, roles: Iterable[str]) -> tuple[S2FTConfig, dict]:
    """A copy of `config` whose FFN ratio (or head ratio, when `ffn_ratio == 0`) trains as close
    as possible to as many parameters as LoRA rank `rank` on `roles`; plus a report."""
    if config.layer_allocation != "uniform":
        raise ValueError("budget matching solves a uniform per-layer count; set layer_allocation='uniform'")
    structure = resolve(model, structure_map_for(model, config.structure_map))
    lora = lora_parameters(model, structure, rank, roles)
    kind = "ffn" if config.ffn_ratio > 0 else "attn"
    block = structure.blocks[0]
    part = block.ffn if kind == "ffn" else block.attn
    if part is None:
        raise ValueError(f"the model has no {kind} structure to match a budget with")
    modules = config.ffn_modules if kind == "ffn" else config.attn_modules
    cost = _unit_cost(model, part, modules, config.train_bias, kind)
    n = part.n_channels if kind == "ffn" else part.n_heads
    if cost == 0:
        raise ValueError(f"S2FTConfig.{kind}_modules={list(modules)} train nothing on this model")
    fixed_other = 0  # heads stay as configured when channels are solved for
    if config.ffn_ratio > 0 and config.attn_ratio > 0:
        heads_only = dataclasses.replace(config, ffn_ratio=0.0)
        fixed_other = sum(s2ft_parameters(model, structure, heads_only)) // len(structure.blocks)
    per_layer = sum(lora) / len(lora) - fixed_other
    k = max(1, min(n, round(per_layer / cost)))
    matched = dataclasses.replace(config, **{f"{kind}_ratio": k / n})
    s2ft_total = sum(s2ft_parameters(model, structure, matched))
    report = {
        "lora_rank": rank,
        "lora_roles": list(roles),
        "lora_parameters": sum(lora),
        "s2ft_parameters": s2ft_total,
        f"{kind}_units_per_layer": k,
        f"{kind}_ratio": k / n,
        "parameters_per_unit": cost,
    }
    return matched, report


def match_rank(model: nn.Module, config: S2FTConfig, roles: Iterable[str]) -> tuple[int, dict]:
    """The LoRA rank on `roles` whose trainable-parameter count comes closest to what `config`
    trains (the reverse of `match_lora`), and a report."""
    structure = resolve(model, structure_map_for(model, config.structure_map))
    roles = list(roles)
    s2ft_total = sum(s2ft_parameters(model, structure, config))
    per_rank = sum(lora_parameters(model, structure, 1, roles))
    if per_rank == 0:
        raise ValueError(f"LoRA target roles {roles} match no module of this model")
    rank = max(1, round(s2ft_total / per_rank))
    report = {
        "lora_rank": rank,
        "lora_roles": roles,
        "lora_parameters": rank * per_rank,
        "s2ft_parameters": s2ft_total,
    }
    return rank, report


def lora_target_modules(model: nn.Module, roles: Iterable[str], structure_map: dict | None = None) -> list[str]:
    """PEFT `target_modules` (module-name suffixes) for roles such as `q, v, up, down`.

    A role inside a fused projection (Phi-3 `qkv_proj`, GPT-2 `c_attn`) targets the whole
    fused module: PEFT adapts modules, not row blocks.
    """
    structure = resolve(model, structure_map_for(model, structure_map))
    roles = list(roles)
    bad = [r for r in roles if r not in FFN_ROLES + ATTN_ROLES]
    if bad:
        raise ValueError(f"unknown LoRA target role(s) {bad}; use {list(FFN_ROLES + ATTN_ROLES)}")
    block = structure.blocks[0]
    names = []
    for part in (block.ffn, block.attn):
        for role, slot in part.slots.items() if part is not None else ():
            prefix = structure.structure_map["layers"] + f".{block.index}."
            name = slot.path[len(prefix) :] if slot.path.startswith(prefix) else slot.path
            if role in roles and name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"LoRA target roles {roles} match no module of this model")
    return names


def _role_shape(model: nn.Module, part, role: str) -> tuple[int, int]:
    slot = part.slots[role]
    module = model.get_submodule(slot.path)
    out_dim, in_dim = module_shape(getattr(module, "base_layer", module))
    if slot.axis == "row":  # a fused module counts this role's rows only
        if hasattr(part, "n_channels"):
            out_dim = part.n_channels
        else:
            out_dim = (part.n_kv_heads if role in ("k", "v") else part.n_heads) * part.head_dim
    return out_dim, in_dim


def _unit_cost(model: nn.Module, part, roles: Iterable[str], train_bias: bool, kind: str) -> int:
    """Parameters trained per unit (channel or query head) for `roles`."""
    if part is None:
        return 0
    cost = 0.0
    for role in roles:
        if role not in part.slots:
            continue
        slot = part.slots[role]
        module = model.get_submodule(slot.path)
        module = getattr(module, "base_layer", module)
        out_dim, in_dim = module_shape(module)
        bias = 1 if (train_bias and slot.axis == "row" and getattr(module, "bias", None) is not None) else 0
        per_line = (in_dim + bias) if slot.axis == "row" else out_dim  # one row (+ bias) or one column
        if kind == "ffn":
            cost += per_line
        elif role in ("k", "v"):  # a KV head (head_dim rows) is shared by group_size query heads
            cost += per_line * part.head_dim / part.group_size
        else:
            cost += per_line * part.head_dim
    return round(cost)
