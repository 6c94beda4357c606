"""Benchmark cases: what is measured, on which inputs, and how its peak memory is read.

Shared by the pytest-benchmark suites (``benchmarks/test_*.py``), the per-case memory probe (this file run
as a script) and ``benchmarks/gpu_check.py``.

A :class:`Case` names one measurement: a suite (``logprobs``, ``chain`` or ``matmul``), an implementation,
a mode (``fwd``: forward only, inputs without gradient, as when scoring with a frozen reference model;
``fwdbwd``: forward and backward to ``hidden`` and ``weight``) and the sizes ``N`` (tokens), ``D``
(hidden size), ``V`` (vocabulary), dtype and device. :func:`prepare` builds the inputs and returns a
closure running one step; the FLOPs counted for a step are ``2 N V D`` (``fwd``) or ``6 N V D``
(``fwdbwd``): the logits GEMM, and the two gradient GEMMs, whatever an implementation really spends
(rankloss recomputes the logits in its backward: 8 N V D).

Implementations (``impl``):

* ``naive``: ``hidden @ weight.T`` -> full ``[N, V]`` logits, ``.float().log_softmax(-1)``, ``gather``;
  for the chain suite followed by the per-caption sums and ``rankloss.reference``'s chain loss.
* ``compile``: ``torch.compile`` of the naive log-prob function (compiled once at setup, never timed).
* ``rankloss`` / ``rankloss_det``: ``rankloss.linear_token_logprobs`` (``impl=None``: chunked PyTorch on
  CPU, Triton on CUDA; ``_det``: ``deterministic=True``); ``rankloss.fused_linear_chain_loss`` for chains.
* ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss(reduction="sum")`` (Triton, so CUDA only;
  its scalar loss gives every token the same upstream gradient).
* ``liger_dpo``: Liger-Kernel's ``LigerFusedLinearDPOLoss`` (``use_ref_model=False``, ``compiled=False`` on
  CPU) on the same tokens arranged as pairs (captions ``0, 2, 4, ...`` chosen, ``1, 3, 5, ...`` rejected).
* ``matmul``: the GEMMs alone into preallocated buffers: ``hidden @ weight.T`` (``fwd``), plus
  ``logits @ weight`` and ``logits.T @ hidden`` (``fwdbwd``): the machine's own matmul rate on these shapes.

Peak memory (:func:`measure_peak`): on CUDA ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()`` minus what was allocated before the step (the inputs). On CPU each case runs
in a fresh process (``python benchmarks/cases.py memory '<case json>'``) that fixes glibc's mmap threshold
(so freed large blocks go back to the kernel and cannot hide a later peak), warms the code path up on tiny
shapes, builds the inputs, resets the kernel's resident-set high-water mark (``echo 5 >
/proc/self/clear_refs``), runs one step and reports ``VmHWM - VmRSS before the step``: the extra resident
memory of the step, including the gradients it returns. Without ``clear_refs`` it falls back to
``getrusage`` max RSS above the post-setup max RSS.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import platform
import re
import resource
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Case",
    "Prepared",
    "Unavailable",
    "PROFILES",
    "Profile",
    "profile_cases",
    "default_profile",
    "prepare",
    "measure_peak",
    "describe_machine",
    "naive_logprobs",
    "device_tag",
]

SUITES = ("logprobs", "chain", "matmul")
MODES = ("fwd", "fwdbwd")
LOGPROB_IMPLS = ("naive", "compile", "rankloss", "rankloss_det", "liger")
CHAIN_IMPLS = ("naive", "rankloss", "liger_dpo")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BETA = 0.1


# Keyword arguments added to every rankloss.linear_token_logprobs call of a log-prob case prepared while
# they are set (gpu_check.py's variants, e.g. cache_bytes); empty by default.
RANKLOSS_OPTIONS: dict = {}


class Unavailable(RuntimeError):
    """An implementation that cannot run here (a missing package, or Triton without a GPU)."""


# --------------------------------------------------------------------------------------------------
# Cases and profiles
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One measurement. ``N`` counts tokens; in the chain suite ``N = S * T`` with ``S`` captions of ``T``
    tokens in ``S / K`` chains of ``K`` captions. ``backend`` is the ``impl=`` passed to rankloss
    (None: automatic dispatch)."""

    suite: str
    impl: str
    mode: str
    N: int
    D: int
    V: int
    dtype: str = "float32"
    device: str = "cpu"
    K: int = 0
    T: int = 0
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"suite must be one of {SUITES}, got {self.suite!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if min(self.N, self.D, self.V) < 1:
            raise ValueError(f"N, D and V must be positive, got N={self.N}, D={self.D}, V={self.V}")
        if self.suite == "chain":
            if self.K < 2 or self.T < 1 or self.N % self.T or (self.N // self.T) % self.K:
                raise ValueError(
                    f"a chain case needs K >= 2 and N = S * T with S a multiple of K, got N={self.N}, "
                    f"T={self.T}, K={self.K}"
                )

    @property
    def S(self) -> int:
        """Captions (chain suite)."""
        return self.N // self.T if self.T else 0

    @property
    def id(self) -> str:
        parts = [self.suite, self.mode, self.impl, f"N{self.N}", f"D{self.D}", f"V{self.V}", self.dtype]
        if self.suite == "chain":
            parts[3:3] = [f"K{self.K}", f"T{self.T}"]
        if self.backend:
            parts.append(f"impl-{self.backend}")
        return "-".join(parts + [self.device])

    @property
    def group(self) -> str:
        size = f"N={self.N} D={self.D} V={self.V} {self.dtype} {self.device}"
        if self.suite == "chain":
            size = f"K={self.K} T={self.T} " + size
        return f"{self.suite} {self.mode} {size}"

    @property
    def flops(self) -> int:
        """``2 N V D`` for a forward, ``6 N V D`` for forward and backward."""
        return (2 if self.mode == "fwd" else 6) * self.N * self.V * self.D

    @property
    def grad_bytes(self) -> int:
        """Bytes of the gradients a ``fwdbwd`` step returns (``d hidden [N, D]``, ``d weight [V, D]``)."""
        if self.mode == "fwd" or self.suite == "matmul":
            return 0
        return (self.N + self.V) * self.D * DTYPES[self.dtype].itemsize

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Case:
        return cls(**json.loads(text))

    def info(self) -> dict[str, object]:
        """The case's fields for ``extra_info``."""
        out: dict[str, object] = dataclasses.asdict(self)
        out["flops"] = self.flops
        out["grad_bytes"] = self.grad_bytes
        if self.suite == "chain":
            out["S"] = self.S
            out["chains"] = self.S // self.K
        return out


@dataclass(frozen=True)
class Profile:
    """Sizes, implementations and rounds of one report."""

    name: str
    device: str
    dtype: str
    logprob_sizes: tuple[tuple[int, int, int], ...]  # (N, D, V)
    logprob_impls: tuple[str, ...]
    chain_sizes: tuple[tuple[int, int, int, int], ...]  # (N tokens, T, D, V)
    chain_ks: tuple[int, ...]
    chain_impls: tuple[str, ...]
    rounds: int
    warmup_rounds: int
    backend: str | None = None
    description: str = ""


# The issue-3 CPU target case (N=4096, D=512, V=32000, fp32) is in every CPU profile; the issue-4 target
# (4 chains x 8 captions x 128 tokens = 4096 tokens, D=512, V=32000, fp32) is the chain case with K=8.
PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick",
        device="cpu",
        dtype="float32",
        logprob_sizes=((4096, 512, 32000),),
        logprob_impls=("naive", "compile", "rankloss"),
        chain_sizes=((4096, 128, 512, 32000),),
        chain_ks=(2, 4, 8, 16),
        chain_impls=("naive", "rankloss", "liger_dpo"),
        rounds=3,
        warmup_rounds=0,
        description="CPU, the issue-3 and issue-4 target sizes only, 3 rounds",
    ),
    "full": Profile(
        name="full",
        device="cpu",
        dtype="float32",
        logprob_sizes=((1024, 512, 32000), (4096, 512, 32000), (1024, 512, 152064)),
        logprob_impls=("naive", "compile", "rankloss"),
        chain_sizes=((4096, 128, 512, 32000),),
        chain_ks=(2, 4, 8, 16),
        chain_impls=("naive", "rankloss", "liger_dpo"),
        rounds=5,
        warmup_rounds=1,
        description="CPU, scaled-down sizes (D=512; N in {1024, 4096} at V=32000, N=1024 at V=152064)",
    ),
    "gpu": Profile(
        name="gpu",
        device="cuda",
        dtype="bfloat16",
        logprob_sizes=tuple((n, 4096, v) for v in (32000, 152064) for n in (1024, 4096, 16384)),
        logprob_impls=LOGPROB_IMPLS,
        chain_sizes=((16384, 512, 4096, 152064),),
        chain_ks=(2, 4, 8, 16),
        chain_impls=CHAIN_IMPLS,
        rounds=10,
        warmup_rounds=2,
        description="CUDA, bf16, D=4096, V in {32000, 152064}, N in {1024, 4096, 16384}",
    ),
    # The GPU profile's code paths on tiny CPU shapes: rankloss forced to its Triton kernels and Liger's
    # Triton loss, both under TRITON_INTERPRET=1 (set by benchmarks/conftest.py). A check of the harness,
    # not a measurement.
    "smoke": Profile(
        name="smoke",
        device="cpu",
        dtype="float32",
        logprob_sizes=((67, 33, 517),),
        logprob_impls=LOGPROB_IMPLS,
        chain_sizes=((80, 5, 33, 517),),
        chain_ks=(2, 4, 8, 16),
        chain_impls=CHAIN_IMPLS,
        rounds=1,
        warmup_rounds=0,
        backend="triton",
        description="harness check: GPU code paths on tiny CPU shapes under the Triton interpreter",
    ),
}


