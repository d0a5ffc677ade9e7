"""Adapters on disk: safetensors + JSON, atomic writes, base-model fingerprints.

An adapter directory holds exactly two files:

- `s2ft_adapter.safetensors` — for every trained module `<path>` (its path in the base
  model, e.g. `model.layers.3.mlp.down_proj`): `<path>.row_idx`, `<path>.row_delta`,
  `<path>.row_bias`, `<path>.col_idx`, `<path>.col_delta` (those that exist). Indices are
  int64 in the model's ORIGINAL order; deltas are dense `(k_r, in)` / `(out, k_c)` blocks.
- `s2ft_config.json` — format version, s2ft version, the `S2FTConfig`, the resolved
  structure map, a fingerprint of the base model, per-module shapes, the trainable-parameter
  count and the sha256 of the weights file (so a mismatched or truncated pair is detected).

Each file is written to a temporary name in the target directory and renamed into place; the
JSON goes last, so a directory with a JSON always has the weights it describes. Nothing is
ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from s2ft.quantization import logical_shape

CONFIG_NAME = "s2ft_config.json"
WEIGHTS_NAME = "s2ft_adapter.safetensors"
FORMAT = "s2ft-adapter"
FORMAT_VERSION = 1
PROBE_SIZE = 64
PROBE_TOLERANCE = 0.02  # relative L2 distance; bf16 rounding is ~0.003, another model is ~1
_PARTS = ("row_idx", "row_delta", "row_bias", "col_idx", "col_delta")


class AdapterError(ValueError):
    """An adapter directory is missing, corrupt, or does not fit the base model."""


# ---------------------------------------------------------------------- base-model fingerprint


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Identify a base model: its config dims, its parameter names/shapes, and a probe of its
    input-embedding values (which no s2ft adapter changes). Dtype-independent."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    dims = {}
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "head_dim",
    ):
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            dims[key] = value
    # unpacked shapes: a bitsandbytes 4-bit base has the fingerprint of its full-precision model
    shapes = sorted((_clean_name(n), list(logical_shape(p))) for n, p in model.named_parameters() if ".s2ft." not in n)
    emb = model.get_input_embeddings().weight.detach() if hasattr(model, "get_input_embeddings") else None
    probe: list[float] = []
    if emb is not None and emb.numel():
        flat = emb.reshape(-1)
        pos = (torch.arange(PROBE_SIZE, dtype=torch.long) * 2654435761) % flat.numel()
        probe = [float(v) for v in flat[pos.to(flat.device)].float().cpu()]
    return {
        "model_type": getattr(config, "model_type", None),
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        "dims": dims,
        "parameter_shapes_sha256": hashlib.sha256(json.dumps(shapes).encode()).hexdigest(),
        "embedding_probe": probe,
    }


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], where: str, check_base: str) -> None:
    """Raise (or warn, or nothing, per `check_base`) when `current` is not the saved base."""
    problems = []
    if saved.get("model_type") != current.get("model_type"):
        problems.append(f"model_type {saved.get('model_type')!r} != {current.get('model_type')!r}")
    for key, value in saved.get("dims", {}).items():
        if current["dims"].get(key) != value:
            problems.append(f"{key} {value} != {current['dims'].get(key)}")
    if saved.get("parameter_shapes_sha256") != current.get("parameter_shapes_sha256"):
        problems.append("parameter names/shapes differ")
    a, b = saved.get("embedding_probe") or [], current.get("embedding_probe") or []
    if a and b:
        if len(a) != len(b):
            problems.append("embedding probe sizes differ")
        else:
            norm = math.sqrt(sum(x * x for x in a)) or 1e-12
            rel = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True))) / norm
            if rel > PROBE_TOLERANCE:
                problems.append(f"embedding weights differ (relative distance {rel:.3f} > {PROBE_TOLERANCE})")
    if not problems or check_base == "ignore":
        return
    msg = (
        f"adapter {where} was trained on a different base model "
        f"({saved.get('name_or_path') or saved.get('model_type')}): "
        + "; ".join(problems)
        + ". Pass check_base='warn' or 'ignore' to load it anyway."
    )
    if check_base == "warn":
        warnings.warn(msg, stacklevel=3)
    else:
        raise AdapterError(msg)


def _clean_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


# ---------------------------------------------------------------------- writing


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def expected_shapes(info: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensors (part -> shape) of one module's entry in `meta["modules"]`."""
    out_f, in_f = info["shape"]
    k_r, k_c = info.get("rows", 0), info.get("cols", 0)
    expect: dict[str, tuple[int, ...]] = {}
    if k_r:
        expect.update(row_idx=(k_r,), row_delta=(k_r, in_f))
        if info.get("bias"):
            expect["row_bias"] = (k_r,)
    if k_c:
        expect.update(col_idx=(k_c,), col_delta=(out_f, k_c))
    return expect


