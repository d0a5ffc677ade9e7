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

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from s2ft.autograd import s2ft_linear
from s2ft.structures import weight_view


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


class S2FTLayer(nn.Module):
    """Wraps a frozen `base_layer`; forward adds the active adapter's trained blocks."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        weight_view(base_layer)  # raises for unsupported module types
        self.base_layer = base_layer
        self.s2ft = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self._backups: dict[str, dict[str, torch.Tensor]] = {}
        self.batch_adapters: BatchAdapters | None = None  # set by S2FTModel for mixed batches

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as `(out, in)`."""
        return weight_view(self.base_layer)

    def add_adapter(
        self, name: str, rows: torch.Tensor | None, cols: torch.Tensor | None, train_bias: bool, dtype: torch.dtype
    ) -> S2FTDelta:
        if name in self.s2ft:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        w = self.weight
        has_bias = getattr(self.base_layer, "bias", None) is not None
        delta = S2FTDelta(w.shape[0], w.shape[1], rows, cols, train_bias and has_bias, dtype, w.device)
        self.s2ft[name] = delta
        return delta

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge before deleting it")
        if name in self.s2ft:
            del self.s2ft[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.batch_adapters is not None:
            return self._mixed_forward(x, *args, **kwargs)
        name = self.active_adapter
        if name is None or name in self.merged_adapters or name not in self.s2ft:
            return self.base_layer(x, *args, **kwargs)
        d = self.s2ft[name]
        w = self.weight
        bias = getattr(self.base_layer, "bias", None)
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else w.dtype

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype)

        return s2ft_linear(
            cast(x), cast(w), cast(bias), d.row_idx, cast(d.row_delta), cast(d.row_bias), d.col_idx, cast(d.col_delta)
        )

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """One base matmul for the batch, then each adapter's blocks added in place to its own
        rows (dim 0): no copy of the output per adapter."""
        if self.merged_adapters:
            raise RuntimeError("mixed-adapter batches need unmerged weights; call unmerge() first")
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

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Add adapter `name`'s blocks into the base weight (and bias), in place."""
        if name in self.merged_adapters:
            return
        d = self.s2ft[name]
        w = self.weight
        bias = getattr(self.base_layer, "bias", None)
        backup: dict[str, torch.Tensor] = {}
        if d.row_delta is not None:
            backup["rows"] = w.index_select(0, d.row_idx).clone()
            w.index_add_(0, d.row_idx, d.row_delta.to(w.dtype))
            if d.row_bias is not None:
                backup["bias"] = bias.index_select(0, d.row_idx).clone()
                bias.index_add_(0, d.row_idx, d.row_bias.to(bias.dtype))
        if d.col_delta is not None:
            backup["cols"] = w.index_select(1, d.col_idx).clone()
            w.index_add_(1, d.col_idx, d.col_delta.to(w.dtype))
        self._backups[name] = backup
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge, last first, restoring the exact pre-merge values."""
        w = self.weight
        bias = getattr(self.base_layer, "bias", None)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            d, backup = self.s2ft[name], self._backups.pop(name)
            if "cols" in backup:
                w.index_copy_(1, d.col_idx, backup["cols"])
            if "rows" in backup:
                w.index_copy_(0, d.row_idx, backup["rows"])
            if "bias" in backup:
                bias.index_copy_(0, d.row_idx, backup["bias"])

    def extra_repr(self) -> str:
        return f"active={self.active_adapter!r}, merged={self.merged_adapters}"


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
