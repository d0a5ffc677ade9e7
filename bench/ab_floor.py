"""S²FT against the floor inside one process: alternate one floor step and one S²FT step,
N times, and report the median of the per-pair time ratios. Alternating in one process cancels
the slow drifts of a shared machine that make separate-process timings noisy.

    python bench/ab_floor.py --pairs 8                    # SmolLM2-135M, 4x256, fp32
    python bench/ab_floor.py --src /path/to/other/src     # the same against another s2ft checkout
    python bench/ab_floor.py --smoke                      # tiny model (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--ffn-ratio", type=float, default=0.03)
    ap.add_argument("--src", help="import s2ft from this directory instead (e.g. an older checkout's src/)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2 pairs")
    ap.add_argument("--out", default="bench/results/ab_floor.json")
    args = ap.parse_args()
    if args.src:
        sys.path.insert(0, args.src)

    import torch
    from train_efficiency import SIZES, bench_model  # sibling script: the same benchmark models

    from s2ft import S2FTConfig, get_s2ft_model

    size = "tiny" if args.smoke else "smollm2"
    model, shape = bench_model(size, torch.float32, "cpu"), SIZES[size]
    if args.smoke:
        args.pairs = 2
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    ids = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    s2ft = get_s2ft_model(model, S2FTConfig(ffn_ratio=args.ffn_ratio))
    opt = torch.optim.AdamW([p for p in s2ft.parameters() if p.requires_grad], lr=1e-5)

    def s2ft_step():
        s2ft(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    def floor_step():  # the same frozen model with the exact base weights, backprop to the embeddings only
        s2ft(input_ids=ids, labels=ids).loss.backward()

    s2ft_step()
    pairs = []
    for _ in range(args.pairs):
        s2ft.set_adapter("__base__")  # restores the base rows/columns (outside the timed step)
        t, c = time.perf_counter(), time.process_time()
        floor_step()
        f, fc = time.perf_counter() - t, time.process_time() - c
        s2ft.set_adapter("default")
        t, c = time.perf_counter(), time.process_time()
        s2ft_step()
        s, sc = time.perf_counter() - t, time.process_time() - c
        pairs.append(
            {"floor_s": f, "s2ft_s": s, "ratio": s / f, "floor_cpu_s": fc, "s2ft_cpu_s": sc, "cpu_ratio": sc / fc}
        )
        print(f"floor {f:.2f} s  s2ft {s:.2f} s  ratio {s / f:.3f}  CPU-time ratio {sc / fc:.3f}", flush=True)
    ratios = [p["ratio"] for p in pairs]
    cpu_ratios = [p["cpu_ratio"] for p in pairs]
    result = {
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "median_cpu_ratio": statistics.median(cpu_ratios),
        "min_cpu_ratio": min(cpu_ratios),
        "max_cpu_ratio": max(cpu_ratios),
        "pairs": pairs,
        "batch": list(shape),
        "src": args.src or "installed",
    }
    print(
        f"median S²FT/floor ratio over {len(pairs)} pairs: {result['median_ratio']:.3f} "
        f"(range {result['min_ratio']:.2f}-{result['max_ratio']:.2f}); CPU time {result['median_cpu_ratio']:.3f} "
        f"(range {result['min_cpu_ratio']:.2f}-{result['max_cpu_ratio']:.2f})"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
