"""Calibration statistics for data-dependent selection (activation, salience, gradient).

One pass over a few batches collects, for every module of the coupled structures:

- `input_sq[path]` (in,): Σ over non-padding tokens of x_j², the squared norm of each input
  feature — the activation statistic (and Wanda's ‖X_j‖₂ for salience);
- with `gradients=True`, `row_grad_sq[path]` (out,) and `col_grad_sq[path]` (in,): Σ over
  batches of ‖(dL/dW)[r, :]‖² and ‖(dL/dW)[:, c]‖².

The weight gradient is never stored: a hook on each module's output forms
`dW = gᵀ x` (out, in) for that one module, reduces it to row/column norms and drops it, so
only one layer's gradient exists at a time and the model's own parameters get no `.grad`. The
forward keeps the activations backward needs, like one training step. Base weights are not
modified; the model is returned in its original train/eval mode.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from s2ft.structures import module_shape


@dataclass
class CalibrationStats:
    input_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    row_grad_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    col_grad_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    batches: int = 0


def collect(
    model: nn.Module, paths: list[str], batches: Iterable[dict[str, Any]], gradients: bool = False
) -> CalibrationStats:
    """Run `batches` (dicts with `input_ids`, optional `attention_mask`/`labels`) through
    `model` and accumulate the statistics above for the modules at `paths`."""
    stats = CalibrationStats()
    device = next(model.parameters()).device
    state: dict[str, torch.Tensor | None] = {"mask": None}
    handles = []

    def make_hook(path: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].detach()
            x2 = x.reshape(-1, x.shape[-1]).float()  # (N, in)
            mask = state["mask"]
            xm = x2 if mask is None else x2 * mask[:, None]
            sq = (xm * xm).sum(0)
            stats.input_sq[path] = stats.input_sq.get(path, 0) + sq
            if gradients and out.requires_grad:
                out.register_hook(lambda g: _grad_norms(stats, path, g, xm))

        return hook

    for path in paths:
        module = model.get_submodule(path)
        module = getattr(module, "base_layer", module)
        module_shape(module)  # type check
        handles.append(module.register_forward_hook(make_hook(path)))
    if gradients:
        emb = model.get_input_embeddings()
        handles.append(emb.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))

    # statistics of the blocks need no logits unless we backpropagate a loss: skip the LM head
    accepts = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if not gradients and "logits_to_keep" in accepts else {}
    was_training = model.training
    model.eval()
    try:
        with torch.set_grad_enabled(gradients):
            for batch in batches:
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                state["mask"] = mask.reshape(-1).float()
                stats.tokens += int(mask.sum())
                stats.batches += 1
                labels = batch.get("labels")
                labels = ids.masked_fill(mask == 0, -100) if labels is None else labels.to(device)
                out = model(input_ids=ids, attention_mask=mask, labels=labels if gradients else None, **extra)
                if gradients:
                    out.loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if stats.batches == 0:
        raise ValueError("calibration data is empty: data-dependent selection needs at least one batch")
    return stats


def _grad_norms(stats: CalibrationStats, path: str, g: torch.Tensor, x: torch.Tensor) -> None:
    g2 = g.reshape(-1, g.shape[-1]).float()  # (N, out)
    dw = g2.t().mm(x)  # (out, in): this module's weight gradient, reduced and dropped below
    sq = dw * dw
    stats.row_grad_sq[path] = stats.row_grad_sq.get(path, 0) + sq.sum(1)
    stats.col_grad_sq[path] = stats.col_grad_sq.get(path, 0) + sq.sum(0)
