"""The generalization study: does S²FT learn the task as well as LoRA/DoRA and forget less than
LoRA, DoRA and full fine-tuning? (SPEC §6, rebuttal Table R1.) Version 2: log-likelihood
in-domain accuracy, learning rates chosen by validation accuracy, several seeds, two models.

For one model (`--model smollm2` or `gemma3-270m`, both from PyPI wheels), S²FT, LoRA and DoRA
(the same trainable-parameter count, `--match-params`) and full fine-tuning train on the same
seeded subset of the BoolQ/ARC-e/ARC-c/OBQA training files (the paper's label-format responses,
Alpaca prompt), with the same batch, steps, schedule and seeds. Then every model is evaluated on
the same seeded questions:
- in-domain (BoolQ, ARC-e, ARC-c, OBQA): log-likelihood accuracy (`X:ll`: lm-evaluation-
  harness's zero-shot prompts, the main column) and the generation protocol (second column);
- unseen tasks (PIQA, SIQA, WinoGrande): log-likelihood accuracy;
- far out-of-domain: WikiText-2 perplexity, HellaSwag log-likelihood (sentence completion, a
  language-modelling probe), MMLU zero-shot (marked where it is at chance).
Every accuracy comes with the majority-label baseline and the entropy of the predicted labels.

Stages, in this order so that a partial run already compares every method on one seed:
1. sweep: each method × the learning rates of `SWEEP`, seed 0, `--sweep-steps` on the first
   `--sweep-samples` records; the rate with the best validation accuracy (log-likelihood on
   `--val-per-task` held-out training questions of each in-domain task) is chosen per method.
   Rates go up the grid and stop at the first one whose accuracy falls below the one before;
2. for each seed: every method trains `--steps` at its chosen rate and is evaluated (the base
   model once, before).
Intervals of differences are a paired bootstrap over both seeds and questions.

Every step is an `s2ft train` or `s2ft eval` subprocess writing into `--out`; a finished step
is skipped on rerun, so the study resumes where it stopped (the settings are kept in
`settings.json`; resuming with other ones is refused). `--report-only` writes the report from
the finished steps without running more (seeds count once every method has them).

    python bench/generalization.py --model smollm2 --data-dir ../shared/data      # about 3 h on 2 cores
    python bench/generalization.py --model gemma3-270m --data-dir ../shared/data \
        --train-samples 240 --steps 20 --sweep-samples 80 --sweep-steps 10 --val-per-task 30 \
        --eval-limit 40 --ppl-tokens 10000 --no-generation                         # about 2 h
    python bench/generalization.py --model smollm2 --report-only                 # report what is done
    python bench/generalization.py --model smollm2 --state bench/results/generalization/smollm2/state.tar.gz
    python bench/generalization.py --smoke                                        # tiny model and data (CI)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

IN_DOMAIN = ["boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"]
UNSEEN = ["piqa", "social_i_qa", "winogrande"]
METHODS = ["s2ft", "lora", "dora", "full"]
NAMES = {"base": "base", "s2ft": "S²FT", "lora": "LoRA", "dora": "DoRA", "full": "full FT"}
SWEEP = {"s2ft": [5e-4, 1e-3, 2e-3], "lora": [5e-4, 1e-3, 2e-3], "dora": [5e-4, 1e-3, 2e-3], "full": [2e-5, 5e-5, 1e-4]}
LL = ":ll"


def task_lists(smoke: bool) -> tuple[list[str], list[str]]:
    """The in-domain and unseen tasks of a study (the smoke mode's tiny data has fewer)."""
    return (["ARC-Easy", "openbookqa"], ["piqa"]) if smoke else (IN_DOMAIN, UNSEEN)


def groups(in_domain: list[str], unseen: list[str], generation: bool = True) -> dict[str, list[str]]:
    """Report groups -> their evaluation tasks (accuracy tasks first; `wikitext2` is perplexity)."""
    out = {
        "in-domain (log-likelihood)": [t + LL for t in in_domain],
        "in-domain (generation)": list(in_domain),
        "unseen tasks (log-likelihood)": [t + LL for t in unseen],
        "far OOD": ["hellaswag" + LL, "mmlu", "wikitext2"],
    }
    if not generation:
        del out["in-domain (generation)"]
    return out


# the options that change a result: a run resumed with other values would mix two studies
RESULT_SETTINGS = (
    "data_dir", "model", "train_samples", "sweep_samples", "val_per_task", "steps", "sweep_steps", "batch_size",
    "eval_limit", "ppl_tokens", "ffn_ratio", "seeds", "smoke", "generation",
)  # fmt: skip
ADDED_SETTINGS = {"generation": True}  # settings added after a study began: what older runs did


def check_settings(out: Path, args: argparse.Namespace) -> None:
    """Record the study's settings in OUT/settings.json; refuse to resume with different ones."""
    mine = {k: getattr(args, k) for k in RESULT_SETTINGS}
    mine["data_dir"] = str(Path(mine["data_dir"]).resolve())
    path = out / "settings.json"
    if path.is_file():
        theirs = {**ADDED_SETTINGS, **json.loads(path.read_text())}
        if diff := [
            f"--{k.replace('_', '-')} {theirs.get(k)} (now {v})" for k, v in mine.items() if theirs.get(k) != v
        ]:
            sys.exit(
                f"{out} holds a study run with other settings: {', '.join(diff)}. "
                "Use another --out, or delete that directory to start over."
            )
    elif any((out / d).is_dir() for d in ("sweep", "train", "eval")):
        sys.exit(f"{out} holds runs without a settings.json (an older study?); use another --out or delete it")
    else:
        write_json(path, mine)


def sh(cmd: list[str], log: Path, step: str) -> None:
    """Run one study step (a subprocess logging to `log`); record its wall time in timings.json."""
    print(f"[{step}] $", " ".join(cmd), flush=True)
    t = time.time()
    with log.open("a") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"step {step} failed ({proc.returncode}); see {log}")
    seconds = time.time() - t
    timings_file = log.parent / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    write_json(timings_file, {**timings, step: round(seconds, 1)})
    print(f"  done in {seconds:.0f}s", flush=True)


