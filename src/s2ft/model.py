"""S2FTModel: apply S²FT to a Hugging Face model; save, load, switch, delete, fuse, merge and
unload adapters; run mixed-adapter batches.

`get_s2ft_model(model, config)` resolves the coupled structures of `model`, selects the
trained channels/heads, wraps each affected Linear in an `S2FTLayer` and freezes everything
else. The result trains with any loop, `transformers.Trainer` or DDP: the only trainable
parameters are the dense delta blocks, and their gradients land in `.grad`.

Several adapters live side by side (`load_adapter`, `add_adapter`); `set_adapter(name)`
picks the active one, and `"__base__"` is the base model. After `merge()` the model stays in
merged mode: `set_adapter` then switches in place — unmerge the old blocks (a copy of the
backed-up rows/columns), merge the new ones (an indexed add) — with no matmul, and exactly
(A → B → A restores A's weights bit for bit). `model(..., adapter_names=[...])` and
`generate(..., adapter_names=[...])` run one adapter per batch row in one forward.

`S2FTModel.state_dict()` holds the adapter only (deltas and indices); the frozen base is not
part of it. That keeps `Trainer` checkpoints adapter-sized and resumable.

While an unmerged adapter is active, its trained rows/columns live inside the base weights
(`W[R] = base[R] + D_r`, see `S2FTLayer`): forward and backward are the base model's own,
plus one thin weight-gradient product per trained block. The weights are rewritten from an
exact backup of the base values when a delta changes: at the next forward (eager), after every
`optimizer.step()` (a global optimizer hook, which also covers `torch.compile`, whose graphs
cannot look at tensor versions), and by `sync_weights()`. `unload()` returns the exact base
weights; `model.model.state_dict()` (or `get_base_model()`) holds base + delta in the trained rows meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from s2ft import __version__, peft_names
from s2ft.adapter_io import (
    FORMAT,
    FORMAT_VERSION,
    AdapterError,
    check_fingerprint,
    fingerprint,
    read_adapter,
    write_adapter,
)
from s2ft.config import S2FTConfig
from s2ft.layers import BatchAdapters, S2FTLayer, _full, _full_shape, _is_dtensor
from s2ft.quantization import dequantize_model, keep_unpacked, model_quantization
from s2ft.selection import module_indices, select
from s2ft.structures import module_shape, resolve, structure_map_for

BASE = "__base__"  # the adapter name of the base model
Indices = dict[str, dict[str, torch.Tensor]]  # module path -> {"rows": idx, "cols": idx}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def get_s2ft_model(
    model: nn.Module,
    config: S2FTConfig,
    adapter_name: str = "default",
    calibration: Iterable[dict[str, Any]] | None = None,
) -> S2FTModel:
    """Wrap `model` for S²FT training with `config` (the model is modified in place).

    `calibration`: batches (dicts with `input_ids`, optional `attention_mask`/`labels`) for the
    data-dependent strategies (`activation`, `salience`, `gradient`); see `s2ft.data.calibration_batches`.
    """
    return S2FTModel(model, config, adapter_name, calibration=calibration)


class S2FTModel(nn.Module):
    """A transformers model with S²FT adapters; forward/generate behave like the base model's."""

    def __init__(
        self,
        model: nn.Module,
        config: S2FTConfig,
        adapter_name: str = "default",
        indices: Indices | None = None,
        calibration: Iterable[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(model, S2FTModel):
            raise TypeError("model is already an S2FTModel; use add_adapter() for a second adapter")
        if not isinstance(config, S2FTConfig):
            raise TypeError(f"config must be an S2FTConfig, got {type(config).__name__}")
        keep_unpacked(model)  # bitsandbytes' CPU inference repacking would cut backprop (s2ft.quantization)
        self.model = model
        self.s2ft_config: dict[str, S2FTConfig] = {}
        self.structure_maps: dict[str, dict[str, Any]] = {}
        self.base_fingerprint = fingerprint(model)  # taken before any wrapping or merging
        self.active_adapter: str = BASE
        self.merge_mode = False  # True after merge(): set_adapter switches merged weights in place
        self.provenance: dict[str, dict[str, Any]] = {}  # e.g. what a fused adapter was made of
        self._trainable: dict[str, bool] = {}  # set_adapter makes only the active one require grad
        self._layers: list[S2FTLayer] | None = None
        self._disabled = 0  # inside disable_adapter(): leave the weights alone
        self._layers_off: contextlib.ExitStack | None = None  # disable_adapter_layers() until enabled
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config, indices=indices, calibration=calibration)
        self.set_adapter(adapter_name)
        _track(self)

    # ------------------------------------------------------------------ adapters

    def add_adapter(
        self,
        adapter_name: str,
        config: S2FTConfig,
        indices: Indices | None = None,
        calibration: Iterable[dict[str, Any]] | None = None,
    ) -> None:
        """Select (or take the given) indices for `config` and add a zero-initialised adapter."""
        if adapter_name in self.s2ft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if not adapter_name or adapter_name == BASE or "/" in adapter_name or "." in adapter_name:
            raise ValueError(f"invalid adapter name {adapter_name!r} (reserved, empty, or contains '/' or '.')")
        smap = structure_map_for(self.model, config.structure_map)
        structure = resolve(self.model, smap)
        if indices is None:
            with self.disable_adapter():  # calibrate on the base model, not on other adapters
                for layer in self.s2ft_layers():
                    layer.restore()  # weight-based scores read the exact base weights
                selection = select(self.model, structure, config, calibration)
            indices = module_indices(structure, selection, config)
        for path in indices:
            self._layer_at(path)
        _check_shared_weights(self)
        for path, idx in indices.items():
            layer = self._layer_at(path)
            layer.add_adapter(
                adapter_name, idx.get("rows"), idx.get("cols"), config.train_bias, self._delta_dtype(config, layer)
            )
        self.s2ft_config[adapter_name] = config
        self.structure_maps[adapter_name] = smap
        self._trainable[adapter_name] = True
        if adapter_name != self.active_adapter:  # a new adapter trains only once it is active
            self._set_requires_grad()
        self.sync_weights()

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters (the base model, `"__base__"`, is always available)."""
        return list(self.s2ft_config)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` (or `"__base__"`) the active adapter; only its deltas require
        grad (if it is trainable), as in PEFT, so DDP sees no unused parameters. The weights are
        switched now, exactly: in merged mode unmerge the old blocks and merge the new; otherwise
        restore the old adapter's rows/columns from the base backup and write the new ones."""
        if adapter_name != BASE and adapter_name not in self.s2ft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; have {[BASE, *self.s2ft_config]}")
        if self.merge_mode:
            for layer in self.s2ft_layers():
                layer.unmerge()
        for layer in self.s2ft_layers():
            layer.active_adapter = None if adapter_name == BASE else adapter_name
        self.active_adapter = adapter_name
        self._set_requires_grad()
        if self.merge_mode and adapter_name != BASE:
            for layer in self.s2ft_layers():
                if adapter_name in layer.s2ft:
                    layer.merge(adapter_name)
        self.sync_weights()

    def _set_requires_grad(self) -> None:
        for layer in self.s2ft_layers():
            for name, d in layer.s2ft.items():
                trainable = name == self.active_adapter and self._trainable.get(name, False)
                for p in d.parameters():
                    p.requires_grad_(trainable)

    def sync_weights(self) -> None:
        """Write the active adapter's current blocks into the base weights where they changed
        (see `S2FTLayer.sync`). Runs by itself at every forward in eager mode and after every
        optimizer step; call it after changing deltas by hand under torch.compile or FSDP. Under
        FSDP2 it is a collective: call it on every rank."""
        if self._disabled:
            return
        _track(self)  # also a deep copy (made without __init__) gets the optimizer hook
        for layer in self.s2ft_layers():
            layer.sync()

    def set_inplace(self, inplace: bool = True) -> None:
        """Keep the active adapter inside the base weights (default, fastest) or never write
        the weights and add the blocks as thin products (`S2FTLayer`'s paths)."""
        for layer in self.s2ft_layers():
            layer.inplace = bool(inplace)
        self.sync_weights()

    def load_adapter(
        self,
        adapter_path: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        check_base: str = "error",
    ) -> None:
        """Load a saved adapter beside the others (it does not become active)."""
        config, indices, modules = _read_checked(adapter_path, self.model, self.base_fingerprint, check_base)
        self.add_adapter(adapter_name, config, indices=indices)
        self._trainable[adapter_name] = bool(is_trainable)
        self._load_deltas(adapter_name, modules, is_trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. Deleting the active one leaves the base model active (a warning
        says so); in merged mode its blocks are unmerged first, exactly."""
        if adapter_name not in self.s2ft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; have {list(self.s2ft_config)}")
        if adapter_name == self.active_adapter:
            warnings.warn(f"deleted the active adapter {adapter_name!r}; the base model is active now", stacklevel=2)
        self._remove(adapter_name)

    def hotswap_adapter(self, adapter_path: str | os.PathLike, adapter_name: str, check_base: str = "error") -> None:
        """Replace adapter `adapter_name` by the one saved at `adapter_path`. The file is read
        and checked first, so a bad file changes nothing; if the adapter was active it stays
        active (merged in place in merged mode)."""
        if adapter_name not in self.s2ft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; have {list(self.s2ft_config)}")
        config, indices, modules = _read_checked(adapter_path, self.model, self.base_fingerprint, check_base)
        was_active = adapter_name == self.active_adapter
        self._remove(adapter_name)
        self.add_adapter(adapter_name, config, indices=indices)
        self._trainable[adapter_name] = False
        self._load_deltas(adapter_name, modules, trainable=False)
        if was_active:
            self.set_adapter(adapter_name)

    def _remove(self, adapter_name: str) -> None:
        if adapter_name == self.active_adapter:
            self.set_adapter(BASE)  # in merged mode: unmerges it
        for layer in self.s2ft_layers():
            if adapter_name in layer.merged_adapters:  # merged by an explicit merge(name)
                layer.unmerge()
            layer.delete_adapter(adapter_name)
        del self.s2ft_config[adapter_name]
        del self.structure_maps[adapter_name]
        self._trainable.pop(adapter_name, None)
        self.provenance.pop(adapter_name, None)
        if self.merge_mode and self.active_adapter != BASE:  # re-merge what an unmerge above undid
            self.set_adapter(self.active_adapter)

    def adapter_modules(self, adapter_name: str) -> dict[str, dict[str, torch.Tensor]]:
        """`{module_path: {part: tensor}}` of one adapter (the layout `read_adapter` returns)."""
        if adapter_name not in self.s2ft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; have {list(self.s2ft_config)}")
        out: dict[str, dict[str, torch.Tensor]] = {}
        for path, layer in self.named_s2ft_layers():
            if adapter_name in layer.s2ft:
                d = layer.s2ft[adapter_name]
                parts = ("row_idx", "row_delta", "row_bias", "col_idx", "col_delta")
                out[path] = {k: getattr(d, k).detach() for k in parts if getattr(d, k) is not None}
        return out

    def fuse_adapters(
        self,
        adapter_names: list[str],
        weights: list[float] | None = None,
        new_name: str = "fused",
        warn_overlap: float = 0.5,
    ) -> list[dict[str, Any]]:
        """Add `new_name` = Σ weights[i] · adapter i (exact; default weights 1). Returns the
        per-module overlap of the adapters' rows/columns and warns when, in some module, more
        than `warn_overlap` of the union is trained by two or more of them."""
        from s2ft import fusion

        if len(adapter_names) < 2:
            raise ValueError("fuse_adapters needs at least two adapters")
        weights = [1.0] * len(adapter_names) if weights is None else list(weights)
        parts = [self.adapter_modules(n) for n in adapter_names]
        report = fusion.overlap(parts, adapter_names)
        worst = max(report, key=lambda r: r["shared_fraction"])
        if worst["shared_fraction"] > warn_overlap:
            warnings.warn(
                f"adapters {adapter_names} overlap strongly: in {worst['module']} "
                f"{worst['shared_fraction']:.0%} of the trained rows/columns are shared; their updates add up there",
                stacklevel=2,
            )
        fused = fusion.fuse_modules(parts, weights)
        bias = any("row_bias" in p for p in fused.values())
        config = dataclasses.replace(self.s2ft_config[adapter_names[0]], train_bias=bias)
        indices = {p: {"rows": t.get("row_idx"), "cols": t.get("col_idx")} for p, t in fused.items()}
        self.add_adapter(new_name, config, indices=indices)
        self._trainable[new_name] = False
        self._load_deltas(new_name, fused, trainable=False)
        self.provenance[new_name] = {"fused_from": list(adapter_names), "weights": weights}
        return report

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the exact base model inside the `with` block. Unmerged adapters are switched off
        without touching the weights (safe in the middle of a training step, e.g. for a DPO
        reference pass); merged ones are unmerged on entry and merged again on exit."""
        layers = list(self.s2ft_layers())
        saved = {layer: layer.active_adapter for layer in layers}
        merged = {layer: list(layer.merged_adapters) for layer in layers if layer.merged_adapters}
        self._disabled += 1
        try:
            for layer in merged:
                layer.unmerge()
            for layer in saved:
                layer.active_adapter = None
            yield
        finally:
            self._disabled -= 1
            for layer, name in saved.items():
                layer.active_adapter = name
            for layer, names in merged.items():
                layer.restore()
                for name in names:
                    layer.merge(name)

    def s2ft_layers(self) -> Iterator[S2FTLayer]:
        if self._layers is None:
            self._layers = [m for m in self.model.modules() if isinstance(m, S2FTLayer)]
        yield from self._layers

    def named_s2ft_layers(self) -> Iterator[tuple[str, S2FTLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, S2FTLayer):
                yield name, module

    def _layer_at(self, path: str) -> S2FTLayer:
        module = self.model.get_submodule(path)
        if isinstance(module, S2FTLayer):
            return module
        parent_path, _, attr = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        layer = S2FTLayer(module, path)
        setattr(parent, attr, layer)
        self._layers = None
        return layer

    @staticmethod
    def _delta_dtype(config: S2FTConfig, layer: S2FTLayer) -> torch.dtype:
        if config.delta_dtype is not None:
            return _DTYPES[config.delta_dtype]
        if layer.quantized:  # the stored weight is packed/int8: deltas in float32 by default
            return torch.float32
        base = layer.weight.dtype
        return torch.float32 if base in (torch.float16, torch.bfloat16) else base

    # ------------------------------------------------------------------ running

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward with the active adapter, or with `adapter_names[b]` for
        batch row `b` (`"__base__"` for the base model) in one mixed-adapter pass."""
        if labels is not None:
            kwargs["labels"] = labels
        if adapter_names is None and not torch.compiler.is_compiling():
            self.sync_weights()
        with self._batch_adapters(adapter_names):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """`generate` of the base model; `adapter_names` as in `forward` (beams and several
        return sequences per row keep their row's adapter)."""
        if adapter_names is None:
            self.sync_weights()
        with self._batch_adapters(adapter_names):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _batch_adapters(self, adapter_names: list[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.s2ft_config})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; have {[BASE, *self.s2ft_config]}")
        if self.merge_mode or any(layer.merged_adapters for layer in self.s2ft_layers()):
            raise RuntimeError("mixed-adapter batches need unmerged weights; call unmerge() first")
        batch = BatchAdapters(list(adapter_names))
        layers = list(self.s2ft_layers())
        for layer in layers:
            layer.restore()  # mixed batches add every adapter on top of the exact base weights
            layer.batch_adapters = batch
        try:
            yield
        finally:
            for layer in layers:
                layer.batch_adapters = None

    def __getattr__(self, name: str) -> Any:
        """Attributes S2FTModel does not define come from the wrapped model, so it looks like
        that model to transformers and TRL (`model.base_model` is its backbone, `model.config`
        its config). PEFT names without an S²FT meaning and the base model's Hub upload
        raise `PeftNameError` instead (`s2ft.peft_names`)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            error = peft_names.unsupported(name)
            if error is not None:
                raise error from None
            try:
                return getattr(self.model, name)
            except AttributeError:
                error = peft_names.unsupported(name, missing=True)
                if error is None:
                    raise
            raise error from None

    # ------------------------------------------------------------------ PEFT names

    @property
    def _hf_peft_config_loaded(self) -> bool:
        """transformers' flag for "trainable adapters are attached to this model": its Trainer
        refuses a quantized model without it ("You cannot perform fine-tuning on purely quantized
        models"). The S²FT deltas are such adapters; the wrapped model's own flag is untouched."""
        return bool(self.s2ft_config)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (PEFT's name). Its forward runs the active adapter
        too: its trained rows/columns live inside the weights."""
        return self.model

    @property
    def peft_config(self) -> dict[str, S2FTConfig]:
        """`{adapter_name: S2FTConfig}`, PEFT's name for `s2ft_config`."""
        return self.s2ft_config

    @property
    def active_peft_config(self) -> S2FTConfig:
        """The S2FTConfig of the active adapter."""
        if self.active_adapter == BASE:
            raise ValueError("no adapter is active (the base model is); set_adapter(name) first")
        return self.s2ft_config[self.active_adapter]

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's list form of `active_adapter` (empty while the base model is active)."""
        return [] if self.active_adapter == BASE else [self.active_adapter]

    def disable_adapter_layers(self) -> None:
        """Run the base model until `enable_adapter_layers()` (`disable_adapter()` without `with`)."""
        if self._layers_off is None:
            stack = contextlib.ExitStack()
            stack.enter_context(self.disable_adapter())
            self.__dict__["_layers_off"] = stack

    def enable_adapter_layers(self) -> None:
        """Undo `disable_adapter_layers()`."""
        stack = self._layers_off
        if stack is not None:
            self.__dict__["_layers_off"] = None
            stack.close()

    disable_adapters = disable_adapter_layers  # transformers' PeftAdapterMixin names
    enable_adapters = enable_adapter_layers

    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """PEFT's name for `merge`: add the active (or the one named) adapter into the weights."""
        if adapter_names is not None and len(adapter_names) != 1:
            raise ValueError(
                f"S²FT merges one adapter at a time, got {adapter_names}; fuse_adapters() builds their sum first"
            )
        self.merge(adapter_names[0] if adapter_names else None)

    def unmerge_adapter(self) -> None:
        """PEFT's name for `unmerge`: restore the exact base weights."""
        self.unmerge()

    def push_to_hub(
        self,
        repo_id: str,
        adapter_name: str | None = None,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        endpoint: str | None = None,
    ) -> Any:
        """Upload the adapter (never the base model) to the Hub repo `repo_id`: the s2ft files and
        a README model card, through `huggingface_hub`. Returns its `CommitInfo`. See `s2ft.hub`."""
        from s2ft import hub

        return hub.push_adapter(
            self,
            repo_id,
            adapter_name,
            commit_message=commit_message,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            endpoint=endpoint,
        )

    def create_or_update_model_card(self, output_dir: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Write README.md (the model card `push_to_hub` uploads) for an adapter into `output_dir`."""
        from s2ft import hub

        hub.write_model_card(self, output_dir, adapter_name)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; total includes the frozen base."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # ------------------------------------------------------------------ state dict = adapter

    def state_dict(
        self, *args: Any, destination: dict | None = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:
        """The adapters' tensors only (deltas and indices of every S2FTLayer)."""
        if args:  # positional (destination, prefix, keep_vars), the deprecated nn.Module form
            destination, *rest = args
            prefix = rest[0] if rest else prefix
            keep_vars = rest[1] if len(rest) > 1 else keep_vars
        out = destination if destination is not None else {}
        for name, layer in self.named_s2ft_layers():
            layer.s2ft.state_dict(destination=out, prefix=f"{prefix}model.{name}.s2ft.", keep_vars=keep_vars)
        return out

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load adapter tensors saved by `state_dict()`; base weights are not part of it."""
        expected = set(self.state_dict())
        given = set(state_dict)
        missing = sorted(expected - given)
        unexpected = sorted(given - expected)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"S2FTModel.load_state_dict: missing adapter keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False, assign=assign)
        self.sync_weights()
        return _IncompatibleKeys(missing, unexpected)

    # ------------------------------------------------------------------ saving / loading

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        adapter_name: str | None = None,
        is_main_process: bool | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Write the adapter as `s2ft_adapter.safetensors` + `s2ft_config.json` (atomically).

        `push_to_hub=True` then uploads it with `push_to_hub(repo_id)` (`repo_id` from kwargs,
        default: the directory's name, as in transformers; other kwargs go to `push_to_hub`).
        Other keyword arguments that transformers' `Trainer` passes (`state_dict`,
        `safe_serialization`) are ignored: the adapter is always read from the model.

        Under FSDP2 the deltas are sharded: every rank must call this (it gathers them), and
        only the main process (`is_main_process`, default: rank 0) writes. Every tensor is
        checked against the module shapes recorded beside it, so a sharded or partitioned
        delta that was not gathered (e.g. DeepSpeed ZeRO-3 outside `GatheredParameters`) is
        an error, never an empty adapter."""
        if is_main_process is None:
            dist = torch.distributed
            is_main_process = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        name = adapter_name or self.active_adapter
        if name not in self.s2ft_config:
            raise ValueError(f"no adapter {name!r} to save; have {sorted(self.s2ft_config)}")
        tensors: dict[str, torch.Tensor] = {}
        modules: dict[str, dict[str, Any]] = {}
        trainable = 0
        for path, layer in self.named_s2ft_layers():
            if name not in layer.s2ft:
                continue
            d = layer.s2ft[name]
            for part in ("row_idx", "row_delta", "row_bias", "col_idx", "col_delta"):
                t = _full(getattr(d, part))
                if t is not None:
                    tensors[f"{path}.{part}"] = t
                    trainable += t.numel() if part.endswith(("delta", "bias")) else 0
            modules[path] = {
                "shape": list(_full_shape(layer.base_layer)),
                "rows": 0 if d.row_idx is None else len(d.row_idx),
                "cols": 0 if d.col_idx is None else len(d.col_idx),
                "bias": d.row_bias is not None,
            }
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "s2ft_version": __version__,
            "config": self.s2ft_config[name].to_dict(),
            "structure_map": self.structure_maps[name],
            "base_model": self.base_fingerprint,
            "trainable_parameters": trainable,
            "modules": modules,
        }
        if name in self.provenance:
            meta["provenance"] = self.provenance[name]
        quantization = model_quantization(self.model)
        if quantization is not None:  # informational: the adapter also loads onto the full-precision base
            meta["base_quantization"] = quantization
        if is_main_process:
            write_adapter(save_directory, tensors, meta)
            if push_to_hub:
                repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(save_directory))
                hub_args = {k: kwargs[k] for k in kwargs if k not in ("state_dict", "safe_serialization")}
                self.push_to_hub(repo_id, name, **hub_args)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        check_base: str = "error",
    ) -> S2FTModel:
        """Load an adapter saved by `save_pretrained` onto `model` (a plain transformers model).

        `check_base`: "error" (default) refuses an adapter whose base-model fingerprint does not
        match `model`; "warn" warns; "ignore" skips the value check (shapes are always checked).
        """
        config, indices, modules = _read_checked(adapter_path, model, fingerprint(model), check_base)
        out = cls(model, config, adapter_name, indices=indices)
        out._trainable[adapter_name] = bool(is_trainable)
        out._load_deltas(adapter_name, modules, is_trainable)
        return out

    @torch.no_grad()
    def _load_deltas(self, adapter_name: str, modules: dict[str, dict[str, torch.Tensor]], trainable: bool) -> None:
        for path, parts in modules.items():
            d = self.model.get_submodule(path).s2ft[adapter_name]
            for part in ("row_delta", "row_bias", "col_delta"):
                param = getattr(d, part)
                if (param is None) != (part not in parts):
                    raise AdapterError(f"{path}.{part}: adapter and model disagree on whether it exists")
                if param is not None:
                    param.copy_(parts[part])
        self._set_requires_grad()
        self.sync_weights()

    # ------------------------------------------------------------------ merge / unmerge

    def merge(self, adapter_name: str | None = None) -> None:
        """Add the adapter's blocks into the base weights in place (an indexed add, no matmul)
        and enter merged mode, in which `set_adapter` switches the merged weights."""
        name = adapter_name or self.active_adapter
        if name not in self.s2ft_config:
            raise ValueError(f"no adapter {name!r} to merge; have {sorted(self.s2ft_config)}")
        if any(layer.quantized and name in layer.s2ft for layer in self.s2ft_layers()):
            raise RuntimeError(
                "merge() on a bitsandbytes-quantized base would round the deltas away: the adapter already runs "
                "beside the quantized weights unmerged; merge_and_unload() returns a dequantized, merged model"
            )
        for layer in self.s2ft_layers():
            if name in layer.s2ft:
                layer.merge(name)
        self.merge_mode = True

    def unmerge(self) -> None:
        """Restore the exact base weights (undoes every merge) and leave merged mode."""
        for layer in self.s2ft_layers():
            layer.unmerge()
        self.merge_mode = False

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapter and return the plain transformers model (no s2ft modules).
        On a bitsandbytes-quantized base the model is dequantized first, one module at a time,
        and returned in full precision (the layers' compute dtype) with the deltas merged:
        merging into 4-bit/8-bit weights would round small deltas away."""
        if any(layer.quantized for layer in self.s2ft_layers()):
            self.unmerge()
            dequantize_model(self.model)
            for layer in self.s2ft_layers():
                layer.quantized = False
        self.merge()
        return self._unwrap()

    def unload(self) -> nn.Module:
        """Undo merges and return the plain, unmodified base model (exact base weights)."""
        self.unmerge()
        return self._unwrap()

    def _unwrap(self) -> nn.Module:
        for path, layer in list(self.named_s2ft_layers()):
            layer.restore()  # an unmerged adapter's blocks leave the weights
            parent_path, _, attr = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            setattr(parent, attr, layer.base_layer)
        self._layers = None
        _untrack(self)
        return self.model


def _check_shared_weights(model: S2FTModel) -> None:
    """Refuse two S²FT layers over one weight storage: writing or merging one adapter's blocks
    would change the other layer's weights too (and unmerge could not be exact)."""
    seen: dict[int, str] = {}
    for path, layer in model.named_s2ft_layers():
        w = layer.base_layer.weight
        if _is_dtensor(w) or w.device.type == "meta" or not w.numel():
            continue
        ptr = w.untyped_storage().data_ptr()
        if ptr in seen:
            raise ValueError(
                f"{seen[ptr]} and {path} share one weight tensor (tied or reused modules); s2ft writes trained "
                "rows/columns into the weights in place, so it cannot train either. Untie them (clone the weight) "
                "or leave one out with a custom structure_map."
            )
        seen[ptr] = path


# Every S2FTModel alive in this process, so that one global optimizer hook can write the new
# deltas into the weights after each optimizer.step() (torch.compile graphs cannot check
# tensor versions at forward time). No tensors are held here.
_LIVE: weakref.WeakSet[S2FTModel] = weakref.WeakSet()
_HOOK: Any = None


def _after_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    stepped = {id(p) for group in getattr(optimizer, "param_groups", ()) for p in group["params"]}
    models = [m for m in list(_LIVE) if any(id(p) in stepped for p in m.parameters() if p.requires_grad)]
    if not models:  # an optimizer over copies of the deltas (DeepSpeed's fp32 partitions): sync all
        models = list(_LIVE)
    for model in models:
        if not model._disabled:
            for layer in model.s2ft_layers():
                layer.after_step()


def _track(model: S2FTModel) -> None:
    global _HOOK
    _LIVE.add(model)
    if _HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


def _untrack(model: S2FTModel) -> None:
    _LIVE.discard(model)


def _read_checked(
    adapter_path: str | os.PathLike, model: nn.Module, base_fp: dict[str, Any], check_base: str
) -> tuple[S2FTConfig, Indices, dict[str, dict[str, torch.Tensor]]]:
    """Read an adapter and check it against `model` (fingerprint `base_fp`, module shapes)."""
    if check_base not in ("error", "warn", "ignore"):
        raise ValueError(f"check_base must be 'error', 'warn' or 'ignore', got {check_base!r}")
    meta, modules = read_adapter(adapter_path)
    check_fingerprint(meta["base_model"], base_fp, str(adapter_path), check_base)
    try:
        config = S2FTConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{adapter_path}: invalid config in adapter: {e}") from None
    for path, info in meta["modules"].items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise AdapterError(f"{adapter_path}: base model has no module {path!r}") from None
        try:
            shape = list(module_shape(getattr(module, "base_layer", module), path))
        except (TypeError, AttributeError) as e:
            raise AdapterError(f"{adapter_path}: cannot apply to module {path!r}: {e}") from None
        if shape != info["shape"]:
            raise AdapterError(f"{adapter_path}: module {path!r} has shape {shape}, adapter expects {info['shape']}")
    indices = {p: {"rows": t.get("row_idx"), "cols": t.get("col_idx")} for p, t in modules.items()}
    return config, indices, modules
