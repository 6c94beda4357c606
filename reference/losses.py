"""Reference listwise and pairwise losses over caption chains, and their metrics (DESIGN.md §2).

A batch holds ``C`` chains laid out contiguously: ``scores [S]`` with ``S = sum(chain_sizes)``, chain
``c`` holding ``chain_sizes[c] = K_c >= 2`` captions ordered best first. Each function loops over the
chains in Python on purpose: it is the readable specification, not the fast path.

Rewards are DPO-style implicit rewards ``r_i = beta * (s_i - s_ref_i)`` (or ``beta * s_i`` without a
reference model). All functions return per-chain values, then apply ``reduction``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .logprobs import accumulation_dtype

__all__ = [
    "PAIR_STRATEGIES",
    "DPO_LOSS_TYPES",
    "REDUCTIONS",
    "rewards",
    "reduce",
    "split_chains",
    "plackett_luce_chain",
    "plackett_luce_loss",
    "chain_pairs",
    "dpo_pair_loss",
    "dpo_chain_loss",
    "lipo_weights",
    "lipo_loss",
    "sft_loss",
    "chain_metrics",
    "chain_loss",
]

PAIR_STRATEGIES = ("adjacent", "all", "best_worst", "best_rest")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
REDUCTIONS = ("mean", "sum", "none")


def rewards(scores: Tensor, ref_scores: Tensor | None = None, beta: float = 0.1) -> Tensor:
    """Implicit rewards ``r = beta * (scores - ref_scores)``, or ``beta * scores`` if ``ref_scores`` is None.

    Shapes: ``scores [S]``, ``ref_scores [S]`` -> ``[S]`` in the accumulation dtype.
    """
    acc = accumulation_dtype(scores, ref_scores)
    r = scores.to(acc)
    if ref_scores is not None:
        r = r - ref_scores.to(acc)
    return beta * r


def reduce(chain_losses: Tensor, reduction: str) -> Tensor:
    """``mean`` over chains, ``sum``, or ``none`` (``[C]`` unchanged)."""
    if reduction == "mean":
        return chain_losses.mean()
    if reduction == "sum":
        return chain_losses.sum()
    if reduction == "none":
        return chain_losses
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def split_chains(values: Tensor, chain_sizes: Sequence[int] | Tensor) -> tuple[Tensor, ...]:
    """Split ``[S]`` into one tensor per chain (``[K_c]`` each)."""
    sizes = chain_sizes.tolist() if isinstance(chain_sizes, Tensor) else list(chain_sizes)
    return torch.split(values, sizes)


# --------------------------------------------------------------------------------------------------
# Plackett-Luce
# --------------------------------------------------------------------------------------------------
def plackett_luce_chain(r: Tensor, top_k: int | None = None) -> Tensor:
    """Plackett-Luce negative log-likelihood of the order ``1 > 2 > ... > K`` for one chain.

    ``L = - sum_{k=1}^{min(top_k, K-1)} [ r_k - logsumexp(r_k, ..., r_K) ]`` (1-based ``k``).
    The term ``k = K`` is always zero, so ``top_k >= K - 1`` is the full list. For ``K = 2`` this is
    ``-log sigmoid(r_1 - r_2)``, i.e. DPO-sigmoid.

    Shapes: ``r [K]`` -> scalar.
    """
    K = r.numel()
    last = K - 1 if top_k is None else min(top_k, K - 1)
    terms = [r[k] - torch.logsumexp(r[k:], dim=0) for k in range(last)]
    return -torch.stack(terms).sum()


def plackett_luce_loss(
    scores: Tensor,
    chain_sizes: Sequence[int] | Tensor,
    ref_scores: Tensor | None = None,
    beta: float = 0.1,
    top_k: int | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Listwise Plackett-Luce loss over each chain's rewards (see :func:`plackett_luce_chain`).

    Shapes: ``scores [S]``, ``chain_sizes [C]``, ``ref_scores [S]`` -> scalar, or ``[C]`` for ``none``.
    """
    r = rewards(scores, ref_scores, beta)
    per_chain = torch.stack([plackett_luce_chain(rc, top_k) for rc in split_chains(r, chain_sizes)])
    return reduce(per_chain, reduction)


# --------------------------------------------------------------------------------------------------
# Binary DPO on chains
# --------------------------------------------------------------------------------------------------
def chain_pairs(K: int, pairs: str = "adjacent") -> list[tuple[int, int]]:
    """The (winner, loser) index pairs (0-based, winner earlier in the chain) a strategy takes.

    ``adjacent``: (k, k+1); ``all``: every k < j; ``best_worst``: (1, K); ``best_rest``: (1, j), every j > 1.
    """
    if pairs == "adjacent":
        return [(k, k + 1) for k in range(K - 1)]
    if pairs == "all":
        return [(k, j) for k in range(K) for j in range(k + 1, K)]
    if pairs == "best_worst":
        return [(0, K - 1)]
    if pairs == "best_rest":
        return [(0, j) for j in range(1, K)]
    raise ValueError(f"pairs must be one of {PAIR_STRATEGIES}, got {pairs!r}")


