"""Chain records in TRL's shape to chain batches: :class:`ChainCollator` and :func:`load_chain_dataset`.

A **chain record** is one prompt (with its images or videos) and ``K >= 1`` completions ranked best
first, in the shape TRL's trainers read (a ``dict`` per example, e.g. a row of a ``datasets.Dataset``):

===============  ==========================================================================================
key              value
===============  ==========================================================================================
``prompt``       a string (*standard* format), or a list of messages ``[{"role": "user", "content":
                 ...}]`` (*conversational* format); ``messages`` is accepted as an alias of a
                 conversational prompt; absent or ``None``: the collator's ``default_prompt``
``completions``  ``K >= 1`` completions, best first: strings, or conversational completions (each a list
                 of messages, typically one ``{"role": "assistant", "content": ...}``)
``images``       optional list of images: ``PIL.Image``, ``uint8 [H, W, C]`` arrays, or file paths
``videos``       optional list of videos: file paths (decoded with :func:`rankloss.video.load_video`), or
                 ``uint8`` frame arrays ``[T, H, W, C]`` or ``[T, C, H, W]``
``video_fps``    optional: frames per second of the record's videos' frames (one number for all of them, or
                 one per video), for processors that take ``video_metadata`` (Qwen's temporal positions);
                 overrides the collator's ``video_fps``
``ref_scores``   optional ``K`` floats: the reference model's summed log-probs of the completions
``id``           optional: the record's id (becomes ``chain_ids``)
===============  ==========================================================================================

:class:`ChainCollator` (a callable on a list of records, the Hugging Face ``Trainer``'s
``data_collator``) turns a list of ``B`` records into one **chain batch** (the table in
:mod:`rankloss.integrations`): the prompts go through the processor (or tokenizer) once per batch,
left-padded, one row per chain; the ``S = sum_b K_b`` completions are tokenised, right-padded and
labelled. :func:`load_chain_dataset` reads the ``rankloss chains make`` output into a
``datasets.Dataset`` of such records.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import numpy as np
import torch

from .layout import build_chain_tree, check_chain_batch

__all__ = [
    "IGNORE_INDEX",
    "ChainCollator",
    "ChainFileRecord",
    "check_videos_exist",
    "load_chain_dataset",
    "read_chain_records",
]

#: Label of completion tokens that are not scored (padding).
IGNORE_INDEX = -100

_MEMO_LIMIT = 200_000
_MEDIA_KINDS = (("images", "image"), ("videos", "video"))


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_optional_int(value: object, name: str, minimum: int) -> None:
    if value is None:
        return
    if not _is_int(value):
        raise TypeError(f"{name} must be None or an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:  # type: ignore[operator]
        raise ValueError(f"{name} must be None or an int >= {minimum}, got {value!r}")


def _is_messages(value: object) -> bool:
    """Whether ``value`` looks like a conversational list of messages (dicts with a ``role``)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(m, Mapping) and "role" in m for m in value)
    )


def _clean_messages(messages: Sequence[Mapping[str, Any]], where: str) -> list[dict[str, Any]]:
    """``messages`` checked (each a dict with a string ``role`` and string or list ``content``) and copied
    without ``None`` values inside content entries (a ``datasets`` row fills the keys an entry lacks with
    ``None``: ``{"type": "video", "text": None}``, which some chat templates read as text)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError(f"{where} must be a non-empty list of messages, got {_describe(messages)}")
    out = []
    for j, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise TypeError(f"{where}[{j}] must be a message dict, got {_describe(msg)}")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise TypeError(f"{where}[{j}] needs a string 'role', got {_describe(role)}")
        if isinstance(content, (list, tuple)):
            entries = []
            for k, entry in enumerate(content):
                if not isinstance(entry, Mapping) or not isinstance(entry.get("type"), str):
                    raise TypeError(
                        f"{where}[{j}]['content'][{k}] must be a dict with a 'type' (e.g. "
                        f'{{"type": "text", "text": ...}} or {{"type": "video"}}), got {_describe(entry)}'
                    )
                entries.append({key: val for key, val in entry.items() if val is not None})
            content = entries
        elif not isinstance(content, str):
            raise TypeError(
                f"{where}[{j}]['content'] must be a string or a list of content entries, got "
                f"{_describe(content)}"
            )
        out.append({**{k: v for k, v in msg.items() if v is not None}, "role": role, "content": content})
    return out


def _describe(value: object) -> str:
    if isinstance(value, str):
        return f"the string {value[:60]!r}"
    if isinstance(value, (list, tuple)) and not value:
        return f"an empty {type(value).__name__}"
    return type(value).__name__


def _typed_keys(typed_dict: object) -> set[str]:
    if typed_dict is None:
        return set()
    try:
        return set(typing.get_type_hints(typed_dict))
    except Exception:  # unresolvable forward references: the raw annotations still name the keys
        return set(getattr(typed_dict, "__annotations__", {}))


def _parameters(fn: object) -> set[str]:
    if not callable(fn):
        return set()
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _sampled_fps(path: str, num_frames: int) -> float:
    """Frames per second of ``num_frames`` frames sampled uniformly over the video file (2.0 when its
    duration is unknown)."""
    from ..video import video_info

    info = video_info(path)
    duration = info.get("duration")
    if not duration and info.get("frames") and info.get("fps"):
        duration = info["frames"] / info["fps"]
    return num_frames / duration if duration else 2.0


@dataclass
class _Parsed:
    """One record, checked: the prompt text, its media, the completions' token ids."""

    prompt: str
    images: list[Any]
    videos: list[np.ndarray]
    video_fps: list[float]
    completions: list[list[int]]
    ref_scores: list[float] | None
    id: str | None


