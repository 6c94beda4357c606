"""Bad and degenerate inputs of the tensor API that used to pass silently, crash, or fail obscurely.

Label dtypes that cannot hold ``ignore_index``, exact pair losses for large margins, the opt-in
NaN/infinity check, empty captions (``T = 0``), empty batches (``S = 0``), ``chain_sizes`` as a tensor
under ``torch.compile``, and captions without scored tokens. Small shapes throughout.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rankloss.reference import losses as ref_losses

import rankloss
from rankloss import _validation

TRITON = pytest.param("triton", marks=pytest.mark.triton)


# --------------------------------------------------------------------------------------------------
# Label dtypes
# --------------------------------------------------------------------------------------------------
def _uint8_calls():
    y = torch.randint(0, 20, (4, 3), dtype=torch.uint8)
    h, w, logits = torch.randn(4, 3, 8), torch.randn(20, 8), torch.randn(4, 3, 20)
    return {
        "sequence_logprobs": lambda: rankloss.sequence_logprobs(torch.randn(4, 3), y),
        "token_logprobs": lambda: rankloss.token_logprobs(logits, y),
        "linear_token_logprobs": lambda: rankloss.linear_token_logprobs(h, w, y),
        "fused_linear_chain_loss": lambda: rankloss.fused_linear_chain_loss(h, w, y, [2, 2]),
        "chain_loss_from_logits": lambda: rankloss.chain_loss_from_logits(logits, y, [2, 2]),
        "sequence_scores": lambda: rankloss.sequence_scores(h, w, y),
        "shift_labels": lambda: rankloss.shift_labels(y),
    }


@pytest.mark.parametrize("name", list(_uint8_calls()))
def test_uint8_labels_cannot_hold_the_default_ignore_index(name):
    # -100 wraps to 156 in uint8: token 156 was counted as ignored by some paths and not by others.
    with pytest.raises(TypeError, match=r"labels of dtype torch\.uint8 cannot hold ignore_index=-100"):
        _uint8_calls()[name]()


def test_uint8_labels_with_an_ignore_index_they_hold_match_int64():
    torch.manual_seed(0)
    y = torch.randint(0, 200, (5, 6))
    y[0, 3] = 156  # the token -100 wraps to
    y[1, :2] = 255
    h, w = torch.randn(5, 6, 8), torch.randn(200, 8)
    for fn in (
        lambda labels: rankloss.sequence_scores(h, w, labels, ignore_index=255),
        lambda labels: rankloss.fused_linear_chain_loss(h, w, labels, [2, 3], ignore_index=255).loss,
    ):
        torch.testing.assert_close(fn(y.to(torch.uint8)), fn(y), rtol=0, atol=0)


@st.composite
def _label_case(draw):
    dtype = draw(st.sampled_from(_validation.INT_DTYPES))
    info = torch.iinfo(dtype)
    vocab = draw(st.integers(2, 300))
    ignore_index = draw(st.sampled_from([-100, -1, 0, 255, 300, vocab - 1]))
    S, T = draw(st.integers(2, 4)), draw(st.integers(1, 4))
    top = min(vocab, info.max + 1)  # token ids the dtype can hold
    ids = draw(st.lists(st.integers(0, top - 1), min_size=S * T, max_size=S * T))
    ignored = draw(st.lists(st.booleans(), min_size=S * T, max_size=S * T))
    return dtype, vocab, ignore_index, ids, ignored, S, T


@given(_label_case())
def test_every_label_dtype_gives_the_int64_result_or_a_clear_error(case):
    dtype, vocab, ignore_index, ids, ignored, S, T = case
    info = torch.iinfo(dtype)
    y64 = torch.tensor(ids).reshape(S, T)
    if info.min <= ignore_index <= info.max:
        y64 = torch.where(torch.tensor(ignored).reshape(S, T), ignore_index, y64)
    gen = torch.Generator().manual_seed(len(ids))
    hidden = torch.randn(S, T, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, 6, generator=gen, dtype=torch.float64)
    sizes = [2] * (S // 2 - 1) + [2 + S % 2] if S >= 2 else [S]

    def run(labels):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp = rankloss.linear_token_logprobs(h, w, labels, ignore_index=ignore_index)
        s = rankloss.sequence_logprobs(lp, labels, ignore_index=ignore_index, length_normalize=True)
        out = rankloss.fused_linear_chain_loss(
            h, w, labels, sizes, ignore_index=ignore_index, length_normalize=True
        )
        (out.loss + s.sum()).backward()
        return lp.detach(), s.detach(), out.loss.detach(), h.grad, w.grad

    if not info.min <= ignore_index <= info.max:
        with pytest.raises(TypeError, match=rf"labels of dtype {dtype} cannot hold ignore_index"):
            run(y64.to(dtype))
        return
    for got, want in zip(run(y64.to(dtype)), run(y64)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_label_range_check_does_not_wrap_the_vocabulary_size():
    # In int8, a comparison with V = 300 reads 300 as 44: label 100 was rejected as out of range.
    y = torch.tensor([[100, 5], [-100, 127]], dtype=torch.int8)
    logits = torch.randn(2, 2, 300)
    torch.testing.assert_close(rankloss.token_logprobs(logits, y), rankloss.token_logprobs(logits, y.long()))


# --------------------------------------------------------------------------------------------------
# Exact pair losses for large margins
# --------------------------------------------------------------------------------------------------
def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


@pytest.mark.parametrize("impl", ["torch", "reference", TRITON])
@pytest.mark.parametrize("margin", [-20.5, -35.0, 20.5])
def test_dpo_sigmoid_is_exact_beyond_softplus_threshold(impl, margin):
    dtype = torch.float32 if impl == "triton" else torch.float64
    s = torch.tensor([0.0, -margin], dtype=dtype)
    got = rankloss.dpo_chain_loss(s, [2], beta=1.0, impl=impl).loss.item()
    assert got == pytest.approx(_softplus(-margin), rel=1e-6 if impl == "triton" else 1e-15)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_lipo_is_exact_beyond_softplus_threshold(impl):
    r = torch.tensor([0.0, 21.0, 40.0, -3.0], dtype=torch.float64)  # three badly ordered pairs
    w = ref_losses.lipo_weights(r)
    want = sum(w[k, j].item() * _softplus(-(r[k] - r[j]).item()) for k in range(4) for j in range(k + 1, 4))
    got = rankloss.lipo_loss(r, [4], beta=1.0, impl=impl).loss.item()
    assert got == pytest.approx(want, rel=1e-15)


# --------------------------------------------------------------------------------------------------
# Opt-in NaN / infinity check
# --------------------------------------------------------------------------------------------------
def _nonfinite_cases():
    def bad(shape, index, value):
        t = torch.randn(*shape)
        t[index] = value
        return t

    y = torch.randint(0, 9, (4, 3))
    y[1, 0] = -100
    return [
        ("ref-inf", lambda: rankloss.chain_loss(torch.randn(5), [2, 3], bad((5,), 2, math.inf)),
         r"ref_scores must not hold NaN or infinity .* 1 such value\(s\), the first ref_scores\[2\] = inf"),
        ("scores-nan", lambda: rankloss.plackett_luce_loss(bad((5,), 4, math.nan), [2, 3]),
         r"scores\[4\] = nan"),
        ("hidden-nan", lambda: rankloss.fused_linear_chain_loss(bad((4, 3, 5), (2, 1, 3), math.nan),
                                                                 torch.randn(9, 5), y, [2, 2]),
         r"hidden\[2, 1, 3\] = nan"),
        ("weight-inf", lambda: rankloss.linear_token_logprobs(torch.randn(4, 3, 5),
                                                              bad((9, 5), (7, 0), -math.inf), y),
         r"weight\[7, 0\] = -inf"),
        ("logits-nan", lambda: rankloss.token_logprobs(bad((4, 3, 9), (3, 2, 8), math.nan), y),
         r"logits must not hold NaN or \+inf .* logits\[3, 2, 8\] = nan"),
        ("token-logps-inf", lambda: rankloss.sequence_logprobs(bad((4, 3), (3, 1), math.inf), y),
         r"token_logps\[3, 1\] = inf"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "call, match", [c[1:] for c in _nonfinite_cases()], ids=[c[0] for c in _nonfinite_cases()]
)
def test_validate_names_the_first_non_finite_value(monkeypatch, call, match):
    monkeypatch.setenv("RANKLOSS_VALIDATE", "1")
    with pytest.raises(ValueError, match=match):
        call()


def test_non_finite_check_is_opt_in_and_allows_masks(monkeypatch):
    ref = torch.tensor([0.0, 0.0, math.inf, 0.0, 0.0])
    monkeypatch.delenv("RANKLOSS_VALIDATE", raising=False)
    rankloss.chain_loss(torch.randn(5), [2, 3], ref)  # off by default: no check, no error
    monkeypatch.setenv("RANKLOSS_VALIDATE", "1")
    y = torch.randint(0, 9, (4, 3))
    y[1, 0] = -100
    logits = torch.randn(4, 3, 9)
    logits[0, 0, 8] = -math.inf  # a masked vocabulary entry is fine
    token_logps = torch.randn(4, 3)
    token_logps[1, 0] = math.nan  # at an ignored position: never read
    if y[0, 0] == 8:
        y[0, 0] = 0
    rankloss.token_logprobs(logits, y)
    rankloss.sequence_logprobs(token_logps, y)


# --------------------------------------------------------------------------------------------------
# Empty captions (T = 0) and empty batches (S = 0)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", [None, "reference", TRITON])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_captions_without_tokens_work_with_gradients(impl, reduction):
    hidden = torch.randn(7, 0, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # every caption is empty, on purpose
        out = rankloss.fused_linear_chain_loss(
            hidden, weight, torch.zeros(7, 0, dtype=torch.long), [3, 4], impl=impl, reduction=reduction
        )
    want = rankloss.plackett_luce_loss(torch.zeros(7), [3, 4], reduction=reduction).loss
    torch.testing.assert_close(out.loss, want)
    out.loss.sum().backward()
    assert hidden.grad.shape == hidden.shape
    assert weight.grad is not None and not weight.grad.any()


@pytest.mark.parametrize("loss", rankloss.CHAIN_LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", [None, "reference", TRITON])
def test_empty_batch_gives_a_zero_loss_connected_to_the_scores(loss, reduction, impl):
    scores = torch.zeros(0, requires_grad=True)
    ref = torch.zeros(0, requires_grad=True)
    out = rankloss.chain_loss(scores, [], ref, loss=loss, reduction=reduction, impl=impl, sft_weight=0.5,
                              num_tokens=torch.zeros(0))  # fmt: skip
    assert out.loss.shape == ((0,) if reduction == "none" else ())
    assert out.loss.grad_fn is not None and not out.loss.any()
    assert out.chain_losses.shape == out.kendall_tau.shape == out.sft_loss.shape == (0,)
    out.loss.sum().backward()
    assert scores.grad is not None and ref.grad is not None


@pytest.mark.parametrize("impl", [None, "torch", "reference", TRITON])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_empty_batch_reaches_the_lm_head_with_zero_gradients(impl, packed):
    # What a data-parallel job needs from an uneven last micro-batch: every parameter gets a gradient.
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    if packed:
        hidden, labels, cu = (
            torch.randn(0, 16, requires_grad=True),
            torch.zeros(0, dtype=torch.long),
            torch.tensor([0]),
        )
    else:
        hidden, labels, cu = (
            torch.randn(0, 5, 16, requires_grad=True),
            torch.zeros(0, 5, dtype=torch.long),
            None,
        )
    chain_sizes = torch.tensor([], dtype=torch.long) if impl is None else []
    out = rankloss.fused_linear_chain_loss(
        hidden, weight, labels, chain_sizes, bias=bias, cu_seqlens=cu, impl=impl, sft_weight=1.0
    )
    assert out.loss.item() == 0.0 and out.rewards.shape == (0,)
    out.loss.backward()
    for p in (hidden, weight, bias):
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()
    lg = torch.randn(0, 5, 9, requires_grad=True)
    rankloss.chain_loss_from_logits(lg, torch.zeros(0, 5, dtype=torch.long), []).loss.backward()
    assert lg.grad is not None


@st.composite
def _degenerate_batch(draw):
    sizes = draw(st.lists(st.integers(2, 3), max_size=3))  # [] is an empty batch
    S = sum(sizes)
    lengths = draw(st.lists(st.integers(0, 3), min_size=S, max_size=S))  # captions of 0 tokens too
    packed = draw(st.booleans())
    T = max(lengths, default=draw(st.integers(0, 2)))
    V, D = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    N = sum(lengths) if packed else S * T
    ids = draw(st.lists(st.integers(-1, V - 1), min_size=N, max_size=N))  # -1: ignored below
    options = dict(
        loss=draw(st.sampled_from(rankloss.CHAIN_LOSSES)),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        length_normalize=draw(st.booleans()),
        sft_weight=draw(st.sampled_from([0.0, 0.5])),
    )
    return sizes, lengths, packed, T, V, D, ids, options


@given(_degenerate_batch())
def test_degenerate_shapes_agree_with_the_reference(case):
    sizes, lengths, packed, T, V, D, ids, options = case
    gen = torch.Generator().manual_seed(len(ids) + 7 * V + D)
    labels = torch.tensor(ids, dtype=torch.long).masked_fill(torch.tensor(ids) < 0, -100)
    if packed:
        cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()])
        hidden = torch.randn(labels.shape[0], D, generator=gen, dtype=torch.float64)
    else:
        cu, labels = None, labels.reshape(len(lengths), T)
        hidden = torch.randn(len(lengths), T, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64)

    def run(impl):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # captions without scored tokens, on purpose
            out = rankloss.fused_linear_chain_loss(h, w, labels, sizes, cu_seqlens=cu, impl=impl, **options)
        out.loss.sum().backward()
        return out.loss.detach(), out.chain_losses, out.rewards, h.grad, w.grad

    for got, want in zip(run(None), run("reference")):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_empty_chain_sizes_need_an_empty_batch():
    with pytest.raises(ValueError, match=r"chain_sizes must hold at least one chain when there are captions"):
        rankloss.fused_linear_chain_loss(
            torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3).long(), []
        )


# --------------------------------------------------------------------------------------------------
# chain_sizes as a tensor under torch.compile
# --------------------------------------------------------------------------------------------------
def test_tensor_chain_sizes_under_compile():
    import torch._dynamo

    def f(s, sizes):
        return rankloss.plackett_luce_loss(s, sizes).loss

    s = torch.randn(5)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"pass chain_sizes as a list of ints"):
        torch.compile(f, fullgraph=True, backend="eager")(s, torch.tensor([2, 3]))
    # Without fullgraph the tensor's values are read after a graph break: the same loss as eager.
    torch._dynamo.reset()
    got = torch.compile(f, backend="eager")(s, torch.tensor([2, 3]))
    torch.testing.assert_close(got, f(s, [2, 3]))


# --------------------------------------------------------------------------------------------------
# Captions without scored tokens: they score 0; a warning once per process
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad", [True, False], ids=["single-pass", "composed"])
def test_caption_without_scored_tokens_scores_zero_and_warns_once(monkeypatch, grad):
    monkeypatch.setattr(_validation, "_warned_zero_token_caption", False)
    hidden = torch.randn(5, 4, 8, requires_grad=grad)
    weight = torch.randn(11, 8)
    labels = torch.randint(0, 11, (5, 4))
    labels[3] = -100
    with pytest.warns(RuntimeWarning, match=r"1 caption\(s\) of 5 have no scored tokens .* caption 3"):
        out = rankloss.fused_linear_chain_loss(hidden, weight, labels, [2, 3], length_normalize=True)
    assert out.rewards[3].item() == 0.0  # beta * (0 - 0): scored as "certain"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rankloss.fused_linear_chain_loss(hidden, weight, labels, [2, 3])
