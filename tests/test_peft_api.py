"""A PEFT user's first contact: PEFT's method names, the backbone TRL calls, Trainer saves,
transformers pipelines and `push_to_hub` (through the real huggingface_hub client against a
fake Hub on loopback)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers as T
from conftest import batch, randomize_deltas, tiny_llama_for, tiny_model, word_tokenizer
from peft import PeftModel
from peft.tuners.lora import LoraModel
from safetensors.torch import load_file
from transformers.integrations.peft import PeftAdapterMixin
from transformers.utils import PushToHubMixin

from hub_server import FakeHub, allow_hub_http
from s2ft import AdapterError, S2FTConfig, S2FTModel, get_s2ft_model
from s2ft.integrations.transformers import S2FTCallback
from s2ft.peft_names import PeftNameError


def _model(seed=0):
    model = get_s2ft_model(tiny_model("llama", dtype=torch.float32), S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5))
    randomize_deltas(model, seed=seed)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------ PEFT names


def test_model_looks_like_the_transformers_model_it_wraps():
    model = _model()
    inner = model.get_base_model()
    assert isinstance(inner, T.LlamaForCausalLM) and model.model is inner
    assert model.base_model is inner.base_model  # the backbone, as on any PreTrainedModel (TRL calls it)
    assert model.config is inner.config and model.get_output_embeddings() is inner.lm_head
    ids = batch()
    hidden = model.base_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(inner.lm_head(hidden), _logits(model, ids))  # the backbone runs the adapter too


def test_peft_names_whose_meaning_carries_over():
    model = _model()
    ids = batch()
    adapted = _logits(model, ids)
    with model.disable_adapter():
        base = _logits(model, ids)
    assert not torch.allclose(adapted, base)
    assert model.peft_config is model.s2ft_config and model.active_peft_config is model.s2ft_config["default"]
    assert model.active_adapters == ["default"]
    model.disable_adapter_layers()
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=1e-6)
    model.disable_adapter_layers()  # idempotent, as in PEFT
    model.enable_adapter_layers()
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=0, atol=1e-6)
    model.disable_adapters()  # transformers' PeftAdapterMixin spelling
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=1e-6)
    model.enable_adapters()
    model.merge_adapter()
    assert model.merge_mode
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    assert not model.merge_mode
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.merge_adapter(["default", "other"])
    model.set_adapter("__base__")
    assert model.active_adapters == []
    pristine = tiny_model("llama", dtype=torch.float32).state_dict()
    after = model.unload().state_dict()
    assert after.keys() == pristine.keys() and all(torch.equal(v, after[k]) for k, v in pristine.items())


def _peft_names() -> set[str]:
    """Every public method/property name of PEFT's PeftModel and LoRA tuner and of transformers'
    PEFT integration, minus nn.Module's and the transformers generics PeftModel re-exports."""
    names = {n for c in (PeftModel, LoraModel) for n in dir(c) if not n.startswith("_")}
    mixin = {n for n in vars(PeftAdapterMixin) if not n.startswith("_")}
    generics = (set(dir(T.PreTrainedModel)) - mixin) | set(dir(torch.nn.Module))
    return (names | mixin) - generics - {"generate", "prepare_inputs_for_generation", "prefix"}


def test_every_other_peft_name_gets_an_s2ft_error():
    model = _model()
    names = _peft_names()
    assert {"active_adapters", "add_weighted_adapter", "get_layer_status", "enable_adapters"} <= names
    ours, refused = [], []
    for name in sorted(names):
        if hasattr(S2FTModel, name) or name in vars(model):
            ours.append(name)
            continue
        with pytest.raises(PeftNameError, match=name) as info:
            getattr(model, name)
        assert "S2FTModel" in str(info.value)
        assert not hasattr(model, name)  # an AttributeError: feature probes see "absent"
        refused.append(name)
    assert {"get_base_model", "peft_config", "merge_adapter", "disable_adapter_layers"} <= set(ours)
    assert "add_weighted_adapter" in refused and "fuse_adapters" in str(_error(model, "add_weighted_adapter"))


def _error(model, name):
    try:
        getattr(model, name)
    except PeftNameError as e:
        return e
    raise AssertionError(f"{name} did not raise")


def test_base_model_upload_methods_are_not_reachable():
    model = _model()
    for name in (n for n in dir(PushToHubMixin) if not n.startswith("__")):
        if name in vars(S2FTModel):
            continue  # push_to_hub and save_pretrained: S2FTModel's own (the adapter)
        with pytest.raises(PeftNameError, match="push_to_hub"):
            getattr(model, name)
    assert type(model).push_to_hub is S2FTModel.push_to_hub
    assert type(model).save_pretrained is S2FTModel.save_pretrained


# ------------------------------------------------------------------ Hub


