"""Supervised fine-tuning with TRL's SFTTrainer on an S2FTModel (plain text or chat messages)."""

import argparse

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from s2ft import S2FTConfig, S2FTModel, get_s2ft_model
from s2ft.integrations.transformers import S2FTCallback
from s2ft.loading import load_model, load_tokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2")  # a Hub id, a local directory or a .gguf
parser.add_argument("--output-dir", default="sft-out")
parser.add_argument("--max-steps", type=int, default=30)
parser.add_argument("--chat", action="store_true", help="conversational records ('messages')")
args = parser.parse_args()

tokenizer = load_tokenizer(args.model)
model = get_s2ft_model(load_model(args.model), S2FTConfig(ffn_ratio=0.05, attn_ratio=0.05))

pairs = [(f"What is {a} plus {b} ?", f"The answer is {a + b} .") for a in range(1, 6) for b in range(1, 5)]
if args.chat:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]} for q, r in pairs]
else:
    rows = [{"text": f"{q} {r}"} for q, r in pairs]

trainer = SFTTrainer(
    model=model,  # the S2FTModel itself: no peft_config
    args=SFTConfig(
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
    callbacks=[S2FTCallback()],  # checkpoints and the final save in the s2ft adapter format
)
trainer.train()

# the adapter is in args.output_dir (and in every checkpoint-N): load it onto a fresh base
reloaded = S2FTModel.from_pretrained(load_model(args.model), args.output_dir)
print("trained", reloaded.get_nb_trainable_parameters()[0], "parameters; adapter in", args.output_dir)
