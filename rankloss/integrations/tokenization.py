"""A chain record's text: its prompt and completions as the model's tokenizer and chat template see them.

:class:`ChainTokenizer` holds what one processing class (a tokenizer, or a processor with a
``.tokenizer``) decides about text:

* **Prompts** (:meth:`ChainTokenizer.prompt`). A string prompt is used as is (the tokenizer's BOS token
  is put in front when the tokenizer adds one by default) except in two cases, where it becomes one user
  message: when the record has images or videos, the processing class is a processor with a chat
  template and the string holds no media placeholder yet (the message's content is one
  ``{"type": "image"}`` / ``{"type": "video"}`` entry per media item, then the text), and when the
  completions are conversational. A processor without a chat template gets the media placeholders
  (Qwen-style ``<|vision_start|><|video_pad|><|vision_end|>`` when the tokenizer has those tokens) put in
  front of the string instead. A conversational prompt goes through the chat template with
  ``add_generation_prompt=True``.
* **Completions** (:meth:`ChainTokenizer.completion_ids`). A string completion is tokenised with
  ``add_special_tokens=False`` and ends with the tokenizer's EOS token. A conversational completion's
  text is what the chat template adds after the prompt: ``template(prompt + completion)`` minus
  ``template(prompt, add_generation_prompt=True)`` (the template's own end-of-turn tokens end it; no EOS
  is added).
* **The prompt/completion boundary** (``boundary``). ``"separate"`` (the default) tokenises the
  completion's text alone, as above, so a completion's tokens never depend on its prompt (and a chain's
  captions share their token prefixes). ``"joint"`` is TRL's ``DPOTrainer`` convention: the completion's
  tokens are those of ``tokenizer(prompt + completion)`` after the first ``len(tokenizer(prompt))``
  (then EOS for a string completion), so they can start with a token that also holds the end of the
  prompt. The two agree unless the tokenizer merges across the boundary (e.g. ``"clip:"`` +
  ``"the dog"`` with no separator, ``"clip: "`` + ``"the dog"`` with a byte-level or Metaspace BPE whose
  words start at a space, or a SentencePiece tokenizer that puts ``"▁"`` in front of a text
  tokenised alone). Such a completion is counted in :attr:`ChainTokenizer.boundary_merges`; with
  ``"separate"`` the first one in the process also warns (naming it), since the model is then scored
  on other tokens than TRL would score: put a separator at the boundary (a space at the start of the
  completion, or a newline at the end of the prompt) or pass
  ``boundary="joint"``. With ``"joint"`` a warning is given (once) only where TRL would warn too: the
  prompt's tokens are not a prefix of prompt + completion's. The check looks at the text around the
  boundary (the prompt's last and the completion's first ``BOUNDARY_WINDOW`` characters) and is
  memoised per such pair.

Chat-template texts and completion token ids are memoised (a chain's captions repeat across epochs and
reference passes), within a budget of bytes (``memo_bytes``, default 64 MiB per cache; token ids are
kept as 4-byte integers): once a cache is full, new entries are computed each time instead. Each data
loader worker has its own copy.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from array import array
from collections.abc import Mapping
from typing import Any

from .records import clean_messages, describe

__all__ = ["BOUNDARIES", "BOUNDARY_WINDOW", "MEDIA_KINDS", "MEMO_BYTES", "ChainTokenizer"]

#: Default byte budget of each memo (chat-template texts; completion token ids).
MEMO_BYTES = 64 << 20
#: A record's media fields and the kind of each item.
MEDIA_KINDS = (("images", "image"), ("videos", "video"))
#: The prompt/completion boundary conventions (see the module docstring).
BOUNDARIES = ("separate", "joint")
#: Characters of text on each side of the prompt/completion boundary the merge check tokenises.
BOUNDARY_WINDOW = 32
_BOUNDARY_MEMO_MAX = 1 << 16  # (prompt tail, completion head) pairs kept
#: Whether this process has warned about a prompt/completion boundary merge (warned once per process).
_warned_boundary = False


class ChainTokenizer:
    """The text side of one processing class (see the module docstring).

    Attributes:
        processing_class: what it was built from.
        is_processor: whether that is a processor (it has a ``.tokenizer`` of its own).
        tokenizer: the tokenizer (the processor's, or the processing class itself).
        pad_id: the tokenizer's pad token id.
        memo_bytes: the byte budget of each memo (about: keys, texts and 4-byte token ids counted).
        boundary: ``"separate"`` (default) or ``"joint"`` (TRL's convention); see the module docstring.
        boundary_merges: how many completions (calls of :meth:`completion_ids`) the tokenizer merged with
            the end of their prompt (their tokens differ between the two conventions). Counted in this
            object only: each data loader worker counts its own.
    """

    def __init__(
        self, processing_class: Any, *, memo_bytes: int = MEMO_BYTES, boundary: str = "separate"
    ) -> None:
        if isinstance(memo_bytes, bool) or not isinstance(memo_bytes, int) or memo_bytes < 0:
            raise ValueError(f"memo_bytes must be an int >= 0, got {memo_bytes!r}")
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
        self.memo_bytes = memo_bytes
        self.boundary = boundary
        self.boundary_merges = 0
        self._merge_memo: dict[tuple[str, str], bool] = {}
        pc = processing_class
        if pc is None or isinstance(pc, (str, os.PathLike)):
            raise TypeError(
                "processing_class must be a tokenizer or a processor object (e.g. "
                f"AutoProcessor.from_pretrained(...)), got {describe(pc)}"
            )
        tokenizer = getattr(pc, "tokenizer", None)
        self.processing_class = pc
        self.is_processor: bool = tokenizer is not None and tokenizer is not pc
        self.tokenizer: Any = tokenizer if self.is_processor else pc
        if not callable(self.tokenizer) or not hasattr(self.tokenizer, "pad_token_id"):
            raise TypeError(
                "processing_class must be a tokenizer or a processor with a .tokenizer, got "
                f"{type(pc).__name__}"
            )
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                "processing_class's tokenizer has no pad token, so prompts and completions cannot be padded: "
                "set one first (e.g. tokenizer.pad_token = tokenizer.eos_token)"
            )
        self.pad_id: int = int(self.tokenizer.pad_token_id)
        # Chat template: the processor's (it knows media entries), else its tokenizer's.
        self.template_owner: Any = None
        for owner in (pc, self.tokenizer):
            if getattr(owner, "chat_template", None) and hasattr(owner, "apply_chat_template"):
                self.template_owner = owner
                break
        # Media placeholders the processor expands (one per image / video in the prompt text).
        self.placeholder: dict[str, str | None] = {
            kind: (getattr(pc, f"{kind}_token", None) if self.is_processor else None)
            for _, kind in MEDIA_KINDS
        }
        self._vision_start, self._vision_end = self._vision_wrappers()
        self._bos_text = self._default_bos()
        self._template_cache: dict[str, str] = {}
        self._token_cache: dict[tuple[Any, ...], array] = {}
        self._template_bytes = 0
        self._token_bytes = 0

    # -------------------------------------------------------------------------------------------------
    def _vision_wrappers(self) -> tuple[str, str]:
        if not self.is_processor:
            return "", ""
        tok = self.tokenizer
        found = []
        for attr, default in (
            ("vision_start_token", "<|vision_start|>"),
            ("vision_end_token", "<|vision_end|>"),
        ):
            value = getattr(tok, attr, None)
            if not isinstance(value, str):
                try:
                    in_vocab = default in tok.get_vocab()
                except Exception:
                    in_vocab = False
                value = default if in_vocab else ""
            found.append(value)
        return found[0], found[1]

    def _default_bos(self) -> str:
        """The BOS token's text when the tokenizer puts it in front of a text by default, else ``""``."""
        tok = self.tokenizer
        bos_id, bos = getattr(tok, "bos_token_id", None), getattr(tok, "bos_token", None)
        if bos_id is None or not isinstance(bos, str):
            return ""
        try:
            with_special = list(tok("a")["input_ids"])
            without = list(tok("a", add_special_tokens=False)["input_ids"])
        except Exception:
            return ""
        return bos if with_special[:1] == [bos_id] and without[:1] != [bos_id] else ""

    def apply_template(self, messages: list[dict[str, Any]], where: str, *, generation: bool) -> str:
        """The chat template's text of ``messages`` (memoised); ``where`` names them in errors."""
        if self.template_owner is None:
            raise ValueError(
                f"{where} is conversational but processing_class has no chat template: give a string "
                "prompt and string completions, or set processing_class.chat_template"
            )
        key = json.dumps([messages, generation], sort_keys=True, default=str)
        text = self._template_cache.get(key)
        if text is None:
            try:
                text = self.template_owner.apply_chat_template(
                    messages, add_generation_prompt=generation, tokenize=False
                )
            except Exception as exc:  # jinja's raise_exception (Gemma, Mistral: roles they refuse), ...
                roles = [m.get("role") for m in messages]
                raise ValueError(
                    f"{where}: the chat template of {type(self.template_owner).__name__} refused the "
                    f"messages (roles {roles}): {type(exc).__name__}: {exc}. Give the messages in a form "
                    "this template accepts (many templates take only alternating user/assistant turns, "
                    "some no system turn), or set processing_class.chat_template"
                ) from exc
            if isinstance(text, (list, tuple)):  # some processors return one text per conversation
                text = text[0]
            if not isinstance(text, str):
                raise TypeError(f"the chat template gave {type(text).__name__} for {where}, not a string")
            size = 2 * (len(key) + len(text)) + 200
            if self._template_bytes + size <= self.memo_bytes:
                self._template_cache[key] = text
                self._template_bytes += size
        return text

    def token_ids(self, text: str, add_eos: bool) -> list[int]:
        """Token ids of ``text`` (``add_special_tokens=False``), plus EOS when ``add_eos`` (memoised)."""
        key = (text, add_eos)
        cached = self._token_cache.get(key)
        if cached is not None:
            return cached.tolist()
        ids = self._plain_ids(text)
        if add_eos:
            ids.append(int(self.tokenizer.eos_token_id))
        self._remember(key, ids, sys.getsizeof(text))
        return ids

    def _remember(self, key: tuple[Any, ...], ids: list[int], key_bytes: int) -> None:
        """Memoise ``ids`` under ``key`` while the token memo's byte budget allows (``key_bytes``: the
        key's texts)."""
        packed = array("i", ids)  # token ids fit in 4 bytes (vocabularies are far below 2**31)
        size = key_bytes + packed.itemsize * len(packed) + 200  # key, array, dict entry
        if self._token_bytes + size <= self.memo_bytes:
            self._token_cache[key] = packed
            self._token_bytes += size

    # -------------------------------------------------------------------------------------------------
    def prompt(
        self,
        i: int,
        rec: Mapping[str, Any],
        n_images: int,
        n_videos: int,
        conversational: bool,
        default_prompt: str,
    ) -> tuple[str, list[dict[str, Any]] | None]:
        """``records[i]``'s prompt text, and its messages when it is conversational (``None`` for a string
        used as is); ``default_prompt`` when the record has neither ``prompt`` nor ``messages``."""
        prompt, messages = rec.get("prompt"), rec.get("messages")
        if prompt is not None and messages is not None:
            raise ValueError(f"records[{i}] has both 'prompt' and 'messages': give one of them")
        field_name = "messages" if messages is not None else "prompt"
        value = messages if messages is not None else prompt
        if value is None:
            value = default_prompt
        where = f"records[{i}]['{field_name}']"
        if isinstance(value, str):
            if field_name == "messages":
                raise TypeError(f"{where} must be a list of messages, got {describe(value)}")
            has_placeholders = any(
                self.placeholder[kind] and self.placeholder[kind] in value for _, kind in MEDIA_KINDS
            )
            media = n_images + n_videos > 0
            if conversational or (
                media and self.is_processor and self.template_owner is not None and not has_placeholders
            ):
                content: Any = value
                if self.is_processor:
                    content = (
                        [{"type": "image"}] * n_images
                        + [{"type": "video"}] * n_videos
                        + [{"type": "text", "text": value}]
                    )
                msgs = [{"role": "user", "content": content}]
                return self.apply_template(msgs, where, generation=True), msgs
            if media and not has_placeholders:
                marks = "".join(
                    f"{self._vision_start}{self.placeholder[kind] or ''}{self._vision_end}" * n
                    for (_, kind), n in zip(MEDIA_KINDS, (n_images, n_videos))
                )
                value = marks + value
            if self._bos_text and not value.startswith(self._bos_text):
                value = self._bos_text + value
            return value, None
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} must be a string or a list of messages, got {describe(value)}")
        msgs = clean_messages(value, where)
        return self.apply_template(msgs, where, generation=True), msgs

    def completion_ids(
        self, where: str, completion: Any, prompt: str, prompt_messages: list[dict[str, Any]] | None
    ) -> list[int]:
        """A completion's token ids (see the module docstring): ``prompt`` and ``prompt_messages`` are what
        :meth:`prompt` gave its record; ``where`` names the completion in errors."""
        if isinstance(completion, str):
            if self.tokenizer.eos_token_id is None:
                raise ValueError(
                    "the tokenizer has no eos_token: string completions need an end token to learn to "
                    "stop (give conversational completions, or set tokenizer.eos_token)"
                )
            tokens = self._completion_tokens(where, prompt, completion, add_eos=True)
        else:
            assert prompt_messages is not None  # conversational completions make the prompt messages
            full = self.apply_template(
                prompt_messages + clean_messages(completion, where), where, generation=False
            )
            if not full.startswith(prompt):
                raise ValueError(
                    f"{where}: the chat template's text for prompt + completion does not start with its "
                    "text for the prompt alone (add_generation_prompt=True), so the completion's tokens "
                    f"cannot be told apart: prompt {prompt[-120:]!r}, prompt + completion "
                    f"{full[max(0, len(prompt) - 120) : len(prompt) + 80]!r}"
                )
            text = full[len(prompt) :]
            if not text:
                raise ValueError(f"{where}: the chat template adds no text for this completion")
            tokens = self._completion_tokens(where, prompt, text, add_eos=False)
        if not tokens:
            raise ValueError(f"{where} has no tokens")
        return tokens

    # -------------------------------------------------------------------------------------------------
    def merges_at_boundary(self, prompt: str, text: str, text_ids: list[int] | None = None) -> bool:
        """Whether the tokenizer joins the end of ``prompt`` and the start of ``text`` (a completion's text)
        into other tokens than each gets alone: ``tok(tail + head) != tok(tail) + tok(head)`` for the
        prompt's last and the text's first :data:`BOUNDARY_WINDOW` characters (memoised per pair).
        ``text_ids``: the text's own ids when known (used when the window holds the whole text: no second
        tokenisation)."""
        tail, head = prompt[-BOUNDARY_WINDOW:], text[:BOUNDARY_WINDOW]
        if not tail or not head:
            return False
        key = (tail, head)
        merged = self._merge_memo.get(key)
        if merged is None:
            head_ids = text_ids if text_ids is not None and head == text else self._plain_ids(head)
            merged = self._plain_ids(tail + head) != self._plain_ids(tail) + head_ids
            if len(self._merge_memo) < _BOUNDARY_MEMO_MAX:
                self._merge_memo[key] = merged
        return merged

    def _plain_ids(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def joint_ids(self, prompt: str, text: str, add_eos: bool) -> list[int]:
        """TRL's convention: the ids of ``prompt + text`` after the first ``len(ids(prompt))``, plus EOS
        when ``add_eos`` (memoised; ``add_special_tokens=False``: the prompt text already holds any BOS)."""
        key = (text, add_eos, prompt)
        cached = self._token_cache.get(key)
        if cached is not None:
            return cached.tolist()
        prompt_ids = self.token_ids(prompt, add_eos=False)
        full = self._plain_ids(prompt + text)
        ids = full[len(prompt_ids) :]
        if add_eos:
            ids.append(int(self.tokenizer.eos_token_id))
        self._remember(key, ids, sys.getsizeof(text) + sys.getsizeof(prompt))
        return ids

    def _completion_tokens(self, where: str, prompt: str, text: str, add_eos: bool) -> list[int]:
        """The completion ``text``'s token ids under :attr:`boundary`, counting (and once per process
        warning about) a merge across the prompt/completion boundary."""
        global _warned_boundary
        if self.boundary == "separate":
            tokens = self.token_ids(text, add_eos=add_eos)
            merged = self.merges_at_boundary(prompt, text, tokens[:-1] if add_eos else tokens)
            if merged:
                self.boundary_merges += 1
            if merged and not _warned_boundary:
                _warned_boundary = True
                warnings.warn(
                    f"{where}: the tokenizer merges the end of the prompt with the start of the completion "
                    f"(...{prompt[-24:]!r} + {text[:24]!r}...): rankloss tokenises a completion alone "
                    "(boundary='separate'), so it scores other tokens here than TRL's DPOTrainer, which "
                    "tokenises prompt + completion together. Put a separator at the boundary (with most BPE "
                    "tokenizers a space at the start of the completion, not at the end of the prompt, or "
                    "a newline at the end of the prompt), or use TRL's convention "
                    "(ChainCollator(boundary='joint')). Warned once per process; every such completion is "
                    "counted in ChainTokenizer.boundary_merges",
                    stacklevel=3,
                )
            return tokens
        merged = self.merges_at_boundary(prompt, text)
        if merged:
            self.boundary_merges += 1
        tokens = self.joint_ids(prompt, text, add_eos)
        if merged and not _warned_boundary:
            prompt_ids = self.token_ids(prompt, add_eos=False)
            if self._plain_ids(prompt + text)[: len(prompt_ids)] != prompt_ids:
                _warned_boundary = True
                warnings.warn(
                    f"{where}: the prompt's tokens are not a prefix of prompt + completion's "
                    f"(...{prompt[-24:]!r} + {text[:24]!r}...); as in TRL, the completion's tokens are "
                    "those after the prompt's length, so the model sees a sequence no text tokenises to. "
                    "Put a separator at the boundary (a space at the start of the completion, or a newline "
                    "at the end of the prompt). Warned once per process; "
                    "every merge is counted in ChainTokenizer.boundary_merges",
                    stacklevel=3,
                )
        return tokens

    def check_placeholders(self, i: int, text: str, counts: dict[str, int], cause: Exception) -> None:
        """Raise ``ValueError`` (from ``cause``, the processor's refusal) naming ``records[i]`` when its
        prompt ``text`` has another number of media placeholders than its media (``counts``)."""
        for name, kind in MEDIA_KINDS:
            token = self.placeholder[kind]
            if not token:
                continue
            found, want = text.count(token), counts[kind]
            if found != want:
                raise ValueError(
                    f"records[{i}]: the prompt has {found} {kind} placeholder(s) ({token!r}) for {want} "
                    f"item(s) in '{name}': a conversational prompt needs one "
                    f'{{"type": "{kind}"}} content entry per {kind} (prompt text: {text[:200]!r})'
                ) from cause
