"""Selection: which FFN channels and attention heads are trained in each layer (SPEC §3).

A strategy is a score function registered in `STRATEGIES`; selection keeps the `k`
highest-scoring units of each layer, where `k` comes from the layer allocation. Ties are
broken by unit index (stable sort), and random scores come from a generator seeded by
`(seed, layer, kind)`, so the same seed and model shape give the same indices on any
machine, and adding attention heads to a config does not move the FFN channels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from s2ft.config import S2FTConfig
from s2ft.structures import BlockStructure, ModelStructure, expand

# (model, block, kind, n_units, config, generator) -> scores of shape (n_units,); higher = chosen
ScoreFn = Callable[[nn.Module, BlockStructure, str, int, S2FTConfig, torch.Generator], torch.Tensor]


def _random_scores(
    model: nn.Module, block: BlockStructure, kind: str, n: int, config: S2FTConfig, generator: torch.Generator
) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


STRATEGIES: dict[str, ScoreFn] = {"random": _random_scores}


@dataclass
class LayerSelection:
    """Selected units of one block, sorted ascending; None when that structure is not trained."""

    ffn: torch.Tensor | None = None  # FFN channel indices
    attn: torch.Tensor | None = None  # query-head indices


def unit_count(ratio: float, n: int) -> int:
    """Units trained for a ratio: 0 for 0, else `round(ratio * n)` clamped to [1, n]."""
    if ratio <= 0 or n == 0:
        return 0
    return min(n, max(1, round(ratio * n)))


def layer_counts(structure: ModelStructure, config: S2FTConfig, kind: str) -> list[int]:
    """Units to train per layer for `kind` ("ffn" or "attn") under the layer allocation."""
    ratio = config.ffn_ratio if kind == "ffn" else config.attn_ratio
    counts = []
    for block in structure.blocks:
        part = block.ffn if kind == "ffn" else block.attn
        n = 0 if part is None else (part.n_channels if kind == "ffn" else part.n_heads)
        counts.append(unit_count(ratio, n))
    if config.layer_allocation != "uniform":  # validated in S2FTConfig; new modes plug in here
        raise ValueError(f"S2FTConfig.layer_allocation {config.layer_allocation!r} is not implemented")
    return counts


def select(model: nn.Module, structure: ModelStructure, config: S2FTConfig) -> list[LayerSelection]:
    """Choose the trained channels and heads of every block."""
    score = STRATEGIES[config.strategy]
    ffn_k = layer_counts(structure, config, "ffn")
    attn_k = layer_counts(structure, config, "attn")
    out = []
    for block in structure.blocks:
        sel = LayerSelection()
        if block.ffn is not None and ffn_k[block.index] and _any_role(block.ffn.slots, config.ffn_modules):
            sel.ffn = _top_k(score, model, block, "ffn", block.ffn.n_channels, ffn_k[block.index], config)
        if block.attn is not None and attn_k[block.index] and _any_role(block.attn.slots, config.attn_modules):
            sel.attn = _top_k(score, model, block, "attn", block.attn.n_heads, attn_k[block.index], config)
        out.append(sel)
    if not any(s.ffn is not None or s.attn is not None for s in out):
        raise ValueError(
            f"S2FTConfig selects nothing on this model: ffn_modules={list(config.ffn_modules)}, "
            f"attn_modules={list(config.attn_modules)} match none of its structures"
        )
    return out


def module_indices(
    structure: ModelStructure, selection: list[LayerSelection], config: S2FTConfig
) -> dict[str, dict[str, torch.Tensor]]:
    """`{module_path: {"rows": idx, "cols": idx}}` for every trained module, original order."""
    plan: dict[str, dict[str, torch.Tensor]] = {}
    for block, sel in zip(structure.blocks, selection, strict=True):
        plan.update(expand(block, sel.ffn, sel.attn, config.ffn_modules, config.attn_modules))
    return plan


def _any_role(slots: dict, roles: tuple[str, ...]) -> bool:
    return any(r in slots for r in roles)


def _top_k(
    score: ScoreFn, model: nn.Module, block: BlockStructure, kind: str, n: int, k: int, config: S2FTConfig
) -> torch.Tensor:
    scores = score(model, block, kind, n, config, _generator(config.seed, block.index, kind))
    if scores.shape != (n,):
        raise RuntimeError(
            f"strategy {config.strategy!r} returned scores of shape {tuple(scores.shape)}, expected ({n},)"
        )
    order = torch.argsort(scores.detach().float().cpu(), descending=True, stable=True)
    return torch.sort(order[:k]).values.to(torch.long)


def _generator(seed: int, layer: int, kind: str) -> torch.Generator:
    digest = hashlib.sha256(f"s2ft:{seed}:{layer}:{kind}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
