"""`s2ft train`: the fine-tuning recipe. One pipeline for S²FT, PEFT LoRA/DoRA and full
fine-tuning on transformers `Trainer` (gradient accumulation, schedules, checkpoints, resume,
DDP under `torchrun`/`accelerate launch`).

`TrainArgs` holds every option once; the CLI flags are generated from it and a YAML file
(`--config`) may set any of them. Precedence: defaults < the run's saved config (with
`--resume`) < the YAML file < flags on the command line.

Output directory:

    OUT/train_config.yaml      the resolved options (rerun with `s2ft train --config` this file)
    OUT/metrics.jsonl          one JSON object per logging/eval event
    OUT/loss.png               train and validation loss curves
    OUT/adapter/               the S²FT adapter (or the PEFT adapter for lora/dora)
    OUT/model/                 the full model and tokenizer (--method full)
    OUT/summary.json           sizes, times and final losses
    OUT/checkpoints/checkpoint-N/   Trainer checkpoints; S²FT ones also hold `adapter/`
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from s2ft.adapter_io import atomic_write

METHODS = ("s2ft", "lora", "dora", "full")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("none", "4bit", "8bit")
QUANT_TYPES = ("nf4", "fp4")
DEFAULT_LR = {"s2ft": 2e-4, "lora": 2e-4, "dora": 2e-4, "full": 2e-5}
RUN_FILES = ("train_config.yaml", "metrics.jsonl", "loss.png", "summary.json", "adapter", "model", "checkpoints")


@dataclass
class TrainArgs:
    """Options of `s2ft train`; each is also a flag (`output_dir` -> `--output-dir`)."""

    model: str = field(
        default="smollm2", metadata={"help": "base model: 'smollm2', 'gemma3-270m', a Hub id, a directory or a .gguf"}
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "training data: .jsonl/.json/.csv file, a datasets name or directory, or builtin:arc_easy. "
            "Records are Alpaca (instruction/input/output) or chat (messages)"
        },
    )
    output_dir: str | None = field(default=None, metadata={"help": "where the adapter, metrics and checkpoints go"})
    method: str = field(default="s2ft", metadata={"help": f"one of {', '.join(METHODS)}"})
    # data
    data_split: str = field(default="train", metadata={"help": "split of a datasets name/directory"})
    val_data: str | None = field(default=None, metadata={"help": "validation data (same formats as --data)"})
    val_split: float = field(
        default=0.0, metadata={"help": "hold out this fraction (< 1) or number (>= 1) of the training records"}
    )
    max_samples: int | None = field(default=None, metadata={"help": "train on a seeded subset of this many records"})
    template: str = field(
        default="auto",
        metadata={"help": "prompt template: alpaca (LLM-Adapters), chat (the tokenizer's), auto (by record format)"},
    )
    max_length: int = field(default=512, metadata={"help": "maximum tokens per sample"})
    long_samples: str = field(default="truncate", metadata={"help": "samples over --max-length: truncate or skip"})
    # S²FT
    ffn_ratio: float = field(default=0.03, metadata={"help": "S²FT: fraction of FFN channels trained per layer"})
    attn_ratio: float = field(default=0.0, metadata={"help": "S²FT: fraction of query heads trained per layer"})
    ffn_modules: str = field(default="up,gate,down", metadata={"help": "S²FT: FFN roles trained"})
    attn_modules: str = field(default="o", metadata={"help": "S²FT: attention roles trained (of q,k,v,o)"})
    strategy: str = field(
        default="random", metadata={"help": "S²FT selection: random, weight, activation, salience, gradient"}
    )
    order: str = field(default="large", metadata={"help": "S²FT selection: large (top-k) or small (bottom-k)"})
    layer_allocation: str = field(
        default="uniform",
        metadata={"help": "uniform, increasing, decreasing, random_one, or comma-separated per-layer weights"},
    )
    train_bias: bool = field(
        default=True,
        metadata={"help": "S²FT: also train the bias of trained rows where the base has one (vLLM serves no LoRA "
                  "bias: --no-train-bias)"},
    )  # fmt: skip
    calib_samples: int = field(
        default=64, metadata={"help": "training records used to score data-dependent strategies"}
    )
    # LoRA / DoRA
    lora_rank: int = field(default=16, metadata={"help": "LoRA/DoRA rank"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA/DoRA alpha (default: 2 x rank)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA/DoRA dropout"})
    lora_modules: str = field(
        default="q,k,v,up,down", metadata={"help": "LoRA/DoRA target roles (of q,k,v,o,up,gate,down)"}
    )
    match_params: bool = field(
        default=False,
        metadata={
            "help": "s2ft: solve --ffn-ratio to train as many parameters as LoRA --lora-rank on --lora-modules; "
            "lora/dora: solve --lora-rank to match the S²FT options"
        },
    )
    # optimisation
    learning_rate: float | None = field(
        default=None, metadata={"help": "AdamW learning rate (default: 2e-4; 2e-5 for --method full)"}
    )
    epochs: float = field(default=1.0, metadata={"help": "passes over the training data (unless --max-steps)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; overrides --epochs when > 0"})
    batch_size: int = field(default=4, metadata={"help": "sequences per device per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr_scheduler: str = field(default="linear", metadata={"help": f"one of {', '.join(SCHEDULERS)}"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 disables)"})
    seed: int = field(default=0, metadata={"help": "seed of selection, data order, splits and init"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    # bookkeeping
    logging_steps: int = field(default=10, metadata={"help": "log the training loss every N steps"})
    eval_steps: int | None = field(
        default=None, metadata={"help": "validation loss every N steps (default: --save-steps)"}
    )
    save_steps: int = field(default=100, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto (bf16 on capable GPUs, else fp32), float32, bfloat16, float16; with --quantize, the dtype "
            "of the modules left unquantized (embeddings, norms, lm_head)"
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, mps"})
    # quantized base (QS²FT, QLoRA): bitsandbytes through transformers
    quantize: str = field(
        default="none",
        metadata={
            "help": "load the base quantized by bitsandbytes: none, 4bit or 8bit (--method s2ft, lora, or dora "
            "with 4bit). Only the Transformer blocks' linear layers are quantized; --dtype sets the rest "
            "(embeddings, norms, lm_head)"
        },
    )
    quant_type: str | None = field(
        default=None, metadata={"help": "4-bit data type: nf4 or fp4 (--quantize 4bit only; default: nf4)"}
    )
    double_quant: bool = field(
        default=False, metadata={"help": "also quantize the 4-bit quantization constants (--quantize 4bit only)"}
    )
    quant_compute_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype the 4-bit layers compute in: auto (the model's --dtype: bf16 on capable GPUs, else "
            "fp32), float32, bfloat16, float16 (--quantize 4bit only)"
        },
    )
    resume: bool = field(default=False, metadata={"help": "continue the run in --output-dir from its last checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace a run already in --output-dir"})

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"--{name.replace('_', '-')}: {why}")

        if self.method not in METHODS:
            raise bad("method", f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        choices = {
            "template": ("auto", "alpaca", "chat"),
            "long_samples": ("truncate", "skip"),
            "lr_scheduler": SCHEDULERS,
            "dtype": DTYPES,
            "order": ("large", "small"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        positive = ("max_length", "batch_size", "grad_accum", "lora_rank", "logging_steps", "save_steps")
        for name in positive + ("calib_samples", "save_total_limit"):
            if getattr(self, name) <= 0:
                raise bad(name, f"must be positive, got {getattr(self, name)}")
        if self.eval_steps is not None and self.eval_steps <= 0:
            raise bad("eval_steps", f"must be positive, got {self.eval_steps}")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm", "lora_dropout"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise bad("learning_rate", f"must be positive, got {self.learning_rate}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise bad("epochs", "must be positive (or give --max-steps)")
        if self.val_split < 0 or (self.val_split >= 1 and self.val_split != int(self.val_split)):
            raise bad("val_split", f"must be a fraction in [0, 1) or a whole number of records, got {self.val_split}")
        if self.max_samples is not None and self.max_samples <= 0:
            raise bad("max_samples", f"must be positive, got {self.max_samples}")
        if self.resume and self.overwrite:
            raise bad("resume", "cannot be combined with --overwrite")
        self._check_quantization(bad)

    def _check_quantization(self, bad: typing.Callable[[str, str], ValueError]) -> None:
        if self.quantize not in QUANTIZE:
            raise bad("quantize", f"must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.quant_compute_dtype not in DTYPES:
            raise bad("quant_compute_dtype", f"must be one of {', '.join(DTYPES)}, got {self.quant_compute_dtype!r}")
        if self.quant_type is not None and self.quant_type not in QUANT_TYPES:
            raise bad("quant_type", f"must be one of {', '.join(QUANT_TYPES)}, got {self.quant_type!r}")
        if self.quantize != "4bit":
            only_4bit = {
                "quant_type": self.quant_type is not None,
                "double_quant": self.double_quant,
                "quant_compute_dtype": self.quant_compute_dtype != "auto",
            }
            for name, given in only_4bit.items():
                if given:
                    raise bad(name, f"applies only to --quantize 4bit (this run has --quantize {self.quantize})")
        elif self.quant_type is None:
            self.quant_type = "nf4"  # recorded in train_config.yaml as used
        if self.quantize == "none":
            return
        if self.method == "full":
            raise bad(
                "quantize",
                "cannot be combined with --method full: bitsandbytes 4/8-bit weights are frozen storage, not "
                "trainable parameters; use --method s2ft (QS²FT) or --method lora (QLoRA)",
            )
        if self.device == "mps":
            raise bad("quantize", "bitsandbytes quantization does not run on --device mps; use cpu or cuda")
        if self.method == "dora" and self.quantize == "8bit":
            # PEFT's DoRA re-creates the layer's Int8Params (`module.weight.to(device)`) on every forward;
            # bitsandbytes then drops the row scales, and the next forward fails in bitsandbytes with
            # AttributeError: 'NoneType' object has no attribute ... (peft 0.21, bitsandbytes 0.50)
            raise bad(
                "quantize",
                "8bit cannot be combined with --method dora: PEFT's DoRA loses the int8 weights' scales after the "
                "first step (peft 0.21 with bitsandbytes 0.50); use --quantize 4bit, or --method lora",
            )

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]


# ---------------------------------------------------------------------------------------------
# Options: YAML files, flags, precedence


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainArgs)
    out = {}
    for f in dataclasses.fields(TrainArgs):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        out[f.name] = args[0] if args else t
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Options from a YAML file; keys are option names (dashes or underscores)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path}: no such file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ValueError(f"{where}: malformed YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    types = _field_types()
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in types:
            raise ValueError(f"{path}: unknown option {key!r} (known: {', '.join(types)})")
        if isinstance(value, list) and types[name] is str:
            value = ",".join(str(v) for v in value)
        out[name] = value
    return out


def write_yaml(args: TrainArgs, path: Path) -> None:
    import yaml

    data = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("resume", "overwrite")}
    atomic_write(path, yaml.safe_dump(data, sort_keys=False).encode())


def add_arguments(parser: Any) -> None:
    """One flag per `TrainArgs` field, defaulting to "not given" so precedence can be applied."""
    import argparse

    parser.add_argument("--config", help="YAML file of options (any flag below; flags given here win)")
    types = _field_types()
    for f in dataclasses.fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = f.metadata.get("help", "") + ("" if default is None else f" (default: {default})")
        if types[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=types[f.name], default=argparse.SUPPRESS, help=help_text)


def resolve_args(cli: dict[str, Any]) -> TrainArgs:
    """TrainArgs from parsed flags (only those given) and `--config`, with the saved config of
    the run when resuming."""
    cli = dict(cli)
    config_file = cli.pop("config", None)
    from_file = read_yaml(config_file) if config_file else {}
    merged: dict[str, Any] = {}
    resume = cli.get("resume", from_file.get("resume", False))
    out = cli.get("output_dir", from_file.get("output_dir"))
    if resume and out and (Path(out) / "train_config.yaml").is_file():
        merged.update(read_yaml(Path(out) / "train_config.yaml"))
    merged.update(from_file)
    merged.update(cli)
    args = TrainArgs(**merged)
    if not args.data:
        raise ValueError("--data: required (a data file, a datasets name or directory, or builtin:arc_easy)")
    if not args.output_dir:
        raise ValueError("--output-dir: required")
    return args


# ---------------------------------------------------------------------------------------------
# Output directory


def prepare_output_dir(args: TrainArgs, rank0: bool = True) -> str | None:
    """Check OUT for an earlier run; return the checkpoint to resume from (or None).

    Under torchrun only rank 0 judges whether OUT is free: it is also the only writer, and a
    slower rank checking after rank 0 wrote `train_config.yaml` would see its own run as an old
    one. Every rank finds the same checkpoint to resume from (none is written before all ranks
    have joined the first training step)."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out}: exists and is not a directory")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if args.resume:
        ckpt = last_complete_checkpoint(out / "checkpoints")
        if ckpt is None:
            raise ValueError(f"--resume: no complete checkpoint in {out / 'checkpoints'}; rerun with --overwrite")
        return ckpt
    if existing and not args.overwrite and rank0:
        raise ValueError(
            f"--output-dir {out}: already holds a run ({', '.join(existing)}); use --resume to continue it "
            "or --overwrite to replace it"
        )
    return None


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest `checkpoint-N` whose `trainer_state.json` (written last by Trainer) parses."""
    if not folder.is_dir():
        return None
    found = []
    for d in folder.iterdir():
        if d.is_dir() and d.name.startswith("checkpoint-") and d.name[11:].isdigit():
            try:
                json.loads((d / "trainer_state.json").read_text())
            except (OSError, ValueError):
                print(f"s2ft train: skipping incomplete checkpoint {d}", file=sys.stderr)
                continue
            found.append((int(d.name[11:]), d))
    return str(max(found)[1]) if found else None


def _clear_run(out: Path) -> None:
    for name in RUN_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _atomic_save_dir(final: Path, save: Any) -> None:
    """`save(tmp_dir)`, then rename the finished directory to `final`."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Data


def load_data(args: TrainArgs, tokenizer: Any) -> tuple[list, list, dict[str, Any]]:
    """Tokenized train and validation rows, and counts for the report."""
    from s2ft.data import build_dataset, load_records

    records = load_records(args.data, args.data_split)
    rng = random.Random(args.seed)
    val_records: list = []
    if args.val_data:
        val_records = load_records(args.val_data, "validation" if args.data_split == "train" else args.data_split)
    elif args.val_split > 0:
        n_val = int(args.val_split) if args.val_split >= 1 else max(1, round(args.val_split * len(records)))
        if n_val >= len(records):
            raise ValueError(f"--val-split: {n_val} validation records leave none of {len(records)} to train on")
        order = list(range(len(records)))
        rng.shuffle(order)
        val_records = [records[i] for i in order[:n_val]]
        records = [records[i] for i in sorted(order[n_val:])]
    if args.max_samples and args.max_samples < len(records):
        records = rng.sample(records, args.max_samples)
    train_rows, train_stats = build_dataset(records, tokenizer, args.max_length, args.template, args.long_samples)
    val_rows, val_stats = [], None
    if val_records:
        val_rows, val_stats = build_dataset(val_records, tokenizer, args.max_length, args.template, args.long_samples)
    return train_rows, val_rows, {"train": train_stats, "val": val_stats}


