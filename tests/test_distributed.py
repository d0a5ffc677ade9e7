"""A real 2-process `torchrun` (gloo, CPU) DDP run ends with the same trained blocks as one
process on the combined batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import free_port
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(args, tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run([sys.executable, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_torchrun_ddp_matches_single_process(tmp_path):
    _run(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(WORKER),
            str(tmp_path / "ddp.safetensors"),
        ],
        tmp_path,
    )
    _run([str(WORKER), str(tmp_path / "single.safetensors")], tmp_path)
    ddp, single = load_file(tmp_path / "ddp.safetensors"), load_file(tmp_path / "single.safetensors")
    assert set(ddp) == set(single) and len(ddp) > 0
    moved = 0
    for k, v in single.items():
        assert torch.allclose(ddp[k], v, atol=1e-10, rtol=0), k
        if k.endswith("delta"):
            moved += int(v.abs().max() > 0)
    assert moved > 0  # training really changed the blocks
