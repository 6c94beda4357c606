"""``ChainRankModel`` under FSDP2 and FSDP1 *as accelerate wraps them* (issue #20), two CPU processes over
gloo against one unsharded process on the same global batch.

accelerate turns its FSDP plugin on only on accelerators, so ``accelerate launch`` with an FSDP config
cannot run here; its wrapping code can. Each worker builds accelerate's own
``FullyShardedDataParallelPlugin`` (transformer-based auto-wrap, the classes coming from the model's
``_no_split_modules``, which ``ChainRankModel`` copies) and hands it, on a small stand-in for the
accelerator, to the functions ``Accelerator.prepare`` calls:

* FSDP2: ``plugin.set_auto_wrap_policy`` then ``accelerate.utils.fsdp_utils.fsdp2_prepare_model`` (which
  shards every decoder layer / vision block, then carves the input embedding and ``[final norm,
  get_output_embeddings()]`` into their own units when the wrapped module exposes them, then the root);
* FSDP1: ``FullyShardedDataParallel(wrapper, **the kwargs Accelerator.prepare_model builds)``, with
  ``use_orig_params=True``.

Gradient accumulation follows accelerate's ``no_sync`` (FSDP2: ``set_requires_gradient_sync(False)``;
FSDP1: ``model.no_sync()``) and, in rank mode, the chain trainer's scaling (``reduction="sum"`` times
``num_processes / num_items_in_batch``). Models are float64 so loss and every gradient must match one
process to round-off. All cases run in one launch of two processes (see ``_worker``); each test reads
its case's results from both ranks.

Also pinned: after accelerate's FSDP2 wrapping the LM head (``lm_head.weight`` or the tied embedding)
belongs to the root unit, the ``ChainRankModel`` whose ``forward`` computes the loss, and the wrapper
exposes no ``get_output_embeddings`` (with it, accelerate would move the head into a unit of its own and
the loss would read a shard); a head sharded in its own unit is a clear ``RuntimeError`` ("sharded").
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import time
import traceback
from contextlib import nullcontext

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import (  # noqa: F401
        FSDPModule,
        FullyShardedDataParallel,
        MixedPrecisionPolicy,
        fully_shard,
    )
except ImportError:  # pragma: no cover - older torch
    pytest.skip("FSDP1 and FSDP2 (fully_shard) are not both available", allow_module_level=True)
try:
    from accelerate.utils import FullyShardedDataParallelPlugin  # noqa: F401
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model  # noqa: F401
except ImportError:  # pragma: no cover - older accelerate
    pytest.skip("accelerate without fsdp2_prepare_model", allow_module_level=True)

from rankloss.integrations import ChainRankModel, leave_process_group  # noqa: E402
from rankloss.integrations.forward import LossSpec  # noqa: E402

WORLD = 2
N_CHAINS = 4  # the global batch: rank r holds chains 2r and 2r+1 (one per micro-batch under GA 2)
V = 101
PAD = 0
LAUNCH_TIMEOUT_S = 240
HAS_VLM = all(importlib.util.find_spec(m) is not None for m in ("torchvision", "tokenizers"))

SPECS = {
    "pl": ("rank", {"loss": "plackett_luce", "beta": 0.1, "sft_weight": 0.1}),
    "dpo": ("rank", {"loss": "dpo", "beta": 0.1, "pairs": "all"}),
    "sft": ("sft", {}),
}


def _case(engine, model, loss, ga=1, bf16=None):
    """``bf16``: None (float64 throughout), ``"cast"`` (FSDP2 ``MixedPrecisionPolicy(param_dtype=bfloat16,
    reduce_dtype=float32)``, which casts every unit's floating forward inputs), ``"nocast"`` (the same with
    ``cast_forward_inputs=False``)."""
    name = f"{engine}-{model}-{loss}" + (f"-ga{ga}" if ga > 1 else "") + (f"-bf16-{bf16}" if bf16 else "")
    return name, {"engine": engine, "model": model, "loss": loss, "ga": ga, "bf16": bf16}


CASES = dict(
    [
        # FSDP2 through accelerate's fsdp2_prepare_model
        _case("fsdp2", "text_untied", "pl"),
        _case("fsdp2", "text_tied", "pl", ga=2),
        _case("fsdp2", "text_untied", "dpo"),
        _case("fsdp2", "text_tied", "dpo"),
        _case("fsdp2", "text_tied", "sft"),
        _case("fsdp2", "text_untied", "sft", ga=2),
        _case("fsdp2", "vlm", "pl"),
        _case("fsdp2", "vlm", "dpo", ga=2),
        _case("fsdp2", "vlm", "sft"),
        # FSDP1 as Accelerator.prepare_model builds it (use_orig_params=True)
        _case("fsdp1", "text_untied", "pl"),
        _case("fsdp1", "text_tied", "pl", ga=2),
        _case("fsdp1", "text_tied", "dpo"),
        _case("fsdp1", "text_untied", "sft"),
        _case("fsdp1", "text_tied", "sft"),
        _case("fsdp1", "vlm", "pl"),
        _case("fsdp1", "vlm", "sft", ga=2),
        # FSDP2 mixed precision (bf16 compute, fp32 master weights and gradient reduction)
        _case("fsdp2", "text_untied", "pl", bf16="cast"),
        _case("fsdp2", "text_untied", "pl", bf16="nocast"),
    ]
)
if not HAS_VLM:
    CASES = {k: v for k, v in CASES.items() if v["model"] != "vlm"}

#: A head sharded in its own unit while the loss runs in the root's forward: each must raise a
#: RuntimeError that says "sharded".
ERROR_CASES = {
    # fully_shard(model.lm_head) by hand, before the root
    "fsdp2-explicit-head-unit": "fsdp2_explicit",
    # a wrapper exposing get_input/get_output_embeddings: accelerate carves the head into its tail unit
    "fsdp2-accelerate-wrapper-exposes-head": "fsdp2_exposed",
    # FSDP1: the head its own unit (use_orig_params=True: outside that unit's forward it is a flat shard)
    "fsdp1-head-own-unit": "fsdp1_explicit",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------------
# Models and batches (built identically in the workers and in the one-process reference)


def _text_model(tied: bool, dtype: torch.dtype = torch.float64):
    cfg = transformers.Qwen2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tied,
    )
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # random norms and biases, so that every parameter matters
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
    model = model.to(dtype)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


def _text_chains():
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (5, 3, 6, 4)]
    chains = [
        [
            torch.randint(3, V, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist() + [2]
            for _ in range(3)
        ]
        for _ in range(N_CHAINS)
    ]
    ref = [-20 * torch.rand(3, generator=g, dtype=torch.float64) for _ in range(N_CHAINS)]
    return prompts, chains, ref


def _text_batch(idx):
    prompts, chains, ref = _text_chains()
    prompts, chains = [prompts[i] for i in idx], [chains[i] for i in idx]
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), PAD)
    mask = torch.zeros((B, P), dtype=torch.long)
    for b, p in enumerate(prompts):  # left padded
        ids[b, P - len(p) :] = torch.tensor(p)
        mask[b, P - len(p) :] = 1
    comps = [c for ch in chains for c in ch]
    S, L = len(comps), max(len(c) for c in comps)
    cids = torch.full((S, L), PAD)
    labels = torch.full((S, L), -100)
    for s, c in enumerate(comps):
        cids[s, : len(c)] = torch.tensor(c)
        labels[s, : len(c)] = torch.tensor(c)
    return {
        "prompt_input_ids": ids,
        "prompt_attention_mask": mask,
        "completion_input_ids": cids,
        "completion_labels": labels,
        "chain_sizes": torch.tensor([len(ch) for ch in chains]),
        "ref_scores": torch.cat([ref[i] for i in idx]),
    }


@functools.lru_cache(maxsize=1)
def _vlm_setup():
    """The tiny Qwen2.5-VL of rankloss.train.model and its collated chain batches (as in test_fsdp.py)."""
    from rankloss.train.config import TrainConfig
    from rankloss.train.data import make_collator, synthetic_chains, synthetic_frames
    from rankloss.train.model import build_tiny_processor, tiny_config, train_tokenizer

    cfg = TrainConfig(num_videos=N_CHAINS, heldout=0, frames=4, frame_size=56, max_objects=2)
    chains = synthetic_chains(cfg)
    frames = synthetic_frames(cfg)
    tok = train_tokenizer([c for ch in chains for c in ch.captions], 400)
    processor = build_tiny_processor(tok, 56)
    mcfg = tiny_config(tok, hidden_size=48, num_layers=2, vision_depth=2, vision_hidden_size=32)
    gen = torch.Generator().manual_seed(7)
    ref = {
        c.id: (
            torch.randn(len(c.captions), generator=gen) * 3 - 150,
            torch.ones(len(c.captions), dtype=torch.long),
        )
        for c in chains
    }
    assert len({len(c.captions) for c in chains}) == 1  # equal chains: the mean of rank means is the mean
    return chains, frames, mcfg, make_collator(processor), ref


def _vlm_model(dtype: torch.dtype = torch.float64):
    from rankloss.train.model import build_tiny_model

    return build_tiny_model(_vlm_setup()[2], seed=0).to(dtype)


def _vlm_batch(idx, mode):
    from rankloss.train.data import collate_chains

    chains, frames, _, collator, ref = _vlm_setup()
    return collate_chains(collator, [chains[i] for i in idx], frames, ref_scores=ref, best_only=mode == "sft")


def _model(kind: str, dtype: torch.dtype = torch.float64):
    return _vlm_model(dtype) if kind == "vlm" else _text_model(kind == "text_tied", dtype)


def _batch(kind: str, idx, mode: str):
    return _vlm_batch(idx, mode) if kind == "vlm" else _text_batch(idx)


def _canonical(name: str) -> str:
    """A parameter name of the wrapped model as the unsharded HF model names it."""
    for wrapper_prefix in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper_prefix, "")
    return name[len("model.") :] if name.startswith("model.") else name


# ------------------------------------------------------------------------------------------------------
# accelerate's wrapping, driven on CPU


class _AcceleratorStub:
    """What accelerate's FSDP wrapping reads from an ``Accelerator`` (``fsdp2_prepare_model``: ``state.
    fsdp_plugin``, ``mixed_precision``, ``device``, ``is_main_process``, ``torch_device_mesh``; FSDP1's
    ``prepare_model`` branch: ``device``)."""

    def __init__(self, plugin, mixed_precision: str = "no") -> None:
        self.state = type("State", (), {"fsdp_plugin": plugin})()
        self.mixed_precision = mixed_precision
        self.device = torch.device("cpu")
        self.is_main_process = dist.get_rank() == 0
        self.process_index = dist.get_rank()
        self.num_processes = dist.get_world_size()
        self.torch_device_mesh = None
        self.parallelism_config = None


def _accelerate_fsdp2(wrapper, bf16: str | None = None):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",  # the classes: the wrapper's _no_split_modules
        reshard_after_forward=True,
        cpu_ram_efficient_loading=False,
        mixed_precision_policy=(
            MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=bf16 == "cast"
            )
            if bf16
            else None
        ),
    )
    acc = _AcceleratorStub(plugin, "bf16" if bf16 else "no")
    plugin.set_auto_wrap_policy(wrapper)  # what Accelerator._prepare_fsdp2 does first
    return fsdp2_prepare_model(acc, wrapper)


def _accelerate_fsdp1(wrapper, auto_wrap_policy=None):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import ensure_weights_retied
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=1,
        auto_wrap_policy="transformer_based_wrap",
        use_orig_params=True,
        sync_module_states=False,
        cpu_ram_efficient_loading=False,
    )
    acc = _AcceleratorStub(plugin)
    plugin.set_auto_wrap_policy(wrapper)
    # The kwargs of Accelerator.prepare_model's FSDP1 branch (accelerate 1.16)
    kwargs = {
        "sharding_strategy": plugin.sharding_strategy or plugin.reshard_after_forward,
        "cpu_offload": plugin.cpu_offload,
        "auto_wrap_policy": auto_wrap_policy or plugin.auto_wrap_policy,
        "mixed_precision": plugin.mixed_precision_policy,
        "sync_module_states": plugin.sync_module_states,
        "backward_prefetch": plugin.backward_prefetch,
        "forward_prefetch": plugin.forward_prefetch,
        "use_orig_params": plugin.use_orig_params,
        "param_init_fn": ensure_weights_retied(plugin.param_init_fn, wrapper, acc.device),
        "ignored_modules": plugin.ignored_modules,
        "limit_all_gathers": plugin.limit_all_gathers,
        "device_id": acc.device,
    }
    return FSDP(wrapper, **kwargs)


class _WrapperExposingHead(ChainRankModel):
    """What ``ChainRankModel`` must not be: a wrapper that hands accelerate the model's embeddings."""

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()


