"""Does `s2ft eval --tasks X:ll` give lm-evaluation-harness's numbers? Same model, same file, same prompt.

For each task, the model is scored twice in one process: by s2ft's own log-likelihood scorer
(`s2ft.evaluation.run_loglik_task`) and by lm-eval's `simple_evaluate` through `HFLM` on the task
YAMLs `s2ft lm-eval-tasks` writes. The report gives acc and acc_norm of both, their difference,
how many questions are predicted differently and the largest per-option log-likelihood gap.

    python bench/lm_eval_parity.py --data-dir ../shared/data      # SmolLM2, ARC-Easy + PIQA, every question
    python bench/lm_eval_parity.py --tasks commonsense --limit 300 --out bench/results/lm_eval_parity_all.json
    python bench/lm_eval_parity.py --smoke                        # tiny model (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--tasks", default="ARC-Easy,piqa", help="commonsense tasks, or 'commonsense'")
    ap.add_argument("--limit", type=int, help="a seeded subset per task (default: every question)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default="bench/results/lm_eval_parity.json")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()

    import lm_eval
    import torch

    from s2ft.evaluation import COMMONSENSE_LABELS, EvalSettings, load_for_eval, run_loglik_task
    from s2ft.integrations.lm_eval import evaluate

    if args.smoke:
        from generalization import smoke_setup

        args.model, args.data_dir = smoke_setup(Path(args.out).parent / "lm_eval_parity_smoke")
        args.tasks, args.limit = "ARC-Easy,openbookqa", None
    tasks = list(COMMONSENSE_LABELS) if args.tasks == "commonsense" else args.tasks.split(",")
    torch.manual_seed(0)
    model, tokenizer, what = load_for_eval(args.model, None)
    tokenizer.padding_side = "right"
    rows = {}
    for task in tasks:
        t = time.time()
        ours, per = run_loglik_task(
            model, tokenizer, Path(args.data_dir), task, EvalSettings(limit=args.limit, batch_size=args.batch_size)
        )
        t_ours = time.time() - t
        t = time.time()
        theirs = evaluate(model, tokenizer, [task], args.data_dir, args.limit, 0, args.batch_size)[task]
        t_theirs = time.time() - t
        both = zip(per, theirs["loglik"], strict=True)
        gap = max(abs(a - b) for row, ll in both for a, b in zip(row["loglik"], ll, strict=True))
        differ = sum(
            row["prediction"] != max(range(len(ll)), key=ll.__getitem__)
            for row, ll in zip(per, theirs["loglik"], strict=True)
        )
        rows[task] = {
            "n": ours["n"],
            "s2ft_acc": ours["accuracy"],
            "lm_eval_acc": theirs["acc"],
            "s2ft_acc_norm": ours["acc_norm"],
            "lm_eval_acc_norm": theirs["acc_norm"],
            "acc_diff_points": 100 * (ours["accuracy"] - theirs["acc"]),
            "acc_norm_diff_points": 100 * (ours["acc_norm"] - theirs["acc_norm"]),
            "questions_predicted_differently": differ,
            "max_abs_loglik_gap": gap,
            "majority_baseline": ours["majority_baseline"],
            "prompt_example": per[0]["context"] + " | " + " / ".join(per[0]["choices"]),
            "seconds_s2ft": round(t_ours, 1),
            "seconds_lm_eval": round(t_theirs, 1),
        }
        r = rows[task]
        print(
            f"{task:<14} n={r['n']:<6} acc s2ft {100 * r['s2ft_acc']:.2f} lm-eval {100 * r['lm_eval_acc']:.2f} | "
            f"acc_norm s2ft {100 * r['s2ft_acc_norm']:.2f} lm-eval {100 * r['lm_eval_acc_norm']:.2f} | "
            f"{differ} differ, max |Δll| {gap:.2e} | {t_ours:.0f}s vs {t_theirs:.0f}s",
            flush=True,
        )
    out = {
        "model": what,
        "dtype": str(next(model.parameters()).dtype),
        "device": "cpu (2 cores)" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "lm_eval_version": lm_eval.__version__,
        "limit": args.limit,
        "command": "python " + " ".join(sys.argv),
        "tasks": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
