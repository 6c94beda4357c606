"""The reference token and sequence log-probs (rankloss.reference.logprobs) against plain PyTorch.

The independent computation is ``-cross_entropy(reduction="none")`` of the logits, which scores exactly
``log_softmax(z)[y]`` and 0 at ``ignore_index``. Odd shapes, float64 gradient checks, the
float32/bfloat16/float16 dtype contract, soft-cap-then-temperature order, and padded vs packed
sequence scores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from rankloss.reference import logprobs as R
from torch.autograd import gradcheck

F64 = torch.float64
IGNORE = -100

seed_st = st.integers(0, 2**31 - 1)
# leading dims: [N] or [S, T]; vocab sizes that are not multiples of anything
lead_st = st.one_of(st.tuples(st.integers(1, 13)), st.tuples(st.integers(1, 4), st.integers(1, 9)))
vocab_st = st.integers(2, 37)


def make_labels(
    lead: tuple[int, ...], V: int, g: torch.Generator, ignore_index: int = IGNORE
) -> torch.Tensor:
    labels = torch.randint(0, V, lead, generator=g)
    mask = torch.rand(lead, generator=g) < 0.3
    return torch.where(mask, torch.full_like(labels, ignore_index), labels)


def plain_logprobs(z: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """``-cross_entropy`` per position: ``log_softmax(z)[y]``, 0 where ``y == ignore_index``."""
    V = z.shape[-1]
    out = -F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), reduction="none", ignore_index=ignore_index)
    return out.view(labels.shape)


def plain_linear_logits(hidden, weight, bias=None, softcap=None, temperature=1.0):
    z = F.linear(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


# --------------------------------------------------------------------------------------------------
# Values against plain PyTorch (float64)
# --------------------------------------------------------------------------------------------------
@settings(max_examples=20)
@given(lead=lead_st, V=vocab_st, seed=seed_st, temperature=st.sampled_from([1.0, 0.7, 2.5]))
def test_token_logprobs_matches_cross_entropy(lead, V, seed, temperature):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(*lead, V, generator=g, dtype=F64)
    labels = make_labels(lead, V, g)
    got = R.token_logprobs(logits, labels, ignore_index=IGNORE, temperature=temperature)
    assert got.shape == labels.shape and got.dtype == F64
    torch.testing.assert_close(got, plain_logprobs(logits / temperature, labels), rtol=1e-12, atol=1e-12)


@settings(max_examples=20)
@given(
    lead=lead_st,
    V=vocab_st,
    D=st.integers(1, 11),
    seed=seed_st,
    with_bias=st.booleans(),
    softcap=st.sampled_from([None, 0.9, 5.0]),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    ignore_index=st.sampled_from([IGNORE, -1]),
)
def test_linear_token_logprobs_matches_plain(lead, V, D, seed, with_bias, softcap, temperature, ignore_index):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, D, generator=g, dtype=F64)
    weight = torch.randn(V, D, generator=g, dtype=F64)
    bias = torch.randn(V, generator=g, dtype=F64) if with_bias else None
    labels = make_labels(lead, V, g, ignore_index)
    got = R.linear_token_logprobs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap
    )
    expected = plain_logprobs(
        plain_linear_logits(hidden, weight, bias, softcap, temperature), labels, ignore_index
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_softcap_is_applied_before_temperature():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(5, 4, generator=g, dtype=F64), 3 * torch.randn(7, 4, generator=g, dtype=F64)
    labels = torch.randint(0, 7, (5,), generator=g)
    got = R.linear_token_logprobs(hidden, weight, labels, softcap=2.0, temperature=0.5)
    capped_then_scaled = plain_logprobs(2.0 * torch.tanh(hidden @ weight.T / 2.0) / 0.5, labels)
    scaled_then_capped = plain_logprobs(2.0 * torch.tanh(hidden @ weight.T / 0.5 / 2.0), labels)
    torch.testing.assert_close(got, capped_then_scaled, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, scaled_then_capped)  # the two orders do differ on this input
    torch.testing.assert_close(
        R.linear_logits(hidden, weight, softcap=2.0), 2.0 * torch.tanh(hidden @ weight.T / 2.0)
    )


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_any_integer_label_dtype(dtype):
    logits = torch.randn(6, 9, dtype=F64)
    labels = torch.tensor([0, 3, 8, 1, 2, 5])
    expected = plain_logprobs(logits, labels)
    torch.testing.assert_close(R.token_logprobs(logits, labels.to(dtype)), expected)


def test_ignored_positions_are_zero_and_get_no_gradient():
    logits = torch.randn(2, 5, 11, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 1:3] = IGNORE
    labels[1] = IGNORE
    out = R.token_logprobs(logits, labels)
    assert bool((out[labels == IGNORE] == 0).all())
    out.sum().backward()
    assert bool((logits.grad[labels == IGNORE] == 0).all())
    assert bool((logits.grad[labels != IGNORE].abs().sum(-1) > 0).all())


# --------------------------------------------------------------------------------------------------
# Gradient checks (float64)
# --------------------------------------------------------------------------------------------------
@settings(max_examples=6)
@given(lead=lead_st, V=st.integers(2, 9), seed=seed_st, temperature=st.sampled_from([1.0, 0.8]))
def test_gradcheck_token_logprobs(lead, V, seed, temperature):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*lead, V, generator=g, dtype=F64).requires_grad_()
    labels = make_labels(lead, V, g)
    assert gradcheck(lambda z: R.token_logprobs(z, labels, temperature=temperature), (logits,))


@settings(max_examples=6)
@given(
    N=st.integers(1, 7),
    V=st.integers(2, 9),
    D=st.integers(1, 5),
    seed=seed_st,
    softcap=st.sampled_from([None, 1.5]),
    temperature=st.sampled_from([1.0, 0.8]),
)
def test_gradcheck_linear_token_logprobs(N, V, D, seed, softcap, temperature):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=F64).requires_grad_()
    weight = torch.randn(V, D, generator=g, dtype=F64).requires_grad_()
    bias = torch.randn(V, generator=g, dtype=F64).requires_grad_()
    labels = make_labels((N,), V, g)
    fn = lambda h, w, b: R.linear_token_logprobs(
        h, w, labels, bias=b, temperature=temperature, softcap=softcap
    )
    assert gradcheck(fn, (hidden, weight, bias))


# --------------------------------------------------------------------------------------------------
# Dtype contract: fp32 out, gradients in the input dtype, accuracy close to plain PyTorch's
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_logprobs_dtypes(dtype):
    g = torch.Generator().manual_seed(1)
    logits64 = 2 * torch.randn(3, 7, 53, generator=g, dtype=F64)
    labels = make_labels((3, 7), 53, g)
    logits = logits64.to(dtype).requires_grad_()
    out = R.token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    out.backward(torch.randn(out.shape, generator=g))
    assert logits.grad.dtype == dtype
    # as accurate as fp32 arithmetic on the rounded input: compare to float64 on the same rounded values
    truth = plain_logprobs(logits.detach().to(F64), labels)
    torch.testing.assert_close(out.to(F64), truth, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_token_logprobs_dtypes(dtype):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 5, 16, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(29, 16, generator=g) / 4).to(dtype).requires_grad_()
    bias = torch.randn(29, generator=g).to(dtype).requires_grad_()
    labels = make_labels((2, 5), 29, g)
    out = R.linear_token_logprobs(hidden, weight, labels, bias=bias, softcap=3.0, temperature=0.9)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == bias.grad.dtype == dtype
    h, w, b = (t.detach().to(F64) for t in (hidden, weight, bias))
    truth = plain_logprobs(plain_linear_logits(h, w, b, 3.0, 0.9), labels)
    torch.testing.assert_close(out.to(F64), truth, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Sequence scores: padded vs packed
# --------------------------------------------------------------------------------------------------
@settings(max_examples=20)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=7), seed=seed_st, length_normalize=st.booleans()
)
def test_sequence_logprobs_padded_and_packed_agree(lengths, seed, length_normalize):
    g = torch.Generator().manual_seed(seed)
    S, T = len(lengths), max(max(lengths), 1)
    token_logps = -torch.rand(S, T, generator=g, dtype=F64)
    labels = torch.full((S, T), IGNORE)
    for i, n in enumerate(lengths):
        labels[i, :n] = torch.randint(0, 50, (n,), generator=g)
    labels[torch.rand(S, T, generator=g) < 0.2] = IGNORE  # holes inside sequences too
    padded = R.sequence_logprobs(token_logps, labels, length_normalize=length_normalize)

    keep = [torch.arange(n) for n in lengths]
    packed_logps = torch.cat([token_logps[i, k] for i, k in enumerate(keep)])
    packed_labels = torch.cat([labels[i, k] for i, k in enumerate(keep)])
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    packed = R.sequence_logprobs(
        packed_logps, packed_labels, length_normalize=length_normalize, cu_seqlens=cu_seqlens
    )
    torch.testing.assert_close(padded, packed, rtol=1e-12, atol=1e-12)

    scored = labels != IGNORE
    sums = (token_logps * scored).sum(-1)
    expected = sums / scored.sum(-1).clamp(min=1) if length_normalize else sums
    torch.testing.assert_close(padded, expected, rtol=1e-12, atol=1e-12)


def test_sequence_logprobs_all_ignored_scores_zero():
    token_logps = torch.randn(3, 4, dtype=F64, requires_grad=True)
    labels = torch.full((3, 4), IGNORE)
    labels[1, :2] = 5
    for length_normalize in (False, True):
        out = R.sequence_logprobs(token_logps, labels, length_normalize=length_normalize)
        assert out[0].item() == 0 and out[2].item() == 0 and torch.isfinite(out).all()
        (grad,) = torch.autograd.grad(out.sum(), token_logps)
        assert torch.isfinite(grad).all() and bool((grad[labels == IGNORE] == 0).all())