def _fsdp2_owners(root, param) -> dict:
    """The FSDP2 units that own ``param``: the nearest ``FSDPModule`` above each module that registers it
    (public API), and, where torch's private state can be read, the unit whose parameter group holds it."""
    units = {n for n, m in root.named_modules() if isinstance(m, FSDPModule)}
    owners = set()
    for mod_name, mod in root.named_modules(remove_duplicate=False):
        for _, p in mod.named_parameters(recurse=False):
            if p is param:
                parts = mod_name.split(".") if mod_name else []
                for k in range(len(parts), -1, -1):
                    prefix = ".".join(parts[:k])
                    if prefix in units:
                        owners.add(prefix)
                        break
    private = None
    try:
        private = set()
        for n, m in root.named_modules():
            if isinstance(m, FSDPModule):
                group = m._get_fsdp_state()._fsdp_param_group
                if group is not None and any(fp.sharded_param is param for fp in group.fsdp_params):
                    private.add(n)
    except Exception:  # private API moved: the public answer stands alone
        private = None
    return {"public": sorted(owners), "private": None if private is None else sorted(private)}


def _spy_head(wrapper) -> list:
    """Record the LM head weight's type and shape each time the chain forward reads it."""
    cf = wrapper.chain_forward
    orig = cf.head
    seen = []

    def head():
        h = orig()
        seen.append((type(h.weight).__name__, tuple(h.weight.shape), str(h.weight.dtype)))
        return h

    cf.head = head
    return seen


