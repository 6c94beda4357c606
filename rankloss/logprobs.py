"""Public per-token and per-sequence log-probability ops.

Label convention (DESIGN.md §3): ``labels[..., t]`` is the token whose log-prob is read from position
``t``'s logits, i.e. labels are **already shifted**. Use :func:`shift_labels` to turn Hugging Face style
labels (each token id at its own position, as passed to ``model(..., labels=...)``) into this form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validation as V
from .ops import _common as ops_common
from .ops.linear_token_logprobs import linear_token_logprobs_op
from .ops.token_logprobs import token_logprobs_op
from .reference import logprobs as ref

__all__ = ["shift_labels", "token_logprobs", "linear_token_logprobs", "sequence_logprobs"]

LOGPROB_IMPLS = ops_common.LOGPROB_IMPLS


def shift_labels(labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Turn Hugging Face style labels ``[..., T]`` into labels aligned with the logits that score them.

    A causal LM scores token ``t + 1`` from position ``t``: ``out[..., t] = labels[..., t + 1]`` and
    ``out[..., T - 1] = ignore_index``. The shape is kept, so ``out`` pairs with the full ``[..., T, V]``
    logits or ``[..., T, D]`` hidden states.
    """
    V.check_int_tensor(labels, "labels")
    if labels.ndim < 1:
        raise ValueError(f"labels must have at least 1 dimension [..., T], got shape {tuple(labels.shape)}")
    ignore_index = V.check_int(ignore_index, "ignore_index")
    V.check_labels(labels, ignore_index)
    out = torch.full_like(labels, ignore_index)
    out[..., :-1] = labels[..., 1:]
    return out


