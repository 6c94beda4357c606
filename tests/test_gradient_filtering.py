"""Gradient filtering in the fused Triton backward of ``linear_token_logprobs`` (``filter_eps``).

A ``[BLOCK_N, BLOCK_V]`` tile of the logits in whose rows every ``p_j`` is below
``filter_eps * (1 - p_y) / V`` adds nothing to ``d hidden`` and ``d weight``; ``d bias`` stays exact. The
first test checks exactly that against a float64 emulation that drops the same tiles (the interpreter's
tiles over the scored rows in the kernel's order); the others that the default ``"auto"`` loses less
than its bound (``eps / 2`` of each row's gradient mass) in bfloat16, and nothing on a flat softmax at a
larger vocabulary, where an absolute threshold would drop the whole tail. Kernels run under
TRITON_INTERPRET=1 (tests/conftest.py): small odd shapes.
"""

from __future__ import annotations

import pytest
import torch
from rankloss.kernels import linear_token_logprobs as kernels

import rankloss

BN, BV = kernels.INTERPRETER_BLOCKS["BLOCK_N"], kernels.INTERPRETER_BLOCKS["BLOCK_V"]


def _run(hidden, weight, bias, labels, upstream, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_()
    out = rankloss.linear_token_logprobs(h, w, labels, bias=b, **kw)
    (out * upstream).sum().backward()
    return out.detach(), h.grad, w.grad, b.grad


def _case(N, D, V, dtype, *, seed=0, ruled_out=(64, 256), ignore_frac=0.2):
    """Like a trained model's batch: the columns ``ruled_out`` (three whole interpreter tiles) get a bias
    of -25, tokens the model rules out for every row; 20 rows are sure of their label, the others not.
    ``ruled_out=None``: a flat softmax (no such tokens), as at initialisation."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, D, generator=g) / D**0.5 * 2
    labels = torch.randint(0, V, (N,), generator=g)
    hidden = torch.randn(N, D, generator=g)
    bias = torch.randn(V, generator=g) * 0.1
    if ruled_out is not None:
        hidden[:20] += 6.0 * weight[labels[:20]]
        lo, hi = ruled_out
        bias[lo:hi] = -25.0
        labels[(labels >= lo) & (labels < hi)] = 0
    else:
        hidden *= 0.3
    labels[torch.rand(N, generator=g) < ignore_frac] = -100
    upstream = torch.randn(N, generator=g)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels, upstream


def _filtered_truth(hidden, weight, bias, labels, upstream, eps, *, softcap=None, temperature=1.0):
    """Float64 gradients with every interpreter tile that qualifies dropped from d hidden and d weight;
    also each row's gradient mass ``sum_j |dLoss/da_j|`` and the number of dropped and of all tiles."""
    h, w, b = hidden.double(), weight.double(), bias.double()
    V = w.shape[0]
    a = h @ w.T + b
    t = torch.tanh(a / softcap) if softcap else None
    u = (softcap * t if softcap else a) / temperature
    p = torch.softmax(u, dim=1)
    scored = labels != -100
    onehot = torch.zeros_like(p, dtype=torch.bool)
    onehot[scored.nonzero().squeeze(1), labels[scored]] = True
    one_minus_p = 1 - torch.where(onehot, p, 0.0).sum(1)
    g = torch.where(scored, upstream.double(), 0.0)
    da = g[:, None] * (onehot.double() - p) / temperature
    if softcap:
        da = da * (1 - t * t)
    large = onehot | (p >= eps * one_minus_p[:, None] / V)
    keep = torch.ones_like(da)
    rows = scored.nonzero().squeeze(1)  # the kernel's order: scored rows first, in order
    dropped = total = 0
    for r0 in range(0, len(rows), BN):
        r = rows[r0 : r0 + BN]
        for v0 in range(0, V, BV):
            total += 1
            if not large[r, v0 : v0 + BV].any():
                keep[r, v0 : v0 + BV] = 0.0
                dropped += 1
    da_kept = da * keep
    mass = torch.where(scored, da.abs().sum(1), 0.0)
    return (da_kept @ w, da_kept.T @ h, da.sum(0)), mass, dropped, total


@pytest.mark.triton
@pytest.mark.parametrize("options", [dict(), dict(softcap=30.0, temperature=0.8)], ids=["plain", "softcap"])
def test_filtered_tiles_are_exactly_the_small_ones(options):
    # 41 rows (37 scored: three row blocks, so the interpreter's program order has a full group of two
    # and a partial one), V = 301: five vocabulary tiles, the last partial.
    hidden, weight, bias, labels, upstream = _case(41, 45, 301, torch.float32, seed=1)
    eps = 0.5
    (dh_t, dw_t, db_t), _, dropped, total = _filtered_truth(
        hidden, weight, bias, labels, upstream, eps, **options
    )
    assert (labels != -100).sum() > 2 * BN
    assert 0 < dropped < total  # the test drops some tiles and keeps others
    _, dh, dw, db = _run(hidden, weight, bias, labels, upstream, impl="triton", filter_eps=eps, **options)
    for name, f, t in (("d hidden", dh, dh_t), ("d weight", dw, dw_t), ("d bias", db, db_t)):
        torch.testing.assert_close(f.double(), t, rtol=1e-4, atol=1e-5, msg=name)
    # and they differ from the unfiltered gradients (the dropped tiles were not all zero)
    _, dh0, dw0, _ = _run(hidden, weight, bias, labels, upstream, impl="triton", filter_eps=0, **options)
    assert not torch.equal(dw, dw0)


@pytest.mark.triton
def test_auto_threshold_loses_less_than_its_bound_in_bfloat16():
    dtype = torch.bfloat16
    hidden, weight, bias, labels, upstream = _case(53, 45, 301, dtype, seed=2)
    eps = torch.finfo(dtype).eps  # what "auto" means for bfloat16: 2^-7
    (dh_t, _, _), mass, dropped, _ = _filtered_truth(hidden, weight, bias, labels, upstream, eps)
    assert dropped > 0  # "auto" filters tiles of this batch
    auto = _run(hidden, weight, bias, labels, upstream, impl="triton")  # filter_eps="auto" by default
    off = _run(hidden, weight, bias, labels, upstream, impl="triton", filter_eps=None)
    assert torch.equal(auto[0], off[0])  # the forward is untouched
    assert not torch.equal(auto[1], off[1])  # the kernel did skip tiles
    assert torch.equal(auto[3], off[3])  # d bias stays exact
    # Per row, d hidden moves by at most eps / 2 of the row's gradient mass times max |W| (the bound), plus
    # one bfloat16 rounding of the row's largest entry (both outputs are rounded to bfloat16).
    bound = eps / 2 * mass * weight.double().abs().max()
    ulp = off[1].double().abs().amax(1) * 2.0**-8
    moved = (auto[1].double() - off[1].double()).abs().amax(1)
    assert torch.all(moved <= bound + ulp)
    # d weight: under half a bfloat16 ulp of its largest entry
    assert (auto[2].double() - off[2].double()).abs().max() <= off[2].double().abs().max() * 2.0**-9


@pytest.mark.triton
def test_flat_softmax_loses_nothing_at_a_larger_vocabulary():
    # A near-uniform softmax over V = 5003 (p ~ 1/V), head rows sharing a mean direction: the tail that an
    # absolute threshold (apple/ml-cross-entropy's eps / 32 = 2^-12 in bf16, above 1/V here) would drop
    # whole carries the gradient g (1 - p_y) E_p[W] ~ g |mean W|. The relative threshold keeps every tile.
    dtype = torch.bfloat16
    hidden, weight, bias, labels, upstream = _case(21, 24, 5003, dtype, seed=4, ruled_out=None)
    weight = (weight.float() + 0.5).to(dtype)  # a shared mean direction
    _, _, dropped, _ = _filtered_truth(hidden, weight, bias, labels, upstream, torch.finfo(dtype).eps)
    assert dropped == 0
    auto = _run(hidden, weight, bias, labels, upstream, impl="triton")
    off = _run(hidden, weight, bias, labels, upstream, impl="triton", filter_eps=None)
    for a, o in zip(auto, off):
        assert torch.equal(a, o)
    # ... a softmax whose entries mostly lie below an absolute 2^-12
    p = torch.softmax(hidden.double() @ weight.double().T + bias.double(), dim=1)
    assert (p < 2.0**-12).float().mean() > 0.5


@pytest.mark.triton
def test_deterministic_kernels_and_other_paths_compute_every_tile():
    hidden, weight, bias, labels, upstream = _case(29, 33, 301, torch.float32, seed=3)
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
    hidden, weight, bias, labels, _ = _case(5, 8, 17, torch.float32, ruled_out=None)
    with pytest.raises(error, match="filter_eps"):
        rankloss.linear_token_logprobs(hidden, weight, labels, filter_eps=bad)
    with pytest.raises(error, match="filter_eps"):
        rankloss.fused_linear_chain_loss(
            hidden[:4, None], weight, labels[:4, None].clamp(min=0), [2, 2], filter_eps=bad
        )


@pytest.mark.parametrize("shared_mean, lost", [(0.0, 0.029), (0.5, 0.128)], ids=["isotropic", "shared-mean"])
def test_an_absolute_threshold_would_drop_a_flat_tail(shared_mean, lost):
    # Why the threshold is relative (float64 emulation, no kernel; the docs quote these numbers): at
    # V = 32000 with a near-uniform softmax, apple/ml-cross-entropy's absolute rule (skip a 64 x 128 tile
    # when every |[j == y] - p_j| < 2^-12, its bf16 "auto") drops every tile without a target and loses
    # 3% of d hidden (13% when the head's rows share a mean direction); the relative rule keeps them all.
    N, V, D, tile = 64, 32000, 64, 128
    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5 + shared_mean / D**0.5
    h = torch.randn(N, D, generator=g, dtype=torch.float64) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    p = torch.softmax(h @ w.T, dim=1)
    onehot = torch.zeros_like(p, dtype=torch.bool)
    onehot[torch.arange(N), y] = True
    da = onehot.double() - p
    one_minus_p = 1 - p[torch.arange(N), y]
    rules = {
        "absolute": da.abs() < 2.0**-12,
        "relative": ~onehot & (p < torch.finfo(torch.bfloat16).eps * one_minus_p[:, None] / V),
    }
    dh = da @ w
    share = {}
    for name, small in rules.items():
        keep = torch.ones_like(da)
        for v0 in range(0, V, tile):
            if small[:, v0 : v0 + tile].all():
                keep[:, v0 : v0 + tile] = 0.0
        share[name] = ((dh - (da * keep) @ w).abs().max() / dh.abs().max()).item()
    assert share["absolute"] == pytest.approx(lost, abs=5e-4)
    assert share["relative"] == 0.0
