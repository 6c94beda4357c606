"""The chain tree's layout (rankloss.integrations.layout) and its attention's index arithmetic
(rankloss.integrations.attention), checked against brute force on hypothesis-drawn batches: prompts of
different lengths (left-padded), chains of different sizes, completions with unscored tokens inside and
at the end (or none scored at all); every token's place, the tree rule, positions, the scored states,
the flash path's segments and gathered keys (bottom-right causal, windows), SDPA's padded groups."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankloss.integrations.attention import _flash_index, _group_mask, _groups
from rankloss.integrations.layout import ChainTree, build_chain_tree, check_chain_batch

IGNORE = -100


@st.composite
def chain_batches(draw):
    """A chain batch and, per completion, its owner chain, real tokens (up to its last scored label) and
    labels."""
    B = draw(st.integers(1, 4))
    plens = [draw(st.integers(1, 7)) for _ in range(B)]
    ks = [draw(st.integers(1, 4)) for _ in range(B)]
    S = sum(ks)
    comps = []
    for _ in range(S):
        n = draw(st.integers(1, 6))
        scored = [draw(st.booleans()) for _ in range(n)]
        if draw(st.booleans()):
            scored[-1] = True  # most completions end with a scored token (EOS)
        comps.append(scored)
    P = max(plens) + draw(st.integers(0, 2))
    L = max(len(c) for c in comps) + draw(st.integers(0, 2))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(B, P, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.long)
    for b, n in enumerate(plens):
        ids[b, P - n :] = torch.randint(3, 1000, (n,), generator=g)
        mask[b, P - n :] = 1
    cids = torch.zeros(S, L, dtype=torch.long)
    labels = torch.full((S, L), IGNORE)
    for s, scored in enumerate(comps):
        tok = torch.randint(3, 1000, (len(scored),), generator=g)
        cids[s, : len(scored)] = tok
        labels[s, : len(scored)] = torch.where(torch.tensor(scored), tok, torch.tensor(IGNORE))
    batch = {
        "prompt_input_ids": ids,
        "prompt_attention_mask": mask,
        "completion_input_ids": cids,
        "completion_labels": labels,
        "chain_sizes": torch.tensor(ks),
    }
    return batch, plens, ks


def full_sequences(batch, plens, ks):
    """Brute force: per completion ``s`` its full sequence ``[prompt, completion tokens up to the last
    scored label]`` as token ids, and the row's tokens as ``(chain, completion or None, index in the full
    sequence)`` in row order."""
    ids, cids, labels = batch["prompt_input_ids"], batch["completion_input_ids"], batch["completion_labels"]
    P = ids.shape[1]
    row, seqs = [], []
    s = 0
    for b, (n, k) in enumerate(zip(plens, ks)):
        prompt = ids[b, P - n :].tolist()
        row += [(b, None, i, prompt[i]) for i in range(n)]
        for _ in range(k):
            scored = (labels[s] != IGNORE).nonzero().flatten().tolist()
            m = scored[-1] + 1 if scored else 0
            comp = cids[s, :m].tolist()
            row += [(b, s, n + t, comp[t]) for t in range(m)]
            seqs.append((b, prompt + comp, n, m))
            s += 1
    return row, seqs


def tree_rule(tree: ChainTree) -> torch.Tensor:
    q = torch.arange(tree.num_tokens)[:, None]
    k = torch.arange(tree.num_tokens)[None, :]
    return (k <= q) & (q < tree.subtree_end[None, :])


def brute_mask(row) -> torch.Tensor:
    """q may attend to k iff both are in one full sequence and k comes first in it."""
    N = len(row)
    out = torch.zeros(N, N, dtype=torch.bool)
    for qi, (bq, sq, iq, _) in enumerate(row):
        for ki, (bk, sk, ik, _) in enumerate(row):
            same_seq = bq == bk and (sk is None or sk == sq)
            out[qi, ki] = same_seq and ik <= iq and ki <= qi
    return out


@settings(max_examples=60, deadline=None)
@given(chain_batches())
def test_layout_matches_brute_force(drawn):
    batch, plens, ks = drawn
    check_chain_batch(batch)
    tree = build_chain_tree(batch)
    row, seqs = full_sequences(batch, plens, ks)
    N = len(row)
    assert tree.input_ids.shape == (1, N) and tree.num_tokens == N  # one row, no padding
    assert tree.input_ids[0].tolist() == [r[3] for r in row]
    assert tree.text_positions.tolist() == [r[2] for r in row]
    assert torch.equal(tree_rule(tree), brute_mask(row))
    # scored states: label t of completion s is scored by the token before it in its full sequence
    S, L = batch["completion_labels"].shape
    expect_labels, expect_index = [], []
    start = {}
    for i, (b, s, _, _) in enumerate(row):
        start.setdefault((b, s), i)
    for s, (b, _, n, m) in enumerate(seqs):
        for t in range(m):
            expect_labels.append(int(batch["completion_labels"][s, t]))
            expect_index.append(start[(b, None)] + n - 1 if t == 0 else start[(b, s)] + t - 1)
    assert tree.labels.tolist() == expect_labels
    assert tree.scored_index.tolist() == expect_index
    assert tree.cu_seqlens.tolist() == [0] + torch.cumsum(torch.tensor([m for *_, m in seqs]), 0).tolist()
    assert tree.cu_seqlens.dtype == torch.int32
    # to_padded puts each scored state where its label is
    hidden = torch.arange(len(expect_labels), dtype=torch.float64)[:, None] + 1
    padded = tree.to_padded(hidden)[..., 0]
    where = padded != 0
    assert torch.equal(where.sum(-1), torch.tensor([m for *_, m in seqs]))
    assert padded[where].tolist() == hidden[:, 0].tolist()
    # a per-prompt-token key moves with the prompt tokens
    types = torch.where(batch["prompt_attention_mask"].bool(), batch["prompt_input_ids"], 0)
    moved = tree.relayout_prompt(types)[0].tolist()
    assert moved == [tok if s is None else 0 for (_, s, _, tok) in row]
    # positions: the family's prompt positions and completion positions, placed token by token
    pp = batch["prompt_attention_mask"].cumsum(-1) - 1
    nxt = batch["prompt_attention_mask"].sum(-1)
    owner = torch.repeat_interleave(torch.arange(len(ks)), batch["chain_sizes"])
    cp = nxt[owner][:, None] + torch.arange(L)[None, :]
    bound = tree.bind(torch.stack([pp, 2 * pp]), torch.stack([cp, 2 * cp]), "sdpa")
    assert bound.position_ids.shape == (2, 1, N)
    assert bound.position_ids[0, 0].tolist() == [r[2] for r in row]
    assert bound.position_ids[1, 0].tolist() == [2 * r[2] for r in row]
    assert bound.cache == {} and bound.calls == 0 and bound.attention == "sdpa"


@settings(max_examples=60, deadline=None)
@given(chain_batches(), st.sampled_from([None, 1, 2, 3, 5]))
def test_flash_segments_reproduce_the_tree_rule(drawn, window):
    """flash_attn_varlen_func's causal mask aligns bottom-right: query i of a segment with sq queries and
    sk keys sees keys [0, i + sk - sq] (and, with window_size=(w - 1, 0), none before i + sk - sq - w + 1).
    Over the gathered keys that must be exactly the tree rule (and the window in position space)."""
    batch, plens, ks = drawn
    tree = build_chain_tree(batch)
    kv_index, cu_q, cu_k, max_q, max_k = _flash_index(tree, torch.device("cpu"))
    assert cu_q.dtype == cu_k.dtype == torch.int32
    cq, ck = cu_q.tolist(), cu_k.tolist()
    assert cq[-1] == tree.num_tokens and ck[-1] == kv_index.numel()
    assert max_q == max(b - a for a, b in zip(cq, cq[1:])) and max_k == max(b - a for a, b in zip(ck, ck[1:]))
    want = tree_rule(tree)
    pos = tree.text_positions
    if window is not None:
        want &= (pos[:, None] - pos[None, :]) < window
    got = torch.zeros_like(want)
    for g in range(len(cq) - 1):
        sq, sk = cq[g + 1] - cq[g], ck[g + 1] - ck[g]
        keys = kv_index[ck[g] : ck[g + 1]]
        assert torch.all(keys[1:] > keys[:-1])  # in row order, no key twice
        for i in range(sq):
            last = i + sk - sq
            first = 0 if window is None else max(0, last - (window - 1))
            got[cq[g] + i, keys[first : last + 1]] = True
    assert torch.equal(got, want)


@settings(max_examples=60, deadline=None)
@given(chain_batches(), st.sampled_from([None, 1, 2, 4]))
def test_sdpa_groups_reproduce_the_tree_rule(drawn, window):
    """The two padded groups: each real query slot's allowed (real) keys are exactly the tree rule's; a
    padding slot attends to something (no empty softmax row); every token's output comes from its slot."""
    batch, plens, ks = drawn
    tree = build_chain_tree(batch)
    groups = _groups(tree, torch.device("cpu"))
    want = tree_rule(tree)
    pos = tree.text_positions
    if window is not None:
        want &= (pos[:, None] - pos[None, :]) < window
    got = torch.zeros_like(want)
    slots = []
    for name in ("a", "b"):
        g = groups.get(name)
        if g is None:
            continue
        mask = _group_mask(g, window)
        assert bool(mask.any(-1).all()), "a query slot with no key"
        for r in range(g["q"].shape[0]):
            for i in range(g["q"].shape[1]):
                slots.append(int(g["q"][r, i]) if g["q_valid"][r, i] else None)
                if not g["q_valid"][r, i]:
                    continue
                allowed = mask[r, i] & g["k_valid"][r]
                assert torch.equal(mask[r, i], allowed)  # no padding key is attended
                got[int(g["q"][r, i]), g["k"][r][allowed]] = True
    assert torch.equal(got, want)
    assert [slots[i] for i in groups["source"].tolist()] == list(range(tree.num_tokens))


