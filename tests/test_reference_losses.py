"""The reference chain losses (rankloss.reference.losses) against DESIGN.md §2.

Everything here runs in float64 on CPU: gradient checks for every loss and option, the listwise
properties (K=2 Plackett-Luce is DPO-sigmoid, shift invariance, monotonicity), the analytic
Plackett-Luce gradient, LiPO weights without gradient, reductions, hand-computed metrics, and extreme
rewards.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from rankloss.reference import losses as R
from torch.autograd import gradcheck

F64 = torch.float64

# Chain-size patterns: one chain, many ragged chains, many chains of one size (K from 2 to 12).
chain_sizes_st = st.one_of(
    st.lists(st.integers(2, 12), min_size=1, max_size=1),
    st.lists(st.integers(2, 12), min_size=2, max_size=6),
    st.integers(2, 12).flatmap(lambda k: st.lists(st.just(k), min_size=2, max_size=5)),
)
# Gradient checks cost O(S) evaluations each: the same patterns with at most three chains.
gradcheck_sizes_st = st.one_of(
    st.lists(st.integers(2, 12), min_size=1, max_size=1),
    st.lists(st.integers(2, 12), min_size=2, max_size=3),
    st.integers(2, 12).flatmap(lambda k: st.lists(st.just(k), min_size=2, max_size=3)),
)
seed_st = st.integers(0, 2**31 - 1)


def make_scores(
    sizes: list[int], seed: int, *, scale: float = 1.0, dtype: torch.dtype = F64, grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy and reference scores ``[S]`` drawn from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    S = sum(sizes)
    scores = (scale * torch.randn(S, generator=g, dtype=F64)).to(dtype).requires_grad_(grad)
    ref = (scale * torch.randn(S, generator=g, dtype=F64)).to(dtype).requires_grad_(grad)
    return scores, ref


def min_pair_gap(r: torch.Tensor, sizes: list[int], target: float = 0.0) -> float:
    """Smallest ``|r_k - r_j - target|`` over the ordered pairs ``k < j`` of every chain."""
    gaps = []
    for rc in R.split_chains(r.detach(), sizes):
        d = rc[:, None] - rc[None, :] - target
        K = rc.numel()
        gaps.append(d[torch.triu(torch.ones(K, K, dtype=torch.bool), diagonal=1)].abs().min())
    return float(torch.stack(gaps).min())


def ref_of(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The reference scores among gradcheck's inputs ``(scores,)`` or ``(scores, ref_scores)``."""
    return inputs[1] if len(inputs) > 1 else None


# --------------------------------------------------------------------------------------------------
# Gradient checks (float64), every loss and option
# --------------------------------------------------------------------------------------------------
GRADCHECK = settings(max_examples=3)


@pytest.mark.parametrize("top_k", [None, 1, 2, 50])
@pytest.mark.parametrize("with_ref", [False, True])
@GRADCHECK
@given(sizes=gradcheck_sizes_st, seed=seed_st)
def test_gradcheck_plackett_luce(top_k, with_ref, sizes, seed):
    scores, ref = make_scores(sizes, seed, grad=True)
    inputs = (scores, ref) if with_ref else (scores,)
    assert gradcheck(lambda *x: R.plackett_luce_loss(x[0], sizes, ref_of(x), 0.7, top_k, "none"), inputs)


@pytest.mark.parametrize("pairs", R.PAIR_STRATEGIES)
@pytest.mark.parametrize("loss_type", R.DPO_LOSS_TYPES)
@pytest.mark.parametrize("with_ref", [False, True])
@GRADCHECK
@given(sizes=gradcheck_sizes_st, seed=seed_st)
def test_gradcheck_dpo(pairs, loss_type, with_ref, sizes, seed):
    beta = 0.5
    scores, ref = make_scores(sizes, seed, scale=2.0, grad=True)
    if loss_type == "hinge":  # keep every margin away from the kink at r_w - r_l = 1
        r = R.rewards(scores, ref if with_ref else None, beta)
        assume(min_pair_gap(r, sizes, target=1.0) > 1e-3)
    inputs = (scores, ref) if with_ref else (scores,)
    assert gradcheck(
        lambda *x: R.dpo_chain_loss(x[0], sizes, ref_of(x), beta, pairs, loss_type, "none"), inputs
    )


