"""`s2ft inspect`: what a config or an adapter trains, layer by layer, and how two adapters overlap.

Everything here works on an *index plan* — `{module_path: {"rows": idx, "cols": idx,
"shape": (out, in)}}` — which comes either from an S2FTModel (a model plus a config) or from
an adapter file, so adapters can be inspected without loading their base model.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from s2ft.structures import module_shape

Plan = dict[str, dict[str, Any]]
_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


def plan_from_model(model: Any, adapter_name: str | None = None) -> Plan:
    name = adapter_name or model.active_adapter
    plan: Plan = {}
    for path, layer in model.named_s2ft_layers():
        if name in layer.s2ft:
            d = layer.s2ft[name]
            plan[path] = {
                "rows": d.row_idx,
                "cols": d.col_idx,
                "shape": module_shape(layer.base_layer),
                "bias": d.row_bias is not None,
            }
    return plan


def plan_from_adapter(path: str | Path) -> tuple[Plan, dict[str, Any]]:
    from s2ft.adapter_io import read_adapter

    meta, modules = read_adapter(path)
    plan = {
        p: {
            "rows": t.get("row_idx"),
            "cols": t.get("col_idx"),
            "shape": tuple(meta["modules"][p]["shape"]),
            "bias": "row_bias" in t,
        }
        for p, t in modules.items()
    }
    return plan, meta


def split_path(path: str) -> tuple[int, str]:
    """`model.layers.3.mlp.down_proj` -> (3, "mlp.down_proj")."""
    m = _LAYER.match(path)
    return (int(m.group(2)), m.group(3)) if m else (0, path)


def parameters(entry: dict[str, Any]) -> int:
    out_dim, in_dim = entry["shape"]
    rows = 0 if entry["rows"] is None else len(entry["rows"])
    cols = 0 if entry["cols"] is None else len(entry["cols"])
    return rows * (in_dim + (1 if entry.get("bias") else 0)) + cols * out_dim


def table(plan: Plan) -> str:
    """Trainable parameters per layer (rows) and module (columns), with totals."""
    grid: dict[int, dict[str, int]] = defaultdict(dict)
    modules: list[str] = []
    for path, entry in plan.items():
        layer, mod = split_path(path)
        grid[layer][mod] = parameters(entry)
        if mod not in modules:
            modules.append(mod)
    width = max(10, *(len(m) for m in modules)) if modules else 10
    lines = ["layer  " + "".join(f"{m:>{width + 2}}" for m in modules) + f"{'total':>{width + 2}}"]
    for layer in sorted(grid):
        row = [grid[layer].get(m, 0) for m in modules]
        lines.append(f"{layer:>5}  " + "".join(f"{v:>{width + 2},}" for v in row) + f"{sum(row):>{width + 2},}")
    totals = [sum(grid[layer].get(m, 0) for layer in grid) for m in modules]
    lines.append("total  " + "".join(f"{v:>{width + 2},}" for v in totals) + f"{sum(totals):>{width + 2},}")
    return "\n".join(lines)


def overlap(a: Plan, b: Plan) -> list[dict[str, Any]]:
    """Per layer and module: shared trained rows+columns of two plans, and their Jaccard index."""
    out = []
    for path in sorted(set(a) | set(b), key=lambda p: split_path(p)):
        layer, mod = split_path(path)
        sa, sb = _lines(a.get(path)), _lines(b.get(path))
        inter = len(sa & sb)
        union = len(sa | sb)
        out.append(
            {
                "layer": layer,
                "module": mod,
                "a": len(sa),
                "b": len(sb),
                "shared": inter,
                "jaccard": inter / union if union else 0.0,
            }
        )
    return out


def overlap_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'layer':>5}  {'module':<24}{'A':>8}{'B':>8}{'shared':>8}{'jaccard':>9}"]
    for r in rows:
        lines.append(f"{r['layer']:>5}  {r['module']:<24}{r['a']:>8}{r['b']:>8}{r['shared']:>8}{r['jaccard']:>9.3f}")
    shared = sum(r["shared"] for r in rows)
    total = sum(r["a"] + r["b"] - r["shared"] for r in rows)
    lines.append(f"total: {shared} shared of {total} trained rows/columns (jaccard {shared / max(total, 1):.3f})")
    return "\n".join(lines)


def heatmap(plan: Plan, path: str | Path, title: str = "selected rows/columns", other: Plan | None = None) -> Path:
    """A PNG with one panel per module kind: layers × rows/columns, 1 where trained
    (with `other`: 1 = first plan only, 2 = second only, 3 = both)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_module: dict[str, dict[int, str]] = defaultdict(dict)
    for p in set(plan) | set(other or {}):
        layer, mod = split_path(p)
        by_module[mod][layer] = p
    mods = sorted(by_module)
    fig, axes = plt.subplots(len(mods), 1, figsize=(9, 1.2 + 1.6 * len(mods)), dpi=110, squeeze=False)
    for ax, mod in zip(axes[:, 0], mods, strict=True):
        layers = sorted(by_module[mod])
        entry = plan.get(by_module[mod][layers[0]]) or (other or {}).get(by_module[mod][layers[0]])
        axis = "rows" if entry["rows"] is not None else "cols"
        size = entry["shape"][0 if axis == "rows" else 1]
        grid = torch.zeros(max(layers) + 1, size)
        for layer in layers:
            p = by_module[mod][layer]
            for bit, src in ((1, plan), (2, other or {})):
                idx = (src.get(p) or {}).get(axis)
                if idx is not None:
                    grid[layer, idx.long()] += bit
        ax.imshow(
            grid.numpy(),
            aspect="auto",
            interpolation="nearest",
            cmap="viridis" if other else "Greys",
            vmin=0,
            vmax=3 if other else 1,
        )
        ax.set_title(f"{mod} ({axis})", fontsize=9)
        ax.set_ylabel("layer")
    axes[-1, 0].set_xlabel("index (original order)")
    fig.suptitle(title + ("   [1: A only, 2: B only, 3: both]" if other else ""), fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def _lines(entry: dict[str, Any] | None) -> set[tuple[str, int]]:
    if entry is None:
        return set()
    out = set()
    for axis in ("rows", "cols"):
        if entry.get(axis) is not None:
            out |= {(axis, int(i)) for i in entry[axis]}
    return out
