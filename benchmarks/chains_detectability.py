"""How many rules-engine edits contradict themselves, and how detectable each edit type is without the video.

    python benchmarks/chains_detectability.py  # writes benchmarks/results/chains-detectability.{json,md}
    python benchmarks/chains_detectability.py --label before  # (run against an older checkout via PYTHONPATH)

1. Self-contradictions: chains of length 6 over ``tests/data/video_captions.txt`` (200 detailed captions in
   the ShareGPT4Video/LLaVA-Video style), several seeds; every edit is checked with
   :func:`rankloss.chains.plausibility.contradiction` (or counted by kind when the module is missing), and
   the engine's own refusals are counted.
2. Text-only detectability: a pairwise logistic regression on hashed word 1-3-grams (NumPy only) learns
   ``w . (phi(after) - phi(before)) > 0`` on the single-edit pairs of 80 % of the captions and is scored on
   the pairs of the other 20 % (split by caption): accuracy per edit type. 50 % = needs the video; 100 % =
   "free" from the text alone.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = ROOT / "tests" / "data" / "video_captions.txt"
RESULTS = ROOT / "benchmarks" / "results"
DIM = 1 << 18


def load_captions() -> list[str]:
    return [line for line in CAPTIONS.read_text().splitlines() if line.strip()]


def chains(captions, seeds, length=6):
    from rankloss.chains import RulesEngine

    eng = RulesEngine()
    out = []
    for seed in seeds:
        for i, c in enumerate(captions):
            out.append((i, eng.make_chain(c, length, seed=seed, key=f"v{i}")))
    return out


def fire_rates(all_chains):
    from rankloss.chains.plausibility import contradiction

    per_type: dict[str, Counter] = defaultdict(Counter)
    edits = Counter()
    for _, ch in all_chains:
        for k, e in enumerate(ch.edits, start=1):
            edits[e.type] += 1
            why = contradiction(ch.captions[k - 1], ch.captions[k], e if e.type != "order" else None)
            if why:
                per_type[e.type][why.split(":")[0]] += 1
    return {t: {"edits": edits[t], "contradictions": dict(per_type[t])} for t in sorted(edits)}


def refusals(captions, seeds):
    """How often the engine's check refused a candidate (by kind), when the engine has one."""
    try:
        from rankloss.chains import rules
    except ImportError:
        return {}
    if not hasattr(rules, "check_candidate"):
        return {}
    orig = rules.check_candidate
    seen: Counter = Counter()

    def counting(*a, **k):
        why = orig(*a, **k)
        if why:
            seen[why.split(":")[0]] += 1
        return why

    rules.check_candidate = counting
    try:
        chains(captions, seeds)
    finally:
        rules.check_candidate = orig
    return dict(seen)


def speed(captions, reps=5):
    from rankloss.chains import RulesEngine

    eng = RulesEngine()
    best = 0.0
    for r in range(reps):
        t = time.perf_counter()
        for i, c in enumerate(captions):
            eng.make_chain(c, 6, seed=r, key=f"v{i}")
        best = max(best, len(captions) / (time.perf_counter() - t))
    return best


_TOK = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def features(text: str) -> Counter:
    w = _TOK.findall(text.lower())
    grams = Counter()
    for n in (1, 2, 3):
        for i in range(len(w) - n + 1):
            grams[zlib.crc32(" ".join(w[i : i + n]).encode()) % DIM] += 1
    return grams


def diff_vec(a: str, b: str) -> dict[int, float]:
    fa, fb = features(a), features(b)
    d = {k: fa.get(k, 0) - fb.get(k, 0) for k in set(fa) | set(fb)}
    return {k: float(v) for k, v in d.items() if v}


