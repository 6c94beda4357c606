"""The chain forward under DeepSpeed ZeRO-3, two CPU processes over gloo (``DS_ACCELERATOR=cpu``), against
one unsharded process on the same global batch: ``ChainRankModel`` is the engine's module, so every loss is
computed inside its forward, where ZeRO-3 has gathered the LM head (registered as the wrapper's external
parameter, read after the backbone).

Every parameter really is partitioned (``stage3_param_persistence_threshold: 0``; DeepSpeed's default leaves
tiny test weights whole), the head included: outside the forward its weight is empty, and reading it there
is a clear error. Cases: Plackett-Luce, DPO and SFT on a tiny text model with a tied head (gradient
accumulation 2) and with an untied head, PL and SFT on the tiny Qwen2.5-VL, and an empty micro-batch on one
process (tied text model on the first step, the VLM after a non-empty one), which must run a dummy forward
so the other process's gathers do not wait forever: a hang fails the test at a deadline."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")
pytest.importorskip("tokenizers")
pytest.importorskip("torchvision")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2
DEADLINE_S = 240  # a hang (e.g. one process skipping a forward's gathers) fails the test here
V = 97
PL = {"loss": "plackett_luce", "beta": 0.5, "sft_weight": 0.1}
DPO = {"loss": "dpo", "beta": 0.5, "pairs": "all"}

#: per engine: (model, gradient accumulation, steps); a step is (mode, spec, which micro-batches are
#: empty: a set of (rank, micro) pairs)
PLANS = {
    # SFT first: the engine's first forward reads the tied head, which the embedding's hook re-partitions
    "text-tied": (
        "tied",
        2,
        [
            ("sft", {}, set()),
            ("rank", PL, set()),
            ("rank", DPO, set()),
            ("rank", PL, {(1, 0)}),
            ("sft", {}, {(0, 1)}),
        ],
    ),
    # an empty micro-batch in the very first forward (the text dummy batch)
    "text-untied": (
        "untied",
        1,
        [("rank", PL, {(1, 0)}), ("rank", PL, set()), ("rank", DPO, set()), ("sft", {}, set())],
    ),
    # an empty micro-batch after a non-empty one (the vision tower runs on the remembered prompt and media)
    "vlm": ("vlm", 1, [("rank", PL, set()), ("sft", {}, set()), ("rank", PL, {(1, 0)})]),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------------
# models and batches (built identically in every process)


def _fp32_exact(model):
    """float64 weights that float32 holds exactly: ZeRO-3's float32 master copy then changes nothing."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.float().double())
    return model


def _text_model(tied: bool):
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tied,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(cfg).double()
    with torch.no_grad():  # random norms and biases, so every parameter matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return _fp32_exact(model)


