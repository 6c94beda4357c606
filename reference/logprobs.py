"""Reference per-token and per-sequence log-probabilities (DESIGN.md §2).

Readable, float64-capable PyTorch: this is the specification the fused kernels are tested against.
Everything is computed in ``float64`` when the inputs are ``float64`` and in ``float32`` otherwise;
nothing here is chunked or fused, so the ``[N, V]`` logits are materialised on purpose.

Label convention: ``labels[..., t]`` is the token whose log-probability is read from position ``t``'s
logits (labels are *already shifted*); ``ignore_index`` marks positions that are not scored.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "accumulation_dtype",
    "token_logprobs",
    "linear_logits",
    "linear_token_logprobs",
    "sequence_logprobs",
]


def accumulation_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (the dtype every reference op computes in)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def token_logprobs(
    logits: Tensor, labels: Tensor, ignore_index: int = -100, temperature: float = 1.0
) -> Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    ``l[..., t] = log_softmax(logits[..., t, :] / temperature)[labels[..., t]]``, and ``0`` where
    ``labels[..., t] == ignore_index`` (those positions also get no gradient).

    Shapes: ``logits [..., V]`` (e.g. ``[S, T, V]`` or ``[N, V]``), ``labels [...]`` -> ``[...]``
    in the accumulation dtype (float32, or float64 for float64 logits).
    """
    z = logits.to(accumulation_dtype(logits)) / temperature
    logp = torch.log_softmax(z, dim=-1)
    scored = labels != ignore_index
    # gather needs int64 indices; labels may be any integer dtype (int32, uint8, ...).
    safe_labels = torch.where(scored, labels, torch.zeros_like(labels)).long()
    picked = logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, picked, torch.zeros_like(picked))


def linear_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None = None, softcap: float | None = None
) -> Tensor:
    """Logits of an LM head: ``z = hidden @ weight.T + bias``, then ``softcap * tanh(z / softcap)``.

    Shapes: ``hidden [..., D]``, ``weight [V, D]``, ``bias [V]`` -> ``[..., V]`` in the accumulation dtype.
    The soft-cap (as in Gemma 2) is applied before any temperature.
    """
    acc = accumulation_dtype(hidden, weight, bias)
    z = hidden.to(acc) @ weight.to(acc).T
    if bias is not None:
        z = z + bias.to(acc)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """Per-token log-probabilities straight from hidden states and the LM head.

    ``z = softcap * tanh((hidden @ weight.T + bias) / softcap)`` (soft-cap optional), then
    ``l = log_softmax(z / temperature)[labels]``, and ``0`` where ``labels == ignore_index``.

    Shapes: ``hidden [..., D]``, ``weight [V, D]``, ``labels [...]``, ``bias [V]`` -> ``[...]``.
    """
    return token_logprobs(
        linear_logits(hidden, weight, bias, softcap),
        labels,
        ignore_index=ignore_index,
        temperature=temperature,
    )


def sequence_logprobs(
    token_logps: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    length_normalize: bool = False,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Sequence scores: ``s_i = sum_t l_{i,t}`` over scored tokens, or ``s_i / n_i`` if ``length_normalize``.

    ``n_i`` is the number of scored tokens (``labels != ignore_index``); a sequence with none scores 0.

    Shapes, padded layout: ``token_logps [S, T]`` (any leading dims), ``labels [S, T]`` -> ``[S]``.
    Packed layout: ``token_logps [N]``, ``labels [N]``, ``cu_seqlens [S + 1]`` (sequence ``i`` holds
    tokens ``cu_seqlens[i]:cu_seqlens[i + 1]``) -> ``[S]``.
    """
    scored = labels != ignore_index
    values = torch.where(scored, token_logps, torch.zeros_like(token_logps)).to(
        accumulation_dtype(token_logps)
    )
    if cu_seqlens is None:
        sums = values.sum(dim=-1)
        counts = scored.sum(dim=-1)
    elif cu_seqlens.numel() == 1:  # no sequences (S = 0, N = 0): empty, still connected to token_logps
        sums, counts = values[:0], scored[:0].long()
    else:
        bounds = cu_seqlens.tolist()
        sums = torch.stack([values[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
        counts = torch.stack([scored[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
    if length_normalize:
        return sums / counts.clamp(min=1).to(sums.dtype)
    return sums