def _check_logprob_common(labels: Tensor, ignore_index: object, temperature: object) -> tuple[int, float]:
    V.check_int_tensor(labels, "labels")
    ignore_index = V.check_int(ignore_index, "ignore_index")
    V.check_labels(labels, ignore_index)
    return ignore_index, V.check_positive_float(temperature, "temperature")


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    impl: str | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Log-probability of each label: ``log_softmax(logits / temperature)[labels]``, 0 where ignored.

    Args:
        logits: ``[..., V]`` (e.g. ``[S, T, V]`` or ``[N, V]``), float16/bfloat16/float32/float64.
        labels: ``[...]`` integer token ids, already shifted (see :func:`shift_labels`); positions equal to
            ``ignore_index`` get 0 and no gradient.
        ignore_index: label value of positions that are not scored.
        temperature: logits are divided by it before the softmax.
        impl: ``None`` (automatic: ``"triton"`` for CUDA tensors, ``"torch"`` otherwise), ``"triton"`` (the
            Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked
            PyTorch) or ``"reference"`` (the plain specification, autograd through ``log_softmax``).
        chunk_size: rows per chunk of the ``"torch"`` path (default: chosen from ``V``).

    Returns:
        ``[...]`` float32 (float64 for float64 logits) log-probabilities; gradients flow to ``logits`` in
        its own dtype.
    """
    V.check_float_tensor(logits, "logits", min_ndim=1)
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    ignore_index, temperature = _check_logprob_common(labels, ignore_index, temperature)
    V.check_shape(labels, "labels", logits.shape[:-1], "logits.shape[:-1]")
    V.check_same_device(logits=logits, labels=labels)
    impl = ops_common.resolve_impl(impl, logits)
    chunk_size = ops_common.check_chunk_size(chunk_size)
    V.check_labels_range(labels, logits.shape[-1], ignore_index)
    V.check_finite(logits, "logits", allow_neg_inf=True)
    if impl == "reference":
        return ref.token_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature)
    return token_logprobs_op(logits, labels, ignore_index, temperature, impl, chunk_size)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    impl: str | None = None,
    chunk_size: int | None = None,
    deterministic: bool = False,
    filter_eps: float | str | None = "auto",
    cache_bytes: int | None = None,
) -> Tensor:
    """Per-token log-probabilities from hidden states and the LM head, never building ``[N, V]`` logits.

    ``z = hidden @ weight.T + bias``; with ``softcap``: ``z = softcap * tanh(z / softcap)``; then
    ``l = log_softmax(z / temperature)[labels]``, and 0 where ``labels == ignore_index``.

    Args:
        hidden: ``[..., D]`` (e.g. ``[S, T, D]`` or packed ``[N, D]``) final hidden states.
        weight: ``[V, D]`` LM-head weight.
        labels: ``[...]`` = ``hidden.shape[:-1]``, already shifted (see :func:`shift_labels`).
        bias: optional ``[V]`` LM-head bias.
        ignore_index: label value of positions that are not scored.
        temperature: logits are divided by it (after the soft-cap).
        softcap: optional logit soft-cap (Gemma 2 style), a positive number.
        impl: ``None`` (automatic: ``"cublas"`` for CUDA tensors, ``"torch"`` otherwise), ``"triton"`` (the
            fused kernels; on CPU tensors only under ``TRITON_INTERPRET=1``), ``"cublas"`` (vocabulary
            chunks: cuBLAS products and Triton epilogues, extra memory planned within 240 MiB; CUDA, or
            CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked PyTorch, extra memory
            ``O(chunk_size * V)``) or ``"reference"`` (materialises the full logits).
        chunk_size: rows per chunk of the ``"torch"`` path (default: chosen from ``V`` and ``D``, see
            :func:`rankloss.ops.default_chunk_size`); vocabulary columns per chunk of the ``"cublas"`` path
            (default: the widest that keeps the path's extra memory within 240 MiB, see
            :func:`rankloss.ops.cublas_chunk_plan`).
        deterministic: Triton backward without atomics (bitwise reproducible, one more recomputation of
            the logits). The ``"cublas"`` and ``"torch"`` paths are always deterministic (no atomics).
        filter_eps: gradient filtering in the Triton backward (after apple/ml-cross-entropy's, with a
            threshold relative to each row): a ``[BLOCK_N, BLOCK_V]`` tile of the logits in whose rows
            every ``p_j`` is below ``filter_eps * (1 - p_y) / V`` adds nothing to ``d hidden`` and
            ``d weight`` (its two matrix products are skipped; ``d bias`` stays exact). A row loses at
            most ``filter_eps / 2`` of its gradient mass ``sum_j |[j == y] - p_j|`` (times ``max |W|``
            in ``d hidden``). ``"auto"`` (default): ``torch.finfo(dtype).eps`` of the inputs' dtype, so
            the loss is below one rounding in that dtype (2^-8 relative in bfloat16); ``None`` or ``0``:
            every tile. A near-uniform softmax (as at initialisation) never qualifies; a peaked one
            skips the tiles of tokens the model rules out. Used by ``impl="triton"`` with
            ``deterministic=False`` only: the deterministic kernels and the other paths compute every
            tile.
        cache_bytes: the ``"cublas"`` path only (the CUDA default): up to this many bytes of fp32 logit
            chunks ``[N, v]`` are kept from the forward for the backward, which reads them instead of
            recomputing them (one GEMM of three per chunk; at ``N = 16384, V = 152064`` all chunks take
            9.3 GiB, where the naive path's logits take 27 GB). ``None`` or ``0`` (default): nothing is
            kept and the path stays within its 240 MiB plan; nothing is kept either when no gradient is
            needed. The kept chunks live from the forward to the backward, like activations; with them
            the backward runs all rows in one group: beside the cache it holds an fp32 ``[N, D]``
            accumulator of ``d hidden`` and one chunk's gradient (and its fp32 logits where a chunk is
            not cached), up to about 616 MiB at that size in bf16. The other paths keep nothing and ignore it.

    Under autocast, ``hidden``, ``weight`` and ``bias`` are cast to the autocast dtype first (as
    ``F.linear`` would be); the log-probs still come back in float32.

    Returns:
        ``[...]`` float32 (float64 for float64 inputs) log-probabilities.
    """
    ignore_index, temperature, softcap, chunk_size = check_linear_inputs(
        hidden, weight, labels, bias, ignore_index, temperature, softcap, chunk_size, deterministic
    )
    filter_eps = V.check_filter_eps(filter_eps)
    cache_bytes = V.check_cache_bytes(cache_bytes)
    hidden, weight, bias = _common_dtype(hidden, weight, bias)
    # On CUDA the vocabulary-chunked cuBLAS path is the default: on an H200 (bf16, D=4096, V=152064) its
    # forward + backward took 134 ms at N=16384 where the fused Triton kernels took 1.77 s and the naive
    # path 118 ms with 27 GB of logits (benchmarks/results/gpu_check-nvidia-h200.md).
    impl = ops_common.resolve_impl(
        impl, hidden, weight, bias, available=ops_common.LINEAR_LOGPROB_IMPLS, cuda_default="cublas"
    )
    if impl == "reference":
        return ref.linear_token_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            ignore_index=ignore_index,
            temperature=temperature,
            softcap=softcap,
        )
    return linear_token_logprobs_op(
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
        resolve_filter_eps(filter_eps, hidden.dtype) if impl == "triton" and not deterministic else 0.0,
        (cache_bytes or 0) if _needs_grad(hidden, weight, bias) else 0,  # no backward: nothing to keep
    )


def _needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` (None entries skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve_filter_eps(filter_eps: float | str | None, dtype: torch.dtype) -> float:
    """The gradient-filtering threshold for inputs of ``dtype``: ``"auto"`` -> ``eps(dtype)``, ``None`` ->
    0 (off), a number as it is."""
    if filter_eps is None:
        return 0.0
    if filter_eps == "auto":
        return torch.finfo(dtype).eps
    return float(filter_eps)


def check_linear_inputs(
    hidden: object,
    weight: object,
    labels: object,
    bias: object,
    ignore_index: object,
    temperature: object,
    softcap: object,
    chunk_size: object,
    deterministic: object,
) -> tuple[int, float, float | None, int | None]:
    """Validate the inputs of :func:`linear_token_logprobs`; returns the normalised scalar options
    ``(ignore_index, temperature, softcap, chunk_size)``."""
    V.check_float_tensor(hidden, "hidden", min_ndim=1)
    V.check_float_tensor(weight, "weight", ndim=2)
    ignore_index, temperature = _check_logprob_common(labels, ignore_index, temperature)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if 0 in weight.shape:
        raise ValueError(f"weight must be [V, D] with V >= 1 and D >= 1, got shape {tuple(weight.shape)}")
    V.check_shape(labels, "labels", hidden.shape[:-1], "hidden.shape[:-1]")
    if bias is not None:
        V.check_float_tensor(bias, "bias", ndim=1)
        V.check_shape(bias, "bias", (weight.shape[0],), "[V]")
    softcap = V.check_positive_float(softcap, "softcap", allow_none=True)
    V.check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    chunk_size = ops_common.check_chunk_size(chunk_size)
    V.check_labels_range(labels, weight.shape[0], ignore_index)
    V.check_finite(hidden, "hidden")
    V.check_finite(weight, "weight")
    V.check_finite(bias, "bias", allow_neg_inf=True)
    return ignore_index, temperature, softcap, chunk_size


def _common_dtype(
    hidden: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The autocast dtype when autocast is on, else the promoted dtype of the three (differentiable casts)."""
    dtype = ops_common.autocast_dtype(hidden.device.type)
    if dtype is None:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
        if bias is not None:
            dtype = torch.promote_types(dtype, bias.dtype)
    cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias)


