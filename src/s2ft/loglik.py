"""Log-likelihood multiple-choice scoring of the commonsense sets, as lm-evaluation-harness does it.

The LLM-Adapters files hold each question as an instruction with its options written into the
text ("...\\n\\nAnswer1: ... Answer2: ...\\n\\nAnswer format: answer1/answer2"). `parse` takes it
apart into a `Question`: the zero-shot context, the options as continuations and the gold index.
The prompts are lm-eval's own for these tasks, so a number here means what it means there:

| task | context | continuations (target delimiter " ") |
|---|---|---|
| ARC-Easy, ARC-Challenge | `Question: {q}\\nAnswer:` | each option's text |
| openbookqa | `{q}` (lm-eval uses the bare question stem) | each option's text |
| piqa | `Question: {goal}\\nAnswer:` | each solution |
| social_i_qa | `Q: {context and question}\\nA:` | each answer |
| hellaswag | `{activity}: {context}` | each ending |
| boolq | `Question: {q}?\\nAnswer:` (the files have no passage) | `no`, `yes` |
| winogrande | the sentence up to the blank with each option in it (a context per option) | the rest |

Scoring (`score`) follows lm-eval's `HFLM.loglikelihood`: trailing spaces of the context move
to the continuation; the tokens of `context + continuation` are encoded together with the
tokenizer's default special tokens and split after the context's own tokens; the score is the
sum of the continuation tokens' log-probabilities. `acc` is right when the argmax of the scores
is the gold option; `acc_norm` divides each score by its continuation's length in characters
(without the delimiter) first. `label_stats` gives the majority-label baseline of the questions
and the entropy of the predicted labels, so a model that only learned the label prior shows.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

# the word before each option's number in the instruction text, per task
OPTION_WORD = {
    "piqa": "Solution",
    "social_i_qa": "Answer",
    "ARC-Easy": "Answer",
    "ARC-Challenge": "Answer",
    "openbookqa": "Answer",
    "hellaswag": "Ending",
    "winogrande": "Option",
}
TASKS = ("boolq", *OPTION_WORD)
_HEADER = re.compile(r"^\s*Please [^:]*:\s*")  # "Please choose the correct answer to the question: "
_FORMAT = re.compile(r"\s*Answer format:.*$", re.S)


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: score `continuations[i]` after `contexts[i]`."""

    contexts: tuple[str, ...]  # one per option, or a single shared context
    continuations: tuple[str, ...]  # one per option, or a single shared continuation
    choices: tuple[str, ...]  # the option strings lm-eval's acc_norm measures
    gold: int

    @property
    def pairs(self) -> list[tuple[str, str]]:
        n = max(len(self.contexts), len(self.continuations))
        return [
            (self.contexts[min(i, len(self.contexts) - 1)], self.continuations[min(i, len(self.continuations) - 1)])
            for i in range(n)
        ]


class ParseError(ValueError):
    pass


def _options(body: str, word: str) -> tuple[str, list[str]]:
    """Split "stem\\n\\nWord1: a Word2: b" into ("stem", ["a", "b"]), numbers in order from 1."""
    starts, pos = [], 0
    for k in range(1, 10):
        m = re.compile(rf"(?:^|\s){word}{k}:\s*").search(body, pos)
        if m is None:
            break
        starts.append(m)
        pos = m.end()
    if len(starts) < 2:
        raise ParseError(f"fewer than two '{word}N:' options in the instruction")
    stem = body[: starts[0].start()].strip()
    ends = [m.start() for m in starts[1:]] + [len(body)]
    opts = [body[m.end() : end].strip() for m, end in zip(starts, ends, strict=True)]
    return stem, opts


def _gold(answer: str, n: int) -> int:
    m = re.fullmatch(r"[a-z]+(\d)", answer.strip().lower())
    if m is None or not 1 <= int(m.group(1)) <= n:
        raise ParseError(f"answer {answer!r} is not one of the {n} options")
    return int(m.group(1)) - 1


