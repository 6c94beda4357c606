"""Ahead-of-time resource report of rankloss's Triton kernels for Hopper (sm_90), with no GPU.

    python benchmarks/aot_report.py                       # markdown report on stdout; exit 1 on a violation
    python benchmarks/aot_report.py --json r.json --md r.md
    python benchmarks/aot_report.py --jobs 2 --fresh      # 2 compile processes, empty Triton cache (timing)

**What is compiled.** The launchers (``rankloss.kernels.*`` and the cuBLAS-chunked path of
``rankloss.ops.linear_token_logprobs``) run unchanged on a simulated H200: fake CUDA tensors
(``torch._subclasses.FakeTensorMode``: shapes, dtypes and strides, no memory) and a device that reports 132
SMs. Every ``kernel[grid](...)`` call is captured instead of launched, and Triton's own launcher code
(``create_function_from_signature`` and ``JITFunction._pack_args`` of ``triton.runtime.jit``, with the
CUDA backend of ``GPUTarget("cuda", 90, 32)``) turns the captured arguments into the signature, the
constexprs and the specialisation attributes the launch would compile with. In Triton 3.8 these are: an
integer argument equal to 1 becomes the constexpr 1 (unit strides), an integer divisible by 16 and a
pointer whose address is divisible by 16 get ``tt.divisibility = 16``, floats and bools are never
specialised; ``num_warps``/``num_stages``/``maxnreg`` come from the launcher's keyword arguments. Pointer
addresses: the CUDA caching allocator returns 512-byte aligned blocks, so a tensor's address is taken as
its storage offset times its element size. Each distinct specialisation is compiled once per run with
``triton.compile`` in ``--jobs`` worker processes, so what does not change the binary costs nothing: the
``N`` of the profile and both ``V`` (multiples of 16 all) only change the grid. Across runs Triton's
on-disk cache holds the binaries and a ``rankloss-aot-report`` folder beside it the facts read from them
(keyed by the binary's hash); ``--fresh`` starts from an empty cache.

**What is read from each binary.** ``ptxas -v`` (registers, spill stores/loads: the log of Triton's own
ptxas run, or when Triton's cache already held the binary, ptxas run again on its PTX with Triton's
flags, and the cubin it writes must be byte-identical to Triton's), ``cuobjdump --dump-resource-usage``
(static shared memory: the 1 KiB per block that sm_90 reserves) and
``cuobjdump --dump-sass`` (both tools ship in the triton wheel): ``HGMMA`` (Hopper tensor-core MMA),
``HMMA``, TMA (``UTMALDG``/``UTMASTG`` in SASS, ``cp.async.bulk.tensor`` in PTX), ``LDGSTS`` (16-byte
``cp.async``), ``MEMBAR``, global atomics and *fenced* atomics (an atomic with a ``MEMBAR`` among the 4
instructions before or after it: what ``tl.atomic_add``'s default acq_rel semantics compile to).
Triton's ``metadata.shared`` is the dynamic shared memory of a block (the launch fails with
``OutOfResources`` above 232,448 B on H100/H200). CTAs per SM follow from 65,536 registers per SM
(allocated per warp in units of 256), 64 warps, 32 CTAs and 228 KiB of shared memory per SM.

**Violations** (exit status 1; ``tests/test_aot_report.py`` runs this in CI): a kernel of the profile
that needs more than 232,448 B of shared memory, spills registers, does a ``tt.dot`` on bf16/fp16 (or
fp32 with TF32) operands without ``HGMMA``, or has fenced atomics. Exit status 3 when the toolchain
(triton's CUDA backend with ``ptxas`` and ``cuobjdump``) is missing.

**The profile** (what a GPU user runs): ``linear_token_logprobs`` in bf16, fp16, fp32 with TF32 allowed
(``DOT_PRECISION="tf32"``) and exact fp32 (``"ieee"``); ``D = 4096``; ``V`` in {32000, 152064}; ``N`` in
{8192, 16384}; with and without bias and soft-cap; the fused Triton path with both backward modes
(atomic, deterministic) and the cuBLAS-chunked path (its epilogues); ``token_logprobs`` on ``[N, V]``
logits in bf16/fp16/fp32; the chain-loss kernel for every loss variant, and the extreme tile shapes.

**The traffic model** (an *estimate*, not a measurement) is described in :func:`launch_traffic`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import weakref
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

# Compile, never interpret: Triton decides at decoration time, so this precedes every kernel import.
os.environ["TRITON_INTERPRET"] = "0"

KERNEL_MODULES = ("linear_token_logprobs", "token_logprobs", "linear_logprobs_chunked", "chain_loss")
IGNORE_INDEX = -100
SOFTCAP = 30.0
EXIT_VIOLATION = 1
EXIT_NO_TOOLCHAIN = 3


# --------------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hopper:
    """An H200 (sm_90, 132 SMs). Resource limits are the architecture's; the rates are what the traffic
    model assumes (see :func:`launch_traffic`): the bf16 matmul rate is the one gpu_check measured on an
    H200 (699-708 TFLOP/s for the three GEMMs of the profile), DRAM bandwidth the H200's specification,
    and the L2 rate of fp32 reduction atomics an assumption (no measurement exists yet)."""

    name: str = "NVIDIA H200 (sm_90), simulated"
    sms: int = 132
    regs_per_sm: int = 65536
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    smem_per_sm: int = 233472  # 228 KiB
    smem_per_block: int = 232448  # 227 KiB: cudaDevAttrMaxSharedMemoryPerBlockOptin
    l2_bytes: int = 50 * 2**20
    total_memory: int = 141 * 10**9
    dram_bytes_per_s: float = 4.8e12
    matmul_flops: float = 700e12  # bf16/fp16 with fp32 accumulation, measured (gpu_check, H200)
    tf32_factor: float = 0.5  # TF32 tensor-core rate relative to bf16 (Hopper: half)
    fp32_simt_flops: float = 47e12  # exact fp32 on CUDA cores: 67 TFLOP/s spec x (700 / 989 measured/spec)
    atomic_bytes_per_s: float = 2.5e12  # relaxed fp32 RED at L2: an assumption


H200 = Hopper()


# --------------------------------------------------------------------------------------------------
# The profile
# --------------------------------------------------------------------------------------------------
LINEAR_DTYPES = {  # profile name -> (torch dtype name, TF32 allowed)
    "bf16": ("bfloat16", False),
    "fp16": ("float16", False),
    "fp32-tf32": ("float32", True),
    "fp32-ieee": ("float32", False),
}
DTYPES = {**LINEAR_DTYPES, "fp32": ("float32", False)}  # "fp32": kernels without tl.dot
LINEAR_PATHS = ("triton", "triton-det", "cublas")
# The fused paths with TMA loads of the weight (rankloss.kernels.linear_token_logprobs.TMA_WEIGHT, off by
# default): compiled at one N and V (the binaries do not depend on them) for every tensor-core dtype and
# flag.
TMA_PATHS = ("triton-tma", "triton-det-tma")
# The cuBLAS path keeping every fp32 logit chunk from the forward for the backward (cache_bytes = N V 4):
# one N and V, tensor-core dtypes, every flag.
CACHE_PATHS = ("cublas-cache",)


@dataclass(frozen=True)
class Case:
    """One call of a rankloss op on the simulated GPU (forward and backward)."""

    path: str  # "triton" (atomic backward), "triton-det", "cublas", "token_logprobs", "chain"
    dtype: str  # a key of DTYPES
    N: int = 0
    V: int = 0
    D: int = 0
    bias: bool = False
    softcap: bool = False
    chain: tuple = ()  # chain-loss variant: (loss, pairs, loss_type, K, number of chains, has_ref)

    @property
    def label(self) -> str:
        if self.path == "chain":
            loss, pairs, loss_type, K, C, has_ref = self.chain
            extra = f" {pairs}/{loss_type}" if loss == "dpo" else ""
            return f"chain {loss}{extra} K={K} C={C}{' ref' if has_ref else ''} {self.dtype}"
        flags = "".join([" bias" if self.bias else "", " softcap" if self.softcap else ""])
        dims = f"N={self.N} V={self.V}" + (f" D={self.D}" if self.D else "")
        return f"{self.path} {self.dtype} {dims}{flags}"


def profile(quick: bool = False) -> list[Case]:
    """The GPU profile (``quick``: N=16384 and V=152064 only; the compiled binaries are the same)."""
    cases = []
    Ns = (16384,) if quick else (8192, 16384)
    Vs = (152064,) if quick else (32000, 152064)
    for path in LINEAR_PATHS:
        for dtype in LINEAR_DTYPES:
            for N in Ns:
                for V in Vs:
                    for bias in (False, True):
                        for softcap in (False, True):
                            cases.append(Case(path, dtype, N, V, 4096, bias, softcap))
    for path in TMA_PATHS + CACHE_PATHS:
        for dtype in ("bf16", "fp16", "fp32-tf32"):  # exact fp32 (no tensor cores) never uses TMA
            for bias in (False, True):
                for softcap in (False, True):
                    cases.append(Case(path, dtype, 16384, 152064, 4096, bias, softcap))
    for dtype in ("bf16", "fp16", "fp32"):
        for N in Ns:
            for V in Vs:
                cases.append(Case("token_logprobs", dtype, N, V))
    # Chains: every loss variant at K = 16 (16384 tokens of 128-token captions: 8 chains of 16), and the
    # other tile shapes [BLOCK_K, BLOCK_C] from [64, 64] to [1, 4096] (K up to MAX_CHAIN_SIZE = 4096).
    variants = [("plackett_luce", "adjacent", "sigmoid"), ("lipo", "adjacent", "sigmoid")]
    variants += [
        ("dpo", p, t)
        for p in ("adjacent", "all", "best_worst", "best_rest")
        for t in ("sigmoid", "hinge", "ipo")
    ]
    for loss, pairs, loss_type in variants:
        cases.append(Case("chain", "fp32", chain=(loss, pairs, loss_type, 16, 8, True)))
    cases.append(Case("chain", "fp32", chain=("plackett_luce", "adjacent", "sigmoid", 16, 8, False)))
    for loss, pairs, K in (
        ("dpo", "adjacent", 64),
        ("plackett_luce", "adjacent", 256),
        ("dpo", "all", 512),
        ("dpo", "best_rest", 1024),
        ("lipo", "adjacent", 4096),
    ):
        cases.append(Case("chain", "fp32", chain=(loss, pairs, "sigmoid", K, 2, True)))
    cases.append(Case("chain", "bf16", chain=("plackett_luce", "adjacent", "sigmoid", 16, 8, True)))
    return cases


# --------------------------------------------------------------------------------------------------
# Simulated launches: fake CUDA tensors, launches and torch ops recorded
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorDesc:
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple
    stride: tuple
    offset: int  # storage offset in elements
    itemsize: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


@dataclass
class Launch:
    """A captured ``kernel[grid](*args, **kwargs)``."""

    module: str
    kernel: str
    grid: tuple
    args: list  # TensorDesc for tensors, plain values otherwise
    kwargs: dict
    fn: object = field(repr=False, default=None)
    binary: str = ""  # key of the compiled specialisation, filled in later


@dataclass
class TorchOp:
    """A torch operator the launcher ran (cuBLAS GEMMs, memsets, casts, reductions)."""

    name: str
    flops: float
    bytes: float
    rate_class: str  # "bf16", "tf32", "fp32" for GEMMs; "" for memory-bound ops


def _desc(t) -> TensorDesc:
    return TensorDesc(
        str(t.dtype).removeprefix("torch."),
        tuple(t.shape),
        tuple(t.stride()),
        t.storage_offset(),
        t.element_size(),
    )


def _torch_op_record(func, args, kwargs, out):
    import torch
    from torch.utils._pytree import tree_flatten

    name = func.__name__
    if getattr(func, "is_view", False) or name.split(".")[0] in _NO_TRAFFIC_OPS:
        return None
    ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
    outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
    if not outs:  # metadata queries (prim.device, sizes) return no tensor
        return None
    base = name.split(".")[0].rstrip("_")
    flops, rate = 0.0, ""
    if base in ("mm", "addmm", "bmm", "baddbmm"):
        a, b = (ins[0], ins[1]) if base in ("mm", "bmm") else (ins[1], ins[2])
        m, k = a.shape[-2], a.shape[-1]
        n = b.shape[-1]
        flops = 2.0 * m * n * k * (a.shape[0] if base == "bmm" else 1)
        if a.dtype == torch.float32:
            rate = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
        else:
            rate = "bf16"
    seen, nbytes = set(), 0
    for t in ins + outs:
        key = (id(t.untyped_storage()), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            nbytes += t.numel() * t.element_size()
    return TorchOp(name, flops, float(nbytes), rate)


# Operators that move no data worth counting (metadata, scalars, allocation without initialisation).
_NO_TRAFFIC_OPS = {
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "detach",
    "alias",
    "_local_scalar_dense",
    "lift_fresh",
}


class LiveMemory:
    """Bytes of the fake CUDA storages alive, counted as the caching allocator counts them (each storage
    once, views free), and the peak since ``mark``. Every tensor an op returns is followed: a storage is
    freed when the last of its tensors is (``weakref.finalize``, which CPython runs at once)."""

    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}
        self.refs: Counter = Counter()
        self.current = 0
        self.peak = 0

    def track(self, t) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.sizes:
            self.sizes[key] = storage.nbytes()
            self.current += self.sizes[key]
            self.peak = max(self.peak, self.current)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= self.sizes.pop(key)

    def mark(self) -> int:
        """Start a new peak; returns the bytes alive now."""
        self.peak = self.current
        return self.current


class Events(list):
    """The Launch and TorchOp records of a simulated run, in order, and its ``memory``."""

    def __init__(self) -> None:
        super().__init__()
        self.memory = LiveMemory()
        self.extra_bytes: int | None = None  # peak beyond the inputs and the returned gradients


@contextlib.contextmanager
def simulated_gpu(hw: Hopper, allow_tf32: bool):
    """Run launchers on fake CUDA tensors; yields the ``Events`` list that receives every Launch and
    TorchOp and follows the fake tensors' memory."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    events = Events()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    events.memory.track(t)
            record = _torch_op_record(func, args, kwargs or {}, out)
            if record is not None:
                events.append(record)
            return out

    patched = []
    for module, name, fn in jit_kernels():

        def capture(*args, grid, warmup, _fn=fn, _module=module, _name=name, **kwargs):
            args = [_desc(a) if isinstance(a, torch.Tensor) else a for a in args]
            grid = tuple(grid(kwargs) if callable(grid) else grid)
            events.append(Launch(_module, _name, grid, args, kwargs, _fn))

        fn.run = capture  # every launch of fn[grid](...) goes through JITFunction.run
        patched.append(fn)
    props = SimpleNamespace(
        name=hw.name,
        multi_processor_count=hw.sms,
        major=9,
        minor=0,
        total_memory=hw.total_memory,
        L2_cache_size=hw.l2_bytes,
    )
    saved = (torch.cuda.get_device_properties, torch.backends.cuda.matmul.allow_tf32)
    torch.cuda.get_device_properties = lambda device=None: props
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        with FakeTensorMode(), Recorder():
            yield events
    finally:
        torch.cuda.get_device_properties, torch.backends.cuda.matmul.allow_tf32 = saved
        for fn in patched:
            del fn.run


