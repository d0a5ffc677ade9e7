"""Quantized bases: S²FT on a bitsandbytes 4-bit base (QS²FT) against QLoRA, S²FT on the
full-precision base and the 4-bit floor, side by side in one invocation.

Each (method, round) runs in its own process, interleaved (A B C D … A B C D …) as in
`train_efficiency.py`, and reports per method: median step time and spread, median process CPU
time per step, peak memory, bytes saved for backward, trainable parameters, optimizer-state
bytes, the bytes the model holds and the CPU time other processes used during the timed steps
(contention on a shared machine), plus ratios to QLoRA and to the floor. Writes JSON and a
PNG (step time and peak memory per method per model) and prints a markdown table.

- qs2ft: the base loaded in 4-bit (`BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=float32 on CPU / bfloat16 on CUDA)`), then
  `get_s2ft_model(model, S2FTConfig(ffn_ratio=0.03))`: the configuration of train_efficiency's
  `s2ft`.
- qlora: the same 4-bit base, `peft.prepare_model_for_kbit_training(model,
  use_gradient_checkpointing=False)`, then PEFT LoRA on q, k, v, up, down (train_efficiency's
  roles, `--lora-roles`) with the smallest rank that trains at least as many parameters as
  S²FT, `lora_dropout=0`. No gradient checkpointing, like qs2ft; `qlora-gc` is PEFT's default
  (checkpointing on) and `qs2ft-gc` the same for S²FT (optional methods).
- s2ft: S²FT on the full-precision base (fp32 on CPU, bf16 on CUDA).
- floor4bit: the 4-bit base, everything frozen, the loss back-propagated to the input
  embeddings' output only (no weight gradient anywhere): what every method on that base pays.
  `floor` (optional) is the same on the full-precision base.

With `--bits 8` the quantized methods use `BitsAndBytesConfig(load_in_8bit=True)` and the floor
is called `floor8bit`. A quantized model is the full-precision checkpoint reloaded with the
bitsandbytes config: SmolLM2 is the built-in GGUF dequantized once by `s2ft.loading` (its cached
safetensors directory is what `load_model("smollm2")` reads), the random LLaMA-0.5B is
train_efficiency's cached checkpoint, and the other sizes are saved to a temp directory first.
All methods of a size read the same weights.

Peak memory: on CPU the peak resident set size of the training steps (the kernel's high-water
mark `VmHWM`, reset through `/proc/self/clear_refs` after the model is set up, so the transient
full-precision tensors of a quantizing load do not count; the whole-process `ru_maxrss` is in the
JSON as `process_peak_bytes`). Before the reset, for every method, the model's full-precision
tensors are copied out of the memory-mapped checkpoint (`detach_from_checkpoint`: a quantizing load
otherwise keeps 1.5 GB of the 0.5B checkpoint's file pages resident) and freed heap is returned to
the OS with glibc's `malloc_trim`; on CUDA `torch.cuda.max_memory_allocated` after a reset at the same
point (as train_efficiency does).

    python bench/quantized.py                                  # SmolLM2-135M 4x256 and LLaMA-0.5B 1x512, CPU
    python bench/quantized.py --profile 10 --quiet-wait 180    # + top ops; wait for an idle machine per run
    python bench/quantized.py --sizes smollm2 --profile 12     # + the top 12 ops of one profiled step
    python bench/quantized.py --bits 8
    python bench/quantized.py --smoke                          # tiny model, 1 timed step, one process (CI)
    python bench/quantized.py --device cuda --sizes gpu        # bf16 compute, train_efficiency's GPU sizes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import train_efficiency as te  # sibling script: benchmark models, sizes, timing helpers, result writing

METHODS = ("floor4bit", "qs2ft", "qlora", "s2ft")
OPTIONAL = ("qlora-gc", "qs2ft-gc", "floor")
FFN_RATIO = 0.03  # train_efficiency's s2ft configuration
LORA_ROLES = ("q", "k", "v", "up", "down")  # train_efficiency's LoRA roles
PEFT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "up": "up_proj", "gate": "gate_proj",
              "down": "down_proj"}  # fmt: skip
ALIASES = {"llama0.5b": "llama-0.5b"}


def default_methods(bits: int) -> list[str]:
    return [f"floor{bits}bit", "qs2ft", "qlora", "s2ft"]


def is_quantized_method(method: str) -> bool:
    return method.startswith("q") or (method.startswith("floor") and method.endswith("bit"))


# ---------------------------------------------------------------------------------------------
# the full-precision checkpoint every method of a size reads


def base_checkpoint(size: str, tmp: Path, dtype: torch.dtype) -> Path:
    """A safetensors directory holding the full-precision model of `size`."""
    from s2ft.loading import cache_dir, resolve_model

    if size == "smollm2":
        return Path(resolve_model("smollm2"))  # the GGUF dequantized once: what load_model("smollm2") reads
    if size == "llama-0.5b":
        path = cache_dir() / "bench" / "llama-0.5b"
        if not (path / "config.json").is_file():
            te.bench_model(size, torch.float32, "cpu")  # creates and saves it
        return path
    shape = next((s for s in te.GPU_SHAPES if size.startswith(s + "-")), size)  # one checkpoint per GPU shape
    path = tmp / shape
    if not (path / "config.json").is_file():
        model = te.bench_model(size, dtype, "cpu")
        model.save_pretrained(path)
        del model
    return path


def load_model(path: Path, device: str, dtype: torch.dtype, bits: int | None):
    """The model in `path` on `device`: full precision in `dtype`, or quantized by bitsandbytes to
    `bits` (4: NF4 with `dtype` as compute dtype; 8: LLM.int8) with its other tensors in `dtype`."""
    import transformers as T

    if bits is None:
        return T.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if bits == 4:
        quant = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    elif bits == 8:
        quant = T.BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return T.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quant, device_map={"": device})


@torch.no_grad()
def detach_from_checkpoint(model) -> None:
    """Copy every full-precision parameter and buffer out of the memory-mapped safetensors file.

    After a quantizing load transformers keeps the fp checkpoint mapped (its embeddings, norms and
    LM head still point into it), so the file pages it touched while quantizing (1.5 GB of the
    0.5B checkpoint) stay in the resident set although the model holds a third of that. With the
    copies the process owns exactly what the model holds, for every method alike; quantized
    tensors (already fresh) are left alone."""
    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if not type(tensor).__module__.startswith("bitsandbytes"):
                tensor.data = tensor.data.clone()


def s2ft_budget(path: Path, lora_roles: list[str]) -> tuple[int, int]:
    """(S²FT's trainable parameters for `S2FTConfig(ffn_ratio=FFN_RATIO)`, the smallest LoRA rank on
    `lora_roles` with at least as many), computed on a meta-device copy of the full-precision
    architecture, so that the packed shapes of a quantized model never enter the count."""
    import transformers as T

    from s2ft import S2FTConfig
    from s2ft.budget import lora_parameters, s2ft_parameters
    from s2ft.structures import resolve, structure_map_for

    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(T.AutoConfig.from_pretrained(path))
    structure = resolve(model, structure_map_for(model))
    n_s2ft = sum(s2ft_parameters(model, structure, S2FTConfig(ffn_ratio=FFN_RATIO)))
    per_rank = sum(lora_parameters(model, structure, 1, lora_roles))
    return n_s2ft, max(1, -(-n_s2ft // per_rank))


# ---------------------------------------------------------------------------------------------
# one method


def setup(method: str, model, path: Path, lora_roles: list[str]):
    """Returns (model to call, trainable parameters, extra info)."""
    from s2ft import S2FTConfig, get_s2ft_model

    info: dict = {}
    for p in model.parameters():
        p.requires_grad_(False)
    if method.startswith("floor"):
        model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        return model, [], info
    if method in ("s2ft", "qs2ft", "qs2ft-gc"):
        if method == "qs2ft-gc":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        wrapped = get_s2ft_model(model, S2FTConfig(ffn_ratio=FFN_RATIO))
        return wrapped, [p for p in wrapped.parameters() if p.requires_grad], info
    import peft

    n_s2ft, rank = s2ft_budget(path, lora_roles)
    info.update(rank=rank, s2ft_trainable=n_s2ft)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=(method == "qlora-gc"))
    lora = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules=[PEFT_NAMES[r] for r in lora_roles],
        ),
    )
    return lora, [p for p in lora.parameters() if p.requires_grad], info


def _status_bytes(field: str) -> int | None:
    """`VmRSS` / `VmHWM` of this process from /proc/self/status, in bytes (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`), so that the full-precision tensors a
    quantizing load freed do not stay in the resident set; a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ≥ 4.0); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def _host_busy_seconds() -> float:
    """CPU time every process on this machine has used so far (Linux /proc/stat), in seconds."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
        return (f[0] + f[1] + f[2] + f[5] + f[6]) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq
    except (OSError, IndexError, ValueError):
        return 0.0


def wait_for_quiet(limit_s: float, window_s: float = 3.0, max_busy: float = 0.2) -> float:
    """Wait (up to `limit_s`) until the other processes on this machine use under `max_busy` cores
    over `window_s`; returns the seconds waited. The parent calls it between measurements."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        busy, own = _host_busy_seconds(), time.process_time()
        time.sleep(window_s)
        if (_host_busy_seconds() - busy - (time.process_time() - own)) / window_s < max_busy:
            break
    return time.perf_counter() - start


def _model_bytes(model) -> int:
    """Bytes of the distinct parameter and buffer storages the model holds."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    return sum(seen.values())


def _quantized_modules(model) -> int:
    return sum(type(m).__module__.startswith("bitsandbytes") for m in model.modules())


def _profile(step, device: str, top: int) -> list[dict]:
    """The `top` operators of one profiled step, by self time (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        self_device = getattr(e, "self_device_time_total", 0) or 0
        rows.append(
            {
                "op": e.key,
                "calls": e.count,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
                "cpu_total_ms": e.cpu_time_total / 1e3,
                "self_device_ms": self_device / 1e3,
            }
        )
    key = "self_device_ms" if device == "cuda" else "self_cpu_ms"
    total = sum(r[key] for r in rows)
    rows.sort(key=lambda r: r[key], reverse=True)
    for r in rows:
        r["share"] = r[key] / total if total else 0.0
    return rows[:top]


def measure(method: str, size: str, path: Path, args) -> dict:
    """Set `method` up on the model of `size` and time `args.warmup + args.steps` steps."""
    device, dtype = args.device, getattr(torch, args.dtype)
    batch, seq = te.SIZES[size]
    bits = args.bits if is_quantized_method(method) else None
    t_load = time.perf_counter()
    model = load_model(path, device, dtype, bits)
    if device == "cpu":
        detach_from_checkpoint(model)
    load_s = time.perf_counter() - t_load
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(device)
    model, params, info = setup(method, model, path, args.lora_roles)
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    if device != "cuda":
        gc.collect()  # drops the checkpoint's mapping
        _trim_heap()  # every method alike
    rss_setup = _status_bytes("VmRSS") or 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        peak_kind = "torch.cuda.max_memory_allocated"
    else:
        peak_kind = "VmHWM (reset after setup)" if _reset_peak_rss() else "ru_maxrss (whole process)"

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    times, cpu_times, sys_times, steal, others = [], [], [], [], []
    for i in range(args.warmup + args.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t, c, st, busy = time.perf_counter(), time.process_time(), te._steal_seconds(), _host_busy_seconds()
        sy = os.times().system
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)  # all threads; excludes time stolen by the host
            sys_times.append(os.times().system - sy)  # kernel time, mostly page faults of fresh allocations
            steal.append(te._steal_seconds() - st)
            others.append(max(0.0, _host_busy_seconds() - busy - cpu_times[-1]))  # other processes' CPU time
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_bytes("VmHWM") if peak_kind.startswith("VmHWM") else process_peak
    saved = te._saved_bytes(model, lambda: model(input_ids=ids, labels=ids).loss.backward())
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    opt_bytes = 0
    if opt is not None:
        for state in opt.state.values():
            opt_bytes += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    result = {
        "method": method,
        "size": size,
        "bits": bits,
        "times": times,
        "cpu_times": cpu_times,
        "sys_times": sys_times,
        "steal_seconds": steal,
        "other_cpu_seconds": others,
        "peak_bytes": peak,
        "peak_kind": peak_kind,
        "process_peak_bytes": process_peak,
        "rss_after_setup": rss_setup,
        "model_bytes": _model_bytes(model),
        "quantized_modules": _quantized_modules(model),
        "saved_bytes": saved,
        "trainable": sum(p.numel() for p in params),
        "optimizer_bytes": opt_bytes,
        "load_s": load_s,
        **info,
    }
    if args.profile:
        result["profile"] = _profile(step, device, args.profile)
    return result


# ---------------------------------------------------------------------------------------------
# the run


def _worker_cmd(method: str, size: str, path: Path, args) -> list[str]:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--size", size, "--base", str(path)]
    for flag in ("steps", "warmup", "device", "dtype", "bits", "profile"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    return cmd + ["--lora-roles", ",".join(args.lora_roles)]


def run_all(args) -> dict:
    out: dict = {
        "device": args.device,
        "dtype": args.dtype,
        "bits": args.bits,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lora_roles": args.lora_roles,
        "in_process": args.in_process,
        "sizes": {},
    }
    try:
        import bitsandbytes
        import peft
        import transformers

        out["versions"] = {
            "bitsandbytes": bitsandbytes.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
        }
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="s2ft-quantized-bench-") as tmp:
        for size in args.sizes:
            path = base_checkpoint(size, Path(tmp), getattr(torch, args.dtype))
            runs: dict[str, list[dict]] = {m: [] for m in args.methods}
            for rnd in range(args.rounds):
                for method in args.methods:  # interleaved: A B C ... A B C ...
                    if args.quiet_wait:
                        waited = wait_for_quiet(args.quiet_wait)
                        if waited > 5:
                            print(f"(waited {waited:.0f} s for other processes to finish)", flush=True)
                    if args.in_process:
                        result = measure(method, size, path, args)
                    else:
                        proc = subprocess.run(_worker_cmd(method, size, path, args), capture_output=True, text=True)
                        if proc.returncode != 0:
                            raise RuntimeError(f"{method}/{size} failed:\n{proc.stderr[-3000:]}")
                        result = json.loads(proc.stdout.strip().splitlines()[-1])
                    runs[method].append(result)
                    print(
                        f"[{size} round {rnd + 1}] {method:>9}: "
                        + " ".join(f"{t:.2f}" for t in result["times"])
                        + f" s/step, peak {result['peak_bytes'] / 2**30:.2f} GiB, load {result['load_s']:.1f} s, "
                        + f"other processes' CPU {sum(result['other_cpu_seconds']):.1f} s",
                        flush=True,
                    )
            out["sizes"][size] = summarize(runs, size, args)
            print("\n" + table(size, out["sizes"][size], args) + "\n", flush=True)
            if args.profile:
                print(profile_table(out["sizes"][size]) + "\n", flush=True)
    return out


def summarize(runs: dict[str, list[dict]], size: str, args) -> dict:
    rows = {}
    for method, results in runs.items():
        times = [t for r in results for t in r["times"]]
        cpu = [t for r in results for t in r["cpu_times"]]
        med = statistics.median(times)
        first = results[0]
        rows[method] = {
            "median_s": med,
            "min_s": min(times),
            "max_s": max(times),
            "spread": (max(times) - min(times)) / med,
            "median_cpu_s": statistics.median(cpu),
            "median_sys_s": statistics.median(t for r in results for t in r["sys_times"]),
            "steal_s": sum(t for r in results for t in r["steal_seconds"]),
            "other_cpu_s": sum(t for r in results for t in r["other_cpu_seconds"]),
            "steps": len(times),
            "peak_bytes": max(r["peak_bytes"] for r in results),
            "peak_kind": first["peak_kind"],
            "process_peak_bytes": max(r["process_peak_bytes"] for r in results),
            "rss_after_setup": max(r["rss_after_setup"] for r in results),
            "model_bytes": first["model_bytes"],
            "quantized_modules": first["quantized_modules"],
            "saved_bytes": first["saved_bytes"],
            "trainable": first["trainable"],
            "optimizer_bytes": first["optimizer_bytes"],
            "rank": first.get("rank"),
            "s2ft_trainable": first.get("s2ft_trainable"),
            "load_s": statistics.median(r["load_s"] for r in results),
        }
        if "profile" in first:
            rows[method]["profile"] = first["profile"]
    floor = f"floor{args.bits}bit"
    for row in rows.values():
        for ref, name in (("qlora", "qlora"), (floor, "floor")):
            if ref in rows:
                row[f"time_vs_{name}"] = row["median_s"] / rows[ref]["median_s"]
                row[f"cpu_vs_{name}"] = row["median_cpu_s"] / rows[ref]["median_cpu_s"]
                row[f"memory_vs_{name}"] = row["peak_bytes"] / rows[ref]["peak_bytes"]
    summary: dict = {"batch": te.SIZES[size], "methods": rows}
    if "qs2ft" in rows and "qlora" in rows:
        q, lo = rows["qs2ft"], rows["qlora"]
        summary["goals"] = {
            "memory_le_qlora": q["peak_bytes"] <= lo["peak_bytes"],
            "time_le_qlora": q["median_s"] <= lo["median_s"],
            "cpu_time_le_qlora": q["median_cpu_s"] <= lo["median_cpu_s"],
        }
    return summary


def table(size: str, summary: dict, args) -> str:
    """A markdown table of one size."""
    b, s = summary["batch"]
    head = (
        "| method | wall s/step (median) | spread | × QLoRA | × floor | CPU s/step | of which kernel | CPU × QLoRA "
        "| peak GiB | × QLoRA | × floor | model MiB | saved for backward MiB | trainable | optimizer MiB "
        "| others' CPU s |"
    )
    lines = [f"{size}, batch {b} × {s}, {args.device}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for m, r in summary["methods"].items():
        name = f"{m} (r={r['rank']})" if r.get("rank") else m
        values = [
            name,
            f"{r['median_s']:.2f}",
            f"{r['spread']:.0%}",
            f"{r.get('time_vs_qlora', 0):.2f}",
            f"{r.get('time_vs_floor', 0):.2f}",
            f"{r['median_cpu_s']:.2f}",
            f"{r['median_sys_s']:.2f}",
            f"{r.get('cpu_vs_qlora', 0):.2f}",
            f"{r['peak_bytes'] / 2**30:.2f}",
            f"{r.get('memory_vs_qlora', 0):.2f}",
            f"{r.get('memory_vs_floor', 0):.2f}",
            f"{r['model_bytes'] / 2**20:.0f}",
            f"{r['saved_bytes'] / 2**20:.0f}",
            f"{r['trainable']:,}",
            f"{r['optimizer_bytes'] / 2**20:.1f}",
            f"{r['other_cpu_s']:.1f}",
        ]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def profile_table(summary: dict) -> str:
    """The profiled step's top operators per method, as markdown."""
    lines = []
    for m, r in summary["methods"].items():
        if "profile" not in r:
            continue
        lines += [f"{m}: top ops of one step", "", "| op | calls | self ms | share |", "|---|---|---|---|"]
        for p in r["profile"]:
            ms = p["self_device_ms"] or p["self_cpu_ms"]
            lines.append(f"| `{p['op']}` | {p['calls']} | {ms:.0f} | {p['share']:.1%} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes",
        default="smollm2,llama-0.5b",
        help=f"comma-separated: smollm2, llama-0.5b, tiny, or 'gpu' for {', '.join(te.GPU_SIZES)}",
    )
    ap.add_argument("--methods", help=f"comma-separated from {METHODS} and {OPTIONAL} (default: the first four)")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4, help="bitsandbytes quantization of the base")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (each method once per round)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--lora-roles", default=",".join(LORA_ROLES), help="QLoRA's target roles")
    ap.add_argument("--profile", type=int, default=0, help="profile one extra step; keep the top N ops")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=0,
        help="before each measurement, wait up to this many seconds for other processes to leave the CPUs idle",
    )
    ap.add_argument("--in-process", action="store_true", help="all methods in this process (memory not clean)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 timed step, in one process (CI)")
    ap.add_argument("--out", default="bench/results/quantized")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.lora_roles = args.lora_roles.split(",")
    if args.worker:
        print(json.dumps(measure(args.method, args.size, Path(args.base), args)))
        return
    if args.smoke:
        args.sizes, args.rounds, args.steps, args.warmup, args.in_process = "tiny", 1, 1, 1, True
    args.sizes = [
        ALIASES.get(s, s) for spec in args.sizes.split(",") for s in (te.GPU_SIZES if spec == "gpu" else [spec])
    ]
    args.methods = args.methods.split(",") if args.methods else default_methods(args.bits)
    known = {*default_methods(args.bits), *METHODS[1:], *OPTIONAL}
    unknown = sorted({s for s in args.sizes if s not in te.SIZES} | {m for m in args.methods if m not in known})
    if unknown:
        ap.error(f"unknown size(s)/method(s) {unknown}; sizes: {sorted(te.SIZES)}; methods: {sorted(known)}")
    bad_roles = [r for r in args.lora_roles if r not in PEFT_NAMES]
    if bad_roles:
        ap.error(f"unknown LoRA role(s) {bad_roles}; use {list(PEFT_NAMES)}")
    te.save_results(args.out, run_all(args), te._plot)


if __name__ == "__main__":
    main()
