"""Triton epilogues of the vocabulary-chunked LM-head log-prob path (``impl="cublas"``).

The chunked path (``rankloss/ops/linear_token_logprobs.py``) leaves the three big matrix products to
cuBLAS, one vocabulary chunk ``[v0, v1)`` at a time, and runs these two row kernels on each chunk's
``[N, v]`` fp32 logits in between. Notation (row ``n``, label ``y``, LM head ``W``, bias ``b``, soft-cap
``c``, temperature ``tau``), as in ``linear_token_logprobs.py``:

    a_j = <h, W_j> + b_j          the chunk's raw logits come from cuBLAS; the bias is added here
    u_j = c * tanh(a_j / c) / tau (u_j = a_j / tau without soft-cap)

Forward (``_lse_chunk_kernel``): for every row, the log-sum-exp of the chunk's columns *other than the
target*, merged into a running value over the chunks,

    lso <- logaddexp(lso, log sum_{j in chunk, j != y} exp(u_j)),

and the target's ``u_y`` when ``y`` lies in the chunk. The caller finishes with
``log p(y) = -log(1 + exp(lso - u_y))`` and ``lse = u_y - log p(y)``: no cancellation when ``p_y -> 1``
(``u_y - lse`` would lose every bit there).

Backward (``_grad_chunk_kernel``), with ``coef = g / tau`` (0 on ignored rows) and ``1 - p_y`` given by
the caller as ``-expm1(log p(y))`` (exact where ``1 - exp(u_y - lse)`` is not):

    dLoss/da_j = coef * ([j == y] (1 - p_y) - [j != y] p_j) * (1 - tanh(a_j / c)^2)
    p_j = exp(u_j - lse)

written in the inputs' dtype (the operand of the next two cuBLAS products), and optionally in fp32 (for
the bias gradient) over the logits themselves or, when they are the forward's cached chunk and must stay
intact, into a buffer of their shape. Every element of the chunk is written (zeros on ignored rows), so
the products see no stale memory.

Both kernels are one program per row, looping over the chunk's columns in ``BLOCK_V`` tiles; all
offsets are int64. They are memory-bound: each reads the ``[N, v]`` fp32 chunk once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["lse_chunk_", "grad_chunk_"]

# One program per row; BLOCK_V columns per step. On a GPU 2048 columns and 8 warps: 8 fp32 per thread
# per step, coalesced 16-byte loads. The interpreter gets small tiles so odd test shapes cross boundaries.
GPU_META = dict(BLOCK_V=2048, num_warps=8)
INTERPRETER_META = dict(BLOCK_V=64)


def _meta(device: torch.device) -> dict[str, int]:
    return dict(GPU_META) if device.type == "cuda" else dict(INTERPRETER_META)


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates cleanly to +-1 (exp overflows to inf or underflows to 0).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _tempered_tile(
    z_row, b_ptr, cols, mask, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr
):
    # One tile of a row: a = z + b (raw logits), u = c tanh(a / c) / tau; also t = tanh(a / c) for the
    # soft-cap's derivative (t = a without soft-cap, unused then).
    a = tl.load(z_row + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        a += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    t = a
    if HAS_SOFTCAP:
        t = _tanh(a / softcap)
        u = softcap * t * inv_temp
    else:
        u = a * inv_temp
    return u, t


@triton.jit
def _lse_chunk_kernel(
    z_ptr,  # [N, v] fp32: this chunk's raw logits h W[v0:v1]^T (row stride stride_zn, unit column stride)
    b_ptr,  # [v] bias of the chunk (any float dtype; unused without HAS_BIAS)
    labels_ptr,  # [N] int64 labels (global vocabulary ids, or ignore_index)
    lso_ptr,  # [N] fp32, in/out: running log-sum-exp of the non-target columns seen so far (-inf at first)
    tgt_ptr,  # [N] fp32, out: u_y, written only by the chunk that holds y
    v,  # columns in this chunk
    v0,  # global id of the chunk's first column
    stride_zn,  # row stride of z (elements)
    inv_temp,  # 1 / tau
    softcap,  # c (unused without HAS_SOFTCAP)
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label != ignore_index:
        y = label - v0  # the target's column inside this chunk (outside [0, v) when another chunk holds it)
        z_row = z_ptr + row * stride_zn
        # Online log-sum-exp over the non-target columns: running max m and sum s of exp(u - m).
        m = tl.full([BLOCK_V], -float("inf"), tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        u_y = tl.zeros([BLOCK_V], tl.float32)
        for c0 in range(0, v, BLOCK_V):
            cols = c0 + tl.arange(0, BLOCK_V).to(tl.int64)
            mask = cols < v
            u, _ = _tempered_tile(z_row, b_ptr, cols, mask, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
            is_y = cols == y
            u_y += tl.where(is_y, u, 0.0)
            u = tl.where(mask & ~is_y, u, -float("inf"))
            m_new = tl.maximum(m, u)
            # Lanes that have seen only -inf keep s = 0 (guard the -inf - -inf = nan).
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.exp(u - m_safe)
            m = m_new
        m_row = tl.max(m, axis=0)
        m_row_safe = tl.where(m_row == -float("inf"), 0.0, m_row)
        s_row = tl.sum(s * tl.exp(m - m_row_safe), axis=0)
        # -inf when the chunk held no other column (s_row = 0; log of a positive stand-in, then replaced).
        lse_chunk = tl.where(s_row > 0.0, m_row_safe + tl.log(tl.maximum(s_row, 1e-30)), -float("inf"))
        old = tl.load(lso_ptr + row)
        hi = tl.maximum(old, lse_chunk)
        lo = tl.minimum(old, lse_chunk)
        hi_safe = tl.where(hi == -float("inf"), 0.0, hi)
        merged = hi_safe + tl.log(1.0 + tl.exp(lo - hi_safe))
        merged = tl.where(hi == -float("inf"), -float("inf"), merged)
        tl.store(lso_ptr + row, merged)
        if (y >= 0) & (y < v):
            tl.store(tgt_ptr + row, tl.sum(u_y, axis=0))


@triton.jit
def _grad_chunk_kernel(
    z_ptr,  # [N, v] fp32: this chunk's raw logits (read only, unless g32_ptr is z)
    da_ptr,  # [N, v] out: dLoss/da in the products' dtype (may be z itself for fp32 inputs)
    g32_ptr,  # [N, v] fp32 out when WRITE_F32: dLoss/da (z itself, or a buffer when z must stay intact)
    b_ptr,  # [v] bias of the chunk (unused without HAS_BIAS)
    labels_ptr,  # [N] int64 labels
    lse_ptr,  # [N] fp32 log-sum-exp of each row's full vocabulary
    coef_ptr,  # [N] fp32: g / tau, 0 on ignored rows
    omp_ptr,  # [N] fp32: 1 - p_y = -expm1(log p(y))
    v,  # columns in this chunk
    v0,  # global id of the chunk's first column
    stride_zn,  # row stride of z (elements)
    stride_dn,  # row stride of da (elements)
    stride_gn,  # row stride of g32 (elements)
    inv_temp,  # 1 / tau
    softcap,  # c (unused without HAS_SOFTCAP)
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_F32: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    coef = tl.load(coef_ptr + row)
    y = tl.load(labels_ptr + row) - v0
    lse = tl.load(lse_ptr + row)
    omp = tl.load(omp_ptr + row)
    z_row = z_ptr + row * stride_zn
    da_row = da_ptr + row * stride_dn
    g32_row = g32_ptr + row * stride_gn
    for c0 in range(0, v, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V).to(tl.int64)
        mask = cols < v
        u, t = _tempered_tile(z_row, b_ptr, cols, mask, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
        p = tl.exp(u - lse)
        d = coef * tl.where(cols == y, omp, -p)
        if HAS_SOFTCAP:
            d = d * (1.0 - t * t)
        # Ignored rows (coef = 0) write exact zeros: their lse is 0, so exp(u - lse) may be inf there.
        d = tl.where(coef != 0.0, d, 0.0)
        if WRITE_F32:
            tl.store(g32_row + cols, d, mask=mask)
        tl.store(da_row + cols, d.to(da_ptr.dtype.element_ty), mask=mask)


def lse_chunk_(
    z: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    v0: int,
    lso: torch.Tensor,
    tgt: torch.Tensor,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
) -> None:
    """Merge chunk ``z [N, v]`` (fp32 raw logits of columns ``[v0, v0 + v)``) into ``lso`` and ``tgt`` (both ``[N]``)."""
    N, v = z.shape
    if N == 0 or v == 0:
        return
    assert z.dtype == torch.float32 and z.stride(1) == 1
    _lse_chunk_kernel[(N,)](
        z, bias if bias is not None else z, labels, lso, tgt,
        v, v0, z.stride(0), 1.0 / temperature, float(softcap or 1.0), ignore_index,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, **_meta(z.device),
    )  # fmt: skip


def grad_chunk_(
    z: torch.Tensor,
    da: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    v0: int,
    lse: torch.Tensor,
    coef: torch.Tensor,
    one_minus_p: torch.Tensor,
    temperature: float,
    softcap: float | None,
    write_f32: bool,
    g32: torch.Tensor | None = None,
) -> None:
    """Write ``dLoss/da`` of chunk ``z [N, v]`` into ``da [N, v]`` (and in fp32 when ``write_f32``: into
    ``g32 [N, v]``, default ``z`` itself)."""
    N, v = z.shape
    if N == 0 or v == 0:
        return
    g32 = z if g32 is None else g32
    assert z.dtype == g32.dtype == torch.float32 and z.stride(1) == da.stride(1) == g32.stride(1) == 1
    _grad_chunk_kernel[(N,)](
        z, da, g32, bias if bias is not None else z, labels, lse, coef, one_minus_p,
        v, v0, z.stride(0), da.stride(0), g32.stride(0), 1.0 / temperature, float(softcap or 1.0),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WRITE_F32=write_f32, **_meta(z.device),
    )  # fmt: skip
