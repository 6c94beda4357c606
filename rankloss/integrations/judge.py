"""Scoring generated captions against their references: an LLM judge in the AutoDQ style, or a lexical
fallback.

**The judge** (:class:`EventJudge`) follows DREAM-1K's AutoDQ (Tarsier, ``evaluate_dream_gpt.py``): a
language model served behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, SGLang, TGI,
llama.cpp, Ollama or a hosted API) first **extracts the atomic events** of a caption (a JSON list of
short sentences, each with an action), then **judges entailment**: for each event of one caption, does
the other caption entail it (a JSON list of ``yes`` / ``no``)?

* **precision** = share of the *generated* caption's events that the *reference* entails (what the model
  said that is true);
* **recall** = share of the *reference*'s events that the *generated* caption entails (what happened that
  the model said);
* **F1** = ``2 P R / (P + R)``. Per sample from its own ``P`` and ``R``; over a set of samples, as
  AutoDQ reports it, the harmonic mean of the *mean* precision and the *mean* recall.

A caption with no events scores 1.0 on its side (AutoDQ's convention: nothing claimed, nothing wrong;
nothing happened, nothing missed). Requests are sent at ``temperature=0`` with a fixed seed, answers are
parsed leniently (code fences, text around the JSON, ``{"events": [...]}``, ``entailment`` /
``neutral`` / ``contradiction`` or booleans for yes / no) and an answer that still does not parse is
asked again (``parse_retries``); the transport retries timeouts, lost connections, 429 and 5xx
(:class:`rankloss.chains.served.ChatClient`, the ``openai`` chains engine's client). What cannot be
answered raises :class:`JudgeError` naming the endpoint, the model and what went wrong; a 401, 403 or
404 raises :class:`~rankloss.chains.served.ServerConfigError` at once.

**The lexical fallback** (:class:`LexicalScorer`), used when no judge is configured, is **weaker**: the
precision / recall / F1 of the generated caption's *content words* against the reference's (lower-cased,
stop words removed, a simple suffix-stripping stemmer, counted as multisets). It rewards word overlap,
not faithfulness: a paraphrase scores low, and a caption that swaps two objects ("the dog chases the
cat" for "the cat chases the dog") scores as high as the truth. Use it to watch a training run move, not
to compare models; the reports name the scorer (``judge`` or ``lexical``) next to every number.

Both scorers have one interface: :meth:`score_pairs` on ``[(generated, reference), ...]`` returns
:class:`GenerationScores` (per-sample rows and the means).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..chains.served import DEFAULT_API_KEY_ENV, ChatClient, request_failed

__all__ = [
    "EventJudge",
    "GenerationScores",
    "JudgeError",
    "LexicalScorer",
    "content_words",
    "f1_score",
]


class JudgeError(RuntimeError):
    """The judge endpoint could not give a usable answer (after its retries)."""


def f1_score(precision: float, recall: float) -> float:
    """``2 P R / (P + R)``, 0 when both are 0."""
    return 0.0 if precision + recall <= 0 else 2.0 * precision * recall / (precision + recall)


@dataclass
class GenerationScores:
    """Scores of generated captions against references.

    ``scorer``: ``"judge"`` or ``"lexical"``; ``samples``: one dict per pair (``precision``, ``recall``,
    ``f1`` and what the scorer matched: the events and verdicts, or the content words);
    ``precision`` / ``recall``: the means over the samples; ``f1``: their harmonic mean (AutoDQ's
    summary); ``mean_sample_f1``: the mean of the per-sample F1.
    """

    scorer: str
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def precision(self) -> float:
        return sum(s["precision"] for s in self.samples) / len(self.samples) if self.samples else 0.0

    @property
    def recall(self) -> float:
        return sum(s["recall"] for s in self.samples) / len(self.samples) if self.samples else 0.0

    @property
    def f1(self) -> float:
        return f1_score(self.precision, self.recall)

    @property
    def mean_sample_f1(self) -> float:
        return sum(s["f1"] for s in self.samples) / len(self.samples) if self.samples else 0.0

    def summary(self) -> dict[str, Any]:
        """``{"scorer", "samples", "precision", "recall", "f1", "mean_sample_f1"}``."""
        return {
            "scorer": self.scorer,
            "samples": len(self.samples),
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "mean_sample_f1": self.mean_sample_f1,
        }


# ------------------------------------------------------------------------------------------------------
# The lexical fallback

#: English function words left out of the content words (articles, pronouns, auxiliaries, prepositions,
#: conjunctions, a few discourse words common in captions).
STOP_WORDS = frozenset(
    """
    a an the this that these those there here it its it's they them their theirs he him his she her hers
    we us our you your i me my mine some any each every all both either neither no not nor
    and or but so yet if then than as of at by for from in into onto on off out over under up down to
    with without within about above below between through during before after again further once while
    is are was were be been being am do does did doing done have has had having can could will would
    shall should may might must also just very too quite rather only still even more most less least
    which who whom whose what when where why how video clip scene shows show shown showing appears
    appear seen see sees camera frame frames image
    """.split()
)

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def stem(word: str) -> str:
    """A small suffix-stripping stemmer: plurals (``-s``, ``-es``, ``-ies``), ``-ing`` and ``-ed`` (a doubled
    final consonant undoubled) and a final ``-e``, so ``moves``, ``moving``, ``moved`` and ``move`` all
    give ``mov``, and ``runs`` / ``running`` give ``run``. Not a linguistic stemmer: ``red`` stays ``red``
    (too short), and unrelated words can collide."""
    w = word
    if len(w) > 4 and w.endswith("ies"):
        w = w[:-3] + "y"
    elif w.endswith("sses"):
        w = w[:-2]
    elif len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    stripped = False
    if len(w) > 5 and w.endswith("ing"):
        w, stripped = w[:-3], True
    elif len(w) > 4 and w.endswith("ed"):
        w, stripped = w[:-2], True
    if stripped and len(w) > 2 and w[-1] == w[-2] and w[-1] not in "lsz":
        w = w[:-1]
    if len(w) > 3 and w.endswith("e"):
        w = w[:-1]
    return w


def content_words(text: str) -> list[str]:
    """The stemmed content words of ``text``: lower-cased words (letters and digits), stop words
    (:data:`STOP_WORDS`) removed, each through :func:`stem`."""
    return [stem(w) for w in _WORD.findall(str(text).lower()) if w not in STOP_WORDS]


class LexicalScorer:
    """The fallback scorer: content-word precision / recall / F1 of each generated caption against its
    reference (see the module docstring: **weaker than a judge**: it rewards word overlap, not
    faithfulness; paraphrases score low, swapped objects can score high).

    Per sample, with ``G`` and ``R`` the multisets of content words (:func:`content_words`) and ``m`` the
    size of their intersection (each word counted ``min(G[w], R[w])`` times): ``precision = m / |G|``,
    ``recall = m / |R|``, ``f1 = 2 P R / (P + R)``; an empty side scores 1.0 (as the judge does for a
    caption without events).
    """

    name = "lexical"

    def score(self, generated: str, reference: str) -> dict[str, Any]:
        g, r = Counter(content_words(generated)), Counter(content_words(reference))
        m = sum((g & r).values())
        ng, nr = sum(g.values()), sum(r.values())
        p = m / ng if ng else 1.0
        rc = m / nr if nr else 1.0
        return {
            "precision": p,
            "recall": rc,
            "f1": f1_score(p, rc),
            "matched_words": sorted((g & r).elements()),
        }

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> GenerationScores:
        """:class:`GenerationScores` of ``[(generated, reference), ...]``."""
        return GenerationScores(self.name, [self.score(g, r) for g, r in pairs])

    def describe(self) -> str:
        return "lexical (content-word overlap; weaker than a judge)"


# ------------------------------------------------------------------------------------------------------
# The judge

EXTRACT_PROMPT = """Below is a description of a video clip.