def jit_kernels() -> list[tuple[str, str, object]]:
    """``(module, name, JITFunction)`` of every ``@triton.jit`` function of rankloss's kernel modules.

    Raises when they were imported under the interpreter (``TRITON_INTERPRET=1`` before this module):
    then nothing can be captured or compiled."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    out = []
    for module in KERNEL_MODULES:
        mod = importlib.import_module(f"rankloss.kernels.{module}")
        for name, fn in vars(mod).items():
            if isinstance(fn, InterpretedFunction):
                raise RuntimeError(
                    f"rankloss.kernels.{module} was imported with TRITON_INTERPRET=1: run the report in a "
                    "fresh process"
                )
            if isinstance(fn, JITFunction):
                out.append((module, name, fn))
    return out


def run_case(case: Case, hw: Hopper) -> list:
    """The launches and torch ops of one forward + backward of ``case`` on the simulated GPU."""
    import torch

    torch_dtype, tf32 = DTYPES[case.dtype]
    dtype = getattr(torch, torch_dtype)
    with simulated_gpu(hw, allow_tf32=tf32) as events:
        dev = "cuda"
        if case.path in LINEAR_PATHS + TMA_PATHS + CACHE_PATHS:
            N, V, D = case.N, case.V, case.D
            h = torch.empty(N, D, dtype=dtype, device=dev)
            w = torch.empty(V, D, dtype=dtype, device=dev)
            b = torch.empty(V, dtype=dtype, device=dev) if case.bias else None
            labels = torch.empty(N, dtype=torch.int64, device=dev)  # the op passes int64 labels
            grad = torch.empty(N, dtype=torch.float32, device=dev)
            softcap = SOFTCAP if case.softcap else None
            inputs = events.memory.mark()
            if case.path in ("cublas", "cublas-cache"):
                from rankloss.ops import linear_token_logprobs as ops

                cache_bytes = N * V * 4 if case.path == "cublas-cache" else 0
                logp, lse, cache = ops.linear_token_logprobs_cublas_forward(
                    h, w, labels, b, IGNORE_INDEX, 1.0, softcap, 0, cache_bytes=cache_bytes
                )
                grads = ops.linear_token_logprobs_cublas_backward(
                    grad, h, w, labels, b, logp, lse, IGNORE_INDEX, 1.0, softcap, 0,
                    True, True, b is not None, cache=cache,
                )  # fmt: skip
                del cache
            else:
                from rankloss.kernels import linear_token_logprobs as L

                saved, L.TMA_WEIGHT = L.TMA_WEIGHT, case.path in TMA_PATHS
                try:
                    logp, lse = L.linear_token_logprobs_forward(h, w, labels, b, IGNORE_INDEX, 1.0, softcap)
                    grads = L.linear_token_logprobs_backward(
                        grad, h, w, labels, b, logp, lse, IGNORE_INDEX, 1.0, softcap,
                        deterministic=case.path.startswith("triton-det"),
                    )  # fmt: skip
                finally:
                    L.TMA_WEIGHT = saved
            # What the allocator held at its peak beyond the inputs and the returned gradients (the
            # measure gpu_check.py takes with torch.cuda.max_memory_allocated).
            returned = sum(t.numel() * t.element_size() for t in grads if t is not None)
            events.extra_bytes = events.memory.peak - inputs - returned
        elif case.path == "token_logprobs":
            from rankloss.kernels import token_logprobs as T

            logits = torch.empty(case.N, case.V, dtype=dtype, device=dev)
            labels = torch.empty(case.N, dtype=torch.int64, device=dev)
            grad = torch.empty(case.N, dtype=torch.float32, device=dev)
            logp, lse = T.token_logprobs_forward(logits, labels, IGNORE_INDEX, 1.0)
            T.token_logprobs_backward(grad, logits, labels, lse, IGNORE_INDEX, 1.0)
        elif case.path == "chain":
            from rankloss.ops.chain_loss import chain_loss_fwd_triton

            loss, pairs, loss_type, K, C, has_ref = case.chain
            scores = torch.empty(C * K, dtype=dtype, device=dev)
            ref = torch.empty(C * K, dtype=dtype, device=dev) if has_ref else None
            offsets = torch.empty(C + 1, dtype=torch.int64, device=dev)
            chain_loss_fwd_triton(scores, ref, offsets, K, loss, 0.1, K, pairs, loss_type)
        else:
            raise ValueError(case.path)
    return events


# --------------------------------------------------------------------------------------------------
# Specialisation exactly as Triton's launcher computes it
# --------------------------------------------------------------------------------------------------
class _Pointer:
    """What the launcher sees of a tensor argument: its dtype and its address (allocation base 512-byte
    aligned, plus the storage offset)."""

    def __init__(self, desc: TensorDesc):
        import torch

        self.dtype = getattr(torch, desc.dtype)
        self._ptr = 512 * 1024 + desc.offset * desc.itemsize

    def data_ptr(self) -> int:
        return self._ptr


_BACKEND = None
_BINDERS: dict = {}


def target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


def specialise(launch: Launch) -> dict:
    """``signature``, ``constexprs``, ``attrs`` and ``options`` of ``launch``, computed by the same code as
    ``JITFunction.run`` (Triton 3.8) with the sm_90 CUDA backend."""
    global _BACKEND
    from triton import knobs
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature

    if _BACKEND is None:
        _BACKEND = CUDABackend(target())
    fn = launch.fn
    binder = _BINDERS.get(id(fn))
    if binder is None:
        binder = _BINDERS[id(fn)] = create_function_from_signature(fn.signature, fn.params, _BACKEND)
    args = [_Pointer(a) if isinstance(a, TensorDesc) else a for a in launch.args]
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug  # as JITFunction.run does
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(_BACKEND, kwargs, bound, specialization, options)
    return dict(signature=signature, constexprs=constexprs, attrs=attrs, options=dict(options.__dict__))


def spec_key(module: str, kernel: str, spec: dict) -> str:
    def plain(d):
        return sorted((str(k), repr(v)) for k, v in d.items())

    return json.dumps(
        [
            module,
            kernel,
            plain(spec["signature"]),
            plain(spec["constexprs"]),
            plain(spec["attrs"]),
            plain(spec["options"]),
        ]
    )


# --------------------------------------------------------------------------------------------------
# Compile and inspect one specialisation (runs in worker processes)
# --------------------------------------------------------------------------------------------------
def toolchain() -> dict[str, str]:
    """Paths of ptxas and cuobjdump from the triton wheel; raises RuntimeError naming what is missing."""
    try:
        import triton  # noqa: F401
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        raise RuntimeError(f"triton with its CUDA backend is not installed ({e})") from e
    tools = {"ptxas": get_ptxas(90).path, "cuobjdump": knobs.nvidia.cuobjdump.path}
    for tool in tools.values():
        if not (tool and os.path.isfile(tool) and os.access(tool, os.X_OK)):
            raise RuntimeError(f"{tool} is missing")
    return tools


def compile_specialised(fn, signature: dict, constexprs: dict, attrs: dict, options: dict):
    """``triton.compile`` for sm_90, as the launcher's ``_do_compile`` calls it on an H100/H200.

    Returns ``(kernel, ptxas log)``: Triton runs ``ptxas -v`` itself; its log is kept when this call
    compiled the kernel (empty when Triton's on-disk cache already held it)."""
    import io

    import triton
    from triton import knobs

    src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    buf = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            kernel = triton.compile(src, target=target(), options=options)
    finally:
        knobs.nvidia.dump_ptxas_log = saved
    return kernel, buf.getvalue()


_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?\w+\s+)?([A-Z][A-Z0-9_.]*)")
_DOT = re.compile(r"= tt\.dot (.*?):\s*tensor<[0-9x]+x(\w+)>")
_ATOMIC = re.compile(r"^(ATOMG|ATOM|REDG|RED)(\.|$)")  # global atomics and reductions (not REDUX, ATOMS)
FENCE_WINDOW = 4


