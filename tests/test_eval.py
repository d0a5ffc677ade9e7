"""`s2ft eval`: every answer-extraction rule on hand-written responses (the tricky ones too),
batched generation equals one-at-a-time generation, MMLU and perplexity equal brute force,
and the CLI end to end on a tiny data directory (results, per-example JSONL, chart, resume,
--compare)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_llama_for, word_tokenizer

from s2ft import evaluation as ev
from s2ft.cli import main
from s2ft.data import builtin_dataset, prompt


@pytest.mark.parametrize(
    ("task", "response", "want"),
    [
        ("ARC-Easy", "the correct answer is answer3", "answer3"),
        ("ARC-Easy", "The correct answer is Answer2.", "answer2"),
        ("ARC-Easy", "answer10 is not an option; answer1 is", "answer1"),  # not the "answer1" inside "answer10"
        ("ARC-Easy", "answer6", None),
        ("ARC-Easy", "I am not sure", None),
        ("ARC-Easy", "answer2 or answer4", "answer2"),  # the first match counts
        ("boolq", "the correct answer is TRUE", "true"),
        ("boolq", "false, because ...", "false"),
        ("boolq", "untrue statements", None),  # "true" inside a word is not an answer
        ("piqa", "solution2", "solution2"),
        ("piqa", "solution3", None),
        ("hellaswag", "ending4.", "ending4"),
        ("hellaswag", "ending5", None),
        ("winogrande", "the correct answer is option1", "option1"),
        ("social_i_qa", "answer5", "answer5"),
    ],
)
def test_commonsense_extraction(task, response, want):
    assert ev.commonsense_label(response, task) == want


@pytest.mark.parametrize(
    ("response", "want"),
    [
        ("The answer is 1,234.", 1234.0),
        ("He owes -5 dollars, so the answer is -5", -5.0),
        ("3.5 + 2 = 5.5", 5.5),
        ("The answer is $1,000,000.50", 1000000.5),
        ("no numbers here", None),
        ("answer1 then 42", 42.0),
        ("18 apples.\nThe answer is 18.", 18.0),
    ],
)
def test_last_number(response, want):
    assert ev.last_number(response) == want


def test_number_correct_tolerance():
    assert ev.number_correct(18.0, "18") and ev.number_correct(0.3333, 0.33329)
    assert not ev.number_correct(18.01, 18) and not ev.number_correct(None, 1)
    assert ev.number_correct(1234.0, "1,234") and not ev.number_correct(1.0, "n/a")


@pytest.mark.parametrize(
    ("response", "want"),
    [
        ("So the answer is (C).", "C"),
        ("Answer: B", "B"),
        ("The answer is option D", "D"),
        ("A train leaves at 5. It travels 60 km... The answer is E", "E"),  # not the first capital "A"
        ("Answer Choices: (A) 23 (B) 1000\nThe answer is (B)", "B"),
        ("... so we get 12.\n(D)", "D"),
        ("A train leaves at 5 and arrives at 7.", None),  # the original rule would read "A"
        ("", None),
        ("the answer is (c)", "C"),
    ],
)
def test_aqua_letter(response, want):
    assert ev.aqua_letter(response) == want


def test_wilson_interval():
    lo, hi = ev.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert ev.wilson(0, 10)[0] == 0.0 and ev.wilson(10, 10)[1] == 1.0


def test_expand_tasks():
    assert ev.expand_tasks("math") == list(ev.MATH_TASKS)
    assert ev.expand_tasks("arc-easy,boolq,boolq,mmlu") == ["ARC-Easy", "boolq", "mmlu"]
    with pytest.raises(ValueError, match="unknown task 'arcc'"):
        ev.expand_tasks("arcc")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model + tokenizer on disk and a data directory laid out like ../shared/data."""
    root = tmp_path_factory.mktemp("eval")
    arc = builtin_dataset("arc_easy")[1][:12]
    boolq = [
        {
            "instruction": f"Please answer true or false: is {w} a word?\n\nAnswer format: true/false",
            "input": "",
            "output": "",
            "answer": a,
        }
        for w, a in [("the", "true"), ("correct", "false"), ("answer", "true"), ("is", "false"), ("which", "true")]
    ]
    gsm = [
        {"instruction": f"What is {a} plus {b}?", "input": "", "output": "", "answer": str(a + b)}
        for a, b in [(1, 2), (3, 4), (10, 20)]
    ]
    aqua = [{"instruction": "Pick one. Answer Choices: (A) 1 (B) 2", "input": "", "output": "", "answer": "B"}]
    tok = word_tokenizer([*arc, *boolq, *gsm, *aqua])
    model = tiny_llama_for(tok).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked predictions: generations are not all the same token
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "data"
    for kind, task, recs in [
        ("commonsense", "ARC-Easy", arc),
        ("commonsense", "boolq", boolq),
        ("math", "gsm8k", gsm),
        ("math", "AQuA", aqua),
    ]:
        (data / "test" / kind / task).mkdir(parents=True)
        (data / "test" / kind / task / "test.json").write_text(json.dumps(recs))
    for split in ("dev", "test"):
        d = data / "probe" / "mmlu" / split
        d.mkdir(parents=True)
        for subj in ("anatomy", "astronomy"):
            rows = ["question,choice0,choice1,choice2,choice3,answer"]
            rows += [f"which {subj} answer {i} is correct,the,answer,is,correct,{i % 4}" for i in range(5)]
            (d / f"{subj}_{split}.csv").write_text("\n".join(rows) + "\n")
    (data / "probe" / "wikitext-2").mkdir(parents=True)
    (data / "probe" / "wikitext-2" / "test.txt").write_text(" ".join(prompt(r) for r in arc[:4]))
    return {"root": root, "model": model, "tok": tok, "data": data}


