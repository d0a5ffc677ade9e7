"""The demo's one-pass evaluator (left padding, position_ids, logits_to_keep, shared-prefix
label scoring) agrees with a brute-force unbatched scorer; data reading reports file:line."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_for, word_tokenizer

from s2ft.data import DataError, builtin_dataset, read_jsonl, tokenize
from s2ft.demo import candidates, evaluate


@torch.no_grad()
def _brute_force(model, tok, records):
    correct, nll, n = 0, 0.0, 0
    for rec in records:
        seq = tokenize(rec, tok, 512)
        ids, labels = torch.tensor([seq["input_ids"]]), torch.tensor([seq["labels"]])
        valid = int((labels[:, 1:] != -100).sum())
        nll += float(model(input_ids=ids, labels=labels).loss) * valid
        n += valid
        scores = {}
        for cand in candidates(rec):
            s = tokenize(rec, tok, 512, response=f"the correct answer is {cand}")
            ids = torch.tensor([s["input_ids"][:-1]])  # without EOS: score up to the label token
            lab = s["labels"][:-1]
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            scores[cand] = sum(float(logp[t, lab[t + 1]]) for t in range(len(lab) - 1) if lab[t + 1] != -100)
        correct += max(scores, key=scores.get) == rec["answer"]
    return correct / len(records), nll / n


def test_one_pass_evaluator_matches_brute_force():
    records = builtin_dataset("arc_easy")[1][:24]
    tok = word_tokenizer(records)
    model = tiny_llama_for(tok).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # spread the predictions so accuracy is not degenerate
    got = evaluate(model, tok, records, batch_size=5)
    acc, loss = _brute_force(model, tok, records)
    assert got["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert got["loss"] == pytest.approx(loss, rel=1e-6)  # evaluate() takes log-softmax in float32
    assert 0 < acc < 1


def test_builtin_dataset_and_candidates():
    train, held = builtin_dataset("arc_easy")
    assert len(train) == 1000 and len(held) == 200
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held}
    assert all(r["answer"] in candidates(r) for r in held)


def test_read_jsonl_reports_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON"):
        read_jsonl(p)
    p.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: missing or non-string field\(s\) \['output'\]"):
        read_jsonl(p)
    p.write_bytes(b'{"instruction": "\xff"}')
    with pytest.raises(DataError, match="not UTF-8"):
        read_jsonl(p)
    p.write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(p)


def test_tokenize_masks_prompt_and_keeps_response_when_truncating():
    rec = builtin_dataset("arc_easy")[1][0]
    tok = word_tokenizer([rec])
    full = tokenize(rec, tok, 10_000)
    n_resp = sum(t != -100 for t in full["labels"])
    assert full["input_ids"][-1] == tok.eos_token_id and n_resp == len(tok(rec["output"])["input_ids"]) + 1
    short = tokenize(rec, tok, n_resp + 5)
    assert len(short["input_ids"]) == n_resp + 5
    assert short["labels"][-n_resp:] == full["labels"][-n_resp:]


def test_plot_loss_writes_png_even_without_points(tmp_path):
    from s2ft.plots import plot_loss

    for name, points in (("some", [(1, 2.0), (2, 1.5)]), ("none", [])):
        path = plot_loss({"train": points}, tmp_path / f"{name}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_option_parsing_covers_every_shipped_record():
    from s2ft.data import options, with_option_text

    train, held = builtin_dataset("arc_easy")
    text_train, _ = builtin_dataset("arc_easy_text")
    for rec in train + held:
        opts = options(rec)
        assert 3 <= len(opts) <= 5 and all(opts)
        assert with_option_text(rec)["output"] == opts[int(rec["answer"][-1]) - 1]
    assert text_train[0]["output"] == options(train[0])[int(train[0]["answer"][-1]) - 1]


@torch.no_grad()
def test_option_scoring_matches_brute_force():
    from s2ft.data import options
    from s2ft.demo import evaluate_options

    records = builtin_dataset("arc_easy")[1][:10]
    tok = word_tokenizer(records)
    model = tiny_llama_for(tok).double().eval()
    model.lm_head.weight.mul_(50)
    got = evaluate_options(model, tok, records, batch_size=7)
    correct, nll, n = 0, 0.0, 0
    for rec in records:
        scores = []
        for j, text in enumerate(options(rec)):
            seq = tokenize(rec, tok, 512, response=text)
            ids, lab = torch.tensor([seq["input_ids"]]), seq["labels"]
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            lp = [float(logp[t, lab[t + 1]]) for t in range(len(lab) - 1) if lab[t + 1] != -100]
            scores.append(sum(lp[:-1]) / len(lp[:-1]))  # mean over the text, EOS excluded
            if j == int(rec["answer"][-1]) - 1:
                nll -= sum(lp)
                n += len(lp)
        correct += max(range(len(scores)), key=scores.__getitem__) == int(rec["answer"][-1]) - 1
    assert got["accuracy"] == pytest.approx(correct / len(records), abs=1e-12)
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)
