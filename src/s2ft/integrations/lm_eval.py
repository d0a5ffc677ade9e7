"""lm-evaluation-harness (0.4.x) on s2ft models and on the local LLM-Adapters test files.

There is no dataset hub offline, so the harness gets task YAMLs that read the local JSON files
(`write_tasks`): one task per commonsense set, `s2ft_<task>` (`s2ft_arc_easy`, `s2ft_piqa`, ...),
and the group `s2ft_commonsense`. Each YAML loads `test/commonsense/<task>/test.json` of a
directory laid out like `../shared/data` through `datasets`' `json` builder and turns each record
into lm-eval's multiple-choice form with the functions of `s2ft_lm_eval_utils.py` written beside
it, which call `s2ft.loglik.parse`: the same prompts and options that `s2ft eval --tasks X:ll`
scores, so the two agree to float rounding (tests/test_lm_eval.py).

    s2ft lm-eval-tasks --data-dir ../shared/data --out lm_eval_tasks      # write the YAMLs once
    lm_eval --model hf --model_args pretrained=DIR --include_path lm_eval_tasks --tasks s2ft_arc_easy

From Python, `evaluate(model, tokenizer, tasks, data_dir)` runs the harness on a model instance
(an `S2FTModel`, merged or not, or any causal LM) through lm-eval's `HFLM` wrapper; `s2ft eval
--harness TASKS` is the same from the command line. A `limit` takes the same seeded subset as
`s2ft eval --limit` (lm-eval's `samples=`), not the first N questions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from s2ft.loglik import TASKS

HARNESS_NAMES = {t: "s2ft_" + t.lower().replace("-", "_") for t in TASKS}  # ARC-Easy -> s2ft_arc_easy
GROUP = "s2ft_commonsense"
UTILS = "s2ft_lm_eval_utils.py"

_UTILS_SOURCE = '''"""Written by `s2ft lm-eval-tasks`: LLM-Adapters records -> lm-eval multiple choice (s2ft.loglik)."""

from s2ft.integrations.lm_eval import doc_to_choice, doc_to_target, doc_to_text, process_docs_for

{functions}
'''

_YAML = """# Written by `s2ft lm-eval-tasks` (s2ft.integrations.lm_eval): {task} from a local LLM-Adapters file.
task: {name}
tag: [{group}]
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
process_docs: !function s2ft_lm_eval_utils.process_{slug}
doc_to_text: !function s2ft_lm_eval_utils.doc_to_text
doc_to_target: !function s2ft_lm_eval_utils.doc_to_target
doc_to_choice: !function s2ft_lm_eval_utils.doc_to_choice
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def process_docs_for(task: str):
    """lm-eval `process_docs` for one task: each record gains `contexts`, `choices`, `target`
    and `gold` (from `s2ft.loglik.Question`); a record that does not parse is an error."""
    from s2ft.loglik import parse

    def process(dataset: Any) -> Any:
        def one(record: dict, index: int) -> dict:
            try:
                q = parse(record, task)
            except ValueError as e:
                raise ValueError(f"{task}: record {index}: {e}") from None
            # lm-eval adds the target delimiter " " before each continuation itself
            target = q.continuations[0].removeprefix(" ") if len(q.contexts) > 1 else ""
            return {"contexts": list(q.contexts), "choices": list(q.choices), "target": target, "gold": q.gold}

        return dataset.map(one, with_indices=True)

    return process


# lm-eval's two multiple-choice forms: one context and a continuation per option, or (WinoGrande)
# a context per option and one shared continuation, where doc_to_text returns the gold index.
def doc_to_text(doc: dict) -> Any:
    return doc["gold"] if len(doc["contexts"]) > 1 else doc["contexts"][0]


def doc_to_target(doc: dict) -> Any:
    return doc["target"] if len(doc["contexts"]) > 1 else doc["gold"]


def doc_to_choice(doc: dict) -> list[str]:
    return doc["choices"]


