"""QS²FT: S²FT blocks beside a bitsandbytes 4-bit (NF4/FP4, with and without double
quantization) or 8-bit base, loaded the way users load one (transformers `BitsAndBytesConfig`).

The reference for every check is the dequantized model: the same weights bitsandbytes computes
with, as a plain float32 model. Tolerances follow the compute path: 4-bit layers dequantize and
compute in their compute dtype (float32 here), so they match to float32 rounding; 8-bit layers
quantize the activations to int8 as well (LLM.int8()), so they match to about 1% of the scale.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from conftest import FAMILIES, batch, merged_reference, randomize_deltas, tiny_model, word_tokenizer

from s2ft import AdapterError, S2FTConfig, S2FTModel, get_s2ft_model
from s2ft.export import export_lora
from s2ft.quantization import dequantize_model, is_quantized, model_quantization

pytest.importorskip("bitsandbytes")

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-dq": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    "int8": dict(load_in_8bit=True),
}
TOL = {"nf4": 1e-4, "fp4-dq": 1e-4, "int8": 6e-2}  # relative to the largest entry compared (int8: measured <= 3.9e-2)
CONFIG = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, attn_modules=("q", "k", "v", "o"), seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's tiny float32 model, saved once."""
    root = tmp_path_factory.mktemp("fp")
    out = {}
    for name in FAMILIES:
        tiny_model(name, dtype=torch.float32).save_pretrained(root / name)
        out[name] = root / name
    return out


def _load(folder, quant=None):
    kw = {} if quant is None else {"quantization_config": T.BitsAndBytesConfig(**QUANT[quant]), "device_map": "cpu"}
    return T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()


def _close(got, want, quant, what):
    scale = want.abs().max().clamp_min(1e-12)
    err = ((got - want).abs().max() / scale).item()
    assert err <= TOL[quant], f"{what}: relative error {err:.2e} > {TOL[quant]:.0e}"


def _quantized_modules(model):
    return [m for m in model.modules() if is_quantized(m)]


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_full_fine_tuning_of_the_dequantized_model(saved, family, quant):
    qmodel = _load(saved[family], quant)
    assert _quantized_modules(qmodel), "bitsandbytes quantized nothing"
    packed = {n: p.detach().clone() for n, p in qmodel.named_parameters()}
    model = get_s2ft_model(qmodel, CONFIG)
    randomize_deltas(model, scale=0.02)
    reference = _load(saved[family], quant)
    dequantize_model(reference, torch.float32)
    assert not _quantized_modules(reference)
    reference = merged_reference(model, reference)  # dequantized base + the deltas, by hand
    for p in reference.parameters():
        p.requires_grad_(True)
    ids = batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    _close(loss.detach(), ref_loss.detach(), quant, "loss")
    checked = 0
    for path, layer in model.named_s2ft_layers():
        d = layer.s2ft["default"]
        ref = reference.get_submodule(path)
        grad = ref.weight.grad if isinstance(ref, torch.nn.Linear) else ref.weight.grad.t()  # (out, in)
        if d.row_delta is not None:
            _close(d.row_delta.grad, grad[d.row_idx], quant, f"{path} rows")
            checked += 1
        if d.col_delta is not None:
            _close(d.col_delta.grad, grad[:, d.col_idx], quant, f"{path} cols")
            checked += 1
    assert checked >= 8
    for n, p in model.get_base_model().named_parameters():  # the quantized weights were never written
        key = n.replace(".base_layer.", ".")
        if ".s2ft." not in n:
            assert torch.equal(p.detach(), packed[key]), n


@pytest.fixture(scope="module")
def llama(saved):
    return saved["llama"]


def test_structure_sizes_come_from_in_and_out_features(llama):
    qmodel = _load(llama, "nf4")
    up = qmodel.model.layers[0].mlp.up_proj
    assert up.weight.dtype == torch.uint8 and tuple(up.weight.shape) != (up.out_features, up.in_features)
    model = get_s2ft_model(qmodel, S2FTConfig(ffn_ratio=0.25))
    d = model.get_base_model().model.layers[0].mlp.up_proj.s2ft["default"]
    assert d.row_delta.shape == (12, up.in_features) and d.row_delta.dtype == torch.float32