def sequence_logprobs(
    token_logps: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    length_normalize: bool = False,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Per-caption scores: the sum of the scored tokens' log-probs, or their mean (``length_normalize``).

    Padded layout: ``token_logps [S, T]`` (any leading dims) and ``labels [S, T]`` -> ``[S]``.
    Packed layout: ``token_logps [N]``, ``labels [N]`` and ``cu_seqlens [S + 1]`` (flash-attn varlen style:
    caption ``i`` holds tokens ``cu_seqlens[i]:cu_seqlens[i + 1]``) -> ``[S]``.

    A caption without scored tokens (every label ``ignore_index``) scores 0, with or without
    ``length_normalize``: log-probability 0, as if the model were certain of it. The chain losses from
    hidden states or logits warn once when a batch holds such a caption.
    """
    V.check_float_tensor(token_logps, "token_logps", min_ndim=1)
    V.check_int_tensor(labels, "labels")
    ignore_index = V.check_int(ignore_index, "ignore_index")
    V.check_labels(labels, ignore_index)
    V.check_shape(labels, "labels", token_logps.shape, "token_logps.shape")
    if not isinstance(length_normalize, bool):
        raise TypeError(f"length_normalize must be a bool, got {length_normalize!r}")
    if cu_seqlens is not None:
        if token_logps.ndim != 1:
            raise ValueError(
                "token_logps must be 1-D [N] in the packed layout (cu_seqlens given), "
                f"got shape {tuple(token_logps.shape)}"
            )
        V.check_cu_seqlens(cu_seqlens, token_logps.shape[0])
    V.check_same_device(token_logps=token_logps, labels=labels, cu_seqlens=cu_seqlens)
    V.check_finite(token_logps, "token_logps", allow_neg_inf=True, where=labels != ignore_index)
    return ref.sequence_logprobs(
        token_logps,
        labels,
        ignore_index=ignore_index,
        length_normalize=length_normalize,
        cu_seqlens=cu_seqlens,
    )