def _batch():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    return {
        "prompt_input_ids": ids,
        "prompt_attention_mask": (ids != 0).long(),
        "completion_input_ids": torch.tensor([[3, 4], [5, 0], [6, 7]]),
        "completion_labels": torch.tensor([[3, 4], [5, IGNORE], [6, 7]]),
        "chain_sizes": torch.tensor([2, 1]),
    }


def test_bad_batches_name_what_is_wrong():
    check_chain_batch(_batch())
    holes = {**_batch(), "prompt_attention_mask": torch.tensor([[1, 0, 1], [1, 1, 1]])}
    with pytest.raises(ValueError, match="contiguous"):
        check_chain_batch(holes)
    empty = {**_batch(), "prompt_attention_mask": torch.tensor([[0, 0, 0], [1, 1, 1]])}
    with pytest.raises(ValueError, match="left-padded|no tokens"):
        check_chain_batch(empty)
    with pytest.raises(ValueError, match=r"chain_sizes'\] must be >= 1"):
        check_chain_batch({**_batch(), "chain_sizes": torch.tensor([3, 0])})
    with pytest.raises(ValueError, match=r"completion_input_ids'\] must be \[S, L\]"):
        check_chain_batch({**_batch(), "completion_input_ids": torch.zeros(3)})
    with pytest.raises(TypeError, match="batch must be a dict"):
        check_chain_batch([1, 2])


