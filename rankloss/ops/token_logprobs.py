"""Per-token log-probs from materialised logits: the chunked PyTorch path, the custom op, and autograd.

``l = log_softmax(logits / tau)[labels]`` for ``logits [N, V]``; the backward writes
``g * (onehot - softmax) / tau`` in the logits' dtype. The Triton kernels are in
``rankloss.kernels.token_logprobs``; the ``"torch"`` path works ``chunk_size`` rows at a time in float32
(float64 for float64 logits), so its extra memory is ``O(chunk_size * V)`` beyond the gradient itself.
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

__all__ = ["token_logprobs_op", "token_logprobs_torch_forward", "token_logprobs_torch_backward"]


def token_logprobs_torch_forward(
    logits: Tensor, labels: Tensor, ignore_index: int, temperature: float, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Chunked forward: ``logits [N, V]``, ``labels [N]`` -> ``(logp [N], lse [N])``, 0 where ignored."""
    acc = accumulation_dtype(logits)
    N = logits.shape[0]
    logp = torch.empty(N, dtype=acc, device=logits.device)
    lse = torch.empty(N, dtype=acc, device=logits.device)
    buf = torch.empty((min(chunk_size, N), logits.shape[1]), dtype=acc, device=logits.device)
    for start in range(0, N, chunk_size):
        sl = slice(start, start + chunk_size)
        u = logits[sl].to(acc)  # may be the caller's logits: log_softmax goes to buf, never into u
        if temperature != 1.0:
            u = u / temperature
        y = labels[sl]
        ok = y != ignore_index
        logp_c, lse_c = log_softmax_pick(u, torch.where(ok, y, 0), out=buf[: u.shape[0]])
        logp[sl] = torch.where(ok, logp_c, 0.0)
        lse[sl] = torch.where(ok, lse_c, 0.0)
    return logp, lse


def token_logprobs_torch_backward(
    grad_out: Tensor,
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    ignore_index: int,
    temperature: float,
    chunk_size: int,
) -> Tensor:
    """Chunked backward: ``grad_logits = g * (onehot - p) / tau`` in the logits' dtype (0 where ignored)."""
    acc = accumulation_dtype(logits)
    grad = torch.empty_like(logits)
    for start in range(0, logits.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        y = labels[sl]
        ok = y != ignore_index
        g = torch.where(ok, grad_out[sl].to(acc), 0.0)
        u = logits[sl].to(acc, copy=True)
        if temperature != 1.0:
            u.div_(temperature)
        p = softmax_(u)  # u is a copy; the forward's lse is not needed
        grad[sl] = logprob_grad_(p, torch.where(ok, y, 0), g, temperature)
    return grad


@torch.library.custom_op("rankloss::token_logprobs", mutates_args=())
def _token_logprobs_fwd(
    logits: Tensor, labels: Tensor, ignore_index: int, temperature: float, impl: str, chunk_size: int
) -> tuple[Tensor, Tensor]:
    if impl == "triton":
        return kernel_module("token_logprobs").token_logprobs_forward(
            logits, labels, ignore_index, temperature
        )
    return token_logprobs_torch_forward(logits, labels, ignore_index, temperature, chunk_size)


@_token_logprobs_fwd.register_fake
def _(logits, labels, ignore_index, temperature, impl, chunk_size):
    acc = accumulation_dtype(logits)
    return logits.new_empty(logits.shape[0], dtype=acc), logits.new_empty(logits.shape[0], dtype=acc)


@torch.library.custom_op("rankloss::token_logprobs_backward", mutates_args=())
def _token_logprobs_bwd(
    grad_out: Tensor,
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    ignore_index: int,
    temperature: float,
    impl: str,
    chunk_size: int,
) -> Tensor:
    if impl == "triton":
        return kernel_module("token_logprobs").token_logprobs_backward(
            grad_out, logits, labels, lse, ignore_index, temperature
        )
    return token_logprobs_torch_backward(grad_out, logits, labels, lse, ignore_index, temperature, chunk_size)


@_token_logprobs_bwd.register_fake
def _(grad_out, logits, labels, lse, ignore_index, temperature, impl, chunk_size):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, labels, ignore_index, temperature, impl, chunk_size = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.options = (ignore_index, temperature, impl, chunk_size)


def _backward(ctx, grad_logp, grad_lse):
    logits, labels, lse = ctx.saved_tensors
    ignore_index, temperature, impl, chunk_size = ctx.options
    grad = _token_logprobs_bwd(
        grad_logp.contiguous(), logits, labels, lse, ignore_index, temperature, impl, chunk_size
    )
    return grad, None, None, None, None, None


_token_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def token_logprobs_op(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int,
    temperature: float,
    impl: str,
    chunk_size: int | None = None,
) -> Tensor:
    """Run the op on validated inputs: ``logits [..., V]``, ``labels [...]`` -> log-probs ``[...]``."""
    lead = labels.shape
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    if z.stride(-1) != 1:
        z = z.contiguous()
    logp, _ = _token_logprobs_fwd(
        z,
        labels.reshape(-1).long().contiguous(),
        ignore_index,
        float(temperature),
        impl,
        chunk_size or default_chunk_size(V),
    )
    return logp.reshape(lead)
