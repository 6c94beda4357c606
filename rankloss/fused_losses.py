"""End-to-end chain losses: from hidden states (or logits) to a chain loss, never building ``[N, V]`` logits.

``fused_linear_chain_loss`` = per-token log-probs fused with the LM head
(:func:`rankloss.linear_token_logprobs`) -> per-caption segment sums -> the single-pass chain loss
(:func:`rankloss.chain_loss`). Autograd chains the pieces: the chain loss gives ``dL/ds [S]``, every
scored token of caption ``i`` receives ``dL/ds_i`` (divided by ``n_i`` when length-normalised), and the
fused LM-head backward recomputes its logit tiles. The memory is that of the LM-head op
(``O(chunk * V)`` on the PyTorch path, no logits at all on the Triton path) plus ``O(S)`` per-caption
values, whatever the chain sizes: it does not grow with ``K`` for a fixed number of tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import _validation as V
from .logprobs import _common_dtype, _needs_grad, check_linear_inputs, linear_token_logprobs, token_logprobs
from .losses import chain_loss, check_chain_options
from .ops.fused_chain_loss import DEFAULT_CACHE_BYTES, single_pass_chain_loss
from .outputs import ChainLossOutput

__all__ = ["fused_linear_chain_loss", "chain_loss_from_logits", "sequence_scores", "ChainLoss"]


def _segment_scores(
    token_logps: Tensor, labels: Tensor, ignore_index: int, cu_seqlens: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-caption sums ``s [S]`` of the token log-probs and counts ``n [S]`` of scored tokens.

    Padded layout: ``token_logps [S, T]`` -> sums over ``T``. Packed layout: ``token_logps [N]`` with
    ``cu_seqlens [S + 1]`` -> segment sums (``index_add``; no host synchronisation).
    """
    scored = labels != ignore_index
    if cu_seqlens is None:
        return token_logps.sum(dim=-1), scored.sum(dim=-1)
    S = cu_seqlens.shape[0] - 1
    positions = torch.arange(token_logps.shape[0], device=token_logps.device)
    segment = torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)
    sums = token_logps.new_zeros(S).index_add(0, segment, token_logps)
    counts = torch.zeros(S, dtype=torch.long, device=labels.device).index_add(0, segment, scored.long())
    return sums, counts


def _check_layout(hidden: Tensor, labels: Tensor, cu_seqlens: Tensor | None, what: str) -> None:
    V.check_int_tensor(labels, "labels")
    if cu_seqlens is None:
        if hidden.ndim != 3:
            raise ValueError(
                f"{what} must be [S, T, {'D' if what == 'hidden' else 'V'}] in the padded layout (or pass "
                f"cu_seqlens for the packed [N, ...] layout), got shape {tuple(hidden.shape)}"
            )
        return
    V.check_int_tensor(cu_seqlens, "cu_seqlens", ndim=1)
    if hidden.ndim != 2:
        raise ValueError(
            f"{what} must be 2-D [N, ...] in the packed layout (cu_seqlens given), got {tuple(hidden.shape)}"
        )
    V.check_cu_seqlens(cu_seqlens, hidden.shape[0])


