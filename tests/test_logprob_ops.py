"""The fast per-token log-prob paths (Triton kernels, vocabulary-chunked cuBLAS + Triton epilogues, chunked
PyTorch) against the float64 reference.

Tolerances follow apple/ml-cross-entropy: the error of a fast path against the float64 truth may be no
larger than the error plain PyTorch makes on the same inputs in the same dtype, plus a small margin.
Triton kernels run under TRITON_INTERPRET=1 on CPU (tests/conftest.py), so their shapes are small and
odd (never a multiple of a block size: the interpreter's blocks are 16 x 64 x 32).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rankloss.reference import logprobs as ref

import rankloss
from rankloss.ops import ChunkPlan, cublas_chunk_plan, default_chunk_size, default_vocab_chunk
from rankloss.ops._common import MAX_ROW_GROUPS, VOCAB_CHUNK_BUDGET_BYTES
from rankloss.ops.linear_token_logprobs import _linear_token_logprobs_fwd
from rankloss.ops.token_logprobs import _token_logprobs_fwd

FAST_IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]
# linear_token_logprobs also has the vocabulary-chunked path (its epilogues are Triton kernels).
LINEAR_IMPLS = [*FAST_IMPLS, pytest.param("cublas", marks=pytest.mark.triton)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Margin added to the plain-PyTorch error, per dtype (absolute, on values of order 1-10).
MARGIN = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_no_worse(name: str, fast: torch.Tensor, truth: torch.Tensor, plain: torch.Tensor, dtype) -> None:
    e_fast, e_plain = _err(fast, truth), _err(plain, truth)
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    assert e_fast <= e_plain + MARGIN[dtype] * scale, (
        f"{name}: error {e_fast:.3g} vs float64 truth exceeds plain PyTorch's {e_plain:.3g} + margin"
    )


def _linear_case(N, D, V, dtype, *, seed=0, ignore_frac=0.2, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) / D**0.5 * 2).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignore_frac] = -100
    upstream = torch.randn(N, generator=g)
    return hidden, weight, b, labels, upstream


def _plain(hidden, weight, bias, labels, upstream, temperature=1.0, softcap=None):
    """Plain PyTorch in the inputs' dtype: logits, log_softmax and gradients all in that dtype (the
    reference path for float32)."""
    if hidden.dtype == torch.float32:
        kw = dict(temperature=temperature, softcap=softcap)
        return _run_linear("reference", hidden, weight, bias, labels, upstream, **kw)
    h, w = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    z = h @ w.T + (b if b is not None else 0)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    lp = torch.log_softmax(z / temperature, dim=-1)
    lp = torch.where(labels != -100, lp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0)
    (lp * upstream.to(hidden.dtype)).sum().backward()
    return lp.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _run_linear(impl, hidden, weight, bias, labels, upstream, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    out = rankloss.linear_token_logprobs(h, w, labels, bias=b, impl=impl, **kw)
    (out * upstream).sum().backward()
    return out.detach(), h.grad, w.grad, (b.grad if b is not None else None)


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "options",
    [dict(), dict(temperature=0.7), dict(softcap=4.0), dict(softcap=6.0, temperature=1.3)],
    ids=["plain", "temperature", "softcap", "softcap+temperature"],
)
def test_linear_token_logprobs_matches_float64_reference(impl, dtype, options):
    N, D, V = 37, 67, 1031
    hidden, weight, bias, labels, upstream = _linear_case(N, D, V, dtype)
    out, dh, dw, db = _run_linear(impl, hidden, weight, bias, labels, upstream, **options)
    assert out.dtype == torch.float32 and out.shape == (N,)
    assert dh.dtype == dtype and dw.dtype == dtype and db.dtype == dtype
    truth = _run_linear(
        "reference", hidden.double(), weight.double(), bias.double(), labels, upstream.double(), **options
    )
    plain = _plain(hidden, weight, bias, labels, upstream, **options)
    for name, f, t, p in zip(("logp", "d hidden", "d weight", "d bias"), (out, dh, dw, db), truth, plain):
        _assert_no_worse(name, f, t, p, dtype)
    assert torch.all(out[labels == -100] == 0) and torch.all(dh[labels == -100] == 0)


@pytest.mark.triton
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_triton_deterministic_backward_matches_atomic_and_repeats_bitwise(softcap):
    hidden, weight, bias, labels, upstream = _linear_case(29, 45, 301, torch.float32, seed=3)
    fast = _run_linear("triton", hidden, weight, bias, labels, upstream, softcap=softcap)
    det1 = _run_linear("triton", hidden, weight, bias, labels, upstream, softcap=softcap, deterministic=True)
    det2 = _run_linear("triton", hidden, weight, bias, labels, upstream, softcap=softcap, deterministic=True)
    for a, b, c in zip(fast, det1, det2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert torch.equal(b, c)


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
def test_linear_all_rows_ignored_gives_zeros(impl):
    hidden, weight, bias, labels, upstream = _linear_case(19, 33, 131, torch.float32)
    labels[:] = -100
    out, dh, dw, db = _run_linear(impl, hidden, weight, bias, labels, upstream)
    assert torch.all(out == 0) and torch.all(dh == 0) and torch.all(dw == 0) and torch.all(db == 0)


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
def test_linear_without_bias_and_frozen_weight(impl):
    hidden, weight, _, labels, upstream = _linear_case(23, 35, 211, torch.float32, bias=False)
    h = hidden.clone().requires_grad_()
    out = rankloss.linear_token_logprobs(h, weight, labels, impl=impl)  # weight needs no gradient
    (out * upstream).sum().backward()
    h64 = hidden.double().requires_grad_()
    (ref.linear_token_logprobs(h64, weight.double(), labels) * upstream.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.triton
@settings(max_examples=8)
@given(
    N=st.integers(1, 40),
    D=st.integers(1, 50),
    V=st.integers(2, 300),
    seed=st.integers(0, 2**16),
    softcap=st.sampled_from([None, 3.0]),
    temperature=st.sampled_from([1.0, 0.6]),
    deterministic=st.booleans(),
)
def test_triton_linear_hypothesis_shapes(N, D, V, seed, softcap, temperature, deterministic):
    hidden, weight, bias, labels, upstream = _linear_case(N, D, V, torch.float32, seed=seed)
    kw = dict(softcap=softcap, temperature=temperature)
    fast = _run_linear("triton", hidden, weight, bias, labels, upstream, deterministic=deterministic, **kw)
    truth = _run_linear(
        "reference", hidden.double(), weight.double(), bias.double(), labels, upstream.double(), **kw
    )
    for f, t in zip(fast, truth):
        torch.testing.assert_close(f.double(), t, rtol=1e-4, atol=1e-5)


@pytest.mark.triton
@settings(max_examples=12)
@given(
    N=st.integers(1, 40),
    D=st.integers(1, 50),
    V=st.integers(2, 300),
    chunk=st.one_of(st.none(), st.integers(1, 130)),
    budget=st.sampled_from([None, 2000, 30000]),
    seed=st.integers(0, 2**16),
    softcap=st.sampled_from([None, 3.0]),
    temperature=st.sampled_from([1.0, 0.6]),
    bias=st.booleans(),
)
def test_cublas_linear_hypothesis_shapes_and_chunks(N, D, V, chunk, budget, seed, softcap, temperature, bias):
    # Vocabulary chunks of any width (1 column, not dividing V, wider than V) and row groups (a memory
    # budget of a few rows) against the float64 truth. The budget is read at each call.
    from rankloss.ops import _common

    hidden, weight, b, labels, upstream = _linear_case(N, D, V, torch.float32, seed=seed, bias=bias)
    kw = dict(softcap=softcap, temperature=temperature)
    saved = _common.VOCAB_CHUNK_BUDGET_BYTES
    _common.VOCAB_CHUNK_BUDGET_BYTES = budget or saved
    try:
        fast = _run_linear("cublas", hidden, weight, b, labels, upstream, chunk_size=chunk, **kw)
        again = _run_linear("cublas", hidden, weight, b, labels, upstream, chunk_size=chunk, **kw)
    finally:
        _common.VOCAB_CHUNK_BUDGET_BYTES = saved
    b64 = b.double() if b is not None else None
    truth = _run_linear("reference", hidden.double(), weight.double(), b64, labels, upstream.double(), **kw)
    for f, t in zip(fast, truth):
        if t is None:
            assert f is None
            continue
        torch.testing.assert_close(f.double(), t, rtol=1e-4, atol=1e-5)
    assert all(x is None and y is None or torch.equal(x, y) for x, y in zip(fast, again))  # no atomics


@pytest.mark.triton
@pytest.mark.parametrize(
    "impl, kw",
    [("cublas", {}), ("cublas", {"chunk_size": 7}), ("triton", {}), ("triton", {"deterministic": True})],
    ids=["cublas", "cublas-chunk7", "triton", "triton-deterministic"],
)
def test_linear_confident_target_keeps_its_bits(impl, kw):
    # p_y -> 1: log p(y) ~ -(V - 1) e^-30 and its gradient g (1 - p_y) must not round to 0. Both paths take
    # log p(y) = -log(1 + exp(lse_others - u_y)) in the forward and 1 - p_y = -expm1(log p(y)) for the
    # target entry of the backward; plain fp32 (u_y - lse, onehot - p) gives exactly 0 for both.
    V, D = 61, 3
    weight = torch.zeros(V, D)
    weight[5, 0] = 30.0
    hidden = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([5, 5])
    out, dh, dw, _ = _run_linear(impl, hidden, weight, None, labels, torch.ones(2), **kw)
    others = (V - 1) * torch.exp(torch.tensor(-30.0, dtype=torch.float64))
    exact_logp = -torch.log1p(others)
    torch.testing.assert_close(out.double(), exact_logp.expand(2), rtol=1e-5, atol=0)
    one_minus_p = others / (1 + others)
    # d weight[y] = g (1 - p_y) h and d hidden = g (1 - p_y) W_y (the other rows of W are 0): nonzero and
    # exact to float32 rounding.
    torch.testing.assert_close(dw[5, 0].double(), 2 * one_minus_p, rtol=1e-5, atol=0)
    torch.testing.assert_close(dh[:, 0].double(), (30 * one_minus_p).expand(2), rtol=1e-5, atol=0)


@pytest.mark.triton
@pytest.mark.parametrize("config", ["16-bit", "tf32", "ieee"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_triton_gpu_tile_configs_match_float64_reference(monkeypatch, config, deterministic):
    # The GPU launch configurations of the forward and the backward (per dtype: bf16/fp16, fp32 with
    # TF32, exact fp32; their resources are checked by tests/test_aot_report.py) run under the interpreter
    # on odd shapes that cross every tile boundary (D = 67 is not a multiple of 64, 32 or 16; V = 301
    # spans partial 64- and 128-wide tiles; N = 37 is one partial 128-row block).
    from rankloss.kernels import linear_token_logprobs as kernels

    drop = ("num_warps", "maxnreg")
    blocks = {k: v for k, v in kernels.GPU_BLOCKS[config].items() if k not in drop}
    fwd_blocks = {k: v for k, v in kernels.GPU_FWD_BLOCKS[config].items() if k not in drop}
    monkeypatch.setattr(
        kernels, "_blocks", lambda device, dtype, forward=False: dict(fwd_blocks if forward else blocks)
    )
    hidden, weight, bias, labels, upstream = _linear_case(37, 67, 301, torch.float32, seed=5)
    kw = dict(softcap=4.0, temperature=0.8)
    fast = _run_linear("triton", hidden, weight, bias, labels, upstream, deterministic=deterministic, **kw)
    truth = _run_linear(
        "reference", hidden.double(), weight.double(), bias.double(), labels, upstream.double(), **kw
    )
    for f, t in zip(fast, truth):
        torch.testing.assert_close(f.double(), t, rtol=1e-4, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunks", [0, 2, 100, "N*V*4"], ids=["no-cache", "2-chunks", "all-chunks", "exact"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_cublas_logit_cache_gives_the_recomputed_gradients(dtype, chunks, bias):
    # cache_bytes keeps the forward's first chunks (fp32 raw logits of all rows) for the backward, which
    # reads them instead of recomputing: the same arithmetic on the same chunks, so the same bits; the
    # cache stays intact for a second backward (retain_graph).
    from rankloss.ops import _common

    N, D, V, columns = 29, 24, 301, 37
    hidden, weight, b, labels, upstream = _linear_case(N, D, V, dtype, seed=4, bias=bias)
    if chunks == "N*V*4":  # every chunk, the last (301 = 8 x 37 + 5) as narrow as it is
        cache_bytes, expected = N * V * 4, V
    else:
        cache_bytes, expected = chunks * N * columns * 4 + 3, min(V, chunks * columns)  # whole chunks
    assert _common.cublas_cached_columns(N, V, D, dtype, cache_bytes, columns) == expected
    kw = dict(softcap=5.0, temperature=0.9, chunk_size=columns)
    ref = _run_linear("cublas", hidden, weight, b, labels, upstream, **kw)
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    bb = b.detach().clone().requires_grad_() if b is not None else None
    out = rankloss.linear_token_logprobs(h, w, labels, bias=bb, impl="cublas", cache_bytes=cache_bytes, **kw)
    (out * upstream).sum().backward(retain_graph=True)
    first = (out.detach(), h.grad.clone(), w.grad.clone(), bb.grad.clone() if bb is not None else None)
    for x, y in zip(first, ref):
        assert x is None and y is None or torch.equal(x, y)
    h.grad = w.grad = None
    if bb is not None:
        bb.grad = None
    (out * upstream).sum().backward()
    second = (h.grad, w.grad, bb.grad if bb is not None else None)
    for x, y in zip(second, ref[1:]):
        assert x is None and y is None or torch.equal(x, y)
    if dtype == torch.float32:
        b64 = b.double() if b is not None else None
        opts = dict(softcap=5.0, temperature=0.9)
        truth = _run_linear(
            "reference", hidden.double(), weight.double(), b64, labels, upstream.double(), **opts
        )
        for f, t in zip(first, truth):
            if t is not None:
                torch.testing.assert_close(f.double(), t, rtol=1e-4, atol=1e-5)


@pytest.mark.triton
def test_cublas_logit_cache_op_is_well_formed():
    # The custom op with a cache: fake (meta) shapes, autograd registration and schema, as opcheck sees them.
    from rankloss.ops import _common

    hidden, weight, b, labels, _ = _linear_case(11, 16, 53, torch.float32, seed=2)
    h, w, bb = (t.clone().requires_grad_() for t in (hidden, weight, b))
    cache_bytes = 2 * 11 * 7 * 4
    assert _common.cublas_cached_columns(11, 53, 16, torch.float32, cache_bytes, 7) == 14
    logp, lse, cache = _linear_token_logprobs_fwd(
        h, w, labels, bb, -100, 1.0, None, "cublas", 7, False, 0.0, cache_bytes
    )
    assert cache.shape == (11 * 14,) and not cache.requires_grad
    torch.library.opcheck(
        _linear_token_logprobs_fwd, (h, w, labels, bb, -100, 1.0, None, "cublas", 7, False, 0.0, cache_bytes)
    )


def test_cache_bytes_is_checked():
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    for bad in (-1, 1.5, True, "1GB"):
        with pytest.raises(ValueError, match="cache_bytes must be None or an int >= 0"):
            rankloss.linear_token_logprobs(h, w, y, cache_bytes=bad)
    # The other paths keep nothing: the same result with or without a cache.
    torch.testing.assert_close(
        rankloss.linear_token_logprobs(h, w, y, impl="torch", cache_bytes=10**6),
        rankloss.linear_token_logprobs(h, w, y, impl="torch"),
    )


@pytest.mark.triton
def test_cublas_logit_cache_is_kept_only_for_a_backward(monkeypatch):
    # No gradient (no_grad, or no input that requires one): the forward keeps nothing.
    from rankloss import logprobs as logprobs_module
    from rankloss.ops import linear_token_logprobs as op_module

    seen = []
    real = op_module.linear_token_logprobs_op
    monkeypatch.setattr(
        logprobs_module, "linear_token_logprobs_op", lambda *a: seen.append(a[11]) or real(*a)
    )
    h, w, y = torch.randn(5, 8), torch.randn(13, 8), torch.randint(0, 13, (5,))
    rankloss.linear_token_logprobs(h, w, y, impl="cublas", cache_bytes=10**6)
    with torch.no_grad():
        rankloss.linear_token_logprobs(h, w.requires_grad_(), y, impl="cublas", cache_bytes=10**6)
    rankloss.linear_token_logprobs(h, w, y, impl="cublas", cache_bytes=10**6)
    assert seen == [0, 0, 10**6]


@pytest.mark.triton
@pytest.mark.parametrize("config", ["interpreter", "16-bit", "tf32"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_tma_weight_loads_match_float64_reference(monkeypatch, config, deterministic):
    # TMA_WEIGHT: the weight tiles come through a tensor descriptor (zero-filled past V and D) in the
    # forward, the atomic backward and both deterministic kernels. D = 72 is a multiple of neither 64 nor
    # 32 (the last slice of D is partial), V = 301 ends in a partial tile, N = 37 in a partial row block.
    from rankloss.kernels import linear_token_logprobs as kernels

    monkeypatch.setattr(kernels, "TMA_WEIGHT", True)
    if config != "interpreter":
        drop = ("num_warps", "maxnreg")
        blocks = {k: v for k, v in kernels.GPU_BLOCKS[config].items() if k not in drop}
        fwd_blocks = {k: v for k, v in kernels.GPU_FWD_BLOCKS[config].items() if k not in drop}
        monkeypatch.setattr(
            kernels, "_blocks", lambda device, dtype, forward=False: dict(fwd_blocks if forward else blocks)
        )
    used = []
    real = kernels._weight_operand
    monkeypatch.setattr(kernels, "_weight_operand", lambda w, b: used.append(real(w, b)[1]) or real(w, b))
    hidden, weight, bias, labels, upstream = _linear_case(37, 72, 301, torch.float32, seed=9)
    kw = dict(softcap=4.0, temperature=0.8, filter_eps=None)
    fast = _run_linear("triton", hidden, weight, bias, labels, upstream, deterministic=deterministic, **kw)
    assert used == [True, True]  # forward and backward
    kw.pop("filter_eps")
    truth = _run_linear(
        "reference", hidden.double(), weight.double(), bias.double(), labels, upstream.double(), **kw
    )
    for f, t in zip(fast, truth):
        torch.testing.assert_close(f.double(), t, rtol=1e-4, atol=1e-5)


@pytest.mark.triton
def test_tma_weight_loads_fall_back_where_tma_cannot_go(monkeypatch):
    # TMA needs 16-byte aligned rows and a unit inner stride; exact fp32 (CUDA cores) never uses it.
    from rankloss.kernels import linear_token_logprobs as kernels

    monkeypatch.setattr(kernels, "TMA_WEIGHT", True)
    blocks = dict(BLOCK_V=64, BLOCK_D=32)
    assert kernels._weight_operand(torch.zeros(10, 8), blocks)[1] is True
    assert kernels._weight_operand(torch.zeros(10, 7), blocks)[1] is False  # 28-byte rows
    assert kernels._weight_operand(torch.zeros(8, 10).T, blocks)[1] is False  # column-major
    assert kernels._weight_operand(torch.zeros(10, 9)[:, 1:], blocks)[1] is False  # 36-byte row stride
    assert kernels._weight_operand(torch.zeros(10, 4), blocks)[1] is True  # 16-byte rows
    monkeypatch.setattr(kernels, "TMA_WEIGHT", False)
    assert kernels._weight_operand(torch.zeros(10, 8), blocks)[1] is False


@pytest.mark.parametrize("env", ["0", "1"])
def test_cublas_path_errors_name_the_problem(monkeypatch, env):
    monkeypatch.setenv("TRITON_INTERPRET", env)
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    if env == "0":
        with pytest.raises(ValueError, match="impl='cublas'.*TRITON_INTERPRET=1"):
            rankloss.linear_token_logprobs(h, w, y, impl="cublas")
    with pytest.raises(TypeError, match="impl='cublas'.*float64"):
        rankloss.linear_token_logprobs(h.double(), w.double(), y, impl="cublas")
    with pytest.raises(ValueError, match="impl must be"):
        rankloss.token_logprobs(torch.randn(3, 5), y, impl="cublas")  # logits in hand: no product to chunk


def test_cublas_chunk_plan_stays_within_its_budget():
    bf16, fp32 = torch.bfloat16, torch.float32
    MiB = 2**20
    assert VOCAB_CHUNK_BUDGET_BYTES == 240 * MiB  # 252 MB: the [N] vectors fit beside it in 256 MB
    # The shape: the forward holds one 3840-column fp32 chunk of all rows; the backward two groups
    # of 8192 rows (a 128 MiB fp32 d-hidden accumulator) with 2304-column chunks of logits and their bf16
    # gradient.
    assert cublas_chunk_plan(16384, 152064, 4096, bf16) == ChunkPlan(16384, 3840, 240 * MiB)
    bwd = cublas_chunk_plan(16384, 152064, 4096, bf16, backward=True)
    assert (bwd.rows, bwd.columns, bwd.groups(16384)) == (8192, 2304, 2)
    assert bwd.bytes == 8192 * 4096 * 4 + 8192 * 2304 * 6 == 236 * MiB
    # fp32: d hidden accumulates in the returned gradient and dA overwrites the logits: one group.
    assert cublas_chunk_plan(16384, 152064, 4096, fp32, backward=True) == ChunkPlan(16384, 3840, 240 * MiB)
    assert cublas_chunk_plan(37, 1031, 33, bf16, backward=True).columns == 1031  # one chunk
    assert default_vocab_chunk(16384, 152064) == 3840 and default_vocab_chunk(8192, 152064) == 7680
    assert cublas_chunk_plan(10, 1031, 33, bf16, columns=7).columns == 7  # the user's width wins
    # Without d weight the groups cost nothing and are not capped; with it at most MAX_ROW_GROUPS, past
    # which the budget gives way (each group after the first rounds d weight once more).
    frozen = cublas_chunk_plan(65536, 128256, 8192, bf16, backward=True, needs_weight=False)
    assert frozen.groups(65536) == 11 and frozen.columns == 1536 and frozen.bytes <= 240 * MiB
    capped = cublas_chunk_plan(65536, 128256, 8192, bf16, backward=True)
    assert capped.groups(65536) == MAX_ROW_GROUPS and capped.columns == 256 and capped.bytes > 240 * MiB
    for N in (1, 1000, 4096, 65536, 10**7):
        for kw in (dict(), dict(backward=True), dict(backward=True, needs_hidden=False)):
            plan = cublas_chunk_plan(N, 152064, 4096, bf16, **kw)
            assert 256 <= plan.columns <= 152064 and plan.groups(N) * plan.rows >= N
            assert plan.bytes <= 240 * MiB or plan.columns == 256


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "needs", [(True, True, True), (True, False, False), (False, True, True)], ids=["all", "hidden", "weight"]
)
@pytest.mark.parametrize("columns", [0, 37], ids=["planned-columns", "37-columns"])
def test_cublas_row_groups_match_float64_reference(dtype, needs, columns):
    # A budget small enough that the planner splits N = 53 rows into groups (the last one shorter); the
    # group's buffers are reused by every chunk, d weight adds up over the groups, d bias too.
    from rankloss.ops import linear_token_logprobs as ops

    N, D, V = 53, 19, 301
    needs_hidden, needs_weight, needs_bias = needs
    budget = 16 * (4 * D + 256 * 6)  # 11-21 rows, by dtype and gradients
    plan = cublas_chunk_plan(
        N, V, D, dtype, backward=True, needs_hidden=needs_hidden, needs_weight=needs_weight,
        columns=columns or None, budget=budget,
    )  # fmt: skip
    assert plan.groups(N) >= 3 and plan.rows * plan.groups(N) > N
    fwd_plan = cublas_chunk_plan(N, V, D, dtype, columns=columns or None, budget=1000 * 4)
    assert fwd_plan.groups(N) >= 3
    hidden, weight, bias, labels, upstream = _linear_case(N, D, V, dtype, seed=11)
    options = dict(softcap=5.0, temperature=0.8)
    truth = _run_linear(
        "reference", hidden.double(), weight.double(), bias.double(), labels, upstream.double(), **options
    )
    plain = _plain(hidden, weight, bias, labels, upstream, **options)
    args = (labels, bias, -100, options["temperature"], options["softcap"], columns)
    logp, lse, _ = ops.linear_token_logprobs_cublas_forward(hidden, weight, *args, budget=1000 * 4)
    # Rows are independent in the forward: the same chunks in one group give the same values, to the
    # rounding of the GEMM (not always the same bits: a CPU BLAS may pick another micro-kernel for another
    # number of rows; AVX-512 MKL does, 1-2 float32 ulps on ~17% of the rows, where AVX2 gave equal bits).
    one_logp, one_lse, _ = ops.linear_token_logprobs_cublas_forward(
        hidden, weight, *args[:-1], fwd_plan.columns
    )
    ulps = 4 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(logp, one_logp, rtol=ulps, atol=ulps * float(one_logp.abs().max()))
    torch.testing.assert_close(lse, one_lse, rtol=ulps, atol=ulps * float(one_lse.abs().max()))
    grads = ops.linear_token_logprobs_cublas_backward(
        upstream, hidden, weight, labels, bias, logp, lse, -100, options["temperature"], options["softcap"],
        columns, needs_hidden, needs_weight, needs_bias, budget=budget,
    )  # fmt: skip
    _assert_no_worse("logp", logp, truth[0], plain[0], dtype)
    for name, got, t, p, needed in zip(
        ("d hidden", "d weight", "d bias"), grads, truth[1:], plain[1:], needs
    ):
        if not needed:
            assert got is None
            continue
        assert got.dtype == dtype and got.shape == t.shape
        _assert_no_worse(name, got, t, p, dtype)
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), t, rtol=1e-4, atol=1e-5)
    again = ops.linear_token_logprobs_cublas_backward(
        upstream, hidden, weight, labels, bias, logp, lse, -100, options["temperature"], options["softcap"],
        columns, needs_hidden, needs_weight, needs_bias, budget=budget,
    )  # fmt: skip
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(grads, again))


@settings(max_examples=15)
@given(
    N=st.integers(1, 60),
    D=st.integers(1, 40),
    V=st.integers(2, 200),
    chunk=st.integers(1, 70),
    seed=st.integers(0, 2**16),
    softcap=st.sampled_from([None, 2.5]),
)
def test_torch_linear_hypothesis_chunking(N, D, V, chunk, seed, softcap):
    hidden, weight, bias, labels, upstream = _linear_case(N, D, V, torch.float64, seed=seed)
    fast = _run_linear("torch", hidden, weight, bias, labels, upstream, chunk_size=chunk, softcap=softcap)
    truth = _run_linear("reference", hidden, weight, bias, labels, upstream, softcap=softcap)
    for f, t in zip(fast, truth):
        torch.testing.assert_close(f, t, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# Log-probs from logits
# --------------------------------------------------------------------------------------------------
def _run_logits(impl, logits, labels, upstream, **kw):
    z = logits.detach().clone().requires_grad_()
    out = rankloss.token_logprobs(z, labels, impl=impl, **kw)
    (out * upstream).sum().backward()
    return out.detach(), z.grad


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.45])
def test_token_logprobs_matches_float64_reference(impl, dtype, temperature):
    g = torch.Generator().manual_seed(1)
    S, T, V = 3, 13, 1031
    logits = (torch.randn(S, T, V, generator=g) * 4).to(dtype)
    labels = torch.randint(0, V, (S, T), generator=g)
    labels[0, :5] = -100
    upstream = torch.randn(S, T, generator=g)
    out, grad = _run_logits(impl, logits, labels, upstream, temperature=temperature)
    assert out.dtype == torch.float32 and out.shape == (S, T) and grad.dtype == dtype
    truth = _run_logits("reference", logits.double(), labels, upstream.double(), temperature=temperature)
    z = logits.detach().clone().requires_grad_()
    lp = torch.log_softmax(z / temperature, dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    lp = torch.where(labels != -100, lp, 0)
    (lp * upstream.to(dtype)).sum().backward()
    for name, f, t, p in zip(("logp", "d logits"), (out, grad), truth, (lp.detach(), z.grad)):
        _assert_no_worse(name, f, t, p, dtype)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_token_logprobs_confident_target_keeps_its_gradient_bits(impl):
    # softmax -> 1 at the target: g * (1 - p_y) must not round to 0, so it is computed as the sum of the
    # other probabilities. (Autograd through log_softmax loses it even in float64: 1 - p_y cancels.)
    V = 97
    logits = torch.zeros(2, V)
    logits[:, 5] = 30.0
    labels = torch.tensor([5, 5])
    _, grad = _run_logits(impl, logits, labels, torch.ones(2))
    others = (V - 1) * torch.exp(torch.tensor(-30.0, dtype=torch.float64))
    exact = others / (1 + others)  # 1 - p_y, exactly
    torch.testing.assert_close(grad[:, 5].double(), exact.expand(2), rtol=1e-5, atol=0)
    _, autograd_grad = _run_logits("reference", logits, labels, torch.ones(2))
    assert torch.all(autograd_grad[:, 5] == 0)  # what plain fp32 autograd gives


# --------------------------------------------------------------------------------------------------
# Memory: the chunked path never holds more than one chunk of logits
# --------------------------------------------------------------------------------------------------
def test_torch_path_extra_memory_is_one_chunk_of_logits(largest_tensor):
    N, D, V, chunk = 300, 24, 500, 32
    hidden, weight, bias, labels, upstream = _linear_case(N, D, V, torch.float32, ignore_frac=0.0)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with largest_tensor() as probe:
        out = rankloss.linear_token_logprobs(h, w, labels, bias=bias, impl="torch", chunk_size=chunk)
        (out * upstream).sum().backward()
    assert probe.largest <= max(chunk * V, V * D, N * D), probe.largest
    with largest_tensor() as naive:
        rankloss.linear_token_logprobs(hidden, weight, labels, bias=bias, impl="reference")
    assert naive.largest >= N * V  # the probe does see full logits when they are built


def test_default_chunk_size_follows_vocabulary():
    assert default_chunk_size(32000, 512) == 256
    assert default_chunk_size(152064, 4096) == 32
    assert default_chunk_size(10, 10) == 4096
    for V in (1000, 32000, 152064, 256000):
        c = default_chunk_size(V, 4096)
        assert 16 <= c <= 4096 and c * (V + 4096) * 4 <= 32 * 2**20 or c == 16


# --------------------------------------------------------------------------------------------------
# Dispatch, autocast, torch.library and torch.compile
# --------------------------------------------------------------------------------------------------
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        rankloss.linear_token_logprobs(
            torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), impl="triton"
        )


def test_triton_rejects_float64_with_a_clear_error():
    with pytest.raises(TypeError, match="float64"):
        rankloss.token_logprobs(
            torch.randn(3, 5, dtype=torch.float64), torch.zeros(3, dtype=torch.long), impl="triton"
        )


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_chunk_size_is_validated(bad):
    with pytest.raises((TypeError, ValueError), match="chunk_size"):
        rankloss.token_logprobs(
            torch.randn(3, 5), torch.zeros(3, dtype=torch.long), impl="torch", chunk_size=bad
        )


def test_autocast_casts_inputs_like_f_linear():
    hidden, weight, bias, labels, upstream = _linear_case(21, 32, 97, torch.float32)
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rankloss.linear_token_logprobs(hidden, w, labels, bias=bias, impl="torch")
    (out * upstream).sum().backward()
    assert out.dtype == torch.float32 and w.grad.dtype == torch.float32
    expected = rankloss.linear_token_logprobs(
        hidden.bfloat16(), weight.bfloat16(), labels, bias=bias.bfloat16(), impl="torch"
    )
    torch.testing.assert_close(out, expected)


def test_mixed_input_dtypes_are_promoted():
    hidden, weight, bias, labels, _ = _linear_case(9, 16, 41, torch.float32)
    out = rankloss.linear_token_logprobs(hidden.bfloat16(), weight, labels, bias=bias, impl="torch")
    expected = rankloss.linear_token_logprobs(
        hidden.bfloat16().float(), weight, labels, bias=bias, impl="torch"
    )
    torch.testing.assert_close(out, expected)


def test_opcheck_linear_and_logits_ops():
    hidden, weight, bias, labels, _ = _linear_case(11, 16, 37, torch.float32)
    h, w, b = (t.requires_grad_() for t in (hidden, weight, bias))
    torch.library.opcheck(
        _linear_token_logprobs_fwd, (h, w, labels, b, -100, 1.0, None, "torch", 4, False, 0.0, 0)
    )
    torch.library.opcheck(
        _linear_token_logprobs_fwd, (h, w, labels, None, -100, 0.5, 3.0, "torch", 64, False, 0.0, 0)
    )
    z = torch.randn(11, 37, requires_grad=True)
    torch.library.opcheck(_token_logprobs_fwd, (z, labels, -100, 1.3, "torch", 4))


@pytest.mark.slow
def test_torch_compile_fullgraph_on_cpu():
    hidden, weight, bias, labels, _ = _linear_case(2 * 13, 16, 37, torch.float32)
    labels = labels.view(2, 13)

    def scores(h, w, b, z):
        lp = rankloss.linear_token_logprobs(h.view(2, 13, 16), w, labels, bias=b, impl="torch")
        lz = rankloss.token_logprobs(z, labels, impl="torch")
        return rankloss.sequence_logprobs(lp + lz, labels, length_normalize=True)

    z = torch.randn(2, 13, 37)
    args = [t.clone().requires_grad_() for t in (hidden, weight, bias, z)]
    eager_args = [t.clone().requires_grad_() for t in (hidden, weight, bias, z)]
    compiled = torch.compile(scores, fullgraph=True)
    out = compiled(*args)
    eager = scores(*eager_args)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    eager.sum().backward()
    for a, e in zip(args, eager_args):
        torch.testing.assert_close(a.grad, e.grad)


# --------------------------------------------------------------------------------------------------
# External check: a transformers causal LM's own loss
# --------------------------------------------------------------------------------------------------
def test_matches_a_transformers_causal_lm_loss():
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(
        vocab_size=211,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    input_ids = torch.randint(0, 211, (3, 17))
    hf_labels = input_ids.clone()
    hf_labels[:, :4] = -100  # a prompt
    hf_labels[2, 12:] = -100  # padding
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=hf_labels, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    labels = rankloss.shift_labels(hf_labels)
    for impl in ("torch", "reference"):
        logp = rankloss.linear_token_logprobs(hidden, model.lm_head.weight, labels, impl=impl)
        ours = -logp.sum() / (labels != -100).sum()
        torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Labels outside [0, V) when value checks are off (the default on CUDA): never an out-of-bounds read or
# write, and a NaN log-prob instead of a plausible number. (CPU tensors are always value-checked, so the
# tests switch the check off as it is off for CUDA tensors.)
# --------------------------------------------------------------------------------------------------
def _no_value_checks(monkeypatch):
    import rankloss._validation as validation

    monkeypatch.setattr(validation, "values_checkable", lambda t: False)


@pytest.mark.triton
def test_token_logprobs_out_of_range_label_touches_nothing_else(monkeypatch):
    _no_value_checks(monkeypatch)
    V = 37
    logits = torch.randn(3, V)
    labels = torch.tensor([4, -1, V + 5])  # ignore_index is -100: -1 and V + 5 are bad labels
    z = logits.clone().requires_grad_()
    out = rankloss.token_logprobs(z, labels, impl="triton")
    assert torch.isfinite(out[0]) and torch.isnan(out[1]) and torch.isnan(out[2])
    out[0].backward()
    # Row 0's gradient is intact (a label of -1 in row 1 used to write at row 1's offset - 1).
    expected = -torch.softmax(logits[0], dim=0)
    expected[4] += 1
    torch.testing.assert_close(z.grad[0], expected, rtol=1e-5, atol=1e-6)
    assert torch.all(z.grad[1:] == 0)


@pytest.mark.triton
@pytest.mark.parametrize("impl", ["triton", "cublas"])
def test_linear_out_of_range_label_gives_nan_not_minus_lse(monkeypatch, impl):
    _no_value_checks(monkeypatch)
    hidden, weight, _, _, _ = _linear_case(4, 9, 53, torch.float32, bias=False)
    labels = torch.tensor([3, -1, 53, -100])
    out = rankloss.linear_token_logprobs(hidden, weight, labels, impl=impl)
    assert torch.isfinite(out[0]) and torch.isnan(out[1]) and torch.isnan(out[2]) and out[3] == 0


@pytest.mark.triton
def test_token_logprobs_target_in_the_last_tile_is_written_once():
    # The backward used to write the target column twice (0 inside the tile loop, then the exact value
    # from another thread with no barrier between): a race on a GPU. Now only the final store writes it;
    # check the value for targets in the last, partial tile, repeatedly and bitwise.
    V = 1000  # interpreter tiles of 1024: one partial tile; on a GPU 4096-wide tiles
    logits = torch.randn(4, V)
    labels = torch.tensor([V - 1, V - 2, 0, 517])
    grads = []
    for _ in range(3):
        z = logits.clone().requires_grad_()
        rankloss.token_logprobs(z, labels, impl="triton").sum().backward()
        grads.append(z.grad)
    p = torch.softmax(logits.double(), dim=1)
    expected = -p
    expected[torch.arange(4), labels] += 1
    torch.testing.assert_close(grads[0].double(), expected, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
