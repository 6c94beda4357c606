"""The ``llm`` engine: a local causal LM introduces each error, verified, with a ``rules`` fallback.

At every step the engine picks an edit type (least used so far in the chain, ties broken by the
caption's random stream), prompts the model to add exactly one error of that type to the current
caption, and *verifies* the answer before accepting it:

1. the answer is non-empty and differs from the current caption;
2. the changed region (longest common prefix and suffix removed, widened to whole words) does not
   overlap or touch any earlier edit, so every earlier edit is still there verbatim (checked again
   directly: the text of every earlier edit is still in the answer);
3. the changed region is bounded (``max_edit_chars`` on each side, and at most ``max_edit_fraction``
   of the current caption is replaced), so "exactly one more error" is plausible rather than a
   rewrite; garbled text (U+FFFD replacement characters, control characters) is rejected;
4. the change has the shape of its type: an omission only removes words, an insertion only adds
   words, a replacement type changes words on both sides, and an ``order`` edit is exactly a swap of
   two sentences that no earlier swap moved.

A rejected answer is retried (greedy decoding first, then sampling) up to ``max_retries`` times; then
the ``rules`` engine makes that step instead (preferring the same type), which counts as a *fallback*.
Random-weight models fail verification every time, which is how the tests exercise the fallback.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .core import SHORT_NO_SPANS, Chain, TextState, caption_rng, caption_seed, split_sentences
from .plausibility import contradiction
from .rules import RulesEngine, check_length
from .taxonomy import EDIT_TYPE_DESCRIPTIONS, check_types

__all__ = ["LLMEngine", "GenerateFn", "build_prompt", "clean_output", "TRAIN_EXTRA_HINT"]

TRAIN_EXTRA_HINT = "pip install 'rankloss[train]'"


class GenerateFn(Protocol):
    """A text generator: ``generate_fn(prompt, seed=..., sample=...) -> completion`` (without the prompt).

    ``seed`` is derived from the run's seed, the caption, the step and the attempt; ``sample`` is
    ``False`` for the first attempt of a step (greedy) and ``True`` for retries.
    """

    def __call__(self, prompt: str, *, seed: int, sample: bool) -> str: ...


PROMPT_TEMPLATE = (
    "You are helping to build training data: video captions that contain known mistakes.\n"
    "Rewrite the caption below so that it contains exactly one new factual error of this kind: "
    "{description}.\n"
    "Change as few words as possible and copy everything else exactly.{keep}\n"
    "Reply with the rewritten caption only.\n\n"
    "Caption: {caption}\n"
    "Rewritten caption:"
)

_GARBLED = re.compile("[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_WORD = re.compile(r"[\w'-]+")
_LEAD = re.compile(r"^\s*(?:rewritten caption|caption|answer|output)\s*:\s*", re.IGNORECASE)


def build_prompt(caption: str, edit_type: str, protected: Sequence[str] = ()) -> str:
    """The instruction for one step: add one error of ``edit_type``, keep the ``protected`` parts."""
    keep = ""
    if protected:
        keep = " Do not change these parts: " + ", ".join(f'"{p}"' for p in protected) + "."
    return PROMPT_TEMPLATE.format(description=EDIT_TYPE_DESCRIPTIONS[edit_type], keep=keep, caption=caption)


def clean_output(text: str) -> str:
    """The caption in a model's answer: the first paragraph, an echoed label and outer quotes removed."""
    text = _LEAD.sub("", text.strip())
    para = re.split(r"\n\s*\n", text, maxsplit=1)[0]
    para = " ".join(line.strip() for line in para.splitlines() if line.strip())
    if len(para) >= 2 and para[0] == para[-1] and para[0] in "\"'`":
        para = para[1:-1].strip()
    return para


def _words(s: str) -> Counter[str]:
    return Counter(w.lower() for w in _WORD.findall(s))


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c in "'-_"


