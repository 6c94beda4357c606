"""``ChainRankTrainer``: a ``transformers.Trainer`` for listwise preference training over chains.

    from rankloss.integrations import ChainRankConfig, ChainRankTrainer

    args = ChainRankConfig(output_dir="out", loss="plackett_luce", beta=0.1, per_device_train_batch_size=4)
    trainer = ChainRankTrainer(model, args, train_dataset=chains, processing_class=processor)
    trainer.train()

``train_dataset`` holds records in TRL's shape with a ranked list instead of a pair: ``prompt`` (or
conversational ``messages``), optional ``images`` / ``videos``, and ``completions`` ranked best first
(:class:`~rankloss.integrations.ChainCollator` turns them into chain batches). What the trainer adds to
the ``Trainer``:

* **The chain forward**: the model is wrapped in :class:`~rankloss.integrations.ChainRankModel`, whose
  ``forward`` runs each prompt (and its media) once per chain and scores the completions from the final
  hidden states with the fused chain loss; logits are never built.
* **Reference scores** computed once before training (from ``ref_model``, or from the policy as it is
  before the first step), under the training's mixed precision (the Trainer's autocast, so the first
  step's rewards are 0 with ``bf16=True`` and fp32 weights), split across processes and gathered, and
  cached on disk under a fingerprint of the model, the data, the processor or tokenizer (every file its
  ``save_pretrained`` writes: vocabulary, special tokens, image / video sizes, chat template), every
  setting of the collator, the precision and the kernel (``ref_cache_dir``, default
  ``<output_dir>/rankloss-ref``), so a second run or a resumed one does not recompute them. Under
  DeepSpeed ZeRO-3 the scorer's partitioned parameters are gathered for the pass on every process (a
  ``ref_model`` is prepared as a ZeRO-3 engine, for evaluation, no optimizer). A cache file
  that cannot be read, fails its checksum, or does not fit the dataset (records, completions per
  record, non-finite values) is reported with a warning naming it, recomputed and rewritten atomically.
  ``reference_free=True`` skips them.
* **Gradient accumulation and several processes**: the loss of a micro-batch is its chains' summed loss
  divided by the number of chains in the whole optimizer step (all micro-batches, all processes), so
  GA=2 with half the batch, or two processes with half the batch each, give one process's update. A
  launch whose processes did not join one group (``WORLD_SIZE > 1`` but accelerate sees one process, e.g.
  ``torchrun`` on CPU without ``use_cpu=True``) is refused with a ``RuntimeError``.
* **Chain metrics** summed over every chain since the last log, reduced across processes, and logged
  through ``Trainer.log`` (so tensorboard / wandb callbacks see them); ``evaluate()`` returns the same
  metrics on the eval set as ``eval_*``. Every ranking metric counts a tie as half (a tied pair 0.5,
  top-1 shared among tied maxima), so nothing reads 0 because scores are equal (before the first step
  every implicit reward is 0 and ``pairwise_accuracy`` reads 0.5):

  - the implicit rewards: ``pairwise_accuracy`` (also ``rewards/accuracies``), ``top1_accuracy``,
    ``kendall_tau``, ``neighbour_margin`` (also ``rewards/margins``), ``rewards/chosen`` (the best
    completion's reward), ``rewards/rejected`` (the mean of the others'), ``reward_pos<k>`` (also
    ``rewards/pos<k>``);
  - the policy's own log-probs, no reference needed: ``logps/{pairwise_accuracy, top1_accuracy,
    kendall_tau}`` by the summed log-prob ``s`` and ``logps_per_token/...`` by ``s / n_tokens``;
    ``logps/chosen``, ``logps/rejected``; ``best_logp_per_token``. ``s`` is recovered from the rewards
    and the reference scores (``r / beta + s_ref``; ``r / beta * n + s_ref`` with ``length_normalize``);
  - adjacent pairs (caption ``k - 1`` against ``k``, one edit apart in the record) by the edit that made
    caption ``k``: ``{logps,rewards}/pair_accuracy/<type>`` and their count ``pairs/<type>`` (from the
    batch's ``chain_edit_types``: the records' ``edit_types`` or ``edits``), the length-matched view
    ``{logps,rewards}/pair_accuracy/length_matched`` over the same-length edit types
    (:data:`LENGTH_MATCHED_TYPES`), and by position ``{logps,rewards}/pair_accuracy/pos<k>``;
  - ``chain_loss`` and, with ``sft_weight > 0``, the SFT term alone: ``sft_loss`` (= ``nll_loss``, TRL's
    name; unweighted) and ``rank_loss = chain_loss - sft_weight * sft_loss``; ``chains``, ``tokens``,
    ``dropped_completions``.
* ``freeze_vision`` / ``vision_lr`` for the vision encoder of a VLM.
* ``save_model`` writes the Hugging Face model (``from_pretrained`` loads it), not the wrapper.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import struct
import sys
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._launch import leave_process_group, process_group_problem
from .._version import __version__
from ..chains.taxonomy import EDIT_TYPES
from .forward import IGNORE_INDEX, ChainRankModel, LossSpec, keep_precision

try:
    import transformers
    from transformers import Trainer, TrainingArguments
except ImportError as exc:  # pragma: no cover - the train extra is installed in the dev env
    raise ImportError("ChainRankTrainer needs transformers: pip install 'rankloss[train]'") from exc

__all__ = ["ChainRankConfig", "ChainRankTrainer", "leave_process_group"]

_METRICS = ("pairwise_accuracy", "top1_accuracy", "kendall_tau", "neighbour_margin")
#: Edit types that change what a caption says without changing its length much: an adjacent pair made by
#: one of them is a length-matched probe (insertions and omissions change the length, which a summed
#: log-prob ranks by even in a random model).
LENGTH_MATCHED_TYPES = ("object", "attribute", "count", "action", "spatial", "order")
#: The per-edit-type buckets: :data:`rankloss.chains.taxonomy.EDIT_TYPES` and ``other`` (any other type).
_TYPE_BUCKETS = (*EDIT_TYPES, "other")
#: Per-position sums: padded to one length before they are reduced across processes.
_PER_POSITION = ("reward_pos_sum", "reward_pos_n", "pos_pairs", "pos_logps_correct", "pos_rewards_correct")


def ranking_metrics(values: Tensor, sizes: Tensor) -> dict[str, Tensor]:
    """Ranking metrics of ``values [S]`` (any score, higher = better) against the chain order (chains of
    ``sizes [C]`` rows, best first), **ties counted as half**:

    * ``pairwise_accuracy [C]``: over the pairs ``k < j`` of a chain, 1 where ``v_k > v_j``, 0.5 where
      ``v_k == v_j``, 0 else, averaged (so equal scores give 0.5, not 0);
    * ``top1_accuracy [C]``: ``1 / m`` where the best caption is one of ``m`` tied maxima, else 0;
    * ``kendall_tau [C]``: ``(concordant - discordant) / pairs`` (a tied pair counts 0), which is
      ``2 * pairwise_accuracy - 1``;
    * ``adjacent [S]``: for each row after a chain's first, the credit of the pair (previous row, this
      row) as above (1, 0.5 or 0); 0 at each chain's first row.
    """
    values = values.detach().double()
    dev = values.device
    sizes = sizes.to(dev).long()
    C, S = sizes.numel(), values.numel()
    if C == 0 or S == 0:
        empty = values.new_zeros(C)
        return {"pairwise_accuracy": empty, "top1_accuracy": empty, "kendall_tau": empty,
                "adjacent": values.new_zeros(S)}  # fmt: skip
    K = int(sizes.max())
    cid = torch.repeat_interleave(torch.arange(C, device=dev), sizes)
    first = torch.cumsum(sizes, 0) - sizes
    pos = torch.arange(S, device=dev) - first[cid]
    M = values.new_zeros(C, K)
    valid = torch.zeros(C, K, dtype=torch.bool, device=dev)
    M[cid, pos] = values
    valid[cid, pos] = True
    upper = torch.triu(torch.ones(K, K, dtype=torch.bool, device=dev), diagonal=1)
    pairs = valid[:, :, None] & valid[:, None, :] & upper
    gt = ((M[:, :, None] > M[:, None, :]) & pairs).sum((1, 2)).double()
    lt = ((M[:, :, None] < M[:, None, :]) & pairs).sum((1, 2)).double()
    n = pairs.sum((1, 2)).double()
    ties = n - gt - lt
    n = n.clamp(min=1)
    top = M.masked_fill(~valid, float("-inf")).max(1).values
    at_top = (valid & (M == top[:, None])).sum(1).double()
    top1 = torch.where(M[:, 0] == top, 1.0 / at_top.clamp(min=1), torch.zeros_like(top))
    prev = torch.cat([values[:1], values[:-1]])
    adjacent = (prev > values).double() + 0.5 * (prev == values).double()
    adjacent = torch.where(pos > 0, adjacent, torch.zeros_like(adjacent))
    return {
        "pairwise_accuracy": (gt + 0.5 * ties) / n,
        "top1_accuracy": top1,
        "kendall_tau": (gt - lt) / n,
        "adjacent": adjacent,
    }


def _type_bucket(edit_type: Any) -> int:
    return EDIT_TYPES.index(edit_type) if edit_type in EDIT_TYPES else len(EDIT_TYPES)


@dataclass
class ChainRankConfig(TrainingArguments):
    """``TrainingArguments`` plus the chain loss and data options.

    Loss (see :func:`rankloss.fused_linear_chain_loss`): ``loss`` (``"plackett_luce"``, ``"dpo"``,
    ``"lipo"``), ``beta``, ``pairs`` and ``loss_type`` (DPO on chains), ``top_k`` (Plackett-Luce),
    ``sft_weight``, ``length_normalize``, ``reference_free``. Log-probs: ``impl`` and, for
    ``impl="triton"``, ``deterministic`` and ``filter_eps`` (``"auto"``, ``"off"`` or a number).
    """

    loss: str = field(default="plackett_luce", metadata={"help": "plackett_luce, dpo or lipo"})
    beta: float = field(default=0.1, metadata={"help": "scale of the implicit reward beta * (s - s_ref)"})
    pairs: str | None = field(
        default=None, metadata={"help": "DPO pairs: adjacent, all, best_worst, best_rest"}
    )
    loss_type: str | None = field(default=None, metadata={"help": "DPO pair loss: sigmoid, hinge, ipo"})
    top_k: int | None = field(default=None, metadata={"help": "Plackett-Luce over the first k positions"})
    sft_weight: float = field(default=0.0, metadata={"help": "weight of -log p(best) / n added per chain"})
    length_normalize: bool = field(default=False, metadata={"help": "scores are mean token log-probs"})
    reference_free: bool = field(default=False, metadata={"help": "no reference model: s_ref = 0"})
    freeze_vision: bool = field(default=False, metadata={"help": "keep the vision encoder frozen"})
    vision_lr: float | None = field(default=None, metadata={"help": "learning rate of the vision encoder"})
    share_prefix: bool | None = field(
        default=None, metadata={"help": "None: share each prompt where exact; False: full sequences"}
    )
    impl: str | None = field(default=None, metadata={"help": "kernel: None (auto), triton, cublas, torch"})
    deterministic: bool = field(
        default=False, metadata={"help": "impl=triton: backward without atomics (bitwise reproducible)"}
    )
    filter_eps: str = field(
        default="auto",
        metadata={
            "help": "impl=triton: gradient filtering threshold: auto (eps of the dtype), off, or a number"
        },
    )
    max_prompt_length: int | None = field(default=None, metadata={"help": "refuse longer prompts"})
    max_completion_length: int | None = field(default=None, metadata={"help": "truncate completions"})
    duplicates: str = field(
        default="drop",
        metadata={
            "help": "a completion token-identical to a better-ranked one of its chain: drop (counted) or "
            "error"
        },
    )
    boundary: str = field(
        default="separate",
        metadata={
            "help": "completion tokens: separate (each alone) or joint (TRL: after prompt + completion)"
        },
    )
    num_frames: int | None = field(default=None, metadata={"help": "frames sampled from video files"})
    ref_cache_dir: str | None = field(default=None, metadata={"help": "reference score cache folder"})
    ref_batch_size: int | None = field(default=None, metadata={"help": "chains per reference batch"})
    # a chain record's columns are read by the collator, not matched against forward's signature
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep False for chain records"})

    def __post_init__(self) -> None:
        # transformers treats max_steps <= 0 as unset and still takes a step for max_steps=0
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"max_steps={self.max_steps}: transformers treats max_steps <= 0 as unset (max_steps=0 still "
                "takes a step); pass max_steps=-1 to train for "
                "num_train_epochs, or a positive number of optimizer steps"
            )
        super().__post_init__()
        if self.dataloader_pin_memory and (self.use_cpu or not _has_accelerator()):
            # pinned memory only helps copies to an accelerator; without one torch's DataLoader warns at
            # every new iterator (each evaluation)
            self.dataloader_pin_memory = False
        if self.loss not in ("plackett_luce", "dpo", "lipo"):
            raise ValueError(f"loss must be 'plackett_luce', 'dpo' or 'lipo', got {self.loss!r}")
        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns=True would drop the chain records' columns before the collator "
                "sees them; ChainRankTrainer needs remove_unused_columns=False"
            )
        if self.boundary not in ("separate", "joint"):
            raise ValueError(f"boundary must be 'separate' or 'joint', got {self.boundary!r}")
        if self.duplicates not in ("drop", "error"):
            raise ValueError(
                f"duplicates must be 'drop' or 'error', got {self.duplicates!r} (identical completions of "
                "one chain would ask the loss to rank a sequence above itself)"
            )
        if self.vision_lr is not None and self.freeze_vision:
            raise ValueError("vision_lr is set but freeze_vision=True: the vision encoder does not train")
        self.filter_eps_value()  # refuse a bad value now, not at the first step
        self.loss_spec()  # loss, beta, pairs, loss_type, top_k, sft_weight checked now, not at the first step

    def filter_eps_value(self) -> float | str | None:
        """``filter_eps`` as :func:`rankloss.linear_token_logprobs` takes it: ``"auto"``, ``None`` (off:
        ``"off"``, ``"none"`` or ``"0"``) or a non-negative number."""
        value = str(self.filter_eps).strip().lower()
        if value == "auto":
            return "auto"
        if value in ("off", "none", "0", "0.0"):
            return None
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not number >= 0.0 or number == float("inf"):
            raise ValueError(
                f"filter_eps must be 'auto', 'off' or a non-negative number, got {self.filter_eps!r}"
            )
        return number

    def loss_spec(self) -> LossSpec:
        return LossSpec(
            loss=self.loss,
            beta=self.beta,
            pairs=self.pairs,
            dpo_loss_type=self.loss_type,
            top_k=self.top_k,
            sft_weight=self.sft_weight,
            length_normalize=self.length_normalize,
            deterministic=self.deterministic,
            filter_eps=self.filter_eps_value(),
        )


class _Subset(torch.utils.data.Dataset):
    """The records ``indices`` of ``dataset`` (those a chain loss can rank)."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]


