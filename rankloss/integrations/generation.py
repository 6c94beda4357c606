"""Generated captions on the user's own chains: greedy decoding with the chain forward, written next to
their references, and scored by a judge or the lexical fallback.

* :func:`generate_captions`: the first ``num_samples`` records of an eval set through
  :class:`~rankloss.integrations.ChainCollator` (the prompt and media exactly as training sees them)
  and ``ChainRankModel(mode="generate")`` (greedy, a KV cache, stopping at the EOS ids), decoded with the
  tokenizer: rows ``{"id", "index", "prompt", "reference", "generated", "generated_tokens",
  "stopped"}``; the reference is the record's first (best) completion.
* :class:`GenerationEvalCallback`: a ``transformers.TrainerCallback`` that does this at every
  ``evaluate()`` of a ``ChainRankTrainer`` (or any ``Trainer`` whose model is a ``ChainRankModel``),
  scores the rows (:class:`~rankloss.integrations.judge.EventJudge` when given, else
  :class:`~rankloss.integrations.judge.LexicalScorer`), adds ``eval_gen/precision``, ``eval_gen/recall``,
  ``eval_gen/f1``, ``eval_gen/samples`` and ``eval_gen/scorer`` (``"judge"`` or ``"lexical"``) to the
  metrics ``evaluate()`` returns, logs the numbers through the trainer's loggers, writes the rows to
  ``<output_dir>/generations/step-<global_step>.jsonl`` (atomically) and logs a table to wandb when wandb
  is a reporter and installed.

Several processes: every process generates the same samples with the same number of decoding steps
(``stop_when_done=False``), so a sharded model (FSDP, ZeRO-3) runs the same forward calls on every rank;
the judge is asked once, by the main process, and its scores are broadcast; the main process writes the
file and the table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .forward import ChainForward, ChainRankModel
from .judge import EventJudge, GenerationScores, JudgeError, LexicalScorer

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - the train extra is installed in the dev env
    raise ImportError(
        "rankloss.integrations.generation needs transformers: pip install 'rankloss[train]'"
    ) from exc

__all__ = ["GenerationEvalCallback", "add_generation_eval", "generate_captions", "message_text"]

logger = logging.getLogger(__name__)


def message_text(value: Any) -> str:
    """The text of a completion or prompt as records hold it: a string; a message
    ``{"role", "content"}`` whose content is a string or a list of parts (``{"type": "text", "text"}``);
    or a list of messages (the last assistant message's text, else the last message's)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content", value.get("text", ""))
        if isinstance(content, str):
            return content
        if isinstance(content, Sequence):
            parts = [p.get("text", "") if isinstance(p, Mapping) else str(p) for p in content]
            return " ".join(p for p in parts if isinstance(p, str) and p)
        return str(content)
    if isinstance(value, Sequence):
        msgs = [m for m in value if isinstance(m, Mapping)]
        if msgs:
            assistant = [m for m in msgs if m.get("role") == "assistant"]
            return message_text((assistant or msgs)[-1])
    return str(value)


def _prompt_text(rec: Mapping[str, Any], default: str) -> str:
    if isinstance(rec.get("prompt"), str):
        return rec["prompt"]
    msgs = rec.get("prompt") if rec.get("prompt") is not None else rec.get("messages")
    if isinstance(msgs, Sequence) and not isinstance(msgs, str):
        users = [m for m in msgs if isinstance(m, Mapping) and m.get("role") == "user"]
        if users:
            return message_text(users[-1])
    return default


def _chain_model(model: Any) -> ChainRankModel | None:
    """The :class:`ChainRankModel` inside ``model`` (DDP / FSDP / DeepSpeed wrappers unwrapped)."""
    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, ChainRankModel):
            return model
        model = getattr(model, "module", None)
        seen += 1
    return None


