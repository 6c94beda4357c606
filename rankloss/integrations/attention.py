"""The chain-tree attention: one function registered with transformers' ``AttentionInterface``.

:func:`install_tree_attention` registers ``rankloss_tree_<base>`` (``<base>`` the text model's own
implementation: ``sdpa``, ``eager``, ``fa2`` for ``flash_attention_2``, ...) and sets it on the **text
model only** (the vision tower keeps its own). No model code is patched: the model's attention layers
look the function up by name at every call, as they do for ``sdpa``.

* Called **with** a :class:`~rankloss.integrations.layout.ChainTree` (the forward kwarg ``chain_tree``,
  which transformers passes down to every attention layer, and which checkpointed layers replay in
  their recompute), it attends by the tree rule ``k <= q < subtree_end[k]`` (plus, in sliding-window
  layers, ``text_positions[q] - text_positions[k] < window``), with the layer's soft-cap, scale and
  dropout. The path is the tree's ``attention``:

  - ``"flash"``: ``flash_attn_varlen_func`` over the tree's segments: a prompt attends to itself, a
    completion to its chain's prompt followed by itself (the prompt's keys and values gathered in front
    of each completion's), ``causal=True``, which flash-attn aligns bottom-right when a segment has
    fewer queries than keys, so query ``t`` of a completion sees the prompt and completion tokens
    ``<= t``; a window is ``window_size=(window - 1, 0)`` in the same (position) space.
  - ``"flex"``: ``flex_attention`` (compiled on CUDA) with a ``BlockMask`` of the tree rule, built once
    per batch and window; blocks across completions and chains are skipped.
  - ``"sdpa"`` / ``"eager"``: the same segments, gathered into two padded groups (prompts and padding;
    completions with their prompt's keys in front) and run through ``scaled_dot_product_attention``
    with a boolean mask (``"eager"``, and any layer with a soft-cap: matmul, cap, mask, softmax).
    Every score computed is one a full sequence computes too (no ``N x N`` mask).

* Called **without** a tree (generation, or any other forward of the model), it is the base
  implementation, with the base's masks (:data:`ALL_MASK_ATTENTION_FUNCTIONS` gets a delegate that
  returns no mask while a chain tree's forward runs, so no ``N x N`` mask is ever built for the row).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layout import ChainTree

__all__ = [
    "ATTENTION_PATHS",
    "TREE_PREFIX",
    "active_tree",
    "flash_attn_available",
    "flash_varlen_func",
    "install_tree_attention",
    "resolve_attention",
    "tree_attention",
]

#: Prefix of the registered implementation names.
TREE_PREFIX = "rankloss_tree_"
#: The attention paths of a chain tree, and ``"auto"``.
ATTENTION_PATHS = ("auto", "flash", "flex", "sdpa", "eager")
#: Flex attention's block size.
FLEX_BLOCK = 128

_BASE_OF: dict[str, str] = {}  # registered name -> the base implementation it delegates to
_ACTIVE: ContextVar[ChainTree | None] = ContextVar("rankloss_chain_tree", default=None)
_ALIASES = {"flash_attention_2": "fa2", "flash_attention_3": "fa3", "flash_attention_4": "fa4"}


# ------------------------------------------------------------------------------------------------------
# Paths
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_varlen_func() -> Callable[..., Tensor]:
    """``flash_attn.flash_attn_varlen_func`` (the tests replace this function with an emulator)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def resolve_attention(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention path for ``requested`` (one of :data:`ATTENTION_PATHS`): ``"auto"`` is ``"flash"``
    on CUDA with flash-attn installed and 16-bit weights, ``"flex"`` on other CUDA runs, else ``"sdpa"``."""
    if requested not in ATTENTION_PATHS:
        raise ValueError(f"attention must be one of {ATTENTION_PATHS}, got {requested!r}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        if flash_attn_available() and dtype in (torch.float16, torch.bfloat16):
            return "flash"
        return "flex"
    return "sdpa"


@contextlib.contextmanager
def active_tree(tree: ChainTree) -> Iterator[None]:
    """While a chain tree's forward runs, the registered mask functions build no mask."""
    token = _ACTIVE.set(tree)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# ------------------------------------------------------------------------------------------------------
# Registration
def _name_for(base: str) -> str:
    alias = _ALIASES.get(base) or re.sub(r"[^0-9A-Za-z_]", "_", base).replace("flash", "fa")
    return TREE_PREFIX + alias


def _local_eager(module: nn.Module) -> Callable[..., Any] | None:
    """The ``eager_attention_forward`` of ``module``'s modeling file (what its layers default to)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _register(base: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _name_for(base)
    if _BASE_OF.get(name) == base:
        return name

    def attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Any,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        tree = kwargs.pop("chain_tree", None)
        if tree is not None:
            return tree_attention(
                tree,
                query,
                key,
                value,
                dropout=dropout,
                scaling=scaling,
                sliding_window=kwargs.get("sliding_window"),
                softcap=kwargs.get("softcap"),
            )
        if base == "eager" or base not in ALL_ATTENTION_FUNCTIONS:
            fn = _local_eager(module)
            if fn is None:
                raise RuntimeError(
                    f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__} to "
                    f"run the base attention {base!r} with"
                )
        else:
            fn = ALL_ATTENTION_FUNCTIONS[base]
        return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    AttentionInterface.register(name, attention)
    base_mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base)
    if base_mask is not None:

        def mask(*args: Any, **kwargs: Any) -> Any:
            return None if _ACTIVE.get() is not None else base_mask(*args, **kwargs)

        AttentionMaskInterface.register(name, mask)
    _BASE_OF[name] = base
    return name


def install_tree_attention(model: nn.Module, text_config: Any) -> bool:
    """Register the tree attention for ``text_config``'s implementation and set it on the text model
    only; ``False`` when the model cannot take it (its attention does not go through the interface)."""
    current = text_config._attn_implementation or "sdpa"
    if current in _BASE_OF:
        return True
    name = _register(current)
    config = model.config
    if text_config is config:
        model.set_attn_implementation(name)
    else:
        key = next(
            (k for k in getattr(config, "sub_configs", {}) if getattr(config, k, None) is text_config), None
        )
        if key is None:
            return False
        model.set_attn_implementation({key: name})
    return text_config._attn_implementation == name


# ------------------------------------------------------------------------------------------------------
# The tree attention
def tree_attention(
    tree: ChainTree,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, None]:
    """Attention over the chain tree's row: ``query [1, H, N, d]``, ``key`` / ``value [1, H_kv, N, d]``
    (transformers' layout) in, ``[1, N, H, d]`` out (see the module docstring)."""
    tree.calls += 1
    if query.shape[0] != 1 or query.shape[2] != tree.num_tokens:
        raise ValueError(
            f"the chain tree's attention expects query [1, H, {tree.num_tokens}, d], got {list(query.shape)}"
        )
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    window = int(sliding_window) if sliding_window else None
    cap = float(softcap) if softcap else None
    if tree.attention == "flash":
        out = _flash(tree, query, key, value, dropout, scale, window, cap)
    elif tree.attention == "flex":
        if dropout:
            raise ValueError(
                "attention='flex' has no attention dropout; set the model's attention_dropout to 0 or use "
                "attention='sdpa'"
            )
        out = _flex(tree, query, key, value, scale, window, cap)
    else:
        out = _grouped(tree, query, key, value, dropout, scale, window, cap, eager=tree.attention == "eager")
    return out, None


def _flash(
    tree: ChainTree,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout: float,
    scale: float,
    window: int | None,
    cap: float | None,
) -> Tensor:
    idx = tree.cache.get("flash")
    if idx is None:
        idx = tree.cache["flash"] = _flash_index(tree, q.device)
    kv_index, cu_q, cu_k, max_q, max_k = idx
    fn = flash_varlen_func()
    out = fn(
        q[0].transpose(0, 1),
        k[0].transpose(0, 1).index_select(0, kv_index),
        v[0].transpose(0, 1).index_select(0, kv_index),
        cu_q,
        cu_k,
        max_q,
        max_k,
        dropout_p=dropout,
        softmax_scale=scale,
        causal=True,
        window_size=(window - 1, 0) if window else (-1, -1),
        softcap=cap or 0.0,
    )
    return out[None]


def _flash_index(tree: ChainTree, device: torch.device) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """``(kv_index, cu_seqlens_q, cu_seqlens_k, max_q, max_k)``: segment ``g``'s queries are its own
    tokens; its keys are its chain's prompt (completions only) followed by its own tokens."""
    starts, lens, pstarts, plens = (list(x) for x in zip(*tree.segments))
    # two parts per segment: [prompt_start, +prompt_len) then [start, +len)
    part_start = torch.tensor([x for pair in zip(pstarts, starts) for x in pair], dtype=torch.long)
    part_len = torch.tensor([x for pair in zip(plens, lens) for x in pair], dtype=torch.long)
    total = int(part_len.sum())
    offsets = torch.cumsum(part_len, 0) - part_len
    kv_index = part_start.repeat_interleave(part_len) + (
        torch.arange(total) - offsets.repeat_interleave(part_len)
    )
    q_len = torch.tensor(lens, dtype=torch.long)
    k_len = q_len + torch.tensor(plens, dtype=torch.long)
    cu_q = F.pad(torch.cumsum(q_len, 0), (1, 0)).to(torch.int32)
    cu_k = F.pad(torch.cumsum(k_len, 0), (1, 0)).to(torch.int32)
    return (
        kv_index.to(device),
        cu_q.to(device),
        cu_k.to(device),
        int(q_len.max()),
        int(k_len.max()),
    )


_COMPILED_FLEX: Callable[..., Any] | None = None


def _flex_function(device: torch.device) -> Callable[..., Any]:
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention  # eager (CPU: forward only; torch 2.14 has no flex backward on CPU)
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def _flex(
    tree: ChainTree, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None, cap: float | None
) -> Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    block_mask = tree.cache.get(("flex", window))
    if block_mask is None:
        end = tree.subtree_end.to(q.device)
        pos = tree.text_positions.to(q.device)

        def tree_rule(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            allowed = (kv_idx <= q_idx) & (q_idx < end[kv_idx])
            if window is not None:
                allowed = allowed & (pos[q_idx] - pos[kv_idx] < window)
            return allowed

        N = tree.num_tokens
        block_mask = create_block_mask(
            tree_rule, None, None, N, N, device=q.device, BLOCK_SIZE=FLEX_BLOCK, _compile=q.is_cuda
        )
        tree.cache[("flex", window)] = block_mask

    score_mod = None
    if cap is not None:

        def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return cap * torch.tanh(score / cap)

    out = _flex_function(q.device)(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.transpose(1, 2)


def _groups(tree: ChainTree, device: torch.device) -> dict[str, Any]:
    """The segments gathered into two padded groups for SDPA: ``"a"`` (prompts: keys = queries) and
    ``"b"`` (completions: keys = the chain's prompt, then the completion). Per group: query rows
    ``q [G, Wq]``, key rows ``k [G, Wk]`` (padding slots repeat a real row and are masked), the positions
    of queries and keys in their full sequence, and which slots are real."""
    groups: dict[str, Any] = {}
    segs = tree.segments
    parts = {
        "a": [(s, n, ps, pn) for s, n, ps, pn in segs if pn == 0],
        "b": [(s, n, ps, pn) for s, n, ps, pn in segs if pn > 0],
    }
    order: list[Tensor] = []
    base = 0
    for name, rows in parts.items():
        if not rows:
            continue
        start = torch.tensor([r[0] for r in rows], dtype=torch.long)
        n = torch.tensor([r[1] for r in rows], dtype=torch.long)
        Wq = int(n.max())
        t = torch.arange(Wq)
        q_valid = t[None, :] < n[:, None]
        q_rows = start[:, None] + torch.minimum(t[None, :], n[:, None] - 1)
        if name == "a":
            k_rows, k_valid, k_pos, q_pos = (
                q_rows,
                q_valid,
                t[None, :].expand_as(q_rows),
                t[None, :].expand_as(q_rows),
            )
        else:
            pstart = torch.tensor([r[2] for r in rows], dtype=torch.long)
            plen = torch.tensor([r[3] for r in rows], dtype=torch.long)
            Wp = int(plen.max())
            j = torch.arange(Wp)
            p_rows = pstart[:, None] + torch.minimum(j[None, :], plen[:, None] - 1)
            k_rows = torch.cat([p_rows, q_rows], 1)
            k_valid = torch.cat([j[None, :] < plen[:, None], q_valid], 1)
            q_pos = plen[:, None] + t[None, :]
            k_pos = torch.cat([j[None, :].expand_as(p_rows), q_pos], 1)
        groups[name] = {
            "q": q_rows.to(device),
            "k": k_rows.to(device),
            "q_pos": q_pos.to(device),
            "k_pos": k_pos.to(device),
            "q_valid": q_valid.to(device),
            "k_valid": k_valid.to(device),
        }
        flat = torch.arange(base, base + q_rows.numel()).view_as(q_rows)
        order.append(torch.stack([q_rows[q_valid], flat[q_valid]], 1))
        base += q_rows.numel()
    # out[n] = groups' flattened outputs [source[n]]: every token is a query of exactly one segment
    pairs = torch.cat(order)
    source = torch.empty(tree.num_tokens, dtype=torch.long)
    source[pairs[:, 0]] = pairs[:, 1]
    groups["source"] = source.to(device)
    return groups


def _group_mask(g: dict[str, Any], window: int | None) -> Tensor:
    """A group's boolean mask ``[G, Wq, Wk]`` (built on first use, kept for the other layers): a real
    query sees the real keys at or before it in its full sequence (and within ``window``); a query slot
    that is padding sees every real key (its output is dropped; no softmax row is empty)."""
    key = ("mask", window)
    if key not in g:
        q_pos, k_pos, q_pad = g["q_pos"][:, :, None], g["k_pos"][:, None, :], ~g["q_valid"][:, :, None]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed = allowed & (q_pos - k_pos < window)
        g[key] = g["k_valid"][:, None, :] & (allowed | q_pad)
    return g[key]


def _grouped(
    tree: ChainTree,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout: float,
    scale: float,
    window: int | None,
    cap: float | None,
    eager: bool,
) -> Tensor:
    groups = tree.cache.get("groups")
    if groups is None:
        groups = tree.cache["groups"] = _groups(tree, q.device)
    H, Hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))  # [N, heads, d]
    outs = []
    for name in ("a", "b"):
        g = groups.get(name)
        if g is None:
            continue
        G, Wq = g["q"].shape
        Wk = g["k"].shape[1]
        qg = qt.index_select(0, g["q"].reshape(-1)).view(G, Wq, H, d).transpose(1, 2)
        kg = kt.index_select(0, g["k"].reshape(-1)).view(G, Wk, Hkv, d).transpose(1, 2)
        vg = vt.index_select(0, g["k"].reshape(-1)).view(G, Wk, Hkv, d).transpose(1, 2)
        sdpa = dict(dropout_p=dropout, scale=scale, enable_gqa=Hkv != H)
        if name == "a" and window is None and not (eager or cap is not None):
            # prompts, right-padded in their group: plain causal attention is the tree rule for the real
            # queries (they see no padding key); SDPA skips the blocks above the diagonal, and no
            # [G, P, P] mask is built
            o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, **sdpa)
        elif eager or cap is not None:
            mask = _group_mask(g, window)[:, None]
            if Hkv != H:
                kg = kg.repeat_interleave(H // Hkv, dim=1)
                vg = vg.repeat_interleave(H // Hkv, dim=1)
            w = torch.matmul(qg, kg.transpose(-1, -2)) * scale
            if cap is not None:
                w = cap * torch.tanh(w / cap)
            w = w.masked_fill(~mask, -math.inf)
            p = torch.softmax(w, dim=-1, dtype=torch.promote_types(w.dtype, torch.float32)).to(qg.dtype)
            if dropout:
                p = F.dropout(p, p=dropout, training=True)
            o = torch.matmul(p, vg)
        else:
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=_group_mask(g, window)[:, None], **sdpa)
        outs.append(o.transpose(1, 2).reshape(G * Wq, H, d))
    out = torch.cat(outs).index_select(0, groups["source"])
    return out[None]