def test_to_and_bind_copy_and_leave_the_built_tree_alone():
    tree = build_chain_tree(_batch())
    tree.cache["x"] = 1
    moved = tree.to("cpu")
    assert moved is not tree and moved.cache == {} and tree.cache == {"x": 1}
    assert moved.segments == tree.segments and torch.equal(moved.input_ids, tree.input_ids)
    pos = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"positions must be \[\.\., B, P\]"):
        tree.bind(pos[:1], torch.zeros(3, 2, dtype=torch.long), "sdpa")
    bound = tree.bind(pos, torch.zeros(3, 2, dtype=torch.long), "flex")
    assert bound.attention == "flex" and tree.attention == "sdpa" and tree.position_ids is None
    # the tokens: prompt 1 (2 real), its completions [3, 4] and [5] (cut after its last label), then
    # prompt 2 and its completion
    assert tree.input_ids[0].tolist() == [5, 6, 3, 4, 5, 7, 8, 9, 6, 7]
    assert tree.subtree_end.tolist() == [5, 5, 4, 4, 5, 10, 10, 10, 10, 10]
    assert tree.segments == ((0, 2, 0, 0), (2, 2, 0, 2), (4, 1, 0, 2), (5, 3, 5, 0), (8, 2, 5, 3))


def test_copies_made_by_fsdp2_input_casting_share_the_count_and_cache():
    """FSDP2's ``cast_forward_inputs`` rebuilds dataclasses (``dataclasses.replace``) and dicts in every
    unit's inputs: each decoder layer got a copy of ``chain_tree``, so ``calls`` counted on copies (the
    forward's check then failed: "ran in 0 of 2 layers") and every layer rebuilt the masks."""
    from torch.distributed.utils import _apply_to_tensors

    bound = build_chain_tree(_batch()).bind(
        torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), "sdpa"
    )
    copy = _apply_to_tensors(lambda t: t.clone(), {"chain_tree": bound})["chain_tree"]
    assert copy is not bound and copy.input_ids is not bound.input_ids  # really a rebuilt copy
    copy.calls += 1
    copy.cache["groups"] = "built once"
    assert bound.calls == 1 and bound.cache == {"groups": "built once"}
    # a move or a new binding starts afresh
    assert bound.to("cpu").calls == 0 and bound.to("cpu").cache == {}
