"""ChainRankTrainer under a real two-process launch (``python -m torch.distributed.run --nproc_per_node 2``,
gloo on CPU; the worker is tests/trainer_distributed_worker.py): every process checks it is one of two in
one group; the chain metrics of ``evaluate()`` and of the training log are reduced across processes (the
one-process values on the same data, per edit type and per position included) and ``evaluate()`` before
``train()`` still trains in DDP; a launch whose processes did not join one group is refused by both; the
reference scores of a ZeRO-3 partitioned policy and of a ZeRO-3 ``ref_model`` engine are the unsharded
models' scores."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "trainer_distributed_worker.py"
# wall-clock measurements
UNCOMPARED = {
    "eval_runtime",
    "eval_samples_per_second",
    "eval_steps_per_second",
    "eval_model_preparation_time",
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET"):
        env.pop(key, None)
    return env


def _run(
    args: list[str], *, procs: int, env: dict[str, str], timeout: int = 240
) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
        launcher += ["--master_port", str(_free_port())]
    return subprocess.run(
        [*launcher, str(WORKER), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _ranks(out: Path, n: int) -> list[dict]:
    files = sorted(out.glob("rank*.json"))
    assert [f.name for f in files] == [f"rank{r}.json" for r in range(n)], files
    return [json.loads(f.read_text()) for f in files]


def _assert_two_in_one_group(seen: dict, rank: int) -> None:
    assert seen["WORLD_SIZE"] == "2", seen
    assert seen["initialized"] is True, seen
    assert seen["num_processes"] == 2 and seen["process_index"] == rank, seen


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


def test_two_processes_reduce_the_chain_metrics_to_one_process_values(tmp_path):
    """evaluate() then one training step, with a reference model, on records of 2 to 4 completions with
    edit types: one process with 4 records a batch against two processes with 2 each. Every metric of
    ``evaluate()`` (``eval_rewards/accuracies``, ``eval_logps/*``, per edit type, per position, counts)
    and of the training log is the one-process value on every process; both processes end with the
    one-process weights (so evaluate() before train() did not leave the model without DDP)."""
    env = _env()
    one, two = tmp_path / "one", tmp_path / "two"
    r = _run(["metrics", str(one), "4"], procs=1, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    r = _run(["metrics", str(two), "2"], procs=2, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    (single,) = _ranks(one, 1)
    assert single["WORLD_SIZE"] is None and single["num_processes"] == 1
    want = single["eval"]
    for key in (
        "eval_rewards/accuracies",
        "eval_logps/pairwise_accuracy",
        "eval_logps/chosen",
        "eval_logps_per_token/kendall_tau",
        "eval_rewards/pair_accuracy/object",
        "eval_logps/pair_accuracy/length_matched",
        "eval_pairs/insertion",
        "eval_rewards/pair_accuracy/pos4",
        "eval_reward_pos4",
        "eval_sft_loss",
    ):
        assert key in want, key
    assert want["eval_chains"] == 8
    for rank, seen in enumerate(_ranks(two, 2)):
        _assert_two_in_one_group(seen, rank)
        got = seen["eval"]
        assert set(got) == set(want), set(got) ^ set(want)
        wrong = {k: (got[k], want[k]) for k in want if k not in UNCOMPARED and not _close(got[k], want[k])}
        assert not wrong, f"rank {rank}: eval metrics differ from one process's: {wrong}"
        (got_log,) = seen["train"]
        (want_log,) = single["train"]
        assert got_log["chains"] == 4  # the whole step's chains, both processes
        wrong = {k: (got_log[k], v) for k, v in want_log.items() if not _close(got_log[k], v)}
        assert not wrong, f"rank {rank}: training log differs from one process's: {wrong}"
        assert seen["ref"] == single["ref"]
        assert seen["wrapped"] == "DistributedDataParallel"
        for name, values in single["params"].items():
            torch.testing.assert_close(
                torch.tensor(seen["params"][name]), torch.tensor(values), atol=1e-6, rtol=1e-5, msg=name
            )


def test_a_launch_whose_processes_did_not_join_one_group_is_refused(tmp_path):
    """torchrun, 2 processes, ``use_cpu=False`` on a CPU machine: accelerate sets up one process in each,
    which would each train alone into the same output_dir; both stop with the error naming both counts."""
    out = tmp_path / "guard"
    r = _run(["guard", str(out)], procs=2, env=_env())
    assert r.returncode != 0, r.stdout[-2000:] + r.stderr[-2000:]
    for seen in _ranks(out, 2):
        assert seen["WORLD_SIZE"] == "2"
        error = seen["error"]
        assert error is not None
        assert "launched as 2 processes (WORLD_SIZE=2) but accelerate set up 1" in error, error
        assert "use_cpu=True" in error and "torchrun --nproc_per_node 2" in error, error
    assert not (out / "out" / "rankloss-ref").exists()  # refused before the reference pass


def test_the_guard_in_process(tmp_path, monkeypatch):
    """The same check without a launcher: WORLD_SIZE=2 in the environment, a one-process trainer."""
    from test_chain_trainer import WORDS, config, records, tiny_lm

    from rankloss.integrations import ChainRankTrainer
    from rankloss.train.model import train_tokenizer

    tok = train_tokenizer(WORDS + ["describe:"], 200)
    args = config(tmp_path)
    assert args.device.type == "cpu"  # accelerate's state is set up before WORLD_SIZE changes
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused = r"launched as 2 processes \(WORLD_SIZE=2\) but accelerate set up 1"
    with pytest.raises(RuntimeError, match=refused):
        ChainRankTrainer(tiny_lm(tok), args, train_dataset=records(4), processing_class=tok)
    monkeypatch.setenv("WORLD_SIZE", "1")
    ChainRankTrainer(tiny_lm(tok), args, train_dataset=records(4), processing_class=tok)


def test_zero3_partitioned_scorers_give_the_unsharded_reference_scores(tmp_path):
    """Two gloo processes, DeepSpeed ZeRO-3 on CPU (persistence threshold 0, so every parameter is
    partitioned): a policy built under ``deepspeed.zero.Init`` (as accelerate's zero3_init_flag does) and a
    ``ref_model`` prepared as a ZeRO-3 engine (:func:`prepare_deepspeed_ref_model`) give the reference
    scores of the unsharded models, on a 5-record train set and on a 1-record eval set (process 1 scores
    nothing and still joins the gather); the cache fingerprints are those of the whole models; the
    parameters are partitioned again afterwards and the engine's hooks are back (its forward works)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3"
    r = _run(["zero3", str(out)], procs=2, env=_env(DS_ACCELERATOR="cpu"), timeout=300)
    assert r.returncode == 0, r.stderr[-6000:]
    for rank, seen in enumerate(_ranks(out, 2)):
        _assert_two_in_one_group(seen, rank)
        for name in ("policy", "ref_model"):
            part = seen[name]
            for split in ("train", "eval"):
                got, want = part[split], part[f"want_{split}"]
                assert [len(x) for x in got] == [len(x) for x in want], (name, split)
                torch.testing.assert_close(
                    torch.tensor(sum(got, [])), torch.tensor(sum(want, [])), atol=1e-4, rtol=1e-5,
                    msg=f"{name} {split}",
                )  # fmt: skip
        assert seen["fingerprints"][0] == seen["fingerprints"][1]
        assert seen["ref_fingerprints"][0] == seen["ref_fingerprints"][1]
        assert seen["still_partitioned"] is True
        assert seen["engine_forward_max_diff"] < 1e-4


def test_leave_process_group_destroys_the_group_after_a_barrier(monkeypatch):
    """Without a group it does nothing; with one it waits at a barrier, destroys the group and pauses with
    the GIL released (the order that keeps a gloo rank from aborting at exit)."""
    import time

    import torch.distributed as dist

    from rankloss.integrations import leave_process_group

    assert not dist.is_initialized()
    assert leave_process_group() is False
    calls = []
    real_barrier, real_destroy = dist.barrier, dist.destroy_process_group
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (calls.append("barrier"), real_barrier(*a, **k))[1])
    monkeypatch.setattr(
        dist, "destroy_process_group", lambda *a, **k: (calls.append("destroy"), real_destroy(*a, **k))[1]
    )
    monkeypatch.setattr(time, "sleep", lambda s: calls.append(("sleep", s)))
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        assert leave_process_group() is True
    finally:
        if dist.is_initialized():
            real_destroy()
    assert calls == ["barrier", "destroy", ("sleep", 0.2)]
    assert not dist.is_initialized()
