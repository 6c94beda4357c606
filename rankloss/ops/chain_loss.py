"""Fused chain losses over per-caption scores: one pass computes loss, gradient and metrics.

The op behind :func:`rankloss.chain_loss` (DESIGN.md §2). For ``C`` chains of ragged sizes ``K_c`` laid
out contiguously in ``scores [S]`` (best caption first), one forward computes

* the per-chain loss ``L_c`` (Plackett-Luce with ``top_k``, DPO on chains with a pair strategy and loss
  type, or LiPO-lambda) of the rewards ``r_i = beta * (s_i - s_ref_i)``,
* ``dL_c / dr_i`` for every caption (the analytic gradient, saved for backward), and
* the per-chain metrics (pairwise accuracy, top-1 accuracy, Kendall tau, neighbour margin).

The backward pass is then one multiply: ``dL/ds_i = beta * dL_c/dr_i * dL/dL_c`` for the chain ``c``
holding caption ``i`` (and ``dL/ds_ref_i = -dL/ds_i``).

Two implementations of that forward share one autograd formula:

* ``impl="triton"``: :mod:`rankloss.kernels.chain_loss`, one launch, one program per chain
  (float32 compute; chains up to ``MAX_CHAIN_SIZE = 4096`` captions). On CPU tensors it runs only under
  ``TRITON_INTERPRET=1`` (the tests).
* ``impl="torch"``: vectorised PyTorch on the padded ``[C, K_max]`` rewards and ``[C, K_max, K_max]``
  pair tiles (memory ``O(C * K_max^2)``), computing in float32, or float64 for float64 inputs; no limit
  on ``K``.

Both run inside the custom op ``torch.ops.rankloss.chain_loss_fwd`` (``torch.library.custom_op`` with a
fake kernel and a registered autograd formula), so ``torch.compile(fullgraph=True)`` treats the whole
chain loss as one opaque node. The Triton module is imported lazily (Triton decides at decoration time
whether it interprets or compiles).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import accumulation_dtype, interpreting, kernel_module, triton_available

__all__ = [
    "CHAIN_LOSS_IMPLS",
    "METRIC_NAMES",
    "chain_offsets",
    "chain_positions",
    "chain_loss_fwd",
    "chain_loss_fwd_torch",
    "chain_loss_fwd_triton",
    "chain_loss_op",
    "default_impl",
]

CHAIN_LOSS_IMPLS = ("triton", "torch")
# Rows of the ``[4, C]`` metrics output of :func:`chain_loss_fwd`, in order.
METRIC_NAMES = ("pairwise_accuracy", "top1_accuracy", "kendall_tau", "neighbour_margin")
_LOSSES = ("plackett_luce", "dpo", "lipo")
_PAIRS = ("adjacent", "all", "best_worst", "best_rest")
_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------------
# Chain index helpers (no host sync: built on the host from the Python list, or on the device)
# --------------------------------------------------------------------------------------------------
def chain_offsets(chain_sizes: Sequence[int], device: torch.device | str) -> Tensor:
    """``[C + 1]`` int64 chain boundaries ``[0, K_0, K_0 + K_1, ..., S]`` on ``device``.

    Built on the host from the list; on CUDA it is copied from pinned memory without blocking, so no
    host sync happens.
    """
    bounds = [0]
    for k in chain_sizes:
        bounds.append(bounds[-1] + int(k))
    device = torch.device(device)
    if device.type != "cuda" or torch.compiler.is_compiling():
        return torch.tensor(bounds, dtype=torch.int64, device=device)
    return torch.tensor(bounds, dtype=torch.int64).pin_memory().to(device, non_blocking=True)


def chain_positions(offsets: Tensor, num_scores: int) -> tuple[Tensor, Tensor]:
    """``(chain_id [S], position [S])``: the chain holding each caption and its 0-based place in it.

    Shapes: ``offsets [C + 1]`` int64 -> two ``[S]`` int64 tensors on ``offsets.device``.
    """
    index = torch.arange(num_scores, device=offsets.device)
    chain_id = torch.searchsorted(offsets[1:], index, right=True)
    return chain_id, index - offsets[chain_id]


# --------------------------------------------------------------------------------------------------
# The two forward implementations: (loss [C], dL/dr [S], rewards [S], metrics [4, C])
# --------------------------------------------------------------------------------------------------
def chain_loss_fwd_torch(
    scores: Tensor,
    ref_scores: Tensor | None,
    offsets: Tensor,
    k_max: int,
    loss: str,
    beta: float,
    top_k: int,
    pairs: str,
    loss_type: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Vectorised PyTorch forward: per-chain loss, ``dL_c/dr_i``, rewards and metrics, no loop over chains.

    The rewards are scattered into a padded ``R [C, K_max]``; pairwise quantities live on the tile
    ``[C, K_max (row i), K_max (column j)]``. Same formulas as the Triton kernel
    (:mod:`rankloss.kernels.chain_loss` documents them): Plackett-Luce rows ``k < T = min(top_k, K - 1)``
    with ``m_k = max_{j>=k} r_j``, ``e_kj = exp(r_j - m_k)``, ``s_k = sum_j e_kj``:
    ``L = sum_k log(s_k) - (r_k - m_k)``, ``dL/dr_j = -[j < T] + sum_k e_kj / s_k``; the pairwise
    losses as ``sum_{i<j} weight_ij g(r_i - r_j)`` with column sums of ``-+ weight g'`` for the gradient.

    Shapes: ``scores [S]``, ``ref_scores [S]`` or None, ``offsets [C + 1]`` int64 ->
    ``loss [C]``, ``grad [S]``, ``rewards [S]``, ``metrics [4, C]`` (rows :data:`METRIC_NAMES`), all in
    float32, or float64 for float64 inputs.
    """
    acc = accumulation_dtype(scores, ref_scores)
    r = scores.to(acc)
    if ref_scores is not None:
        r = r - ref_scores.to(acc)
    r = beta * r
    S, C = r.shape[0], offsets.shape[0] - 1
    device = r.device
    chain_id, pos = chain_positions(offsets, S)
    sizes = offsets[1:] - offsets[:-1]  # [C]
    R = r.new_zeros(C, k_max).index_put_((chain_id, pos), r)  # [C, Kp]
    idx = torch.arange(k_max, device=device)
    valid = idx < sizes[:, None]  # [C, Kp]
    pair_valid = valid[:, :, None] & valid[:, None, :]  # [C, Kp, Kp]
    upper = pair_valid & (idx[:, None] < idx[None, :])
    lower = pair_valid & (idx[:, None] > idx[None, :])
    Ri, Rj = R[:, :, None], R[:, None, :]

    if loss == "plackett_luce":
        T = (sizes - 1).clamp(max=top_k)  # [C]
        active = idx < T[:, None]  # [C, Kp]: rows (and columns) k < T
        suffix = active[:, :, None] & valid[:, None, :] & (idx[None, :] >= idx[:, None])
        x = torch.where(suffix, Rj, float("-inf"))
        m = torch.where(active, x.amax(dim=-1), 0.0)
        e = torch.where(suffix, torch.exp(x - m[:, :, None]), 0.0)
        s = torch.where(active, e.sum(dim=-1), 1.0)
        chain_losses = torch.where(active, torch.log(s) - (R - m), 0.0).sum(dim=-1)
        grad = (e / s[:, :, None]).sum(dim=1) - active.to(acc)
    else:
        margin = torch.where(upper, Ri - Rj, Rj - Ri)  # winner minus loser of the pair (min, max)
        either = upper | lower
        if loss == "dpo":
            lo = torch.minimum(idx[:, None], idx[None, :])
            hi = torch.maximum(idx[:, None], idx[None, :])
            K = sizes[:, None, None]
            if pairs == "adjacent":
                taken, n_pairs = hi == lo + 1, sizes - 1
            elif pairs == "all":
                taken, n_pairs = hi > lo, sizes * (sizes - 1) // 2
            elif pairs == "best_worst":
                taken, n_pairs = (lo == 0) & (hi == K - 1), torch.ones_like(sizes)
            else:
                taken, n_pairs = (lo == 0) & (hi > 0), sizes - 1
            weight = torch.where(taken & either, 1.0 / n_pairs.to(acc)[:, None, None], 0.0)
            if loss_type == "sigmoid":
                # -logsigmoid, not softplus(-m): softplus returns its input unchanged above its
                # threshold of 20, off by up to e^-20 for margins below -20.
                pair_loss, pair_grad = -F.logsigmoid(margin), -torch.sigmoid(-margin)
            elif loss_type == "hinge":
                pair_loss = torch.relu(1 - margin)
                pair_grad = torch.where(1 - margin > 0, -1.0, 0.0).to(acc)
            else:
                u = margin / beta - 1 / (2 * beta)
                pair_loss, pair_grad = u**2, 2 * u / beta
        else:
            # rank_i = 1 + #{j : r_j > r_i} + #{j < i : r_j == r_i}; weights carry no gradient.
            above = (Rj > Ri) | ((Rj == Ri) & (idx[None, :] < idx[:, None]))
            rank = 1 + (above & valid[:, None, :]).sum(dim=-1)  # [C, Kp]
            Kf = sizes.to(acc)[:, None]
            gain = 2.0 ** ((Kf - 1 - idx.to(acc)) / (Kf - 1)) - 1
            inv_disc = 1 / torch.log2(1 + rank.to(acc))
            weight = (gain[:, :, None] - gain[:, None, :]).abs() * (
                inv_disc[:, :, None] - inv_disc[:, None, :]
            ).abs()
            weight = torch.where(either, weight, 0.0)
            pair_loss, pair_grad = -F.logsigmoid(margin), -torch.sigmoid(-margin)
        chain_losses = torch.where(upper, weight * pair_loss, 0.0).sum(dim=(1, 2))
        signed = torch.where(upper, -pair_grad, pair_grad)
        grad = torch.where(either, weight * signed, 0.0).sum(dim=1)

    n_all = (sizes * (sizes - 1) // 2).to(acc)
    p = (upper & (Ri > Rj)).sum(dim=(1, 2)).to(acc)
    q = (upper & (Ri < Rj)).sum(dim=(1, 2)).to(acc)
    r_first = R[:, 0]
    r_last = R.gather(1, (sizes - 1)[:, None]).squeeze(1)
    # ties count as half a pair and share the top-1 credit, so equal rewards (every implicit reward is 0
    # before the first step) read 0.5 and 1/K, not 0: acc = (P + T / 2) / n with T = n - P - Q ties
    above_first = (valid & (idx > 0) & (R > r_first[:, None])).sum(dim=-1)
    tied_first = (valid & (idx > 0) & (R == r_first[:, None])).sum(dim=-1)
    top1 = torch.where(above_first == 0, 1.0 / (1 + tied_first).to(acc), 0.0)
    metrics = torch.stack(
        [(p + 0.5 * (n_all - p - q)) / n_all, top1, (p - q) / n_all, (r_first - r_last) / (sizes - 1).to(acc)]
    )
    return chain_losses, grad[chain_id, pos], r, metrics


def chain_loss_fwd_triton(
    scores: Tensor,
    ref_scores: Tensor | None,
    offsets: Tensor,
    k_max: int,
    loss: str,
    beta: float,
    top_k: int,
    pairs: str,
    loss_type: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The single-launch Triton forward (same outputs as :func:`chain_loss_fwd_torch`).

    Computes in float32 whatever the input dtype (float64 inputs are rounded to float32 first); the
    outputs are stored in float32, or float64 for float64 inputs. Needs ``k_max <= 4096``.
    """
    return kernel_module("chain_loss").chain_loss_fwd(
        scores.contiguous(),
        None if ref_scores is None else ref_scores.contiguous(),
        offsets.contiguous(),
        k_max,
        loss,
        beta,
        top_k,
        pairs,
        loss_type,
        accumulation_dtype(scores, ref_scores),
    )


# --------------------------------------------------------------------------------------------------
# The custom op and its autograd formula
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op(
    "rankloss::chain_loss_fwd",
    mutates_args=(),
    schema=(
        "(Tensor scores, Tensor? ref_scores, Tensor offsets, int k_max, str loss, float beta, int top_k, "
        "str pairs, str loss_type, str impl) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
)
def chain_loss_fwd(
    scores: Tensor,
    ref_scores: Tensor | None,
    offsets: Tensor,
    k_max: int,
    loss: str,
    beta: float,
    top_k: int,
    pairs: str,
    loss_type: str,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``torch.ops.rankloss.chain_loss_fwd``: per-chain loss (differentiable) and, detached, ``dL_c/dr``,
    rewards and metrics.

    Args:
        scores: ``[S]`` per-caption scores, chains contiguous, best caption first.
        ref_scores: ``[S]`` reference scores or None.
        offsets: ``[C + 1]`` int64 chain boundaries (:func:`chain_offsets`).
        k_max: the largest chain size.
        loss: ``plackett_luce``, ``dpo`` or ``lipo``; beta: reward scale (> 0);
        top_k: Plackett-Luce positions summed (``>= k_max - 1`` for the full list);
        pairs: DPO pair strategy; loss_type: DPO loss type (both ignored by the other losses);
        impl: ``"triton"`` or ``"torch"``.

    Returns:
        ``(loss [C], grad [S], rewards [S], metrics [4, C])`` in float32 (float64 for float64 inputs);
        metrics rows are :data:`METRIC_NAMES`. Only ``loss`` is differentiable: its backward is
        ``dL/ds_i = beta * grad_i * dL/dloss_{chain(i)}`` and ``dL/ds_ref_i = -dL/ds_i``.
    """
    fwd = chain_loss_fwd_triton if impl == "triton" else chain_loss_fwd_torch
    return fwd(scores, ref_scores, offsets, k_max, loss, beta, top_k, pairs, loss_type)


@chain_loss_fwd.register_fake
def _chain_loss_fwd_fake(
    scores: Tensor,
    ref_scores: Tensor | None,
    offsets: Tensor,
    k_max: int,
    loss: str,
    beta: float,
    top_k: int,
    pairs: str,
    loss_type: str,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = accumulation_dtype(scores, ref_scores)
    S, C = scores.shape[0], offsets.shape[0] - 1
    return (
        scores.new_empty(C, dtype=acc),
        scores.new_empty(S, dtype=acc),
        scores.new_empty(S, dtype=acc),
        scores.new_empty(len(METRIC_NAMES), C, dtype=acc),
    )


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    scores, ref_scores, offsets, _k_max, _loss, beta, *_ = inputs
    _, grad, rewards, metrics = output
    ctx.mark_non_differentiable(grad, rewards, metrics)
    ctx.save_for_backward(grad, offsets)
    ctx.beta = beta
    ctx.scores_dtype = scores.dtype
    ctx.ref_dtype = None if ref_scores is None else ref_scores.dtype


def _backward(ctx, grad_loss: Tensor | None, *_unused: Tensor | None) -> tuple:
    grad, offsets = ctx.saved_tensors
    grad_scores = grad_ref = None
    if grad_loss is None:
        grad_loss = grad.new_zeros(offsets.shape[0] - 1)
    chain_id, _ = chain_positions(offsets, grad.shape[0])
    g = ctx.beta * grad * grad_loss.to(grad.dtype)[chain_id]
    if ctx.needs_input_grad[0]:
        grad_scores = g.to(ctx.scores_dtype)
    if ctx.ref_dtype is not None and ctx.needs_input_grad[1]:
        grad_ref = (-g).to(ctx.ref_dtype)
    return grad_scores, grad_ref, None, None, None, None, None, None, None, None


chain_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------
def default_impl(scores: Tensor, k_max: int) -> str:
    """``"triton"`` for CUDA tensors of 16/32-bit floats with chains of at most 4096 captions (when Triton
    is installed), else ``"torch"`` (CPU, or float64, which the PyTorch path computes in float64)."""
    if scores.device.type != "cuda" or scores.dtype == torch.float64 or k_max > 4096:
        return "torch"
    return "triton" if triton_available() else "torch"


def chain_loss_op(
    scores: Tensor,
    chain_sizes: Sequence[int],
    ref_scores: Tensor | None = None,
    *,
    loss: str = "plackett_luce",
    beta: float = 0.1,
    top_k: int | None = None,
    pairs: str = "adjacent",
    loss_type: str = "sigmoid",
    sft_weight: float = 0.0,
    num_tokens: Tensor | None = None,
    reduction: str = "mean",
    impl: str | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """A chain loss, its gradient and its metrics in one fused pass (same contract as
    ``reference.losses.chain_loss``). Inputs are assumed validated (see :func:`rankloss.chain_loss`).

    Rewards ``r_i = beta * (s_i - s_ref_i)``; per chain ``c`` of ``K`` captions:

    * ``plackett_luce``: ``L_c = -sum_{k < min(top_k, K-1)} [r_k - logsumexp(r_k .. r_{K-1})]``;
    * ``dpo``: mean over the ``pairs`` strategy's pairs (w, l) of ``loss_type`` of ``m = r_w - r_l``
      (``sigmoid -log sigmoid(m)``, ``hinge max(0, 1 - m)``, ``ipo (m/beta - 1/(2 beta))^2``);
    * ``lipo``: ``sum_{k<j} |G_k - G_j| |1/D_k - 1/D_j| log(1 + exp(-(r_k - r_j)))``;

    plus ``sft_weight * (-s_0 / max(n_0, 1))`` (plain differentiable PyTorch), then ``reduction``.

    Args:
        scores: ``[S]`` float16/bfloat16/float32/float64 per-caption scores, chains contiguous, best first.
        chain_sizes: ``C`` Python ints, each >= 2, summing to ``S``.
        ref_scores: ``[S]`` reference scores or None (reference-free rewards ``beta * s``).
        loss, beta, top_k, pairs, loss_type: as above (``top_k=None``: every position).
        sft_weight: weight of the SFT term; num_tokens: ``[S]`` scored tokens per caption (needed when
            ``sft_weight != 0``).
        reduction: ``"mean"`` over chains, ``"sum"`` or ``"none"``.
        impl: ``"triton"``, ``"torch"`` or None (:func:`default_impl`). Triton on CPU tensors needs
            ``TRITON_INTERPRET=1`` set before Triton kernels are first imported.

    Returns:
        ``(reduced loss, per-chain loss [C] (detached), metrics)`` with metrics ``pairwise_accuracy [C]``,
        ``top1_accuracy [C]``, ``kendall_tau [C]``, ``neighbour_margin [C]``,
        ``reward_per_position [K_max]``, ``rewards [S]`` and, when ``sft_weight != 0``, ``sft_loss [C]``,
        all detached; float32 (float64 for float64 inputs). Gradients reach ``scores`` (and
        ``ref_scores``) in their own dtype.
    """
    sizes = [int(k) for k in chain_sizes]
    S = scores.shape[0]
    assert scores.ndim == 1 and len(sizes) >= 1 and min(sizes) >= 2 and sum(sizes) == S, (scores.shape, sizes)
    assert loss in _LOSSES and pairs in _PAIRS and loss_type in _LOSS_TYPES and reduction in _REDUCTIONS
    k_max = max(sizes)
    if impl is None:
        impl = default_impl(scores, k_max)
    elif impl not in CHAIN_LOSS_IMPLS:
        raise ValueError(f"impl must be None or one of {CHAIN_LOSS_IMPLS}, got {impl!r}")
    if impl == "triton":
        if k_max > 4096:
            raise ValueError(
                f"impl='triton' takes chains of at most 4096 captions, got max(chain_sizes) = {k_max}; "
                "use impl='torch' for longer chains"
            )
        if scores.device.type != "cuda" and not interpreting():
            raise ValueError(
                "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
                f"got scores on {scores.device}"
            )

    offsets = chain_offsets(sizes, scores.device)
    top = k_max if top_k is None else min(int(top_k), k_max)
    per_chain, _, rewards, stats = torch.ops.rankloss.chain_loss_fwd(
        scores, ref_scores, offsets, k_max, loss, float(beta), top, pairs, loss_type, impl
    )

    metrics = dict(zip(METRIC_NAMES, stats.unbind(0)))
    chain_id, pos = chain_positions(offsets, S)
    padded = rewards.new_zeros(len(sizes), k_max).index_put_((chain_id, pos), rewards)
    count = (torch.arange(k_max, device=scores.device) < (offsets[1:] - offsets[:-1])[:, None]).sum(dim=0)
    metrics["reward_per_position"] = padded.sum(dim=0) / count.to(rewards.dtype)
    metrics["rewards"] = rewards
    if sft_weight != 0:
        assert num_tokens is not None and num_tokens.shape == scores.shape
        first = offsets[:-1]
        n_first = num_tokens.index_select(0, first).clamp(min=1).to(per_chain.dtype)
        sft = -scores.index_select(0, first).to(per_chain.dtype) / n_first
        metrics["sft_loss"] = sft.detach()
        per_chain = per_chain + sft_weight * sft

    if reduction == "mean":
        reduced = per_chain.mean()
    elif reduction == "sum":
        reduced = per_chain.sum()
    else:
        reduced = per_chain
    return reduced, per_chain.detach(), metrics
