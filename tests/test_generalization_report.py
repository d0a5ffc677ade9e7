"""The generalization study's report (bench/generalization.py) from hand-made step outputs.

The study takes hours; its report must not be the step that breaks at the end. These tests
write per-example result files with known answers for the base model and every method and
seed, and check the bootstrap over seeds and questions, the claims' verdicts, the learning
rates chosen by validation accuracy, partial runs (a seed counts once every method has it),
the tables and the plot.
"""

from __future__ import annotations

import importlib.util
import json
from argparse import Namespace
from pathlib import Path

import pytest

from s2ft.evaluation import rows_file, wilson

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("generalization", ROOT / "bench" / "generalization.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_eval(root: Path, name: str, correct: dict[str, list[bool]], nll: float) -> None:
    d = root / "eval" / name
    d.mkdir(parents=True)
    results = {}
    for task, flags in correct.items():
        (d / rows_file(task)).write_text(
            "".join(json.dumps({"correct": c, "prediction": int(c)}) + "\n" for c in flags)
        )
        k, n = sum(flags), len(flags)
        results[task] = {
            "metric": "accuracy",
            "accuracy": k / n,
            "correct": k,
            "n": n,
            "ci95": list(wilson(k, n)),
            "majority_baseline": 0.5,
            "pred_entropy": 1.0,
            "entropy_max": 1.0,
        }
    (d / "wikitext2.jsonl").write_text(
        "".join(json.dumps({"tokens": 512, "nll": nll + i / 100}) + "\n" for i in range(4))
    )
    results["wikitext2"] = {"metric": "perplexity", "perplexity": 2.718**nll}
    (d / "results.json").write_text(json.dumps({"results": results}))


def write_run(root: Path, name: str, val_acc: float | None = None, val_loss: float = 1.0) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(
        json.dumps({"trainable_parameters": 10, "train_seconds": 5.0, "val_loss_after": val_loss})
    )
    if val_acc is not None:
        (d / "val").mkdir()
        res = {"a:ll": {"metric": "accuracy", "accuracy": val_acc}}
        (d / "val" / "results.json").write_text(json.dumps({"results": res}))


def make_study(study, root: Path, n: int = 40, seeds=(0, 1, 2), missing: tuple[str, int] | None = None) -> None:
    """Base: 25% everywhere. S²FT: +75 on the in-domain task `a`, 25% elsewhere; LoRA/DoRA: the
    base; full: 0% on everything. WikiText-2 NLL: base 2.0, S²FT 2.0, LoRA/DoRA 2.5, full 3.0."""
    study.SWEEP.update({m: [1e-3, 2e-3] for m in study.METHODS})
    quarter = [i % 4 == 0 for i in range(n)]
    tasks = {"a:ll": quarter, "a": quarter, "b:ll": quarter, "hellaswag:ll": quarter, "mmlu": quarter}
    write_eval(root, "base", tasks, 2.0)
    for s in seeds:
        for m in study.METHODS:
            if missing == (m, s):
                continue
            t = dict(tasks)
            if m == "s2ft":
                t["a:ll"] = [True] * n
            if m == "full":
                t = {k: [False] * n for k in t}
            write_eval(root, f"{m}-s{s}", t, {"s2ft": 2.0, "lora": 2.5, "dora": 2.5, "full": 3.0}[m])
            write_run(root / "train", f"{m}-s{s}")
    (root / "sweep" / "base-val").mkdir(parents=True)
    base_val = {"a:ll": {"metric": "accuracy", "accuracy": 0.25}}
    (root / "sweep" / "base-val" / "results.json").write_text(json.dumps({"results": base_val}))
    for m in study.METHODS:  # 2e-3 wins on accuracy for s2ft; a tie broken by the lower loss elsewhere
        write_run(root / "sweep", f"{m}-lr0.001", 0.5, val_loss=1.0)
        write_run(root / "sweep", f"{m}-lr0.002", 0.6 if m == "s2ft" else 0.5, val_loss=0.9 if m == "lora" else 1.1)


def args_for(study, root: Path, seeds: str = "0,1,2") -> Namespace:
    args = Namespace(**{k: 1 for k in study.RESULT_SETTINGS})
    args.model, args.seeds, args.data_dir = "tiny", seeds, str(root)
    return args


def test_report_bootstrap_claims_and_outputs(study, tmp_path):
    make_study(study, tmp_path)
    study.report(tmp_path, args_for(study, tmp_path), ["a"], ["b"], [0, 1, 2])
    r = json.loads((tmp_path / "study.json").read_text())
    assert r["seeds_done"] == [0, 1, 2]
    assert r["chosen_lr"] == {"s2ft": 2e-3, "lora": 2e-3, "dora": 1e-3, "full": 1e-3}

    d = r["paired_deltas"]["in-domain (log-likelihood)"]
    assert d["s2ft-lora"]["delta"] == pytest.approx(75.0)
    lo, hi = d["s2ft-lora"]["ci95"]  # 30 of 40 questions flip: the interval varies with the resample
    assert 55 < lo < 75 < hi < 95
    assert d["full-base"]["delta"] == pytest.approx(-25.0) and d["lora-base"]["ci95"] == [0.0, 0.0]
    assert d["s2ft-full"]["ci95"] == pytest.approx([100.0, 100.0])  # every question flips, every seed
    assert r["group_means"]["in-domain (log-likelihood)"]["s2ft"] == pytest.approx(1.0)
    assert r["mmlu_at_chance"]["base"] and not r["mmlu_at_chance"]["full"]

    claims = {c["claim"]: c for c in r["claims"]}
    assert claims["S²FT learns the trained tasks better than LoRA"]["verdict"].startswith("held")
    assert claims["S²FT transfers to unseen tasks better than LoRA"]["verdict"].startswith("not shown")
    assert claims["S²FT transfers to unseen tasks better than full FT"]["verdict"].startswith("held")
    nll = claims["S²FT forgets less than LoRA (WikiText-2 NLL per token)"]
    assert nll["delta"] == pytest.approx(-0.5) and nll["verdict"].startswith("held")

    md = (tmp_path / "study.md").read_text()
    assert "| in-domain (log-likelihood) | a:ll | 50.0 | 25.0 (1.00) | 100.0 (1.00) |" in md
    assert "**0.002 → 60.0% (1.1000)**" in md and "| base (no training) | 25.0% | |" in md
    assert "mmlu" in md and "WikiText-2 NLL/token" in md
    assert "Chosen at the edge of its grid: s2ft (0.002), lora (0.002), dora (0.001), full (0.001)" in md
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"


def test_partial_run_reports_the_seeds_every_method_has(study, tmp_path):
    make_study(study, tmp_path, missing=("dora", 1))
    study.report(tmp_path, args_for(study, tmp_path), ["a"], ["b"], [0, 1, 2])
    r = json.loads((tmp_path / "study.json").read_text())
    assert r["seeds_done"] == [0, 2] and r["seeds_planned"] == [0, 1, 2]
    assert "seeds done: 0, 2 of 0, 1, 2" in (tmp_path / "study.md").read_text()
    with pytest.raises(SystemExit, match="nothing to report yet"):
        study.report(tmp_path / "empty", args_for(study, tmp_path), ["a"], ["b"], [0])


def test_bootstrap_covers_seed_variation(study):
    # two seeds that disagree: the questions agree within a seed, so only the seed resample spreads the interval
    a = [[[100.0] * 20], [[0.0] * 20]]
    b = [[[0.0] * 20]]
    d = study.bootstrap_delta(a, b, rounds=500)
    assert d["delta"] == pytest.approx(50.0) and d["seeds"] == 2
    assert d["ci95"][0] == pytest.approx(0.0) and d["ci95"][1] == pytest.approx(100.0)


def test_wall_time_is_summed_per_stage(study):
    timings = {"sweep/s2ft-lr0.001": 600.0, "valacc/s2ft-lr0.001": 60.0, "train/s2ft-s0": 1200.0, "eval/base": 330.0}
    timings["frontier/lora-lr0.0002"] = 240.0  # bench/frontier.py's steps, in the same timings.json
    assert study.stage_minutes(timings) == {"sweep": 10.0, "valacc": 1.0, "train": 20.0, "eval": 5.5, "total": 36.5}


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


def test_state_carries_the_study_to_another_directory(study, tmp_path):
    make_study(study, tmp_path / "a")
    (tmp_path / "a" / "train" / "s2ft-s0" / "adapter").mkdir()
    (tmp_path / "a" / "train" / "s2ft-s0" / "adapter" / "adapter.safetensors").write_bytes(b"weights")
    study.save_state(tmp_path / "a", tmp_path / "state.tar.gz")
    study.restore_state(tmp_path / "state.tar.gz", tmp_path / "b")
    assert not (tmp_path / "b" / "train" / "s2ft-s0" / "adapter").exists()  # no weights travel
    for name in ("a", "b"):
        study.report(tmp_path / name, args_for(study, tmp_path), ["a"], ["b"], [0, 1, 2])
    a, b = (json.loads((tmp_path / n / "study.json").read_text()) for n in ("a", "b"))
    assert a["paired_deltas"] == b["paired_deltas"] and a["chosen_lr"] == b["chosen_lr"]


def test_sweep_climbs_the_grid_and_stops_at_the_first_fall(study):
    seen = []

    def accuracy(table):
        return lambda lr: seen.append(lr) or table[lr]

    assert study.climb([1, 2, 3, 4], accuracy({1: 0.5, 2: 0.4, 3: 0.9, 4: 0.9})) == [1, 2]
    assert study.climb([1, 2, 3], accuracy({1: 0.3, 2: 0.3, 3: 0.4})) == [1, 2, 3]  # a tie climbs on
    assert study.climb([1, 2, 3], accuracy({1: 0.3, 2: 0.5, 3: 0.4})) == [1, 2, 3]
    assert seen == [1, 2, 1, 2, 3, 1, 2, 3]


def test_sweep_report_names_the_rates_not_run(study, tmp_path):
    make_study(study, tmp_path)
    study.SWEEP["s2ft"] = [1e-3, 2e-3, 4e-3]  # the study stopped before 4e-3
    try:
        study.report(tmp_path, args_for(study, tmp_path), ["a"], ["b"], [0, 1, 2])
    finally:
        study.SWEEP["s2ft"] = [1e-3, 2e-3]
    md = (tmp_path / "study.md").read_text()
    assert "Not run: s2ft (0.004)." in md
    row = next(line for line in md.splitlines() if line.startswith("| s2ft | "))
    assert row.count("|") == 5  # method + 3 rate columns, the one not run left empty


def test_a_run_killed_before_its_first_checkpoint_starts_over(study, tmp_path):
    run = tmp_path / "run"
    assert study.resume_flag(run) == "--overwrite"
    (run / "checkpoints" / "checkpoint-5").mkdir(parents=True)  # killed while writing it
    assert study.resume_flag(run) == "--overwrite"
    (run / "checkpoints" / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    assert study.resume_flag(run) == "--resume"


def test_a_study_begun_before_a_setting_existed_resumes_with_its_default(study, tmp_path):
    args = Namespace(**{k: 1 for k in study.RESULT_SETTINGS})
    args.data_dir, args.generation = str(tmp_path), True
    older = {k: v for k, v in vars(args).items() if k not in study.ADDED_SETTINGS}
    older["data_dir"] = str(tmp_path.resolve())
    (tmp_path / "settings.json").write_text(json.dumps(older))
    study.check_settings(tmp_path, args)  # it ran with the generation column: the same study
    args.generation = False
    with pytest.raises(SystemExit, match=r"--generation True \(now False\)"):
        study.check_settings(tmp_path, args)