class _WithRefScores(torch.utils.data.Dataset):
    """``dataset`` with each record's cached reference scores added as ``ref_scores``."""

    def __init__(self, dataset: Any, scores: Sequence[Sequence[float]]) -> None:
        self.dataset = dataset
        self.scores = scores

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "ref_scores": list(self.scores[i])}


def _hash_value(h: Any, value: Any) -> None:
    if isinstance(value, Mapping):
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            _hash_value(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(b"[%d" % len(value))
        for v in value:
            _hash_value(h, v)
    elif isinstance(value, Tensor):
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    elif hasattr(value, "tobytes"):
        h.update(value.tobytes())
    elif hasattr(value, "size") and hasattr(value, "mode"):  # PIL image
        h.update(value.tobytes())
    else:
        h.update(repr(value).encode())


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's config and of every parameter's sum and sum of squares (float64).

    A ZeRO-3 partitioned parameter (one with ``ds_id``) is gathered for its hash, one at a time, so the
    fingerprint is that of the whole model (every process must call this: the gather is collective)."""
    h = hashlib.sha256()
    h.update(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            with _gathered([p]):
                d = p.detach().double()
                stats = torch.stack([d.sum(), d.square().sum()]).cpu()
            h.update(name.encode())
            h.update(stats.numpy().tobytes())
    return h.hexdigest()[:16]


def _zero3_params(model: nn.Module) -> list[nn.Parameter]:
    """The ZeRO-3 partitioned parameters of ``model`` (those with a ``ds_id``)."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def _gathered(params: Sequence[nn.Parameter]) -> Any:
    """``deepspeed.zero.GatheredParameters`` over the ZeRO-3 partitioned ``params`` (read-only: every
    process gets the whole tensors and none writes them back), or a no-op when none is partitioned. It
    is collective: every process must enter it, with the same parameters."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def is_deepspeed_engine(model: Any) -> bool:
    """Whether ``model`` is a ``deepspeed.DeepSpeedEngine`` (without importing deepspeed)."""
    ds = sys.modules.get("deepspeed")
    engine = getattr(ds, "DeepSpeedEngine", None) if ds is not None else None
    return engine is not None and isinstance(model, engine)


def _zero3_offload(engine: Any) -> Any:
    """The object that holds a ZeRO-3 engine's parameter-fetching module hooks (``forward_hooks``,
    ``backward_hooks``), or ``None``."""
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    return offload if offload is not None and hasattr(offload, "forward_hooks") else None


@contextlib.contextmanager
def zero3_gathered_for_forward(model: nn.Module, engine: Any = None) -> Any:
    """Every ZeRO-3 partitioned parameter of ``model`` gathered (whole on every process) while the block
    runs, so plain forward passes of ``model`` (or of any of its submodules) see the full weights; a
    no-op for a model that is not partitioned.

    ``engine``: the ``DeepSpeedEngine`` whose module holds ``model``, if it is already prepared: its
    parameter-fetching hooks are taken off for the block (they would release the gathered parameters
    after each submodule) and put back after it. Collective: every process must enter the block, even
    one with nothing to run inside it.
    """
    params = _zero3_params(model)
    if not params:
        yield
        return
    offload = _zero3_offload(engine) if engine is not None else None
    with _gathered(params):
        if offload is not None:
            for p in offload.module.parameters():
                if hasattr(p, "ds_active_sub_modules"):
                    p.ds_active_sub_modules.clear()
            for hook in [*offload.forward_hooks, *offload.backward_hooks]:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            if offload is not None:  # DeepSpeed >= 0.16.4 renamed _register_hooks_recursively
                register = getattr(offload, "_register_deepspeed_module", None)
                if register is None:
                    register = offload._register_hooks_recursively
                register(offload.module)


def prepare_deepspeed_ref_model(model: nn.Module, ds_config: Mapping[str, Any]) -> Any:
    """``model`` as a ZeRO-3 ``DeepSpeedEngine`` for evaluation (as TRL prepares its ``ref_model``): the
    trainer's DeepSpeed config without optimizer and scheduler, the hidden-size ``"auto"`` buckets filled
    in as transformers does, ``eval()`` mode. The engine partitions the parameters it holds."""
    import deepspeed

    config = copy.deepcopy(dict(ds_config))
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    cfg = getattr(model, "config", None)
    sizes = getattr(cfg, "hidden_sizes", None)
    hidden = max(sizes) if sizes else getattr(cfg, "hidden_size", None)
    if hidden is None:  # a multimodal config: the text model's width
        hidden = getattr(getattr(cfg, "text_config", None), "hidden_size", None)
    for key, value in (
        ("reduce_bucket_size", None if hidden is None else hidden * hidden),
        ("stage3_prefetch_bucket_size", None if hidden is None else int(0.9 * hidden * hidden)),
        ("stage3_param_persistence_threshold", None if hidden is None else 10 * hidden),
    ):
        if zero.get(key) == "auto":
            if value is None:
                del zero[key]  # DeepSpeed's default
            else:
                zero[key] = value
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def processing_fingerprint(processing_class: Any) -> str:
    """A hash of every file ``processing_class.save_pretrained`` writes (vocabulary, special tokens, image
    and video processor configs, chat template), or, where saving fails or writes nothing, of the
    object's JSON-able state."""
    h = hashlib.sha256()
    h.update(f"{type(processing_class).__module__}.{type(processing_class).__qualname__}".encode())
    if processing_class is None:
        return h.hexdigest()[:16]
    wrote = False
    if callable(getattr(processing_class, "save_pretrained", None)):
        try:
            with tempfile.TemporaryDirectory(prefix="rankloss-fp-") as folder:
                processing_class.save_pretrained(folder)
                for root, dirs, files in os.walk(folder):
                    dirs.sort()
                    for name in sorted(files):
                        file = os.path.join(root, name)
                        h.update(os.path.relpath(file, folder).encode() + b"\0")
                        with open(file, "rb") as f:
                            data = f.read()
                        if name == "tokenizer.json":
                            data = _without_call_state(data)
                        h.update(b"%d\0" % len(data) + data)
                        wrote = True
        except Exception:  # noqa: BLE001 - any failure falls back to the object's state
            wrote = False
    if not wrote:
        h.update(b"state\0")
        h.update(_state_json(processing_class).encode())
    return h.hexdigest()[:16]