def stage_minutes(timings: dict[str, float]) -> dict[str, float]:
    """Wall minutes per stage (steps are named sweep/…, valacc/…, train/…, eval/…) and in total.
    Steps of other scripts run in the study's directory (bench/frontier.py's) are not the study's."""
    minutes = {stage: 0.0 for stage in ("sweep", "valacc", "train", "eval")}
    for step, seconds in timings.items():
        if (stage := step.split("/")[0]) in minutes:
            minutes[stage] += seconds / 60
    minutes["total"] = sum(minutes.values())
    return {k: round(v, 1) for k, v in minutes.items()}


def write_json(path: Path, obj: dict) -> None:
    from s2ft.adapter_io import atomic_write

    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "s2ft.cli", *args]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def split_data(data_dir: Path, out: Path, args: argparse.Namespace, in_domain: list[str]) -> None:
    """Held-out validation questions per in-domain task (`valdata/`, laid out like data_dir) and
    a seeded training subset of the rest (`train.jsonl`, its prefix `sweep.jsonl`)."""
    rng = random.Random(0)  # the data split does not change with the training seed
    pool, val = [], []
    for task in in_domain:
        records = json.loads((data_dir / "train" / f"{task}_train.json").read_text())
        order = rng.sample(range(len(records)), len(records))
        held = [records[i] for i in order[: args.val_per_task]]
        val += held
        pool += [records[i] for i in order[args.val_per_task :]]
        d = out / "valdata" / "test" / "commonsense" / task
        d.mkdir(parents=True, exist_ok=True)
        (d / "test.json").write_text(json.dumps(held))
    train = [pool[i] for i in rng.sample(range(len(pool)), min(args.train_samples, len(pool)))]
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "sweep.jsonl", train[: args.sweep_samples])
    write_jsonl(out / "val.jsonl", val)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m, or any s2ft --model")
    ap.add_argument("--out", help="working directory (default: ~/.cache/s2ft/generalization-v2/<model>)")
    ap.add_argument("--train-samples", type=int, default=480)
    ap.add_argument("--sweep-samples", type=int, default=160)
    ap.add_argument("--val-per-task", type=int, default=50, help="held-out training questions per in-domain task")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--sweep-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=100, help="questions per task (every task, MMLU included)")
    ap.add_argument("--ppl-tokens", type=int, default=20000)
    ap.add_argument("--ffn-ratio", type=float, default=0.03)
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (comma-separated)")
    ap.add_argument("--report-only", action="store_true", help="write the report from the finished steps")
    ap.add_argument(
        "--state",
        help="a .tar.gz of the finished steps' small outputs (JSON, JSONL, YAML: no weights), to carry a study "
        "to another machine: restored into an empty --out before running, rewritten after the report",
    )
    ap.add_argument(
        "--no-generation",
        dest="generation",
        action="store_false",
        help="evaluate in-domain tasks by log-likelihood only, without the generation protocol's column "
        "(about a third of each evaluation's time)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny model and data, a few steps (CI)")
    args = ap.parse_args()
    out = Path(args.out or f"~/.cache/s2ft/generalization-v2/{args.model}").expanduser()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "steps.log"
    if args.state and Path(args.state).is_file() and not (out / "settings.json").is_file():
        restore_state(Path(args.state), out)
    in_domain, unseen = task_lists(args.smoke)
    if args.smoke:
        args.model, args.data_dir = smoke_setup(out)
        args.train_samples, args.sweep_samples, args.val_per_task, args.steps, args.sweep_steps = 16, 8, 3, 3, 2
        args.batch_size, args.eval_limit, args.ppl_tokens, args.ffn_ratio, args.seeds = 2, 4, 200, 0.25, "0,1"
        SWEEP.update({m: SWEEP[m][:2] for m in SWEEP})
    seeds = [int(s) for s in args.seeds.split(",")]
    check_settings(out, args)
    data_dir = Path(args.data_dir)
    tasks = [t for g in groups(in_domain, unseen, args.generation).values() for t in g]
    if not args.report_only:
        run(out, log, args, data_dir, in_domain, seeds, tasks)
    report(out, args, in_domain, unseen, seeds)
    if args.state:
        save_state(out, Path(args.state))