# ------------------------------------------------------------------------------------------------------
# The worker: every case, one after the other, in the same two processes


def _run_case(case: dict, rank: int) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    kind, ga, bf16 = case["model"], case["ga"], case["bf16"]
    mode, spec_kwargs = SPECS[case["loss"]]
    spec = LossSpec(**spec_kwargs)
    model = _model(kind, torch.float32 if bf16 else torch.float64)
    wrapper = ChainRankModel(model)
    res: dict = {"exposes_get_output_embeddings": callable(getattr(wrapper, "get_output_embeddings", None))}
    head_param = model.get_output_embeddings().weight
    if case["engine"] == "fsdp2":
        wrapped = _accelerate_fsdp2(wrapper, bf16)
        assert wrapped is wrapper
        res["units"] = sorted(n for n, m in wrapper.named_modules() if isinstance(m, FSDPModule))
        res["root_is_chain_rank_model"] = isinstance(wrapped, FSDPModule) and isinstance(
            wrapped, ChainRankModel
        )
        head_param = model.get_output_embeddings().weight  # fully_shard replaced it by a DTensor
        res["head_owner"] = _fsdp2_owners(wrapper, head_param)
        res["head_is_dtensor_outside_forward"] = type(head_param).__name__ == "DTensor"
        res["head_tied_after_wrap"] = head_param is model.get_input_embeddings().weight
    else:
        wrapped = _accelerate_fsdp1(wrapper)
        res["units"] = sorted(_canonical(n) for n, m in wrapped.named_modules() if isinstance(m, FSDP))
    seen = _spy_head(wrapper)
    inputs = []
    if bf16:  # what reaches ChainRankModel.forward after the root's input casting
        wrapper.register_forward_pre_hook(
            lambda mod, args, kwargs: inputs.append(str(args[0]["ref_scores"].dtype)), with_kwargs=True
        )

    mine = [2 * rank, 2 * rank + 1]
    micro = [mine] if ga == 1 else [[i] for i in mine]
    local = torch.zeros((), dtype=torch.float64)
    for step, idx in enumerate(micro):
        sync = step == len(micro) - 1
        if case["engine"] == "fsdp2":
            wrapped.set_requires_gradient_sync(sync)
            ctx = nullcontext()
        else:
            ctx = nullcontext() if sync else wrapped.no_sync()
        with ctx:
            batch = _batch(kind, idx, mode)
            if mode == "rank" and ga > 1:  # the chain trainer's compute_loss
                out = wrapped(batch, mode=mode, spec=spec, reduction="sum")
                loss = out["loss"] * WORLD / N_CHAINS
            else:
                out = wrapped(batch, mode=mode, spec=spec)
                loss = out["loss"] / ga
            loss.backward()
        local += loss.detach().double()
    total = local.clone()
    dist.all_reduce(total)
    res["local_loss"] = local
    res["loss"] = total / WORLD
    if case["engine"] == "fsdp2":
        res["grads"] = {
            n: p.grad.full_tensor().detach().clone()
            for n, p in model.named_parameters()
            if p.grad is not None
        }
    else:
        with FSDP.summon_full_params(wrapped, with_grads=True, writeback=False):
            res["grads"] = {
                _canonical(n): p.grad.detach().clone()
                for n, p in wrapped.named_parameters()
                if p.grad is not None
            }
    res["head_seen_in_forward"] = seen
    res["ref_scores_dtype_in_forward"] = inputs
    return res


