"""Shared pytest configuration: hypothesis profiles, determinism, and Triton interpreter helpers."""

from __future__ import annotations

import os

# Triton decides at *decoration* time whether a kernel is compiled or interpreted, so the interpreter
# must be switched on before any module with @triton.jit is imported. Without a GPU, every Triton test
# runs its kernels on CPU tensors through the interpreter.
import torch  # noqa: I001  (torch first: the interpreter switch below must precede every kernel import)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A fresh torch.compile cache per test session: Inductor's on-disk cache (/tmp/torchinductor_<user>)
# outlives checkouts, and a graph cached against an older schema of a rankloss custom op was seen to
# break test_torch_compile_fullgraph_on_cpu. TORCHINDUCTOR_CACHE_DIR set by the caller wins.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rankloss-inductor-")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# A derandomised profile with no deadline for CI (selected automatically when CI is set); a "dev"
# profile for local runs. HYPOTHESIS_PROFILE overrides both.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# One intra-op thread: the tests use tiny tensors, where a second OpenMP thread only adds a barrier per
# op, and on a busy 2-core machine that barrier waits for a core (measured: F.logsigmoid with grad on 12
# float64 values took 4 us with 1 thread, 8 ms with 2 while another process ran; the chain-loss tests
# went from 19 s to over 50 s). RANKLOSS_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("RANKLOSS_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class LargestTensor(TorchDispatchMode):
    """Records the number of elements of the largest tensor any op creates while active (a memory probe
    that needs no allocator statistics: a full ``[N, V]`` logits tensor cannot hide from it)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.fixture
def largest_tensor() -> type[LargestTensor]:
    """``with largest_tensor() as probe: ...``, then ``probe.largest``."""
    return LargestTensor