def _scores_from_token_logps(
    token_logps: Tensor,
    labels: Tensor,
    ignore_index: int,
    length_normalize: bool,
    cu_seqlens: Tensor | None,
    warn_empty: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(scores [S], num_tokens [S])``; scores are means over scored tokens when ``length_normalize``.

    A caption without scored tokens scores 0 either way; ``warn_empty`` warns (once) when there is one.
    """
    sums, counts = _segment_scores(token_logps, labels, ignore_index, cu_seqlens)
    if warn_empty:
        V.warn_zero_token_captions(counts)
    if length_normalize:
        return sums / counts.clamp(min=1).to(sums.dtype), torch.ones_like(counts)
    return sums, counts


def _chain_loss_of_tokens(
    token_logps: Tensor,
    labels: Tensor,
    chain_sizes: Sequence[int] | Tensor,
    ref_scores: Tensor | None,
    ignore_index: int,
    length_normalize: bool,
    cu_seqlens: Tensor | None,
    **chain_options: object,
) -> ChainLossOutput:
    """Caption scores from per-token log-probs, then :func:`rankloss.chain_loss` (which validates the rest).

    The SFT term ``-s_1 / n_1`` is the best caption's mean token log-prob either way: with
    ``length_normalize`` the scores already are means, so ``num_tokens`` is 1.
    """
    scores, num_tokens = _scores_from_token_logps(
        token_logps, labels, ignore_index, length_normalize, cu_seqlens, warn_empty=True
    )
    return chain_loss(scores, chain_sizes, ref_scores, num_tokens=num_tokens, **chain_options)


def fused_linear_chain_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    chain_sizes: Sequence[int] | Tensor,
    ref_scores: Tensor | None = None,
    *,
    loss: str = "plackett_luce",
    beta: float = 0.1,
    length_normalize: bool = False,
    top_k: int | None = None,
    pairs: str | None = None,
    dpo_loss_type: str | None = None,
    sft_weight: float = 0.0,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    cu_seqlens: Tensor | None = None,
    reduction: str = "mean",
    impl: str | None = None,
    chunk_size: int | None = None,
    deterministic: bool = False,
    filter_eps: float | str | None = "auto",
    cache_bytes: int | None = None,
) -> ChainLossOutput:
    """A chain loss straight from the policy's final hidden states and its LM head.

    Per caption ``i``: ``s_i = sum_t log_softmax(softcap(h_{i,t} W^T + b) / tau)[y_{i,t}]`` over its scored
    tokens (the mean when ``length_normalize``), then :func:`rankloss.chain_loss` on ``s`` with rewards
    ``r = beta * (s - ref_scores)``. Gradients reach ``hidden``, ``lm_head_weight`` and ``bias``; the
    ``[tokens x vocab]`` logits are never materialised.

    A caption without scored tokens scores 0 (sum or mean), as if the model were certain of it; a
    ``RuntimeWarning`` says so once per process (on CPU tensors, or with ``RANKLOSS_VALIDATE=1``). An
    empty batch (``S = 0``, ``chain_sizes=[]``) gives a zero loss connected to ``hidden`` and
    ``lm_head_weight`` (zero gradients), so a data-parallel step does not wait for missing gradients.

    Args:
        hidden: ``[S, T, D]`` (padded: one row per caption, chains contiguous and best first) or ``[N, D]``
            with ``cu_seqlens`` (packed: caption ``i`` is ``hidden[cu_seqlens[i]:cu_seqlens[i+1]]``).
        lm_head_weight: ``[V, D]``.
        labels: ``[S, T]`` or ``[N]`` token ids, **already shifted** (``labels[..., t]`` is scored from
            position ``t``; see :func:`rankloss.shift_labels`); ``ignore_index`` for prompt, video and
            padding positions.
        chain_sizes: ``C`` ints (each >= 2, summing to ``S``), or a 1-D integer tensor.
        ref_scores: ``[S]`` the frozen reference model's scores computed the same way (same
            ``length_normalize``), e.g. with :func:`sequence_scores`; None for reference-free rewards.
        loss, beta, top_k, pairs, dpo_loss_type, sft_weight, reduction: as in :func:`rankloss.chain_loss`
            (the SFT term is ``-s_1 / n_1``, the best caption's mean token log-prob).
        bias, ignore_index, temperature, softcap, chunk_size, deterministic, filter_eps: as in
            :func:`rankloss.linear_token_logprobs`.
        cu_seqlens: ``[S + 1]`` offsets for the packed layout.
        impl: ``None`` (on CUDA the vocabulary-chunked cuBLAS log-probs and the Triton chain kernel; chunked
            PyTorch on CPU), ``"cublas"``, ``"triton"``, ``"torch"`` or ``"reference"``; used for both the
            log-probs and the chain loss (``"cublas"`` runs the chain loss with ``"triton"``).
        cache_bytes: the PyTorch path on CPU, when gradients are needed and ``reduction`` is ``"mean"``
            or ``"sum"``, runs in a single pass: it walks the batch in groups of whole chains, computes
            each group's chain loss and gradients right away and keeps each group's softmax chunks (up
            to ``cache_bytes``, default 64 MiB, plus the group's last chunk) instead of recomputing
            them, so it does 3 to 4 matmuls of ``N x V x D`` (3 when a group fits) instead of 4. ``0``
            recomputes every chunk but the last of each group. The ``"cublas"`` path (the CUDA default)
            keeps up to ``cache_bytes`` of fp32 logit chunks from the forward for the backward (see
            :func:`rankloss.linear_token_logprobs`; ``None`` keeps none). Ignored elsewhere.

    Returns:
        A :class:`~rankloss.ChainLossOutput` with ``.loss`` and the ranking metrics.
    """
    V.check_float_tensor(hidden, "hidden")
    _check_layout(hidden, labels, cu_seqlens, "hidden")
    if not isinstance(length_normalize, bool):
        raise TypeError(f"length_normalize must be a bool, got {length_normalize!r}")
    cache_bytes = V.check_cache_bytes(cache_bytes)
    filter_eps = V.check_filter_eps(filter_eps)
    chain_options = dict(
        loss=loss,
        beta=beta,
        top_k=top_k,
        pairs=pairs,
        dpo_loss_type=dpo_loss_type,
        sft_weight=sft_weight,
        # impl="cublas" names a log-prob path; the chain loss over the scores then runs its Triton kernel.
        impl="triton" if impl == "cublas" else impl,
    )
    if _single_pass_applies(hidden, lm_head_weight, bias, ref_scores, impl, reduction):
        return _single_pass(
            hidden,
            lm_head_weight,
            labels,
            chain_sizes,
            ref_scores,
            bias=bias,
            ignore_index=ignore_index,
            temperature=temperature,
            softcap=softcap,
            length_normalize=length_normalize,
            cu_seqlens=cu_seqlens,
            reduction=reduction,
            chunk_size=chunk_size,
            deterministic=deterministic,
            cache_bytes=DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes,
            **chain_options,
        )
    token_logps = linear_token_logprobs(
        hidden,
        lm_head_weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        impl=impl,
        chunk_size=chunk_size,
        deterministic=deterministic,
        filter_eps=filter_eps,
        cache_bytes=cache_bytes,
    )
    return _chain_loss_of_tokens(
        token_logps,
        labels,
        chain_sizes,
        ref_scores,
        ignore_index,
        length_normalize,
        cu_seqlens,
        reduction=reduction,
        **chain_options,
    )


def _single_pass_applies(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ref_scores: Tensor | None,
    impl: object,
    reduction: object,
) -> bool:
    """The single-pass path: CPU tensors on the PyTorch path, gradients wanted, a scalar loss, eager mode."""
    return (
        _needs_grad(hidden, weight, bias)
        and hidden.device.type == "cpu"
        and impl in (None, "torch")
        and reduction in ("mean", "sum")
        and not torch.compiler.is_compiling()
        and not (ref_scores is not None and ref_scores.requires_grad)
    )


def _single_pass(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    chain_sizes: Sequence[int] | Tensor,
    ref_scores: Tensor | None,
    *,
    bias: Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    length_normalize: bool,
    cu_seqlens: Tensor | None,
    reduction: str,
    chunk_size: int | None,
    deterministic: bool,
    cache_bytes: int,
    **chain_options: object,
) -> ChainLossOutput:
    ignore_index, temperature, softcap, chunk_size = check_linear_inputs(
        hidden, weight, labels, bias, ignore_index, temperature, softcap, chunk_size, deterministic
    )
    S = hidden.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    placeholder = torch.zeros(S, dtype=torch.float32, device=hidden.device)  # the scores to come
    options = check_chain_options(
        placeholder,
        chain_sizes,
        ref_scores,
        loss_type=None,
        num_tokens=placeholder.long(),
        reduction=reduction,
        **chain_options,
    )
    sizes = options.pop("chain_sizes")
    if cu_seqlens is None:
        T = hidden.shape[1]
        rows_h, rows_y = hidden.reshape(S * T, hidden.shape[-1]), labels.reshape(S * T)
        caption_of_row = torch.arange(S).repeat_interleave(T)
    else:
        rows_h, rows_y = hidden, labels
        caption_of_row = torch.arange(S).repeat_interleave(torch.diff(cu_seqlens.long()))
    rows_h, weight, bias = _common_dtype(rows_h, weight, bias)
    chain_fn = functools.partial(
        _group_chain_loss,
        loss=options["loss"],
        beta=options["beta"],
        top_k=options["top_k"],
        pairs=options["pairs"] if options["loss"] == "dpo" else None,
        dpo_loss_type=options["loss_type"] if options["loss"] == "dpo" else None,
        sft_weight=options["sft_weight"],
        impl=options["impl"],
    )
    with torch.autocast("cpu", enabled=False):
        loss, scores, num_tokens = single_pass_chain_loss(
            rows_h,
            weight,
            bias,
            rows_y.long(),
            caption_of_row,
            sizes,
            ref_scores,
            ignore_index=ignore_index,
            temperature=temperature,
            softcap=softcap,
            length_normalize=length_normalize,
            chain_loss_fn=chain_fn,
            reduction=reduction,
            chunk_size=chunk_size,
            cache_bytes=cache_bytes,
        )
    out = chain_loss(
        scores, sizes, ref_scores, num_tokens=num_tokens, reduction=reduction, **chain_fn.keywords
    )
    return out._replace(loss=loss)


def _group_chain_loss(
    scores: Tensor, chain_sizes: list[int], ref_scores: Tensor | None, num_tokens: Tensor, **options: object
) -> ChainLossOutput:
    return chain_loss(scores, chain_sizes, ref_scores, num_tokens=num_tokens, reduction="sum", **options)


def chain_loss_from_logits(
    logits: Tensor,
    labels: Tensor,
    chain_sizes: Sequence[int] | Tensor,
    ref_scores: Tensor | None = None,
    *,
    loss: str = "plackett_luce",
    beta: float = 0.1,
    length_normalize: bool = False,
    top_k: int | None = None,
    pairs: str | None = None,
    dpo_loss_type: str | None = None,
    sft_weight: float = 0.0,
    ignore_index: int = -100,
    temperature: float = 1.0,
    cu_seqlens: Tensor | None = None,
    reduction: str = "mean",
    impl: str | None = None,
    chunk_size: int | None = None,
) -> ChainLossOutput:
    """:func:`fused_linear_chain_loss` for callers that already hold the logits ``[S, T, V]`` (or ``[N, V]``
    with ``cu_seqlens``): per-token log-probs with :func:`rankloss.token_logprobs`, then the chain loss."""
    V.check_float_tensor(logits, "logits")
    _check_layout(logits, labels, cu_seqlens, "logits")
    if not isinstance(length_normalize, bool):
        raise TypeError(f"length_normalize must be a bool, got {length_normalize!r}")
    token_logps = token_logprobs(
        logits, labels, ignore_index=ignore_index, temperature=temperature, impl=impl, chunk_size=chunk_size
    )
    return _chain_loss_of_tokens(
        token_logps,
        labels,
        chain_sizes,
        ref_scores,
        ignore_index,
        length_normalize,
        cu_seqlens,
        loss=loss,
        beta=beta,
        top_k=top_k,
        pairs=pairs,
        dpo_loss_type=dpo_loss_type,
        sft_weight=sft_weight,
        reduction=reduction,
        impl=impl,
    )


@torch.no_grad()
def sequence_scores(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    length_normalize: bool = False,
    cu_seqlens: Tensor | None = None,
    impl: str | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-caption scores ``[S]`` (float32) without gradient: what a trainer caches once from the frozen
    reference model and passes back as ``ref_scores``. Same layouts and options as
    :func:`fused_linear_chain_loss` (use the same ``length_normalize`` in both)."""
    V.check_float_tensor(hidden, "hidden")
    _check_layout(hidden, labels, cu_seqlens, "hidden")
    token_logps = linear_token_logprobs(
        hidden,
        lm_head_weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        impl=impl,
        chunk_size=chunk_size,
    )
    return _scores_from_token_logps(token_logps, labels, ignore_index, length_normalize, cu_seqlens)[0]


class ChainLoss(nn.Module):
    """Module form of :func:`fused_linear_chain_loss`; holds the options and routes, nothing more.

    ``forward(hidden, lm_head_weight, labels, chain_sizes, ref_scores=None, bias=None, cu_seqlens=None)``.
    """

    def __init__(self, loss: str = "plackett_luce", **options: object):
        super().__init__()
        self.loss = loss
        self.options = options

    def forward(
        self,
        hidden: Tensor,
        lm_head_weight: Tensor,
        labels: Tensor,
        chain_sizes: Sequence[int] | Tensor,
        ref_scores: Tensor | None = None,
        bias: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> ChainLossOutput:
        return fused_linear_chain_loss(
            hidden,
            lm_head_weight,
            labels,
            chain_sizes,
            ref_scores,
            loss=self.loss,
            bias=bias,
            cu_seqlens=cu_seqlens,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join([f"loss={self.loss!r}"] + [f"{k}={v!r}" for k, v in self.options.items()])
