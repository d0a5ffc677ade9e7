"""docs/INTEGRATIONS.md: every example it shows is a file in examples/, shown verbatim, and runs
here on a tiny model; every launch command it shows is the one a test runs."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, tiny_llama_for, word_tokenizer

from s2ft import S2FTModel
from s2ft.loading import load_model

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "INTEGRATIONS.md"
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
MARKER = re.compile(r"<!-- example: (examples/[\w.]+) -->\n```python\n(.*?)```", re.S)


def test_every_example_is_in_the_docs_verbatim():
    shown = dict(MARKER.findall(DOC.read_text()))
    assert set(shown) == {f"examples/{p.name}" for p in EXAMPLES}
    for name, code in shown.items():
        assert code == (ROOT / name).read_text(), f"{name} differs from its copy in docs/INTEGRATIONS.md"


def test_launch_commands_in_the_docs_are_the_tested_ones():
    import test_train_cli

    text = DOC.read_text()
    for command in (test_train_cli.TORCHRUN_DOC, test_train_cli.ACCELERATE_DOC):
        assert command in text, command


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random LLaMA + word tokenizer that knows every word of the examples."""
    words = " ".join(p.read_text() for p in EXAMPLES) + " " + " ".join(str(i) for i in range(30))
    tok = word_tokenizer([{"instruction": "", "input": "", "output": words}])
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama_for(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _run_example(name, tmp_path, monkeypatch, *args):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("trl_sft.py", []),
        ("trl_sft.py", ["--chat"]),
        ("trl_dpo.py", []),
        ("trl_grpo.py", []),
        ("trainer_callback.py", []),
    ],
)
def test_example_runs(name, extra, tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    out = tmp_path / "out"
    _run_example(name, tmp_path, monkeypatch, "--model", str(tiny_dir), "--output-dir", str(out), "--max-steps", "4")
    assert (out / "s2ft_config.json").is_file() and (out / "checkpoint-4" / "s2ft_config.json").is_file()
    S2FTModel.from_pretrained(load_model(str(tiny_dir)), out)


def test_deepspeed_example_runs_on_two_processes(tiny_dir, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(free_port()), str(ROOT / "examples" / "deepspeed_zero.py")]
    cmd += ["--model", str(tiny_dir), "--output-dir", str(out), "--max-steps", "2"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    S2FTModel.from_pretrained(load_model(str(tiny_dir)), out)


def test_lm_eval_example_runs(tiny_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from lm_eval_fixtures import write_data

    data = write_data(tmp_path / "data")
    _run_example("lm_eval_harness.py", tmp_path, monkeypatch, "--model", str(tiny_dir), "--data-dir", str(data))
    out = capsys.readouterr().out
    assert "ARC-Easy" in out and "acc_norm" in out and "piqa" in out
