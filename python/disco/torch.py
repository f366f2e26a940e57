"""Autograd for dispatch and combine (torch tensors).

    res = disco.torch.dispatch(comm, x, topk_idx, topk_weights)   # res.x has grad_fn
    y = experts(res.x, res.tokens_per_expert)
    out = disco.torch.combine(comm, y, res)                        # weighted sum

Gradients (exact adjoints of the forward maps):
- dispatch: recv_x rows are copies of x[t], so grad_x[t] is the *unweighted*
  combine of the row gradients over the same handle.
- combine: out[t] = sum_j w[t,j] * y[row(t,j)], so
  grad_y[row] = w_row * grad_out[src_token]: grad_out is dispatched with the
  same topk_idx (a fresh dispatch on its own handle: the forward handle keeps
  its plan and weights for the dispatch backward), then scaled per row; and
  grad_w[t,j] = dot(grad_out[t], y[row(t,j)]): the dot is formed on the
  expert's rank and sent back by an unweighted combine of rows that hold it
  in column j (the slot index arrives with the backward dispatch as its
  "weight"). Slots of one token are distinct experts, so column j of the sum
  holds exactly that slot's value.
- RANK_MAJOR: the caller applies the weights itself from res.weight [rows, K],
  which is then differentiable w.r.t. topk_weights (same column trick).

Every rank must run the same backward (same ops in the same order): each
backward step is a collective call. Gradients w.r.t. the weights pass through
the data dtype on the wire (exact for float32, rounded for bf16/fp16).
Verified against a dense single-device computation in float32 and with
torch.autograd.gradcheck in float32 with loose tolerances (the library has no
float64).
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Tuple

import torch

from .comm import Comm, DispatchResult

__all__ = ["dispatch", "combine", "DispatchFunction", "CombineFunction"]


def _scatter_to_slots(comm: Comm, values: torch.Tensor, row: torch.Tensor,
                      slot: torch.Tensor, res: DispatchResult, dtype: torch.dtype,
                      ) -> torch.Tensor:
    """Token-side [T, K] float32 whose [t, j] is the value of the entry with
    slot j in a row of token t (0 if none), by an unweighted combine over
    `res` of rows that hold the value in column j. Entries are (values[i],
    row[i], slot[i]). ceil(K/H) combines (one when H >= K): the same number
    on every rank, as a collective sequence must be."""
    K, H = comm.top_k, comm.hidden
    out = torch.zeros(res.num_tokens, K, dtype=torch.float32, device=values.device)
    for c0 in range(0, K, H):
        z = torch.zeros(res.num_rows, H, dtype=dtype, device=values.device)
        m = (slot >= c0) & (slot < c0 + H)
        z[row[m], slot[m] - c0] = values[m].to(dtype)
        part = comm.combine(z, res, weighted=False)
        width = min(H, K - c0)
        out[:, c0:c0 + width] = part[:, :width].float()
    return out


def _slim(res: DispatchResult, keep_weight: bool) -> DispatchResult:
    """What a backward needs of a result, for ctx: the handle and metadata
    without recv_x (an output: keeping it on ctx would make a reference cycle
    through grad_fn that Python's GC cannot see, and hold its memory)."""
    s = copy.copy(res)
    s.x = None
    s.weight = res.weight.detach() if keep_weight else None
    return s


class DispatchFunction(torch.autograd.Function):
    """recv_x, recv_weight = dispatch(x, topk_weights); see the module doc."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, topk_weights: Optional[torch.Tensor], comm: Comm,
                topk_idx: torch.Tensor, layout: str, expert_alignment: int,
                box: list) -> Tuple[torch.Tensor, torch.Tensor]:
        res = comm.dispatch(x.detach(), topk_idx,
                            None if topk_weights is None else topk_weights.detach(),
                            layout=layout, expert_alignment=expert_alignment)
        ctx.comm, ctx.res = comm, _slim(res, keep_weight=False)
        ctx.weight_grad = res.layout == "rank_major" and topk_weights is not None
        if not ctx.weight_grad:
            ctx.mark_non_differentiable(res.weight)
        ctx.x_dtype = x.dtype
        box.append(res)
        return res.x, res.weight

    @staticmethod
    def backward(ctx: Any, grad_x: torch.Tensor, grad_w: Optional[torch.Tensor]):
        comm, res = ctx.comm, ctx.res
        grad_x = grad_x.to(ctx.x_dtype).contiguous()
        gx = comm.combine(grad_x, res, weighted=False)
        gw = None
        if ctx.weight_grad:
            if grad_w is None:
                grad_w = torch.zeros(res.num_rows, comm.top_k, device=grad_x.device)
            rows, K = res.num_rows, comm.top_k
            dev = grad_x.device
            row = torch.arange(rows, device=dev).repeat_interleave(K)
            slot = torch.arange(K, device=dev).repeat(rows)
            local = (res.expert >= 0).reshape(-1)   # non-local slots get no gradient
            gw = _scatter_to_slots(comm, grad_w.float().reshape(-1)[local], row[local],
                                   slot[local], res, ctx.x_dtype)
        return gx, gw, None, None, None, None, None


class CombineFunction(torch.autograd.Function):
    """out = combine(y, topk_weights) over a dispatch's handle."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, topk_weights: Optional[torch.Tensor], comm: Comm,
                res: DispatchResult, topk_idx: torch.Tensor, weighted: bool) -> torch.Tensor:
        out = comm.combine(y.detach(), res, weighted=weighted)
        ctx.comm, ctx.res, ctx.topk_idx = comm, _slim(res, keep_weight=True), topk_idx
        ctx.apply_weights = res.layout == "expert_major" and weighted and res.weighted
        ctx.save_for_backward(y)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        comm, res = ctx.comm, ctx.res
        (y,) = ctx.saved_tensors
        g = grad_out.to(y.dtype).contiguous()
        T, K = res.num_tokens, comm.top_k
        # The slot index of each row travels as its "weight".
        slots = torch.arange(K, dtype=torch.float32, device=g.device).expand(T, K).contiguous()
        back = comm.dispatch(g, ctx.topk_idx, slots, layout=res.layout,
                             expert_alignment=res.expert_alignment)
        gw = None
        if ctx.apply_weights:
            w_row = res.weight.float()
            grad_y = (back.x.float() * w_row[:, None]).to(y.dtype)
            dots = (back.x.float() * y.detach().float()).sum(dim=1)
            valid = back.src_token >= 0                 # not a padding row
            row = torch.arange(back.num_rows, device=g.device)[valid]
            gw = _scatter_to_slots(comm, dots[valid], row, back.weight.long()[valid], back,
                                   y.dtype)
        else:
            grad_y = back.x
        return grad_y, gw, None, None, None, None


