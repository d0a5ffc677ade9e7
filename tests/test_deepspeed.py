"""DeepSpeed ZeRO-3 and ZeRO-2 (2 real `torchrun` processes, gloo, CPU, fp32): S²FT trains as one
process without DeepSpeed does on the whole batch, `gathered_adapter` + `save_pretrained` writes
the whole adapter, which `S2FTModel.from_pretrained` loads, and a save under ZeRO-3 without the
gather is an AdapterError, never an empty adapter.

Skipped without deepspeed (not a dependency of s2ft). The first DeepSpeed run on a machine
JIT-compiles DeepSpeed's CPU shared-memory communication op (about 2 minutes on 2 cores; cached
in ~/.cache/torch_extensions afterwards), hence the generous subprocess timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import batch, free_port, tiny_model

from s2ft import S2FTModel
from s2ft.adapter_io import read_adapter

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")

WORKER = Path(__file__).with_name("deepspeed_worker.py")
TOL = 1e-5  # fp32, 3 AdamW steps with lr 1e-2: deltas reach ~3e-2, measured differences ~2e-7


def _run(args: list[str], cwd: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",  # CPU and gloo even on a machine with a GPU
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "adapter"
    _run([str(WORKER), str(out)], out.parent)
    return out


@pytest.fixture(scope="module", params=[3, 2], ids=["zero3", "zero2"])
def zero_run(request, tmp_path_factory) -> tuple[int, Path]:
    stage = request.param
    out = tmp_path_factory.mktemp(f"zero{stage}") / "adapter"
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    _run([*launch, "--master_port", str(free_port()), str(WORKER), str(out), "--stage", str(stage)], out.parent)
    return stage, out


def _report(out: Path) -> dict:
    return json.loads(Path(f"{out}.json").read_text())


def test_zero_matches_single_process(reference, zero_run):
    stage, out = zero_run
    meta_ref, want = read_adapter(reference)
    meta, got = read_adapter(out)
    assert meta["modules"] == meta_ref["modules"] and len(want) == 14
    moved = 0
    for path, parts in want.items():
        assert set(got[path]) == set(parts), path
        for part, t in parts.items():
            assert got[path][part].shape == t.shape, (path, part)
            if part.endswith("_idx"):
                assert torch.equal(got[path][part], t), (path, part)
            else:
                assert (got[path][part] - t).abs().max() <= TOL, (path, part)
                moved += int(t.abs().max() > 1e-3)
    assert moved > 0  # training really changed the blocks
    ref, rep = _report(reference), _report(out)
    assert rep["losses"] == pytest.approx(ref["losses"], abs=TOL)
    assert rep["generated_before"] == ref["generated_before"]  # generate before the engine's first forward
    assert rep["generated"] == ref["generated"]  # engine.module.generate sees the trained blocks
    if stage == 3:
        assert rep["registered"] == 14  # one delta per wrapped Linear of the tiny LLaMA
        # no wrapped base weight became an external parameter of the whole model (gathered all forward)
        assert rep["model_external_params"] == 0
    else:
        assert rep["registered"] == 0  # ZeRO-2 does not partition parameters: nothing to register


def test_saved_adapter_loads(reference, zero_run):
    _, out = zero_run
    ids = batch(n=2, t=10, seed=5)
    logits = []
    for path in (out, reference):
        model = S2FTModel.from_pretrained(tiny_model("llama", dtype=torch.float32), path)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert (logits[0] - logits[1]).abs().max() <= 1e-4


def test_save_without_gather(zero_run):
    stage, out = zero_run
    rep = _report(out)
    ungathered = Path(f"{out}-ungathered")
    if stage == 3:  # the deltas are 0-element partitions outside GatheredParameters
        assert rep["ungathered_save"].startswith("AdapterError: cannot write adapter"), rep["ungathered_save"]
        assert "has shape (0,), expected" in rep["ungathered_save"]
        assert not ungathered.exists()  # nothing written, not an empty adapter
    else:  # ZeRO-2 keeps whole parameters on every rank: the gather is not needed
        assert rep["ungathered_save"] == "saved"
        _, a = read_adapter(ungathered)
        _, b = read_adapter(out)
        assert all(torch.equal(a[p][k], t) for p, parts in b.items() for k, t in parts.items())
