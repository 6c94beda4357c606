"""Single-pass chain loss from hidden states on the chunked PyTorch path: gradients computed in the forward.

The composed path (log-prob op -> caption sums -> chain loss, chained by autograd) must recompute every
logit tile in the backward, because the per-token upstream gradient ``dL/dl`` is only known once every
caption has been scored: 4 matmuls of ``N x V x D`` (forward logits; backward logits, ``d hidden``,
``d weight``) where the naive path does 3 and keeps the ``[N, V]`` logits.

But chains are independent: a chain's loss, and so ``dL/ds`` of its captions, depends only on its own
captions. This path walks the batch in **groups of whole chains**, and for each group

1. computes the group's logit chunks and token log-probs, *keeping* each chunk's softmax while the
   group's cache stays within ``cache_bytes``, and the last chunk (a chunk that does not fit is dropped
   and recomputed);
2. scores the group's captions and takes ``dL/ds`` of its chains with the score-level chain loss;
3. turns every chunk, last first, into ``dA = g (onehot - p) / tau`` (from the cache, or recomputed)
   and accumulates ``d hidden``, ``d weight`` and ``d bias``.

With the cache big enough for one group, that is 3 matmuls, like the naive path, at a memory cost of one
group's ``[rows, V]`` softmax instead of the batch's. The loss must be reduced to a scalar (``mean`` or
``sum``): the backward then only scales the stored gradients by the upstream scalar, as Liger-Kernel's
chunked losses do. Metrics are computed afterwards from the detached scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._validation import warn_zero_token_captions
from ._common import accumulation_dtype, default_chunk_size, logprob_grad_, softmax_

__all__ = ["DEFAULT_CACHE_BYTES", "single_pass_chain_loss"]

# Softmax cache of one group of chains: 64 MiB holds ~520 rows at V = 32000, ~110 at V = 152064; the
# group's last chunk comes on top (see step 1), so a chain of 8 x 128 tokens at V = 32000 recomputes one
# chunk of four. Peak extra memory ~ gradients + cache + one chunk (1/8.7 of the naive path's there).
DEFAULT_CACHE_BYTES = 64 * 2**20


def _groups(
    chain_sizes: Sequence[int], caption_rows: list[int], max_rows: int
) -> list[tuple[int, int, int, int]]:
    """Consecutive runs of whole chains: ``(first chain, end chain, first caption, end caption)``.

    A run grows while its scored rows stay within ``max_rows`` (a chain larger than that is a run alone).
    """
    runs, c0, s0, rows, s = [], 0, 0, 0, 0
    for c, k in enumerate(chain_sizes):
        chain_rows = sum(caption_rows[s : s + k])
        if c > c0 and rows + chain_rows > max_rows:
            runs.append((c0, c, s0, s))
            c0, s0, rows = c, s, 0
        rows += chain_rows
        s += k
    runs.append((c0, len(chain_sizes), s0, s))
    return runs


class _SinglePassChainLoss(torch.autograd.Function):
    """Carries the gradients computed in the forward; the backward scales them by the upstream scalar.

    The gradients are handed over, not copied: the backward scales them in place and returns them (so
    autograd can take them as ``.grad`` without a copy), which is why it can run only once per forward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss_value, d_hidden, d_weight, d_bias):
        ctx.grads = [d_hidden, d_weight, d_bias]
        return loss_value.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "the single-pass fused_linear_chain_loss can be backpropagated once per forward (its "
                "gradients were computed in the forward and are handed over); for retain_graph=True use "
                "reduction='none' and reduce the per-chain losses yourself"
            )
        grads, ctx.grads = ctx.grads, None
        out = []
        for g, needed in zip(grads, ctx.needs_input_grad[:3]):
            if not needed or g is None:
                out.append(None)
                continue
            out.append(g if bool(grad_loss == 1) else g.mul_(grad_loss.to(g.dtype)))
        return (*out, None, None, None, None)