def test_batched_generation_equals_one_at_a_time(tiny):
    model, tok = tiny["model"], tiny["tok"]
    prompts = [prompt(r) for r in builtin_dataset("arc_easy")[1][:7]]
    s = ev.EvalSettings(batch_size=4, progress=False)
    batched = ev.generate(model, tok, prompts, s, max_new_tokens=6, desc="t")
    for p, got in zip(prompts, batched, strict=True):
        ids = torch.tensor([tok(p)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert got == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert len(set(batched)) > 1


def test_mmlu_and_perplexity_equal_brute_force(tiny):
    model, tok, data = tiny["model"], tiny["tok"], tiny["data"]
    s = ev.EvalSettings(batch_size=3, progress=False, mmlu_shots=2)
    result, rows = ev.run_mmlu(model, tok, data, s)
    assert result["n"] == 10 and result["shots"] == 2
    letters = [tok(f" {L}", add_special_tokens=False)["input_ids"][-1] for L in "ABCD"]
    brute = []
    for subj in ("anatomy", "astronomy"):
        dev = ev._read_csv(data / "probe" / "mmlu" / "dev" / f"{subj}_dev.csv")[:2]
        head = ev.MMLU_HEADER.format(subject=subj) + "".join(ev._mmlu_item(r, True) for r in dev)
        for r in ev._read_csv(data / "probe" / "mmlu" / "test" / f"{subj}_test.csv"):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([tok(head + ev._mmlu_item(r, False))["input_ids"]])).logits[0, -1]
            brute.append("ABCD"[int(logits[letters].argmax())])
    assert [r["prediction"] for r in rows] == brute

    s = ev.EvalSettings(ppl_window=16, progress=False)
    result, _ = ev.run_perplexity(model, tok, data / "probe" / "wikitext-2" / "test.txt", s)
    ids = tok((data / "probe" / "wikitext-2" / "test.txt").read_text(), add_special_tokens=False)["input_ids"]
    nll, n = 0.0, 0
    for i in range(0, len(ids), 16):
        w = ids[i : i + 16]
        if len(w) < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([w])).logits[0, :-1].double(), -1)
        nll -= float(logp.gather(-1, torch.tensor(w[1:]).unsqueeze(-1)).sum())
        n += len(w) - 1
    assert result["tokens"] == n and result["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_cli_end_to_end_resume_and_compare(tiny, tmp_path, capsys):
    argv = ["eval", "--model", str(tiny["root"] / "model"), "--data-dir", str(tiny["data"]), "--batch-size", "4"]
    argv += ["--tasks", "ARC-Easy,boolq,gsm8k,AQuA,mmlu,wikitext2", "--max-new-tokens", "8", "--ppl-window", "32"]
    out = tmp_path / "a"
    assert main([*argv, "--output-dir", str(out), "--limit", "4"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["results"]) == ["ARC-Easy", "boolq", "gsm8k", "AQuA", "mmlu", "wikitext2"]
    assert res["results"]["ARC-Easy"]["n"] == 4 and res["results"]["gsm8k"]["n"] == 3  # --limit caps, never pads
    lines = [json.loads(x) for x in (out / "ARC-Easy.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {"response", "prediction", "answer", "correct"} <= set(lines[0])
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main([*argv, "--output-dir", str(out), "--limit", "4"]) == 0  # resume: nothing left to do
    assert "nothing new" in capsys.readouterr().out
    assert main([*argv, "--output-dir", str(tmp_path / "b"), "--limit", "5"]) == 0
    capsys.readouterr()
    assert main(["eval", "--compare", str(out / "results.json"), str(tmp_path / "b" / "results.json")]) == 0
    text = capsys.readouterr().out
    assert "ARC-Easy" in text and "wikitext2" in text
    assert main([*argv, "--output-dir", str(tmp_path / "c"), "--tasks", "nope"]) == 2
    assert main(["eval", "--model", str(tiny["root"] / "model"), "--data-dir", str(tmp_path), "--tasks", "piqa"]) == 2
    assert "no commonsense/piqa/test.json" in capsys.readouterr().err
