"""rankloss.kernels: the Triton kernels (``@triton.jit`` functions) and their launchers, nothing else.

Importing this package never fails: on a machine without Triton, ``HAS_TRITON`` is False and the kernel
modules are simply not importable; rankloss then runs its chunked PyTorch paths.
"""

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - macOS/Windows wheels of torch come without triton
    HAS_TRITON = False

__all__ = ["HAS_TRITON"]
