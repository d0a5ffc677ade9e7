"""lm-evaluation-harness on s2ft models and the local task YAMLs (`s2ft.integrations.lm_eval`).

The real harness (lm-eval 0.4.x, `HFLM` given the model instance) scores an S2FTModel,
unmerged and merged, on the YAMLs `s2ft lm-eval-tasks` writes for a tiny local data directory
in all eight formats: every option's log-likelihood equals s2ft's own scorer (`X:ll`), so
acc and acc_norm are equal. `--limit` picks the same seeded questions in both. The real
`lm_eval` command line runs the written YAMLs on the saved model; `s2ft eval --harness` writes
harness.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from lm_eval_fixtures import RECORDS, tiny_model_dir, write_data
from s2ft import evaluation as ev
from s2ft.cli import main
from s2ft.integrations import lm_eval as s2ft_lm_eval

pytest.importorskip("lm_eval")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf-datasets")  # no shared cache between test runs
    path = tiny_model_dir(root / "model")
    return {"path": path, "data": write_data(root / "data"), "root": root}


def _s2ft_model(path: Path):
    from s2ft import S2FTConfig, S2FTModel

    base = T.AutoModelForCausalLM.from_pretrained(path).eval()
    model = S2FTModel(base, S2FTConfig(ffn_ratio=0.25, attn_ratio=0.25, seed=0))
    with torch.no_grad():  # a trained-looking adapter: the merged model must differ from the base
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5)
    return model.eval()


def _ours(model, tok, data, task, limit=None):
    result, rows = ev.run_loglik_task(model, tok, data, task, ev.EvalSettings(progress=False, limit=limit))
    return result, [r["loglik"] for r in rows]


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_harness_equals_s2ft_scorer_on_every_format(tiny, merged):
    model = _s2ft_model(tiny["path"])
    if merged:
        model = model.merge_and_unload().eval()
    tok = T.AutoTokenizer.from_pretrained(tiny["path"])
    got = s2ft_lm_eval.evaluate(model, tok, ["commonsense"], tiny["data"], batch_size=4)
    assert set(got) == set(RECORDS)
    for task, theirs in got.items():
        ours, lls = _ours(model, tok, tiny["data"], task)
        assert theirs["n"] == ours["n"] == len(RECORDS[task])
        for a, b in zip(lls, theirs["loglik"], strict=True):
            assert a == pytest.approx(b, abs=1e-4), task
        assert theirs["acc"] == pytest.approx(ours["accuracy"])
        assert theirs["acc_norm"] == pytest.approx(ours["acc_norm"])
    # the adapter is in the scores: the base model scores differently
    base = T.AutoModelForCausalLM.from_pretrained(tiny["path"]).eval()
    _, base_lls = _ours(base, tok, tiny["data"], "ARC-Easy")
    assert base_lls[0] != pytest.approx(got["ARC-Easy"]["loglik"][0], abs=1e-3)


def test_harness_limit_takes_the_same_seeded_questions(tiny):
    model = T.AutoModelForCausalLM.from_pretrained(tiny["path"]).eval()
    tok = T.AutoTokenizer.from_pretrained(tiny["path"])
    got = s2ft_lm_eval.evaluate(model, tok, ["arc_easy"], tiny["data"], limit=2, seed=3)["ARC-Easy"]
    _, rows = ev.run_loglik_task(model, tok, tiny["data"], "ARC-Easy", ev.EvalSettings(limit=2, seed=3, progress=False))
    assert got["n"] == 2 and [len(x) for x in got["loglik"]] == [len(r["loglik"]) for r in rows]
    for a, b in zip(rows, got["loglik"], strict=True):
        assert a["loglik"] == pytest.approx(b, abs=1e-4)


def test_written_yamls_with_the_lm_eval_command_line(tiny, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    assert main(["lm-eval-tasks", "--data-dir", str(tiny["data"]), "--out", str(tasks)]) == 0
    assert "s2ft_arc_easy" in capsys.readouterr().out
    assert {p.name for p in tasks.iterdir()} >= {"s2ft_piqa.yaml", "s2ft_winogrande.yaml", "s2ft_lm_eval_utils.py"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny['path']},dtype=float32"]
    cmd += ["--include_path", str(tasks), "--tasks", "s2ft_arc_easy,s2ft_winogrande", "--device", "cpu"]
    cmd += ["--batch_size", "2", "--output_path", str(out)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    model = T.AutoModelForCausalLM.from_pretrained(tiny["path"]).eval()
    tok = T.AutoTokenizer.from_pretrained(tiny["path"])
    for task, name in (("ARC-Easy", "s2ft_arc_easy"), ("winogrande", "s2ft_winogrande")):
        ours, _ = _ours(model, tok, tiny["data"], task)
        assert results[name]["acc,none"] == pytest.approx(ours["accuracy"])
        assert results[name]["acc_norm,none"] == pytest.approx(ours["acc_norm"])


def test_s2ft_eval_harness_cli(tiny, tmp_path, capsys):
    argv = ["eval", "--model", str(tiny["path"]), "--data-dir", str(tiny["data"]), "--output-dir", str(tmp_path)]
    assert main([*argv, "--harness", "ARC-Easy,piqa:ll"]) == 0
    assert "acc_norm" in capsys.readouterr().out
    saved = json.loads((tmp_path / "harness.json").read_text())["results"]
    assert set(saved) == {"ARC-Easy", "piqa"} and saved["piqa"]["n"] == len(RECORDS["piqa"])
    assert main([*argv, "--harness", "gsm8k"]) == 2
    assert "unknown task 'gsm8k'" in capsys.readouterr().err


def test_task_names_and_missing_data(tmp_path):
    assert s2ft_lm_eval.harness_task("ARC-Challenge:ll") == "s2ft_arc_challenge"
    assert s2ft_lm_eval.harness_task("social_i_qa") == "s2ft_social_i_qa"
    assert s2ft_lm_eval.harness_task("s2ft_piqa") == "s2ft_piqa"
    with pytest.raises(FileNotFoundError, match="no test/commonsense"):
        s2ft_lm_eval.write_tasks(tmp_path, tmp_path / "t")


def test_shipped_yamls_are_the_generators_output():
    """configs/lm_eval (for ../shared/data, relative to the repository root) is what
    `s2ft lm-eval-tasks --data-dir ../shared/data --relative` writes: no hand edits drift."""
    shipped = Path(__file__).parents[1] / "configs" / "lm_eval"
    paths = {t: f"../shared/data/test/commonsense/{t}/test.json" for t in s2ft_lm_eval.HARNESS_NAMES}
    want = s2ft_lm_eval.render_tasks(paths)
    assert sorted(p.name for p in shipped.iterdir() if p.is_file()) == sorted(want)
    for name, text in want.items():
        assert (shipped / name).read_text() == text, name
