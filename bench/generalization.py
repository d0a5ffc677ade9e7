"""The generalization study: does S²FT learn the task as well as LoRA and forget less than
LoRA and full fine-tuning? (SPEC §6, rebuttal Table R1.)

On SmolLM2-135M-Instruct, S²FT, LoRA (the same trainable-parameter count, `--match-params`)
and full fine-tuning train on the same subset of `train/commonsense_partial_4tasks.json`
(BoolQ, ARC-e, ARC-c, OBQA), with the same samples, seed, batch, steps and linear schedule.
The learning rate of each method is picked by validation loss from a short sweep on a smaller
subset, and the sweep is reported. The base model and every fine-tuned model are then
evaluated on:
- in-domain: the test sets of BoolQ, ARC-Easy, ARC-Challenge and OpenBookQA;
- unseen tasks: PIQA, SIQA, WinoGrande, HellaSwag;
- far out-of-domain: an MMLU subset and WikiText-2 perplexity.

Every step is a `s2ft train` or `s2ft eval` subprocess writing into `--out`. A finished step is
skipped on rerun, so the study resumes where it stopped. The summary (JSON, markdown table,
plot) is rebuilt at the end.

    python bench/generalization.py --data-dir ../shared/data          # the study (about 2 h on 2 cores)
    python bench/generalization.py --smoke                             # tiny model and data (CI)

The defaults are sized for two hours on 2 CPU cores: a sweep of 3 methods × 3 learning rates ×
25 steps on 200 samples, a final training of 3 × 120 steps × 8 sequences, and an evaluation of
4 models × 8 tasks × 100 questions plus 100 MMLU questions and 20k tokens of WikiText-2. Each
step's wall time goes to `timings.json`; the report sums them per stage (docs/RESULTS.md).
The settings are stored in `settings.json`: resuming with other settings is refused, because
finished steps are recognised by name only.
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
UNSEEN = ["piqa", "social_i_qa", "winogrande", "hellaswag"]
FAR = ["mmlu", "wikitext2"]
METHODS = ["s2ft", "lora", "full"]
SWEEP = {"s2ft": [5e-4, 1e-3, 2e-3], "lora": [5e-4, 1e-3, 2e-3], "full": [2e-5, 5e-5, 1e-4]}


# the options that change a result: a run resumed with other values would mix two studies
RESULT_SETTINGS = (
    "data_dir", "model", "train_samples", "sweep_samples", "val_samples", "steps", "sweep_steps",
    "batch_size", "eval_limit", "ppl_tokens", "ffn_ratio", "seed", "smoke",
)  # fmt: skip


def check_settings(out: Path, args: argparse.Namespace) -> None:
    """Record the study's settings in OUT/settings.json; refuse to resume with different ones."""
    mine = {k: getattr(args, k) for k in RESULT_SETTINGS}
    mine["data_dir"] = str(Path(mine["data_dir"]).resolve())
    path = out / "settings.json"
    if path.is_file():
        theirs = json.loads(path.read_text())
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
    """Wall minutes per stage (steps are named sweep/…, train/…, eval/…) and in total."""
    minutes = {stage: 0.0 for stage in ("sweep", "train", "eval")}
    for step, seconds in timings.items():
        minutes[step.split("/")[0]] += seconds / 60
    minutes["total"] = sum(minutes.values())
    return {k: round(v, 1) for k, v in minutes.items()}


