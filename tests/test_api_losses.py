"""Public chain losses (rankloss.plackett_luce_loss, dpo_chain_loss, lipo_loss, chain_loss, modules).

Whatever path the public API routes to, it must agree with the reference in float64, pass
``gradcheck`` for every loss, option and reduction, honour the dtype contract, keep the metrics
detached, stay finite on all-ignored chains and extreme rewards, and the modules must only route.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from rankloss.reference import losses as R
from torch.autograd import gradcheck

import rankloss

F64 = torch.float64
IGNORE = -100

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

# Every loss and option, as keyword arguments of rankloss.chain_loss.
LOSS_OPTIONS = (
    [{"loss": "plackett_luce", "top_k": k} for k in (None, 1, 2, 50)]
    + [{"loss": "dpo", "pairs": p, "dpo_loss_type": t} for p in R.PAIR_STRATEGIES for t in R.DPO_LOSS_TYPES]
    + [{"loss": "lipo"}]
)


def option_id(options: dict) -> str:
    return "-".join(str(v) for v in options.values())


def make_scores(
    sizes: list[int], seed: int, *, scale: float = 1.0, dtype: torch.dtype = F64, grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    S = sum(sizes)
    scores = (scale * torch.randn(S, generator=g, dtype=F64)).to(dtype).requires_grad_(grad)
    ref = (scale * torch.randn(S, generator=g, dtype=F64)).to(dtype).requires_grad_(grad)
    return scores, ref


def min_pair_gap(r: torch.Tensor, sizes: list[int], target: float = 0.0) -> float:
    """Smallest ``|r_k - r_j - target|`` over the ordered pairs ``k < j`` of every chain."""
    gaps = []
    for rc in R.split_chains(r.detach(), sizes):
        K = rc.numel()
        d = rc[:, None] - rc[None, :] - target
        gaps.append(d[torch.triu(torch.ones(K, K, dtype=torch.bool), diagonal=1)].abs().min())
    return float(torch.stack(gaps).min())


def reference_kwargs(options: dict) -> dict:
    """chain_loss options under rankloss.reference.chain_loss's names."""
    out = dict(options)
    if "dpo_loss_type" in out:
        out["loss_type"] = out.pop("dpo_loss_type")
    return out


# --------------------------------------------------------------------------------------------------
# Agreement with the reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", LOSS_OPTIONS, ids=option_id)
@settings(max_examples=4)
@given(
    sizes=chain_sizes_st,
    seed=seed_st,
    with_ref=st.booleans(),
    reduction=st.sampled_from(R.REDUCTIONS),
    sft_weight=st.sampled_from([0.0, 0.25]),
)
def test_matches_reference(options, sizes, seed, with_ref, reduction, sft_weight):
    scores, ref = make_scores(sizes, seed, scale=2.0)
    ref = ref if with_ref else None
    num_tokens = torch.randint(1, 20, (sum(sizes),)) if sft_weight else None
    common = dict(beta=0.3, sft_weight=sft_weight, num_tokens=num_tokens, reduction=reduction)
    out = rankloss.chain_loss(scores, sizes, ref, **options, **common)
    loss, per_chain, m = R.chain_loss(scores, sizes, ref, **reference_kwargs(options), **common)
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, loss, **tol)
    torch.testing.assert_close(out.chain_losses, per_chain, **tol)
    for name in ("rewards", "pairwise_accuracy", "top1_accuracy", "kendall_tau", "neighbour_margin"):
        torch.testing.assert_close(getattr(out, name), m[name], **tol)
    torch.testing.assert_close(out.reward_per_position, m["reward_per_position"], **tol)
    if sft_weight:
        torch.testing.assert_close(out.sft_loss, m["sft_loss"], **tol)
    else:
        assert out.sft_loss is None