STATE_SUFFIXES = (".json", ".jsonl", ".yaml")
STATE_SKIP = ("adapter", "checkpoints", "model", "tiny-model", "tiny-data")


def save_state(out: Path, dest: Path) -> None:
    """The finished steps' small outputs (what resuming and the report read) as one .tar.gz."""
    import tarfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for f in sorted(out.rglob("*")):
            rel = f.relative_to(out)
            if f.is_file() and f.suffix in STATE_SUFFIXES and not set(rel.parts[:-1]) & set(STATE_SKIP):
                tar.add(f, arcname=str(rel))
    tmp.replace(dest)
    print(f"wrote the study's state to {dest} ({dest.stat().st_size / 1e6:.1f} MB)")


def restore_state(src: Path, out: Path) -> None:
    import tarfile

    with tarfile.open(src) as tar:
        tar.extractall(out, filter="data")  # relative regular files only
    print(f"restored the study's state from {src} into {out}")


def common_flags(out: Path, args) -> list[str]:
    """The `s2ft train` flags every run of the study shares (model, data format, batch, schedule)."""
    flags = ["--model", args.model, "--template", "alpaca", "--max-length", "256", "--batch-size", str(args.batch_size)]
    flags += ["--lr-scheduler", "linear", "--val-data", str(out / "val.jsonl"), "--ffn-ratio", str(args.ffn_ratio)]
    return flags + ["--lora-modules", "q,k,v,up,down", "--logging-steps", "5"]


def method_flags(m: str) -> list[str]:
    return ["--method", m] + (["--match-params"] if m in ("lora", "dora") else [])


