"""The Hugging Face Hub: upload an S²FT adapter (never its base model) with a model card.

`S2FTModel.push_to_hub(repo_id)` writes the adapter folder (`save_pretrained`: the s2ft
safetensors file and JSON) plus a README.md model card into a temporary directory and uploads
that directory with `huggingface_hub` (`create_repo`, then `upload_folder`). The card says
which base model the adapter belongs to, its config, its trainable parameters, how to load it
and how to export it to LoRA. `staged_folder` is the folder exactly as it would be uploaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from s2ft.adapter_io import CONFIG_NAME, atomic_write

if TYPE_CHECKING:
    from s2ft.model import S2FTModel

CARD_NAME = "README.md"


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextlib.contextmanager
def staged_folder(model: S2FTModel, adapter_name: str | None = None, repo_id: str | None = None) -> Iterator[Path]:
    """A temporary directory holding what `push_to_hub` uploads: the adapter and README.md.
    Under FSDP every rank must enter it (saving gathers); only the main process writes."""
    with tempfile.TemporaryDirectory(prefix="s2ft-hub-") as tmp:
        folder = Path(tmp) / "adapter"
        model.save_pretrained(folder, adapter_name)
        if _is_main_process():
            write_model_card(model, folder, adapter_name, repo_id)
        yield folder


def push_adapter(
    model: S2FTModel,
    repo_id: str,
    adapter_name: str | None = None,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
) -> Any:
    """Create `repo_id` if needed and upload the staged adapter folder; returns `CommitInfo`
    (None on processes other than the main one)."""
    from huggingface_hub import HfApi

    name = adapter_name or model.active_adapter
    with staged_folder(model, name, repo_id) as folder:
        if not _is_main_process():
            return None
        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload S²FT adapter {name!r}",
            revision=revision,
            create_pr=create_pr,
        )


def write_model_card(
    model: S2FTModel, output_dir: str | os.PathLike, adapter_name: str | None = None, repo_id: str | None = None
) -> Path:
    """Write README.md for an adapter saved in `output_dir` (read from its s2ft_config.json,
    which `save_pretrained` wrote; written first if missing)."""
    out = Path(output_dir)
    if not (out / CONFIG_NAME).is_file():
        model.save_pretrained(out, adapter_name)
    meta = json.loads((out / CONFIG_NAME).read_text())
    atomic_write(out / CARD_NAME, model_card(meta, repo_id).encode())
    return out / CARD_NAME


def model_card(meta: dict[str, Any], repo_id: str | None = None) -> str:
    """The README.md text for an adapter, from its s2ft_config.json contents (`repo_id`: where
    it is uploaded, for the loading snippet)."""
    from s2ft import __version__

    base = meta.get("base_model", {})
    name_or_path = base.get("name_or_path") or ""
    hub_id = name_or_path if _looks_like_hub_id(name_or_path) else None
    name_or_path = name_or_path or "unknown (not recorded in the model's config)"
    config = meta.get("config", {})
    front = ["---", "library_name: s2ft", "tags:", "- s2ft", "- structured-sparse-fine-tuning", "- peft"]
    if hub_id:
        front.insert(1, f"base_model: {hub_id}")
    front.append("---")
    dims = ", ".join(f"{k}={v}" for k, v in base.get("dims", {}).items())
    rows = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in config.items())
    n_modules = len(meta.get("modules", {}))
    load_base = f'"{hub_id}"' if hub_id else '"PATH/TO/BASE_MODEL"'
    lines = [
        *front,
        "",
        "# S²FT adapter",
        "",
        "A Structured Sparse Fine-Tuning (S²FT) adapter: dense updates of a few attention heads and FFN",
        f"channels per block, made with [s2ft](https://pypi.org/project/s2ft/) "
        f"{meta.get('s2ft_version', __version__)}.",
        "",
        "## Base model",
        "",
        f"- name or path: `{name_or_path}`" + ("" if hub_id else " (not a Hub id: load the same weights yourself)"),
        f"- architecture: `{base.get('model_type')}` ({dims})",
        f"- parameter-shapes fingerprint: `{base.get('parameter_shapes_sha256', '')[:16]}`",
        "",
        "s2ft refuses to load this adapter onto a model whose fingerprint differs.",
        "",
        "## Adapter",
        "",
        f"- trainable parameters: {meta.get('trainable_parameters', 0):,} in {n_modules} modules",
        f"- weights: `{meta.get('weights_file', 's2ft_adapter.safetensors')}` (sha256 "
        f"`{meta.get('weights_sha256', '')[:16]}`)",
    ]
    if "provenance" in meta:
        lines.append(f"- provenance: `{json.dumps(meta['provenance'])}`")
    lines += [
        "",
        "| config field | value |",
        "|---|---|",
        rows,
        "",
        "## How to load",
        "",
        "```python",
        "from huggingface_hub import snapshot_download",
        "from transformers import AutoModelForCausalLM",
        "from s2ft import S2FTModel",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({load_base})",
        f'model = S2FTModel.from_pretrained(base, snapshot_download("{repo_id or "REPO_ID"}"))',
        "merged = model.merge_and_unload()  # optional: a plain transformers model",
        "```",
        "",
        "## Export to LoRA (PEFT, vLLM)",
        "",
        "```bash",
        "s2ft export-lora ADAPTER_DIR lora-adapter/ --pad-to 64",
        "```",
        "",
        "The exported PEFT LoRA adapter reproduces this adapter exactly (see s2ft's docs/ADAPTERS.md).",
        "",
    ]
    return "\n".join(lines)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    local = os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name) or name.endswith(".gguf")
    return 1 <= len(parts) <= 2 and all(parts) and not local