def _run_error_case(how: str, rank: int) -> dict:
    """Wrap with the head in a unit of its own and run a rank-mode forward under ``pytest.raises``."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    model = _text_model(tied=False)
    if how == "fsdp2_explicit":
        wrapper = ChainRankModel(model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model.lm_head)
        fully_shard(wrapper)
        wrapped = wrapper
    elif how == "fsdp2_exposed":
        wrapper = _WrapperExposingHead(model)
        wrapped = _accelerate_fsdp2(wrapper)
    else:
        wrapper = ChainRankModel(model)
        policy = functools.partial(
            lambda_auto_wrap_policy,
            lambda_fn=lambda m: isinstance(m, Qwen2DecoderLayer) or m is model.lm_head,
        )
        wrapped = _accelerate_fsdp1(wrapper, auto_wrap_policy=policy)
    res = {}
    if how.startswith("fsdp2"):
        res["head_owner"] = _fsdp2_owners(wrapper, model.lm_head.weight)
    else:
        res["units"] = sorted(_canonical(n) for n, m in wrapped.named_modules() if isinstance(m, FSDP))
    try:
        with pytest.raises(RuntimeError, match="sharded") as info:
            wrapped(_text_batch([2 * rank, 2 * rank + 1]), mode="rank", spec=LossSpec())
        res["outcome"] = "raised"
        res["message"] = str(info.value)
    except BaseException as exc:  # pytest's Failed, an AssertionError from match=, or another error
        res["outcome"] = "failed"
        res["message"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc()
    return res


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict = {
        "meta": {
            "rank": dist.get_rank(),
            "world_size": dist.get_world_size(),
            "initialized": dist.is_initialized(),
            "backend": dist.get_backend(),
        }
    }
    try:
        assert dist.is_initialized() and dist.get_world_size() == WORLD and dist.get_rank() == rank
        for name, case in CASES.items():
            t0 = time.perf_counter()
            try:
                results[name] = _run_case(case, rank)
            except BaseException:
                results[name] = {"error": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - t0
            dist.barrier()
        for name, how in ERROR_CASES.items():
            results[name] = _run_error_case(how, rank)
            dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Leave together, gloo's workers settled (a rank aborted now and then at exit, its work done;
        # see leave_process_group).
        leave_process_group()
    finally:
        if dist.is_initialized():  # an error above: leave without waiting for the peer
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch of two processes running every case: ``{rank: results}``."""
    out_dir = str(tmp_path_factory.mktemp("fsdp_accelerate"))
    ctx = mp.start_processes(
        _worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"the two FSDP processes did not finish within {LAUNCH_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    out = {}
    for rank in range(WORLD):
        path = os.path.join(out_dir, f"rank{rank}.pt")
        assert os.path.exists(path), f"rank {rank} wrote no results"
        out[rank] = torch.load(path, weights_only=False)
    return out


@functools.cache
def _reference(kind: str, loss: str, dtype: torch.dtype = torch.float64):
    """One unsharded process on the global batch (all chains, one micro-batch, mean over chains)."""
    mode, spec_kwargs = SPECS[loss]
    model = _model(kind, dtype)
    wrapper = ChainRankModel(model)
    out = wrapper(_batch(kind, list(range(N_CHAINS)), mode), mode=mode, spec=LossSpec(**spec_kwargs))
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _case_result(runs, name):
    res = [runs[rank][name] for rank in range(WORLD)]
    for rank, r in enumerate(res):
        assert "error" not in r, f"rank {rank}:\n{r['error']}"
    return res


# ------------------------------------------------------------------------------------------------------


def test_both_processes_ran_in_one_gloo_group(runs):
    assert sorted(runs) == list(range(WORLD))
    for rank, r in runs.items():
        assert r["meta"] == {"rank": rank, "world_size": WORLD, "initialized": True, "backend": "gloo"}
        assert set(CASES) | set(ERROR_CASES) <= set(r)


def _expected_units(engine: str, kind: str) -> set:
    """The FSDP units auto-wrap makes: the wrapper (the root, "") and every decoder layer / vision block
    (FSDP2 names them from the wrapper, FSDP1 as canonicalised from the HF model)."""
    if kind == "vlm":
        layers = {f"model.language_model.layers.{i}" for i in range(2)}
        layers |= {f"model.visual.blocks.{i}" for i in range(2)}
    else:
        layers = {f"model.layers.{i}" for i in range(2)}
    return {""} | ({f"model.{n}" for n in layers} if engine == "fsdp2" else layers)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c["bf16"]])
