"""Single-pass chain losses over per-caption scores: Plackett-Luce, binary DPO on chains, LiPO-lambda.

One launch, one program per chain. Each program computes, from the scores of its ``K`` captions,
the chain's loss, ``dL_c / dr_i`` for every caption ``i`` of the chain (saved for the backward pass,
which is then a single multiply by the upstream gradient) and the chain's ranking metrics.

Layout: chain ``c`` holds captions ``offsets[c] .. offsets[c + 1] - 1`` of ``scores [S]`` (best first).
The program holds the chain's rewards as a *column* vector ``r_j`` (``BLOCK_C`` = next power of two
of ``K_max`` lanes) and walks the rows ``i`` in blocks of ``BLOCK_K``, so the pairwise tile it works
on is ``[BLOCK_K, BLOCK_C]`` (at most 4096 elements: registers stay bounded at ``K = 256`` and beyond).
Every per-row quantity (suffix logsumexp, rank) is a reduction over the full column range, so it is
exact; every per-caption gradient is a column sum accumulated over the row blocks.

Everything is computed in float32 (float64 inputs included) and stored in the output tensors' dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "LOSS_CODES",
    "PAIRS_CODES",
    "LOSS_TYPE_CODES",
    "MAX_CHAIN_SIZE",
    "NUM_METRICS",
    "chain_loss_fwd",
]

LOSS_CODES = {"plackett_luce": 0, "dpo": 1, "lipo": 2}
PAIRS_CODES = {"adjacent": 0, "all": 1, "best_worst": 2, "best_rest": 3}
LOSS_TYPE_CODES = {"sigmoid": 0, "hinge": 1, "ipo": 2}
# Largest chain the kernel takes: the column block is next_power_of_2(K_max) lanes and the tile is
# [BLOCK_K, BLOCK_C] with BLOCK_K = max(1, 4096 // BLOCK_C) rows, so 4096 is one row per step.
MAX_CHAIN_SIZE = 4096
_TILE_ELEMENTS = 4096
# Warps per program: 4 up to 256 columns; 8 above, where each of the column vectors (rewards, gradient
# accumulator, LiPO ranks, gains, discounts) holds BLOCK_C / (32 * warps) values per thread. The sm_90
# resource report (benchmarks/aot_report.py) finds spills at 4 warps from 1024 columns on (DPO 12-8 B,
# LiPO at 4096: 96 B per thread) and none at 8 warps (at most 175 registers).
_WIDE_COLUMNS = 256
# Rows of the metrics output: pairwise accuracy, top-1 accuracy, Kendall tau, neighbour margin.
NUM_METRICS = 4


@triton.jit
def _load_rewards(scores_ptr, ref_ptr, start, idx, mask, beta, HAS_REF: tl.constexpr):
    # r_i = beta * (s_i - s_ref_i) in float32, in the same operation order as the reference, so the
    # row and column copies of a reward are bitwise equal (ties and the diagonal stay exact).
    s = tl.load(scores_ptr + start + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_REF:
        s = s - tl.load(ref_ptr + start + idx, mask=mask, other=0.0).to(tl.float32)
    return beta * s


@triton.jit
def _softplus(x):
    # log(1 + exp(x)) without overflow: max(x, 0) + log1p(exp(-|x|)). log1p(z) as z * log(u) / (u - 1)
    # with u = 1 + z (z itself where u rounds to 1): log(1 + z) alone is 0 for z < 2^-24, |x| > 17.
    z = tl.exp(-tl.abs(x))
    u = 1.0 + z
    d = u - 1.0
    return tl.maximum(x, 0.0) + tl.where(d == 0.0, z, tl.log(u) * (z / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _sigmoid(x):
    # 1 / (1 + exp(-x)) without overflow: with z = exp(-|x|) in (0, 1], 1/(1+z) for x >= 0, z/(1+z) else.
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, z) / (1.0 + z)


# ------------------------------------------------------------------------------------------------
# The kernel.
#
# Notation: one chain, rewards r_0 .. r_{K-1} (0-based, best first). Tile element (i, j): row i,
# column j; "upper" = i < j (caption i is ranked above caption j in the chain).
#
# Plackett-Luce (LOSS == 0), T = min(top_k, K - 1) summed positions:
#   L = - sum_{k<T} [ r_k - LSE_k ],   LSE_k = log sum_{j>=k} exp(r_j).
#   Per row k (one tile row): m_k = max_{j>=k} r_j, e_kj = exp(r_j - m_k) (<= 1), s_k = sum_j e_kj (>= 1),
#   so r_k - LSE_k = (r_k - m_k) - log(s_k): both parts are O(1)-accurate even for |r| ~ 1e4, because
#   the large m_k cancels exactly in r_k - m_k instead of being rounded inside LSE_k.
#   Backward: dL/dr_j = -[j < T] + sum_{k <= j, k < T} exp(r_j - LSE_k) = -[j < T] + sum_k e_kj / s_k,
#   a column sum of the normalised tile (each term in [0, 1], no overflow).
#
# Pairwise losses (LOSS == 1 DPO, LOSS == 2 LiPO): a weighted sum over pairs (w, l), w above l, of
# g(r_w - r_l). For the tile element (i, j) the pair is (min, max) with margin m = r_min - r_max, i.e.
# m = r_i - r_j on the upper triangle and m = r_j - r_i on the lower one. Then
#   L = sum_{i<j} weight_ij * g(r_i - r_j)
#   dL/dr_j = sum_i [i < j] (-weight_ij g'(m_ij)) + [i > j] (+weight_ij g'(m_ij))
# (column j is the loser of the pair on the upper triangle, the winner on the lower one): again a
# column sum, so no row-indexed scatter is ever needed.
#   DPO: weight_ij = [pair (min, max) taken by the strategy] / n_pairs; g per loss type:
#     sigmoid g = softplus(-m), g' = -sigmoid(-m);  hinge g = max(0, 1 - m), g' = -[1 - m > 0];
#     ipo g = (m / beta - 1 / (2 beta))^2, g' = 2 (m / beta - 1 / (2 beta)) / beta.
#   LiPO: weight_ij = |G_i - G_j| |1/D_i - 1/D_j| (no gradient through it), g = softplus(-m), with
#     G_i = 2^psi_i - 1, psi_i = (K - 1 - i) / (K - 1), D_i = log2(1 + rank_i),
#     rank_i = 1 + #{j : r_j > r_i} + #{j < i : r_j == r_i}. The row ranks are row sums over the
#     full column range; the column ranks come from a first pass of column sums over the row blocks.
#
# Metrics (no gradient): P = #{i<j : r_i > r_j}, Q = #{i<j : r_i < r_j}, n = K (K - 1) / 2;
#   pairwise accuracy P / n, Kendall tau (P - Q) / n, top-1 [r_0 > r_j for all j > 0],
#   neighbour margin mean_k (r_k - r_{k+1}) = (r_0 - r_{K-1}) / (K - 1).
# ------------------------------------------------------------------------------------------------
@triton.jit
def _chain_loss_fwd_kernel(
    scores_ptr,  # [S] per-caption scores s_i, any float dtype, chains contiguous and best first
    ref_ptr,  # [S] reference scores s_ref_i (read only when HAS_REF)
    offsets_ptr,  # [C + 1] int64 chain boundaries: chain c is offsets[c] .. offsets[c + 1] - 1
    loss_ptr,  # [C] out: per-chain loss L_c
    grad_ptr,  # [S] out: dL_c / dr_i for the chain c holding caption i
    rewards_ptr,  # [S] out: rewards r_i = beta * (s_i - s_ref_i)
    metrics_ptr,  # [NUM_METRICS, C] out: pairwise accuracy, top-1, Kendall tau, neighbour margin
    num_chains,  # C, the row stride of metrics_ptr
    beta,  # reward scale (float32); also the IPO scale
    top_k,  # Plackett-Luce: positions summed are k < min(top_k, K - 1); pass >= K_max - 1 for all
    HAS_REF: tl.constexpr,  # whether ref_ptr holds reference scores
    LOSS: tl.constexpr,  # 0 Plackett-Luce, 1 DPO on chains, 2 LiPO-lambda
    PAIRS: tl.constexpr,  # DPO pair strategy: 0 adjacent, 1 all, 2 best_worst, 3 best_rest
    LOSS_TYPE: tl.constexpr,  # DPO loss on the margin: 0 sigmoid, 1 hinge, 2 ipo
    BLOCK_K: tl.constexpr,  # rows of the tile walked per step
    BLOCK_C: tl.constexpr,  # columns of the tile: next power of two >= K_max
):
    chain = tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + chain)
    K = (tl.load(offsets_ptr + chain + 1) - start).to(tl.int32)

    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < K
    r_col = _load_rewards(scores_ptr, ref_ptr, start, cols, col_ok, beta, HAS_REF)
    tl.store(rewards_ptr + start + cols, r_col, mask=col_ok)

    # Column ranks for LiPO: rank_j = 1 + #{i : r_i > r_j or (r_i == r_j and i < j)}.
    if LOSS == 2:
        rank_col = tl.zeros([BLOCK_C], dtype=tl.int32) + 1
        for row0 in range(0, K, BLOCK_K):
            rows = row0 + tl.arange(0, BLOCK_K)
            row_ok = rows < K
            r_row = _load_rewards(scores_ptr, ref_ptr, start, rows, row_ok, beta, HAS_REF)
            above = (r_row[:, None] > r_col[None, :]) | (
                (r_row[:, None] == r_col[None, :]) & (rows[:, None] < cols[None, :])
            )
            rank_col += tl.sum((above & row_ok[:, None]).to(tl.int32), axis=0)
        gain_col = tl.exp2((K - 1 - cols).to(tl.float32) / (K - 1)) - 1.0
        inv_disc_col = 1.0 / tl.log2(1.0 + rank_col.to(tl.float32))

    if LOSS == 1:
        if PAIRS == 0:
            n_pairs = (K - 1).to(tl.float32)
        elif PAIRS == 1:
            n_pairs = (K * (K - 1) // 2).to(tl.float32)
        elif PAIRS == 2:
            n_pairs = 1.0
        else:
            n_pairs = (K - 1).to(tl.float32)
        inv_n_pairs = 1.0 / n_pairs
    if LOSS == 0:
        T = tl.minimum(top_k, K - 1)

    grad_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    loss_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    concordant = tl.zeros([BLOCK_K], dtype=tl.int32)
    discordant = tl.zeros([BLOCK_K], dtype=tl.int32)
    for row0 in range(0, K, BLOCK_K):
        rows = row0 + tl.arange(0, BLOCK_K)
        row_ok = rows < K
        r_row = _load_rewards(scores_ptr, ref_ptr, start, rows, row_ok, beta, HAS_REF)
        valid = row_ok[:, None] & col_ok[None, :]
        upper = valid & (rows[:, None] < cols[None, :])
        concordant += tl.sum((upper & (r_row[:, None] > r_col[None, :])).to(tl.int32), axis=1)
        discordant += tl.sum((upper & (r_row[:, None] < r_col[None, :])).to(tl.int32), axis=1)

        if LOSS == 0:
            active = row_ok & (rows < T)
            suffix = active[:, None] & col_ok[None, :] & (cols[None, :] >= rows[:, None])
            x = tl.where(suffix, r_col[None, :], float("-inf"))
            m = tl.where(active, tl.max(x, axis=1), 0.0)
            e = tl.where(suffix, tl.exp(x - m[:, None]), 0.0)
            s = tl.where(active, tl.sum(e, axis=1), 1.0)
            loss_acc += tl.where(active, tl.log(s) - (r_row - m), 0.0)
            grad_acc += tl.sum(e / s[:, None], axis=0)
        else:
            lower = valid & (rows[:, None] > cols[None, :])
            diff = r_row[:, None] - r_col[None, :]
            margin = tl.where(upper, diff, -diff)
            if LOSS == 1:
                lo = tl.minimum(rows[:, None], cols[None, :])
                hi = tl.maximum(rows[:, None], cols[None, :])
                if PAIRS == 0:
                    taken = hi == lo + 1
                elif PAIRS == 1:
                    taken = hi > lo
                elif PAIRS == 2:
                    taken = (lo == 0) & (hi == K - 1)
                else:
                    taken = (lo == 0) & (hi > 0)
                weight = tl.where(taken & (upper | lower), inv_n_pairs, 0.0)
                if LOSS_TYPE == 0:
                    pair_loss = _softplus(-margin)
                    pair_grad = -_sigmoid(-margin)
                elif LOSS_TYPE == 1:
                    pair_loss = tl.maximum(1.0 - margin, 0.0)
                    pair_grad = tl.where(1.0 - margin > 0.0, -1.0, 0.0)
                else:
                    u = margin / beta - 0.5 / beta
                    pair_loss = u * u
                    pair_grad = 2.0 * u / beta
            else:
                # Row ranks: rank_i = 1 + #{j : r_j > r_i or (r_j == r_i and j < i)}, a row sum.
                above = (r_col[None, :] > r_row[:, None]) | (
                    (r_col[None, :] == r_row[:, None]) & (cols[None, :] < rows[:, None])
                )
                rank_row = 1 + tl.sum((above & col_ok[None, :]).to(tl.int32), axis=1)
                gain_row = tl.exp2((K - 1 - rows).to(tl.float32) / (K - 1)) - 1.0
                inv_disc_row = 1.0 / tl.log2(1.0 + rank_row.to(tl.float32))
                weight = tl.abs(gain_row[:, None] - gain_col[None, :]) * tl.abs(
                    inv_disc_row[:, None] - inv_disc_col[None, :]
                )
                weight = tl.where(upper | lower, weight, 0.0)
                pair_loss = _softplus(-margin)
                pair_grad = -_sigmoid(-margin)
            loss_acc += tl.sum(tl.where(upper, weight * pair_loss, 0.0), axis=1)
            signed = tl.where(upper, -pair_grad, pair_grad)
            grad_acc += tl.sum(tl.where(upper | lower, weight * signed, 0.0), axis=0)

    if LOSS == 0:
        grad_acc = grad_acc - tl.where(cols < T, 1.0, 0.0)
    tl.store(grad_ptr + start + cols, grad_acc, mask=col_ok)
    tl.store(loss_ptr + chain, tl.sum(loss_acc, axis=0))

    n_all = (K * (K - 1) // 2).to(tl.float32)
    p = tl.sum(concordant, axis=0).to(tl.float32)
    q = tl.sum(discordant, axis=0).to(tl.float32)
    r_first = tl.max(tl.where(cols == 0, r_col, float("-inf")), axis=0)
    r_last = tl.max(tl.where(cols == K - 1, r_col, float("-inf")), axis=0)
    # ties: half a pair each, and the top-1 credit shared among tied maxima (reference.losses.chain_metrics)
    above_first = tl.sum((col_ok & (cols > 0) & (r_col > r_first)).to(tl.int32), axis=0)
    tied_first = tl.sum((col_ok & (cols > 0) & (r_col == r_first)).to(tl.int32), axis=0)
    tl.store(metrics_ptr + chain, (p + 0.5 * (n_all - p - q)) / n_all)
    tl.store(
        metrics_ptr + num_chains + chain,
        tl.where(above_first == 0, 1.0 / (1 + tied_first).to(tl.float32), 0.0),
    )
    tl.store(metrics_ptr + 2 * num_chains + chain, (p - q) / n_all)
    tl.store(metrics_ptr + 3 * num_chains + chain, (r_first - r_last) / (K - 1).to(tl.float32))


def chain_loss_fwd(
    scores,
    ref_scores,
    offsets,
    k_max: int,
    loss: str,
    beta: float,
    top_k: int,
    pairs: str,
    loss_type: str,
    out_dtype,
):
    """Launch :func:`_chain_loss_fwd_kernel` over ``C = offsets.numel() - 1`` chains.

    Args:
        scores: ``[S]`` contiguous float tensor (float16/bfloat16/float32/float64).
        ref_scores: ``[S]`` contiguous float tensor or ``None``.
        offsets: ``[C + 1]`` contiguous int64 chain boundaries on the scores' device.
        k_max: the largest chain size (2 <= k_max <= ``MAX_CHAIN_SIZE``).
        loss, pairs, loss_type: keys of ``LOSS_CODES``, ``PAIRS_CODES``, ``LOSS_TYPE_CODES``.
        beta: reward scale. top_k: Plackett-Luce positions (>= k_max - 1 for the full list).
        out_dtype: dtype of every output (float32, or float64 for float64 inputs).

    Returns:
        ``(loss [C], grad [S], rewards [S], metrics [NUM_METRICS, C])``, ``grad`` being ``dL_c/dr_i``.
    """
    import torch

    S = scores.shape[0]
    C = offsets.shape[0] - 1
    assert scores.is_contiguous() and offsets.dtype == torch.int64 and offsets.is_contiguous()
    assert ref_scores is None or (ref_scores.shape == scores.shape and ref_scores.is_contiguous())
    assert 2 <= k_max <= MAX_CHAIN_SIZE, k_max
    device = scores.device
    loss_out = torch.empty(C, dtype=out_dtype, device=device)
    grad = torch.empty(S, dtype=out_dtype, device=device)
    rewards = torch.empty(S, dtype=out_dtype, device=device)
    metrics = torch.empty(NUM_METRICS, C, dtype=out_dtype, device=device)
    block_c = max(16, triton.next_power_of_2(k_max))
    block_k = max(1, min(block_c, _TILE_ELEMENTS // block_c))
    _chain_loss_fwd_kernel[(C,)](
        scores,
        scores if ref_scores is None else ref_scores,
        offsets,
        loss_out,
        grad,
        rewards,
        metrics,
        C,
        float(beta),
        int(min(top_k, k_max)),
        HAS_REF=ref_scores is not None,
        LOSS=LOSS_CODES[loss],
        PAIRS=PAIRS_CODES[pairs],
        LOSS_TYPE=LOSS_TYPE_CODES[loss_type],
        BLOCK_K=block_k,
        BLOCK_C=block_c,
        num_warps=4 if block_c <= _WIDE_COLUMNS else 8,
    )
    return loss_out, grad, rewards, metrics
