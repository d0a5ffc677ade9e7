"""Instruction data: reading Alpaca/LLM-Adapters records, the prompt template, and tokenizing
with the loss on response tokens only."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
REQUIRED = ("instruction", "output")


class DataError(ValueError):
    """A data file is malformed; the message names the file and line."""


def read_jsonl(path: str | Path, required: tuple[str, ...] = REQUIRED) -> list[dict[str, Any]]:
    """Records of a JSONL file; every malformed line or missing field is reported by line."""
    path = Path(path)
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in required if not isinstance(rec.get(k), str)]
        if missing:
            raise DataError(f"{path}:{lineno}: missing or non-string field(s) {missing}")
        records.append(rec)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def builtin_dataset(name: str = "arc_easy") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) records of a dataset shipped inside the package (see its README.md)."""
    root = resources.files("s2ft") / "data" / name
    with resources.as_file(root) as path:
        return read_jsonl(path / "train.jsonl"), read_jsonl(path / "eval.jsonl")


def prompt(record: dict[str, Any]) -> str:
    """The LLM-Adapters (Alpaca) prompt for a record."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def tokenize(
    record: dict[str, Any], tokenizer: Any, max_length: int, response: str | None = None
) -> dict[str, list[int]]:
    """`input_ids`, `attention_mask` and `labels` (-100 on prompt tokens) for prompt + response.

    The response is `record["output"]` unless given; EOS is appended so the model learns to
    stop. Over-long samples are truncated from the left of the prompt, keeping the response.
    """
    p = tokenizer(prompt(record), add_special_tokens=False)["input_ids"]
    r = tokenizer(response if response is not None else record["output"], add_special_tokens=False)["input_ids"]
    r = r + [tokenizer.eos_token_id]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        p = [tokenizer.bos_token_id] + p
    overflow = len(p) + len(r) - max_length
    if overflow > 0:
        p = p[overflow:] if overflow < len(p) else []
        r = r[: max_length - len(p)]
    ids = p + r
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(p) + r}


def calibration_batches(
    records: list[dict[str, Any]],
    tokenizer: Any,
    n_samples: int = 64,
    batch_size: int = 8,
    max_length: int = 256,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Padded batches of `n_samples` records (a seeded sample) for data-dependent selection."""
    import random

    import torch

    if n_samples <= 0:
        raise ValueError(f"calibration samples must be positive, got {n_samples}")
    picked = random.Random(seed).sample(records, min(n_samples, len(records)))
    rows = [tokenize(r, tokenizer, max_length) for r in picked]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, r in enumerate(chunk):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(r["labels"])
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches
