"""Load test of `s2ft serve` over loopback: N concurrent clients for a bounded time against the
server with 1, 4 and 8 adapters, under both schedules.

- mixed:  requests for different adapters share one batch (one mixed-adapter forward);
- switch: one adapter per batch, merged into the weights in place between batches.

Every client sends completions (greedy, `--max-tokens` tokens, prompts from the ARC-Easy
held-out set) for a model picked round-robin over the adapters (and the base model when
there is a single adapter). Reported per (adapters, schedule): requests/s, generated tokens/s,
p50 and p99 latency, mean batch size. JSON + PNG.

    python bench/serve_load.py                     # SmolLM2-135M, 8 clients x 40 s per point
    python bench/serve_load.py --smoke             # tiny model, 2 s per point (CI)
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_efficiency import save_results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_dir(path: Path) -> None:
    """A tiny random LLaMA with a word-level tokenizer, saved to `path` (smoke mode)."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for r in prompts(64) for w in re.findall(r"\w+|[^\w\s]+", r)})
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    cfg = T.LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    T.LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)


def prompts(n: int) -> list[str]:
    from s2ft.data import builtin_dataset, prompt

    held = builtin_dataset("arc_easy")[1]
    return [prompt(r) for r in held[:n]]


def make_adapters(model: str, root: Path, n: int, ffn_ratio: float) -> None:
    from s2ft import S2FTConfig, get_s2ft_model
    from s2ft.loading import load_model

    for i in range(n):
        m = get_s2ft_model(load_model(model, device="cpu"), S2FTConfig(ffn_ratio=ffn_ratio, seed=i))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))
        m.save_pretrained(root / f"a{i}")


def run_point(args, model: str, adapters_dir: Path, names: list[str], schedule: str) -> dict:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "s2ft.cli", "serve", "--model", model, "--adapters-dir", str(adapters_dir)]
    cmd += ["--port", str(port), "--schedule", schedule, "--max-batch-size", str(args.max_batch_size)]
    cmd += ["--batch-window-ms", str(args.window_ms), "--max-tokens", str(args.max_tokens)]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise RuntimeError(log.read().decode()[-3000:])
            time.sleep(0.3)
        texts = prompts(64)
        latencies: list[float] = []
        tokens = [0]
        errors = [0]
        stop_at = time.time() + args.seconds
        lock = threading.Lock()

        def client(k: int) -> None:
            with httpx.Client(timeout=600) as c:
                i = k
                while time.time() < stop_at:
                    body = {
                        "model": names[i % len(names)],
                        "prompt": texts[i % len(texts)],
                        "max_tokens": args.max_tokens,
                    }
                    t = time.perf_counter()
                    r = c.post(url + "/v1/completions", json={**body, "temperature": 0})
                    dt = time.perf_counter() - t
                    with lock:
                        if r.status_code == 200:
                            latencies.append(dt)
                            tokens[0] += r.json()["usage"]["completion_tokens"]
                        else:
                            errors[0] += 1
                            if errors[0] == 1:
                                print(f"error {r.status_code}: {r.text[:300]}", file=sys.stderr)
                    i += args.clients

        # warm-up request, then the timed run
        httpx.post(url + "/v1/completions", json={"model": names[0], "prompt": "hi", "max_tokens": 2}, timeout=600)
        metrics0 = httpx.get(url + "/metrics").text
        t0 = time.time()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.time() - t0
        metrics1 = httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    batches = _metric(metrics1, "s2ft_batch_size_count") - _metric(metrics0, "s2ft_batch_size_count")
    reqs = _metric(metrics1, "s2ft_batch_size_sum") - _metric(metrics0, "s2ft_batch_size_sum")
    lat = sorted(latencies)
    return {
        "requests": len(lat),
        "errors": errors[0],
        "seconds": round(wall, 2),
        "requests_per_s": len(lat) / wall,
        "tokens_per_s": tokens[0] / wall,
        "p50_s": statistics.median(lat) if lat else None,
        "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "mean_batch": reqs / batches if batches else None,
    }


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    counts = sorted({int(k.split("/")[0]) for k in result["points"]})
    for sched, off in (("mixed", -0.2), ("switch", 0.2)):
        pts = [result["points"].get(f"{n}/{sched}") for n in counts]
        axes[0].bar([i + off for i in range(len(counts))], [p["tokens_per_s"] for p in pts], 0.4, label=sched)
        axes[1].bar([i + off for i in range(len(counts))], [p["p99_s"] for p in pts], 0.4, label=sched)
    for ax, ylabel in ((axes[0], "generated tokens/s"), (axes[1], "p99 latency (s)")):
        ax.set_xticks(range(len(counts)), [str(c) for c in counts])
        ax.set_xlabel("adapters served")
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.suptitle(f"s2ft serve, {result['clients']} concurrent clients, {result['max_tokens']} tokens per request")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--adapters", default="1,4,8", help="adapter counts to test")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--window-ms", type=float, default=20)
    ap.add_argument("--ffn-ratio", type=float, default=0.03)
    ap.add_argument("--smoke", action="store_true", help="tiny model, short runs (CI)")
    ap.add_argument("--out", default="bench/results/serve_load", help="output prefix (.json, .png)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if args.smoke:
            model = str(tmp / "tiny")
            tiny_model_dir(Path(model))
            args.adapters, args.clients, args.seconds, args.max_tokens, args.ffn_ratio = "2", 3, 2, 4, 0.1
        counts = [int(c) for c in args.adapters.split(",")]
        make_adapters(model, tmp / "all", max(counts), args.ffn_ratio)
        result = {
            "model": args.model if not args.smoke else "tiny",
            "clients": args.clients,
            "max_tokens": args.max_tokens,
        }
        result.update(seconds_per_point=args.seconds, points={})
        for n in counts:
            d = tmp / f"dir{n}"
            d.mkdir()
            for i in range(n):
                (d / f"a{i}").symlink_to(tmp / "all" / f"a{i}")
            names = [f"a{i}" for i in range(n)] + (["base"] if n == 1 else [])
            for schedule in ("mixed", "switch"):
                point = run_point(args, model, d, names, schedule)
                result["points"][f"{n}/{schedule}"] = point
                print(f"{n} adapters, {schedule}: {json.dumps(point)}", flush=True)
    print("\n| adapters | schedule | req/s | tokens/s | p50 s | p99 s | mean batch |\n|---|---|---|---|---|---|---|")
    for key, p in result["points"].items():
        n, sched = key.split("/")
        print(
            f"| {n} | {sched} | {p['requests_per_s']:.2f} | {p['tokens_per_s']:.1f} | {p['p50_s']:.2f} | "
            f"{p['p99_s']:.2f} | {p['mean_batch'] or 0:.1f} |"
        )
    save_results(args.out, result, plot)


if __name__ == "__main__":
    main()
