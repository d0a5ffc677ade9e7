"""S2FTLayer: a frozen nn.Linear / Conv1D plus the trained row and column blocks of one or
more adapters, the in-place merge / unmerge of those blocks, and mixed-adapter batches (SPEC §5).

Merge is an indexed add of `|R|·in + out·|C|` numbers into the base weight, no matmul. The
rows/columns it overwrites are backed up first, so unmerge restores the base weights
bit-for-bit in any dtype (merges are undone last-in first-out).

A mixed batch (one adapter per row) runs one base matmul over the whole batch, then, for each
adapter present, adds its blocks to its own rows only: `y[b, …, R] += x[b] D_rᵀ (+ d_b)` and
`y[b] += x[b, …, C] D_cᵀ` — thin matmuls over the rows that use the adapter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from s2ft.autograd import delta_grad, thin_blocks
from s2ft.quantization import is_quantized
from s2ft.structures import module_shape, weight_view


class S2FTDelta(nn.Module):
    """The trained blocks of one adapter on one module, in the module's original index order.

    Buffers `row_idx` (k_r,) and `col_idx` (k_c,); parameters `row_delta` (k_r, in),
    `row_bias` (k_r,) when the base has a bias and biases are trained, `col_delta` (out, k_c).
    Absent parts are None. Deltas start at zero: the adapted model starts as the base model.
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rows: torch.Tensor | None,
        cols: torch.Tensor | None,
        with_bias: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        rows = rows if rows is not None and rows.numel() else None
        cols = cols if cols is not None and cols.numel() else None
        for name, idx, size in (("row_idx", rows, out_features), ("col_idx", cols, in_features)):
            if idx is not None:
                idx = idx.to(device=device, dtype=torch.long)
                if idx.dim() != 1 or int(idx.min()) < 0 or int(idx.max()) >= size:
                    raise ValueError(f"{name} out of range [0, {size}) for a ({out_features}, {in_features}) weight")
                if not bool((idx[1:] > idx[:-1]).all()):
                    raise ValueError(f"{name} must be sorted and unique")
            self.register_buffer(name, idx)
        self.register_parameter(
            "row_delta",
            None if rows is None else nn.Parameter(torch.zeros(len(rows), in_features, dtype=dtype, device=device)),
        )
        self.register_parameter(
            "row_bias",
            None if rows is None or not with_bias else nn.Parameter(torch.zeros(len(rows), dtype=dtype, device=device)),
        )
        self.register_parameter(
            "col_delta",
            None if cols is None else nn.Parameter(torch.zeros(out_features, len(cols), dtype=dtype, device=device)),
        )

    def extra_repr(self) -> str:
        r = 0 if self.row_idx is None else len(self.row_idx)
        c = 0 if self.col_idx is None else len(self.col_idx)
        return f"rows={r}, cols={c}, bias={self.row_bias is not None}"


@dataclass
class _Written:
    """What the base weight holds in place of its base values: adapter `name`'s blocks as they
    were when the deltas had versions `key`, and the exact base values of those rows/columns.

    Under FSDP2 the base weight is sharded: everything here is about the local shard, whose
    rows/columns start at `row_off`/`col_off` of the full `(out, in)` weight.
    """

    name: str
    key: tuple | None  # (id, _version) of each delta when written; None forces a rewrite
    recheck: bool  # rewrite at the next eager sync even if the versions agree (see `after_step`)
    sel_r: torch.Tensor | None  # which of the adapter's rows fall in the local shard (positions in R)
    r_loc: torch.Tensor | None  # their local row indices
    sel_c: torch.Tensor | None
    c_loc: torch.Tensor | None
    rows: torch.Tensor | None  # base W[R_local, :]    (k_r_local, in_local)
    cols: torch.Tensor | None  # base W[:, C_local]    (out_local, k_c_local)
    bias: torch.Tensor | None  # base b[R_local]       (k_r_local,) when the adapter trains bias entries
    bias_sel: torch.Tensor | None
    bias_loc: torch.Tensor | None
    full: bool  # the local shard is the whole weight (no FSDP sharding)
    geometry: tuple[int, int, int, int]  # (row_off, col_off, out_local, in_local) it was made for


