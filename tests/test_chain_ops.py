"""rankloss.ops.chain_loss (the fused chain-loss op) against reference.losses.chain_loss in float64.

Both implementations are checked: ``impl="torch"`` (vectorised PyTorch, float64 for float64 inputs, so
compared tightly) and ``impl="triton"`` (the kernel of kernels/chain_loss.py, run under
``TRITON_INTERPRET=1`` on CPU; it computes in float32, so it is fed float32 inputs and held to the
apple/ml-cross-entropy criterion: its error against the float64 truth must be within twice the error of
the reference run in float32, plus a small margin).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rankloss.reference import losses as ref

from rankloss.ops.chain_loss import (
    METRIC_NAMES,
    chain_loss_fwd_torch,
    chain_loss_op,
    chain_offsets,
    chain_positions,
    default_impl,
)

VARIANTS = (
    [dict(loss="plackett_luce"), dict(loss="plackett_luce", top_k=1), dict(loss="plackett_luce", top_k=3)]
    + [dict(loss="dpo", pairs=p, loss_type=t) for p in ref.PAIR_STRATEGIES for t in ref.DPO_LOSS_TYPES]
    + [dict(loss="lipo")]
)
VARIANT_IDS = ["-".join(str(v) for v in cfg.values()) for cfg in VARIANTS]
METRIC_KEYS = {*METRIC_NAMES, "reward_per_position", "rewards"}
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


def _run(fn, scores, sizes, ref_scores, cfg, g, **kw):
    """Run a chain loss with reduction='none' and backprop ``loss @ g``.

    Returns ``(loss, per-chain loss, metrics, grads)``, all detached."""
    s = scores.detach().clone().requires_grad_()
    r = None if ref_scores is None else ref_scores.detach().clone().requires_grad_()
    loss, per_chain, metrics = fn(s, sizes, r, reduction="none", **cfg, **kw)
    (loss * g.to(loss.dtype)).sum().backward()
    grads = {"scores": s.grad} if r is None else {"scores": s.grad, "ref_scores": r.grad}
    return loss.detach(), per_chain.detach(), {k: v.detach() for k, v in metrics.items()}, grads


def _flatten(out) -> dict[str, torch.Tensor]:
    loss, per_chain, metrics, grads = out
    flat = {"loss": loss, "per_chain": per_chain, **metrics}
    flat.update({f"grad_{k}": v for k, v in grads.items()})
    return flat


def _compare(scores, sizes, ref_scores, cfg, impl, *, seed=0, sft=False, rtol=None, atol=None):
    """Check ``impl`` against the float64 reference on the same input values, with random upstream grads."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(len(sizes), generator=gen, dtype=torch.float64)
    kw = {}
    if sft:
        kw = dict(sft_weight=0.7, num_tokens=torch.randint(0, 9, scores.shape, generator=gen))
    ours = _flatten(_run(chain_loss_op, scores, sizes, ref_scores, cfg, g, impl=impl, **kw))
    as64 = None if ref_scores is None else ref_scores.double()
    truth = _flatten(_run(ref.chain_loss, scores.double(), sizes, as64, cfg, g, **kw))
    assert set(ours) == set(truth), set(ours) ^ set(truth)
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    for name, t in truth.items():
        o = ours[name]
        assert torch.isfinite(o).all(), name
        if name.startswith("grad_"):
            src = scores if name == "grad_scores" else ref_scores
            assert o.dtype == src.dtype, (name, o.dtype)
        else:
            assert o.dtype == acc and o.shape == t.shape, (name, o.dtype, o.shape, t.shape)
    if scores.dtype == torch.float64:
        for name, t in truth.items():
            torch.testing.assert_close(ours[name], t, rtol=rtol or 1e-9, atol=atol or 1e-11, msg=name)
        return
    # Lower precision: no worse than the reference computing in the input dtype, plus a margin.
    plain = _flatten(_run(ref.chain_loss, scores, sizes, ref_scores, cfg, g, **kw))
    for name, t in truth.items():
        err = (ours[name].double() - t).abs()
        plain_err = (plain[name].double() - t).abs().max()
        tol = 2 * plain_err + (atol or 1e-5) + (rtol or 1e-5) * t.abs()
        assert (err <= tol).all(), f"{name}: max error {err.max():.3g} vs plain-PyTorch error {plain_err:.3g}"


