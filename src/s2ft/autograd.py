"""Partial back-propagation for one linear map with trained rows and/or columns (SPEC §4).

The base weight `W` (out, in) stays frozen and untouched; the trained blocks are dense delta
tensors beside it, so the effective weight is

    W_eff = W + E_R · D_r + D_c · E_Cᵀ          b_eff = b + E_R · d_b

with `E_R` (out, k_r) and `E_C` (in, k_c) one-hot column selectors of the row indices `R`
and the column indices `C`. Training `D_r`, `D_c` from zero is exactly training the rows `R`
and columns `C` of `W` (the gradient w.r.t. `D_r` is the `R` rows of the full weight
gradient), and the base model is never permuted or copied: the indices stay in the model's
original order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class S2FTLinearFunction(torch.autograd.Function):
    """`y = x W_effᵀ + b_eff` with gradients only for the trained blocks.

    Shapes: `x` (..., in) flattened to (N, in); `y` (N, out); `R` (k_r,), `D_r` (k_r, in),
    `d_b` (k_r,); `C` (k_c,), `D_c` (out, k_c).

    Forward:
        y           = x Wᵀ + b                       one dense matmul with the frozen weight
        y[:, R]    += x D_rᵀ + d_b                   (N, k_r): dense, then an indexed add
        y          += x[:, C] D_cᵀ                   (N, k_c) @ (k_c, out), added in place

    Saved for backward (the partial-backprop memory saving):
        `x` only if `D_r` needs a gradient (row blocks need the whole input), otherwise
        `x[:, C]` — just the k_c selected input columns — if `D_c` needs one; nothing when
        neither does. `W`, `D_r`, `D_c` are parameters (no new memory). Frozen parts of the
        layer never have an activation saved for them and never get a weight gradient.

    Backward, with `g = dL/dy` (N, out) and `g_R = g[:, R]` (N, k_r):
        dL/dx   = g W + g_R D_r,  then  dL/dx[:, C] += g D_c     (= g W_eff)
        dL/dD_r = g_Rᵀ x                 (k_r, in)  = (dL/dW)[R, :]
        dL/dd_b = Σ_N g_R                (k_r,)     = (dL/db)[R]
        dL/dD_c = gᵀ x[:, C]             (out, k_c) = (dL/dW)[:, C]
    so each trained block's gradient is the matching slice of the full fine-tuning gradient,
    and it lands in the delta's ordinary `.grad` (accumulation, clipping, AMP, DDP all work).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, row_idx, row_delta, row_bias, col_idx, col_delta):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)  # (N, in)
        y = F.linear(x2, weight, bias).contiguous()  # (N, out)
        if row_delta is not None:
            y.index_add_(1, row_idx, F.linear(x2, row_delta, row_bias))  # (N, k_r) into R
        x_c = None
        if col_delta is not None:
            x_c = x2.index_select(1, col_idx)  # (N, k_c): a copy, not a view of x
            y.addmm_(x_c, col_delta.t())  # (N, k_c) @ (k_c, out)

        needs_row = row_delta is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
        needs_col = col_delta is not None and ctx.needs_input_grad[7]
        saved_x = x2 if needs_row else (x_c if needs_col else None)
        ctx.save_for_backward(saved_x, weight, row_idx, row_delta, col_idx, col_delta)
        ctx.x_shape = x.shape
        ctx.needs_row, ctx.needs_col = needs_row, needs_col
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        saved_x, weight, row_idx, row_delta, col_idx, col_delta = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
        g_r = g.index_select(1, row_idx) if row_delta is not None else None  # (N, k_r)

        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g.mm(weight)  # (N, in)
            if row_delta is not None:
                grad_x.addmm_(g_r, row_delta)
            if col_delta is not None:
                grad_x.index_add_(1, col_idx, g.mm(col_delta))  # (N, k_c) into C
            grad_x = grad_x.view(ctx.x_shape)

        grad_row = grad_row_bias = grad_col = None
        if ctx.needs_row:
            x2 = saved_x
            if ctx.needs_input_grad[4]:
                grad_row = g_r.t().mm(x2)  # (k_r, in)
            if ctx.needs_input_grad[5]:
                grad_row_bias = g_r.sum(0)  # (k_r,)
        if ctx.needs_col:
            x_c = saved_x.index_select(1, col_idx) if ctx.needs_row else saved_x  # (N, k_c)
            grad_col = g.t().mm(x_c)  # (out, k_c)
        return grad_x, None, None, None, grad_row, grad_row_bias, None, grad_col


def s2ft_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_idx: torch.Tensor | None,
    row_delta: torch.Tensor | None,
    row_bias: torch.Tensor | None,
    col_idx: torch.Tensor | None,
    col_delta: torch.Tensor | None,
) -> torch.Tensor:
    """Functional form of `S2FTLinearFunction`; all tensors must share one dtype."""
    return S2FTLinearFunction.apply(x, weight, bias, row_idx, row_delta, row_bias, col_idx, col_delta)