@pytest.mark.parametrize("with_ref", [False, True])
@settings(max_examples=6)
@given(sizes=gradcheck_sizes_st, seed=seed_st)
def test_gradcheck_lipo(with_ref, sizes, seed):
    beta = 0.5
    scores, ref = make_scores(sizes, seed, scale=2.0, grad=True)
    # the weights are piecewise constant in the ranks: keep rewards away from ties
    assume(min_pair_gap(R.rewards(scores, ref if with_ref else None, beta), sizes) > 1e-4)
    inputs = (scores, ref) if with_ref else (scores,)
    assert gradcheck(lambda *x: R.lipo_loss(x[0], sizes, ref_of(x), beta, "none"), inputs)


@pytest.mark.parametrize("loss", ["plackett_luce", "dpo", "lipo"])
@settings(max_examples=4)
@given(
    sizes=gradcheck_sizes_st, seed=seed_st, with_ref=st.booleans(), reduction=st.sampled_from(R.REDUCTIONS)
)
def test_gradcheck_chain_loss_with_sft(loss, sizes, seed, with_ref, reduction):
    scores, ref = make_scores(sizes, seed, scale=2.0, grad=True)
    assume(min_pair_gap(R.rewards(scores, ref if with_ref else None, 0.5), sizes) > 1e-4)
    num_tokens = torch.randint(0, 9, (sum(sizes),))  # 0 tokens is clamped to 1

    def fn(*x):
        out, _, _ = R.chain_loss(
            x[0], sizes, ref_of(x), loss=loss, beta=0.5, sft_weight=0.3,
            num_tokens=num_tokens, reduction=reduction,
        )  # fmt: skip
        return out

    assert gradcheck(fn, (scores, ref) if with_ref else (scores,))


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------
@settings(max_examples=15)
@given(num_chains=st.integers(1, 8), seed=seed_st, with_ref=st.booleans(), beta=st.floats(0.05, 3.0))
def test_plackett_luce_k2_equals_dpo_sigmoid(num_chains, seed, with_ref, beta):
    sizes = [2] * num_chains
    scores, ref = make_scores(sizes, seed, scale=3.0)
    ref = ref if with_ref else None
    pl = R.plackett_luce_loss(scores, sizes, ref, beta, None, "none")
    dpo = R.dpo_chain_loss(scores, sizes, ref, beta, "adjacent", "sigmoid", "none")
    r = R.rewards(scores, ref, beta).view(-1, 2)
    explicit = -F.logsigmoid(r[:, 0] - r[:, 1])
    torch.testing.assert_close(pl, dpo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pl, explicit, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "loss, options",
    [
        ("plackett_luce", {}),
        ("plackett_luce", {"top_k": 2}),
        ("dpo", {"pairs": "all", "loss_type": "sigmoid"}),
        ("dpo", {"pairs": "adjacent", "loss_type": "ipo"}),
        ("lipo", {}),
    ],
)
@settings(max_examples=10)
@given(sizes=chain_sizes_st, seed=seed_st, with_ref=st.booleans())
def test_shift_invariance_per_chain(loss, options, sizes, seed, with_ref):
    """Adding a constant to every score of a chain (a different constant per chain) changes nothing."""
    scores, ref = make_scores(sizes, seed)
    ref = ref if with_ref else None
    shifts = torch.randn(len(sizes), dtype=F64) * 50
    shifted = scores + torch.repeat_interleave(shifts, torch.tensor(sizes))
    fn = {"plackett_luce": R.plackett_luce_loss, "dpo": R.dpo_chain_loss, "lipo": R.lipo_loss}[loss]
    a = fn(scores, sizes, ref, beta=0.3, reduction="none", **options)
    b = fn(shifted, sizes, ref, beta=0.3, reduction="none", **options)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "fn, strict",
    [
        (lambda s, n, r: R.plackett_luce_loss(s, n, r, 0.5, None, "none"), True),
        (lambda s, n, r: R.plackett_luce_loss(s, n, r, 0.5, 1, "none"), True),
        (lambda s, n, r: R.plackett_luce_loss(s, n, r, 0.5, 3, "none"), True),
        *[
            (lambda s, n, r, p=p: R.dpo_chain_loss(s, n, r, 0.5, p, "sigmoid", "none"), True)
            for p in R.PAIR_STRATEGIES
        ],
        *[
            (lambda s, n, r, p=p: R.dpo_chain_loss(s, n, r, 0.5, p, "hinge", "none"), False)
            for p in R.PAIR_STRATEGIES
        ],
    ],
)
@settings(max_examples=10)
@given(sizes=chain_sizes_st, seed=seed_st, delta=st.floats(0.01, 5.0), with_ref=st.booleans())
def test_raising_best_reward_lowers_loss(fn, strict, sizes, seed, delta, with_ref):
    scores, ref = make_scores(sizes, seed)
    ref = ref if with_ref else None
    starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    raised = scores.clone()
    raised[starts] += delta
    before, after = fn(scores, sizes, ref), fn(raised, sizes, ref)
    if strict:
        assert bool((after < before).all()), (before, after)
    else:
        assert bool((after <= before).all()), (before, after)


