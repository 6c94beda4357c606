"""rankloss.reference: the pure-PyTorch specification of every rankloss op (DESIGN.md §2).

Readable and float64-capable; the kernels in ``rankloss.kernels`` and the fast paths in ``rankloss``
are tested against these functions. Nothing here validates its input: the public API does that.
"""

from .logprobs import (
    accumulation_dtype,
    linear_logits,
    linear_token_logprobs,
    sequence_logprobs,
    token_logprobs,
)
from .losses import (
    DPO_LOSS_TYPES,
    PAIR_STRATEGIES,
    REDUCTIONS,
    chain_loss,
    chain_metrics,
    chain_pairs,
    dpo_chain_loss,
    dpo_pair_loss,
    lipo_loss,
    lipo_weights,
    plackett_luce_chain,
    plackett_luce_loss,
    reduce,
    rewards,
    sft_loss,
    split_chains,
)

__all__ = [
    "DPO_LOSS_TYPES",
    "PAIR_STRATEGIES",
    "REDUCTIONS",
    "accumulation_dtype",
    "chain_loss",
    "chain_metrics",
    "chain_pairs",
    "dpo_chain_loss",
    "dpo_pair_loss",
    "linear_logits",
    "linear_token_logprobs",
    "lipo_loss",
    "lipo_weights",
    "plackett_luce_chain",
    "plackett_luce_loss",
    "reduce",
    "rewards",
    "sequence_logprobs",
    "sft_loss",
    "split_chains",
    "token_logprobs",
]