@settings(max_examples=10)
@given(sizes=chain_sizes_st, seed=seed_st, with_ref=st.booleans())
def test_specific_functions_equal_chain_loss(sizes, seed, with_ref):
    scores, ref = make_scores(sizes, seed)
    ref = ref if with_ref else None
    pl = rankloss.plackett_luce_loss(scores, sizes, ref, beta=0.2, top_k=2, reduction="none")
    assert torch.equal(
        pl.loss, rankloss.chain_loss(scores, sizes, ref, beta=0.2, top_k=2, reduction="none").loss
    )
    for pairs in R.PAIR_STRATEGIES:
        for loss_type in R.DPO_LOSS_TYPES:
            dpo = rankloss.dpo_chain_loss(scores, sizes, ref, beta=0.2, pairs=pairs, loss_type=loss_type)
            via_chain = rankloss.chain_loss(
                scores, sizes, ref, loss="dpo", beta=0.2, pairs=pairs, dpo_loss_type=loss_type
            )
            alias = rankloss.chain_loss(
                scores, sizes, ref, loss="dpo", beta=0.2, pairs=pairs, loss_type=loss_type
            )
            assert torch.equal(dpo.loss, via_chain.loss) and torch.equal(dpo.loss, alias.loss)
    lipo = rankloss.lipo_loss(scores, sizes, ref, beta=0.2)
    assert torch.equal(lipo.loss, rankloss.chain_loss(scores, sizes, ref, loss="lipo", beta=0.2).loss)
    # chain_sizes as a list, a tuple or an integer tensor
    for form in (tuple(sizes), torch.tensor(sizes), torch.tensor(sizes, dtype=torch.int32)):
        assert torch.equal(rankloss.lipo_loss(scores, form, ref, beta=0.2).loss, lipo.loss)


def test_defaults_match_design():
    """beta=0.1, Plackett-Luce over the full list, adjacent pairs, sigmoid, mean over chains."""
    scores, ref = make_scores([3, 5], 11)
    out = rankloss.chain_loss(scores, [3, 5], ref)
    torch.testing.assert_close(out.loss, R.plackett_luce_loss(scores, [3, 5], ref, 0.1, None, "mean"))
    dpo = rankloss.dpo_chain_loss(scores, [3, 5], ref)
    torch.testing.assert_close(
        dpo.loss, R.dpo_chain_loss(scores, [3, 5], ref, 0.1, "adjacent", "sigmoid", "mean")
    )
    torch.testing.assert_close(
        rankloss.lipo_loss(scores, [3, 5], ref).loss, R.lipo_loss(scores, [3, 5], ref, 0.1)
    )


@settings(max_examples=10)
@given(num_chains=st.integers(1, 6), seed=seed_st, with_ref=st.booleans())
def test_plackett_luce_k2_equals_dpo_sigmoid(num_chains, seed, with_ref):
    sizes = [2] * num_chains
    scores, ref = make_scores(sizes, seed, scale=3.0, grad=True)
    ref = ref if with_ref else None
    pl = rankloss.plackett_luce_loss(scores, sizes, ref, beta=0.7, reduction="none").loss
    dpo = rankloss.dpo_chain_loss(scores, sizes, ref, beta=0.7, reduction="none").loss
    torch.testing.assert_close(pl, dpo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(pl.sum(), scores)[0],
        torch.autograd.grad(dpo.sum(), scores)[0],
        rtol=1e-12,
        atol=1e-12,
    )