@settings(max_examples=10)
@given(sizes=chain_sizes_st, seed=seed_st, delta=st.floats(0.01, 5.0))
def test_lipo_raising_best_reward_lowers_loss_when_ranks_hold(sizes, seed, delta):
    """With the best caption already ranked first, raising its reward keeps the weights, lowers the loss."""
    scores, _ = make_scores(sizes, seed)
    starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    for a, k in zip(starts.tolist(), sizes):
        scores[a] = scores[a : a + k].max() + 0.1
    raised = scores.clone()
    raised[starts] += delta
    before = R.lipo_loss(scores, sizes, None, 0.5, "none")
    after = R.lipo_loss(raised, sizes, None, 0.5, "none")
    assert bool((after < before).all()), (before, after)


@settings(max_examples=10)
@given(sizes=chain_sizes_st, seed=seed_st, with_ref=st.booleans())
def test_lipo_weights_carry_no_gradient(sizes, seed, with_ref):
    scores, ref = make_scores(sizes, seed, scale=2.0, grad=True)
    ref = ref if with_ref else None
    loss = R.lipo_loss(scores, sizes, ref, 0.5, "sum")
    (grad,) = torch.autograd.grad(loss, scores)

    # The same loss with the weights computed beforehand and fed in as constants.
    r = R.rewards(scores, ref, 0.5)
    constant_weights = [R.lipo_weights(rc).clone() for rc in R.split_chains(r.detach(), sizes)]
    assert not any(w.requires_grad for w in constant_weights)
    assert not R.lipo_weights(r[: sizes[0]]).requires_grad
    total = sum(
        (w * F.softplus(-(rc[:, None] - rc[None, :]))).sum()
        for w, rc in zip(constant_weights, R.split_chains(r, sizes))
    )
    (expected,) = torch.autograd.grad(total, scores)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_lipo_weights_hand_computed():
    # K = 3, rewards in chain order: ranks 1, 2, 3; psi = 1, 1/2, 0; G = 1, sqrt(2) - 1, 0; D = log2(2..4).
    w = R.lipo_weights(torch.tensor([3.0, 2.0, 1.0], dtype=F64))
    G = [1.0, math.sqrt(2) - 1, 0.0]
    D = [1.0, math.log2(3), 2.0]
    expected = torch.zeros(3, 3, dtype=F64)
    for k in range(3):
        for j in range(k + 1, 3):
            expected[k, j] = abs(G[k] - G[j]) * abs(1 / D[k] - 1 / D[j])
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)
    # Reversed rewards: ranks 3, 2, 1 (the discounts follow the rewards, the gains the chain order).
    w_rev = R.lipo_weights(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    D_rev = [2.0, math.log2(3), 1.0]
    assert w_rev[0, 2].item() == pytest.approx(abs(G[0] - G[2]) * abs(1 / D_rev[0] - 1 / D_rev[2]))
    # Ties go to the earlier caption: equal rewards rank like the chain order.
    torch.testing.assert_close(R.lipo_weights(torch.zeros(3, dtype=F64)), expected, rtol=1e-12, atol=1e-12)
    # A two-caption chain: |G_1 - G_2| |1/D_1 - 1/D_2| softplus(-m) = (1 - 1/log2(3)) softplus(-m).
    r = torch.tensor([0.3, -0.2], dtype=F64)
    loss = R.lipo_loss(r, [2], None, 1.0, "none")
    assert loss.item() == pytest.approx((1 - 1 / math.log2(3)) * math.log1p(math.exp(-0.5)), rel=1e-12)


@pytest.mark.parametrize(
    "loss, options",
    [("plackett_luce", {"top_k": None}), ("plackett_luce", {"top_k": 2})]
    + [("dpo", {"pairs": p, "loss_type": t}) for p in R.PAIR_STRATEGIES for t in R.DPO_LOSS_TYPES]
    + [("lipo", {})],
)
@settings(max_examples=5)
@given(sizes=chain_sizes_st, seed=seed_st, with_ref=st.booleans())
def test_reduction_consistency(loss, options, sizes, seed, with_ref):
    scores, ref = make_scores(sizes, seed)
    ref = ref if with_ref else None
    fn = {"plackett_luce": R.plackett_luce_loss, "dpo": R.dpo_chain_loss, "lipo": R.lipo_loss}[loss]
    none = fn(scores, sizes, ref, beta=0.4, reduction="none", **options)
    assert none.shape == (len(sizes),)
    torch.testing.assert_close(fn(scores, sizes, ref, beta=0.4, reduction="sum", **options), none.sum())
    torch.testing.assert_close(fn(scores, sizes, ref, beta=0.4, reduction="mean", **options), none.mean())


def test_reduce_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction must be one of"):
        R.reduce(torch.ones(2), "max")


# --------------------------------------------------------------------------------------------------
# Plackett-Luce: analytic gradient (DESIGN.md §2) and special cases
# --------------------------------------------------------------------------------------------------
def analytic_pl_grad(r: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """``dL/dr_j = -[j <= m] + exp(r_j) * sum_{k <= min(j, m)} 1/Z_k`` (1-based), ``m = min(top_k, K - 1)``.

    ``Z_k = sum_{i >= k} exp(r_i)``; computed in log space as ``exp(r_j - log Z_k)``.
    """
    K = r.numel()
    m = K - 1 if top_k is None else min(top_k, K - 1)
    log_z = torch.stack([torch.logsumexp(r[k:], dim=0) for k in range(K)])  # 0-based: log Z_{k+1}
    grad = torch.zeros_like(r)
    for j in range(K):  # 0-based j is caption j + 1
        grad[j] = -(1.0 if j < m else 0.0) + sum(torch.exp(r[j] - log_z[k]) for k in range(min(j + 1, m)))
    return grad


@pytest.mark.parametrize("top_k", [None, 1, 2, 5, 100])
@settings(max_examples=10)
@given(sizes=chain_sizes_st, seed=seed_st, scale=st.sampled_from([0.5, 3.0, 30.0]))
def test_plackett_luce_analytic_gradient(top_k, sizes, seed, scale):
    r, _ = make_scores(sizes, seed, scale=scale, grad=True)
    loss = R.plackett_luce_loss(r, sizes, None, 1.0, top_k, "sum")  # beta = 1: scores are rewards
    (grad,) = torch.autograd.grad(loss, r)
    expected = torch.cat([analytic_pl_grad(rc, top_k) for rc in R.split_chains(r.detach(), sizes)])
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=10)
@given(sizes=chain_sizes_st, seed=seed_st)
def test_plackett_luce_top_k_special_cases(sizes, seed):
    r, _ = make_scores(sizes, seed)
    full = R.plackett_luce_loss(r, sizes, None, 1.0, None, "none")
    torch.testing.assert_close(R.plackett_luce_loss(r, sizes, None, 1.0, max(sizes) - 1, "none"), full)
    torch.testing.assert_close(R.plackett_luce_loss(r, sizes, None, 1.0, 10**6, "none"), full)
    top1 = torch.stack([-torch.log_softmax(rc, 0)[0] for rc in R.split_chains(r, sizes)])
    torch.testing.assert_close(R.plackett_luce_loss(r, sizes, None, 1.0, 1, "none"), top1)
    # the full loss is the negative log-likelihood of the whole order: sum over positions of -log softmax
    nll = torch.stack(
        [-sum(torch.log_softmax(rc[k:], 0)[0] for k in range(rc.numel())) for rc in R.split_chains(r, sizes)]
    )
    torch.testing.assert_close(full, nll)


def test_dpo_pair_strategies_and_loss_types_hand_computed():
    assert R.chain_pairs(4, "adjacent") == [(0, 1), (1, 2), (2, 3)]
    assert R.chain_pairs(4, "all") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert R.chain_pairs(4, "best_worst") == [(0, 3)]
    assert R.chain_pairs(4, "best_rest") == [(0, 1), (0, 2), (0, 3)]
    assert R.chain_pairs(2, "best_worst") == R.chain_pairs(2, "adjacent") == [(0, 1)]
    with pytest.raises(ValueError, match="pairs must be one of"):
        R.chain_pairs(3, "random")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        R.dpo_pair_loss(torch.zeros(1), 0.1, "logistic")

    # beta = 0.5, scores 4, 2, 1 -> rewards 2, 1, 0.5; adjacent margins 1, 0.5; best_worst margin 1.5.
    s = torch.tensor([4.0, 2.0, 1.0], dtype=F64)
    sig = lambda m: math.log1p(math.exp(-m))
    ipo = lambda m: (m / 0.5 - 1 / (2 * 0.5)) ** 2
    cases = {
        ("adjacent", "sigmoid"): (sig(1.0) + sig(0.5)) / 2,
        ("all", "sigmoid"): (sig(1.0) + sig(1.5) + sig(0.5)) / 3,
        ("best_worst", "hinge"): 0.0,
        ("best_rest", "hinge"): (0.0 + 0.0) / 2,
        ("adjacent", "hinge"): (0.0 + 0.5) / 2,
        ("all", "ipo"): (ipo(1.0) + ipo(1.5) + ipo(0.5)) / 3,
        ("best_rest", "ipo"): (ipo(1.0) + ipo(1.5)) / 2,
    }
    for (pairs, loss_type), expected in cases.items():
        got = R.dpo_chain_loss(s, [3], None, 0.5, pairs, loss_type, "none")
        assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-12), (pairs, loss_type)


