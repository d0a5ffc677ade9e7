"""transformers.Trainer on an S2FTModel: checkpoints and the final save in the s2ft format."""

import argparse

import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from s2ft import S2FTConfig, S2FTModel, get_s2ft_model
from s2ft.integrations.transformers import S2FTCallback
from s2ft.loading import load_model, load_tokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2")
parser.add_argument("--output-dir", default="trainer-out")
parser.add_argument("--max-steps", type=int, default=30)
args = parser.parse_args()

tokenizer = load_tokenizer(args.model)
model = get_s2ft_model(load_model(args.model), S2FTConfig(ffn_ratio=0.05, attn_ratio=0.05))
texts = [f"What is {a} plus {b} ? The answer is {a + b} ." for a in range(1, 6) for b in range(1, 5)]
data = Dataset.from_dict(tokenizer(texts))

trainer = Trainer(
    model=model,
    args=TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        save_steps=10,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),  # CPU-only machines: train on the CPU
    ),
    train_dataset=data,
    data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    callbacks=[S2FTCallback()],
)
trainer.train()
trainer.save_model()  # Trainer's own file (for resume) beside the s2ft adapter the callback wrote

# any checkpoint, or the output directory, loads as an adapter
last = S2FTModel.from_pretrained(load_model(args.model), f"{args.output_dir}/checkpoint-{args.max_steps}")
final = S2FTModel.from_pretrained(load_model(args.model), args.output_dir)