def test_sharded_through_accelerate_matches_one_process(runs, name):
    case = CASES[name]
    res = _case_result(runs, name)
    # the transformer-based auto-wrap really sharded every decoder layer / vision block, and nothing else
    assert set(res[0]["units"]) == _expected_units(case["engine"], case["model"]), res[0]["units"]
    ref_loss, ref_grads = _reference(case["model"], case["loss"])
    # the two ranks scored different chains, and agree on the all-reduced loss and the full gradients
    assert not torch.equal(res[0]["local_loss"], res[1]["local_loss"])
    for r in res:
        torch.testing.assert_close(r["loss"], ref_loss, rtol=1e-12, atol=1e-12)
        assert r["grads"].keys() == ref_grads.keys()
        for n, g in ref_grads.items():
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-9, atol=1e-12, msg=f"{name}: {n}")
    assert "lm_head.weight" in ref_grads or "model.embed_tokens.weight" in ref_grads
    if case["model"] == "vlm":
        assert any(".visual." in n for n in ref_grads)  # the vision tower trains too
    # the loss read the head gathered (a plain full [V, D] tensor), never a shard
    head = ref_grads.get("lm_head.weight", ref_grads.get("model.embed_tokens.weight"))
    for r in res:
        assert r["head_seen_in_forward"], "the chain forward never read the LM head"
        for typ, shape, _ in r["head_seen_in_forward"]:
            assert typ in ("Tensor", "Parameter") and shape == tuple(head.shape), (typ, shape)


