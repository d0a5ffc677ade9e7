"""Worker for test_deepspeed.py: train a tiny float32 S2FT model for a few AdamW steps, either as
one of the `torchrun` ranks under DeepSpeed ZeRO (each rank gets its share of the batch) or alone
without DeepSpeed on the whole batch (the reference), then save the adapter into OUT_DIR.

    deepspeed_worker.py OUT_DIR [--stage N]

Without RANK in the environment it runs the single-process reference. Under DeepSpeed it first
saves without `gathered_adapter` into OUT_DIR-ungathered (the error text, if any, is reported),
then with it into OUT_DIR. OUT_DIR.json gets the mean loss of each step (over all ranks), the
greedy continuations of two prompts before and after training (`generate` does not run through
the engine's forward, so it needs `register_zero3_params`), and under DeepSpeed what `register_zero3_params`
returned and how many external parameters DeepSpeed registered on the whole model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from conftest import batch, tiny_model

from s2ft import AdapterError, S2FTConfig, get_s2ft_model
from s2ft.integrations.deepspeed import gathered_adapter, register_zero3_params

STEPS = 3
BATCH = 4
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-2, (0.9, 0.999), 1e-8, 0.0, 1.0
CONFIG = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, attn_modules=("q", "k", "v", "o"), seed=0)


def ds_config(stage: int, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": BATCH // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        # torch_adam: torch.optim.AdamW; without it DeepSpeed JIT-compiles its FusedAdam op for the CPU
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY, "torch_adam": True},
        },
        "zero_optimization": {
            "stage": stage,
            # partition even the tiny test tensors (by default those under 1e5 elements stay whole)
            "stage3_param_persistence_threshold": 0,
        },
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--stage", type=int, default=3)
    args = ap.parse_args()
    model = get_s2ft_model(tiny_model("llama", dtype=torch.float32), CONFIG)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = batch(n=BATCH, t=12, seed=9)
    prompts = batch(n=2, t=4, seed=3)
    losses = []
    report = {}
    if "RANK" not in os.environ:  # the reference: one process, no DeepSpeed, the whole batch
        report["generated_before"] = _generate(model, prompts)
        opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
        for _ in range(STEPS):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            opt.step()
            losses.append(loss.item())
        model.save_pretrained(args.out)
        report.update(losses=losses, generated=_generate(model, prompts))
        _write(args.out + ".json", report)
        return

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = ids.chunk(world)[rank]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config(args.stage, world))
    registered = register_zero3_params(engine.module)  # after initialize, before the first forward
    report["generated_before"] = _generate(engine.module, prompts)  # before any forward of the engine
    for _ in range(STEPS):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    report.update(
        losses=losses,
        registered=registered,
        model_external_params=len(getattr(engine.module, "_external_params", {})),
        generated=_generate(engine.module, prompts),
        ungathered_save="saved",
    )
    try:
        engine.module.save_pretrained(args.out + "-ungathered")
    except AdapterError as e:  # raised on rank 0, the only rank that writes
        report["ungathered_save"] = f"{type(e).__name__}: {e}"
    with gathered_adapter(engine.module):  # a collective: every rank enters, rank 0 writes
        engine.module.save_pretrained(args.out)
    if rank == 0:
        _write(args.out + ".json", report)
    dist.barrier()
    dist.destroy_process_group()


def _generate(model, prompts: torch.Tensor) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(input_ids=prompts, max_new_tokens=4, do_sample=False, pad_token_id=0)
    return out.tolist()


def _write(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


if __name__ == "__main__":
    main()
