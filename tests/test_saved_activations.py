"""What backward keeps: column-selected layers keep only the selected input columns, and a
whole S²FT model keeps fewer activation bytes than PEFT LoRA with as many trainable parameters."""

from __future__ import annotations

import peft
import torch
from conftest import batch, tiny_model

from s2ft import S2FTConfig, get_s2ft_model
from s2ft.layers import S2FTLayer


def saved_activation_bytes(model, run) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes of distinct storages packed for backward, parameters (and views of them) excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_storages |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}
    shapes = []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values()), shapes


def _layer(rows=None, cols=None):
    layer = S2FTLayer(torch.nn.Linear(16, 24, dtype=torch.float64))
    layer.base_layer.weight.requires_grad_(False)
    layer.base_layer.bias.requires_grad_(False)
    layer.add_adapter("default", rows, cols, train_bias=True, dtype=torch.float64)
    layer.active_adapter = "default"
    return layer


def test_column_selected_layer_keeps_only_selected_columns():
    layer = _layer(cols=torch.tensor([1, 5, 9]))
    x = torch.randn(4, 10, 16, dtype=torch.float64, requires_grad=True)
    nbytes, shapes = saved_activation_bytes(layer, lambda: layer(x).sum().backward())
    assert shapes == [(40, 3)]  # N x k_c, a copy: the full input is not kept alive
    assert nbytes == 40 * 3 * 8


def test_row_selected_layer_keeps_its_input_once():
    layer = _layer(rows=torch.tensor([0, 7]))
    x = torch.randn(4, 10, 16, dtype=torch.float64, requires_grad=True)
    _, shapes = saved_activation_bytes(layer, lambda: layer(x).sum().backward())
    assert shapes == [(40, 16)]


def test_frozen_adapter_keeps_nothing():
    layer = _layer(rows=torch.tensor([0]), cols=torch.tensor([2]))
    for p in layer.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 10, 16, dtype=torch.float64, requires_grad=True)
    nbytes, _ = saved_activation_bytes(layer, lambda: layer(x).sum().backward())
    assert nbytes == 0  # only dL/dx is needed, and that needs the weights alone


def test_s2ft_keeps_fewer_activation_bytes_than_lora():
    ids = batch(n=4, t=48)
    s2ft = get_s2ft_model(tiny_model("llama", dtype=torch.float32), S2FTConfig(ffn_ratio=0.25, seed=0))
    n_s2ft = s2ft.get_nb_trainable_parameters()[0]
    # LoRA on the same three FFN matrices, rank chosen for at least as many trainable parameters
    rank = -(-n_s2ft // (2 * 3 * (32 + 48)))
    lora = peft.get_peft_model(
        tiny_model("llama", dtype=torch.float32),
        peft.LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["up_proj", "gate_proj", "down_proj"]
        ),
    )
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert n_lora >= n_s2ft
    b_s2ft, _ = saved_activation_bytes(s2ft, lambda: s2ft(input_ids=ids, labels=ids).loss.backward())
    b_lora, _ = saved_activation_bytes(lora, lambda: lora(input_ids=ids, labels=ids).loss.backward())
    print(f"saved activations: s2ft {b_s2ft} B ({n_s2ft} params), lora r={rank} {b_lora} B ({n_lora} params)")
    assert b_s2ft < b_lora
