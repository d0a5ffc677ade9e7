"""`s2ft eval`: the evaluation harness of the paper's protocol (LLM-Adapters) plus two probes.

Tasks:
- commonsense (8): boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge,
  openbookqa. Greedy generation from the Alpaca prompt; the response is lower-cased and the
  first match of the task's label pattern is the prediction (no match is wrong).
- arithmetic (7): gsm8k, AQuA, mawps, SVAMP, MultiArith, AddSub, SingleEq. Commas removed,
  the last number in the response is the prediction, correct within 0.001. AQuA uses a strict
  letter rule (`aqua_letter`), not the original "first capital letter anywhere".
- commonsense by log-likelihood (`<task>:ll`, group `commonsense:ll`): the options of each
  question scored as continuations of lm-evaluation-harness's zero-shot prompt for the task
  (`s2ft.loglik`); acc and length-normalised acc_norm as lm-eval defines them.
- mmlu: log-likelihood of the four answer letters after a standard multiple-choice prompt,
  zero-shot or k-shot from the dev split (`--mmlu-shots`).
- wikitext2: perplexity of a text file in non-overlapping windows.

Layout of `--data-dir` (the one in ../shared/data): `test/commonsense/<task>/test.json`,
`test/math/<task>/test.json`, `probe/mmlu/{dev,test}/<subject>_{dev,test}.csv`,
`probe/wikitext-2/test.txt`. The `test/` and `probe/` levels are optional.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from s2ft import loglik
from s2ft.adapter_io import atomic_write
from s2ft.data import left_pad
from s2ft.loglik import label_stats

COMMONSENSE_LABELS = {
    "boolq": r"true|false",
    "piqa": r"solution[12]",
    "social_i_qa": r"answer[1-5]",
    "ARC-Easy": r"answer[1-5]",
    "ARC-Challenge": r"answer[1-5]",
    "openbookqa": r"answer[1-5]",
    "hellaswag": r"ending[1-4]",
    "winogrande": r"option[12]",
}
MATH_TASKS = ("gsm8k", "AQuA", "mawps", "SVAMP", "MultiArith", "AddSub", "SingleEq")
PROBES = ("mmlu", "wikitext2")
LL = ":ll"  # suffix of a task scored by log-likelihood ("ARC-Easy:ll")
GROUPS = {
    "commonsense": tuple(COMMONSENSE_LABELS),
    "commonsense" + LL: tuple(t + LL for t in COMMONSENSE_LABELS),
    "math": MATH_TASKS,
    "all": (*COMMONSENSE_LABELS, *MATH_TASKS, *PROBES),
}


# ---------------------------------------------------------------------------------------------
# Answer extraction (unit-tested on hand-written responses)


def commonsense_label(response: str, task: str) -> str | None:
    """First label of `task`'s pattern in the lower-cased response, as a whole word
    ("answer1" does not match inside "answer10"); None when there is none."""
    m = re.search(rf"(?<![a-z0-9])({COMMONSENSE_LABELS[task]})(?![0-9])", response.lower())
    return m.group(1) if m else None


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(response: str) -> float | None:
    """The last number in the response after removing thousands separators ("1,234" ->
    1234); a leading minus sign is kept ("-5"); None when there is no number."""
    nums = _NUMBER.findall(response.replace(",", ""))
    if not nums:
        return None
    try:
        return float(nums[-1])
    except ValueError:
        return None


def number_correct(pred: float | None, gold: Any) -> bool:
    try:
        return pred is not None and abs(pred - float(str(gold).replace(",", ""))) < 1e-3
    except ValueError:
        return False


_AQUA_STATED = re.compile(r"answer\s*(?:is|:)?\s*(?:option\s*)?\(?([A-E])\)?(?![A-Za-z])", re.I)
_AQUA_LONE = re.compile(r"^\(?([A-E])\)?[.)]?$")


def aqua_letter(response: str) -> str | None:
    """AQuA's answer letter, strictly: the last explicit statement ("the answer is (C)",
    "Answer: C", "answer is option C"); else a last line that is only a letter ("C", "(C)",
    "C."); else None. Letters elsewhere ("A train leaves…", "(B) 1000" in a list of options)
    never count — the original "first capital letter" rule read those."""
    stated = _AQUA_STATED.findall(response)
    if stated:
        return stated[-1].upper()
    lines = [ln.strip() for ln in response.strip().splitlines() if ln.strip()]
    m = _AQUA_LONE.match(lines[-1]) if lines else None
    return m.group(1) if m else None


# ---------------------------------------------------------------------------------------------
# Data


def _find(data_dir: Path, *parts: str) -> Path:
    for base in (data_dir, data_dir / "test", data_dir / "probe"):
        p = base.joinpath(*parts)
        if p.exists():
            return p
    raise FileNotFoundError(f"{data_dir}: no {'/'.join(parts)} (expected the layout of ../shared/data)")


def load_task(data_dir: Path, task: str) -> list[dict[str, Any]]:
    kind = "commonsense" if task in COMMONSENSE_LABELS else "math"
    path = _find(data_dir, kind, task, "test.json")
    records = json.loads(path.read_text(encoding="utf-8"))
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "instruction" not in r or "answer" not in r:
            raise ValueError(f"{path}: record {i} needs 'instruction' and 'answer'")
    return records


def subset_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """Indices of a seeded subset of `limit` of `n` items, in order (all when limit is None)."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def subset(records: list, limit: int | None, seed: int) -> list:
    """A seeded subset of `limit` records in their original order (all when limit is None)."""
    return [records[i] for i in subset_indices(len(records), limit, seed)]


