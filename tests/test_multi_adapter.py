"""Several adapters on one base, on every family: mixed-adapter batches equal single-adapter
runs row by row (incl. `__base__` rows, generation and beams); merged switching A -> B -> A is
exact; fusion is exact and reports overlap; deleting adapters; export to PEFT LoRA reproduces
the logits through real PEFT; CLI merge / fuse / export-lora."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as T
from conftest import batch, tiny_model

from s2ft import AdapterError, S2FTConfig, S2FTModel, get_s2ft_model
from s2ft.cli import main
from s2ft.model import BASE

CFG = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, attn_modules=("q", "k", "v", "o"), seed=7)


def _randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.s2ft_layers():
            if name in layer.s2ft:
                for p in layer.s2ft[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.05)


def three_adapters(family):
    """(plain base copy, S2FTModel with adapters a, b, c: different seeds and budgets)."""
    plain = tiny_model(family)
    model = get_s2ft_model(copy.deepcopy(plain), CFG, adapter_name="a")
    model.add_adapter("b", S2FTConfig(ffn_ratio=0.5, seed=1))
    model.add_adapter("c", S2FTConfig(ffn_ratio=0.0, attn_ratio=0.25, attn_modules=("o",), seed=2))
    for i, name in enumerate("abc"):
        _randomize(model, name, seed=10 + i)
    return plain, model


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def test_mixed_batch_rows_equal_single_adapter_runs(family):
    _, model = three_adapters(family)
    names = ["a", BASE, "b", "a", "c"]
    ids = batch(n=len(names), t=10)
    mixed = logits(model, ids, adapter_names=names)
    for row, name in enumerate(names):
        model.set_adapter(name)
        single = logits(model, ids[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], single, atol=1e-10, rtol=0)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids[1:2]).logits
    torch.testing.assert_close(mixed[1:2], base, atol=1e-10, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_mixed_batch_generation_and_beams(family):
    _, model = three_adapters(family)
    names = ["b", BASE, "a"]
    ids = batch(n=3, t=6)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)  # no early EOS
    for extra in ({}, {"num_beams": 2, "num_return_sequences": 2}):
        mixed = model.generate(input_ids=ids, adapter_names=names, **kw, **extra)
        k = extra.get("num_return_sequences", 1)
        for row, name in enumerate(names):
            model.set_adapter(name)
            single = model.generate(input_ids=ids[row : row + 1], **kw, **extra)
            assert torch.equal(mixed[row * k : (row + 1) * k], single)


def test_mixed_batch_errors():
    _, model = three_adapters("llama")
    ids = batch(n=2)
    with pytest.raises(ValueError, match="unknown adapter"):
        model(input_ids=ids, adapter_names=["a", "zzz"])
    with pytest.raises(ValueError, match="cannot use adapter_names"):
        model(input_ids=ids, adapter_names=["a", "b", "c"])
    model.merge("a")
    with pytest.raises(RuntimeError, match="unmerge"):
        model(input_ids=ids, adapter_names=["a", "b"])


def _weights(model):
    return {k: v.clone() for k, v in model.get_base_model().state_dict().items() if ".s2ft." not in k}


def test_merged_switching_is_exact(family):
    _, model = three_adapters(family)
    ids = batch()
    unmerged = {}
    for name in ("a", "b", "c", BASE):
        model.set_adapter(name)
        unmerged[name] = logits(model, ids)
    base_w = _weights(model)
    model.set_adapter("a")
    model.merge()
    w_a = _weights(model)
    torch.testing.assert_close(logits(model, ids), unmerged["a"], atol=1e-10, rtol=0)
    for name in ("b", "c", BASE, "a"):  # switch in place, in merged mode
        model.set_adapter(name)
        assert model.active_adapter == name
        torch.testing.assert_close(logits(model, ids), unmerged[name], atol=1e-10, rtol=0)
        if name == BASE:
            assert all(torch.equal(base_w[k], v) for k, v in _weights(model).items())
    assert all(torch.equal(w_a[k], v) for k, v in _weights(model).items())  # A -> B -> C -> base -> A: bit-exact
    model.unmerge()
    assert all(torch.equal(base_w[k], v) for k, v in _weights(model).items())


def test_switch_does_no_matmul():
    _, model = three_adapters("llama")
    model.merge("a")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.set_adapter("b")
    ops = {e.key for e in prof.key_averages()}
    assert not ops & {"aten::mm", "aten::matmul", "aten::addmm", "aten::bmm", "aten::linear"}, ops


def test_load_and_delete_adapters(tmp_path, recwarn):
    plain, model = three_adapters("llama")
    ids = batch()
    model.set_adapter("b")
    want_b = logits(model, ids)
    model.save_pretrained(tmp_path / "b", adapter_name="b")
    model.set_adapter("a")
    model.save_pretrained(tmp_path / "a")

    fresh = S2FTModel.from_pretrained(copy.deepcopy(plain), tmp_path / "a", adapter_name="a")
    fresh.load_adapter(tmp_path / "b", adapter_name="b")
    assert fresh.adapters == ["a", "b"] and fresh.active_adapter == "a"
    fresh.set_adapter("b")
    torch.testing.assert_close(logits(fresh, ids), want_b, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="already exists"):
        fresh.load_adapter(tmp_path / "b", adapter_name="b")

    # deleting the active adapter leaves the base model active, with a warning
    base_logits = logits(plain, ids)
    fresh.merge()
    with pytest.warns(UserWarning, match="active adapter 'b'"):
        fresh.delete_adapter("b")
    assert fresh.active_adapter == BASE and fresh.adapters == ["a"]
    torch.testing.assert_close(logits(fresh, ids), base_logits, atol=1e-12, rtol=0)
    plain_w = plain.state_dict()
    assert all(torch.equal(plain_w[k.replace(".base_layer", "")], v) for k, v in _weights(fresh).items())
    assert not any("b" in layer.s2ft for layer in fresh.s2ft_layers())
    fresh.set_adapter("a")  # still merged mode: a is merged in place
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="unknown adapter"):
        fresh.set_adapter("b")
    with pytest.raises(ValueError, match="invalid adapter name"):
        fresh.load_adapter(tmp_path / "a", adapter_name="../x")


def test_adapter_for_another_base_is_refused(tmp_path):
    _, model = three_adapters("llama")
    model.save_pretrained(tmp_path / "a")
    other = get_s2ft_model(tiny_model("llama", seed=5), CFG, adapter_name="x")
    with pytest.raises(AdapterError, match="different base model"):
        other.load_adapter(tmp_path / "a", adapter_name="a")
    assert other.adapters == ["x"]
    mistral = get_s2ft_model(tiny_model("qwen3"), CFG)
    with pytest.raises(AdapterError):
        mistral.load_adapter(tmp_path / "a", adapter_name="a")


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gpt2"])
def test_fusion_of_disjoint_adapters_equals_applying_both(family):
    plain = tiny_model(family)
    # top-k and bottom-k of the same scores: disjoint channels and heads
    top = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.25, strategy="weight")
    bottom = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.25, strategy="weight", order="small")
    model = get_s2ft_model(copy.deepcopy(plain), top, adapter_name="a")
    model.add_adapter("b", bottom)
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    ids = batch()
    model.merge("a")
    model.merge("b")
    both = logits(model, ids)
    model.unmerge()
    report = model.fuse_adapters(["a", "b"], new_name="ab")
    assert all(r["shared"] == 0 for r in report)
    model.set_adapter("ab")
    torch.testing.assert_close(logits(model, ids), both, atol=1e-10, rtol=0)


def test_fusion_weights_and_overlap_warning(tmp_path):
    plain, model = three_adapters("llama")
    ids = batch()
    with pytest.warns(UserWarning, match="overlap strongly"):
        report = model.fuse_adapters(["a", "a"], weights=[0.25, 0.5], new_name="a75")
    assert max(r["shared_fraction"] for r in report) == 1.0
    fused = model.adapter_modules("a75")
    for path, parts in model.adapter_modules("a").items():
        for k, v in parts.items():
            want = v if k.endswith("_idx") else 0.75 * v
            torch.testing.assert_close(fused[path][k], want, atol=1e-12, rtol=0)
    model.set_adapter("a75")
    model.save_pretrained(tmp_path / "a75")
    meta = json.loads((tmp_path / "a75" / "s2ft_config.json").read_text())
    assert meta["provenance"] == {"fused_from": ["a", "a"], "weights": [0.25, 0.5]}
    again = S2FTModel.from_pretrained(copy.deepcopy(plain), tmp_path / "a75")
    torch.testing.assert_close(logits(again, ids), logits(model, ids), atol=1e-12, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gpt2", "opt", "gemma3"])
@pytest.mark.parametrize("pad_to", [None, 64])
def test_export_lora_round_trip_through_peft(family, pad_to, tmp_path):
    from peft import PeftModel

    from s2ft.export import export_lora

    plain, model = three_adapters(family)
    model.save_pretrained(tmp_path / "a")
    report = export_lora(tmp_path / "a", tmp_path / "lora", pad_to=pad_to)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == (pad_to or report["rank_max"])
    assert report["lora_bias"] == (family in ("qwen2", "gpt2", "opt"))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "lora")
    ids = batch()
    # float64 everywhere: the only difference is summation order (B·A vs. indexed blocks)
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), atol=1e-10, rtol=0)


def test_export_lora_rank_limits(tmp_path):
    from s2ft.export import export_lora

    _, model = three_adapters("llama")
    model.save_pretrained(tmp_path / "a")
    top = export_lora(tmp_path / "a", tmp_path / "x")["rank_max"]
    with pytest.raises(ValueError, match="max rank"):
        export_lora(tmp_path / "a", tmp_path / "y", max_rank=top - 1)
    with pytest.raises(ValueError, match="pad_to"):
        export_lora(tmp_path / "a", tmp_path / "y", pad_to=top - 1)
    assert not (tmp_path / "y").exists()


def test_cli_merge_fuse_export(tmp_path, capsys):
    plain, model = three_adapters("llama")
    plain.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "a", adapter_name="a")
    model.save_pretrained(tmp_path / "b", adapter_name="b")
    ids = batch()
    model.set_adapter("a")
    want_a = logits(model, ids)

    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "merged")]) == 0
    merged = T.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", dtype=torch.float64, attn_implementation="eager"
    )
    torch.testing.assert_close(logits(merged, ids), want_a, atol=1e-10, rtol=0)
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "merged")]) == 2
    assert "--overwrite" in capsys.readouterr().err

    out = str(tmp_path / "ab")
    assert main(["fuse", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1,0.5", "-o", out]) == 0
    assert "overlap:" in capsys.readouterr().out
    model.fuse_adapters(["a", "b"], weights=[1, 0.5], new_name="ab")
    model.set_adapter("ab")
    fused = S2FTModel.from_pretrained(copy.deepcopy(plain), out)
    torch.testing.assert_close(logits(fused, ids), logits(model, ids), atol=1e-12, rtol=0)
    assert main(["fuse", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1", "-o", out]) == 2

    assert main(["export-lora", str(tmp_path / "a"), str(tmp_path / "lora")]) == 0
    out = capsys.readouterr().out  # per-module ranks (rank_pattern, which vLLM honours), and how to serve it
    assert "(rank_pattern)" in out and "vllm serve" in out and "--max-loras 2" in out
    assert main(["export-lora", str(tmp_path / "nope"), str(tmp_path / "lora2")]) == 2
    assert "no such adapter" in capsys.readouterr().err

    other = get_s2ft_model(tiny_model("llama", seed=9), CFG)
    other.save_pretrained(tmp_path / "other")
    assert main(["fuse", str(tmp_path / "a"), str(tmp_path / "other"), "-o", str(tmp_path / "bad")]) == 2
    assert "different base model" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_hotswap_adapter_replaces_in_place_and_bad_files_change_nothing(tmp_path):
    _, model = three_adapters("llama")
    ids = batch()
    model.set_adapter("b")
    want_b = logits(model, ids)
    model.save_pretrained(tmp_path / "b", adapter_name="b")
    model.set_adapter("a")
    model.merge()  # merged mode: the swap must unmerge a and merge the new contents
    model.hotswap_adapter(tmp_path / "b", adapter_name="a")
    assert model.active_adapter == "a" and model.merge_mode
    torch.testing.assert_close(logits(model, ids), want_b, atol=1e-10, rtol=0)
    (tmp_path / "broken").mkdir()
    before = logits(model, ids)
    with pytest.raises(AdapterError):
        model.hotswap_adapter(tmp_path / "broken", adapter_name="a")
    assert sorted(model.adapters) == ["a", "b", "c"]
    torch.testing.assert_close(logits(model, ids), before, atol=0, rtol=0)
