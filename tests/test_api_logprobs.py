"""Public log-prob ops (rankloss.token_logprobs, linear_token_logprobs, sequence_logprobs, shift_labels).

Checked against plain PyTorch and the reference: float64 gradient checks of every option through the
public API, the float32/bfloat16/float16 dtype contract (DESIGN.md §3), Hugging Face label shifting,
padded vs packed sequence scores, and the module wrappers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from rankloss.reference import logprobs as R
from torch.autograd import gradcheck

import rankloss

F64 = torch.float64
IGNORE = -100

seed_st = st.integers(0, 2**31 - 1)
lead_st = st.one_of(st.tuples(st.integers(1, 13)), st.tuples(st.integers(1, 4), st.integers(1, 9)))


def make_labels(
    lead: tuple[int, ...], V: int, g: torch.Generator, ignore_index: int = IGNORE
) -> torch.Tensor:
    labels = torch.randint(0, V, lead, generator=g)
    mask = torch.rand(lead, generator=g) < 0.3
    return torch.where(mask, torch.full_like(labels, ignore_index), labels)


def plain_logprobs(z: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """``-cross_entropy(reduction="none")``: ``log_softmax(z)[y]``, 0 where ``y == ignore_index``."""
    V = z.shape[-1]
    out = -F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), reduction="none", ignore_index=ignore_index)
    return out.view(labels.shape)


def plain_linear_logits(hidden, weight, bias=None, softcap=None, temperature=1.0):
    """Soft-cap first, then temperature, as documented."""
    z = F.linear(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------
@settings(max_examples=15)
@given(
    lead=lead_st,
    V=st.integers(2, 41),
    seed=seed_st,
    temperature=st.sampled_from([1.0, 0.7, 3.0]),
    ignore_index=st.sampled_from([IGNORE, -1]),
)
def test_token_logprobs_matches_plain_and_reference(lead, V, seed, temperature, ignore_index):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(*lead, V, generator=g, dtype=F64)
    labels = make_labels(lead, V, g, ignore_index)
    got = rankloss.token_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature)
    expected = plain_logprobs(logits / temperature, labels, ignore_index)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    ref = R.token_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=15)
@given(
    lead=lead_st,
    V=st.integers(2, 41),
    D=st.integers(1, 13),
    seed=seed_st,
    with_bias=st.booleans(),
    softcap=st.sampled_from([None, 0.8, 4.0]),
    temperature=st.sampled_from([1.0, 0.6, 2.0]),
)
def test_linear_token_logprobs_matches_plain(lead, V, D, seed, with_bias, softcap, temperature):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, D, generator=g, dtype=F64)
    weight = torch.randn(V, D, generator=g, dtype=F64)
    bias = torch.randn(V, generator=g, dtype=F64) if with_bias else None
    labels = make_labels(lead, V, g)
    got = rankloss.linear_token_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap
    )
    expected = plain_logprobs(plain_linear_logits(hidden, weight, bias, softcap, temperature), labels)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_linear_equals_token_logprobs_of_the_logits():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(3, 4, 8, generator=g, dtype=F64), torch.randn(19, 8, generator=g, dtype=F64)
    labels = make_labels((3, 4), 19, g)
    a = rankloss.linear_token_logprobs(hidden, weight, labels, temperature=1.3)
    b = rankloss.token_logprobs(hidden @ weight.T, labels, temperature=1.3)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ignore_index", [-100, -1, 0, 6, 7, 1000, 2**31 - 1])
def test_any_ignore_index(ignore_index):
    """ignore_index may be any int: negative, inside the vocabulary, or beyond it (V = 7 here)."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(5, 4, 7, generator=g, dtype=F64, requires_grad=True)
    labels = make_labels((5, 4), 7, g, ignore_index)
    out = rankloss.token_logprobs(logits, labels, ignore_index=ignore_index)
    torch.testing.assert_close(out, plain_logprobs(logits, labels, ignore_index), rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert bool((grad[labels == ignore_index] == 0).all())
    hidden, weight = torch.randn(5, 4, 3, generator=g, dtype=F64), torch.randn(7, 3, generator=g, dtype=F64)
    out = rankloss.linear_token_logprobs(hidden, weight, labels, ignore_index=ignore_index)
    expected = plain_logprobs(hidden @ weight.T, labels, ignore_index)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# Any integer dtype that can hold ignore_index (uint8 cannot hold the default -100: tests/test_bad_inputs.py).
@pytest.mark.parametrize("dtype, ignore_index", [(torch.int32, -100), (torch.int8, -100), (torch.uint8, 255)])
def test_integer_label_dtypes_accepted(dtype, ignore_index):
    logits = torch.randn(4, 7, dtype=F64)
    labels = torch.tensor([0, 6, ignore_index, 2])
    expected = rankloss.token_logprobs(logits, labels, ignore_index=ignore_index)
    torch.testing.assert_close(
        rankloss.token_logprobs(logits, labels.to(dtype), ignore_index=ignore_index), expected
    )
    hidden, weight = torch.randn(4, 3, dtype=F64), torch.randn(7, 3, dtype=F64)
    torch.testing.assert_close(
        rankloss.linear_token_logprobs(hidden, weight, labels.to(dtype), ignore_index=ignore_index),
        rankloss.linear_token_logprobs(hidden, weight, labels, ignore_index=ignore_index),
    )


# --------------------------------------------------------------------------------------------------
# Gradient checks through the public API (float64)
# --------------------------------------------------------------------------------------------------
@settings(max_examples=6)
@given(
    lead=lead_st,
    V=st.integers(2, 9),
    seed=seed_st,
    temperature=st.sampled_from([1.0, 0.7]),
    ignore_index=st.sampled_from([IGNORE, 0]),
)
def test_gradcheck_token_logprobs(lead, V, seed, temperature, ignore_index):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*lead, V, generator=g, dtype=F64).requires_grad_()
    labels = make_labels(lead, V, g, ignore_index)
    fn = lambda z: rankloss.token_logprobs(z, labels, ignore_index=ignore_index, temperature=temperature)
    assert gradcheck(fn, (logits,))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@settings(max_examples=3)
