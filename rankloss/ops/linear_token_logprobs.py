"""Per-token log-probs fused with the LM head: the chunked PyTorch path, the custom op, and autograd.

``log p(y_n) = log_softmax(softcap(h_n W^T + b) / tau)[y_n]`` for ``hidden [N, D]``, ``weight [V, D]``,
without ever building the ``[N, V]`` logits (see ``rankloss.kernels.linear_token_logprobs`` for the
maths and the backward). Two implementations sit behind one ``torch.library`` custom op:

* ``"triton"``: the fused kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``);
* ``"torch"``: chunked PyTorch: ``chunk_size`` rows at a time (chosen from ``V`` and ``D``), so the extra
  memory is ``O(chunk_size * V)``; on CPU only the scored rows are computed.

The op is opaque to ``torch.compile`` (fake implementations give the output shapes) and its autograd is
registered with ``torch.library.register_autograd``, so a ``fullgraph=True`` compile does not break.
"""

# No `from __future__ import annotations`: torch.library infers the op schemas from real annotations.

import torch
from torch import Tensor

from ._common import (
    accumulation_dtype,
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
) -> tuple[Tensor, Tensor]:
    with _no_autocast(hidden.device):
        if impl == "triton":
            return kernel_module("linear_token_logprobs").linear_token_logprobs_forward(
                hidden, weight, labels, bias, ignore_index, temperature, softcap
            )
        return linear_token_logprobs_torch_forward(
            hidden, weight, labels, bias, ignore_index, temperature, softcap, chunk_size
        )


@_linear_token_logprobs_fwd.register_fake
def _(hidden, weight, labels, bias, ignore_index, temperature, softcap, impl, chunk_size, deterministic):
    acc = accumulation_dtype(hidden, weight, bias)
    return hidden.new_empty(hidden.shape[0], dtype=acc), hidden.new_empty(hidden.shape[0], dtype=acc)


@torch.library.custom_op("rankloss::linear_token_logprobs_backward", mutates_args=())
def _linear_token_logprobs_bwd(
    grad_out: Tensor,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    lse: Tensor,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    impl: str,
    chunk_size: int,
    deterministic: bool,
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
                lse,
                ignore_index,
                temperature,
                softcap,
                needs_hidden=needs_hidden,
                needs_weight=needs_weight,
                needs_bias=needs_bias,
                deterministic=deterministic,
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
    lse,
    ignore_index,
    temperature,
    softcap,
    impl,
    chunk_size,
    deterministic,
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
    hidden, weight, labels, bias, ignore_index, temperature, softcap, impl, chunk_size, deterministic = inputs
    ctx.save_for_backward(hidden, weight, labels, bias, output[1])
    ctx.options = (ignore_index, temperature, softcap, impl, chunk_size, deterministic)


def _backward(ctx, grad_logp, grad_lse):
    hidden, weight, labels, bias, lse = ctx.saved_tensors
    ignore_index, temperature, softcap, impl, chunk_size, deterministic = ctx.options
    needs_hidden, needs_weight, _, needs_bias = ctx.needs_input_grad[:4]
    dh, dw, db = _linear_token_logprobs_bwd(
        grad_logp.contiguous(),
        hidden,
        weight,
        labels,
        bias,
        lse,
        ignore_index,
        temperature,
        softcap,
        impl,
        chunk_size,
        deterministic,
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
) -> Tensor:
    """Run the op on validated inputs: ``hidden [..., D]``, ``labels [...]`` -> log-probs ``[...]``.

    ``impl`` is ``"triton"`` or ``"torch"`` (already resolved). The gradient of the returned log-probs
    flows to ``hidden``, ``weight`` and ``bias``.
    """
    lead = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_size or default_chunk_size(weight.shape[0], weight.shape[1])
    logp, _ = _linear_token_logprobs_fwd(
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
    )
    return logp.reshape(lead)