@pytest.mark.parametrize("kind", ["text_untied", "text_tied"] + (["vlm"] if HAS_VLM else []))
def test_fsdp2_accelerate_keeps_head_in_root_unit(runs, kind):
    """The pin: accelerate's FSDP2 wrapping leaves the head parameter (``lm_head.weight``; the tied
    embedding) in the root unit, which is the ChainRankModel whose forward computes the loss."""
    assert not hasattr(ChainRankModel, "get_output_embeddings"), (
        "ChainRankModel must not expose get_output_embeddings: accelerate's fsdp2_prepare_model would shard "
        "the head in its own unit, which the loss (computed in the root's forward) then reads as a shard"
    )
    name = f"fsdp2-{kind}-pl" if kind != "text_tied" else "fsdp2-text_tied-pl-ga2"
    for r in _case_result(runs, name):
        assert r["exposes_get_output_embeddings"] is False
        assert r["root_is_chain_rank_model"]
        assert r["head_is_dtensor_outside_forward"]  # sharded at rest: the root's unit does gather it
        assert r["head_tied_after_wrap"] == (kind == "text_tied")  # the tie survives: one shared param
        assert r["head_owner"]["public"] == [""], r["head_owner"]
        if r["head_owner"]["private"] is not None:
            assert r["head_owner"]["private"] == [""], r["head_owner"]


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_head_sharded_in_its_own_unit_is_a_clear_error(runs, name):
    """The head in a unit of its own is read by the loss as a shard: a RuntimeError saying "sharded"
    (the check lives in ChainForward.head()), on both ranks, checked with ``pytest.raises`` in the worker."""
    res = [runs[rank][name] for rank in range(WORLD)]
    if ERROR_CASES[name].startswith("fsdp2"):
        assert res[0]["head_owner"]["public"] not in ([], [""]), res[0]["head_owner"]  # really its own unit
    else:
        assert "lm_head" in res[0]["units"], res[0]["units"]
    for rank, r in enumerate(res):
        assert r["outcome"] == "raised", f"rank {rank}: {r['message']}\n{r.get('traceback', '')}"


