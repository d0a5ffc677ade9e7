"""Adapter lifecycle on every family: save -> load, merge -> unmerge, merge_and_unload -> plain
transformers save/reload; and the failures (other base model, corrupt or partial files)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as T
from conftest import batch, randomize_deltas, tiny_model

from s2ft import AdapterError, S2FTConfig, S2FTModel, get_s2ft_model
from s2ft.adapter_io import CONFIG_NAME, WEIGHTS_NAME

CFG = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, attn_modules=("q", "k", "v", "o"), seed=7)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def trained(family, tmp_path):
    plain = tiny_model(family)
    model = get_s2ft_model(copy.deepcopy(plain), CFG)
    randomize_deltas(model)
    model.save_pretrained(tmp_path / "adapter")
    return family, plain, model, tmp_path / "adapter"


def test_save_load_identical_logits(trained):
    _, plain, model, path = trained
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded = S2FTModel.from_pretrained(copy.deepcopy(plain), path)
    ids = batch()
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default
    trainable = S2FTModel.from_pretrained(copy.deepcopy(plain), path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]
    meta = json.loads((path / CONFIG_NAME).read_text())
    assert meta["config"] == CFG.to_dict()
    assert meta["trainable_parameters"] == model.get_nb_trainable_parameters()[0]
    assert meta["base_model"]["model_type"] == plain.config.model_type


def test_merge_unmerge_round_trip(trained):
    _, _, model, _ = trained
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if ".s2ft." not in k}
    ids = batch()
    unmerged = logits(model, ids)
    model.merge()
    merged = logits(model, ids)
    assert (merged - unmerged).abs().max() <= 1e-10
    state = model.get_base_model().state_dict()
    changed = [k for k, v in state.items() if k in before and not torch.equal(v, before[k])]
    assert changed  # merging really wrote into the base weights
    model.unmerge()
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # bit-for-bit
    assert torch.equal(logits(model, ids), unmerged)


def test_merge_and_unload_reloads_in_plain_transformers(trained, tmp_path):
    _, plain, model, _ = trained
    ids = batch()
    expected = logits(model, ids)
    merged = model.merge_and_unload()
    assert type(merged) is type(plain)
    assert not any("s2ft" in n or "base_layer" in n for n, _ in merged.named_modules())
    merged.save_pretrained(tmp_path / "merged")
    reloaded = T.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", dtype=torch.float64, attn_implementation="eager"
    ).eval()
    saved = merged.state_dict()
    for k, v in reloaded.state_dict().items():  # the merged weights survive save/reload bit-for-bit
        if k in saved:
            assert torch.equal(v, saved[k]), k
    # 1e-6, not 1e-10: some families (Gemma) recompute an embedding-scale buffer at load time
    assert (logits(reloaded, ids) - expected).abs().max() <= 1e-6


def test_unload_restores_plain_model(family):
    plain = tiny_model(family)
    model = get_s2ft_model(copy.deepcopy(plain), CFG)
    randomize_deltas(model)
    model.merge()
    restored = model.unload()
    ids = batch()
    assert torch.equal(logits(restored, ids), logits(plain, ids))


def test_disable_adapter_gives_base_outputs():
    plain = tiny_model("llama")
    model = get_s2ft_model(copy.deepcopy(plain), CFG)
    randomize_deltas(model)
    ids = batch()
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), logits(plain, ids))
    assert not torch.equal(logits(model, ids), logits(plain, ids))


def test_load_onto_other_weights_fails_clearly(tmp_path):
    model = get_s2ft_model(tiny_model("llama", seed=0), CFG)
    model.save_pretrained(tmp_path / "a")
    other = tiny_model("llama", seed=1)  # same shapes, other weights
    with pytest.raises(AdapterError, match="different base model.*embedding weights differ"):
        S2FTModel.from_pretrained(other, tmp_path / "a")
    with pytest.warns(UserWarning, match="different base model"):
        S2FTModel.from_pretrained(tiny_model("llama", seed=1), tmp_path / "a", check_base="warn")


def test_load_onto_other_architecture_fails_clearly(tmp_path):
    get_s2ft_model(tiny_model("llama"), CFG).save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterError, match="model_type 'llama' != 'qwen2'"):
        S2FTModel.from_pretrained(tiny_model("qwen2"), tmp_path / "a")


def test_same_base_in_another_dtype_is_accepted(tmp_path):
    model = get_s2ft_model(tiny_model("llama", dtype=torch.float32), CFG)
    randomize_deltas(model)
    model.save_pretrained(tmp_path / "a")
    bf16 = S2FTModel.from_pretrained(tiny_model("llama", dtype=torch.bfloat16), tmp_path / "a")
    d = next(bf16.s2ft_layers()).s2ft["default"]
    assert (d.row_delta if d.row_delta is not None else d.col_delta).dtype == torch.float32  # upcast deltas


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda p: (p / WEIGHTS_NAME).write_bytes((p / WEIGHTS_NAME).read_bytes()[:-7]), "sha256"),
        (lambda p: (p / WEIGHTS_NAME).unlink(), "missing"),
        (lambda p: (p / CONFIG_NAME).write_text('{"format": "s2ft-adapter", '), "corrupt JSON at line 1"),
        (lambda p: (p / CONFIG_NAME).write_bytes(b"\xff\xfe{}"), "not UTF-8"),
        (lambda p: (p / CONFIG_NAME).unlink(), "not an s2ft adapter"),
        (lambda p: _edit(p, format_version=99), "format_version 99"),
        (lambda p: _garbage_weights_with_matching_sha(p), "not a valid safetensors file"),
        (lambda p: _edit(p, config={"ffn_ratio": 2.0}), "ffn_ratio must be in"),
    ],
)
def test_corrupt_adapter_files_fail_clearly(tmp_path, damage, match):
    get_s2ft_model(tiny_model("llama"), CFG).save_pretrained(tmp_path / "a")
    damage(tmp_path / "a")
    with pytest.raises(AdapterError, match=match):
        S2FTModel.from_pretrained(tiny_model("llama"), tmp_path / "a")


def _garbage_weights_with_matching_sha(path):
    import hashlib

    blob = b"\x08\x00\x00\x00\x00\x00\x00\x00not json"
    (path / WEIGHTS_NAME).write_bytes(blob)
    _edit(path, weights_sha256=hashlib.sha256(blob).hexdigest())


def _edit(path, **fields):
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta.update(fields)
    (path / CONFIG_NAME).write_text(json.dumps(meta))


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    model = get_s2ft_model(tiny_model("llama"), CFG)
    model.save_pretrained(tmp_path / "a")
    good = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    randomize_deltas(model)

    import s2ft.adapter_io as io

    real_fsync = io.os.fsync
    calls = {"n": 0}

    def failing_fsync(fd):  # the disk fails while the second file (the JSON) is written
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_fsync(fd)

    monkeypatch.setattr(io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "a")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(good)  # no temp files left
    assert (tmp_path / "a" / CONFIG_NAME).read_bytes() == good[CONFIG_NAME]
    # the old JSON no longer vouches for the new weights: loading refuses instead of mixing them
    with pytest.raises(AdapterError, match="sha256"):
        S2FTModel.from_pretrained(tiny_model("llama"), tmp_path / "a")


def test_indices_saved_in_original_order(tmp_path):
    model = get_s2ft_model(tiny_model("llama"), CFG)
    model.save_pretrained(tmp_path / "a")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "a" / WEIGHTS_NAME)
    layer = model.get_base_model().get_submodule("model.layers.1.mlp.down_proj").s2ft["default"]
    assert torch.equal(tensors["model.layers.1.mlp.down_proj.col_idx"], layer.col_idx)
    up = tensors["model.layers.1.mlp.up_proj.row_idx"]
    assert torch.equal(up, tensors["model.layers.1.mlp.down_proj.col_idx"])  # same channels
    assert bool((up[1:] > up[:-1]).all())


def test_state_dict_is_the_adapter_and_round_trips():
    a = get_s2ft_model(tiny_model("llama"), CFG)
    randomize_deltas(a)
    sd = a.state_dict()
    assert sd and all(".s2ft.default." in k for k in sd)
    b = get_s2ft_model(tiny_model("llama"), CFG)
    b.load_state_dict(sd)
    ids = batch()
    assert torch.equal(logits(a, ids), logits(b, ids))
    with pytest.raises(RuntimeError, match="missing adapter keys"):
        b.load_state_dict({})


@pytest.mark.parametrize("damage", ["empty", "wrong_shape"])
def test_save_refuses_empty_or_wrong_shaped_tensors(tmp_path, damage):
    """DeepSpeed ZeRO-3 leaves each partitioned parameter as a 0-element tensor outside its
    forward; a save from it must fail, not write an adapter that cannot load."""
    model = get_s2ft_model(tiny_model("llama"), S2FTConfig(ffn_ratio=0.25, seed=0))
    d = model.get_base_model().model.layers[1].mlp.down_proj.s2ft["default"]
    d.col_delta.data = torch.empty(0, dtype=d.col_delta.dtype) if damage == "empty" else d.col_delta.data[:, :-1]
    with pytest.raises(AdapterError, match=r"layers\.1\.mlp\.down_proj\.col_delta has shape .*expected"):
        model.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / CONFIG_NAME).exists() and not (tmp_path / "a" / WEIGHTS_NAME).exists()
