"""Worker of tests/test_trainer_distributed.py: run as one process (``python``) or under ``torchrun``.

    python tests/trainer_distributed_worker.py MODE OUT [BATCH_SIZE]

Each process writes ``OUT/rank<RANK>.json`` (what it saw: ``WORLD_SIZE``, whether torch.distributed is
initialized, accelerate's process count, and the mode's results) before it leaves the process group.
Modes:

* ``metrics``: ChainRankTrainer with a reference model on records with edit types: ``evaluate()``, one
  training step, the reduced eval metrics and the first training log;
* ``guard``: ChainRankTrainer with ``use_cpu=False`` (on CPU under torchrun accelerate then forms no
  group): the RuntimeError it raises is written, then raised again;
* ``zero3``: the policy built under ``deepspeed.zero.Init`` (ZeRO-3, persistence threshold 0) and a
  ``ref_model`` prepared as a ZeRO-3 engine: the reference scores of a train set and of a one-record eval
  set (one process scores nothing) against the unsharded models' scores (needs ``DS_ACCELERATOR=cpu``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_chain_trainer import WORDS, Logs, config, records, tiny_lm  # noqa: E402

from rankloss.chains.taxonomy import EDIT_TYPES  # noqa: E402
from rankloss.integrations import ChainCollator, ChainForward, ChainRankTrainer, leave_process_group  # noqa: E402
from rankloss.train.model import train_tokenizer  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def with_edits(recs: list[dict]) -> list[dict]:
    """``recs`` with an ``edit_types`` entry per step, cycling through every edit type and one unknown."""
    types = (*EDIT_TYPES, "made_up")
    return [
        {**r, "edit_types": [types[(3 * i + j) % len(types)] for j in range(len(r["completions"]) - 1)]}
        for i, r in enumerate(recs)
    ]


def seen(trainer: ChainRankTrainer | None = None) -> dict:
    acc = trainer.accelerator if trainer is not None else None
    return {
        "WORLD_SIZE": os.environ.get("WORLD_SIZE"),
        "initialized": torch.distributed.is_available() and torch.distributed.is_initialized(),
        "num_processes": acc.num_processes if acc is not None else None,
        "process_index": acc.process_index if acc is not None else None,
    }


def finish(out: Path, result: dict) -> None:
    (out / f"rank{RANK}.json").write_text(json.dumps(result))
    # all ranks leave together and gloo's workers settle before the interpreter exits (a rank could abort
    # at exit with its work done; see leave_process_group)
    leave_process_group()


def expected_scores(model: torch.nn.Module, tok, data: list[dict]) -> list[list[float]]:
    batch = ChainCollator(tok)(data)
    with torch.no_grad():
        s, _ = ChainForward(model).scores(batch)
    return [x.tolist() for x in torch.split(s.float(), batch["chain_sizes"].tolist())]


def metrics(out: Path, bs: int, tok) -> None:
    policy, ref = tiny_lm(tok, seed=21), tiny_lm(tok, seed=22)
    logs = Logs()
    args = config(
        out, per_device_train_batch_size=bs, per_device_eval_batch_size=bs, max_steps=1, sft_weight=0.1
    )
    trainer = ChainRankTrainer(
        policy,
        args,
        train_dataset=with_edits(records(8, seed=23)),
        eval_dataset=with_edits(records(8, seed=24)),
        processing_class=tok,
        ref_model=ref,
        callbacks=[logs],
    )
    result = seen(trainer)
    result["eval"] = trainer.evaluate()  # before train(): train() must still wrap the model in DDP
    trainer.train()
    result["wrapped"] = type(trainer.model_wrapped).__name__
    result["train"] = [entry for entry in logs.logs if "pairwise_accuracy" in entry]
    result["ref"] = trainer.train_dataset.scores
    result["params"] = {n: p.detach().double().flatten()[:64].tolist() for n, p in policy.named_parameters()}
    finish(out, result)


def guard(out: Path, tok) -> None:
    try:
        ChainRankTrainer(
            tiny_lm(tok, seed=1), config(out, use_cpu=False), train_dataset=records(4), processing_class=tok
        )
    except RuntimeError as exc:
        (out / f"rank{RANK}.json").write_text(json.dumps({**seen(), "error": str(exc)}))
        raise
    (out / f"rank{RANK}.json").write_text(json.dumps({**seen(), "error": None}))


def zero3(out: Path, tok) -> None:
    import deepspeed

    from rankloss.integrations.trainer import model_fingerprint, prepare_deepspeed_ref_model

    args = config(out, per_device_eval_batch_size=2)
    assert args.device.type == "cpu"  # accelerate's state: the gloo group of the launch
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    full = tiny_lm(tok, seed=31)  # the same weights on every process
    # as accelerate's zero3_init_flag does: HfDeepSpeedConfig alive while the model is made, so
    # transformers builds it under deepspeed.zero.Init (and initialises the partitioned weights)
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(ds_config)
    policy = type(full)._from_config(full.config)
    del hf_ds  # the Trainer itself runs without DeepSpeed here (accelerate enables it on accelerators only)
    with deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=0):
        if RANK == 0:
            with torch.no_grad():
                for name, p in policy.named_parameters():
                    p.copy_(full.get_parameter(name))

    def partitioned(model: torch.nn.Module) -> bool:
        return all(hasattr(p, "ds_id") and p.numel() == 0 and p.ds_numel > 0 for p in model.parameters())

    assert partitioned(policy), "the policy's parameters are not ZeRO-3 partitioned"
    ref_full = tiny_lm(tok, seed=32)
    ref_engine = prepare_deepspeed_ref_model(tiny_lm(tok, seed=32), ds_config)
    assert partitioned(ref_engine.module) and not ref_engine.module.training
    train, one = records(5, seed=33), records(1, seed=34)
    result: dict = {}
    for name, ref_model, unsharded in (("policy", None, full), ("ref_model", ref_engine, ref_full)):
        trainer = ChainRankTrainer(
            full if ref_model is not None else policy,
            config(out / name, per_device_eval_batch_size=2),
            train_dataset=train,
            eval_dataset=one,  # process 1 scores no record of it, and still joins the gather
            processing_class=tok,
            ref_model=ref_model,
        )
        result.update(seen(trainer))
        result[name] = {
            "train": trainer.train_dataset.scores,
            "eval": trainer.eval_dataset.scores,
            "want_train": expected_scores(unsharded, tok, train),
            "want_eval": expected_scores(unsharded, tok, one),
        }
    result["fingerprints"] = [model_fingerprint(policy), model_fingerprint(full)]
    result["ref_fingerprints"] = [model_fingerprint(ref_engine.module), model_fingerprint(ref_full)]
    result["still_partitioned"] = partitioned(policy) and partitioned(ref_engine.module)
    # the engine's parameter-fetching hooks are back: a forward through it sees the whole weights
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        got = ref_engine(input_ids=ids).logits
        want = ref_full(input_ids=ids).logits
    result["engine_forward_max_diff"] = float((got - want).abs().max())
    finish(out, result)


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    tok = train_tokenizer(WORDS + ["describe:"], 200)
    if mode == "metrics":
        metrics(out, int(sys.argv[3]), tok)
    elif mode == "guard":
        guard(out, tok)
    elif mode == "zero3":
        zero3(out, tok)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