@pytest.mark.parametrize("cast", ["cast", "nocast"])
def test_fsdp2_bf16_mixed_precision(runs, cast):
    """FSDP2 through accelerate with ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``
    (fp32 master weights; ``cast_forward_inputs`` True, the default and what accelerate's
    ``mixed_precision="bf16"`` builds, or False) against one unsharded process of the same weights cast
    to bfloat16: the loss runs, is finite and is close; the gradients are float32, finite, and close to
    the float32 unsharded gradients by relative norm.

    Loose tolerances, because the two runs do not round alike: each rank packs half the chains into its
    row, so every bf16 matmul and norm reduces in another order (bf16 keeps 8 bits of mantissa: ~4e-3
    relative error per op, compounding through the layers), and with ``cast_forward_inputs`` FSDP2's root
    casts every floating input of the forward to bf16, the batch's ``ref_scores`` included.

    With ``cast_forward_inputs`` every FSDP2 unit (each decoder layer too) passes its inputs through
    ``torch.distributed.utils._apply_to_tensors``, which rebuilds dataclasses: each layer gets its own
    copy of the ``chain_tree`` kwarg, so the attention calls are counted on the copies, not on the tree
    ``ChainForward`` checks after the forward."""
    name = f"fsdp2-text_untied-pl-bf16-{cast}"
    res = _case_result(runs, name)
    assert set(res[0]["units"]) == _expected_units("fsdp2", "text_untied"), res[0]["units"]
    ref_loss, _ = _reference("text_untied", "pl", torch.bfloat16)
    _, ref_grads = _reference("text_untied", "pl", torch.float32)
    for r in res:
        assert r["ref_scores_dtype_in_forward"] == ["torch.bfloat16" if cast == "cast" else "torch.float64"]
        assert torch.isfinite(r["loss"])
        # measured: 3.7e-4 relative (cast), 1.5e-5 (nocast)
        torch.testing.assert_close(r["loss"], ref_loss.double(), rtol=5e-3, atol=1e-3)
        assert r["head_seen_in_forward"]
        for typ, _shape, dtype in r["head_seen_in_forward"]:
            assert dtype == "torch.bfloat16" and typ in ("Tensor", "Parameter"), (typ, dtype)
        assert r["grads"].keys() == ref_grads.keys()
        for n, g in ref_grads.items():
            mine = r["grads"][n]
            assert mine.dtype == torch.float32 and torch.isfinite(mine).all(), n
            rel = (mine - g).norm() / g.norm().clamp(min=1e-12)
            assert rel < 0.1, f"{n}: relative error {rel:.3g} against float32"  # measured <= 0.023
