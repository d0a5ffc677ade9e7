"""Worker for test_distributed.py: train a tiny S2FT model for a few AdamW steps, either as one
of the `torchrun` DDP ranks (each rank gets its half of the batch) or alone on the whole batch,
and write the trained blocks to a safetensors file."""

from __future__ import annotations

import gc
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from conftest import batch, tiny_model

from s2ft import S2FTConfig, get_s2ft_model

STEPS = 3


def main(out: str) -> None:
    distributed = "RANK" in os.environ
    model = get_s2ft_model(tiny_model("llama"), S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, seed=0))
    # an inactive second adapter: its deltas must not require grad, or DDP waits for their
    # gradients ("Expected to have finished reduction") at the second step
    model.add_adapter("other", S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, seed=1))
    ids = batch(n=4, t=12, seed=9)
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        ids = ids.chunk(world)[rank]
        train_model = torch.nn.parallel.DistributedDataParallel(model)  # broadcast_buffers left at True
    else:
        rank, train_model = 0, model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(STEPS):
        opt.zero_grad()
        train_model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    if distributed:
        # Let the last allreduce finish and free DDP's Reducer while the process group is alive.
        # Otherwise the Reducer can be freed at interpreter exit holding the GIL while it joins a
        # gloo thread that needs the GIL: a PyTorch teardown deadlock (seen with torch 2.13, gloo).
        dist.barrier()
        del train_model
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Skip interpreter teardown: gloo's threads occasionally abort it ("terminate called without an
    # active exception", SIGABRT) after the process group is destroyed and every result is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