def _without_call_state(data: bytes) -> bytes:
    """A fast tokenizer's ``tokenizer.json`` without its ``padding`` and ``truncation``: the state its
    last call left (each call sets them again), not what it makes of a text."""
    try:
        tok = json.loads(data)
    except ValueError:
        return data
    if not isinstance(tok, dict):
        return data
    tok.pop("padding", None)
    tok.pop("truncation", None)
    return json.dumps(tok, sort_keys=True).encode()


def _state_json(obj: Any) -> str:
    to_dict = getattr(obj, "to_dict", None)
    state: Any = None
    if callable(to_dict):
        try:
            state = to_dict()
        except Exception:  # noqa: BLE001
            state = None
    if state is None:
        state = getattr(obj, "__dict__", repr(obj))
    return json.dumps(state, sort_keys=True, default=repr)


def collator_fingerprint(collator: Any) -> str:
    """A hash of the collator's class and of all its settings: every init field but ``processing_class``
    of a dataclass, else its public non-callable attributes; a setting with ``save_pretrained`` (a
    tokenizer or processor) is hashed as :func:`processing_fingerprint` does."""
    cls = type(collator)
    h = hashlib.sha256()
    h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
    h.update(str(getattr(collator, "__qualname__", "")).encode())  # a plain function as the collator
    if dataclasses.is_dataclass(collator) and not isinstance(collator, type):
        settings = {
            f.name: getattr(collator, f.name, None)
            for f in dataclasses.fields(collator)
            if f.init and f.name != "processing_class"
        }
    else:
        try:
            attrs = dict(vars(collator))
        except TypeError:
            attrs = {k: getattr(collator, k, None) for k in dir(collator)}
        settings = {k: v for k, v in attrs.items() if not k.startswith("_") and not callable(v)}
    for name in sorted(settings):
        value = settings[name]
        h.update(name.encode() + b"=")
        if callable(getattr(value, "save_pretrained", None)):
            h.update(processing_fingerprint(value).encode())
        else:
            h.update(repr(value).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _scores_checksum(scores: Sequence[Sequence[float]]) -> str:
    h = hashlib.sha256()
    h.update(b"%d;" % len(scores))
    for row in scores:
        h.update(struct.pack(f"<I{len(row)}d", len(row), *row))
    return h.hexdigest()


def _completion_counts(dataset: Any) -> list[int | None]:
    """Each record's number of completions (``None`` where it has no list of them: the collator names
    that record when it sees it)."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list) and "completions" in names:
        try:  # a datasets.Dataset: one column, no media decoded
            column = dataset["completions"]
            return [len(c) if isinstance(c, (list, tuple)) else None for c in column]
        except Exception:  # noqa: BLE001
            pass
    out: list[int | None] = []
    for i in range(len(dataset)):
        rec = dataset[i]
        comps = rec.get("completions") if isinstance(rec, Mapping) else None
        out.append(len(comps) if isinstance(comps, (list, tuple)) else None)
    return out


def _record_name(dataset: Any, i: int) -> str:
    try:
        rec = dataset[i]
        rid = rec.get("id") if isinstance(rec, Mapping) else None
    except Exception:  # noqa: BLE001
        rid = None
    return f"record {i}" + (f" (id {rid!r})" if rid is not None else "")


def _cache_problem(cached: Any, counts: list[int | None], dataset: Any) -> str | None:
    """Why a loaded cache does not hold this dataset's reference scores, or ``None`` if it does."""
    if not isinstance(cached, Mapping) or not isinstance(cached.get("scores"), list):
        return "does not hold a list of scores (not a rankloss reference score cache, or damaged)"
    scores = cached["scores"]
    for i, row in enumerate(scores):
        if not isinstance(row, list) or not all(
            isinstance(x, (float, int)) and not isinstance(x, bool) for x in row
        ):
            return f"is damaged: the scores of record {i} are not a list of numbers"
    if cached.get("checksum") != _scores_checksum(scores):
        return "is damaged: its scores do not match their checksum"
    if len(scores) != len(counts):
        return f"holds the scores of {len(scores)} records but the dataset has {len(counts)}"
    for i, (row, k) in enumerate(zip(scores, counts)):
        if k is not None and len(row) != k:
            return f"holds {len(row)} scores for {_record_name(dataset, i)}, which has {k} completions"
        if not all(math.isfinite(x) for x in row):
            return f"holds a non-finite score for {_record_name(dataset, i)}"
    return None


def data_fingerprint(dataset: Any) -> str:
    """``datasets.Dataset._fingerprint`` when there is one, else a hash of every record."""
    fp = getattr(dataset, "_fingerprint", None)
    if isinstance(fp, str):
        return fp
    h = hashlib.sha256()
    for i in range(len(dataset)):
        _hash_value(h, dataset[i])
    return h.hexdigest()[:16]


class ChainRankTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is a listwise chain loss (see the module docstring).

    Args:
        model: a Hugging Face causal LM or VLM of a supported family (``rankloss.integrations
            .supported_model_types()``), or a local checkpoint path.
        args: :class:`ChainRankConfig`.
        train_dataset, eval_dataset: chain records (a ``datasets.Dataset``, a list of dicts, or any
            map-style dataset of dicts).
        processing_class: the tokenizer (text-only) or processor (VLM).
        ref_model: the frozen reference model; ``None`` scores with the policy as it is before training.
        data_collator: default :class:`~rankloss.integrations.ChainCollator` with the config's lengths.
        Other arguments as ``transformers.Trainer``.
    """

    # the loss is divided by the chains of the whole optimizer step (see compute_loss)
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | str,
        args: ChainRankConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        ref_model: nn.Module | None = None,
        data_collator: Any = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = ChainRankConfig(output_dir="chain-rank-output")
        if not isinstance(args, ChainRankConfig):
            raise TypeError(f"args must be a ChainRankConfig, got {type(args).__name__}")
        if isinstance(model, str):
            model = (
                transformers.AutoModelForImageTextToText.from_pretrained(model)
                if _is_vlm_path(model)
                else transformers.AutoModelForCausalLM.from_pretrained(model)
            )
        if processing_class is None:
            raise ValueError("processing_class is required: the tokenizer (text-only) or the processor (VLM)")
        if args.reference_free and ref_model is not None:
            raise ValueError("reference_free=True but a ref_model was given: drop one of them")
        _refuse_empty(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            for key, value in eval_dataset.items():
                _refuse_empty(value, f"eval_dataset[{key!r}]")
        else:
            _refuse_empty(eval_dataset, "eval_dataset")
        if data_collator is None:
            from .collator import ChainCollator

            data_collator = ChainCollator(
                processing_class,
                max_prompt_length=args.max_prompt_length,
                max_completion_length=args.max_completion_length,
                num_frames=args.num_frames,
                duplicates=args.duplicates,
                boundary=args.boundary,
            )
        # every record checked (text only, no media) before the reference pass and the first step
        self.record_summary: dict[str, dict[str, Any]] = {}
        train_dataset = self._check_records(train_dataset, "train_dataset", data_collator, args.should_log)
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                k: self._check_records(v, f"eval_dataset[{k!r}]", data_collator, args.should_log)
                for k, v in eval_dataset.items()
            }
        else:
            eval_dataset = self._check_records(eval_dataset, "eval_dataset", data_collator, args.should_log)
        self.policy = model
        self.ref_model = ref_model
        wrapper = ChainRankModel(model, args.loss_spec(), share_prefix=args.share_prefix, impl=args.impl)
        # transformers reads this on the model it resumes (the wrapper), as on a PreTrainedModel
        wrapper._keys_to_ignore_on_save = getattr(model, "_keys_to_ignore_on_save", None)
        self._set_vision(wrapper, args)
        self._sums: dict[str, dict[str, Tensor]] = {"train": {}, "eval": {}}
        super().__init__(
            model=wrapper,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # torchrun on CPU without use_cpu=True (or accelerate's FSDP / DeepSpeed without accelerators):
        # every process would train alone on the whole batch into the same output_dir
        problem = process_group_problem(self.accelerator, os.environ, cpu_hint="use_cpu=True")
        if problem is not None:
            raise RuntimeError(f"ChainRankTrainer: {problem}")
        if self.ref_model is not None and self._zero_stage() == 3 and not is_deepspeed_engine(self.ref_model):
            # a ZeRO-3 reference model is partitioned like the policy and run through its own engine
            self.ref_model = prepare_deepspeed_ref_model(
                self.ref_model, self.accelerator.state.deepspeed_plugin.deepspeed_config
            )
        # reference scores now, from the policy before any step (a resumed run loads its checkpoint later)
        self.train_dataset = self._with_ref(self.train_dataset, "train")
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {k: self._with_ref(v, f"eval-{k}") for k, v in self.eval_dataset.items()}
        else:
            self.eval_dataset = self._with_ref(self.eval_dataset, "eval")

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._undo_evaluation_only_preparation()
        return super().train(*args, **kwargs)

    def _undo_evaluation_only_preparation(self) -> None:
        """``evaluate()`` before ``train()`` on several processes (DDP, not DeepSpeed / FSDP): the
        Trainer's evaluation loop has accelerate prepare the model for evaluation only (no DDP wrapper)
        and accelerate marks it prepared, so ``train()`` would not wrap it in DDP and every process would
        step alone on its part of the batch (the processes' weights drift apart; transformers 5.25,
        accelerate 1.16). Forget that preparation, so ``train()`` prepares the model for training."""
        model, acc = self.model, self.accelerator
        if (
            acc.num_processes <= 1
            or getattr(self, "is_deepspeed_enabled", False)
            or getattr(self, "is_fsdp_enabled", False)
            or self.model_wrapped is not model
            or not getattr(model, "_is_accelerate_prepared", False)
        ):
            return
        acc._models[:] = [m for m in acc._models if m is not model]
        model._is_accelerate_prepared = False
        original = model.__dict__.pop("_original_forward", None)  # the mixed-precision forward wrapper
        if original is not None:
            if getattr(original, "__func__", None) is type(model).forward:
                model.__dict__.pop("forward", None)
            else:
                model.forward = original

    # ------------------------------------------------------------------------------------------------
    # records

    def _check_records(self, dataset: Any, name: str, collator: Any, should_log: bool = True) -> Any:
        """``dataset`` with every record checked by ``collator.check_record`` (fields, prompt and
        completions through the tokenizer and chat template, truncation, duplicates; media not loaded).

        A record that raises is named (``name``, index, id) and stops the run here, before the reference
        pass. A record left with fewer than 2 distinct completions cannot be ranked: it is skipped, and
        counted in one warning and in ``self.record_summary[name]``. Datasets without a length, and
        collators without ``check_record``, are passed through unchecked.
        """
        check = getattr(collator, "check_record", None)
        if dataset is None or isinstance(dataset, str) or check is None:
            return dataset
        try:
            n = len(dataset)
        except TypeError:  # an iterable dataset
            return dataset
        keep: list[int] = []
        short: list[tuple[int, Any, int]] = []
        dropped = dropped_records = 0
        first_drop: tuple[int, Any, int, int] | None = None
        bar = None
        if n >= 2000:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=f"checking {name}", disable=not should_log)
        for i in range(n):
            if bar is not None:
                bar.update()
            rec = dataset[i]
            rid = rec.get("id") if isinstance(rec, Mapping) else None
            try:
                k, pairs = check(rec, i)
            except (ValueError, TypeError) as exc:
                note = f" (id {rid!r})" if rid is not None else ""
                raise type(exc)(
                    f"{name} record {i}{note} is not a usable chain record: {exc}; fix or remove it"
                ) from exc
            if k < 2:
                short.append((i, rid, k))
                continue
            keep.append(i)
            if pairs:
                dropped += len(pairs)
                dropped_records += 1
                if first_drop is None:
                    first_drop = (i, rid, *pairs[0])
        if bar is not None:
            bar.close()
        limit = getattr(collator, "max_completion_length", None)
        cut = f" after max_completion_length={limit}" if limit is not None else ""
        if dropped:
            i, rid, k, j = first_drop  # type: ignore[misc]
            warnings.warn(
                f"ChainRankTrainer: {name}: {dropped} completion(s) of {dropped_records} record(s) are "
                f"token-identical{cut} to a better-ranked completion of their chain and are dropped (e.g. "
                f"record {i}{f' (id {rid!r})' if rid is not None else ''}: completion {k} = completion {j}); "
                "the logs count them as dropped_completions",
                stacklevel=3,
            )
        if short:
            named = ", ".join(
                f"{i}{f' (id {rid!r})' if rid is not None else ''}: {k}" for i, rid, k in short[:5]
            ) + (f", ... ({len(short) - 5} more)" if len(short) > 5 else "")
            if not keep:
                raise ValueError(
                    f"{name}: none of its {n} records has 2 distinct completions{cut}, so nothing can be "
                    f"ranked (record: distinct completions: {named})"
                )
            warnings.warn(
                f"ChainRankTrainer: {name}: skipped {len(short)} of {n} record(s) with fewer than 2 distinct "
                f"completions{cut}, which cannot be ranked (record: distinct completions: {named})",
                stacklevel=3,
            )
        self.record_summary[name] = {
            "records": n,
            "skipped_records": len(short),
            "skipped": [(i, rid) for i, rid, _ in short],
            "dropped_completions": dropped,
        }
        if not short:
            return dataset
        if hasattr(dataset, "select") and hasattr(dataset, "_fingerprint"):  # datasets.Dataset
            return dataset.select(keep)
        return _Subset(dataset, keep)

    # ------------------------------------------------------------------------------------------------
    # vision encoder

    @staticmethod
    def _set_vision(wrapper: ChainRankModel, args: ChainRankConfig) -> None:
        vision = wrapper.chain_forward.family.vision_modules(wrapper.model)
        if (args.freeze_vision or args.vision_lr is not None) and not vision:
            raise ValueError(
                f"freeze_vision / vision_lr: model_type {wrapper.chain_forward.model_type!r} has no vision "
                "encoder"
            )
        if args.freeze_vision:
            for module in vision:
                module.requires_grad_(False)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with the vision encoder's parameters at ``vision_lr`` when set."""
        if self.args.vision_lr is None or self.optimizer is not None:
            return super().create_optimizer(*([model] if model is not None else []))
        opt_model = self.model
        vision = {
            id(p) for m in self.model.chain_forward.family.vision_modules(self.policy) for p in m.parameters()
        }
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = defaultdict(list)
        for name, p in opt_model.named_parameters():
            if p.requires_grad:
                groups[(id(p) in vision, name in decay)].append(p)
        param_groups = [
            {
                "params": ps,
                "weight_decay": self.args.weight_decay if is_decay else 0.0,
                **({"lr": self.args.vision_lr} if is_vision else {}),
            }
            for (is_vision, is_decay), ps in sorted(groups.items())
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------------------------------------
    # reference scores

    def _with_ref(self, dataset: Any, name: str) -> Any:
        if dataset is None or self.args.reference_free or isinstance(dataset, _WithRefScores):
            return dataset
        return _WithRefScores(dataset, self.reference_scores(dataset, name))

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        if (
            eval_dataset is not None
            and not isinstance(eval_dataset, str)
            and not isinstance(eval_dataset, _WithRefScores)
        ):
            if not self.args.reference_free and self.ref_model is None:
                raise ValueError(
                    "evaluate(eval_dataset=...): its reference scores would come from the policy as it is "
                    "now, not as it was before training; pass eval datasets to "
                    "ChainRankTrainer(eval_dataset=...) or give a ref_model"
                )
            _refuse_empty(eval_dataset, "eval_dataset")
            eval_dataset = self._with_ref(eval_dataset, "eval")
        return super().get_eval_dataloader(eval_dataset)

    def _ref_cache_path(self, dataset: Any, scorer: nn.Module) -> str:
        """The cache file of ``dataset``'s reference scores: a hash of everything that changes them (the
        scorer's weights, the records, the tokens and pixels the model sees: processor or tokenizer and
        every collator setting, the precision and the kernel)."""
        collator = self.data_collator
        processors = [self.processing_class]
        own = getattr(collator, "processing_class", None)
        if own is not None and own is not self.processing_class:
            processors.append(own)
        h = hashlib.sha256()
        for part in (
            __version__,
            model_fingerprint(scorer),
            data_fingerprint(dataset),
            collator_fingerprint(collator),
            [processing_fingerprint(p) for p in processors],
            self.args.share_prefix,
            self.args.impl,
            str(self.accelerator.mixed_precision),
            getattr(self.processing_class, "chat_template", None),
        ):
            h.update(repr(part).encode())
        folder = self.args.ref_cache_dir or os.path.join(self.args.output_dir, "rankloss-ref")
        return os.path.join(folder, f"ref-scores-{h.hexdigest()[:20]}.pt")

    def _load_ref_cache(self, path: str, dataset: Any) -> list[list[float]] | None:
        """The cached scores at ``path`` if it holds this dataset's (checksum, records, completions per
        record, finite values), else ``None`` after a warning naming the file and what is wrong."""
        if not os.path.exists(path):
            return None
        problem: str | None
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated, empty or overwritten: recompute
            cached, problem = None, f"cannot be read ({type(exc).__name__}: {str(exc) or 'no message'})"
        else:
            try:
                problem = _cache_problem(cached, _completion_counts(dataset), dataset)
            except Exception as exc:  # noqa: BLE001 - whatever a damaged file unpickled to
                problem = f"is damaged ({type(exc).__name__}: {exc})"
        if problem is None:
            return cached["scores"]
        warnings.warn(
            f"ChainRankTrainer: the reference score cache {path} {problem}; recomputing the reference "
            "scores and rewriting the file",
            stacklevel=3,
        )
        return None

    def _scoring_collator(self) -> Any:
        """The collator for the reference pass: every completion a record gives is scored (a
        ``ChainCollator`` that drops duplicate completions keeps them here)."""
        collator = self.data_collator
        if callable(getattr(collator, "for_scoring", None)):
            return collator.for_scoring()
        if dataclasses.is_dataclass(collator) and not isinstance(collator, type):
            names = {f.name for f in dataclasses.fields(collator) if f.init}
            if "duplicates" in names and getattr(collator, "duplicates", None) != "keep":
                return dataclasses.replace(collator, duplicates="keep")
        return collator

    def _zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage when the Trainer runs under DeepSpeed, else ``None``."""
        if not getattr(self, "is_deepspeed_enabled", False):
            return None
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return getattr(plugin, "zero_stage", None)

    def _deepspeed_engine_of(self, model: nn.Module) -> Any:
        """The ``DeepSpeedEngine`` that runs ``model``: ``model`` itself, or the Trainer's prepared engine
        when ``model`` is part of it (the policy after the first step); ``None`` when there is none."""
        if is_deepspeed_engine(model):
            return model
        wrapped = getattr(self, "model_wrapped", None)
        if is_deepspeed_engine(wrapped) and any(m is model for m in wrapped.module.modules()):
            return wrapped
        return None

    def _score_records(
        self,
        dataset: Any,
        mine: Sequence[int],
        bs: int,
        collator: Any,
        wrapper: ChainRankModel,
        local: dict[int, list[float]],
    ) -> None:
        """Scores of the records ``mine`` of ``dataset`` (``bs`` at a time) into ``local``."""
        acc = self.accelerator
        for start in range(0, len(mine), bs):
            idx = list(mine[start : start + bs])
            batch = collator([dataset[i] for i in idx])
            batch = self._prepare_inputs(batch)
            # the training step's precision: accelerate wraps the prepared model's forward in this
            # autocast (compute_loss_context_manager adds the Trainer's own contexts, if any)
            with self.compute_loss_context_manager(), acc.autocast():
                out = wrapper(batch, mode="score")
            sizes = batch["chain_sizes"].tolist()
            for i, s in zip(idx, torch.split(out["scores"].float().cpu(), sizes)):
                local[i] = s.tolist()

    @torch.no_grad()
    def reference_scores(self, dataset: Any, name: str = "train") -> list[list[float]]:
        """Each record's reference scores (summed completion log-probs), computed once across processes
        under the training's mixed precision, and cached on disk; ``[[s_1, ..., s_K], ...]`` in dataset
        order. A damaged or mismatched cache file warns, naming it, and is recomputed."""
        scorer = self.ref_model if self.ref_model is not None else self.policy
        engine = self._deepspeed_engine_of(scorer)
        if engine is scorer:  # a ref_model prepared as a ZeRO-3 engine: score with its module
            scorer = engine.module
        path = self._ref_cache_path(dataset, scorer)
        cached = self._load_ref_cache(path, dataset)
        acc = self.accelerator
        device = acc.device
        if acc.num_processes > 1:  # every process recomputes, or none does
            hit = torch.tensor(int(cached is not None), device=device)
            if int(acc.reduce(hit, "sum")) != acc.num_processes:
                cached = None
        if cached is not None:
            return cached
        was_training = scorer.training
        scorer.eval()
        moved = False
        partitioned = bool(_zero3_params(scorer))
        if not partitioned and engine is None and next(scorer.parameters()).device != device:
            scorer.to(device)
            moved = scorer is self.ref_model
        wrapper = ChainRankModel(scorer, share_prefix=self.args.share_prefix, impl=self.args.impl)
        collator = self._scoring_collator()
        # a process may get fewer records than another, or none: the ZeRO-3 gather below is entered by
        # every process all the same (it is collective), and the loop inside it runs no collective
        mine = list(range(acc.process_index, len(dataset), acc.num_processes))
        bs = self.args.ref_batch_size or self.args.per_device_eval_batch_size
        local: dict[int, list[float]] = {}
        try:
            with zero3_gathered_for_forward(scorer, engine):
                self._score_records(dataset, mine, bs, collator, wrapper, local)
        finally:
            scorer.train(was_training)
            if moved:
                scorer.to("cpu")
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            merged: dict[int, list[float]] = {}
            for part in gather_object([local]):
                merged.update(part)
            local = merged
        scores = [local[i] for i in range(len(dataset))]
        counts = _completion_counts(dataset)
        for i, (row, k) in enumerate(zip(scores, counts)):
            if k is not None and len(row) != k:
                raise ValueError(
                    f"the reference pass gave {len(row)} scores for {_record_name(dataset, i)} of "
                    f"{name!r}, which has {k} completions: the data collator must score every "
                    "completion of a record (ChainCollator scores them all)"
                )
            if not all(math.isfinite(x) for x in row):
                raise ValueError(
                    f"the reference model gives a non-finite score ({row}) to a completion of "
                    f"{_record_name(dataset, i)} of {name!r}: check the reference model (its dtype, "
                    "its weights) and that record's completions"
                )
        if acc.is_main_process:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            torch.save({"scores": scores, "dataset": name, "checksum": _scores_checksum(scores)}, tmp)
            os.replace(tmp, path)
        acc.wait_for_everyone()
        return scores

    # ------------------------------------------------------------------------------------------------
    # loss and metrics

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Tensor:
        """Chains in the whole optimizer step: every micro-batch, every process."""
        n = torch.tensor(sum(len(b["chain_sizes"]) for b in batch_samples), device=device)
        if self.args.world_size > 1:
            n = self.accelerator.reduce(n, "sum")
        return n

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Any:
        # keep_precision: FSDP's mixed-precision input cast would turn ref_scores into bf16
        out = model(keep_precision(inputs), mode="rank", reduction="sum")
        chains = len(inputs["chain_sizes"])
        if num_items_in_batch is None:  # evaluation: the micro-batch's mean
            loss = out["loss"] / max(chains, 1)
        else:
            # DDP averages gradients over processes: scale so the step's gradient is that of the mean
            # over all its chains
            loss = out["loss"] * self.accelerator.num_processes / num_items_in_batch
        self._accumulate("train" if model.training else "eval", inputs, out["chain"])
        return (loss, out) if return_outputs else loss

    def _accumulate(self, mode: str, inputs: Mapping[str, Any], chain: Any) -> None:
        sums = self._sums[mode]
        sizes = inputs["chain_sizes"].detach()
        labels = inputs["completion_labels"]
        dev = sizes.device

        def add(key: str, value: Tensor) -> None:
            value = value.detach().double().to(dev)
            if key in sums and sums[key].shape != value.shape:
                n = max(sums[key].numel(), value.numel())
                sums[key] = torch.nn.functional.pad(sums[key], (0, n - sums[key].numel()))
                value = torch.nn.functional.pad(value, (0, n - value.numel()))
            sums[key] = sums[key] + value if key in sums else value

        add("chains", torch.tensor(float(sizes.numel())))
        if isinstance(inputs.get("dropped_completions"), Tensor):
            add("dropped_completions", inputs["dropped_completions"].sum())
        add("chain_loss", chain.chain_losses.sum())
        if chain.sft_loss is not None:
            add("sft_loss", chain.sft_loss.sum())
        add("neighbour_margin", chain.neighbour_margin.sum())
        rewards = chain.rewards.detach().double().to(dev)
        # the policy's own scores: the rewards are beta * (s - s_ref), or beta * (s - s_ref) / n with
        # length_normalize (forward.py divides the reference by n too); s_ref = 0 when reference-free
        ref = inputs.get("ref_scores")
        ref = ref.detach().double().to(dev) if ref is not None else torch.zeros_like(rewards)
        n_tok = (labels != IGNORE_INDEX).sum(-1).to(dev)
        n_f = n_tok.double().clamp(min=1)
        if self.args.length_normalize:
            s = rewards / self.args.beta * n_f + ref
        else:
            s = rewards / self.args.beta + ref
        self._accumulate_ranking(
            add, inputs, sizes, {"rewards": rewards, "logps": s, "logps_per_token": s / n_f}
        )
        # rewards per chain position, and the best completion's log-prob per token
        K = int(sizes.max()) if sizes.numel() else 0
        pos = (
            torch.cat([torch.arange(int(k), device=dev) for k in sizes.tolist()]) if K else rewards[:0].long()
        )
        add("reward_pos_sum", torch.zeros(K, dtype=torch.float64, device=dev).index_add_(0, pos, rewards))
        add(
            "reward_pos_n",
            torch.zeros(K, dtype=torch.float64, device=dev).index_add_(0, pos, torch.ones_like(rewards)),
        )
        first = torch.cumsum(sizes, 0) - sizes
        add("best_logp_per_token", (s[first] / n_f[first]).sum())
        add("tokens", (inputs["prompt_attention_mask"].sum() + n_tok.sum()).double())

    def _accumulate_ranking(
        self, add: Any, inputs: Mapping[str, Any], sizes: Tensor, scores: Mapping[str, Tensor]
    ) -> None:
        """Sums of the tie-aware ranking metrics of each score in ``scores`` (the implicit rewards, the
        summed and the per-token log-probs), of the chosen / rejected means, and of the adjacent-pair
        accuracy per edit type (the batch's ``chain_edit_types``) and per chain position (the record's,
        from ``completion_index``: a pair counts when its two rows are neighbours in the record)."""
        dev = sizes.device
        C = sizes.numel()
        first = torch.cumsum(sizes, 0) - sizes
        cid = torch.repeat_interleave(torch.arange(C, device=dev), sizes)
        pos = torch.arange(int(sizes.sum()), device=dev) - first[cid]
        rest_n = (sizes - 1).double().clamp(min=1)
        adjacent = {}
        for name, values in scores.items():
            m = ranking_metrics(values, sizes)
            adjacent[name] = m["adjacent"]
            for key in ("pairwise_accuracy", "top1_accuracy", "kendall_tau"):
                # the implicit-reward metrics keep their historic names (now with ties as half)
                add(key if name == "rewards" else f"{name}/{key}", m[key].sum())
            if name in ("rewards", "logps"):
                chosen = values[first]
                rest = torch.zeros(C, dtype=torch.float64, device=dev).index_add_(0, cid, values) - chosen
                add(f"{name}/chosen", chosen.sum())
                add(f"{name}/rejected", (rest / rest_n).sum())
        index = inputs.get("completion_index")
        index = index.to(dev).long() if isinstance(index, Tensor) and index.numel() == pos.numel() else pos
        prev = torch.cat([index[:1], index[:-1]])
        is_pair = (pos > 0) & (index == prev + 1)  # neighbours in the record: one edit apart
        # per edit type: the type of the edit that made each row from the previous one
        types = inputs.get("chain_edit_types")
        flat: list[Any] = []
        if isinstance(types, Sequence) and len(types) == C:
            for t, k in zip(types, sizes.tolist()):
                flat.extend(list(t) if isinstance(t, Sequence) and len(t) == k else [None] * k)
        else:
            flat = [None] * pos.numel()
        known = torch.tensor([t is not None for t in flat], dtype=torch.bool, device=dev) & is_pair
        bucket = torch.tensor([_type_bucket(t) for t in flat], dtype=torch.long, device=dev)
        T = len(_TYPE_BUCKETS)

        def by_type(weights: Tensor) -> Tensor:
            return torch.zeros(T, dtype=torch.float64, device=dev).index_add_(
                0, bucket[known], weights[known].double()
            )

        add("type_pairs", by_type(torch.ones_like(adjacent["logps"])))
        add("type_logps_correct", by_type(adjacent["logps"]))
        add("type_rewards_correct", by_type(adjacent["rewards"]))
        # per position of the record: pair (k - 1, k) at index k
        P = int(index.max()) + 1 if index.numel() else 0
        at = index[is_pair]

        def by_pos(weights: Tensor) -> Tensor:
            return torch.zeros(P, dtype=torch.float64, device=dev).index_add_(0, at, weights[is_pair])

        add("pos_pairs", by_pos(torch.ones_like(adjacent["logps"])))
        add("pos_logps_correct", by_pos(adjacent["logps"]))
        add("pos_rewards_correct", by_pos(adjacent["rewards"]))

    def _reduce_metrics(self, mode: str) -> dict[str, float]:
        sums = self._sums[mode]
        if not sums:
            return {}
        self._sums[mode] = {}
        if self.args.world_size > 1:
            # processes may have seen different chain lengths: pad the per-position sums to one length
            for key in _PER_POSITION:
                K = torch.tensor(sums[key].numel(), device=self.accelerator.device)
                K = int(self.accelerator.reduce(K, "max"))
                sums[key] = torch.nn.functional.pad(sums[key], (0, K - sums[key].numel()))
            sums = {k: self.accelerator.reduce(v, "sum") for k, v in sums.items()}
        chains = float(sums["chains"])
        out = {key: float(sums[key]) / chains for key in _METRICS}
        out["chain_loss"] = float(sums["chain_loss"]) / chains
        if "sft_loss" in sums:  # the SFT term alone (TRL's nll_loss), and the ranking part of the loss
            out["sft_loss"] = out["nll_loss"] = float(sums["sft_loss"]) / chains
            out["rank_loss"] = out["chain_loss"] - self.args.sft_weight * out["sft_loss"]
        out["best_logp_per_token"] = float(sums["best_logp_per_token"]) / chains
        # TRL's names: rewards/accuracies, rewards/margins, rewards/chosen|rejected, logps/chosen|rejected
        out["rewards/accuracies"] = out["pairwise_accuracy"]
        out["rewards/margins"] = out["neighbour_margin"]
        for name in ("rewards", "logps"):
            for part in ("chosen", "rejected"):
                out[f"{name}/{part}"] = float(sums[f"{name}/{part}"]) / chains
        for name in ("logps", "logps_per_token"):
            for key in ("pairwise_accuracy", "top1_accuracy", "kendall_tau"):
                out[f"{name}/{key}"] = float(sums[f"{name}/{key}"]) / chains
        for k, (total, n) in enumerate(zip(sums["reward_pos_sum"].tolist(), sums["reward_pos_n"].tolist())):
            if n:
                out[f"reward_pos{k + 1}"] = out[f"rewards/pos{k + 1}"] = total / n
        pairs = sums["type_pairs"].tolist()
        for name in ("logps", "rewards"):
            correct = sums[f"type_{name}_correct"].tolist()
            for t, n, c in zip(_TYPE_BUCKETS, pairs, correct):
                if n:
                    out[f"{name}/pair_accuracy/{t}"] = c / n
            matched = [i for i, t in enumerate(_TYPE_BUCKETS) if t in LENGTH_MATCHED_TYPES]
            n = sum(pairs[i] for i in matched)
            if n:
                out[f"{name}/pair_accuracy/length_matched"] = sum(correct[i] for i in matched) / n
            for k, (n, c) in enumerate(zip(sums["pos_pairs"].tolist(), sums[f"pos_{name}_correct"].tolist())):
                if n:
                    out[f"{name}/pair_accuracy/pos{k + 1}"] = c / n
        for t, n in zip(_TYPE_BUCKETS, pairs):
            if n:
                out[f"pairs/{t}"] = n
        n = sum(n for t, n in zip(_TYPE_BUCKETS, pairs) if t in LENGTH_MATCHED_TYPES)
        if n:
            out["pairs/length_matched"] = n
        out["chains"] = chains
        out["tokens"] = float(sums["tokens"])
        if "dropped_completions" in sums:
            out["dropped_completions"] = float(sums["dropped_completions"])
        return out

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the chain metrics summed since the last log (reduced across processes) to ``logs``."""
        if not any(k.startswith("eval_") for k in logs):
            logs = {**logs, **self._reduce_metrics("train")}
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        self._sums["eval"] = {}
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        for key, value in self._reduce_metrics("eval").items():
            output.metrics[f"{prefix}_{key}"] = value
        return output

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------------------------------------
    # saving and loading: the Hugging Face model, not the wrapper

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Tensor] | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is not None:
            state_dict = {
                k[len("model.") :] if k.startswith("model.") else k: v for k, v in state_dict.items()
            }
        self.policy.save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model=self.policy if model is None else model)


def _has_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()  # pragma: no cover - torch before 2.6


def _refuse_empty(dataset: Any, what: str) -> None:
    """``ValueError`` for a dataset with no records (the Trainer would fail later, in its sampler)."""
    if dataset is None or isinstance(dataset, str):
        return
    try:
        n = len(dataset)
    except TypeError:  # an iterable dataset: its length is unknown
        return
    if n == 0:
        raise ValueError(
            f"{what} is empty (0 records): pass at least one chain record (a prompt and its ranked "
            "completions), or leave it out"
        )


def _is_vlm_path(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except OSError:
        return False
    return "vision_config" in cfg