def default_profile() -> str:
    """``gpu`` when CUDA is available, else ``quick``; ``RANKLOSS_BENCH_PROFILE`` overrides."""
    name = os.environ.get("RANKLOSS_BENCH_PROFILE") or ("gpu" if torch.cuda.is_available() else "quick")
    if name not in PROFILES:
        raise ValueError(f"RANKLOSS_BENCH_PROFILE must be one of {tuple(PROFILES)}, got {name!r}")
    return name


def profile_cases(profile: Profile) -> dict[str, list[Case]]:
    """The cases of each suite. ``liger_dpo`` runs once per token count (at ``K = 2``: pairs)."""
    common = {"dtype": profile.dtype, "device": profile.device}
    out: dict[str, list[Case]] = {"logprobs": [], "chain": [], "matmul": []}
    shapes: list[tuple[int, int, int]] = []
    for mode in MODES:
        for N, D, V in profile.logprob_sizes:
            for impl in profile.logprob_impls:
                backend = profile.backend if impl.startswith("rankloss") else None
                out["logprobs"].append(Case("logprobs", impl, mode, N, D, V, backend=backend, **common))
    for N, T, D, V in profile.chain_sizes:
        for K in profile.chain_ks:
            for impl in profile.chain_impls:
                if impl == "liger_dpo" and K != 2:
                    continue
                backend = profile.backend if impl == "rankloss" else None
                out["chain"].append(
                    Case("chain", impl, "fwdbwd", N, D, V, K=K, T=T, backend=backend, **common)
                )
    shapes = sorted({(c.N, c.D, c.V) for c in out["logprobs"] + out["chain"]})
    for mode in MODES:
        for N, D, V in shapes:
            out["matmul"].append(Case("matmul", "matmul", mode, N, D, V, **common))
    return out