def _text_batches(n_micro: int, seed: int):
    """``[rank][micro]`` batches: 2 chains each (3 and 4 completions), prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(WORLD):
        row = []
        for _ in range(n_micro):
            prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (5, 3)]
            chains = [
                [
                    torch.randint(3, V, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
                    + [2]
                    for _ in range(k)
                ]
                for k in (3, 4)
            ]
            row.append(_pad_batch(prompts, chains, g))
        out.append(row)
    return out


def _pad_batch(prompts, chains, g):
    B, P = len(prompts), max(map(len, prompts))
    ids = torch.zeros((B, P), dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.tensor(p)
        mask[b, P - len(p) :] = 1
    comps = [c for ch in chains for c in ch]
    S, L = len(comps), max(map(len, comps))
    cids = torch.zeros((S, L), dtype=torch.long)
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
        "ref_scores": -20 * torch.rand(S, generator=g, dtype=torch.float64),
    }


def _vlm_setup():
    """The tiny Qwen2.5-VL of tests/test_fsdp.py (untied head) and ``make(rank, micro, mode)``: 2 chains."""
    from rankloss.train.config import TrainConfig
    from rankloss.train.data import collate_chains, make_collator, synthetic_chains, synthetic_frames
    from rankloss.train.model import build_tiny_model, build_tiny_processor, tiny_config, train_tokenizer

    cfg = TrainConfig(num_videos=2 * WORLD, heldout=0, frames=4, frame_size=56, max_objects=2)
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
    collator = make_collator(processor)

    def make(rank, micro, mode):
        mine = chains[rank * 2 : rank * 2 + 2]
        return collate_chains(collator, mine, frames, ref_scores=ref, best_only=mode == "sft")

    return _fp32_exact(build_tiny_model(mcfg, seed=0).double()), make


def _plan_batches(plan_name):
    """``model, [step][rank][micro] batch or None (empty)``."""
    kind, ga, steps = PLANS[plan_name]
    if kind == "vlm":
        model, make = _vlm_setup()
    else:
        model = _text_model(kind == "tied")
    out = []
    for i, (mode, _, empty) in enumerate(steps):
        if kind == "vlm":
            grid = [[make(r, m, mode) for m in range(ga)] for r in range(WORLD)]
        else:
            grid = _text_batches(ga, seed=100 + i)
        out.append([[None if (r, m) in empty else grid[r][m] for m in range(ga)] for r in range(WORLD)])
    return model, out


def _last_batch(batches, rank):
    return next(b for step in reversed(batches) for b in reversed(step[rank]) if b is not None)


def _empty_like(batch):
    keys = ("prompt_input_ids", "prompt_attention_mask", "completion_input_ids", "completion_labels")
    out = {k: batch[k][:0] for k in keys}
    out["chain_sizes"] = batch["chain_sizes"][:0]
    out["ref_scores"] = batch["ref_scores"][:0]
    return out


# ------------------------------------------------------------------------------------------------------
# the two ZeRO-3 processes


def _ds_config(ga: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": ga,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def _counter(calls: dict, key: str):
    def hook(*_):
        calls[key] += 1

    return hook


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    import logging

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import deepspeed
        from deepspeed.utils import safe_get_full_grad

        from rankloss.integrations import ChainRankModel, leave_process_group
        from rankloss.integrations.forward import LossSpec

        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        deepspeed.init_distributed(dist_backend="gloo")
        result = {"world": dist.get_world_size(), "rank": dist.get_rank(), "plans": {}}
        for plan_name, (_kind, ga, steps) in PLANS.items():
            model, batches = _plan_batches(plan_name)
            wrapper = ChainRankModel(model)
            opt = torch.optim.SGD(wrapper.parameters(), lr=0.0)
            engine, *_ = deepspeed.initialize(model=wrapper, optimizer=opt, config=_ds_config(ga))
            head = model.lm_head.weight
            facts = {
                "partitioned": bool(head.ds_tensor.numel() < head.ds_numel),
                "empty_outside": head.numel() == 0,
                "all_partitioned": all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters()),
            }
            try:
                wrapper.chain_forward.head()
                facts["outside_error"] = None
            except RuntimeError as e:
                facts["outside_error"] = str(e)
            calls = {"embed": 0, "vision": 0}  # what really ran in each micro-batch (an empty one too)
            model.get_input_embeddings().register_forward_pre_hook(_counter(calls, "embed"))
            vision = getattr(model.model, "visual", None)
            if vision is not None:
                vision.register_forward_pre_hook(_counter(calls, "vision"))
            log = []
            for step, (mode, spec_kwargs, _) in enumerate(steps):
                spec = LossSpec(**spec_kwargs)
                losses, ran = [], []
                for micro in range(ga):
                    calls.update(embed=0, vision=0)
                    batch = batches[step][rank][micro]
                    if batch is None:  # this process's micro-batch is empty; the other's is not
                        other = next(b for row in batches[step] for b in row if b is not None)
                        batch = _empty_like(other)
                    out = engine(batch, mode=mode, spec=spec)
                    engine.backward(out["loss"])
                    losses.append(out["loss"].detach().double().item())
                    ran.append(dict(calls))
                    if micro == ga - 1:  # the accumulation boundary: gradients reduced, not yet stepped
                        grads = {n: safe_get_full_grad(p) for n, p in model.named_parameters()}
                    engine.step()
                log.append(
                    {
                        "losses": losses,
                        "ran": ran,
                        "grads": {n: None if g is None else g.clone() for n, g in grads.items()},
                        "registered": wrapper._zero3_registered
                        and sorted(id(p) for p in getattr(wrapper, "_external_params", {}).values())
                        == sorted(id(p) for p in wrapper.chain_forward.zero3_head_params()),
                    }
                )
            # the no-gradient modes: scores, and greedy tokens (every process runs all steps)
            last = _last_batch(batches, rank)
            scores = engine(last, mode="score")["scores"]
            tokens = engine(last, mode="generate", max_new_tokens=4, stop_when_done=False)["tokens"]
            result["plans"][plan_name] = {"facts": facts, "steps": log, "scores": scores, "tokens": tokens}
            engine.destroy()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Leave together, gloo's workers settled (a rank aborted now and then at exit, its work done;
        # see leave_process_group).
        leave_process_group()
    finally:
        if dist.is_initialized():  # an error above: leave without waiting for the peer
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def zero3_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("zero3"))
    ctx = mp.start_processes(
        _worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the ZeRO-3 processes did not finish in {DEADLINE_S} s (a hang in a collective?)"
                )
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(10)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


# ------------------------------------------------------------------------------------------------------
# the one-process reference


def _reference(plan_name):
    """Per step: the loss and gradients DeepSpeed's averaging gives, ``mean over (rank, micro)`` of each
    micro-batch's loss (0 for an empty one), computed in one unsharded float64 process."""
    from rankloss.integrations import ChainRankModel
    from rankloss.integrations.forward import LossSpec

    kind, ga, steps = PLANS[plan_name]
    model, batches = _plan_batches(plan_name)
    wrapper = ChainRankModel(model)
    out = []
    for step, (mode, spec_kwargs, _) in enumerate(steps):
        model.zero_grad(set_to_none=True)
        spec = LossSpec(**spec_kwargs)
        per = []
        for r in range(WORLD):
            for m in range(ga):
                b = batches[step][r][m]
                per.append(wrapper(b, mode=mode, spec=spec)["loss"] if b is not None else None)
        total = sum(x for x in per if x is not None) / (WORLD * ga)
        total.backward()
        if kind != "vlm" and all(x is not None for x in per):
            # equal micro-batches: the mean of their means is the loss of the whole global batch at once
            whole = _concat([b for row in batches[step] for b in row])
            torch.testing.assert_close(wrapper(whole, mode=mode, spec=spec)["loss"].detach(), total.detach())
        out.append(
            {
                "losses": [
                    [None if x is None else x.item() for x in per[r * ga : (r + 1) * ga]]
                    for r in range(WORLD)
                ],
                "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            }
        )
    extra = []
    for r in range(WORLD):
        last = _last_batch(batches, r)
        extra.append(
            {
                "scores": wrapper(last, mode="score")["scores"],
                "tokens": wrapper(last, mode="generate", max_new_tokens=4, stop_when_done=False)["tokens"],
            }
        )
    return out, extra


def _concat(batches):
    """One text chain batch of several (prompts left-padded, completions right-padded to the longest)."""
    P = max(b["prompt_input_ids"].shape[1] for b in batches)
    L = max(b["completion_input_ids"].shape[1] for b in batches)
    out = {}
    for k in batches[0]:
        vals = [b[k] for b in batches]
        if k in ("prompt_input_ids", "prompt_attention_mask"):
            vals = [torch.nn.functional.pad(v, (P - v.shape[1], 0)) for v in vals]
        elif k == "completion_input_ids":
            vals = [torch.nn.functional.pad(v, (0, L - v.shape[1])) for v in vals]
        elif k == "completion_labels":
            vals = [torch.nn.functional.pad(v, (0, L - v.shape[1]), value=-100) for v in vals]
        out[k] = torch.cat(vals)
    return out


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_zero3_matches_one_process(zero3_results, plan_name):
    kind, ga, steps = PLANS[plan_name]
    assert [r["world"] for r in zero3_results] == [WORLD] * WORLD  # both processes really ran
    assert sorted(r["rank"] for r in zero3_results) == list(range(WORLD))
    results = [r["plans"][plan_name] for r in zero3_results]
    for res in results:
        facts = res["facts"]
        assert facts["partitioned"] and facts["all_partitioned"], facts
        assert facts["empty_outside"], "the head weight outside the forward should be a ZeRO-3 partition"
        assert facts["outside_error"] and "ZeRO-3" in facts["outside_error"], facts["outside_error"]
        assert "ChainRankModel.forward" in facts["outside_error"]
    ref, extra = _reference(plan_name)
    for r, res in enumerate(results):  # the same scores and greedy tokens as one process
        torch.testing.assert_close(res["scores"], extra[r]["scores"], rtol=1e-12, atol=1e-12)
        assert torch.equal(res["tokens"], extra[r]["tokens"]), (r, res["tokens"], extra[r]["tokens"])
    for step, want in enumerate(ref):
        mode, _, empty = steps[step]
        for r, res in enumerate(results):
            got = res["steps"][step]
            assert got["registered"], "the head was not registered as the wrapper's external parameter"
            for m, (g, w) in enumerate(zip(got["losses"], want["losses"][r], strict=True)):
                # every micro-batch ran the backbone (and the vision tower), an empty one a dummy forward
                ran = got["ran"][m]
                assert ran["embed"] >= 1 and (kind != "vlm" or ran["vision"] >= 1), (step, r, m, ran)
                if w is None:
                    assert g == 0.0, (step, r, m)  # an empty micro-batch: exactly zero
                else:
                    assert abs(g - w) <= 1e-12 * max(1.0, abs(w)), (plan_name, step, r, m, g, w)
            grads = got["grads"]
            assert {n for n, g in grads.items() if g is not None} == set(want["grads"]), (step, r)
            for name, w in want["grads"].items():
                torch.testing.assert_close(
                    grads[name].double(),
                    w,
                    rtol=2e-6,
                    atol=1e-7,
                    msg=f"{plan_name} step {step} ({mode}) {name}",
                )