def train_run(
    out: Path, log: Path, args, name: str, run_dir: Path, m: str, lr: float, seed: int, data: str, steps: int
):
    """One `s2ft train` run of method `m` at rate `lr` on OUT/`data` (skipped when finished)."""
    if (run_dir / "summary.json").is_file():
        return
    # validation loss before and after only (it is reported, not used to choose); a sweep run is
    # short enough to rerun, a final one saves a checkpoint every third of the way to resume from
    save = steps if data == "sweep.jsonl" else max(1, steps // 3)
    flags = ["--data", str(out / data), "--output-dir", str(run_dir), "--max-steps", str(steps)]
    flags += ["--warmup-steps", str(max(1, steps // 10)), "--save-steps", str(save), "--eval-steps", str(steps)]
    flags += ["--seed", str(seed), "--learning-rate", str(lr)]
    flags += [resume_flag(run_dir)]
    sh(cli("train", *common_flags(out, args), *method_flags(m), *flags), log, name)


def eval_run(log: Path, args, name: str, run_dir, method, task_list: list[str], data: Path, dest: Path) -> None:
    """One `s2ft eval` of the base model (`method` None) or of a trained run (skipped when finished)."""
    flags = ["--model", str(run_dir / "model") if method == "full" else args.model]
    if method in ("s2ft", "lora", "dora"):
        flags += ["--adapter", str(run_dir / "adapter")]
    flags += ["--tasks", ",".join(task_list), "--data-dir", str(data), "--limit", str(args.eval_limit)]
    flags += ["--seed", "0", "--mmlu-subjects", "57", "--ppl-tokens", str(args.ppl_tokens)]
    flags += ["--output-dir", str(dest)]
    if not eval_finished(dest, task_list):
        sh(cli("eval", *flags), log, name)


def eval_finished(dest: Path, tasks: list[str]) -> bool:
    """Whether the evaluation in `dest` has every task (a killed or failed one can leave some)."""
    res = dest / "results.json"
    return res.is_file() and set(tasks) <= set(json.loads(res.read_text())["results"])


def run(out, log, args, data_dir, in_domain, seeds, tasks) -> None:
    split_data(data_dir, out, args, in_domain)

    def train(name: str, run_dir: Path, m: str, lr: float, seed: int, data: str, steps: int) -> None:
        train_run(out, log, args, name, run_dir, m, lr, seed, data, steps)

    def evaluate(name: str, run_dir: Path | None, method: str | None, task_list: list[str], data: Path, dest: Path):
        eval_run(log, args, name, run_dir, method, task_list, data, dest)

    # 1. sweep: seed 0, short runs; validation accuracy by log-likelihood on held-out questions
    val_tasks = [t + LL for t in in_domain]
    evaluate("valacc/base", None, None, val_tasks, out / "valdata", out / "sweep" / "base-val")
    for m in METHODS:

        def sweep_point(lr: float, m: str = m) -> float:
            run_dir = out / "sweep" / f"{m}-lr{lr:g}"
            train(f"sweep/{m}-lr{lr:g}", run_dir, m, lr, 0, "sweep.jsonl", args.sweep_steps)
            evaluate(f"valacc/{m}-lr{lr:g}", run_dir, m, val_tasks, out / "valdata", run_dir / "val")
            return sweep_table(out)[m][f"{lr:g}"]["val_acc"]

        climb(SWEEP[m], sweep_point)
    best = chosen_rates(out)
    print("learning rates chosen by validation accuracy:", best, flush=True)

    # 2. per seed: every method at its rate, then evaluated (the base model once, first)
    evaluate("eval/base", None, None, tasks, data_dir, out / "eval" / "base")
    for seed in seeds:
        for m in METHODS:
            run_dir = out / "train" / f"{m}-s{seed}"
            weights = run_dir / ("model" if m == "full" else "adapter")
            done = (out / "eval" / f"{m}-s{seed}" / "results.json").is_file()
            if not done and not weights.is_dir():  # restored from --state without its weights: train again
                (run_dir / "summary.json").unlink(missing_ok=True)
            train(f"train/{m}-s{seed}", run_dir, m, best[m], seed, "train.jsonl", args.steps)
            evaluate(f"eval/{m}-s{seed}", run_dir, m, tasks, data_dir, out / "eval" / f"{m}-s{seed}")
            if m == "full":  # keep the evaluation, drop the 0.5-1 GB model copy
                import shutil

                shutil.rmtree(run_dir / "model", ignore_errors=True)
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def climb(rates: list[float], accuracy) -> list[float]:
    """Run `accuracy(rate)` up the ascending `rates`, stopping after the first rate whose accuracy
    is below the one before (validation accuracy is taken as unimodal in the rate); the rates run."""
    done, previous = [], None
    for lr in rates:
        acc = accuracy(lr)
        done.append(lr)
        if previous is not None and acc < previous:
            break
        previous = acc
    return done


def resume_flag(run_dir: Path) -> str:
    """`--resume` when the run has a complete checkpoint, else `--overwrite` (a run killed before
    its first checkpoint leaves an empty or partial checkpoints/ that `--resume` refuses)."""
    from s2ft.train import last_complete_checkpoint

    return "--resume" if last_complete_checkpoint(run_dir / "checkpoints") else "--overwrite"


def sweep_table(out: Path) -> dict[str, dict[str, dict]]:
    """method -> rate -> {val_acc (mean over in-domain tasks, log-likelihood), val_loss}."""
    table: dict[str, dict[str, dict]] = {}
    for m in METHODS:
        for lr in SWEEP[m]:
            d = out / "sweep" / f"{m}-lr{lr:g}"
            res, summ = d / "val" / "results.json", d / "summary.json"
            if not (res.is_file() and summ.is_file()):
                continue
            accs = [r["accuracy"] for r in json.loads(res.read_text())["results"].values()]
            table.setdefault(m, {})[f"{lr:g}"] = {
                "val_acc": sum(accs) / len(accs),
                "val_loss": json.loads(summ.read_text()).get("val_loss_after"),
            }
    return table


def base_val_acc(out: Path) -> float | None:
    """The base model's validation accuracy (the sweep's reference), when evaluated."""
    res = out / "sweep" / "base-val" / "results.json"
    if not res.is_file():
        return None
    accs = [r["accuracy"] for r in json.loads(res.read_text())["results"].values()]
    return sum(accs) / len(accs)


def chosen_rates(out: Path) -> dict[str, float]:
    """Per method, the rate with the highest validation accuracy (ties: the lower validation loss)."""
    table = sweep_table(out)
    return {
        m: float(max(v, key=lambda lr: (round(v[lr]["val_acc"], 6), -(v[lr]["val_loss"] or 0.0))))
        for m, v in table.items()
    }


# ---------------------------------------------------------------------------------------------
# Report


def load_eval(out: Path, name: str) -> dict | None:
    res = out / "eval" / name / "results.json"
    return json.loads(res.read_text())["results"] if res.is_file() else None


def per_example(eval_dir: Path, task: str) -> list[float]:
    """Per-question correctness in points (0 or 100) of an accuracy task, or per-window NLL of a
    perplexity one, of the model evaluated into `eval_dir`."""
    from s2ft.evaluation import rows_file

    rows = [json.loads(x) for x in (eval_dir / rows_file(task)).read_text().splitlines()]
    return [float(r["nll"]) for r in rows] if task == "wikitext2" else [100.0 * r["correct"] for r in rows]


def bootstrap_delta(a: list, b: list, rounds: int = 2000, seed: int = 0) -> dict:
    """Mean over seeds and tasks of metric(a) - metric(b), with a 95% interval from a paired
    bootstrap over both: each round resamples the seed pairs and, per task, the questions.

    `a`, `b`: per seed, per task, the per-question values (numpy-able); seeds are paired by
    index (method a and method b trained with the same seed); a model without seeds (the base)
    is given as one entry and is paired with every seed of the other."""
    import numpy as np

    rng = np.random.default_rng(seed)
    S = max(len(a), len(b))
    A = [a[min(i, len(a) - 1)] for i in range(S)]
    B = [b[min(i, len(b) - 1)] for i in range(S)]
    T = len(A[0])
    diffs = [[np.asarray(A[s][t]) - np.asarray(B[s][t]) for t in range(T)] for s in range(S)]  # S x T x (n_t,)
    point = float(np.mean([np.mean([d.mean() for d in diffs[s]]) for s in range(S)]))
    stats = np.zeros(rounds)
    for k in range(rounds):
        ss = rng.integers(0, S, size=S)
        per_task = []
        for t in range(T):
            n = len(diffs[0][t])
            q = rng.integers(0, n, size=n)
            per_task.append(np.mean([diffs[s][t][q].mean() for s in ss]))
        stats[k] = np.mean(per_task)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"delta": point, "ci95": [float(lo), float(hi)], "seeds": S, "tasks": T}


def verdict(ci: list[float], better_is_lower: bool = False) -> str:
    """Whether a claim "S²FT is better" held, from the 95% interval of S²FT's difference."""
    lo, hi = (-ci[1], -ci[0]) if better_is_lower else ci
    if lo > 0:
        return "held: the interval excludes 0, in S²FT's favour"
    if hi < 0:
        return "did not hold: the interval excludes 0, against S²FT"
    return "not shown: the interval covers 0"


def report(out: Path, args, in_domain: list[str], unseen: list[str], seeds: list[int]) -> None:
    grp = groups(in_domain, unseen, getattr(args, "generation", True))
    base = load_eval(out, "base")
    done = [s for s in seeds if all(load_eval(out, f"{m}-s{s}") for m in METHODS)]
    if base is None or not done:
        sys.exit(f"{out}: nothing to report yet (the base evaluation and one seed of every method are needed)")
    names = {"base": ["base"], **{m: [f"{m}-s{s}" for s in done] for m in METHODS}}
    evals = {n: load_eval(out, n) for ns in names.values() for n in ns}
    models = list(names)

    def mean_over(m: str, task: str, key: str) -> float | None:
        vals = [evals[n][task].get(key) for n in names[m]]
        return None if any(v is None for v in vals) else sum(vals) / len(vals)

    rows = []
    for g, tasks in grp.items():
        for t in tasks:
            r0 = base[t]
            row = {"group": g, "task": t, "metric": r0["metric"], "n": r0.get("n")}
            if r0["metric"] == "perplexity":
                row.update({m: mean_over(m, t, "perplexity") for m in models})
            else:
                row["majority"] = r0.get("majority_baseline")
                for m in models:
                    row[m] = mean_over(m, t, "accuracy")
                    row[m + "_norm"] = mean_over(m, t, "acc_norm")
                    row[m + "_H"] = mean_over(m, t, "pred_entropy")
                row["entropy_max"] = r0.get("entropy_max")
            rows.append(row)

    def values(m: str, tasks: list[str]) -> list:
        return [[per_example(out / "eval" / n, t) for t in tasks] for n in names[m]]

    acc_groups = {g: [t for t in ts if base[t]["metric"] == "accuracy"] for g, ts in grp.items()}
    acc_groups = {g: ts for g, ts in acc_groups.items() if ts}
    means = {
        g: {m: sum(mean_over(m, t, "accuracy") for t in ts) / len(ts) for m in models} for g, ts in acc_groups.items()
    }
    pairs = [("s2ft", "lora"), ("s2ft", "dora"), ("s2ft", "full")] + [(m, "base") for m in METHODS]
    deltas = {
        g: {f"{a}-{b}": bootstrap_delta(values(a, ts), values(b, ts)) for a, b in pairs} for g, ts in acc_groups.items()
    }
    ci_means = {}  # an interval around each group mean: its difference from a model scoring 0
    for g, ts in acc_groups.items():
        zero = [[[0.0] * len(q) for q in values("base", ts)[0]]]
        ci_means[g] = {m: bootstrap_delta(values(m, ts), zero) for m in models}
    ppl = {f"{a}-{b}": bootstrap_delta(values(a, ["wikitext2"]), values(b, ["wikitext2"])) for a, b in pairs}

    from s2ft.evaluation import wilson

    n_mmlu = base["mmlu"]["n"]  # at chance: inside the 95% interval of a 25% score on these questions
    lo, hi = wilson(round(0.25 * n_mmlu), n_mmlu)
    mmlu_at_chance = {m: lo <= mean_over(m, "mmlu", "accuracy") <= hi for m in models}
    claims = []
    for label, g, a, b in [
        ("S²FT learns the trained tasks better than LoRA", "in-domain (log-likelihood)", "s2ft", "lora"),
        ("S²FT learns the trained tasks better than DoRA", "in-domain (log-likelihood)", "s2ft", "dora"),
        ("S²FT transfers to unseen tasks better than LoRA", "unseen tasks (log-likelihood)", "s2ft", "lora"),
        ("S²FT transfers to unseen tasks better than full FT", "unseen tasks (log-likelihood)", "s2ft", "full"),
        ("S²FT forgets less than LoRA (far OOD accuracy)", "far OOD", "s2ft", "lora"),
        ("S²FT forgets less than full FT (far OOD accuracy)", "far OOD", "s2ft", "full"),
    ]:
        d = deltas[g][f"{a}-{b}"]
        claims.append(
            {"claim": label, "group": g, "delta": d["delta"], "ci95": d["ci95"], "verdict": verdict(d["ci95"])}
        )
    for b in ("lora", "full"):
        d = ppl[f"s2ft-{b}"]
        claims.append(
            {
                "claim": f"S²FT forgets less than {NAMES[b]} (WikiText-2 NLL per token)",
                "group": "far OOD",
                "delta": d["delta"],
                "ci95": d["ci95"],
                "verdict": verdict(d["ci95"], better_is_lower=True),
            }
        )

    timings_file = out / "timings.json"
    minutes = stage_minutes(json.loads(timings_file.read_text())) if timings_file.is_file() else None
    summaries = {m: [json.loads((out / "train" / n / "summary.json").read_text()) for n in names[m]] for m in METHODS}
    result = {
        "model": args.model,
        "settings": {k: getattr(args, k) for k in RESULT_SETTINGS},
        "seeds_done": done,
        "seeds_planned": seeds,
        "wall_minutes": minutes,
        "sweep": sweep_table(out),
        "sweep_base_val_acc": base_val_acc(out),
        "chosen_lr": chosen_rates(out),
        "training": {
            m: {
                "trainable_parameters": summaries[m][0].get("trainable_parameters"),
                "train_seconds_mean": sum(s.get("train_seconds", 0) for s in summaries[m]) / len(summaries[m]),
                "val_loss_after": [s.get("val_loss_after") for s in summaries[m]],
            }
            for m in METHODS
        },
        "rows": rows,
        "group_means": means,
        "group_mean_ci95": {g: {m: v["ci95"] for m, v in d.items()} for g, d in ci_means.items()},
        "paired_deltas": deltas,
        "wikitext2_nll_deltas": ppl,
        "mmlu_at_chance": mmlu_at_chance,
        "claims": claims,
    }
    write_json(out / "study.json", result)
    (out / "study.md").write_text(markdown(result, models) + "\n")
    print(markdown(result, models))
    plot(result, models, out / "study.png")
    print(f"\nwrote {out / 'study.json'}, {out / 'study.md'}, {out / 'study.png'}")


def markdown(r: dict, models: list[str]) -> str:
    done, planned = r["seeds_done"], r["seeds_planned"]
    lines = [
        f"Model `{r['model']}`; seeds done: {', '.join(map(str, done))} of {', '.join(map(str, planned))}. "
        "Accuracy in % (mean over seeds) with, in parentheses, the entropy of the predicted labels in bits "
        "(near 0: one label for every question); `majority` is the accuracy of always answering the commonest "
        "label. `:ll` = log-likelihood (lm-eval's prompts, acc); no suffix = the generation protocol.",
        "",
        "| group | task | majority | " + " | ".join(NAMES[m] for m in models) + " |",
        "|---|---|---|" + "---|" * len(models),
    ]
    for row in r["rows"]:
        if row["metric"] == "perplexity":
            cells = [f"{row[m]:.2f}" for m in models]
            lines.append(f"| {row['group']} | {row['task']} (ppl) | – | " + " | ".join(cells) + " |")
            continue
        cells = [
            f"{100 * row[m]:.1f} ({row[m + '_H']:.2f})" if row.get(m + "_H") is not None else f"{100 * row[m]:.1f}"
            for m in models
        ]
        maj = f"{100 * row['majority']:.1f}" if row.get("majority") is not None else "–"
        task = row["task"] + (" *(at chance)*" if row["task"] == "mmlu" and all(r["mmlu_at_chance"].values()) else "")
        lines.append(f"| {row['group']} | {task} | {maj} | " + " | ".join(cells) + " |")
    lines += ["", "Group means (accuracy, %) with a 95% bootstrap interval over seeds and questions", ""]
    lines += ["| group | " + " | ".join(NAMES[m] for m in models) + " |", "|---|" + "---|" * len(models)]
    for g, means in r["group_means"].items():
        ci = r["group_mean_ci95"][g]
        lines.append(
            f"| {g} | " + " | ".join(f"{100 * means[m]:.1f} [{ci[m][0]:.1f}, {ci[m][1]:.1f}]" for m in models) + " |"
        )
    pairs = list(next(iter(r["paired_deltas"].values())))
    lines += [
        "",
        "Paired differences of the group means, in points, 95% bootstrap interval over seeds and questions",
        "",
    ]
    lines += ["| group | " + " | ".join(p.replace("-", " − ") for p in pairs) + " |", "|---|" + "---|" * len(pairs)]
    for g, d in r["paired_deltas"].items():
        lines.append(
            f"| {g} | "
            + " | ".join(f"{d[p]['delta']:+.1f} [{d[p]['ci95'][0]:+.1f}, {d[p]['ci95'][1]:+.1f}]" for p in pairs)
            + " |"
        )
    w = r["wikitext2_nll_deltas"]
    lines.append(
        "| WikiText-2 NLL/token (lower = less forgetting) | "
        + " | ".join(f"{w[p]['delta']:+.3f} [{w[p]['ci95'][0]:+.3f}, {w[p]['ci95'][1]:+.3f}]" for p in pairs)
        + " |"
    )
    lines += [
        "",
        "The paper's claims on this model",
        "",
        "| claim | difference | 95% interval | verdict |",
        "|---|---|---|---|",
    ]
    for c in r["claims"]:
        unit = "" if "NLL" in c["claim"] else " pts"
        fmt = "{:+.3f}" if "NLL" in c["claim"] else "{:+.1f}"
        lo, hi = (fmt.format(x) for x in c["ci95"])
        lines.append(f"| {c['claim']} | {fmt.format(c['delta'])}{unit} | [{lo}, {hi}] | {c['verdict']} |")
    lines += [
        "",
        "Learning-rate sweep: validation accuracy (log-likelihood on held-out in-domain training questions) "
        "and validation loss; the chosen rate in bold",
        "",
    ]
    width = max((max(len(v), len(SWEEP.get(m, []))) for m, v in r["sweep"].items()), default=1)
    lines += ["| method | " + " | ".join(["rate → val acc (val loss)"] * width) + " |", "|---|" + "---|" * width]
    if r.get("sweep_base_val_acc") is not None:
        lines.append(f"| base (no training) | {100 * r['sweep_base_val_acc']:.1f}% |" + " |" * (width - 1))
    for m, rates in r["sweep"].items():
        cells = []
        for lr, v in rates.items():
            loss = f"{v['val_loss']:.4f}" if v["val_loss"] is not None else "–"
            cell = f"{lr} → {100 * v['val_acc']:.1f}% ({loss})"
            cells.append(f"**{cell}**" if float(lr) == r["chosen_lr"].get(m) else cell)
        cells += [""] * (width - len(cells))  # a grid the sweep stopped climbing
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    edge = [
        f"{m} ({r['chosen_lr'][m]:g})"
        for m, rates in r["sweep"].items()
        if len(rates) > 1 and r["chosen_lr"].get(m) in (min(map(float, rates)), max(map(float, rates)))
    ]
    if edge:
        lines += ["", f"Chosen at the edge of its grid: {', '.join(edge)}; the best rate may lie outside the grid."]
    if skipped := [f"{m} ({', '.join(f'{lr:g}' for lr in SWEEP[m] if f'{lr:g}' not in r['sweep'].get(m, {}))})"
                   for m in r["sweep"] if len(r["sweep"][m]) < len(SWEEP[m])]:  # fmt: skip
        lines += [
            "",
            f"Not run: {', '.join(skipped)}. The sweep goes up the grid and stops at the first rate whose "
            "validation accuracy is below the one before.",
        ]
    lines += ["", "| method | trainable parameters | train time per run (s) |", "|---|---|---|"]
    for m, t in r["training"].items():
        lines.append(f"| {NAMES[m]} | {t['trainable_parameters']:,} | {t['train_seconds_mean']:.0f} |")
    if r["wall_minutes"]:
        mins = r["wall_minutes"]
        lines += [
            "",
            f"Wall time of the steps: sweep {mins['sweep']:.0f} min + its validation {mins['valacc']:.0f} min, "
            f"training {mins['train']:.0f} min, evaluation {mins['eval']:.0f} min; {mins['total']:.0f} min in all.",
        ]
    return "\n".join(lines)


def plot(r: dict, models: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.8), dpi=110)
    gs = list(r["group_means"])
    width = 0.8 / len(models)
    for k, m in enumerate(models):
        ys = [100 * r["group_means"][g][m] for g in gs]
        ci = [r["group_mean_ci95"][g][m] for g in gs]
        err = [[y - c[0] for y, c in zip(ys, ci, strict=True)], [c[1] - y for y, c in zip(ys, ci, strict=True)]]
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(gs))]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=NAMES[m])
    ax.set_xticks(range(len(gs)), [g.replace(" (", "\n(") for g in gs], fontsize=8)
    ax.set_ylabel("mean accuracy (%), 95% CI")
    ax.set_title(
        f"{r['model']}: learning (in-domain) and forgetting (unseen, far OOD); seeds {r['seeds_done']}", fontsize=9
    )
    ax.legend(fontsize=7, ncol=len(models))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def smoke_setup(out: Path) -> tuple[str, str]:
    """A tiny model and a data directory with the study's layout (CI smoke mode)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve_load import tiny_model_dir

    from s2ft.data import builtin_dataset

    model = out / "tiny-model"
    if not (model / "config.json").is_file():
        tiny_model_dir(model)
    data = out / "tiny-data"
    train, held = builtin_dataset("arc_easy")

    def as_task(records: list[dict], word: str) -> list[dict]:  # ARC's "Answer2:" -> piqa's "Solution2:"
        return [
            {
                **r,
                "instruction": r["instruction"].replace("Answer", word),
                "answer": r["answer"].replace("answer", word.lower()),
            }
            for r in records
        ]

    (data / "train").mkdir(parents=True, exist_ok=True)
    for task, word in (("ARC-Easy", "Answer"), ("openbookqa", "Answer"), ("piqa", "Solution"), ("hellaswag", "Ending")):
        (data / "test" / "commonsense" / task).mkdir(parents=True, exist_ok=True)
        (data / "test" / "commonsense" / task / "test.json").write_text(json.dumps(as_task(held[:8], word)))
        (data / "train" / f"{task}_train.json").write_text(json.dumps(as_task(train[:20], word)))
    for split in ("dev", "test"):
        d = data / "probe" / "mmlu" / split
        d.mkdir(parents=True, exist_ok=True)
        rows = ["question,choice0,choice1,choice2,choice3,answer"] + [f"q {i},a,b,c,d,{i % 4}" for i in range(4)]
        (d / f"anatomy_{split}.csv").write_text("\n".join(rows) + "\n")
    (data / "probe" / "wikitext-2").mkdir(parents=True, exist_ok=True)
    (data / "probe" / "wikitext-2" / "test.txt").write_text(" ".join(r["instruction"] for r in held[:10]))
    return str(model), str(data)


if __name__ == "__main__":
    main()
