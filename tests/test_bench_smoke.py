"""Benchmarks stay runnable: each bench script in its tiny smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def run_bench(script: str, *args: str, timeout: int = 600) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_selection_cost_smoke(tmp_path):
    run_bench("selection_cost.py", "--smoke", "--out", str(tmp_path / "sel"))
    result = json.loads((tmp_path / "sel.json").read_text())
    assert {r["strategy"] for r in result["results"]} == {"random", "weight", "activation", "salience", "gradient"}
    assert (tmp_path / "sel.png").read_bytes()[:4] == b"\x89PNG"


def test_train_efficiency_smoke(tmp_path):
    run_bench("train_efficiency.py", "--smoke", "--out", str(tmp_path / "te"))
    result = json.loads((tmp_path / "te.json").read_text())
    methods = result["sizes"]["tiny"]["methods"]
    assert set(methods) == {"floor", "s2ft", "s2ft-thin", "lora", "dora", "full"}
    assert methods["s2ft-thin"]["trainable"] == methods["s2ft"]["trainable"]
    assert methods["floor"]["trainable"] == 0 and methods["floor"]["optimizer_bytes"] == 0
    assert 0 < methods["s2ft"]["trainable"] <= methods["lora"]["trainable"] < methods["full"]["trainable"]
    full = methods["full"]  # AdamW: two fp32 moments per parameter, plus a 4-byte step per tensor
    assert 8 * full["trainable"] <= full["optimizer_bytes"] < 8 * full["trainable"] + 4096
    assert methods["s2ft"]["time_vs_floor"] > 0 and (tmp_path / "te.png").read_bytes()[:4] == b"\x89PNG"


def test_ab_floor_smoke(tmp_path):
    run_bench("ab_floor.py", "--smoke", "--out", str(tmp_path / "ab.json"))
    result = json.loads((tmp_path / "ab.json").read_text())
    assert len(result["pairs"]) == 2 and result["median_ratio"] > 0


def test_serving_smoke(tmp_path):
    run_bench("serving.py", "--smoke", "--out", str(tmp_path / "sv"))
    result = json.loads((tmp_path / "sv.json").read_text())
    assert set(result["mixed"]) == {"2", "4", "8", "1 (active adapter)"}
    assert result["switch"]["merged_switch_s"]["s2ft"] > 0 and result["merged"]["base"] > 0
    assert (tmp_path / "sv.png").read_bytes()[:4] == b"\x89PNG"


def test_serve_load_smoke(tmp_path):
    run_bench("serve_load.py", "--smoke", "--out", str(tmp_path / "sl"))
    result = json.loads((tmp_path / "sl.json").read_text())
    assert set(result["points"]) == {"2/mixed", "2/switch"}
    assert all(p["errors"] == 0 and p["requests"] > 0 for p in result["points"].values())


def test_quantized_smoke(tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    run_bench("quantized.py", "--smoke", "--out", str(tmp_path / "q"))
    result = json.loads((tmp_path / "q.json").read_text())
    methods = result["sizes"]["tiny"]["methods"]
    assert list(methods) == ["floor4bit", "qs2ft", "qlora", "s2ft"]
    assert methods["floor4bit"]["trainable"] == 0 and methods["floor4bit"]["optimizer_bytes"] == 0
    assert methods["qs2ft"]["trainable"] == methods["s2ft"]["trainable"] == methods["qlora"]["s2ft_trainable"] > 0
    assert methods["qs2ft"]["trainable"] <= methods["qlora"]["trainable"]
    assert all(methods[m]["quantized_modules"] > 0 for m in ("floor4bit", "qs2ft", "qlora"))
    assert methods["s2ft"]["quantized_modules"] == 0
    assert methods["qs2ft"]["time_vs_qlora"] > 0 and methods["qs2ft"]["steps"] == 1
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"


def test_lm_eval_parity_smoke(tmp_path):
    pytest.importorskip("lm_eval")
    run_bench("lm_eval_parity.py", "--smoke", "--out", str(tmp_path / "p.json"))
    result = json.loads((tmp_path / "p.json").read_text())
    for task in ("ARC-Easy", "openbookqa"):
        r = result["tasks"][task]
        assert r["questions_predicted_differently"] == 0 and r["max_abs_loglik_gap"] < 1e-4
        assert r["s2ft_acc"] == r["lm_eval_acc"] and r["s2ft_acc_norm"] == r["lm_eval_acc_norm"]
