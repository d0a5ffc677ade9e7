"""`s2ft export-lora --for vllm`: what vLLM would refuse is refused first, naming the limit and
the flag that fixes it, and nothing is written. (That the exports vLLM accepts give vLLM the same
tokens is `tests/test_vllm.py`, which needs a vLLM install.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, randomize_deltas, tiny_model

from s2ft import S2FTConfig, get_s2ft_model
from s2ft.cli import main
from s2ft.export import ExportError, export_lora
from s2ft.integrations.vllm import MAX_LORA_RANKS, smallest_max_lora_rank


def _adapter(tmp_path, family="llama", train_bias=False, **cfg):
    config = S2FTConfig(
        ffn_ratio=0.25, attn_ratio=0.5, attn_modules=("q", "k", "v", "o"), train_bias=train_bias, seed=0, **cfg
    )
    model = get_s2ft_model(tiny_model(family, dtype=torch.float32), config)
    randomize_deltas(model)
    model.save_pretrained(tmp_path / f"{family}-adapter")
    return tmp_path / f"{family}-adapter"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_for_vllm_or_is_refused_with_the_reason(family, tmp_path):
    adapter = _adapter(tmp_path, family)
    out = tmp_path / "lora"
    if family == "gpt2":
        with pytest.raises(ExportError, match=r"GPT2LMHeadModel does not implement LoRA.*s2ft merge"):
            export_lora(adapter, out, engine="vllm")
        assert not out.exists()
        return
    report = export_lora(adapter, out, engine="vllm")
    assert report["vllm"] == [] and not report["lora_bias"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["bias"] == "none" and not config["lora_bias"] and not config["use_dora"]
    # vLLM's PEFTHelper takes the largest of r and rank_pattern as the adapter's rank
    assert max([config["r"], *config["rank_pattern"].values()]) == report["rank_max"]


@pytest.mark.parametrize("family", ["qwen2", "opt"])
def test_a_trained_bias_is_refused_and_no_train_bias_fixes_it(family, tmp_path):
    adapter = _adapter(tmp_path, family, train_bias=True)
    with pytest.raises(ExportError, match=r"vLLM does not support LoRA bias.*--no-train-bias") as err:
        export_lora(adapter, tmp_path / "lora", engine="vllm")
    assert "nothing was written" in str(err.value) and not (tmp_path / "lora").exists()
    assert export_lora(adapter, tmp_path / "peft")["lora_bias"]  # PEFT itself takes the bias
    fixed = _adapter(tmp_path / "fixed", family, train_bias=False)
    assert export_lora(fixed, tmp_path / "lora", engine="vllm")["vllm"] == []


def test_rank_above_max_lora_rank_names_the_serve_flag(tmp_path):
    adapter = _adapter(tmp_path)
    top = export_lora(adapter, tmp_path / "probe")["rank_max"]
    below = max(r for r in MAX_LORA_RANKS if r < top)
    fits = smallest_max_lora_rank(top)
    with pytest.raises(ExportError, match=rf"needs LoRA rank {top} > vLLM --max-lora-rank {below}; serve with "
                       rf"--max-lora-rank {fits}"):  # fmt: skip
        export_lora(adapter, tmp_path / "lora", engine="vllm", max_lora_rank=below)
    assert not (tmp_path / "lora").exists()
    export_lora(adapter, tmp_path / "lora", engine="vllm", max_lora_rank=fits)
    with pytest.raises(ExportError, match=rf"needs LoRA rank {fits * 2} > vLLM --max-lora-rank {fits}"):
        export_lora(adapter, tmp_path / "padded", engine="vllm", max_lora_rank=fits, pad_to=fits * 2)  # as written
    with pytest.raises(ExportError, match=r"vLLM accepts only 1, 8, 16"):
        export_lora(adapter, tmp_path / "odd", engine="vllm", max_lora_rank=fits + 1)


def test_a_rank_no_vllm_engine_accepts_says_to_train_smaller(tmp_path):
    from s2ft.integrations.vllm import vllm_problems

    (problem,) = vllm_problems("llama", {"model.layers.0.mlp.up_proj": 600}, False)
    assert "600 > vLLM --max-lora-rank 512" in problem and "smaller --ffn-ratio" in problem
    (problem,) = vllm_problems("llama", {"model.layers.0.mlp.c_fc": 8}, False)
    assert "no LoRA layer" in problem and "c_fc" in problem
    (problem,) = vllm_problems("mamba", {"x.in_proj": 8}, False)
    assert "not among the architectures" in problem


def test_cli_export_for_vllm(tmp_path, capsys):
    adapter = _adapter(tmp_path)
    assert main(["export-lora", str(adapter), str(tmp_path / "lora"), "--for", "vllm"]) == 0
    out = capsys.readouterr().out
    assert "--enable-lora --max-lora-rank" in out and "--max-loras 2" in out
    code = main(["export-lora", str(adapter), str(tmp_path / "x"), "--for", "vllm", "--max-lora-rank", "8"])
    err = capsys.readouterr().err
    assert code != 0 and "--max-lora-rank" in err and not (tmp_path / "x").exists()
    biased = _adapter(tmp_path / "b", "qwen2", train_bias=True)
    assert main(["export-lora", str(biased), str(tmp_path / "p")]) == 0  # for PEFT: written, with a note
    assert "vLLM would refuse it" in capsys.readouterr().out


def test_train_cli_no_train_bias_reaches_the_config():
    from s2ft.train import TrainArgs, s2ft_config

    assert s2ft_config(TrainArgs(train_bias=False)).train_bias is False
    assert s2ft_config(TrainArgs()).train_bias is True
