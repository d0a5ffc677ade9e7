"""What selection costs, next to one training step (issue: "Selection must be fast").

In one process: load the model, then for each strategy time `get_s2ft_model` (selection plus
calibration on `--calib-samples` ARC-Easy records) and one S²FT training step (AdamW, batch
4 × 256) for scale. Prints a table, writes JSON and a PNG bar chart.

    python bench/selection_cost.py                  # SmolLM2-135M-Instruct, 64 calibration samples
    python bench/selection_cost.py --smoke          # tiny random model, for CI
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from s2ft import S2FTConfig, get_s2ft_model
from s2ft.selection import STRATEGIES


def _tiny():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = T.AutoModelForCausalLM.from_config(cfg)
    batches = [{"input_ids": torch.randint(0, 128, (4, 32))} for _ in range(2)]
    return model, batches, 128


def _smollm2(samples: int):
    from s2ft.data import builtin_dataset, calibration_batches
    from s2ft.loading import load_model, load_tokenizer

    model = load_model("smollm2", dtype=torch.float32)
    tok = load_tokenizer("smollm2")
    train, _ = builtin_dataset("arc_easy")
    return model, calibration_batches(train, tok, n_samples=samples, batch_size=8), model.config.vocab_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2 calibration batches")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--ffn-ratio", type=float, default=0.03)
    ap.add_argument("--out", default="bench/results/selection_cost")
    args = ap.parse_args()

    model, batches, vocab = _tiny() if args.smoke else _smollm2(args.calib_samples)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # warm-up, so the first strategy timed does not pay for it
        model(input_ids=batches[0]["input_ids"])
    results = []
    for strategy in STRATEGIES:
        model.load_state_dict(base_state)
        t = time.perf_counter()
        s2ft = get_s2ft_model(model, S2FTConfig(ffn_ratio=args.ffn_ratio, strategy=strategy), calibration=batches)
        seconds = time.perf_counter() - t
        results.append({"strategy": strategy, "seconds": round(seconds, 3)})
        print(f"{strategy:>10}: {seconds:7.2f} s")
        model = s2ft.unload()

    # one training step for scale (after a warm-up step)
    s2ft = get_s2ft_model(model, S2FTConfig(ffn_ratio=args.ffn_ratio))
    ids = torch.randint(0, vocab, (4, 32 if args.smoke else 256))
    opt = torch.optim.AdamW([p for p in s2ft.parameters() if p.requires_grad], lr=1e-4)
    steps = []
    for _ in range(3):
        t = time.perf_counter()
        s2ft(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        steps.append(time.perf_counter() - t)
    step = sorted(steps[1:])[len(steps[1:]) // 2]
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    print(f"\none S²FT training step (batch {tuple(ids.shape)}): {step:.2f} s")
    print(f"calibration: {len(batches)} batches, {tokens} tokens")
    print(f"{'strategy':>10} {'seconds':>9} {'x step':>8}")
    for r in results:
        r["training_steps"] = round(r["seconds"] / step, 2)
        print(f"{r['strategy']:>10} {r['seconds']:>9.2f} {r['training_steps']:>8.2f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": "tiny-random-llama" if args.smoke else "SmolLM2-135M-Instruct (fp32)",
        "calibration_batches": len(batches),
        "calibration_tokens": tokens,
        "ffn_ratio": args.ffn_ratio,
        "training_step_seconds": round(step, 3),
        "training_batch": list(ids.shape),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "results": results,
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=120)
    ax.bar([r["strategy"] for r in results], [r["training_steps"] for r in results], color="tab:blue")
    ax.axhline(1.0, color="gray", lw=1, ls="--", label="one training step")
    ax.set_ylabel("cost in training steps")
    ax.set_title(f"selection cost, {meta['model']}, {tokens} calibration tokens", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
