"""S2FTConfig: the one typed description of an S²FT adapter.

Every field is documented here once; `__post_init__` validates them and names the field in
every error. The config is JSON-serialisable (`to_dict` / `from_dict`) and is saved with
each adapter, so an adapter on disk always says how it was made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FFN_ROLES = ("up", "gate", "down")
ATTN_ROLES = ("q", "k", "v", "o")
LAYER_ALLOCATIONS = ("uniform", "increasing", "decreasing", "random_one")
ORDERS = ("large", "small")
DELTA_DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass
class S2FTConfig:
    """How many heads and channels to train in every block, which matrices, chosen how.

    Attributes:
        ffn_ratio: Fraction of FFN intermediate channels trained in every layer, in [0, 1].
            A channel `c` owns row `c` of the up and gate projections and column `c` of the
            down projection (SPEC §2); the same channels are trained in every matrix named
            in `ffn_modules`. The count per layer is `max(1, round(ffn_ratio * channels))`
            when the ratio is positive, else 0.
        attn_ratio: Fraction of query heads trained in every layer, in [0, 1]. A query head
            owns its rows of `q` and its columns of `o`; under grouped-query attention the
            `k`/`v` rows trained are those of the KV heads whose groups contain a selected
            query head. Counted like `ffn_ratio`.
        ffn_modules: Which matrices of the FFN coupled structure are trained, by role
            (`up`, `gate`, `down`). Default: all three, as in the paper (rebuttal Table R4:
            "Up, Down, Gate", same channels in each). Roles a model lacks (non-gated FFNs
            have no `gate`) are skipped.
        attn_modules: Which matrices of the attention coupled structure are trained, by role
            (`q`, `k`, `v`, `o`). Default `("o",)`: the public recipes train output-projection
            columns of the selected heads. Only used when `attn_ratio > 0`.
        strategy: How channels/heads are scored (paper §5.3): `"random"` (seeded; the paper's
            default), `"weight"` (norm of the unit's trained weights), `"activation"` (norm of
            its activations on calibration data), `"salience"` (Wanda-style weight × activation)
            or `"gradient"` (norm of its weight gradient on calibration data). The last three
            need calibration batches. Exact definitions: `s2ft.selection`.
        order: `"large"` keeps the top-k units by score, `"small"` the bottom-k.
        seed: Seed of the selection; the same seed, model shape and config give the same
            indices on any machine.
        layer_allocation: How the budget (the count `ffn_ratio`/`attn_ratio` gives every layer,
            summed) is spread over layers: `"uniform"` (the same count everywhere, the paper's
            default), `"increasing"`, `"decreasing"` (linearly), `"random_one"` (all in one
            seeded random layer), or a list of one non-negative weight per layer.
        train_bias: Also train the bias entries of trained rows, where the base module has a
            bias (Qwen2 q/k/v, OPT, GPT-2). Bias vectors follow their rows (SPEC §2).
        delta_dtype: Storage dtype of the trainable deltas. `None` picks float32 when the
            base weights are float16/bfloat16 (so small updates are not rounded away) and the
            base dtype otherwise. One of `float32`, `float64`, `bfloat16`, `float16`.
        structure_map: A custom coupled-structure map for architectures s2ft does not know,
            or to override a built-in one. See `s2ft.structures` for the format. Saved
            with the adapter.
    """

    ffn_ratio: float = 0.03
    attn_ratio: float = 0.0
    ffn_modules: tuple[str, ...] = FFN_ROLES
    attn_modules: tuple[str, ...] = ("o",)
    strategy: str = "random"
    order: str = "large"
    seed: int = 0
    layer_allocation: str | list[float] = "uniform"
    train_bias: bool = True
    delta_dtype: str | None = None
    structure_map: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        for name in ("ffn_ratio", "attn_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"S2FTConfig.{name} must be a number in [0, 1], got {value!r}")
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"S2FTConfig.{name} must be in [0, 1], got {value!r}")
            setattr(self, name, float(value))
        if self.ffn_ratio == 0.0 and self.attn_ratio == 0.0:
            raise ValueError("S2FTConfig.ffn_ratio and S2FTConfig.attn_ratio are both 0: nothing would be trained")
        self.ffn_modules = _roles("ffn_modules", self.ffn_modules, FFN_ROLES)
        self.attn_modules = _roles("attn_modules", self.attn_modules, ATTN_ROLES)
        if self.ffn_ratio > 0 and not self.ffn_modules:
            raise ValueError("S2FTConfig.ffn_modules is empty but ffn_ratio > 0")
        if self.attn_ratio > 0 and not self.attn_modules:
            raise ValueError("S2FTConfig.attn_modules is empty but attn_ratio > 0")

        from s2ft.selection import STRATEGIES  # late import: selection imports this module

        if self.strategy not in STRATEGIES:
            raise ValueError(f"S2FTConfig.strategy must be one of {sorted(STRATEGIES)}, got {self.strategy!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"S2FTConfig.seed must be a non-negative integer, got {self.seed!r}")
        if self.order not in ORDERS:
            raise ValueError(f"S2FTConfig.order must be one of {list(ORDERS)}, got {self.order!r}")
        alloc = self.layer_allocation
        if isinstance(alloc, str):
            if alloc not in LAYER_ALLOCATIONS:
                raise ValueError(
                    f"S2FTConfig.layer_allocation must be one of {list(LAYER_ALLOCATIONS)} or a list of "
                    f"per-layer weights, got {alloc!r}"
                )
        else:
            try:
                weights = [float(w) for w in alloc]
            except (TypeError, ValueError):
                raise ValueError(
                    f"S2FTConfig.layer_allocation must be a mode name or a list of numbers, got {alloc!r}"
                ) from None
            if not weights or any(w < 0 or w != w for w in weights) or sum(weights) == 0:
                raise ValueError(
                    f"S2FTConfig.layer_allocation weights must be non-negative and not all zero, got {alloc!r}"
                )
            self.layer_allocation = weights
        if not isinstance(self.train_bias, bool):
            raise ValueError(f"S2FTConfig.train_bias must be a bool, got {self.train_bias!r}")
        if self.delta_dtype is not None and self.delta_dtype not in DELTA_DTYPES:
            raise ValueError(
                f"S2FTConfig.delta_dtype must be None or one of {list(DELTA_DTYPES)}, got {self.delta_dtype!r}"
            )
        if self.structure_map is not None:
            from s2ft.structures import validate_structure_map

            validate_structure_map(self.structure_map, field_name="S2FTConfig.structure_map")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        out = dataclasses.asdict(self)
        out["ffn_modules"] = list(self.ffn_modules)
        out["attn_modules"] = list(self.attn_modules)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> S2FTConfig:
        """Build a config from `to_dict()` output; unknown keys are an error that names them."""
        if not isinstance(data, dict):
            raise ValueError(f"S2FTConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"S2FTConfig has no field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)


def _roles(name: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    try:
        roles = tuple(value)
    except TypeError:
        raise ValueError(f"S2FTConfig.{name} must be a list of roles from {list(allowed)}, got {value!r}") from None
    bad = [r for r in roles if r not in allowed]
    if bad:
        raise ValueError(f"S2FTConfig.{name} has unknown role(s) {bad}; allowed: {list(allowed)}")
    if len(set(roles)) != len(roles):
        raise ValueError(f"S2FTConfig.{name} lists a role twice: {list(roles)}")
    # canonical order, so equal configs compare and serialise equal
    return tuple(r for r in allowed if r in roles)