def _inputs(sizes, dtype, seed, scale=3.0, with_ref=True):
    gen = torch.Generator().manual_seed(seed)
    S = sum(sizes)
    scores = (scale * torch.randn(S, generator=gen, dtype=torch.float64)).to(dtype)
    ref_scores = torch.randn(S, generator=gen, dtype=torch.float64).to(dtype) if with_ref else None
    return scores, ref_scores


# ------------------------------------------------------------------------------------------------
# Every variant and option, fixed ragged shape
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", VARIANTS, ids=VARIANT_IDS)
def test_every_variant_matches_reference(cfg, impl):
    sizes = [3, 5, 2, 7]
    dtype = torch.float64 if impl == "torch" else torch.float32
    scores, ref_scores = _inputs(sizes, dtype, seed=VARIANTS.index(cfg))
    _compare(scores, sizes, ref_scores, dict(cfg, beta=0.3), impl, sft=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_return_convention(impl, reduction):
    sizes = [4, 2, 6]
    dtype = torch.float64 if impl == "torch" else torch.float32
    scores, ref_scores = _inputs(sizes, dtype, seed=3)
    n = torch.tensor([3, 0, 5, 1, 2, 2, 7, 1, 1, 4, 0, 9])
    s1, s2 = scores.clone().requires_grad_(), scores.double().requires_grad_()
    loss, per_chain, metrics = chain_loss_op(
        s1, sizes, ref_scores, loss="lipo", sft_weight=0.5, num_tokens=n, reduction=reduction, impl=impl
    )
    want, want_chain, want_metrics = ref.chain_loss(
        s2, sizes, ref_scores.double(), loss="lipo", sft_weight=0.5, num_tokens=n, reduction=reduction
    )
    assert not per_chain.requires_grad and per_chain.shape == (3,)
    assert all(not v.requires_grad for v in metrics.values())
    assert set(metrics) == METRIC_KEYS | {"sft_loss"} == set(want_metrics)
    assert loss.shape == want.shape
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), want.detach(), **tol)
    torch.testing.assert_close(per_chain.double(), want_chain.detach(), **tol)
    loss.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, **tol)
    # Without the SFT term there is no sft_loss entry.
    _, _, metrics = chain_loss_op(scores, sizes, loss="plackett_luce", impl=impl)
    assert set(metrics) == METRIC_KEYS


# ------------------------------------------------------------------------------------------------
# Hypothesis: chain-size patterns, variants, seeds
# ------------------------------------------------------------------------------------------------
chain_size_patterns = st.one_of(
    st.lists(st.integers(2, 40), min_size=1, max_size=1),  # one chain
    st.lists(st.integers(2, 3), min_size=8, max_size=24),  # many short chains
    st.lists(st.integers(2, 40), min_size=2, max_size=6),  # ragged
)


@given(
    sizes=chain_size_patterns,
    cfg=st.sampled_from(VARIANTS),
    seed=st.integers(0, 2**16),
    with_ref=st.booleans(),
)
def test_hypothesis_torch_float64(sizes, cfg, seed, with_ref):
    scores, ref_scores = _inputs(sizes, torch.float64, seed, with_ref=with_ref)
    _compare(scores, sizes, ref_scores, dict(cfg, beta=0.2), "torch", seed=seed)


@pytest.mark.triton
@given(
    sizes=chain_size_patterns,
    cfg=st.sampled_from(VARIANTS),
    seed=st.integers(0, 2**16),
    with_ref=st.booleans(),
)
def test_hypothesis_triton_float32(sizes, cfg, seed, with_ref):
    scores, ref_scores = _inputs(sizes, torch.float32, seed, with_ref=with_ref)
    _compare(scores, sizes, ref_scores, dict(cfg, beta=0.2), "triton", seed=seed)


