"""Adapter fusion: the weighted sum of S²FT adapters as one adapter, and how much they overlap.

An adapter is, per module, `ΔW = E_R D_r + D_c E_Cᵀ` (and `Δb = E_R d_b`). A weighted sum
`Σ_i w_i ΔW_i` is again of that form on the union of the row sets and the union of the column
sets: scatter each `w_i D_r,i` into the rows of `R = ∪ R_i` and add (likewise for columns and
bias). The result is exact (no approximation, no rank growth beyond the unions).

Adapters here are the `{module_path: {part: tensor}}` dicts that `s2ft.adapter_io.read_adapter`
returns and `S2FTModel.adapter_modules` builds (parts `row_idx`, `row_delta`, `row_bias`,
`col_idx`, `col_delta`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Modules = dict[str, dict[str, torch.Tensor]]


def fuse_modules(adapters: Sequence[Modules], weights: Sequence[float]) -> Modules:
    """`Σ_i weights[i] · adapters[i]`, module by module, on the union of rows and columns."""
    if len(adapters) != len(weights):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    paths: list[str] = []
    for a in adapters:
        paths += [p for p in a if p not in paths]
    out: Modules = {}
    for path in paths:
        present = [(float(w), a[path]) for a, w in zip(adapters, weights, strict=True) if path in a]
        fused: dict[str, torch.Tensor] = {}
        for idx_name, delta_name, axis in (("row_idx", "row_delta", 0), ("col_idx", "col_delta", 1)):
            blocks = [(w, p) for w, p in present if idx_name in p]
            if not blocks:
                continue
            union = torch.unique(torch.cat([p[idx_name] for _, p in blocks]))  # sorted
            ref = blocks[0][1][delta_name]
            shape = list(ref.shape)
            shape[axis] = len(union)
            delta = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
            for w, p in blocks:
                pos = torch.searchsorted(union, p[idx_name])
                delta.index_add_(axis, pos, w * p[delta_name].to(ref.dtype))
            fused[idx_name], fused[delta_name] = union, delta
            if axis == 0 and any("row_bias" in p for _, p in blocks):
                bias = torch.zeros(len(union), dtype=ref.dtype, device=ref.device)
                for w, p in blocks:
                    if "row_bias" in p:
                        bias.index_add_(0, torch.searchsorted(union, p["row_idx"]), w * p["row_bias"].to(ref.dtype))
                fused["row_bias"] = bias
        out[path] = fused
    return out


def overlap(adapters: Sequence[Modules], names: Sequence[str]) -> list[dict]:
    """Per module: rows+columns each adapter trains, how many are trained by two or more, and
    that count as a fraction of the union (0 = disjoint, fusion is exactly "apply both")."""
    paths: list[str] = []
    for a in adapters:
        paths += [p for p in a if p not in paths]
    rows = []
    for path in paths:
        counts: dict[tuple[str, int], int] = {}
        sizes = {}
        for name, a in zip(names, adapters, strict=True):
            lines = set()
            for idx_name, tag in (("row_idx", "r"), ("col_idx", "c")):
                if path in a and idx_name in a[path]:
                    lines |= {(tag, int(i)) for i in a[path][idx_name].tolist()}
            sizes[name] = len(lines)
            for line in lines:
                counts[line] = counts.get(line, 0) + 1
        shared = sum(1 for c in counts.values() if c > 1)
        union = len(counts)
        frac = shared / max(union, 1)
        rows.append({"module": path, **sizes, "shared": shared, "union": union, "shared_fraction": frac})
    return rows


def fuse_files(paths: Sequence[str], weights: Sequence[float], out: str) -> list[dict]:
    """Fuse saved adapters (same base model) into a new adapter directory `out`, without
    loading the base model. Returns the overlap report."""
    from s2ft.adapter_io import AdapterError, check_fingerprint, read_adapter, write_adapter

    metas, parts = zip(*(read_adapter(p) for p in paths), strict=True)
    for p, meta in zip(paths[1:], metas[1:], strict=True):
        try:
            check_fingerprint(meta["base_model"], metas[0]["base_model"], p, "error")
        except AdapterError as e:
            raise AdapterError(f"cannot fuse {p} with {paths[0]}: {e}") from None
    report = overlap(list(parts), [str(p) for p in paths])
    fused = fuse_modules(list(parts), weights)
    modules = {}
    trainable = 0
    tensors = {}
    for path, t in fused.items():
        shape = next(m["modules"][path]["shape"] for m in metas if path in m["modules"])
        modules[path] = {
            "shape": shape,
            "rows": len(t["row_idx"]) if "row_idx" in t else 0,
            "cols": len(t["col_idx"]) if "col_idx" in t else 0,
            "bias": "row_bias" in t,
        }
        for k, v in t.items():
            tensors[f"{path}.{k}"] = v
            trainable += v.numel() if k.endswith(("delta", "bias")) else 0
    config = dict(metas[0]["config"], train_bias=any(m["bias"] for m in modules.values()))
    meta = {k: v for k, v in metas[0].items() if k not in ("modules", "weights_sha256", "weights_file", "provenance")}
    meta.update(
        config=config,
        modules=modules,
        trainable_parameters=trainable,
        provenance={"fused_from": [str(p) for p in paths], "weights": [float(w) for w in weights]},
    )
    write_adapter(out, tensors, meta)
    return report