def dispatch(comm: Comm, x: torch.Tensor, topk_idx: torch.Tensor,
             topk_weights: Optional[torch.Tensor] = None, *, layout: str = "expert_major",
             expert_alignment: int = 1) -> DispatchResult:
    """Comm.dispatch with autograd: res.x (and, for RANK_MAJOR with weights,
    res.weight) carry gradients back to x (and topk_weights). The result
    remembers topk_idx/topk_weights for disco.torch.combine."""
    box: list = []
    recv_x, recv_w = DispatchFunction.apply(x, topk_weights, comm, topk_idx, layout,
                                            expert_alignment, box)
    res = box[0]
    res.x, res.weight = recv_x, recv_w
    res.topk_idx, res.topk_weights = topk_idx, topk_weights
    return res


def combine(comm: Comm, expert_out: torch.Tensor, res: DispatchResult, *,
            weighted: bool = True) -> torch.Tensor:
    """Comm.combine with autograd to expert_out and (EXPERT_MAJOR, weighted)
    to the topk_weights given to disco.torch.dispatch."""
    topk_idx = getattr(res, "topk_idx", None)
    if topk_idx is None:
        raise ValueError("disco.torch.combine: res must come from disco.torch.dispatch")
    return CombineFunction.apply(expert_out, res.topk_weights, comm, res, topk_idx, weighted)