Description: {caption}

List the key events of this description, at most {max_events}. Rules:
- An event includes an action, a motion or a movement (not static appearance).
- Each event is one short sentence (at most 10 words) with a subject and a verb, and optionally an object.
- Each event is atomic: it cannot be split into several events. Do not repeat events.
- Scene cuts and camera motions are not events. Replace pronouns by the nouns they refer to.

Answer with a JSON list of strings only, for example ["a man opens a door", "a dog runs outside"]. \
If there is no event, answer []."""

ENTAIL_PROMPT = """Below is a description of a video clip and a numbered list of events.

Description: {premise}

Events:
{events}

For each event, decide whether the description entails it: "yes" if the description states or clearly \
implies the event, "no" if it contradicts the event or does not mention it.

Answer with a JSON list of exactly {n} strings, each "yes" or "no", in the order of the events, and \
nothing else."""

_YES = {"yes", "y", "true", "entailment", "entailed", "entails", "1"}
_NO = {"no", "n", "false", "neutral", "contradiction", "contradicted", "not entailed", "0"}


def _json_list(text: str) -> list[Any]:
    """The JSON list in ``text``: code fences and surrounding prose ignored, ``{"events": [...]}`` (or any
    one-key object holding a list) accepted. Raises ``ValueError`` when there is none."""
    t = text.strip()
    fence = re.search(r"```(?:json|python)?\s*(.*?)```", t, re.S)
    if fence:
        t = fence.group(1).strip()
    candidates = [t]
    start, end = t.find("["), t.rfind("]")
    if start != -1 and end > start:
        candidates.append(t[start : end + 1])
    for c in candidates:
        try:
            value = json.loads(c)
        except ValueError:
            continue
        if isinstance(value, dict):
            lists = [v for v in value.values() if isinstance(v, list)]
            if len(lists) == 1:
                value = lists[0]
        if isinstance(value, list):
            return value
    raise ValueError("no JSON list in the answer")


def _verdict(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, dict):  # {"event": ..., "relationship": "entailment"} as AutoDQ asks
        for key in ("answer", "relationship", "entailed", "verdict", "label"):
            if key in value:
                return _verdict(value[key])
        raise ValueError(f"a verdict object without an answer: {value!r}")
    if isinstance(value, str):
        v = value.strip().strip(".").lower()
        if v in _YES:
            return True
        if v in _NO:
            return False
    raise ValueError(f"not a yes/no verdict: {value!r}")


class EventJudge:
    """Event-level precision / recall / F1 of generated captions against references, judged by a model
    behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (AutoDQ style; see the module docstring).

    Args:
        base_url: the API root, e.g. ``http://localhost:8000/v1`` (``/chat/completions`` is appended).
        model: the served model's name.
        api_key_env: the environment variable holding the API key (default ``OPENAI_API_KEY``, optional
            when unset; a name given explicitly must be set; ``None``: never send a key).
        timeout, request_retries, backoff, max_backoff: the transport's (see
            :class:`~rankloss.chains.served.ChatClient`).
        parse_retries: times an answer that does not parse (or has the wrong number of verdicts) is asked
            for again.
        max_events: the most events asked for per caption.
        max_tokens: generation budget per request.
        concurrency: samples judged at once (threads).
        seed: sent with every request (servers that honour it answer reproducibly).

    :meth:`score_pairs` returns :class:`GenerationScores` with ``scorer="judge"``; each sample holds its
    ``generated_events``, ``reference_events`` and the verdicts. Reference events are cached by text.
    """

    name = "judge"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = DEFAULT_API_KEY_ENV,
        timeout: float = 60.0,
        request_retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        parse_retries: int = 2,
        max_events: int = 10,
        max_tokens: int = 1024,
        concurrency: int = 4,
        seed: int = 0,
    ) -> None:
        for label, v, lo in (("parse_retries", parse_retries, 0), ("max_events", max_events, 1),
                             ("max_tokens", max_tokens, 1), ("concurrency", concurrency, 1)):  # fmt: skip
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{label} must be an int >= {lo}, got {v!r}")
        self.client = ChatClient(
            base_url,
            model,
            api_key_env=api_key_env,
            timeout=timeout,
            request_retries=request_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            hint="check the judge's URL, model name and API key variable",
        )
        self.model = model
        self.parse_retries = parse_retries
        self.max_events = max_events
        self.max_tokens = max_tokens
        self.concurrency = concurrency
        self.seed = int(seed)
        self._events_cache: dict[str, list[str]] = {}

    def __repr__(self) -> str:
        return f"EventJudge({self.client.base_url!r}, model={self.model!r})"

    @property
    def endpoint(self) -> str:
        return self.client.endpoint

    def describe(self) -> str:
        return f"judge ({self.model} at {self.endpoint})"

    def close(self) -> None:
        self.client.close()

    # --------------------------------------------------------------------------------------------------
    def _ask(self, prompt: str, what: str, parse: Any) -> Any:
        """``parse(answer)`` of the first answer to ``prompt`` that parses, asking again up to
        ``parse_retries`` times; :class:`JudgeError` naming the endpoint otherwise."""
        problem = ""
        for _ in range(self.parse_retries + 1):
            text = self.client.chat(
                [{"role": "user", "content": prompt}],
                max_tokens=self.max_tokens,
                temperature=0.0,
                seed=self.seed,
            )
            reason = request_failed(text)
            if reason is not None:
                raise JudgeError(
                    f"the judge at {self.endpoint} (model {self.model!r}) did not answer the {what} request: "
                    f"{reason} after {self.client.request_retries} retries"
                )
            try:
                return parse(text)
            except ValueError as exc:
                snippet = text.strip().replace("\n", " ")
                problem = f"{exc}; answer: {snippet[:200]!r}"
        raise JudgeError(
            f"the judge at {self.endpoint} (model {self.model!r}) gave no usable answer to the {what} "
            f"request in {self.parse_retries + 1} tries: {problem}"
        )

    def extract_events(self, caption: str) -> list[str]:
        """The atomic events of ``caption`` (at most ``max_events``)."""
        caption = " ".join(str(caption).split())
        if caption in self._events_cache:
            return list(self._events_cache[caption])
        if not caption:
            return []

        def parse(text: str) -> list[str]:
            value = _json_list(text)
            if not all(isinstance(e, str) for e in value):
                raise ValueError("the events are not all strings")
            events = [" ".join(e.split()) for e in value if e.strip()]
            return list(dict.fromkeys(events))[: self.max_events]

        events = self._ask(EXTRACT_PROMPT.format(caption=caption, max_events=self.max_events),
                           "event extraction", parse)  # fmt: skip
        self._events_cache[caption] = events
        return list(events)

    def entailed(self, premise: str, events: Sequence[str]) -> list[bool]:
        """For each of ``events``, whether ``premise`` entails it."""
        if not events:
            return []
        n = len(events)
        listing = "\n".join(f"{i + 1}. {e}" for i, e in enumerate(events))

        def parse(text: str) -> list[bool]:
            value = _json_list(text)
            if len(value) != n:
                raise ValueError(f"{len(value)} verdicts for {n} events")
            return [_verdict(v) for v in value]

        prompt = ENTAIL_PROMPT.format(premise=" ".join(str(premise).split()), events=listing, n=n)
        return self._ask(prompt, "entailment", parse)

    def score(self, generated: str, reference: str) -> dict[str, Any]:
        """Precision, recall and F1 of one generated caption against its reference, with the events and
        verdicts."""
        gen_events = self.extract_events(generated)
        ref_events = self.extract_events(reference)
        gen_ok = self.entailed(reference, gen_events)
        ref_ok = self.entailed(generated, ref_events)
        p = sum(gen_ok) / len(gen_ok) if gen_ok else 1.0
        r = sum(ref_ok) / len(ref_ok) if ref_ok else 1.0
        return {
            "precision": p,
            "recall": r,
            "f1": f1_score(p, r),
            "generated_events": gen_events,
            "generated_entailed": gen_ok,
            "reference_events": ref_events,
            "reference_entailed": ref_ok,
        }

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> GenerationScores:
        """:class:`GenerationScores` of ``[(generated, reference), ...]`` (``concurrency`` at a time, in
        order)."""
        pairs = list(pairs)
        if self.concurrency == 1 or len(pairs) <= 1:
            return GenerationScores(self.name, [self.score(g, r) for g, r in pairs])
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(pairs))) as pool:
            samples = list(pool.map(lambda gr: self.score(*gr), pairs))
        return GenerationScores(self.name, samples)