def dpo_pair_loss(margin: Tensor, beta: float, loss_type: str = "sigmoid") -> Tensor:
    """Binary preference loss of reward margins ``m = r_w - r_l`` (any shape, elementwise).

    ``sigmoid``: ``-log sigmoid(m)``; ``hinge``: ``max(0, 1 - m)``; ``ipo``: ``(m / beta - 1 / (2 beta))^2``.
    """
    if loss_type == "sigmoid":
        return -F.logsigmoid(margin)
    if loss_type == "hinge":
        return torch.relu(1 - margin)
    if loss_type == "ipo":
        return (margin / beta - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")


def dpo_chain_loss(
    scores: Tensor,
    chain_sizes: Sequence[int] | Tensor,
    ref_scores: Tensor | None = None,
    beta: float = 0.1,
    pairs: str = "adjacent",
    loss_type: str = "sigmoid",
    reduction: str = "mean",
) -> Tensor:
    """Binary DPO on the pairs a strategy takes from each chain; a chain's loss is the mean over its pairs.

    Shapes: ``scores [S]``, ``chain_sizes [C]``, ``ref_scores [S]`` -> scalar, or ``[C]`` for ``none``.
    """
    r = rewards(scores, ref_scores, beta)
    per_chain = []
    for rc in split_chains(r, chain_sizes):
        idx = torch.tensor(chain_pairs(rc.numel(), pairs), device=r.device)
        margins = rc[idx[:, 0]] - rc[idx[:, 1]]
        per_chain.append(dpo_pair_loss(margins, beta, loss_type).mean())
    return reduce(torch.stack(per_chain), reduction)


# --------------------------------------------------------------------------------------------------
# LiPO-lambda
# --------------------------------------------------------------------------------------------------
def lipo_weights(r: Tensor) -> Tensor:
    """LiPO-lambda pair weights for one chain; they carry no gradient.

    Graded labels ``psi_k = (K - k) / (K - 1)`` (1-based ``k``: 1 for the best caption, 0 for the
    worst), gains ``G_k = 2^psi_k - 1``, discounts ``D_k = log2(1 + rank_k)`` where ``rank_k`` is the
    rank of caption ``k`` under the current rewards (1 = highest reward; ties go to the earlier
    caption). ``w[k, j] = |G_k - G_j| * |1/D_k - 1/D_j|`` for ``k < j``, and 0 elsewhere.

    Shapes: ``r [K]`` -> ``[K, K]`` (upper triangle used).
    """
    r = r.detach()
    K = r.numel()
    position = torch.arange(K, device=r.device)
    psi = (K - 1 - position).to(r.dtype) / (K - 1)
    gain = 2.0**psi - 1
    # rank_k = 1 + #{j : r_j > r_k} + #{j < k : r_j == r_k}
    higher = (r[None, :] > r[:, None]) | (
        (r[None, :] == r[:, None]) & (position[None, :] < position[:, None])
    )
    rank = 1 + higher.sum(dim=1).to(r.dtype)
    discount = torch.log2(1 + rank)
    w = (gain[:, None] - gain[None, :]).abs() * (1 / discount[:, None] - 1 / discount[None, :]).abs()
    return torch.triu(w, diagonal=1)


def lipo_loss(
    scores: Tensor,
    chain_sizes: Sequence[int] | Tensor,
    ref_scores: Tensor | None = None,
    beta: float = 0.1,
    reduction: str = "mean",
) -> Tensor:
    """LiPO-lambda: ``L = sum_{k<j} w_kj * log(1 + exp(-(r_k - r_j)))`` per chain.

    The weights ``w`` come from :func:`lipo_weights` and carry no gradient.

    Shapes: ``scores [S]``, ``chain_sizes [C]``, ``ref_scores [S]`` -> scalar, or ``[C]`` for ``none``.
    """
    r = rewards(scores, ref_scores, beta)
    per_chain = []
    for rc in split_chains(r, chain_sizes):
        w = lipo_weights(rc)
        pair_loss = -F.logsigmoid(rc[:, None] - rc[None, :])  # log(1 + exp(-m)), exact for any m
        per_chain.append((w * pair_loss).sum())
    return reduce(torch.stack(per_chain), reduction)


# --------------------------------------------------------------------------------------------------
# SFT term and metrics
# --------------------------------------------------------------------------------------------------
def sft_loss(scores: Tensor, num_tokens: Tensor, chain_sizes: Sequence[int] | Tensor) -> Tensor:
    """Per-chain negative mean token log-prob of the best caption: ``-s_1 / n_1`` (``n_1`` clamped to >= 1).

    ``scores`` are *summed* (not length-normalised) sequence log-probs, ``num_tokens`` the number of
    scored tokens per caption. Shapes: ``scores [S]``, ``num_tokens [S]`` -> ``[C]``.
    """
    acc = accumulation_dtype(scores)
    out = [
        -s[0].to(acc) / n[0].clamp(min=1).to(acc)
        for s, n in zip(split_chains(scores, chain_sizes), split_chains(num_tokens, chain_sizes))
    ]
    return torch.stack(out)


@torch.no_grad()
def chain_metrics(r: Tensor, chain_sizes: Sequence[int] | Tensor) -> dict[str, Tensor]:
    """Ranking metrics of rewards against the chain order (no gradient).

    Per chain, with ``P`` = #pairs ``k < j`` with ``r_k > r_j``, ``Q`` = #pairs with ``r_k < r_j``,
    ``T`` = #pairs with ``r_k == r_j`` and ``K(K-1)/2`` pairs in all (ties count as half: equal rewards,
    as every implicit reward is before the first step, read 0.5, not 0):

    * ``pairwise_accuracy [C]`` = ``(P + T / 2) / (K(K-1)/2)``;
    * ``top1_accuracy [C]`` = ``1 / m`` if the best caption's reward is one of ``m`` tied highest, else 0;
    * ``kendall_tau [C]`` = ``(P - Q) / (K(K-1)/2)`` (tau-a: the chain order has no ties);
    * ``neighbour_margin [C]`` = mean of ``r_k - r_{k+1}``;
    * ``reward_per_position [K_max]`` = mean reward at each chain position over the chains that have it.
    """
    chains = split_chains(r, chain_sizes)
    k_max = max(rc.numel() for rc in chains)
    acc, top1, tau, margin = [], [], [], []
    pos_sum = torch.zeros(k_max, dtype=r.dtype, device=r.device)
    pos_count = torch.zeros(k_max, dtype=r.dtype, device=r.device)
    for rc in chains:
        K = rc.numel()
        n_pairs = K * (K - 1) / 2
        upper = torch.triu(torch.ones(K, K, dtype=torch.bool, device=r.device), diagonal=1)
        concordant = ((rc[:, None] > rc[None, :]) & upper).sum().to(r.dtype)
        discordant = ((rc[:, None] < rc[None, :]) & upper).sum().to(r.dtype)
        tied = ((rc[:, None] == rc[None, :]) & upper).sum().to(r.dtype)
        acc.append((concordant + 0.5 * tied) / n_pairs)
        tau.append((concordant - discordant) / n_pairs)
        if (rc[1:] > rc[0]).any():
            top1.append(torch.zeros((), dtype=r.dtype, device=r.device))
        else:
            top1.append(1 / (1 + (rc[1:] == rc[0]).sum()).to(r.dtype))
        margin.append((rc[:-1] - rc[1:]).mean())
        pos_sum[:K] += rc
        pos_count[:K] += 1
    return {
        "pairwise_accuracy": torch.stack(acc),
        "top1_accuracy": torch.stack(top1),
        "kendall_tau": torch.stack(tau),
        "neighbour_margin": torch.stack(margin),
        "reward_per_position": pos_sum / pos_count,
    }


def chain_loss(
    scores: Tensor,
    chain_sizes: Sequence[int] | Tensor,
    ref_scores: Tensor | None = None,
    loss: str = "plackett_luce",
    beta: float = 0.1,
    top_k: int | None = None,
    pairs: str = "adjacent",
    loss_type: str = "sigmoid",
    sft_weight: float = 0.0,
    num_tokens: Tensor | None = None,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Any chain loss plus the optional SFT term ``sft_weight * (-s_1 / n_1)``, and the metrics.

    Returns ``(reduced loss, per-chain loss [C], metrics)``; metrics as in :func:`chain_metrics` plus
    ``rewards [S]`` and, when ``sft_weight != 0``, ``sft_loss [C]``.
    """
    if loss == "plackett_luce":
        per_chain = plackett_luce_loss(scores, chain_sizes, ref_scores, beta, top_k, reduction="none")
    elif loss == "dpo":
        per_chain = dpo_chain_loss(scores, chain_sizes, ref_scores, beta, pairs, loss_type, reduction="none")
    elif loss == "lipo":
        per_chain = lipo_loss(scores, chain_sizes, ref_scores, beta, reduction="none")
    else:
        raise ValueError(f"loss must be 'plackett_luce', 'dpo' or 'lipo', got {loss!r}")
    r = rewards(scores, ref_scores, beta)
    metrics = chain_metrics(r.detach(), chain_sizes)
    metrics["rewards"] = r.detach()
    if sft_weight != 0:
        sft = sft_loss(scores, num_tokens, chain_sizes)
        metrics["sft_loss"] = sft.detach()
        per_chain = per_chain + sft_weight * sft
    return reduce(per_chain, reduction), per_chain, metrics
