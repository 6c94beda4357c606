"""Triton kernels: per-token log-probabilities fused with the LM head; ``[N, V]`` logits never hit memory.

Maths (row ``n`` with hidden state ``h [D]``, label ``y``; LM head ``W [V, D]``, bias ``b [V]``, soft-cap
``c``, temperature ``tau``):

    a_j = <h, W_j> + b_j                       raw logit                      (tile by tile with tl.dot)
    z_j = c * tanh(a_j / c)                    soft-capped logit (z = a without soft-cap)
    u_j = z_j / tau
    lso = log sum_{j != y} exp(u_j)            online over vocabulary tiles, merged across splits
    l   = -log(1 + exp(lso - u_y))             = u_y - lse, without the cancellation when p_y -> 1
    lse = u_y - l

Backward, with the per-token upstream gradient ``g = dLoss/dl`` and ``p_j = exp(u_j - lse)``:

    dLoss/du_j = g * ([j == y] - p_j)          the target entry g * (1 - p_y) with 1 - p_y = -expm1(l)
    dLoss/da_j = dLoss/du_j / tau * (1 - tanh(a_j / c)^2)          (the last factor only with soft-cap)
    dLoss/dh   = sum_j dLoss/da_j * W_j        -> d hidden [N, D]
    dLoss/dW_j = sum_n dLoss/da_{n,j} * h_n    -> d weight [V, D]
    dLoss/db_j = sum_n dLoss/da_{n,j}          -> d bias [V]

Ignored rows cost nothing and need no host synchronisation: the launcher orders the rows so that the
scored ones come first (``rows``) and passes their count in a device tensor (``n_valid_ptr``); every
program whose row block starts past that count exits at once, and the loops over rows stop there.

Kernels:

* ``_fwd_kernel``: one program per (row block, vocabulary split), the split fastest, so that the
  programs resident at once share few row blocks and re-read them from L2. Each program computes, for
  its rows and its share of the vocabulary, the running max and the running sum of exponentials of the non-target
  logits, and the target logit; the launcher merges the splits (a logsumexp over ``SPLIT_V`` partials)
  and takes ``l = -log(1 + exp(lso - u_y))``: computed as ``u_y - lse`` it would round to 0 once
  ``p_y > 1 - 2^-24``, and the backward's ``1 - p_y`` with it. Splitting the vocabulary keeps the GPU
  busy when there are few row blocks, and keeps the resident programs' rows within the L2 when there
  are many.
* ``_bwd_atomic_kernel`` (default backward): one program per (row block, vocabulary tile), in groups
  of ``GROUP_N`` row blocks so that the programs resident at once spread their atomics over several
  ``d weight`` tiles and ``d hidden`` row blocks. Each program recomputes its logit tile once and adds
  its contributions to ``d hidden``, ``d weight`` and ``d bias`` with fp32 atomics: 8 N V D FLOPs for
  forward + backward, but the order of the additions (and so the last bits of the result) depends on
  scheduling. The atomics are relaxed: nothing in the kernel reads what they write (the results are
  read after the kernel), so they need no ordering, and the default acq_rel semantics would put a
  ``MEMBAR.GPU`` before every one of them. **Gradient filtering** (after apple/ml-cross-entropy's,
  with a threshold relative to each row): a tile skips its two products with ``W`` and ``h`` when, in
  each of its rows, every ``p_j`` is below ``filter_eps (1 - p_y) / V`` (a tile holding a row's target
  never skips). Row ``n``'s gradient mass is ``sum_j |[j == y] - p_j| = 2 (1 - p_y)``; what the skipped
  tiles would add to its ``d hidden`` is ``g sum_skipped p_j W_j``, at most ``V`` columns each below
  ``filter_eps (1 - p_y) / V``: under ``filter_eps / 2`` of the row's gradient mass times ``max |W|``,
  the size of the rounding error the dtype's own sum makes when ``filter_eps = eps(dtype)``
  ("auto"); ``d weight`` loses as little per column relative to the average column. A flat tail (a
  near-uniform softmax, as at initialisation) never qualifies, so nothing is lost there; a peaked one
  (a trained model's junk tokens) does, and a skipped tile costs 2 instead of 6 BLOCK_N BLOCK_V D
  FLOPs. apple/ml-cross-entropy's absolute threshold (``|[j == y] - p_j| < eps / 32``) drops a flat tail
  whole: at V = 32000 that was 3-13% of ``d hidden`` (tests/test_gradient_filtering.py).
* ``_bwd_dhidden_kernel`` + ``_bwd_dweight_kernel`` (``deterministic=True``): each program owns its
  output rows (a row block of ``d hidden``, or a vocabulary tile of ``d weight`` and ``d bias``) and
  loops over the other dimension in a fixed order, so no atomics are needed and the result is bitwise
  reproducible. The logit tiles are recomputed once per kernel: 10 N V D FLOPs instead of 8.

Gradients are accumulated in fp32 buffers and cast to the inputs' dtypes by the launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "linear_token_logprobs_forward",
    "linear_token_logprobs_backward",
    "logprobs_from_others",
    "scored_rows_first",
]


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates cleanly to +-1 (exp overflows to inf or underflows to 0).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _operand(x, UPCAST_DOT: tl.constexpr):
    # tl.dot operand. The CPU interpreter mishandles bfloat16 products, so there the (already rounded)
    # operands are widened to fp32 first; on a GPU they stay in the inputs' dtype for the tensor cores.
    if UPCAST_DOT:
        x = x.to(tl.float32)
    return x


@triton.jit
def _weight_tile(
    w_ptr, w_desc, cols, col_mask, v0, d0, D, stride_wv, stride_wd, BLOCK_D: tl.constexpr, W_TMA: tl.constexpr
):
    # W[v0 : v0 + BLOCK_V, d0 : d0 + BLOCK_D] (cols = v0 + arange(BLOCK_V)), 0 outside the valid columns
    # and D: through the TMA descriptor w_desc (which zero-fills outside W; the columns past col_mask are
    # only ever past V) when W_TMA, else a masked pointer load.
    if W_TMA:
        w = w_desc.load([v0, d0])
    else:
        dd = d0 + tl.arange(0, BLOCK_D)
        w = tl.load(
            w_ptr + cols.to(tl.int64)[:, None] * stride_wv + dd[None, :] * stride_wd,
            mask=col_mask[:, None] & (dd < D)[None, :],
            other=0.0,
        )
    return w


@triton.jit
def _raw_logit_tile(
    h_ptr, w_ptr, w_desc, rows, row_mask, cols, col_mask, v0, D, stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, W_TMA: tl.constexpr,
):
    # a[n, j] = sum_d h[rows[n], d] * W[cols[j], d], accumulated in fp32 over BLOCK_D slices of D. The rows
    # of h are gathered (pointer loads); W's tile is contiguous (a TMA load when W_TMA).
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        h = tl.load(
            h_ptr + rows[:, None] * stride_hn + dd[None, :] * stride_hd,
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        w = _weight_tile(w_ptr, w_desc, cols, col_mask, v0, d0, D, stride_wv, stride_wd, BLOCK_D, W_TMA)
        acc = tl.dot(
            _operand(h, UPCAST_DOT), tl.trans(_operand(w, UPCAST_DOT)), acc, input_precision=DOT_PRECISION
        )
    return acc


@triton.jit
def _grad_logit_tile(
    h_ptr, w_ptr, w_desc, b_ptr, labels_ptr, lse_ptr, omp_ptr, grad_ptr, rows, row_mask, cols, col_mask, v0,
    D, stride_hn, stride_hd, stride_wv, stride_wd, inv_temp, softcap, filter_thresh,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, FILTER: tl.constexpr, W_TMA: tl.constexpr,
):
    # (dLoss/da for a [BLOCK_N, BLOCK_V] tile, whether the tile matters), recomputing the logits (see the
    # module docstring); dLoss/da is 0 outside the valid rows and columns. The target entry takes 1 - p_y
    # from omp_ptr (-expm1(log p(y)), exact where 1 - exp(u_y - lse) cancels). With FILTER, the tile
    # matters (1) unless every valid entry is a non-target p_j < filter_thresh * (1 - p_y) of its row
    # (filter_thresh = filter_eps / V; 0 keeps every tile); without FILTER it always matters.
    a = _raw_logit_tile(
        h_ptr, w_ptr, w_desc, rows, row_mask, cols, col_mask, v0, D, stride_hn, stride_hd, stride_wv, stride_wd,
        BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT, W_TMA,
    )
    if HAS_BIAS:
        a += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        t = _tanh(a / softcap)
        u = softcap * t * inv_temp
    else:
        u = a * inv_temp
    label = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    omp = tl.load(omp_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    p = tl.exp(u - lse[:, None])
    onehot = cols[None, :] == label[:, None]
    valid = row_mask[:, None] & col_mask[None, :]
    if FILTER:
        large = valid & (onehot | (p >= filter_thresh * omp[:, None]))
        matters = tl.max(tl.max(large.to(tl.int32), axis=1), axis=0)
    else:
        matters = 1
    du = g[:, None] * tl.where(onehot, omp[:, None], -p)
    da = du * inv_temp
    if HAS_SOFTCAP:
        da = da * (1.0 - t * t)
    return tl.where(valid, da, 0.0), matters


@triton.jit
def _fwd_kernel(
    h_ptr,  # [N, D] hidden states (strides stride_hn, stride_hd)
    w_ptr,  # [V, D] LM-head weight (strides stride_wv, stride_wd)
    w_desc,  # TMA descriptor of w's [BLOCK_V, BLOCK_D] tiles when W_TMA (else w_ptr again, unused)
    b_ptr,  # [V] bias (unused unless HAS_BIAS)
    labels_ptr,  # [N] int labels, indexed by original row
    rows_ptr,  # [N] int64 row order: scored rows first
    n_valid_ptr,  # [1] int32: number of scored rows (a device tensor: no host sync)
    max_ptr,  # [SPLIT_V, N] fp32 out: max of u over the split's non-target columns, per row (-inf if none)
    sum_ptr,  # [SPLIT_V, N] fp32 out: sum of exp(u - max) over the split's non-target columns
    target_ptr,  # [SPLIT_V, N] fp32 out: u at the label if the label lies in this split, else 0
    # (max_ptr and sum_ptr leave the label's column out: their merge is the non-target log-sum-exp)
    N,  # number of rows (hidden.shape[0])
    V,  # vocabulary size
    D,  # hidden size
    stride_hn, stride_hd, stride_wv, stride_wd,  # strides of hidden and weight, in elements
    inv_temp,  # 1 / temperature
    softcap,  # soft-cap c (unused unless HAS_SOFTCAP)
    V_PER_SPLIT,  # vocabulary columns per split (a multiple of BLOCK_V)
    SPLIT_V,  # number of vocabulary splits (programs per row block)
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary tile width
    BLOCK_D: tl.constexpr,  # slice of D per tl.dot
    DOT_PRECISION: tl.constexpr,  # "ieee" for exact fp32, "tf32" when the user allows it
    UPCAST_DOT: tl.constexpr,  # widen tl.dot operands to fp32 (the CPU interpreter's bfloat16 dot is wrong)
    W_TMA: tl.constexpr,  # load the weight tiles through w_desc (TMA) instead of pointers
):
    # A 1-D grid with the vocabulary split fastest: the programs resident at one time share few row blocks
    # (their re-reads of the rows, one per vocabulary tile, then come from L2) and walk the same weight
    # tiles in step, split by split.
    pid = tl.program_id(0)
    pid_s = pid % SPLIT_V
    pid_n = pid // SPLIT_V
    n_valid = tl.load(n_valid_ptr)
    start = pid_n * BLOCK_N
    if start >= n_valid:
        return
    offs = start + tl.arange(0, BLOCK_N)
    row_mask = offs < n_valid
    rows = tl.load(rows_ptr + offs, mask=row_mask, other=0).to(tl.int64)
    label = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    m = tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    target = tl.zeros([BLOCK_N], dtype=tl.float32)
    v_start = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        a = _raw_logit_tile(
            h_ptr, w_ptr, w_desc, rows, row_mask, cols, col_mask, v0, D, stride_hn, stride_hd, stride_wv, stride_wd,
            BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT, W_TMA,
        )
        if HAS_BIAS:
            a += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_SOFTCAP:
            a = softcap * _tanh(a / softcap)
        u = tl.where(col_mask[None, :], a * inv_temp, -float("inf"))
        is_target = cols[None, :] == label[:, None]
        target += tl.sum(tl.where(is_target, u, 0.0), axis=1)
        u = tl.where(is_target, -float("inf"), u)
        m_new = tl.maximum(m, tl.max(u, axis=1))
        # Rows that have seen no non-target column yet keep s = 0 (guard -inf - -inf = nan).
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(u - m_safe[:, None]), axis=1)
        m = m_new
    out = pid_s.to(tl.int64) * N + rows
    tl.store(max_ptr + out, m, mask=row_mask)
    tl.store(sum_ptr + out, s, mask=row_mask)
    tl.store(target_ptr + out, target, mask=row_mask)


@triton.jit
def _bwd_atomic_kernel(
    h_ptr,  # [N, D] hidden states
    w_ptr,  # [V, D] LM-head weight
    w_desc,  # TMA descriptor of w's [BLOCK_V, BLOCK_D] tiles when W_TMA (else w_ptr again, unused)
    b_ptr,  # [V] bias (unused unless HAS_BIAS)
    labels_ptr,  # [N] int labels
    rows_ptr,  # [N] int64 row order: scored rows first
    n_valid_ptr,  # [1] int32 number of scored rows
    lse_ptr,  # [N] fp32 logsumexp saved by the forward
    omp_ptr,  # [N] fp32 1 - p_y = -expm1(log p(y)) from the forward's log-probs
    grad_ptr,  # [N] fp32 upstream gradient per token
    dh_ptr,  # [N, D] fp32 accumulator for d hidden (contiguous), zero-initialised
    dw_ptr,  # [V, D] fp32 accumulator for d weight (contiguous), zero-initialised
    db_ptr,  # [V] fp32 accumulator for d bias, zero-initialised
    N, V, D,  # rows, vocabulary and hidden sizes
    stride_hn, stride_hd, stride_wv, stride_wd,  # input strides, in elements
    inv_temp, softcap,  # 1 / temperature; soft-cap c
    filter_thresh,  # filter_eps / V: a tile whose non-target p_j are all < filter_thresh (1 - p_y) skips (0: never)
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    GROUP_N: tl.constexpr,  # row blocks per group of the program order (see below)
    W_TMA: tl.constexpr,  # load the weight tiles through w_desc (TMA) instead of pointers
):
    # Program order: a 1-D grid walked in groups of GROUP_N row blocks, the row block fastest within a
    # group, then the vocabulary tile. The programs resident at one time (one per SM) then cover about
    # GROUP_N row blocks x (#SMs / GROUP_N) vocabulary tiles, so at most GROUP_N of them add into one
    # d weight tile and about #SMs / GROUP_N into one d hidden row block (row blocks fastest over the
    # whole grid put every resident program on the same d weight tile).
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_N * tl.cdiv(V, BLOCK_V)
    first = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(n_row_blocks - first, GROUP_N)
    pid_n = first + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows
    n_valid = tl.load(n_valid_ptr)
    start = pid_n * BLOCK_N
    if start >= n_valid:
        return
    offs = start + tl.arange(0, BLOCK_N)
    row_mask = offs < n_valid
    rows = tl.load(rows_ptr + offs, mask=row_mask, other=0).to(tl.int64)
    v0 = pid_v * BLOCK_V  # the tile's first column (the TMA coordinate)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    da, matters = _grad_logit_tile(
        h_ptr, w_ptr, w_desc, b_ptr, labels_ptr, lse_ptr, omp_ptr, grad_ptr, rows, row_mask, cols, col_mask, v0,
        D, stride_hn, stride_hd, stride_wv, stride_wd, inv_temp, softcap, filter_thresh,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT, True, W_TMA,
    )
    if COMPUTE_DB:  # d bias is one row sum: kept exact, filtered or not
        tl.atomic_add(db_ptr + cols, tl.sum(da, axis=0), mask=col_mask, sem="relaxed")
    if matters == 0:
        # Gradient filtering: in every row of the tile, every p_j is below filter_eps (1 - p_y) / V, so
        # what the tile adds to that row's d hidden is under filter_eps / 2 of the row's gradient mass
        # (see the module docstring): skip the two products, 4 of the 6 BLOCK_N BLOCK_V D FLOPs.
        return
    da_lp = da.to(h_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        if COMPUTE_DH:
            w = _weight_tile(w_ptr, w_desc, cols, col_mask, v0, d0, D, stride_wv, stride_wd, BLOCK_D, W_TMA)
            dh = tl.dot(_operand(da_lp, UPCAST_DOT), _operand(w, UPCAST_DOT), input_precision=DOT_PRECISION)
            tl.atomic_add(
                dh_ptr + rows[:, None] * D + dd[None, :], dh, mask=row_mask[:, None] & d_mask[None, :], sem="relaxed"
            )
        if COMPUTE_DW:
            h = tl.load(
                h_ptr + rows[:, None] * stride_hn + dd[None, :] * stride_hd,
                mask=row_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            dw = tl.dot(tl.trans(_operand(da_lp, UPCAST_DOT)), _operand(h, UPCAST_DOT), input_precision=DOT_PRECISION)
            tl.atomic_add(
                dw_ptr + cols[:, None] * D + dd[None, :], dw, mask=col_mask[:, None] & d_mask[None, :], sem="relaxed"
            )


@triton.jit
def _bwd_dhidden_kernel(
    h_ptr, w_ptr, w_desc, b_ptr, labels_ptr, rows_ptr, n_valid_ptr, lse_ptr, omp_ptr, grad_ptr,  # as in _bwd_atomic_kernel
    dh_ptr,  # [N, D] fp32 d hidden (contiguous), zero-initialised; this program owns its row block
    V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, W_TMA: tl.constexpr,
):
    # Deterministic d hidden: one program per row block, vocabulary tiles visited in a fixed order.
    pid_n = tl.program_id(0)
    n_valid = tl.load(n_valid_ptr)
    start = pid_n * BLOCK_N
    if start >= n_valid:
        return
    offs = start + tl.arange(0, BLOCK_N)
    row_mask = offs < n_valid
    rows = tl.load(rows_ptr + offs, mask=row_mask, other=0).to(tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        da, _ = _grad_logit_tile(
            h_ptr, w_ptr, w_desc, b_ptr, labels_ptr, lse_ptr, omp_ptr, grad_ptr, rows, row_mask, cols, col_mask, v0,
            D, stride_hn, stride_hd, stride_wv, stride_wd, inv_temp, softcap, 0.0,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT, False, W_TMA,
        )
        da = da.to(h_ptr.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (dd < D)[None, :]
            w = _weight_tile(w_ptr, w_desc, cols, col_mask, v0, d0, D, stride_wv, stride_wd, BLOCK_D, W_TMA)
            ptrs = dh_ptr + rows[:, None] * D + dd[None, :]
            acc = tl.load(ptrs, mask=mask, other=0.0)
            acc = tl.dot(_operand(da, UPCAST_DOT), _operand(w, UPCAST_DOT), acc, input_precision=DOT_PRECISION)
            tl.store(ptrs, acc, mask=mask)


@triton.jit
def _bwd_dweight_kernel(
    h_ptr, w_ptr, w_desc, b_ptr, labels_ptr, rows_ptr, n_valid_ptr, lse_ptr, omp_ptr, grad_ptr,  # as in _bwd_atomic_kernel
    dw_ptr,  # [V, D] fp32 d weight (contiguous); this program owns its vocabulary tile
    db_ptr,  # [V] fp32 d bias; this program owns its vocabulary tile
    V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, W_TMA: tl.constexpr,
):
    # Deterministic d weight and d bias: one program per vocabulary tile, scored row blocks in order.
    pid_v = tl.program_id(0)
    n_valid = tl.load(n_valid_ptr)
    v0 = pid_v * BLOCK_V  # the tile's first column (the TMA coordinate)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    db = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, n_valid, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        row_mask = offs < n_valid
        rows = tl.load(rows_ptr + offs, mask=row_mask, other=0).to(tl.int64)
        da, _ = _grad_logit_tile(
            h_ptr, w_ptr, w_desc, b_ptr, labels_ptr, lse_ptr, omp_ptr, grad_ptr, rows, row_mask, cols, col_mask, v0,
            D, stride_hn, stride_hd, stride_wv, stride_wd, inv_temp, softcap, 0.0,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT, False, W_TMA,
        )
        db += tl.sum(da, axis=0)
        if COMPUTE_DW:
            da_lp = da.to(h_ptr.dtype.element_ty)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                h = tl.load(
                    h_ptr + rows[:, None] * stride_hn + dd[None, :] * stride_hd,
                    mask=row_mask[:, None] & (dd < D)[None, :],
                    other=0.0,
                )
                mask = col_mask[:, None] & (dd < D)[None, :]
                ptrs = dw_ptr + cols[:, None] * D + dd[None, :]
                acc = tl.load(ptrs, mask=mask, other=0.0)
                acc = tl.dot(tl.trans(_operand(da_lp, UPCAST_DOT)), _operand(h, UPCAST_DOT), acc, input_precision=DOT_PRECISION)
                tl.store(ptrs, acc, mask=mask)
    if COMPUTE_DB:
        tl.store(db_ptr + cols, db, mask=col_mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
# Tiles on a GPU, per kind of tl.dot, from the sm_90 resource report (python benchmarks/aot_report.py;
# tests/test_aot_report.py fails on a spill, shared memory over 232,448 B per block, or a 16-bit/TF32
# dot without HGMMA):
# * bf16/fp16 (HGMMA): 64 x 128 logit tiles, D in slices of 64, 8 warps: no spills, 73,728-139,264 B
#   of shared memory (3 stages).
# * fp32 with TF32 (HGMMA): D in slices of 32, so that an operand row is 128 bytes as in 16 bits: the
#   atomic backward needs 155,648 B (slices of 64 need 245,760 B, over the limit: OutOfResources).
# * exact fp32 (no tensor cores: FFMA): 32 x 64 tiles, D in slices of 16, 4 warps: no spills in any
#   kernel (at 64 x 128 x 64 the backward kernels spill 96 B to 14 KB per thread, at 64 x 64 x 16 with 8
#   warps the d-weight kernel still 40 B).
GPU_BLOCKS = {
    "16-bit": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8),
    "tf32": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, num_warps=8),
    "ieee": dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=16, num_warps=4),
}
# The forward's tiles. 16-bit inputs: 128 x 128 logit tiles (D in slices of 64, 8 warps, 193-254
# registers, no spills, 98,304 B of shared memory: one program per SM). Each slice of D brings 32 KiB of
# operands from L2 into shared memory for 2 MFLOP of HGMMA (64 FLOP per byte), where the 64 x 128 tiles
# it had before (capped at 128 registers for two programs per SM) brought 24 KiB for 1 MFLOP (43 FLOP
# per byte): at 700 TFLOP/s that is 11 instead of 16 TB/s of L2 reads, which the traffic model leaves
# out. apple/ml-cross-entropy's forward uses 256 x 128 tiles; here 128 x 256 and 256 x 128 spill (12 to
# 332 B per thread) and 128 x 128 with 4 warps spills 120-332 B. The fp32 configurations keep the
# backward's tiles, capped at 128 registers (uncapped 136-139, one program per SM).
GPU_FWD_BLOCKS = {
    "16-bit": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8),
    "tf32": dict(GPU_BLOCKS["tf32"], maxnreg=128),
    "ieee": dict(GPU_BLOCKS["ieee"], maxnreg=128),
}
# Forward programs resident per SM with those tiles (the CTAs/SM of the sm_90 report, which
# tests/test_aot_report.py checks against this table): the launcher splits the vocabulary until the
# resident programs' rows fit in half the L2.
GPU_FWD_CTAS_PER_SM = {"16-bit": 1, "tf32": 2, "ieee": 4}
# The CPU interpreter: small tiles, so that small odd test shapes still cross every block boundary.
INTERPRETER_BLOCKS = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32)
# Row blocks per group of the atomic backward's program order. The 132 programs resident on an H100/H200
# (one per SM) then cover 16 row blocks x ~8 vocabulary tiles: at most 16 add into one d weight tile and
# ~8 into one d hidden row block at a time (row blocks fastest over the whole grid put all 132 on one
# d weight tile). A group's fp32 d hidden blocks (16 x 64 x D x 4 B: 16 MiB at D = 4096) stay in L2
# while it walks the vocabulary, and every group passes once over d weight: the traffic model of
# benchmarks/aot_report.py puts the DRAM traffic at N = 16384 at about a tenth of the old order's.
# The interpreter uses 2, so that test shapes have several groups and a partial one.
GROUP_N = 16
INTERPRETER_GROUP_N = 2


# TMA (Hopper's tensor memory accelerator) for the weight operand: the fused kernels load W's
# [BLOCK_V, BLOCK_D] tiles through a host-side tensor descriptor (triton.tools.tensor_descriptor, in
# Triton 3.6 and 3.8) instead of 16-byte cp.async pointer loads. hidden's rows are gathered through the
# scored-rows-first index, which sm_90's TMA cannot do (tiled loads only), so they stay pointer loads. Off
# until a GPU measures it: benchmarks/gpu_check.py times the fused path with and without it, and the
# sm_90 report (benchmarks/aot_report.py) compiles both.
TMA_WEIGHT = False


def _weight_operand(weight: torch.Tensor, blocks: dict[str, int]) -> tuple[object, bool]:
    """``(w_desc, W_TMA)``: a TMA descriptor of ``weight``'s ``[BLOCK_V, BLOCK_D]`` tiles when
    ``TMA_WEIGHT`` is on, the products run on the tensor cores (16-bit inputs, or fp32 with TF32: exact
    fp32 on CUDA cores gains nothing and spills 48-112 B per thread with it) and ``weight`` meets TMA's
    rules (unit inner stride, 16-byte aligned base and row stride, rows of at least 16 bytes), else
    ``(weight, False)`` (the argument is then unused)."""
    exact_fp32_on_gpu = weight.device.type == "cuda" and _config(weight.dtype) == "ieee"
    if not TMA_WEIGHT or exact_fp32_on_gpu:
        return weight, False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover - Triton before 3.4
        return weight, False
    size = weight.element_size()
    if type(weight).__name__ == "FakeTensor":  # the sm_90 report: allocations are 512-byte aligned
        base = weight.storage_offset() * size
    else:
        base = weight.data_ptr()
    if weight.stride(1) != 1 or (weight.stride(0) * size) % 16 or base % 16 or weight.shape[1] * size < 16:
        return weight, False
    return TensorDescriptor.from_tensor(weight, [blocks["BLOCK_V"], blocks["BLOCK_D"]]), True


def _dot_precision(dtype: torch.dtype) -> str:
    """Exact fp32 products unless the user allowed TF32 matmuls (torch.backends.cuda.matmul.allow_tf32)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _config(dtype: torch.dtype) -> str:
    """The GPU configuration of inputs of ``dtype``: ``"16-bit"``, ``"tf32"`` or ``"ieee"``."""
    return "16-bit" if dtype in (torch.bfloat16, torch.float16) else _dot_precision(dtype)


