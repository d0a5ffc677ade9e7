"""Learning against forgetting across learning rates: is S²FT's forgetting advantage a rate effect?

The generalization study (bench/generalization.py) compares methods at one learning rate each,
chosen by validation accuracy. On SmolLM2 every method chose the lowest rate of its grid, so a
reader may ask whether LoRA at a lower rate would forget as little as S²FT while learning as
much, or S²FT at a higher one as much as LoRA. This script answers it the way "LoRA Learns Less
and Forgets Less" (Biderman et al., 2024) does: it trains each method at several rates, with
everything else the study's (data, steps, schedule, seed 0, parameter matching), and puts every
run on one plane:
- learning: the validation loss after training, on the study's held-out in-domain training
  questions (the loss the run minimised, on questions it did not see);
- forgetting: WikiText-2 perplexity, and log-likelihood accuracy on the unseen tasks (PIQA,
  SIQA, WinoGrande), on the study's evaluation questions.
The study's own seed-0 runs are the points at the chosen rates; only the other rates are trained
here. The spread over the study's three seeds at the chosen rates is reported beside the curve
as the scale of the noise of one run.

It runs inside a finished (or restored) study directory, reading its settings.json, and is
resumable the same way (a finished run is skipped):

    python bench/frontier.py --model smollm2 --state bench/results/generalization/smollm2/state.tar.gz
    python bench/frontier.py --model smollm2 --report-only
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generalization as gz

RATES = {
    "s2ft": [2e-4, 5e-4, 1e-3, 2e-3, 5e-3],
    "lora": [1e-4, 2e-4, 5e-4, 1e-3, 2e-3],
    "dora": [1e-4, 2e-4, 5e-4, 1e-3, 2e-3],
    "full": [1e-5, 2e-5, 5e-5, 1e-4],
}


def study_args(out: Path, model: str) -> argparse.Namespace:
    """The study's settings (settings.json), as the namespace generalization.py's steps take."""
    path = out / "settings.json"
    if not path.is_file():
        sys.exit(f"{out} holds no study (no settings.json): run bench/generalization.py first, or pass --state")
    settings = {**gz.ADDED_SETTINGS, **json.loads(path.read_text())}
    if settings["model"] != model:
        sys.exit(f"{out} holds a study of --model {settings['model']}, not {model}")
    return argparse.Namespace(**settings)


def eval_tasks(args: argparse.Namespace) -> list[str]:
    return [t + gz.LL for t in gz.task_lists(args.smoke)[1]] + ["wikitext2"]


def run_order(methods: list[str], chosen: dict[str, float]) -> list[tuple[str, float]]:
    """The runs to train, nearest the study's rate first and round-robin over the methods, so that
    a partial run already spans every method (the chosen rate itself is the study's run)."""
    import math

    near = {
        m: sorted((lr for lr in RATES[m] if lr != chosen.get(m)), key=lambda lr: (abs(math.log(lr / chosen[m])), lr))
        for m in methods
    }
    return [
        (m, near[m][k]) for k in range(max(map(len, near.values()), default=0)) for m in methods if k < len(near[m])
    ]


def run_points(out: Path, args: argparse.Namespace, methods: list[str]) -> None:
    log = out / "steps.log"
    chosen = gz.chosen_rates(out)
    data_dir = Path(args.data_dir)
    for m, lr in run_order(methods, chosen):
        run_dir = out / "frontier" / f"{m}-lr{lr:g}"
        dest = run_dir / "eval"
        if gz.eval_finished(dest, eval_tasks(args)):
            continue
        gz.train_run(out, log, args, f"frontier/{m}-lr{lr:g}", run_dir, m, lr, 0, "train.jsonl", args.steps)
        gz.eval_run(log, args, f"frontier-eval/{m}-lr{lr:g}", run_dir, m, eval_tasks(args), data_dir, dest)
        if m == "full":  # keep the evaluation, drop the 0.5-1 GB model copy
            shutil.rmtree(run_dir / "model", ignore_errors=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def point(out: Path, m: str, lr: float, chosen: dict[str, float], tasks: list[str]) -> dict | None:
    """One run's learning and forgetting: val loss, WikiText-2 perplexity and NLL rows, unseen acc."""
    if lr == chosen.get(m):
        run_dir, eval_dir, source = out / "train" / f"{m}-s0", out / "eval" / f"{m}-s0", "study"
    else:
        run_dir = out / "frontier" / f"{m}-lr{lr:g}"
        eval_dir, source = run_dir / "eval", "frontier"
    summ, res = run_dir / "summary.json", eval_dir / "results.json"
    if not (summ.is_file() and gz.eval_finished(eval_dir, tasks)):
        return None
    s, r = json.loads(summ.read_text()), json.loads(res.read_text())["results"]
    unseen = [t for t in tasks if t != "wikitext2"]
    return {
        "lr": lr,
        "source": source,
        "val_loss": s.get("val_loss_after"),
        "train_loss": s.get("train_loss"),
        "train_seconds": s.get("train_seconds"),
        "wikitext2_ppl": r["wikitext2"]["perplexity"],
        "unseen_acc": sum(r[t]["accuracy"] for t in unseen) / len(unseen) if unseen else None,
        "eval_dir": str(eval_dir.relative_to(out)),
    }


def matched(points: dict[str, list[dict]], a: str, b: str, out: Path) -> list[dict]:
    """For each run of `a`, the run of `b` that learned at least as much (val loss no higher) and
    forgot least (lowest WikiText-2 perplexity), with the paired bootstrap interval of the
    WikiText-2 NLL difference over text windows (one seed each: the interval is over windows)."""
    rows = []
    for p in points.get(a, []):
        rivals = [q for q in points.get(b, []) if q["val_loss"] <= p["val_loss"]]
        if not rivals:
            rows.append({"a": p, "b": None})
            continue
        q = min(rivals, key=lambda q: q["wikitext2_ppl"])
        nll = [[gz.per_example(out / x["eval_dir"], "wikitext2")] for x in (p, q)]
        d = gz.bootstrap_delta(nll[:1], nll[1:])
        rows.append({"a": p, "b": q, "nll_delta": d["delta"], "ci95": d["ci95"]})
    return rows


def report(out: Path, args: argparse.Namespace, methods: list[str]) -> dict:
    chosen = gz.chosen_rates(out)
    grid = {m: sorted(set(RATES[m]) | ({chosen[m]} if m in chosen else set())) for m in methods}
    tasks = eval_tasks(args)
    points = {m: [p for lr in grid[m] if (p := point(out, m, lr, chosen, tasks))] for m in methods}
    points = {m: ps for m, ps in points.items() if ps}
    if not points:
        sys.exit(f"{out}: no finished run to report")
    base = gz.load_eval(out, "base")
    unseen = tasks[:-1]
    base_summary = json.loads((out / "train" / f"{methods[0]}-s0" / "summary.json").read_text())
    base_point = {
        "val_loss": base_summary.get("val_loss_before"),
        "wikitext2_ppl": base["wikitext2"]["perplexity"],
        "unseen_acc": sum(base[t]["accuracy"] for t in unseen) / len(unseen),
    }
    noise = {}  # the study's seeds at the chosen rate: how far one run moves
    for m in points:
        evals = {n: e for n in (f"{m}-s{s}" for s in range(10)) if (e := gz.load_eval(out, n))}
        vl = [json.loads((out / "train" / n / "summary.json").read_text())["val_loss_after"] for n in evals]
        ppl = [e["wikitext2"]["perplexity"] for e in evals.values()]
        noise[m] = {"seeds": len(evals), "val_loss": [min(vl), max(vl)], "wikitext2_ppl": [min(ppl), max(ppl)]}
    result = {
        "model": args.model,
        "settings": {k: getattr(args, k) for k in gz.RESULT_SETTINGS},
        "chosen_lr": chosen,
        "base": base_point,
        "points": points,
        "seed_spread_at_chosen_rate": noise,
        "s2ft_vs_matched": {b: matched(points, "s2ft", b, out) for b in points if b != "s2ft"},
    }
    gz.write_json(out / "frontier.json", result)
    (out / "frontier.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    plot(result, out / "frontier.png")
    print(f"\nwrote {out / 'frontier.json'}, {out / 'frontier.md'}, {out / 'frontier.png'}")
    return result


def markdown(r: dict) -> str:
    b = r["base"]
    lines = [
        f"Model `{r['model']}`, seed 0, {r['settings']['steps']} steps per run. Learning: validation loss after "
        f"training (base {b['val_loss']:.3f}). Forgetting: WikiText-2 perplexity (base {b['wikitext2_ppl']:.2f}) "
        f"and unseen-task log-likelihood accuracy (PIQA, SIQA, WinoGrande; base {100 * b['unseen_acc']:.1f}%). "
        "`*`: the rate the study chose (its seed-0 run).",
        "",
        "| method | rate | val loss | WikiText-2 ppl | unseen acc (%) | train s |",
        "|---|---|---|---|---|---|",
    ]
    for m, ps in r["points"].items():
        for p in ps:
            star = "*" if p["source"] == "study" else ""
            acc = f"{100 * p['unseen_acc']:.1f}" if p["unseen_acc"] is not None else "–"
            secs = f"{p['train_seconds']:.0f}" if p.get("train_seconds") else "–"
            lines.append(
                f"| {gz.NAMES[m]} | {p['lr']:g}{star} | {p['val_loss']:.4f} | {p['wikitext2_ppl']:.2f} | "
                f"{acc} | {secs} |"
            )
    lines += ["", "Spread over the study's seeds at the chosen rate (the noise of one run)", ""]
    lines += ["| method | seeds | val loss | WikiText-2 ppl |", "|---|---|---|---|"]
    for m, n in r["seed_spread_at_chosen_rate"].items():
        lines.append(
            f"| {gz.NAMES[m]} | {n['seeds']} | {n['val_loss'][0]:.4f} – {n['val_loss'][1]:.4f} | "
            f"{n['wikitext2_ppl'][0]:.2f} – {n['wikitext2_ppl'][1]:.2f} |"
        )
    lines += [
        "",
        "Each S²FT run against the other method's run that learned at least as much (validation loss no "
        "higher) and forgot least: the difference of WikiText-2 NLL per token (negative: S²FT forgets "
        "less), 95% bootstrap interval over text windows",
        "",
        "| S²FT rate (val loss, ppl) | other method | its rate (val loss, ppl) | NLL difference | 95% interval |",
        "|---|---|---|---|---|",
    ]
    for other, rows in r["s2ft_vs_matched"].items():
        for row in rows:
            a, q = row["a"], row["b"]
            left = f"{a['lr']:g} ({a['val_loss']:.4f}, {a['wikitext2_ppl']:.2f})"
            if q is None:
                lines.append(f"| {left} | {gz.NAMES[other]} | no run learned as much | | |")
                continue
            lines.append(
                f"| {left} | {gz.NAMES[other]} | {q['lr']:g} ({q['val_loss']:.4f}, {q['wikitext2_ppl']:.2f}) | "
                f"{row['nll_delta']:+.4f} | [{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}] |"
            )
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    b = r["base"]
    for ax, key, label in (
        (axes[0], "wikitext2_ppl", "WikiText-2 perplexity (lower: forgot less)"),
        (axes[1], "unseen_acc", "unseen tasks, log-likelihood acc (%)"),
    ):
        scale = 100 if key == "unseen_acc" else 1
        for m, ps in r["points"].items():
            ps = sorted(ps, key=lambda p: p["lr"])
            xs, ys = [p["val_loss"] for p in ps], [scale * p[key] for p in ps]
            (line,) = ax.plot(xs, ys, "o-", label=gz.NAMES[m])
            for p, x, y in zip(ps, xs, ys, strict=True):
                ax.annotate(
                    f"{p['lr']:g}" + ("*" if p["source"] == "study" else ""), (x, y), fontsize=6, xytext=(3, 3),
                    textcoords="offset points", color=line.get_color(),
                )  # fmt: skip
        ax.axhline(scale * b[key], color="grey", ls=":", lw=1, label="base")
        ax.set_xlabel("validation loss after training (lower: learned more)")
        ax.set_ylabel(label)
        if key == "wikitext2_ppl":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"{r['model']}: learning against forgetting across learning rates (seed 0; * = study's rate)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", help="the study's directory (default: ~/.cache/s2ft/generalization-v2/<model>)")
    ap.add_argument("--state", help="the study's state .tar.gz, restored into an empty --out, rewritten after")
    ap.add_argument("--methods", default="s2ft,lora,full", help=f"comma-separated, of {', '.join(RATES)}")
    ap.add_argument(
        "--rates",
        action="append",
        default=[],
        metavar="METHOD=R1,R2,...",
        help="the rates of one method instead of its default grid (repeatable); the study's rate is always a point",
    )
    ap.add_argument("--report-only", action="store_true", help="report the finished runs without running more")
    args = ap.parse_args()
    methods = args.methods.split(",")
    if bad := [m for m in methods if m not in RATES]:
        ap.error(f"--methods: unknown {', '.join(bad)} (known: {', '.join(RATES)})")
    for spec in args.rates:
        m, _, rates = spec.partition("=")
        try:
            RATES[m] = sorted(float(x) for x in rates.split(","))
        except ValueError:
            ap.error(f"--rates {spec}: expected METHOD=R1,R2,... with numbers, e.g. lora=2e-4,5e-4")
        if m not in methods or not RATES[m] or min(RATES[m]) <= 0:
            ap.error(f"--rates {spec}: METHOD must be one of --methods ({args.methods}) and every rate positive")
    out = Path(args.out or f"~/.cache/s2ft/generalization-v2/{args.model}").expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if args.state and Path(args.state).is_file() and not (out / "settings.json").is_file():
        gz.restore_state(Path(args.state), out)
    sargs = study_args(out, args.model)
    if not args.report_only:
        run_points(out, sargs, methods)
    report(out, sargs, methods)
    if args.state:
        gz.save_state(out, Path(args.state))


if __name__ == "__main__":
    main()