@pytest.mark.parametrize("impl", IMPLS)
@given(
    sizes=st.lists(st.integers(2, 12), min_size=1, max_size=4),
    cfg=st.sampled_from(VARIANTS),
    seed=st.integers(0, 2**16),
    beta=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_hypothesis_tied_rewards(impl, sizes, cfg, seed, beta):
    """Scores on a grid of a few values (many ties); beta a power of two, so rewards are exact in float32
    and ties are the same as in float64: LiPO ranks (ties to the earlier caption), accuracy, top-1 and
    Kendall tau must match the reference exactly."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if impl == "torch" else torch.float32
    scores = torch.randint(-2, 3, (sum(sizes),), generator=gen).to(dtype)
    _compare(scores, sizes, None, dict(cfg, beta=beta), impl, seed=seed)
    _, _, metrics = chain_loss_op(scores, sizes, beta=beta, impl=impl, **cfg)
    _, _, want = ref.chain_loss(scores.double(), sizes, beta=beta, **cfg)
    for name in ("pairwise_accuracy", "top1_accuracy", "kendall_tau"):
        assert torch.equal(metrics[name], want[name].to(metrics[name].dtype)), name


def test_all_tied_chain_metrics():
    """Every reward equal (as every implicit reward is before the first step): each pair a tie, counted
    half (accuracy 0.5, not 0); the top-1 credit shared by the 5 tied captions (1/5); tau 0, margin 0."""
    for impl in ("torch", "triton"):
        _, _, m = chain_loss_op(torch.zeros(5), [5], loss="lipo", impl=impl)
        assert m["pairwise_accuracy"].tolist() == [0.5]
        assert m["top1_accuracy"].tolist() == pytest.approx([0.2])
        assert m["kendall_tau"].tolist() == [0.0] and m["neighbour_margin"].tolist() == [0.0]


# ------------------------------------------------------------------------------------------------
# Extreme rewards and long chains
# ------------------------------------------------------------------------------------------------
def _extreme_scores(sizes, seed, dtype):
    """Rewards (beta = 0.5) of +-1e4 plus multiples of 1/8, exactly representable in float32."""
    gen = torch.Generator().manual_seed(seed)
    S = sum(sizes)
    sign = torch.randint(0, 2, (S,), generator=gen) * 2 - 1
    return (sign * 2e4 + torch.randint(-40, 41, (S,), generator=gen) * 0.25).to(dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", VARIANTS, ids=VARIANT_IDS)
def test_extreme_rewards_finite_and_match(cfg, impl):
    sizes = [4, 2, 6]
    dtype = torch.float64 if impl == "torch" else torch.float32
    scores = _extreme_scores(sizes, seed=5, dtype=dtype)
    # _compare asserts every output is finite.
    _compare(scores, sizes, None, dict(cfg, beta=0.5), impl, seed=5, rtol=1e-5 if impl == "triton" else None)


@pytest.mark.parametrize(
    "impl, loss",
    [
        ("torch", "plackett_luce"),
        ("torch", "dpo"),
        ("torch", "lipo"),
        pytest.param("triton", "plackett_luce", marks=pytest.mark.triton),
        pytest.param("triton", "lipo", marks=pytest.mark.triton),
    ],
)
def test_chain_of_256(impl, loss):
    sizes = [3, 256, 5]
    dtype = torch.float64 if impl == "torch" else torch.float32
    scores, ref_scores = _inputs(sizes, dtype, seed=11, scale=20.0)
    cfg = dict(loss=loss, beta=0.1, **(dict(pairs="all", loss_type="sigmoid") if loss == "dpo" else {}))
    _compare(scores, sizes, ref_scores, cfg, impl, seed=11)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("impl", IMPLS)
def test_low_precision_inputs(dtype, impl):
    sizes = [5, 3, 9]
    scores, ref_scores = _inputs(sizes, dtype, seed=2)
    _compare(scores, sizes, ref_scores, dict(loss="plackett_luce", beta=0.5), impl, seed=2)
    _compare(scores, sizes, ref_scores, dict(loss="dpo", pairs="all", loss_type="sigmoid"), impl, seed=2)


def test_float64_through_triton_is_float32_accurate():
    """The kernel computes in float32: float64 inputs give float64 outputs with float32 accuracy."""
    sizes = [6, 4]
    scores, ref_scores = _inputs(sizes, torch.float64, seed=9)
    g = torch.randn(2, dtype=torch.float64)
    ours = _flatten(_run(chain_loss_op, scores, sizes, ref_scores, dict(loss="lipo"), g, impl="triton"))
    truth = _flatten(_run(ref.chain_loss, scores, sizes, ref_scores, dict(loss="lipo"), g))
    for name, t in truth.items():
        assert ours[name].dtype == torch.float64
        torch.testing.assert_close(ours[name], t, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------
# Gradient plumbing
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_flows_only_where_asked(impl):
    sizes = [3, 4]
    scores, ref_scores = _inputs(sizes, torch.float32, seed=4)
    s = scores.clone().requires_grad_()
    r = ref_scores.clone().requires_grad_()
    chain_loss_op(s, sizes, r, loss="dpo", pairs="all", impl=impl)[0].backward()
    torch.testing.assert_close(r.grad, -s.grad)
    # ref_scores without requires_grad: gradient reaches scores only.
    s2 = scores.clone().requires_grad_()
    chain_loss_op(s2, sizes, ref_scores, loss="dpo", pairs="all", impl=impl)[0].backward()
    torch.testing.assert_close(s2.grad, s.grad)
    assert ref_scores.grad is None


def test_torch_forward_gradient_is_analytic_derivative():
    """The saved dL_c/dr of the PyTorch forward equals autograd through the reference, per chain."""
    sizes = [4, 7]
    scores, _ = _inputs(sizes, torch.float64, seed=8, with_ref=False)
    offsets = chain_offsets(sizes, "cpu")
    for cfg in VARIANTS:
        top_k = cfg.get("top_k", 7)
        _, grad, rewards, _ = chain_loss_fwd_torch(
            scores, None, offsets, 7, cfg["loss"], 1.0, top_k, cfg.get("pairs", "adjacent"),
            cfg.get("loss_type", "sigmoid"),
        )  # fmt: skip
        r = scores.clone().requires_grad_()
        ref.chain_loss(r, sizes, beta=1.0, reduction="sum", **cfg)[0].backward()
        torch.testing.assert_close(grad, r.grad, rtol=1e-10, atol=1e-12, msg=str(cfg))
        torch.testing.assert_close(rewards, scores)


def test_chain_positions():
    offsets = chain_offsets([2, 3, 2], "cpu")
    chain_id, pos = chain_positions(offsets, 7)
    assert offsets.tolist() == [0, 2, 5, 7]
    assert chain_id.tolist() == [0, 0, 1, 1, 1, 2, 2] and pos.tolist() == [0, 1, 0, 1, 2, 0, 1]


# ------------------------------------------------------------------------------------------------
# The custom op, torch.compile, dispatch and errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    sizes = [3, 5, 2]
    offsets = chain_offsets(sizes, "cpu")
    scores = torch.randn(10, dtype=torch.float64, requires_grad=True)
    ref_scores = torch.randn(10, dtype=torch.float64, requires_grad=True)
    for args in [
        (scores, ref_scores, offsets, 5, "plackett_luce", 0.1, 2, "adjacent", "sigmoid", impl),
        (scores, None, offsets, 5, "dpo", 0.3, 5, "best_rest", "ipo", impl),
        (scores.detach().float(), None, offsets, 5, "lipo", 0.1, 5, "adjacent", "sigmoid", impl),
    ]:
        torch.library.opcheck(torch.ops.rankloss.chain_loss_fwd, args)


@pytest.mark.slow
def test_torch_compile_fullgraph_cpu():
    sizes = [3, 6, 2]

    def fn(scores, ref_scores, num_tokens):
        loss, _, metrics = chain_loss_op(
            scores, sizes, ref_scores, loss="plackett_luce", beta=0.2, top_k=3, sft_weight=0.3,
            num_tokens=num_tokens, impl="torch",
        )  # fmt: skip
        return loss, metrics["kendall_tau"], metrics["reward_per_position"]

    scores, ref_scores = _inputs(sizes, torch.float32, seed=1)
    num_tokens = torch.randint(0, 6, (11,))
    s1, s2 = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    compiled = torch.compile(fn, fullgraph=True)(s1, ref_scores, num_tokens)
    eager = fn(s2, ref_scores, num_tokens)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
    compiled[0].backward()
    eager[0].backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_dispatch_and_errors(monkeypatch):
    scores = torch.randn(6)
    assert default_impl(scores, 3) == "torch"  # CPU
    with pytest.raises(ValueError, match="impl must be None or one of"):
        chain_loss_op(scores, [3, 3], impl="cuda")
    with pytest.raises(ValueError, match="at most 4096 captions"):
        chain_loss_op(torch.randn(4098), [4098], impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        chain_loss_op(scores, [3, 3], impl="triton")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_import_does_not_load_kernels():
    """Triton chooses interpret-vs-compile at decoration time: importing rankloss must not import kernels."""
    proc = _python(
        """
        import sys, rankloss, rankloss.ops.chain_loss
        assert "rankloss.kernels.chain_loss" not in sys.modules, sorted(sys.modules)
        """
    )
    assert proc.returncode == 0, proc.stderr