@given(lead=lead_st, V=st.integers(2, 9), D=st.integers(1, 5), seed=seed_st)
def test_gradcheck_linear_token_logprobs(with_bias, softcap, temperature, lead, V, D, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, D, generator=g, dtype=F64).requires_grad_()
    weight = torch.randn(V, D, generator=g, dtype=F64).requires_grad_()
    bias = torch.randn(V, generator=g, dtype=F64).requires_grad_()
    labels = make_labels(lead, V, g)

    def fn(h, w, *b):
        return rankloss.linear_token_logprobs(
            h, w, labels, bias=b[0] if b else None, temperature=temperature, softcap=softcap
        )

    assert gradcheck(fn, (hidden, weight, bias) if with_bias else (hidden, weight))


# --------------------------------------------------------------------------------------------------
# Dtype contract
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_contract(dtype):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 5, 24, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(67, 24, generator=g) / 5).to(dtype).requires_grad_()
    bias = (torch.randn(67, generator=g) / 5).to(dtype).requires_grad_()
    labels = make_labels((3, 5), 67, g)
    out = rankloss.linear_token_logprobs(hidden, weight, labels, bias=bias, softcap=2.0, temperature=0.8)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    upstream = torch.randn(out.shape, generator=g)
    out.backward(upstream)
    assert hidden.grad.dtype == weight.grad.dtype == bias.grad.dtype == dtype

    # error against float64 truth (on the same rounded inputs) no worse than plain PyTorch in fp32
    h, w, b = (t.detach().to(F64).requires_grad_() for t in (hidden, weight, bias))
    truth = plain_logprobs(plain_linear_logits(h, w, b, 2.0, 0.8), labels)
    truth.backward(upstream.to(F64))
    h32, w32, b32 = (t.detach().float() for t in (hidden, weight, bias))
    plain32 = plain_logprobs(plain_linear_logits(h32, w32, b32, 2.0, 0.8), labels)
    err = (out.detach().to(F64) - truth).abs().max().item()
    plain_err = (plain32.to(F64) - truth.detach()).abs().max().item()
    assert err <= 2 * plain_err + 1e-6, (err, plain_err)
    # gradients: compared in the input dtype's own precision
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(hidden.grad.to(F64), h.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(weight.grad.to(F64), w.grad, rtol=tol, atol=tol)

    logits = (torch.randn(4, 6, 31, generator=g) * 2).to(dtype).requires_grad_()
    lab = make_labels((4, 6), 31, g)
    out = rankloss.token_logprobs(logits, lab, temperature=1.5)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(
        out.to(F64), plain_logprobs(logits.detach().to(F64) / 1.5, lab), rtol=1e-5, atol=1e-5
    )


# --------------------------------------------------------------------------------------------------
# shift_labels and sequence scores
# --------------------------------------------------------------------------------------------------
def test_shift_labels():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, 7], [IGNORE, 1, 2, IGNORE, IGNORE]])
    shifted = rankloss.shift_labels(labels)
    expected = torch.tensor([[IGNORE, 5, 6, 7, IGNORE], [1, 2, IGNORE, IGNORE, IGNORE]])
    assert torch.equal(shifted, expected) and shifted.dtype == labels.dtype
    assert torch.equal(rankloss.shift_labels(labels[0]), expected[0])  # 1-D works too
    assert torch.equal(
        rankloss.shift_labels(torch.tensor([3, 4, 5]), ignore_index=-1), torch.tensor([4, 5, -1])
    )
    assert torch.equal(labels[0], torch.tensor([IGNORE, IGNORE, 5, 6, 7]))  # input not modified