@pytest.mark.parametrize("strategy", ["weight", "salience", "activation"])
def test_weight_and_data_scores_read_the_dequantized_weights(llama, strategy):
    ids = [{"input_ids": batch(2, 10, seed=4)}]
    full = get_s2ft_model(_dequantized(llama), S2FTConfig(ffn_ratio=0.25, strategy=strategy), calibration=ids)
    quant = get_s2ft_model(_load(llama, "nf4"), S2FTConfig(ffn_ratio=0.25, strategy=strategy), calibration=ids)
    for (path, a), (_, b) in zip(full.named_s2ft_layers(), quant.named_s2ft_layers(), strict=True):
        da, db = a.s2ft["default"], b.s2ft["default"]
        assert torch.equal(da.row_idx if da.row_idx is not None else da.col_idx,
                           db.row_idx if db.row_idx is not None else db.col_idx), path  # fmt: skip


def _dequantized(folder, quant="nf4"):
    model = _load(folder, quant)
    dequantize_model(model, torch.float32)
    return model


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def test_adapter_from_a_quantized_base_loads_onto_the_full_precision_base(llama, tmp_path):
    model = get_s2ft_model(_load(llama, "nf4"), CONFIG)
    randomize_deltas(model)
    model.save_pretrained(tmp_path / "a")
    meta = (tmp_path / "a" / "s2ft_config.json").read_text()
    assert '"base_quantization"' in meta and '"quant_type": "nf4"' in meta
    assert model_quantization(model.get_base_model())["bits"] == 4
    ids = batch()
    # the fingerprint of the 4-bit base is that of its full-precision model: the pairing is accepted
    on_full = S2FTModel.from_pretrained(_load(llama), tmp_path / "a")
    on_deq = S2FTModel.from_pretrained(_dequantized(llama), tmp_path / "a")
    torch.testing.assert_close(_logits(on_deq, ids), _logits(model, ids), rtol=0, atol=1e-4)
    assert (_logits(on_full, ids) - _logits(model, ids)).abs().max() < 0.5  # quantization error only
    # ... and onto another quantized load of the same base
    again = S2FTModel.from_pretrained(_load(llama, "nf4"), tmp_path / "a")
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids))
    # an unrelated base is still refused
    other = T.AutoModelForCausalLM.from_config(_load(llama).config)
    with pytest.raises(AdapterError, match="fingerprint|different base|another base"):
        S2FTModel.from_pretrained(other, tmp_path / "a")


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_merge_and_unload_dequantizes_then_merges(llama, quant):
    model = get_s2ft_model(_load(llama, quant), CONFIG)
    randomize_deltas(model)
    ids = batch()
    want = _logits(model, ids)
    with pytest.raises(RuntimeError, match="rounded? .*away|round the deltas away"):
        model.merge()
    plain = model.merge_and_unload()
    assert not _quantized_modules(plain) and not any("S2FT" in type(m).__name__ for m in plain.modules())
    assert getattr(plain.config, "quantization_config", None) is None
    assert plain.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    got = _logits(plain, ids)
    if quant == "nf4":
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    else:  # int8 runs activations through int8 too; the merged model computes in float32
        assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_switching_mixed_batches_fuse_on_a_quantized_base(llama):
    qmodel = _load(llama, "nf4")
    packed = {n: p.detach().clone() for n, p in qmodel.named_parameters()}
    model = get_s2ft_model(qmodel, CONFIG, adapter_name="a")
    model.add_adapter("b", S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, seed=1))
    randomize_deltas(model, seed=3)  # only the active adapter's deltas require grad
    model.set_adapter("b")
    randomize_deltas(model, seed=4)
    ids = batch(3)
    single = {}
    for name in ("a", "b", "__base__"):
        model.set_adapter(name)
        single[name] = _logits(model, ids)
    assert not torch.allclose(single["a"], single["b"])
    names = ["a", "__base__", "b"]
    mixed = _logits(model, ids, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], single[name][i], rtol=0, atol=1e-5)
    model.set_adapter("a")  # switching back is exact
    torch.testing.assert_close(_logits(model, ids), single["a"], rtol=0, atol=0)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, ids), single["__base__"], rtol=0, atol=0)
    model.fuse_adapters(["a", "b"], new_name="ab", warn_overlap=1.0)
    model.set_adapter("ab")
    fused = _logits(model, ids)
    reference = merged_reference(model, _dequantized(llama), "ab")
    torch.testing.assert_close(fused, _logits(reference, ids), rtol=0, atol=1e-4)
    for n, p in model.get_base_model().named_parameters():
        if ".s2ft." not in n:
            assert torch.equal(p.detach(), packed[n.replace(".base_layer.", ".")]), n


