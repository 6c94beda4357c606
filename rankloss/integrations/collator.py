"""Chain records in TRL's shape to chain batches: :class:`ChainCollator`.

The parts, each in a module of its own: what a chain record is and how its fields are checked
(:mod:`rankloss.integrations.records`, which also reads chains files: :func:`load_chain_dataset`), how
its images and videos load (:mod:`rankloss.integrations.media`), how its prompt and completions become
text and token ids (:mod:`rankloss.integrations.tokenization`), and how the batch is laid out as the
chain tree the chain forward runs (:mod:`rankloss.integrations.layout`). :class:`ChainCollator` (a
callable on a list of records, the Hugging Face ``Trainer``'s ``data_collator``) puts them together:
``B`` records become one **chain batch** (the table in :mod:`rankloss.integrations`): the prompts go
through the processor (or tokenizer) once per batch, left-padded, one row per chain; the
``S = sum_b K_b`` completions are tokenised, right-padded and labelled.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import numpy as np
import torch

from .layout import build_chain_tree, check_chain_batch
from .media import load_image, load_video, sampled_fps, takes_video_metadata
from .records import (
    ChainFileRecord,
    ParsedRecord,
    check_optional_int,
    check_videos_exist,
    describe,
    load_chain_dataset,
    read_chain_records,
    record_completions,
    record_edit_types,
    record_id,
    record_ref_scores,
    record_video_fps,
)
from .tokenization import ChainTokenizer

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
#: What :class:`ChainCollator` does with a completion token-identical to a better-ranked one of its chain.
DUPLICATES = ("drop", "error", "keep")


@dataclass
class ChainCollator:
    """Collates chain records (TRL's shape, see the module docstring) into one chain batch.

    A callable on a list of ``B`` records, as the Hugging Face ``Trainer``'s ``data_collator``. It calls
    the processor (or tokenizer) **once** per batch on the ``B`` prompts (``padding=True,
    padding_side="left"``), so every chain's prompt and media are one row however many completions
    the chain has, and tokenises the ``S = sum_b K_b`` completions (memoised) into right-padded rows.

    **Prompts and completions** become text and token ids as
    :class:`~rankloss.integrations.tokenization.ChainTokenizer` says (chat templates, media placeholders,
    BOS and EOS). The number of media placeholders in each prompt must match the record's media (the
    processor checks; when it refuses the batch, the error names the record whose placeholders do not
    match). Media load as :mod:`rankloss.integrations.media` says, each field is checked as
    :mod:`rankloss.integrations.records` says.

    **Truncation.** ``max_completion_length`` keeps the first tokens of each completion; a completion cut
    this way loses its end token (the model is then not taught to stop there). Prompts are **never**
    truncated (cutting would drop media placeholder tokens or the instruction): a prompt longer than
    ``max_prompt_length`` (placeholders expanded) raises ``ValueError``.

    **Identical completions.** Two completions of one chain with the same token ids (cut to the same
    first ``max_completion_length`` tokens, the same text given twice, or texts the tokenizer maps to
    the same tokens, e.g. all ``<unk>``) would ask the loss to rank a sequence above itself. With
    ``duplicates="drop"`` (the default) the worse-ranked one is dropped, with its ``ref_scores`` entry:
    the chain keeps its order (``c_1 > c_3`` still holds when ``c_2 == c_3`` is dropped), ``chain_sizes``
    counts the completions kept, ``batch["dropped_completions"]`` counts the dropped ones per chain (the
    trainer logs their sum), and the first drop in a process warns, naming the record.
    ``duplicates="error"`` raises ``ValueError`` naming the record and the two completions instead;
    ``duplicates="keep"`` keeps them (for scoring only: the reference pass scores every completion a
    record gives). A chain left with one completion cannot be ranked (``mode="score"`` still scores it);
    :meth:`check_record` tells how many distinct completions a record has without loading its media.

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
        duplicates: ``"drop"`` (default), ``"error"`` or ``"keep"``: what to do with a completion
            token-identical to a better-ranked one of its chain (see above).
        boundary: ``"separate"`` (default: each string completion tokenised alone) or ``"joint"`` (TRL's
            DPOTrainer convention: the tokens of prompt + completion after the prompt's); see
            :class:`~rankloss.integrations.tokenization.ChainTokenizer`.

    Returns (of a call on ``records``, a list of ``B`` records): the chain batch, a ``dict``:

    * ``prompt_input_ids`` ``[B, P]`` long, left-padded with the pad id, media placeholders expanded;
    * ``prompt_attention_mask`` ``[B, P]`` long, 1 at real prompt tokens;
    * ``completion_input_ids`` ``[S, L]`` long, chain after chain, best first, right-padded with the pad
      id;
    * ``completion_labels`` ``[S, L]`` long, ``completion_input_ids`` with ``-100`` at padding;
    * ``chain_sizes`` ``[B]`` long, ``K_b`` (completions kept);
    * ``dropped_completions`` ``[B]`` long, the completions of each chain dropped as duplicates;
    * ``completion_index`` ``[S]`` long, each kept completion's index in its record's ``completions``
      (``0, 1, ..., K_b - 1`` unless duplicates were dropped);
    * ``chain_edit_types`` list of ``B`` lists, one entry per kept completion: the type of the edit that
      made it from the record's previous completion (the record's ``edit_types`` or ``edits`` at step
      ``completion_index``), ``None`` for the first completion and where the record gives none;
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
    duplicates: str = "drop"
    boundary: str = "separate"
    _fps_cache: dict[tuple[str, int], float] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.text = ChainTokenizer(self.processing_class, boundary=self.boundary)
        check_optional_int(self.max_prompt_length, "max_prompt_length", 1)
        check_optional_int(self.max_completion_length, "max_completion_length", 1)
        check_optional_int(self.num_frames, "num_frames", 1)
        check_optional_int(self.pad_to_multiple_of, "pad_to_multiple_of", 1)
        if self.video_fps is not None:
            if isinstance(self.video_fps, bool) or not isinstance(self.video_fps, numbers.Real):
                raise TypeError(
                    f"video_fps must be None or a positive number, got {describe(self.video_fps)}"
                )
            if not (math.isfinite(self.video_fps) and self.video_fps > 0):
                raise ValueError(f"video_fps must be None or a positive number, got {self.video_fps!r}")
        if not isinstance(self.default_prompt, str):
            raise TypeError(f"default_prompt must be a string, got {describe(self.default_prompt)}")
        if self.duplicates not in DUPLICATES:
            raise ValueError(f"duplicates must be one of {DUPLICATES}, got {self.duplicates!r}")
        self._warned_duplicates = False
        self._takes_video_metadata = self.is_processor and takes_video_metadata(self.processing_class)

    @property
    def is_processor(self) -> bool:
        """Whether ``processing_class`` is a processor (images and videos go through it)."""
        return self.text.is_processor

    @property
    def tokenizer(self) -> Any:
        return self.text.tokenizer

    @property
    def pad_id(self) -> int:
        return self.text.pad_id

    # -------------------------------------------------------------------------------------------------
    def _file_fps(self, path: str, num_frames: int) -> float:
        """:func:`~rankloss.integrations.media.sampled_fps`, memoised per file and frame count."""
        key = (path, num_frames)
        rate = self._fps_cache.get(key)
        if rate is None:
            rate = self._fps_cache[key] = sampled_fps(path, num_frames)
        return rate

    def _media_fields(self, i: int, rec: Mapping[str, Any]) -> tuple[list[Any], list[Any]]:
        """``records[i]``'s ``images`` and ``videos`` lists, checked (nothing loaded)."""
        images_in, videos_in = rec.get("images"), rec.get("videos")
        for name, value in (("images", images_in), ("videos", videos_in)):
            if value is not None and not isinstance(value, (list, tuple)):
                raise TypeError(f"records[{i}]['{name}'] must be a list, got {describe(value)}")
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
        return images_in, videos_in

    def _media(self, i: int, rec: Mapping[str, Any]) -> tuple[list[Any], list[np.ndarray], list[float]]:
        """``records[i]``'s images, video frames and the videos' frame rates."""
        images_in, videos_in = self._media_fields(i, rec)
        images = [load_image(im, f"records[{i}]['images'][{j}]") for j, im in enumerate(images_in)]
        videos: list[np.ndarray] = []
        fps: list[float] = []
        rates = record_video_fps(i, rec.get("video_fps"), len(videos_in))
        file_fps = self._file_fps if self._takes_video_metadata else None
        for j, v in enumerate(videos_in):
            frames, rate = load_video(
                v, f"records[{i}]['videos'][{j}]", num_frames=self.num_frames, fps=self.video_fps,
                file_fps=file_fps,
            )  # fmt: skip
            videos.append(frames)
            fps.append(rate if rates is None else rates[j])
        return images, videos, fps

    def _text(
        self, i: int, rec: Mapping[str, Any], n_images: int, n_videos: int, warn: bool = True
    ) -> ParsedRecord:
        """``records[i]`` without its media (``n_images`` images and ``n_videos`` videos, not loaded): its
        prompt text, its completions' token ids (cut, duplicates handled as ``duplicates`` says), their
        ``ref_scores``, the ``(dropped, kept twin)`` index pairs, the record's index of each kept
        completion and its edit types."""
        completions, conversational = record_completions(i, rec)
        prompt, prompt_msgs = self.text.prompt(
            i, rec, n_images, n_videos, conversational, self.default_prompt
        )
        refs = record_ref_scores(i, rec, len(completions))
        ids: list[list[int]] = []
        kept_refs: list[float] = []
        dropped: list[tuple[int, int]] = []
        kept: list[int] = []
        seen: dict[tuple[int, ...], int] = {}
        for k, c in enumerate(completions):
            full = self.text.completion_ids(f"records[{i}]['completions'][{k}]", c, prompt, prompt_msgs)
            tokens = full if self.max_completion_length is None else full[: self.max_completion_length]
            key = tuple(tokens)
            j = seen.get(key)
            if j is None or self.duplicates == "keep":
                seen.setdefault(key, k)
                ids.append(tokens)
                kept.append(k)
                if refs is not None:
                    kept_refs.append(refs[k])
                continue
            if self.duplicates == "error":
                raise ValueError(
                    f"records[{i}]{_id_note(rec)}: completions {j} and {k} are "
                    f"{self._why_identical(completions, j, k)}, so the loss would rank a sequence above "
                    "itself; remove the duplicate, raise max_completion_length, or pass "
                    "ChainCollator(duplicates='drop') to drop the worse-ranked one"
                )
            dropped.append((k, j))
        if dropped and warn and not self._warned_duplicates:
            self._warned_duplicates = True
            k, j = dropped[0]
            warnings.warn(
                f"ChainCollator: records[{i}]{_id_note(rec)}: completions {j} and {k} are "
                f"{self._why_identical(completions, j, k)}; the worse-ranked {k} is dropped "
                "(duplicates='drop'); batch['dropped_completions'] counts every drop and the "
                "trainer logs their sum (this warning is shown once per process)",
                stacklevel=3,
            )
        return ParsedRecord(
            prompt, [], [], [], ids, kept_refs if refs is not None else None, record_id(rec), dropped, kept,
            record_edit_types(i, rec, len(completions)),
        )  # fmt: skip

    def _why_identical(self, completions: list[Any], j: int, k: int) -> str:
        if completions[j] == completions[k]:
            return "the same text"
        if self.max_completion_length is not None:
            return f"token-identical after truncation to max_completion_length={self.max_completion_length}"
        return "token-identical (the tokenizer maps their texts to the same tokens)"

    def _parse(self, i: int, rec: Any) -> ParsedRecord:
        """``records[i]`` checked, its media loaded, its prompt and completions tokenised."""
        if not isinstance(rec, Mapping):
            raise TypeError(f"records[{i}] must be a dict (a chain record), got {describe(rec)}")
        record_completions(i, rec)  # a record without completions is named before its media load
        images, videos, fps = self._media(i, rec)
        parsed = self._text(i, rec, len(images), len(videos))
        return dataclasses.replace(parsed, images=images, videos=videos, video_fps=fps)

    def for_scoring(self) -> ChainCollator:
        """This collator with ``duplicates="keep"``: every completion of a record gets a row (and a score),
        as a reference pass or an evaluation that reads ``K`` scores per record needs. It shares this
        collator's tokenizer memo."""
        if self.duplicates == "keep":
            return self
        other = copy.copy(self)
        other.duplicates = "keep"
        return other

    def check_record(self, rec: Any, i: int = 0) -> tuple[int, list[tuple[int, int]]]:
        """Check ``rec`` (as ``records[i]``) without loading its media: its fields, its prompt and
        completions through the tokenizer and chat template, truncation and duplicates.

        Returns:
            ``(K, dropped)``: the completions a batch would keep for it and the ``(dropped, kept twin)``
            index pairs (empty unless ``duplicates="drop"``).

        Raises:
            TypeError, ValueError: as a call on ``[rec]`` would (media files are not opened).
        """
        if not isinstance(rec, Mapping):
            raise TypeError(f"records[{i}] must be a dict (a chain record), got {describe(rec)}")
        images, videos = self._media_fields(i, rec)
        parsed = self._text(i, rec, len(images), len(videos), warn=False)
        return len(parsed.completions), parsed.dropped

    # -------------------------------------------------------------------------------------------------
    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The chain batch of ``records`` (``B`` chain records); see the class docstring."""
        if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Sequence):
            raise TypeError(f"records must be a list of chain records (dicts), got {describe(records)}")
        if not records:
            raise ValueError("records is empty: a batch needs at least one chain record")
        parsed = [_naming_id(self._parse, i, rec) for i, rec in enumerate(records)]
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
        batch["dropped_completions"] = torch.tensor([len(p.dropped) for p in parsed], dtype=torch.long)
        batch["completion_index"] = torch.tensor([k for p in parsed for k in p.kept], dtype=torch.long)
        batch["chain_edit_types"] = [
            [p.edit_types[k - 1] if p.edit_types is not None and k >= 1 else None for k in p.kept]
            for p in parsed
        ]
        if parsed[0].ref_scores is not None:
            batch["ref_scores"] = torch.tensor(
                [r for p in parsed for r in (p.ref_scores or [])], dtype=torch.float32
            )
        if parsed[0].id is not None:
            batch["chain_ids"] = [p.id for p in parsed]
        if self.chain_tree:
            check_chain_batch(batch, pad_id=self.pad_id)
            batch["chain_tree"] = build_chain_tree(batch, ignore_index=IGNORE_INDEX)
        return batch

    def _round_up(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if m is None else -(-n // m) * m

    def _encode_prompts(self, parsed: list[ParsedRecord]) -> dict[str, Any]:
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
                self.text.check_placeholders(
                    i, p.prompt, {"image": len(p.images), "video": len(p.videos)}, exc
                )
            raise
        batch: dict[str, Any] = {
            "prompt_input_ids": out["input_ids"].long(),
            "prompt_attention_mask": out["attention_mask"].long(),
        }
        for key, value in out.items():
            if key not in ("input_ids", "attention_mask"):
                batch[key] = value
        return batch


def _id_note(rec: Mapping[str, Any]) -> str:
    rid = record_id(rec)
    return "" if rid is None else f" (id {rid!r})"


def _naming_id(parse: Any, i: int, rec: Any) -> ParsedRecord:
    """``parse(i, rec)``, its ``ValueError`` / ``TypeError`` naming the record's id too."""
    try:
        return parse(i, rec)
    except (ValueError, TypeError) as exc:
        note = _id_note(rec) if isinstance(rec, Mapping) else ""
        if not note or type(exc) not in (ValueError, TypeError) or note in str(exc):
            raise
        raise type(exc)(f"{exc} [records[{i}]{note}]") from exc
