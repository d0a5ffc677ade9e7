"""Instruction data: reading records (JSON, JSONL, CSV, a `datasets` name or directory, or a
dataset shipped with s2ft), checking their format (Alpaca `instruction`/`input`/`output` or chat
`messages`), the prompt templates (LLM-Adapters/Alpaca, or the tokenizer's own chat template),
and tokenizing with the loss on response tokens only."""

from __future__ import annotations

import json
import re
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


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; every malformed line or missing field is reported by line."""
    path = Path(path)
    records = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        check_record(rec, f"{path}:{lineno}")
        records.append(rec)
    return _nonempty(records, path)


BUILTIN_PREFIX = "builtin:"


def load_records(spec: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Records from `spec`, each checked to be an Alpaca or a chat record (see `check_record`).

    `spec` is a `.jsonl`, `.json` (an array of objects, or JSON lines), or `.csv` file; a
    directory written by `datasets.save_to_disk` or holding data files; `builtin:NAME` for a
    dataset shipped with s2ft (`builtin:arc_easy` is its train split, `builtin:arc_easy/eval`
    the held-out one); or a `datasets` Hub name (`split` picks the split). Errors name the
    file and line (or record number) and the field.
    """
    text_spec = str(spec)
    if text_spec.startswith(BUILTIN_PREFIX):
        name, _, part = text_spec[len(BUILTIN_PREFIX) :].partition("/")
        train, held = builtin_dataset(name)
        return held if part == "eval" else train
    path = Path(spec)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".jsonl":
            return read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".csv":
            return _read_csv(path)
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .csv")
    if suffix in (".jsonl", ".json", ".csv") or (path.parent != Path(".") and not path.parent.exists()):
        raise DataError(f"{path}: no such file")
    return _read_datasets(path, text_spec, split)


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = _read_text(path)
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return read_jsonl(path)  # JSON lines in a .json file
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    for i, rec in enumerate(data):
        check_record(rec, f"{path}: record {i}")
    return _nonempty(data, path)


def _read_csv(path: Path) -> list[dict[str, Any]]:
    import csv
    import io

    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    records = []
    for rec in reader:
        where = f"{path}:{reader.line_num}"
        if None in rec:
            raise DataError(f"{where}: more values than the header has columns")
        rec = {k: v for k, v in rec.items() if v is not None}
        check_record(rec, where)
        records.append(rec)
    return _nonempty(records, path)


