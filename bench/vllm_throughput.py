"""Throughput of the same multi-adapter workload through vLLM (S²FT adapters exported as LoRA)
and through `s2ft serve --schedule mixed`, one after the other on this machine.

    python bench/vllm_throughput.py --vllm-python ~/venvs/vllm/bin/python      # SmolLM2-135M, 1 and 4 adapters, ~25 min
    python bench/vllm_throughput.py --smoke --vllm-python ...                    # a few requests (a check)

Workload, identical for both servers: `--requests` completions (ARC-Easy held-out prompts,
greedy, at most `--max-tokens` tokens) for the base model and the N adapters round-robin, sent by
`--clients` concurrent clients over loopback (httpx). Both compute in float32 on the CPU. vLLM:
`--enable-lora --max-loras N+1 --max-lora-rank R --enforce-eager` (eager: no compile warm-up in
the timing; `--max-loras` above N: see `s2ft.integrations.vllm`). s2ft: `--max-batch-size` as
vLLM's default batch, `--batch-window-ms 20`. One more vLLM run sends every request to the base
model without `--enable-lora`: the engine's speed without its LoRA kernels. Reported per
(server, adapters): requests/s,
generated tokens/s (from each response's `usage`), p50/p99 latency, and the total tokens (equal
when both generate the same text). JSON + PNG in bench/results/vllm_throughput.*
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_load import free_port, make_adapters, prompts  # noqa: E402
from train_efficiency import save_results  # noqa: E402
from vllm_parity import running_server, vllm_python, vllm_serve_cmd  # noqa: E402


def drive(url: str, names: list[str], args) -> dict:
    """Send the fixed workload with `args.clients` concurrent clients; measure it."""
    import httpx

    texts = prompts(64)
    jobs = [(names[i % len(names)], texts[i % len(texts)]) for i in range(args.requests)]
    latencies, tokens, errors, lock, nxt = [], [0], [], threading.Lock(), [0]

    def client() -> None:
        with httpx.Client(timeout=900) as c:
            while True:
                with lock:
                    if nxt[0] >= len(jobs):
                        return
                    model, prompt = jobs[nxt[0]]
                    nxt[0] += 1
                body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
                t = time.perf_counter()
                r = c.post(url + "/v1/completions", json=body)
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                    else:
                        errors.append(f"{r.status_code}: {r.text[:200]}")

    for name in names:  # warm-up: every adapter loaded once, outside the timing
        httpx.post(url + "/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2}, timeout=900)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    lat = sorted(latencies)
    return {
        "requests": len(lat),
        "seconds": round(wall, 2),
        "requests_per_s": len(lat) / wall,
        "tokens_per_s": tokens[0] / wall,
        "tokens": tokens[0],
        "p50_s": statistics.median(lat),
        "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


def run_s2ft(base: str, adapters: Path, names: list[str], args, work: Path) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "s2ft.cli", "serve", "--model", base, "--adapters-dir", str(adapters),
           "--port", str(port), "--schedule", "mixed", "--max-batch-size", str(args.max_batch_size),
           "--batch-window-ms", "20", "--max-tokens", str(args.max_tokens)]  # fmt: skip
    with running_server(cmd, port, work / "s2ft_serve.log") as url:
        return drive(url, names, args)


def run_vllm(py: str, base: str, loras: dict[str, Path], rank: int, names: list[str], args, work: Path) -> dict:
    """vLLM's OpenAI server; with no `loras`, without `--enable-lora` (the engine's own speed)."""
    port = free_port()
    cmd = vllm_serve_cmd(py, base, port, loras, rank, "--max-model-len", "1024",
                         "--max-num-seqs", str(args.max_batch_size), "--served-model-name", "base")  # fmt: skip
    with running_server(cmd, port, work / "vllm_serve.log") as url:
        return drive(url, names, args)


BASE_ONLY = "vLLM, base model only, no --enable-lora"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({p["adapters"] for p in result["points"] if p["server"] != BASE_ONLY})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for server, off in (("s2ft serve --schedule mixed", -0.2), ("vLLM (exported LoRA)", 0.2)):
        pts = [next(p for p in result["points"] if p["server"] == server and p["adapters"] == n) for n in counts]
        axes[0].bar([i + off for i in range(len(counts))], [p["tokens_per_s"] for p in pts], 0.4, label=server)
        axes[1].bar([i + off for i in range(len(counts))], [p["p99_s"] for p in pts], 0.4, label=server)
    for p in (p for p in result["points"] if p["server"] == BASE_ONLY):
        axes[0].axhline(p["tokens_per_s"], color="gray", ls="--", lw=1, label="vLLM, no LoRA (base only)")
    for ax, ylabel in ((axes[0], "generated tokens/s"), (axes[1], "p99 latency (s)")):
        ax.set_xticks(range(len(counts)), [str(c) for c in counts])
        ax.set_xlabel("adapters served")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']}, {result['requests']} requests, {result['clients']} clients, CPU float32")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", help="python of the vLLM virtual environment (default: $S2FT_VLLM_PYTHON)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--adapters", default="1,4", help="adapter counts")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--ffn-ratio", type=float, default=0.03)
    ap.add_argument("--no-base-only", dest="base_only", action="store_false",
                    help="skip the vLLM run without LoRA (all requests to the base)")  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="8 requests, 1 adapter count")
    ap.add_argument("--out", default=str(HERE / "results" / "vllm_throughput"), help="output prefix (.json, .png)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.requests, args.adapters = 8, "2"
    py = vllm_python(args.vllm_python)
    if py is None:
        print("vLLM not found: pass --vllm-python or set S2FT_VLLM_PYTHON", file=sys.stderr)
        return 2
    from s2ft.export import export_lora
    from s2ft.integrations.vllm import smallest_max_lora_rank
    from s2ft.loading import resolve_model

    base = str(resolve_model(args.model))
    points = []
    with tempfile.TemporaryDirectory(prefix="s2ft-vllm-tp-") as tmp:
        work = Path(tmp)
        if args.base_only:  # the same workload, every request to the base, no LoRA machinery
            print(f"0 adapters, {BASE_ONLY} ...", flush=True)
            point = run_vllm(py, base, {}, 0, ["base"], args, work)
            point.update(server=BASE_ONLY, adapters=0)
            print(f"  {point['requests_per_s']:.2f} req/s, {point['tokens_per_s']:.1f} tok/s", flush=True)
            points.append(point)
        for n in [int(x) for x in args.adapters.split(",")]:
            adapters = work / f"s2ft-{n}"
            make_adapters(base, adapters, n, args.ffn_ratio)
            names = ["base", *[f"a{i}" for i in range(n)]]  # the base: s2ft serve's name, vLLM --served-model-name
            loras, ranks = {}, []
            for i in range(n):
                loras[f"a{i}"] = work / f"lora-{n}" / f"a{i}"
                ranks.append(export_lora(adapters / f"a{i}", loras[f"a{i}"], engine="vllm")["rank_max"])
            for server in ("s2ft serve --schedule mixed", "vLLM (exported LoRA)"):
                print(f"{n} adapters, {server} ...", flush=True)
                if server.startswith("s2ft"):
                    point = run_s2ft(base, adapters, names, args, work)
                else:
                    point = run_vllm(py, base, loras, smallest_max_lora_rank(max(ranks)), names, args, work)
                point.update(server=server, adapters=n)
                print(
                    f"  {point['requests_per_s']:.2f} req/s, {point['tokens_per_s']:.1f} tok/s, p50 "
                    f"{point['p50_s']:.2f} s, p99 {point['p99_s']:.2f} s, {point['tokens']} tokens",
                    flush=True,
                )
                points.append(point)
    version = subprocess.run([py, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    result = {
        "model": args.model, "requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size, "vllm": version.stdout.strip(), "torch": torch.__version__,
        "points": points, "command": "python bench/vllm_throughput.py " + " ".join(argv or sys.argv[1:]),
    }  # fmt: skip
    save_results(args.out, result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
