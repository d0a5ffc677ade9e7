"""Training efficiency: S²FT against the physical floor, PEFT LoRA, PEFT DoRA and full fine-tuning.

One invocation runs the configurations interleaved (A B C … A B C …), each (configuration,
round) in its own process so that peak memory is clean, and reports per configuration:
median step time and spread (all timed steps of all rounds), peak memory (max RSS on CPU,
`torch.cuda.max_memory_allocated` on GPU), bytes saved for backward (distinct non-parameter
storages packed by autograd in one step), trainable parameters and optimizer-state bytes, plus
ratios to the floor, to LoRA and to full FT. Writes JSON and a PNG.

- floor: the frozen model, loss back-propagated to the input embeddings only (no weight
  gradient anywhere): nothing that trains every layer can be faster.
- s2ft: `S2FTConfig(ffn_ratio=0.03)` (the paper's default: same channels in up/gate/down),
  trained blocks kept inside the weights (the default path).
- s2ft-thin: the same with `set_inplace(False)`: weights never written, blocks added as thin
  products (the path mixed batches and ZeRO-3 use).
- s2ft-main: the `s2ft` configuration run from another checkout (`--baseline-src DIR/src`),
  e.g. the previous release, for before/after figures in one invocation.
- lora / dora: PEFT on q,k,v,up,down with the rank that gives at least as many trainable
  parameters as S²FT, lora_dropout=0 (the cheapest LoRA).
- full: every parameter, AdamW.

    python bench/train_efficiency.py                       # SmolLM2-135M 4x256 and LLaMA-0.5B 1x512
    python bench/train_efficiency.py --sizes smollm2 --rounds 2 --steps 3
    python bench/train_efficiency.py --smoke               # tiny model, 2 steps (CI)
    python bench/train_efficiency.py --device cuda --sizes gpu   # bf16, the GPU sizes below

GPU sizes (random init, bf16, 4 decoder layers of the real shapes): `llama7b` (hidden 4096,
FFN 11008, 32 heads) and `llama3-8b` (8 KV heads, FFN 14336, vocab 128256), each at batch × seq
1×512, 4×1024 and 8×2048: `--sizes gpu` runs all six.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = ("floor", "s2ft", "s2ft-thin", "lora", "dora", "full")
SIZES = {
    # name: (batch, seq_len)
    "smollm2": (4, 256),
    "llama-0.5b": (1, 512),
    "tiny": (2, 32),
}
GPU_SHAPES = {  # LLaMA-7B and LLaMA-3-8B cut to 4 decoder layers
    "llama7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                    num_key_value_heads=32),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8),
}  # fmt: skip
for _shape in GPU_SHAPES:
    for _b, _s in ((1, 512), (4, 1024), (8, 2048)):
        SIZES[f"{_shape}-{_b}x{_s}"] = (_b, _s)
GPU_SIZES = [s for s in SIZES if s.split("-")[0] in ("llama7b", "llama3")]


def save_results(prefix: str | Path, result: dict, plot) -> None:
    """Write `prefix.json` and `prefix.png` (`plot(result, path)`); shared by the bench scripts."""
    out = Path(prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def bench_model(size: str, dtype: torch.dtype, device: str):
    """The benchmark model of `size` ("smollm2", "llama-0.5b" or "tiny"); also used by ab_floor.py."""
    import transformers as T

    if size == "smollm2":
        from s2ft.loading import resolve_model

        return T.AutoModelForCausalLM.from_pretrained(resolve_model("smollm2"), dtype=dtype).to(device)
    shape = next((s for s in GPU_SHAPES if size.startswith(s + "-")), None)
    if shape is not None:
        cfg = T.LlamaConfig(**GPU_SHAPES[shape], num_hidden_layers=4, max_position_embeddings=4096)
        torch.manual_seed(0)
        with torch.device(device):
            return T.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if size == "tiny":
        cfg = T.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        torch.manual_seed(0)
        return T.AutoModelForCausalLM.from_config(cfg).to(dtype=dtype, device=device)
    # a random-initialised LLaMA-shaped model of ~0.5B parameters, saved once so loading is fast
    from s2ft.loading import cache_dir

    path = cache_dir() / "bench" / "llama-0.5b"
    if not (path / "config.json").is_file():
        cfg = T.LlamaConfig(
            vocab_size=32000,
            hidden_size=1280,
            intermediate_size=3456,
            num_hidden_layers=24,
            num_attention_heads=20,
            num_key_value_heads=4,
            max_position_embeddings=1024,
        )
        torch.manual_seed(0)
        T.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return T.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)


def _lora_rank(model, s2ft_params: int) -> int:
    from s2ft.budget import lora_parameters
    from s2ft.structures import resolve, structure_map_for

    structure = resolve(model, structure_map_for(model))
    per_rank = sum(lora_parameters(model, structure, 1, ["q", "k", "v", "up", "down"]))
    return max(1, -(-s2ft_params // per_rank))


def _setup(method: str, model):
    """Returns (model to call, trainable params, extra info)."""
    from s2ft import S2FTConfig, get_s2ft_model

    info = {}
    if method == "full":
        return model, [p for p in model.parameters()], info
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "floor":
        model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        return model, [], info
    s2ft_cfg = S2FTConfig(ffn_ratio=0.03)
    if method.startswith("s2ft"):
        wrapped = get_s2ft_model(model, s2ft_cfg)
        if method == "s2ft-thin":
            wrapped.set_inplace(False)
        return wrapped, [p for p in wrapped.parameters() if p.requires_grad], info
    import peft

    probe = get_s2ft_model(model, s2ft_cfg)  # only to count S²FT's parameters for the rank
    n_s2ft = probe.get_nb_trainable_parameters()[0]
    model = probe.unload()
    rank = _lora_rank(model, n_s2ft)
    info["rank"] = rank
    lora = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            use_dora=(method == "dora"),
            target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        ),
    )
    return lora, [p for p in lora.parameters() if p.requires_grad], info


def _saved_bytes(model, run) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def _steal_seconds() -> float:
    """Host-wide CPU time stolen from this VM so far (Linux /proc/stat), in seconds."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def worker(args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    batch, seq = SIZES[args.size]
    model = bench_model(args.size, dtype, device)
    model.train()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    model, params, info = _setup(args.method, model)
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    times, cpu_times, steal = [], [], []
    for i in range(args.warmup + args.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t, c, st = time.perf_counter(), time.process_time(), _steal_seconds()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)  # all threads; excludes time stolen by the host
            steal.append(_steal_seconds() - st)
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    saved = _saved_bytes(model, lambda: model(input_ids=ids, labels=ids).loss.backward())
    opt_bytes = 0
    if opt is not None:
        for state in opt.state.values():
            opt_bytes += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return {
        "cpu_times": cpu_times,
        "steal_seconds": steal,
        "method": args.method,
        "size": args.size,
        "times": times,
        "peak_bytes": peak,
        "rss_before_training": rss_before,
        "saved_bytes": saved,
        "trainable": sum(p.numel() for p in params),
        "optimizer_bytes": opt_bytes,
        **info,
    }


