"""Held-out evaluation: caption *assessment* (does the model rank each chain in order?) and caption
*generation* (are its greedy captions faithful to the video?).

Assessment scores every caption of every held-out chain, ``s_i = sum_t log p(y_{i,t} | video, y_{i,<t})``
(the mean over tokens with ``length_normalize``), and reads the chain metrics of
:func:`rankloss.chain_loss` (pairwise accuracy, top-1 accuracy, Kendall tau) twice:

* ``pair_acc`` / ``top1`` / ``tau``: ranking by the log-probability itself (``rewards = s``), the way a
  captioning model is used to assess captions; defined before any reference model exists;
* ``reward_pair_acc`` / ``reward_top1`` / ``reward_tau``: ranking by the implicit reward
  ``r_i = beta * (s_i - s_i_ref)`` against the cached reference (SFT) scores, what the ranking losses
  optimise (only once a reference exists; identically zero for the reference itself).

``best_logp`` (the best caption's summed log-prob, averaged over chains) and ``best_logp_tok`` (per
token) show whether training keeps the correct caption likely: naive ranking losses push it down.

Generation decodes greedily from each held-out video. With a known scene (synthetic data) every caption
is parsed into atomic facts (:func:`rankloss.synthetic.fact_scores`): ``gen_precision``, ``gen_recall``,
``gen_f1`` (exact for synthetic data) and ``gen_exact`` (share of captions equal to the true one).
Without scenes (real data) the generated caption is compared with the chain's best caption word by
word instead: ``gen_word_precision``, ``gen_word_recall``, ``gen_word_f1`` (unigram overlap, a rough
proxy, clearly not fact-level). With scenes, ``gen_f1_static`` / ``gen_f1_dynamic`` are the fact F1
restricted to the facts one frame shows (object, size, count) and to those that need time (motion,
order), averaged over the captions whose scene has such facts.

Per error type (:func:`probe_set`, :func:`probe_metrics`; full evaluations with scenes, ``--probes``):
each held-out video's true caption against one single-error caption per degradation kind
(:func:`rankloss.synthetic.probe_chain`, length-matched where the kind allows).
``probe_acc_<kind>`` is the share of videos whose true caption scores higher, by the summed log-prob
where both captions have the same number of tokens and by the mean token log-prob where they differ
(insertion, omission, some motion swaps), so that no comparison is decided by length alone;
``probe_acc_<group>`` pools the kinds of each group of :data:`rankloss.synthetic.PROBE_GROUPS`
(``static``, ``dynamic``, ``insertion``, ``omission``); ``probe_reward_acc_*`` rank by the implicit
reward ``s - s_ref`` instead (the same rule for length) once reference scores of the probes exist;
``probe_n_<group>`` counts the comparisons.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..integrations.collator import ChainCollator
from ..integrations.trainer import ranking_metrics
from ..losses import chain_loss
from ..synthetic import DEGRADATIONS, PROBE_GROUPS, fact_scores, group_fact_scores, probe_chain
from .data import FrameStore, VideoChain, batch_to, collate_chains

__all__ = [
    "EvalResult",
    "score_chains",
    "assessment_metrics",
    "generation_metrics",
    "word_overlap",
    "ProbeSet",
    "probe_set",
    "probe_metrics",
]


@dataclass
class EvalResult:
    """Metrics (floats) and a few example generations (``{"id", "generated", "truth"}``)."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]]


