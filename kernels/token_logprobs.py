"""Triton kernels: per-token log-probabilities from materialised logits, forward and backward.

Maths (one row ``n`` of logits ``z [V]``, label ``y``, temperature ``tau``):

    u_j   = z_j / tau
    lse   = log sum_j exp(u_j)                      (online: running max m and running sum s)
    l     = u_y - lse                               (0 where y == ignore_index)

Backward, with the per-token upstream gradient ``g = dLoss/dl``:

    dl/du_j = [j == y] - p_j,   p_j = exp(u_j - lse)
    dLoss/dz_j = g * ([j == y] - p_j) / tau

The target entry ``g * (1 - p_y) / tau`` is computed as ``g * sum_{j != y} p_j / tau`` in fp32: when
``p_y -> 1`` the difference ``1 - p_y`` would lose all its bits, while the sum of the other
probabilities keeps them. Ignored rows get an all-zero gradient row (every output element is written).

Both kernels run one program per row and stream the vocabulary in ``BLOCK_V`` tiles, so any ``V`` fits;
row offsets are computed in int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["token_logprobs_forward", "token_logprobs_backward"]


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,  # [N, V] logits, any float dtype, row stride `stride_n`, unit column stride
    labels_ptr,  # [N] int labels (ignore_index marks unscored rows)
    out_ptr,  # [N] fp32 output: log-prob of each row's label, 0 for ignored rows
    lse_ptr,  # [N] fp32 output: logsumexp of the tempered row (saved for the backward), 0 if ignored
    V,  # vocabulary size
    stride_n,  # row stride of logits, in elements
    ignore_index,  # label value of unscored rows
    inv_temp,  # 1 / temperature
    BLOCK_V: tl.constexpr,  # vocabulary tile width
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        tl.store(out_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        return
    row_ptr = logits_ptr + row * stride_n
    m = -float("inf")
    s = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        u = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(u, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(u - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    # A label outside [0, V) (other than ignore_index) is never read: its log-prob is NaN, so the bad
    # input shows in the loss (RANKLOSS_VALIDATE=1 raises a clear error before the launch instead).
    valid = (label >= 0) & (label < V)
    target = tl.load(row_ptr + label, mask=valid, other=float("nan")).to(tl.float32) * inv_temp
    tl.store(out_ptr + row, target - lse)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _token_logprobs_bwd_kernel(
    grad_out_ptr,  # [N] fp32 upstream gradient dLoss/dl per row
    logits_ptr,  # [N, V] logits of the forward, row stride `stride_n`
    labels_ptr,  # [N] int labels
    lse_ptr,  # [N] fp32 logsumexp saved by the forward
    grad_logits_ptr,  # [N, V] output in the logits' dtype, row stride `stride_gn`
    V,  # vocabulary size
    stride_n,  # row stride of logits
    stride_gn,  # row stride of grad_logits
    ignore_index,  # label value of unscored rows
    inv_temp,  # 1 / temperature
    BLOCK_V: tl.constexpr,  # vocabulary tile width
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    out_row = grad_logits_ptr + row * stride_gn
    if label == ignore_index:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            tl.store(out_row + cols, tl.zeros([BLOCK_V], dtype=tl.float32), mask=cols < V)
        return
    g = tl.load(grad_out_ptr + row).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    in_row = logits_ptr + row * stride_n
    others = 0.0  # sum of p_j over j != label, for the target entry
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        u = tl.load(in_row + cols, mask=mask, other=-float("inf")).to(tl.float32) * inv_temp
        p = tl.exp(u - lse)
        is_target = cols == label
        p = tl.where(is_target, 0.0, p)
        others += tl.sum(p, axis=0)
        # The target column is left out here: the store after the loop is its only writer. (Writing it
        # here too, then overwriting it from another thread without a barrier, is a race on a GPU.)
        tl.store(out_row + cols, (-g * inv_temp) * p, mask=mask & ~is_target)
    # The target entry from the sum of the other probabilities; a label outside [0, V) writes nothing
    # out of bounds (its forward log-prob is NaN).
    tl.store(out_row + label, g * inv_temp * others, mask=(label >= 0) & (label < V))


def _block_v(V: int, device: torch.device) -> int:
    # 4096 columns per step on a GPU; the interpreter (CPU tensors) takes at most 1024.
    return min(max(triton.next_power_of_2(V), 16), 4096 if device.type == "cuda" else 1024)


def token_logprobs_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. ``logits [N, V]`` (unit column stride), ``labels [N]`` -> ``(logp [N], lse [N])``, fp32."""
    N, V = logits.shape
    out = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return out, lse
    _token_logprobs_fwd_kernel[(N,)](
        logits, labels, out, lse, V, logits.stride(0), ignore_index, 1.0 / temperature, BLOCK_V=_block_v(V, logits.device)
    )
    return out, lse


def token_logprobs_backward(
    grad_out: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    temperature: float,
) -> torch.Tensor:
    """Launch the backward: ``grad_out [N]`` fp32 -> ``grad_logits [N, V]`` in the logits' dtype."""
    N, V = logits.shape
    grad_logits = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N == 0:
        return grad_logits
    _token_logprobs_bwd_kernel[(N,)](
        grad_out,
        logits,
        labels,
        lse,
        grad_logits,
        V,
        logits.stride(0),
        grad_logits.stride(0),
        ignore_index,
        1.0 / temperature,
        BLOCK_V=_block_v(V, logits.device),
    )
    return grad_logits