def run_all(args) -> dict:
    out: dict = {
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sizes": {},
    }
    for size in args.sizes:
        runs: dict[str, list[dict]] = {m: [] for m in args.methods}
        for rnd in range(args.rounds):
            for method in args.methods:  # interleaved: A B C ... A B C ...
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--method",
                    method,
                    "--size",
                    size,
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--device",
                    args.device,
                    "--dtype",
                    args.dtype,
                ]
                env = dict(os.environ)
                if method == "s2ft-main":  # the s2ft configuration, imported from another checkout
                    cmd[cmd.index("--method") + 1] = "s2ft"
                    env["PYTHONPATH"] = os.pathsep.join([args.baseline_src, env.get("PYTHONPATH", "")])
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise RuntimeError(f"{method}/{size} failed:\n{proc.stderr[-3000:]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[method].append(result)
                print(
                    f"[{size} round {rnd + 1}] {method:>5}: "
                    + " ".join(f"{t:.2f}" for t in result["times"])
                    + f" s/step, peak {result['peak_bytes'] / 2**30:.2f} GiB",
                    flush=True,
                )
        out["sizes"][size] = _summarize(runs, size)
        print(_table(out["sizes"][size]), flush=True)
    return out


def _summarize(runs: dict[str, list[dict]], size: str) -> dict:
    rows = {}
    for method, results in runs.items():
        times = [t for r in results for t in r["times"]]
        cpu = [t for r in results for t in r.get("cpu_times", [])]
        med = statistics.median(times)
        rows[method] = {
            "median_s": med,
            "min_s": min(times),
            "max_s": max(times),
            "median_cpu_s": statistics.median(cpu) if cpu else None,
            "steal_s": sum(t for r in results for t in r.get("steal_seconds", [])),
            "spread": (max(times) - min(times)) / med,
            "steps": len(times),
            "peak_bytes": max(r["peak_bytes"] for r in results),
            "saved_bytes": results[0]["saved_bytes"],
            "trainable": results[0]["trainable"],
            "optimizer_bytes": results[0]["optimizer_bytes"],
            "rank": results[0].get("rank"),
        }
    for row in rows.values():
        for ref in ("floor", "lora", "full"):
            if ref in rows:
                row[f"time_vs_{ref}"] = row["median_s"] / rows[ref]["median_s"]
                if row["median_cpu_s"] and rows[ref]["median_cpu_s"]:
                    row[f"cpu_vs_{ref}"] = row["median_cpu_s"] / rows[ref]["median_cpu_s"]
                row[f"memory_vs_{ref}"] = row["peak_bytes"] / rows[ref]["peak_bytes"]
    return {"batch": SIZES[size], "methods": rows}


def _table(summary: dict) -> str:
    cols = [
        ("method", 10),
        ("wall s", 7),
        ("spread", 7),
        ("cpu s", 7),
        ("peak GiB", 9),
        ("saved MiB", 10),
        ("trainable", 12),
        ("optim MiB", 10),
        ("t/floor", 8),
        ("t/LoRA", 7),
        ("t/full", 7),
        ("c/floor", 8),
        ("c/LoRA", 7),
        ("m/floor", 8),
        ("m/LoRA", 7),
        ("m/full", 7),
    ]
    lines = [f"batch {tuple(summary['batch'])}", " ".join(f"{n:>{w}}" for n, w in cols)]
    for m, r in summary["methods"].items():
        values = [
            m,
            f"{r['median_s']:.2f}",
            f"{r['spread']:.0%}",
            f"{r['median_cpu_s'] or 0:.2f}",
            f"{r['peak_bytes'] / 2**30:.2f}",
            f"{r['saved_bytes'] / 2**20:.1f}",
            f"{r['trainable']:,}",
            f"{r['optimizer_bytes'] / 2**20:.1f}",
        ]
        values += [
            f"{r.get(k, 0):.2f}"
            for k in (
                "time_vs_floor",
                "time_vs_lora",
                "time_vs_full",
                "cpu_vs_floor",
                "cpu_vs_lora",
                "memory_vs_floor",
                "memory_vs_lora",
                "memory_vs_full",
            )
        ]
        lines.append(" ".join(f"{v:>{w}}" for v, (_, w) in zip(values, cols, strict=True)))
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(result["sizes"])
    fig, axes = plt.subplots(len(sizes), 2, figsize=(9, 2.8 * len(sizes)), dpi=110, squeeze=False)
    for row, size in zip(axes, sizes, strict=True):
        methods = result["sizes"][size]["methods"]
        names = list(methods)
        row[0].bar(
            names,
            [methods[m]["median_s"] for m in names],
            yerr=[
                [methods[m]["median_s"] - methods[m]["min_s"] for m in names],
                [methods[m]["max_s"] - methods[m]["median_s"] for m in names],
            ],
            color="tab:blue",
        )
        row[0].set_ylabel("s / step")
        row[0].set_title(f"{size} {tuple(result['sizes'][size]['batch'])}: step time", fontsize=9)
        row[1].bar(names, [methods[m]["peak_bytes"] / 2**30 for m in names], color="tab:orange")
        row[1].set_ylabel("peak GiB")
        row[1].set_title(f"{size}: peak memory", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes",
        default="smollm2,llama-0.5b",
        help=f"comma-separated: smollm2, llama-0.5b, tiny, or 'gpu' for {', '.join(GPU_SIZES)}",
    )
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from {METHODS} and s2ft-main")
    ap.add_argument("--baseline-src", help="adds method s2ft-main: the s2ft configuration imported from this src/")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each config once per round)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 round, 2 steps (CI)")
    ap.add_argument("--out", default="bench/results/train_efficiency")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.smoke:
        args.sizes, args.rounds, args.steps, args.warmup = "tiny", 1, 2, 1
    args.sizes = [s for spec in args.sizes.split(",") for s in (GPU_SIZES if spec == "gpu" else [spec])]
    args.methods = args.methods.split(",")
    if args.baseline_src:
        args.methods.insert(args.methods.index("s2ft") + 1 if "s2ft" in args.methods else 0, "s2ft-main")
    unknown = sorted(
        {s for s in args.sizes if s not in SIZES} | {m for m in args.methods if m not in (*METHODS, "s2ft-main")}
    )
    if unknown:
        ap.error(f"unknown size(s)/method(s) {unknown}; sizes: {sorted(SIZES)}; methods: {METHODS}")
    save_results(args.out, run_all(args), _plot)


if __name__ == "__main__":
    main()
