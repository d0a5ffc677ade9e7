"""The learning-against-forgetting frontier (bench/frontier.py) from hand-made run outputs.

The frontier trains each method at several rates inside a finished generalization study. These
tests build such a study by hand, with known validation losses and per-window WikiText-2 NLLs,
and check which runs are trained (nearest the study's rate first, round-robin over methods),
that the study's own runs are reused at the chosen rates, the matching of each S²FT run with the
other method's run that learned at least as much, the tables and the plot.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from s2ft.evaluation import rows_file

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def frontier():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("frontier", ROOT / "bench" / "frontier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_eval(d: Path, nll: float, unseen_acc: float = 0.5) -> None:
    d.mkdir(parents=True)
    results = {}
    for t in ("piqa:ll", "social_i_qa:ll", "winogrande:ll"):
        flags = [i < 10 * unseen_acc for i in range(10)]
        (d / rows_file(t)).write_text("".join(json.dumps({"correct": c}) + "\n" for c in flags))
        results[t] = {"metric": "accuracy", "accuracy": sum(flags) / 10}
    (d / "wikitext2.jsonl").write_text("".join(json.dumps({"nll": nll + i / 100}) + "\n" for i in range(20)))
    results["wikitext2"] = {"metric": "perplexity", "perplexity": 2.718281828 ** (nll + 0.095)}
    (d / "results.json").write_text(json.dumps({"results": results}))


def write_summary(d: Path, val_loss: float) -> None:
    d.mkdir(parents=True, exist_ok=True)
    summary = {"val_loss_before": 2.5, "val_loss_after": val_loss, "train_loss": 0.4, "train_seconds": 10.0}
    (d / "summary.json").write_text(json.dumps(summary))


def make(frontier, root: Path) -> None:
    """A study of `tiny`: chosen rates S²FT 1e-3, LoRA 1e-3, full 2e-5 (3 seeds each), and frontier
    runs. S²FT: less learning, little forgetting; LoRA: learns as much only at 2e-3, where it
    forgets most; full: learns most at 5e-5."""
    gz = frontier.gz
    settings = {k: 1 for k in gz.RESULT_SETTINGS} | {
        "model": "tiny",
        "data_dir": str(root),
        "steps": 60,
        "smoke": False,
    }
    (root / "settings.json").write_text(json.dumps(settings))
    write_eval(root / "eval" / "base", 2.0, 0.6)
    for m, lr in (("s2ft", 1e-3), ("lora", 1e-3), ("full", 2e-5)):
        sweep = root / "sweep" / f"{m}-lr{lr:g}"
        write_summary(sweep, 0.3)
        (sweep / "val").mkdir()
        (sweep / "val" / "results.json").write_text(json.dumps({"results": {"a:ll": {"accuracy": 0.5}}}))
        for s in range(3):
            write_summary(root / "train" / f"{m}-s{s}", {"s2ft": 0.30, "lora": 0.25, "full": 0.28}[m] + s / 100)
            write_eval(root / "eval" / f"{m}-s{s}", {"s2ft": 2.05, "lora": 2.3, "full": 2.1}[m] + s / 100)
    for m, lr, vl, nll in (
        ("s2ft", 2e-3, 0.20, 2.1),
        ("s2ft", 5e-4, 0.40, 2.01),
        ("lora", 2e-3, 0.15, 2.6),
        ("lora", 5e-4, 0.35, 2.2),
        ("full", 5e-5, 0.10, 2.4),
    ):  # fmt: skip
        d = root / "frontier" / f"{m}-lr{lr:g}"
        write_summary(d, vl)
        write_eval(d / "eval", nll)


def test_runs_are_ordered_nearest_the_chosen_rate_first_round_robin(frontier):
    order = frontier.run_order(["lora", "s2ft", "full"], {"s2ft": 5e-4, "lora": 5e-4, "full": 2e-5})
    assert order[:3] == [("lora", 1e-3), ("s2ft", 1e-3), ("full", 1e-5)]
    assert len(order) == sum(len(frontier.RATES[m]) - 1 for m in ("lora", "s2ft", "full"))
    assert ("s2ft", 5e-4) not in order and ("full", 2e-5) not in order  # the study's own runs
    assert order[-1] == ("s2ft", 5e-3)  # the farthest, after every method's nearer rates


def test_report_reuses_the_study_runs_and_matches_by_learning(frontier, tmp_path, monkeypatch):
    make(frontier, tmp_path)
    rates = {"s2ft": [5e-4, 1e-3, 2e-3], "lora": [5e-4, 1e-3, 2e-3], "full": [2e-5, 5e-5]}
    monkeypatch.setattr(frontier, "RATES", rates)
    args = frontier.study_args(tmp_path, "tiny")
    r = frontier.report(tmp_path, args, ["s2ft", "lora", "full"])
    pts = {m: {p["lr"]: p for p in ps} for m, ps in r["points"].items()}
    assert pts["s2ft"][1e-3]["source"] == "study" and pts["s2ft"][1e-3]["val_loss"] == pytest.approx(0.30)
    assert pts["s2ft"][2e-3]["source"] == "frontier" and pts["lora"][2e-3]["val_loss"] == pytest.approx(0.15)
    assert r["base"]["val_loss"] == 2.5 and r["base"]["unseen_acc"] == pytest.approx(0.6)
    assert r["seed_spread_at_chosen_rate"]["lora"]["val_loss"] == pytest.approx([0.25, 0.27])

    lora = {row["a"]["lr"]: row for row in r["s2ft_vs_matched"]["lora"]}
    # S²FT 5e-4 (val 0.40): every LoRA run learned as much; the one that forgot least is 5e-4 (NLL 2.2)
    assert lora[5e-4]["b"]["lr"] == 5e-4 and lora[5e-4]["nll_delta"] == pytest.approx(2.01 - 2.2)
    assert lora[5e-4]["ci95"][1] < 0
    # S²FT 1e-3 (val 0.30): LoRA 1e-3 (0.25, NLL 2.3) beats LoRA 2e-3 (0.15, NLL 2.6) on forgetting
    assert lora[1e-3]["b"]["lr"] == 1e-3 and lora[1e-3]["nll_delta"] == pytest.approx(2.05 - 2.3)
    # S²FT 2e-3 (val 0.20): only LoRA 2e-3 learned as much
    assert lora[2e-3]["b"]["lr"] == 2e-3
    full = {row["a"]["lr"]: row for row in r["s2ft_vs_matched"]["full"]}
    assert full[2e-3]["b"]["lr"] == 5e-5  # full 2e-5 (val 0.28) learned less than S²FT 2e-3 (0.20)
    assert full[1e-3]["b"]["lr"] == 2e-5 and full[1e-3]["b"]["source"] == "study"

    md = (tmp_path / "frontier.md").read_text()
    assert "| S²FT | 0.001* | 0.3000 |" in md and "| LoRA | 0.002 | 0.1500 |" in md
    assert "| 0.002 (0.2000, " in md and "| LoRA | 3 | 0.2500 – 0.2700 |" in md
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_no_rival_that_learned_as_much_is_said_so(frontier, tmp_path, monkeypatch):
    make(frontier, tmp_path)
    monkeypatch.setattr(frontier, "RATES", {"s2ft": [1e-3, 2e-3], "lora": [5e-4, 1e-3], "full": [2e-5]})
    r = frontier.report(tmp_path, frontier.study_args(tmp_path, "tiny"), ["s2ft", "lora", "full"])
    rows = {row["a"]["lr"]: row for row in r["s2ft_vs_matched"]["lora"]}
    assert rows[2e-3]["b"] is None  # S²FT 2e-3 (0.20) learned more than any LoRA run here (0.25)
    assert "no run learned as much" in (tmp_path / "frontier.md").read_text()


def test_a_directory_without_the_study_is_refused(frontier, tmp_path):
    with pytest.raises(SystemExit, match="no settings.json"):
        frontier.study_args(tmp_path, "tiny")
    make(frontier, tmp_path)
    with pytest.raises(SystemExit, match="study of --model tiny, not smollm2"):
        frontier.study_args(tmp_path, "smollm2")


def test_a_partial_evaluation_is_not_a_point(frontier, tmp_path, monkeypatch):
    # an evaluation that failed after its first task leaves a results.json without the others: the
    # run is neither reported nor skipped when resuming
    make(frontier, tmp_path)
    monkeypatch.setattr(frontier, "RATES", {"s2ft": [1e-3, 2e-3], "lora": [1e-3], "full": [2e-5]})
    res = tmp_path / "frontier" / "s2ft-lr0.002" / "eval" / "results.json"
    res.write_text(json.dumps({"results": {"piqa:ll": json.loads(res.read_text())["results"]["piqa:ll"]}}))
    args = frontier.study_args(tmp_path, "tiny")
    tasks = frontier.eval_tasks(args)
    assert tasks == ["piqa:ll", "social_i_qa:ll", "winogrande:ll", "wikitext2"]
    assert not frontier.gz.eval_finished(res.parent, tasks)
    assert frontier.gz.eval_finished(tmp_path / "eval" / "base", tasks)
    r = frontier.report(tmp_path, args, ["s2ft", "lora", "full"])
    assert [p["lr"] for p in r["points"]["s2ft"]] == [1e-3]