class S2FTLayer(nn.Module):
    """Wraps a frozen `base_layer`; forward adds the active adapter's trained blocks.

    Which path a forward takes (all exact; see `s2ft.autograd`):

    - **in place** (default): the active adapter's rows/columns are inside `W`
      (`W[R] = cast(base[R] + D_r)`, written by `sync()` from the exact base backup only when a
      delta's version changed, never inside backward), and forward is `base_layer(x)` plus
      `DeltaGrad` for the blocks' gradients when they are trained.
    - **thin**: `base_layer(x)` on the base values plus the blocks as thin products; for
      mixed-adapter batches, DeepSpeed ZeRO-3 partitioned weights, bitsandbytes 4-bit/8-bit
      bases (never written; `s2ft.quantization`), adapters on top of a merged one, and
      `set_inplace(False)`.
    - **base while written** (`disable_adapter()` / `"__base__"` during training): `W` holds an
      adapter and is not touched; rows `R` of the output are recomputed from the base backup and
      the columns' contribution is subtracted, so the base outputs are exact to rounding and a
      live training graph stays valid.
    """

    def __init__(self, base_layer: nn.Module, path: str = "") -> None:
        super().__init__()
        module_shape(base_layer, path)  # raises for unsupported module types and weights
        self.base_layer = base_layer
        self.quantized = is_quantized(base_layer)  # bitsandbytes 4/8-bit: the thin path only (QS²FT)
        self.path = path
        self.s2ft = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self._backups: dict[str, dict[str, torch.Tensor]] = {}
        self.batch_adapters: BatchAdapters | None = None  # set by S2FTModel for mixed batches
        self.inplace = True  # write the active adapter into W (set by S2FTModel.set_inplace)
        self._written: _Written | None = None
        self._sharded = False  # the base weight is an FSDP2 DTensor: only S2FTModel writes it
        self._generation = 0  # bumped by every write into W: a backward checks it saw the same W

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as `(out, in)` (with the written adapter's blocks while one is written)."""
        return weight_view(self.base_layer, self.path)

    def add_adapter(
        self, name: str, rows: torch.Tensor | None, cols: torch.Tensor | None, train_bias: bool, dtype: torch.dtype
    ) -> S2FTDelta:
        if name in self.s2ft:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        out_f, in_f = _full_shape(self.base_layer)
        has_bias = getattr(self.base_layer, "bias", None) is not None
        device = self.base_layer.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        delta = S2FTDelta(out_f, in_f, rows, cols, train_bias and has_bias, dtype, device)
        self.s2ft[name] = delta
        return delta

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge before deleting it")
        if self._written is not None and self._written.name == name:
            self.restore()
        if name in self.s2ft:
            del self.s2ft[name]
        if self.active_adapter == name:
            self.active_adapter = None

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.batch_adapters is not None:
            return self._mixed_forward(x, *args, **kwargs)
        if torch.is_grad_enabled():
            self._check_frozen()
        name = self.active_adapter
        if name is None or name not in self.s2ft or name in self.merged_adapters:
            if self._written is not None:
                return self._base_while_written(x, *args, **kwargs)
            return self.base_layer(x, *args, **kwargs)
        d = self.s2ft[name]
        if self.merged_adapters or not self._writable():
            if self._written is not None and not torch.compiler.is_compiling():
                self.restore()
            return thin_blocks(self.base_layer(x, *args, **kwargs), x, d)
        if not torch.compiler.is_compiling():
            if not self._sharded:
                self.sync()
            if self._written is None or self._written.name != name:
                raise RuntimeError(
                    f"{self.path}: the base weight does not hold adapter {name!r}; call model.sync_weights() "
                    "after changing adapters or deltas by hand under FSDP or torch.compile"
                )
        x2 = x.reshape(-1, x.shape[-1])  # (N, in): a 2-D call keeps nn.Linear's output a plain tensor
        y = self.base_layer(x2, *args, **kwargs)  # (N, out), W holds the blocks
        if torch.is_grad_enabled() and _trains(d):
            y = delta_grad(y, x2, d)
            if not torch.compiler.is_compiling():
                _watch(y, self)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _check_frozen(self) -> None:
        w, b = _raw(self.base_layer, "weight"), _raw(self.base_layer, "bias")
        if w.requires_grad or (b is not None and b.requires_grad):
            part = "weight" if w.requires_grad else "bias"
            raise RuntimeError(
                f"{self.path or type(self.base_layer).__name__}: the base {part} requires grad, but s2ft trains "
                f"only its delta blocks, so it would silently get no (or a wrong) gradient. Freeze it with "
                f"requires_grad_(False), or train it outside s2ft after merge_and_unload()."
            )

    def _writable(self) -> bool:
        """Can the active adapter live inside W? Not for DeepSpeed ZeRO-3 partitions (their data
        exists only inside the module's forward) or when in-place is switched off."""
        return self.inplace and not self.quantized and not hasattr(_raw(self.base_layer, "weight"), "ds_id")

    def _base_while_written(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Base outputs while W holds adapter blocks, without touching W (a live graph may need
        it): rows R recomputed from the base backup, columns C's added part subtracted."""
        wr = self._written
        if not wr.full:
            raise RuntimeError(
                f"{self.path}: base outputs of a sharded (FSDP) weight that holds an adapter are not supported; "
                "use model.set_adapter('__base__') outside forward instead of disable_adapter()"
            )
        y = self.base_layer(x, *args, **kwargs)
        if wr.cols is not None:  # y -= x[..., C] (W[:, C] - base[:, C])ᵀ
            w = weight_view(self.base_layer)
            acc = torch.promote_types(w.dtype, torch.float32)
            added = w.index_select(1, wr.c_loc).to(acc) - wr.cols.to(acc)  # (out, k_c)
            y = y - F.linear(x.index_select(-1, wr.c_loc), added.to(x.dtype)).to(y.dtype)
        if wr.rows is not None:  # y[..., R] = x base[R]ᵀ + b[R]
            b = getattr(self.base_layer, "bias", None)
            if wr.bias is not None:  # unsharded: the bias backup covers all of R
                b_r = wr.bias
            else:
                b_r = None if b is None else b.index_select(0, wr.r_loc)
            rows = F.linear(x, wr.rows.to(x.dtype), None if b_r is None else b_r.to(x.dtype))
            y = y.index_copy(-1, wr.r_loc, rows.to(y.dtype))
        return y

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """One base matmul for the batch, then each adapter's blocks added in place to its own
        rows (dim 0): no copy of the output per adapter."""
        if self.merged_adapters:
            raise RuntimeError("mixed-adapter batches need unmerged weights; call unmerge() first")
        if self._written is not None:
            self.restore()
        y = self.base_layer(x, *args, **kwargs).contiguous()  # (B, ..., out); backward does not need y
        y3 = y.view(y.shape[0], -1, y.shape[-1])  # (B, M, out), M = tokens per row
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, M, in)
        for name, rows in self.batch_adapters.groups(x.shape[0], x.device):
            d = self.s2ft[name] if name in self.s2ft else None
            if d is None:
                continue
            xa = x3.index_select(0, rows)  # (n_a, M, in)
            if d.col_delta is not None:  # y[rows] += x[rows, :, C] D_cᵀ
                y3.index_add_(0, rows, F.linear(xa.index_select(-1, d.col_idx), d.col_delta.to(x.dtype)).to(y.dtype))
            if d.row_delta is not None:  # y[rows, :, R] += x[rows] D_rᵀ + d_b
                bias = None if d.row_bias is None else d.row_bias.to(x.dtype)
                r = F.linear(xa, d.row_delta.to(x.dtype), bias).to(y.dtype)  # (n_a, M, k_r)
                tokens = torch.arange(y3.shape[1], device=y.device)
                where = (rows.view(-1, 1, 1), tokens.view(1, -1, 1), d.row_idx.view(1, 1, -1))
                y3.index_put_(where, r, accumulate=True)
        return y

    # ------------------------------------------------------------------ writing W in place

    def _local_weight(self):
        """`_local(base_layer)`, re-planning the written adapter if the weight was sharded since."""
        w, row_off, col_off, b, b_off = _local(self.base_layer)
        wr = self._written
        if wr is not None and wr.geometry != (row_off, col_off, *w.shape):
            self._written = _reshard(wr, self.s2ft[wr.name], self.base_layer, w, row_off, col_off, b, b_off)
        return w, row_off, col_off, b, b_off

    @torch.no_grad()
    def sync(self) -> None:
        """Make W hold the active adapter's current blocks (or its base values when no adapter
        can be written). Writes `k·in` (rows) / `out·k` (columns) numbers, only when a delta
        changed since the last write. Never inside backward (a checkpoint recompute must see the
        weights its forward saw). Under FSDP2 it writes the local shard, with the deltas gathered
        (a collective: call it on every rank, outside forward)."""
        name = self.active_adapter
        if name is None or name not in self.s2ft or self.merged_adapters or not self._writable():
            if self._written is not None and not self.merged_adapters:
                self.restore()
            return
        d = self.s2ft[name]
        key = _key(d)
        wr = self._written
        if wr is not None and wr.name == name and wr.key == key and not wr.recheck:
            return
        if torch._C._current_graph_task_id() != -1:
            raise RuntimeError(
                f"{self.path}: the deltas of adapter {name!r} (or the active adapter) changed between a forward "
                "and its backward (gradient-checkpoint recompute). Step the optimizer and switch adapters only "
                "after backward."
            )
        if wr is not None and wr.name != name:
            self.restore()
        w, row_off, col_off, b, b_off = self._local_weight()
        if _is_dtensor(self.base_layer.weight):
            self._sharded = True
        if self._written is None:
            self._written = _plan(name, d, self.base_layer, w, row_off, col_off, b, b_off)
        wr = self._written
        dr, db, dc = _local_deltas(d, wr, w, row_off, col_off)
        acc = torch.promote_types(w.dtype, next(p.dtype for p in d.parameters()))
        new_r = None if dr is None else wr.rows.to(acc) + dr.to(acc)  # (k_r, in) base + D_r
        new_c = None if dc is None else wr.cols.to(acc) + dc.to(acc)  # (out, k_c) base + D_c
        if new_r is not None and new_c is not None:  # entries in both: base + D_r + D_c
            new_r[:, wr.c_loc] += dc.index_select(0, wr.r_loc).to(acc)
            new_c[wr.r_loc] += dr.index_select(1, wr.c_loc).to(acc)
        if new_r is not None:
            w.index_copy_(0, wr.r_loc, new_r.to(w.dtype))
        if new_c is not None:
            w.index_copy_(1, wr.c_loc, new_c.to(w.dtype))
        if db is not None:
            b.index_copy_(0, wr.bias_loc, (wr.bias.to(acc) + db.to(acc)).to(b.dtype))
        wr.key, wr.recheck = key, False
        self._generation += 1

    def after_step(self) -> None:
        """After an optimizer step: write the trained blocks now (a compiled forward cannot
        check versions), and again at the next eager forward. Versions alone cannot be trusted
        here: fused optimizers (`AdamW(fused=True)`, Trainer's default) and DeepSpeed's copy of
        its fp32 master weights into the parameters change deltas without bumping `_version`."""
        wr = self._written
        if wr is None or not any(p.requires_grad for p in self.s2ft[wr.name].parameters()):
            return
        wr.key = None
        self.sync()
        if self._written is not None:
            self._written.recheck = True

    @torch.no_grad()
    def restore(self) -> None:
        """Put the exact base values back into W (and b) where an adapter was written."""
        if self._written is None:
            return
        w, _, _, b, _ = self._local_weight()
        wr = self._written
        if wr.cols is not None:
            w.index_copy_(1, wr.c_loc, wr.cols)
        if wr.rows is not None:
            w.index_copy_(0, wr.r_loc, wr.rows)
        if wr.bias is not None:
            b.index_copy_(0, wr.bias_loc, wr.bias)
        self._written = None
        self._generation += 1

    def _apply(self, fn, recurse: bool = True):
        """`.to()`, `.cuda()`, `.half()`…: convert the base backup with the weight it backs up,
        and rewrite the blocks from it at the next sync."""
        out = super()._apply(fn, recurse)
        wr = self._written
        if wr is not None:
            for f in dataclasses.fields(wr):
                value = getattr(wr, f.name)
                if isinstance(value, torch.Tensor):
                    setattr(wr, f.name, fn(value))
            wr.key = None
        return out

    # ------------------------------------------------------------------ merge / unmerge

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Add adapter `name`'s blocks into the base weight (and bias), in place."""
        if name in self.merged_adapters:
            return
        if self.quantized:
            raise RuntimeError(
                f"{self.path}: cannot merge into a bitsandbytes-quantized weight (the deltas would be rounded away); "
                "merge_and_unload() dequantizes the model first and returns it in full precision"
            )
        self.restore()
        d = self.s2ft[name]
        w, row_off, col_off, b, b_off = _local(self.base_layer)
        plan = _plan(name, d, self.base_layer, w, row_off, col_off, b, b_off)
        dr, db, dc = _local_deltas(d, plan, w, row_off, col_off)
        backup: dict[str, torch.Tensor] = {}
        if dr is not None:
            backup["rows"] = plan.rows
            w.index_add_(0, plan.r_loc, dr.to(w.dtype))
        if db is not None:
            backup["bias"] = plan.bias
            b.index_add_(0, plan.bias_loc, db.to(b.dtype))
        if dc is not None:
            backup["cols"] = plan.cols
            w.index_add_(1, plan.c_loc, dc.to(w.dtype))
        backup.update({k: v for k, v in (("r", plan.r_loc), ("c", plan.c_loc), ("b", plan.bias_loc)) if v is not None})
        self._backups[name] = backup
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge, last first, restoring the exact pre-merge values."""
        w, _, _, b, _ = _local(self.base_layer)
        while self.merged_adapters:
            backup = self._backups.pop(self.merged_adapters.pop())
            if "cols" in backup:
                w.index_copy_(1, backup["c"], backup["cols"])
            if "rows" in backup:
                w.index_copy_(0, backup["r"], backup["rows"])
            if "bias" in backup:
                b.index_copy_(0, backup["b"], backup["bias"])

    def extra_repr(self) -> str:
        written = None if self._written is None else self._written.name
        return f"active={self.active_adapter!r}, merged={self.merged_adapters}, in_weight={written!r}"


# ---------------------------------------------------------------------- helpers


def _raw(module: nn.Module, name: str) -> torch.Tensor | None:
    """`module.<name>` read from `_parameters` directly: DeepSpeed ZeRO-3's parameter dict gathers
    a partitioned parameter on item access, which would keep every base weight gathered."""
    return dict.get(module._parameters, name)


def _trains(d: S2FTDelta) -> bool:
    return any(p is not None and p.requires_grad for p in (d.row_delta, d.row_bias, d.col_delta))


def _key(d: S2FTDelta) -> tuple:
    return tuple((id(p), p._version) if p is not None else None for p in (d.row_delta, d.row_bias, d.col_delta))


def _watch(y: torch.Tensor, layer: S2FTLayer) -> None:
    """Make the backward of `y` refuse to run on weights rewritten since its forward (an optimizer
    step or adapter switch between a forward and its backward): dL/dx would use the wrong W."""
    generation = layer._generation
    path = layer.path

    def check(grad: torch.Tensor) -> torch.Tensor:
        if layer._generation != generation:
            raise RuntimeError(
                f"{path}: the base weight was rewritten (optimizer step, set_adapter, load or merge) after this "
                "forward and before its backward, so the input gradient would use other weights. Call backward "
                "before optimizer.step() or switching adapters."
            )
        return grad

    y.register_hook(check)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor: a DTensor (FSDP2-sharded delta) is gathered (a collective)."""
    return t.full_tensor() if t is not None and _is_dtensor(t) else t


def _shard(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(local tensor, global offset of its first element) of a parameter, sharded or not."""
    if not _is_dtensor(p):
        return p, (0,) * p.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return p.to_local(), tuple(offset)


def _local(module: nn.Module) -> tuple[torch.Tensor, int, int, torch.Tensor | None, int]:
    """`(W_local (out_l, in_l), row offset, column offset, b_local, bias offset)`: views into the
    module's (local shard of its) weight and bias."""
    weight, off = _shard(module.weight)
    if isinstance(module, nn.Linear):
        w, row_off, col_off = weight, off[0], off[1]
    else:  # Conv1D stores (in, out)
        w, row_off, col_off = weight.t(), off[1], off[0]
    bias = getattr(module, "bias", None)
    b, b_off = (None, 0)
    if bias is not None:
        b, (b_off,) = _shard(bias)
    return w, row_off, col_off, b, b_off


def _full_shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.nf, getattr(module, "nx", module.weight.shape[0])


def _in_range(idx: torch.Tensor | None, start: int, size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(positions in `idx` of the entries in [start, start+size), those entries - start)."""
    if idx is None:
        return None, None
    mask = (idx >= start) & (idx < start + size)
    return mask.nonzero().view(-1), idx[mask] - start


def _plan(name, d, module, w, row_off, col_off, b, b_off) -> _Written:
    """Local indices of adapter `d`'s blocks and the base values they overwrite in `module`'s
    (local shard of its) weight `w` and bias `b` (see `_local`)."""
    out_l, in_l = w.shape
    sel_r, r_loc = _in_range(d.row_idx, row_off, out_l)
    sel_c, c_loc = _in_range(d.col_idx, col_off, in_l)
    bias_sel, bias_loc = (None, None)
    if d.row_bias is not None:
        bias_sel, bias_loc = _in_range(d.row_idx, b_off, b.shape[0])
    full = (out_l, in_l) == tuple(_full_shape(module))
    return _Written(
        name=name,
        key=None,
        recheck=False,
        sel_r=sel_r,
        r_loc=r_loc,
        sel_c=sel_c,
        c_loc=c_loc,
        rows=None if r_loc is None else w.index_select(0, r_loc).clone(),
        cols=None if c_loc is None else w.index_select(1, c_loc).clone(),
        bias=None if bias_loc is None else b.index_select(0, bias_loc).clone(),
        bias_sel=bias_sel,
        bias_loc=bias_loc,
        full=full,
        geometry=(row_off, col_off, out_l, in_l),
    )


def _reshard(wr: _Written, d: S2FTDelta, module, w, row_off, col_off, b, b_off) -> _Written:
    """The plan of a weight that was whole when written and is an FSDP2 shard now (`fully_shard`
    after `get_s2ft_model`): the local backups are cut from the whole ones."""
    if not wr.full:
        raise RuntimeError("the base weight was resharded after s2ft wrote into it; reload the model")
    out_l, in_l = w.shape
    new = _plan(
        wr.name, d, module, w, row_off, col_off, b, b_off
    )  # indices; its backups are the shard's current values
    if wr.rows is not None:
        new.rows = wr.rows.index_select(0, new.sel_r)[:, col_off : col_off + in_l].clone()
    if wr.cols is not None:
        new.cols = wr.cols[row_off : row_off + out_l].index_select(1, new.sel_c).clone()
    if wr.bias is not None:
        new.bias = wr.bias.index_select(0, new.bias_sel).clone()
    new.key, new.recheck = None, True
    return new


def _local_deltas(d: S2FTDelta, wr: _Written, w: torch.Tensor, row_off: int, col_off: int):
    """The parts of `d`'s (gathered) deltas that fall in the local shard of W."""
    out_l, in_l = w.shape
    dr = _full(d.row_delta)
    db = _full(d.row_bias)
    dc = _full(d.col_delta)
    if dr is not None:
        dr = dr.detach().index_select(0, wr.sel_r)[:, col_off : col_off + in_l]  # (k_r_local, in_l)
    if db is not None:
        db = db.detach().index_select(0, wr.bias_sel)
    if dc is not None:
        dc = dc.detach()[row_off : row_off + out_l].index_select(1, wr.sel_c)  # (out_l, k_c_local)
    return dr, db, dc


class BatchAdapters:
    """Which adapter each row of a batch uses; `None` or `"__base__"` means the base model.

    Generation may expand the batch (beams, several return sequences) by repeating each row
    `k` times in place (`repeat_interleave`), so groups are derived for any multiple of the
    batch size.
    """

    def __init__(self, names: list[str | None]) -> None:
        self.names = list(names)
        self._cache: dict[tuple[int, Any], list[tuple[str, torch.Tensor]]] = {}

    def groups(self, n: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        key = (n, device)
        if key not in self._cache:
            b = len(self.names)
            if n % b:
                raise ValueError(f"batch of {n} rows cannot use adapter_names for {b} rows")
            k = n // b
            by_name: dict[str, list[int]] = {}
            for i, name in enumerate(self.names):
                if name is not None and name != "__base__":
                    by_name.setdefault(name, []).extend(range(i * k, (i + 1) * k))
            self._cache[key] = [(a, torch.tensor(r, dtype=torch.long, device=device)) for a, r in by_name.items()]
        return self._cache[key]
