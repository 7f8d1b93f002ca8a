"""The fused CGC-LoRA kernel: a frozen linear layer plus a rank-space-gated LoRA, one autograd node.

A CGC-LoRA layer stores all its experts as one LoRA of summed rank R: ``A`` (R, d_in) stacks
every expert's down-projection, ``B`` (d_out, R) every up-projection. The task gate becomes one
coefficient per rank column and per sample, ``c`` (B, R), so the layer's output for a batch is

    out = x W0^T + b + ((x A^T) * c) B^T        (x: (B, L, d_in) -> out: (B, L, d_out))

two adapter products whatever the number of experts. ``FusedCGCLoRA`` computes it as one node:
the update is accumulated into the base output in place, and the input gradients of the base and
the adapter share one buffer, so neither a (B, L, d_out) update nor a second (B, L, d_in) input
gradient is ever materialised. ``cgc.CGCLoRALinear`` builds ``c`` from its gate and calls this.

Two layouts of the rank columns, the same function:

* **dense** (``cols`` None): every sample multiplies by all R columns, with zero coefficients
  on the columns of other tasks' specific experts;
* **gathered** (``cols`` (B, r), the columns sample b uses): sample b multiplies by its own rows
  ``A[cols_b]`` (r, d_in) and columns ``B[:, cols_b]`` (batched products). Its cost does not grow
  with the number of tasks (R does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _to_rank(t: torch.Tensor, M: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """t (B, L, n) times the rank factor M (R, n) transposed: (B, L, R); or, with ``cols`` (B, r),
    each sample times its own rows ``M[cols_b]``: (B, L, r)."""
    return t @ M.T if cols is None else torch.bmm(t, M[cols].transpose(1, 2))


def _from_rank(t: torch.Tensor, M: torch.Tensor, cols: torch.Tensor | None, out=None) -> torch.Tensor:
    """t (B, L, R) times M (R, n): (B, L, n); with ``cols``, t (B, L, r) times ``M[cols_b]``.
    With ``out`` (B, L, n), the product is added into it in place (no (B, L, n) temporary)."""
    if out is None:
        return t @ M if cols is None else torch.bmm(t, M[cols])
    if cols is None:
        out.view(-1, out.shape[-1]).addmm_(t.reshape(-1, t.shape[-1]), M)
    else:
        out.baddbmm_(t, M[cols])
    return out


def _rank_grad(t: torch.Tensor, y: torch.Tensor, M: torch.Tensor, cols: torch.Tensor | None):
    """Gradient of the rank factor M (R, n) from t (B, L, R or r) and y (B, L, n): sum of t^T y
    over all tokens, each sample's rows added into its own ``cols`` in the gathered form."""
    if cols is None:
        return t.flatten(0, 1).T @ y.flatten(0, 1)  # (R, n)
    per_sample = torch.bmm(t.transpose(1, 2), y)  # (B, r, n)
    return M.new_zeros(M.shape).index_add_(0, cols.flatten(), per_sample.flatten(0, 1))


class FusedCGCLoRA(torch.autograd.Function):
    """A frozen linear layer plus a rank-space-gated LoRA update, as one autograd node.

        out = x W0^T + b + v B^T,   v = u * c / (1 - p),   u = (x * m) A^T

    i.e. the LoRA of dropout(x) = x * m / (1 - p), with the dropout scale applied in rank space.
    Shapes: x (B, L, d_in); W0 (d_out, d_in); b (d_out,) or None; A (R, d_in); B (d_out, R);
    m (B, L, d_in) bool keep-mask, or None for no dropout (then p = 0); out (B, L, d_out).
    Two forms:

    * dense (``cols`` None): c (B, R) or (1, R); every sample uses all R columns, with zero
      coefficients on the ones its task may not use;
    * gathered (``cols`` (B, r), the columns sample b uses): c (B, r); sample b multiplies by its
      own rows ``A[cols_b]`` (r, d_in) and columns ``B[:, cols_b]`` (batched products).

    Backward, with g = dL/dout (B, L, d_out) and k = 1 / (1 - p):

        gv = g B;  dB = g^T v;  dc = k * sum over L of gv * u;  gu = k * gv * c;
        dA = gu^T (x * m);  dx = g W0 + (gu A) * m

    Saved: x (needed for dA in any LoRA), the bool mask, u (rank space) and c. Not saved: x * m,
    v (both recomputed) or the update. The update is accumulated into the base output in place
    and the adapter's input gradient into the base's, so neither a (B, L, d_out) update nor a
    second (B, L, d_in) input gradient is ever materialised.

    All floating tensors come in one dtype (the caller casts the small adapter tensors, never x).
    The base weight and bias get gradients only if they require them (a frozen base gets none).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, c, cols, mask, p: float):
        xm = x if mask is None else x * mask  # (B, L, d_in)
        u = _to_rank(xm, A, cols)  # (B, L, R)
        v = u * (c / (1 - p)).unsqueeze(1)  # (B, L, R): gate and dropout scale, in rank space
        out = _from_rank(v, B.T, cols, out=F.linear(x, weight, bias))  # (B, L, d_out)
        ctx.save_for_backward(x, weight, A, B, c, cols, mask, u)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, A, B, c, cols, mask, u = ctx.saved_tensors
        k, need = 1 / (1 - ctx.p), ctx.needs_input_grad
        ck = (c * k).unsqueeze(1)  # (B, 1, R)
        xm = x if mask is None else x * mask  # (B, L, d_in)
        gv = _to_rank(g, B.T, cols)  # (B, L, R)
        dB = _rank_grad(u * ck, g, B.T, cols).T  # (d_out, R)
        dc = (gv * u).sum(1) * k if need[5] else None  # (B, R)
        gu = gv * ck  # (B, L, R)
        dA = _rank_grad(gu, xm, A, cols)  # (R, d_in)
        dx = g @ weight  # (B, L, d_in)
        if mask is None:
            _from_rank(gu, A, cols, out=dx)
        else:
            dx.addcmul_(_from_rank(gu, A, cols), mask)
        dW = g.flatten(0, 1).T @ x.flatten(0, 1) if need[1] else None  # (d_out, d_in)
        db = g.sum((0, 1)) if need[2] else None  # (d_out,)
        return dx, dW, db, dA, dB, dc, None, None, None