def _tokenizer(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", None) or processing_class


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if k == "chain_tree":  # generation reads the prompts only
            continue
        out[k] = v.to(device) if isinstance(v, Tensor) else v
    return out


@torch.no_grad()
def generate_captions(
    model: nn.Module,
    collator: Any,
    records: Any,
    *,
    num_samples: int = 8,
    max_new_tokens: int = 128,
    batch_size: int = 4,
    processing_class: Any = None,
    stop_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    same_steps: bool = False,
    device: torch.device | str | None = None,
    context: Any = None,
) -> list[dict[str, Any]]:
    """Greedy captions for the first ``num_samples`` records, with their references.

    Args:
        model: a :class:`ChainRankModel` (or a DDP / FSDP / DeepSpeed module around one: its forward is
            called, so a sharded model gathers its weights), or a Hugging Face model of a supported family
            (wrapped in a ``ChainRankModel`` here).
        collator: the :class:`~rankloss.integrations.ChainCollator` that builds the training batches (its
            ``for_scoring()`` copy is used, so no completion is dropped as a duplicate): each prompt and
            its media exactly as training sees them.
        records: the eval set (any indexable dataset of chain records).
        num_samples: the first this many records (fewer if the set is smaller).
        max_new_tokens: the most tokens generated per caption.
        batch_size: records per generation batch.
        processing_class: the tokenizer or processor to decode with (default: the collator's).
        stop_ids: the ids that end a caption (default: the model's and the tokenizer's EOS ids).
        pad_id: the id after a caption's end (default: the tokenizer's pad id).
        same_steps: run all ``max_new_tokens`` steps even when every caption has ended (what several
            processes of a sharded model need: every rank runs the same forward calls).
        device: where the batches go (default: the device of the model's first parameter).
        context: a callable returning a context manager entered around each generation (e.g. autocast).

    Returns:
        one dict per record: ``id`` (the record's, else its index as a string), ``index``, ``prompt`` (the
        record's prompt text, or the collator's default prompt), ``reference`` (the text of its first
        completion), ``generated`` (decoded, special tokens skipped, the stop token cut),
        ``generated_tokens`` (tokens before the stop token) and ``stopped`` (whether a stop token came
        within ``max_new_tokens``).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be an int >= 0, got {num_samples!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n = min(num_samples, len(records))
    if n == 0:
        return []
    inner = _chain_model(model)
    if inner is None:
        if isinstance(model, ChainForward):
            inner = ChainRankModel(model.model)
        else:
            inner = ChainRankModel(model)
        model = inner
    hf_model = inner.chain_forward.model
    processing_class = (
        processing_class if processing_class is not None else getattr(collator, "processing_class", None)
    )
    tokenizer = _tokenizer(processing_class)
    if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
        raise ValueError("generate_captions needs a tokenizer to decode with: pass processing_class")
    default_stops, default_pad = inner.generation_ids(tokenizer)
    stop_ids = default_stops if stop_ids is None else list(stop_ids)
    pad_id = default_pad if pad_id is None else int(pad_id)
    if device is None:
        try:
            device = next(hf_model.parameters()).device
        except StopIteration:  # pragma: no cover
            device = torch.device("cpu")
    if callable(getattr(collator, "for_scoring", None)):
        collator = collator.for_scoring()
    default_prompt = getattr(collator, "default_prompt", "")
    stops = set(stop_ids)
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    try:
        for start in range(0, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            recs = [records[i] for i in idx]
            batch = _to_device(collator(recs), torch.device(device))
            with context() if context is not None else contextlib.nullcontext():
                out = model(batch, mode="generate", max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                            pad_id=pad_id, stop_when_done=not same_steps)  # fmt: skip
            tokens = out["tokens"].detach().cpu().tolist()
            for i, rec, ids in zip(idx, recs, tokens):
                end = next((t for t, tok in enumerate(ids) if tok in stops), None)
                kept = ids if end is None else ids[:end]
                comps = rec.get("completions") or [None]
                rid = rec.get("id")
                rows.append({
                    "id": str(rid) if rid is not None else str(i),
                    "index": i,
                    "prompt": _prompt_text(rec, default_prompt),
                    "reference": message_text(comps[0]).strip(),
                    "generated": tokenizer.decode(kept, skip_special_tokens=True).strip(),
                    "generated_tokens": len(kept),
                    "stopped": end is not None,
                })  # fmt: skip
    finally:
        model.train(was_training)
    return rows


def score_rows(
    rows: Sequence[dict[str, Any]], judge: Any = None, *, on_judge_error: str = "raise"
) -> GenerationScores:
    """The scores of ``rows`` (``generated`` against ``reference``) by ``judge`` (an
    :class:`~rankloss.integrations.judge.EventJudge`, or anything with ``score_pairs``), else by the
    :class:`~rankloss.integrations.judge.LexicalScorer`. ``on_judge_error="fallback"`` warns and scores
    lexically when the judge fails; ``"raise"`` (default) raises."""
    pairs = [(r["generated"], r["reference"]) for r in rows]
    if judge is None:
        return LexicalScorer().score_pairs(pairs)
    try:
        return judge.score_pairs(pairs)
    except (JudgeError, RuntimeError, OSError) as exc:
        if on_judge_error != "fallback":
            raise
        warnings.warn(
            f"the generation judge failed ({exc}); these samples are scored by the lexical fallback instead "
            "(weaker: word overlap, not faithfulness)",
            stacklevel=2,
        )
        return LexicalScorer().score_pairs(pairs)


def _write_jsonl(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` as JSONL at ``path``, atomically (a temporary file in its folder, then ``os.replace``)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _broadcast(obj: Any) -> Any:
    """``obj`` from process 0 on every process (``torch.distributed``; unchanged with one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class GenerationEvalCallback(TrainerCallback):
    """At every evaluation: greedy captions for the first ``num_samples`` eval records, scored, written and
    logged (see the module docstring).

    Args:
        num_samples: eval records to caption (the first ones, so every evaluation sees the same).
        max_new_tokens: the most tokens per caption.
        judge: an :class:`~rankloss.integrations.judge.EventJudge`, or ``None``: the lexical fallback
            (weaker; the metrics say which scorer: ``eval_gen/scorer``).
        trainer: the trainer (or call :func:`add_generation_eval`, which sets it). With it, generation runs
            through the prepared model (``trainer.model_wrapped``: what FSDP / ZeRO-3 need) under the
            trainer's autocast, and the scores are logged with ``trainer.log``. Without it, the model,
            eval dataset and collator come from the ``on_evaluate`` arguments (``model``,
            ``eval_dataloader``), for one process or DDP.
        batch_size: records per generation batch (default: ``per_device_eval_batch_size``).
        on_judge_error: ``"fallback"`` (default: a judge that fails warns and the lexical scores are used,
            so a long training run does not stop) or ``"raise"``.
        wandb_table: log a ``wandb.Table`` of the samples when wandb is a reporter and installed.

    After an evaluation ``last_rows`` holds the rows (with their scores), ``last_scores`` the
    :class:`~rankloss.integrations.judge.GenerationScores` and ``last_path`` the JSONL written.
    """

    def __init__(
        self,
        num_samples: int = 8,
        max_new_tokens: int = 128,
        judge: EventJudge | None = None,
        *,
        trainer: Any = None,
        batch_size: int | None = None,
        on_judge_error: str = "fallback",
        wandb_table: bool = True,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
        if on_judge_error not in ("fallback", "raise"):
            raise ValueError(f"on_judge_error must be 'fallback' or 'raise', got {on_judge_error!r}")
        if judge is not None and not callable(getattr(judge, "score_pairs", None)):
            raise TypeError(f"judge must be an EventJudge (or have score_pairs), got {type(judge).__name__}")
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.judge = judge
        self.trainer = trainer
        self.batch_size = batch_size
        self.on_judge_error = on_judge_error
        self.wandb_table = wandb_table
        self.last_rows: list[dict[str, Any]] = []
        self.last_scores: GenerationScores | None = None
        self.last_path: str | None = None

    # --------------------------------------------------------------------------------------------------
    def _dataset_and_prefix(
        self, metrics: Mapping[str, Any], eval_dataloader: Any
    ) -> tuple[Any, Any, str, str]:
        """(eval records, collator, metric prefix, file suffix) of the evaluation that just ran."""
        if self.trainer is not None:
            data, collator = self.trainer.eval_dataset, self.trainer.data_collator
        else:
            data = getattr(eval_dataloader, "dataset", None)
            collator = getattr(eval_dataloader, "collate_fn", None)
        if isinstance(data, Mapping):  # evaluate() runs once per named eval set: eval_<name>_*
            for name, value in data.items():
                if any(str(k).startswith(f"eval_{name}_") for k in metrics):
                    return value, collator, f"eval_{name}", f"-{name}"
            name, value = next(iter(data.items()))
            return value, collator, f"eval_{name}", f"-{name}"
        prefix = "eval"
        keys = [str(k) for k in metrics if str(k).endswith("_runtime")]
        if keys and not keys[0].startswith("eval_"):  # evaluate(metric_key_prefix=...)
            prefix = keys[0][: -len("_runtime")]
        return data, collator, prefix, ""

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    model: Any = None, processing_class: Any = None, eval_dataloader: Any = None,
                    **kwargs: Any) -> None:  # fmt: skip
        metrics = metrics if metrics is not None else {}
        records, collator, prefix, suffix = self._dataset_and_prefix(metrics, eval_dataloader)
        if records is None or collator is None:
            warnings.warn(
                "GenerationEvalCallback: no eval dataset or collator to generate from", stacklevel=2
            )
            return
        trainer = self.trainer
        context = None
        if trainer is not None:
            gen_model = getattr(trainer, "model_wrapped", None) or trainer.model
            processing_class = (
                trainer.processing_class if trainer.processing_class is not None else processing_class
            )
            device = trainer.args.device

            @contextlib.contextmanager
            def context():  # the training step's precision (as the reference pass does)
                with trainer.compute_loss_context_manager(), trainer.accelerator.autocast():
                    yield

        else:
            gen_model, device = model, args.device
        world = int(getattr(args, "world_size", 1) or 1)
        rows = generate_captions(
            gen_model,
            collator,
            records,
            num_samples=self.num_samples,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size or args.per_device_eval_batch_size,
            processing_class=processing_class,
            same_steps=world > 1,
            device=device,
            context=context,
        )
        main = bool(state.is_world_process_zero)
        if self.judge is not None and world > 1:  # the judge is asked once; every rank gets its answer
            scores = score_rows(rows, self.judge, on_judge_error=self.on_judge_error) if main else None
            scores = _broadcast(scores)
        else:
            scores = score_rows(rows, self.judge, on_judge_error=self.on_judge_error)
        for row, sample in zip(rows, scores.samples):
            row.update({"scorer": scores.scorer, **sample})
        numbers = {
            f"{prefix}_gen/precision": scores.precision,
            f"{prefix}_gen/recall": scores.recall,
            f"{prefix}_gen/f1": scores.f1,
            f"{prefix}_gen/samples": float(len(rows)),
        }
        metrics.update(numbers)
        metrics[f"{prefix}_gen/scorer"] = scores.scorer
        self.last_rows, self.last_scores = rows, scores
        path = os.path.join(args.output_dir, "generations", f"step-{state.global_step}{suffix}.jsonl")
        if main:
            _write_jsonl(path, rows)
            self.last_path = path
            logger.info(
                "generation at step %d: %d samples scored by %s: precision %.4f recall %.4f f1 %.4f (%s)",
                state.global_step, len(rows), scores.scorer, scores.precision, scores.recall, scores.f1, path,
            )  # fmt: skip
        if trainer is not None:
            trainer.log(dict(numbers))
        if main and self.wandb_table:
            self._wandb(args, state, prefix, rows, numbers if trainer is None else None)

    @staticmethod
    def _wandb(args: Any, state: Any, prefix: str, rows: Sequence[Mapping[str, Any]], numbers: Any) -> None:
        report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
        if "wandb" not in report_to and "all" not in report_to:
            return
        try:
            import wandb
        except ImportError:
            return
        if getattr(wandb, "run", None) is None:
            return
        columns = ["id", "prompt", "reference", "generated", "precision", "recall", "f1", "scorer"]
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        payload: dict[str, Any] = {
            f"{prefix}_gen/samples_table": table,
            "train/global_step": state.global_step,
        }
        if numbers:
            payload.update(numbers)
        wandb.log(payload)


def add_generation_eval(trainer: Any, **kwargs: Any) -> GenerationEvalCallback:
    """A :class:`GenerationEvalCallback` bound to ``trainer`` (``kwargs`` as its constructor), added to its
    callbacks; returned."""
    callback = GenerationEvalCallback(trainer=trainer, **kwargs)
    trainer.add_callback(callback)
    return callback
