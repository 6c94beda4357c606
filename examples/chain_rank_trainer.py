"""Listwise preference training with ``rankloss.integrations.ChainRankTrainer``, a ``transformers.Trainer``.

Every ``ChainRankConfig`` field is a flag (``transformers.HfArgumentParser``: ``--loss``, ``--beta``,
``--per_device_train_batch_size``, ``--gradient_accumulation_steps``, ``--learning_rate``, ...). With no
``--model`` it builds a tiny Qwen2.5-VL from a config and trains it on synthetic videos (seconds on a CPU);
with ``--model PATH`` (a local checkpoint of any supported family) and ``--data chains.jsonl`` (the
``rankloss chains make`` output) it is the real thing, e.g. on several GPUs:

    python examples/chain_rank_trainer.py --output_dir out
    accelerate launch examples/chain_rank_trainer.py --model /ckpt/Qwen2.5-VL-7B-Instruct \\
        --data chains.jsonl --video_root videos/ --num_frames 16 --output_dir out --bf16 \\
        --loss plackett_luce --beta 0.1 --per_device_train_batch_size 2 --gradient_accumulation_steps 8

``--generate_samples N`` captions the first N held-out records greedily at every evaluation, writes them
with their references to ``<output_dir>/generations/step-<step>.jsonl`` and adds ``eval_gen/precision``,
``eval_gen/recall`` and ``eval_gen/f1``: an LLM judge's event-level scores with ``--judge_url URL
--judge_model NAME`` (an OpenAI-compatible server), else the weaker lexical fallback (docs/evaluation.md).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import transformers

from rankloss.integrations import ChainRankConfig, ChainRankTrainer, add_generation_eval, load_chain_dataset


@dataclass
class ScriptArgs:
    model: str | None = field(default=None, metadata={"help": "local checkpoint; default: a tiny Qwen2.5-VL"})
    data: str | None = field(default=None, metadata={"help": "chains JSONL; default: synthetic videos"})
    video_root: str | None = field(default=None, metadata={"help": "folder the data's video paths are in"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out chains JSONL"})
    num_videos: int = field(default=24, metadata={"help": "synthetic videos (without --data)"})
    chain_length: int | None = field(default=None, metadata={"help": "cut chains to this many captions"})
    prompt: str | None = field(
        default=None,
        metadata={
            "help": "instruction after the video (--data records); default: the collator's default prompt"
        },
    )
    generate_samples: int = field(
        default=0, metadata={"help": "caption the first N held-out records at every evaluation (0: off)"}
    )
    generate_max_new_tokens: int = field(default=64, metadata={"help": "tokens per generated caption"})
    judge_url: str | None = field(
        default=None,
        metadata={"help": "OpenAI-compatible API root of a judge model (default: the lexical fallback)"},
    )
    judge_model: str | None = field(default=None, metadata={"help": "the judge's served model name"})
    judge_api_key_env: str | None = field(
        default=None, metadata={"help": "variable holding the judge's API key (default OPENAI_API_KEY)"}
    )


def synthetic_setup(n: int, seed: int = 0):
    """A tiny Qwen2.5-VL, its processor and ``n`` synthetic chain records with their frames."""
    from rankloss.synthetic import synthetic_record
    from rankloss.train.model import build_tiny_model, build_tiny_processor, tiny_config, train_tokenizer

    size = 56
    recs = [synthetic_record(i, seed=seed, chain_length=4, num_frames=4, size=size) for i in range(n)]
    tokenizer = train_tokenizer([c for r in recs for c in r.chain] + ["Describe this video in detail."], 600)
    processor = build_tiny_processor(tokenizer, size)
    model = build_tiny_model(tiny_config(tokenizer, hidden_size=64, vision_hidden_size=32), seed=seed)
    # no chat template: the prompt is the video alone, between its markers, as in the example trainer
    # (rankloss.train.data.make_collator); a text after it would merge with the captions' first tokens
    data = [{"id": r.id, "prompt": "", "videos": [r.frames], "completions": list(r.chain)} for r in recs]
    return model, processor, data


#: option names in messages of LossSpec / ChainRankConfig -> the ChainRankConfig flag
_LOSS_FLAGS = {
    "loss": "loss",
    "beta": "beta",
    "pairs": "pairs",
    "dpo_loss_type": "loss_type",
    "loss_type": "loss_type",
    "top_k": "top_k",
    "sft_weight": "sft_weight",
    "filter_eps": "filter_eps",
    "length_normalize": "length_normalize",
    "deterministic": "deterministic",
}


def _typed(flag: str, argv: Sequence[str]) -> str:
    """``--flag`` as the user typed it (``--loss_type`` or ``--loss-type``)."""
    spellings = {f"--{flag}", f"--{flag.replace('_', '-')}"}
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name in spellings:
            return name
    return f"--{flag}"


def _flag_message(message: str, argv: Sequence[str]) -> str:
    """A LossSpec / ChainRankConfig message with the option it starts with written as the flag."""
    m = re.match(r"(\w+)\b", message)
    if m and m.group(1) in _LOSS_FLAGS:
        return _typed(_LOSS_FLAGS[m.group(1)], argv) + message[m.end() :]
    return message


def _check_records(parser, data, what: str, args, argv: Sequence[str]) -> None:
    """Record-level requirements the collator would only meet at the first batch (after the model is
    loaded and the reference scored): video files need ``--num_frames``."""
    if data is None or args.num_frames is not None:
        return
    n, first = 0, None
    for rec in data:
        files = [v for v in (rec.get("videos") or []) if isinstance(v, (str, os.PathLike))]
        if files:
            n += 1
            first = first or (rec.get("id"), files[0])
    if n:
        parser.error(
            f"{_typed('num_frames', argv)} is required: {n} record(s) of {what} have video files (e.g. "
            f"record {first[0]!r}: {first[1]!r}), and the frames sampled from each must be set (e.g. "
            f"{_typed('num_frames', argv)} 16)"
        )


def _resume_target(parser, args, argv: Sequence[str]) -> str | bool | None:
    """``--resume_from_checkpoint`` as ``Trainer.train`` takes it: a checkpoint folder, or ``True`` for the
    last checkpoint in ``--output_dir`` (``true`` / ``last``); checked now, not after the model is loaded."""
    value = args.resume_from_checkpoint
    if value is None or value == "":
        return None
    flag = _typed("resume_from_checkpoint", argv)
    if str(value).strip().lower() in ("true", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        if not os.path.isdir(args.output_dir) or get_last_checkpoint(args.output_dir) is None:
            parser.error(f"{flag} {value}: no checkpoint-* folder in --output_dir {args.output_dir!r}")
        return True
    if not os.path.isdir(value):
        parser.error(f"{flag} {value!r}: no such checkpoint folder")
    return value


def _generation_judge(parser, script, argv: Sequence[str]):
    """The generation options checked (before any model is loaded); the judge, or ``None``."""
    gen = _typed("generate_samples", argv)
    if script.generate_samples < 0:
        parser.error(f"{gen} must be >= 0 (0: no generation), got {script.generate_samples}")
    if script.generate_max_new_tokens < 1:
        parser.error(
            f"{_typed('generate_max_new_tokens', argv)} must be >= 1, got {script.generate_max_new_tokens}"
        )
    url, model = _typed("judge_url", argv), _typed("judge_model", argv)
    if (script.judge_url is None) != (script.judge_model is None):
        given, missing = (url, model) if script.judge_url is not None else (model, url)
        parser.error(f"{given} needs {missing} too (the judge's API root and its served model name)")
    if script.judge_api_key_env is not None and script.judge_url is None:
        parser.error(f"{_typed('judge_api_key_env', argv)} is for the judge: give {url} and {model}")
    if script.judge_url is None:
        return None
    if script.generate_samples == 0:
        parser.error(f"{url} scores generated captions: set {gen} N too")
    from rankloss.integrations import EventJudge

    kwargs = {} if script.judge_api_key_env is None else {"api_key_env": script.judge_api_key_env}
    try:
        return EventJudge(script.judge_url, script.judge_model, **kwargs)
    except ValueError as exc:
        parser.error(f"{url}: {exc}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = transformers.HfArgumentParser((ScriptArgs, ChainRankConfig))
    typed = list(sys.argv[1:] if argv is None else argv)
    # Every option and record requirement is checked here, before any model is loaded or any reference
    # score computed; an error names the flag as it was typed and exits with status 2.
    try:
        script, args = parser.parse_args_into_dataclasses(args=typed)
    except ValueError as exc:  # ChainRankConfig / TrainingArguments.__post_init__
        parser.error(_flag_message(str(exc), typed))
    try:
        args.loss_spec()  # loss, beta, pairs, loss_type, top_k, sft_weight, filter_eps
    except (TypeError, ValueError) as exc:
        parser.error(_flag_message(str(exc), typed))
    if script.model is not None and script.data is None:
        parser.error("--model needs --data (a chains JSONL): the synthetic data only fits the tiny model")
    if script.model is None and script.prompt is not None:
        parser.error("--prompt applies to --model checkpoints; the tiny default model has its own prompt")
    resume = _resume_target(parser, args, typed)
    judge = _generation_judge(parser, script, typed)
    if script.generate_samples and script.model is not None and script.eval_data is None:
        parser.error(
            f"{_typed('generate_samples', typed)} captions held-out records: give "
            f"{_typed('eval_data', typed)}"
        )
    eval_data = data = None
    try:
        if script.data is not None:
            data = load_chain_dataset(
                script.data,
                prompt=script.prompt,
                video_root=script.video_root,
                chain_length=script.chain_length,
            )
        if script.eval_data is not None:
            eval_data = load_chain_dataset(
                script.eval_data, prompt=script.prompt, video_root=script.video_root
            )
    except (ValueError, TypeError, FileNotFoundError) as exc:
        parser.error(str(exc))
    _check_records(parser, data, "--data", args, typed)
    _check_records(parser, eval_data, "--eval_data", args, typed)
    if script.model is None:
        model, processor, synthetic = synthetic_setup(script.num_videos + 8)
        if data is None:
            data = synthetic[:-8]
            if eval_data is None:
                eval_data = synthetic[-8:]
    else:
        processor = transformers.AutoProcessor.from_pretrained(script.model, local_files_only=True)
        model = script.model  # ChainRankTrainer loads it (AutoModelForImageTextToText or ForCausalLM)
    trainer = ChainRankTrainer(
        model, args, train_dataset=data, eval_dataset=eval_data, processing_class=processor
    )
    if script.generate_samples and eval_data is not None:
        add_generation_eval(
            trainer,
            num_samples=script.generate_samples,
            max_new_tokens=script.generate_max_new_tokens,
            judge=judge,
        )
    before = trainer.evaluate() if eval_data is not None else {}
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    after = trainer.evaluate() if eval_data is not None else {}
    if after and trainer.is_world_process_zero():
        print(f"{'held-out metric':<28}{'before':>10}{'after':>10}")
        for key in (
            "eval_pairwise_accuracy",
            "eval_top1_accuracy",
            "eval_kendall_tau",
            "eval_best_logp_per_token",
            "eval_gen/precision",
            "eval_gen/recall",
            "eval_gen/f1",
        ):
            if key in before and key in after:
                print(f"{key:<28}{before[key]:>10.4f}{after[key]:>10.4f}")
        if "eval_gen/scorer" in after:
            print(f"generated captions scored by: {after['eval_gen/scorer']} (docs/evaluation.md)")
    return after


if __name__ == "__main__":
    main()
