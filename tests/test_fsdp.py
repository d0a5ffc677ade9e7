"""FSDP2 (`fully_shard`, gloo, 2 real `torchrun` processes on CPU): S²FT trains as one process
does, whether the decoder layers or also each frozen base Linear are sharded; the trained blocks
are written into the local weight shards; `save_pretrained` gathers the whole adapter; merge and
unmerge work on sharded weights."""

from __future__ import annotations

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

from s2ft.adapter_io import read_adapter
from test_distributed import _run


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _run([str(_worker()), str(out), "single"], out)
    return out


def _worker():
    from pathlib import Path

    return Path(__file__).with_name("fsdp_worker.py")


@pytest.mark.parametrize("mode", ["layer", "linear"])
def test_fully_shard_matches_one_process(single, tmp_path, mode):
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    _run([*args, "--master_port", str(free_port()), str(_worker()), str(tmp_path), mode], tmp_path)
    want, got = load_file(single / "grads.safetensors"), load_file(tmp_path / "grads.safetensors")
    assert set(got) == set(want) and len(want) == 14
    for k, g in want.items():
        assert (got[k] - g).norm() <= 1e-6 * g.norm(), k  # delta gradients within 1e-6 relative
    meta_a, a = read_adapter(tmp_path / "adapter")  # the whole adapter, gathered from the shards
    meta_b, b = read_adapter(single / "adapter")
    assert meta_a["modules"] == meta_b["modules"]
    for path, parts in b.items():
        for part, t in parts.items():
            assert torch.allclose(a[path][part], t, rtol=0, atol=1e-6), (path, part)
    logits = load_file(tmp_path / "logits.safetensors")
    assert (logits["merged"] - logits["unmerged"]).abs().max() <= 1e-10
    assert torch.equal(logits["after_unmerge"], logits["unmerged"])
    ref = load_file(single / "logits.safetensors")["unmerged"]
    assert (logits["unmerged"] - ref).abs().max() <= 1e-6  # rank 0 probes the same rows as the single run


def test_a_first_shard_of_a_row_only_layer_is_not_taken_for_the_whole_weight():
    """Rank 0's shard of a row-selected weight starts at offset 0 and keeps every column: it
    must still count as a shard (base outputs cannot be recomputed from its backup alone)."""
    from conftest import tiny_model

    from s2ft import S2FTConfig, get_s2ft_model
    from s2ft.layers import _local, _plan

    model = get_s2ft_model(tiny_model("llama"), S2FTConfig(ffn_ratio=0.25, seed=0))
    layer = model.get_base_model().model.layers[0].mlp.up_proj  # rows only
    d = layer.s2ft["default"]
    w, row_off, col_off, b, b_off = _local(layer.base_layer)
    assert _plan("default", d, layer.base_layer, w, row_off, col_off, b, b_off).full
    first_half = w[: w.shape[0] // 2]  # what rank 0 of 2 holds under fully_shard (Shard(0))
    assert not _plan("default", d, layer.base_layer, first_half, 0, 0, b, b_off).full