# ---------------------------------------------------------------------------------------------
# Methods


def _roles(text: str) -> list[str]:
    return [r.strip() for r in text.split(",") if r.strip()]


def s2ft_config(args: TrainArgs):
    from s2ft.config import S2FTConfig

    alloc: str | list[float] = args.layer_allocation
    if alloc not in ("uniform", "increasing", "decreasing", "random_one"):
        try:
            alloc = [float(w) for w in alloc.split(",")]
        except ValueError:
            raise ValueError(f"--layer-allocation: not a known allocation or a list of numbers: {alloc!r}") from None
    return S2FTConfig(
        ffn_ratio=args.ffn_ratio,
        attn_ratio=args.attn_ratio,
        ffn_modules=tuple(_roles(args.ffn_modules)),
        attn_modules=tuple(_roles(args.attn_modules)),
        strategy=args.strategy,
        order=args.order,
        seed=args.seed,
        layer_allocation=alloc,
        train_bias=args.train_bias,
    )


def wrap_model(
    args: TrainArgs, model: Any, tokenizer: Any, train_rows: list, resume_from: str | None
) -> tuple[Any, dict[str, Any]]:
    """The trainable model for `args.method` and a report of what it trains."""
    from s2ft import budget

    report: dict[str, Any] = {"method": args.method}
    if args.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif args.method == "s2ft":
        # On a quantized base S²FT needs none of PEFT's prepare_model_for_kbit_training: get_s2ft_model
        # freezes every base parameter itself and trains only its own dense deltas beside the quantized
        # layers; the frozen norms/embeddings/lm_head get no gradient, so they need no fp32 copy; and
        # Trainer's gradient checkpointing here is non-reentrant, so the embeddings' output needs no
        # requires_grad hook. Upcasting would only cost memory; the unquantized modules stay in --dtype.
        from s2ft.data import calibration_from_rows
        from s2ft.model import S2FTModel, get_s2ft_model
        from s2ft.selection import needs_calibration

        config = s2ft_config(args)
        if args.match_params:
            config, match = budget.match_lora(model, config, args.lora_rank, _roles(args.lora_modules))
            report["matched"] = match
        if resume_from and (Path(resume_from) / "adapter").is_dir():
            # the run's own indices, whatever the selection would pick today
            model = S2FTModel.from_pretrained(model, Path(resume_from) / "adapter", is_trainable=True)
        else:
            calibration = None
            if needs_calibration(config):
                calibration = calibration_from_rows(
                    train_rows, tokenizer, args.calib_samples, args.batch_size, args.seed
                )
            model = get_s2ft_model(model, config, calibration=calibration)
        report["s2ft_config"] = config.to_dict()
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        rank = args.lora_rank
        if args.match_params:
            rank, match = budget.match_rank(model, s2ft_config(args), _roles(args.lora_modules))
            report["matched"] = match
        lora = LoraConfig(
            r=rank,
            lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * rank,
            lora_dropout=args.lora_dropout,
            target_modules=budget.lora_target_modules(model, _roles(args.lora_modules)),
            use_dora=args.method == "dora",
            task_type="CAUSAL_LM",
        )
        if args.quantize != "none":
            # QLoRA as PEFT prescribes: freeze the base, upcast the fp16/bf16 modules left unquantized
            # (embeddings, norms, lm_head) to fp32, and with gradient checkpointing enable it the way
            # Trainer will (non-reentrant, so the embeddings' output needs no grad)
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=args.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        model = get_peft_model(model, lora)
        report["lora_rank"] = rank
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_logical_numel(p) for p in model.parameters())
    report.update(trainable_parameters=trainable, total_parameters=total)
    return model, report


