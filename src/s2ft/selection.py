"""Selection: which FFN channels and attention heads are trained in each layer (SPEC §3).

A strategy is a score function in `STRATEGIES`, giving one score per unit (FFN channel or
query head) of a block; selection keeps the `k` highest (`order="large"`) or lowest
(`order="small"`) scores, where `k` comes from the layer allocation. Ties are broken by unit
index (stable sort). Scores (‖·‖ is the L2 norm; "the unit's slices" are the rows/columns
it owns in the matrices being trained — `ffn_modules` / `attn_modules`):

- `random`: uniform random numbers from a generator seeded by `(seed, layer, kind)`: the same
  seed and model shape give the same indices on any machine, and adding attention heads to a
  config does not move the FFN channels.
- `weight`: ‖W‖ over the unit's slices (the Frobenius norm of all its trained weights).
- `activation`: ‖a‖ over calibration tokens of the unit's activation: for channel c the down
  projection's input feature c (act(gate)·up), for head h the o projection's input features of
  head h (the head's attention output).
- `salience`: Wanda's Σ |W_ij|·‖X_j‖ over the unit's slices, X_j the calibration norm of the
  input feature j of the matrix the slice belongs to.
- `gradient`: sqrt(Σ over calibration batches of ‖dL/dW‖² over the unit's slices).

K/V rows belong to a KV group shared by `n_heads / n_kv_heads` query heads; when k or v is
trained, each query head is credited with its group's k/v score divided by the group size.

Layer allocation spreads the uniform budget `Σ_l count(ratio, n_l)` over layers in proportion to
weights: `uniform` (1, 1, …), `increasing` (1, 2, …, L), `decreasing` (L, …, 1), `random_one`
(all in one seeded random layer), or an explicit list of L non-negative weights. Counts are
rounded by largest remainder and capped at the layer's unit count.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from s2ft.calibration import CalibrationStats, collect
from s2ft.config import S2FTConfig
from s2ft.quantization import dequantized_weight, is_quantized
from s2ft.structures import COLUMN_ROLES, BlockStructure, ModelStructure, Slot, expand, weight_view


@dataclass
class ScoreContext:
    """What a score function may look at."""

    model: nn.Module
    config: S2FTConfig
    stats: CalibrationStats | None = None

    def weight(self, path: str) -> torch.Tensor:
        module = self.model.get_submodule(path)
        module = getattr(module, "base_layer", module)
        if is_quantized(module):  # one module dequantized at a time, never the whole model
            return dequantized_weight(module)
        return weight_view(module).detach().float()

    def generator(self, layer: int, kind: str) -> torch.Generator:
        return _generator(self.config.seed, layer, kind)


ScoreFn = Callable[[ScoreContext, BlockStructure, str], torch.Tensor]  # -> (n_units,)


def _units(block: BlockStructure, kind: str) -> int:
    return block.ffn.n_channels if kind == "ffn" else block.attn.n_heads


def _roles(ctx: ScoreContext, block: BlockStructure, kind: str) -> dict[str, Slot]:
    part = block.ffn if kind == "ffn" else block.attn
    roles = ctx.config.ffn_modules if kind == "ffn" else ctx.config.attn_modules
    return {r: part.slots[r] for r in roles if r in part.slots}


def per_unit(values: torch.Tensor, slot: Slot, role: str, block: BlockStructure, kind: str) -> torch.Tensor:
    """Sum a per-row (slot.axis == "row") or per-column vector of a module over each unit's slice."""
    if kind == "ffn":
        n = block.ffn.n_channels
        return values[slot.offset : slot.offset + n] if slot.axis == "row" else values[:n]
    a = block.attn
    if role in ("k", "v"):
        groups = values[slot.offset : slot.offset + a.n_kv_heads * a.head_dim].view(a.n_kv_heads, a.head_dim).sum(1)
        return groups.repeat_interleave(a.group_size) / a.group_size  # query head h -> group h // G
    start = slot.offset if slot.axis == "row" else 0
    return values[start : start + a.n_heads * a.head_dim].view(a.n_heads, a.head_dim).sum(1)


def _random_scores(ctx: ScoreContext, block: BlockStructure, kind: str) -> torch.Tensor:
    return torch.rand(_units(block, kind), generator=ctx.generator(block.index, kind), dtype=torch.float64)


def _weight_scores(ctx: ScoreContext, block: BlockStructure, kind: str) -> torch.Tensor:
    total = torch.zeros(_units(block, kind), dtype=torch.float64)
    for role, slot in _roles(ctx, block, kind).items():
        w = ctx.weight(slot.path)
        sq = (w * w).sum(1 if slot.axis == "row" else 0)
        total += per_unit(sq, slot, role, block, kind).double().cpu()
    return total.sqrt()


def _activation_scores(ctx: ScoreContext, block: BlockStructure, kind: str) -> torch.Tensor:
    part = block.ffn if kind == "ffn" else block.attn
    role = "down" if kind == "ffn" else "o"
    slot = part.slots[role]
    return per_unit(_stats(ctx).input_sq[slot.path], slot, role, block, kind).double().cpu().sqrt()


def _salience_scores(ctx: ScoreContext, block: BlockStructure, kind: str) -> torch.Tensor:
    total = torch.zeros(_units(block, kind), dtype=torch.float64)
    for role, slot in _roles(ctx, block, kind).items():
        w = ctx.weight(slot.path).abs()
        x_norm = _stats(ctx).input_sq[slot.path].to(w.device).sqrt()  # (in,)
        values = w.mv(x_norm) if slot.axis == "row" else w.sum(0) * x_norm  # (out,) / (in,)
        total += per_unit(values, slot, role, block, kind).double().cpu()
    return total