def test_export_lora_of_an_adapter_trained_on_a_quantized_base(llama, tmp_path):
    from peft import PeftModel

    model = get_s2ft_model(_load(llama, "nf4"), CONFIG)
    randomize_deltas(model)
    model.save_pretrained(tmp_path / "s2ft")
    export_lora(tmp_path / "s2ft", tmp_path / "lora")
    ids = batch()
    lora = PeftModel.from_pretrained(_dequantized(llama), tmp_path / "lora")
    torch.testing.assert_close(_logits(lora, ids), _logits(model, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_training_under_bf16_autocast_follows_the_reference(llama, quant):
    """Under autocast the blocks compute in bf16 like the base; an 8-bit base with float32
    deltas used to give silent garbage (its int8 weight was written as if it were floats)."""
    model = get_s2ft_model(_load(llama, quant), CONFIG)
    randomize_deltas(model, scale=0.05)
    reference = merged_reference(model, _dequantized(llama, quant))
    ids = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _logits(model, ids).float()
        want = _logits(reference, ids).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max() + 0.05
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(torch.isfinite(torch.tensor(losses)))


def test_adapter_round_trip_on_an_8bit_base(llama, tmp_path):
    model = get_s2ft_model(_load(llama, "int8"), CONFIG)
    randomize_deltas(model)
    model.save_pretrained(tmp_path)
    again = S2FTModel.from_pretrained(_load(llama, "int8"), tmp_path)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert model.s2ft_config == again.s2ft_config


def test_trainer_and_trl_train_an_s2ft_model_on_a_quantized_base(llama, tmp_path):
    """transformers' Trainer refuses "purely quantized models" without adapters attached; an
    S2FTModel says it has them (`_hf_peft_config_loaded`), so Trainer and TRL accept it."""
    rows = [{"input_ids": ids, "labels": ids.clone()} for ids in batch(8, 12, seed=6)]
    for trainer_cls, args_cls in _trainers():
        model = get_s2ft_model(_load(llama, "nf4"), CONFIG)
        args = args_cls(
            output_dir=str(tmp_path / trainer_cls.__name__), max_steps=3, per_device_train_batch_size=4,
            learning_rate=1e-2, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
        )  # fmt: skip
        if args_cls is T.TrainingArguments:
            trainer = trainer_cls(model=model, args=args, train_dataset=rows)
        else:  # TRL: a datasets.Dataset of token ids (already tokenized: the tokenizer only pads)
            from datasets import Dataset

            data = Dataset.from_list([{"input_ids": r["input_ids"].tolist()} for r in rows])
            tok = word_tokenizer([{"instruction": "a", "input": "", "output": "b"}])
            trainer = trainer_cls(model=model, args=args, train_dataset=data, processing_class=tok)
        trainer.train()
        assert any(p.abs().max() > 0 for p in model.parameters() if p.requires_grad)
    assert not getattr(model.get_base_model(), "_hf_peft_config_loaded", False)  # the base's flag is untouched


def _trainers():
    out = [(T.Trainer, T.TrainingArguments)]
    try:
        import trl
    except ImportError:
        return out
    return [*out, (trl.SFTTrainer, trl.SFTConfig)]


# --- bitsandbytes' CPU inference repacking --------------------------------------------------
# On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit weight in place the first time
# the layer runs in eval mode on an input without grad (an evaluation or generate mid-training):
# the absmax constants are rounded to bf16, dequantize_4bit then reads garbage, and the layer
# computes through gemv_4bit, which has no autograd kernel, so backprop through the base is cut
# with only a warning. s2ft turns the repacking off (s2ft.quantization.keep_unpacked).


def _avx512bf16() -> bool:
    try:
        from bitsandbytes.functional import has_avx512bf16

        return bool(has_avx512bf16())
    except ImportError:
        return False


needs_repacking_cpu = pytest.mark.skipif(
    not _avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16"
)


@pytest.fixture(scope="module")
def packable(tmp_path_factory):
    """A LLaMA whose every 4-bit layer bitsandbytes can repack (in >= 64, out a multiple of 32)."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("packable")
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return folder


def _grads(model, ids):
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _packed(model):
    return [
        n for n, m in model.named_modules()
        if is_quantized(m) and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    ]  # fmt: skip


@needs_repacking_cpu
def test_evaluating_mid_training_leaves_the_4bit_base_trainable(packable):
    """eval + no_grad forward + generate between training steps: the gradients, the stored 4-bit
    weights and their dequantized values are those of a model that was never evaluated."""
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    fresh = get_s2ft_model(_load(packable, "nf4"), S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, seed=0))
    randomize_deltas(fresh, scale=0.02)
    want = _grads(fresh, ids)
    model = get_s2ft_model(_load(packable, "nf4"), S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, seed=0))
    randomize_deltas(model, scale=0.02)
    stored = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert not _packed(model), "bitsandbytes repacked a 4-bit weight"
    got = _grads(model, ids)
    assert want.keys() == got.keys() and want
    for n in want:
        assert torch.equal(got[n], want[n]), n
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), stored[n]), n


@needs_repacking_cpu
def test_a_base_repacked_before_wrapping_is_unpacked_and_trains_exactly(packable):
    """A user generated with the 4-bit model before wrapping it: get_s2ft_model restores the
    standard layout, so gradients flow through the base and match full fine-tuning of the
    (now) dequantized weights."""
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    qmodel = _load(packable, "nf4")
    with torch.no_grad():
        qmodel(input_ids=ids)
    assert _packed(qmodel), "bitsandbytes did not repack: this test checks nothing"
    model = get_s2ft_model(qmodel, S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, seed=0))
    assert not _packed(model)
    randomize_deltas(model, scale=0.02)
    reference = copy.deepcopy(model).merge_and_unload()  # dequantized base + deltas (tested above)
    assert not _quantized_modules(reference)
    for p in reference.parameters():
        p.requires_grad_(True)
    got = _grads(model, ids)
    reference(input_ids=ids, labels=ids).loss.backward()
    for path, layer in model.named_s2ft_layers():
        d = layer.s2ft["default"]
        grad = reference.get_submodule(path).weight.grad
        if d.row_delta is not None:
            _close(got[f"model.{path}.s2ft.default.row_delta"], grad[d.row_idx], "nf4", f"{path} rows")
        if d.col_delta is not None:
            _close(got[f"model.{path}.s2ft.default.col_delta"], grad[:, d.col_idx], "nf4", f"{path} cols")


def test_quantized_loads_by_s2ft_never_repack(tmp_path, packable):
    """`s2ft.loading.load_model(quantization=...)` (the CLI's loader, QLoRA included) turns the
    repacking off on every 4-bit layer, on any CPU."""
    from s2ft.loading import load_model

    model = load_model(str(packable), torch.float32, "cpu", quantization={"quantize": "4bit"})
    layers = [m for m in model.modules() if is_quantized(m)]
    assert layers and all(not getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