@settings(max_examples=10)
@given(sizes=chain_sizes_st, seed=seed_st, with_ref=st.booleans())
def test_lipo_weights_carry_no_gradient(sizes, seed, with_ref):
    """The gradient is the one of sum_{k<j} w_kj softplus(r_j - r_k) with the weights fed in as constants."""
    scores, ref = make_scores(sizes, seed, scale=2.0, grad=True)
    ref = ref if with_ref else None
    (grad,) = torch.autograd.grad(
        rankloss.lipo_loss(scores, sizes, ref, beta=0.5, reduction="sum").loss, scores
    )
    r = 0.5 * (scores - ref if ref is not None else scores)
    total = 0.0
    for rc in R.split_chains(r, sizes):
        K = rc.numel()
        position = torch.arange(K, dtype=F64)
        gain = 2.0 ** ((K - 1 - position) / (K - 1)) - 1
        rank = torch.empty(K, dtype=F64)
        rank[torch.argsort(-rc.detach(), stable=True)] = position + 1  # ties: the earlier caption ranks first
        inv_discount = 1 / torch.log2(1 + rank)
        w = torch.triu(
            (gain[:, None] - gain[None, :]).abs() * (inv_discount[:, None] - inv_discount[None, :]).abs(), 1
        )
        total = total + (w * torch.nn.functional.softplus(rc[None, :] - rc[:, None])).sum()
    (expected,) = torch.autograd.grad(total, scores)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Gradient checks through the public API (float64): every loss, option and reduction
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", R.REDUCTIONS)
@pytest.mark.parametrize("options", LOSS_OPTIONS, ids=option_id)
@settings(max_examples=2)
@given(sizes=gradcheck_sizes_st, seed=seed_st, with_ref=st.booleans())
def test_gradcheck(options, reduction, sizes, seed, with_ref):
    beta = 0.5
    scores, ref = make_scores(sizes, seed, scale=2.0, grad=True)
    r = R.rewards(scores, ref if with_ref else None, beta)
    if options.get("dpo_loss_type") == "hinge":  # away from the kink at margin 1
        assume(min_pair_gap(r, sizes, target=1.0) > 1e-3)
    if options["loss"] == "lipo":  # LiPO weights jump where two rewards tie
        assume(min_pair_gap(r, sizes) > 1e-4)

    def fn(*x):
        return rankloss.chain_loss(
            x[0], sizes, x[1] if len(x) > 1 else None, beta=beta, reduction=reduction, **options
        ).loss

    assert gradcheck(fn, (scores, ref) if with_ref else (scores,))


@pytest.mark.parametrize("loss", rankloss.CHAIN_LOSSES)
@settings(max_examples=3)
@given(
    sizes=gradcheck_sizes_st, seed=seed_st, with_ref=st.booleans(), reduction=st.sampled_from(R.REDUCTIONS)
)
def test_gradcheck_with_sft(loss, sizes, seed, with_ref, reduction):
    scores, ref = make_scores(sizes, seed, scale=2.0, grad=True)
    assume(min_pair_gap(R.rewards(scores, ref if with_ref else None, 0.5), sizes) > 1e-4)
    num_tokens = torch.randint(0, 9, (sum(sizes),))

    def fn(*x):
        return rankloss.chain_loss(
            x[0], sizes, x[1] if len(x) > 1 else None, loss=loss, beta=0.5, sft_weight=0.7,
            num_tokens=num_tokens, reduction=reduction,
        ).loss  # fmt: skip

    assert gradcheck(fn, (scores, ref) if with_ref else (scores,))


# --------------------------------------------------------------------------------------------------
# Reductions, SFT term, output object, dtypes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", LOSS_OPTIONS, ids=option_id)
@settings(max_examples=3)
@given(sizes=chain_sizes_st, seed=seed_st, with_ref=st.booleans(), sft_weight=st.sampled_from([0.0, 0.5]))
def test_reduction_consistency(options, sizes, seed, with_ref, sft_weight):
    scores, ref = make_scores(sizes, seed)
    ref = ref if with_ref else None
    nt = torch.randint(1, 9, (sum(sizes),))
    run = lambda red: rankloss.chain_loss(
        scores, sizes, ref, beta=0.4, sft_weight=sft_weight, num_tokens=nt, reduction=red, **options
    )
    none = run("none")
    assert none.loss.shape == (len(sizes),)
    torch.testing.assert_close(none.loss, none.chain_losses)
    torch.testing.assert_close(run("sum").loss, none.loss.sum())
    torch.testing.assert_close(run("mean").loss, none.loss.mean())


def test_sft_term():
    scores = torch.tensor([-6.0, -9.0, -1.0, -4.0, -2.0], dtype=F64)
    num_tokens = torch.tensor([3, 2, 0, 7, 7])
    sizes = [2, 3]
    base = rankloss.plackett_luce_loss(scores, sizes, beta=0.2, reduction="none")
    out = rankloss.plackett_luce_loss(
        scores, sizes, beta=0.2, sft_weight=0.5, num_tokens=num_tokens, reduction="none"
    )
    sft = torch.tensor([6.0 / 3, 1.0 / 1], dtype=F64)  # -s_1 / n_1, n_1 = 0 clamped to 1
    torch.testing.assert_close(out.sft_loss, sft)
    torch.testing.assert_close(out.loss, base.loss + 0.5 * sft)
    # num_tokens may be float (e.g. ones for already length-normalised scores)
    out = rankloss.lipo_loss(scores, sizes, sft_weight=1.0, num_tokens=torch.ones(5), reduction="none")
    torch.testing.assert_close(out.sft_loss, torch.tensor([6.0, 1.0], dtype=F64))