def _logical_numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: a bitsandbytes 4-bit weight packs two values per byte of
    its storage dtype (as PEFT counts them)."""
    if type(p).__name__ == "Params4bit":
        return p.numel() * 2 * p.element_size()
    return p.numel()


def _bnb_linear_kind(module: Any) -> str | None:
    if not type(module).__module__.startswith("bitsandbytes"):
        return None
    return {"Linear4bit": "4bit", "LinearNF4": "4bit", "LinearFP4": "4bit", "Linear8bitLt": "8bit"}.get(
        type(module).__name__
    )


def quantization_report(args: TrainArgs, model: Any) -> dict[str, Any]:
    """How the loaded base is quantized, for summary.json: the options, and what the model holds
    (bitsandbytes linear layers counted in the model itself, the dtype of the rest)."""
    kinds = [k for m in model.modules() if (k := _bnb_linear_kind(m)) is not None]
    first = next((m for m in model.modules() if _bnb_linear_kind(m) is not None), None)
    floats = {
        str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point() and not p.requires_grad
    }
    report: dict[str, Any] = {
        "quantize": args.quantize,
        "library": "bitsandbytes",
        "quantized_modules": len(kinds),
        "quantized_kinds": sorted(set(kinds)),
        "unquantized_dtypes": sorted(floats),  # of the frozen base modules left unquantized
    }
    if args.quantize == "4bit":
        state = getattr(getattr(first, "weight", None), "quant_state", None)
        compute = getattr(first, "compute_dtype", None)
        report.update(
            quant_type=getattr(state, "quant_type", args.quant_type),
            double_quant=bool(getattr(state, "nested", args.double_quant)),
            compute_dtype=str(compute).replace("torch.", "") if compute is not None else None,
        )
    return report


def _describe(q: dict[str, Any]) -> str:
    extra = ""
    if q["quantize"] == "4bit":
        extra = f" {q['quant_type']}" + (" double-quant" if q["double_quant"] else "")
        extra += f", compute {q['compute_dtype']}" if q["compute_dtype"] else ""
    rest = ", ".join(q["unquantized_dtypes"])
    return f"{q['quantize']}{extra}; {q['quantized_modules']} bitsandbytes linear layers, the rest in {rest}"


def _quiet_int8_cast_warning() -> None:
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast from ... to float16" on every 8-bit
    matmul (its int8 kernels take float16 inputs); show it once per process."""
    import logging

    class Once(logging.Filter):
        seen = False

        def filter(self, record: logging.LogRecord) -> bool:
            if "MatMul8bitLt: inputs will be cast" not in str(record.msg):
                return True
            first, Once.seen = not Once.seen, True
            return first

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(type(f).__name__ == "Once" for f in logger.filters):
        logger.addFilter(Once())


