"""The chain tree: a chain batch packed into one padding-free row, each prompt (and its media) once.

A chain batch (the table in :mod:`rankloss.integrations`) holds ``B`` left-padded prompts ``[B, P]`` and
``S = sum_b K_b`` right-padded completions ``[S, L]``. :func:`build_chain_tree` lays it out as **one row**
of ``N`` tokens, chain after chain, each chain as its prompt's real tokens followed by its ``K``
completions::

    [ prompt_1 | c_11 | c_12 | c_13 | prompt_2 | c_21 | c_22 | ... ]

A completion keeps its tokens up to its last scored label (``labels != ignore_index``): tokens after it
change no scored log-prob (the model is causal), so nothing is lost. The **tree rule**: token ``q`` may
attend to key ``k`` iff ``k <= q < subtree_end[k]``, where ``subtree_end`` is the end of the chain for a
prompt token and the end of its own completion for a completion token. So a
completion token sees its prompt and the earlier tokens of its own completion, exactly what it sees in
its own full sequence ``[prompt, completion]``. Sliding-window layers also need
``text_positions[q] - text_positions[k] < window``, where ``text_positions`` is a token's index in its
own full sequence (the prompt from 0, a completion from the prompt's length).

**Positions** come from the model's family (never from ``get_rope_index`` over the packed row): the
prompt keeps the positions the family gives the padded prompt batch (Qwen's 3-axis multimodal RoPE
included), and completion token ``t`` sits at the prompt's next position ``+ t`` on every axis.

**Segments**: the row is cut into segments, each a prompt or a completion; a segment's queries attend
causally to its keys, which are the segment itself plus, for a completion, its chain's prompt in front.
This is the form the attention kernels take (``flash_attn_varlen_func``'s ``cu_seqlens`` with
bottom-right causal alignment, or SDPA over padded groups of segments;
:mod:`rankloss.integrations.attention`).

**Scored states**: the hidden state that scores completion ``s``'s label ``t`` is the prompt's last
token's for ``t = 0`` and completion token ``t - 1``'s otherwise; :attr:`ChainTree.scored_index` picks
them, chain after chain, into the packed ``cu_seqlens`` layout :func:`rankloss.fused_linear_chain_loss`
takes (``labels [M]``, ``cu_seqlens [S + 1]``).

:func:`check_chain_batch` validates a batch once, where its layout is built (keys, dtypes, shapes, sizes,
left-padded prompts, right-padded completions): in the collator, or in the chain forward for a batch built
by hand; :func:`check_token_ids` checks the ids against the model's vocabulary (in the chain forward).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from .._validation import INT_DTYPES, check_labels, values_checkable

__all__ = [
    "ChainTree",
    "build_chain_tree",
    "check_chain_batch",
    "check_chain_keys",
    "check_prompt_batch",
    "check_token_ids",
]

IGNORE_INDEX = -100

#: Keys of the chain batch the layout reads.
_REQUIRED = (
    "prompt_input_ids",
    "prompt_attention_mask",
    "completion_input_ids",
    "completion_labels",
    "chain_sizes",
)


def _check_present(batch: Any, keys: tuple[str, ...]) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict (a chain batch), got {type(batch).__name__}")
    for key in keys:
        if not isinstance(batch.get(key), Tensor):
            raise ValueError(
                f"batch[{key!r}] is missing or not a tensor (see rankloss.integrations for the chain batch)"
            )


def _check_dtypes(batch: Mapping[str, Any], keys: tuple[str, ...], ignore_index: int = IGNORE_INDEX) -> None:
    """``keys`` of integer dtypes (the mask may be bool; the labels' dtype holds ``ignore_index``)."""
    for key in keys:
        dtype = batch[key].dtype
        if key == "completion_labels":
            check_labels(batch[key], ignore_index, name=f"batch[{key!r}]")
        elif dtype not in INT_DTYPES and not (key == "prompt_attention_mask" and dtype == torch.bool):
            kind = "an integer or bool" if key == "prompt_attention_mask" else "an integer"
            raise TypeError(f"batch[{key!r}] must be {kind} tensor (torch.long), got {dtype}")


def _raise_first(problems: list[tuple[Tensor, Any]], device: torch.device) -> None:
    """One host sync for all the layout checks: raise the first problem whose flag is true (its message, a
    string or a function that builds it, only then reads values)."""
    if not problems:
        return
    flags = torch.stack([flag.reshape(()).to(device) for flag, _ in problems]).tolist()
    for bad, (_, message) in zip(flags, problems):
        if bad:
            raise ValueError(message() if callable(message) else message)


def _prompt_problems(ids: Tensor, mask: Tensor) -> list[tuple[Tensor, Any]]:
    if ids.shape[0] == 0:
        return []
    m = mask.long()
    problems: list[tuple[Tensor, Any]] = [
        (
            ((m != 0) & (m != 1)).any(),
            "batch['prompt_attention_mask'] must hold 0 (padding) and 1 (real tokens) only",
        )
    ]
    if ids.shape[1]:
        problems.append(
            (
                (m[:, -1] == 0).any(),
                "batch['prompt_attention_mask']: prompts must be left-padded (a row ends with padding)",
            )
        )
    problems += [
        (
            (m[:, 1:] < m[:, :-1]).any(),
            "batch['prompt_attention_mask']: prompts must be left-padded, with their real tokens "
            "contiguous (a 0 follows a 1 in some row)",
        ),
        (
            (m.sum(1) == 0).any(),
            "batch['prompt_attention_mask']: a prompt has no tokens; the first completion token is scored "
            "from the prompt's last token, so each prompt needs at least one",
        ),
    ]
    return problems


def check_chain_keys(batch: Mapping[str, Any], *, ignore_index: int = IGNORE_INDEX) -> None:
    """The keys of a chain batch present, as tensors of integer dtypes (``prompt_attention_mask`` may be
    bool; ``completion_labels`` of a dtype that holds ``ignore_index``): the free part of
    :func:`check_chain_batch` (no host sync)."""
    _check_present(batch, _REQUIRED)
    _check_dtypes(batch, _REQUIRED, ignore_index)


def check_prompt_batch(batch: Mapping[str, Any]) -> None:
    """The prompt keys of a chain batch: present, integer tensors (the mask may be bool) ``[B, P]``, the
    mask 0 / 1 and left-padded, every prompt at least one token (``ValueError`` / ``TypeError`` naming
    the key). One host sync."""
    keys = ("prompt_input_ids", "prompt_attention_mask")
    _check_present(batch, keys)
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    if ids.dim() != 2 or tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"batch['prompt_attention_mask'] must be [B, P] = {list(ids.shape)}, got {list(mask.shape)}"
        )
    _check_dtypes(batch, keys)
    _raise_first(_prompt_problems(ids, mask), ids.device)


def check_chain_batch(
    batch: Mapping[str, Any],
    *,
    pad_id: int | None = None,
    vocab_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> None:
    """Every key the chain forward reads, checked (``ValueError`` / ``TypeError`` naming the key):

    * present, integer tensors (``prompt_attention_mask`` may be bool; ``completion_labels`` of a dtype
      that holds ``ignore_index``), ``prompt_* [B, P]``, ``completion_* [S, L]``, ``chain_sizes [B]``
      each ``>= 1`` and summing to ``S``; ``ref_scores``, when present, a float tensor ``[S]``;
    * prompts left-padded (:func:`check_prompt_batch`);
    * completions **right**-padded. There is no completion attention mask: every column up to a
      completion's last scored label (``completion_labels != ignore_index``) is a real token, attended
      on both paths (the chain tree and full sequences) alike. So unscored tokens *inside* a
      completion (a masked span) are allowed, and so is an unscored first token that is a real token;
      but a completion whose first column is unscored and holds the pad id, before a scored label, is
      left padding (its pads would be attended and change the scores) and is refused. The pad ids are
      ``pad_id`` (the chain forward passes the model's) and the ids at the prompts' padding. A
      completion without any scored label is allowed: it scores 0 (see the chain losses);
    * with ``vocab_size``: the ids and labels in range (:func:`check_token_ids`).

    One host sync for the layout (the value checks of ``vocab_size`` follow :func:`check_token_ids`).
    """
    _check_present(batch, _REQUIRED)
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    if ids.dim() != 2 or tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"batch['prompt_attention_mask'] must be [B, P] = {list(ids.shape)}, got {list(mask.shape)}"
        )
    B = int(ids.shape[0])
    comp, labels = batch["completion_input_ids"], batch["completion_labels"]
    if comp.dim() != 2:
        raise ValueError(f"batch['completion_input_ids'] must be [S, L], got {list(comp.shape)}")
    S, L = comp.shape
    if tuple(labels.shape) != (S, L):
        raise ValueError(f"batch['completion_labels'] must be [S, L] = {[S, L]}, got {list(labels.shape)}")
    sizes = batch["chain_sizes"]
    if sizes.dim() != 1 or sizes.numel() != B:
        raise ValueError(f"batch['chain_sizes'] must be [B] = [{B}], got {list(sizes.shape)}")
    ref = batch.get("ref_scores")
    if ref is not None:
        if not isinstance(ref, Tensor) or not ref.is_floating_point():
            raise TypeError(
                f"batch['ref_scores'] must be a float tensor [S] = [{S}], got "
                f"{ref.dtype if isinstance(ref, Tensor) else type(ref).__name__}"
            )
        if tuple(ref.shape) != (S,):
            raise ValueError(f"batch['ref_scores'] must be [S] = [{S}], got {list(ref.shape)}")
    if B == 0 and S:
        raise ValueError(f"batch['chain_sizes'] is empty (no chains), but there are S = {S} completions")
    _check_dtypes(batch, _REQUIRED, ignore_index)

    device = ids.device
    problems = _prompt_problems(ids, mask)
    if B:
        sizes_d = sizes.to(device)
        problems += [
            (
                (sizes_d < 1).any(),
                lambda: f"batch['chain_sizes'] must be >= 1 (completions per chain), got {sizes.tolist()}",
            ),
            (
                sizes_d.long().sum() != S,
                lambda: f"batch['chain_sizes'] sums to {int(sizes.sum())}, but there are S = {S} completions",
            ),
        ]
    if S and L:
        labels_d = labels.to(device)
        comp_d = comp.to(device)
        first = comp_d[:, 0]
        # the pad ids: the model's, and the id at each padded prompt's first column
        is_pad = (
            ((first[:, None] == ids[None, :, 0]) & (mask[None, :, 0] == 0)).any(1) if ids.shape[1] else None
        )
        if pad_id is not None:
            is_pad = (first == pad_id) if is_pad is None else (is_pad | (first == pad_id))
        if is_pad is not None:
            left = is_pad & (labels_d[:, 0] == ignore_index) & (labels_d != ignore_index).any(1)

            def left_padded() -> str:
                s = int(left.nonzero()[0, 0])
                return (
                    f"batch['completion_input_ids'][{s}] starts with the pad id "
                    f"{int(comp[s, 0])} (label {ignore_index}) before its scored labels: completions must "
                    "be right-padded (there is no completion attention mask, so leading pads would be "
                    "attended and change the scores); pad them on the right, as the collator does"
                )

            problems.append((left.any(), left_padded))
    _raise_first(problems, device)
    if vocab_size is not None:
        check_token_ids(batch, vocab_size, ignore_index=ignore_index)