def _gradient_scores(ctx: ScoreContext, block: BlockStructure, kind: str) -> torch.Tensor:
    stats = _stats(ctx)
    total = torch.zeros(_units(block, kind), dtype=torch.float64)
    for role, slot in _roles(ctx, block, kind).items():
        sq = stats.row_grad_sq[slot.path] if slot.axis == "row" else stats.col_grad_sq[slot.path]
        total += per_unit(sq, slot, role, block, kind).double().cpu()
    return total.sqrt()


def _stats(ctx: ScoreContext) -> CalibrationStats:
    if ctx.stats is None:
        raise ValueError(f"S2FTConfig.strategy={ctx.config.strategy!r} needs calibration data")
    return ctx.stats


STRATEGIES: dict[str, ScoreFn] = {
    "random": _random_scores,
    "weight": _weight_scores,
    "activation": _activation_scores,
    "salience": _salience_scores,
    "gradient": _gradient_scores,
}
DATA_STRATEGIES = frozenset({"activation", "salience", "gradient"})


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


def allocation_weights(config: S2FTConfig, n_layers: int) -> list[float]:
    alloc = config.layer_allocation
    if alloc == "uniform":
        return [1.0] * n_layers
    if alloc == "increasing":
        return [float(i + 1) for i in range(n_layers)]
    if alloc == "decreasing":
        return [float(n_layers - i) for i in range(n_layers)]
    if alloc == "random_one":
        g = _generator(config.seed, -1, "random_one")
        layer = int(torch.randint(n_layers, (1,), generator=g))
        return [1.0 if i == layer else 0.0 for i in range(n_layers)]
    if len(alloc) != n_layers:
        raise ValueError(f"S2FTConfig.layer_allocation lists {len(alloc)} weights but the model has {n_layers} layers")
    return [float(w) for w in alloc]


def layer_counts(structure: ModelStructure, config: S2FTConfig, kind: str) -> list[int]:
    """Units to train per layer for `kind` ("ffn" or "attn") under the layer allocation."""
    ratio = config.ffn_ratio if kind == "ffn" else config.attn_ratio
    sizes = []
    for block in structure.blocks:
        part = block.ffn if kind == "ffn" else block.attn
        sizes.append(0 if part is None else _units(block, kind))
    budget = sum(unit_count(ratio, n) for n in sizes)
    weights = [w if n else 0.0 for w, n in zip(allocation_weights(config, len(sizes)), sizes, strict=True)]
    if budget == 0 or sum(weights) == 0:
        return [0] * len(sizes)
    exact = [budget * w / sum(weights) for w in weights]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: budget - sum(counts)]:
        counts[i] += 1
    capped = [min(c, n) for c, n in zip(counts, sizes, strict=True)]
    if sum(capped) < budget:
        warnings.warn(
            f"layer_allocation={config.layer_allocation!r} asks for more {kind} units than some layers have; "
            f"training {sum(capped)} of the {budget} budgeted",
            stacklevel=3,
        )
    return capped


def needs_calibration(config: S2FTConfig) -> bool:
    return config.strategy in DATA_STRATEGIES


def calibrate(
    model: nn.Module, structure: ModelStructure, config: S2FTConfig, batches: Iterable[dict[str, Any]]
) -> CalibrationStats:
    """The statistics `config.strategy` needs, from `batches`."""
    paths = sorted({s.path for b in structure.blocks for part in (b.ffn, b.attn) if part for s in part.slots.values()})
    return collect(model, paths, batches, gradients=config.strategy == "gradient")


def select(
    model: nn.Module,
    structure: ModelStructure,
    config: S2FTConfig,
    calibration: Iterable[dict[str, Any]] | CalibrationStats | None = None,
) -> list[LayerSelection]:
    """Choose the trained channels and heads of every block."""
    stats = None
    if needs_calibration(config):
        if calibration is None:
            raise ValueError(
                f"S2FTConfig.strategy={config.strategy!r} needs calibration data: pass calibration=<batches> "
                "(dicts with input_ids and optionally attention_mask/labels)"
            )
        stats = (
            calibration
            if isinstance(calibration, CalibrationStats)
            else calibrate(model, structure, config, calibration)
        )
    ctx = ScoreContext(model, config, stats)
    score = STRATEGIES[config.strategy]
    ffn_k = layer_counts(structure, config, "ffn")
    attn_k = layer_counts(structure, config, "attn")
    out = []
    for block in structure.blocks:
        sel = LayerSelection()
        if block.ffn is not None and ffn_k[block.index] and _roles(ctx, block, "ffn"):
            sel.ffn = _top_k(score(ctx, block, "ffn"), ffn_k[block.index], config.order)
        if block.attn is not None and attn_k[block.index] and _roles(ctx, block, "attn"):
            sel.attn = _top_k(score(ctx, block, "attn"), attn_k[block.index], config.order)
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


def _top_k(scores: torch.Tensor, k: int, order: str) -> torch.Tensor:
    scores = scores.detach().double().cpu()
    order_idx = torch.argsort(scores, descending=(order == "large"), stable=True)
    return torch.sort(order_idx[:k]).values.to(torch.long)


def _generator(seed: int, layer: int, kind: str) -> torch.Generator:
    digest = hashlib.sha256(f"s2ft:{seed}:{layer}:{kind}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


__all__ = ["COLUMN_ROLES", "STRATEGIES", "LayerSelection", "calibrate", "layer_counts", "module_indices", "select"]
