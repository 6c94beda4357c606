"""Public chain losses over per-caption scores: Plackett-Luce, binary DPO on chains, LiPO-lambda.

All take ``scores [S]`` (per-caption sequence scores in chain order, best caption first in every chain)
and ``chain_sizes`` (``C`` ints, each >= 2, summing to ``S``), optional ``ref_scores [S]`` of the frozen
reference model, and return a :class:`~rankloss.outputs.ChainLossOutput` with ``.loss`` and the
metrics. Losses come back in float32 (float64 for float64 scores); gradients in the scores' dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from torch import Tensor

from . import _validation as V
from .ops._common import accumulation_dtype
from .ops.chain_loss import chain_loss_op
from .outputs import ChainLossOutput
from .reference import losses as ref

__all__ = ["plackett_luce_loss", "dpo_chain_loss", "lipo_loss", "chain_loss", "CHAIN_LOSSES"]

CHAIN_LOSSES = ("plackett_luce", "dpo", "lipo")
LOSS_IMPLS = ("triton", "torch", "reference")


def _check_scores(
    scores: object, chain_sizes: object, ref_scores: object, num_tokens: object = None
) -> list[int]:
    V.check_float_tensor(scores, "scores", ndim=1)
    sizes = V.check_chain_sizes(chain_sizes, scores.shape[0])
    if ref_scores is not None:
        V.check_float_tensor(ref_scores, "ref_scores")
        V.check_shape(ref_scores, "ref_scores", scores.shape, "scores.shape [S]")
    if num_tokens is not None:
        if not isinstance(num_tokens, Tensor):
            raise TypeError(f"num_tokens must be a torch.Tensor [S], got {type(num_tokens).__name__}")
        if num_tokens.dtype not in V.INT_DTYPES + V.FLOAT_DTYPES:
            raise TypeError(
                f"num_tokens must be an integer or floating-point tensor [S], got {num_tokens.dtype}"
            )
        V.check_shape(num_tokens, "num_tokens", scores.shape, "scores.shape [S]")
    V.check_same_device(scores=scores, ref_scores=ref_scores, num_tokens=num_tokens)
    V.check_finite(scores, "scores")
    V.check_finite(ref_scores, "ref_scores")
    if num_tokens is not None and num_tokens.is_floating_point():
        V.check_finite(num_tokens, "num_tokens")
    return sizes


def _check_top_k(top_k: object) -> int | None:
    if top_k is None:
        return None
    top_k = V.check_int(top_k, "top_k")
    if top_k < 1:
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k}")
    return top_k


def _check_sft(sft_weight: object, num_tokens: object) -> float:
    sft_weight = V.check_finite_float(sft_weight, "sft_weight")
    if sft_weight != 0 and num_tokens is None:
        raise ValueError(
            "num_tokens [S] is required when sft_weight != 0: the SFT term is -s_1 / n_1 with n_1 the best "
            "caption's number of scored tokens (pass torch.ones(S) if scores are already length-normalised)"
        )
    return sft_weight


_OPTION_OWNER = {"top_k": "plackett_luce", "pairs": "dpo", "dpo_loss_type": "dpo", "loss_type": "dpo"}


def _check_only_for(loss: str, **options: object) -> None:
    for name, value in options.items():
        if value is not None and _OPTION_OWNER[name] != loss:
            raise ValueError(
                f"{name}={value!r} applies to loss={_OPTION_OWNER[name]!r} only, got loss={loss!r}"
            )


def check_chain_options(
    scores: object,
    chain_sizes: object,
    ref_scores: object,
    *,
    loss: object,
    beta: object,
    top_k: object,
    pairs: object,
    dpo_loss_type: object,
    loss_type: object,
    sft_weight: object,
    num_tokens: object,
    reduction: object,
    impl: object,
) -> dict:
    """Validate :func:`chain_loss`'s inputs; returns the normalised options: ``chain_sizes`` (list of ints),
    ``loss``, ``beta``, ``top_k``, ``pairs``, ``loss_type``, ``sft_weight``, ``reduction`` and ``impl``."""
    sizes = _check_scores(scores, chain_sizes, ref_scores, num_tokens)
    V.check_choice(loss, "loss", CHAIN_LOSSES)
    beta = V.check_positive_float(beta, "beta")
    if loss_type is not None and dpo_loss_type is not None and loss_type != dpo_loss_type:
        raise ValueError(
            f"loss_type={loss_type!r} and dpo_loss_type={dpo_loss_type!r} name the same option; "
            "give one of them"
        )
    _check_only_for(loss, top_k=top_k, pairs=pairs, dpo_loss_type=dpo_loss_type, loss_type=loss_type)
    loss_type_name = "loss_type" if dpo_loss_type is None else "dpo_loss_type"
    dpo_loss_type = loss_type if dpo_loss_type is None else dpo_loss_type
    return dict(
        chain_sizes=sizes,
        loss=loss,
        beta=beta,
        top_k=_check_top_k(top_k),
        pairs=V.check_choice("adjacent" if pairs is None else pairs, "pairs", ref.PAIR_STRATEGIES),
        loss_type=V.check_choice(
            "sigmoid" if dpo_loss_type is None else dpo_loss_type, loss_type_name, ref.DPO_LOSS_TYPES
        ),
        sft_weight=_check_sft(sft_weight, num_tokens),
        reduction=V.check_choice(reduction, "reduction", ref.REDUCTIONS),
        impl=V.check_impl(impl, LOSS_IMPLS),
    )


def chain_loss(
    scores: Tensor,
    chain_sizes: Sequence[int] | Tensor,
    ref_scores: Tensor | None = None,
    *,
    loss: str = "plackett_luce",
    beta: float = 0.1,
    top_k: int | None = None,
    pairs: str | None = None,
    dpo_loss_type: str | None = None,
    sft_weight: float = 0.0,
    num_tokens: Tensor | None = None,
    reduction: str = "mean",
    impl: str | None = None,
    loss_type: str | None = None,
) -> ChainLossOutput:
    """A ranking loss over caption chains, plus an optional SFT term, with its metrics.

    Rewards ``r_i = beta * (s_i - s_ref_i)`` (``beta * s_i`` without ``ref_scores``), then per chain:

    * ``loss="plackett_luce"``: ``-sum_{k<=min(top_k, K-1)} [r_k - logsumexp(r_k..r_K)]``;
    * ``loss="dpo"``: mean over the ``pairs`` strategy's (winner, loser) pairs of the ``dpo_loss_type`` loss
      (``sigmoid``, ``hinge`` or ``ipo``) of ``r_w - r_l``;
    * ``loss="lipo"``: LiPO-lambda, ``sum_{k<j} w_kj * log(1 + exp(-(r_k - r_j)))``;

    plus ``sft_weight * (-s_1 / n_1)`` (``n_1 = num_tokens`` of the chain's best caption), then
    ``reduction`` over chains (``mean``, ``sum`` or ``none``).

    Args:
        scores: ``[S]`` per-caption sequence scores (e.g. from :func:`rankloss.sequence_logprobs`).
        chain_sizes: ``C`` ints (list, tuple or 1-D integer tensor), each >= 2, summing to ``S``. An
            empty batch (``S = 0``, ``chain_sizes=[]``) gives a zero loss still connected to ``scores``
            (so a data-parallel backward reaches every parameter) and empty metrics. Under
            ``torch.compile(fullgraph=True)`` pass a list: a tensor's values are unknown while tracing.
        ref_scores: optional ``[S]`` scores of the frozen reference model.
        loss: ``"plackett_luce"``, ``"dpo"`` or ``"lipo"``.
        beta: reward scale, > 0.
        top_k: Plackett-Luce only: sum only the first ``top_k`` positions (default: all).
        pairs: DPO only: ``"adjacent"`` (default), ``"all"``, ``"best_worst"`` or ``"best_rest"``.
        dpo_loss_type: DPO only: ``"sigmoid"`` (default), ``"hinge"`` or ``"ipo"``.
        loss_type: the same option under :func:`dpo_chain_loss`'s name (give one of the two).
        An option given for another loss than its own raises ``ValueError`` rather than being ignored.
        sft_weight: weight of the SFT term on each chain's best caption.
        num_tokens: ``[S]`` scored tokens per caption; required when ``sft_weight != 0``.
        reduction: ``"mean"`` (over chains), ``"sum"`` or ``"none"``.
        impl: ``None`` (automatic: the Triton kernel for CUDA tensors, vectorised PyTorch otherwise),
            ``"triton"`` (one launch over all chains; CPU tensors only under ``TRITON_INTERPRET=1``;
            chains of at most 4096 captions), ``"torch"`` (vectorised PyTorch, no limit on ``K``) or
            ``"reference"`` (the readable specification: a Python loop over chains, autograd backward).
    """
    options = check_chain_options(
        scores, chain_sizes, ref_scores, loss=loss, beta=beta, top_k=top_k, pairs=pairs,
        dpo_loss_type=dpo_loss_type, loss_type=loss_type, sft_weight=sft_weight, num_tokens=num_tokens,
        reduction=reduction, impl=impl,
    )  # fmt: skip
    impl = options.pop("impl")
    if scores.shape[0] == 0:
        return _empty_batch(scores, ref_scores, options["reduction"], options["sft_weight"])
    compute = ref.chain_loss if impl == "reference" else functools.partial(chain_loss_op, impl=impl)
    reduced, per_chain, m = compute(
        scores, options.pop("chain_sizes"), ref_scores, num_tokens=num_tokens, **options
    )
    return ChainLossOutput(
        loss=reduced,
        chain_losses=per_chain.detach(),
        rewards=m["rewards"],
        pairwise_accuracy=m["pairwise_accuracy"],
        top1_accuracy=m["top1_accuracy"],
        kendall_tau=m["kendall_tau"],
        neighbour_margin=m["neighbour_margin"],
        reward_per_position=m["reward_per_position"],
        sft_loss=m.get("sft_loss"),
    )


def _empty_batch(
    scores: Tensor, ref_scores: Tensor | None, reduction: str, sft_weight: float
) -> ChainLossOutput:
    """``S = 0`` (no chains, e.g. an uneven last micro-batch): a zero loss (``[0]`` for ``"none"``) that
    is still connected to ``scores`` (and ``ref_scores``), so ``backward()`` reaches the model's
    parameters with zero gradients and distributed data parallel does not wait for them forever; the
    per-chain metrics are empty."""
    acc = accumulation_dtype(scores, ref_scores)
    zero = scores.to(acc).sum() * 0
    if ref_scores is not None:
        zero = zero - ref_scores.to(acc).sum() * 0
    empty = scores.new_zeros(0, dtype=acc)
    loss = zero.reshape(1)[:0] if reduction == "none" else zero
    return ChainLossOutput(
        loss=loss,
        chain_losses=empty,
        rewards=empty,
        pairwise_accuracy=empty,
        top1_accuracy=empty,
        kendall_tau=empty,
        neighbour_margin=empty,
        reward_per_position=empty,
        sft_loss=empty if sft_weight != 0 else None,
    )


def plackett_luce_loss(
    scores: Tensor,
    chain_sizes: Sequence[int] | Tensor,
    ref_scores: Tensor | None = None,
    *,
    beta: float = 0.1,
    top_k: int | None = None,
    sft_weight: float = 0.0,
    num_tokens: Tensor | None = None,
    reduction: str = "mean",
    impl: str | None = None,
) -> ChainLossOutput:
    """Listwise Plackett-Luce loss over each chain: ``-sum_{k<=min(top_k, K-1)} [r_k - logsumexp(r_k..r_K)]``.

    For ``K = 2`` it equals DPO-sigmoid. See :func:`chain_loss` for the arguments.
    """
    return chain_loss(
        scores,
        chain_sizes,
        ref_scores,
        loss="plackett_luce",
        beta=beta,
        top_k=top_k,
        sft_weight=sft_weight,
        num_tokens=num_tokens,
        reduction=reduction,
        impl=impl,
    )


def dpo_chain_loss(
    scores: Tensor,
    chain_sizes: Sequence[int] | Tensor,
    ref_scores: Tensor | None = None,
    *,
    beta: float = 0.1,
    pairs: str = "adjacent",
    loss_type: str = "sigmoid",
    sft_weight: float = 0.0,
    num_tokens: Tensor | None = None,
    reduction: str = "mean",
    impl: str | None = None,
) -> ChainLossOutput:
    """Binary DPO on pairs taken from each chain (the baseline); a chain's loss is the mean over its pairs.

    ``pairs``: ``adjacent`` (k, k+1), ``all`` (every k < j), ``best_worst`` (1, K), ``best_rest`` (1, j).
    ``loss_type`` on the margin ``m = r_w - r_l``: ``sigmoid`` ``-log sigmoid(m)``, ``hinge``
    ``max(0, 1 - m)``, ``ipo`` ``(m / beta - 1 / (2 beta))^2``. See :func:`chain_loss` for the rest.
    """
    V.check_choice(loss_type, "loss_type", ref.DPO_LOSS_TYPES)
    return chain_loss(
        scores,
        chain_sizes,
        ref_scores,
        loss="dpo",
        beta=beta,
        pairs=pairs,
        dpo_loss_type=loss_type,
        sft_weight=sft_weight,
        num_tokens=num_tokens,
        reduction=reduction,
        impl=impl,
    )


def lipo_loss(
    scores: Tensor,
    chain_sizes: Sequence[int] | Tensor,
    ref_scores: Tensor | None = None,
    *,
    beta: float = 0.1,
    sft_weight: float = 0.0,
    num_tokens: Tensor | None = None,
    reduction: str = "mean",
    impl: str | None = None,
) -> ChainLossOutput:
    """LiPO-lambda: ``sum_{k<j} |G_k - G_j| |1/D_k - 1/D_j| log(1 + exp(-(r_k - r_j)))`` per chain.

    Gains ``G = 2^psi - 1`` with ``psi_k = (K - k)/(K - 1)``; discounts ``D = log2(1 + rank)`` under the
    current rewards (ties to the earlier caption); the weights carry no gradient. See :func:`chain_loss`.
    """
    return chain_loss(
        scores,
        chain_sizes,
        ref_scores,
        loss="lipo",
        beta=beta,
        sft_weight=sft_weight,
        num_tokens=num_tokens,
        reduction=reduction,
        impl=impl,
    )