def write_json(path: Path, obj: dict) -> None:
    from s2ft.adapter_io import atomic_write

    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "s2ft.cli", *args]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument(
        "--out",
        default="~/.cache/s2ft/generalization",
        help="working directory for the runs (about 1 GB: the full-FT model, adapters, evaluations)",
    )
    ap.add_argument("--train-samples", type=int, default=960)
    ap.add_argument("--sweep-samples", type=int, default=200)
    ap.add_argument("--val-samples", type=int, default=100)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--sweep-steps", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=100, help="questions per task, MMLU included")
    ap.add_argument("--ppl-tokens", type=int, default=20000)
    ap.add_argument("--ffn-ratio", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny model and data, a few steps (CI)")
    args = ap.parse_args()
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "steps.log"
    in_domain, unseen, far = IN_DOMAIN, UNSEEN, FAR
    if args.smoke:
        args.model, args.data_dir = smoke_setup(out)
        args.train_samples, args.sweep_samples, args.val_samples, args.steps, args.sweep_steps = 16, 8, 4, 3, 2
        args.batch_size, args.eval_limit, args.ppl_tokens, args.ffn_ratio = 2, 4, 200, 0.25
        in_domain, unseen = ["ARC-Easy"], ["openbookqa"]
        SWEEP.update({m: SWEEP[m][:2] for m in SWEEP})
    check_settings(out, args)
    data_dir = Path(args.data_dir)

    # 1. data: disjoint seeded subsets for training, the sweep and validation
    train_file = data_dir / "train" / "commonsense_partial_4tasks.json"
    records = json.loads(train_file.read_text())
    order = random.Random(args.seed).sample(range(len(records)), len(records))
    val = [records[i] for i in order[: args.val_samples]]
    rest = order[args.val_samples :]
    train = [records[i] for i in rest[: args.train_samples]]
    sweep = train[: args.sweep_samples]  # the sweep sees a prefix of the training subset
    for name, recs in (("train", train), ("sweep", sweep), ("val", val)):
        write_jsonl(out / f"{name}.jsonl", recs)

    common = ["--model", args.model, "--template", "alpaca", "--max-length", "256", "--seed", str(args.seed)]
    common += ["--batch-size", str(args.batch_size), "--lr-scheduler", "linear", "--val-data", str(out / "val.jsonl")]
    common += ["--ffn-ratio", str(args.ffn_ratio), "--lora-modules", "q,k,v,up,down", "--logging-steps", "5"]

    def method_flags(m: str) -> list[str]:
        return ["--method", m] + (["--match-params"] if m == "lora" else [])

    # 2. learning-rate sweep on the small subset, picked by validation loss
    sweep_result: dict[str, dict[str, float]] = {}
    for m in METHODS:
        sweep_result[m] = {}
        for lr in SWEEP[m]:
            run = out / "sweep" / f"{m}-lr{lr:g}"
            if not (run / "summary.json").is_file():
                steps = str(args.sweep_steps)
                flags = ["--data", str(out / "sweep.jsonl"), "--output-dir", str(run), "--max-steps", steps]
                flags += ["--warmup-steps", str(max(1, args.sweep_steps // 10)), "--save-steps", steps]
                cmd = cli("train", *common, *method_flags(m), *flags, "--learning-rate", str(lr), "--overwrite")
                sh(cmd, log, f"sweep/{m}-lr{lr:g}")
            sweep_result[m][f"{lr:g}"] = json.loads((run / "summary.json").read_text())["val_loss_after"]
    best = {m: float(min(v, key=v.get)) for m, v in sweep_result.items()}
    print("learning rates chosen by validation loss:", best, flush=True)

    # 3. final training: same samples, seed, batch, steps and schedule for every method
    summaries = {}
    for m in METHODS:
        run = out / "train" / m
        if not (run / "summary.json").is_file():
            flags = ["--data", str(out / "train.jsonl"), "--output-dir", str(run), "--max-steps", str(args.steps)]
            flags += ["--warmup-steps", str(max(1, args.steps // 10)), "--save-steps", str(max(1, args.steps // 3))]
            resume = ["--resume"] if (run / "checkpoints").is_dir() else ["--overwrite"]
            sh(
                cli("train", *common, *method_flags(m), *flags, "--learning-rate", str(best[m]), *resume),
                log,
                f"train/{m}",
            )
        summaries[m] = json.loads((run / "summary.json").read_text())

    # 4. evaluation of the base model and each fine-tuned one
    tasks = ",".join([*in_domain, *unseen, *far])
    evals = {}
    for name in ["base", *METHODS]:
        flags = ["--model", args.model if name != "full" else str(out / "train" / "full" / "model")]
        if name in ("s2ft", "lora"):
            flags += ["--adapter", str(out / "train" / name / "adapter")]
        flags += [
            "--tasks",
            tasks,
            "--data-dir",
            str(data_dir),
            "--limit",
            str(args.eval_limit),
            "--seed",
            str(args.seed),
        ]
        flags += [
            "--mmlu-subjects",
            "57",
            "--ppl-tokens",
            str(args.ppl_tokens),
            "--output-dir",
            str(out / "eval" / name),
        ]
        res_file = out / "eval" / name / "results.json"
        done = res_file.is_file() and len(json.loads(res_file.read_text())["results"]) == len(tasks.split(","))
        if not done:
            sh(cli("eval", *flags), log, f"eval/{name}")
        evals[name] = json.loads(res_file.read_text())["results"]

    report(out, args, sweep_result, best, summaries, evals, in_domain, unseen, far)


def report(out, args, sweep_result, best, summaries, evals, in_domain, unseen, far) -> None:
    groups = {"in-domain": in_domain, "unseen tasks": unseen, "far OOD": far}
    rows = []
    for group, tasks in groups.items():
        for t in tasks:
            base = evals["base"][t]
            row = {"group": group, "task": t, "metric": base["metric"]}
            for name in ["base", *METHODS]:
                r = evals[name][t]
                row[name] = r["perplexity"] if r["metric"] == "perplexity" else r["accuracy"]
                if r["metric"] == "accuracy":
                    row[f"{name}_ci95"] = r["ci95"]
                    row["n"] = r["n"]
            rows.append(row)
    acc_groups = {}  # group -> its accuracy tasks (perplexity has no per-question correctness)
    for group, tasks in groups.items():
        if acc := [t for t in tasks if evals["base"][t]["metric"] == "accuracy"]:
            acc_groups[group] = acc
    means = {
        group: {n: sum(evals[n][t]["accuracy"] for t in acc) / len(acc) for n in ["base", *METHODS]}
        for group, acc in acc_groups.items()
    }
    pairs = [("s2ft", "base"), ("lora", "base"), ("full", "base"), ("s2ft", "lora"), ("s2ft", "full")]
    paired = {
        group: {f"{a}-{b}": paired_delta(out / "eval", a, b, acc) for a, b in pairs}
        for group, acc in acc_groups.items()
    }
    timings_file = out / "timings.json"
    minutes = stage_minutes(json.loads(timings_file.read_text())) if timings_file.is_file() else None
    result = {
        "settings": vars(args),
        "wall_minutes": minutes,
        "sweep_val_loss": sweep_result,
        "chosen_lr": best,
        "training": {
            m: {
                k: summaries[m].get(k)
                for k in ("trainable_parameters", "train_seconds", "val_loss_after", "train_loss")
            }
            for m in METHODS
        },
        "rows": rows,
        "group_means": means,
        "paired_deltas": paired,
    }
    write_json(out / "study.json", result)

    lines = ["| group | task | base | S²FT | LoRA | full |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["metric"] == "perplexity":
            cells = [
                f"{r[n]:.2f}" if n == "base" else f"{r[n]:.2f} ({r[n] - r['base']:+.2f})" for n in ["base", *METHODS]
            ]
        else:
            cells = []
            for n in ["base", *METHODS]:
                lo, hi = r[f"{n}_ci95"]
                delta = "" if n == "base" else f" ({100 * (r[n] - r['base']):+.1f})"
                cells.append(f"{100 * r[n]:.1f} [{100 * lo:.0f}–{100 * hi:.0f}]{delta}")
        lines.append(f"| {r['group']} | {r['task']} | " + " | ".join(cells) + " |")
    for group, m in means.items():
        lines.append(
            f"| {group} | **mean** | " + " | ".join(f"**{100 * m[n]:.1f}**" for n in ["base", *METHODS]) + " |"
        )
    lines += ["", "Paired differences of the group mean accuracy, in points, with a 95% bootstrap interval", ""]
    lines += ["| group | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |", "|---|" + "---|" * len(pairs)]
    for group, d in paired.items():
        cells = [f"{d[k]['delta']:+.1f} [{d[k]['ci95'][0]:+.1f}, {d[k]['ci95'][1]:+.1f}]" for k in d]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines += ["", "Learning-rate sweep: validation loss after the sweep run (chosen rate in bold)", ""]
    width = max(len(v) for v in sweep_result.values())
    lines += ["| method | " + " | ".join(["rate → val loss"] * width) + " |", "|---|" + "---|" * width]
    for m, losses in sweep_result.items():
        cells = [f"**{lr} → {v:.4f}**" if float(lr) == best[m] else f"{lr} → {v:.4f}" for lr, v in losses.items()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| method | trainable parameters | train time (s) | final val loss |", "|---|---|---|---|"]
    for m, sm in summaries.items():
        val = sm.get("val_loss_after")
        val_s = f"{val:.4f}" if val is not None else "–"
        lines.append(f"| {m} | {sm.get('trainable_parameters', 0):,} | {sm.get('train_seconds', 0):.0f} | {val_s} |")
    if minutes:
        lines += [
            "",
            f"Wall time of the steps: sweep {minutes['sweep']:.0f} min, training {minutes['train']:.0f} min, "
            f"evaluation {minutes['eval']:.0f} min; {minutes['total']:.0f} min in all.",
        ]
    table = "\n".join(lines)
    (out / "study.md").write_text(table + "\n")
    print("\n" + table)
    plot(means, pooled_ci(evals, acc_groups), out / "study.png")
    print(f"\nwrote {out / 'study.json'}, {out / 'study.md'}, {out / 'study.png'}")


def paired_delta(eval_dir: Path, a: str, b: str, tasks: list[str], rounds: int = 2000) -> dict:
    """Mean over the accuracy `tasks` of accuracy(a) − accuracy(b), in points, with a paired bootstrap 95% CI.

    Every model answered the same questions (the same seeded subset), so each bootstrap round
    resamples question indices per task and applies them to both models' per-example results.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    deltas = np.zeros(rounds)
    point = 0.0
    for t in tasks:
        ca, cb = (
            [json.loads(x)["correct"] for x in (eval_dir / m / f"{t}.jsonl").read_text().splitlines()] for m in (a, b)
        )
        diff = np.array(ca, float) - np.array(cb, float)  # (n,) per question
        idx = rng.integers(0, len(diff), size=(rounds, len(diff)))
        deltas += diff[idx].mean(1)
        point += diff.mean()
    deltas, point = 100 * deltas / len(tasks), 100 * point / len(tasks)
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return {"delta": float(point), "ci95": [float(lo), float(hi)], "tasks": len(tasks)}


def pooled_ci(evals: dict, acc_groups: dict) -> dict:
    """Wilson 95% interval of each group's pooled accuracy (equal n per task: pooled = mean)."""
    from s2ft.evaluation import wilson

    return {
        group: {n: wilson(sum(evals[n][t]["correct"] for t in acc), sum(evals[n][t]["n"] for t in acc)) for n in evals}
        for group, acc in acc_groups.items()
    }


def plot(means: dict, ci: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    names = ["base", *METHODS]
    groups = list(means)
    for k, n in enumerate(names):
        ys = [100 * means[g][n] for g in groups]
        lo = [y - 100 * ci[g][n][0] for g, y in zip(groups, ys, strict=True)]
        hi = [100 * ci[g][n][1] - y for g, y in zip(groups, ys, strict=True)]
        err = [lo, hi]
        xs = [g + (k - 1.5) * 0.2 for g in range(len(groups))]
        ax.bar(xs, ys, 0.2, yerr=err, capsize=2, label=n)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("mean accuracy (%), 95% CI")
    ax.set_title("SmolLM2-135M: learning (in-domain) and forgetting (unseen, far OOD)")
    ax.legend(fontsize=8)
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
    (data / "train").mkdir(parents=True, exist_ok=True)
    (data / "train" / "commonsense_partial_4tasks.json").write_text(json.dumps(train[:40]))
    for task in ("ARC-Easy", "openbookqa"):
        (data / "test" / "commonsense" / task).mkdir(parents=True, exist_ok=True)
        (data / "test" / "commonsense" / task / "test.json").write_text(json.dumps(held[:8]))
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