class LLMEngine:
    """Chains made by a local causal LM, one verified error per step, with a ``rules`` fallback.

    Args:
        model_path: a local directory holding a transformers causal LM and its tokenizer (loaded with
            ``AutoModelForCausalLM``/``AutoTokenizer`` and ``local_files_only=True``). Needs the ``train``
            extra. Either this or ``generate_fn``.
        generate_fn: a custom text generator (see :class:`GenerateFn`), e.g. a served model or a test
            double; used instead of loading ``model_path``.
        types: edit types to use (default: all).
        max_retries: extra attempts per step after the first (so ``1 + max_retries`` in all).
        max_new_tokens: generation budget per attempt (default: 0.8 x prompt tokens + 32, capped by the
            model's context).
        temperature: sampling temperature of the retries.
        max_edit_chars: the most characters the changed region may hold on either side.
        max_edit_fraction: the largest share of the current caption the changed region may replace.
        device, dtype: where and in which dtype to load the model (default: CUDA if available, else CPU;
            the checkpoint's dtype).

    Attributes ``steps``, ``llm_edits``, ``fallbacks`` and ``rejections`` count over every chain made.
    """

    name = "llm"

    def __init__(
        self,
        model_path: str | None = None,
        *,
        generate_fn: GenerateFn | Callable[..., str] | None = None,
        types: Sequence[str] | str | None = None,
        max_retries: int = 2,
        max_new_tokens: int | None = None,
        temperature: float = 0.7,
        max_edit_chars: int = 200,
        max_edit_fraction: float = 0.5,
        device: str | None = None,
        dtype: Any = None,
    ) -> None:
        if (model_path is None) == (generate_fn is None):
            raise ValueError(
                "LLMEngine needs exactly one of model_path (a local model directory) or generate_fn"
            )
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if max_new_tokens is not None and (
            isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be None or an int >= 1, got {max_new_tokens!r}")
        if not isinstance(max_edit_chars, int) or max_edit_chars < 1:
            raise ValueError(f"max_edit_chars must be an int >= 1, got {max_edit_chars!r}")
        if not (isinstance(max_edit_fraction, (int, float)) and 0 < max_edit_fraction <= 1):
            raise ValueError(f"max_edit_fraction must be a number in (0, 1], got {max_edit_fraction!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.types = check_types(types)
        self.max_retries = max_retries
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.max_edit_chars = max_edit_chars
        self.max_edit_fraction = float(max_edit_fraction)
        self.model_path = model_path
        self._rules = RulesEngine(self.types)
        if generate_fn is not None:
            if not callable(generate_fn):
                raise TypeError(f"generate_fn must be callable, got {type(generate_fn).__name__}")
            self.generate_fn = generate_fn
        else:
            self.generate_fn = self._load_transformers(str(model_path), device, dtype)
        self.steps = 0
        self.llm_edits = 0
        self.fallbacks = 0
        self.rejections: Counter[str] = Counter()

    def __repr__(self) -> str:
        src = self.model_path if self.model_path is not None else "generate_fn"
        return f"LLMEngine({src!r}, types={list(self.types)!r}, max_retries={self.max_retries})"

    # ------------------------------------------------------------------------------------------------
    def _load_transformers(self, model_path: str, device: str | None, dtype: Any) -> Callable[..., str]:
        import os

        if not os.path.isdir(model_path):
            raise FileNotFoundError(
                f"llm model path {model_path!r} is not a directory (a local transformers model)"
            )
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(f"the llm engine needs transformers: {TRAIN_EXTRA_HINT}") from exc
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        kwargs: dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device).eval()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        max_pos = getattr(model.config, "max_position_embeddings", None)
        budget = self.max_new_tokens
        temperature = self.temperature

        def generate(prompt: str, *, seed: int, sample: bool) -> str:
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                )
            else:
                text = prompt
            enc = tokenizer(
                text, return_tensors="pt", add_special_tokens=not getattr(tokenizer, "chat_template", None)
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            n_in = enc["input_ids"].shape[1]
            max_new = budget if budget is not None else int(0.8 * n_in) + 32
            if max_pos is not None:
                max_new = min(max_new, int(max_pos) - n_in)
            if max_new < 1:
                return ""  # the prompt fills the context: verification rejects it as "empty output"
            devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(seed)
                gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": pad_id}
                if sample:
                    gen_kwargs.update(do_sample=True, temperature=temperature, top_p=0.95)
                else:
                    gen_kwargs.update(do_sample=False)
                out = model.generate(**enc, **gen_kwargs)
            return tokenizer.decode(out[0, n_in:], skip_special_tokens=True)

        return generate

    # ------------------------------------------------------------------------------------------------
    def make_chain(self, caption: str, length: int, *, seed: int = 0, key: str | None = None) -> Chain:
        """Same as :meth:`RulesEngine.make_chain`, one model call per attempt."""
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        if not caption.strip():
            raise ValueError("caption must be non-empty text")
        length = check_length(length)
        key = caption if key is None else key
        rng = caption_rng(seed, key)
        state = TextState(caption)
        captions, edits = [caption], []
        used: Counter[str] = Counter()
        fallbacks = 0
        rejections: Counter[str] = Counter()
        short_reason = None
        for step in range(1, length):
            self.steps += 1
            etype = sorted(self.types, key=lambda t: (used[t], rng.random()))[0]
            edit = None
            for attempt in range(1 + self.max_retries):
                prompt = build_prompt(state.text, etype, state.protected_texts())
                gen_seed = caption_seed(seed, f"{key}\x00{step}\x00{attempt}") & 0x7FFFFFFF
                answer = self.generate_fn(prompt, seed=gen_seed, sample=attempt > 0)
                verdict = self.verify(state, answer, etype)
                if isinstance(verdict, str):
                    rejections[verdict] += 1
                    continue
                edit = RulesEngine.apply(state, verdict, step, engine="llm")
                self.llm_edits += 1
                break
            if edit is None:
                fallbacks += 1
                edit = self._rules.edit_step(state, rng, step, used=used, prefer=etype)
                if edit is None:
                    short_reason = SHORT_NO_SPANS
                    break
            captions.append(state.text)
            edits.append(edit)
            used[edit.type] += 1
        self.fallbacks += fallbacks
        self.rejections.update(rejections)
        return Chain(captions, edits, length, short_reason, fallbacks, dict(rejections))

    # ------------------------------------------------------------------------------------------------
    def verify(self, state: TextState, answer: str, edit_type: str) -> tuple | str:
        """Check a model answer against the current chain state.

        Returns a candidate for :meth:`RulesEngine.apply <rankloss.chains.RulesEngine.apply>` when the
        answer is accepted, else the reason it was rejected (a short string, counted in the summary).
        """
        prev = state.text
        cand = clean_output(answer)
        if not cand:
            return "empty output"
        if cand == prev:
            return "unchanged"
        if _GARBLED.search(cand):
            return "garbled output"
        if edit_type == "order":
            return self._verify_swap(state, cand)
        n_p, n_c = len(prev), len(cand)
        p = 0
        lim = min(n_p, n_c)
        while p < lim and prev[p] == cand[p]:
            p += 1
        s = 0
        while s < lim - p and prev[n_p - 1 - s] == cand[n_c - 1 - s]:
            s += 1
        # Widen to whole words so the record reads as words replaced, not characters.
        while p > 0 and _is_word_char(prev[p - 1]):
            p -= 1
        while s > 0 and (
            (_is_word_char(prev[n_p - s]) and n_p - s > 0 and _is_word_char(prev[n_p - s - 1]))
            or (_is_word_char(cand[n_c - s]) and n_c - s > 0 and _is_word_char(cand[n_c - s - 1]))
        ):
            s -= 1
        e_p, e_c = n_p - s, n_c - s
        before, after = prev[p:e_p], cand[p:e_c]
        if (
            len(before) > self.max_edit_chars
            or len(after) > self.max_edit_chars
            or len(before) > self.max_edit_fraction * len(prev)
        ):
            return "edit too large"
        if state.blocked(p, e_p):
            return "touches an earlier edit"
        wb, wa = _words(before), _words(after)
        if edit_type == "omission":
            if not wb or (wa - wb) or len(after.strip()) >= len(before.strip()):
                return "not an omission"
        elif edit_type == "insertion":
            if not wa or (wb - wa) or len(after.strip()) <= len(before.strip()):
                return "not an insertion"
        elif not wb or not wa or wb == wa:
            return f"not a {edit_type} edit"
        if any(t not in cand for t in state.protected_texts()):
            return "undoes an earlier edit"
        # An inserted sentence is marked so that no later swap moves it (as in the rules engine).
        subtype = "sentence" if edit_type == "insertion" and re.search(r"[.!?]", after) else ""
        # An edit that makes the caption contradict itself can be spotted without the video.
        why = contradiction(prev, cand, (p, before, after))
        if why is not None:
            return why
        return ("replace", p, e_p, after, edit_type, subtype)

    @staticmethod
    def _verify_swap(state: TextState, cand: str) -> tuple | str:
        prev = state.text
        sp, sc = split_sentences(prev), split_sentences(cand)
        tp = [prev[a:b] for a, b in sp]
        tc = [cand[a:b] for a, b in sc]
        if len(tp) != len(tc) or sorted(tp) != sorted(tc):
            return "not a reordering of the sentences"
        diff = [i for i in range(len(tp)) if tp[i] != tc[i]]
        if len(diff) != 2 or tp[diff[0]] != tc[diff[1]] or tp[diff[1]] != tc[diff[0]]:
            return "not a swap of two sentences"
        (a1, b1), (a2, b2) = sp[diff[0]], sp[diff[1]]
        if state.has_order_span(a1, b1) or state.has_order_span(a2, b2):
            return "moves an earlier swap"
        if (
            state.has_insert_span(a1, b1)
            or state.has_insert_span(a2, b2)
            or state.swap_crosses(a1, b1, a2, b2)
        ):
            return "touches an earlier edit"
        why = contradiction(prev, cand)
        if why is not None:
            return why
        return ("swap", a1, b1, a2, b2, "sentence")
