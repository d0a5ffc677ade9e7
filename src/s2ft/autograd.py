"""Partial back-propagation for one linear map with trained rows and/or columns (SPEC §4).

The trained blocks of an adapter are dense delta tensors `D_r` (rows `R`) and `D_c`
(columns `C`); with `E_R` (out, k_r) and `E_C` (in, k_c) one-hot selectors the layer computes

    W_eff = W + E_R · D_r + D_c · E_Cᵀ          b_eff = b + E_R · d_b

Two ways to compute it, both exact (tested against the full fine-tuning gradient in float64):

- **in place** (`DeltaGrad`, the default for an unquantized base): `W_eff`'s trained rows and
  columns are written into the base weight itself (`S2FTLayer.sync`, outside forward and
  backward), so forward is the base layer's own call `base_layer(x)` and `dL/dx = g·W_eff` is
  the base layer's own backward. `DeltaGrad` wraps the output and adds only the weight
  gradient of each trained block: one thin product per block, no weight-sized work at all.
- **thin** (`thin_blocks`): the base weight holds the base values and the blocks are added on
  top, `y = base_layer(x) + x[:, C] D_cᵀ + scatter_R(x D_rᵀ + d_b)`, through ordinary autograd.
  Used where `W` cannot be written: mixed-adapter batches, DeepSpeed ZeRO-3 partitions, and
  when asked (`S2FTModel.set_inplace(False)`). On CPU it measured 0.94–1.13× the in-place path; on a
  GPU its thin matmuls run far below peak, and backward needs two more of them for `dL/dx`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DeltaGrad(torch.autograd.Function):
    """`y` unchanged in forward; in backward, pass `g = dL/dy` through and emit the gradients of
    the trained blocks whose values are already inside the base weight.

    Shapes: `y` (N, out) is `base_layer(x)`, computed with `W_eff` in place; `x` (N, in);
    `R` (k_r,), `D_r` (k_r, in), `d_b` (k_r,); `C` (k_c,), `D_c` (out, k_c).

    Forward:
        returns `y` itself (marked dirty, so it is not a view: later in-place ops on it work)
    Saved for backward (the partial-backprop memory saving):
        `x` if `D_r` needs a gradient (row blocks need the whole input); otherwise `x[:, C]` —
        just the k_c selected input columns, a copy — if `D_c` needs one. The base layer itself
        saves nothing for a frozen weight but the weight (a parameter, no new memory).
    Backward, with `g = dL/dy` (N, out) and `g_R = g[:, R]` (N, k_r):
        dL/dy   = g                       passed on to the base layer, whose own backward
                                          gives dL/dx = g W_eff (one dense matmul)
        dL/dD_r = g_Rᵀ x                  (k_r, in)  = (dL/dW)[R, :]
        dL/dd_b = Σ_N g_R                 (k_r,)     = (dL/db)[R]
        dL/dD_c = gᵀ x[:, C]              (out, k_c) = (dL/dW)[:, C]
    computed in `y`'s dtype (the dtype the base matmul ran in, e.g. bf16 under autocast) and
    returned in each delta's dtype, into its ordinary `.grad`.
    """

    @staticmethod
    def forward(ctx, y, x, row_idx, row_delta, row_bias, col_idx, col_delta):
        needs_row = row_delta is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        needs_col = col_delta is not None and ctx.needs_input_grad[6]
        if needs_row:
            saved_x = x
        elif needs_col:
            saved_x = x.index_select(1, col_idx)  # (N, k_c): a copy, not a view of x
        else:
            saved_x = None
        ctx.save_for_backward(saved_x, row_idx, col_idx)
        ctx.needs_row, ctx.needs_col = needs_row, needs_col
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (row_delta, row_bias, col_delta))
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, g):
        saved_x, row_idx, col_idx = ctx.saved_tensors
        row_dtype, bias_dtype, col_dtype = ctx.dtypes
        grad_row = grad_row_bias = grad_col = None
        if ctx.needs_row:
            x = saved_x.to(g.dtype)
            g_r = g.index_select(1, row_idx)  # (N, k_r)
            if ctx.needs_input_grad[3]:
                grad_row = g_r.t().mm(x).to(row_dtype)  # (k_r, in)
            if ctx.needs_input_grad[4]:
                grad_row_bias = g_r.sum(0).to(bias_dtype)  # (k_r,)
        if ctx.needs_col:
            x_c = saved_x.index_select(1, col_idx) if ctx.needs_row else saved_x  # (N, k_c)
            grad_col = g.t().mm(x_c.to(g.dtype)).to(col_dtype)  # (out, k_c)
        return g, None, None, grad_row, grad_row_bias, None, grad_col


def delta_grad(y: torch.Tensor, x: torch.Tensor, delta) -> torch.Tensor:
    """`DeltaGrad` on `y = base_layer(x)`, `x` (N, in) and `y` (N, out), for the blocks of
    `delta` (an `S2FTDelta`): returns `y` itself with the blocks' gradients attached.

    Call the base layer on the 2-D input: nn.Linear then returns a plain tensor, and marking it
    dirty costs nothing (a view, e.g. Conv1D's output, goes through autograd's CopySlices).
    """
    return DeltaGrad.apply(y, x, delta.row_idx, delta.row_delta, delta.row_bias, delta.col_idx, delta.col_delta)


def thin_blocks(y: torch.Tensor, x: torch.Tensor, delta, sign: float = 1.0) -> torch.Tensor:
    """`y + sign·(x[..., C] D_cᵀ + scatter_R(x D_rᵀ + d_b))` out of place, through autograd.

    Shapes: `x` (..., in), `y` (..., out). The blocks are cast to the dtype of `x` (under
    autocast the products run in the autocast dtype, like the base layer's matmul).
    """
    dt = x.dtype
    if delta.col_delta is not None:  # (..., k_c) @ (k_c, out)
        y = y + sign * F.linear(x.index_select(-1, delta.col_idx), delta.col_delta.to(dt)).to(y.dtype)
    if delta.row_delta is not None:  # (..., in) @ (in, k_r), scattered into the rows R
        bias = None if delta.row_bias is None else delta.row_bias.to(dt)
        y = y.index_add(-1, delta.row_idx, F.linear(x, delta.row_delta.to(dt), bias).to(y.dtype), alpha=sign)
    return y
