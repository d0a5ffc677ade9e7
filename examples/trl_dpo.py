"""Preference tuning with TRL's DPOTrainer; the reference policy is the same model with its S²FT
adapter disabled, so there is one copy of the base weights."""

import argparse

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from s2ft import S2FTConfig, get_s2ft_model
from s2ft.integrations.transformers import S2FTCallback
from s2ft.integrations.trl import reference_model
from s2ft.loading import load_model, load_tokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2")
parser.add_argument("--output-dir", default="dpo-out")
parser.add_argument("--max-steps", type=int, default=30)
args = parser.parse_args()

tokenizer = load_tokenizer(args.model)
model = get_s2ft_model(load_model(args.model), S2FTConfig(ffn_ratio=0.05, attn_ratio=0.05))

rows = [
    {
        "prompt": f"What is {a} plus {b} ?",
        "chosen": f" The answer is {a + b} .",
        "rejected": f" The answer is {a + b + 1} .",
    }
    for a in range(1, 6)
    for b in range(1, 5)
]
trainer = DPOTrainer(
    model=model,
    ref_model=reference_model(model),  # the base model = this model with the adapter disabled
    args=DPOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        logging_steps=5,
        save_steps=10,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),  # CPU-only machines: train on the CPU
    ),
    train_dataset=Dataset.from_list(rows),
    processing_class=tokenizer,
    callbacks=[S2FTCallback()],
)
trainer.train()
print({k: v for k, v in trainer.state.log_history[-1].items() if k.startswith("rewards/")})
