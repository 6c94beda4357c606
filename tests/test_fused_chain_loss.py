"""End-to-end chain losses from hidden states: every variant against the float64 reference composition,
layouts, memory behaviour, and external cross-checks (Liger-Kernel's fused DPO, TRL's DPO formula)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from rankloss.reference import logprobs as ref_lp
from rankloss.reference import losses as ref_losses

import rankloss

VARIANTS = [
    dict(loss="plackett_luce"),
    dict(loss="plackett_luce", top_k=2),
    dict(loss="dpo", pairs="adjacent", dpo_loss_type="sigmoid"),
    dict(loss="dpo", pairs="all", dpo_loss_type="hinge"),
    dict(loss="dpo", pairs="best_worst", dpo_loss_type="ipo"),
    dict(loss="dpo", pairs="best_rest", dpo_loss_type="sigmoid"),
    dict(loss="lipo"),
    dict(loss="plackett_luce", sft_weight=0.3),
]
VARIANT_IDS = [
    "pl",
    "pl-top2",
    "dpo-adj-sigmoid",
    "dpo-all-hinge",
    "dpo-bw-ipo",
    "dpo-br-sigmoid",
    "lipo",
    "pl+sft",
]


def _batch(chain_sizes, T, D, V, *, seed=0, dtype=torch.float64, ignore_caption=None):
    g = torch.Generator().manual_seed(seed)
    S = sum(chain_sizes)
    hidden = torch.randn(S, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    labels = torch.randint(0, V, (S, T), generator=g)
    labels[:, :2] = -100  # prompt
    lengths = torch.randint(T // 2, T + 1, (S,), generator=g)
    labels[torch.arange(T)[None, :] >= lengths[:, None]] = -100  # ragged padding
    if ignore_caption is not None:
        labels[ignore_caption] = -100
    ref_scores = torch.randn(S, generator=g, dtype=torch.float64) * 3 - 40
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels, ref_scores


def _reference(
    hidden,
    weight,
    bias,
    labels,
    chain_sizes,
    ref_scores,
    *,
    length_normalize=False,
    reduction="none",
    **variant,
):
    """The specification, composed from reference/ pieces only."""
    h, w, b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    tok = ref_lp.linear_token_logprobs(h, w, labels, b)
    scores = ref_lp.sequence_logprobs(tok, labels, length_normalize=length_normalize)
    n = (labels != -100).sum(-1)
    if length_normalize:
        n = torch.ones_like(n)
    loss_type = variant.pop("dpo_loss_type", "sigmoid")
    pairs = variant.pop("pairs", "adjacent")
    out, _, metrics = ref_losses.chain_loss(
        scores,
        chain_sizes,
        ref_scores,
        loss=variant.pop("loss"),
        beta=0.5,
        top_k=variant.pop("top_k", None),
        pairs=pairs,
        loss_type=loss_type,
        sft_weight=variant.pop("sft_weight", 0.0),
        num_tokens=n,
        reduction=reduction,
    )
    return out, (h, w, b), metrics


def _fused(impl, hidden, weight, bias, labels, chain_sizes, ref_scores, upstream, **kw):
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    out = rankloss.fused_linear_chain_loss(
        h, w, labels, chain_sizes, ref_scores, beta=0.5, bias=b, impl=impl, reduction="none", **kw
    )
    (out.loss * upstream).sum().backward()
    return out, (h.grad, w.grad, b.grad)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("length_normalize", [False, True])
def test_torch_path_matches_reference_in_float64(variant, length_normalize):
    chain_sizes = [3, 5, 2]
    hidden, weight, bias, labels, ref_scores = _batch(chain_sizes, 9, 13, 37, seed=1)
    upstream = torch.rand(len(chain_sizes), dtype=torch.float64) + 0.5
    out, grads = _fused(
        "torch",
        hidden,
        weight,
        bias,
        labels,
        chain_sizes,
        ref_scores,
        upstream,
        length_normalize=length_normalize,
        chunk_size=5,
        **variant,
    )
    expected, leaves, metrics = _reference(
        hidden,
        weight,
        bias,
        labels,
        chain_sizes,
        ref_scores,
        length_normalize=length_normalize,
        **dict(variant),
    )
    (expected * upstream).sum().backward()
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-9, atol=1e-9)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-8, atol=1e-9)
    for key in (
        "pairwise_accuracy",
        "top1_accuracy",
        "kendall_tau",
        "neighbour_margin",
        "reward_per_position",
    ):
        torch.testing.assert_close(getattr(out, key), metrics[key], rtol=1e-9, atol=1e-9)


@pytest.mark.triton
@pytest.mark.parametrize(
    "variant", [VARIANTS[0], VARIANTS[3], VARIANTS[6]], ids=["pl", "dpo-all-hinge", "lipo"]
)
def test_triton_path_matches_reference(variant):
    chain_sizes = [4, 3]
    hidden, weight, bias, labels, ref_scores = _batch(chain_sizes, 11, 37, 131, seed=2, dtype=torch.float32)
    upstream = torch.rand(2) + 0.5
    out, grads = _fused(
        "triton", hidden, weight, bias, labels, chain_sizes, ref_scores.float(), upstream, **variant
    )
    expected, leaves, _ = _reference(hidden, weight, bias, labels, chain_sizes, ref_scores, **dict(variant))
    (expected * upstream.double()).sum().backward()
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-4, atol=1e-4)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got.double(), leaf.grad, rtol=1e-3, atol=1e-5)


@settings(max_examples=10)
@given(
    chain_sizes=st.one_of(
        st.lists(st.integers(2, 6), min_size=1, max_size=5),
        st.lists(st.integers(2, 40), min_size=1, max_size=2),
    ),
    seed=st.integers(0, 2**16),
    variant=st.sampled_from(VARIANTS),
)
def test_hypothesis_chain_patterns(chain_sizes, seed, variant):
    hidden, weight, bias, labels, ref_scores = _batch(chain_sizes, 5, 7, 19, seed=seed)
    upstream = torch.rand(len(chain_sizes), dtype=torch.float64)
    out, grads = _fused("torch", hidden, weight, bias, labels, chain_sizes, ref_scores, upstream, **variant)
    expected, leaves, _ = _reference(hidden, weight, bias, labels, chain_sizes, ref_scores, **dict(variant))
    (expected * upstream).sum().backward()
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-8, atol=1e-9)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_caption_with_every_token_ignored_gives_a_finite_loss(impl):
    chain_sizes = [3, 2]
    dtype = torch.float64 if impl == "torch" else torch.float32
    hidden, weight, bias, labels, _ = _batch(chain_sizes, 6, 8, 23, ignore_caption=1, dtype=dtype)
    for variant in VARIANTS:
        for length_normalize in (False, True):
            out, grads = _fused(
                impl,
                hidden,
                weight,
                bias,
                labels,
                chain_sizes,
                None,
                torch.ones(2, dtype=dtype),
                length_normalize=length_normalize,
                **variant,
            )
            assert torch.isfinite(out.loss).all() and all(torch.isfinite(g).all() for g in grads)
            assert torch.all(grads[0][1] == 0)  # the ignored caption's hidden states get no gradient


def test_packed_layout_equals_padded_layout():
    chain_sizes = [3, 2]
    hidden, weight, bias, labels, ref_scores = _batch(chain_sizes, 7, 6, 29, seed=4)
    lengths = [7, 5, 6, 7, 3]  # pack each caption's first `length` positions
    packed_h = torch.cat([hidden[i, :n] for i, n in enumerate(lengths)])
    packed_y = torch.cat([labels[i, :n] for i, n in enumerate(lengths)])
    labels = labels.clone()
    for i, n in enumerate(lengths):
        labels[i, n:] = -100
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    for variant in VARIANTS:
        padded = rankloss.fused_linear_chain_loss(
            hidden, weight, labels, chain_sizes, ref_scores, bias=bias, length_normalize=True, **variant
        )
        packed = rankloss.fused_linear_chain_loss(
            packed_h,
            weight,
            packed_y,
            chain_sizes,
            ref_scores,
            bias=bias,
            length_normalize=True,
            cu_seqlens=cu,
            **variant,
        )
        torch.testing.assert_close(packed.loss, padded.loss)
        torch.testing.assert_close(packed.rewards, padded.rewards)


def test_sequence_scores_and_logits_entry_point_agree_with_the_fused_op():
    chain_sizes = [2, 4]
    hidden, weight, bias, labels, _ = _batch(chain_sizes, 8, 9, 31, seed=5)
    scores = rankloss.sequence_scores(hidden.requires_grad_(), weight, labels, bias=bias)
    assert not scores.requires_grad and scores.shape == (6,)
    expected = ref_lp.sequence_logprobs(ref_lp.linear_token_logprobs(hidden, weight, labels, bias), labels)
    torch.testing.assert_close(scores, expected.detach())
    fused = rankloss.fused_linear_chain_loss(hidden, weight, labels, chain_sizes, scores - 0.3, bias=bias)
    logits = ref_lp.linear_logits(hidden.detach(), weight, bias)
    from_logits = rankloss.chain_loss_from_logits(logits, labels, chain_sizes, scores - 0.3)
    torch.testing.assert_close(from_logits.loss, fused.loss)
    module = rankloss.ChainLoss(loss="dpo", pairs="all", beta=0.2)
    direct = rankloss.fused_linear_chain_loss(
        hidden, weight, labels, chain_sizes, scores, bias=bias, loss="dpo", pairs="all", beta=0.2
    )
    torch.testing.assert_close(
        module(hidden, weight, labels, chain_sizes, scores, bias=bias).loss, direct.loss
    )
    assert "pairs='all'" in repr(module)


def test_bad_layouts_raise_clear_errors():
    hidden, weight, bias, labels, _ = _batch([2], 4, 5, 7)
    with pytest.raises(ValueError, match=r"hidden must be \[S, T, D\]"):
        rankloss.fused_linear_chain_loss(hidden[0], weight, labels[0], [2])
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing offsets from 0 to N = 4"):
        rankloss.fused_linear_chain_loss(
            hidden[0], weight, labels[0], [2], cu_seqlens=torch.tensor([0, 3, 5])
        )
    with pytest.raises(ValueError, match="chain_sizes must sum to the number of captions S = 2"):
        rankloss.fused_linear_chain_loss(hidden, weight, labels, [3])
    with pytest.raises(TypeError, match="length_normalize must be a bool"):
        rankloss.fused_linear_chain_loss(hidden, weight, labels, [2], length_normalize="yes")


# --------------------------------------------------------------------------------------------------
# Memory: nothing of size [tokens x vocab], and nothing that grows with K at a fixed number of tokens
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [2, 4, 16])
def test_memory_does_not_grow_with_chain_length(K, largest_tensor):
    tokens, T, D, V, chunk = 32 * 16, 16, 8, 400, 16
    S = tokens // T
    chain_sizes = [K] * (S // K)
    hidden, weight, bias, labels, ref_scores = _batch(chain_sizes, T, D, V, dtype=torch.float32)
    hidden.requires_grad_()
    with largest_tensor() as probe:
        out = rankloss.fused_linear_chain_loss(
            hidden,
            weight,
            labels,
            chain_sizes,
            ref_scores.float(),
            loss="lipo",
            chunk_size=chunk,
            impl="torch",
        )
        out.loss.backward()
    assert probe.largest <= max(chunk * V, V * D, S * T * D), probe.largest


# --------------------------------------------------------------------------------------------------
# External cross-checks with K = 2
# --------------------------------------------------------------------------------------------------
def test_matches_trl_dpo_sigmoid_formula():
    B = 4
    hidden, weight, bias, labels, ref_scores = _batch([2] * B, 6, 8, 29, seed=6)
    beta = 0.5
    pl = rankloss.fused_linear_chain_loss(hidden, weight, labels, [2] * B, ref_scores, beta=beta, bias=bias)
    dpo = rankloss.fused_linear_chain_loss(
        hidden, weight, labels, [2] * B, ref_scores, beta=beta, bias=bias, loss="dpo"
    )
    s = rankloss.sequence_scores(hidden, weight, labels, bias=bias)
    # TRL (trl/trainer/dpo_trainer.py, loss_type="sigmoid"):
    #   -logsigmoid(beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))).mean()
    chosen, rejected = s[0::2], s[1::2]
    trl = -F.logsigmoid(beta * ((chosen - ref_scores[0::2]) - (rejected - ref_scores[1::2]))).mean()
    torch.testing.assert_close(pl.loss, trl)
    torch.testing.assert_close(dpo.loss, trl)


@pytest.mark.parametrize("loss", ["dpo", "plackett_luce"])
def test_matches_liger_fused_linear_dpo_loss(loss):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    B, T, D, V, beta = 3, 7, 16, 53, 0.3
    g = torch.Generator().manual_seed(7)
    chosen_h, rejected_h = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    ref_chosen_h, ref_rejected_h = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D**0.5
    ref_weight = torch.randn(V, D, generator=g) / D**0.5
    chosen_y, rejected_y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    chosen_y[:, :2] = -100
    rejected_y[:, :3] = -100

    # Liger: chosen rows first, then rejected rows; labels already aligned with the positions.
    liger_h = torch.cat([chosen_h, rejected_h]).requires_grad_()
    liger_w = weight.clone().requires_grad_()
    liger_loss = liger.LigerFusedLinearDPOLoss(beta=beta, compiled=False, use_ref_model=True)(
        liger_w,
        liger_h,
        torch.cat([chosen_y, rejected_y]),
        ref_input=torch.cat([ref_chosen_h, ref_rejected_h]),
        ref_weight=ref_weight,
    )
    liger_loss = liger_loss[0] if isinstance(liger_loss, tuple) else liger_loss
    liger_loss.backward()

    # rankloss: chains of two (chosen, rejected), reference scores from the reference model.
    ours_h = torch.stack([chosen_h, rejected_h], dim=1).reshape(2 * B, T, D).requires_grad_()
    ours_y = torch.stack([chosen_y, rejected_y], dim=1).reshape(2 * B, T)
    ref_h = torch.stack([ref_chosen_h, ref_rejected_h], dim=1).reshape(2 * B, T, D)
    ref_scores = rankloss.sequence_scores(ref_h, ref_weight, ours_y)
    ours_w = weight.clone().requires_grad_()
    out = rankloss.fused_linear_chain_loss(ours_h, ours_w, ours_y, [2] * B, ref_scores, loss=loss, beta=beta)
    out.loss.backward()

    torch.testing.assert_close(out.loss, liger_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_w.grad, liger_w.grad, rtol=1e-4, atol=1e-6)
    liger_grad = torch.stack([liger_h.grad[:B], liger_h.grad[B:]], dim=1).reshape(2 * B, T, D)
    torch.testing.assert_close(ours_h.grad, liger_grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The single-pass path (CPU, PyTorch, scalar reduction): gradients computed in the forward per group of
# chains, softmax chunks cached up to cache_bytes and recomputed beyond.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "cache_bytes, softcap, length_normalize",
    [(None, None, False), (0, 3.0, True), (37 * 8 * 3, None, True), (10**9, 2.0, False)],
    ids=["default", "recompute-all+softcap", "partial-cache", "cache-all+softcap"],
)
def test_single_pass_matches_reference(variant, reduction, cache_bytes, softcap, length_normalize):
    chain_sizes = [3, 5, 2, 4]
    hidden, weight, bias, labels, ref_scores = _batch(chain_sizes, 9, 13, 37, seed=11)
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    out = rankloss.fused_linear_chain_loss(
        h,
        w,
        labels,
        chain_sizes,
        ref_scores,
        beta=0.5,
        bias=b,
        softcap=softcap,
        length_normalize=length_normalize,
        reduction=reduction,
        chunk_size=4,
        cache_bytes=cache_bytes,
        temperature=0.9,
        **variant,
    )
    (out.loss * 1.7).backward()
    rh, rw, rb = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    tok = ref_lp.linear_token_logprobs(rh, rw, labels, rb, temperature=0.9, softcap=softcap)
    scores = ref_lp.sequence_logprobs(tok, labels, length_normalize=length_normalize)
    n = torch.ones(len(labels), dtype=torch.long) if length_normalize else (labels != -100).sum(-1)
    expected = rankloss.chain_loss(
        scores,
        chain_sizes,
        ref_scores,
        beta=0.5,
        num_tokens=n,
        reduction=reduction,
        impl="reference",
        **variant,
    )
    (expected.loss * 1.7).backward()
    torch.testing.assert_close(out.loss, expected.loss.detach(), rtol=1e-9, atol=1e-10)
    for got, want in ((h.grad, rh.grad), (w.grad, rw.grad), (b.grad, rb.grad)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(out.rewards, expected.rewards)
    torch.testing.assert_close(out.kendall_tau, expected.kendall_tau)


def test_single_pass_in_float32_and_bf16_and_with_all_tokens_of_a_caption_ignored():
    chain_sizes = [2, 3]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        hidden, weight, bias, labels, ref_scores = _batch(chain_sizes, 7, 12, 41, seed=3, ignore_caption=2)
        h = hidden.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_()
        out = rankloss.fused_linear_chain_loss(h, w, labels, chain_sizes, ref_scores.float(), chunk_size=5)
        out.loss.backward()
        assert h.grad.dtype == dtype and w.grad.dtype == dtype and out.loss.dtype == torch.float32
        assert torch.all(h.grad[2] == 0)
        composed = rankloss.fused_linear_chain_loss(
            h.detach(), w.detach(), labels, chain_sizes, ref_scores.float(), reduction="none"
        )
        torch.testing.assert_close(out.loss, composed.loss.mean(), rtol=tol, atol=tol)


def test_single_pass_keeps_memory_to_one_group(largest_tensor):
    # 8 chains of 4 captions x 16 tokens; a cache of 40 rows holds less than one chain's 64 rows.
    chain_sizes, T, D, V = [4] * 8, 16, 8, 300
    hidden, weight, bias, labels, ref_scores = _batch(chain_sizes, T, D, V, dtype=torch.float32)
    labels[labels == -100] = 1  # every token scored
    hidden.requires_grad_()
    with largest_tensor() as probe:
        out = rankloss.fused_linear_chain_loss(
            hidden, weight, labels, chain_sizes, ref_scores.float(), chunk_size=8, cache_bytes=40 * V * 4
        )
        out.loss.backward()
    assert probe.largest <= max(8 * V, V * D, 32 * T * D), probe.largest


def test_single_pass_second_backward_raises_and_upstream_gradient_scales():
    """The single-pass gradients are handed to autograd once: a second backward (retain_graph=True) must
    fail loudly rather than return scaled-twice or stale gradients; a non-unit upstream gradient scales
    them."""
    chain_sizes = [3, 2]
    hidden, weight, _, labels, ref_scores = _batch(chain_sizes, 6, 10, 37, seed=5)
    h = hidden.clone().requires_grad_()
    out = rankloss.fused_linear_chain_loss(h, weight, labels, chain_sizes, ref_scores)
    (2.5 * out.loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once per forward"):
        out.loss.backward()
    ref = hidden.clone().requires_grad_()
    expected = rankloss.fused_linear_chain_loss(
        ref, weight, labels, chain_sizes, ref_scores, reduction="none"
    )
    (2.5 * expected.loss.mean()).backward()
    torch.testing.assert_close(h.grad, ref.grad, rtol=1e-9, atol=1e-12)