def render_tasks(paths: dict[str, str]) -> dict[str, str]:
    """File name -> text of the task YAMLs (one per `task: test.json path`) and the utils module."""
    files, functions = {}, []
    for task, path in paths.items():
        slug = HARNESS_NAMES[task][len("s2ft_") :]
        files[f"{HARNESS_NAMES[task]}.yaml"] = _YAML.format(
            task=task, name=HARNESS_NAMES[task], group=GROUP, path=json.dumps(path), slug=slug
        )
        functions.append(f"process_{slug} = process_docs_for({task!r})")
    files[UTILS] = _UTILS_SOURCE.format(functions="\n".join(functions))
    return files


def write_tasks(data_dir: str | Path, out_dir: str | Path, relative: bool = False) -> list[str]:
    """Write a task YAML for each commonsense set found under `data_dir` and the utils module
    into `out_dir`; return the task names. `relative` keeps `data_dir` as given (resolved by
    `datasets` against the working directory) instead of an absolute path."""
    from s2ft.adapter_io import atomic_write
    from s2ft.evaluation import _find

    data_dir, out = Path(data_dir), Path(out_dir)
    paths = {}
    for task in TASKS:
        try:
            path = _find(data_dir, "commonsense", task, "test.json")
        except FileNotFoundError:
            continue
        paths[task] = str(path if relative else path.resolve())
    if not paths:
        raise FileNotFoundError(f"{data_dir}: no test/commonsense/<task>/test.json (the ../shared/data layout)")
    out.mkdir(parents=True, exist_ok=True)
    for name, text in render_tasks(paths).items():
        atomic_write(out / name, text.encode())
    return [HARNESS_NAMES[t] for t in paths]


def harness_task(name: str) -> str:
    """`ARC-Easy`, `ARC-Easy:ll`, `arc_easy` or `s2ft_arc_easy` -> `s2ft_arc_easy`."""
    key = name.strip().removesuffix(":ll")
    by_lower = {k.lower(): v for k, v in HARNESS_NAMES.items()}
    by_lower.update({v: v for v in HARNESS_NAMES.values()})
    by_lower.update({v[len("s2ft_") :]: v for v in HARNESS_NAMES.values()})
    if key.lower() in ("commonsense", GROUP):
        return GROUP
    if key.lower() not in by_lower:
        raise ValueError(f"--harness: unknown task {name!r}; known: {', '.join(HARNESS_NAMES)} or commonsense")
    return by_lower[key.lower()]


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    data_dir: str | Path,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    task_dir: str | Path | None = None,
) -> dict[str, dict]:
    """Run lm-eval's `simple_evaluate` on a model instance through `HFLM`; return, per s2ft task
    name, `{acc, acc_norm, n}` and lm-eval's per-sample log-likelihoods (`samples`).

    `tasks` are s2ft or harness names (`ARC-Easy`, `s2ft_piqa`, `commonsense`). With `limit`,
    every task is evaluated on the seeded subset `s2ft eval --limit --seed` draws.
    """
    import tempfile

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from s2ft.evaluation import load_task, subset_indices

    with tempfile.TemporaryDirectory() as tmp:
        where = Path(task_dir or tmp)
        write_tasks(data_dir, where)
        wanted = [harness_task(t) for t in tasks]
        names = list(HARNESS_NAMES.values()) if GROUP in wanted else list(dict.fromkeys(wanted))
        from_name = {v: k for k, v in HARNESS_NAMES.items()}
        samples = None
        if limit is not None:  # the questions `s2ft eval --limit --seed` scores
            samples = {
                name: subset_indices(len(load_task(Path(data_dir), from_name[name])), limit, seed) for name in names
            }
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=TaskManager(include_path=str(where), include_defaults=False),
            samples=samples,
            log_samples=True,
            bootstrap_iters=0,
        )
    results = {}
    for name in names:
        r = out["results"][name]
        per = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        results[from_name[name]] = {
            "acc": r["acc,none"],
            "acc_norm": r["acc_norm,none"],
            "n": len(per),
            "loglik": [[float(x[0]) for x in s["filtered_resps"]] for s in per],
            "doc_ids": [s["doc_id"] for s in per],
        }
    return results