def save_result(args: TrainArgs, model: Any, tokenizer: Any, out: Path) -> Path:
    """Write the adapter (or full model) atomically; return its directory."""
    if args.method == "full":
        final = out / "model"

        def save(d: Path) -> None:
            model.save_pretrained(d)
            tokenizer.save_pretrained(d)
    else:
        final = out / "adapter"

        def save(d: Path) -> None:
            model.save_pretrained(d)

    _atomic_save_dir(final, save)
    return final


# ---------------------------------------------------------------------------------------------
# Trainer callbacks


def _callbacks(out: Path, resume_step: int, method: str) -> list:
    from transformers import TrainerCallback

    from s2ft.integrations.transformers import S2FTCallback

    class MetricsCallback(TrainerCallback):
        """Append every log event to OUT/metrics.jsonl (rank 0); on resume, drop later lines."""

        def __init__(self) -> None:
            self.path = out / "metrics.jsonl"
            self.t0 = time.time()
            if self.path.is_file():
                keep = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) <= resume_step]
                atomic_write(self.path, "".join(ln + "\n" for ln in keep).encode())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                row = {"step": state.global_step, "epoch": state.epoch, **logs}
                row["elapsed_s"] = round(time.time() - self.t0, 2)
                with self.path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")

    # each S²FT checkpoint also holds the adapter format (checkpoint-N/adapter): usable as is, and a
    # resumed run keeps its selected indices; the final adapter is written by save_result
    s2ft = [S2FTCallback(subdir="adapter", save_on_train_end=False)] if method == "s2ft" else []
    return [MetricsCallback(), *s2ft]


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line from a killed run: dropped


def _loss_series(path: Path) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {"train": [], "validation": []}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "loss" in row:
                series["train"].append((row["step"], row["loss"]))
            if "eval_loss" in row:
                series["validation"].append((row["step"], row["eval_loss"]))
    return series


# ---------------------------------------------------------------------------------------------
# The recipe


def _final_val_loss(trainer: Any) -> float:
    """The validation loss after training; reuses the evaluation Trainer just ran at the last step."""
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry and entry.get("step") == step:
            return entry["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def _has_accelerator() -> bool:
    """Is there a GPU (or another accelerator) for Trainer? `torch.accelerator` where it exists
    (torch >= 2.6), else CUDA or MPS."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps is not None and mps.is_available())


def use_cpu(device: str) -> bool:
    """Should Trainer run on the CPU? For `--device cpu`, and for `--device auto` on a machine
    without an accelerator. Trainer must be told (`TrainingArguments(use_cpu=True)`): otherwise,
    under torchrun on a CPU-only machine, accelerate starts a process group but sets up no DDP, and
    every process trains its own copy."""
    return device == "cpu" or (device == "auto" and not _has_accelerator())


def require_ddp(targs: Any) -> None:
    """Refuse a multi-process launch (WORLD_SIZE > 1) that Trainer would not run as one DDP job:
    each process would train an unsynchronised copy on its share of the data, with nothing but a
    log line from transformers to say so. Raises `RuntimeError` on every rank (each sees the same
    environment), after tearing down the process group that was started."""
    from transformers.training_args import ParallelMode

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched <= 1 or targs.parallel_mode == ParallelMode.DISTRIBUTED:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    raise RuntimeError(
        f"launched as {launched} processes (WORLD_SIZE={launched}, set by torchrun or accelerate launch), but "
        f"Trainer set up no distributed run on {targs.device} (parallel mode {targs.parallel_mode.value!r}), so each "
        "process would train its own copy. On CPUs pass --device cpu (DDP over gloo); on GPUs start at most one "
        "process per GPU; with accelerate launch pass --multi_gpu (also on a machine without GPUs)"
    )


def accelerate_cpu_warning(env: typing.Mapping[str, str] | None = None) -> str | None:
    """A warning when `accelerate launch --cpu --num_processes N` (N > 1) started this as its
    only process: accelerate's CPU launcher runs one process unless mpirun starts the others
    (`--mpirun_hostfile`). It sets MASTER_ADDR only when asked for several processes; torchrun and
    mpirun set WORLD_SIZE or their own size variable. None otherwise."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1", "yes") or "MASTER_ADDR" not in env:
        return None
    if any(k in env for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")):
        return None
    return (
        "accelerate launch --cpu with --num_processes above 1 starts a single process (accelerate's CPU "
        "launcher needs mpirun for more); this run trains in one process. For N CPU processes use "
        "`accelerate launch --multi_gpu --num_processes N -m s2ft.cli train ...` (without --cpu) or "
        "`torchrun --nproc_per_node N -m s2ft.cli train ...`"
    )


def _sharded(trainer: Any) -> bool:
    """Does each rank hold only part of the parameters (FSDP, DeepSpeed ZeRO-3)?"""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    if getattr(trainer, "is_deepspeed_enabled", False):
        return any(hasattr(p, "ds_id") for p in trainer.model.parameters())
    return False


def ranks_identical(model: Any, device: Any = "cpu", sharded: bool = False) -> bool | None:
    """Did every process end with the same trainable parameters? A checksum per trainable
    parameter (sum, sum of squares and sum of absolute values, in float64) is all-gathered and
    each rank's is compared with rank 0's; DDP keeps replicas bitwise equal, so the tolerance
    (1e-9 of the parameter's scale) only absorbs summation order. A collective: call it on every
    rank. Returns None where there is nothing to compare: a single process, or `sharded` (FSDP,
    ZeRO-3), where each rank holds a different part by design."""
    import torch.distributed as dist

    if sharded or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    rows = []
    for p in model.parameters():
        if p.requires_grad:
            t = p.detach().double()
            rows.append(torch.stack([t.sum(), t.square().sum(), t.abs().sum()]))
    local = torch.stack(rows).to(device) if rows else torch.zeros(0, 3, dtype=torch.float64, device=device)
    n = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([len(rows)], dtype=torch.int64, device=device))
    if len({int(s) for s in sizes}) > 1:
        return False
    gathered = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(gathered, local)
    ref = gathered[0].cpu()
    scale = ref[:, 2:3].abs() + 1e-30  # sum |p|: bounds the sum; sum p^2 is compared relative to itself
    tol = 1e-9 * torch.cat([scale, ref[:, 1:2].abs() + 1e-30, scale], dim=1)
    return all(bool(((g.cpu() - ref).abs() <= tol).all()) for g in gathered[1:])


