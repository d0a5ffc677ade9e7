"""transformers `Trainer` (and the TRL trainers built on it): save S²FT adapters in the s2ft
format.

`Trainer` saves models it does not know (anything but `PreTrainedModel`/`PeftModel`) as their
raw `state_dict()` in `model.safetensors`. For an S2FTModel that is the adapter's tensors,
enough to resume a run but not a loadable adapter (no config, no base-model fingerprint).
`S2FTCallback` adds the s2ft files (`s2ft_adapter.safetensors`, `s2ft_config.json`) next to it:

- in every checkpoint (`OUTPUT_DIR/checkpoint-N/`), so `S2FTModel.from_pretrained(base,
  "OUTPUT_DIR/checkpoint-N")` loads any checkpoint;
- in `args.output_dir` when training ends, where `trainer.save_model()` writes by default.

    trainer = Trainer(model=s2ft_model, args=args, ..., callbacks=[S2FTCallback()])

For another final directory, call `model.save_pretrained(DIR)` (every rank under FSDP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class S2FTCallback(TrainerCallback):
    """Write the s2ft adapter format into each Trainer checkpoint and, at the end of training,
    into `args.output_dir`.

    Args:
        subdir: write into this subdirectory of each checkpoint instead of its root (the layout
            `s2ft train` uses: `checkpoint-N/adapter/`).
        save_on_train_end: also write into `args.output_dir` when training ends.
    """

    def __init__(self, subdir: str | None = None, save_on_train_end: bool = True) -> None:
        self.subdir = subdir
        self.save_on_train_end = save_on_train_end

    def _save(self, model: Any, folder: Path, args: Any) -> None:
        from s2ft.model import S2FTModel

        model = getattr(model, "module", model)  # a DDP/DeepSpeed wrapper, if one is passed
        if not isinstance(model, S2FTModel):
            raise TypeError(f"S2FTCallback needs the Trainer's model to be an S2FTModel, got {type(model).__name__}")
        target = folder / self.subdir if self.subdir else folder
        # every rank calls: an FSDP2 save gathers; only the process Trainer lets save writes
        model.save_pretrained(target, is_main_process=args.should_save)

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if model is not None and (folder.is_dir() or not args.should_save):
            self._save(model, folder, args)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.save_on_train_end and model is not None:
            self._save(model, Path(args.output_dir), args)
