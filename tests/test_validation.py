"""Every invalid input to the public API raises a TypeError/ValueError that names the argument.

Each case is (call, exception type, regex the message must match); the regexes name the argument and
what was expected, so an unhelpful message fails the test.
"""

from __future__ import annotations

import pytest
import torch

import rankloss

S = 5
SIZES = [2, 3]


def scores(dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(S, dtype=dtype, device=device)


LOGITS = torch.randn(2, 3, 7)
LABELS = torch.randint(0, 7, (2, 3))
HIDDEN = torch.randn(2, 3, 4)
WEIGHT = torch.randn(7, 4)

LOSS_FUNCTIONS = {
    "chain_loss": rankloss.chain_loss,
    "plackett_luce_loss": rankloss.plackett_luce_loss,
    "dpo_chain_loss": rankloss.dpo_chain_loss,
    "lipo_loss": rankloss.lipo_loss,
}

# Invalid inputs shared by every chain loss: (id, args, kwargs, exception, match)
COMMON_LOSS_CASES = [
    ("scores-list", ([0.0] * S, SIZES), {}, TypeError, r"scores must be a torch\.Tensor, got list"),
    ("scores-int", (torch.arange(S), SIZES), {}, TypeError, r"scores must be a floating-point tensor.*int64"),
    ("scores-2d", (torch.randn(1, S), SIZES), {}, ValueError, r"scores must be 1-D, got shape \(1, 5\)"),
    (
        "sizes-sum",
        (scores(), [2, 2]),
        {},
        ValueError,
        r"chain_sizes must sum to the number of captions S = 5",
    ),
    (
        "sizes-short",
        (scores(), [1, 4]),
        {},
        ValueError,
        r"chain_sizes\[0\] = 1: every chain needs at least 2",
    ),
    ("sizes-zero", (scores(), [5, 0]), {}, ValueError, r"chain_sizes\[1\] = 0: every chain needs at least 2"),
    (
        "sizes-empty",
        (scores(), []),
        {},
        ValueError,
        r"chain_sizes must hold at least one chain when there are captions, .* S = 5",
    ),
    (
        "sizes-empty-tensor",
        (scores(), torch.tensor([], dtype=torch.long)),
        {},
        ValueError,
        r"at least one chain when there are captions",
    ),
    (
        "sizes-for-no-scores",
        (torch.randn(0), [2]),
        {},
        ValueError,
        r"must sum to the number of captions S = 0",
    ),
    ("sizes-float", (scores(), [2.0, 3]), {}, TypeError, r"chain_sizes\[0\] must be an int, got 2\.0"),
    ("sizes-bool", (scores(), [True, 4]), {}, TypeError, r"chain_sizes\[0\] must be an int"),
    (
        "sizes-int",
        (scores(), 5),
        {},
        TypeError,
        r"chain_sizes must be a list of ints or a 1-D integer tensor, got int",
    ),
    (
        "sizes-float-tensor",
        (scores(), torch.tensor([2.0, 3.0])),
        {},
        TypeError,
        r"chain_sizes must be an integer",
    ),
    ("sizes-2d-tensor", (scores(), torch.tensor([[2, 3]])), {}, ValueError, r"chain_sizes must be 1-D"),
    (
        "sizes-tensor-sum",
        (scores(), torch.tensor([2, 4])),
        {},
        ValueError,
        r"chain_sizes must sum to .* S = 5",
    ),
    ("sizes-meta", (scores(), torch.tensor([2, 3], device="meta")), {}, ValueError, r"chain_sizes .*meta"),
    (
        "ref-shape",
        (scores(), SIZES, torch.randn(4)),
        {},
        ValueError,
        r"ref_scores must have shape .* \(5,\), got \(4,\)",
    ),
    (
        "ref-int",
        (scores(), SIZES, torch.arange(S)),
        {},
        TypeError,
        r"ref_scores must be a floating-point tensor",
    ),
    ("ref-array", (scores(), SIZES, [0.0] * S), {}, TypeError, r"ref_scores must be a torch\.Tensor"),
    (
        "beta-zero",
        (scores(), SIZES),
        {"beta": 0.0},
        ValueError,
        r"beta must be a positive finite number, got 0\.0",
    ),
    ("beta-neg", (scores(), SIZES), {"beta": -0.1}, ValueError, r"beta must be a positive finite number"),
    (
        "beta-inf",
        (scores(), SIZES),
        {"beta": float("inf")},
        ValueError,
        r"beta must be a positive finite number",
    ),
    ("beta-str", (scores(), SIZES), {"beta": "0.1"}, TypeError, r"beta must be a positive finite number"),
    (
        "beta-tensor",
        (scores(), SIZES),
        {"beta": torch.tensor(0.1)},
        TypeError,
        r"beta must be a positive finite",
    ),
    ("reduction", (scores(), SIZES), {"reduction": "max"}, ValueError, r"reduction must be one of .*'max'"),
    ("impl", (scores(), SIZES), {"impl": "cuda"}, ValueError, r"impl must be None or one of .*'cuda'"),
    (
        "sft-no-tokens",
        (scores(), SIZES),
        {"sft_weight": 0.5},
        ValueError,
        r"num_tokens \[S\] is required when",
    ),
    (
        "sft-nan",
        (scores(), SIZES),
        {"sft_weight": float("nan")},
        ValueError,
        r"sft_weight must be a finite number",
    ),
    ("sft-str", (scores(), SIZES), {"sft_weight": "1"}, TypeError, r"sft_weight must be a finite number"),
    (
        "num-tokens-shape",
        (scores(), SIZES),
        {"sft_weight": 0.5, "num_tokens": torch.ones(4)},
        ValueError,
        r"num_tokens must have shape .*\(5,\), got \(4,\)",
    ),
    (
        "num-tokens-list",
        (scores(), SIZES),
        {"sft_weight": 0.5, "num_tokens": [1] * S},
        TypeError,
        r"num_tokens must be a torch\.Tensor",
    ),
    (
        "num-tokens-bool",
        (scores(), SIZES),
        {"sft_weight": 0.5, "num_tokens": torch.ones(S, dtype=torch.bool)},
        TypeError,
        r"num_tokens must be an integer or floating-point tensor",
    ),
    (
        "device-ref",
        (scores(device="meta"), SIZES, scores()),
        {},
        ValueError,
        r"same device, got scores on meta, ref_scores on cpu",
    ),
    (
        "device-num-tokens",
        (scores(), SIZES),
        {"sft_weight": 1.0, "num_tokens": torch.ones(S, device="meta")},
        ValueError,
        r"same device.*num_tokens on meta",
    ),
]


@pytest.mark.parametrize("fn_name", list(LOSS_FUNCTIONS))
@pytest.mark.parametrize(
    "args, kwargs, exc, match", [c[1:] for c in COMMON_LOSS_CASES], ids=[c[0] for c in COMMON_LOSS_CASES]
)
def test_chain_loss_invalid_inputs(fn_name, args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LOSS_FUNCTIONS[fn_name](*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (
            {"loss": "listnet"},
            ValueError,
            r"loss must be one of \('plackett_luce', 'dpo', 'lipo'\), got 'listnet'",
        ),
        ({"loss": "plackett_luce", "top_k": 0}, ValueError, r"top_k must be None or an int >= 1, got 0"),
        ({"loss": "plackett_luce", "top_k": -3}, ValueError, r"top_k must be None or an int >= 1"),
        ({"loss": "plackett_luce", "top_k": 1.5}, TypeError, r"top_k must be an int, got 1\.5"),
        ({"loss": "plackett_luce", "top_k": True}, TypeError, r"top_k must be an int"),
        (
            {"loss": "dpo", "pairs": "random"},
            ValueError,
            r"pairs must be one of \('adjacent', 'all', 'best_worst', ",
        ),
        ({"loss": "dpo", "dpo_loss_type": "kto"}, ValueError, r"dpo_loss_type must be one of .*'kto'"),
        (
            {"loss": "dpo", "loss_type": "kto"},
            ValueError,
            r"loss_type must be one of \('sigmoid', 'hinge', 'ipo'\)",
        ),
        (
            {"loss": "dpo", "loss_type": "ipo", "dpo_loss_type": "hinge"},
            ValueError,
            r"loss_type='ipo' and dpo_loss_type='hinge' name the same option",
        ),
        # an option given for another loss is an error, not silently ignored
        (
            {"loss": "dpo", "top_k": 2},
            ValueError,
            r"top_k=2 applies to loss='plackett_luce' only, got loss='dpo'",
        ),
        ({"loss": "lipo", "top_k": 2}, ValueError, r"top_k=2 applies to loss='plackett_luce' only"),
        ({"loss": "plackett_luce", "pairs": "all"}, ValueError, r"pairs='all' applies to loss='dpo' only"),
        (
            {"loss": "lipo", "pairs": "all"},
            ValueError,
            r"pairs='all' applies to loss='dpo' only, got loss='lipo'",
        ),
        (
            {"loss": "plackett_luce", "dpo_loss_type": "ipo"},
            ValueError,
            r"dpo_loss_type='ipo' applies to loss='dpo'",
        ),
        ({"loss": "lipo", "loss_type": "hinge"}, ValueError, r"loss_type='hinge' applies to loss='dpo' only"),
    ],
)
def test_chain_loss_option_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rankloss.chain_loss(scores(), SIZES, **kwargs)


@pytest.mark.parametrize(
    "fn, kwargs, exc, match",
    [
        (rankloss.plackett_luce_loss, {"top_k": 0}, ValueError, r"top_k must be None or an int >= 1, got 0"),
        (rankloss.dpo_chain_loss, {"pairs": "every"}, ValueError, r"pairs must be one of .*'every'"),
        (
            rankloss.dpo_chain_loss,
            {"loss_type": "logistic"},
            ValueError,
            r"loss_type must be one of .*'logistic'",
        ),
    ],
)
def test_specific_loss_option_errors(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(scores(), SIZES, **kwargs)


def test_unknown_keyword_is_rejected():
    with pytest.raises(TypeError, match="top_k"):
        rankloss.lipo_loss(scores(), SIZES, top_k=2)
    with pytest.raises(TypeError, match="pairs"):
        rankloss.plackett_luce_loss(scores(), SIZES, pairs="all")


@pytest.mark.parametrize(
    "module_cls, kwargs, exc, match",
    [
        (rankloss.PlackettLuceLoss, {"top_k": 0}, ValueError, r"top_k must be None or an int >= 1"),
        (rankloss.DPOChainLoss, {"pairs": "x"}, ValueError, r"pairs must be one of"),
        (rankloss.LiPOLoss, {"reduction": "avg"}, ValueError, r"reduction must be one of"),
    ],
)
def test_module_invalid_options(module_cls, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        module_cls(**kwargs)(scores(), SIZES)


# --------------------------------------------------------------------------------------------------
# Log-prob ops
# --------------------------------------------------------------------------------------------------
def bad_labels(value: int) -> torch.Tensor:
    labels = LABELS.clone()
    labels[1, 2] = value
    return labels


TOKEN_CASES = [
    ("logits-list", ([[0.0] * 7], LABELS), {}, TypeError, r"logits must be a torch\.Tensor"),
    (
        "logits-int",
        (torch.ones(2, 3, 7, dtype=torch.long), LABELS),
        {},
        TypeError,
        r"logits must be a floating",
    ),
    ("logits-0d", (torch.tensor(1.0), LABELS), {}, ValueError, r"logits must have at least 1 dimensions"),
    (
        "logits-no-vocab",
        (torch.randn(2, 3, 0), torch.full((2, 3), -100)),
        {},
        ValueError,
        r"logits must be \[\.\.\., V\] with V >= 1, got shape \(2, 3, 0\)",
    ),
    (
        "labels-uint8",
        (LOGITS, LABELS.to(torch.uint8)),
        {},
        TypeError,
        r"labels of dtype torch\.uint8 cannot hold ignore_index=-100 .* torch\.long",
    ),
    ("labels-float", (LOGITS, LABELS.float()), {}, TypeError, r"labels must be an integer tensor.*float32"),
    ("labels-bool", (LOGITS, LABELS > 2), {}, TypeError, r"labels must be an integer tensor.*bool"),
    ("labels-list", (LOGITS, LABELS.tolist()), {}, TypeError, r"labels must be a torch\.Tensor of integers"),
    (
        "labels-shape",
        (LOGITS, LABELS[:, :2]),
        {},
        ValueError,
        r"labels must have shape logits\.shape\[:-1\] = \(2, 3\)",
    ),
    ("labels-too-big", (LOGITS, bad_labels(7)), {}, ValueError, r"labels must lie in \[0, 7\).*e\.g\. 7"),
    (
        "labels-negative",
        (LOGITS, bad_labels(-1)),
        {},
        ValueError,
        r"labels must lie in \[0, 7\).*ignore_index=-100",
    ),
    (
        "labels-other-ignore",
        (LOGITS, bad_labels(-100)),
        {"ignore_index": -1},
        ValueError,
        r"must lie in \[0, 7\)",
    ),
    (
        "temperature-zero",
        (LOGITS, LABELS),
        {"temperature": 0},
        ValueError,
        r"temperature must be a positive finite",
    ),
    (
        "temperature-neg",
        (LOGITS, LABELS),
        {"temperature": -1.0},
        ValueError,
        r"temperature must be a positive",
    ),
    (
        "temperature-nan",
        (LOGITS, LABELS),
        {"temperature": float("nan")},
        ValueError,
        r"temperature must be a pos",
    ),
    (
        "temperature-none",
        (LOGITS, LABELS),
        {"temperature": None},
        TypeError,
        r"temperature must be a positive",
    ),
    (
        "ignore-index-float",
        (LOGITS, LABELS),
        {"ignore_index": -100.0},
        TypeError,
        r"ignore_index must be an int",
    ),
    ("impl", (LOGITS, LABELS), {"impl": "triton-gpu"}, ValueError, r"impl must be None or one of"),
    (
        "device",
        (LOGITS.to("meta"), LABELS),
        {},
        ValueError,
        r"same device, got logits on meta, labels on cpu",
    ),
]


@pytest.mark.parametrize(
    "args, kwargs, exc, match", [c[1:] for c in TOKEN_CASES], ids=[c[0] for c in TOKEN_CASES]
)
def test_token_logprobs_invalid_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rankloss.token_logprobs(*args, **kwargs)


def test_ignore_index_inside_vocab_is_allowed():
    """ignore_index may be any int; only labels that are neither in [0, V) nor ignore_index are errors."""
    out = rankloss.token_logprobs(LOGITS, bad_labels(-1), ignore_index=-1)
    assert out[1, 2] == 0


LINEAR_CASES = [
    ("hidden-int", (HIDDEN.long(), WEIGHT, LABELS), {}, TypeError, r"hidden must be a floating-point tensor"),
    ("weight-1d", (HIDDEN, WEIGHT[0], LABELS), {}, ValueError, r"weight must be 2-D"),
    (
        "weight-D",
        (HIDDEN, WEIGHT[:, :3], LABELS),
        {},
        ValueError,
        r"weight must have shape \[V, D\] with D = .* = 4",
    ),
    ("weight-list", (HIDDEN, WEIGHT.tolist(), LABELS), {}, TypeError, r"weight must be a torch\.Tensor"),
    (
        "weight-no-vocab",
        (HIDDEN, WEIGHT[:0], torch.full((2, 3), -100)),
        {},
        ValueError,
        r"weight must be \[V, D\] with V >= 1 and D >= 1, got shape \(0, 4\)",
    ),
    (
        "hidden-no-features",
        (HIDDEN[..., :0], WEIGHT[:, :0], LABELS),
        {},
        ValueError,
        r"weight must be \[V, D\] with V >= 1 and D >= 1, got shape \(7, 0\)",
    ),
    (
        "labels-shape",
        (HIDDEN, WEIGHT, LABELS.T),
        {},
        ValueError,
        r"labels must have shape hidden\.shape\[:-1\]",
    ),
    ("labels-range", (HIDDEN, WEIGHT, bad_labels(9)), {}, ValueError, r"labels must lie in \[0, 7\)"),
    (
        "bias-shape",
        (HIDDEN, WEIGHT, LABELS),
        {"bias": torch.randn(6)},
        ValueError,
        r"bias must have shape \[V\]",
    ),
    (
        "bias-int",
        (HIDDEN, WEIGHT, LABELS),
        {"bias": torch.ones(7, dtype=torch.long)},
        TypeError,
        r"bias must be a fl",
    ),
    (
        "softcap-zero",
        (HIDDEN, WEIGHT, LABELS),
        {"softcap": 0.0},
        ValueError,
        r"softcap must be a positive finite",
    ),
    (
        "softcap-neg",
        (HIDDEN, WEIGHT, LABELS),
        {"softcap": -30.0},
        ValueError,
        r"softcap must be a positive finite",
    ),
    (
        "temperature",
        (HIDDEN, WEIGHT, LABELS),
        {"temperature": 0.0},
        ValueError,
        r"temperature must be a positive",
    ),
    ("impl", (HIDDEN, WEIGHT, LABELS), {"impl": "fast"}, ValueError, r"impl must be None or one of .*'fast'"),
    (
        "device",
        (HIDDEN, WEIGHT.to("meta"), LABELS),
        {},
        ValueError,
        r"same device, got hidden on cpu, weight on meta",
    ),
]


@pytest.mark.parametrize(
    "args, kwargs, exc, match", [c[1:] for c in LINEAR_CASES], ids=[c[0] for c in LINEAR_CASES]
)
def test_linear_token_logprobs_invalid_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rankloss.linear_token_logprobs(*args, **kwargs)


TOKEN_LOGPS = torch.randn(3, 4)
SEQ_LABELS = torch.randint(0, 5, (3, 4))
SEQUENCE_CASES = [
    ("logps-int", (SEQ_LABELS, SEQ_LABELS), {}, TypeError, r"token_logps must be a floating-point tensor"),
    ("labels-float", (TOKEN_LOGPS, TOKEN_LOGPS), {}, TypeError, r"labels must be an integer tensor"),
    (
        "labels-shape",
        (TOKEN_LOGPS, SEQ_LABELS[:, :3]),
        {},
        ValueError,
        r"labels must have shape token_logps\.shape",
    ),
    (
        "normalize-int",
        (TOKEN_LOGPS, SEQ_LABELS),
        {"length_normalize": 1},
        TypeError,
        r"length_normalize must be a bool",
    ),
    (
        "packed-2d",
        (TOKEN_LOGPS, SEQ_LABELS),
        {"cu_seqlens": torch.tensor([0, 12])},
        ValueError,
        r"token_logps must be 1-D \[N\] in the packed layout",
    ),
    (
        "cu-float",
        (TOKEN_LOGPS.flatten(), SEQ_LABELS.flatten()),
        {"cu_seqlens": torch.tensor([0.0, 12.0])},
        TypeError,
        r"cu_seqlens must be an integer tensor",
    ),
    (
        "cu-empty",
        (TOKEN_LOGPS.flatten(), SEQ_LABELS.flatten()),
        {"cu_seqlens": torch.tensor([], dtype=torch.long)},
        ValueError,
        r"cu_seqlens must hold S \+ 1 offsets, starting with 0",
    ),
    (
        "cu-no-sequences-for-tokens",
        (TOKEN_LOGPS.flatten(), SEQ_LABELS.flatten()),
        {"cu_seqlens": torch.tensor([0])},
        ValueError,
        r"cu_seqlens must be non-decreasing offsets from 0 to N = \d+, got \[0\]",
    ),
    (
        "cu-end",
        (TOKEN_LOGPS.flatten(), SEQ_LABELS.flatten()),
        {"cu_seqlens": torch.tensor([0, 5, 10])},
        ValueError,
        r"cu_seqlens must be non-decreasing offsets from 0 to N = 12",
    ),
    (
        "cu-decreasing",
        (TOKEN_LOGPS.flatten(), SEQ_LABELS.flatten()),
        {"cu_seqlens": torch.tensor([0, 7, 5, 12])},
        ValueError,
        r"cu_seqlens must be non-decreasing",
    ),
    (
        "device",
        (TOKEN_LOGPS.to("meta"), SEQ_LABELS),
        {},
        ValueError,
        r"same device, got token_logps on meta, labels on cpu",
    ),
]


@pytest.mark.parametrize(
    "args, kwargs, exc, match", [c[1:] for c in SEQUENCE_CASES], ids=[c[0] for c in SEQUENCE_CASES]
)
def test_sequence_logprobs_invalid_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rankloss.sequence_logprobs(*args, **kwargs)


def test_meta_tensors_pass_shape_checks():
    """On the meta device only shapes are checked (values cannot be read): valid calls go through."""
    out = rankloss.sequence_logprobs(TOKEN_LOGPS.to("meta"), SEQ_LABELS.to("meta"))
    assert out.shape == (3,) and out.device.type == "meta"
    logps = rankloss.token_logprobs(LOGITS.to("meta"), LABELS.to("meta"))
    assert logps.shape == LABELS.shape and logps.dtype == torch.float32


def test_shift_labels_invalid_inputs():
    with pytest.raises(TypeError, match=r"labels must be an integer tensor"):
        rankloss.shift_labels(torch.zeros(3))
    with pytest.raises(ValueError, match=r"labels must have at least 1 dimension"):
        rankloss.shift_labels(torch.tensor(3))
    with pytest.raises(TypeError, match=r"ignore_index must be an int"):
        rankloss.shift_labels(torch.zeros(3, dtype=torch.long), ignore_index=None)