def _blocks(device: torch.device, dtype: torch.dtype, forward: bool = False) -> dict[str, int]:
    """Launch meta-parameters (tile sizes; num_warps and maxnreg on a GPU) of the forward or the backward
    kernels for inputs of ``dtype`` on ``device``."""
    if device.type != "cuda":
        return dict(INTERPRETER_BLOCKS)
    return dict((GPU_FWD_BLOCKS if forward else GPU_BLOCKS)[_config(dtype)])


def scored_rows_first(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [N] int64, n_valid [1] int32)``: a stable order with the scored rows first, and their count.

    Both stay on the device (no host synchronisation): kernels read ``n_valid`` themselves.
    """
    ignored = labels == ignore_index
    rows = torch.argsort(ignored.to(torch.int8), stable=True)
    n_valid = (~ignored).sum().to(torch.int32).reshape(1)
    return rows, n_valid


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    return 4 * 2**20


def linear_token_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden [N, D]``, ``weight [V, D]``, ``labels [N]`` -> ``(logp [N], lse [N])`` fp32 (0 where ignored)."""
    N, D = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    if N == 0:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return empty, empty.clone()
    blocks = _blocks(device, hidden.dtype, forward=True)
    BLOCK_N, BLOCK_V = blocks["BLOCK_N"], blocks["BLOCK_V"]
    rows, n_valid = scored_rows_first(labels, ignore_index)
    row_blocks = triton.cdiv(N, BLOCK_N)
    v_tiles = triton.cdiv(V, BLOCK_V)
    # Enough programs to fill the machine about four times over, without splitting below one tile; and,
    # since the splits run fastest, enough splits that the programs resident at once (GPU_FWD_CTAS_PER_SM
    # per SM) share so few row blocks that their rows fit in half the L2 and each program's re-reads of
    # them (one per vocabulary tile) hit it. At N = 16384, D = 4096 in bf16 on an H200 that is 6 splits
    # (22 row blocks of 128 rows, 22 MiB, resident); with the row block fastest, up to 256 row blocks of
    # 64 (128 MiB) were, and the forward re-read its rows from DRAM (159 GB in the traffic model of
    # benchmarks/aot_report.py; 14 GB now).
    sms = _num_sms(device)
    split_v = max(1, min(v_tiles, triton.cdiv(4 * sms, row_blocks)))
    resident = sms * (GPU_FWD_CTAS_PER_SM[_config(hidden.dtype)] if device.type == "cuda" else 2)
    rows_bytes = resident * BLOCK_N * D * hidden.element_size()
    split_v = max(split_v, min(v_tiles, triton.cdiv(rows_bytes, _l2_bytes(device) // 2)))
    v_per_split = triton.cdiv(v_tiles, split_v) * BLOCK_V
    split_v = triton.cdiv(V, v_per_split)
    part_max = torch.full((split_v, N), -float("inf"), dtype=torch.float32, device=device)
    part_sum = torch.zeros((split_v, N), dtype=torch.float32, device=device)
    part_target = torch.zeros((split_v, N), dtype=torch.float32, device=device)
    w_desc, w_tma = _weight_operand(weight, blocks)
    _fwd_kernel[(split_v * row_blocks,)](
        hidden, weight, w_desc, bias if bias is not None else hidden, labels, rows, n_valid,
        part_max, part_sum, part_target,
        N, V, D,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 / temperature, float(softcap or 1.0), v_per_split, split_v,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST_DOT=device.type != "cuda", W_TMA=w_tma, **blocks,
    )
    # Merge the splits: lso = M + log(sum_s S_s exp(M_s - M)), the log-sum-exp of the non-target logits
    # (-inf when there is none: V = 1). Ignored rows are zeroed by logprobs_from_others.
    m = part_max.max(dim=0).values
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lso = m_safe + torch.log((part_sum * torch.exp(part_max - m_safe)).sum(dim=0))
    return logprobs_from_others(lso, part_target.sum(dim=0), labels, ignore_index, V)


def logprobs_from_others(
    lso: torch.Tensor, u_y: torch.Tensor, labels: torch.Tensor, ignore_index: int, V: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(y), lse)`` ``[N]`` from the log-sum-exp of each row's non-target logits ``lso`` and its
    target logit ``u_y`` (the forward of this module and the vocabulary-chunked path both end here).

    ``log p(y) = -log(1 + exp(lso - u_y))`` keeps its bits as ``p_y -> 1``, where ``u_y - lse`` rounds to
    0; ``lse = u_y - log p(y)``. Both are 0 on ignored rows. A label outside ``[0, V)`` matched no column
    (nothing was read or written for it): its log-prob is NaN, and ``lse`` is ``lso``, the log-sum-exp of
    the whole row.
    """
    scored = labels != ignore_index
    logp = -torch.logaddexp(torch.zeros_like(lso), lso - u_y)
    bad = (labels < 0) | (labels >= V)
    lse = torch.where(bad, lso, u_y - logp)
    lse = torch.where(scored, lse, torch.zeros_like(lse))
    logp = torch.where(scored, torch.where(bad, float("nan"), logp), torch.zeros_like(logp))
    return logp, lse


def linear_token_logprobs_backward(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    logp: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    *,
    needs_hidden: bool = True,
    needs_weight: bool = True,
    needs_bias: bool = True,
    deterministic: bool = False,
    filter_eps: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(d hidden [N, D], d weight [V, D], d bias [V])`` in the inputs' dtypes (None where not needed).

    ``grad_out [N]`` is the per-token upstream gradient; ``logp`` and ``lse`` are the forward's outputs
    (the target entry uses ``1 - p_y = -expm1(logp)``). ``deterministic=False`` (default) uses one kernel
    with fp32 atomics; ``True`` uses two kernels that own their outputs (no atomics, bitwise
    reproducible, one more recomputation of the logits). ``filter_eps > 0`` (atomic kernel only) skips
    the ``d hidden`` and ``d weight`` products of every ``[BLOCK_N, BLOCK_V]`` tile in whose rows every
    ``p_j`` is below ``filter_eps (1 - p_y) / V`` (gradient filtering; ``d bias`` stays exact).
    """
    N, D = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    needs_bias = needs_bias and bias is not None
    dh = torch.zeros((N, D), dtype=torch.float32, device=device) if needs_hidden else None
    dw = torch.zeros((V, D), dtype=torch.float32, device=device) if needs_weight else None
    db = torch.zeros((V,), dtype=torch.float32, device=device) if needs_bias else None
    if N > 0 and (needs_hidden or needs_weight or needs_bias):
        blocks = _blocks(device, hidden.dtype)
        BLOCK_N, BLOCK_V = blocks["BLOCK_N"], blocks["BLOCK_V"]
        rows, n_valid = scored_rows_first(labels, ignore_index)
        grad_out = grad_out.to(torch.float32).contiguous()
        one_minus_p = -torch.expm1(logp.to(torch.float32)).contiguous()
        common = (
            V, D, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            1.0 / temperature, float(softcap or 1.0),
        )
        w_desc, w_tma = _weight_operand(weight, blocks)
        meta = dict(
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST_DOT=device.type != "cuda", W_TMA=w_tma, **blocks,
        )
        inputs = (
            hidden, weight, w_desc, bias if bias is not None else hidden, labels, rows, n_valid, lse, one_minus_p,
            grad_out,
        )  # fmt: skip
        dummy = lse  # any fp32 tensor for pointers that a constexpr switch leaves unused
        if deterministic:
            if needs_hidden:
                _bwd_dhidden_kernel[(triton.cdiv(N, BLOCK_N),)](*inputs, dh, *common, **meta)
            if needs_weight or needs_bias:
                _bwd_dweight_kernel[(triton.cdiv(V, BLOCK_V),)](
                    *inputs, dw if dw is not None else dummy, db if db is not None else dummy, *common,
                    COMPUTE_DW=needs_weight, COMPUTE_DB=needs_bias, **meta,
                )
        else:
            _bwd_atomic_kernel[(triton.cdiv(N, BLOCK_N) * triton.cdiv(V, BLOCK_V),)](
                *inputs,
                dh if dh is not None else dummy, dw if dw is not None else dummy, db if db is not None else dummy,
                N, *common, float(filter_eps) / V,
                COMPUTE_DH=needs_hidden, COMPUTE_DW=needs_weight, COMPUTE_DB=needs_bias,
                GROUP_N=GROUP_N if device.type == "cuda" else INTERPRETER_GROUP_N, **meta,
            )
    return (
        dh.to(hidden.dtype) if dh is not None else None,
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )
