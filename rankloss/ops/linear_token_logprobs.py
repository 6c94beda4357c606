"""Per-token log-probs fused with the LM head: the chunked PyTorch path, the custom op, and autograd.

``log p(y_n) = log_softmax(softcap(h_n W^T + b) / tau)[y_n]`` for ``hidden [N, D]``, ``weight [V, D]``,
without ever building the ``[N, V]`` logits (see ``rankloss.kernels.linear_token_logprobs`` for the
maths and the backward). Two implementations sit behind one ``torch.library`` custom op:

* ``"triton"``: the fused kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``);
* ``"cublas"``: vocabulary-chunked: the three matrix products of each ``[N, v]`` chunk of the logits go to
  cuBLAS (torch matmuls), the softmax bookkeeping to two Triton row kernels
  (``rankloss.kernels.linear_logprobs_chunked``); ``d weight`` is owned per chunk (no atomics,
  deterministic), ``d hidden`` accumulates in fp32. Extra memory within 240 MiB
  (``rankloss.ops.cublas_chunk_plan``: row groups and chunk widths);
* ``"torch"``: chunked PyTorch: ``chunk_size`` rows at a time (chosen from ``V`` and ``D``), so the extra
  memory is ``O(chunk_size * V)``; on CPU only the scored rows are computed.

The op is opaque to ``torch.compile`` (fake implementations give the output shapes) and its autograd is
registered with ``torch.library.register_autograd``, so a ``fullgraph=True`` compile does not break.
"""

# No `from __future__ import annotations`: torch.library infers the op schemas from real annotations.

import torch
from torch import Tensor

from . import _common
from ._common import (
    ChunkPlan,
    accumulation_dtype,
    cublas_cached_columns,
    cublas_chunk_plan,
    default_chunk_size,
    kernel_module,
    log_softmax_pick,
    logprob_grad_,
    softmax_,
)

__all__ = [
    "linear_token_logprobs_op",
    "linear_token_logprobs_torch_forward",
    "linear_token_logprobs_torch_backward",
    "linear_token_logprobs_cublas_forward",
    "linear_token_logprobs_cublas_backward",
]


# --------------------------------------------------------------------------------------------------
# Chunked PyTorch path
# --------------------------------------------------------------------------------------------------
def _row_chunks(labels: Tensor, ignore_index: int, chunk_size: int) -> list[Tensor]:
    """Index tensors of the rows to compute, ``chunk_size`` at a time.

    On CPU only the scored rows (a ``nonzero`` is free there); on other devices every row, so that no
    host synchronisation is needed (ignored rows are zeroed afterwards).
    """
    N = labels.shape[0]
    if labels.device.type == "cpu":
        rows = (labels != ignore_index).nonzero().squeeze(1)
    else:
        rows = torch.arange(N, device=labels.device)
    return list(torch.split(rows, chunk_size))


def _logit_chunk(
    h: Tensor, w: Tensor, b: Tensor | None, temperature: float, softcap: float | None
) -> tuple[Tensor, Tensor | None]:
    """``u = softcap(h W^T + b) / tau`` for a chunk ``[c, V]``, and ``tanh(a / softcap)``."""
    u = h @ w.T
    if b is not None:
        u += b
    t = None
    if softcap is not None:
        t = torch.tanh(u.div_(softcap))
        u = t * (softcap / temperature)
    elif temperature != 1.0:
        u.div_(temperature)
    return u, t