def parse(record: dict[str, Any], task: str) -> Question:
    """The lm-eval-style question of one LLM-Adapters record (see the module docstring)."""
    if task not in TASKS:
        raise ParseError(f"no log-likelihood form for task {task!r}; known: {', '.join(TASKS)}")
    text = _FORMAT.sub("", str(record["instruction"]))
    body = _HEADER.sub("", text, count=1).strip()
    answer = str(record["answer"])
    if task == "boolq":
        if answer.strip().lower() not in ("true", "false"):
            raise ParseError(f"boolq answer {answer!r} is neither true nor false")
        gold = int(answer.strip().lower() == "true")
        return Question((f"Question: {body.rstrip('?')}?\nAnswer:",), (" no", " yes"), ("no", "yes"), gold)
    stem, opts = _options(body, OPTION_WORD[task])
    if not stem or not all(opts):
        raise ParseError("empty question or option text")
    gold = _gold(answer, len(opts))
    if task == "winogrande":
        if stem.count("_") != 1:
            raise ParseError("winogrande sentence needs exactly one blank '_'")
        i = stem.index("_")
        contexts = tuple(stem[:i] + o for o in opts)
        return Question(contexts, (" " + stem[i + 1 :].strip(),), contexts, gold)
    context = {
        "piqa": f"Question: {stem}\nAnswer:",
        "social_i_qa": f"Q: {stem}\nA:",
        "openbookqa": stem,
        "hellaswag": stem,
    }.get(task, f"Question: {stem}\nAnswer:")
    return Question((context,), tuple(" " + o for o in opts), tuple(opts), gold)


def parse_all(records: list[dict], task: str, source: str = "") -> list[Question]:
    """Every record parsed; a record that does not parse is an error naming the file and index."""
    out = []
    for i, r in enumerate(records):
        try:
            out.append(parse(r, task))
        except (ParseError, KeyError) as e:
            raise ParseError(f"{source or task}: record {i}: {e}") from None
    return out


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for a causal LM: (context tokens, continuation tokens)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return whole[: len(ctx)], whole[len(ctx) :]


@torch.no_grad()
def score(
    model: Any,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    batch_size: int = 32,
    max_length: int = 2048,
    progress: Any = None,
) -> list[float]:
    """Sum of log p(continuation | context) for each pair, batched longest first, right-padded.

    The input is `(context + continuation)[-(max_length + 1):][:-1]` and the scores are read at
    the continuation's positions, as in lm-eval; `progress(n)` is called after each batch.
    """
    device = next(model.parameters()).device
    enc = [encode_pair(tokenizer, c, x) for c, x in pairs]
    order = sorted(range(len(enc)), key=lambda i: -(len(enc[i][0]) + len(enc[i][1])))
    out = [0.0] * len(enc)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [(enc[i][0] + enc[i][1])[-(max_length + 1) :][:-1] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
        sums = []  # log-softmax over the continuation's positions only: (C, V) per row, never (B, T, V)
        for row, i in enumerate(idx):
            cont = enc[i][1]
            end = len(seqs[row])
            target = torch.tensor(cont, device=logits.device)  # (C,) predicted from positions end-C .. end-1
            logp = torch.log_softmax(logits[row, end - len(cont) : end].float(), -1)  # (C, V)
            sums.append(logp.gather(-1, target[:, None]).sum())
        for i, value in zip(idx, torch.stack(sums).tolist(), strict=True):  # one device-to-host copy per batch
            out[i] = value
        if progress:
            progress(len(idx))
    return out


def predict(question: Question, scores: list[float]) -> tuple[int, int]:
    """(acc prediction, acc_norm prediction): argmax of the scores, raw and per character."""
    pred = max(range(len(scores)), key=lambda i: scores[i])
    norm = [s / max(len(c), 1) for s, c in zip(scores, question.choices, strict=True)]
    return pred, max(range(len(norm)), key=lambda i: norm[i])


def label_stats(gold: list[Any], predicted: list[Any]) -> dict:
    """Majority-label baseline (share of the most common gold label, and which) and the entropy
    in bits of the predicted labels; `entropy_max` is log2 of the number of gold labels."""
    n = max(len(gold), 1)
    label, count = Counter(gold).most_common(1)[0] if gold else (None, 0)
    freq = Counter(predicted)
    entropy = -sum(c / n * math.log2(c / n) for c in freq.values() if c)
    top, top_n = freq.most_common(1)[0] if predicted else (None, 0)
    return {
        "majority_label": label,
        "majority_baseline": count / n,
        "pred_entropy": round(entropy + 0.0, 4),
        "entropy_max": round(math.log2(max(len(set(gold)), 1)), 4),
        "most_predicted": top,
        "most_predicted_share": top_n / n,
    }