@dataclass
class ChainCollator:
    """Collates chain records (TRL's shape, see the module docstring) into one chain batch.

    A callable on a list of ``B`` records, as the Hugging Face ``Trainer``'s ``data_collator``. It calls
    the processor (or tokenizer) **once** per batch on the ``B`` prompts (``padding=True,
    padding_side="left"``), so every chain's prompt and media are one row however many completions
    the chain has, and tokenises the ``S = sum_b K_b`` completions (memoised) into right-padded rows.

    **Prompts.** A string prompt is used as is (the tokenizer's BOS token is put in front when the
    tokenizer adds one by default) except in two cases, where it becomes one user message: when the
    record has images or videos, ``processing_class`` is a processor with a chat template and the
    string holds no media placeholder yet (the message's content is one ``{"type": "image"}`` /
    ``{"type": "video"}`` entry per media item, then the text), and when the completions are
    conversational. A processor without a chat template gets the media placeholders (Qwen-style
    ``<|vision_start|><|video_pad|><|vision_end|>`` when the tokenizer has those tokens) put in front of
    the string instead. A conversational prompt (or ``messages``) goes through the chat template with
    ``add_generation_prompt=True`` and is tokenised as it comes out (no special tokens are added). The
    number of media placeholders in each prompt must match the record's media (the processor checks; when
    it refuses the batch, the error names the record whose placeholders do not match).

    **Completions.** String completions are tokenised with ``add_special_tokens=False`` and end with the
    tokenizer's EOS token. A conversational completion's text is what the chat template adds after the
    prompt: ``template(prompt + completion)`` minus ``template(prompt, add_generation_prompt=True)``
    (the template's own end-of-turn tokens end it; no EOS is added).

    **Truncation.** ``max_completion_length`` keeps the first tokens of each completion; a completion cut
    this way loses its end token (the model is then not taught to stop there). Prompts are **never**
    truncated (cutting would drop media placeholder tokens or the instruction): a prompt longer than
    ``max_prompt_length`` (placeholders expanded) raises ``ValueError``.

    Args:
        processing_class: a tokenizer (text-only LM) or a processor (VLM: it has ``.tokenizer``; images
            and videos go through it). Its tokenizer needs a pad token.
        max_prompt_length: at most this many prompt tokens (media placeholders included), or ``None``.
        max_completion_length: completions are cut to this many tokens, or ``None``.
        num_frames: frames decoded from each video file (:func:`rankloss.video.load_video`); needed when
            records give videos as paths.
        video_fps: frames per second of the videos' frames, passed to processors that take
            ``video_metadata`` (Qwen's temporal positions); ``None``: for a file, ``num_frames`` over its
            duration (:func:`rankloss.video.video_info`), for frame arrays 2.0. A record's own
            ``video_fps`` takes precedence.
        default_prompt: the prompt of records without ``prompt`` and ``messages`` (or with ``None``).
        pad_to_multiple_of: pad ``P`` and ``L`` up to a multiple of this, or ``None``.
        chain_tree: also lay the batch out as the packed chain tree the chain forward runs
            (``batch["chain_tree"]``, :func:`rankloss.integrations.layout.build_chain_tree`), here in the
            data loader's workers instead of at every step (default ``True``).

    Returns (of a call on ``records``, a list of ``B`` records): the chain batch, a ``dict``:

    * ``prompt_input_ids`` ``[B, P]`` long, left-padded with the pad id, media placeholders expanded;
    * ``prompt_attention_mask`` ``[B, P]`` long, 1 at real prompt tokens;
    * ``completion_input_ids`` ``[S, L]`` long, chain after chain, best first, right-padded with the pad
      id;
    * ``completion_labels`` ``[S, L]`` long, ``completion_input_ids`` with ``-100`` at padding;
    * ``chain_sizes`` ``[B]`` long, ``K_b``;
    * ``ref_scores`` ``[S]`` float32, when the records have ``ref_scores`` (all of them must);
    * ``chain_ids`` list of ``B`` strings, when the records have ``id`` (all of them must);
    * ``chain_tree``: the batch packed into one row, each prompt once (a
      :class:`~rankloss.integrations.layout.ChainTree`, on the CPU), unless ``chain_tree=False``;
    * the processor's other outputs for the prompts, unchanged (``pixel_values_videos``,
      ``video_grid_thw``, ``second_per_grid_ts``, ``mm_token_type_ids [B, P]``, ``pixel_values``,
      ``image_grid_thw``, ...). A plain tokenizer's other outputs are dropped.

    Raises:
        TypeError: a record or field of the wrong type (the message names the record index and field).
        ValueError: a missing or empty field, media for a tokenizer-only model, a placeholder count
            that does not match the media, a prompt over ``max_prompt_length``, a chat template whose
            output for the prompt is not a prefix of its output for prompt + completion, ...
    """

    processing_class: Any
    _: KW_ONLY
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    num_frames: int | None = None
    video_fps: float | None = None
    default_prompt: str = "Describe this video in detail."
    pad_to_multiple_of: int | None = None
    chain_tree: bool = True
    _completion_cache: dict[tuple[str, bool], list[int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _template_cache: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    _fps_cache: dict[tuple[str, int], float] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        pc = self.processing_class
        if pc is None or isinstance(pc, (str, os.PathLike)):
            raise TypeError(
                "processing_class must be a tokenizer or a processor object (e.g. "
                f"AutoProcessor.from_pretrained(...)), got {_describe(pc)}"
            )
        tokenizer = getattr(pc, "tokenizer", None)
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
        _check_optional_int(self.max_prompt_length, "max_prompt_length", 1)
        _check_optional_int(self.max_completion_length, "max_completion_length", 1)
        _check_optional_int(self.num_frames, "num_frames", 1)
        _check_optional_int(self.pad_to_multiple_of, "pad_to_multiple_of", 1)
        if self.video_fps is not None:
            if isinstance(self.video_fps, bool) or not isinstance(self.video_fps, numbers.Real):
                raise TypeError(
                    f"video_fps must be None or a positive number, got {_describe(self.video_fps)}"
                )
            if not (math.isfinite(self.video_fps) and self.video_fps > 0):
                raise ValueError(f"video_fps must be None or a positive number, got {self.video_fps!r}")
        if not isinstance(self.default_prompt, str):
            raise TypeError(f"default_prompt must be a string, got {_describe(self.default_prompt)}")

        # Chat template: the processor's (it knows media entries), else its tokenizer's.
        self._template_owner: Any = None
        for owner in (pc, self.tokenizer):
            if getattr(owner, "chat_template", None) and hasattr(owner, "apply_chat_template"):
                self._template_owner = owner
                break
        # Media placeholders the processor expands (one per image / video in the prompt text).
        self._placeholder: dict[str, str | None] = {
            kind: (getattr(pc, f"{kind}_token", None) if self.is_processor else None)
            for _, kind in _MEDIA_KINDS
        }
        self._vision_start, self._vision_end = self._vision_wrappers()
        vp = getattr(pc, "video_processor", None) if self.is_processor else None
        self._takes_video_metadata = vp is not None and (
            "video_metadata" in _typed_keys(getattr(vp, "valid_kwargs", None))
            or any("video_metadata" in _parameters(fn) for fn in (getattr(vp, "preprocess", None), vp))
        )
        self._bos_text = self._default_bos()

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

    def _apply_template(self, messages: list[dict[str, Any]], where: str, *, generation: bool) -> str:
        if self._template_owner is None:
            raise ValueError(
                f"{where} is conversational but processing_class has no chat template: give a string "
                "prompt and string completions, or set processing_class.chat_template"
            )
        key = json.dumps([messages, generation], sort_keys=True, default=str)
        text = self._template_cache.get(key)
        if text is None:
            text = self._template_owner.apply_chat_template(
                messages, add_generation_prompt=generation, tokenize=False
            )
            if isinstance(text, (list, tuple)):  # some processors return one text per conversation
                text = text[0]
            if not isinstance(text, str):
                raise TypeError(f"the chat template gave {type(text).__name__} for {where}, not a string")
            if len(self._template_cache) < _MEMO_LIMIT:
                self._template_cache[key] = text
        return text

    def _token_ids(self, text: str, add_eos: bool) -> list[int]:
        """Token ids of ``text`` (``add_special_tokens=False``), plus EOS when ``add_eos`` (memoised)."""
        key = (text, add_eos)
        ids = self._completion_cache.get(key)
        if ids is None:
            ids = [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
            if add_eos:
                ids.append(int(self.tokenizer.eos_token_id))
            if len(self._completion_cache) < _MEMO_LIMIT:
                self._completion_cache[key] = ids
        return list(ids)

    # -------------------------------------------------------------------------------------------------
    def _completions(self, i: int, rec: Mapping[str, Any]) -> tuple[list[Any], bool]:
        """The record's completions and whether they are conversational."""
        where = f"records[{i}]['completions']"
        if rec.get("completions") is None:
            raise ValueError(
                f"records[{i}] has no 'completions': each record needs a list of K >= 1 completions, "
                f"best first (its keys: {sorted(rec)})"
            )
        comps = rec["completions"]
        if not isinstance(comps, (list, tuple)):
            raise TypeError(f"{where} must be a list of completions (best first), got {_describe(comps)}")
        if not comps:
            raise ValueError(f"{where} is an empty list: a chain needs at least one completion")
        conversational = not isinstance(comps[0], str)
        for k, c in enumerate(comps):
            if isinstance(c, str):
                if conversational:
                    raise TypeError(f"{where} mixes strings and conversational completions ({where}[{k}])")
                if not c.strip():
                    raise ValueError(f"{where}[{k}] is an empty string: completions need text")
            elif _is_messages(c):
                if not conversational:
                    raise TypeError(f"{where} mixes strings and conversational completions ({where}[{k}])")
            else:
                raise TypeError(
                    f"{where}[{k}] must be a non-empty string or a list of messages "
                    f'([{{"role": "assistant", "content": ...}}]), got {_describe(c)}'
                )
        return list(comps), conversational

    def _media(self, i: int, rec: Mapping[str, Any]) -> tuple[list[Any], list[np.ndarray], list[float]]:
        images_in, videos_in = rec.get("images"), rec.get("videos")
        for name, value in (("images", images_in), ("videos", videos_in)):
            if value is not None and not isinstance(value, (list, tuple)):
                raise TypeError(f"records[{i}]['{name}'] must be a list, got {_describe(value)}")
        images_in, videos_in = list(images_in or []), list(videos_in or [])
        if (images_in or videos_in) and not self.is_processor:
            raise ValueError(
                f"records[{i}] has {len(images_in)} image(s) and {len(videos_in)} video(s) but "
                f"processing_class is a tokenizer ({type(self.processing_class).__name__}): pass the "
                "model's processor (AutoProcessor) for a vision-language model"
            )
        if images_in and getattr(self.processing_class, "image_processor", None) is None:
            raise ValueError(f"records[{i}] has images but processing_class has no image processor")
        if videos_in and getattr(self.processing_class, "video_processor", None) is None:
            raise ValueError(f"records[{i}] has videos but processing_class has no video processor")
        images = [self._image(i, j, im) for j, im in enumerate(images_in)]
        videos: list[np.ndarray] = []
        fps: list[float] = []
        rates = self._record_fps(i, rec.get("video_fps"), len(videos_in))
        for j, v in enumerate(videos_in):
            frames, rate = self._video(i, j, v)
            videos.append(frames)
            fps.append(rate if rates is None else rates[j])
        return images, videos, fps

    @staticmethod
    def _record_fps(i: int, value: Any, n_videos: int) -> list[float] | None:
        """A record's ``video_fps`` (a number, or one per video) as one rate per video, or ``None``."""
        if value is None:
            return None
        where = f"records[{i}]['video_fps']"

        def is_number(x: Any) -> bool:
            return isinstance(x, numbers.Real) and not isinstance(x, bool)

        if is_number(value):
            rates = [value] * n_videos
        elif isinstance(value, (list, tuple)) and all(is_number(x) for x in value):
            if len(value) != n_videos:
                raise ValueError(f"{where} has {len(value)} rates for {n_videos} video(s)")
            rates = list(value)
        else:
            raise TypeError(
                f"{where} must be a positive number or a list of them (one per video), got {_describe(value)}"
            )
        if not all(math.isfinite(r) and r > 0 for r in rates):
            raise ValueError(f"{where} must be positive and finite, got {value!r}")
        return [float(r) for r in rates]

    def _image(self, i: int, j: int, image: Any) -> Any:
        from PIL import Image

        where = f"records[{i}]['images'][{j}]"
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{where}: image file not found: {path!r}")
            with Image.open(path) as im:
                return im.convert("RGB")
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
                raise ValueError(
                    f"{where} must be a uint8 [H, W, C] array (C = 1, 3 or 4), got {image.dtype} "
                    f"{list(image.shape)}"
                )
            return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        raise TypeError(
            f"{where} must be a PIL image, a uint8 [H, W, C] array or a file path, got {_describe(image)}"
        )

    def _video(self, i: int, j: int, video: Any) -> tuple[np.ndarray, float]:
        """``uint8 [T, 3, H, W]`` frames and their frames per second."""
        where = f"records[{i}]['videos'][{j}]"
        if isinstance(video, (str, os.PathLike)):
            from ..video import VideoLoadError, load_video

            path = os.fspath(video)
            if self.num_frames is None:
                raise ValueError(
                    f"{where} is a file path ({path!r}) but num_frames is None: set "
                    "ChainCollator(num_frames=...) to say how many frames to decode per video"
                )
            try:
                frames = load_video(path, self.num_frames)
                rate = self.video_fps
                if rate is None and self._takes_video_metadata:
                    key = (path, self.num_frames)
                    rate = self._fps_cache.get(key)
                    if rate is None:
                        rate = self._fps_cache[key] = _sampled_fps(path, self.num_frames)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"{where}: {exc}") from exc
            except VideoLoadError as exc:
                raise VideoLoadError(f"{where}: {exc}") from exc
            return frames, float(rate if rate is not None else 2.0)
        if isinstance(video, torch.Tensor):
            video = video.detach().cpu().numpy()
        if not isinstance(video, np.ndarray):
            raise TypeError(
                f"{where} must be a video file path or a uint8 frame array [T, H, W, C] / [T, C, H, W], "
                f"got {_describe(video)}"
            )
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[0] < 1:
            raise ValueError(
                f"{where} must be a uint8 frame array [T, H, W, C] or [T, C, H, W] with T >= 1, got "
                f"{video.dtype} {list(video.shape)}"
            )
        if video.shape[1] == 3:
            frames = video
        elif video.shape[-1] == 3:
            frames = video.transpose(0, 3, 1, 2)
        else:
            raise ValueError(
                f"{where}: cannot tell the channel axis of frames {list(video.shape)}: need 3 (RGB) "
                "channels, [T, H, W, 3] or [T, 3, H, W]"
            )
        return np.ascontiguousarray(frames), float(self.video_fps if self.video_fps is not None else 2.0)

    def _prompt(
        self, i: int, rec: Mapping[str, Any], n_images: int, n_videos: int, conversational: bool
    ) -> tuple[str, list[dict[str, Any]] | None]:
        """The prompt text, and its messages when it is conversational (``None`` for a string used as is)."""
        prompt, messages = rec.get("prompt"), rec.get("messages")
        if prompt is not None and messages is not None:
            raise ValueError(f"records[{i}] has both 'prompt' and 'messages': give one of them")
        field_name = "messages" if messages is not None else "prompt"
        value = messages if messages is not None else prompt
        if value is None:
            value = self.default_prompt
        where = f"records[{i}]['{field_name}']"
        if isinstance(value, str):
            if field_name == "messages":
                raise TypeError(f"{where} must be a list of messages, got {_describe(value)}")
            has_placeholders = any(
                self._placeholder[kind] and self._placeholder[kind] in value for _, kind in _MEDIA_KINDS
            )
            media = n_images + n_videos > 0
            if conversational or (
                media and self.is_processor and self._template_owner is not None and not has_placeholders
            ):
                content: Any = value
                if self.is_processor:
                    content = (
                        [{"type": "image"}] * n_images
                        + [{"type": "video"}] * n_videos
                        + [{"type": "text", "text": value}]
                    )
                msgs = [{"role": "user", "content": content}]
                return self._apply_template(msgs, where, generation=True), msgs
            if media and not has_placeholders:
                marks = "".join(
                    f"{self._vision_start}{self._placeholder[kind] or ''}{self._vision_end}" * n
                    for (_, kind), n in zip(_MEDIA_KINDS, (n_images, n_videos))
                )
                value = marks + value
            if self._bos_text and not value.startswith(self._bos_text):
                value = self._bos_text + value
            return value, None
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} must be a string or a list of messages, got {_describe(value)}")
        msgs = _clean_messages(value, where)
        return self._apply_template(msgs, where, generation=True), msgs

    def _check_placeholders(self, i: int, text: str, counts: dict[str, int], cause: Exception) -> None:
        for name, kind in _MEDIA_KINDS:
            token = self._placeholder[kind]
            if not token:
                continue
            found, want = text.count(token), counts[kind]
            if found != want:
                raise ValueError(
                    f"records[{i}]: the prompt has {found} {kind} placeholder(s) ({token!r}) for {want} "
                    f"item(s) in '{name}': a conversational prompt needs one "
                    f'{{"type": "{kind}"}} content entry per {kind} (prompt text: {text[:200]!r})'
                ) from cause

    def _parse(self, i: int, rec: Any) -> _Parsed:
        if not isinstance(rec, Mapping):
            raise TypeError(f"records[{i}] must be a dict (a chain record), got {_describe(rec)}")
        completions, conversational = self._completions(i, rec)
        images, videos, fps = self._media(i, rec)
        prompt, prompt_msgs = self._prompt(i, rec, len(images), len(videos), conversational)

        ids: list[list[int]] = []
        for k, c in enumerate(completions):
            where = f"records[{i}]['completions'][{k}]"
            if isinstance(c, str):
                if self.tokenizer.eos_token_id is None:
                    raise ValueError(
                        "the tokenizer has no eos_token: string completions need an end token to learn to "
                        "stop (give conversational completions, or set tokenizer.eos_token)"
                    )
                tokens = self._token_ids(c, add_eos=True)
            else:
                assert prompt_msgs is not None  # conversational completions make the prompt messages
                full = self._apply_template(prompt_msgs + _clean_messages(c, where), where, generation=False)
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
                tokens = self._token_ids(text, add_eos=False)
            if not tokens:
                raise ValueError(f"{where} has no tokens")
            if self.max_completion_length is not None:
                tokens = tokens[: self.max_completion_length]
            ids.append(tokens)

        refs = rec.get("ref_scores")
        if refs is not None:
            where = f"records[{i}]['ref_scores']"
            if isinstance(refs, (torch.Tensor, np.ndarray)):
                refs = refs.tolist()
            if not isinstance(refs, (list, tuple)) or not all(
                isinstance(r, numbers.Real) and not isinstance(r, bool) for r in refs
            ):
                raise TypeError(
                    f"{where} must be a list of floats (one per completion), got {_describe(refs)}"
                )
            if len(refs) != len(completions):
                raise ValueError(f"{where} has {len(refs)} scores for {len(completions)} completions")
            refs = [float(r) for r in refs]
        rid = rec.get("id")
        return _Parsed(prompt, images, videos, fps, ids, refs, None if rid is None else str(rid))

    # -------------------------------------------------------------------------------------------------
    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The chain batch of ``records`` (``B`` chain records); see the class docstring."""
        if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Sequence):
            raise TypeError(f"records must be a list of chain records (dicts), got {_describe(records)}")
        if not records:
            raise ValueError("records is empty: a batch needs at least one chain record")
        parsed = [self._parse(i, rec) for i, rec in enumerate(records)]
        for name, present in (("ref_scores", [p.ref_scores is not None for p in parsed]),
                              ("id", [p.id is not None for p in parsed])):  # fmt: skip
            if any(present) and not all(present):
                missing = present.index(False)
                raise ValueError(
                    f"records[{missing}] has no '{name}' but records[{present.index(True)}] has: give "
                    f"'{name}' for every record of a batch or for none"
                )

        batch = self._encode_prompts(parsed)
        lengths = batch["prompt_attention_mask"].sum(1).tolist()
        for i, n in enumerate(lengths):
            if n == 0:
                raise ValueError(
                    f"records[{i}]: the prompt has no tokens; the first completion token is scored from the "
                    "prompt's last token, so a prompt needs at least one"
                )
            if self.max_prompt_length is not None and n > self.max_prompt_length:
                raise ValueError(
                    f"records[{i}]: the prompt has {n} tokens (media placeholders expanded), more than "
                    f"max_prompt_length={self.max_prompt_length}; prompts are never truncated (that would "
                    "cut media placeholders or the instruction): raise max_prompt_length, shorten the "
                    "prompt, or use fewer frames / smaller images"
                )

        rows = [ids for p in parsed for ids in p.completions]
        L = self._round_up(max(len(r) for r in rows))
        completion_ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long)
        for s, r in enumerate(rows):
            t = torch.tensor(r, dtype=torch.long)
            completion_ids[s, : len(r)] = t
            labels[s, : len(r)] = t
        batch["completion_input_ids"] = completion_ids
        batch["completion_labels"] = labels
        batch["chain_sizes"] = torch.tensor([len(p.completions) for p in parsed], dtype=torch.long)
        if parsed[0].ref_scores is not None:
            batch["ref_scores"] = torch.tensor(
                [r for p in parsed for r in (p.ref_scores or [])], dtype=torch.float32
            )
        if parsed[0].id is not None:
            batch["chain_ids"] = [p.id for p in parsed]
        if self.chain_tree:
            check_chain_batch(batch)
            batch["chain_tree"] = build_chain_tree(batch, ignore_index=IGNORE_INDEX)
        return batch

    def _round_up(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if m is None else -(-n // m) * m

    def _encode_prompts(self, parsed: list[_Parsed]) -> dict[str, Any]:
        """``prompt_input_ids [B, P]``, ``prompt_attention_mask [B, P]`` and the media keys: one call of the
        processor (or tokenizer) on all prompts, left-padded."""
        kwargs: dict[str, Any] = {
            "padding": True,
            "padding_side": "left",
            "return_tensors": "pt",
            "add_special_tokens": False,
        }
        if self.pad_to_multiple_of is not None:
            kwargs["pad_to_multiple_of"] = self.pad_to_multiple_of
        texts = [p.prompt for p in parsed]
        if not self.is_processor:
            out = self.tokenizer(texts, **kwargs)
            return {
                "prompt_input_ids": out["input_ids"].long(),
                "prompt_attention_mask": out["attention_mask"].long(),
            }
        images = [im for p in parsed for im in p.images]
        videos = [v for p in parsed for v in p.videos]
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
            if self._takes_video_metadata:
                kwargs["video_metadata"] = [
                    {
                        "total_num_frames": int(v.shape[0]),
                        "fps": f,
                        "frames_indices": list(range(int(v.shape[0]))),
                    }
                    for p in parsed
                    for v, f in zip(p.videos, p.video_fps)
                ]
        try:
            out = self.processing_class(text=texts, **kwargs)
        except (ValueError, IndexError, RuntimeError) as exc:
            # Say which record's placeholders do not match its media (the processor's message names none).
            # Checked only here: some processors expand another token than their ``image_token``
            # (Gemma 3's ``<start_of_image>``), so a count checked up front could reject valid prompts.
            for i, p in enumerate(parsed):
                self._check_placeholders(i, p.prompt, {"image": len(p.images), "video": len(p.videos)}, exc)
            raise
        batch: dict[str, Any] = {
            "prompt_input_ids": out["input_ids"].long(),
            "prompt_attention_mask": out["attention_mask"].long(),
        }
        for key, value in out.items():
            if key not in ("input_ids", "attention_mask"):
                batch[key] = value
        return batch


# ------------------------------------------------------------------------------------------------------
# Datasets


@dataclass(frozen=True)
class ChainFileRecord:
    """One usable record of a chains file: its id, captions (best first, cut to ``chain_length``), the
    video path resolved against the video root (``None`` without a video), and the raw record."""

    id: str
    captions: list[str]
    video: str | None
    record: Mapping[str, Any]


def read_chain_records(
    path_or_records: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    *,
    video_root: str | os.PathLike[str] | None = None,
    chain_length: int | None = None,
    require_video: bool = False,
) -> tuple[list[ChainFileRecord], int]:
    """The ``rankloss chains make`` output (a chains JSONL file, or a list of its records), checked:
    ``(records, skipped)`` where ``skipped`` counts chains left with fewer than 2 captions.

    The one reader of chains files: :func:`load_chain_dataset` and the example trainer's ``--data`` use it.
    Video paths are joined to ``video_root`` (default: the chains file's folder; for a list of records,
    the paths are kept as they are).

    Raises:
        ValueError: a corrupt line, a malformed chain, a repeated id, a missing video with
            ``require_video`` (the message names the file and record).
        FileNotFoundError: the chains file does not exist (the videos: :func:`check_videos_exist`).
    """
    from ..chains import read_chains

    _check_optional_int(chain_length, "chain_length", 2)
    if isinstance(path_or_records, (str, os.PathLike)):
        source = os.fspath(path_or_records)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"path_or_records: chains file not found: {source!r}")
        records: Any = read_chains(source)
        default_root: str | None = os.path.dirname(os.path.abspath(source))
        name = lambda n: f"{source}: record {n}"  # noqa: E731
    elif isinstance(path_or_records, Sequence):
        records = path_or_records
        default_root = None
        name = lambda n: f"path_or_records[{n}]"  # noqa: E731
    else:
        raise TypeError(
            "path_or_records must be a chains JSONL path or a list of chain records, got "
            f"{_describe(path_or_records)}"
        )
    root = os.fspath(video_root) if video_root is not None else default_root

    out: list[ChainFileRecord] = []
    seen: set[str] = set()
    short = 0
    for n, rec in enumerate(records):
        if not isinstance(rec, Mapping) or "chain" not in rec:
            raise ValueError(
                f"{name(n)}: not a chain record (a dict with a 'chain' list), got {_describe(rec)}"
            )
        captions = rec["chain"]
        if not isinstance(captions, list) or not all(isinstance(c, str) and c.strip() for c in captions):
            raise ValueError(f"{name(n)}: 'chain' must be a list of non-empty captions (best first)")
        if chain_length is not None:
            captions = captions[:chain_length]
        if len(captions) < 2:
            short += 1
            continue
        video = rec.get("video")
        if video is not None and (not isinstance(video, str) or not video):
            raise ValueError(f"{name(n)}: 'video' must be a non-empty path string, got {_describe(video)}")
        if video is None and require_video:
            raise ValueError(f"{name(n)}: record has no 'video' path")
        rid = str(rec.get("id", video if video is not None else n))
        if rid in seen:
            raise ValueError(f"{name(n)}: id {rid!r} appears twice")
        seen.add(rid)
        path = None if video is None else (os.path.join(root, video) if root else video)
        out.append(ChainFileRecord(rid, list(captions), path, rec))
    return out, short


def check_videos_exist(
    records: Sequence[ChainFileRecord],
    video_root: str | os.PathLike[str] | None,
    hint: str = "set video_root to the folder the records' video paths are relative to",
) -> None:
    """Raise ``FileNotFoundError`` listing the first few of ``records``' video files that do not exist."""
    missing = [r.video for r in records if r.video is not None and not os.path.isfile(r.video)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(
            f"{len(missing)} video file(s) not found"
            + (f" under {os.fspath(video_root)!r}" if video_root is not None else "")
            + ": "
            + ", ".join(repr(m) for m in missing[:3])
            + more
            + f" ({hint})"
        )


def load_chain_dataset(
    path_or_records: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    *,
    prompt: str | None = None,
    video_root: str | os.PathLike[str] | None = None,
    chain_length: int | None = None,
) -> Any:
    """The ``rankloss chains make`` output (a chains JSONL file, or a list of its records) as a
    ``datasets.Dataset`` of chain records for :class:`ChainCollator`.

    Each record ``{"id", "video", "chain": [captions, best first], ...}`` becomes a row ``{"id": str,
    "prompt": prompt, "videos": [video path] (or [] for a record without a video), "completions":
    chain}``. Video paths are joined to ``video_root`` (default: the chains file's folder; for a list of
    records, the paths are kept as they are). Chains are cut to ``chain_length`` captions when given;
    chains left with fewer than 2 captions are skipped, with one warning that counts them.

    Args:
        path_or_records: a chains JSONL file, or a list of chain records (dicts).
        prompt: the ``prompt`` column (a string), or ``None``: the collator's ``default_prompt``.
        video_root: the folder the records' video paths are relative to.
        chain_length: keep the first ``chain_length >= 2`` captions of each chain.

    Returns:
        a ``datasets.Dataset`` with columns ``id``, ``prompt``, ``videos``, ``completions``.

    Raises:
        ValueError: a corrupt line, a malformed chain, a repeated id, or no chain with 2 captions (the
            message names the file and record).
        FileNotFoundError: video files that do not exist (the message lists the first few).
    """
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - the train extra is installed in the dev env
        raise ImportError(
            "load_chain_dataset needs the datasets package: pip install 'rankloss[train]'"
        ) from exc

    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be None or a string, got {_describe(prompt)}")
    records, short = read_chain_records(path_or_records, video_root=video_root, chain_length=chain_length)
    if short:
        warnings.warn(
            f"load_chain_dataset: skipped {short} chain(s) with fewer than 2 captions"
            + (f" (after chain_length={chain_length})" if chain_length is not None else ""),
            stacklevel=2,
        )
    if not records:
        label = (
            os.fspath(path_or_records)
            if isinstance(path_or_records, (str, os.PathLike))
            else "path_or_records"
        )
        raise ValueError(f"{label}: no chain with at least 2 captions")
    check_videos_exist(records, video_root)
    rows = {
        "id": [r.id for r in records],
        "prompt": [prompt] * len(records),
        "videos": [[] if r.video is None else [r.video] for r in records],
        "completions": [r.captions for r in records],
    }
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "videos": datasets.List(datasets.Value("string")),
            "completions": datasets.List(datasets.Value("string")),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)