def linear_token_logprobs_torch_forward(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Chunked forward: ``hidden [N, D]``, ``weight [V, D]``, ``labels [N]`` -> ``(logp [N], lse [N])``.

    Computes in float32 (float64 for float64 inputs); 0 for ignored rows.
    """
    acc = accumulation_dtype(hidden, weight, bias)
    N = hidden.shape[0]
    logp = torch.zeros(N, dtype=acc, device=hidden.device)
    lse = torch.zeros(N, dtype=acc, device=hidden.device)
    w = weight.to(acc)
    b = bias.to(acc) if bias is not None else None
    scored = labels != ignore_index
    for rows in _row_chunks(labels, ignore_index, chunk_size):
        u, _ = _logit_chunk(hidden[rows].to(acc), w, b, temperature, softcap)
        ok = scored[rows]
        target = torch.where(ok, labels[rows], 0)  # ignored rows (non-CPU devices only) read column 0, zeroed
        logp_c, lse_c = log_softmax_pick(u, target, out=u)  # u is this chunk's own buffer
        logp[rows] = torch.where(ok, logp_c, 0.0)
        lse[rows] = torch.where(ok, lse_c, 0.0)
    return logp, lse


def linear_token_logprobs_torch_backward(
    grad_out: Tensor,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    lse: Tensor,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    chunk_size: int,
    needs_hidden: bool,
    needs_weight: bool,
    needs_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Chunked backward: recompute each chunk's logits, then ``dA = g (onehot - p) / tau [* (1 - t^2)]``.

    ``d hidden = dA W``, ``d weight += dA^T h``, ``d bias += sum dA``; returns them in the inputs' dtypes.
    ``lse`` (the Triton backward's input) is not read: each chunk's softmax is recomputed whole.
    """
    acc = accumulation_dtype(hidden, weight, bias)
    N, D = hidden.shape
    w = weight.to(acc)
    b = bias.to(acc) if bias is not None else None
    needs_bias = needs_bias and bias is not None
    dh = torch.zeros((N, D), dtype=acc, device=hidden.device) if needs_hidden else None
    dw = torch.zeros_like(w) if needs_weight else None
    db = torch.zeros_like(b) if needs_bias else None
    g_ok = labels != ignore_index
    g_all = torch.where(g_ok, grad_out.to(acc), 0.0)
    for rows in _row_chunks(labels, ignore_index, chunk_size):
        h = hidden[rows].to(acc)
        u, t = _logit_chunk(h, w, b, temperature, softcap)
        g = g_all[rows]
        # dA = g * (onehot - p) / tau, built in place in u's buffer (p = exp(u - lse), recomputed whole).
        p = softmax_(u)
        da = logprob_grad_(p, torch.where(g_ok[rows], labels[rows], 0), g, temperature)
        if t is not None:
            da.mul_(1.0 - t.square_())
        if dh is not None:
            dh[rows] = da @ w
        if dw is not None:
            dw.addmm_(da.T, h)
        if db is not None:
            db += da.sum(dim=0)
    return (
        dh.to(hidden.dtype) if dh is not None else None,
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )


# --------------------------------------------------------------------------------------------------
# Vocabulary-chunked path: cuBLAS products, Triton epilogues
# --------------------------------------------------------------------------------------------------
def _mm_f32_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out = a @ b^T`` in float32 for ``a [n, D]``, ``b [v, D]`` of one dtype and ``out [n, v]`` float32.

    On CUDA one cuBLAS call that reads bf16/fp16 operands and writes fp32 (``out_dtype``; ``beta=0``:
    ``out``'s old contents are never read); elsewhere (the interpreter tests) the already-rounded operands
    are widened first, which gives the same fp32-accumulated products."""
    if a.dtype == torch.float32:
        torch.mm(a, b.T, out=out)
    elif a.device.type == "cuda":
        torch.addmm(out, a, b.T, out_dtype=torch.float32, beta=0, out=out)
    else:
        torch.mm(a.float(), b.float().T, out=out)


def _addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` for ``acc`` float32 and ``a [n, v]``, ``b [v, D]`` of one dtype, in fp32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _mm_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """``out = a @ b`` (``out += a @ b`` when ``accumulate``) in ``out``'s dtype (= the operands'),
    accumulated in fp32 and rounded once."""
    if a.device.type == "cuda" or a.dtype == torch.float32:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    else:
        prod = a.float() @ b.float()
        out.copy_(prod + out.float() if accumulate else prod)


def _chunk_view(buffer: Tensor, rows: int, columns: int) -> Tensor:
    """A contiguous ``[rows, columns]`` view of the front of a flat ``buffer``."""
    return buffer[: rows * columns].view(rows, columns)


def _groups(n_rows: int, rows: int) -> list[tuple[int, int]]:
    return [(r0, min(n_rows, r0 + rows)) for r0 in range(0, n_rows, rows)]


def linear_token_logprobs_cublas_forward(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    chunk_columns: int,
    budget: int | None = None,
    cache_bytes: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Vocabulary-chunked forward: ``hidden [N, D]``, ``weight [V, D]``, ``labels [N]`` -> ``(logp, lse,
    cache)``.

    ``logp`` and ``lse`` are ``[N]`` fp32; ``cache`` is flat fp32, the raw logits of the first
    ``cublas_cached_columns(...)`` vocabulary columns chunk after chunk (each chunk ``[N, v]`` row-major),
    which the backward reads instead of recomputing them (empty when ``cache_bytes`` is 0).

    For each chunk of vocabulary rows (``cublas_chunk_plan``: ``chunk_columns`` when nonzero; the rows in
    groups only when one chunk of all rows would not fit in ``budget``, default
    ``rankloss.ops._common.VOCAB_CHUNK_BUDGET_BYTES`` read at the call): ``z = hidden W_chunk^T`` (fp32 out
    of cuBLAS, into one buffer reused by every chunk), then a Triton row kernel merges the chunk's
    log-sum-exp of the non-target columns into ``lso`` and picks the target logit ``u_y``; the fused
    forward's ``logprobs_from_others`` turns them into ``log p(y)`` and ``lse`` (0 on ignored rows, NaN
    log-probs for labels outside ``[0, V)``). No host synchronisation.
    """
    kernels = kernel_module("linear_logprobs_chunked")
    N, D = hidden.shape
    V = weight.shape[0]
    budget = budget or _common.VOCAB_CHUNK_BUDGET_BYTES
    plan = cublas_chunk_plan(N, V, D, hidden.dtype, columns=chunk_columns or None, budget=budget)
    cached = cublas_cached_columns(N, V, D, hidden.dtype, cache_bytes, chunk_columns or None, budget)
    lso = torch.full((N,), -float("inf"), dtype=torch.float32, device=hidden.device)
    target = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    cache = torch.empty(N * cached, dtype=torch.float32, device=hidden.device)
    buffer = torch.empty(
        min(N, plan.rows) * plan.columns if cached < V else 0, dtype=torch.float32, device=hidden.device
    )
    for r0, r1 in _groups(N, plan.rows):
        for v0 in range(0, V, plan.columns):
            v1 = min(V, v0 + plan.columns)
            if v1 <= cached:  # one group of all rows: chunk after chunk in the cache
                z = cache[N * v0 : N * v1].view(N, v1 - v0)
            else:
                z = _chunk_view(buffer, r1 - r0, v1 - v0)
            _mm_f32_into(z, hidden[r0:r1], weight[v0:v1])
            kernels.lse_chunk_(
                z, bias[v0:v1] if bias is not None else None, labels[r0:r1], v0, lso[r0:r1], target[r0:r1],
                ignore_index, temperature, softcap,
            )  # fmt: skip
    del buffer
    logp, lse = kernel_module("linear_token_logprobs").logprobs_from_others(
        lso, target, labels, ignore_index, V
    )
    return logp, lse, cache


def linear_token_logprobs_cublas_backward(
    grad_out: Tensor,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    logp: Tensor,
    lse: Tensor,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    chunk_columns: int,
    needs_hidden: bool,
    needs_weight: bool,
    needs_bias: bool,
    budget: int | None = None,
    cache: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Vocabulary-chunked backward; returns ``(d hidden, d weight, d bias)`` in the inputs' dtypes.

    Per group of rows and chunk of the vocabulary (``cublas_chunk_plan``: everything beyond the returned
    gradients within ``budget``, default as in the forward): recompute ``z = hidden W_chunk^T`` (fp32), a
    Triton row kernel turns it into ``dA = g (onehot - p) / tau [* (1 - t^2)]`` in the inputs' dtype, then
    ``d weight[chunk] (+)= dA^T hidden`` (one cuBLAS call that owns its rows: no atomics, deterministic;
    groups after the first add into it) and ``d hidden[group] += dA W_chunk`` (an fp32 accumulator per
    group, copied into the returned gradient when the group ends; fp32 inputs accumulate in the gradient
    itself). The buffers are allocated once and reused by every chunk. The target entry uses
    ``1 - p_y = -expm1(log p(y))`` from the forward.

    With the forward's ``cache`` (non-empty), the backward walks the forward's chunks in one group of all
    rows and reads the cached ones instead of recomputing them (its accumulator is then ``[N, D]``); the
    cache is only read, so a second backward (``retain_graph``) sees it intact.
    """
    kernels = kernel_module("linear_logprobs_chunked")
    N, D = hidden.shape
    V = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    fp32 = dtype == torch.float32
    needs_bias = needs_bias and bias is not None
    budget = budget or _common.VOCAB_CHUNK_BUDGET_BYTES
    cached = cache.numel() // N if cache is not None and N else 0
    if cached:
        columns = cublas_chunk_plan(N, V, D, dtype, columns=chunk_columns or None, budget=budget).columns
        if cached != V and cached % columns:
            raise RuntimeError(
                f"the logit cache holds {cached} columns, not whole chunks of {columns}: the forward ran "
                "with other chunks (linear_token_logprobs_op passes the chunk width when it caches)"
            )
        plan = ChunkPlan(N, columns, 0)
    else:
        plan = cublas_chunk_plan(
            N, V, D, dtype, backward=True, needs_hidden=needs_hidden, needs_weight=needs_weight,
            columns=chunk_columns or None, budget=budget,
        )  # fmt: skip
    dh = torch.empty_like(hidden) if needs_hidden else None
    dw = torch.empty_like(weight) if needs_weight else None
    db = torch.zeros(V, dtype=torch.float32, device=device) if needs_bias else None
    if N == 0:
        for t in (dh, dw):
            if t is not None:
                t.zero_()
    else:
        scored = labels != ignore_index
        coef = torch.where(scored, grad_out.to(torch.float32), 0.0) / temperature
        one_minus_p = -torch.expm1(logp)
        rows = min(N, plan.rows)
        # fp32 inputs: dA overwrites the logits and d hidden accumulates in the returned gradient. Otherwise
        # dA gets a buffer in the products' dtype (the fp32 values also go over the logits when the bias
        # gradient needs them), and d hidden an fp32 accumulator per group.
        # Cached chunks need the fp32 buffer only for dA in fp32 (fp32 inputs, or the bias gradient).
        need_z = cached < V or fp32 or needs_bias
        z_buf = torch.empty(rows * plan.columns if need_z else 0, dtype=torch.float32, device=device)
        da_buf = None if fp32 else torch.empty(rows * plan.columns, dtype=dtype, device=device)
        acc = (
            torch.empty((rows, D), dtype=torch.float32, device=device) if needs_hidden and not fp32 else None
        )
        for g, (r0, r1) in enumerate(_groups(N, plan.rows)):
            h = hidden[r0:r1]
            dh_g = None
            if needs_hidden:
                dh_g = dh[r0:r1] if fp32 else acc[: r1 - r0]
                dh_g.zero_()
            for v0 in range(0, V, plan.columns):
                v1 = min(V, v0 + plan.columns)
                w = weight[v0:v1]
                if v1 <= cached:  # the forward's logits, left intact: dA goes to the buffers
                    z = cache[N * v0 : N * v1].view(N, v1 - v0)
                    g32 = _chunk_view(z_buf, r1 - r0, v1 - v0) if fp32 or needs_bias else z  # z: not written
                else:
                    z = g32 = _chunk_view(z_buf, r1 - r0, v1 - v0)
                    _mm_f32_into(z, h, w)
                da = g32 if fp32 else _chunk_view(da_buf, r1 - r0, v1 - v0)
                kernels.grad_chunk_(
                    z, da, bias[v0:v1] if bias is not None else None, labels[r0:r1], v0, lse[r0:r1],
                    coef[r0:r1], one_minus_p[r0:r1], temperature, softcap, write_f32=needs_bias and not fp32,
                    g32=g32,
                )  # fmt: skip
                if dw is not None:
                    _mm_into(dw[v0:v1], da.T, h, accumulate=g > 0)
                if dh_g is not None:
                    _addmm_f32_(dh_g, da, w)
                if db is not None:
                    db[v0:v1] += g32.sum(dim=0)  # dA in fp32 (for fp32 inputs da is g32)
            if needs_hidden and not fp32:
                dh[r0:r1].copy_(dh_g)
        del z_buf, da_buf, acc
    return dh, dw, db.to(bias.dtype) if db is not None else None


# --------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and autograd
# --------------------------------------------------------------------------------------------------
def _no_autocast(device: torch.device) -> torch.autocast:
    # The inputs already carry the dtypes autocast chose (the public function casts them); the matmuls
    # inside must not be autocast again.
    return torch.autocast(device_type=device.type, enabled=False)


@torch.library.custom_op("rankloss::linear_token_logprobs", mutates_args=())
def _linear_token_logprobs_fwd(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    impl: str,
    chunk_size: int,
    deterministic: bool,
    filter_eps: float,
    cache_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    # Returns (logp, lse, cache): cache holds the cuBLAS path's kept logit chunks (empty elsewhere).
    with _no_autocast(hidden.device):
        if impl == "cublas":
            return linear_token_logprobs_cublas_forward(
                hidden, weight, labels, bias, ignore_index, temperature, softcap, chunk_size,
                cache_bytes=cache_bytes,
            )  # fmt: skip
        if impl == "triton":
            logp, lse = kernel_module("linear_token_logprobs").linear_token_logprobs_forward(
                hidden, weight, labels, bias, ignore_index, temperature, softcap
            )
        else:
            logp, lse = linear_token_logprobs_torch_forward(
                hidden, weight, labels, bias, ignore_index, temperature, softcap, chunk_size
            )
        return logp, lse, hidden.new_empty(0, dtype=torch.float32)


@_linear_token_logprobs_fwd.register_fake
def _(
    hidden,
    weight,
    labels,
    bias,
    ignore_index,
    temperature,
    softcap,
    impl,
    chunk_size,
    deterministic,
    filter_eps,
    cache_bytes,
):
    acc = accumulation_dtype(hidden, weight, bias)
    N, D = hidden.shape
    cached = 0
    if impl == "cublas" and cache_bytes:
        cached = cublas_cached_columns(N, weight.shape[0], D, hidden.dtype, cache_bytes, chunk_size or None)
    return (
        hidden.new_empty(N, dtype=acc),
        hidden.new_empty(N, dtype=acc),
        hidden.new_empty(N * cached, dtype=torch.float32),
    )


@torch.library.custom_op("rankloss::linear_token_logprobs_backward", mutates_args=())
def _linear_token_logprobs_bwd(
    grad_out: Tensor,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    logp: Tensor,
    lse: Tensor,
    cache: Tensor,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    impl: str,
    chunk_size: int,
    deterministic: bool,
    filter_eps: float,
    needs_hidden: bool,
    needs_weight: bool,
    needs_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    with _no_autocast(hidden.device):
        if impl == "triton":
            dh, dw, db = kernel_module("linear_token_logprobs").linear_token_logprobs_backward(
                grad_out,
                hidden,
                weight,
                labels,
                bias,
                logp,
                lse,
                ignore_index,
                temperature,
                softcap,
                needs_hidden=needs_hidden,
                needs_weight=needs_weight,
                needs_bias=needs_bias,
                deterministic=deterministic,
                filter_eps=filter_eps,
            )
        elif impl == "cublas":
            dh, dw, db = linear_token_logprobs_cublas_backward(
                grad_out,
                hidden,
                weight,
                labels,
                bias,
                logp,
                lse,
                ignore_index,
                temperature,
                softcap,
                chunk_size,
                needs_hidden,
                needs_weight,
                needs_bias,
                cache=cache,
            )
        else:
            dh, dw, db = linear_token_logprobs_torch_backward(
                grad_out,
                hidden,
                weight,
                labels,
                bias,
                lse,
                ignore_index,
                temperature,
                softcap,
                chunk_size,
                needs_hidden,
                needs_weight,
                needs_bias,
            )
    # Custom ops cannot return None: an empty tensor stands for "not needed".
    empty = hidden.new_empty(0)
    return (
        dh if dh is not None else empty,
        dw if dw is not None else empty.clone(),
        db if db is not None else empty.clone(),
    )


@_linear_token_logprobs_bwd.register_fake
def _(
    grad_out,
    hidden,
    weight,
    labels,
    bias,
    logp,
    lse,
    cache,
    ignore_index,
    temperature,
    softcap,
    impl,
    chunk_size,
    deterministic,
    filter_eps,
    needs_hidden,
    needs_weight,
    needs_bias,
):
    return (
        torch.empty_like(hidden) if needs_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if needs_weight else hidden.new_empty(0),
        torch.empty_like(bias) if needs_bias and bias is not None else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    (
        hidden,
        weight,
        labels,
        bias,
        ignore_index,
        temperature,
        softcap,
        impl,
        chunk_size,
        deterministic,
        filter_eps,
        cache_bytes,
    ) = inputs
    ctx.save_for_backward(hidden, weight, labels, bias, output[0], output[1], output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.options = (ignore_index, temperature, softcap, impl, chunk_size, deterministic, filter_eps)


def _backward(ctx, grad_logp, grad_lse, grad_cache):
    hidden, weight, labels, bias, logp, lse, cache = ctx.saved_tensors
    ignore_index, temperature, softcap, impl, chunk_size, deterministic, filter_eps = ctx.options
    needs_hidden, needs_weight, _, needs_bias = ctx.needs_input_grad[:4]
    dh, dw, db = _linear_token_logprobs_bwd(
        grad_logp.contiguous(),
        hidden,
        weight,
        labels,
        bias,
        logp,
        lse,
        cache,
        ignore_index,
        temperature,
        softcap,
        impl,
        chunk_size,
        deterministic,
        filter_eps,
        needs_hidden,
        needs_weight,
        needs_bias and bias is not None,
    )
    return (
        dh if needs_hidden else None,
        dw if needs_weight else None,
        None,
        db if needs_bias and bias is not None else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


_linear_token_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_token_logprobs_op(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    impl: str,
    chunk_size: int | None = None,
    deterministic: bool = False,
    filter_eps: float = 0.0,
    cache_bytes: int = 0,
) -> Tensor:
    """Run the op on validated inputs: ``hidden [..., D]``, ``labels [...]`` -> log-probs ``[...]``.

    ``impl`` is ``"triton"``, ``"cublas"`` or ``"torch"`` (already resolved); ``filter_eps`` is the
    resolved threshold of the Triton atomic backward's gradient filtering (0: off); ``cache_bytes`` the
    cuBLAS path's logit cache (0: none). The gradient of the returned log-probs flows to ``hidden``,
    ``weight`` and ``bias``.
    """
    lead = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if impl == "cublas" and cache_bytes:
        # The forward's chunk width, fixed here so that the backward reads the cache with it whatever the
        # budget is then.
        chunk = chunk_size or cublas_chunk_plan(h2.shape[0], weight.shape[0], h2.shape[1], h2.dtype).columns
    elif impl == "cublas":
        chunk = chunk_size or 0  # 0: chosen inside the op from N (not traced, so no guard on N)
    else:
        chunk = chunk_size or default_chunk_size(weight.shape[0], weight.shape[1])
    logp, _, _ = _linear_token_logprobs_fwd(
        h2,
        weight,
        labels.reshape(-1).long().contiguous(),
        bias,
        ignore_index,
        float(temperature),
        softcap,
        impl,
        chunk,
        deterministic,
        float(filter_eps),
        int(cache_bytes) if impl == "cublas" else 0,
    )
    return logp.reshape(lead)
