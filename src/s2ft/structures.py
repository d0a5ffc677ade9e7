"""Coupled structures: which rows and columns of which matrices belong to one FFN channel or
one attention head, declared per architecture (SPEC §2).

A *structure map* is a small JSON-serialisable dict; the built-in ones are in `ARCHITECTURES`,
keyed by `config.model_type`. A user passes their own as `S2FTConfig(structure_map=...)`:

    {
      "layers": "model.layers",                  # path of the ModuleList of blocks
      "ffn":  {"up": "mlp.up_proj", "gate": "mlp.gate_proj", "down": "mlp.down_proj"},
      "attn": {"q": "self_attn.q_proj", "k": "self_attn.k_proj",
               "v": "self_attn.v_proj", "o": "self_attn.o_proj"},
      "num_heads": 9, "num_kv_heads": 3, "head_dim": 64    # optional, else read from config
    }

Paths inside a block are relative to it. A fused projection names the block it holds with
`#i`: Phi-3 is `{"gate": "mlp.gate_up_proj#0", "up": "mlp.gate_up_proj#1"}` and GPT-2 is
`{"q": "attn.c_attn#0", "k": "attn.c_attn#1", "v": "attn.c_attn#2"}` — block `i` starts
after the blocks `0..i-1` of the same module. `down` and `o` are column-selected (their input
dimension is the channel/head axis); every other role is row-selected. `ffn` needs `up` and
`down`, `attn` needs all of `q`, `k`, `v`, `o`; either may be omitted.

`resolve(model, structure_map)` checks the map against the model (paths exist, shapes agree
with the head and channel counts) and returns a `ModelStructure` with one `BlockStructure`
per layer. `expand()` turns selected channels/heads into per-module row/column indices,
keeping query heads inside their KV group (grouped-query attention).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_LLAMA_LIKE: dict[str, Any] = {
    "layers": "model.layers",
    "attn": {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
    },
    "ffn": {"up": "mlp.up_proj", "gate": "mlp.gate_proj", "down": "mlp.down_proj"},
}

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gemma3": {**_LLAMA_LIKE, "layers": "model.language_model.layers"},
    "phi3": {
        "layers": "model.layers",
        "attn": {
            "q": "self_attn.qkv_proj#0",
            "k": "self_attn.qkv_proj#1",
            "v": "self_attn.qkv_proj#2",
            "o": "self_attn.o_proj",
        },
        "ffn": {"gate": "mlp.gate_up_proj#0", "up": "mlp.gate_up_proj#1", "down": "mlp.down_proj"},
    },
    "gpt2": {
        "layers": "transformer.h",
        "attn": {"q": "attn.c_attn#0", "k": "attn.c_attn#1", "v": "attn.c_attn#2", "o": "attn.c_proj"},
        "ffn": {"up": "mlp.c_fc", "down": "mlp.c_proj"},
    },
    "opt": {
        "layers": "model.decoder.layers",
        "attn": {
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.out_proj",
        },
        "ffn": {"up": "fc1", "down": "fc2"},
    },
}

COLUMN_ROLES = frozenset({"down", "o"})
_REQUIRED = {"ffn": ("up", "down"), "attn": ("q", "k", "v", "o")}
_OPTIONAL = {"ffn": ("gate",), "attn": ()}
_INT_KEYS = ("num_heads", "num_kv_heads", "head_dim")


class UnsupportedModelError(ValueError):
    """The model's architecture has no built-in structure map."""


@dataclass(frozen=True)
class Slot:
    """Where one role of a coupled structure lives: a module, an axis and a row offset."""

    path: str  # module path from the model root
    axis: str  # "row" (output dim) or "col" (input dim) of the (out, in) weight
    offset: int = 0  # first row of this role's block inside a fused module


@dataclass
class FFNStructure:
    n_channels: int
    slots: dict[str, Slot]


@dataclass
class AttnStructure:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    slots: dict[str, Slot]

    @property
    def group_size(self) -> int:
        """Query heads per KV head: query head h reads KV head h // group_size (HF repeat_kv)."""
        return self.n_heads // self.n_kv_heads