def test_output_object():
    sizes = [3, 2, 5]
    scores, ref = make_scores(sizes, 3, grad=True)
    out = rankloss.chain_loss(scores, sizes, ref, loss="dpo", pairs="all", beta=0.5)
    assert isinstance(out, rankloss.ChainLossOutput)
    assert out.loss.shape == () and out.loss.requires_grad
    assert out.chain_losses.shape == (3,) and out.rewards.shape == (10,)
    for name in ("pairwise_accuracy", "top1_accuracy", "kendall_tau", "neighbour_margin"):
        assert getattr(out, name).shape == (3,), name
    assert out.reward_per_position.shape == (5,)
    for name, value in out._asdict().items():
        if name != "loss" and value is not None:
            assert not value.requires_grad, name
    torch.testing.assert_close(out.rewards, 0.5 * (scores - ref).detach())
    metrics = out.metrics(prefix="train/")
    assert set(metrics) == {
        "train/loss",
        "train/pairwise_accuracy",
        "train/top1_accuracy",
        "train/kendall_tau",
        "train/neighbour_margin",
        *(f"train/reward_pos{k}" for k in range(1, 6)),
    }
    assert metrics["train/loss"] == pytest.approx(out.loss.item())
    assert metrics["train/kendall_tau"] == pytest.approx(out.kendall_tau.mean().item())
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


