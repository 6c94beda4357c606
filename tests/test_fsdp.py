"""The trainer's model under FSDP2 sharding (``torch.distributed.fsdp.fully_shard``), two CPU processes
over gloo: every loss is computed inside ``ChainRankModel.forward`` (the chain forward the trainer and
``ChainRankTrainer`` share), where the root unit (which holds ``lm_head``) has its parameters gathered,
so the sharded model gives the gradients of one unsharded process on the same global batch, and greedy
generation gives the same tokens.

accelerate's FSDP needs GPUs, so this drives ``fully_shard`` directly, with the wrapping the trainer
documents (every decoder layer and vision block its own unit, the wrapper the root)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("torchvision")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError:  # pragma: no cover - older torch
    pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available", allow_module_level=True)

WORLD = 2
CHAINS_PER_RANK = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup():
    from rankloss.train.config import TrainConfig
    from rankloss.train.data import collate_chains, make_collator, synthetic_chains, synthetic_frames
    from rankloss.train.model import build_tiny_model, build_tiny_processor, tiny_config, train_tokenizer

    cfg = TrainConfig(num_videos=WORLD * CHAINS_PER_RANK, heldout=0, frames=4, frame_size=56, max_objects=2)
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

    def model():
        return build_tiny_model(mcfg, seed=0).double()

    collator = make_collator(processor)

    def batch(items, mode):
        return collate_chains(collator, items, frames, ref_scores=ref, best_only=mode == "sft")

    assert len({len(c.captions) for c in chains}) == 1  # equal shards: the mean of rank means is the mean
    return chains, model, batch


def _worker(rank: int, port: int, mode: str, spec_kwargs: dict, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.fsdp import fully_shard

        from rankloss.integrations import ChainRankModel, leave_process_group
        from rankloss.integrations.forward import LossSpec

        chains, make_model, make_batch = _setup()
        spec = LossSpec(**spec_kwargs)
        model = make_model()
        wrapper = ChainRankModel(model)
        for layer in model.model.language_model.layers:
            fully_shard(layer)
        for block in model.model.visual.blocks:
            fully_shard(block)
        fully_shard(wrapper)
        assert type(model.lm_head.weight).__name__ == "DTensor"  # lm_head really is sharded
        mine = chains[rank * CHAINS_PER_RANK : (rank + 1) * CHAINS_PER_RANK]
        batch = make_batch(mine, mode)
        out = wrapper(batch, mode=mode, spec=spec)
        out["loss"].backward()
        loss = out["loss"].detach().clone()
        dist.all_reduce(loss)
        grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters() if p.grad is not None}
        tokens = wrapper(batch, mode="generate", max_new_tokens=5, stop_when_done=False)["tokens"]
        gathered = [torch.empty_like(tokens) for _ in range(WORLD)]
        dist.all_gather(gathered, tokens)
        if rank == 0:
            torch.save({"loss": loss / WORLD, "grads": grads, "tokens": torch.cat(gathered)}, out_path)
        # Leave together, gloo's workers settled (a rank aborted now and then at exit, its work done;
        # see leave_process_group).
        leave_process_group()
    finally:
        if dist.is_initialized():  # an error above: leave without waiting for the peer
            dist.destroy_process_group()


@pytest.mark.parametrize(
    "mode, spec_kwargs",
    [
        ("rank", {"loss": "plackett_luce", "beta": 0.05, "sft_weight": 0.1}),
        ("rank", {"loss": "dpo", "beta": 0.05, "pairs": "all"}),
        ("sft", {}),
    ],
    ids=["plackett_luce+sft", "dpo-all", "sft"],
)
def test_fsdp2_sharded_model_matches_one_process(mode, spec_kwargs, tmp_path):
    from rankloss.integrations import ChainRankModel
    from rankloss.integrations.forward import LossSpec

    out_path = str(tmp_path / "sharded.pt")
    mp.start_processes(
        _worker,
        args=(_free_port(), mode, spec_kwargs, out_path),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
    sharded = torch.load(out_path)

    chains, make_model, make_batch = _setup()
    model = make_model()
    wrapper = ChainRankModel(model)
    batch = make_batch(chains, mode)
    out = wrapper(batch, mode=mode, spec=LossSpec(**spec_kwargs))
    out["loss"].backward()
    torch.testing.assert_close(sharded["loss"], out["loss"].detach(), rtol=1e-12, atol=1e-12)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sharded["grads"].keys() == grads.keys()
    assert any("visual" in n for n in grads) and "lm_head.weight" in grads
    for name, g in grads.items():
        torch.testing.assert_close(sharded["grads"][name], g, rtol=1e-9, atol=1e-12, msg=name)
    tokens = wrapper(batch, mode="generate", max_new_tokens=5, stop_when_done=False)["tokens"]
    assert torch.equal(sharded["tokens"], tokens)
