"""Generated captions on the user's data: ``generate_captions`` against Hugging Face's own greedy
``generate``, and ``GenerationEvalCallback`` inside ``ChainRankTrainer`` (files, metrics, logs, the judge
fallback, wandb's table), and the example trainer's flags."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import transformers  # noqa: E402

from rankloss.integrations import (  # noqa: E402
    ChainCollator,
    ChainRankConfig,
    ChainRankModel,
    ChainRankTrainer,
    GenerationEvalCallback,
    add_generation_eval,
    generate_captions,
)
from rankloss.train.model import train_tokenizer  # noqa: E402

RECORDS = [
    {
        "id": "r0",
        "prompt": "Describe the clip:",
        "completions": [" a red ball rolls left", " a red ball rolls right"],
    },
    {
        "id": "r1",
        "prompt": "Describe it briefly:",
        "completions": [" two cats sleep", " two dogs sleep", " a box"],
    },
    {
        "id": "r2",
        "prompt": "What happens?",
        "completions": [" a man opens the door", " a man shuts the door"],
    },
]


@pytest.fixture(scope="module")
def tiny():
    texts = [r["prompt"] for r in RECORDS] + [c for r in RECORDS for c in r["completions"]]
    tok = train_tokenizer(texts, 120)
    config = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).eval(), tok


def test_greedy_captions_match_hugging_face_generate(tiny):
    model, tok = tiny
    collator = ChainCollator(tok)
    rows = generate_captions(model, collator, RECORDS, num_samples=2, max_new_tokens=6, batch_size=2)
    assert [r["id"] for r in rows] == ["r0", "r1"] and [r["index"] for r in rows] == [0, 1]
    assert rows[1]["prompt"] == "Describe it briefly:" and rows[1]["reference"] == "two cats sleep"
    for row, rec in zip(rows, RECORDS):
        ids = collator([rec])["prompt_input_ids"]
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=6,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, ids.shape[1] :]
        ref = ref.tolist()
        end = ref.index(tok.eos_token_id) if tok.eos_token_id in ref else len(ref)
        assert row["generated_tokens"] == end and row["stopped"] == (end < len(ref))
        assert row["generated"] == tok.decode(ref[:end], skip_special_tokens=True).strip()
    # one record per batch gives the same captions as two (left padding does not change them)
    assert generate_captions(model, collator, RECORDS, num_samples=2, max_new_tokens=6, batch_size=1) == rows
    assert generate_captions(model, collator, RECORDS, num_samples=0) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_captions(model, collator, RECORDS, max_new_tokens=0)


def _trainer(tmp_path, model, tok, **kw):
    args = ChainRankConfig(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        use_cpu=True,
        reference_free=True,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        disable_tqdm=True,
        save_strategy="no",
        learning_rate=1e-3,
        **kw,
    )
    return ChainRankTrainer(model, args, train_dataset=RECORDS, eval_dataset=RECORDS, processing_class=tok)


def test_callback_in_training_writes_scores_and_logs(tiny, tmp_path):
    model, tok = tiny
    import copy

    trainer = _trainer(tmp_path, copy.deepcopy(model), tok, max_steps=2, eval_strategy="steps", eval_steps=1)
    callback = add_generation_eval(trainer, num_samples=2, max_new_tokens=4)
    trainer.train()
    folder = tmp_path / "out" / "generations"
    assert sorted(p.name for p in folder.iterdir()) == ["step-1.jsonl", "step-2.jsonl"]  # nothing .tmp left
    rows = [json.loads(line) for line in (folder / "step-2.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["r0", "r1"] and all(r["scorer"] == "lexical" for r in rows)
    assert set(rows[0]) >= {"prompt", "reference", "generated", "precision", "recall", "f1"}
    logged = [h for h in trainer.state.log_history if "eval_gen/f1" in h]
    assert [h["step"] for h in logged] == [1, 2]
    metrics = trainer.evaluate()
    assert metrics["eval_gen/scorer"] == "lexical" and metrics["eval_gen/samples"] == 2.0
    assert metrics["eval_gen/f1"] == pytest.approx(callback.last_scores.f1)
    assert "eval_pairwise_accuracy" in metrics  # the trainer's assessment is still there


def test_unbound_callback_and_judge_fallback_and_wandb_table(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    logged = []
    fake = types.SimpleNamespace(
        run=object(),
        Table=lambda columns, data: ("table", columns, data),
        log=lambda payload: logged.append(payload),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    dead = GenerationEvalCallback(num_samples=1, max_new_tokens=3)
    from rankloss.integrations import EventJudge

    judge = EventJudge("http://127.0.0.1:9/v1", "nobody", request_retries=0, timeout=1.0)
    cb = GenerationEvalCallback(num_samples=2, max_new_tokens=3, judge=judge)
    trainer = _trainer(tmp_path, model, tok)
    trainer.add_callback(dead)
    trainer.add_callback(cb)
    trainer.args.report_to = ["wandb"]  # only the callback reads it here
    with pytest.warns(UserWarning, match="lexical fallback"):
        metrics = trainer.evaluate()
    assert metrics["eval_gen/scorer"] == "lexical" and cb.last_scores.scorer == "lexical"
    assert len(dead.last_rows) == 1 and len(cb.last_rows) == 2  # from the on_evaluate arguments
    tables = [p for p in logged if "eval_gen/samples_table" in p]
    assert len(tables) == 2 and tables[1]["eval_gen/samples_table"][2][1][0] == "r1"
    assert "eval_gen/f1" in tables[1]  # unbound: the numbers go to wandb with the table
    strict = GenerationEvalCallback(num_samples=1, max_new_tokens=2, judge=judge, on_judge_error="raise")
    trainer.add_callback(strict)
    with pytest.raises(Exception, match="127.0.0.1:9"):
        trainer.evaluate()


def test_callback_options():
    with pytest.raises(ValueError, match="num_samples"):
        GenerationEvalCallback(num_samples=0)
    with pytest.raises(ValueError, match="on_judge_error"):
        GenerationEvalCallback(on_judge_error="ignore")
    with pytest.raises(TypeError, match="judge"):
        GenerationEvalCallback(judge="http://x")


def _example():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "chain_rank_trainer.py"
    spec = importlib.util.spec_from_file_location("chain_rank_trainer_gen", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_example_trainer_generation_flags(tmp_path, capsys):
    pytest.importorskip("datasets")
    example = _example()
    common = [
        "--output_dir",
        str(tmp_path / "o"),
        "--report_to",
        "none",
        "--use_cpu",
        "--save_strategy",
        "no",
    ]
    for argv, message in (
        (
            ["--judge_url", "http://127.0.0.1:1/v1", "--generate_samples", "2"],
            "--judge_url needs --judge_model",
        ),
        (["--judge_url", "http://x/v1", "--judge_model", "m"], "--judge_url scores generated captions"),
        (["--generate_samples", "-1"], "--generate_samples must be >= 0"),
        (["--generate_samples", "1", "--judge_url", "nope", "--judge_model", "m"], "--judge_url: base_url"),
    ):
        with pytest.raises(SystemExit) as exc:
            example.main([*argv, *common])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    metrics = example.main(
        [
            "--num_videos",
            "4",
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--generate_samples",
            "2",
            "--generate_max_new_tokens",
            "3",
            "--disable_tqdm",
            "true",
            *common,
        ]
    )
    assert metrics["eval_gen/scorer"] == "lexical" and metrics["eval_gen/samples"] == 2.0
    rows = (tmp_path / "o" / "generations" / "step-1.jsonl").read_text().splitlines()
    assert len(rows) == 2 and json.loads(rows[0])["reference"]


def test_generation_ids_follow_generate_then_add_the_tokenizer(tiny):
    """Stops: the generation config's EOS ids (as ``model.generate`` reads them, not every config's),
    plus the tokenizer's; pad: the tokenizer's before the config's."""
    import copy

    model, tok = tiny
    model = copy.deepcopy(model)
    model.generation_config.eos_token_id = [7, 9]
    model.config.eos_token_id = 11  # not read: generate takes the generation config's
    model.generation_config.pad_token_id = None
    model.config.pad_token_id = 5
    wrapper = ChainRankModel(model)
    assert wrapper.generation_ids() == ([7, 9], 5)
    fake_tok = types.SimpleNamespace(eos_token_id=9, pad_token_id=3)
    assert wrapper.generation_ids(fake_tok) == ([7, 9], 3)
    no_pad = types.SimpleNamespace(eos_token_id=13, pad_token_id=None)
    assert wrapper.generation_ids(no_pad) == ([7, 9, 13], 5)
    model.generation_config.eos_token_id = None
    model.config.pad_token_id = None
    assert wrapper.generation_ids() == ([11], 0)