# --------------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------------
def naive_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """The naive path: full logits ``[..., V]``, float32 ``log_softmax``, ``gather`` -> ``[...]``."""
    logits = hidden @ weight.T
    return logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@dataclass
class Prepared:
    """A ready-to-time step: ``fn()`` runs it once (and synchronises on CUDA)."""

    fn: Callable[[], object]
    input_bytes: int
    keep: tuple[object, ...] = ()


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _sync(device: str) -> Callable[[], None]:
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _inputs(case: Case, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``hidden [N, D]``, ``weight [V, D]`` (logits of standard deviation ~1), ``labels [N]``, upstream
    gradient ``g [N]``, built directly in the case's dtype and device."""
    g = torch.Generator(device=case.device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    kw = {"device": case.device, "generator": g}
    hidden = torch.randn(case.N, case.D, dtype=dtype, **kw)
    weight = torch.randn(case.V, case.D, dtype=dtype, **kw).mul_(case.D**-0.5)
    labels = torch.randint(0, case.V, (case.N,), **kw)
    upstream = torch.randn(case.N, dtype=torch.float32, **kw)
    return hidden, weight, labels, upstream


def _grad_step(
    forward: Callable[[Tensor, Tensor], Tensor], hidden: Tensor, weight: Tensor, upstream: Tensor | None
) -> Callable[[], tuple[Tensor, ...]]:
    """``fn()``: ``forward(h, w)``, then ``d/d(h, w)`` of it with upstream gradient ``upstream``."""
    h = hidden.requires_grad_()
    w = weight.requires_grad_()

    def fn() -> tuple[Tensor, ...]:
        out = forward(h, w)
        return torch.autograd.grad(out, (h, w), upstream)

    return fn


def _liger(module_path: str, name: str) -> type:
    try:
        module = __import__(module_path, fromlist=[name])
    except ImportError as exc:  # pragma: no cover - liger-kernel is in the dev extra
        raise Unavailable(f"liger-kernel is not installed ({exc})") from exc
    return getattr(module, name)


def _prepare_logprobs(case: Case, seed: int) -> Prepared:
    import rankloss

    hidden, weight, labels, upstream = _inputs(case, seed)
    backward = case.mode == "fwdbwd"
    if case.impl in ("naive", "compile"):
        if case.impl == "compile":
            torch._dynamo.reset()
        f = naive_logprobs if case.impl == "naive" else torch.compile(naive_logprobs, dynamic=False)
        forward = lambda h, w: f(h, w, labels)
    elif case.impl in ("rankloss", "rankloss_det"):
        det = case.impl == "rankloss_det"
        rl_options = dict(RANKLOSS_OPTIONS)  # read when the case is prepared
        forward = lambda h, w: rankloss.linear_token_logprobs(
            h, w, labels, impl=case.backend, deterministic=det, **rl_options
        )
    elif case.impl == "liger":
        if case.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise Unavailable("Liger's fused linear cross entropy is Triton-only: it needs a CUDA device")
        flce = _liger("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")(reduction="sum")
        forward = lambda h, w: flce(w, h, labels)
        upstream = None  # a scalar loss
    else:
        raise ValueError(f"unknown logprobs impl {case.impl!r}; expected one of {LOGPROB_IMPLS}")
    if backward:
        fn = _grad_step(forward, hidden, weight, upstream)
    else:

        def fn() -> Tensor:
            with torch.no_grad():
                return forward(hidden, weight)

    extra = (upstream,) if upstream is not None else ()
    return _finish(case, fn, _nbytes(hidden, weight, labels, *extra))


def _prepare_chain(case: Case, seed: int) -> Prepared:
    from rankloss.reference import logprobs as ref_logprobs
    from rankloss.reference import losses as ref_losses

    import rankloss

    hidden, weight, labels, _ = _inputs(case, seed)
    S, T = case.S, case.T
    hidden = hidden.view(S, T, case.D)
    labels = labels.view(S, T)
    chain_sizes = [case.K] * (S // case.K)
    g = torch.Generator(device=case.device).manual_seed(seed + 1)
    # Scores a frozen reference model would give: sums of T log-probs near -log V each.
    ref_scores = -T * torch.rand(S, device=case.device, generator=g).add_(
        torch.log(torch.tensor(float(case.V)))
    )
    if case.impl == "naive":

        def forward(h: Tensor, w: Tensor) -> Tensor:
            scores = ref_logprobs.sequence_logprobs(naive_logprobs(h, w, labels), labels)
            return ref_losses.chain_loss(scores, chain_sizes, ref_scores, loss="plackett_luce", beta=BETA)[0]

    elif case.impl == "rankloss":

        def forward(h: Tensor, w: Tensor) -> Tensor:
            return rankloss.fused_linear_chain_loss(
                h, w, labels, chain_sizes, ref_scores, loss="plackett_luce", beta=BETA, impl=case.backend
            ).loss

    elif case.impl == "liger_dpo":
        dpo_cls = _liger("liger_kernel.chunked_loss", "LigerFusedLinearDPOLoss")
        dpo = dpo_cls(beta=BETA, compiled=case.device == "cuda", use_ref_model=False)
        # The same S captions as S / 2 pairs: Liger wants every chosen row first, then every rejected row.
        hidden = torch.cat([hidden[0::2], hidden[1::2]])
        labels = torch.cat([labels[0::2], labels[1::2]])

        def forward(h: Tensor, w: Tensor) -> Tensor:
            return dpo(w, h, labels)[0]

    else:
        raise ValueError(f"unknown chain impl {case.impl!r}; expected one of {CHAIN_IMPLS}")
    fn = _grad_step(forward, hidden, weight, None)
    return _finish(case, fn, _nbytes(hidden, weight, labels, ref_scores))


def _prepare_matmul(case: Case, seed: int) -> Prepared:
    hidden, weight, _, _ = _inputs(case, seed)
    logits = hidden.new_empty(case.N, case.V)
    dh, dw = torch.empty_like(hidden), torch.empty_like(weight)
    if case.mode == "fwd":
        fn = lambda: torch.mm(hidden, weight.T, out=logits)
    else:

        def fn() -> Tensor:
            torch.mm(hidden, weight.T, out=logits)
            torch.mm(logits, weight, out=dh)
            return torch.mm(logits.T, hidden, out=dw)

    return _finish(case, fn, _nbytes(hidden, weight, logits, dh, dw))


def _finish(case: Case, step: Callable[[], object], input_bytes: int) -> Prepared:
    sync = _sync(case.device)

    def fn() -> object:
        out = step()
        sync()
        return out

    if case.impl == "compile" or (case.impl == "liger_dpo" and case.device == "cuda"):
        fn()  # torch.compile (Liger's DPO compiles on CUDA) compiles on the first call: setup, never timed
    return Prepared(fn, input_bytes)


def prepare(case: Case, seed: int = 0) -> Prepared:
    """Build the inputs of ``case`` and return its step (compiling first where the case compiles).

    Raises :class:`Unavailable` when the implementation cannot run here.
    """
    if case.device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("CUDA is not available")
    if case.suite == "logprobs":
        return _prepare_logprobs(case, seed)
    if case.suite == "chain":
        return _prepare_chain(case, seed)
    return _prepare_matmul(case, seed)


# --------------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------------
_M_MMAP_THRESHOLD = -3


def _fix_malloc_threshold(nbytes: int = 1 << 16) -> bool:
    """glibc: serve every block of ``nbytes`` or more with its own mmap (and give it back on free).

    By default glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after
    which blocks of that size come from the heap and freed ones stay resident: a later peak could then
    be served from memory already counted in the baseline. Setting the threshold turns that off.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:  # pragma: no cover - not Linux
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the resident-set high-water mark ``VmHWM`` to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _tiny(case: Case) -> Case:
    """The same code path on small shapes (warms libraries and thread pools up)."""
    if case.suite == "chain":
        return dataclasses.replace(case, N=4 * case.K * 4, T=4, D=32, V=257)
    return dataclasses.replace(case, N=64, D=32, V=257)


def _peak_cpu_here(case: Case, threads: int) -> dict[str, object]:
    """Body of the memory probe process (see the module docstring)."""
    mmap_fixed = _fix_malloc_threshold()
    torch.set_num_threads(threads)
    if case.impl != "compile":  # a compiled case warms up at its own shape in prepare()
        prepare(_tiny(case)).fn()
    prepared = prepare(case)
    gc.collect()
    if _reset_hwm():
        base = _status_kib("VmRSS")
        prepared.fn()
        peak = _status_kib("VmHWM")
        method = "VmHWM after clear_refs, minus VmRSS before the step"
    else:  # pragma: no cover - kernels without clear_refs
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        prepared.fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "getrusage max RSS above the max RSS after setup"
    assert base is not None and peak is not None
    return {
        "peak_bytes": max(peak - base, 0) * 1024,
        "baseline_rss_bytes": base * 1024,
        "input_bytes": prepared.input_bytes,
        "method": method + ("; glibc mmap threshold fixed at 64 KiB" if mmap_fixed else ""),
    }


def _peak_cpu_subprocess(case: Case, timeout: float = 900.0) -> dict[str, object]:
    cmd = [sys.executable, os.path.abspath(__file__), "memory", case.to_json(), str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {case.id} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_cuda_here(prepared: Prepared) -> dict[str, object]:
    torch.cuda.synchronize()
    gc.collect()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    prepared.fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {
        "peak_bytes": peak - base,
        "baseline_bytes": base,
        "input_bytes": prepared.input_bytes,
        "method": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated "
        "before the step (the inputs)",
    }


def measure_peak(case: Case, prepared: Prepared | None = None) -> dict[str, object]:
    """Peak extra memory of one step of ``case`` (bytes, with the method used); see the module docstring.

    CUDA: measured in this process on ``prepared`` (which must already have run once). CPU: in a fresh
    process; ``prepared`` is not used (free it first so the two processes do not compete for memory).
    """
    if case.device == "cuda":
        if prepared is None:
            raise ValueError("measure_peak needs the prepared case on CUDA")
        return _peak_cuda_here(prepared)
    return _peak_cpu_subprocess(case)


# --------------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------------
def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    key, value = (s.strip() for s in line.split(":", 1))
                    fields.setdefault(key, value)
    except OSError:  # pragma: no cover - not Linux
        pass
    return fields


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - any metadata failure means "unknown"
        return None


def describe_machine() -> dict[str, object]:
    """CPU model and cores (``/proc/cpuinfo``), GPU name, library versions, threads, load average."""
    info = _cpuinfo()
    cpu = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        cpu += f" (family {info['cpu family']}, model {info['model']})"
    flags = set(info.get("flags", "").split())
    simd = [f for f in ("avx512f", "avx512_bf16", "amx_tile", "avx2") if f in flags]
    out: dict[str, object] = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_simd": simd,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"),
        "rankloss": _version("rankloss"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        out["loadavg"] = os.getloadavg()
    except OSError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = props.name
        out["gpu_memory_bytes"] = props.total_memory
        out["gpu_capability"] = f"{props.major}.{props.minor}"
        out["cuda"] = torch.version.cuda
    return out


def device_tag(device: str) -> str:
    """``cpu``, or the GPU's name as a file-name slug (``nvidia-h100-80gb-hbm3``)."""
    if device == "cuda" and torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return "cpu"


def _main(argv: Sequence[str]) -> int:
    if len(argv) != 3 or argv[0] != "memory":
        print("usage: python benchmarks/cases.py memory '<case json>' THREADS", file=sys.stderr)
        return 2
    case = Case.from_json(argv[1])
    print(json.dumps(_peak_cpu_here(case, int(argv[2]))))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
