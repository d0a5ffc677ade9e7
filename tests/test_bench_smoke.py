"""Benchmarks stay runnable: each bench script in its tiny smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_selection_cost_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "selection_cost.py"), "--smoke", "--out", str(tmp_path / "sel")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "sel.json").read_text())
    assert {r["strategy"] for r in result["results"]} == {"random", "weight", "activation", "salience", "gradient"}
    assert (tmp_path / "sel.png").read_bytes()[:4] == b"\x89PNG"
