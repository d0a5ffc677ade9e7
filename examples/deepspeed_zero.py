"""DeepSpeed ZeRO-2 (or 3) on an S2FTModel through `deepspeed.initialize`; launch one process per
device: `torchrun --nproc_per_node N examples/deepspeed_zero.py` (gloo on CPU, NCCL on GPUs)."""

import argparse

import deepspeed
import torch

from s2ft import S2FTConfig, get_s2ft_model
from s2ft.integrations.deepspeed import gathered_adapter, register_zero3_params
from s2ft.loading import load_model, load_tokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2")
parser.add_argument("--output-dir", default="zero-out")
parser.add_argument("--stage", type=int, default=2, choices=(2, 3))
parser.add_argument("--max-steps", type=int, default=10)
args = parser.parse_args()

deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
tokenizer = load_tokenizer(args.model)
model = get_s2ft_model(load_model(args.model), S2FTConfig(ffn_ratio=0.05, attn_ratio=0.05))
config = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "torch_adam": True}},
    "zero_optimization": {"stage": args.stage},
    "bf16": {"enabled": torch.cuda.is_available()},
}
engine, *_ = deepspeed.initialize(
    model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
)
if args.stage == 3:
    register_zero3_params(model)  # generate() outside the engine's forward sees the deltas

texts = [f"What is {a} plus {b} ? The answer is {a + b} ." for a in range(1, 6) for b in range(1, 5)]
for step in range(args.max_steps):
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mine = texts[(2 * (step * world + rank)) % len(texts) :][:2]  # this rank's share of the batch
    batch = tokenizer(mine, return_tensors="pt", padding=True).to(engine.device)
    loss = engine(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
    engine.backward(loss)
    engine.step()

with gathered_adapter(model):  # ZeRO-3 partitions the deltas: gather them to save (a no-op for ZeRO-2)
    model.save_pretrained(args.output_dir)  # every rank calls; rank 0 writes