def check_token_ids(
    batch: Mapping[str, Any],
    vocab_size: int,
    *,
    label_vocab_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> None:
    """``prompt_input_ids`` and ``completion_input_ids`` in ``[0, vocab_size)`` (padding too: the model
    embeds it), ``completion_labels`` in ``[0, label_vocab_size)`` (default ``vocab_size``) or
    ``ignore_index``: ``ValueError`` naming the key, the first bad element and what to do. A value
    check: on CPU tensors always, on CUDA tensors only with ``RANKLOSS_VALIDATE=1`` (it costs a host
    sync), never while ``torch.compile`` traces."""
    label_vocab_size = vocab_size if label_vocab_size is None else label_vocab_size
    for key, V in (
        ("prompt_input_ids", vocab_size),
        ("completion_input_ids", vocab_size),
        ("completion_labels", label_vocab_size),
    ):
        t = batch[key]
        if t.numel() == 0 or not values_checkable(t):
            continue
        v = t.long()
        bad = (v < 0) | (v >= V)
        if key == "completion_labels":
            bad &= v != ignore_index
        if not bool(bad.any()):
            continue
        where = tuple(int(i) for i in bad.nonzero()[0].tolist())
        what = "ids" if key != "completion_labels" else f"labels (other than {ignore_index})"
        hint = (
            "pad with the tokenizer's pad id (not -100), and check that the model's embeddings match the "
            "tokenizer (model.resize_token_embeddings(len(tokenizer)))"
            if key != "completion_labels"
            else f"mark unscored tokens with {ignore_index}"
        )
        raise ValueError(
            f"batch[{key!r}] holds {int(bad.sum())} {what} outside the model's vocabulary [0, {V}), the "
            f"first {key}[{', '.join(map(str, where))}] = {int(v[where])}; {hint}"
        )


class _TreeState:
    """What one bound tree's attention counts and builds. Not a dataclass, dict or list on purpose: FSDP2's
    ``cast_forward_inputs`` (``torch.distributed.utils._apply_to_tensors``) rebuilds every dataclass, dict
    and list in a unit's inputs, so each decoder layer gets a copy of the ``chain_tree`` keyword; this
    object is carried over by reference, so every copy shares one count and one cache."""

    __slots__ = ("calls", "cache")

    def __init__(self) -> None:
        self.calls = 0
        self.cache: dict[Any, Any] = {}


@dataclass
class ChainTree:
    """One chain batch as one packed row of ``N`` tokens (see the module docstring); ``M`` scored tokens,
    ``S`` completions, ``B`` chains.

    Built from the batch alone (:func:`build_chain_tree`: what the collator attaches as
    ``batch["chain_tree"]``, on the CPU); the chain forward binds a copy to the model
    (:meth:`bind`: the device, the family's positions, the attention path), whose attention then keeps
    its index tensors and masks in :attr:`cache` for every layer and for the recompute of checkpointed
    layers."""

    #: ``[1, N]`` token ids.
    input_ids: Tensor
    #: ``[N]`` each token's index in its own full sequence ``[prompt, completion]``.
    text_positions: Tensor
    #: ``[N]`` the end (exclusive) of the queries that may attend to each key.
    subtree_end: Tensor
    #: ``[M]`` row index of the hidden state that scores each scored label.
    scored_index: Tensor
    #: ``[M]`` the labels those states score, completion after completion.
    labels: Tensor
    #: ``[S + 1]`` int32 offsets of each completion's labels in ``labels``.
    cu_seqlens: Tensor
    #: ``[Np]`` flat index into ``[B * P]`` of every real prompt token, and ``[Np]`` its index in the row.
    prompt_source: Tensor
    prompt_dest: Tensor
    #: ``[M]`` flat index into ``[S * L]`` of every completion token in the row (one per label: completion
    #: token ``t`` sits where label ``t`` does in ``completion_labels``), and ``[M]`` its index in the row.
    completion_source: Tensor
    completion_dest: Tensor
    #: Segments ``(start, length, prompt_start, prompt_length)`` in row order: a prompt
    #: (``prompt_length = 0``), or a completion and its chain's prompt.
    segments: tuple[tuple[int, int, int, int], ...]
    #: ``(B, P, S, L)`` of the batch it was built from.
    batch_shape: tuple[int, int, int, int]
    #: ``[1, N]`` (1-D RoPE) or ``[A, 1, N]`` (``A`` RoPE axes) positions: set by :meth:`bind`.
    position_ids: Tensor | None = None
    #: The attention path (``"flash"``, ``"flex"``, ``"sdpa"``, ``"eager"``): set by :meth:`bind`.
    attention: str = "sdpa"
    #: :attr:`calls` and :attr:`cache`, shared by every copy of this bound tree (:class:`_TreeState`).
    state: _TreeState = field(default_factory=_TreeState, repr=False, compare=False)

    @property
    def calls(self) -> int:
        """Calls of the tree attention since :meth:`bind` (one per attention layer in a forward)."""
        return self.state.calls

    @calls.setter
    def calls(self, value: int) -> None:
        self.state.calls = value

    @property
    def cache(self) -> dict[Any, Any]:
        """What the attention builds once per bound tree (index tensors, masks)."""
        return self.state.cache

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ChainTree:
        """A copy on ``device`` (a fresh :attr:`cache`); what ``accelerate``'s ``send_to_device`` calls."""
        kw = {"device": device, "non_blocking": non_blocking}
        moved = {
            f.name: getattr(self, f.name).to(**kw)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **moved, state=_TreeState())

    def bind(self, prompt_positions: Tensor, completion_positions: Tensor, attention: str) -> ChainTree:
        """A copy for one forward of one model, on the positions' device: ``prompt_positions [B, P]`` or
        ``[A, B, P]`` (the family's positions of the padded prompts), ``completion_positions [S, L]`` or
        ``[A, S, L]`` (completion token ``t``'s position), and the attention path."""
        B, P, S, L = self.batch_shape
        if tuple(prompt_positions.shape[-2:]) != (B, P) or tuple(completion_positions.shape[-2:]) != (S, L):
            raise ValueError(
                f"positions must be [.., B, P] = [.., {B}, {P}] and [.., S, L] = [.., {S}, {L}], got "
                f"{list(prompt_positions.shape)} and {list(completion_positions.shape)}"
            )
        tree = self.to(prompt_positions.device)
        axes = prompt_positions.dim() == 3
        A = prompt_positions.shape[0] if axes else 1
        pos = torch.zeros((A, tree.num_tokens), dtype=torch.long, device=prompt_positions.device)
        pos[:, tree.prompt_dest] = prompt_positions.reshape(A, B * P)[:, tree.prompt_source].long()
        pos[:, tree.completion_dest] = (
            completion_positions.reshape(A, S * L).to(pos.device)[:, tree.completion_source].long()
        )
        return replace(tree, position_ids=pos[:, None, :] if axes else pos, attention=attention)

    def relayout_prompt(self, value: Tensor, fill: int | float = 0) -> Tensor:
        """A per-prompt-token tensor ``[B, P]`` (e.g. ``mm_token_type_ids``) in the row's layout ``[1, N]``:
        the prompts' real tokens moved to their places, ``fill`` at completion tokens."""
        out = value.new_full((self.num_tokens,), fill)
        out[self.prompt_dest.to(value.device)] = value.reshape(-1)[self.prompt_source.to(value.device)]
        return out[None]

    def to_padded(self, hidden: Tensor) -> Tensor:
        """Scored states ``[M, D]`` as ``[S, L, D]`` aligned with ``completion_labels`` (zeros elsewhere)."""
        _, _, S, L = self.batch_shape
        out = hidden.new_zeros((S * L, hidden.shape[-1]))
        return out.index_copy(0, self.completion_source.to(hidden.device), hidden).view(S, L, -1)


def build_chain_tree(batch: Mapping[str, Any], *, ignore_index: int = -100) -> ChainTree:
    """The chain tree of ``batch`` (see the module docstring), on the batch's device.

    ``batch`` is a checked chain batch (:func:`check_chain_batch`): ``prompt_input_ids [B, P]``
    left-padded, ``prompt_attention_mask [B, P]``, ``completion_input_ids`` / ``completion_labels
    [S, L]``, ``chain_sizes [B]``. A completion keeps its tokens up to its last label that is not
    ``ignore_index``. Host synchronisation: one, for the lengths that size the row.
    """
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    comp, labels = batch["completion_input_ids"], batch["completion_labels"]
    device = ids.device
    B, P = ids.shape
    S, L = comp.shape
    sizes = batch["chain_sizes"].to(device)
    labels = labels.to(device)

    # The one host sync: prompt lengths, completion lengths (up to the last scored label), chain sizes.
    scored = labels != ignore_index
    cols = torch.arange(1, L + 1, device=device)
    clen_t = (scored.long() * cols).amax(1) if L else scored.long().sum(1)
    meta = torch.cat([mask.long().sum(1), clen_t, sizes.long()]).tolist()
    plen, clen, ks = meta[:B], meta[B : B + S], meta[B + S :]

    # Row offsets and segments, chain after chain.
    segments: list[tuple[int, int, int, int]] = []
    chain_start, comp_start, chain_len = [], [], []
    pos = s = 0
    for b in range(B):
        chain_start.append(pos)
        segments.append((pos, plen[b], pos, 0))
        p0 = pos
        pos += plen[b]
        for _ in range(ks[b]):
            comp_start.append(pos)
            if clen[s]:
                segments.append((pos, clen[s], p0, plen[b]))
            pos += clen[s]
            s += 1
        chain_len.append(pos - p0)
    N = pos

    long = dict(dtype=torch.long, device=device)
    t_chain = torch.tensor(chain_start, **long)
    t_plen = torch.tensor(plen, **long)
    t_clen = torch.tensor(clen, **long)
    t_comp = torch.tensor(comp_start, **long)
    owner = torch.repeat_interleave(torch.arange(B, device=device), sizes)

    # Prompt tokens (row-major over the left-padded batch: chain order, then token order) and completion
    # tokens up to each one's last scored label (completion order, then token order).
    pb, pp = mask.nonzero(as_tuple=True)
    first = P - t_plen  # column of each prompt's first real token
    p_dest = t_chain[pb] + (pp - first[pb])
    cs, ct = (torch.arange(L, device=device)[None, :] < t_clen[:, None]).nonzero(as_tuple=True)
    c_dest = t_comp[cs] + ct

    input_ids = torch.empty(N, **long)
    input_ids[p_dest] = ids[pb, pp].long()
    input_ids[c_dest] = comp.to(device)[cs, ct].long()
    text_pos = torch.empty(N, **long)
    text_pos[p_dest] = pp - first[pb]
    text_pos[c_dest] = t_plen[owner[cs]] + ct
    subtree_end = torch.empty(N, **long)
    subtree_end[p_dest] = (t_chain + torch.tensor(chain_len, **long))[pb]
    subtree_end[c_dest] = (t_comp + t_clen)[cs]

    # Label t of completion s is scored by the prompt's last token (t = 0) or by completion token t - 1.
    prompt_last = t_chain + t_plen - 1
    scored_index = torch.where(ct == 0, prompt_last[owner[cs]], c_dest - 1)
    cu = torch.zeros(S + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(t_clen, 0)
    return ChainTree(
        input_ids=input_ids[None],
        text_positions=text_pos,
        subtree_end=subtree_end,
        scored_index=scored_index,
        labels=labels[cs, ct],
        cu_seqlens=cu,
        prompt_source=pb * P + pp,
        prompt_dest=p_dest,
        completion_source=cs * L + ct,
        completion_dest=c_dest,
        segments=tuple(segments),
        batch_shape=(B, P, S, L),
    )