def test_push_to_hub_uploads_the_adapter_and_a_card_never_the_base(tmp_path, monkeypatch):
    allow_hub_http(monkeypatch)
    model = _model()
    model.save_pretrained(tmp_path / "local")
    with FakeHub() as hub:
        info = model.push_to_hub("user/my-s2ft", endpoint=hub.endpoint, token="hf_fake")
        files = hub.repos["user/my-s2ft"]
    assert info.oid
    assert set(files) == {"s2ft_adapter.safetensors", "s2ft_config.json", "README.md"}
    assert files["s2ft_adapter.safetensors"] == (tmp_path / "local" / "s2ft_adapter.safetensors").read_bytes()
    assert json.loads(files["s2ft_config.json"]) == json.loads((tmp_path / "local" / "s2ft_config.json").read_text())
    n_base = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad)
    assert len(files["s2ft_adapter.safetensors"]) < n_base  # under a quarter of the base's fp32 bytes
    card = files["README.md"].decode()
    meta = json.loads(files["s2ft_config.json"])
    assert "library_name: s2ft" in card and f"{meta['trainable_parameters']:,}" in card
    assert 'S2FTModel.from_pretrained(base, snapshot_download("user/my-s2ft"))' in card
    assert "s2ft export-lora" in card and "ffn_ratio" in card
    # what was uploaded loads back and reproduces the model
    down = tmp_path / "downloaded"
    down.mkdir()
    for name, blob in files.items():
        (down / name).write_bytes(blob)
    again = S2FTModel.from_pretrained(tiny_model("llama", dtype=torch.float32), down)
    ids = batch()
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids))


def test_save_pretrained_push_to_hub_pushes(tmp_path, monkeypatch):
    allow_hub_http(monkeypatch)
    model = _model()
    with FakeHub() as hub:
        model.save_pretrained(
            tmp_path / "a", push_to_hub=True, repo_id="user/a", token="hf_fake", endpoint=hub.endpoint
        )
        assert set(hub.repos["user/a"]) == {"s2ft_adapter.safetensors", "s2ft_config.json", "README.md"}
        assert hub.commits["user/a"]
    assert (tmp_path / "a" / "s2ft_config.json").is_file()


def test_model_card_names_a_hub_base_only_when_it_is_one(tmp_path):
    from s2ft.hub import model_card

    model = _model()
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "s2ft_config.json").read_text())
    meta["base_model"]["name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in model_card(meta)
    meta["base_model"]["name_or_path"] = str(tmp_path)
    assert "base_model:" not in model_card(meta) and "not a Hub id" in model_card(meta)
    model.create_or_update_model_card(tmp_path)
    assert (tmp_path / "README.md").read_text().startswith("---\nlibrary_name: s2ft")


# ------------------------------------------------------------------ pipelines


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_text_generation_pipeline():
    recs = [{"instruction": "say answer1", "input": "", "output": "the correct answer is answer1"}]
    tok = word_tokenizer(recs)
    model = get_s2ft_model(tiny_llama_for(tok), S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5))
    randomize_deltas(model, scale=0.5)
    ids = tok("say answer1 :", return_tensors="pt").input_ids
    want = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    want_text = tok.decode(want[0, ids.shape[1] :], skip_special_tokens=True)
    records = _Records()
    logging.getLogger("transformers").addHandler(records)  # transformers' loggers do not reach the root
    try:
        wrapped = T.pipeline("text-generation", model=model, tokenizer=tok)
        assert any("'S2FTModel' is not supported" in m for m in records.messages)  # a name check; harmless
        records.messages.clear()
        inner = T.pipeline("text-generation", model=model.get_base_model(), tokenizer=tok)
        assert not any("not supported" in m for m in records.messages)
    finally:
        logging.getLogger("transformers").removeHandler(records)
    for pipe in (wrapped, inner):  # both generate with the adapter: it lives inside the weights
        out = pipe("say answer1 :", max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
        assert out.split() == want_text.split()  # the same tokens


# ------------------------------------------------------------------ Trainer saves


def _rows(n=16, t=16):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(3, 8, (n, t), generator=g)]


def _trainer(out, model, callbacks, **kw):
    kw = {"save_strategy": "steps", "save_steps": 2, "max_steps": 4, **kw}
    args = T.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, learning_rate=2e-2, report_to=[], use_cpu=True, seed=0, **kw
    )
    return T.Trainer(model=model, args=args, train_dataset=_rows(), callbacks=callbacks)


def test_trainer_checkpoints_and_save_model_write_the_s2ft_format(tmp_path):
    model = get_s2ft_model(tiny_model("llama", dtype=torch.float32), S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5))
    trainer = _trainer(tmp_path / "run", model, [S2FTCallback()])
    trainer.train()
    trainer.save_model()
    ids = batch()
    for folder in ("checkpoint-2", "checkpoint-4", "."):
        path = tmp_path / "run" / folder
        assert (path / "s2ft_config.json").is_file() and (path / "model.safetensors").is_file()
        loaded = S2FTModel.from_pretrained(tiny_model("llama", dtype=torch.float32), path)
        if folder != "checkpoint-2":
            torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-6)
        # Trainer's own file (resume) and ours hold the same deltas
        raw = load_file(path / "model.safetensors")
        ours = load_file(path / "s2ft_adapter.safetensors")
        for key, value in ours.items():
            mod, part = key.rsplit(".", 1)
            torch.testing.assert_close(raw[f"model.{mod}.s2ft.default.{part}"], value)


def test_trainer_folder_without_the_callback_gets_a_clear_error(tmp_path):
    model = get_s2ft_model(tiny_model("llama", dtype=torch.float32), S2FTConfig(ffn_ratio=0.25))
    trainer = _trainer(tmp_path / "run", model, [], save_strategy="no")
    trainer.train()
    trainer.save_model()
    with pytest.raises(AdapterError, match="S2FTCallback"):
        S2FTModel.from_pretrained(tiny_model("llama", dtype=torch.float32), tmp_path / "run")


def test_callback_refuses_a_model_that_is_not_s2ft(tmp_path):
    trainer = _trainer(tmp_path / "run", tiny_model("llama", dtype=torch.float32), [S2FTCallback()], max_steps=1)
    with pytest.raises(TypeError, match="S2FTCallback needs the Trainer's model to be an S2FTModel"):
        trainer.train()
