"""Chain forward benchmark: the chain tree vs full sequences, with gradient checkpointing on.

    python benchmarks/chain_forward.py                  # CPU table (Qwen2-architecture model, fp32)
    python benchmarks/chain_forward.py --quick          # a tiny model and two shapes: a few seconds (CI)
    python benchmarks/chain_forward.py --device cuda    # the GPU profile (bf16, a larger model)
    python benchmarks/chain_forward.py --profile gpu-vlm --device cuda   # Qwen2.5-VL-shaped, video prompts
    python benchmarks/chain_forward.py --out DIR --reps 5 --threads 2

One training step is the forward and backward of the chain loss (Plackett-Luce with reference scores,
:meth:`rankloss.integrations.ChainForward.loss`) through a model built from a config (random weights),
gradient checkpointing on (``--no-checkpointing`` turns it off), on a batch of ``B`` chains of one prompt
of ``P`` tokens and ``K`` completions of ``L`` tokens each (``S = B K``). Two paths:

* **chain tree** (``share_prefix=True``): the batch packed into one row, each prompt (and its video)
  once, the completions attending to it through the tree attention
  (:mod:`rankloss.integrations.attention`; ``--attention`` picks its path, default ``auto``: SDPA on
  CPU, flex or flash-attn on CUDA): ``B P + S L`` tokens through the LLM, one forward;
* **full sequences** (``share_prefix=False``): each completion behind its own copy of the prompt (and
  of its video): ``S (P + L)`` tokens.

Profiles: ``cpu`` and ``gpu`` use a ``Qwen2ForCausalLM`` (text prompts); ``gpu-vlm`` (and its CPU-sized
``quick-vlm``) a ``Qwen2_5_VLForConditionalGeneration`` whose prompts are a video (``T`` frames of
``H x W`` pixels: ``T/2 * H/28 * W/28`` tokens, ``T/2 * H/14 * W/14`` patches through the vision tower)
and a few words.

Per shape both paths are built on the same model and batch and called once (warm-up; the two losses and
gradients are compared there: ``max |loss difference|`` and the largest gradient difference relative to
the largest gradient), then timed **interleaved** (``tree, full`` in even repetitions, ``full, tree``
in odd ones, so both sample the same machine load); the table gives medians (and minimums in the JSON),
the speed-up ``full / tree`` by medians, and the peak memory of a step above what was allocated before
it (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's peak resident memory, ``VmHWM`` after
resetting it through ``/proc/self/clear_refs``, with freed pages handed back by ``malloc_trim`` first;
measured on each path's first timed step, after its warm-up).

Besides times, each row has a FLOP model of the step (forward + backward = 3x the forward for the
decoder, 4x with checkpointing's recompute; the chain loss's LM head costs ``8 N V D`` on the ``S L``
completion tokens in both paths, since rankloss recomputes the logits in its backward; the vision
tower's linear layers once per video (tree) or once per completion (full)): the linear layers
(projections and MLP), the attention (``4 h d`` per causal query-key pair and layer), the LM head, the
FLOP ratio ``full / tree`` and the same ratio for a Qwen2.5-7B-shaped model (what
li-plus/flash-preference measured on). They say why a small model on CPU gains less than the token
ratio: the LM head and the completions' attention to the prompt cost the same in both paths, and at a
small hidden size they are a large share of the step.

Writes ``<out>/chain-forward-<device>[-<profile>].{json,md}`` (default ``benchmarks/results``;
``<device>`` is ``cpu`` or the GPU's name) atomically after every shape, so a killed run keeps what it
measured, and prints the table. ``benchmarks/gpu_check.py`` runs the ``gpu-vlm`` profile as its last,
optional step.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import itertools
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases import describe_machine, device_tag  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORE_INDEX = -100
PAD = 0
PATHS = ("tree", "full")


# --------------------------------------------------------------------------------------------------
# Models, shapes, profiles
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionSpec:
    """A Qwen2.5-VL vision tower (patches of 14 pixels, 2 frames per temporal patch, 2 x 2 merge)."""

    depth: int
    hidden: int
    heads: int
    intermediate: int
    window: int = 112
    fullatt: tuple[int, ...] = ()

    def describe(self) -> str:
        return f"vision tower {self.depth} blocks of {self.hidden} (MLP {self.intermediate})"


@dataclass(frozen=True)
class ModelSpec:
    """A Qwen2-architecture decoder (``Qwen2ForCausalLM``, untied LM head, no sliding window), or with
    ``vision`` a ``Qwen2_5_VLForConditionalGeneration`` with that decoder as its text model."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    dtype: str = "float32"
    head_dim: int | None = None
    vision: VisionSpec | None = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def describe(self) -> str:
        name = "Qwen2_5_VLForConditionalGeneration" if self.vision else "Qwen2ForCausalLM"
        vision = f", {self.vision.describe()}" if self.vision else ""
        return (
            f"{name}, {self.layers} layers, hidden {self.hidden}, {self.heads} heads / "
            f"{self.kv_heads} KV heads of {self.hd}, MLP {self.intermediate}, vocabulary {self.vocab}"
            f"{vision}, {self.dtype}"
        )

    # token ids of a VLM's media markers: the top of the vocabulary
    @property
    def video_token(self) -> int:
        return self.vocab - 1

    def _text(self, max_positions: int) -> dict:
        return dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.hd,
            max_position_embeddings=max(max_positions, 32),
            use_sliding_window=False,
            tie_word_embeddings=False,
            pad_token_id=PAD,
            bos_token_id=1,
            eos_token_id=2,
        )

    def config(self, max_positions: int):
        import transformers

        if self.vision is None:
            cfg = transformers.Qwen2Config(**self._text(max_positions))
            cfg._attn_implementation = "sdpa"
            return cfg
        half = self.hd // 2
        t = half // 4
        h = (half - t) // 2
        text = {
            **self._text(max_positions),
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [t, h, half - t - h],
            },
        }
        v = self.vision
        vision = dict(
            depth=v.depth,
            hidden_size=v.hidden,
            num_heads=v.heads,
            intermediate_size=v.intermediate,
            out_hidden_size=self.hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=v.window,
            fullatt_block_indexes=list(v.fullatt),
            tokens_per_second=2,
        )
        return transformers.Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            video_token_id=self.vocab - 1,
            image_token_id=self.vocab - 2,
            vision_start_token_id=self.vocab - 3,
            vision_end_token_id=self.vocab - 4,
            tie_word_embeddings=False,
        )


