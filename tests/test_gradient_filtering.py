"""Gradient filtering in the fused Triton backward of ``linear_token_logprobs`` (``filter_eps``).

A ``[BLOCK_N, BLOCK_V]`` tile of the logits whose every ``|[j == y] - p_j|`` lies below ``filter_eps``
adds nothing to ``d hidden`` and ``d weight``; ``d bias`` stays exact. The first test checks exactly that
against a float64 emulation that drops the same tiles (the interpreter's tiles over the scored rows in the
kernel's order); the second that the default ``"auto"`` threshold changes bfloat16 gradients by less
than bfloat16 resolves. Kernels run under TRITON_INTERPRET=1 (tests/conftest.py): small odd shapes.
"""

from __future__ import annotations

import pytest
import torch
from rankloss.kernels import linear_token_logprobs as kernels

import rankloss


def _run(hidden, weight, bias, labels, upstream, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_()
    out = rankloss.linear_token_logprobs(h, w, labels, bias=b, **kw)
    (out * upstream).sum().backward()
    return out.detach(), h.grad, w.grad, b.grad


def _case(N, D, V, dtype, *, confident_rows, seed=0, ignore_frac=0.2):
    """A batch like a trained model's: the first ``confident_rows`` rows put almost all their probability
    on their label (so whole tiles of theirs have every p_j tiny), the others are unsure."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, D, generator=g) / D**0.5 * 2
    labels = torch.randint(0, V, (N,), generator=g)
    hidden = torch.randn(N, D, generator=g) * 0.5
    hidden[:confident_rows] += 10.0 * weight[labels[:confident_rows]]
    ignored = torch.rand(N, generator=g) < ignore_frac
    ignored[:confident_rows] = False
    labels[ignored] = -100
    bias = torch.randn(V, generator=g) * 0.1
    upstream = torch.randn(N, generator=g)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels, upstream


def _filtered_truth(hidden, weight, bias, labels, upstream, eps, *, softcap=None, temperature=1.0):
    """Float64 gradients with every interpreter tile whose ``|[j == y] - p_j|`` are all below ``eps``
    dropped from d hidden and d weight, and the number of dropped and of all tiles."""
    h, w, b = hidden.double(), weight.double(), bias.double()
    a = h @ w.T + b
    t = torch.tanh(a / softcap) if softcap else None
    u = (softcap * t if softcap else a) / temperature
    p = torch.softmax(u, dim=1)
    scored = labels != -100
    onehot = torch.zeros_like(p)
    onehot[scored.nonzero().squeeze(1), labels[scored]] = 1.0
    g = torch.where(scored, upstream.double(), 0.0)
    da = g[:, None] * (onehot - p) / temperature
    if softcap:
        da = da * (1 - t * t)
    size = (onehot - p).abs()
    keep = torch.ones_like(da)
    BN, BV = kernels.INTERPRETER_BLOCKS["BLOCK_N"], kernels.INTERPRETER_BLOCKS["BLOCK_V"]
    rows = scored.nonzero().squeeze(1)  # the kernel's order: scored rows first, in order
    dropped = total = 0
    for r0 in range(0, len(rows), BN):
        r = rows[r0 : r0 + BN]
        for v0 in range(0, w.shape[0], BV):
            total += 1
            if size[r, v0 : v0 + BV].max() < eps:
                keep[r, v0 : v0 + BV] = 0.0
                dropped += 1
    da_kept = da * keep
    return (da_kept @ w, da_kept.T @ h, da.sum(0)), dropped, total


@pytest.mark.triton
@pytest.mark.parametrize("options", [dict(), dict(softcap=30.0, temperature=0.8)], ids=["plain", "softcap"])
def test_filtered_tiles_are_exactly_the_small_ones(options):
    # 53 rows (42 scored: three row blocks, two groups of the interpreter's program order, one partial),
    # V = 301: five vocabulary tiles, the last partial.
    hidden, weight, bias, labels, upstream = _case(53, 45, 301, torch.float32, confident_rows=32, seed=1)
    eps = 1e-3
    (dh_t, dw_t, db_t), dropped, total = _filtered_truth(
        hidden, weight, bias, labels, upstream, eps, **options
    )
    assert 0 < dropped < total  # the test drops some tiles and keeps others
    _, dh, dw, db = _run(hidden, weight, bias, labels, upstream, impl="triton", filter_eps=eps, **options)
    for name, f, t in (("d hidden", dh, dh_t), ("d weight", dw, dw_t), ("d bias", db, db_t)):
        torch.testing.assert_close(f.double(), t, rtol=1e-4, atol=1e-5, msg=name)
    # and they differ from the unfiltered gradients (the dropped tiles were not all zero)
    _, dh0, dw0, _ = _run(hidden, weight, bias, labels, upstream, impl="triton", filter_eps=0, **options)
    assert not torch.equal(dw, dw0)


@pytest.mark.triton
def test_auto_threshold_changes_bfloat16_gradients_less_than_bfloat16_resolves():
    dtype = torch.bfloat16
    hidden, weight, bias, labels, upstream = _case(53, 45, 301, dtype, confident_rows=32, seed=2)
    eps = torch.finfo(dtype).eps / 32  # what "auto" means for bfloat16: 2^-12
    _, dropped, _ = _filtered_truth(hidden, weight, bias, labels, upstream, eps)
    assert dropped > 0  # "auto" filters tiles of this batch
    auto = _run(hidden, weight, bias, labels, upstream, impl="triton")  # filter_eps="auto" by default
    off = _run(hidden, weight, bias, labels, upstream, impl="triton", filter_eps=None)
    assert torch.equal(auto[0], off[0])  # the forward is untouched
    assert not torch.equal(auto[2], off[2])  # the kernel did skip tiles
    assert torch.equal(auto[3], off[3])  # d bias stays exact
    for name, a, o in zip(("d hidden", "d weight", "d bias"), auto[1:], off[1:]):
        # at most half a bfloat16 ulp of the gradient's largest entry
        bound = o.double().abs().max().item() * 2.0**-9
        assert (a.double() - o.double()).abs().max().item() <= bound, name


@pytest.mark.triton
def test_deterministic_kernels_and_other_paths_compute_every_tile():
    hidden, weight, bias, labels, upstream = _case(29, 33, 131, torch.float32, confident_rows=16, seed=3)
    det = _run(hidden, weight, bias, labels, upstream, impl="triton", deterministic=True)
    det_filtered = _run(
        hidden, weight, bias, labels, upstream, impl="triton", deterministic=True, filter_eps=0.5
    )
    for a, b in zip(det, det_filtered):
        assert torch.equal(a, b)
    for impl in ("torch", "cublas"):
        plain = _run(hidden, weight, bias, labels, upstream, impl=impl)
        filtered = _run(hidden, weight, bias, labels, upstream, impl=impl, filter_eps=0.5)
        for a, b in zip(plain, filtered):
            assert torch.equal(a, b), impl


@pytest.mark.parametrize(
    "bad, error",
    [
        (-0.1, ValueError),
        (1.0, ValueError),
        (float("nan"), ValueError),
        ("fast", TypeError),
        (True, TypeError),
    ],
)
def test_filter_eps_is_validated(bad, error):
    hidden, weight, bias, labels, _ = _case(5, 8, 17, torch.float32, confident_rows=0)
    with pytest.raises(error, match="filter_eps"):
        rankloss.linear_token_logprobs(hidden, weight, labels, filter_eps=bad)
    with pytest.raises(error, match="filter_eps"):
        rankloss.fused_linear_chain_loss(
            hidden[:4, None], weight, labels[:4, None].clamp(min=0), [2, 2], filter_eps=bad
        )
