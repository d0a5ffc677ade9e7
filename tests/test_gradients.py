"""Partial back-propagation is exact: every trained block's gradient equals the matching slice
of the full fine-tuning gradient (float64), for every supported family."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, merged_reference, randomize_deltas, tiny_model

from s2ft import S2FTConfig, get_s2ft_model
from s2ft.structures import weight_view

BOTH = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, attn_modules=("q", "k", "v", "o"), seed=3)


def full_ft_grads(ref, ids):
    for p in ref.parameters():
        p.requires_grad_(True)
    loss = ref(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


def check_exact_gradients(model, plain, ids=None):
    """Non-zero deltas, one backward through S²FT and one through full fine-tuning of the merged
    weights: equal losses, and every trained block's gradient equals the full gradient's slice."""
    randomize_deltas(model)  # non-zero deltas: backward must use W_eff, not the base W
    ref = merged_reference(model, plain)
    ids = batch() if ids is None else ids
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    ref_loss = full_ft_grads(ref, ids)
    assert abs(loss.item() - ref_loss.item()) <= 1e-10
    assert_exact_slices(model, ref)


def assert_exact_slices(s2ft_model, ref, tol=1e-10):
    checked = 0
    for path, layer in s2ft_model.named_s2ft_layers():
        d = layer.s2ft["default"]
        mod = ref.get_submodule(path)
        g_w = weight_view(mod).grad if isinstance(mod, torch.nn.Linear) else mod.weight.grad.t()
        if d.row_delta is not None:
            assert (d.row_delta.grad - g_w[d.row_idx]).abs().max() <= tol, path
            checked += 1
            if d.row_bias is not None:
                assert (d.row_bias.grad - mod.bias.grad[d.row_idx]).abs().max() <= tol, path
        if d.col_delta is not None:
            assert (d.col_delta.grad - g_w[:, d.col_idx]).abs().max() <= tol, path
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "thin"])
def test_gradients_equal_full_finetuning_slices(family, inplace):
    plain = tiny_model(family)
    model = get_s2ft_model(copy.deepcopy(plain), BOTH)
    model.set_inplace(inplace)
    check_exact_gradients(model, plain)
    kinds = {p.split(".")[-1] for p, _ in model.named_s2ft_layers()}
    assert len(kinds) >= 3  # attention and FFN modules both trained
    frozen = [n for n, p in model.get_base_model().named_parameters() if ".s2ft." not in n]
    assert frozen and all(model.get_base_model().get_parameter(n).grad is None for n in frozen)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", ["qwen2", "opt", "gpt2"])
def test_bias_entries_of_trained_rows_are_trained(family):
    model = get_s2ft_model(tiny_model(family), BOTH)
    biases = [layer.s2ft["default"].row_bias for _, layer in model.named_s2ft_layers()]
    assert any(b is not None for b in biases)
    no_bias = get_s2ft_model(tiny_model(family), S2FTConfig(**{**BOTH.to_dict(), "train_bias": False}))
    assert all(layer.s2ft["default"].row_bias is None for _, layer in no_bias.named_s2ft_layers())


@pytest.mark.parametrize(
    "shape,n_heads,n_kv,head_dim",
    [("smollm2_shape", 9, 3, 8), ("gemma3_270m_shape", 4, 1, 16)],
)
def test_grouped_query_attention(shape, n_heads, n_kv, head_dim):
    plain = tiny_model(shape)
    cfg = S2FTConfig(ffn_ratio=0.1, attn_ratio=0.34, attn_modules=("q", "k", "v", "o"), seed=5)
    model = get_s2ft_model(copy.deepcopy(plain), cfg)
    group = n_heads // n_kv
    for layer_i in range(2):
        attn = f"model.layers.{layer_i}.self_attn"
        q = model.get_base_model().get_submodule(f"{attn}.q_proj").s2ft["default"]
        k = model.get_base_model().get_submodule(f"{attn}.k_proj").s2ft["default"]
        v = model.get_base_model().get_submodule(f"{attn}.v_proj").s2ft["default"]
        o = model.get_base_model().get_submodule(f"{attn}.o_proj").s2ft["default"]
        heads = sorted({int(r) // head_dim for r in q.row_idx})
        assert len(heads) == round(0.34 * n_heads)
        # q rows and o columns: whole heads, per query head
        want = torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)])
        assert torch.equal(q.row_idx, want) and torch.equal(o.col_idx, want)
        # k/v rows: whole KV heads, one per group that holds a selected query head
        groups = sorted({h // group for h in heads})
        want_kv = torch.tensor([g * head_dim + j for g in groups for j in range(head_dim)])
        assert torch.equal(k.row_idx, want_kv) and torch.equal(v.row_idx, want_kv)
        assert int(k.row_idx.max()) < n_kv * head_dim
    check_exact_gradients(model, plain)


def test_gradient_accumulation_equals_double_batch():
    ids = batch(n=4)
    models = []
    for _ in range(2):
        m = get_s2ft_model(tiny_model("llama"), BOTH)
        randomize_deltas(m)
        models.append(m)
    acc, big = models
    for half in (ids[:2], ids[2:]):
        (acc(input_ids=half, labels=half).loss / 2).backward()
    big(input_ids=ids, labels=ids).loss.backward()
    pa = dict(acc.named_parameters())
    for n, p in big.named_parameters():
        if p.requires_grad:
            assert (p.grad - pa[n].grad).abs().max() <= 1e-10, n


def test_clip_grad_norm_sees_delta_grads():
    model = get_s2ft_model(tiny_model("llama"), BOTH)
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1e-3)
    assert norm > 1e-3
    total = torch.sqrt(sum((p.grad**2).sum() for p in params))
    assert total == pytest.approx(1e-3, rel=1e-4)  # clip divides by norm + 1e-6


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = get_s2ft_model(tiny_model("llama"), BOTH)
        randomize_deltas(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        ids = batch()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert (g - grads[1][n]).abs().max() <= 1e-10, n
