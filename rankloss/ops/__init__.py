"""Fused ops behind the public API: one module per op (chunked PyTorch path, custom op, autograd).

The Triton kernels they launch live in ``rankloss.kernels`` and are imported on first use only.
"""

from ._common import (
    LINEAR_LOGPROB_IMPLS,
    LOGPROB_IMPLS,
    ChunkPlan,
    cublas_chunk_plan,
    default_chunk_size,
    default_vocab_chunk,
    resolve_impl,
)
from .linear_token_logprobs import linear_token_logprobs_op
from .token_logprobs import token_logprobs_op

__all__ = [
    "ChunkPlan",
    "LINEAR_LOGPROB_IMPLS",
    "LOGPROB_IMPLS",
    "cublas_chunk_plan",
    "default_chunk_size",
    "default_vocab_chunk",
    "linear_token_logprobs_op",
    "resolve_impl",
    "token_logprobs_op",
]
