"""TRL: the reference policy of DPO and GRPO is the S2FTModel itself with its adapter disabled.

`SFTTrainer` needs nothing: an S2FTModel looks like the transformers model it wraps
(`model.base_model` is the backbone that TRL's fused LM head calls, `model.config` its config),
and `S2FTCallback` (`s2ft.integrations.transformers`) saves the s2ft format.

The preference and RL trainers need a frozen reference policy. TRL gets one from PEFT models by
disabling the adapter; for any other model it loads a second full copy of the base from
`config._name_or_path`. An S²FT adapter starts at zero and can be switched off exactly
(`S2FTModel.disable_adapter()`, safe in the middle of a training step), so the base model is
the reference without a second copy:

- `DPOTrainer(model=model, ref_model=reference_model(model), ...)`: `reference_model` returns
  a view that holds no parameters and runs `model` under `disable_adapter()`, for every call
  TRL makes, including its fused LM head.
- `S2FTGRPOTrainer`: `GRPOTrainer` (whose constructor has no `ref_model`) with the same view as
  its reference when `beta > 0`.

Nothing in TRL is patched: the view is an ordinary `nn.Module` that TRL prepares and calls like
any reference model.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch.nn as nn

from s2ft.model import S2FTModel


class _Disabled:
    """Call `fn` with the adapters of `policy` disabled (the backbone TRL's fused head calls)."""

    def __init__(self, policy: S2FTModel, fn: Any) -> None:
        self.policy, self.fn = policy, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.policy.disable_adapter():
            return self.fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fn, name)


class ReferenceModel(nn.Module):
    """`policy` with its S²FT adapters disabled. Holds no parameters or buffers of its own
    (`.to()`, `.eval()` and accelerate's `prepare_model` leave the policy alone), so there is
    one copy of the base weights. Forward, `generate` and the backbone (`base_model`, which
    TRL's fused LM head calls) all run under `policy.disable_adapter()`; other attributes
    (`config`, `get_output_embeddings`, ...) are the policy's."""

    def __init__(self, policy: S2FTModel) -> None:
        super().__init__()
        policy = getattr(policy, "module", policy)  # a DDP wrapper, if one is passed
        if not isinstance(policy, S2FTModel):
            raise TypeError(f"reference_model needs an S2FTModel, got {type(policy).__name__}")
        self.__dict__["policy"] = policy  # not a submodule: its parameters stay the policy's

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self.policy.disable_adapter():
            return self.policy.generate(*args, **kwargs)

    @property
    def base_model(self) -> Any:
        return _Disabled(self.policy, self.policy.base_model)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["policy"], name)


def reference_model(policy: S2FTModel) -> ReferenceModel:
    """The reference policy for TRL's `ref_model=`: `policy` with its adapter disabled (see
    `ReferenceModel`). With a freshly initialised adapter this is exactly the model training
    started from."""
    return ReferenceModel(policy)


def _grpo_trainer() -> type:
    from trl import GRPOTrainer

    class S2FTGRPOTrainer(GRPOTrainer):
        """`trl.GRPOTrainer` whose reference policy (used when `args.beta > 0`) is the S2FTModel
        with its adapter disabled (`reference_model`), instead of a second copy of the base
        loaded from `config._name_or_path`. Same arguments as `GRPOTrainer`."""

        def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
            if not isinstance(getattr(model, "module", model), S2FTModel):
                raise TypeError(f"S2FTGRPOTrainer needs an S2FTModel, got {type(model).__name__}")
            grpo_args = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
            beta = getattr(grpo_args, "beta", 0.0)
            # GRPOTrainer builds its reference in __init__ when beta != 0: build none there
            with _beta_zero(grpo_args):
                super().__init__(model, *args, **kwargs)
            self.beta = beta
            if beta != 0.0:
                ref = reference_model(self.model)
                from trl.trainer.utils import add_fused_lm_head  # as GRPOTrainer does for its own reference

                add_fused_lm_head(
                    ref, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32
                )
                self.ref_model = ref

    return S2FTGRPOTrainer


@contextlib.contextmanager
def _beta_zero(grpo_args: Any):
    if grpo_args is None or getattr(grpo_args, "beta", 0.0) == 0.0:
        yield
        return
    beta = grpo_args.beta
    grpo_args.beta = 0.0
    try:
        yield
    finally:
        grpo_args.beta = beta


def __getattr__(name: str) -> Any:  # `S2FTGRPOTrainer` is built on first use: importing TRL is slow
    if name == "S2FTGRPOTrainer":
        cls = _grpo_trainer()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
