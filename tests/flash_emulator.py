"""A CPU emulator of ``flash_attn.flash_attn_varlen_func``'s semantics (flash-attn 2.x), for testing the
index arithmetic of the chain tree's flash path where flash-attn cannot be built.

What it emulates, from flash-attn's documentation and kernels:

* ``q [total_q, H, d]``, ``k`` / ``v [total_k, H_kv, d]`` (``H % H_kv == 0``; query head ``h`` reads key
  head ``h // (H / H_kv)``), ``cu_seqlens_q`` / ``cu_seqlens_k`` int32 ``[batch + 1]`` offsets starting at
  0 and ending at the totals, ``max_seqlen_q`` / ``max_seqlen_k`` at least every sequence's length;
* ``causal=True`` aligns the causal mask to the **bottom right**: query ``i`` of a sequence with ``sq``
  queries and ``sk`` keys attends to keys ``j <= i + sk - sq``;
* ``window_size=(left, right)``: key ``j`` also needs ``i + sk - sq - left <= j <= i + sk - sq + right``
  (``-1``: unbounded);
* ``softcap > 0``: scores ``softcap * tanh(scale * q.k / softcap)``;
* a query with no allowed key gets zeros.

Everything it is given is checked (dtypes, monotone offsets, totals, max lengths): an off-by-one in the
caller's arithmetic fails loudly instead of attending to the wrong keys. It runs in the inputs' dtype
(float64 in the tests) and is differentiable (plain tensor ops), so gradients are checked too.
"""

from __future__ import annotations

import torch
from torch import Tensor

CALLS: list[dict] = []


def _check_cu(cu: Tensor, total: int, name: str) -> list[int]:
    assert cu.dtype == torch.int32, f"{name} must be int32, got {cu.dtype}"
    assert cu.dim() == 1 and cu.numel() >= 2, f"{name} must be [batch + 1], got {list(cu.shape)}"
    c = cu.tolist()
    assert c[0] == 0 and c[-1] == total, f"{name} must run from 0 to {total}, got {c[0]}..{c[-1]}"
    assert all(b >= a for a, b in zip(c, c[1:])), f"{name} must not decrease"
    return c


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Tensor:
    assert dropout_p == 0.0, "the emulator has no dropout"
    assert alibi_slopes is None and not return_attn_probs
    assert q.dim() == 3 and k.dim() == 3 and v.shape == k.shape, (q.shape, k.shape, v.shape)
    H, d = q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    assert k.shape[2] == d and H % Hkv == 0, (q.shape, k.shape)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "last dim must be contiguous"
    cq = _check_cu(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    ck = _check_cu(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    assert len(cq) == len(ck), "cu_seqlens_q and cu_seqlens_k must have the same length"
    sq_all = [b - a for a, b in zip(cq, cq[1:])]
    sk_all = [b - a for a, b in zip(ck, ck[1:])]
    assert max(sq_all) <= max_seqlen_q and max(sk_all) <= max_seqlen_k, "max_seqlen below a length"
    left, right = window_size
    scale = softmax_scale if softmax_scale is not None else d**-0.5
    CALLS.append(
        {"causal": causal, "window_size": tuple(window_size), "softcap": softcap, "batch": len(sq_all)}
    )
    rep = H // Hkv
    outs = []
    for a_q, a_k, sq, sk in zip(cq, ck, sq_all, sk_all):
        if sq == 0:
            continue
        qi = q[a_q : a_q + sq].transpose(0, 1)  # [H, sq, d]
        ki = k[a_k : a_k + sk].transpose(0, 1).repeat_interleave(rep, 0)
        vi = v[a_k : a_k + sk].transpose(0, 1).repeat_interleave(rep, 0)
        s = torch.matmul(qi, ki.transpose(-1, -2)) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(sq)[:, None] + (sk - sq)
        j = torch.arange(sk)[None, :]
        allowed = torch.ones(sq, sk, dtype=torch.bool)
        if causal:
            allowed &= j <= i
        if left >= 0:
            allowed &= j >= i - left
        if right >= 0:
            allowed &= j <= i + right
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)  # a row with no key: zeros
        outs.append(torch.matmul(p, vi).transpose(0, 1))
    return torch.cat(outs)