def _read_datasets(path: Path, spec: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{path}: no split {split!r} (has {sorted(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(spec, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for "not found"
        raise DataError(f"{spec}: not a data file, dataset directory or loadable dataset ({e})") from None
    records = [dict(r) for r in ds]
    for i, rec in enumerate(records):
        check_record(rec, f"{spec}: record {i}")
    return _nonempty(records, spec)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None


def _nonempty(records: list[dict[str, Any]], source: Any) -> list[dict[str, Any]]:
    if not records:
        raise DataError(f"{source}: no records")
    return records


def record_format(record: dict[str, Any]) -> str:
    """`"chat"` for a record with `messages`, else `"alpaca"`."""
    return "chat" if "messages" in record else "alpaca"


def check_record(rec: Any, where: str) -> None:
    """Raise DataError naming `where` and the field unless `rec` is an Alpaca record (string
    `instruction` and `output`, optional string `input`) or a chat record (`messages`: a list
    of `{"role", "content"}` with at least one `assistant` turn)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{j}] needs string fields 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: field 'messages' has no 'assistant' turn to learn from")
        return
    missing = [k for k in REQUIRED if not isinstance(rec.get(k), str)]
    if missing:
        raise DataError(
            f"{where}: missing or non-string field(s) {missing} (an Alpaca record needs 'instruction' and "
            "'output'; a chat record needs 'messages')"
        )
    if rec.get("input") is not None and not isinstance(rec["input"], str):
        raise DataError(f"{where}: field 'input' must be a string")


_OPTION = re.compile(r"Answer(\d+): (.*?)(?= Answer\d+: |\n\nAnswer format)", re.S)


def options(record: dict[str, Any]) -> list[str]:
    """The answer options' texts, in label order, parsed from the LLM-Adapters instruction."""
    found = _OPTION.findall(record["instruction"])
    if [int(k) for k, _ in found] != list(range(1, len(found) + 1)):
        raise ValueError(f"cannot parse the answer options of: {record['instruction'][:80]!r}")
    return [text.strip() for _, text in found]


def gold_option(record: dict[str, Any]) -> int:
    """The 0-based index of the correct option ("answer3" → 2)."""
    return int(record["answer"].removeprefix("answer")) - 1


def with_option_text(record: dict[str, Any]) -> dict[str, Any]:
    """The record with the gold option's text as its response instead of "…is answerK"."""
    return {**record, "output": options(record)[gold_option(record)]}


def builtin_dataset(name: str = "arc_easy") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) records of a dataset shipped inside the package (see its README.md).

    `arc_easy` is the LLM-Adapters format (responses "the correct answer is answerK");
    `arc_easy_text` is the same questions with the gold option's text as the response.
    """
    if name == "arc_easy_text":
        train, held = builtin_dataset("arc_easy")
        return [with_option_text(r) for r in train], [with_option_text(r) for r in held]
    root = resources.files("s2ft") / "data" / name
    if not root.is_dir():
        raise DataError(f"no built-in dataset {name!r}; have arc_easy, arc_easy_text")
    with resources.as_file(root) as path:
        return read_jsonl(path / "train.jsonl"), read_jsonl(path / "eval.jsonl")


def prompt(record: dict[str, Any]) -> str:
    """The LLM-Adapters (Alpaca) prompt for a record."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


TEMPLATES = ("auto", "alpaca", "chat")
LONG_SAMPLES = ("truncate", "skip")


def tokenize(
    record: dict[str, Any], tokenizer: Any, max_length: int, response: str | None = None
) -> dict[str, list[int]]:
    """`input_ids`, `attention_mask` and `labels` (-100 on prompt tokens) for the Alpaca prompt
    of `record` + its response.

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


def to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages of a record: its `messages`, or user = instruction (+ input), assistant = output."""
    if "messages" in record:
        return record["messages"]
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def tokenize_chat(record: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Like `tokenize`, with the tokenizer's chat template; labels on every assistant turn.

    An assistant turn spans the characters between the rendering of the conversation up to
    it (with the generation prompt) and the rendering that includes it, so the template's
    end-of-turn token is learned too. Over-long samples keep their last `max_length` tokens.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; use the 'alpaca' template (--template alpaca)")
    msgs = to_messages(record)
    render = tokenizer.apply_chat_template
    full = render(msgs, tokenize=False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = render(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = render(msgs[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError("the chat template does not render conversations prefix by prefix; use --template alpaca")
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        t if any(a <= s < b for a, b in spans) else -100 for t, (s, _) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    ids, labels = ids[-max_length:], labels[-max_length:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def resolve_template(template: str, records: list[dict[str, Any]]) -> str:
    """`auto` -> `chat` when the records are chat records, else `alpaca` (the LLM-Adapters
    protocol). The Alpaca template needs Alpaca records."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {list(TEMPLATES)}, got {template!r}")
    chat = [i for i, r in enumerate(records) if record_format(r) == "chat"]
    if template == "auto":
        return "chat" if chat else "alpaca"
    if template == "alpaca" and chat:
        raise DataError(f"record {chat[0]} is a chat record ('messages'); the alpaca template needs instruction/output")
    return template


def build_dataset(
    records: list[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    template: str = "auto",
    long_samples: str = "truncate",
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Tokenized training rows and counts (`records`, `kept`, `truncated`, `skipped`).

    A record longer than `max_length` tokens is truncated (`long_samples="truncate"`: the
    prompt loses its beginning, the response is kept) or dropped (`"skip"`); a record left
    with no response tokens is dropped either way.
    """
    if long_samples not in LONG_SAMPLES:
        raise ValueError(f"long_samples must be one of {list(LONG_SAMPLES)}, got {long_samples!r}")
    template = resolve_template(template, records)
    encode = tokenize_chat if template == "chat" else tokenize
    rows, truncated, skipped = [], 0, 0
    for rec in records:
        row = encode(rec, tokenizer, max_length + 1)  # one extra token tells "long" from "exactly max"
        if len(row["input_ids"]) > max_length:
            if long_samples == "skip":
                skipped += 1
                continue
            truncated += 1
            row = encode(rec, tokenizer, max_length)
        if all(t == -100 for t in row["labels"]):
            skipped += 1
            continue
        rows.append(row)
    stats = {"records": len(records), "kept": len(rows), "truncated": truncated, "skipped": skipped}
    if not rows:
        raise DataError(f"no usable samples: all {len(records)} records were skipped (longer than max_length?)")
    return rows, stats


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[Any, Any, Any]:
    """`(input_ids, attention_mask, position_ids)` (B, T) for left-padded sequences: every
    row ends at the last column (where generation continues), positions count real tokens."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def calibration_batches(
    records: list[dict[str, Any]],
    tokenizer: Any,
    n_samples: int = 64,
    batch_size: int = 8,
    max_length: int = 256,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Padded batches of `n_samples` records (a seeded sample, Alpaca template) for
    data-dependent selection."""
    import random

    if n_samples <= 0:
        raise ValueError(f"calibration samples must be positive, got {n_samples}")
    picked = random.Random(seed).sample(records, min(n_samples, len(records)))
    return calibration_from_rows([tokenize(r, tokenizer, max_length) for r in picked], tokenizer, n_samples, batch_size)


def calibration_from_rows(
    rows: list[dict[str, list[int]]], tokenizer: Any, n_samples: int = 64, batch_size: int = 8, seed: int = 0
) -> list[dict[str, Any]]:
    """Right-padded tensor batches of a seeded sample of `n_samples` tokenized rows."""
    import random

    import torch

    if n_samples <= 0:
        raise ValueError(f"calibration samples must be positive, got {n_samples}")
    if len(rows) > n_samples:
        rows = random.Random(seed).sample(rows, n_samples)
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