def run_train(args: TrainArgs) -> dict[str, Any]:
    """Run `s2ft train` with `args`; return the summary (also written to OUT/summary.json)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from s2ft.loading import bnb_config_from_args, default_device, default_dtype, load_model, load_tokenizer

    t0 = time.time()
    out = Path(args.output_dir)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    resume_from = prepare_output_dir(args, rank0)
    say = print if rank0 else (lambda *a, **k: None)

    # 1. data first: a bad file fails in seconds, before the model loads, and writes nothing
    tokenizer = load_tokenizer(args.model)
    train_rows, val_rows, data_stats = load_data(args, tokenizer)
    ts = data_stats["train"]
    say(
        f"[s2ft train] data: {ts['kept']} training samples ({ts['truncated']} truncated, {ts['skipped']} skipped "
        f"at --max-length {args.max_length})" + (f", {len(val_rows)} validation" if val_rows else "")
    )

    # 2. model and method
    torch.manual_seed(args.seed)
    device = None if args.device == "auto" else torch.device(args.device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    # --quantize: bitsandbytes quantizes the blocks' linear layers as transformers loads them;
    # --dtype is the dtype of everything else, and what 4-bit layers compute in by default
    quantization = bnb_config_from_args(args, model_dtype=dtype or default_dtype(device or default_device()))
    if quantization is not None:
        _quiet_int8_cast_warning()
    model = load_model(args.model, dtype=dtype, device=device, quantization=quantization)
    model, method_report = wrap_model(args, model, tokenizer, train_rows, resume_from)
    if quantization is not None:
        method_report["quantization"] = quantization_report(args, model)
        say(f"[s2ft train] quantized base: {_describe(method_report['quantization'])}")
    n_train, n_total = method_report["trainable_parameters"], method_report["total_parameters"]
    say(f"[s2ft train] {args.method}: {n_train:,} trainable parameters ({100 * n_train / n_total:.3f}% of {n_total:,})")
    if "matched" in method_report:
        say("[s2ft train] budget matched: " + ", ".join(f"{k}={v}" for k, v in method_report["matched"].items()))

    # 3. Trainer's arguments set up the process group under torchrun/accelerate launch: a launch
    #    that Trainer would not run as one DDP job fails here, before the run directory is written
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    on_cpu = use_cpu(args.device)
    cpu = on_cpu or not torch.cuda.is_available()
    targs = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,  # 0 disables clipping (None breaks Trainer)
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if val_rows else "no",
        eval_steps=args.eval_steps or args.save_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=on_cpu,
        dataloader_pin_memory=not cpu,
        ddp_backend="gloo" if distributed and cpu else None,
        disable_tqdm=not rank0,
    )
    require_ddp(targs)
    if (warning := accelerate_cpu_warning()) is not None:
        print(f"[s2ft train] warning: {warning}", file=sys.stderr)

    # 4. the run directory: written only once inputs are known to be good
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            _clear_run(out)
        write_yaml(args, out / "train_config.yaml")
    resume_step = int(Path(resume_from).name.split("-")[-1]) if resume_from else 0

    # 5. Trainer
    if args.gradient_checkpointing:  # non-reentrant: the frozen embeddings' output needs no grad
        targs.activation_checkpointing = True
        targs.activation_checkpointing_kwargs = {"use_reentrant": False}
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train_rows,
        eval_dataset=val_rows or None,
        data_collator=collator,
        callbacks=_callbacks(out, resume_step, args.method) if rank0 else [],
    )
    val_before = None
    if val_rows and not resume_from:
        val_before = trainer.evaluate()["eval_loss"]
        say(f"[s2ft train] validation loss before training: {val_before:.4f}")
    t_train = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - t_train
    val_after = _final_val_loss(trainer) if val_rows else None

    # 6. results (rank 0), unless the processes ended with different parameters
    identical = ranks_identical(trainer.model, targs.device, sharded=_sharded(trainer))
    diverged = None
    if identical is False:
        diverged = (
            f"the {targs.world_size} processes ended training with different parameters, so they did not train "
            f"as one DDP job and no single result exists: nothing was saved to {out / 'adapter'} or "
            f"{out / 'model'} (the checkpoints under {out / 'checkpoints'} hold rank 0's copy only). Either the "
            f"launcher started independent processes, or some trainable parameter escaped DDP's gradient "
            f"averaging. Launch with `torchrun --nproc_per_node N -m s2ft.cli train ...` or `accelerate launch "
            f"--multi_gpu --num_processes N -m s2ft.cli train ...`"
        )
    summary: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        saved = save_result(args, trainer.model, tokenizer, out) if diverged is None else None
        from s2ft.plots import plot_loss

        plot_loss(_loss_series(out / "metrics.jsonl"), out / "loss.png", title=f"{args.method} on {args.data}")
        summary = {
            **method_report,
            "data": data_stats,
            "steps": trainer.state.global_step,
            "resumed_from": resume_from,
            "train_loss": result.training_loss,
            "val_loss_before": val_before,
            "val_loss_after": val_after,
            "train_seconds": round(train_seconds, 1),
            "seconds_per_step": round(train_seconds / max(1, trainer.state.global_step - resume_step), 3),
            "world_size": targs.world_size,
            "ranks_identical": identical,
            "output": str(saved) if saved is not None else None,
            "total_seconds": round(time.time() - t0, 1),
        }
        if diverged is not None:
            summary["error"] = diverged
        atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    if diverged is not None:
        _shutdown_distributed(trainer)
        raise RuntimeError(diverged)
    if trainer.is_world_process_zero():
        lines = [
            f"  {args.method} result   {saved}",
            f"  steps         {trainer.state.global_step} ({summary['seconds_per_step']} s/step"
            + (f", {targs.world_size} processes)" if targs.world_size > 1 else ")"),
            f"  train loss    {result.training_loss:.4f}",
        ]
        if val_after is not None:
            lines.append(
                f"  val loss      {val_before:.4f} -> {val_after:.4f}"
                if val_before
                else f"  val loss      {val_after:.4f}"
            )
        lines += [f"  metrics       {out / 'metrics.jsonl'}", f"  loss plot     {out / 'loss.png'}"]
        say("\n[s2ft train] done\n" + "\n".join(lines))
    _shutdown_distributed(trainer)
    return summary


def _shutdown_distributed(trainer: Any) -> None:
    """Tear down the process group explicitly: gloo can hang at interpreter exit otherwise."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        trainer.model_wrapped = None
        gc.collect()
        dist.destroy_process_group()