def test_shift_labels_matches_hugging_face_convention():
    """Scores with shifted labels equal HF's causal-LM loss: logits[:, :-1] predict labels[:, 1:]."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 8, 23, generator=g, dtype=F64)
    labels = make_labels((3, 8), 23, g)
    scores = rankloss.sequence_logprobs(
        rankloss.token_logprobs(logits, rankloss.shift_labels(labels)), rankloss.shift_labels(labels)
    )
    hf = -F.cross_entropy(
        logits[:, :-1].reshape(-1, 23), labels[:, 1:].reshape(-1), reduction="none", ignore_index=IGNORE
    ).view(3, 7)
    torch.testing.assert_close(scores, hf.sum(-1), rtol=1e-12, atol=1e-12)


@settings(max_examples=15)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=7), seed=seed_st, length_normalize=st.booleans()
)
def test_sequence_logprobs_padded_and_packed_agree(lengths, seed, length_normalize):
    g = torch.Generator().manual_seed(seed)
    S, T, D, V = len(lengths), max(max(lengths), 1), 6, 17
    hidden = torch.randn(S, T, D, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(V, D, generator=g, dtype=F64)
    labels = torch.full((S, T), IGNORE)
    for i, n in enumerate(lengths):
        labels[i, :n] = torch.randint(0, V, (n,), generator=g)
    labels[torch.rand(S, T, generator=g) < 0.2] = IGNORE

    padded = rankloss.sequence_logprobs(
        rankloss.linear_token_logprobs(hidden, weight, labels), labels, length_normalize=length_normalize
    )
    keep = [torch.arange(n) for n in lengths]
    packed_hidden = torch.cat([hidden[i, k] for i, k in enumerate(keep)])
    packed_labels = torch.cat([labels[i, k] for i, k in enumerate(keep)])
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    packed = rankloss.sequence_logprobs(
        rankloss.linear_token_logprobs(packed_hidden, weight, packed_labels),
        packed_labels,
        length_normalize=length_normalize,
        cu_seqlens=cu_seqlens,
    )
    assert padded.shape == packed.shape == (S,)
    torch.testing.assert_close(padded, packed, rtol=1e-12, atol=1e-12)
    (g_pad,) = torch.autograd.grad(padded.sum(), hidden)
    (g_pack,) = torch.autograd.grad(packed.sum(), hidden)
    torch.testing.assert_close(g_pad, g_pack, rtol=1e-12, atol=1e-12)


def test_sequence_logprobs_values():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, -9.0, -9.0]], dtype=F64)
    labels = torch.tensor([[IGNORE, 1, 2, 3], [4, 4, IGNORE, IGNORE]])
    out = rankloss.sequence_logprobs(token_logps, labels)
    torch.testing.assert_close(out, torch.tensor([-9.0, -1.0], dtype=F64))
    out = rankloss.sequence_logprobs(token_logps, labels, length_normalize=True)
    torch.testing.assert_close(out, torch.tensor([-3.0, -0.5], dtype=F64))
    out = rankloss.sequence_logprobs(token_logps.float(), labels)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("length_normalize", [False, True])
def test_sequence_logprobs_ignores_non_finite_values_at_ignored_positions(length_normalize):
    """Whatever sits at ignored positions (even -inf or nan) neither reaches the score nor its gradient."""
    token_logps = torch.tensor([[-1.0, -float("inf"), -2.0], [float("nan"), -0.5, -float("inf")]])
    token_logps.requires_grad_()
    labels = torch.tensor([[3, IGNORE, 4], [IGNORE, 1, IGNORE]])
    out = rankloss.sequence_logprobs(token_logps, labels, length_normalize=length_normalize)
    expected = torch.tensor([-1.5, -0.5]) if length_normalize else torch.tensor([-3.0, -0.5])
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.sum(), token_logps)
    assert torch.isfinite(grad).all() and bool((grad[labels == IGNORE] == 0).all())


# --------------------------------------------------------------------------------------------------
# Module wrappers route to the functional ops
# --------------------------------------------------------------------------------------------------
def test_token_logprobs_module_routes(monkeypatch):
    logits = torch.randn(2, 3, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 3))
    labels[0, 0] = 7  # ignore_index below
    module = rankloss.TokenLogProbs(ignore_index=7, temperature=0.9)
    expected = rankloss.token_logprobs(logits, labels, ignore_index=7, temperature=0.9)
    assert torch.equal(module(logits, labels), expected)

    calls = []
    original = rankloss.logprobs.token_logprobs
    monkeypatch.setattr(
        rankloss.logprobs, "token_logprobs", lambda *a, **k: calls.append((a, k)) or original(*a, **k)
    )
    module(logits, labels)
    assert calls == [((logits, labels), {"ignore_index": 7, "temperature": 0.9, "impl": None})]
    assert "temperature=0.9" in repr(module)


def test_linear_token_logprobs_module_routes(monkeypatch):
    hidden, weight, bias = torch.randn(4, 5, 6), torch.randn(13, 6), torch.randn(13)
    labels = torch.randint(0, 13, (4, 5))
    module = rankloss.LinearTokenLogProbs(ignore_index=-1, temperature=1.2, softcap=3.0, impl="reference")
    expected = rankloss.linear_token_logprobs(
        hidden, weight, labels, bias=bias, ignore_index=-1, temperature=1.2, softcap=3.0, impl="reference"
    )
    assert torch.equal(module(hidden, weight, labels, bias), expected)

    calls = []
    original = rankloss.logprobs.linear_token_logprobs
    monkeypatch.setattr(
        rankloss.logprobs, "linear_token_logprobs", lambda *a, **k: calls.append((a, k)) or original(*a, **k)
    )
    module(hidden, weight, labels)
    expected_kwargs = {
        "bias": None,
        "ignore_index": -1,
        "temperature": 1.2,
        "softcap": 3.0,
        "impl": "reference",
        "chunk_size": None,
        "deterministic": False,
        "filter_eps": "auto",
        "cache_bytes": None,
    }
    assert calls == [((hidden, weight, labels), expected_kwargs)]
    # every keyword of the function is a constructor argument of the module
    calls.clear()
    exact = rankloss.LinearTokenLogProbs(impl="torch", chunk_size=3, deterministic=True, filter_eps=None)
    exact(hidden, weight, labels)
    assert {k: calls[0][1][k] for k in ("chunk_size", "deterministic", "filter_eps")} == {
        "chunk_size": 3,
        "deterministic": True,
        "filter_eps": None,
    }
    assert "filter_eps=None" in repr(exact)
