"""The ``rankloss`` command line (also ``python -m rankloss``).

::

    rankloss chains make --in captions.jsonl --out chains.jsonl --length 6 --seed 0 [--engine rules|llm
                         --llm-model PATH] [--types ...] [--strict] [--encoding utf-8] [--no-resume]
                         [--overwrite]
    rankloss chains make --in captions.jsonl --out chains.jsonl --engine openai
                         --base-url http://localhost:8000/v1 --model NAME [--concurrency 32]
                         [--timeout 60] [--request-retries 5] [--api-key-env OPENAI_API_KEY]
    rankloss chains summary chains.jsonl [--json]
    rankloss chains show chains.jsonl [-n 3]
    rankloss synthetic make --out DIR --n 100 --length 6 --seed 0 [--frames 16 --size 64 --no-mp4]
    rankloss video probe clip.mp4 [--frames 8 --size 224]
    rankloss eval CHECKPOINT [CHECKPOINT ...] --data chains.jsonl [--ref REF_CHECKPOINT | --reference-free]
                  [--num-frames N] [--generate N] [--judge-url URL --judge-model NAME] [--out DIR]
                  [--split NAME] [--beta 0.1]

Documentation: docs/chains.md, docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _size(text: str) -> int | tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW, got {text!r}") from None
    if len(vals) == 1 and vals[0] > 0:
        return vals[0]
    if len(vals) == 2 and min(vals) > 0:
        return (vals[0], vals[1])
    raise argparse.ArgumentTypeError(f"expected a positive SIZE or HxW, got {text!r}")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rankloss", description="rankloss tools: caption chains, synthetic videos, video files."
    )
    sub = p.add_subparsers(dest="group", required=True, metavar="{chains,synthetic,video,eval}")

    chains = sub.add_parser("chains", help="build and inspect caption chains")
    csub = chains.add_subparsers(dest="command", required=True, metavar="{make,summary,show}")

    mk = csub.add_parser("make", help="turn a captions JSONL file into a chains JSONL file")
    mk.add_argument("--in", dest="in_path", required=True, help="input captions (JSONL or a .json array)")
    mk.add_argument("--out", dest="out_path", required=True, help="output chains JSONL")
    mk.add_argument("--length", type=_positive_int, default=6, help="captions per chain K (>= 2; default 6)")
    mk.add_argument(
        "--seed", type=int, default=0, help="seed (each chain depends only on seed and record id)"
    )
    mk.add_argument(
        "--engine",
        choices=("rules", "llm", "openai"),
        default="rules",
        help="degradation engine (default rules; openai: a served model, see --base-url)",
    )
    mk.add_argument("--llm-model", default=None, help="local transformers causal LM directory (--engine llm)")
    mk.add_argument("--types", default=None, help="comma-separated edit types to use (default: all)")
    mk.add_argument(
        "--strict", action="store_true", help="fail on the first bad input line instead of skipping it"
    )
    mk.add_argument(
        "--encoding",
        default="utf-8",
        help="the input's text encoding (default utf-8; a line with bytes not valid in it is a bad line)",
    )
    mk.add_argument(
        "--no-resume", dest="resume", action="store_false", help="discard a partial output, start over"
    )
    mk.add_argument("--overwrite", action="store_true", help="replace an existing finished output")
    mk.add_argument(
        "--min-length", type=_positive_int, default=2, help="do not write chains shorter than this"
    )
    mk.add_argument(
        "--max-chains", type=int, default=None, help="stop after this many new chains (resume later)"
    )
    mk.add_argument("--summary-json", default=None, help="also write the summary as JSON to this file")
    mk.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    mk.add_argument("--max-retries", type=int, default=2, help="llm: retries per step before falling back")
    mk.add_argument(
        "--max-new-tokens", type=_positive_int, default=None, help="llm: generation budget per try"
    )
    mk.add_argument("--device", default=None, help="llm: device (default cuda if available, else cpu)")
    mk.add_argument("--dtype", default=None, help="llm: torch dtype name, e.g. bfloat16")
    mk.add_argument(
        "--base-url", default=None, help="openai: the server's API root, e.g. http://localhost:8000/v1"
    )
    mk.add_argument("--model", default=None, help="openai: the served model's name")
    mk.add_argument(
        "--api-key-env",
        default=None,
        help="openai: environment variable holding the API key (default OPENAI_API_KEY, if set)",
    )
    mk.add_argument(
        "--concurrency", type=_positive_int, default=8, help="openai: records in flight (default 8)"
    )
    mk.add_argument(
        "--timeout", type=_positive_float, default=60.0, help="openai: seconds per request (default 60)"
    )
    mk.add_argument(
        "--request-retries",
        type=int,
        default=5,
        help="openai: resends of a request on 429/5xx/timeout/connection error (default 5)",
    )
    mk.add_argument(
        "--backoff", type=float, default=1.0, help="openai: first retry delay in s, doubling (default 1)"
    )
    mk.add_argument("--max-backoff", type=float, default=30.0, help="openai: longest retry delay, s")
    mk.add_argument(
        "--temperature", type=_positive_float, default=0.7, help="llm/openai: sampling temperature of retries"
    )
    mk.add_argument("--top-p", type=float, default=0.95, help="openai: top_p of the sampling retries")
    mk.add_argument("--max-tokens", type=_positive_int, default=1024, help="openai: max_tokens per request")
    mk.add_argument(
        "--no-seed", dest="send_seed", action="store_false", help="openai: do not send a seed per request"
    )

    sm = csub.add_parser("summary", help="summarise an existing chains JSONL file")
    sm.add_argument("path")
    sm.add_argument("--json", action="store_true", help="print JSON instead of text")

    sh = csub.add_parser("show", help="print chains with their edits")
    sh.add_argument("path")
    sh.add_argument("-n", type=_positive_int, default=3, help="how many chains (default 3)")

    syn = sub.add_parser("synthetic", help="synthetic videos of moving shapes with chains")
    ssub = syn.add_subparsers(dest="command", required=True, metavar="{make}")
    sy = ssub.add_parser("make", help="write synthetic videos, chains.jsonl and captions.jsonl to a folder")
    sy.add_argument("--out", required=True, help="output folder")
    sy.add_argument("--n", type=_positive_int, default=100, help="number of videos (default 100)")
    sy.add_argument("--length", type=_positive_int, default=6, help="captions per chain (default 6)")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--frames", type=_positive_int, default=16, help="frames per video (default 16)")
    sy.add_argument("--size", type=_size, default=64, help="frame size: SIZE or HxW, even (default 64)")
    sy.add_argument("--fps", type=_positive_int, default=8)
    sy.add_argument("--max-objects", type=_positive_int, default=3)
    sy.add_argument("--no-mp4", dest="mp4", action="store_false", help="write the JSONL files only")

    vid = sub.add_parser("video", help="video files")
    vsub = vid.add_subparsers(dest="command", required=True, metavar="{probe}")
    vp = vsub.add_parser("probe", help="print a video's metadata and the shape load_video returns")
    vp.add_argument("path")
    vp.add_argument("--frames", type=_positive_int, default=8)
    vp.add_argument("--size", type=_size, default=None)

    ev = sub.add_parser(
        "eval",
        help="assess saved checkpoints on a chains JSONL: ranking metrics and generated captions",
        description="Assess checkpoints on a chains JSONL: ChainRankTrainer.evaluate()'s ranking metrics "
        "(reference-free log-probs; implicit rewards with --ref; per edit type and per chain position) and "
        "greedy captions of the first --generate records scored against their references (an LLM judge "
        "with --judge-url, else the weaker lexical fallback). Writes report.json and report.md to --out.",
    )
    ev.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                    help="saved model folder(s) (save_pretrained / ChainRankTrainer.save_model); several: "
                    "one column each in the report")  # fmt: skip
    ev.add_argument("--data", required=True, help="chains JSONL (rankloss chains make output)")
    ev.add_argument("--video-root", default=None, help="folder the records' video paths are relative to")
    ev.add_argument("--split", default=None, help="only the records whose 'split' field is NAME")
    ev.add_argument(
        "--chain-length", type=_positive_int, default=None, help="cut chains to this many captions"
    )
    ev.add_argument("--prompt", default=None, help="the instruction (default: the collator's default prompt)")
    ev.add_argument("--num-frames", type=_positive_int, default=None, help="frames sampled per video file")
    refs = ev.add_mutually_exclusive_group()
    refs.add_argument("--ref", default=None, metavar="REF_CHECKPOINT",
                      help="reference model: implicit rewards beta * (s - s_ref)")  # fmt: skip
    refs.add_argument("--reference-free", action="store_true",
                      help="no reference model (the default without --ref): rewards beta * s")  # fmt: skip
    ev.add_argument("--beta", type=_positive_float, default=0.1, help="reward scale (default 0.1)")
    ev.add_argument("--length-normalize", action="store_true", help="scores are mean token log-probs")
    ev.add_argument("--max-completion-length", type=_positive_int, default=None, help="cut completions")
    ev.add_argument("--batch-size", type=_positive_int, default=4, help="records per batch (default 4)")
    ev.add_argument("--generate", type=int, default=8, metavar="N",
                    help="caption the first N records greedily (default 8; 0: no generation)")  # fmt: skip
    ev.add_argument(
        "--max-new-tokens", type=_positive_int, default=256, help="tokens per caption (default 256)"
    )
    ev.add_argument("--judge-url", default=None, help="OpenAI-compatible API root of the judge model, e.g. "
                    "http://localhost:8000/v1 (default: the lexical fallback)")  # fmt: skip
    ev.add_argument("--judge-model", default=None, help="the judge's served model name")
    ev.add_argument("--judge-api-key-env", default=None,
                    help="variable holding the judge's API key (default OPENAI_API_KEY, if set)")  # fmt: skip
    ev.add_argument("--judge-timeout", type=_positive_float, default=120.0, help="seconds per judge request")
    ev.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="load the models in this dtype (default: as saved)")  # fmt: skip
    ev.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    ev.add_argument("--out", default="rankloss-eval", help="report folder (default rankloss-eval)")
    return p


class _UsageError(ValueError):
    """A bad option of a command: reported as argparse does (status 2)."""


def _chains_make(args: argparse.Namespace) -> int:
    from .chains import make_chains_file

    llm_options = {}
    if args.engine == "llm":
        llm_options = {
            "max_retries": args.max_retries,
            "max_new_tokens": args.max_new_tokens,
            "device": args.device,
            "dtype": args.dtype,
            "temperature": args.temperature,
        }
    elif args.engine == "openai":
        if args.llm_model is not None:
            raise ValueError("--llm-model is for --engine llm; --engine openai takes --model NAME")
        if not args.base_url or not args.model:
            raise ValueError("--engine openai needs --base-url URL and --model NAME")
        llm_options = {
            "base_url": args.base_url,
            "model": args.model,
            "concurrency": args.concurrency,
            "timeout": args.timeout,
            "request_retries": args.request_retries,
            "backoff": args.backoff,
            "max_backoff": args.max_backoff,
            "max_retries": args.max_retries,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_tokens": args.max_tokens,
            "send_seed": args.send_seed,
        }
        if args.api_key_env is not None:
            llm_options["api_key_env"] = args.api_key_env
    elif args.llm_model is not None:
        raise ValueError("--llm-model needs --engine llm")
    if args.summary_json:  # written after the run: it may not be the input or a file of the output
        from .chains.formats import check_not_same_file, writer_paths

        check_not_same_file(
            args.summary_json,
            {"input": args.in_path, **writer_paths(args.out_path)},
            "--summary-json file",
            "give --summary-json a path of its own",
        )
    summary = make_chains_file(
        args.in_path,
        args.out_path,
        length=args.length,
        seed=args.seed,
        engine=args.engine,
        types=args.types,
        llm_model=args.llm_model,
        strict=args.strict,
        encoding=args.encoding,
        resume=args.resume,
        overwrite=args.overwrite,
        min_length=args.min_length,
        max_chains=args.max_chains,
        progress=args.progress,
        **llm_options,
    )
    print(summary.format(), file=sys.stderr)
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as f:
            json.dump(summary.to_dict(), f, indent=2)
    return 0


def _chains_summary(args: argparse.Namespace) -> int:
    from .chains import summarize_chains

    s = summarize_chains(args.path)
    print(json.dumps(s.to_dict(), indent=2) if args.json else s.format())
    return 0


def _chains_show(args: argparse.Namespace) -> int:
    from .chains import read_chains

    for i, rec in enumerate(read_chains(args.path)):
        if i >= args.n:
            break
        print(f"=== {rec.get('id')}  video={rec.get('video')}  K={len(rec['chain'])}")
        print(f"[0] {rec['chain'][0]}")
        for e in rec.get("edits", []):
            sub = f"/{e.get('subtype')}" if e.get("subtype") else ""
            print(f"  edit {e['step']}: {e['type']}{sub}: {e.get('before', '')!r} -> {e.get('after', '')!r}")
        if len(rec["chain"]) > 1:
            print(f"[{len(rec['chain']) - 1}] {rec['chain'][-1]}")
    return 0


def _synthetic_make(args: argparse.Namespace) -> int:
    from .synthetic import make_synthetic_dataset

    recs = make_synthetic_dataset(
        args.n,
        args.length,
        args.seed,
        out_dir=args.out,
        write_mp4=args.mp4,
        num_frames=args.frames,
        size=args.size,
        fps=args.fps,
        max_objects=args.max_objects,
        keep_frames=False,
    )
    short = sum(len(r.chain) < args.length for r in recs)
    what = "mp4 videos, " if args.mp4 else ""
    print(f"wrote {len(recs)} synthetic {what}chains.jsonl and captions.jsonl to {args.out} "
          f"({short} chains shorter than {args.length})", file=sys.stderr)  # fmt: skip
    return 0


def _video_probe(args: argparse.Namespace) -> int:
    from .video import load_video, video_info

    info = video_info(args.path)
    frames = load_video(args.path, args.frames, args.size)
    info["loaded_shape"] = list(frames.shape)
    info["loaded_dtype"] = str(frames.dtype)
    print(json.dumps(info, indent=2))
    return 0


# ------------------------------------------------------------------------------------------------------
# rankloss eval

#: Trainer metrics that are about the run, not the model.
_RUN_KEYS = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time", "epoch")


def _has_config(path: str) -> bool:
    import os

    return os.path.isfile(os.path.join(path, "config.json"))


def _is_vlm(path: str) -> bool:
    import os

    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return "vision_config" in json.load(f)
    except (OSError, ValueError):
        return False


def _eval_records(args: argparse.Namespace) -> Any:
    """The chains of ``--data`` (``--split`` applied) as a chain dataset; checked, nothing loaded."""
    import os

    from .integrations import load_chain_dataset

    if not os.path.isfile(args.data):
        raise _UsageError(f"--data {args.data!r}: no such file")
    source: Any = args.data
    video_root = args.video_root
    if args.split is not None:
        from .chains import read_chains

        rows = list(read_chains(args.data))
        source = [r for r in rows if isinstance(r, dict) and r.get("split") == args.split]
        if not source:
            found = sorted({str(r.get("split")) for r in rows if isinstance(r, dict) and "split" in r})
            raise _UsageError(
                f"--split {args.split!r}: no record of {args.data!r} has split {args.split!r} (splits in "
                f"the file: {', '.join(found) if found else 'none: the records have no split field'})"
            )
        if video_root is None:
            video_root = os.path.dirname(os.path.abspath(args.data))
    try:
        data = load_chain_dataset(
            source, prompt=args.prompt, video_root=video_root, chain_length=args.chain_length
        )
    except FileNotFoundError as exc:
        raise _UsageError(f"--data {args.data!r}: {exc} (--video-root sets the folder)") from exc
    except (ValueError, TypeError) as exc:
        raise _UsageError(f"--data {args.data!r}: {exc}") from exc
    with_video = [r for r in data["videos"] if r]
    if with_video and args.num_frames is None:
        raise _UsageError(
            f"--num-frames is required: {len(with_video)} record(s) of --data have video files (e.g. "
            f"{with_video[0][0]!r}); set the frames sampled from each, e.g. --num-frames 16"
        )
    return data


def _eval_check(args: argparse.Namespace) -> tuple[Any, Any]:
    """Every option of ``rankloss eval`` checked before any model is loaded: (records, judge or None)."""
    import os

    for path in args.checkpoints:
        if not os.path.isdir(path) or not _has_config(path):
            raise _UsageError(f"CHECKPOINT {path!r}: not a saved model folder (no config.json in it)")
    if args.ref is not None and (not os.path.isdir(args.ref) or not _has_config(args.ref)):
        raise _UsageError(f"--ref {args.ref!r}: not a saved model folder (no config.json in it)")
    if args.generate < 0:
        raise _UsageError(f"--generate must be >= 0 (0: no generation), got {args.generate}")
    if (args.judge_url is None) != (args.judge_model is None):
        given, missing = (
            ("--judge-url", "--judge-model") if args.judge_url else ("--judge-model", "--judge-url")
        )
        raise _UsageError(f"{given} needs {missing} too (the judge's API root and its served model name)")
    if args.judge_url is not None and args.generate == 0:
        raise _UsageError("--judge-url scores generated captions, but --generate is 0: set --generate N")
    if args.judge_api_key_env is not None and args.judge_url is None:
        raise _UsageError("--judge-api-key-env is for the judge: give --judge-url and --judge-model")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise _UsageError(f"--out {args.out!r} is a file, not a folder")
    judge = None
    if args.judge_url is not None:
        from .integrations.judge import EventJudge

        kw: dict[str, Any] = {"timeout": args.judge_timeout}
        if args.judge_api_key_env is not None:
            kw["api_key_env"] = args.judge_api_key_env
        try:
            judge = EventJudge(args.judge_url, args.judge_model, **kw)
        except ValueError as exc:
            msg = (
                str(exc).replace("base_url", "--judge-url").replace("API key variable", "--judge-api-key-env")
            )
            raise _UsageError(msg) from exc
    records = _eval_records(args)
    return records, judge


def _eval_labels(paths: Sequence[str]) -> list[str]:
    import os

    labels: list[str] = []
    for p in paths:
        base = os.path.basename(os.path.normpath(p)) or "checkpoint"
        label, n = base, 2
        while label in labels:
            label, n = f"{base}-{n}", n + 1
        labels.append(label)
    return labels


def _load(path: str, dtype: str | None) -> tuple[Any, Any]:
    import torch
    import transformers

    kw: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kw["dtype"] = getattr(torch, dtype)
    if _is_vlm(path):
        model = transformers.AutoModelForImageTextToText.from_pretrained(path, **kw)
        processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
        processor = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, processor


def _assessment(metrics: dict[str, Any], reference_free: bool) -> dict[str, Any]:
    """The eval metrics grouped: overall (by score), per edit type, per chain position, loss."""
    m = {k[len("eval_") :]: v for k, v in metrics.items() if k.startswith("eval_")}
    scores = {"logps": "logps/", "logps_per_token": "logps_per_token/"}
    if not reference_free:
        scores["rewards"] = ""
    overall = {
        name: {key: m.get(f"{pre}{key}") for key in ("pairwise_accuracy", "top1_accuracy", "kendall_tau")}
        for name, pre in scores.items()
    }
    per_type: dict[str, dict[str, Any]] = {}
    per_position: dict[str, dict[str, Any]] = {}
    for key, value in m.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[1] == "pair_accuracy" and parts[0] in ("logps", "rewards"):
            if reference_free and parts[0] == "rewards":
                continue
            target = per_position if parts[2].startswith("pos") and parts[2][3:].isdigit() else per_type
            target.setdefault(parts[2], {})[parts[0]] = value
        elif len(parts) == 2 and parts[0] == "pairs":
            per_type.setdefault(parts[1], {})["pairs"] = value
    out: dict[str, Any] = {
        "overall": overall,
        "per_type": per_type,
        "per_position": dict(sorted(per_position.items(), key=lambda kv: int(kv[0][3:]))),
        "best_logp_per_token": m.get("best_logp_per_token"),
        "chain_loss": m.get("chain_loss"),
        "chains": m.get("chains"),
    }
    if not reference_free:
        out["reward_margin"] = m.get("neighbour_margin")
        out["reward_by_position"] = {
            k[len("reward_pos") :]: v for k, v in m.items() if k.startswith("reward_pos") and k[10:].isdigit()
        }
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def _cell(text: Any, limit: int = 160) -> str:
    t = " ".join(str(text).split())
    t = t if len(t) <= limit else t[: limit - 3] + "..."
    return t.replace("|", "\\|")


def _report_markdown(report: dict[str, Any]) -> str:
    cks = report["checkpoints"]
    labels = [c["label"] for c in cks]
    head = "| | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels) + "\n"

    def row(name: str, values: Sequence[Any]) -> str:
        return f"| {name} | " + " | ".join(_fmt(v) for v in values) + " |\n"

    ref = report["reference"]
    lines = [
        "# rankloss eval\n\n",
        f"- data: `{report['data']}`" + (f" (split `{report['split']}`)" if report["split"] else "")
        + f", {report['records']} chain(s)\n",
        "- assessment: " + (f"implicit reward `beta * (s - s_ref)` against `{ref}` (beta {report['beta']}) "
                            "and the checkpoints' own log-probs" if ref else
                            "reference-free: each checkpoint's own log-probs (no reference model)") + "\n",
        "- ranking metrics count ties as half; pairs are adjacent captions of a chain, one edit apart\n",
    ]  # fmt: skip
    for c in cks:
        lines.append(f"- `{c['label']}`: `{c['checkpoint']}`\n")
    lines.append("\n## Assessment: ranking the chains\n\n" + head)
    names = {"logps": "log-prob", "logps_per_token": "log-prob per token", "rewards": "implicit reward"}
    for score, title in names.items():
        if score not in cks[0]["assessment"]["overall"]:
            continue
        for key in ("pairwise_accuracy", "top1_accuracy", "kendall_tau"):
            lines.append(row(f"{title}: {key}", [c["assessment"]["overall"][score][key] for c in cks]))
    lines.append(
        row("best caption log-prob per token", [c["assessment"]["best_logp_per_token"] for c in cks])
    )
    lines.append(row("chain loss", [c["assessment"]["chain_loss"] for c in cks]))
    for section, key in (("by edit type (adjacent pairs)", "per_type"), ("by chain position (pair k-1, k)",
                                                                           "per_position")):  # fmt: skip
        groups = list(dict.fromkeys(g for c in cks for g in c["assessment"][key]))
        if not groups:
            continue
        lines.append(f"\n## Pair accuracy {section}\n\n" + head)
        for g in groups:
            for score in ("logps", "rewards"):
                vals = [c["assessment"][key].get(g, {}).get(score) for c in cks]
                if any(v is not None for v in vals):
                    pairs = cks[0]["assessment"][key].get(g, {}).get("pairs")
                    note = f" ({int(pairs)} pairs)" if pairs is not None and score == "logps" else ""
                    lines.append(row(f"{g}{note}: {names[score]}", vals))
    gens = [c.get("generation") for c in cks]
    if any(gens):
        scorer = next(g for g in gens if g)["scorer"]
        judge = report["judge"] or {}
        what = (f"judge `{judge.get('model')}` at `{judge.get('url')}` (event-level, AutoDQ style)"
                if scorer == "judge" else
                "lexical fallback (content-word overlap: weaker than a judge; rewards word overlap, not "
                "faithfulness)")  # fmt: skip
        lines.append(
            f"\n## Generation: greedy captions of the first records, scored by the {what}\n\n" + head
        )
        for key in ("precision", "recall", "f1", "samples"):
            lines.append(row(key, [g.get(key) if g else None for g in gens]))
        lines.append(row("captions that stopped", [
            sum(r["stopped"] for r in g["rows"]) if g else None for g in gens]))  # fmt: skip
        for c in cks:
            g = c.get("generation")
            if not g:
                continue
            lines.append(f"\n### Samples: `{c['label']}` (all in `{g['file']}`)\n\n")
            lines.append("| id | reference | generated | P | R | F1 |\n|---|---|---|---|---|---|\n")
            for r in g["rows"][:5]:
                cells = [_cell(r["id"], 40), _cell(r["reference"]), _cell(r["generated"])]
                cells += [_fmt(r["precision"]), _fmt(r["recall"]), _fmt(r["f1"])]
                lines.append("| " + " | ".join(cells) + " |\n")
    return "".join(lines)


def _write_atomic(path: str, text: str) -> None:
    import os

    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _eval(args: argparse.Namespace) -> int:
    import os
    import warnings

    records, judge = _eval_check(args)  # every option and the data, before any model is loaded
    import torch

    from ._version import __version__
    from .integrations import ChainRankConfig, ChainRankTrainer
    from .integrations.generation import GenerationEvalCallback

    reference_free = args.ref is None
    labels = _eval_labels(args.checkpoints)
    os.makedirs(args.out, exist_ok=True)
    use_cpu = args.cpu or not torch.cuda.is_available()
    try:
        ChainRankConfig(output_dir=args.out, beta=args.beta, report_to=[], use_cpu=use_cpu)
    except ValueError as exc:
        raise _UsageError(f"--beta: {exc}") from exc
    ref_model = None
    if args.ref is not None:
        ref_model, _ = _load(args.ref, args.dtype)
        ref_model.eval()
    report: dict[str, Any] = {
        "rankloss_version": __version__,
        "data": os.path.abspath(args.data),
        "split": args.split,
        "records": len(records),
        "reference": None if reference_free else os.path.abspath(args.ref),
        "mode": "reference_free" if reference_free else "implicit_reward",
        "beta": args.beta,
        "judge": None if judge is None else {"url": judge.client.base_url, "model": judge.model},
        "checkpoints": [],
    }
    for label, path in zip(labels, args.checkpoints):
        print(f"rankloss eval: {label}: {path}", file=sys.stderr)
        model, processor = _load(path, args.dtype)
        out_dir = args.out if len(args.checkpoints) == 1 else os.path.join(args.out, label)
        config = ChainRankConfig(
            output_dir=out_dir,
            report_to=[],
            use_cpu=use_cpu,
            beta=args.beta,
            length_normalize=args.length_normalize,
            reference_free=reference_free,
            num_frames=args.num_frames,
            max_completion_length=args.max_completion_length,
            per_device_eval_batch_size=args.batch_size,
            ref_cache_dir=os.path.join(args.out, "rankloss-ref"),
            disable_tqdm=True,
            save_strategy="no",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            trainer = ChainRankTrainer(model, config, eval_dataset=records, processing_class=processor,
                                       ref_model=ref_model)  # fmt: skip
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the report holds the metrics; stdout stays quiet
        callback = None
        if args.generate:
            callback = GenerationEvalCallback(
                num_samples=args.generate,
                max_new_tokens=args.max_new_tokens,
                judge=judge,
                trainer=trainer,
                batch_size=args.batch_size,
                on_judge_error="raise",
                wandb_table=False,
            )
            trainer.add_callback(callback)
        metrics = trainer.evaluate()
        entry: dict[str, Any] = {
            "label": label,
            "checkpoint": os.path.abspath(path),
            "metrics": {k: v for k, v in metrics.items() if not any(k.endswith(r) for r in _RUN_KEYS)},
            "assessment": _assessment(metrics, reference_free),
            "record_summary": trainer.record_summary.get("eval_dataset"),
        }
        if callback is not None and callback.last_scores is not None:
            entry["generation"] = {
                **callback.last_scores.summary(),
                "file": callback.last_path,
                "rows": callback.last_rows,
            }
        report["checkpoints"].append(entry)
        del trainer, model
    _write_atomic(
        os.path.join(args.out, "report.json"), json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    )
    _write_atomic(os.path.join(args.out, "report.md"), _report_markdown(report))
    print(f"rankloss eval: wrote {os.path.join(args.out, 'report.json')} and report.md", file=sys.stderr)
    if judge is not None:
        judge.close()
    return 0


_COMMANDS = {
    ("chains", "make"): _chains_make,
    ("chains", "summary"): _chains_summary,
    ("chains", "show"): _chains_show,
    ("synthetic", "make"): _synthetic_make,
    ("video", "probe"): _video_probe,
    ("eval", None): _eval,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[(args.group, getattr(args, "command", None))](args)
    except _UsageError as exc:
        print(f"rankloss {args.group}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (OSError, ValueError, TypeError, ImportError, RuntimeError) as exc:
        print(f"rankloss: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
