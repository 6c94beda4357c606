"""Shared plumbing of the fused ops: implementation choice, lazy kernel imports, chunk sizes."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from .._validation import check_impl

LOGPROB_IMPLS = ("triton", "torch", "reference")
# linear_token_logprobs also has the vocabulary-chunked cuBLAS path.
LINEAR_LOGPROB_IMPLS = ("triton", "cublas", "torch", "reference")
# Triton-backed paths: CUDA, or CPU tensors under the interpreter; float32 compute.
TRITON_IMPLS = ("triton", "cublas")

# Bytes of one [chunk, V] fp32 buffer the chunked paths aim for; a few such buffers live at once.
CHUNK_BUDGET_BYTES = 32 * 2**20
# What the vocabulary-chunked (cuBLAS) path may allocate beyond its inputs and the gradients it returns:
# the [n, v] fp32 logits chunk, its gradient in the inputs' dtype and the fp32 d hidden accumulator (see
# cublas_chunk_plan). 240 MiB = 252 MB: with the path's [N] fp32 vectors, within 256 MB at N = 16384.
VOCAB_CHUNK_BUDGET_BYTES = 240 * 2**20
# Row groups of the cuBLAS backward in a 16-bit dtype when d weight is needed: each group after the first
# adds into d weight once more, rounding it once more in the inputs' dtype.
MAX_ROW_GROUPS = 4
# Row groups are chosen so that chunks of at least PLAN_COLUMNS fit beside the accumulator: the d hidden
# product reads and writes its [n, D] fp32 accumulator once per chunk, v / 4 FLOPs per byte of it, which
# is above an H200's 206 (990 TFLOP/s dense bf16 over 4.8 TB/s) only for v above ~825.
PLAN_COLUMNS = 1024
# Narrowest vocabulary chunk the planner picks (a user's chunk_size may be narrower).
MIN_VOCAB_CHUNK = 256


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - platforms without triton wheels
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run on CPU tensors through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_module(name: str) -> ModuleType:
    """Import ``rankloss.kernels.<name>`` on first use (never at ``import rankloss``).

    Triton decides at decoration time whether a kernel is compiled or interpreted, so importing lazily
    lets ``TRITON_INTERPRET=1`` set by a program before its first Triton call take effect.
    """
    return importlib.import_module(f"rankloss.kernels.{name}")


def resolve_impl(
    impl: object,
    *tensors: Tensor | None,
    available: tuple[str, ...] = LOGPROB_IMPLS,
    cuda_default: str = "triton",
) -> str:
    """Pick the implementation: ``cuda_default`` on CUDA tensors (when triton is installed), chunked torch
    otherwise.

    ``impl="triton"`` on CPU tensors needs the Triton interpreter (``TRITON_INTERPRET=1`` in the
    environment before the first kernel is imported); float64 inputs need ``"torch"`` or ``"reference"``.
    """
    chosen = check_impl(impl, available)
    present = [t for t in tensors if t is not None]
    device = present[0].device
    fp64 = any(t.dtype == torch.float64 for t in present)
    if chosen is None:
        if device.type == "cuda" and triton_available() and not fp64:
            return cuda_default
        return "torch"
    if chosen in TRITON_IMPLS:
        if not triton_available():
            raise ValueError(f"impl={chosen!r} needs the triton package, which is not installed")
        if fp64:
            raise TypeError(
                f"impl={chosen!r} computes in float32 and does not take float64 inputs; use impl='torch' "
                "or impl='reference' for float64"
            )
        if device.type == "cpu" and not interpreting():
            raise ValueError(
                f"impl={chosen!r} on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
                "environment before rankloss runs its first kernel (or use impl='torch', the CPU path)"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"impl={chosen!r} runs on CUDA (or CPU with TRITON_INTERPRET=1), got {device}")
    return chosen


def accumulation_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def default_chunk_size(vocab_size: int, hidden_size: int = 0) -> int:
    """Rows per chunk of the chunked paths, from ``V`` and ``D``.

    The largest power of two ``c`` in ``[16, 4096]`` with ``c * (V + D) * 4 bytes <= 32 MiB``: one
    ``[c, V]`` fp32 logits buffer (and its ``[c, D]`` rows) stays near 32 MiB, so the extra memory is
    ``O(c * V)`` and independent of the number of tokens. At ``V = 32000`` this gives 256 rows, at
    ``V = 152064`` 32 rows.
    """
    rows = CHUNK_BUDGET_BYTES // (4 * (vocab_size + hidden_size))
    c = 16
    while c * 2 <= min(rows, 4096):
        c *= 2
    return c


@dataclass(frozen=True)
class ChunkPlan:
    """How the ``"cublas"`` path walks the ``[N, V]`` logits: ``rows`` per row group, ``columns`` per
    vocabulary chunk, and ``bytes``, what it allocates beyond its inputs and returned gradients (its
    ``[N]`` fp32 vectors aside)."""

    rows: int
    columns: int
    bytes: int

    def groups(self, n_rows: int) -> int:
        return -(-n_rows // self.rows) if n_rows else 0


def cublas_chunk_plan(
    n_rows: int,
    vocab_size: int,
    hidden_size: int,
    dtype: torch.dtype,
    *,
    backward: bool = False,
    needs_hidden: bool = True,
    needs_weight: bool = True,
    columns: int | None = None,
    budget: int | None = None,
) -> ChunkPlan:
    """Row groups and vocabulary chunks of the ``"cublas"`` path for ``N`` rows, ``V`` columns, ``D``.

    Per element of a ``[n, v]`` chunk the path holds the fp32 logits (4 bytes) and, in the backward with
    16-bit inputs, their gradient in that dtype (the operand of the next two products; fp32 inputs
    overwrite the logits). The backward of 16-bit inputs also holds an fp32 ``[n, D]`` accumulator of
    ``d hidden`` (fp32 inputs accumulate into the returned gradient). So a group of ``n`` rows and ``v``
    columns holds ``n * (acc + v * elem)`` bytes, and within ``budget`` (default: ``VOCAB_CHUNK_BUDGET_BYTES``
    at the call, 240 MiB):

    * ``n``: all ``N`` rows when a chunk of ``PLAN_COLUMNS`` columns fits beside their accumulator, else
      the fewest equal groups for which it does. In the backward of 16-bit inputs that needs ``d weight``
      at most ``MAX_ROW_GROUPS`` groups: each group after the first adds into ``d weight`` (one more
      rounding in that dtype), and past it the budget gives way.
    * ``v``: ``columns`` when given, else the widest multiple of 256 that fits beside the accumulator (at
      least ``MIN_VOCAB_CHUNK``, at most ``V``).

    At ``N = 16384, D = 4096, V = 152064`` in bf16 (default budget 240 MiB): the forward runs one group
    of 3840-column chunks (240 MiB); the backward two groups of 8192 rows with 2304-column chunks (236
    MiB: 128 MiB of it the accumulator).
    """
    budget = budget or VOCAB_CHUNK_BUDGET_BYTES
    n_rows, vocab_size = max(int(n_rows), 1), max(int(vocab_size), 1)
    wide = dtype == torch.float32
    elem = 4 + (0 if wide or not backward else torch.empty((), dtype=dtype).element_size())
    acc = 4 * hidden_size if backward and needs_hidden and not wide else 0
    min_cols = min(MIN_VOCAB_CHUNK, vocab_size)
    fit = budget // (acc + min(PLAN_COLUMNS, vocab_size) * elem)
    groups = -(-n_rows // max(fit, 1))
    if backward and needs_weight and not wide:
        groups = min(groups, MAX_ROW_GROUPS)
    rows = -(-n_rows // groups)
    if columns is None:
        columns = (budget - rows * acc) // (rows * elem) // 256 * 256
        columns = max(columns, min_cols)
    columns = max(1, min(int(columns), vocab_size))
    return ChunkPlan(rows, columns, rows * (acc + columns * elem))


def cublas_cached_columns(
    n_rows: int,
    vocab_size: int,
    hidden_size: int,
    dtype: torch.dtype,
    cache_bytes: int,
    columns: int | None = None,
    budget: int | None = None,
) -> int:
    """Vocabulary columns whose fp32 logits the ``"cublas"`` forward keeps for the backward.

    The forward's first chunks of all ``N`` rows while they fit in ``cache_bytes`` (whole chunks of the
    forward's plan, :func:`cublas_chunk_plan`, the last one as narrow as it is): ``N * columns * 4``
    bytes, all ``V`` columns from ``N * V * 4`` bytes on. 0 when ``cache_bytes`` is 0 or the forward
    itself runs its rows in groups.
    """
    if not cache_bytes or not n_rows:
        return 0
    plan = cublas_chunk_plan(n_rows, vocab_size, hidden_size, dtype, columns=columns, budget=budget)
    if plan.groups(n_rows) > 1:
        return 0
    fits = cache_bytes // (n_rows * 4)
    return vocab_size if fits >= vocab_size else fits // plan.columns * plan.columns


def default_vocab_chunk(n_rows: int, vocab_size: int) -> int:
    """Vocabulary columns per chunk of the ``"cublas"`` forward for ``N`` rows (the forward holds one fp32
    ``[N, v]`` chunk, whatever the dtype and ``D``; see :func:`cublas_chunk_plan`)."""
    return cublas_chunk_plan(n_rows, vocab_size, 0, torch.float32).columns


def check_chunk_size(chunk_size: object) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size}")
    return chunk_size


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in effect for ``device_type``, or None when autocast is off."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def log_softmax_pick(u: Tensor, target: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """``(log_softmax(u)[target], logsumexp(u))`` for a chunk ``u [c, V]``, ``target [c]`` (int64).

    ``out`` receives ``log_softmax(u)`` and may be ``u`` itself (its logits are then overwritten). One
    fused row kernel, no ``[c, V]`` temporary: ``torch.logsumexp`` builds ``u - max`` out of place, which
    costs about three times as long on the CPU. ``logsumexp = u[target] - log_softmax(u)[target]``.
    """
    picked = u.gather(1, target[:, None]).squeeze(1)
    logp = torch.log_softmax(u, dim=-1, out=out).gather(1, target[:, None]).squeeze(1)
    return logp, picked - logp


def softmax_(u: Tensor) -> Tensor:
    """In place: ``u [c, V]`` becomes ``softmax(u)`` over its last dimension.

    One fused row kernel (max, exp, sum, scale); recomputing ``exp(u - lse)`` with the forward's ``lse``
    instead costs two passes and the slower, rounding-amplifying ``exp`` of a difference.
    """
    return torch.softmax(u, dim=-1, out=u)


def logprob_grad_(p: Tensor, labels: Tensor, g: Tensor, temperature: float) -> Tensor:
    """In place: turn ``p = softmax(u) [c, V]`` into ``dLoss/dz = g * (onehot(labels) - p) / temperature``.

    The target entry is written as ``g * sum_{j != y} p_j / temperature``: computed as ``1 - p_y`` it would
    lose all its bits when ``p_y -> 1``. ``labels`` (int64) must be valid column indices: replace
    ignored ones by 0 and pass ``g = 0`` for them.
    """
    target = labels[:, None]
    p.scatter_(1, target, 0.0)
    others = p.sum(dim=1, keepdim=True)
    p.mul_(g[:, None] * (-1.0 / temperature))
    return p.scatter_(1, target, others * (g[:, None] / temperature))
