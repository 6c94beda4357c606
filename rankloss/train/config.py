"""The trainer's settings: one dataclass, checked as a whole, serialised to ``config.json`` in the run folder.

:class:`TrainConfig` holds every option of ``examples/train_video_rank.py``; :meth:`TrainConfig.validate`
raises ``ValueError`` naming the command-line flag (``--sft-steps``) when a value or a combination is
wrong, so the same checks serve the command line and Python callers. :class:`Arm` names one training
arm of the comparison (a ranking loss, optionally with the vision tower frozen, or the SFT control).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .files import DamagedFileError, read_json, seal, unseal
from .files import write_json_atomic as _write_json_atomic

__all__ = [
    "Arm",
    "ARM_LOSSES",
    "ARM_PAIRS",
    "DEFAULT_ARMS",
    "PRESETS",
    "TrainConfig",
    "RUNTIME_FIELDS",
    "parse_arms",
]

#: Losses a ranking arm can use (``sft`` is the control that simply continues SFT).
ARM_LOSSES = ("plackett_luce", "dpo", "lipo", "sft")
#: The default comparison (docs/training.md, "The experiment"): Plackett-Luce over the whole chain, binary
#: DPO with one pair per chain (best vs worst), DPO on every adjacent pair, Plackett-Luce with the vision
#: tower frozen, and SFT continued for as many steps (the control).
DEFAULT_ARMS = ("plackett_luce", "dpo:best_worst", "dpo", "plackett_luce:frozen", "sft")

#: ``--preset``: named sets of defaults (a flag typed on the command line still wins). ``default`` is the
#: README's 10-minute main job; ``long`` is the same experiment with more data, steps and seeds, sized for
#: about 25 minutes on 2 CPU cores, for when the default's seeds cannot decide a claim (docs/training.md).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "long": {"num_videos": 4000, "heldout": 400, "rank_steps": 300, "seeds": 6},
}
_LOSS_TITLES = {"plackett_luce": "Plackett-Luce", "dpo": "DPO", "lipo": "LiPO", "sft": "SFT continuation"}

#: Fields that only change how a run executes, not what it computes: they may differ on ``--resume``.
RUNTIME_FIELDS = frozenset(
    {
        "resume",
        "overwrite",
        "jobs",
        "threads",
        "progress",
        "stop_after_steps",
        "output_dir",
        "keep_checkpoints",
        "gradient_checkpointing",
    }
)


#: DPO pair strategies an arm may name (``dpo:best_worst``), and how a table says them.
ARM_PAIRS = ("adjacent", "all", "best_worst", "best_rest")
_PAIR_TITLES = {
    "adjacent": "adjacent",
    "all": "all pairs",
    "best_worst": "one pair: best vs worst",
    "best_rest": "best vs each other caption",
}


def write_json_atomic(path: str, obj: Any, indent: int = 1) -> None:
    """``obj`` as JSON (sorted keys, a final newline) in ``path``: written to a temporary file in the same
    folder, ``fsync``'d, then renamed (:func:`rankloss.train.files.write_json_atomic`)."""
    _write_json_atomic(path, obj, indent=indent)


