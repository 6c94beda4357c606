"""Input validation shared by the public ops.

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape or value) with a
message that names the argument and says what was expected. Shape and dtype checks are free; checks
that must read tensor *values* (label ranges, chain sizes given as a tensor) run on CPU tensors always,
on CUDA tensors only when ``RANKLOSS_VALIDATE=1`` (they would cost a host sync), and never while
``torch.compile`` traces (they would break the graph). Checks that read every element of a large
float tensor (NaN and infinity in ``hidden``, ``weight``, ``scores``, ...) run only with
``RANKLOSS_VALIDATE=1``, on every device.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_DTYPE_NAMES = "float16, bfloat16, float32 or float64"


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def validating() -> bool:
    """Whether ``RANKLOSS_VALIDATE=1`` asks for the value checks that cost a pass or a host sync."""
    return os.environ.get("RANKLOSS_VALIDATE", "0") == "1"


def values_checkable(t: Tensor) -> bool:
    """Whether value checks on ``t`` are allowed now (no host sync on CUDA unless asked, no graph break)."""
    if _compiling() or t.device.type == "meta":
        return False
    return t.device.type == "cpu" or validating()


def check_float_tensor(
    x: object, name: str, *, ndim: int | None = None, min_ndim: int | None = None
) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor ({_DTYPE_NAMES}), got {x.dtype}")
    _check_ndim(x, name, ndim, min_ndim)
    return x


def check_int_tensor(x: object, name: str, *, ndim: int | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(x).__name__}")
    if x.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {x.dtype}")
    _check_ndim(x, name, ndim, None)
    return x


def check_labels(labels: object, ignore_index: int, name: str = "labels") -> Tensor:
    """An integer tensor whose dtype can hold ``ignore_index``.

    ``uint8`` labels cannot hold the default ``-100``: a comparison with it wraps around (``-100`` reads
    as 156), so token 156 would silently count as ignored in some places and not in others.
    """
    check_int_tensor(labels, name)
    info = torch.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max:
        raise TypeError(
            f"{name} of dtype {labels.dtype} cannot hold ignore_index={ignore_index} (the dtype holds "
            f"[{info.min}, {info.max}]); pass {name} as torch.long (or torch.int32), or an ignore_index "
            "in that range"
        )
    return labels


def check_finite(
    x: Tensor | None, name: str, *, allow_neg_inf: bool = False, where: Tensor | None = None
) -> None:
    """With ``RANKLOSS_VALIDATE=1``: ``x`` holds no NaN and no infinity (``-inf`` allowed with
    ``allow_neg_inf``: masked logits), only at the positions ``where`` is true when it is given.

    The error names the tensor, the first bad index and how many there are. Off by default: it reads
    every element (and on CUDA costs a host sync); never while ``torch.compile`` traces.
    """
    if x is None or _compiling() or not validating() or x.device.type == "meta" or x.numel() == 0:
        return
    with torch.no_grad():
        bad = (torch.isnan(x) | (x == math.inf)) if allow_neg_inf else ~torch.isfinite(x)
        if where is not None:
            bad &= where
        if not bool(bad.any()):
            return
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        value = x[first].item()
        count = int(bad.sum())
    what = "NaN or +inf" if allow_neg_inf else "NaN or infinity"
    raise ValueError(
        f"{name} must not hold {what} (checked because RANKLOSS_VALIDATE=1): found {count} such "
        f"value(s), the first {name}[{', '.join(map(str, first))}] = {value}"
    )


def _check_ndim(x: Tensor, name: str, ndim: int | None, min_ndim: int | None) -> None:
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)} ({x.ndim}-D)")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")


def check_same_device(**tensors: Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on the same device, got {where}")


def check_shape(x: Tensor, name: str, expected: Sequence[int], expected_desc: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {expected_desc} = {tuple(expected)}, got {tuple(x.shape)}")


def check_positive_float(x: object, name: str, *, allow_none: bool = False) -> float | None:
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a positive finite number, got {x!r}")
    if not (math.isfinite(float(x)) and float(x) > 0):
        raise ValueError(f"{name} must be a positive finite number, got {x!r}")
    return float(x)


def check_filter_eps(x: object, name: str = "filter_eps") -> float | str | None:
    """``"auto"``, ``None`` or a number in ``[0, 1)`` (the relative threshold of gradient filtering)."""
    if x is None or x == "auto":
        return x  # type: ignore[return-value]
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f'{name} must be "auto", None or a number in [0, 1), got {x!r}')
    if not (0.0 <= float(x) < 1.0):
        raise ValueError(f'{name} must be "auto", None or a number in [0, 1), got {x!r}')
    return float(x)


def check_cache_bytes(x: object, name: str = "cache_bytes") -> int | None:
    """``None`` or an int ``>= 0`` (bytes of a cache)."""
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or int(x) < 0:
        raise ValueError(f"{name} must be None or an int >= 0, got {x!r}")
    return int(x)


def check_finite_float(x: object, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a finite number, got {x!r}")
    if not math.isfinite(float(x)):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    return float(x)


def check_int(x: object, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {x!r}")
    return int(x)


def check_choice(x: object, name: str, choices: Sequence[str]) -> str:
    if x not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {x!r}")
    return x  # type: ignore[return-value]


def check_labels_range(labels: Tensor, vocab_size: int, ignore_index: int, name: str = "labels") -> None:
    """Every label must lie in ``[0, vocab_size)`` or equal ``ignore_index`` (value check)."""
    if not values_checkable(labels) or labels.numel() == 0:
        return
    # In int64: a narrower dtype would wrap vocab_size (in int8, 300 reads as 44) and reject good labels.
    labels = labels.long()
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = labels[bad][0].item()
        count = int(bad.sum())
        raise ValueError(
            f"{name} must lie in [0, {vocab_size}) (the vocabulary size) "
            f"or equal ignore_index={ignore_index}; "
            f"found {count} out-of-range value(s), e.g. {first}"
        )


def check_chain_sizes(chain_sizes: object, num_scores: int, name: str = "chain_sizes") -> list[int]:
    """``chain_sizes`` as a list of ints, each >= 2, summing to ``num_scores``.

    Accepts a list/tuple of ints or a 1-D integer tensor (a CUDA tensor costs one host sync; pass a
    list to avoid it). An empty batch (``num_scores == 0``) takes an empty ``chain_sizes``.

    Under ``torch.compile`` a tensor's values are unknown while tracing: a tensor here is a graph break
    (``fullgraph=True`` stops with a message saying to pass a list), after which the values are read.
    """
    if isinstance(chain_sizes, Tensor):
        check_int_tensor(chain_sizes, name, ndim=1)
        if _compiling():
            _graph_break_for_tensor_sizes(name)
        if chain_sizes.device.type == "meta":
            raise ValueError(
                f"{name} must be a list of ints or a tensor with values, got a tensor on the meta device"
            )
        sizes = [int(v) for v in chain_sizes.tolist()]
    elif isinstance(chain_sizes, (list, tuple)):
        for i, v in enumerate(chain_sizes):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name}[{i}] must be an int, got {v!r}")
        sizes = [int(v) for v in chain_sizes]
    else:
        raise TypeError(
            f"{name} must be a list of ints or a 1-D integer tensor, got {type(chain_sizes).__name__}"
        )
    if len(sizes) == 0 and num_scores != 0:
        raise ValueError(
            f"{name} must hold at least one chain when there are captions, got an empty sequence "
            f"for S = {num_scores} scores"
        )
    for i, k in enumerate(sizes):
        if k < 2:
            raise ValueError(f"{name}[{i}] = {k}: every chain needs at least 2 captions")
    if sum(sizes) != num_scores:
        raise ValueError(
            f"{name} must sum to the number of captions S = {num_scores}, got sum {sum(sizes)} "
            f"from {name}={_short(sizes)}"
        )
    return sizes


def _graph_break_for_tensor_sizes(name: str) -> None:
    # A graph break, not an exception: an exception raised while tracing reaches the user as dynamo's
    # "Observed exception" with the message hidden in its debug context; a graph break's message is its
    # explanation under fullgraph=True, and without fullgraph the values are then read eagerly.
    torch._dynamo.graph_break(
        msg=f"{name} given as a tensor: its values are unknown while torch.compile traces, so "
        f"fullgraph=True cannot compile this call; pass {name} as a list of ints (e.g. "
        f"{name}.tolist() outside the compiled function)"
    )


def _short(values: list[int], limit: int = 8) -> str:
    if len(values) <= limit:
        return str(values)
    return "[" + ", ".join(map(str, values[:limit])) + f", ... ({len(values)} chains)]"


def check_impl(impl: object, available: Sequence[str]) -> str | None:
    if impl is None:
        return None
    if impl not in available:
        raise ValueError(f"impl must be None or one of {tuple(available)}, got {impl!r}")
    return impl  # type: ignore[return-value]


def check_cu_seqlens(cu_seqlens: object, num_tokens: int, name: str = "cu_seqlens") -> Tensor:
    """Packed-layout offsets: a 1-D integer tensor ``[S + 1]``, non-decreasing from 0 to ``num_tokens``
    (``[0]`` for an empty batch)."""
    check_int_tensor(cu_seqlens, name, ndim=1)
    if cu_seqlens.numel() < 1:
        raise ValueError(
            f"{name} must hold S + 1 offsets, starting with 0 ([0] for no sequences), got an empty tensor"
        )
    if values_checkable(cu_seqlens):
        b = cu_seqlens.tolist()
        if b[0] != 0 or b[-1] != num_tokens or any(x > y for x, y in zip(b[:-1], b[1:])):
            shown = f"{b[:8]}..." if len(b) > 8 else f"{b}"
            raise ValueError(f"{name} must be non-decreasing offsets from 0 to N = {num_tokens}, got {shown}")
    return cu_seqlens


_warned_zero_token_caption = False


def warn_zero_token_captions(counts: Tensor | Sequence[int]) -> None:
    """Warn, once per process, when a caption of a chain batch has no scored tokens.

    ``counts [S]``: scored tokens per caption. Such a caption scores 0, i.e. log-probability 0 (the model
    is "certain" of it), or its reward is ``-beta * ref_score``: almost always labels that are all
    ``ignore_index`` by mistake (truncation, a prompt mask that covers the caption). A tensor is read
    only when that costs no host sync (CPU, or ``RANKLOSS_VALIDATE=1``) and never under torch.compile.
    """
    global _warned_zero_token_caption
    if _compiling() or _warned_zero_token_caption:
        return
    if isinstance(counts, Tensor):
        if not values_checkable(counts) or counts.numel() == 0:
            return
        empty = (counts == 0).nonzero().flatten().tolist()
    else:
        empty = [i for i, n in enumerate(counts) if n == 0]
    if not empty:
        return
    _warned_zero_token_caption = True
    warnings.warn(
        f"{len(empty)} caption(s) of {len(counts)} have no scored tokens (every label is ignore_index), "
        f"e.g. caption {empty[0]}: such a caption scores 0, as if the model were certain of it, and "
        "its chain's loss and metrics treat it so; check the labels (truncation, prompt mask). "
        "This warning is shown once per process.",
        RuntimeWarning,
        stacklevel=5,
    )
