"""Reference scores under a wrapper's mixed-precision input cast.

FSDP2's ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` casts every floating tensor of a unit's
forward inputs (``cast_forward_inputs=True``, the default, and what accelerate builds from
``mixed_precision: bf16``), ``ref_scores`` included: a score of -300.37 becomes -300.0 in bfloat16. The
trainers call the model with ``keep_precision(batch)`` (``ref_scores`` in an ``Uncast`` holder, which the
cast leaves alone); a batch that arrives cast warns once. One process, a gloo group of size 1, a real
``fully_shard``."""

from __future__ import annotations

import socket
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch.distributed as dist  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - older torch
    pytest.skip("FSDP2 is not available", allow_module_level=True)

from rankloss.integrations import forward as fwd  # noqa: E402
from rankloss.integrations.forward import ChainRankModel, LossSpec, Uncast, keep_precision  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def group():
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model_and_batch():
    import transformers

    from rankloss.integrations import ChainCollator
    from rankloss.train.model import train_tokenizer

    records = [
        {"prompt": "Describe the clip:", "completions": ["a red ball rolls left", "a ball rolls", "a box"]},
        {"prompt": "Describe it briefly:", "completions": ["two cats sleep", "two dogs sleep"]},
    ]
    texts = [r["prompt"] for r in records] + [c for r in records for c in r["completions"]]
    tok = train_tokenizer(texts, 200)
    config = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    batch = ChainCollator(tok)(records)
    # reference scores a few hundred nats long, which bfloat16 cannot hold exactly
    batch["ref_scores"] = torch.tensor([-300.37, -301.11, -250.55, -180.21, -181.93])
    return model, batch


def _sharded(model):
    wrapper = ChainRankModel(model, LossSpec(loss="plackett_luce", beta=0.1))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)  # casts inputs
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(wrapper, mp_policy=policy)
    return wrapper


def test_ref_scores_keep_float32_through_fsdp2_input_cast(group, monkeypatch):
    model, batch = _model_and_batch()
    wrapper = _sharded(model)
    seen = []
    real = fwd.fused_linear_chain_loss

    def spy(hidden, weight, labels, sizes, ref, **kw):
        seen.append(ref)
        return real(hidden, weight, labels, sizes, ref, **kw)

    monkeypatch.setattr(fwd, "fused_linear_chain_loss", spy)
    monkeypatch.setattr(fwd, "_WARNED", set())
    exact = batch["ref_scores"].clone()

    # as the trainers call it: the scores arrive as they left, float32, to the last bit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = wrapper(keep_precision(batch), mode="rank")
    assert torch.isfinite(out["loss"])
    assert seen[-1].dtype == torch.float32 and torch.equal(seen[-1], exact)

    # a plain call: FSDP2's cast rounds them (the test exercises the cast), and the forward says so once
    with pytest.warns(UserWarning, match=r"ref_scores'\] reached the chain forward as torch.bfloat16"):
        wrapper(batch, mode="rank")
    assert seen[-1].dtype == torch.bfloat16
    assert not torch.equal(seen[-1].float(), exact)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapper(batch, mode="rank")  # once only


def test_uncast_moves_and_unwraps():
    t = torch.tensor([1.5, -2.25], dtype=torch.float32)
    held = keep_precision({"ref_scores": t, "chain_sizes": torch.tensor([2])})
    assert isinstance(held["ref_scores"], Uncast) and held["ref_scores"].tensor is t
    assert isinstance(held["chain_sizes"], torch.Tensor)
    moved = held["ref_scores"].to("cpu", non_blocking=False)
    assert isinstance(moved, Uncast) and torch.equal(moved.tensor, t)
    # torch's own input-cast helper (FSDP1 and FSDP2 use it) leaves the holder alone
    from torch.distributed.utils import _apply_to_tensors

    cast = _apply_to_tensors(lambda x: x.to(torch.bfloat16) if x.is_floating_point() else x, held)
    assert cast["ref_scores"].tensor.dtype == torch.float32