@dataclass(frozen=True)
class Arm:
    """One training arm after the SFT stage.

    Attributes:
        loss: ``"plackett_luce"``, ``"dpo"``, ``"lipo"`` or ``"sft"`` (continue SFT: the control).
        frozen_vision: train the LLM only (the vision tower's parameters get no updates).
        pairs: ``dpo`` only: the arm's own pair strategy (``"best_worst"``: binary DPO, one pair per
            chain); ``None`` takes the run's ``--pairs`` (default adjacent).
        rerun: the same arm trained again from the same SFT model with a batch order of its own (the order
            is salted by the arm's name): an A/A check, tested against the arm as the claims' tests are and
            expected to read undecided (``rankloss.train.claims.aa_results``).
    """

    loss: str
    frozen_vision: bool = False
    pairs: str | None = None
    rerun: bool = False

    @property
    def name(self) -> str:
        """Folder and key name: ``plackett_luce``, ``plackett_luce_frozen``, ``dpo_best_worst``,
        ``sft_control``, ..."""
        base = "sft_control" if self.loss == "sft" else self.loss
        if self.pairs is not None:
            base += "_" + self.pairs
        return base + ("_frozen" if self.frozen_vision else "") + ("_rerun" if self.rerun else "")

    @property
    def spec(self) -> str:
        """The ``--arms`` spelling: ``plackett_luce:frozen``, ``dpo:best_worst``, ``plackett_luce:rerun``."""
        return (
            self.loss
            + (f":{self.pairs}" if self.pairs else "")
            + (":frozen" if self.frozen_vision else "")
            + (":rerun" if self.rerun else "")
        )

    @property
    def original(self) -> Arm:
        """The arm a ``rerun`` arm repeats (itself when it is not a rerun)."""
        return Arm(self.loss, self.frozen_vision, self.pairs)

    def title(self, pairs: str | None = None) -> str:
        """Human-readable name for tables: ``Plackett-Luce, frozen vision``, ``DPO (adjacent)``,
        ``DPO (one pair: best vs worst)``; ``pairs`` is the run's ``--pairs`` (for a ``dpo`` arm without
        its own)."""
        t = _LOSS_TITLES[self.loss]
        if self.loss == "dpo":
            t += f" ({_PAIR_TITLES.get(self.pairs or pairs or 'adjacent')})"
        return t + (", frozen vision" if self.frozen_vision else "") + (", rerun" if self.rerun else "")


def parse_arms(text: str | tuple[str, ...] | list[str]) -> tuple[Arm, ...]:
    """``"plackett_luce,dpo:best_worst,plackett_luce:frozen,sft"`` -> arms.

    Each arm is ``loss[:pairs][:frozen][:rerun]``: ``pairs`` (one of :data:`ARM_PAIRS`) only for ``dpo``;
    ``rerun`` repeats an arm that ``--arms`` also names, with a batch order of its own (:class:`Arm`).
    Raises ``ValueError`` naming ``--arms``.
    """
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    arms = []
    for item in items:
        loss, *mods = item.split(":")
        rerun = bool(mods) and mods[-1] == "rerun"
        if rerun:
            mods = mods[:-1]
        frozen = bool(mods) and mods[-1] == "frozen"
        if frozen:
            mods = mods[:-1]
        if loss not in ARM_LOSSES or len(mods) > 1:
            raise ValueError(
                f"--arms: {item!r} is not an arm; write loss[:pairs][:frozen][:rerun] with a loss of "
                f"{ARM_LOSSES} (e.g. 'plackett_luce:frozen', 'dpo:best_worst', 'plackett_luce:rerun'), "
                "comma-separated"
            )
        pairs = mods[0] if mods else None
        if pairs is not None:
            if loss != "dpo":
                raise ValueError(
                    f"--arms: {item!r}: a pair strategy ({pairs!r}) applies to dpo arms only "
                    f"(e.g. 'dpo:best_worst')"
                )
            if pairs not in ARM_PAIRS:
                raise ValueError(f"--arms: {item!r}: pairs must be one of {ARM_PAIRS}, got {pairs!r}")
        arms.append(Arm(loss, frozen, pairs, rerun))
    if not arms:
        raise ValueError("--arms must name at least one arm")
    if len({a.name for a in arms}) != len(arms):
        raise ValueError(f"--arms names an arm twice: {text!r}")
    for a in arms:
        if a.rerun and a.original not in arms:
            raise ValueError(
                f"--arms: {a.spec!r} repeats {a.original.spec!r}, which --arms does not name: add it "
                "(a rerun is only compared with the arm it repeats)"
            )
    return tuple(arms)