#: The shape of Qwen2.5-7B (what li-plus/flash-preference measured on), for the FLOP model only.
QWEN25_7B = ModelSpec(
    hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064, dtype="bfloat16"
)


@dataclass(frozen=True)
class Shape:
    """``B`` chains of a ``P``-token prompt and ``K`` completions of ``L`` tokens; with ``video = (T, H, W)``
    the prompt starts with a video of ``T`` frames of ``H x W`` pixels (``T/2 * H/28 * W/28`` of its
    ``P`` tokens, between a start and an end marker)."""

    P: int
    L: int
    K: int
    B: int = 1
    video: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.video is not None and self.video_tokens + 3 > self.P:
            raise ValueError(f"P={self.P} leaves no text after the video's {self.video_tokens} tokens")

    @property
    def S(self) -> int:
        return self.B * self.K

    @property
    def video_tokens(self) -> int:
        if self.video is None:
            return 0
        T, H, W = self.video
        return (T // 2) * (H // 28) * (W // 28)

    @property
    def patches(self) -> int:
        """Vision patches of one prompt's video (rows through the vision tower: 2 frames x 14 x 14 pixels
        each)."""
        if self.video is None:
            return 0
        T, H, W = self.video
        return (T // 2) * (H // 14) * (W // 14)

    @property
    def id(self) -> str:
        v = "" if self.video is None else "-V{}x{}x{}".format(*self.video)
        return f"B{self.B}-P{self.P}-L{self.L}-K{self.K}{v}"

    @property
    def tokens_tree(self) -> int:
        return self.B * self.P + self.S * self.L

    @property
    def tokens_full(self) -> int:
        return self.S * (self.P + self.L)


@dataclass(frozen=True)
class Profile:
    name: str
    model: ModelSpec
    shapes: tuple[Shape, ...]  # most important first (a budget skips the tail)
    reps: int
    warmup: int = 1
    description: str = ""


def _grid(Ps: Sequence[int], Ls: Sequence[int], Ks: Sequence[int], B: int) -> tuple[Shape, ...]:
    return tuple(Shape(P, L, K, B) for P, L, K in itertools.product(Ps, Ls, Ks))


def _by_priority(long_prompt: bool) -> tuple[Shape, ...]:
    """The grid, li-plus/flash-preference's K=2 points first, then K=8, then the rest (a budget or a
    killed run loses the tail); the tables sort the rows by shape."""
    first = (Shape(1024, 256, 2), Shape(4096, 256, 2)) + ((Shape(16384, 64, 2),) if long_prompt else ())
    k8 = _grid((1024, 4096), (64, 256), (8,), 1)
    rest = [s for s in _grid((1024, 4096), (64, 256), (2, 4), 1) if s not in first]
    return (*first, *k8, *rest)


def _video_shapes(
    frames: Sequence[int], side: int, L: int, Ks: Sequence[int], text: int
) -> tuple[Shape, ...]:
    out = []
    for T in frames:
        tokens = (T // 2) * (side // 28) ** 2
        out += [Shape(tokens + 2 + text, L, K, 1, (T, side, side)) for K in Ks]
    return tuple(out)


#: Qwen2.5-VL-3B's text layer shape (8 of its 36 layers) and its vision tower's block shape (8 of 32).
_VLM_3B = ModelSpec(
    hidden=2048,
    layers=8,
    heads=16,
    kv_heads=2,
    intermediate=11008,
    vocab=151936,
    dtype="bfloat16",
    vision=VisionSpec(depth=8, hidden=1280, heads=16, intermediate=3420, fullatt=(3, 7)),
)

PROFILES: dict[str, Profile] = {
    "quick": Profile(
        "quick",
        ModelSpec(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, vocab=1000),
        (Shape(96, 16, 2, 2), Shape(96, 16, 4, 1)),
        reps=2,
        description="tiny model, two shapes: a check that the benchmark runs, not a measurement",
    ),
    "quick-vlm": Profile(
        "quick-vlm",
        ModelSpec(
            hidden=64,
            layers=2,
            heads=4,
            kv_heads=2,
            intermediate=176,
            vocab=1000,
            vision=VisionSpec(depth=2, hidden=32, heads=2, intermediate=64, window=56, fullatt=(1,)),
        ),
        _video_shapes((4,), 56, 12, (2, 3), 6),
        reps=2,
        description="tiny Qwen2.5-VL, a 4-frame video prompt: a check that the VLM step runs (the dry run "
        "of gpu_check.py)",
    ),
    "cpu": Profile(
        "cpu",
        ModelSpec(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=1344, vocab=32000),
        _by_priority(long_prompt=False),
        reps=3,
        description="prefix 1024 and 4096, completions 64 and 256, K = 2, 4, 8, one chain per batch",
    ),
    "gpu": Profile(
        "gpu",
        dataclasses.replace(_VLM_3B, vision=None),
        _by_priority(long_prompt=True),
        reps=5,
        description="the CPU grid plus prefix 16384 / completion 64 at K = 2, one chain per batch, bf16 "
        "(Qwen2.5-3B's layer shape, 8 layers)",
    ),
    "gpu-vlm": Profile(
        "gpu-vlm",
        _VLM_3B,
        _video_shapes((16, 64), 448, 256, (2, 8), 30),
        reps=3,
        description="video prompts of 2,048 and 8,192 tokens (16 and 64 frames of 448 x 448), captions of "
        "256 tokens, K = 2 and 8, one chain per batch, bf16 (Qwen2.5-VL-3B's layer shapes: 8 text layers, "
        "8 vision blocks)",
    ),
}


# --------------------------------------------------------------------------------------------------
# FLOP model
# --------------------------------------------------------------------------------------------------
def step_flops(spec: ModelSpec, shape: Shape, tree: bool, checkpointing: bool = True) -> dict[str, int]:
    """FLOPs of one training step (forward + backward), split into linear layers, attention, LM head and
    the vision tower.

    Decoder: 3x the forward (the backward computes two products per forward product), 4x with gradient
    checkpointing (the backward recomputes the forward of every layer first); per token and
    layer the forward's linear layers cost ``2 (D (h + 2 h_kv) d + h d D + 3 D I)``, the attention
    ``4 h d`` per causal query-key pair. LM head: ``8 N V D`` on the ``N = S L`` scored tokens (rankloss
    recomputes the logits in its backward), the same in both paths. Vision tower: its linear layers,
    ``2 (4 D_v^2 + 3 D_v I_v)`` per patch and block plus the merger's ``2 (4 D_v^2 + D_v D)`` per patch,
    3x or 4x like the decoder, once per video (tree) or once per completion (full); its windowed
    attention is left out, as are norms, RoPE, softmax, the loss itself and the embedding.
    """
    D, h, hkv, d, I = spec.hidden, spec.heads, spec.kv_heads, spec.hd, spec.intermediate
    per_token = 2 * (D * (h + 2 * hkv) * d + h * d * D + 3 * D * I)
    P, L, S, B = shape.P, shape.L, shape.S, shape.B
    if tree:
        tokens = B * P + S * L
        pairs = B * P * (P + 1) // 2 + S * (L * P + L * (L + 1) // 2)
        videos = B
    else:
        tokens = S * (P + L)
        pairs = S * (P + L) * (P + L + 1) // 2
        videos = S
    passes = 4 if checkpointing else 3
    linear = passes * spec.layers * per_token * tokens
    attention = passes * spec.layers * 4 * h * d * pairs
    head = 8 * S * L * spec.vocab * D
    vision = 0
    if spec.vision is not None and shape.video is not None:
        Dv, Iv = spec.vision.hidden, spec.vision.intermediate
        per_patch = spec.vision.depth * 2 * (4 * Dv * Dv + 3 * Dv * Iv) + 2 * (4 * Dv * Dv + Dv * D)
        vision = passes * per_patch * shape.patches * videos
    total = linear + attention + head + vision
    return {"linear": linear, "attention": attention, "head": head, "vision": vision, "total": total}


def flop_model(spec: ModelSpec, shape: Shape, checkpointing: bool = True) -> dict[str, float]:
    full, tree = step_flops(spec, shape, False, checkpointing), step_flops(spec, shape, True, checkpointing)
    return {
        "flops_full": full["total"],
        "flops_tree": tree["total"],
        "flop_ratio": full["total"] / tree["total"],
        "attention_share_full": full["attention"] / full["total"],
        "head_share_full": full["head"] / full["total"],
        "vision_share_full": full["vision"] / full["total"],
        "attention_share_tree": tree["attention"] / tree["total"],
        "head_share_tree": tree["head"] / tree["total"],
    }


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------
def build_model(spec: ModelSpec, max_positions: int, device: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = spec.config(max_positions)
    with torch.device(device):
        if spec.vision is None:
            model = transformers.AutoModelForCausalLM.from_config(config)
        else:
            model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
                config, attn_implementation="sdpa"
            )
    return model.to(device=device, dtype=DTYPES[spec.dtype]).train()


def make_batch(spec: ModelSpec, shape: Shape, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A chain batch (the contract of :mod:`rankloss.integrations`): full-length prompts (a video's
    placeholders first when the shape has one, with random pixels), completions of ``L`` tokens, all
    scored, random reference scores."""
    g = torch.Generator().manual_seed(seed)
    top = spec.vocab - (4 if spec.vision else 0)  # text ids below the media markers
    comp = torch.randint(3, top, (shape.S, shape.L), generator=g)
    prompt = torch.randint(3, top, (shape.B, shape.P), generator=g)
    batch = {
        "prompt_input_ids": prompt,
        "prompt_attention_mask": torch.ones(shape.B, shape.P, dtype=torch.long),
        "completion_input_ids": comp,
        "completion_labels": comp.clone(),
        "chain_sizes": torch.full((shape.B,), shape.K),
        "ref_scores": -2.0 * shape.L * torch.rand(shape.S, generator=g),
    }
    if shape.video is not None:
        T, H, W = shape.video
        n = shape.video_tokens
        prompt[:, 0] = spec.vocab - 3  # vision start
        prompt[:, 1 : 1 + n] = spec.video_token
        prompt[:, 1 + n] = spec.vocab - 4  # vision end
        batch["pixel_values_videos"] = torch.randn(shape.B * shape.patches, 3 * 2 * 14 * 14, generator=g).to(
            DTYPES[spec.dtype]
        )
        batch["video_grid_thw"] = torch.tensor([[T // 2, H // 14, W // 14]] * shape.B)
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


class CpuPeak:
    """The process's peak resident memory during a block, above its resident memory at the start (Linux:
    ``VmHWM`` reset through ``/proc/self/clear_refs``; ``malloc_trim`` first hands the pages of freed
    tensors back, so a block that reuses them counts them again). ``bytes`` is ``None`` where this
    cannot be read."""

    def __init__(self) -> None:
        self.bytes: int | None = None
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = self._status("VmHWM") is not None
        except OSError:
            self.ok = False

    @staticmethod
    def _status(key: str) -> int | None:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return None

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if not self.ok:
            yield
            return
        gc.collect()
        self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = self._status("VmRSS") or 0
        yield
        self.bytes = (self._status("VmHWM") or 0) - start


class Peak:
    """The peak memory of a step above what was in use at its start, into ``row.peak_bytes_<path>``: CUDA's
    ``max_memory_allocated``, or on the CPU :class:`CpuPeak` (resident memory)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.cpu = CpuPeak() if device == "cpu" else None

    @contextlib.contextmanager
    def measure(self, name: str, row: Row) -> Iterator[None]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            yield
            torch.cuda.synchronize()
            setattr(row, f"peak_bytes_{name}", torch.cuda.max_memory_allocated() - base)
        elif self.cpu is not None:
            with self.cpu.measure():
                yield
            setattr(row, f"peak_bytes_{name}", self.cpu.bytes)
        else:
            yield


@dataclass
class Row:
    shape: dict
    status: str
    tokens_tree: int
    tokens_full: int
    token_ratio: float
    prefix_token_saving: float
    flops: dict = field(default_factory=dict)
    flops_7b: dict = field(default_factory=dict)
    times_tree: list = field(default_factory=list)
    times_full: list = field(default_factory=list)
    warmup_s: dict = field(default_factory=dict)
    median_tree_s: float | None = None
    median_full_s: float | None = None
    min_tree_s: float | None = None
    min_full_s: float | None = None
    speedup: float | None = None
    speedup_min: float | None = None
    tokens_per_s_tree: float | None = None
    tokens_per_s_full: float | None = None
    loss_tree: float | None = None
    loss_full: float | None = None
    max_abs_loss_diff: float | None = None
    grad_max_rel_diff: float | None = None
    peak_bytes_tree: int | None = None
    peak_bytes_full: int | None = None
    op_shares: dict = field(default_factory=dict)


#: Profiler op names counted as attention (SDPA's CPU and CUDA kernels, forward and backward) and as GEMMs.
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")


def op_time_shares(fn: Callable[[], object]) -> dict[str, float]:
    """Shares of one CPU call's self time in attention ops and in GEMMs (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in events) or 1
    attention = sum(t for k, t in events if any(a in k for a in ATTENTION_OPS))
    matmul = sum(t for k, t in events if k in MATMUL_OPS)
    return {"attention": attention / total, "matmul": matmul / total}


def _step(model: torch.nn.Module, cf, batch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = cf.loss(batch)
    out.loss.backward()
    return out.loss.detach()


def run_shape(
    model: torch.nn.Module,
    spec: ModelSpec,
    shape: Shape,
    *,
    device: str,
    reps: int,
    warmup: int,
    deadline: float = float("inf"),
    seed: int = 0,
    op_shares: bool = False,
    attention: str = "auto",
    checkpointing: bool = True,
    peak: Peak | None = None,
) -> Row:
    """Warm up and compare both paths on ``shape``, then time them interleaved (see the module doc).

    ``op_shares``: one more call of each path under ``torch.profiler`` (untimed): :func:`op_time_shares`.
    """
    from rankloss.integrations import ChainForward

    row = Row(
        shape=asdict(shape),
        status="ok",
        tokens_tree=shape.tokens_tree,
        tokens_full=shape.tokens_full,
        token_ratio=shape.tokens_full / shape.tokens_tree,
        prefix_token_saving=float(shape.K),
        flops=flop_model(spec, shape, checkpointing),
        flops_7b=flop_model(QWEN25_7B, shape, checkpointing) if shape.video is None else {},
    )
    if deadline - time.perf_counter() < 1.0:
        row.status = "skipped: budget spent"
        return row
    paths = {
        "tree": ChainForward(model, share_prefix=True, attention=attention),
        "full": ChainForward(model, share_prefix=False),
    }
    batch = make_batch(spec, shape, device, seed)
    losses, grads = {}, {}
    first = {}
    try:
        for name, cf in paths.items():  # warm-up calls; the first is compared
            _free(device)
            _sync(device)
            t0 = time.perf_counter()
            losses[name] = _step(model, cf, batch).double().item()
            _sync(device)
            first[name] = time.perf_counter() - t0
            grads[name] = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
            for _ in range(warmup - 1):
                _step(model, cf, batch)
        row.warmup_s = first
        row.loss_tree, row.loss_full = losses["tree"], losses["full"]
        row.max_abs_loss_diff = abs(losses["tree"] - losses["full"])
        top = max(g.float().abs().max().item() for g in grads["full"])
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(grads["tree"], grads["full"]))
        row.grad_max_rel_diff = diff / top if top else diff
        del grads
        _free(device)
        if op_shares:
            for name, cf in paths.items():
                row.op_shares[name] = op_time_shares(lambda cf=cf: _step(model, cf, batch))
        left = deadline - time.perf_counter()
        if left < reps * (first["tree"] + first["full"]):
            reps = int(left / (first["tree"] + first["full"]))
        if reps < 1:
            row.status = f"skipped: budget (one call of each path took {sum(first.values()):.2f} s)"
            return row
        times: dict[str, list[float]] = {"tree": [], "full": []}
        peak = peak or Peak(device)
        for r in range(reps):
            for name in PATHS if r % 2 == 0 else PATHS[::-1]:
                gc.collect()
                with peak.measure(name, row) if r == 0 else contextlib.nullcontext():
                    _sync(device)
                    t0 = time.perf_counter()
                    _step(model, paths[name], batch)
                    _sync(device)
                    times[name].append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        row.status = "out of memory"
        model.zero_grad(set_to_none=True)
        _free(device)
        return row
    model.zero_grad(set_to_none=True)
    row.times_tree, row.times_full = times["tree"], times["full"]
    row.median_tree_s, row.median_full_s = statistics.median(times["tree"]), statistics.median(times["full"])
    row.min_tree_s, row.min_full_s = min(times["tree"]), min(times["full"])
    row.speedup = row.median_full_s / row.median_tree_s
    row.speedup_min = row.min_full_s / row.min_tree_s
    # tokens/s: the chain batch's own tokens (B P + S L) per second, in both paths
    row.tokens_per_s_tree = shape.tokens_tree / row.median_tree_s
    row.tokens_per_s_full = shape.tokens_tree / row.median_full_s
    return row


def run_profile(
    profile: Profile,
    *,
    device: str,
    reps: int | None = None,
    warmup: int | None = None,
    deadline: float = float("inf"),
    on_row: Callable[[Row], None] = lambda row: None,
    seed: int = 0,
    op_shares: bool = False,
    checkpointing: bool = True,
    attention: str = "auto",
) -> list[Row]:
    """Every shape of ``profile`` in order (the model is built once); ``on_row`` sees each row."""
    rows: list[Row] = []
    peak = Peak(device)
    if deadline - time.perf_counter() < 1.0:
        model = None
    else:
        max_positions = max(s.P + s.L for s in profile.shapes)
        model = build_model(profile.model, max_positions, device, seed)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for shape in profile.shapes:
        if model is None:
            row = run_shape(
                None, profile.model, shape, device=device, reps=0, warmup=0, deadline=-1.0,
                checkpointing=checkpointing,
            )  # fmt: skip
        else:
            row = run_shape(
                model,
                profile.model,
                shape,
                device=device,
                reps=reps or profile.reps,
                warmup=max(1, warmup or profile.warmup),
                deadline=deadline,
                seed=seed,
                op_shares=op_shares,
                attention=attention,
                checkpointing=checkpointing,
                peak=peak,
            )
        rows.append(row)
        on_row(row)
    del model
    _free(device)
    return rows


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
#: li-plus/flash-preference's K=2 speed-ups of the shared prefix (Qwen2.5-7B, A800): (P, L) -> speed-up.
LI_PLUS_K2 = {(1024, 256): 1.42, (4096, 256): 1.71, (16384, 64): 1.88}
#: The CPU goal of the chain-tree issue (checkpointing on, P=4096, L=256): K -> speed-up.
CPU_GOALS = {2: 1.7, 8: 3.5}


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:,.0f}" if s >= 0.1 else f"{s * 1e3:.3g}"


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def _shape_cells(s: dict) -> str:
    video = "-" if not s.get("video") else "{}x{}x{}".format(*s["video"])
    return f"| {s['B']} | {s['P']} | {video} | {s['L']} | {s['K']} "


def table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| B | P | video T x H x W | L | K | tokens tree | tokens full | token ratio | tree ms | full ms "
        "| speed-up | tokens/s tree / full | FLOP ratio | attention / LM head / vision share (full) "
        "| FLOP ratio at 7B | max abs loss diff | grad max rel diff | peak MiB tree / full |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in sorted(rows, key=lambda r: (r.shape["B"], r.shape["P"], r.shape["L"], r.shape["K"])):
        head = _shape_cells(r.shape) + f"| {r.tokens_tree:,} | {r.tokens_full:,} | {r.token_ratio:.2f}x "
        f, f7 = r.flops, r.flops_7b
        ratio_7b = f"{f7['flop_ratio']:.2f}x" if f7 else "-"
        model = (
            f"| {f['flop_ratio']:.2f}x | {100 * f['attention_share_full']:.0f}% / "
            f"{100 * f['head_share_full']:.0f}% / {100 * f.get('vision_share_full', 0.0):.0f}% "
            f"| {ratio_7b} "
        )
        if r.status != "ok":
            lines.append(head + f"| {r.status} | | | " + model + "| | | |")
            continue
        peak = "-" if r.peak_bytes_full is None else f"{_mib(r.peak_bytes_tree)} / {_mib(r.peak_bytes_full)}"
        rate = f"{r.tokens_per_s_tree:,.0f} / {r.tokens_per_s_full:,.0f}"
        lines.append(
            head
            + f"| {_ms(r.median_tree_s)} | {_ms(r.median_full_s)} | **{r.speedup:.2f}x** | {rate} "
            + model
            + f"| {r.max_abs_loss_diff:.2g} | {r.grad_max_rel_diff:.2g} | {peak} |"
        )
    return lines


def op_share_lines(rows: Sequence[Row]) -> list[str]:
    """Measured shares of a step's time in attention and in GEMMs (rows run with ``--op-shares``)."""
    rows = [r for r in rows if r.op_shares]
    if not rows:
        return []
    lines = [
        "Shares of one step's time by op (torch.profiler, one untimed call per path; GEMMs: the decoder's "
        "linear layers and the LM head)",
        "",
        "| P | L | K | attention tree / full | GEMMs tree / full |",
        "|--:|--:|--:|--:|--:|",
    ]
    for r in sorted(rows, key=lambda r: (r.shape["P"], r.shape["L"], r.shape["K"])):
        tr, fu = r.op_shares["tree"], r.op_shares["full"]
        lines.append(
            f"| {r.shape['P']} | {r.shape['L']} | {r.shape['K']} | {100 * tr['attention']:.0f}% / "
            f"{100 * fu['attention']:.0f}% | {100 * tr['matmul']:.0f}% / {100 * fu['matmul']:.0f}% |"
        )
    return [*lines, ""]


def target_lines(rows: Sequence[Row], device: str = "cpu") -> list[str]:
    ok = [r for r in rows if r.status == "ok" and not r.shape.get("video")]
    out = []
    if device == "cpu":
        for K, goal in CPU_GOALS.items():
            r = next((r for r in ok if (r.shape["P"], r.shape["L"], r.shape["K"]) == (4096, 256, K)), None)
            if r is not None:
                verdict = "met" if r.speedup >= goal else f"missed by {100 * (1 - r.speedup / goal):.0f}%"
                out.append(
                    f"- Goal at P=4096, L=256, K={K} (checkpointing on): {goal:.1f}x; **{r.speedup:.2f}x** "
                    f"here: {verdict}"
                )
        mem = [r for r in rows if r.status == "ok" and r.peak_bytes_tree is not None]
        if mem:
            lower = sum(r.peak_bytes_tree < r.peak_bytes_full for r in mem)
            out.append(f"- Peak memory lower than full sequences in {lower} of {len(mem)} shapes")
    out.append("li-plus/flash-preference's K = 2 speed-ups (Qwen2.5-7B on an A800) against this run's:")
    for (P, L), target in LI_PLUS_K2.items():
        r = next((r for r in ok if (r.shape["P"], r.shape["L"], r.shape["K"]) == (P, L, 2)), None)
        if r is None:
            out.append(f"- P={P}, L={L}: {target:.2f}x there; not measured here")
            continue
        verdict = "met" if r.speedup >= target else "missed"
        out.append(
            f"- P={P}, L={L}: {target:.2f}x there, **{r.speedup:.2f}x** here: {verdict} (tokens "
            f"{r.token_ratio:.2f}x, FLOP model {r.flops['flop_ratio']:.2f}x here and "
            f"{r.flops_7b['flop_ratio']:.2f}x at Qwen2.5-7B's shape)"
        )
    k8 = [r for r in ok if r.shape["K"] == 8]
    if k8:
        out.append(
            "K = 8: the prompt runs once instead of 8 times (prefix tokens 8x fewer, by construction); "
            "speed-ups "
            + ", ".join(f"{r.speedup:.2f}x at P={r.shape['P']}/L={r.shape['L']}" for r in k8)
            + " (token ratios "
            + ", ".join(f"{r.token_ratio:.2f}x" for r in k8)
            + ")"
        )
    return out


class Report:
    """Rows so far, rewritten atomically to ``<stem>.json`` and ``<stem>.md`` after every row."""

    def __init__(self, stem: Path, profile: Profile, device: str, machine: dict, args: dict) -> None:
        self.stem, self.profile, self.device, self.machine, self.args = stem, profile, device, machine, args
        self.rows: list[Row] = []
        self.finished = False
        self.t0 = time.perf_counter()

    def machine_line(self) -> str:
        m = self.machine
        if self.device == "cuda":
            where = f"{m.get('gpu')} (CUDA {m.get('cuda')})"
        else:
            where = f"{m['cpu']}, {m['cpu_cores']} cores ({', '.join(m.get('cpu_simd') or [])})"
        return (
            f"- Machine: **{where}**; torch {m['torch']}, transformers {m.get('transformers')}, rankloss "
            f"{m['rankloss']}, Python {m['python']}; torch threads: {self.args.get('threads')}; load average "
            f"{m.get('loadavg')} at the start, {m.get('loadavg_end')} at the end"
        )

    def markdown(self) -> list[str]:
        p, a = self.profile, self.args
        ckpt = "on (non-reentrant)" if a.get("checkpointing", True) else "off"
        md = [
            f"# Chain forward: chain tree vs full sequences ({p.name}, {self.device})",
            "",
            self.machine_line(),
            f"- Model: {p.model.describe()}, random weights; gradient checkpointing {ckpt}; tree attention "
            f"path: {a.get('attention', 'auto')}",
            f"- Profile `{p.name}`: {p.description}",
            f"- Step: forward + backward of the chain loss (Plackett-Luce with reference scores); median of "
            f"{a['reps']} interleaved repetitions after {a['warmup']} warm-up call(s) per path; speed-up = "
            "full / tree (medians)",
            f"- Command: `{a['command']}`",
            *([f"- Note: {a['note']}"] if a.get("note") else []),
            "",
            *table(self.rows),
            "",
            "tokens: through the LLM (tree `B P + S L`, full `S (P + L)`); tokens/s: the batch's `B P + S L` "
            "tokens per second of a step in each path; FLOP ratio: full / tree in the FLOP model of "
            "`step_flops` (the same at Qwen2.5-7B's shape in a later column); shares: of the full path's "
            "step FLOPs; loss and gradient differences: between the two paths on the first call; peak: "
            "above the step's start (CUDA: allocated; CPU: resident), on the first timed step.",
            "",
            *op_share_lines(self.rows),
            *target_lines(self.rows, self.device),
            "",
        ]
        state = "finished" if self.finished else "INCOMPLETE (still running or killed)"
        md.append(f"Wall time: {time.perf_counter() - self.t0:.0f} s; {state}.")
        return md

    def save(self) -> None:
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": self.machine,
            "profile": {**asdict(self.profile), "name": self.profile.name},
            "model_7b_for_flops": asdict(QWEN25_7B),
            "device": self.device,
            "args": self.args,
            "rows": [asdict(r) for r in self.rows],
            "finished": self.finished,
            "wall_s": time.perf_counter() - self.t0,
        }
        texts = {".json": json.dumps(payload, indent=1), ".md": "\n".join(self.markdown()) + "\n"}
        for suffix, text in texts.items():
            target = self.stem.with_suffix(suffix)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, target)


def describe(device: str) -> dict:
    import transformers

    machine = describe_machine()
    machine["transformers"] = transformers.__version__
    return machine


def main(argv: Sequence[str] | None = None) -> int:
    from rankloss.integrations.attention import ATTENTION_PATHS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, two shapes (a check, seconds)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--profile", choices=sorted(PROFILES), help="default: quick with --quick, else the device's"
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    p.add_argument("--reps", type=int, help="timed repetitions per path (default: the profile's)")
    p.add_argument("--warmup", type=int, help="warm-up calls per path (default 1)")
    p.add_argument("--threads", type=int, help="CPU torch threads (default: all cores)")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="skip the shapes that do not fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shapes", help="only these shapes, e.g. 1024x256x2,4096x256x2 (P x L x K)")
    p.add_argument("--attention", choices=ATTENTION_PATHS, default="auto", help="the chain tree's path")
    p.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off (default on)")
    p.add_argument(
        "--op-shares", action="store_true", help="CPU: also profile one call per path: op time shares"
    )
    p.add_argument("--note", help="a line for the report (e.g. 'shared machine, other jobs running')")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("chain_forward: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    profile = PROFILES[args.profile or ("quick" if args.quick else "gpu" if args.device == "cuda" else "cpu")]
    if args.op_shares and args.device == "cuda":
        p.error("--op-shares reads CPU self times: CPU only")
    if args.shapes:
        wanted = {tuple(int(x) for x in item.split("x")) for item in args.shapes.split(",")}
        picked = tuple(s for s in profile.shapes if (s.P, s.L, s.K) in wanted)
        if not picked:
            p.error(f"--shapes {args.shapes}: none of the profile's shapes")
        profile = dataclasses.replace(profile, shapes=picked)
    if args.device == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    tag = device_tag(args.device) + ("" if profile.name in ("cpu", "gpu") else f"-{profile.name}")
    command = "python benchmarks/chain_forward.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    run_args = {
        "reps": args.reps or profile.reps,
        "warmup": max(1, args.warmup or profile.warmup),
        "threads": torch.get_num_threads(),
        "budget_s": None if args.budget_s == float("inf") else args.budget_s,
        "seed": args.seed,
        "checkpointing": not args.no_checkpointing,
        "attention": args.attention,
        "command": command.strip(),
        "note": args.note,
    }
    report = Report(args.out / f"chain-forward-{tag}", profile, args.device, describe(args.device), run_args)
    print(
        f"chain_forward: {profile.model.describe()}; {len(profile.shapes)} shapes on {args.device}",
        flush=True,
    )

    def on_row(row: Row) -> None:
        report.rows.append(row)
        report.machine["loadavg_end"] = describe_machine().get("loadavg")
        report.save()
        s = row.shape
        what = (
            f"tree {_ms(row.median_tree_s)} ms, full {_ms(row.median_full_s)} ms, {row.speedup:.2f}x "
            f"(tokens {row.token_ratio:.2f}x), peak MiB {_mib(row.peak_bytes_tree)} / "
            f"{_mib(row.peak_bytes_full)}, |loss diff| {row.max_abs_loss_diff:.2g}"
            if row.status == "ok"
            else row.status
        )
        print(f"  B={s['B']} P={s['P']} L={s['L']} K={s['K']}: {what}", flush=True)

    run_profile(
        profile,
        device=args.device,
        reps=args.reps,
        warmup=args.warmup,
        deadline=report.t0 + args.budget_s,
        on_row=on_row,
        seed=args.seed,
        op_shares=args.op_shares,
        checkpointing=not args.no_checkpointing,
        attention=args.attention,
    )
    report.finished = True
    report.save()
    lines = [
        "",
        *table(report.rows),
        "",
        *op_share_lines(report.rows),
        *target_lines(report.rows, args.device),
    ]
    print("\n".join(lines))
    print(f"wrote {report.stem}.md and {report.stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
