"""`s2ft inspect` end to end on a tiny model on disk: the per-layer table, the heatmap, the
overlap of two adapters, calibration from a JSONL file, and LoRA budget matching."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_llama_for, word_tokenizer

from s2ft.cli import main
from s2ft.data import builtin_dataset


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    records = builtin_dataset("arc_easy")[1][:16]
    tok = word_tokenizer(records)
    tiny_llama_for(tok, num_hidden_layers=3).save_pretrained(path)
    tok.save_pretrained(path)
    with open(path / "calib.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_config_prints_table_and_heatmap(model_dir, capsys, tmp_path):
    code, out, err = run(
        capsys,
        "inspect",
        "--model",
        model_dir,
        "--ffn-ratio",
        "0.25",
        "--attn-ratio",
        "0.5",
        "--attn-modules",
        "v,o",
        "--plot",
        tmp_path / "h.png",
        "--save-adapter",
        tmp_path / "a",
    )
    assert code == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("layer"))
    assert "mlp.down_proj" in header and "self_attn.v_proj" in header
    total = next(line for line in lines if line.startswith("total"))
    # 12 channels x (32 + 32 + 32) + 2 heads x 8 x 32 (o) + one or two KV heads x 8 x 32 (v), per layer
    assert (
        int(total.split()[-1].replace(",", ""))
        == json.loads((tmp_path / "a" / "s2ft_config.json").read_text())["trainable_parameters"]
    )
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_two_adapters_reports_overlap(model_dir, capsys, tmp_path):
    for name, seed in (("a", 0), ("b", 1)):
        assert (
            run(
                capsys,
                "inspect",
                "--model",
                model_dir,
                "--ffn-ratio",
                "0.25",
                "--seed",
                seed,
                "--save-adapter",
                tmp_path / name,
            )[0]
            == 0
        )
    code, out, _ = run(capsys, "inspect", "--adapter", tmp_path / "a", "--adapter", tmp_path / "a")
    assert code == 0 and "jaccard 1.000" in out
    code, out, _ = run(
        capsys, "inspect", "--adapter", tmp_path / "a", "--adapter", tmp_path / "b", "--plot", tmp_path / "o.png"
    )
    assert code == 0 and "jaccard 1.000" not in out and (tmp_path / "o.png").exists()
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 3 * 3  # 3 layers x (up, gate, down)
    assert all(int(r[2]) == int(r[3]) == 12 and 0 <= int(r[4]) <= 12 for r in rows)  # 12 channels each


def test_inspect_data_strategy_uses_calibration_file(model_dir, capsys):
    code, out, err = run(
        capsys,
        "inspect",
        "--model",
        model_dir,
        "--ffn-ratio",
        "0.25",
        "--strategy",
        "gradient",
        "--calib-data",
        model_dir / "calib.jsonl",
        "--calib-samples",
        "8",
    )
    assert code == 0, err
    assert "selection (gradient, large)" in out
    code, _, err = run(capsys, "inspect", "--model", model_dir, "--strategy", "activation")
    assert code == 2 and "needs --calib-data" in err


def test_inspect_match_lora(model_dir, capsys):
    code, out, err = run(capsys, "inspect", "--model", model_dir, "--match-lora-rank", "4", "--lora-modules", "q,v")
    assert code == 0, err
    assert "lora_parameters=" in out and "ffn_units_per_layer=" in out


def test_console_script_help():
    proc = subprocess.run(
        [sys.executable, "-m", "s2ft.cli", "inspect", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0 and "--layer-allocation" in proc.stdout
