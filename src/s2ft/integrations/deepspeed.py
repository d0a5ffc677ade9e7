"""DeepSpeed ZeRO-3 support: gather the S²FT delta blocks where s2ft reads them.

Under ZeRO-3 every parameter is partitioned across the ranks and holds 0 elements outside the
forward of the module that owns it. `S2FTLayer.forward` reads its `S2FTDelta` parameters
without calling `S2FTDelta.forward`, and a base weight cannot hold the adapter's blocks in
place. `register_zero3_params(engine.module)` (after `deepspeed.initialize`) registers each
delta as an external parameter of its `S2FTLayer` and puts the layers on the thin path;
`gathered_adapter(model)` gathers the deltas for `save_pretrained` (every rank enters it;
rank 0 writes). Without ZeRO-3 (ZeRO-1/2, no DeepSpeed) both do nothing. DeepSpeed is
imported only when a partitioned parameter is found.

    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    register_zero3_params(engine.module)
    ...
    with gathered_adapter(engine.module):
        engine.module.save_pretrained(out_dir)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from s2ft.layers import S2FTLayer

__all__ = ["delta_parameters", "gathered_adapter", "is_zero3", "register_zero3_params"]


def _layers(model: nn.Module) -> Iterator[S2FTLayer]:
    return (m for m in model.modules() if isinstance(m, S2FTLayer))


def delta_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The delta parameters (`row_delta`, `row_bias`, `col_delta`) of every S2FTLayer in `model`,
    of adapter `adapter_name` only, or of all adapters (None)."""
    out = []
    for layer in _layers(model):
        for name, d in layer.s2ft.items():
            if adapter_name is None or name == adapter_name:
                out.extend(d.parameters())
    return out


def is_zero3(model: nn.Module) -> bool:
    """Are `model`'s S²FT layers partitioned by DeepSpeed ZeRO-3 (their parameters carry `ds_id`)?"""
    return any(hasattr(p, "ds_id") for layer in _layers(model) for p in layer.parameters())


def register_zero3_params(model: nn.Module) -> int:
    """Prepare the S²FT layers of a ZeRO-3 partitioned `model` (the module given to DeepSpeed,
    `engine.module`); call it on every rank after `deepspeed.initialize` (or after building the
    model inside `deepspeed.zero.Init`), before the first forward.

    - Every delta parameter becomes a ZeRO-3 external parameter of its `S2FTLayer`, so
      DeepSpeed gathers it for that layer's forward and backward also where the engine's
      automatic discovery does not run (`engine.module.generate`, a forward of a submodule).
    - Blocks that s2ft wrote into a base weight before it was partitioned are taken out again
      (restored from the exact base backup, with the weight gathered), and in-place writing is
      switched off (`inplace = False`): the layers use the thin path, and s2ft no longer reads
      the base weights outside their own forward. Otherwise DeepSpeed's discovery registers
      every wrapped base weight as an external parameter of the whole model at the first
      forward, and keeps them all gathered for the whole forward.

    Returns the number of delta parameters registered; 0 (nothing done) when `model` is not
    partitioned by ZeRO-3.
    """
    layers = list(_layers(model))
    if not is_zero3(model):
        return 0
    import deepspeed

    count = 0
    for layer in layers:
        if layer.merged_adapters:
            raise RuntimeError(
                f"{layer.path}: adapter(s) {layer.merged_adapters} are merged into the base weights; "
                "unmerge() before deepspeed.initialize"
            )
        layer.inplace = False
        if layer._written is not None:  # written before partitioning: put the base values back
            base = [p for p in layer.base_layer.parameters(recurse=False) if hasattr(p, "ds_id")]
            with deepspeed.zero.GatheredParameters(base, modifier_rank=0):
                layer.restore()
        for d in layer.s2ft.values():
            for p in d.parameters():
                deepspeed.zero.register_external_parameter(layer, p)
                count += 1
    return count


@contextlib.contextmanager
def gathered_adapter(model: nn.Module, adapter_name: str | None = None) -> Iterator[None]:
    """Gather the (ZeRO-3 partitioned) delta parameters of `adapter_name` (default: all adapters)
    for reading, e.g. around `save_pretrained`. A collective: every rank must enter it. Changes
    made inside are not kept (`modifier_rank=None`). Without ZeRO-3 it does nothing."""
    params = [p for p in delta_parameters(model, adapter_name) if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