def test_metrics_hand_computed_through_api():
    # rewards = scores with beta = 1: chains [3, 2, 1] (perfect), [2, 3, 1], and ragged [1, 2]
    scores = torch.tensor([3.0, 2.0, 1.0, 2.0, 3.0, 1.0, 1.0, 2.0])
    out = rankloss.plackett_luce_loss(scores, [3, 3, 2], beta=1.0)
    torch.testing.assert_close(out.pairwise_accuracy, torch.tensor([1.0, 2 / 3, 0.0]))
    torch.testing.assert_close(out.top1_accuracy, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(out.kendall_tau, torch.tensor([1.0, 1 / 3, -1.0]))
    torch.testing.assert_close(out.neighbour_margin, torch.tensor([1.0, 0.5, -1.0]))
    torch.testing.assert_close(out.reward_per_position, torch.tensor([2.0, 7 / 3, 1.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [LOSS_OPTIONS[0], LOSS_OPTIONS[4], LOSS_OPTIONS[-1]], ids=option_id)
def test_dtype_contract(dtype, options):
    sizes = [4, 2, 7]
    s64, r64 = make_scores(sizes, 9, scale=5.0)
    scores = s64.to(dtype).requires_grad_()
    ref = r64.to(dtype)
    out = rankloss.chain_loss(scores, sizes, ref, beta=0.5, **options)
    assert out.loss.dtype == torch.float32
    assert out.rewards.dtype == out.pairwise_accuracy.dtype == torch.float32
    out.loss.backward()
    assert scores.grad.dtype == dtype
    # the same rounded inputs in float64
    truth_scores = scores.detach().to(F64).requires_grad_()
    truth = rankloss.chain_loss(truth_scores, sizes, ref.to(F64), beta=0.5, **options)
    truth.loss.backward()
    torch.testing.assert_close(out.loss.to(F64), truth.loss, rtol=1e-5, atol=1e-5)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(scores.grad.to(F64), truth_scores.grad, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------------
# End to end: a chain whose captions have no scored token; extreme rewards
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length_normalize", [False, True])
@pytest.mark.parametrize("options", LOSS_OPTIONS, ids=option_id)
def test_all_ignored_chain_is_finite_end_to_end(options, length_normalize):
    sizes = [3, 2, 4]
    S, T, D, V = sum(sizes), 6, 5, 23
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(S, T, D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (S, T), generator=g)
    labels[:, :2] = IGNORE
    labels[3:5] = IGNORE  # the second chain: every token of every caption ignored
    ref_scores = -torch.rand(S, generator=g) * 10
    ref_scores[3:5] = 0.0

    token_logps = rankloss.linear_token_logprobs(hidden, weight, labels)
    scores = rankloss.sequence_logprobs(token_logps, labels, length_normalize=length_normalize)
    assert torch.equal(scores[3:5].detach(), torch.zeros(2))
    num_tokens = (labels != IGNORE).sum(-1)
    for ref in (None, ref_scores):
        out = rankloss.chain_loss(
            scores, sizes, ref, beta=0.5, sft_weight=0.3, num_tokens=num_tokens, reduction="none", **options
        )
        assert torch.isfinite(out.loss).all(), out.loss
        assert all(torch.isfinite(v).all() for v in out._asdict().values() if v is not None)
        grads = torch.autograd.grad(out.loss.sum(), (hidden, weight), retain_graph=True)
        assert all(torch.isfinite(gr).all() for gr in grads)
        assert bool((grads[0][3:5] == 0).all())  # the ignored chain's hidden states get no gradient


EXTREME = [
    {"loss": "plackett_luce"},
    {"loss": "plackett_luce", "top_k": 2},
    {"loss": "dpo", "pairs": "all", "dpo_loss_type": "sigmoid"},
    {"loss": "dpo", "pairs": "adjacent", "dpo_loss_type": "sigmoid"},
    {"loss": "lipo"},
]


@pytest.mark.parametrize("options", EXTREME, ids=option_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@settings(max_examples=5)
@given(sizes=chain_sizes_st, seed=seed_st, with_ref=st.booleans())
def test_extreme_rewards_finite(options, dtype, sizes, seed, with_ref):
    scores, ref = make_scores(sizes, seed, scale=1e5, dtype=dtype, grad=True)  # beta 0.1: |r| ~ 1e4
    out = rankloss.chain_loss(scores, sizes, ref if with_ref else None, beta=0.1, **options)
    (grad,) = torch.autograd.grad(out.loss, scores)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert torch.isfinite(out.rewards).all() and out.rewards.abs().max() > 1e3


# --------------------------------------------------------------------------------------------------
# Modules only route
# --------------------------------------------------------------------------------------------------
MODULE_CASES = [
    (rankloss.PlackettLuceLoss, {"beta": 0.3, "top_k": 2, "reduction": "sum"}, rankloss.plackett_luce_loss),
    (
        rankloss.DPOChainLoss,
        {"beta": 0.3, "pairs": "best_rest", "loss_type": "ipo", "reduction": "none"},
        rankloss.dpo_chain_loss,
    ),
    (rankloss.LiPOLoss, {"beta": 0.3, "sft_weight": 0.5, "reduction": "mean"}, rankloss.lipo_loss),
]


@pytest.mark.parametrize(
    "module_cls, kwargs, functional", MODULE_CASES, ids=lambda v: getattr(v, "__name__", "")
)
def test_modules_route_to_functional(module_cls, kwargs, functional, monkeypatch):
    sizes = [3, 4]
    scores, ref = make_scores(sizes, 1, grad=True)
    num_tokens = torch.tensor([4, 5, 6, 7, 1, 2, 3])
    module = module_cls(**kwargs)
    got = module(scores, sizes, ref, num_tokens=num_tokens)
    expected = functional(scores, sizes, ref, num_tokens=num_tokens, **kwargs)
    for a, b in zip(got, expected):
        assert (a is None and b is None) or torch.equal(a, b)
    (g1,) = torch.autograd.grad(got.loss.sum(), scores)
    (g2,) = torch.autograd.grad(expected.loss.sum(), scores)
    assert torch.equal(g1, g2)
    assert isinstance(module, torch.nn.Module) and list(module.parameters()) == []
    assert "beta=0.3" in repr(module)

    calls = []
    original = rankloss.losses.chain_loss
    monkeypatch.setattr(rankloss.losses, "chain_loss", lambda *a, **k: calls.append(k) or original(*a, **k))
    module(scores, sizes, ref, num_tokens=num_tokens)
    assert len(calls) == 1 and calls[0]["loss"] == module_cls._loss and calls[0]["beta"] == 0.3
