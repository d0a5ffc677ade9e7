"""CUDA checks (marker `cuda`; skipped without a GPU, so CI never runs them): gradient parity in
fp32 and bf16 against the full fine-tuning gradient, mixed-adapter batches, merge/unmerge.

    python -m pytest -m cuda tests/test_cuda.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, merged_reference, randomize_deltas, tiny_model
from test_gradients import BOTH, full_ft_grads

from s2ft import get_s2ft_model
from s2ft.structures import weight_view

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# bf16 keeps 8 bits of mantissa: gradients of a tiny model agree with the fp32 reference to a
# few per cent in norm; fp32 on CUDA (TF32 off) to 1e-4.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_cuda_gradients_match_full_finetuning(family, dtype):
    plain = tiny_model(family, dtype=torch.float32).cuda()
    model = get_s2ft_model(copy.deepcopy(plain).to(dtype), BOTH)
    randomize_deltas(model)
    ref = merged_reference(model, plain)  # fp32 reference with the same blocks merged
    ids = batch().cuda()
    model(input_ids=ids, labels=ids).loss.backward()
    full_ft_grads(ref, ids)
    for path, layer in model.named_s2ft_layers():
        d = layer.s2ft["default"]
        g_w = weight_view(ref.get_submodule(path)).grad
        pairs = []
        if d.row_delta is not None:
            pairs.append((d.row_delta, g_w[d.row_idx]))
        if d.col_delta is not None:
            pairs.append((d.col_delta, g_w[:, d.col_idx]))
        for delta, want in pairs:
            assert delta.grad.dtype == delta.dtype
            assert (delta.grad.float() - want).norm() <= TOLERANCE[dtype] * want.norm() + 1e-6, path


def test_cuda_mixed_batch_and_merge_unmerge():
    plain = tiny_model("llama", dtype=torch.float32).cuda()
    model = get_s2ft_model(copy.deepcopy(plain), BOTH, adapter_name="a")
    model.add_adapter("b", BOTH)
    randomize_deltas(model, seed=5)
    ids = batch(n=4).cuda()
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["a", "b", "__base__", "a"]).logits
        for i, name in enumerate(["a", "b", "__base__", "a"]):
            model.set_adapter(name)
            alone = model(input_ids=ids[i : i + 1]).logits
            assert (mixed[i : i + 1] - alone).abs().max() <= 1e-4, name
        model.set_adapter("a")
        before = [p.clone() for p in plain.parameters()]
        model.merge()
        assert (
            model(input_ids=ids).logits - merged_reference(model, plain, "a")(input_ids=ids).logits
        ).abs().max() <= 1e-4
        model.unmerge()
        model.set_adapter("__base__")
        for path, layer in model.named_s2ft_layers():
            assert torch.equal(layer.weight, weight_view(plain.get_submodule(path))), path
        assert all(torch.equal(a, b) for a, b in zip(before, plain.parameters(), strict=True))


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_cuda_quantized_base_gradients_and_merge(tmp_path, quant):
    """QS²FT on CUDA bitsandbytes kernels (CPU runs: tests/test_quantized.py): bf16 compute,
    float32 deltas; gradients against full fine-tuning of the dequantized model, and
    merge_and_unload returning the dequantized, merged model."""
    pytest.importorskip("bitsandbytes")
    import transformers as T

    from s2ft.quantization import dequantize_model

    tiny_model("llama", dtype=torch.float32).save_pretrained(tmp_path)
    if quant == "nf4":
        q = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        q = T.BitsAndBytesConfig(load_in_8bit=True)

    def load():
        return T.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, device_map="cuda:0")

    model = get_s2ft_model(load(), BOTH)
    randomize_deltas(model)
    ref = load()
    dequantize_model(ref, torch.float32)
    ref = merged_reference(model, ref)
    ids = batch().cuda()
    model(input_ids=ids, labels=ids).loss.backward()
    full_ft_grads(ref, ids)
    for path, layer in model.named_s2ft_layers():
        d = layer.s2ft["default"]
        g_w = weight_view(ref.get_submodule(path)).grad
        if d.row_delta is not None:
            want = g_w[d.row_idx]
            assert (d.row_delta.grad.float() - want).norm() <= 0.1 * want.norm() + 1e-6, path
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        got = model.merge_and_unload()(input_ids=ids).logits.float()
    assert (got - want).abs().max() <= 0.1 * want.abs().max()
