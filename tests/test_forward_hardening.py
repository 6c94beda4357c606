"""The chain batch checks (rankloss.integrations.layout) and the chain forward (ChainForward,
ChainRankModel) on bad and edge-case batches (issue #21): left-padded completions are refused, an empty
batch gives a zero loss connected to every parameter, wrong dtypes / sizes / ids name the batch key, a
chain of one completion names its record, and hypothesis-drawn batches either score exactly like each
chain run on its own or raise a ValueError / TypeError that names a batch key."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from rankloss.reference.losses import chain_loss as ref_chain_loss  # noqa: E402
from test_integrations import PAD, V, random_chains, text_batch, tiny_text_model  # noqa: E402

from rankloss.integrations import ChainForward, ChainRankModel  # noqa: E402
from rankloss.integrations.forward import LossSpec  # noqa: E402
from rankloss.integrations.layout import build_chain_tree, check_chain_batch  # noqa: E402

IGNORE = -100
KEYS = (
    "prompt_input_ids",
    "prompt_attention_mask",
    "completion_input_ids",
    "completion_labels",
    "chain_sizes",
    "ref_scores",
    "chain_ids",
)
SPEC = LossSpec(loss="plackett_luce", beta=0.5)
_MODEL = {}


def model():
    """One tiny float64 Qwen2 (2 layers, V = 101, pad id 0) for the whole file."""
    if "m" not in _MODEL:
        _MODEL["m"] = tiny_text_model("qwen2", seed=21)
    return _MODEL["m"]


def oracle_scores(m, batch):
    """Each completion run on its own through the model's own forward: its prompt's real tokens, then its
    tokens up to its last scored label (unscored ones attended as tokens), the scored labels' log-probs
    summed (0 without any)."""
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    comp, labels = batch["completion_input_ids"].long(), batch["completion_labels"].long()
    out, s = [], 0
    for b, k in enumerate(batch["chain_sizes"].tolist()):
        prompt = ids[b][mask[b].bool()].long().tolist()
        for _ in range(int(k)):
            scored = (labels[s] != IGNORE).nonzero().flatten().tolist()
            if not scored:
                out.append(torch.zeros((), dtype=torch.float64))
                s += 1
                continue
            n = scored[-1] + 1
            seq = torch.tensor([prompt + comp[s, :n].tolist()])
            with torch.no_grad():
                logp = torch.log_softmax(m(input_ids=seq).logits[0].double(), -1)
            lp = logp[len(prompt) - 1 : len(prompt) - 1 + n]
            lab = labels[s, :n]
            keep = lab != IGNORE
            out.append(lp[keep].gather(-1, lab[keep][:, None]).sum())
            s += 1
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def _names_a_key(err: Exception) -> bool:
    return any(k in str(err) for k in KEYS)


# ------------------------------------------------------------------------------------------------------
# 6. completions must be right-padded


def _left_padded(batch, s=1, pads=2):
    """Completion ``s`` shifted right by ``pads`` columns of pad id / -100 (left padding)."""
    comp, labels = batch["completion_input_ids"].clone(), batch["completion_labels"].clone()
    S, L = comp.shape
    comp = torch.cat([comp, torch.full((S, pads), PAD)], 1)
    labels = torch.cat([labels, torch.full((S, pads), IGNORE)], 1)
    comp[s] = torch.cat([torch.full((pads,), PAD), comp[s, :L]])
    labels[s] = torch.cat([torch.full((pads,), IGNORE), labels[s, :L]])
    return {**batch, "completion_input_ids": comp, "completion_labels": labels}


@pytest.mark.parametrize("share_prefix", [None, False])
def test_left_padded_completions_are_refused(share_prefix):
    m = model()
    prompts, chains = random_chains([4, 6], [2, 3], seed=30)
    batch = _left_padded(text_batch(prompts, chains))
    with pytest.raises(
        ValueError, match=r"completion_input_ids'\]\[1\] starts with the pad id 0.*right-padded"
    ):
        ChainForward(m, share_prefix=share_prefix).scores(batch)
    with pytest.raises(ValueError, match="right-padded"):
        ChainRankModel(m, SPEC, share_prefix=share_prefix)(batch)
    # the batch check alone: the pad id from the prompts' padding, or given
    with pytest.raises(ValueError, match="right-padded"):
        check_chain_batch(batch)
    same_len = text_batch([prompts[1], prompts[1]], chains)  # no prompt padding: the pad id is unknown
    check_chain_batch(_left_padded(same_len))
    with pytest.raises(ValueError, match="right-padded"):
        check_chain_batch(_left_padded(same_len), pad_id=PAD)


@pytest.mark.parametrize("share_prefix", [None, False])
def test_unscored_tokens_are_attended_as_tokens_on_both_paths(share_prefix):
    """Unscored tokens inside a completion (a masked span, even one holding the pad id) and an unscored
    real first token are tokens, attended on both paths: scores equal the completion run on its own with
    them. A completion without scored labels scores 0, a right-padded one is unchanged."""
    m = model()
    prompts, chains = random_chains([4, 6], [2, 3], seed=31)
    batch = text_batch(prompts, chains)
    labels = batch["completion_labels"].clone()
    comp = batch["completion_input_ids"].clone()
    labels[0, 0] = IGNORE  # an unscored real first token
    labels[1, 1] = IGNORE  # a masked span inside
    comp[2, 1], labels[2, 1] = PAD, IGNORE  # a pad id inside, unscored
    labels[3] = IGNORE  # nothing scored
    batch = {**batch, "completion_input_ids": comp, "completion_labels": labels}
    check_chain_batch(batch, pad_id=PAD)
    cf = ChainForward(m, share_prefix=share_prefix)
    got, n = cf.scores(batch)
    want = oracle_scores(m, batch)
    torch.testing.assert_close(got.double(), want, atol=1e-9, rtol=1e-9)
    assert got[3] == 0 and n[3] == 0


# ------------------------------------------------------------------------------------------------------
# 9a. the empty batch


def _empty(P=5, L=3):
    return {
        "prompt_input_ids": torch.zeros(0, P, dtype=torch.long),
        "prompt_attention_mask": torch.zeros(0, P, dtype=torch.long),
        "completion_input_ids": torch.zeros(0, L, dtype=torch.long),
        "completion_labels": torch.zeros(0, L, dtype=torch.long),
        "chain_sizes": torch.zeros(0, dtype=torch.long),
        "ref_scores": torch.zeros(0, dtype=torch.float64),
    }


@pytest.mark.parametrize("share_prefix", [None, False])
@pytest.mark.parametrize("shape", [(5, 3), (0, 0)], ids=["P5-L3", "P0-L0"])
def test_empty_batch_gives_a_zero_loss_connected_to_every_parameter(share_prefix, shape):
    m = model()
    wrapper = ChainRankModel(
        m, LossSpec(beta=0.5, sft_weight=0.2, length_normalize=True), share_prefix=share_prefix
    )
    batch = _empty(*shape)
    for mode in ("rank", "sft"):
        m.zero_grad(set_to_none=True)
        out = wrapper(batch, mode=mode)
        assert out["loss"].shape == () and float(out["loss"].detach()) == 0.0
        out["loss"].backward()
        for name, p in m.named_parameters():
            assert p.grad is not None, (mode, name)
            assert not p.grad.any(), (mode, name)
    m.zero_grad(set_to_none=True)
    assert wrapper(batch)["chain"].pairwise_accuracy.shape == (0,)
    sc = wrapper(batch, mode="score")
    assert sc["scores"].shape == (0,) and sc["num_tokens"].shape == (0,)
    cf = ChainForward(m, share_prefix=share_prefix)
    assert cf.hidden_states(batch).shape == (0, shape[1], m.config.hidden_size)
    assert cf.loss(batch, SPEC, reduction="none").loss.shape == (0,)


# ------------------------------------------------------------------------------------------------------
# 9c. dtypes, sizes and ids


def _good():
    prompts, chains = random_chains([4, 6], [2, 3], seed=32)
    return text_batch(prompts, chains)


def _set(key, fn):
    return lambda b: {**b, key: fn(b[key])}


def _at(index, value):
    def f(t):
        t = t.clone()
        t[index] = value
        return t

    return f


BAD = {
    "float chain_sizes": (_set("chain_sizes", lambda t: t.float()), TypeError, "chain_sizes"),
    "negative chain_sizes": (_set("chain_sizes", lambda t: torch.tensor([-1, 6])), ValueError, "chain_sizes"),
    "zero chain_sizes": (_set("chain_sizes", lambda t: torch.tensor([0, 5])), ValueError, "chain_sizes"),
    "2-D chain_sizes": (_set("chain_sizes", lambda t: t[None]), ValueError, "chain_sizes"),
    "float prompt ids": (_set("prompt_input_ids", lambda t: t.float()), TypeError, "prompt_input_ids"),
    "bool prompt ids": (_set("prompt_input_ids", lambda t: t.bool()), TypeError, "prompt_input_ids"),
    "float mask": (_set("prompt_attention_mask", lambda t: t.float()), TypeError, "prompt_attention_mask"),
    "mask of 2": (_set("prompt_attention_mask", lambda t: t * 2), ValueError, "prompt_attention_mask"),
    "float completion ids": (
        _set("completion_input_ids", lambda t: t.double()),
        TypeError,
        "completion_input_ids",
    ),
    "float labels": (_set("completion_labels", lambda t: t.float()), TypeError, "completion_labels"),
    "uint8 labels": (
        _set("completion_labels", lambda t: t.clamp(min=0).to(torch.uint8)),
        TypeError,
        "completion_labels",
    ),
    "float ref_scores shape": (_set("ref_scores", lambda t: t[:-1]), ValueError, "ref_scores"),
    "int ref_scores": (_set("ref_scores", lambda t: t.long()), TypeError, "ref_scores"),
}
BAD_IDS = {
    "prompt id beyond vocab": (_set("prompt_input_ids", _at((0, -1), V)), "prompt_input_ids"),
    "prompt pad beyond vocab": (_set("prompt_input_ids", _at((0, 0), V + 7)), "prompt_input_ids"),
    "negative prompt id": (_set("prompt_input_ids", _at((1, -1), -3)), "prompt_input_ids"),
    "completion id beyond vocab": (_set("completion_input_ids", _at((2, 0), V + 1)), "completion_input_ids"),
    "completion pad of -100": (
        _set("completion_input_ids", lambda t: t.masked_fill(t == PAD, IGNORE)),
        "completion_input_ids",
    ),
    "label beyond vocab": (_set("completion_labels", _at((1, 0), V)), "completion_labels"),
    "negative label": (_set("completion_labels", _at((1, 0), -1)), "completion_labels"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_dtypes_and_sizes_name_the_key(case):
    edit, exc, key = BAD[case]
    batch = edit(_good())
    with pytest.raises(exc, match=re.escape(f"batch['{key}']")):
        check_chain_batch(batch)
    for share_prefix in (None, False):
        with pytest.raises(exc, match=re.escape(f"batch['{key}']")):
            ChainForward(model(), share_prefix=share_prefix).loss(batch, SPEC)


@pytest.mark.parametrize("case", sorted(BAD_IDS))
def test_ids_outside_the_vocabulary_name_the_key(case):
    edit, key = BAD_IDS[case]
    batch = edit(_good())
    check_chain_batch(batch)  # the layout is fine; the model knows the vocabulary
    with pytest.raises(ValueError, match=re.escape(f"batch['{key}']") + r".*outside the model's vocabulary"):
        check_chain_batch(batch, vocab_size=V)
    for share_prefix in (None, False):
        cf = ChainForward(model(), share_prefix=share_prefix)
        with pytest.raises(ValueError, match=re.escape(f"batch['{key}']")):
            cf.scores(batch)
        # also when the collator built (and checked) the batch, which does not know the model
        with pytest.raises(ValueError, match=re.escape(f"batch['{key}']")):
            cf.loss({**batch, "chain_tree": build_chain_tree(batch)}, SPEC)


def test_other_integer_dtypes_are_accepted_and_give_the_same_loss():
    m = model()
    batch = _good()
    want = ChainForward(m).loss(batch, SPEC).loss
    other = {
        **batch,
        "prompt_input_ids": batch["prompt_input_ids"].int(),
        "prompt_attention_mask": batch["prompt_attention_mask"].bool(),
        "completion_input_ids": batch["completion_input_ids"].to(torch.uint8),
        "completion_labels": batch["completion_labels"].to(torch.int16),
        "chain_sizes": batch["chain_sizes"].int(),
    }
    for share_prefix in (None, False):
        got = ChainForward(m, share_prefix=share_prefix).loss(other, SPEC).loss
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


# ------------------------------------------------------------------------------------------------------
# 7. a chain that cannot be ranked names its record


@pytest.mark.parametrize("share_prefix", [None, False])
def test_a_chain_of_one_completion_names_its_record(share_prefix):
    m = model()
    prompts, chains = random_chains([4, 6, 5], [2, 1, 3], seed=33)
    batch = {**text_batch(prompts, chains), "chain_ids": ["rec-a", "rec-b", "rec-c"]}
    wrapper = ChainRankModel(m, SPEC, share_prefix=share_prefix)
    with pytest.raises(
        ValueError, match=r"chain_sizes'\]\[1\] = 1: chain 1 \(batch\['chain_ids'\]\[1\] = 'rec-b'\)"
    ) as e:
        wrapper(batch)
    assert ">= 2 distinct completions" in str(e.value) and "mode='score'" in str(e.value)
    no_ids = {k: v for k, v in batch.items() if k != "chain_ids"}
    with pytest.raises(ValueError, match=r"chain_sizes'\]\[1\] = 1: chain 1 has 1 completion"):
        ChainForward(m, share_prefix=share_prefix).loss(no_ids, SPEC)
    # scoring (and SFT) takes it
    sc = wrapper(batch, mode="score")
    torch.testing.assert_close(sc["scores"].double(), oracle_scores(m, batch), atol=1e-9, rtol=1e-9)
    assert torch.isfinite(wrapper(batch, mode="sft")["loss"])


# ------------------------------------------------------------------------------------------------------
# Hypothesis: random batch dicts


FAULTS = (
    "empty chain",
    "empty prompt",
    "right-padded prompt",
    "left-padded completion",
    "float dtype",
    "uint8 labels",
    "id beyond vocab",
    "missing key",
)
INT_DTYPES = {
    "prompt_input_ids": [torch.int32, torch.int16],
    "prompt_attention_mask": [torch.bool, torch.int8],
    "completion_input_ids": [torch.int32],
    "completion_labels": [torch.int32, torch.int16],
    "chain_sizes": [torch.int32],
}


@st.composite
def random_batches(draw):
    """A chain batch dict: random ``B`` (0 included), ``K_b`` (1 included), prompt lengths, ``L``,
    completions with unscored tokens first, inside (a pad id too) and last, right padding, and random
    integer dtypes; and, in about 4 draws of 10, one fault (``FAULTS``). Returns ``(batch, fault, ranks)``:
    ``ranks`` whether the loss may rank it (no fault, every ``K_b >= 2``)."""
    fault = draw(st.sampled_from((None,) * 12 + FAULTS))
    B = draw(st.sampled_from([0, 1, 2, 2, 3, 3]))
    if fault is not None:
        B = max(B, 1)
    ks = [draw(st.integers(1, 3)) for _ in range(B)]
    plens = [draw(st.integers(1, 4)) for _ in range(B)]
    if fault == "empty chain":
        ks[draw(st.integers(0, B - 1))] = 0
    if fault == "empty prompt":
        plens[draw(st.integers(0, B - 1))] = 0
    if fault == "right-padded prompt":
        plens[0] = min(plens[0], 3)
    P = (
        max(plens) + (1 if fault == "right-padded prompt" else draw(st.integers(0, 2)))
        if B
        else draw(st.integers(0, 3))
    )
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    ids = torch.full((B, P), PAD, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for b, n in enumerate(plens):
        sl = slice(0, n) if fault == "right-padded prompt" else slice(P - n, P)
        ids[b, sl] = torch.randint(3, V, (n,), generator=g)
        mask[b, sl] = 1
    rows = []
    for _ in range(sum(ks)):
        n = draw(st.integers(0, 4))
        toks = torch.randint(3, V, (n,), generator=g).tolist()
        labels = [t if draw(st.booleans()) else IGNORE for t in toks]
        if n > 1 and draw(st.booleans()):  # a hole: unscored, sometimes the pad id
            i = draw(st.integers(1, n - 1))
            toks[i], labels[i] = (PAD if draw(st.booleans()) else toks[i]), IGNORE
        rows.append([toks, labels])
    if fault == "left-padded completion":
        toks, labels = rows[draw(st.integers(0, len(rows) - 1))]
        if all(la == IGNORE for la in labels):
            toks.append(7)
            labels.append(7)
        toks[:0], labels[:0] = [PAD, PAD], [IGNORE, IGNORE]
    L = max((len(t) for t, _ in rows), default=draw(st.integers(0, 2))) + draw(st.integers(0, 1))
    S = len(rows)
    comp = torch.full((S, L), PAD, dtype=torch.long)
    lab = torch.full((S, L), IGNORE, dtype=torch.long)
    for s, (t, la) in enumerate(rows):
        comp[s, : len(t)] = torch.tensor(t, dtype=torch.long)
        lab[s, : len(la)] = torch.tensor(la, dtype=torch.long)
    batch = {
        "prompt_input_ids": ids,
        "prompt_attention_mask": mask,
        "completion_input_ids": comp,
        "completion_labels": lab,
        "chain_sizes": torch.tensor(ks, dtype=torch.long),
        "ref_scores": -5 * torch.rand(S, generator=g, dtype=torch.float64),
        "chain_ids": [f"r{b}" for b in range(B)],
    }
    for key, choices in INT_DTYPES.items():  # other integer dtypes are fine
        if draw(st.integers(0, 3)) == 0:
            batch[key] = batch[key].to(draw(st.sampled_from(choices)))
    keys = sorted(INT_DTYPES)
    if fault == "float dtype":
        key = draw(st.sampled_from(keys))
        batch[key] = batch[key].float()
    if fault == "uint8 labels":
        batch["completion_labels"] = batch["completion_labels"].clamp(min=0).to(torch.uint8)
    if fault == "id beyond vocab":
        key = draw(st.sampled_from(["prompt_input_ids", "completion_input_ids", "completion_labels"]))
        flat = batch[key].long().reshape(-1)
        if flat.numel() == 0:
            key, flat = "prompt_input_ids", batch["prompt_input_ids"].long().reshape(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = V + draw(st.integers(0, 50))
        batch[key] = flat.view(batch[key].shape)
    if fault == "missing key":
        del batch[draw(st.sampled_from(keys))]
    return batch, fault, fault is None and all(k >= 2 for k in ks)


@settings(max_examples=40, deadline=None)
@given(random_batches())
def test_random_batches_score_like_each_chain_alone_or_name_a_key(drawn):
    """Each drawn batch either scores, on both paths, like each chain run on its own (and its loss is the
    reference loss of those scores), or raises a ValueError / TypeError that names a batch key; never a
    torch error. Exactly the batches with a fault raise."""
    batch, fault, ranks = drawn
    bad = fault is not None
    m = model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for share_prefix in (None, False):
            cf = ChainForward(m, share_prefix=share_prefix)
            try:
                scores, num = cf.scores(batch)
            except (ValueError, TypeError) as err:
                assert bad, f"a valid batch was refused: {err}"
                assert _names_a_key(err), err
                continue
            assert not bad, "an invalid batch was accepted"
            want = oracle_scores(m, batch)
            torch.testing.assert_close(scores.double(), want, atol=1e-8, rtol=1e-8)
            assert num.tolist() == (batch["completion_labels"].long() != IGNORE).sum(-1).tolist()
            try:
                out = cf.loss(batch, SPEC)
            except ValueError as err:
                assert not ranks and "chain_sizes" in str(err) and "chain_ids" in str(err), err
                continue
            assert ranks
            assert torch.isfinite(out.loss)
            sizes = batch["chain_sizes"].tolist()
            if not sizes:  # the empty batch (the reference has no empty case)
                assert float(out.loss.detach()) == 0.0
                continue
            loss, _, _ = ref_chain_loss(
                want, sizes, batch["ref_scores"], loss="plackett_luce", beta=SPEC.beta
            )
            torch.testing.assert_close(out.loss.detach(), loss, atol=1e-8, rtol=1e-7)