# --------------------------------------------------------------------------------------------------
# SFT term and metrics
# --------------------------------------------------------------------------------------------------
def test_sft_term_hand_computed():
    scores = torch.tensor([-6.0, -9.0, -1.0, -4.0, -2.0], dtype=F64)
    num_tokens = torch.tensor([3, 2, 0, 7, 7])  # the second chain's best caption has no scored token
    sizes = [2, 3]
    torch.testing.assert_close(R.sft_loss(scores, num_tokens, sizes), torch.tensor([2.0, 1.0], dtype=F64))
    base, _, _ = R.chain_loss(scores, sizes, None, loss="plackett_luce", beta=0.2, reduction="none")
    with_sft, per_chain, metrics = R.chain_loss(
        scores,
        sizes,
        None,
        loss="plackett_luce",
        beta=0.2,
        sft_weight=0.5,
        num_tokens=num_tokens,
        reduction="none",
    )
    torch.testing.assert_close(with_sft, base + 0.5 * torch.tensor([2.0, 1.0], dtype=F64))
    torch.testing.assert_close(per_chain, with_sft)
    torch.testing.assert_close(metrics["sft_loss"], torch.tensor([2.0, 1.0], dtype=F64))


def test_metrics_hand_computed():
    r = torch.tensor(
        [3.0, 2.0, 1.0]  # perfect order
        + [1.0, 2.0, 3.0]  # reversed
        + [2.0, 3.0, 1.0]  # P = 2 ((1,3), (2,3)), Q = 1 ((1,2))
        + [1.0, 1.0]  # a tie: half a pair; the best shares the top with one other caption
        + [5.0, 4.0, 3.0, 2.0]
        + [2.0, 2.0, 2.0, 1.0]  # three tied at the top: P = 3, T = 3 -> (3 + 1.5) / 6; top-1 1/3
        + [2.0, 3.0, 3.0],  # beaten: top-1 0; P = 0, Q = 2, T = 1 -> 0.5 / 3
        dtype=F64,
    )
    sizes = [3, 3, 3, 2, 4, 4, 3]
    m = R.chain_metrics(r, sizes)
    f = lambda *v: torch.tensor(v, dtype=F64)
    torch.testing.assert_close(m["pairwise_accuracy"], f(1.0, 0.0, 2 / 3, 0.5, 1.0, 4.5 / 6, 0.5 / 3))
    torch.testing.assert_close(m["top1_accuracy"], f(1.0, 0.0, 0.0, 0.5, 1.0, 1 / 3, 0.0))
    torch.testing.assert_close(m["kendall_tau"], f(1.0, -1.0, 1 / 3, 0.0, 1.0, 0.5, -2 / 3))
    torch.testing.assert_close(m["neighbour_margin"], f(1.0, -1.0, 0.5, 0.0, 1.0, 1 / 3, -0.5))
    # position 1: 3, 1, 2, 1, 5, 2, 2; position 2: 2, 2, 3, 1, 4, 2, 3; position 3: 1, 3, 1, 3, 2, 3;
    # position 4: 2, 1
    torch.testing.assert_close(m["reward_per_position"], f(16 / 7, 17 / 7, 13 / 6, 1.5))