def detectability(all_chains, n_caps, epochs=30, lr=0.5, l2=1e-4, seed=0):
    rng = np.random.default_rng(seed)
    test_ids = set(rng.permutation(n_caps)[: n_caps // 5].tolist())
    train, test = [], []
    for cid, ch in all_chains:
        for k, e in enumerate(ch.edits, start=1):
            x = diff_vec(ch.captions[k], ch.captions[k - 1])  # edited minus original
            (test if cid in test_ids else train).append((x, e.type))
    w = np.zeros(DIM)
    for _ in range(epochs):  # SGD on -log sigmoid(w . (phi(edited) - phi(original))), a symmetric pair model
        for j in rng.permutation(len(train)):
            x, _t = train[j]
            idx = np.fromiter(x.keys(), int)
            val = np.fromiter(x.values(), float)
            z = float(w[idx] @ val)
            g = 1.0 / (1.0 + np.exp(-z)) - 1.0  # d/dz of -log sigmoid(z)
            w[idx] -= lr * (g * val + l2 * w[idx])
    acc: dict[str, list[int]] = defaultdict(list)
    for x, t in test:
        idx = np.fromiter(x.keys(), int)
        s = float(w[idx] @ np.fromiter(x.values(), float)) if len(idx) else 0.0
        acc[t].append(1 if s > 0 else 0 if s < 0 else 0.5)
    table = {t: {"pairs": len(v), "accuracy": float(np.mean(v))} for t, v in sorted(acc.items())}
    all_v = [a for v in acc.values() for a in v]
    table["all"] = {"pairs": len(all_v), "accuracy": float(np.mean(all_v))}
    return table, len(train), len(test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", default="after", help="key of this run in the JSON (before/after)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--no-detectability", action="store_true")
    args = ap.parse_args()
    caps = load_captions()
    seeds = list(range(args.seeds))
    all_chains = chains(caps, seeds)
    out_json = RESULTS / "chains-detectability.json"
    data = json.loads(out_json.read_text()) if out_json.exists() else {}
    run = {
        "captions": len(caps),
        "seeds": len(seeds),
        "edits": sum(len(c.edits) for _, c in all_chains),
        "fire_rates": fire_rates(all_chains),
        "refusals": refusals(caps, seeds),
        "captions_per_s": round(speed(caps), 1),
    }
    if not args.no_detectability:
        table, n_train, n_test = detectability(all_chains, len(caps))
        run["detectability"] = {"train_pairs": n_train, "test_pairs": n_test, "per_type": table}
    data[args.label] = run
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (RESULTS / "chains-detectability.md").write_text(render(data))
    print(render(data))


def render(data) -> str:
    lines = ["# Caption chains: self-contradictions and text-only detectability", ""]
    lines += [
        "Command: `python benchmarks/chains_detectability.py` (CPU, NumPy only). Captions: "
        "`tests/data/video_captions.txt` (200 detailed captions), rules engine, length 6, 5 seeds.",
        "",
        "## Self-contradictions in the finished chains (per edit type: edits, contradictions by kind)",
        "",
        "| run | type | edits | contradictions |",
        "|---|---|---:|---|",
    ]
    for label in ("before", "after"):
        if label not in data:
            continue
        for t, v in data[label]["fire_rates"].items():
            c = ", ".join(f"{k} {n}" for k, n in sorted(v["contradictions"].items())) or "0"
            lines.append(f"| {label} | {t} | {v['edits']} | {c} |")
    lines.append("")
    for label in ("before", "after"):
        if label in data:
            r = data[label]
            lines.append(
                f"- {label}: {r['captions_per_s']} captions/s (best of 5 passes, this machine); "
                f"candidates refused by the check while building: {r['refusals'] or 'n/a'}"
            )
    det = data.get("after", {}).get("detectability")
    if det:
        lines += [
            "",
            "## Text-only detectability (pairwise logistic regression on word 1-3-grams, held-out captions)",
            "",
            f"Train pairs {det['train_pairs']}, test pairs {det['test_pairs']} (split by caption). "
            "Accuracy = share of held-out pairs where the model picks the edited caption; 0.5 = chance.",
            "",
            "| edit type | test pairs | accuracy without the video |",
            "|---|---:|---:|",
        ]
        for t, v in det["per_type"].items():
            lines.append(f"| {t} | {v['pairs']} | {v['accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
