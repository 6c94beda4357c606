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

Documentation: docs/chains.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

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
    sub = p.add_subparsers(dest="group", required=True, metavar="{chains,synthetic,video}")

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
    return p


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


_COMMANDS = {
    ("chains", "make"): _chains_make,
    ("chains", "summary"): _chains_summary,
    ("chains", "show"): _chains_show,
    ("synthetic", "make"): _synthetic_make,
    ("video", "probe"): _video_probe,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[(args.group, args.command)](args)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (OSError, ValueError, TypeError, ImportError, RuntimeError) as exc:
        print(f"rankloss: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