def test_metrics_ragged_reward_per_position():
    r = torch.tensor([3.0, 2.0, 1.0, 1.0, 2.0, 5.0, 4.0, 3.0, 2.0], dtype=F64)
    m = R.chain_metrics(r, [3, 2, 4])
    torch.testing.assert_close(m["reward_per_position"], torch.tensor([3.0, 8 / 3, 2.0, 2.0], dtype=F64))
    torch.testing.assert_close(m["top1_accuracy"], torch.tensor([1.0, 0.0, 1.0], dtype=F64))


def test_chain_loss_metrics_are_detached_and_rewards_scaled():
    scores, ref = make_scores([3, 4], 7, grad=True)
    _, _, m = R.chain_loss(scores, [3, 4], ref, loss="lipo", beta=0.25)
    torch.testing.assert_close(m["rewards"], 0.25 * (scores - ref).detach())
    assert not any(v.requires_grad for v in m.values())


def test_chain_loss_rejects_unknown_loss():
    with pytest.raises(ValueError, match="loss must be"):
        R.chain_loss(torch.zeros(2, dtype=F64), [2], loss="listnet")


# --------------------------------------------------------------------------------------------------
# Extreme rewards (|r| ~ 1e4): finite losses and gradients
# --------------------------------------------------------------------------------------------------
EXTREME_LOSSES = {
    "plackett_luce": lambda s, n: R.plackett_luce_loss(s, n, None, 1.0, None, "sum"),
    "plackett_luce_top2": lambda s, n: R.plackett_luce_loss(s, n, None, 1.0, 2, "sum"),
    "dpo_sigmoid_all": lambda s, n: R.dpo_chain_loss(s, n, None, 1.0, "all", "sigmoid", "sum"),
    "lipo": lambda s, n: R.lipo_loss(s, n, None, 1.0, "sum"),
}


@pytest.mark.parametrize("name", list(EXTREME_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@settings(max_examples=10)
@given(sizes=chain_sizes_st, seed=seed_st)
def test_extreme_rewards_finite(name, dtype, sizes, seed):
    scores, _ = make_scores(sizes, seed, scale=1e4, dtype=dtype, grad=True)
    loss = EXTREME_LOSSES[name](scores, sizes)
    (grad,) = torch.autograd.grad(loss, scores)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert grad.dtype == dtype


def test_extreme_rewards_values():
    s = torch.tensor([1e4, -1e4, -1e4, 1e4], dtype=F64)
    pl = R.plackett_luce_loss(s, [2, 2], None, 1.0, None, "none")
    torch.testing.assert_close(pl, torch.tensor([0.0, 2e4], dtype=F64))
    dpo = R.dpo_chain_loss(s, [2, 2], None, 1.0, "adjacent", "sigmoid", "none")
    torch.testing.assert_close(dpo, torch.tensor([0.0, 2e4], dtype=F64))
    lipo = R.lipo_loss(s, [2, 2], None, 1.0, "none")
    torch.testing.assert_close(lipo, torch.tensor([0.0, (1 - 1 / math.log2(3)) * 2e4], dtype=F64))
