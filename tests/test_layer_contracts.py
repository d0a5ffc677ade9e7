"""What an S²FT layer refuses or guarantees (each case was a silent error once): quantized or
shared weights, unfrozen base parameters, inactive adapters that still require grad, base
outputs in merged mode, autocast with a float64 base, evaluation through an unmerged adapter."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as T
from conftest import batch, merged_reference, randomize_deltas, tiny_model
from test_gradients import BOTH

from s2ft import S2FTConfig, S2FTModel, get_s2ft_model
from s2ft.layers import S2FTLayer


def test_other_quantized_weights_are_refused_naming_the_module():
    """bitsandbytes layers train beside their weights (tests/test_quantized.py); any other
    non-float or packed weight in an nn.Linear is refused, naming the module (its shape used to be
    read from the packed weight, and an int8 weight was written as if it held floats)."""
    model = tiny_model("llama", dtype=torch.float32)
    up = model.model.layers[0].mlp.up_proj
    up.weight = torch.nn.Parameter(up.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj.*not a floating-point matrix"):
        get_s2ft_model(model, S2FTConfig(ffn_ratio=0.25))
    with pytest.raises(TypeError, match="mlp.up_proj.*int8"):
        S2FTLayer(up, "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_bitsandbytes_weight_is_never_written(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from s2ft.structures import weight_view

    plain = tiny_model("llama", dtype=torch.float32)
    get_s2ft_model(copy.deepcopy(plain), S2FTConfig(ffn_ratio=0.25)).save_pretrained(tmp_path / "a")
    plain.save_pretrained(tmp_path / "base")
    q = T.BitsAndBytesConfig(load_in_8bit=True) if bits == "8bit" else T.BitsAndBytesConfig(load_in_4bit=True)
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=q, device_map="cpu")
    with pytest.raises(TypeError, match=r"q_proj.*(uint8|int8).*cannot be written or merged in place"):
        weight_view(model.model.layers[0].self_attn.q_proj, "model.layers.0.self_attn.q_proj")
    # an adapter trained on the full-precision base loads onto its quantized copy (same fingerprint)
    loaded = S2FTModel.from_pretrained(model, tmp_path / "a")
    assert all(layer.quantized and not layer._writable() for layer in loaded.s2ft_layers())


def test_set_adapter_makes_only_the_active_trainable_adapter_require_grad(tmp_path):
    model = get_s2ft_model(tiny_model("llama"), BOTH, adapter_name="a")
    model.add_adapter("b", S2FTConfig(**{**BOTH.to_dict(), "seed": 9}))
    model.save_pretrained(tmp_path / "c", adapter_name="b")
    model.load_adapter(tmp_path / "c", "c")  # loaded for inference: never trainable

    def trainable():
        return {n.split(".s2ft.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}

    assert trainable() == {"a"}
    model.set_adapter("b")
    assert trainable() == {"b"}
    model.set_adapter("c")
    assert trainable() == set()
    model.set_adapter("__base__")
    assert trainable() == set()
    model.set_adapter("a")
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".s2ft.a." in n for n in grads)


def test_disable_adapter_in_merged_mode_gives_the_base_model():
    plain = tiny_model("qwen2")
    model = get_s2ft_model(copy.deepcopy(plain), BOTH)
    randomize_deltas(model, scale=0.5)
    model.merge()
    ids = batch()
    with torch.no_grad():
        merged = model(input_ids=ids).logits
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
        assert torch.equal(model(input_ids=ids).logits, merged)  # merged again on exit
    assert model.merge_mode


def test_add_adapter_calibrates_on_the_base_model_even_when_another_is_merged():
    plain = tiny_model("llama")
    calib = [{"input_ids": batch(n=2, t=12, seed=s)} for s in range(2)]
    cfg = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, strategy="activation", seed=0)
    want = get_s2ft_model(copy.deepcopy(plain), cfg, adapter_name="x", calibration=calib)
    model = get_s2ft_model(copy.deepcopy(plain), BOTH, adapter_name="a")
    randomize_deltas(model, scale=2.0)  # large: calibration through them would choose differently
    model.merge()
    model.add_adapter("x", cfg, calibration=calib)
    got = {p: {k: v for k, v in t.items() if k.endswith("_idx")} for p, t in model.adapter_modules("x").items()}
    ref = {p: {k: v for k, v in t.items() if k.endswith("_idx")} for p, t in want.adapter_modules("x").items()}
    assert got.keys() == ref.keys()
    for path in ref:
        assert got[path].keys() == ref[path].keys()
        assert all(torch.equal(got[path][k], ref[path][k]) for k in ref[path]), path


def test_layers_sharing_one_weight_are_refused():
    model = tiny_model("llama")
    layer0, layer1 = model.model.layers
    layer1.mlp.up_proj.weight = layer0.mlp.up_proj.weight  # tied
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj and model\.layers\.1\.mlp\.up_proj share"):
        get_s2ft_model(model, S2FTConfig(ffn_ratio=0.25))


@pytest.mark.parametrize("part", ["weight", "bias"])
def test_an_unfrozen_base_parameter_is_an_error_not_a_missing_gradient(part):
    model = get_s2ft_model(tiny_model("qwen2"), BOTH)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    getattr(q.base_layer, part).requires_grad_(True)
    ids = batch()
    with pytest.raises(RuntimeError, match=rf"layers\.0\.self_attn\.q_proj: the base {part} requires grad"):
        model(input_ids=ids, labels=ids)
    with torch.no_grad():
        model(input_ids=ids)  # inference does not care


def test_autocast_leaves_a_float64_base_in_float64():
    plain = tiny_model("llama", dtype=torch.float64)
    model = get_s2ft_model(copy.deepcopy(plain), BOTH)
    randomize_deltas(model)
    ref = merged_reference(model, plain)
    ids = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(input_ids=ids).logits
        want = ref(input_ids=ids).logits  # nn.Linear is not autocast in float64
    assert got.dtype == want.dtype == torch.float64
    assert (got - want).abs().max() <= 1e-10


def test_eval_merges_an_s2ft_adapter(tmp_path):
    from s2ft.evaluation import load_for_eval

    plain = tiny_model("llama", dtype=torch.float32)
    model = get_s2ft_model(copy.deepcopy(plain), BOTH)
    randomize_deltas(model)
    model.save_pretrained(tmp_path / "adapter")
    plain.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps({}))
    from conftest import word_tokenizer

    word_tokenizer([{"instruction": "a", "input": "", "output": "b"}]).save_pretrained(tmp_path / "base")
    evaluated, _, what = load_for_eval(str(tmp_path / "base"), str(tmp_path / "adapter"))
    assert not any(isinstance(m, S2FTLayer) for m in evaluated.modules())  # merged: a plain model
    ids = batch()
    with torch.no_grad():
        want = merged_reference(model, plain)(input_ids=ids).logits
        assert (evaluated(input_ids=ids).logits - want).abs().max() <= 1e-5
    assert "S²FT adapter" in what