@dataclass
class BlockStructure:
    index: int
    ffn: FFNStructure | None = None
    attn: AttnStructure | None = None


@dataclass
class ModelStructure:
    model_type: str
    structure_map: dict[str, Any]
    blocks: list[BlockStructure] = field(default_factory=list)


def weight_view(module: nn.Module, where: str = "") -> torch.Tensor:
    """The module's weight as an `(out, in)` matrix: `y = x @ W.T (+ b)`.

    nn.Linear stores `(out, in)`; transformers' `Conv1D` (GPT-2) stores `(in, out)` and is
    returned transposed (a view: writing into it writes the module's weight). Anything else —
    and any weight that is not a floating-point `(out_features, in_features)` matrix, such as a
    bitsandbytes 4-bit (packed uint8) or 8-bit (int8) base — is refused, naming `where`.
    """
    name = f"{where} " if where else ""
    if isinstance(module, nn.Linear):
        stored_expected = (module.out_features, module.in_features)
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        stored_expected = (getattr(module, "nx", module.weight.shape[0]), module.nf)  # stored (in, out)
    else:
        raise TypeError(
            f"{name}({type(module).__name__}): s2ft can only train nn.Linear or transformers Conv1D modules"
        )
    weight = module.weight
    stored = tuple(getattr(weight, "ds_shape", None) or weight.shape)  # DeepSpeed ZeRO-3 keeps the real shape aside
    if not weight.dtype.is_floating_point or stored != tuple(stored_expected):
        raise TypeError(
            f"{name}({type(module).__name__}): its weight is {weight.dtype} of shape {tuple(weight.shape)}, not a "
            f"floating-point matrix of shape {tuple(stored_expected)}. bitsandbytes 4-bit/8-bit layers train "
            "beside their quantized weights but cannot be written or merged in place (merge_and_unload() "
            "dequantizes first); other quantized formats are not supported: load the model unquantized."
        )
    return weight if isinstance(module, nn.Linear) else weight.t()


def module_shape(module: nn.Module, where: str = "") -> tuple[int, int]:
    """`(out_features, in_features)` of a module s2ft can train: what `weight_view` accepts,
    and bitsandbytes 4-bit/8-bit linear layers (QS²FT; their stored weight is packed, so the
    sizes come from `in_features`/`out_features`, see `s2ft.quantization`)."""
    from s2ft.quantization import is_quantized

    if is_quantized(module):
        return module.out_features, module.in_features
    out_dim, in_dim = weight_view(module, where).shape
    return out_dim, in_dim


def validate_structure_map(smap: Any, field_name: str = "structure_map") -> None:
    """Check the shape of a structure map (not against a model: that is `resolve`)."""
    if not isinstance(smap, dict):
        raise ValueError(f"{field_name} must be a dict, got {type(smap).__name__}")
    allowed = {"layers", "ffn", "attn", *_INT_KEYS}
    unknown = sorted(set(smap) - allowed)
    if unknown:
        raise ValueError(f"{field_name} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    if not isinstance(smap.get("layers"), str) or not smap["layers"]:
        raise ValueError(f'{field_name}["layers"] must be the path of the block list, e.g. "model.layers"')
    if "ffn" not in smap and "attn" not in smap:
        raise ValueError(f'{field_name} needs an "ffn" and/or an "attn" entry')
    for kind in ("ffn", "attn"):
        if kind not in smap:
            continue
        roles = smap[kind]
        if not isinstance(roles, dict):
            raise ValueError(f'{field_name}["{kind}"] must be a dict of role -> module path')
        missing = [r for r in _REQUIRED[kind] if r not in roles]
        if missing:
            raise ValueError(f'{field_name}["{kind}"] is missing role(s) {missing}')
        bad = sorted(set(roles) - set(_REQUIRED[kind]) - set(_OPTIONAL[kind]))
        if bad:
            raise ValueError(f'{field_name}["{kind}"] has unknown role(s) {bad}')
        for role, path in roles.items():
            if not isinstance(path, str) or not path:
                raise ValueError(f'{field_name}["{kind}"]["{role}"] must be a module path string')
            _split_block(path, f'{field_name}["{kind}"]["{role}"]')
    for key in _INT_KEYS:
        if key in smap and (not isinstance(smap[key], int) or isinstance(smap[key], bool) or smap[key] <= 0):
            raise ValueError(f'{field_name}["{key}"] must be a positive integer, got {smap[key]!r}')


def structure_map_for(model: nn.Module, custom: dict[str, Any] | None = None) -> dict[str, Any]:
    """The structure map to use for `model`: the custom one if given, else the built-in one."""
    if custom is not None:
        validate_structure_map(custom)
        return copy.deepcopy(custom)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"s2ft has no coupled-structure map for model_type={model_type!r} "
            f"({type(model).__name__}). Built-in: {sorted(ARCHITECTURES)}. Pass your own with "
            'S2FTConfig(structure_map={"layers": "model.layers", "ffn": {"up": ..., "gate": ..., '
            '"down": ...}, "attn": {"q": ..., "k": ..., "v": ..., "o": ...}}) — paths are relative '
            "to one block; see the s2ft.structures docstring for fused projections."
        )
    return copy.deepcopy(ARCHITECTURES[model_type])


