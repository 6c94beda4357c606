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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import transformers

from rankloss.integrations import ChainRankConfig, ChainRankTrainer, load_chain_dataset


@dataclass
class ScriptArgs:
    model: str | None = field(default=None, metadata={"help": "local checkpoint; default: a tiny Qwen2.5-VL"})
    data: str | None = field(default=None, metadata={"help": "chains JSONL; default: synthetic videos"})
    video_root: str | None = field(default=None, metadata={"help": "folder the data's video paths are in"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out chains JSONL"})
    num_videos: int = field(default=24, metadata={"help": "synthetic videos (without --data)"})
    chain_length: int | None = field(default=None, metadata={"help": "cut chains to this many captions"})


def synthetic_setup(n: int, seed: int = 0):
    """A tiny Qwen2.5-VL, its processor and ``n`` synthetic chain records with their frames."""
    from rankloss.synthetic import synthetic_record
    from rankloss.train.model import build_tiny_model, build_tiny_processor, tiny_config, train_tokenizer

    size = 56
    recs = [synthetic_record(i, seed=seed, chain_length=4, num_frames=4, size=size) for i in range(n)]
    tokenizer = train_tokenizer([c for r in recs for c in r.chain] + ["Describe this video in detail."], 600)
    processor = build_tiny_processor(tokenizer, size)
    model = build_tiny_model(tiny_config(tokenizer, hidden_size=64, vision_hidden_size=32), seed=seed)
    data = [{"id": r.id, "videos": [r.frames], "completions": list(r.chain)} for r in recs]
    return model, processor, data


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = transformers.HfArgumentParser((ScriptArgs, ChainRankConfig))
    if argv is None:
        script, args = parser.parse_args_into_dataclasses()
    else:
        script, args = parser.parse_args_into_dataclasses(args=argv)
    if script.model is not None and script.data is None:
        parser.error("--model needs --data (a chains JSONL): the synthetic data only fits the tiny model")
    eval_data = None
    if script.model is None:
        model, processor, data = synthetic_setup(script.num_videos + 8)
        data, eval_data = data[:-8], data[-8:]
    else:
        processor = transformers.AutoProcessor.from_pretrained(script.model, local_files_only=True)
        model = script.model  # ChainRankTrainer loads it (AutoModelForImageTextToText or ForCausalLM)
    if script.data is not None:
        data = load_chain_dataset(script.data, video_root=script.video_root, chain_length=script.chain_length)
    if script.eval_data is not None:
        eval_data = load_chain_dataset(script.eval_data, video_root=script.video_root)
    trainer = ChainRankTrainer(
        model, args, train_dataset=data, eval_dataset=eval_data, processing_class=processor
    )
    before = trainer.evaluate() if eval_data is not None else {}
    trainer.train()
    trainer.save_model()
    after = trainer.evaluate() if eval_data is not None else {}
    if after and trainer.is_world_process_zero():
        print(f"{'held-out metric':<28}{'before':>10}{'after':>10}")
        for key in (
            "eval_pairwise_accuracy",
            "eval_top1_accuracy",
            "eval_kendall_tau",
            "eval_best_logp_per_token",
        ):
            print(f"{key:<28}{before[key]:>10.4f}{after[key]:>10.4f}")
    return after


if __name__ == "__main__":
    main()
