"""Worker for test_fsdp.py: train a tiny S²FT LLaMA for a few AdamW steps under FSDP2
(`fully_shard`, gloo, CPU) or alone on the whole batch; write the first step's delta gradients,
the adapter (`save_pretrained`, every rank gathers, rank 0 writes) and merge/unmerge logits.

    python fsdp_worker.py OUT single            # one process, the whole batch
    torchrun --nproc_per_node 2 fsdp_worker.py OUT layer    # fully_shard each decoder layer + root
    torchrun --nproc_per_node 2 fsdp_worker.py OUT linear   # also each base nn.Linear on its own
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from conftest import batch, tiny_model

from s2ft import S2FTConfig, get_s2ft_model
from s2ft.layers import S2FTLayer

STEPS = 3
CFG = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, attn_modules=("q", "k", "v", "o"), seed=0)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def main(out: str, mode: str) -> None:
    model = get_s2ft_model(tiny_model("llama"), CFG)
    ids = batch(n=4, t=12, seed=9)
    rank = 0
    if mode != "single":
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        ids = ids.chunk(world)[rank]
        if mode == "linear":
            for m in model.modules():
                if isinstance(m, S2FTLayer):
                    fully_shard(m.base_layer)  # the frozen weight in its own group
        for block in model.get_base_model().model.layers:
            fully_shard(block)
        fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first_grads = {}
    for step in range(STEPS):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        if step == 0:
            first_grads = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
    model.save_pretrained(os.path.join(out, "adapter"))  # collective under FSDP
    full = batch(n=4, t=12, seed=9)
    probe = full.chunk(2)[rank] if mode != "single" else full[:2]
    with torch.no_grad():
        logits = {"unmerged": model(input_ids=probe).logits}
        model.merge()
        logits["merged"] = model(input_ids=probe).logits
        model.unmerge()
        logits["after_unmerge"] = model(input_ids=probe).logits
    if rank == 0:
        save_file({k: v.contiguous() for k, v in first_grads.items()}, os.path.join(out, "grads.safetensors"))
        save_file({k: v.contiguous() for k, v in logits.items()}, os.path.join(out, "logits.safetensors"))
    if mode != "single":
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Skip interpreter teardown: gloo's threads occasionally abort it ("terminate called without an
    # active exception", SIGABRT) after the process group is destroyed and every result is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