def _shard(items: Sequence[Any], rank: int, world: int) -> tuple[list[Any], int]:
    """Items of process ``rank``: a contiguous, equal-length slice (padded by repeating the last item so
    every process runs the same number of forward passes, as FSDP needs); returns ``(items, n_real)``."""
    per = -(-len(items) // world)
    part = list(items[rank * per : (rank + 1) * per])
    real = len(part)
    while len(part) < per:
        part.append(items[-1])
    return part, real


@torch.no_grad()
def score_chains(
    model: Callable[..., dict[str, Any]],
    chains: Sequence[VideoChain],
    frames: FrameStore,
    collator: ChainCollator,
    *,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    gather: Callable[[list[Any]], list[Any]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{chain id: (scores [K], num_tokens [K])}`` for every chain (sum of token log-probs), computed by
    ``model(batch, mode="score")``; each process scores its shard and ``gather`` collects them."""
    part, real = _shard(chains, rank, world)
    collator = collator.for_scoring()  # K scores per chain, duplicates or not
    local: list[tuple[str, list[float], list[int]]] = []
    for i in range(0, len(part), batch_size):
        chunk = part[i : i + batch_size]
        batch = batch_to(collate_chains(collator, chunk, frames), device)
        out = model(batch, mode="score")
        sizes = batch["chain_sizes"].tolist()
        scores = out["scores"].float().cpu().split(sizes)
        counts = out["num_tokens"].cpu().split(sizes)
        for j, c in enumerate(chunk):
            if i + j < real:
                local.append((c.id, scores[j].tolist(), counts[j].tolist()))
        if progress is not None:
            progress(len(chunk))
    rows = gather(local) if gather is not None else local
    return {
        cid: (torch.tensor(s, dtype=torch.float32), torch.tensor(n, dtype=torch.long)) for cid, s, n in rows
    }


def assessment_metrics(
    chains: Sequence[VideoChain],
    scores: dict[str, tuple[Tensor, Tensor]],
    ref_scores: dict[str, tuple[Tensor, Tensor]] | None,
    *,
    beta: float,
    length_normalize: bool,
) -> dict[str, float]:
    """Ranking metrics of held-out chains from their scores (see the module docstring)."""
    s_list, n_list, r_list, sizes = [], [], [], []
    for c in chains:
        s, n = scores[c.id]
        s_list.append(s)
        n_list.append(n)
        sizes.append(len(s))
        if ref_scores is not None:
            r_list.append(ref_scores[c.id][0])
    s = torch.cat(s_list).double()
    n = torch.cat(n_list).double().clamp(min=1)
    firsts = torch.tensor([0] + sizes[:-1]).cumsum(0)
    best, best_n = s[firsts], n[firsts]
    metrics = {"best_logp": float(best.mean()), "best_logp_tok": float((best / best_n).mean())}
    score = s / n if length_normalize else s
    sizes_t = torch.tensor(sizes)

    def ranked(values: torch.Tensor) -> dict[str, float]:
        # ties count as half (ChainRankTrainer's metrics): equal rewards, as before any ranking step, read
        # 0.5, not 0
        m = ranking_metrics(values, sizes_t)
        return {k: float(m[k].mean()) for k in ("pairwise_accuracy", "top1_accuracy", "kendall_tau")}

    m = ranked(score)
    metrics.update(pair_acc=m["pairwise_accuracy"], top1=m["top1_accuracy"], tau=m["kendall_tau"])
    if ref_scores is not None:
        ref = torch.cat(r_list).double()
        ref = ref / n if length_normalize else ref
        margin = chain_loss(score, sizes, ref, loss="plackett_luce", beta=beta).metrics()["neighbour_margin"]
        m = ranked(beta * (score - ref))
        metrics.update(
            reward_pair_acc=m["pairwise_accuracy"],
            reward_top1=m["top1_accuracy"],
            reward_tau=m["kendall_tau"],
            reward_margin=margin,
        )
    return metrics


_WORD = re.compile(r"[a-z0-9]+")


def word_overlap(generated: str, reference: str) -> tuple[float, float, float]:
    """Unigram precision, recall and F1 (clipped counts, lower-cased words) of ``generated`` against
    ``reference``."""
    g, r = Counter(_WORD.findall(generated.lower())), Counter(_WORD.findall(reference.lower()))
    overlap = sum((g & r).values())
    p = overlap / max(1, sum(g.values()))
    rc = overlap / max(1, sum(r.values()))
    return p, rc, (2 * p * rc / (p + rc) if p + rc else 0.0)


@torch.no_grad()
def generation_metrics(
    model: Callable[..., dict[str, Any]],
    chains: Sequence[VideoChain],
    frames: FrameStore,
    collator: ChainCollator,
    *,
    batch_size: int,
    device: torch.device,
    max_new_tokens: int,
    stop_when_done: bool = True,
    rank: int = 0,
    world: int = 1,
    gather: Callable[[list[Any]], list[Any]] | None = None,
    progress: Callable[[int], None] | None = None,
    num_samples: int = 3,
) -> EvalResult:
    """Greedy captions of the held-out videos and their fact (or word) scores."""
    tok = collator.tokenizer
    stop_ids = [int(tok.eos_token_id)] if tok.eos_token_id is not None else []
    part, real = _shard(chains, rank, world)
    local: list[tuple[str, str]] = []
    for i in range(0, len(part), batch_size):
        chunk = part[i : i + batch_size]
        batch = batch_to(collate_chains(collator, chunk, frames, best_only=True), device)
        out = model(
            batch,
            mode="generate",
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            pad_id=collator.pad_id,
            stop_when_done=stop_when_done,
        )
        texts = tok.batch_decode(out["tokens"].cpu().tolist(), skip_special_tokens=True)
        for j, c in enumerate(chunk):
            if i + j < real:
                local.append((c.id, texts[j].strip()))
        if progress is not None:
            progress(len(chunk))
    rows = dict(gather(local) if gather is not None else local)
    by_id = {c.id: c for c in chains}
    with_scene = all(c.scene is not None for c in chains)
    sums: Counter[str] = Counter()
    group_sums: Counter[str] = Counter()
    group_counts: Counter[str] = Counter()
    for cid, text in rows.items():
        c = by_id[cid]
        sums["gen_words"] += len(text.split())
        if with_scene:
            fs = fact_scores(text, c.scene)
            sums["gen_precision"] += fs.precision
            sums["gen_recall"] += fs.recall
            sums["gen_f1"] += fs.f1
            sums["gen_exact"] += float(text == c.captions[0])
            for group, gs in group_fact_scores(text, c.scene).items():
                group_sums[group] += gs.f1
                group_counts[group] += 1
        else:
            p, r, f = word_overlap(text, c.captions[0])
            sums["gen_word_precision"] += p
            sums["gen_word_recall"] += r
            sums["gen_word_f1"] += f
    n = max(1, len(rows))
    metrics = {k: v / n for k, v in sums.items()}
    for group, total in group_sums.items():
        metrics[f"gen_f1_{group}"] = total / group_counts[group]
    samples = [{"id": c.id, "generated": rows[c.id], "truth": c.captions[0]} for c in chains[:num_samples]]
    return EvalResult(metrics, samples)


# ------------------------------------------------------------------------------------------------------
# Per-error-type probes


@dataclass
class ProbeSet:
    """Probe chains: per held-out video ``captions = [true caption, one probe per kind...]`` (id
    ``probe:<video id>``) and the kind of each probe (``kinds[id]``, aligned with ``captions[1:]``)."""

    chains: list[VideoChain]
    kinds: dict[str, list[str]]


def probe_set(
    chains: Sequence[VideoChain], *, seed: int, length: Callable[[str], int] | None = None
) -> ProbeSet:
    """The probes of every chain with a scene (:func:`rankloss.synthetic.probe_chain` with ``seed``, the
    video id as key and ``length`` to match token counts); chains without a scene get none."""
    out, kinds = [], {}
    for c in chains:
        if c.scene is None:
            continue
        caps, ks = [c.captions[0]], []
        for kind in DEGRADATIONS:
            ch = probe_chain(c.scene, kind, seed=seed, key=c.id, length=length)
            if ch is not None:
                caps.append(ch.captions[1])
                ks.append(kind)
        if ks:
            pid = "probe:" + c.id
            out.append(VideoChain(pid, caps, c.video, c.scene, c.index))
            kinds[pid] = ks
    return ProbeSet(out, kinds)


def probe_metrics(
    probes: ProbeSet,
    scores: dict[str, tuple[Tensor, Tensor]],
    ref_scores: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> dict[str, float]:
    """Per-kind and per-group accuracies of ``score(true) > score(probe)`` (see the module docstring):
    summed scores where the two captions have equal token counts, mean token scores where they differ;
    ``probe_reward_*`` by ``s - s_ref`` when ``ref_scores`` holds every probe chain."""
    use_ref = ref_scores is not None and all(c.id in ref_scores for c in probes.chains)
    hits: Counter[str] = Counter()
    reward_hits: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    group_of = {k: g for g, ks in PROBE_GROUPS.items() for k in ks}
    for c in probes.chains:
        s, n = (t.double() for t in scores[c.id])
        r = ref_scores[c.id][0].double() if use_ref else None
        for j, kind in enumerate(probes.kinds[c.id], start=1):
            same = int(n[0]) == int(n[j])
            norm = (1.0, 1.0) if same else (float(n[0].clamp(min=1)), float(n[j].clamp(min=1)))
            for key in dict.fromkeys((kind, group_of[kind])):  # insertion: kind and group alike
                counts[key] += 1
                hits[key] += float(s[0] / norm[0] > s[j] / norm[1])
                if r is not None:
                    reward_hits[key] += float((s[0] - r[0]) / norm[0] > (s[j] - r[j]) / norm[1])
    metrics = {}
    keys = list(DEGRADATIONS) + [g for g in PROBE_GROUPS if g not in DEGRADATIONS]
    for key in keys:
        if counts[key]:
            metrics[f"probe_acc_{key}"] = hits[key] / counts[key]
            if use_ref:
                metrics[f"probe_reward_acc_{key}"] = reward_hits[key] / counts[key]
    for g in PROBE_GROUPS:
        metrics[f"probe_n_{g}"] = float(counts[g])
    return metrics
