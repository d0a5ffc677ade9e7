"""Quantized bases (QS²FT): S²FT blocks beside a bitsandbytes 4-bit or 8-bit base.

A bitsandbytes `Linear4bit` (NF4/FP4, optionally double-quantized) or `Linear8bitLt` stores its
weight packed (uint8, `(out·in/2, 1)`) or as int8 with per-row scales, so its shape cannot be
read from the weight and its values cannot be written in place. S²FT keeps every trained block
beside it as a dense delta in `delta_dtype` (float32 by default):

    y = base_layer(x) + scatter_R(x D_rᵀ + d_b) + x[..., C] D_cᵀ

(`S2FTLayer`'s thin path), exact with respect to the dequantized base: the quantized weights are
never modified and the model is never dequantized as a whole. Sizes come from
`in_features`/`out_features`; scoring a weight (the `weight`/`salience` strategies) dequantizes
one module at a time (`dequantized_weight`). `merge_and_unload()` on a quantized base first
dequantizes the model (`dequantize_model`), then merges: merging back into 4-bit would round the
deltas away.

This module owns recognising such modules and describing their quantization; it imports
bitsandbytes only when a model holds its modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _bnb_kind(module: nn.Module) -> str | None:
    """ "4bit" / "8bit" for a bitsandbytes linear layer, else None (no bitsandbytes import)."""
    name = type(module).__name__
    if not type(module).__module__.startswith("bitsandbytes"):
        return None
    if name in ("Linear4bit", "LinearNF4", "LinearFP4"):
        return "4bit"
    if name == "Linear8bitLt":
        return "8bit"
    return None


def is_quantized(module: nn.Module) -> bool:
    """Is `module` a bitsandbytes 4-bit or 8-bit linear layer?"""
    return _bnb_kind(module) is not None


def quantization_of(module: nn.Module) -> dict[str, Any] | None:
    """How `module` is quantized, as JSON (None for an unquantized module)."""
    kind = _bnb_kind(module)
    if kind is None:
        return None
    if kind == "8bit":
        return {"method": "bitsandbytes", "bits": 8}
    state = getattr(module.weight, "quant_state", None)
    return {
        "method": "bitsandbytes",
        "bits": 4,
        "quant_type": getattr(state, "quant_type", getattr(module.weight, "quant_type", None)),
        "double_quant": bool(getattr(state, "nested", False)),
        "compute_dtype": str(getattr(module, "compute_dtype", None) or "").replace("torch.", "") or None,
    }


def model_quantization(model: nn.Module) -> dict[str, Any] | None:
    """The quantization of a model's linear layers (that of the first quantized one, with the
    number of quantized modules), or None when none is quantized."""
    found = [q for m in model.modules() if (q := quantization_of(m)) is not None]
    if not found:
        return None
    return {**found[0], "quantized_modules": len(found)}


def logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The unpacked shape of a (possibly 4-bit packed) parameter."""
    state = getattr(param, "quant_state", None)
    return tuple(state.shape) if state is not None and getattr(state, "shape", None) is not None else tuple(param.shape)


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The `(out, in)` weight of a bitsandbytes linear layer, dequantized to float32 (a new
    tensor of one module's size)."""
    kind = _bnb_kind(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a bitsandbytes linear layer")
    weight = module.weight
    if kind == "4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float().reshape(module.out_features, -1)
    scale = getattr(weight, "SCB", None)
    if scale is None:
        scale = getattr(getattr(module, "state", None), "SCB", None)
    if weight.dtype != torch.int8 or scale is None:  # not quantized yet (still on the meta/float path)
        return weight.detach().float()
    return weight.float() * (scale.float().view(-1, 1) / 127.0)


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every bitsandbytes linear layer in `model` by an `nn.Linear` holding its
    dequantized weight (in `dtype`, default: the layer's compute dtype, else float32), one
    module at a time, and clear transformers' quantization flags. Returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not is_quantized(child):
                continue
            target = dtype or getattr(child, "compute_dtype", None) or torch.float32
            weight = dequantized_weight(child).to(target)
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            linear.to(device=weight.device, dtype=target)
            linear.weight.copy_(weight)
            if child.bias is not None:
                linear.bias.copy_(child.bias.detach().to(target))
            linear.requires_grad_(False)
            setattr(parent, name, linear)
            replaced += 1
    if replaced:
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
        for attr, value in (("is_quantized", False), ("hf_quantizer", None), ("quantization_method", None)):
            if hasattr(model, attr):
                try:
                    setattr(model, attr, value)
                except AttributeError:  # a read-only property on some versions
                    pass
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
            if hasattr(model, flag):
                try:
                    setattr(model, flag, False)
                except AttributeError:
                    pass
    return replaced
