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

bitsandbytes (0.50, on CPUs with AVX512-BF16) repacks a `Linear4bit` weight in place, for a
faster inference kernel, the first time the layer runs in eval mode on an input that does not
require grad: the layout changes, the absmax constants are rounded to bfloat16, and the layer then
computes through `gemv_4bit`, which has no autograd kernel. After one such forward (an evaluation
or a `generate` in the middle of training), training back-propagates nothing through the base
layer (silently: PyTorch only warns), and `dequantize_4bit` of the repacked weight reads garbage.
`keep_unpacked` turns that repacking off on every 4-bit layer of a model s2ft trains or loads
(and restores the standard layout of any layer already repacked), so the base stays exactly the
weights the adapter was trained against.

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
def _unpack(module: nn.Module) -> bool:
    """Restore the standard layout of a 4-bit weight bitsandbytes repacked for its CPU inference
    kernel (see the module docstring); True if it was repacked."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return False
    import bitsandbytes.functional as bnbf

    inverse = getattr(bnbf, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:  # pragma: no cover - a bitsandbytes that packs but cannot unpack
        raise RuntimeError(
            f"{type(module).__name__}: bitsandbytes repacked this 4-bit weight for CPU inference and this "
            "bitsandbytes version has no inverse; reload the model before training or merging"
        )
    weight.data, weight.quant_state = inverse(weight.data, state)
    return True


def keep_unpacked(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking `model`'s 4-bit weights for its CPU inference kernel (a
    per-module flag), and unpack any it already repacked. Returns how many were repacked before.

    Repacked layers compute without autograd and dequantize wrongly (module docstring), so s2ft
    calls this on every model it wraps or loads quantized. The cost: 4-bit inference on an
    AVX512-BF16 CPU uses bitsandbytes' generic kernel instead of the repacked one."""
    unpacked = 0
    for module in model.modules():
        if _bnb_kind(module) != "4bit":
            continue
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        unpacked += _unpack(module)
    return unpacked


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

        _unpack(module)  # the repacked CPU layout does not dequantize
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
