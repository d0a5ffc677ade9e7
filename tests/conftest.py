"""Tiny random models of every supported family, and helpers shared by the tests."""

from __future__ import annotations

import copy
import re
import socket

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

from s2ft.data import prompt
from s2ft.layers import S2FTLayer
from s2ft.structures import weight_view

V = 64  # vocab size of every tiny model
_TOK = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _cfg(name: str) -> T.PretrainedConfig:
    common = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **_TOK,
    )
    if name == "llama":
        return T.LlamaConfig(**common, num_key_value_heads=2)
    if name == "mistral":
        return T.MistralConfig(**common, num_key_value_heads=2)
    if name == "qwen2":
        return T.Qwen2Config(**common, num_key_value_heads=2)
    if name == "qwen3":
        return T.Qwen3Config(**common, num_key_value_heads=2, head_dim=16)
    if name == "gemma":
        return T.GemmaConfig(**common, num_key_value_heads=1, head_dim=16)
    if name == "gemma2":
        return T.Gemma2Config(**common, num_key_value_heads=2, head_dim=16)
    if name == "gemma3":
        return T.Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=16)
    if name == "phi3":
        return T.Phi3Config(**common, num_key_value_heads=2)
    if name == "gpt2":
        return T.GPT2Config(
            vocab_size=V,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **_TOK,
        )
    if name == "opt":
        return T.OPTConfig(
            vocab_size=V,
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            **_TOK,
        )
    if name == "smollm2_shape":  # 9 query heads / 3 KV heads, as SmolLM2-135M
        return T.LlamaConfig(**{**common, "hidden_size": 72, "num_attention_heads": 9}, num_key_value_heads=3)
    if name == "gemma3_270m_shape":  # 4 query heads / 1 KV head, head_dim != hidden/heads
        return T.Gemma3TextConfig(**{**common, "hidden_size": 40}, num_key_value_heads=1, head_dim=16)
    raise KeyError(name)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "opt"]


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = _cfg(name)
    cfg._attn_implementation = "eager"
    model = T.AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():  # some families init biases/norms to constants; make every weight matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def batch(n: int = 2, t: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (n, t), generator=g)


def randomize_deltas(model, scale: float = 0.05, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)


def merged_reference(s2ft_model, plain: torch.nn.Module, adapter: str = "default") -> torch.nn.Module:
    """A plain copy of the base with the adapter's blocks added into its weights by hand."""
    ref = copy.deepcopy(plain)
    with torch.no_grad():
        for path, layer in s2ft_model.named_s2ft_layers():
            d = layer.s2ft[adapter]
            mod = ref.get_submodule(path)
            w = weight_view(mod)
            if d.row_delta is not None:
                w.index_add_(0, d.row_idx, d.row_delta.to(w.dtype))
                if d.row_bias is not None:
                    mod.bias.index_add_(0, d.row_idx, d.row_bias.to(w.dtype))
            if d.col_delta is not None:
                w.index_add_(1, d.col_idx, d.col_delta.to(w.dtype))
    return ref


def trained_blocks(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_idx")}


__all__ = ["FAMILIES", "S2FTLayer", "batch", "merged_reference", "randomize_deltas", "tiny_model", "trained_blocks"]


def word_tokenizer(records):
    """A word-level fast tokenizer covering `records`' Alpaca prompts and responses, with a
    minimal chat template (pad 0, eos 1)."""
    text = " ".join(prompt(r) + " " + r["output"] for r in records) + " the correct answer is user assistant system :"
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", text)) | {f"answer{i}" for i in range(1, 6)})
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    return fast


def tiny_llama_for(tok, num_hidden_layers: int = 2):
    """A tiny random LLaMA whose vocabulary is `tok`'s (pad 0, eos 1)."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return T.AutoModelForCausalLM.from_config(cfg)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
