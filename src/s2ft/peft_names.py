"""PEFT's method names on an S2FTModel: which carry over, and a clear error for the rest.

An S2FTModel forwards unknown attributes to the transformers model it wraps, so that it behaves
like that model (`config`, `device`, `generate`, `get_input_embeddings`, ...). PEFT's names
must not take that road: transformers models carry PEFT's own integration
(`PeftAdapterMixin`: `active_adapters`, `enable_adapters`, ...) and its Hub upload
(`PushToHubMixin`), which would act on the base model, or fail with a transformers message
("No adapter loaded"). `S2FTModel.__getattr__` asks `unsupported(name)` first:

- the PEFT names whose meaning carries over are methods of S2FTModel itself (listed in
  docs/ADAPTERS.md, "PEFT names");
- `HINTS` maps the others to what to use instead;
- every other public name of transformers' `PeftAdapterMixin` and every name of
  `PushToHubMixin` raises `PeftNameError` instead of reaching the wrapped model;
- a public name of PEFT's `PeftModel` or LoRA tuner that the wrapped model lacks too raises
  `PeftNameError` rather than transformers' AttributeError (so names a PEFT release adds are
  covered; PEFT is imported only then).

`PeftNameError` is an `AttributeError`, so `hasattr(model, "get_layer_status")` is False, as
libraries that probe for PEFT features expect.
"""

from __future__ import annotations

import functools

import torch.nn as nn

HINTS: dict[str, str] = {
    "add_weighted_adapter": "fuse_adapters(adapter_names, weights, new_name) (exact weighted sum of S²FT adapters)",
    "get_layer_status": "model.adapters, model.active_adapter and `s2ft info ADAPTER_DIR`",
    "get_model_status": "model.adapters, model.active_adapter and `s2ft info ADAPTER_DIR`",
    "get_adapter_state_dict": "model.adapter_modules(name) or model.state_dict() (adapter tensors only)",
    "enable_peft_hotswap": "model.hotswap_adapter(path, name)",
    "set_requires_grad": "set_adapter(name): only the active, trainable adapter requires grad",
    "modules_to_save": "nothing: S²FT trains no extra modules (train_bias=True trains the rows' bias entries)",
    "supports_lora_conversion": "s2ft.export.export_lora or `s2ft export-lora ADAPTER OUT` (every adapter converts)",
    "get_prompt": "nothing: prompt learning has no S²FT counterpart",
    "get_prompt_embedding_to_save": "nothing: prompt learning has no S²FT counterpart",
    "has_active_enabled_adapter": "model.active_adapter != '__base__'",
    "base_model_torch_dtype": "model.dtype",
    "prepare_model_for_gradient_checkpointing": (
        "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})"
    ),
    "inject_adapter": "get_s2ft_model(model, config) or model.add_adapter(name, config)",
    "get_model_config": "model.config",
    "subtract_mutated_init": "nothing: S²FT deltas start at zero",
}


class PeftNameError(AttributeError):
    """A PEFT method that S2FTModel does not have; the message says what to use instead."""


@functools.cache
def _mixin_names() -> frozenset[str]:
    """Public names of transformers' PeftAdapterMixin (every PreTrainedModel has them)."""
    try:
        from transformers.integrations.peft import PeftAdapterMixin
    except ImportError:
        return frozenset()
    return frozenset(n for n in vars(PeftAdapterMixin) if not n.startswith("_"))


@functools.cache
def _peft_public_names() -> frozenset[str]:
    """Public names of PEFT's PeftModel and LoRA tuner, minus those every nn.Module has and the
    transformers generics that PeftModel re-exports (imports PEFT: used only on a miss)."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraModel
        from transformers import PreTrainedModel
    except ImportError:
        return frozenset()
    names = {n for c in (PeftModel, LoraModel) for n in dir(c) if not n.startswith("_")}
    generics = (set(dir(PreTrainedModel)) - _mixin_names()) | set(dir(nn.Module))
    return frozenset(names - generics - {"generate", "prepare_inputs_for_generation", "prefix"})


@functools.cache
def _hub_names() -> frozenset[str]:
    try:
        from transformers.utils import PushToHubMixin
    except ImportError:
        return frozenset()
    return frozenset(n for n in dir(PushToHubMixin) if not n.startswith("__"))


def unsupported(name: str, missing: bool = False) -> PeftNameError | None:
    """The error for a PEFT or Hub name that S2FTModel does not define, else None (the caller
    then forwards `name` to the wrapped model). `missing=True`: the wrapped model lacks `name`
    too; then PEFT's own names are checked as well (importing PEFT only on such a miss)."""
    if name in HINTS:
        return PeftNameError(f"S2FTModel has no PEFT method {name!r}; use {HINTS[name]}")
    if name in _hub_names():
        return PeftNameError(
            f"S2FTModel.{name} is the base model's Hub upload and is not reachable through S2FTModel: it would "
            "upload the whole base model; use model.push_to_hub(repo_id) (the adapter and a model card)"
        )
    if name in _mixin_names() or (missing and name in _peft_public_names()):
        return PeftNameError(
            f"S2FTModel has no PEFT method {name!r} (it would reach the wrapped transformers model); "
            "see 'PEFT names' in docs/ADAPTERS.md for the S²FT methods"
        )
    return None
