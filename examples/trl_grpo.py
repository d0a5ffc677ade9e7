"""Online RL with TRL's GRPO on an S2FTModel. With `beta > 0` the KL reference is the same model
with its S²FT adapter disabled (`S2FTGRPOTrainer`), not a second copy of the base."""

import argparse

import torch
from datasets import Dataset
from trl import GRPOConfig

from s2ft import S2FTConfig, get_s2ft_model
from s2ft.integrations.transformers import S2FTCallback
from s2ft.integrations.trl import S2FTGRPOTrainer
from s2ft.loading import load_model, load_tokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2")
parser.add_argument("--output-dir", default="grpo-out")
parser.add_argument("--max-steps", type=int, default=20)
args = parser.parse_args()

tokenizer = load_tokenizer(args.model)
model = get_s2ft_model(load_model(args.model), S2FTConfig(ffn_ratio=0.05, attn_ratio=0.05))
prompts = Dataset.from_list([{"prompt": f"What is {a} plus {b} ?"} for a in range(1, 6) for b in range(1, 5)])


def short_answers(completions, **_):
    """A toy reward: shorter completions score higher."""
    return [-len(c.split()) / 10 for c in completions]


trainer = S2FTGRPOTrainer(
    model=model,
    reward_funcs=short_answers,
    args=GRPOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        learning_rate=2e-3,
        beta=0.04,  # > 0: a KL penalty against the reference (the adapter disabled)
        logging_steps=5,
        save_steps=10,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),  # CPU-only machines: train on the CPU
    ),
    train_dataset=prompts,
    processing_class=tokenizer,
    callbacks=[S2FTCallback()],
)
trainer.train()