def sass_opcodes(sass: str) -> list[str]:
    """The opcodes of a ``cuobjdump --dump-sass`` listing, in order (predicates dropped)."""
    return _INSTR.findall(sass)


def fenced_atomics(ops: list[str], window: int = FENCE_WINDOW) -> int:
    """Global atomics with a ``MEMBAR`` among the ``window`` instructions before or after them."""
    n = 0
    for i, op in enumerate(ops):
        if _ATOMIC.match(op):
            near = ops[max(0, i - window) : i] + ops[i + 1 : i + 1 + window]
            n += any(o.startswith("MEMBAR") for o in near)
    return n


def _ptxas_numbers(log: str) -> dict | None:
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    r = re.search(r"Used (\d+) registers", log)
    if not (m and r):
        return None
    stack, stores, loads = (int(x) for x in m.groups())
    return dict(regs=int(r.group(1)), stack=stack, spill_stores=stores, spill_loads=loads)


def _sass_ops(tools: dict[str, str], cubin: Path) -> list[str]:
    """The SASS instructions of a cubin, in order (``cuobjdump --dump-sass``)."""
    sass = subprocess.run(
        [tools["cuobjdump"], "--dump-sass", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    return [
        line.split("*/", 1)[-1].strip()
        for line in sass.splitlines()
        if re.match(r"\s*/\*[0-9a-f]{4}\*/", line)
    ]


def inspect_binary(kernel, tools: dict[str, str], ptxas_log: str = "") -> dict:
    """Resources and instruction facts of a compiled kernel (see the module docstring).

    ``ptxas_log``: Triton's own ``ptxas -v`` output for this binary; without it ptxas runs again on the
    PTX with Triton's flags and the cubin it writes must equal Triton's."""
    from triton import knobs

    asm, md = kernel.asm, kernel.metadata
    out: dict = {"shared": int(md.shared), "num_warps": int(md.num_warps), "num_stages": int(md.num_stages)}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "k.cubin")
        cubin.write_bytes(asm["cubin"])
        numbers = _ptxas_numbers(ptxas_log)
        out["ptxas_log"] = "triton" if numbers else "rerun"
        if numbers is None:
            ptx, again = Path(tmp, "k.ptx"), Path(tmp, "k2.cubin")
            ptx.write_text(asm["ptx"])
            debug = (
                ["-lineinfo", "-suppress-debug-info"]
                if knobs.compilation.disable_line_info
                else ["-lineinfo"]
            )
            fmad = [] if md.enable_fp_fusion else ["--fmad=false"]
            extra = md.ptx_options.split(" ") if md.ptx_options else []
            cmd = [
                tools["ptxas"],
                *debug,
                *fmad,
                "-v",
                "--regAllocOptLevel=2",
                *extra,
                "--gpu-name=sm_90a",
                str(ptx),
                "-o",
                str(again),
            ]
            numbers = _ptxas_numbers(subprocess.run(cmd, capture_output=True, text=True, check=True).stderr)
            # The rerun's numbers describe Triton's binary only if ptxas made the same code. The files
            # may still differ in bytes that are not code (the line-info tables name the PTX file, which
            # Triton wrote elsewhere), so compare the machine code itself: the SASS instructions.
            same = again.read_bytes() == asm["cubin"]
            if not same:
                code = _sass_ops(tools, cubin)
                same = bool(code) and _sass_ops(tools, again) == code
            if not same:
                raise RuntimeError(
                    f"ptxas rerun of {md.name} made different machine code than Triton's: flags differ"
                )
        out.update(numbers)
        usage = subprocess.run(
            [tools["cuobjdump"], "--dump-resource-usage", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        u = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
        if int(u["REG"]) != out["regs"]:
            raise RuntimeError(f"{md.name}: ptxas says {out['regs']} registers, the cubin {u['REG']}")
        out["static_shared"] = int(u.get("SHARED", 0))
        out["local"] = int(u.get("LOCAL", 0))
        sass = subprocess.run(
            [tools["cuobjdump"], "--dump-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    ops = sass_opcodes(sass)
    counts = Counter(ops)

    def count(*prefixes):
        return sum(v for k, v in counts.items() if k.startswith(prefixes))

    out.update(
        instructions=len(ops),
        hgmma=count("HGMMA"),
        hmma=count("HMMA"),
        tma=count("UTMALDG", "UTMASTG", "UBLKCP") + asm["ptx"].count("cp.async.bulk.tensor"),
        ldgsts=count("LDGSTS"),
        membar=count("MEMBAR"),
        membar_kinds=sorted({k for k in counts if k.startswith("MEMBAR")}),
        atomics=sum(v for k, v in counts.items() if _ATOMIC.match(k)),
        fenced_atomics=fenced_atomics(ops),
    )
    dots = _DOT.findall(asm["ttir"])
    out["dots"] = len(dots)
    out["dot_types"] = sorted({t + ("/tf32" if "inputPrecision = tf32" in a else "") for a, t in dots})
    return out


def _sidecar(kernel) -> Path:
    from triton import knobs

    return Path(knobs.cache.dir, "rankloss-aot-report", f"{kernel.hash}.json")


def _compile_job(job: tuple) -> dict:
    module, kernel_name, spec = job
    tools = toolchain()
    fn = getattr(importlib.import_module(f"rankloss.kernels.{module}"), kernel_name)
    t0 = time.perf_counter()
    compiled, log = compile_specialised(
        fn, spec["signature"], spec["constexprs"], spec["attrs"], spec["options"]
    )
    compile_s = time.perf_counter() - t0
    sidecar = _sidecar(compiled)
    if not log and sidecar.is_file():  # compiled and inspected in an earlier run: same binary, same facts
        out = json.loads(sidecar.read_text())
    else:
        out = inspect_binary(compiled, tools, log)
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        sidecar.write_text(json.dumps(out))
    out["compile_s"] = compile_s
    out["inspect_s"] = time.perf_counter() - t0 - compile_s
    return out


# --------------------------------------------------------------------------------------------------
# Occupancy and checks
# --------------------------------------------------------------------------------------------------
def ctas_per_sm(res: dict, hw: Hopper) -> tuple[int, str]:
    """Resident CTAs per SM and the resource that limits them."""
    warps = res["num_warps"]
    per_warp = math.ceil(max(res["regs"], 1) * 32 / hw.reg_alloc_unit) * hw.reg_alloc_unit
    limits = {
        "registers": (hw.regs_per_sm // per_warp) // warps,
        "shared memory": hw.smem_per_sm // max(1, res["shared"] + res["static_shared"]),
        "warps": hw.max_warps_per_sm // warps,
        "CTA slots": hw.max_ctas_per_sm,
    }
    if res["shared"] > hw.smem_per_block:
        return 0, "shared memory (over the per-block limit)"
    which = min(limits, key=lambda k: limits[k])
    return limits[which], which


def violations(res: dict, hw: Hopper) -> list[str]:
    """What makes a binary fail the CI check, as ``"kind: detail"`` strings."""
    out = []
    if res["shared"] > hw.smem_per_block:
        out.append(f"shared memory: {res['shared']:,} B > {hw.smem_per_block:,} B per block (OutOfResources)")
    if res["spill_stores"] or res["spill_loads"]:
        out.append(f"spills: {res['spill_stores']} B stores, {res['spill_loads']} B loads per thread")
    tensor_core_dots = [t for t in res["dot_types"] if t in ("bf16", "f16") or t.endswith("/tf32")]
    if tensor_core_dots and not res["hgmma"]:
        out.append(
            f"no HGMMA: tl.dot on {'/'.join(tensor_core_dots)} operands compiles to no tensor-core MMA"
        )
    if res["fenced_atomics"]:
        out.append(
            f"fenced atomics: {res['fenced_atomics']} of {res['atomics']} atomics have a MEMBAR next to them"
        )
    return out


# --------------------------------------------------------------------------------------------------
# Traffic model (an estimate)
# --------------------------------------------------------------------------------------------------
def launch_traffic(ev, res: dict | None, hw: Hopper) -> dict:
    """FLOPs, DRAM bytes and atomic bytes of one launch, and the time a roofline gives it (an estimate).

    The rules, in the spirit of a roofline (every latency, pipeline bubble and occupancy effect is left
    out, so the estimate is an upper bound on the speed):

    * all ``N`` rows are scored (ignored rows would cost nothing);
    * programs run in waves of ``R = CTAs/SM x 132`` in launch order (grid axis 0 fastest; the atomic
      backward's 1-D grid walks groups of ``GROUP_N`` row blocks);
    * data that the programs of one wave read at the same time (a weight tile all row blocks share) comes
      from DRAM once per wave; a program's re-read of its own data comes from L2 when the wave's
      per-program data fits in half the L2 (25 MiB), else from DRAM; data that later waves read again
      stays in L2 only when all of it fits in half the L2; fp32 accumulators updated by atomics or by
      load/store follow the same rules (read and written back);
    * a launch takes ``max(FLOPs / rate, DRAM bytes / 4.8 TB/s, atomic bytes / 2.5 TB/s)``; the rate is the
      matmul rate for HGMMA in bf16/fp16, half of it for TF32, the fp32 CUDA-core rate without HGMMA;
      torch GEMMs (cuBLAS) run at the matmul rate of their dtype and move their operands once.
    """
    if isinstance(ev, TorchOp):
        rate = {
            "bf16": hw.matmul_flops,
            "tf32": hw.matmul_flops * hw.tf32_factor,
            "fp32": hw.fp32_simt_flops,
        }.get(ev.rate_class)
        return _timed(f"torch {ev.name}", ev.flops, ev.bytes, 0.0, rate, hw)
    model = _KERNEL_MODELS.get(ev.kernel)
    if model is None:
        return _timed(ev.kernel, 0.0, 0.0, 0.0, None, hw)
    R = max(1, ctas_per_sm(res, hw)[0]) * hw.sms
    flops, dram, atomic = model(ev, R, hw)
    if res.get("hgmma"):
        rate = hw.matmul_flops * (
            hw.tf32_factor if any(t.endswith("/tf32") for t in res["dot_types"]) else 1.0
        )
    else:
        rate = hw.fp32_simt_flops
    return _timed(ev.kernel, flops, dram, atomic, rate, hw)


def _timed(name, flops, dram, atomic, rate, hw) -> dict:
    times = {
        "compute": flops / rate if flops and rate else 0.0,
        "dram": dram / hw.dram_bytes_per_s,
        "atomics": atomic / hw.atomic_bytes_per_s,
    }
    bound = max(times, key=lambda k: times[k])
    return dict(
        name=name, flops=flops, dram_bytes=dram, atomic_bytes=atomic, time_s=times[bound], bound=bound
    )


def _arg(ev: Launch, fn_arg: str):
    return (
        ev.args[ev.fn.arg_names.index(fn_arg)]
        if fn_arg in ev.fn.arg_names[: len(ev.args)]
        else ev.kwargs.get(fn_arg)
    )


def _linear_dims(ev: Launch):
    h, w = _arg(ev, "h_ptr"), _arg(ev, "w_ptr")
    N, D = h.shape
    V = w.shape[0]
    k = ev.kwargs
    return N, V, D, k["BLOCK_N"], k["BLOCK_V"], k["BLOCK_D"], h.itemsize


def _reread(total: float, once: float, footprint: float, hw: Hopper) -> float:
    """DRAM bytes of data read ``total`` bytes in all, ``once`` bytes when every re-read hits L2."""
    return once if footprint <= hw.l2_bytes / 2 else total


def _fwd_model(ev, R, hw):
    N, V, D, BN, BV, BD, e = _linear_dims(ev)
    row_blocks = math.ceil(N / BN)
    splits = int(_arg(ev, "SPLIT_V"))  # the 1-D grid runs the splits of a row block fastest
    tiles = math.ceil(V / BV)
    flops = 2.0 * row_blocks * BN * tiles * BV * D
    # A wave covers R / splits row blocks against the whole vocabulary (or, when R < splits, part of one
    # row block's): the programs of one split walk the same weight tiles together, so the weight comes
    # from DRAM once per such group of row blocks.
    groups = math.ceil(row_blocks / (R // splits)) if R >= splits else row_blocks
    w_dram = groups * V * D * e
    h_all = row_blocks * tiles * BN * D * e  # every program re-reads its rows for each tile
    resident_rows = min(row_blocks, max(1, R // splits))
    h_dram = _reread(h_all, N * D * e, resident_rows * BN * D * e, hw)
    return flops, w_dram + h_dram + 3 * splits * N * 4, 0.0


def _bwd_atomic_model(ev, R, hw):
    N, V, D, BN, BV, BD, e = _linear_dims(ev)
    row_blocks = math.ceil(N / BN)
    programs = ev.grid[0]  # one per (row block, vocabulary tile), in groups of GROUP_N row blocks
    dh, dw, db = (ev.kwargs.get(k) for k in ("COMPUTE_DH", "COMPUTE_DW", "COMPUTE_DB"))
    flops = 2.0 * programs * BN * BV * D * (1 + bool(dh) + bool(dw))
    # Grouped order: a group's G row blocks walk every vocabulary tile together (the G programs of one
    # tile run side by side). A weight tile comes from DRAM once per group (its re-read in the D loop
    # hits L2); the group's rows are read by all its programs: from DRAM once when the G blocks fit in
    # half the L2, and so is the program's second read (for d weight).
    G = min(int(ev.kwargs["GROUP_N"]), row_blocks)
    groups = math.ceil(row_blocks / G)
    w_dram = groups * V * D * e
    per_program = BN * D * e
    first = _reread(programs * per_program, N * D * e, G * per_program, hw)
    second = _reread(programs * per_program, 0.0, G * per_program, hw) if dw else 0.0
    atomic = programs * ((BN * D if dh else 0) + (BV * D if dw else 0) + (BV if db else 0)) * 4.0
    # fp32 accumulators in L2: every group adds into every d-weight tile (its G programs while the tile is
    # in L2: read and written back once per group); a group's d-hidden blocks stay in L2 while it walks
    # the vocabulary if they fit in half of it.
    acc = 0.0
    if dw:
        acc += 2.0 * groups * V * D * 4
    if dh:
        acc += _reread(2.0 * programs * BN * D * 4, 2.0 * N * D * 4, G * BN * D * 4, hw)
    return flops, w_dram + first + second + acc, atomic


def _bwd_dhidden_model(ev, R, hw):
    N, V, D, BN, BV, BD, e = _linear_dims(ev)
    row_blocks = ev.grid[0]
    tiles = math.ceil(V / BV)
    visits = row_blocks * tiles
    flops = 2.0 * 2 * visits * BN * BV * D
    resident = min(R, row_blocks)
    w_dram = math.ceil(row_blocks / R) * V * D * e
    h_dram = _reread(visits * BN * D * e, N * D * e, resident * BN * D * e, hw)
    acc = _reread(2.0 * visits * BN * D * 4, 2.0 * N * D * 4, resident * BN * D * 4, hw)
    return flops, w_dram + h_dram + acc, 0.0


def _bwd_dweight_model(ev, R, hw):
    N, V, D, BN, BV, BD, e = _linear_dims(ev)
    tiles = ev.grid[0]
    row_blocks = math.ceil(N / BN)
    visits = row_blocks * tiles
    compute_dw = ev.kwargs.get("COMPUTE_DW", True)
    flops = 2.0 * visits * BN * BV * D * (1 + bool(compute_dw))
    resident = min(R, tiles)
    h_dram = math.ceil(tiles / R) * N * D * e  # a wave walks the same row blocks
    w_dram = _reread(visits * BV * D * e, V * D * e, resident * BV * D * e, hw)
    acc = (
        _reread(2.0 * visits * BV * D * 4, 2.0 * V * D * 4, resident * BV * D * 4, hw) if compute_dw else 0.0
    )
    return flops, w_dram + h_dram + acc, 0.0


def _streams(*streams: tuple[str, str | None]):
    """Model of a memory-bound row kernel: one pass over each ``(tensor argument, constexpr switch)``
    stream whose switch is on (``None``: always), FLOPs ignored. An argument read and then written
    appears twice."""

    def model(ev, R, hw):
        on = [name for name, flag in streams if flag is None or ev.kwargs.get(flag)]
        return 0.0, float(sum(_arg(ev, name).nbytes for name in on)), 0.0

    return model


_KERNEL_MODELS = {
    "_fwd_kernel": _fwd_model,
    "_bwd_atomic_kernel": _bwd_atomic_model,
    "_bwd_dhidden_kernel": _bwd_dhidden_model,
    "_bwd_dweight_kernel": _bwd_dweight_model,
    "_lse_chunk_kernel": _streams(("z_ptr", None), ("b_ptr", "HAS_BIAS")),
    # z read; dA written in the products' dtype, and in fp32 for the bias gradient (WRITE_F32: over z, or
    # into a buffer when z is the forward's cached chunk)
    "_grad_chunk_kernel": _streams(
        ("z_ptr", None), ("b_ptr", "HAS_BIAS"), ("da_ptr", None), ("g32_ptr", "WRITE_F32")
    ),
    "_token_logprobs_fwd_kernel": _streams(("logits_ptr", None)),
    "_token_logprobs_bwd_kernel": _streams(("logits_ptr", None), ("grad_logits_ptr", None)),
}


def path_estimate(case: Case, events: list, binaries: dict, hw: Hopper) -> dict:
    """Estimated time of a forward + backward of ``case`` and its fraction of the matmul rate (6 N V D)."""
    parts = [
        launch_traffic(ev, binaries.get(ev.binary) if isinstance(ev, Launch) else None, hw) for ev in events
    ]
    total = sum(p["time_s"] for p in parts)
    _, tf32 = DTYPES[case.dtype]
    if case.dtype == "fp32-ieee":
        rate = hw.fp32_simt_flops
    else:
        rate = hw.matmul_flops * (hw.tf32_factor if tf32 else 1.0)
    useful = 6.0 * case.N * case.V * case.D
    by_kernel: dict = defaultdict(
        lambda: dict(flops=0.0, dram_bytes=0.0, atomic_bytes=0.0, time_s=0.0, launches=0, bound=Counter())
    )
    for p in parts:
        k = by_kernel[p["name"]]
        for key in ("flops", "dram_bytes", "atomic_bytes", "time_s"):
            k[key] += p[key]
        k["launches"] += 1
        k["bound"][p["bound"]] += p["time_s"]
    kernels = {
        name: dict(v, bound=max(v["bound"], key=v["bound"].get))
        for name, v in by_kernel.items()
        if v["time_s"] > 0
    }
    return dict(
        time_s=total,
        useful_flops=useful,
        matmul_rate=rate,
        fraction=useful / rate / total if total else float("nan"),
        executed_flops=sum(p["flops"] for p in parts),
        dram_bytes=sum(p["dram_bytes"] for p in parts),
        atomic_bytes=sum(p["atomic_bytes"] for p in parts),
        extra_bytes=getattr(events, "extra_bytes", None),
        kernels=kernels,
    )


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
def build_report(cases: list[Case], hw: Hopper, jobs: int, log=print) -> dict:
    """Simulate every case, compile every distinct specialisation once, inspect it, estimate each path."""
    t0 = time.perf_counter()
    tools = toolchain()
    per_case: dict[Case, list] = {}
    specs: dict[str, tuple] = {}
    for case in cases:
        events = run_case(case, hw)
        for ev in events:
            if isinstance(ev, Launch):
                spec = specialise(ev)
                ev.binary = spec_key(ev.module, ev.kernel, spec)
                specs.setdefault(ev.binary, (ev.module, ev.kernel, spec))
        per_case[case] = events
    t_sim = time.perf_counter() - t0
    log(f"simulated {len(cases)} cases in {t_sim:.1f} s: {len(specs)} distinct specialisations to compile")
    keys = sorted(specs, key=lambda k: (specs[k][0], specs[k][1], k))
    t1 = time.perf_counter()
    if jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            results = dict(zip(keys, pool.map(_compile_job, [specs[k] for k in keys])))
    else:
        results = {k: _compile_job(specs[k]) for k in keys}
    t_compile = time.perf_counter() - t1
    log(f"compiled and inspected {len(keys)} binaries in {t_compile:.1f} s ({jobs} processes)")

    binaries = {}
    for key in keys:
        module, kernel, spec = specs[key]
        res = results[key]
        uses = [
            c for c, evs in per_case.items() if any(isinstance(e, Launch) and e.binary == key for e in evs)
        ]
        grids = sorted(
            {e.grid for evs in per_case.values() for e in evs if isinstance(e, Launch) and e.binary == key}
        )
        names = list(spec["signature"])
        ctas, limiter = ctas_per_sm(res, hw)
        binaries[key] = dict(
            res,
            module=module,
            kernel=kernel,
            variant=_variant(module, uses),
            dtypes=sorted({c.dtype for c in uses}, key=list(DTYPES).index),
            constexprs={names[k[0]]: v for k, v in spec["constexprs"].items()},
            divisible_by_16=[names[k[0]] for k, v in spec["attrs"].items() if ["tt.divisibility", 16] in v],
            options={k: spec["options"].get(k) for k in ("num_warps", "num_stages", "maxnreg", "num_ctas")},
            ctas_per_sm=ctas,
            cta_limiter=limiter,
            violations=violations(res, hw),
            cases=[c.label for c in uses],
            grids=[list(g) for g in grids[:4]] + ([f"... {len(grids)} grids"] if len(grids) > 4 else []),
        )
    estimates = {
        case.label: dict(case=dataclasses.asdict(case), **path_estimate(case, events, binaries, hw))
        for case, events in per_case.items()
        if case.path in LINEAR_PATHS + TMA_PATHS + CACHE_PATHS
    }
    import triton

    return dict(
        machine=dataclasses.asdict(hw),
        toolchain=dict(tools, triton=triton.__version__, target="GPUTarget('cuda', 90, 32)"),
        timing=dict(simulate_s=t_sim, compile_s=t_compile, total_s=time.perf_counter() - t0, jobs=jobs),
        cases=[c.label for c in cases],
        binaries=list(binaries.values()),
        estimates=estimates,
    )


def _variant(module: str, uses: list[Case]) -> str:
    """A short name for a specialisation: the dtypes, flags and paths of the cases that launch it."""
    if module == "chain_loss":
        return ", ".join(sorted({c.label.removeprefix("chain ") for c in uses}))
    dtypes = "/".join(sorted({c.dtype for c in uses}, key=list(DTYPES).index))
    flags = []
    for name in ("bias", "softcap"):
        values = {getattr(c, name) for c in uses}
        if values != {True, False}:
            flags.append(name if values == {True} else f"no {name}")
    paths = "/".join(sorted({c.path for c in uses}))
    return f"{dtypes} {', '.join(flags)} ({paths})".replace("  ", " ")


def _table(headers: list[str], rows: list[list], right: set[int] = frozenset()) -> list[str]:
    align = ["--:" if i in right else "---" for i in range(len(headers))]
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(align) + "|",
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]


def summary_rows(report: dict) -> list[dict]:
    """One row per kernel and dtype: the worst case over its binaries (bias/soft-cap, V, N, modes)."""
    groups: dict = defaultdict(list)
    for b in report["binaries"]:
        tma = " (TMA weight)" if b["constexprs"].get("W_TMA") else ""
        for dt in b["dtypes"]:
            groups[(f"{b['module']}.{b['kernel']}{tma}", dt)].append(b)
    rows = []
    for (kernel, dt), bs in sorted(groups.items(), key=lambda kv: (kv[0][0], list(DTYPES).index(kv[0][1]))):

        def some(key, bs=bs):
            have = [bool(b[key]) for b in bs]
            return "yes" if all(have) else ("no" if not any(have) else "some")

        rows.append(
            dict(
                kernel=kernel,
                dtype=dt,
                binaries=len(bs),
                regs=max(b["regs"] for b in bs),
                spill_bytes=max(b["spill_stores"] + b["spill_loads"] for b in bs),
                shared=max(b["shared"] for b in bs),
                warps_stages=", ".join(sorted({f"{b['num_warps']}/{b['num_stages']}" for b in bs})),
                ctas_per_sm=min(b["ctas_per_sm"] for b in bs),
                hgmma=some("hgmma"),
                tma=some("tma"),
                cp_async=some("ldgsts"),
                membar=max(b["membar"] for b in bs),
                atomics=max(b["atomics"] for b in bs),
                fenced_atomics=max(b["fenced_atomics"] for b in bs),
                violations=", ".join(sorted({v.split(":")[0] for b in bs for v in b["violations"]})),
            )
        )
    return rows


def markdown(report: dict) -> str:
    hw, tc, timing = report["machine"], report["toolchain"], report["timing"]
    bad = [b for b in report["binaries"] if b["violations"]]
    lines = [
        "# sm_90 resource report of rankloss's Triton kernels (ahead of time, no GPU)",
        "",
        f"Generated by `python benchmarks/aot_report.py`: triton {tc['triton']}, {tc['target']}, launches "
        f"specialised as on a {hw['name']}; {len(report['cases'])} cases of the profile -> "
        f"{len(report['binaries'])} distinct binaries; {timing['total_s']:.0f} s ({timing['jobs']} compile "
        f"processes). Limits: {hw['smem_per_block']:,} B of shared memory per block; per SM "
        f"{hw['smem_per_sm']:,} B, {hw['regs_per_sm']:,} registers, {hw['max_warps_per_sm']} warps. MEMBAR "
        "counts every memory barrier (the `MEMBAR.ALL.CTA` of HGMMA kernels orders shared-memory stores "
        "before the tensor cores read them); fenced atomics are atomics with a MEMBAR next to them.",
        "",
        "## Per kernel and dtype (worst case over bias/soft-cap, V, N and backward modes)",
        "",
    ]
    heads = ["kernel", "dtype", "regs", "spills (B)", "shared (B)", "warps/stages", "CTAs/SM", "HGMMA", "TMA"]
    heads += ["cp.async", "MEMBAR", "atomics (fenced)", "violations"]
    rows = [
        [r["kernel"], r["dtype"], r["regs"], r["spill_bytes"], f"{r['shared']:,}", r["warps_stages"]]
        + [r["ctas_per_sm"], r["hgmma"], r["tma"], r["cp_async"], r["membar"]]
        + [f"{r['atomics']} ({r['fenced_atomics']})", r["violations"] or "-"]
        for r in summary_rows(report)
    ]
    lines += _table(heads, rows, right={2, 3, 4, 5, 6, 10, 11})
    lines += ["", f"## Violations: {len(bad)}", ""]
    lines += [f"- {b['module']}.{b['kernel']} [{b['variant']}]: {'; '.join(b['violations'])}" for b in bad]
    if report["estimates"]:
        lines += estimate_markdown(report)
    lines += ["", "## Every binary", ""]
    heads = ["kernel", "variant", "regs", "spill st/ld (B)", "shared (B)", "warps/stages", "CTAs/SM (limit)"]
    heads += ["HGMMA", "TMA", "LDGSTS", "MEMBAR", "atomics (fenced)", "dots", "compile s"]
    rows = [
        [f"{b['module']}.{b['kernel']}", b["variant"], b["regs"], f"{b['spill_stores']}/{b['spill_loads']}"]
        + [
            f"{b['shared']:,}",
            f"{b['num_warps']}/{b['num_stages']}",
            f"{b['ctas_per_sm']} ({b['cta_limiter']})",
        ]
        + [b["hgmma"], b["tma"], b["ldgsts"], b["membar"], f"{b['atomics']} ({b['fenced_atomics']})"]
        + [", ".join(b["dot_types"]) or "-", f"{b['compile_s']:.1f}"]
        for b in report["binaries"]
    ]
    lines += _table(heads, rows, right={2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13})
    return "\n".join(lines) + "\n"


def estimate_markdown(report: dict, N: int | None = None, V: int | None = None) -> list[str]:
    """The estimated fraction of the matmul rate per path and dtype (no bias, no soft-cap)."""
    hw = report["machine"]
    lines = [
        "",
        "## Estimated fraction of the matmul rate (a model, not a measurement)",
        "",
        "Forward + backward of `linear_token_logprobs`, D=4096, no bias or soft-cap. Useful work: 6 N V D "
        f"FLOPs at the dtype's matmul rate (bf16/fp16 {hw['matmul_flops'] / 1e12:.0f} TFLOP/s, measured on "
        f"an H200; TF32 half of it; exact fp32 {hw['fp32_simt_flops'] / 1e12:.0f} TFLOP/s on CUDA cores). "
        f"Each launch takes max(FLOPs / rate, DRAM bytes / {hw['dram_bytes_per_s'] / 1e12:.1f} TB/s, "
        f"atomic bytes / {hw['atomic_bytes_per_s'] / 1e12:.1f} TB/s, an assumed L2 reduction rate); "
        "latencies, occupancy "
        "and pipelining are left out, so every figure is an upper bound (the rules: "
        "`launch_traffic` in benchmarks/aot_report.py). Extra MiB: the peak of the simulated run's fake "
        "CUDA storages beyond the inputs and the returned gradients (what `torch.cuda.max_memory_allocated` "
        "counts; allocator rounding aside).",
        "",
    ]
    heads = ["path", "dtype", "N", "V", "est. ms", "est. fraction", "executed TFLOP", "DRAM GB", "atomic GB"]
    heads += ["extra MiB"]
    rows = []
    for e in report["estimates"].values():
        c = e["case"]
        if c["bias"] or c["softcap"] or (N and c["N"] != N) or (V and c["V"] != V):
            continue
        worst_name, worst = max(e["kernels"].items(), key=lambda kv: kv[1]["time_s"])
        rows.append(
            [c["path"], c["dtype"], c["N"], c["V"], f"{e['time_s'] * 1e3:,.0f}", f"{e['fraction']:.0%}"]
            + [
                f"{e['executed_flops'] / 1e12:.0f}",
                f"{e['dram_bytes'] / 1e9:,.0f}",
                f"{e['atomic_bytes'] / 1e9:,.0f}",
                f"{e['extra_bytes'] / 2**20:,.0f}" if e.get("extra_bytes") is not None else "-",
            ]
            + [f"{worst_name}: {worst['time_s'] * 1e3:,.0f} ms, {worst['bound']}-bound"]
        )
    return lines + _table(heads + ["slowest kernel"], rows, right={2, 3, 4, 5, 6, 7, 8, 9})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the whole report as JSON here")
    parser.add_argument("--md", type=Path, help="write the markdown report here (it is always printed)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--fresh", action="store_true", help="compile in an empty Triton cache (for timing)")
    parser.add_argument("--quick", action="store_true", help="N=16384 and V=152064 only (same binaries)")
    args = parser.parse_args(argv)
    try:
        toolchain()
    except RuntimeError as e:
        print(f"aot_report: no sm_90 toolchain: {e}", file=sys.stderr)
        return EXIT_NO_TOOLCHAIN
    with contextlib.ExitStack() as stack:
        if args.fresh:
            os.environ["TRITON_CACHE_DIR"] = stack.enter_context(tempfile.TemporaryDirectory())
        report = build_report(profile(args.quick), H200, args.jobs, log=lambda s: print(s, file=sys.stderr))
    text = markdown(report)
    print(text)
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return EXIT_VIOLATION if any(b["violations"] for b in report["binaries"]) else 0


if __name__ == "__main__":
    sys.exit(main())
