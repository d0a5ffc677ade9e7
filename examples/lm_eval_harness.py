"""lm-evaluation-harness on an S2FTModel in memory (unmerged: the adapter runs through s2ft's
layers), on the local commonsense files: `python examples/lm_eval_harness.py --data-dir ../shared/data`."""

import argparse

from s2ft import S2FTConfig, S2FTModel, get_s2ft_model
from s2ft.integrations.lm_eval import evaluate
from s2ft.loading import load_model, load_tokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2")
parser.add_argument("--adapter", help="an S²FT adapter directory (default: a fresh, untrained one)")
parser.add_argument("--data-dir", default="../shared/data")
parser.add_argument("--tasks", default="ARC-Easy,piqa")
parser.add_argument("--limit", type=int, default=50)
args = parser.parse_args()

base = load_model(args.model)
if args.adapter:
    model = S2FTModel.from_pretrained(base, args.adapter)
else:
    model = get_s2ft_model(base, S2FTConfig(ffn_ratio=0.05))
results = evaluate(model.eval(), load_tokenizer(args.model), args.tasks.split(","), args.data_dir, limit=args.limit)
for task, r in results.items():  # lm-eval's acc and acc_norm; per-option log-likelihoods in r["loglik"]
    print(f"{task:<14} acc {100 * r['acc']:.1f}  acc_norm {100 * r['acc_norm']:.1f}  n={r['n']}")

# the same model merged: the same numbers, at the base model's speed
merged = model.merge_and_unload().eval()
print(evaluate(merged, load_tokenizer(args.model), args.tasks.split(","), args.data_dir, limit=args.limit))
