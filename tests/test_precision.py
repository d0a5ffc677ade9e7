"""Mixed precision: under torch.autocast the layer computes in the autocast dtype and the
float32 deltas receive float32 gradients close to the fp32 ones; half-precision bases get
float32 deltas that train."""

from __future__ import annotations

import copy

import torch
from conftest import batch, tiny_model

from s2ft import S2FTConfig, get_s2ft_model

CFG = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, attn_modules=("q", "k", "v", "o"))


def test_autocast_bf16_grads_match_fp32():
    base = tiny_model("llama", dtype=torch.float32)
    fp32 = get_s2ft_model(copy.deepcopy(base), CFG)
    amp = get_s2ft_model(copy.deepcopy(base), CFG)
    ids = batch()
    fp32(input_ids=ids, labels=ids).loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = amp(input_ids=ids, labels=ids).loss
    loss.backward()
    ref = dict(fp32.named_parameters())
    for name, p in amp.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
            g, r = p.grad, ref[name].grad
            assert (g - r).norm() <= 0.05 * r.norm() + 1e-6, name


def test_bf16_base_trains_float32_deltas():
    model = get_s2ft_model(tiny_model("qwen2", dtype=torch.bfloat16), CFG)
    deltas = [p for p in model.parameters() if p.requires_grad]
    assert deltas and all(p.dtype == torch.float32 for p in deltas)
    opt = torch.optim.AdamW(deltas, lr=1e-2)
    ids = batch()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model(input_ids=ids).logits.dtype == torch.bfloat16
