"""Log-likelihood multiple-choice scoring (`s2ft.loglik`, `s2ft eval --tasks X:ll`): each of the
eight LLM-Adapters formats parses into lm-eval's prompt and options; bad records are errors
naming the file and record; scores equal a one-at-a-time float64 computation; acc_norm divides
by characters; the majority baseline and the predicted-label entropy are right; the CLI shows
the new columns in its table and in --compare."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lm_eval_fixtures import records, tiny_model_dir, write_data
from s2ft import evaluation as ev
from s2ft import loglik
from s2ft.cli import main


@pytest.mark.parametrize(
    "task, index, contexts, continuations, gold",
    [
        ("boolq", 0, ["Question: is the sun a star?\nAnswer:"], [" no", " yes"], 1),
        ("boolq", 1, ["Question: can fish climb trees?\nAnswer:"], [" no", " yes"], 0),
        ("piqa", 0, ["Question: How do I cool tea?\nAnswer:"], [" Put it in the fridge.", " Put it in the oven."], 0),
        ("social_i_qa", 0, ["Q: Tracy didn't go home. What does Tracy need to do before this?\nA:"],
         [" make a plan", " Go home", " Find somewhere to go"], 2),
        ("ARC-Easy", 0, ["Question: Which gas do plants take in: oxygen or carbon dioxide?\nAnswer:"],
         [" oxygen", " carbon dioxide", " helium", " neon"], 1),
        ("ARC-Easy", 2, ["Question: Which is a mammal?\nAnswer:"], [" shark", " trout", " whale", " eel", " crab"], 2),
        ("openbookqa", 0, ["There is most likely going to be fog around:"],
         [" a marsh", " a desert", " a volcano", " a field"], 0),
        ("hellaswag", 0, ["Roof shingle removal: A man is on a roof. he"],
         [" is using wrap.", " is ripping tiles off.", " holds a cube.", " starts pulling up roofing."], 3),
        ("winogrande", 0,
         ["Sarah was a better surgeon than Maria so Sarah", "Sarah was a better surgeon than Maria so Maria"],
         [" always got the harder cases."], 0),
    ],
)  # fmt: skip
def test_parse_every_format(task, index, contexts, continuations, gold):
    q = loglik.parse(records(task)[index], task)
    assert list(q.contexts) == contexts and list(q.continuations) == continuations and q.gold == gold
    assert len(q.pairs) == max(len(contexts), len(continuations))
    if task != "winogrande":  # acc_norm measures the option text without the delimiter
        assert list(q.choices) == [c[1:] for c in continuations]


@pytest.mark.parametrize(
    "task, record, match",
    [
        ("ARC-Easy", {"instruction": "Please choose: what?\n\nAnswer1: a\n\nAnswer format: a", "answer": "answer1"},
         "fewer than two"),
        ("ARC-Easy", {"instruction": "Please choose: what?\n\nAnswer1: a Answer2: b", "answer": "answer3"},
         "not one of the 2 options"),
        ("winogrande", {"instruction": "Please fill: no blank here\n\nOption1: x Option2: y", "answer": "option1"},
         "exactly one blank"),
        ("boolq", {"instruction": "Please answer: is it?", "answer": "maybe"}, "neither true nor false"),
        ("mmlu", {"instruction": "x", "answer": "a"}, "no log-likelihood form"),
    ],
)  # fmt: skip
def test_bad_records_are_named_errors(task, record, match):
    with pytest.raises(loglik.ParseError, match=match):
        loglik.parse(record, task)
    good = records(task)[:1] if task in loglik.TASKS else []
    with pytest.raises(loglik.ParseError, match=rf"f\.json: record {len(good)}: .*{match}"):
        loglik.parse_all([*good, record], task, "f.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ll")
    path = tiny_model_dir(root / "model")
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = T.AutoTokenizer.from_pretrained(path)
    return {"path": path, "model": model, "tok": tok, "data": write_data(root / "data")}


def test_scores_equal_one_at_a_time_float64(tiny):
    model, tok = tiny["model"], tiny["tok"]
    pairs = [p for task in loglik.TASKS for r in records(task) for p in loglik.parse(r, task).pairs]
    pairs.append(("Question: trailing space moves \nAnswer: ", "yes"))  # lm-eval moves it to the continuation
    got = loglik.score(model, tok, pairs, batch_size=3)
    ref = model.to(torch.float64)
    try:
        for (ctx, cont), s in zip(pairs, got, strict=True):
            n = len(ctx) - len(ctx.rstrip())
            c, x = (ctx[:-n], ctx[-n:] + cont) if n else (ctx, cont)
            whole = tok(c + x)["input_ids"]
            k = len(tok(c)["input_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(ref(input_ids=torch.tensor([whole])).logits[0], -1)
            want = sum(float(logp[i - 1, whole[i]]) for i in range(k, len(whole)))
            assert s == pytest.approx(want, abs=1e-3)
    finally:
        model.to(torch.float32)
    assert len({round(s, 3) for s in got}) > len(got) // 2  # the scores differ: the test can see a wrong one


def test_acc_norm_divides_by_characters():
    q = loglik.Question(("c",), (" ab", " abcdefgh"), ("ab", "abcdefgh"), 1)
    assert loglik.predict(q, [-4.0, -6.0]) == (0, 1)  # -4/2 = -2 < -6/8 = -0.75


def test_label_stats():
    s = loglik.label_stats([0, 0, 0, 1], [1, 1, 1, 1])
    assert s["majority_baseline"] == 0.75 and s["majority_label"] == 0
    assert s["pred_entropy"] == 0.0 and s["most_predicted"] == 1 and s["most_predicted_share"] == 1.0
    s = loglik.label_stats(["a", "b", "c", "d"], ["a", "b", "c", "d"])
    assert s["pred_entropy"] == pytest.approx(2.0) and s["entropy_max"] == pytest.approx(2.0)
    s = loglik.label_stats(["true", "false"], [None, "true"])  # no answer is a label of its own
    assert s["pred_entropy"] == pytest.approx(1.0)


def test_expand_loglik_tasks():
    assert ev.expand_tasks("arc-easy:ll,boolq") == ["ARC-Easy:ll", "boolq"]
    assert ev.expand_tasks("commonsense:ll") == [t + ":ll" for t in ev.COMMONSENSE_LABELS]
    with pytest.raises(ValueError, match="unknown task 'gsm8k:ll'"):
        ev.expand_tasks("gsm8k:ll")


def test_cli_loglik_columns_and_compare(tiny, tmp_path, capsys):
    argv = ["eval", "--model", str(tiny["path"]), "--data-dir", str(tiny["data"]), "--batch-size", "4"]
    argv += ["--tasks", "ARC-Easy:ll,winogrande:ll,boolq,piqa:ll", "--max-new-tokens", "4"]
    assert main([*argv, "--output-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "acc_norm" in out and "majority" in out and "H(pred)" in out
    res = json.loads((tmp_path / "a" / "results.json").read_text())["results"]
    arc = res["ARC-Easy:ll"]
    assert arc["n"] == 3 and 0 <= arc["acc_norm"] <= 1 and arc["majority_baseline"] == pytest.approx(1 / 3)
    assert 0 <= arc["pred_entropy"] <= math.log2(3) + 1e-9
    assert res["boolq"]["majority_baseline"] == pytest.approx(2 / 3) and "pred_entropy" in res["boolq"]
    rows = [json.loads(x) for x in (tmp_path / "a" / "ARC-Easy.ll.jsonl").read_text().splitlines()]
    assert [len(r["loglik"]) for r in rows] == [4, 3, 5]
    assert all(r["correct"] == (r["prediction"] == r["answer"]) for r in rows)

    # the same numbers as the library call
    _, lib = ev.run_loglik_task(tiny["model"], tiny["tok"], tiny["data"], "ARC-Easy", ev.EvalSettings(progress=False))
    for a, b in zip(rows, lib, strict=True):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-4)

    assert main([*argv, "--output-dir", str(tmp_path / "b"), "--limit", "2"]) == 0
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "a" / "results.json"), str(tmp_path / "b" / "results.json")]) == 0
    text = capsys.readouterr().out
    assert "norm A" in text and "H(pred) B" in text and "majority" in text and "ARC-Easy:ll" in text


def test_cli_malformed_file_names_file_and_record(tiny, tmp_path, capsys):
    bad = tmp_path / "data" / "test" / "commonsense" / "piqa"
    bad.mkdir(parents=True)
    recs = records("piqa") + [{"instruction": "Please choose: no options here", "answer": "solution1"}]
    (bad / "test.json").write_text(json.dumps(recs))
    argv = ["eval", "--model", str(tiny["path"]), "--data-dir", str(tmp_path / "data"), "--tasks", "piqa:ll"]
    assert main([*argv, "--output-dir", str(tmp_path / "o")]) == 2
    assert "piqa/test.json: record 2" in capsys.readouterr().err