# ---------------------------------------------------------------------------------------------
# Runners


@dataclass
class EvalSettings:
    limit: int | None = None
    seed: int = 0
    batch_size: int = 16
    num_beams: int = 1
    max_new_tokens: int | None = None  # default: 32 commonsense, 256 math
    mmlu_shots: int = 0
    mmlu_subjects: int | None = None  # a seeded subset of subjects
    ppl_window: int = 1024
    ppl_tokens: int | None = None
    progress: bool = True


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: list[str], s: EvalSettings, max_new_tokens: int, desc: str
) -> list[str]:
    """Greedy (or beam) responses, batched with left padding and the KV cache, longest first."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    bar = _bar(len(prompts), desc, s.progress)
    for start in range(0, len(order), s.batch_size):
        idx = order[start : start + s.batch_size]
        ids, mask, _ = left_pad([tokenizer(prompts[i], add_special_tokens=True)["input_ids"] for i in idx], pad)
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=s.num_beams,
            pad_token_id=pad,
        )
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
        bar.update(len(idx))
    bar.close()
    return out


def run_generation_task(model: Any, tokenizer: Any, data_dir: Path, task: str, s: EvalSettings) -> tuple[dict, list]:
    from s2ft.data import prompt

    records = subset(load_task(data_dir, task), s.limit, s.seed)
    is_cs = task in COMMONSENSE_LABELS
    max_new = s.max_new_tokens or (32 if is_cs else 256)
    responses = generate(model, tokenizer, [prompt(r) for r in records], s, max_new, task)
    rows, correct = [], 0
    for r, resp in zip(records, responses, strict=True):
        if is_cs:
            pred: Any = commonsense_label(resp, task)
            ok = pred == str(r["answer"]).lower()
        elif task == "AQuA":
            pred = aqua_letter(resp)
            ok = pred == str(r["answer"]).strip().upper()
        else:
            pred = last_number(resp)
            ok = number_correct(pred, r["answer"])
        correct += ok
        rows.append(
            {
                "instruction": r["instruction"],
                "response": resp,
                "prediction": pred,
                "answer": r["answer"],
                "correct": ok,
            }
        )
    result = _accuracy(correct, len(records))
    if is_cs:  # the label prior: what answering with the commonest label scores, how varied the answers are
        result.update(label_stats([str(r["answer"]).lower() for r in records], [row["prediction"] for row in rows]))
    return result, rows


@torch.no_grad()
def run_loglik_task(model: Any, tokenizer: Any, data_dir: Path, task: str, s: EvalSettings) -> tuple[dict, list]:
    """A commonsense set scored by log-likelihood of its options (`s2ft.loglik`): acc, acc_norm."""
    path = _find(data_dir, "commonsense", task, "test.json")
    records = subset(load_task(data_dir, task), s.limit, s.seed)
    questions = loglik.parse_all(records, task, str(path))
    pairs = [p for q in questions for p in q.pairs]
    bar = _bar(len(pairs), task + LL, s.progress)
    scores = loglik.score(model, tokenizer, pairs, s.batch_size, progress=bar.update)
    bar.close()
    rows, correct, correct_norm, at = [], 0, 0, 0
    for q in questions:
        sc = scores[at : at + len(q.pairs)]
        at += len(q.pairs)
        pred, pred_norm = loglik.predict(q, sc)
        correct += pred == q.gold
        correct_norm += pred_norm == q.gold
        rows.append(
            {
                "context": q.contexts[0],
                "choices": list(q.choices),
                "loglik": sc,
                "prediction": pred,
                "prediction_norm": pred_norm,
                "answer": q.gold,
                "correct": pred == q.gold,
                "correct_norm": pred_norm == q.gold,
            }
        )
    n = len(records)
    result = _accuracy(correct, n)
    lo, hi = wilson(correct_norm, n)
    result.update(acc_norm=correct_norm / max(n, 1), correct_norm=correct_norm, ci95_norm=[lo, hi])
    result.update(label_stats([q.gold for q in questions], [row["prediction"] for row in rows]))
    return result, rows


def _accuracy(correct: int, n: int) -> dict:
    lo, hi = wilson(correct, n)
    return {"metric": "accuracy", "accuracy": correct / max(n, 1), "correct": correct, "n": n, "ci95": [lo, hi]}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion k/n."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"


def _mmlu_item(row: dict, with_answer: bool) -> str:
    text = row["question"].strip() + "\n" + "".join(f"{L}. {row[f'choice{i}']}\n" for i, L in enumerate("ABCD"))
    return text + "Answer:" + (f" {'ABCD'[int(row['answer'])]}\n\n" if with_answer else "")


def _read_csv(path: Path) -> list[dict]:
    import csv

    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@torch.no_grad()
def run_mmlu(model: Any, tokenizer: Any, data_dir: Path, s: EvalSettings) -> tuple[dict, list]:
    test_dir = _find(data_dir, "mmlu", "test")
    subjects = sorted(p.name[: -len("_test.csv")] for p in test_dir.glob("*_test.csv"))
    if s.mmlu_subjects:
        subjects = sorted(random.Random(s.seed).sample(subjects, min(s.mmlu_subjects, len(subjects))))
    items = []
    for subj in subjects:
        shots = ""
        if s.mmlu_shots:
            dev = _read_csv(_find(data_dir, "mmlu", "dev") / f"{subj}_dev.csv")[: s.mmlu_shots]
            shots = "".join(_mmlu_item(r, True) for r in dev)
        header = MMLU_HEADER.format(subject=subj.replace("_", " "))
        for r in _read_csv(test_dir / f"{subj}_test.csv"):
            items.append((subj, header + shots + _mmlu_item(r, False), int(r["answer"])))
    items = subset(items, s.limit, s.seed)
    letters = [tokenizer(f" {L}", add_special_tokens=False)["input_ids"][-1] for L in "ABCD"]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, correct = [], 0
    bar = _bar(len(items), "mmlu", s.progress)
    for start in range(0, len(items), s.batch_size):
        chunk = items[start : start + s.batch_size]
        ids, mask, positions = left_pad(
            [tokenizer(p, add_special_tokens=True)["input_ids"][-2048:] for _, p, _ in chunk], pad
        )
        logits = (
            model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=1,
            )
            .logits[:, -1]
            .float()
        )
        scores = torch.log_softmax(logits, -1)[:, letters].cpu()  # (B, 4)
        for (subj, _, gold), sc in zip(chunk, scores, strict=True):
            pred = int(sc.argmax())
            correct += pred == gold
            rows.append({"subject": subj, "prediction": "ABCD"[pred], "answer": "ABCD"[gold], "correct": pred == gold})
        bar.update(len(chunk))
    bar.close()
    result = _accuracy(correct, len(items))
    result.update(shots=s.mmlu_shots, subjects=len(subjects))
    return result, rows


@torch.no_grad()
def run_perplexity(model: Any, tokenizer: Any, path: Path, s: EvalSettings) -> tuple[dict, list]:
    """Perplexity over non-overlapping windows of `s.ppl_window` tokens (every token but each
    window's first is predicted from the tokens before it in its window)."""
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if s.ppl_tokens:
        ids = ids[: s.ppl_tokens]
    device = next(model.parameters()).device
    nll, count, rows = 0.0, 0, []
    windows = [ids[i : i + s.ppl_window] for i in range(0, len(ids), s.ppl_window)]
    windows = [w for w in windows if len(w) > 1]
    bar = _bar(len(windows), "wikitext2", s.progress)
    for w in windows:
        x = torch.tensor([w], device=device)
        loss = model(input_ids=x, labels=x).loss.float().item()
        nll += loss * (len(w) - 1)
        count += len(w) - 1
        rows.append({"tokens": len(w), "nll": loss})
        bar.update(1)
    bar.close()
    mean = nll / max(count, 1)
    return {
        "metric": "perplexity",
        "perplexity": math.exp(mean),
        "nll": mean,
        "tokens": count,
        "window": s.ppl_window,
    }, rows


def run_task(model: Any, tokenizer: Any, data_dir: Path, task: str, s: EvalSettings) -> tuple[dict, list]:
    if task == "mmlu":
        return run_mmlu(model, tokenizer, data_dir, s)
    if task == "wikitext2":
        return run_perplexity(model, tokenizer, _find(data_dir, "wikitext-2", "test.txt"), s)
    if task.endswith(LL):
        return run_loglik_task(model, tokenizer, data_dir, task[: -len(LL)], s)
    return run_generation_task(model, tokenizer, data_dir, task, s)


def expand_tasks(spec: str) -> list[str]:
    known = {*COMMONSENSE_LABELS, *(t + LL for t in COMMONSENSE_LABELS), *MATH_TASKS, *PROBES}
    lower = {k.lower(): k for k in known}
    tasks: list[str] = []
    for t in (x.strip() for x in spec.split(",") if x.strip()):
        names = GROUPS.get(t.lower()) or ([lower[t.lower()]] if t.lower() in lower else None)
        if names is None:
            raise ValueError(f"--tasks: unknown task {t!r}; known: {', '.join(sorted(known))} or {', '.join(GROUPS)}")
        tasks += [n for n in names if n not in tasks]
    return tasks


# ---------------------------------------------------------------------------------------------
# Whole runs, reports, comparison


def load_for_eval(model_spec: str, adapter: str | None, dtype: Any = None, device: Any = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, description): the base, with an S²FT or PEFT adapter when given."""
    from s2ft.loading import load_model, load_tokenizer

    model = load_model(model_spec, dtype=dtype, device=device).eval()
    tokenizer = load_tokenizer(model_spec)
    what = model_spec
    if adapter:
        a = Path(adapter)
        if (a / "s2ft_config.json").is_file():
            from s2ft.model import S2FTModel

            # merged: exact, and decoding runs at the base model's speed with no s2ft code in the loop
            model = S2FTModel.from_pretrained(model, a).merge_and_unload().eval()
            what += f" + S²FT adapter {a} (merged)"
        elif (a / "adapter_config.json").is_file():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, a).eval()
            what += f" + PEFT adapter {a}"
        else:
            raise ValueError(f"--adapter {a}: neither an S²FT adapter (s2ft_config.json) nor a PEFT one")
    tokenizer.padding_side = "left"
    return model, tokenizer, what


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    data_dir: str | Path,
    tasks: list[str],
    s: EvalSettings,
    output_dir: str | Path | None = None,
    on_task: Callable[[str, dict], None] | None = None,
) -> dict[str, dict]:
    """Run `tasks`; write `<task>.jsonl` (one line per example) into `output_dir` as they finish."""
    data_dir = Path(data_dir)
    out = Path(output_dir) if output_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    results = {}
    for task in tasks:
        t = time.time()
        result, rows = run_task(model, tokenizer, data_dir, task, s)
        result["seconds"] = round(time.time() - t, 1)
        results[task] = result
        if out:
            atomic_write(out / rows_file(task), "".join(json.dumps(r) + "\n" for r in rows).encode())
        if on_task:
            on_task(task, result)
    return results


def rows_file(task: str) -> str:
    """The per-example file of a task: `ARC-Easy.jsonl`, `ARC-Easy.ll.jsonl`."""
    return task.replace(LL, ".ll") + ".jsonl"


HEAD = f"{'task':<18}{'metric':>7}{'value':>9}{'95% CI':>16}{'acc_norm':>10}{'majority':>10}{'H(pred)':>12}{'n':>7}"


def _prior(r: dict) -> str:
    """Majority-label baseline and predicted-label entropy (bits, of the maximum) when known."""
    if "majority_baseline" not in r:
        return f"{'':>10}{'':>12}"
    return f"{100 * r['majority_baseline']:>9.1f}%{r['pred_entropy']:>7.2f}/{r['entropy_max']:<4.2f}"


def format_row(task: str, r: dict) -> str:
    if r["metric"] == "perplexity":
        return f"{task:<18}{'ppl':>7}{r['perplexity']:>9.2f}{'':>16}{'':>10}{'':>10}{'':>12}{r['tokens']:>7} tokens"
    lo, hi = r["ci95"]
    norm = f"{100 * r['acc_norm']:>9.1f}%" if "acc_norm" in r else f"{'':>10}"
    return (
        f"{task:<18}{'acc':>7}{100 * r['accuracy']:>8.1f}%  [{100 * lo:5.1f}, {100 * hi:5.1f}]"
        f"{norm}{_prior(r)}{r['n']:>7}"
    )


def table(results: dict[str, dict]) -> str:
    """One row per task; `majority` is the accuracy of always answering the commonest gold label,
    `H(pred)` the entropy of the model's predicted labels (bits / the maximum): near 0, the model
    answers (almost) one label whatever the question."""
    lines = [HEAD] + [format_row(t, r) for t, r in results.items()]
    accs = [r["accuracy"] for r in results.values() if r["metric"] == "accuracy"]
    if len(accs) > 1:
        lines.append(f"{'mean (acc)':<18}{'acc':>7}{100 * sum(accs) / len(accs):>8.1f}%")
    return "\n".join(lines)


def compare(a: dict, b: dict, names: tuple[str, str]) -> str:
    """Side-by-side table of two results.json files: accuracy (B - A), and for each file acc_norm
    and the predicted-label entropy where the task has them, with the majority baseline."""
    ra, rb = a["results"], b["results"]
    na, nb = names[0][-16:], names[1][-16:]
    lines = [
        f"{'task':<18}{na:>17}{nb:>17}{'B - A':>8}{'norm A':>9}{'norm B':>9}{'H(pred) A':>11}{'H(pred) B':>11}"
        f"{'majority':>10}"
    ]
    for task in [t for t in ra if t in rb]:
        x, y = ra[task], rb[task]
        if x["metric"] == "perplexity":
            lines.append(
                f"{task:<18}{x['perplexity']:>17.2f}{y['perplexity']:>17.2f}{y['perplexity'] - x['perplexity']:>+8.2f}"
            )
            continue
        d = 100 * (y["accuracy"] - x["accuracy"])
        cells = [f"{task:<18}{100 * x['accuracy']:>16.1f}%{100 * y['accuracy']:>16.1f}%{d:>+8.1f}"]
        cells += [f"{100 * r['acc_norm']:>8.1f}%" if "acc_norm" in r else f"{'–':>9}" for r in (x, y)]
        cells += [f"{r['pred_entropy']:>11.2f}" if "pred_entropy" in r else f"{'–':>11}" for r in (x, y)]
        maj = y.get("majority_baseline", x.get("majority_baseline"))
        cells.append(f"{100 * maj:>9.1f}%" if maj is not None else f"{'–':>10}")
        lines.append("".join(cells))
    only = sorted(set(ra) ^ set(rb))
    if only:
        lines.append(f"(in one file only: {', '.join(only)})")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = {t: r for t, r in results.items() if r["metric"] == "accuracy"}
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(acc) + 2), 3.6), dpi=110)
    names = list(acc)
    vals = [100 * acc[t]["accuracy"] for t in names]
    err = [
        [v - 100 * acc[t]["ci95"][0] for t, v in zip(names, vals, strict=True)],
        [100 * acc[t]["ci95"][1] - v for t, v in zip(names, vals, strict=True)],
    ]
    ax.bar(names, vals, yerr=err, capsize=3, color="C0")
    ax.set_ylabel("accuracy (%), 95% CI")
    ppl = {t: r for t, r in results.items() if r["metric"] == "perplexity"}
    ax.set_title(title + "".join(f"  |  {t} ppl {r['perplexity']:.1f}" for t, r in ppl.items()), fontsize=9)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
