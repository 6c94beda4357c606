"""ChainRankTrainer: a plain ``transformers.Trainer`` workflow on TRL-style chain records with no glue;
gradient accumulation and two processes give one process's update; reference scores are computed once
and cached; the chain metrics reach the Trainer's log and ``evaluate()``; the saved model is a Hugging
Face checkpoint; ``freeze_vision`` / ``vision_lr`` on a VLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from rankloss.reference.losses import chain_metrics  # noqa: E402

from rankloss.integrations import ChainCollator, ChainForward, ChainRankConfig, ChainRankTrainer  # noqa: E402
from rankloss.integrations.forward import ChainRankModel  # noqa: E402
from rankloss.train.model import train_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "a red green blue small large circle square moves left right up down then stops turns fast slowly".split()
)


def records(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = 2 + int(torch.randint(0, 3, (1,), generator=g))
        words = lambda m: " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (m,), generator=g).tolist())  # noqa: E731
        prompt = "describe: " + words(2 + i % 4)
        out.append(
            {"id": f"r{i}", "prompt": prompt, "completions": [words(3 + (j + i) % 5) for j in range(k)]}
        )
    return out


def tiny_lm(tok, seed: int = 0):
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(cfg)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(WORDS + ["describe:"], 200)


def config(tmp_path: Path, **kw) -> ChainRankConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        beta=0.5,
        disable_tqdm=True,
        max_grad_norm=0.0,  # no clipping: a step's size shows a wrongly scaled loss
    )
    base.update(kw)
    return ChainRankConfig(**base)


class Logs(transformers.TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trains_with_no_glue_and_logs_chain_metrics(tmp_path, tok):
    data = records(12)
    model = tiny_lm(tok)
    before = params(model)
    logs = Logs()
    trainer = ChainRankTrainer(
        model, config(tmp_path, sft_weight=0.1), train_dataset=data, processing_class=tok, callbacks=[logs]
    )
    trainer.train()
    after = params(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    step_logs = [entry for entry in logs.logs if "pairwise_accuracy" in entry]
    assert len(step_logs) == 2
    for entry in step_logs:
        for key in (
            "loss",
            "pairwise_accuracy",
            "top1_accuracy",
            "kendall_tau",
            "reward_pos1",
            "reward_pos2",
            "best_logp_per_token",
            "chain_loss",
            "tokens",
        ):
            assert key in entry, key
        assert entry["chains"] == 4
        assert 0.0 <= entry["pairwise_accuracy"] <= 1.0
        assert entry["best_logp_per_token"] < 0
    # the logged loss is the mean chain loss of the step
    assert step_logs[0]["loss"] == pytest.approx(step_logs[0]["chain_loss"], rel=1e-4)


def test_gradient_accumulation_gives_the_full_batch_update(tmp_path, tok):
    data = records(8, seed=1)
    results = []
    for bs, ga in ((4, 1), (2, 2), (1, 4)):
        model = tiny_lm(tok, seed=2)
        args = config(
            tmp_path / f"ga{ga}",
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=1,
            sft_weight=0.2,
        )
        ChainRankTrainer(model, args, train_dataset=data, processing_class=tok).train()
        results.append(params(model))
    base = results[0]
    moved = max(float((base[n] - p).abs().max()) for n, p in params(tiny_lm(tok, seed=2)).items())
    assert moved > 1e-4  # the step did something
    for other in results[1:]:
        for n in base:
            torch.testing.assert_close(other[n], base[n], atol=1e-6, rtol=1e-5, msg=n)


def test_reference_scores_are_computed_once_and_cached(tmp_path, tok, monkeypatch):
    data = records(6, seed=3)
    model = tiny_lm(tok, seed=4)
    args = config(tmp_path)
    trainer = ChainRankTrainer(model, args, train_dataset=data, processing_class=tok)
    cache = list((tmp_path / "out" / "rankloss-ref").glob("ref-scores-*.pt"))
    assert len(cache) == 1
    scores = trainer.train_dataset.scores
    # they are the policy's own scores, computed with the chain forward
    batch = ChainCollator(tok)(data)
    s, _ = ChainForward(model).scores(batch)
    torch.testing.assert_close(torch.tensor(sum(scores, [])), s.float(), atol=1e-4, rtol=1e-5)
    assert [len(x) for x in scores] == [len(r["completions"]) for r in data]

    calls = []
    original = ChainRankModel.forward

    def counting(self, batch, mode="rank", **kw):
        calls.append(mode)
        return original(self, batch, mode=mode, **kw)

    monkeypatch.setattr(ChainRankModel, "forward", counting)
    again = ChainRankTrainer(tiny_lm(tok, seed=4), args, train_dataset=data, processing_class=tok)
    assert "score" not in calls
    assert again.train_dataset.scores == scores
    # another model is another fingerprint
    ChainRankTrainer(tiny_lm(tok, seed=5), args, train_dataset=data, processing_class=tok)
    assert "score" in calls
    assert len(list((tmp_path / "out" / "rankloss-ref").glob("ref-scores-*.pt"))) == 2


def test_evaluate_reports_assessment_metrics(tmp_path, tok):
    data = records(7, seed=5)
    model = tiny_lm(tok, seed=6)
    args = config(tmp_path, reference_free=True, beta=1.0)
    trainer = ChainRankTrainer(model, args, train_dataset=data, eval_dataset=data, processing_class=tok)
    metrics = trainer.evaluate()
    s, _ = ChainForward(model).scores(ChainCollator(tok)(data))
    sizes = [len(r["completions"]) for r in data]
    want = chain_metrics(s.double(), sizes)
    for key in ("pairwise_accuracy", "top1_accuracy", "kendall_tau"):
        assert metrics[f"eval_{key}"] == pytest.approx(float(want[key].mean()), abs=1e-6), key
    assert metrics["eval_chains"] == len(data)
    assert "eval_loss" in metrics and "eval_reward_pos1" in metrics


def test_save_model_writes_a_hugging_face_checkpoint(tmp_path, tok):
    data = records(4, seed=6)
    model = tiny_lm(tok, seed=7)
    trainer = ChainRankTrainer(model, config(tmp_path, max_steps=1), train_dataset=data, processing_class=tok)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    for n, p in model.named_parameters():
        torch.testing.assert_close(loaded.get_parameter(n), p.detach(), msg=n)
    assert (tmp_path / "saved" / "tokenizer.json").exists()


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, tok):
    data = records(8, seed=8)
    full = tiny_lm(tok, seed=9)
    ChainRankTrainer(
        full, config(tmp_path / "a", max_steps=4), train_dataset=data, processing_class=tok
    ).train()
    part = tiny_lm(tok, seed=9)
    args = config(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    ChainRankTrainer(part, args, train_dataset=data, processing_class=tok).train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-2"
    assert (ckpt / "model.safetensors").exists()
    resumed = tiny_lm(tok, seed=9)  # the initial weights: the reference comes from the cache
    ChainRankTrainer(resumed, args, train_dataset=data, processing_class=tok).train(
        resume_from_checkpoint=str(ckpt)
    )
    for n, p in full.named_parameters():
        torch.testing.assert_close(resumed.get_parameter(n), p.detach(), atol=1e-6, rtol=1e-5, msg=n)


def test_config_refuses_what_cannot_work(tmp_path):
    with pytest.raises(ValueError, match="remove_unused_columns"):
        ChainRankConfig(output_dir=str(tmp_path), remove_unused_columns=True)
    with pytest.raises(ValueError, match="loss must be"):
        ChainRankConfig(output_dir=str(tmp_path), loss="pairwise")


def test_kernel_options_reach_the_log_prob_op(tmp_path, tok, monkeypatch):
    # deterministic and filter_eps (impl="triton" only) go from the config through the loss spec to the
    # log-prob op, in the rank and in the SFT mode; bad values are refused when the config is made.
    from rankloss import logprobs as logprobs_module
    from rankloss.ops import linear_token_logprobs as op_module

    assert config(tmp_path).loss_spec().filter_eps == "auto"
    assert config(tmp_path, filter_eps="off").loss_spec().filter_eps is None
    assert config(tmp_path, filter_eps="1e-3", deterministic=True).loss_spec().filter_eps == 1e-3
    for bad in ("-1", "often", "nan"):
        with pytest.raises(ValueError, match="filter_eps must be"):
            config(tmp_path, filter_eps=bad)
    seen = []
    real = op_module.linear_token_logprobs_op

    def spy(*args, **kwargs):
        seen.append(args[9:11])  # (deterministic, the resolved filter_eps)
        return real(*args, **kwargs)

    monkeypatch.setattr(logprobs_module, "linear_token_logprobs_op", spy)
    model = tiny_lm(tok, seed=3)
    batch = ChainCollator(tok)(records(3, seed=5))
    eps32 = torch.finfo(torch.float32).eps
    for filter_eps, deterministic, expected in (
        ("auto", False, eps32),
        ("0.25", False, 0.25),
        ("auto", True, 0.0),
    ):
        spec = config(tmp_path, filter_eps=filter_eps, deterministic=deterministic).loss_spec()
        wrapper = ChainRankModel(model, spec, impl="triton")
        for mode in ("rank", "sft"):
            seen.clear()
            assert torch.isfinite(wrapper(batch, mode=mode)["loss"])
            assert seen == [(deterministic, expected)], (mode, seen)


def test_freeze_vision_and_vision_lr_on_a_vlm(tmp_path):
    import numpy as np

    from rankloss.train.model import build_tiny_model, build_tiny_processor, tiny_config

    captions = [
        "a red circle moves left",
        "a blue square moves up",
        "a green circle stops",
        "describe the video",
    ]
    tok = train_tokenizer(captions, 300)
    processor = build_tiny_processor(tok, 28)
    cfg = tiny_config(tok, hidden_size=32, num_layers=1, vision_depth=1, vision_hidden_size=32)
    rng = np.random.default_rng(0)
    data = [
        {
            "prompt": "describe the video",
            "videos": [rng.integers(0, 255, (4, 28, 28, 3), dtype=np.uint8)],
            "completions": captions[i % 3 :] + captions[: i % 3],
        }
        for i in range(4)
    ]
    for freeze in (True, False):
        model = build_tiny_model(cfg, seed=0)
        before = params(model)
        args = config(
            tmp_path / str(freeze),
            max_steps=1,
            freeze_vision=freeze,
            vision_lr=None if freeze else 0.5,
            learning_rate=0.01,
        )
        trainer = ChainRankTrainer(model, args, train_dataset=data, processing_class=processor)
        trainer.train()
        after = params(model)
        vision = [n for n in before if ".visual." in n]
        llm = [n for n in before if ".language_model." in n]
        assert vision and llm
        assert any(not torch.equal(before[n], after[n]) for n in llm)
        changed = [n for n in vision if not torch.equal(before[n], after[n])]
        if freeze:
            assert not changed
        else:
            assert changed
            lrs = {g["lr"] for g in trainer.optimizer.param_groups}
            assert lrs == {0.5, 0.01}


TWO_PROC = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_chain_trainer import records, tiny_lm, config, params, WORDS
    from pathlib import Path
    from rankloss.integrations import ChainRankTrainer, leave_process_group
    from rankloss.train.model import train_tokenizer
    tok = train_tokenizer(WORDS + ["describe:"], 200)
    model = tiny_lm(tok, seed=11)
    bs = int(sys.argv[1]); out = Path(sys.argv[2])
    args = config(out, per_device_train_batch_size=bs, max_steps=2, sft_weight=0.1)
    trainer = ChainRankTrainer(model, args, train_dataset=records(8, seed=12), processing_class=tok)
    trainer.train()
    if trainer.accelerator.is_main_process:
        torch.save(params(model), out / "params.pt")
        (out / "world.json").write_text(json.dumps(trainer.accelerator.num_processes))
    # without it a gloo rank aborted now and then at exit, its work done (see leave_process_group)
    assert leave_process_group() == (trainer.accelerator.num_processes > 1)
    """
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_one_process_update(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(TWO_PROC.format(tests=str(REPO / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    subprocess.run(
        [sys.executable, str(script), "4", str(one)], check=True, env=env, timeout=600, capture_output=True
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            str(script),
            "2",
            str(two),
        ],
        env=env,
        timeout=900,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads((two / "world.json").read_text()) == 2
    a, b = torch.load(one / "params.pt"), torch.load(two / "params.pt")
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-6, rtol=1e-5, msg=n)


def test_reference_model_scores_the_chains(tmp_path, tok):
    data = records(5, seed=13)
    policy, ref = tiny_lm(tok, seed=14), tiny_lm(tok, seed=15)
    trainer = ChainRankTrainer(
        policy, config(tmp_path), train_dataset=data, processing_class=tok, ref_model=ref
    )
    s, _ = ChainForward(ref).scores(ChainCollator(tok)(data))
    torch.testing.assert_close(
        torch.tensor(sum(trainer.train_dataset.scores, [])), s.float(), atol=1e-4, rtol=1e-5
    )
    with pytest.raises(ValueError, match="reference_free=True but a ref_model"):
        ChainRankTrainer(
            policy,
            config(tmp_path, reference_free=True),
            train_dataset=data,
            processing_class=tok,
            ref_model=ref,
        )


def test_evaluating_a_new_dataset_without_a_reference_model_is_refused(tmp_path, tok):
    trainer = ChainRankTrainer(tiny_lm(tok), config(tmp_path), train_dataset=records(4), processing_class=tok)
    with pytest.raises(ValueError, match="pass eval datasets to ChainRankTrainer"):
        trainer.evaluate(eval_dataset=records(3, seed=1))
    free = ChainRankTrainer(
        tiny_lm(tok), config(tmp_path, reference_free=True), train_dataset=records(4), processing_class=tok
    )
    assert "eval_pairwise_accuracy" in free.evaluate(eval_dataset=records(3, seed=1))


class _Wrapper(torch.nn.Module):
    """Stands in for PEFT's PeftModel: get_base_model() returns the model the adapters live in."""

    def __init__(self, model):
        super().__init__()
        self.base = model

    def get_base_model(self):
        return self.base


def test_chain_forward_looks_through_a_peft_style_wrapper(tok):
    model = tiny_lm(tok, seed=16)
    batch = ChainCollator(tok)(records(3, seed=2))
    torch.testing.assert_close(
        ChainForward(_Wrapper(model)).hidden_states(batch), ChainForward(model).hidden_states(batch)
    )
