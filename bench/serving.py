"""Serving many fine-tunes of one base: S²FT adapters against PEFT LoRA adapters with the same
trainable-parameter count, side by side in one process (SPEC §5).

1. switch: make adapter B the one in the weights (whole model).
   - S²FT merged switching: `set_adapter(B)` in merged mode (copy back the backed-up rows and
     columns of A, indexed add of B);
   - PEFT LoRA: `unmerge_adapter(); set_adapter(B); merge_adapter()` (W ∓= s·B·A per module);
   - from disk: S²FT `hotswap_adapter` (read + check the file, unmerge the old blocks, merge the
     new ones) against PEFT `hotswap_adapter` (replaces the loaded LoRA weights in place,
     unmerged, so PEFT does less: its forward still pays for the LoRA branch).
2. mixed batch: one forward over a batch whose rows use 2, 4 or 8 different adapters
   (`adapter_names=`), S²FT against PEFT LoRA; the single-adapter and base forwards for scale.
3. merged latency: the base model, the S²FT model with an adapter merged (wrapper modules still
   in place) and after `merge_and_unload()`.

Operations are interleaved (A B A B …) and the median of `--repeats` is reported.

    python bench/serving.py                 # SmolLM2-135M, batch 8 x 128
    python bench/serving.py --smoke         # tiny model (CI)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_efficiency import bench_model, save_results

from s2ft import S2FTConfig, get_s2ft_model
from s2ft.budget import lora_target_modules, match_rank

LORA_ROLES = ["q", "k", "v", "up", "down"]


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def interleave(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run in alternation after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k] += timed(fn, 1)
    return {k: statistics.median(v) for k, v in times.items()}


def randomize(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))


def build(size: str, n_adapters: int, ffn_ratio: float, tmp: Path):
    """(plain base, S²FT model with adapters a0.., PEFT model with adapters a0.., lora rank)."""
    from peft import LoraConfig, get_peft_model

    base = bench_model(size, torch.float32, "cpu").eval()
    rank, _ = match_rank(base, S2FTConfig(ffn_ratio=ffn_ratio), LORA_ROLES)
    targets = lora_target_modules(base, LORA_ROLES)

    s2ft = get_s2ft_model(copy.deepcopy(base), S2FTConfig(ffn_ratio=ffn_ratio, seed=0), adapter_name="a0")
    for i in range(1, n_adapters):
        s2ft.add_adapter(f"a{i}", S2FTConfig(ffn_ratio=ffn_ratio, seed=i))
    for i in range(n_adapters):
        randomize([p for layer in s2ft.s2ft_layers() for p in layer.s2ft[f"a{i}"].parameters()], i)
    s2ft.eval()

    lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    lora = get_peft_model(copy.deepcopy(base), lcfg, adapter_name="a0")
    for i in range(1, n_adapters):
        lora.add_adapter(f"a{i}", lcfg)
    for i in range(n_adapters):
        randomize([p for n, p in lora.named_parameters() if f".a{i}." in n], 100 + i)
    lora.eval()
    for i in range(2):  # adapters on disk for the from-disk swap
        s2ft.save_pretrained(tmp / f"s2ft-a{i}", adapter_name=f"a{i}")
        lora.save_pretrained(tmp / f"lora-a{i}", selected_adapters=[f"a{i}"])
    return base, s2ft, lora, rank


def bench_switch(s2ft, lora, tmp: Path, repeats: int) -> dict:
    from peft.utils.hotswap import hotswap_adapter

    s2ft.set_adapter("a0")
    s2ft.merge()
    lora.set_adapter("a0")
    lora.merge_adapter()
    state = {"s": 0, "l": 0}

    def s2ft_switch():
        state["s"] ^= 1
        s2ft.set_adapter(f"a{state['s']}")

    def lora_switch():
        state["l"] ^= 1
        lora.unmerge_adapter()
        lora.set_adapter(f"a{state['l']}")
        lora.merge_adapter()

    merged = interleave({"s2ft": s2ft_switch, "lora": lora_switch}, repeats)
    s2ft.unmerge()
    s2ft.set_adapter("a0")
    lora.unmerge_adapter()
    lora.set_adapter("a0")

    disk = {"s": 0, "l": 0}
    s2ft.merge()

    def s2ft_disk():  # replace the active, merged adapter a0 by a file's contents
        disk["s"] ^= 1
        s2ft.hotswap_adapter(tmp / f"s2ft-a{disk['s']}", adapter_name="a0")

    def lora_disk():
        disk["l"] ^= 1
        hotswap_adapter(lora, str(tmp / f"lora-a{disk['l']}" / f"a{disk['l']}"), adapter_name="a0")

    from_disk = interleave({"s2ft": s2ft_disk, "lora": lora_disk}, repeats)
    s2ft.unmerge()
    return {
        "merged_switch_s": merged,
        "merged_switch_ratio": merged["s2ft"] / merged["lora"],
        "from_disk_s": from_disk,
        "from_disk_ratio": from_disk["s2ft"] / from_disk["lora"],
    }


@torch.no_grad()
def bench_mixed(base, s2ft, lora, batch: int, seq: int, counts: list[int], repeats: int) -> dict:
    ids = torch.randint(3, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    s2ft.set_adapter("a0")
    lora.set_adapter("a0")
    out = {}
    for n in counts:
        names = [f"a{i % n}" for i in range(batch)]
        t = interleave(
            {
                "base": lambda: base(input_ids=ids, logits_to_keep=1),
                "s2ft": lambda names=names: s2ft(input_ids=ids, adapter_names=names, logits_to_keep=1),
                "lora": lambda names=names: lora(input_ids=ids, adapter_names=names, logits_to_keep=1),
            },
            repeats,
        )
        out[str(n)] = {**t, "ratio": t["s2ft"] / t["lora"], "s2ft_vs_base": t["s2ft"] / t["base"]}
    single = interleave(
        {
            "base": lambda: base(input_ids=ids, logits_to_keep=1),
            "s2ft": lambda: s2ft(input_ids=ids, logits_to_keep=1),
            "lora": lambda: lora(input_ids=ids, logits_to_keep=1),
        },
        repeats,
    )
    out["1 (active adapter)"] = {
        **single,
        "ratio": single["s2ft"] / single["lora"],
        "s2ft_vs_base": single["s2ft"] / single["base"],
    }
    return out


@torch.no_grad()
def bench_merged(base, s2ft, batch: int, seq: int, repeats: int) -> dict:
    ids = torch.randint(3, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    s2ft.set_adapter("a0")
    s2ft.merge()
    unloaded = copy.deepcopy(s2ft).merge_and_unload()
    t = interleave(
        {
            "base": lambda: base(input_ids=ids, logits_to_keep=1),
            "s2ft_merged": lambda: s2ft(input_ids=ids, logits_to_keep=1),
            "merge_and_unload": lambda: unloaded(input_ids=ids, logits_to_keep=1),
        },
        repeats,
    )
    s2ft.unmerge()
    return {**t, "merged_vs_base": t["s2ft_merged"] / t["base"], "unloaded_vs_base": t["merge_and_unload"] / t["base"]}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    sw = result["switch"]
    labels = ["merged switch", "from disk"]
    s = [sw["merged_switch_s"]["s2ft"] * 1e3, sw["from_disk_s"]["s2ft"] * 1e3]
    lo = [sw["merged_switch_s"]["lora"] * 1e3, sw["from_disk_s"]["lora"] * 1e3]
    x = range(len(labels))
    axes[0].bar([i - 0.2 for i in x], s, 0.4, label="S²FT")
    axes[0].bar([i + 0.2 for i in x], lo, 0.4, label="PEFT LoRA")
    axes[0].set_xticks(list(x), labels)
    axes[0].set_ylabel("ms (whole model)")
    axes[0].set_title("adapter switch")
    axes[0].legend()
    mixed = result["mixed"]
    keys = list(mixed)
    for off, k, lab in ((-0.27, "base", "base"), (0, "s2ft", "S²FT"), (0.27, "lora", "PEFT LoRA")):
        axes[1].bar([i + off for i in range(len(keys))], [mixed[c][k] * 1e3 for c in keys], 0.27, label=lab)
    axes[1].set_xticks(range(len(keys)), [c.split(" ")[0] for c in keys])
    axes[1].set_xlabel("adapters in the batch")
    axes[1].set_ylabel("ms per forward")
    axes[1].set_title(f"mixed batch {result['batch']}x{result['seq']}")
    axes[1].legend()
    m = result["merged"]
    names = ["base", "s2ft_merged", "merge_and_unload"]
    axes[2].bar(names, [m[k] * 1e3 for k in names], color=["gray", "C0", "C2"])
    axes[2].set_ylabel("ms per forward")
    axes[2].set_title("merged model vs base")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="smollm2", help="smollm2, llama-0.5b or tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--ffn-ratio", type=float, default=0.03)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 repeats (CI)")
    ap.add_argument("--out", default="bench/results/serving", help="output prefix (.json, .png)")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.batch, args.seq, args.repeats, args.ffn_ratio = "tiny", 8, 16, 2, 0.1
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base, s2ft, lora, rank = build(args.size, 8, args.ffn_ratio, Path(tmp))
        n_s2ft = sum(p.numel() for layer in s2ft.s2ft_layers() for p in layer.s2ft["a0"].parameters())
        n_lora = sum(p.numel() for n, p in lora.named_parameters() if ".a0." in n)
        print(f"{args.size}: S²FT ffn_ratio={args.ffn_ratio} ({n_s2ft:,} params/adapter) vs LoRA r={rank} ({n_lora:,})")
        result = {
            "size": args.size,
            "batch": args.batch,
            "seq": args.seq,
            "threads": args.threads,
            "repeats": args.repeats,
            "s2ft_parameters": n_s2ft,
            "lora_rank": rank,
            "lora_parameters": n_lora,
            "switch": bench_switch(s2ft, lora, Path(tmp), args.repeats),
            "mixed": bench_mixed(base, s2ft, lora, args.batch, args.seq, [2, 4, 8], args.repeats),
            "merged": bench_merged(base, s2ft, args.batch, args.seq, args.repeats),
        }
    sw = result["switch"]
    print("\n| switch (whole model) | S²FT ms | LoRA ms | S²FT/LoRA |\n|---|---|---|---|")
    for key, label in (("merged_switch", "merged: unmerge old + merge new"), ("from_disk", "from disk")):
        t = sw[f"{key}_s"]
        print(f"| {label} | {t['s2ft'] * 1e3:.1f} | {t['lora'] * 1e3:.1f} | {sw[f'{key}_ratio']:.3f} |")
    print("\n| adapters in batch | base ms | S²FT ms | LoRA ms | S²FT/LoRA | S²FT/base |\n|---|---|---|---|---|---|")
    for n, t in result["mixed"].items():
        print(
            f"| {n} | {t['base'] * 1e3:.0f} | {t['s2ft'] * 1e3:.0f} | {t['lora'] * 1e3:.0f} | {t['ratio']:.3f} "
            f"| {t['s2ft_vs_base']:.3f} |"
        )
    m = result["merged"]
    print(
        f"\nmerged: base {m['base'] * 1e3:.0f} ms, S²FT merged {m['s2ft_merged'] * 1e3:.0f} ms "
        f"({m['merged_vs_base']:.3f}x), merge_and_unload {m['merge_and_unload'] * 1e3:.0f} ms "
        f"({m['unloaded_vs_base']:.3f}x)"
    )
    save_results(args.out, result, plot)


if __name__ == "__main__":
    main()
