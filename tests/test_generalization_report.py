"""The generalization study's report (bench/generalization.py) from hand-made evaluation results.

The study takes two hours; its report must not be the step that breaks at the end. These
tests build per-example result files with known answers and check the paired differences,
their bootstrap intervals, the tables and the plot.
"""

from __future__ import annotations

import importlib.util
import json
from argparse import Namespace
from pathlib import Path

import pytest

from s2ft.evaluation import wilson

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("generalization", ROOT / "bench" / "generalization.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_eval(root: Path, name: str, correct: dict[str, list[bool]], ppl: float) -> dict:
    d = root / "eval" / name
    d.mkdir(parents=True)
    results = {}
    for task, flags in correct.items():
        (d / f"{task}.jsonl").write_text("".join(json.dumps({"correct": c}) + "\n" for c in flags))
        k, n = sum(flags), len(flags)
        results[task] = {"metric": "accuracy", "accuracy": k / n, "correct": k, "n": n, "ci95": list(wilson(k, n))}
    (d / "wikitext2.jsonl").write_text(json.dumps({"tokens": 512, "nll": 2.0}) + "\n")
    results["wikitext2"] = {"metric": "perplexity", "perplexity": ppl}
    return results


def test_paired_deltas_and_outputs(study, tmp_path):
    n = 40
    base = [i % 4 == 0 for i in range(n)]  # 25% correct
    evals = {
        "base": write_eval(tmp_path, "base", {"a": base, "b": base}, 20.0),
        "s2ft": write_eval(tmp_path, "s2ft", {"a": [True] * n, "b": base}, 21.0),  # +75 on a, 0 on b
        "lora": write_eval(tmp_path, "lora", {"a": base, "b": base}, 22.0),  # identical to base
        "full": write_eval(tmp_path, "full", {"a": [False] * n, "b": [False] * n}, 30.0),  # -25 on both
    }
    summaries = {m: {"trainable_parameters": 1, "train_seconds": 1.0} for m in ("s2ft", "lora", "full")}
    args = Namespace(steps=1)
    study.report(
        tmp_path, args, {"s2ft": {"0.001": 0.5}}, {"s2ft": 1e-3}, summaries, evals, ["a"], ["b"], ["wikitext2"]
    )

    result = json.loads((tmp_path / "study.json").read_text())
    d = result["paired_deltas"]
    assert d["in-domain"]["s2ft-base"]["delta"] == pytest.approx(75.0)
    lo75, hi75 = d["in-domain"]["s2ft-base"]["ci95"]  # 30 of 40 questions flip to right: varies with the resample
    assert 55 < lo75 < 75 < hi75 < 95
    assert d["in-domain"]["s2ft-full"]["ci95"] == pytest.approx([100.0, 100.0])  # every question flips
    assert d["in-domain"]["lora-base"] == {"delta": 0.0, "ci95": [0.0, 0.0], "tasks": 1}
    assert d["unseen tasks"]["full-base"]["delta"] == pytest.approx(-25.0)
    lo, hi = d["unseen tasks"]["s2ft-full"]["ci95"]  # +25 on average, varying with the resample
    assert 0 < lo < 25 < hi <= 50
    assert "far OOD" not in d  # perplexity only: no accuracy to pair
    assert result["group_means"]["in-domain"]["s2ft"] == 1.0

    table = (tmp_path / "study.md").read_text()
    assert "| far OOD | wikitext2 | 20.00 | 21.00 (+1.00) | 22.00 (+2.00) | 30.00 (+10.00) |" in table
    assert f"| in-domain | +75.0 [{lo75:+.1f}, {hi75:+.1f}] | +0.0 [+0.0, +0.0] |" in table
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"


def test_wall_time_is_summed_per_stage_and_reported(study, tmp_path):
    timings = {"sweep/s2ft-lr0.001": 600.0, "sweep/full-lr5e-05": 900.0, "train/s2ft": 1200.0, "eval/base": 330.0}
    assert study.stage_minutes(timings) == {"sweep": 25.0, "train": 20.0, "eval": 5.5, "total": 50.5}
    (tmp_path / "timings.json").write_text(json.dumps(timings))
    flags = [i % 2 == 0 for i in range(10)]
    evals = {m: write_eval(tmp_path, m, {"a": flags}, 20.0) for m in ("base", "s2ft", "lora", "full")}
    summaries = {m: {"trainable_parameters": 1, "train_seconds": 1.0} for m in ("s2ft", "lora", "full")}
    study.report(
        tmp_path, Namespace(steps=1), {"s2ft": {"0.001": 0.5}}, {"s2ft": 1e-3}, summaries, evals, ["a"], [], []
    )
    assert json.loads((tmp_path / "study.json").read_text())["wall_minutes"]["total"] == 50.5
    assert "sweep 25 min, training 20 min, evaluation 6 min; 50 min in all" in (tmp_path / "study.md").read_text()


def test_resuming_with_other_settings_is_refused(study, tmp_path):
    args = Namespace(**{k: 1 for k in study.RESULT_SETTINGS})
    args.data_dir = str(tmp_path)
    study.check_settings(tmp_path, args)  # first run: recorded
    study.check_settings(tmp_path, args)  # the same settings: resumes
    args.eval_limit, args.sweep_steps = 150, 40
    with pytest.raises(SystemExit, match=r"--sweep-steps 1 \(now 40\), --eval-limit 1 \(now 150\)"):
        study.check_settings(tmp_path / ".", args)
    other = tmp_path / "older"
    (other / "sweep").mkdir(parents=True)
    with pytest.raises(SystemExit, match="without a settings.json"):
        study.check_settings(other, args)