def check_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: str) -> None:
    """Every tensor an adapter's JSON promises is there with its shape, and nothing else.

    Catches a save from sharded or partitioned parameters that were not gathered (e.g. the
    0-element tensors of DeepSpeed ZeRO-3 outside `deepspeed.zero.GatheredParameters`)."""
    modules = meta["modules"]
    present: dict[str, set[str]] = {}  # module -> parts given
    for key in tensors:
        mod, _, part = key.rpartition(".")
        if part not in _PARTS or mod not in modules:
            raise AdapterError(f"{where}: unexpected tensor {key!r}")
        present.setdefault(mod, set()).add(part)
    for mod, info in modules.items():
        expect = expected_shapes(info)
        for part, shape in expect.items():
            key = f"{mod}.{part}"
            if key not in tensors:
                raise AdapterError(f"{where}: missing tensor {key}")
            got = tuple(tensors[key].shape)
            if got != shape:
                hint = (
                    " (an empty tensor: a sharded or partitioned parameter that was not gathered, e.g. DeepSpeed "
                    "ZeRO-3; see docs/TRAINING.md)"
                    if tensors[key].numel() == 0
                    else ""
                )
                raise AdapterError(f"{where}: {key} has shape {got}, expected {shape}{hint}")
        extra = present.get(mod, set()) - set(expect)
        if extra:
            raise AdapterError(f"{where}: unexpected tensor(s) {sorted(extra)} for {mod}")


def write_adapter(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write an adapter directory (weights first, then the JSON that vouches for them), after
    checking every tensor against the module shapes the JSON records (never an empty or
    wrong-shaped adapter)."""
    path = Path(path)
    check_tensors(tensors, meta, f"cannot write adapter {path}")
    path.mkdir(parents=True, exist_ok=True)
    blob = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"format": FORMAT})
    meta = {**meta, "weights_file": WEIGHTS_NAME, "weights_sha256": hashlib.sha256(blob).hexdigest()}
    atomic_write(path / WEIGHTS_NAME, blob)
    atomic_write(path / CONFIG_NAME, (json.dumps(meta, indent=2, sort_keys=False) + "\n").encode())
    return path


# ---------------------------------------------------------------------- reading


def adapter_dir(path: str | os.PathLike) -> Path:
    """The adapter directory at `path`: the directory itself, or its `adapter/` subdirectory
    (the layout of `s2ft train` runs and their checkpoints). A transformers `Trainer` output
    that holds only Trainer's own `model.safetensors` gets an error that says how to save
    the s2ft format."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter directory")
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "adapter" / CONFIG_NAME).is_file():
        return path / "adapter"
    if (path / "model.safetensors").is_file():
        raise AdapterError(
            f"{path}: a transformers Trainer checkpoint without the s2ft adapter format (only Trainer's "
            "model.safetensors): add s2ft.integrations.transformers.S2FTCallback() to the Trainer's callbacks, "
            "or call model.save_pretrained(DIR)"
        )
    raise AdapterError(f"{path}: not an s2ft adapter (no {CONFIG_NAME})")


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Read and validate an adapter directory (or a run/checkpoint holding one, `adapter_dir`):
    `(meta, {module_path: {part: tensor}})`."""
    path = adapter_dir(path)
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise AdapterError(f"{cfg_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}: corrupt JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterError(f"{cfg_file}: not an s2ft adapter config (field 'format' must be {FORMAT!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterError(
            f"{cfg_file}: format_version {version!r} is not supported by this s2ft "
            f"(reads up to {FORMAT_VERSION}); upgrade s2ft"
        )
    for key in ("config", "modules", "base_model", "weights_sha256"):
        if key not in meta:
            raise AdapterError(f"{cfg_file}: missing field {key!r}")
    if not weights_file.is_file():
        raise AdapterError(f"{path}: {WEIGHTS_NAME} is missing")
    blob = weights_file.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
        raise AdapterError(
            f"{weights_file}: contents do not match the sha256 recorded in {CONFIG_NAME} "
            "(truncated, corrupt, or from another save)"
        )
    try:
        flat = st_load(blob)
    except Exception as e:  # SafetensorError, or other types for some malformed headers
        raise AdapterError(f"{weights_file}: not a valid safetensors file ({e})") from None

    check_tensors(flat, meta, str(weights_file))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        mod, _, part = key.rpartition(".")
        modules.setdefault(mod, {})[part] = tensor
    return meta, modules
