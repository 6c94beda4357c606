"""Fine-tune a video-language model (vision tower + LLM) with listwise ranking losses over caption chains.

    python examples/train_video_rank.py        # the main job: a complete miniature, minutes on a CPU

With no arguments: synthetic videos of moving shapes and their caption chains (``rankloss.synthetic``),
split into training and held-out videos; a ~0.6M-parameter Qwen2.5-VL built from a config with a tokenizer
trained here; per seed, stage 0 (the vision tower pretrained on a static colour x shape proxy task), SFT on
the best caption of each chain with that tower frozen, reference scores cached once, then five arms from
the same SFT model on the same data (Plackett-Luce, binary DPO with one best-vs-worst pair per chain, DPO
on adjacent pairs, Plackett-Luce with the vision tower frozen, and SFT continued for as many steps as a
control); held-out assessment and generation metrics before and after every stage, per error type
(static, dynamic); a comparison table (mean ± standard error over seeds), the two claims tested as
docs/training.md states them, plots, the metrics and the trained model under ``runs/<timestamp>/``.
``--preset long`` runs the same experiment bigger (about 25 minutes on 2 CPU cores).

With arguments, the same program trains a real local checkpoint of any video-language model family
rankloss supports (``--model``: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, LLaVA-NeXT-Video) on real
videos (``--data``, ``--video-root``), on GPUs and with several processes (``accelerate launch``, recipes
in ``examples/accelerate/``; on CPU ``torchrun --nproc_per_node N ... --cpu``). The chain forward, the
collator and the losses are those of ``rankloss.integrations`` (``ChainRankModel``, ``ChainCollator``),
the parts ``ChainRankTrainer`` uses. ``docs/training.md``
documents every flag, the stages and the default experiment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence

from rankloss.train.config import DEFAULT_ARMS, PRESETS, TrainConfig

# --------------------------------------------------------------------------------------------------------
# Command line

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _d(name: str) -> str:
    value = _DEFAULTS[name]
    if isinstance(value, tuple):
        value = ",".join(value)
    return f" (default: {value})"


def build_parser() -> argparse.ArgumentParser:
    """The command line. Every flag maps to the :class:`~rankloss.train.config.TrainConfig` field of the
    same name; unspecified flags keep the dataclass defaults (and are known to be unspecified, so a flag
    that does not apply to the run is rejected instead of ignored)."""
    p = argparse.ArgumentParser(
        prog="train_video_rank.py",
        description="Fine-tune a video-language model (vision tower + LLM) with listwise ranking losses "
        "over caption chains.",
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See docs/training.md for the stages, the default experiment and real-data recipes.",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        metavar="FILE",
        help="chains JSONL (the `rankloss chains make` output); default: synthetic videos",
    )
    g.add_argument(
        "--eval-data",
        metavar="FILE",
        help="a second chains JSONL: the held-out videos (with --data; default: the records' split field, "
        "else --heldout videos drawn from --data)",
    )
    g.add_argument(
        "--video-root",
        metavar="DIR",
        help="folder the chains file's video paths are relative to (default: the chains file's folder)",
    )
    g.add_argument("--num-videos", type=int, metavar="N", help="synthetic videos" + _d("num_videos"))
    g.add_argument(
        "--heldout", type=int, metavar="N", help="held-out videos (split by video)" + _d("heldout")
    )
    g.add_argument(
        "--chain-length",
        type=int,
        metavar="K",
        help="captions per chain (synthetic: default 4; --data: keep the first K)",
    )
    g.add_argument("--frames", type=int, metavar="T", help="frames per video" + _d("frames"))
    g.add_argument(
        "--frame-size", type=int, metavar="S", help="square frame size in pixels" + _d("frame_size")
    )
    g.add_argument(
        "--max-objects", type=int, metavar="N", help="synthetic: objects per scene" + _d("max_objects")
    )
    g.add_argument(
        "--data-seed", type=int, metavar="N", help="synthetic data and the split" + _d("data_seed")
    )
    g.add_argument(
        "--prompt",
        metavar="TEXT",
        help="instruction after the video (--model with a chat template; "
        "default 'Describe this video in detail.')",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        metavar="DIR",
        help="local checkpoint + processor of a video-language model rankloss supports (Qwen2-VL, "
        "Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, LLaVA-NeXT-Video; default: a tiny Qwen2.5-VL built from a "
        "config)",
    )
    g.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="weights of --model" + _d("dtype")
    )
    g.add_argument(
        "--attn-implementation",
        choices=("auto", "sdpa", "eager", "flash_attention_2"),
        help="auto: flash_attention_2 on CUDA with flash-attn, else sdpa" + _d("attn_implementation"),
    )
    g.add_argument("--hidden-size", type=int, help="tiny model: LLM width" + _d("hidden_size"))
    g.add_argument("--num-layers", type=int, help="tiny model: LLM layers" + _d("num_layers"))
    g.add_argument("--vision-depth", type=int, help="tiny model: vision blocks" + _d("vision_depth"))
    g.add_argument(
        "--vision-hidden-size", type=int, help="tiny model: vision width" + _d("vision_hidden_size")
    )
    g.add_argument("--vocab-size", type=int, help="tiny model: BPE vocabulary cap" + _d("vocab_size"))
    g.add_argument(
        "--share-prefix",
        action=argparse.BooleanOptionalAction,
        help="run each prompt + video once per chain, its captions packed behind it in one row (the "
        "chain tree); --no-share-prefix: every caption behind its own copy" + _d("share_prefix"),
    )
    g.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="recompute each decoder layer (and vision block) in the backward instead of keeping its "
        "activations: less memory, ~1/3 more compute; the chain tree still runs each prompt once"
        + _d("gradient_checkpointing"),
    )

    g = p.add_argument_group("stage 0: a pretrained vision tower")
    g.add_argument(
        "--vision-pretrain",
        choices=("auto", "none", "proxy"),
        help="proxy: per seed, before SFT, train the tiny model's vision tower (not the merger) to name the "
        "colour x shape combinations visible in single training frames, then keep it frozen through SFT "
        "(the arms train it unless ':frozen'); none: the tower trains from scratch in SFT (or, with "
        "--model, stays as the checkpoint has it); auto: proxy for the tiny model on synthetic videos, "
        "none otherwise" + _d("vision_pretrain"),
    )
    g.add_argument("--vision-pretrain-steps", type=int, help="stage 0 steps" + _d("vision_pretrain_steps"))
    g.add_argument(
        "--vision-pretrain-lr", type=float, help="stage 0 learning rate (cosine)" + _d("vision_pretrain_lr")
    )
    g.add_argument(
        "--vision-pretrain-batch-size",
        type=int,
        help="frames per stage 0 step" + _d("vision_pretrain_batch_size"),
    )

    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--batch-size", type=int, help="chains per optimizer step, all processes" + _d("batch_size")
    )
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step" + _d("grad_accum"))
    g.add_argument(
        "--sft-steps", type=int, help="SFT steps (0: start from the model as is)" + _d("sft_steps")
    )
    g.add_argument("--sft-lr", type=float, help="SFT learning rate" + _d("sft_lr"))
    g.add_argument("--rank-steps", type=int, help="steps of every arm after SFT" + _d("rank_steps"))
    g.add_argument("--lr", type=float, help="learning rate of the arms" + _d("lr"))
    g.add_argument(
        "--lr-scheduler", choices=("constant", "linear", "cosine"), help="after warmup" + _d("lr_scheduler")
    )
    g.add_argument("--warmup-ratio", type=float, help="share of a stage's steps" + _d("warmup_ratio"))
    g.add_argument("--weight-decay", type=float, help="AdamW" + _d("weight_decay"))
    g.add_argument("--max-grad-norm", type=float, help="clipping (0: off)" + _d("max_grad_norm"))

    g = p.add_argument_group("ranking loss")
    g.add_argument(
        "--loss",
        choices=("plackett_luce", "dpo", "lipo", "sft"),
        help="single run (--no-compare): the arm's loss" + _d("loss"),
    )
    g.add_argument("--beta", type=float, help="reward scale: r = beta (s - s_ref)" + _d("beta"))
    g.add_argument(
        "--pairs",
        choices=("adjacent", "all", "best_worst", "best_rest"),
        help="dpo: pairs from each chain (default adjacent)",
    )
    g.add_argument("--dpo-loss-type", choices=("sigmoid", "hinge", "ipo"), help="dpo (default sigmoid)")
    g.add_argument("--top-k", type=int, help="plackett_luce: only the first k positions (default all)")
    g.add_argument(
        "--sft-weight",
        type=float,
        help="weight of the SFT term -s_1/n_1 added to the ranking losses" + _d("sft_weight"),
    )
    g.add_argument(
        "--length-normalize", action="store_true", help="scores are mean (not summed) token log-probs"
    )
    g.add_argument(
        "--freeze-vision", action="store_true", help="single run: train the LLM only in the ranking stage"
    )

    g = p.add_argument_group("experiment")
    g.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="default: the 10-minute main job; long: the same experiment with "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS["long"].items())
        + " (about 25 minutes on 2 CPU cores); flags typed here still win"
        + _d("preset"),
    )
    g.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        help="train every arm of --arms over --seeds seeds and write the comparison (default: on; "
        "--no-compare trains one --loss arm)",
    )
    g.add_argument(
        "--arms",
        type=lambda s: tuple(x.strip() for x in s.split(",")),
        metavar="LIST",
        help="comparison arms, each loss[:pairs][:frozen]: plackett_luce, dpo, lipo, sft; dpo may name its "
        "pairs (dpo:best_worst is binary DPO, one pair per chain)" + _d("arms"),
    )
    g.add_argument("--seeds", type=int, help="seeds of the comparison" + _d("seeds"))
    g.add_argument("--seed", type=int, help="first seed (model init and batch order)" + _d("seed"))

    g = p.add_argument_group("evaluation and logging")
    g.add_argument(
        "--eval-every",
        type=int,
        help="held-out assessment every N steps (0: only at the start and "
        "end of each stage; default: 2 per stage)",
    )
    g.add_argument("--eval-batch-size", type=int, help="chains per evaluation batch" + _d("eval_batch_size"))
    g.add_argument("--max-new-tokens", type=int, help="greedy caption length cap" + _d("max_new_tokens"))
    g.add_argument("--log-every", type=int, help="train record every N steps" + _d("log_every"))
    g.add_argument(
        "--probes",
        action=argparse.BooleanOptionalAction,
        help="per-error-type assessment in full evaluations: the true caption against one single-error "
        "caption per degradation kind (videos with scenes)" + _d("probes"),
    )

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", metavar="DIR", help="run folder (default: runs/<date-time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output-dir exactly")
    g.add_argument("--overwrite", action="store_true", help="delete an existing --output-dir first")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (0: off)" + _d("save_every"))
    g.add_argument("--keep-checkpoints", type=int, help="checkpoints kept per task" + _d("keep_checkpoints"))
    g.add_argument(
        "--save-models",
        choices=("primary", "all", "none"),
        help="primary: the first seed's --loss arm as <run>/model" + _d("save_models"),
    )
    g.add_argument(
        "--stop-after-steps",
        type=int,
        metavar="N",
        help="stop (with a checkpoint) after N optimizer "
        "steps in this invocation, per process; --resume continues",
    )
    g.add_argument(
        "--mixed-precision",
        choices=("no", "bf16", "fp16"),
        help="accelerate autocast" + _d("mixed_precision"),
    )
    g.add_argument("--cpu", action="store_true", help="use the CPU even when a GPU is present")
    g.add_argument(
        "--jobs",
        type=int,
        help="worker processes for independent tasks (default: CPU cores, up to "
        "the tasks that can run at once; 1 on GPU or under accelerate launch)",
    )
    g.add_argument("--threads", type=int, help="torch threads per process (default: cores / jobs)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bars" + _d("progress"))
    return p


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse and validate; a bad value or combination exits with status 2 and a message naming the flag."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    given = tuple(ns)
    preset = PRESETS.get(ns.get("preset", "default"))
    if preset is None:
        parser.error(f"--preset must be one of {tuple(PRESETS)}, got {ns['preset']!r}")
    for name, value in preset.items():  # a preset sets defaults; a flag typed on the command line wins
        ns.setdefault(name, value)
    config = TrainConfig(**ns, given=given)
    try:
        return config.validate()
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


# --------------------------------------------------------------------------------------------------------
# Orchestration


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _run_dir(config: TrainConfig, accelerator: object) -> str:
    from accelerate.utils import broadcast_object_list

    name = [config.output_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))]
    if accelerator.num_processes > 1:
        broadcast_object_list(name)
    return os.path.abspath(name[0])


def prepare_run(config: TrainConfig, run_dir: str, accelerator: object) -> list[str]:
    """Create (or check, for ``--resume``) the run folder: ``config.json``, the train/held-out split, the
    locally trained tokenizer + processor (tiny model), decoded videos (``--data``). Returns notes to
    print."""
    from rankloss.train.data import (
        decode_videos,
        load_chains_file,
        read_split,
        record_split,
        synthetic_chains,
    )
    from rankloss.train.files import DamagedFileError
    from rankloss.train.model import build_tiny_processor, train_tokenizer

    notes: list[str] = []
    main = accelerator.is_main_process
    cfg_path = os.path.join(run_dir, "config.json")
    if main:
        if config.resume:
            if not os.path.exists(cfg_path):
                raise SystemExit(f"error: --resume: no run to continue in {run_dir} (no config.json)")
            try:
                saved = TrainConfig.load(cfg_path)
            except DamagedFileError as exc:
                raise SystemExit(f"error: --resume: {exc}") from exc
            diff = saved.differences(config)
            if diff:
                raise SystemExit(
                    "error: --resume with settings that differ from the run's config.json: " + "; ".join(diff)
                )
        elif os.path.exists(run_dir) and os.listdir(run_dir):
            if not config.overwrite:
                raise SystemExit(
                    f"error: --output-dir {run_dir} exists and is not empty: pass --resume to continue "
                    "it or --overwrite to start over"
                )
            shutil.rmtree(run_dir)
        os.makedirs(os.path.join(run_dir, "data"), exist_ok=True)
        config.save(cfg_path)
    accelerator.wait_for_everyone()
    split_path = os.path.join(run_dir, "data", "split.json")
    if config.synthetic:
        chains = synthetic_chains(config)
    else:
        chains, notes = load_chains_file(
            config.data, config.video_root, config.chain_length, eval_path=config.eval_data
        )
        try:
            by_record = record_split(chains)
        except ValueError as exc:
            raise SystemExit(f"error: --data {config.data}: {exc}") from exc
        if by_record is not None:
            if "heldout" in config.given:
                raise SystemExit(
                    "error: --heldout does not apply: the records of --data carry a 'split' field, which "
                    "makes the train/held-out split"
                )
            notes.append("split: from the records' 'split' field")
    try:
        # made (or made again, when damaged) by the main process; the others read what it wrote
        if main:
            read_split(split_path, chains, config.heldout, config.data_seed)
        accelerator.wait_for_everyone()
        split = read_split(split_path, chains, config.heldout, config.data_seed, write=False)
    except DamagedFileError as exc:
        raise SystemExit(f"error: {exc}") from exc
    proc_dir = os.path.join(run_dir, "processor")
    if main and config.model is None and not os.path.exists(os.path.join(proc_dir, "tokenizer.json")):
        train_ids = set(split["train"])
        tokenizer = train_tokenizer(
            [t for c in chains if c.id in train_ids for t in c.captions], config.vocab_size
        )
        build_tiny_processor(tokenizer, config.frame_size).save_pretrained(proc_dir + ".tmp")
        shutil.rmtree(proc_dir, ignore_errors=True)
        os.replace(proc_dir + ".tmp", proc_dir)
    if main and not config.synthetic:
        from rankloss.chains.progress import Progress

        bar = Progress(len(chains), "decoding videos", enabled=config.progress)
        decode_videos(chains, os.path.join(run_dir, "data"), config.frames, config.frame_size, bar.update)
        bar.close()
        if config.vision_pretrain == "proxy" and any(c.scene is None for c in chains):
            raise SystemExit(
                "error: --vision-pretrain proxy labels frames from the videos' scenes; this chains file "
                "has records without source.scene (use `rankloss synthetic make` data or "
                "--vision-pretrain none)"
            )
        if any(c.scene is None for c in chains):
            notes.append(
                "the chains carry no scenes: generation is scored by word overlap with the best caption "
                "(gen_word_*), not fact by fact"
            )
    accelerator.wait_for_everyone()
    notes.insert(
        0,
        f"data: {len(split['train'])} training and {len(split['heldout'])} held-out videos, "
        f"{len(chains[0].captions)} captions in the first chain",
    )
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    t_start = time.perf_counter()
    config = parse_config(argv)
    import torch

    from rankloss._launch import leave_process_group
    from rankloss.train.loop import StopRequested, make_accelerator
    from rankloss.train.runner import plan_tasks, run_plan

    accelerator = make_accelerator(config)
    distributed = accelerator.num_processes > 1
    parallel_tasks = len(config.seed_list) * len(config.arm_list)
    if distributed or accelerator.device.type != "cpu":
        if config.jobs not in (None, 1):
            raise SystemExit(
                "error: --jobs > 1 runs tasks in CPU worker processes; it does not combine with "
                "accelerate launch or a GPU (use one process per GPU instead)"
            )
        jobs = 1
    else:
        jobs = config.jobs or max(1, min(_cores(), parallel_tasks))
    threads = config.threads or max(1, _cores() // jobs)
    if jobs == 1 and config.threads:
        torch.set_num_threads(config.threads)
    run_dir = _run_dir(config, accelerator)
    config.output_dir = run_dir
    notes = prepare_run(config, run_dir, accelerator)
    say = print if accelerator.is_main_process else (lambda *a, **k: None)
    tasks = plan_tasks(config)
    say(f"run folder: {run_dir}")
    for note in notes:
        say(note)
    model = config.model or (
        f"tiny Qwen2.5-VL (text {config.hidden_size} x {config.num_layers} layers, vision "
        f"{config.vision_hidden_size} x {config.vision_depth} blocks), from scratch"
    )
    say(
        f"model: {model}; device: {accelerator.device}, {accelerator.num_processes} process(es), "
        f"{jobs} job(s) x {threads if jobs > 1 else torch.get_num_threads()} thread(s)"
    )
    if config.vision_pretrain == "proxy":
        say(
            f"stage 0: vision tower pretrained per seed on the colour x shape proxy "
            f"({config.vision_pretrain_steps} steps of {config.vision_pretrain_batch_size} frames, lr "
            f"{config.vision_pretrain_lr:g}), then frozen through SFT (the merger trains)"
        )
    say(
        f"plan: {len(tasks)} tasks = {len(config.seed_list)} seed(s) x (SFT {config.sft_steps} steps + "
        f"{len(config.arm_list)} arm(s) x {config.rank_steps} steps: "
        f"{', '.join(a.spec for a in config.arm_list)})"
    )
    try:
        run_plan(
            config,
            run_dir,
            accelerator=accelerator if jobs == 1 else None,
            jobs=jobs,
            threads=threads,
            show_progress=config.progress,
        )
    except StopRequested as exc:
        say(f"{exc}; checkpoints are in {run_dir}")
        say(f"continue with the same command plus: --output-dir {run_dir} --resume")
        leave_process_group()
        return 0
    if accelerator.is_main_process:
        _report(config, run_dir, say, t_start)
    # every rank leaves together, after the main process wrote the reports (a gloo rank that exits
    # straight after its last collective can abort; see leave_process_group)
    leave_process_group()
    return 0


def _report(config: TrainConfig, run_dir: str, say: Callable[..., None], t_start: float) -> None:
    """The main process's end of a run: the reports written and printed, with where everything is."""
    from rankloss.train.report import write_reports

    paths = write_reports(config, run_dir)
    with open(paths["summary"], encoding="utf-8") as f:
        say("\n" + f.read())
    if "comparison" in paths:
        with open(paths["comparison"], encoding="utf-8") as f:
            say(f.read())
    if config.vision_pretrain == "proxy":
        say(_vision_pretrain_line(config, run_dir))
    model_dir = os.path.join(run_dir, "model")
    say("written:")
    if os.path.isdir(model_dir):
        say(
            f"  trained model ({config.primary_arm.title(config.pairs)}, seed {config.seed_list[0]}): "
            f"{model_dir}"
        )
    for name, path in paths.items():
        say(f"  {name}: {path}")
    say(f"total wall time: {time.perf_counter() - t_start:.0f} s")


def _vision_pretrain_line(config: TrainConfig, run_dir: str) -> str:
    """Stage 0's held-out proxy F1 (overall, colour, shape) and time, mean over seeds."""
    from rankloss.train.vision_pretrain import pretrain_dir

    rows = []
    for seed in config.seed_list:
        path = os.path.join(pretrain_dir(run_dir, seed), "done.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                rows.append(json.load(f))
    if not rows:
        return "stage 0 (vision pretrain): no results"

    def mean(key: str) -> float:
        vals = [r["heldout"].get(key, float("nan")) for r in rows]
        return sum(vals) / len(vals)

    secs = sum(r.get("seconds", 0.0) for r in rows) / len(rows)
    return (
        f"stage 0 (vision pretrain, {len(rows)} seed(s)): held-out proxy F1 {mean('f1'):.3f} "
        f"(colour {mean('colour_f1'):.3f}, shape {mean('shape_f1'):.3f}), {secs:.0f} s per seed; "
        f"per seed in {os.path.join(run_dir, 'seed<k>', 'vision_pretrain', 'done.json')}"
    )


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["DEFAULT_ARMS", "build_parser", "parse_config", "prepare_run", "main"]