def single_pass_chain_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    caption_of_row: Tensor,
    chain_sizes: list[int],
    ref_scores: Tensor | None,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    length_normalize: bool,
    chain_loss_fn,
    reduction: str,
    chunk_size: int | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, scores [S], num_tokens [S])`` with ``loss`` differentiable w.r.t. hidden, weight and bias.

    Args:
        hidden: ``[N, D]`` rows (CPU), ``weight [V, D]``, ``bias [V]`` or None, ``labels [N]`` (int64,
            already shifted), ``caption_of_row [N]`` the caption each row belongs to (captions
            contiguous in chain order).
        chain_sizes: validated chain sizes (sum = S). ``ref_scores``: ``[S]`` or None.
        chain_loss_fn: ``f(scores, chain_sizes, ref_scores, num_tokens) -> ChainLossOutput`` with
            ``reduction="sum"`` (the score-level chain loss with every option bound).
        reduction: ``"mean"`` or ``"sum"``.
        chunk_size: rows per logit chunk (default from ``V`` and ``D``); cache_bytes: softmax cache per
            group of chains.

    ``scores`` and ``num_tokens`` come back detached (scores are means when ``length_normalize``, and
    ``num_tokens`` is then 1), ready for computing the metrics.
    """
    acc = accumulation_dtype(hidden, weight, bias)
    N, D = hidden.shape
    V = weight.shape[0]
    S = sum(chain_sizes)
    chunk = chunk_size or default_chunk_size(V, D)
    w = weight.detach().to(acc)
    b = bias.detach().to(acc) if bias is not None else None
    h_all = hidden.detach()
    scored = labels != ignore_index
    rows_all = scored.nonzero().squeeze(1)
    row_caption = caption_of_row[rows_all]
    counts = torch.bincount(row_caption, minlength=S)
    caption_rows = counts.tolist()
    warn_zero_token_captions(caption_rows)
    # A group fits in the cache plus its last chunk (kept on top of the cache, see step 1).
    max_rows = max(chunk, cache_bytes // (4 * V * (2 if softcap is not None else 1))) + chunk
    C = len(chain_sizes)
    scale = 1.0 / C if reduction == "mean" and C > 0 else 1.0

    scores = torch.zeros(S, dtype=acc)
    d_hidden = torch.zeros((N, D), dtype=acc) if hidden.requires_grad else None
    d_weight = torch.zeros_like(w) if weight.requires_grad else None
    d_bias = torch.zeros_like(b) if b is not None and bias.requires_grad else None
    total = torch.zeros((), dtype=acc)
    row_start = 0
    for c0, c1, s0, s1 in _groups(chain_sizes, caption_rows, max_rows):
        n_rows = sum(caption_rows[s0:s1])
        group_rows = rows_all[row_start : row_start + n_rows]
        row_start += n_rows
        # 1. logits chunk by chunk: token log-probs, and the softmax kept while the cache has room. The
        # group's last chunk is kept too (it is in memory anyway, and step 3 consumes it first, before
        # any recomputation), so the peak stays at cache + one chunk with one recomputation fewer.
        chunks = torch.split(group_rows, chunk)
        cache: list[tuple[Tensor, Tensor | None] | None] = []
        cached = 0
        token_logp = torch.empty(n_rows, dtype=acc)
        for i, rows in enumerate(chunks):
            u, t = _logits(h_all[rows].to(acc), w, b, temperature, softcap)
            target = u.gather(1, labels[rows][:, None]).squeeze(1)
            p, lse = _softmax_and_lse_(u)
            token_logp[i * chunk : i * chunk + len(rows)] = target - lse
            nbytes = p.numel() * p.element_size() * (2 if t is not None else 1)
            keep = cached + nbytes <= cache_bytes
            if keep:
                cached += nbytes
            cache.append((p, t) if keep or i == len(chunks) - 1 else None)
            # Drop this chunk's [c, V] buffers now: held until the next chunk's are allocated, they would
            # add one chunk to the peak beyond the cache.
            del u, t, p
        # 2. the group's caption scores and dL/ds (mean reduction: every chain weighs 1 / C).
        group_caption = row_caption[row_start - n_rows : row_start] - s0
        sums = torch.zeros(s1 - s0, dtype=acc).index_add_(0, group_caption, token_logp)
        n = counts[s0:s1]
        s_group = sums / n.clamp(min=1).to(acc) if length_normalize else sums
        scores[s0:s1] = s_group
        s_leaf = s_group.clone().requires_grad_()
        ref = ref_scores[s0:s1] if ref_scores is not None else None
        with torch.enable_grad():
            out = chain_loss_fn(
                s_leaf, chain_sizes[c0:c1], ref, torch.ones_like(n) if length_normalize else n
            )
            (grad_s,) = torch.autograd.grad(out.loss, s_leaf)
        total += out.loss.detach().to(acc)
        grad_s = grad_s.to(acc) * scale
        if length_normalize:
            grad_s = grad_s / n.clamp(min=1).to(acc)
        g_rows = grad_s[group_caption]
        # 3. dA per chunk, from the cache or recomputed, last chunk first; accumulate the gradients.
        for i in reversed(range(len(chunks))):
            rows, entry = chunks[i], cache[i]
            if entry is None:
                p, t = _logits(h_all[rows].to(acc), w, b, temperature, softcap)
                softmax_(p)
            else:
                p, t = entry
                cache[i] = None
            da = logprob_grad_(p, labels[rows], g_rows[i * chunk : i * chunk + len(rows)], temperature)
            if t is not None:
                da.mul_(1.0 - t.square_())
            if d_hidden is not None:
                d_hidden[rows] = da @ w
            if d_weight is not None:
                d_weight.addmm_(da.T, h_all[rows].to(acc))
            if d_bias is not None:
                d_bias += da.sum(dim=0)
            del entry, p, t, da  # as above: free the chunk (cached or recomputed) before the next one
    empty = torch.zeros(0, dtype=acc)
    loss = _SinglePassChainLoss.apply(
        hidden,
        weight,
        bias,
        (total * scale).to(torch.float64 if acc == torch.float64 else torch.float32),
        d_hidden.to(hidden.dtype) if d_hidden is not None else empty,
        d_weight.to(weight.dtype) if d_weight is not None else empty,
        d_bias.to(bias.dtype) if d_bias is not None else empty,
    )
    num_tokens = torch.ones_like(counts) if length_normalize else counts
    return loss, scores, num_tokens


def _softmax_and_lse_(u: Tensor) -> tuple[Tensor, Tensor]:
    """In place: ``u [c, V]`` becomes ``softmax(u)``; also returns ``logsumexp(u) [c]``.

    One fused softmax kernel plus two cheap row maxima, no ``[c, V]`` temporary: the largest
    probability is ``exp(max u - lse) = 1 / sum_j exp(u_j - max u)``, at least ``1 / V`` (it never
    underflows), so ``lse = max u - log(max p)`` keeps full precision.
    """
    m = u.amax(dim=1)
    p = softmax_(u)
    return p, m - p.amax(dim=1).log()


def _logits(h: Tensor, w: Tensor, b: Tensor | None, temperature: float, softcap: float | None):
    """``(u = softcap(h W^T + b) / tau, tanh(a / softcap) or None)`` for one chunk ``[c, V]``."""
    u = torch.addmm(b, h, w.T) if b is not None else h @ w.T
    t = None
    if softcap is not None:
        t = torch.tanh(u.div_(softcap))
        u = t * (softcap / temperature)
    elif temperature != 1.0:
        u.div_(temperature)
    return u, t