def resolve(model: nn.Module, smap: dict[str, Any]) -> ModelStructure:
    """Check `smap` against `model` and return the per-layer coupled structures."""
    try:
        layers = model.get_submodule(smap["layers"])
    except AttributeError:
        raise ValueError(f'structure map: the model has no module at "layers" = {smap["layers"]!r}') from None
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"structure map: {smap['layers']!r} is a {type(layers).__name__}, not a ModuleList")

    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    out = ModelStructure(model_type=str(getattr(config, "model_type", "custom")), structure_map=smap)
    for i in range(len(layers)):
        prefix = f"{smap['layers']}.{i}"
        block = BlockStructure(index=i)
        if "ffn" in smap:
            block.ffn = _resolve_ffn(model, prefix, smap["ffn"])
        if "attn" in smap:
            block.attn = _resolve_attn(model, prefix, smap, text_config)
        out.blocks.append(block)
    return out


def expand(
    block: BlockStructure,
    ffn_channels: torch.Tensor | None,
    heads: torch.Tensor | None,
    ffn_roles: tuple[str, ...],
    attn_roles: tuple[str, ...],
) -> dict[str, dict[str, torch.Tensor]]:
    """Selected units of one block -> `{module_path: {"rows": idx, "cols": idx}}`.

    FFN channel c: rows `off + c` of up/gate, column c of down.
    Query head h: rows `off + [h*d, (h+1)*d)` of q, columns `[h*d, (h+1)*d)` of o.
    K/V: rows `off + [g*d, (g+1)*d)` for every KV head g = h // group_size of a selected h.
    Indices are sorted, unique, in the model's original order.
    """
    plan: dict[str, dict[str, list[torch.Tensor]]] = {}

    def add(slot: Slot, idx: torch.Tensor) -> None:
        entry = plan.setdefault(slot.path, {"rows": [], "cols": []})
        entry["rows" if slot.axis == "row" else "cols"].append(idx + slot.offset)

    if ffn_channels is not None and ffn_channels.numel() and block.ffn is not None:
        for role in ffn_roles:
            if role in block.ffn.slots:
                add(block.ffn.slots[role], ffn_channels)
    if heads is not None and heads.numel() and block.attn is not None:
        a = block.attn
        d = torch.arange(a.head_dim)
        head_rows = (heads[:, None] * a.head_dim + d).reshape(-1)  # (n_sel * d,)
        groups = torch.unique(heads // a.group_size)
        group_rows = (groups[:, None] * a.head_dim + d).reshape(-1)  # (n_groups * d,)
        for role in attn_roles:
            add(a.slots[role], group_rows if role in ("k", "v") else head_rows)

    out: dict[str, dict[str, torch.Tensor]] = {}
    for path, entry in plan.items():
        out[path] = {axis: torch.unique(torch.cat(parts)).to(torch.long) for axis, parts in entry.items() if parts}
    return out


# --------------------------------------------------------------------------------------------


def _split_block(path: str, what: str) -> tuple[str, int]:
    if "#" not in path:
        return path, 0
    base, _, idx = path.partition("#")
    if not base or not idx.isdigit():
        raise ValueError(f"{what} = {path!r}: a fused block is written 'module.path#<block index>'")
    return base, int(idx)


def _get(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"structure map: {what} -> no module at {path!r}") from None
    base = getattr(module, "base_layer", module)  # already wrapped by s2ft
    try:
        module_shape(base)
    except TypeError as e:
        raise ValueError(f"structure map: {what} -> {path!r}: {e}") from None
    return base


def _slots(model: nn.Module, prefix: str, roles: dict[str, str], sizes: dict[str, int], kind: str) -> dict[str, Slot]:
    """Place each role; check fused modules' row blocks add up to their output size."""
    parsed = {role: _split_block(p, f"{kind}.{role}") for role, p in roles.items()}
    slots: dict[str, Slot] = {}
    for role, (rel, block) in parsed.items():
        path = f"{prefix}.{rel}"
        module = _get(model, path, f"{kind}.{role}")
        out_dim, in_dim = module_shape(module)
        if role in COLUMN_ROLES:
            if in_dim != sizes[role]:
                raise ValueError(
                    f"structure map: {kind}.{role} {path!r} has input size {in_dim}, expected {sizes[role]}"
                )
            slots[role] = Slot(path, "col", 0)
            continue
        same = sorted((b, r) for r, (p, b) in parsed.items() if p == rel and r not in COLUMN_ROLES)
        blocks = [b for b, _ in same]
        if blocks != list(range(len(blocks))):
            raise ValueError(
                f"structure map: fused module {path!r} must number its blocks 0..{len(blocks) - 1}, got {blocks}"
            )
        offset = sum(sizes[r] for b, r in same if b < block)
        total = sum(sizes[r] for _, r in same)
        if out_dim != total:
            detail = " + ".join(f"{r}={sizes[r]}" for _, r in same)
            raise ValueError(f"structure map: {kind}.{role} {path!r} has {out_dim} output rows, expected {detail}")
        slots[role] = Slot(path, "row", offset)
    return slots


def _resolve_ffn(model: nn.Module, prefix: str, roles: dict[str, str]) -> FFNStructure:
    down_rel, _ = _split_block(roles["down"], "ffn.down")
    down = _get(model, f"{prefix}.{down_rel}", "ffn.down")
    n = module_shape(down)[1]
    sizes = {r: n for r in roles}
    return FFNStructure(n_channels=n, slots=_slots(model, prefix, roles, sizes, "ffn"))


def _resolve_attn(model: nn.Module, prefix: str, smap: dict[str, Any], cfg: Any) -> AttnStructure:
    roles = smap["attn"]
    n_heads = smap.get("num_heads") or getattr(cfg, "num_attention_heads", None)
    if not n_heads:
        raise ValueError('structure map: cannot read the head count; add "num_heads" to the map')
    n_kv = smap.get("num_kv_heads") or getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = smap.get("head_dim") or getattr(cfg, "head_dim", None)
    if not head_dim:
        hidden = getattr(cfg, "hidden_size", None)
        if not hidden:
            raise ValueError('structure map: cannot read head_dim; add "head_dim" to the map')
        head_dim = hidden // n_heads
    if n_heads % n_kv:
        raise ValueError(f"structure map: {n_heads} query heads are not divisible by {n_kv} KV heads")
    sizes = {"q": n_heads * head_dim, "o": n_heads * head_dim, "k": n_kv * head_dim, "v": n_kv * head_dim}
    try:
        slots = _slots(model, prefix, roles, sizes, "attn")
    except ValueError as e:
        raise ValueError(
            f"{e} (num_heads={n_heads}, num_kv_heads={n_kv}, head_dim={head_dim}; if the config "
            'does not describe this model, set "num_heads"/"num_kv_heads"/"head_dim" in structure_map)'
        ) from None
    return AttnStructure(n_heads=int(n_heads), n_kv_heads=int(n_kv), head_dim=int(head_dim), slots=slots)