@dataclass
class TrainConfig:
    """Every option of the example trainer (the command-line flag is the field name with dashes).

    Defaults are the no-argument main job: a ~0.6M-parameter Qwen2.5-VL trained from scratch on synthetic
    videos, SFT then the four-arm comparison over two seeds, sized to finish in minutes on 2 CPU cores.
    """

    output_dir: str = ""
    # --- data
    data: str | None = None
    eval_data: str | None = None  # a second chains file: the held-out set (with --data)
    video_root: str | None = None
    num_videos: int = 2000
    heldout: int = 200
    chain_length: int | None = None
    frames: int = 8
    frame_size: int = 56
    max_objects: int = 3
    data_seed: int = 0
    prompt: str | None = None
    # --- model
    model: str | None = None
    dtype: str = "float32"
    attn_implementation: str = "auto"
    hidden_size: int = 128
    num_layers: int = 2
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vocab_size: int = 1000
    share_prefix: bool = True
    gradient_checkpointing: bool = False
    # --- stage 0: a pretrained vision tower (rankloss.train.vision_pretrain)
    vision_pretrain: str = "auto"
    vision_pretrain_steps: int = 1000
    vision_pretrain_lr: float = 5e-3
    vision_pretrain_batch_size: int = 32
    # --- optimisation
    batch_size: int = 16
    grad_accum: int = 1
    sft_steps: int = 800
    sft_lr: float = 5e-4
    rank_steps: int = 100
    lr: float = 1e-4
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # --- ranking loss
    loss: str = "plackett_luce"
    beta: float = 0.1
    pairs: str | None = None
    dpo_loss_type: str | None = None
    top_k: int | None = None
    sft_weight: float = 1.0
    length_normalize: bool = False
    freeze_vision: bool = False
    # --- experiment
    preset: str = "default"
    compare: bool = True
    arms: tuple[str, ...] = DEFAULT_ARMS
    seeds: int = 3
    seed: int = 0
    # --- evaluation and logging
    eval_every: int | None = None
    eval_batch_size: int = 32
    max_new_tokens: int = 96
    log_every: int = 10
    probes: bool = True
    # --- run
    save_every: int = 100
    keep_checkpoints: int = 1
    save_models: str = "primary"
    mixed_precision: str = "no"
    cpu: bool = False
    jobs: int | None = None
    threads: int | None = None
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    stop_after_steps: int | None = None
    # Flags the user typed (set by the command line; used to reject options that do not apply).
    given: tuple[str, ...] = field(default=(), compare=False)

    # ------------------------------------------------------------------------------------------------
    @property
    def synthetic(self) -> bool:
        return self.data is None

    @property
    def synthetic_chain_length(self) -> int:
        """Captions per synthetic chain: ``--chain-length``, default 4."""
        return 4 if self.chain_length is None else self.chain_length

    @property
    def arm_list(self) -> tuple[Arm, ...]:
        """The arms this run trains: the comparison's, or the single ``--loss`` arm."""
        if self.compare:
            return parse_arms(self.arms)
        return (Arm("sft" if self.loss == "sft" else self.loss, self.freeze_vision),)

    @property
    def seed_list(self) -> tuple[int, ...]:
        return tuple(self.seed + i for i in range(self.seeds if self.compare else 1))

    @property
    def primary_arm(self) -> Arm:
        """The arm whose model of the first seed is saved as ``<output_dir>/model``."""
        arms = self.arm_list
        for a in arms:
            if a.loss == self.loss and not a.frozen_vision and a.pairs is None and not a.rerun:
                return a
        return arms[0]

    def loss_options(self, arm: Arm) -> dict[str, Any]:
        """Keyword options of :func:`rankloss.fused_linear_chain_loss` for ``arm`` (``{}`` for the
        control)."""
        if arm.loss == "sft":
            return {}
        opts: dict[str, Any] = {"loss": arm.loss, "beta": self.beta, "sft_weight": self.sft_weight}
        if arm.loss == "dpo":
            opts["pairs"] = arm.pairs or self.pairs or "adjacent"
            opts["dpo_loss_type"] = self.dpo_loss_type or "sigmoid"
        if arm.loss == "plackett_luce" and self.top_k is not None:
            opts["top_k"] = self.top_k
        return opts

    def eval_interval(self, steps: int) -> int:
        """Steps between held-out assessments in a stage of ``steps`` steps: ``--eval-every``, or by default
        two evaluations per stage (``ceil(steps / 2)``: half-way and at the end); 0 means only at the stage's
        start and end."""
        if self.eval_every is not None:
            return self.eval_every
        return max(1, math.ceil(steps / 2)) if steps else 0

    def _was_given(self, name: str) -> bool:
        return name in self.given

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Check every value and combination; raises ``ValueError`` naming the flag. Returns ``self``."""

        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if allow_zero else v >= 1)
            if not ok:
                raise ValueError(f"{flag(name)} must be an integer >= {0 if allow_zero else 1}, got {v!r}")

        def positive_float(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and (v >= 0 if allow_zero else v > 0)):
                raise ValueError(
                    f"{flag(name)} must be a {'non-negative' if allow_zero else 'positive'} number, got {v!r}"
                )

        for name in (
            "num_videos",
            "heldout",
            "frames",
            "frame_size",
            "max_objects",
            "hidden_size",
            "num_layers",
            "vision_depth",
            "vision_hidden_size",
            "vocab_size",
            "batch_size",
            "grad_accum",
            "eval_batch_size",
            "max_new_tokens",
            "log_every",
            "seeds",
            "keep_checkpoints",
        ):
            positive(name)
        for name in ("sft_steps", "rank_steps", "save_every"):
            positive(name, allow_zero=True)
        if self.eval_every is not None:
            positive("eval_every", allow_zero=True)
        for name in ("sft_lr", "lr", "beta"):
            positive_float(name)
        for name in ("weight_decay", "max_grad_norm", "sft_weight"):
            positive_float(name, allow_zero=True)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.jobs is not None:
            positive("jobs")
        if self.threads is not None:
            positive("threads")
        if self.stop_after_steps is not None:
            positive("stop_after_steps")
        choices = {
            "dtype": ("float32", "bfloat16", "float16"),
            "attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
            "lr_scheduler": ("constant", "linear", "cosine"),
            "loss": ("plackett_luce", "dpo", "lipo", "sft"),
            "mixed_precision": ("no", "bf16", "fp16"),
            "save_models": ("primary", "all", "none"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{flag(name)} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.pairs is not None and self.pairs not in ("adjacent", "all", "best_worst", "best_rest"):
            raise ValueError(
                f"--pairs must be one of adjacent, all, best_worst, best_rest, got {self.pairs!r}"
            )
        if self.dpo_loss_type is not None and self.dpo_loss_type not in ("sigmoid", "hinge", "ipo"):
            raise ValueError(
                f"--dpo-loss-type must be one of sigmoid, hinge, ipo, got {self.dpo_loss_type!r}"
            )
        if self.top_k is not None:
            positive("top_k")

        # --- data source
        if self.synthetic:
            if self.eval_data is not None:
                raise ValueError(
                    "--eval-data applies to --data (a chains file for training); the synthetic default makes "
                    "its own held-out videos"
                )
            if self.video_root is not None:
                raise ValueError(
                    "--video-root applies to --data (a chains file); the synthetic default has no video files"
                )
            if self.chain_length is not None and self.chain_length < 2:
                raise ValueError(f"--chain-length must be >= 2, got {self.chain_length}")
            if self.heldout >= self.num_videos:
                raise ValueError(
                    f"--heldout ({self.heldout}) must be smaller than --num-videos ({self.num_videos})"
                )
        else:
            for name in ("num_videos", "max_objects"):
                if self._was_given(name):
                    raise ValueError(f"{flag(name)} applies to the synthetic data only, not to --data")
            if not os.path.isfile(self.data):
                raise ValueError(f"--data: chains file not found: {self.data!r}")
            if self.eval_data is not None:
                if not os.path.isfile(self.eval_data):
                    raise ValueError(f"--eval-data: chains file not found: {self.eval_data!r}")
                if self._was_given("heldout"):
                    raise ValueError(
                        "--heldout draws held-out videos from --data at random; with --eval-data the "
                        "held-out set is that file: give one of them"
                    )
            if self.video_root is not None and not os.path.isdir(self.video_root):
                raise ValueError(f"--video-root: not a directory: {self.video_root!r}")
            if self.chain_length is not None and self.chain_length < 2:
                raise ValueError(f"--chain-length must be >= 2, got {self.chain_length}")
        # --- model source
        if self.model is not None:
            if not os.path.isdir(self.model):
                raise ValueError(f"--model: not a local checkpoint directory: {self.model!r}")
            from .model import checkpoint_model_type

            checkpoint_model_type(self.model)  # a supported video-language model, or a ValueError naming it
            for name in ("hidden_size", "num_layers", "vision_depth", "vision_hidden_size", "vocab_size"):
                if self._was_given(name):
                    raise ValueError(
                        f"{flag(name)} sizes the tiny model built from scratch; it does not apply to --model"
                    )
        elif self.prompt is not None:
            raise ValueError(
                "--prompt applies to --model checkpoints with a chat template; the tiny default "
                "model reads the video only"
            )
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        self._validate_vision_pretrain()
        if self.frame_size % 28:
            raise ValueError(
                f"--frame-size must be a multiple of 28 (patch 14 x merge 2), got {self.frame_size}"
            )
        if self.frames % 2:
            raise ValueError(
                f"--frames must be even (the vision tower groups frames in pairs), got {self.frames}"
            )

        # --- losses and arms
        if self.compare:
            arms = parse_arms(self.arms)
            for name in ("loss", "freeze_vision"):
                if self._was_given(name):
                    raise ValueError(
                        f"{flag(name)} sets the single run's arm; with --compare the arms come from "
                        "--arms (add --no-compare for a single run)"
                    )
            if self.rank_steps == 0:
                raise ValueError("--compare needs --rank-steps >= 1 (the arms train after SFT)")
        else:
            arms = self.arm_list
            for name in ("arms", "seeds"):
                if self._was_given(name):
                    raise ValueError(f"{flag(name)} applies to --compare only")
        losses = {a.loss for a in arms}
        if self.pairs is not None and "dpo" not in losses:
            raise ValueError(f"--pairs applies to the dpo loss only; this run trains {sorted(losses)}")
        if self.pairs is not None and all(a.pairs is not None for a in arms if a.loss == "dpo"):
            raise ValueError(
                "--pairs applies to dpo arms without their own pairs; every dpo arm of --arms names its "
                "pairs (e.g. 'dpo:best_worst')"
            )
        if self.dpo_loss_type is not None and "dpo" not in losses:
            raise ValueError(
                f"--dpo-loss-type applies to the dpo loss only; this run trains {sorted(losses)}"
            )
        if self.top_k is not None and "plackett_luce" not in losses:
            raise ValueError(
                f"--top-k applies to the plackett_luce loss only; this run trains {sorted(losses)}"
            )
        if losses == {"sft"}:
            for name in ("beta", "sft_weight", "length_normalize"):
                if self._was_given(name):
                    raise ValueError(
                        f"{flag(name)} applies to the ranking losses; this run only continues SFT"
                    )
        if self.save_models == "primary" and self.compare and self.primary_arm not in arms:
            raise ValueError("--save-models primary needs the primary arm among --arms")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: give one")
        if self.resume and not self._was_given("output_dir"):
            raise ValueError("--resume needs --output-dir: the folder of the run to continue")
        if self.mixed_precision == "fp16" and self.cpu:
            raise ValueError("--mixed-precision fp16 needs a GPU; on CPU use bf16 or no")
        return self

    def _validate_vision_pretrain(self) -> None:
        """``--vision-pretrain`` and its options (stage 0: :mod:`rankloss.train.vision_pretrain`). ``auto``
        is resolved here: ``proxy`` for the tiny model on synthetic videos (the default experiment), ``none``
        for a ``--model`` checkpoint (it has its own pretrained tower) or a ``--data`` chains file."""
        if self.vision_pretrain not in ("auto", "none", "proxy"):
            raise ValueError(
                f"--vision-pretrain must be one of ('auto', 'none', 'proxy'), got {self.vision_pretrain!r}"
            )
        if self.vision_pretrain == "auto":
            self.vision_pretrain = "proxy" if self.model is None and self.synthetic else "none"
            if self.vision_pretrain == "none":
                for name in ("vision_pretrain_steps", "vision_pretrain_lr", "vision_pretrain_batch_size"):
                    if self._was_given(name):
                        raise ValueError(
                            f"--{name.replace('_', '-')} applies to stage 0, which runs by default only for "
                            "the tiny model on synthetic videos: add --vision-pretrain proxy"
                        )
                return
        options = ("vision_pretrain_steps", "vision_pretrain_lr", "vision_pretrain_batch_size")
        if self.vision_pretrain == "none":
            for name in options:
                if self._was_given(name):
                    raise ValueError(
                        f"--{name.replace('_', '-')} applies to --vision-pretrain proxy (stage 0); "
                        "this run has --vision-pretrain none"
                    )
            return
        for name in ("vision_pretrain_steps", "vision_pretrain_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        v = self.vision_pretrain_lr
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"--vision-pretrain-lr must be a positive number, got {v!r}")
        if self.model is not None:
            from .model import checkpoint_model_type
            from .vision_pretrain import SUPPORTED_MODEL_TYPES

            model_type = checkpoint_model_type(self.model)
            if model_type not in SUPPORTED_MODEL_TYPES:
                raise ValueError(
                    f"--vision-pretrain proxy trains a Qwen2.5-VL vision tower (patch embedding + blocks, "
                    f"merger kept for SFT); --model {self.model!r} has model_type {model_type!r}: use "
                    "--vision-pretrain none"
                )

    # ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["arms"] = list(d["arms"])
        d.pop("given")
        return d

    def save(self, path: str) -> None:
        """The settings as JSON in ``path`` (atomically, with their own checksum: :meth:`load` tells a
        damaged file from settings that differ)."""
        write_json_atomic(path, seal(self.to_dict()), indent=2)

    @classmethod
    def load(cls, path: str) -> TrainConfig:
        """The settings saved in a run folder's ``config.json`` (:meth:`save`).

        Raises:
            DamagedFileError: the file is empty, truncated or overwritten (not the JSON of a config);
                the message names it and says what to do.
        """
        advice = (
            "it holds the settings the run started with, which --resume checks the command against: "
            "restore it from a copy of the run folder, or start the run over with --overwrite (this "
            "deletes the run folder)"
        )
        try:
            raw = read_json(path)
        except DamagedFileError as exc:
            raise DamagedFileError(path, exc.problem, advice) from exc
        raw, problem = unseal(raw, [f.name for f in dataclasses.fields(cls)])
        if raw is None:
            raise DamagedFileError(path, f"{problem} (damaged)", advice)
        try:
            return cls.from_dict(raw)
        except (TypeError, ValueError) as exc:
            raise DamagedFileError(path, f"does not hold valid settings ({exc})", advice) from exc

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "arms" in kw:
            kw["arms"] = tuple(kw["arms"])
        return cls(**kw)

    def differences(self, other: TrainConfig) -> list[str]:
        """Fields (other than :data:`RUNTIME_FIELDS`) whose values differ: ``["lr: 0.0001 != 0.0003"]``."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in sorted(a) if k not in RUNTIME_FIELDS and a[k] != b[k]]
