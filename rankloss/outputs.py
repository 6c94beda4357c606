"""The output object every chain loss returns."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["ChainLossOutput"]


class ChainLossOutput(NamedTuple):
    """A chain loss and its ranking metrics (DESIGN.md §2).

    ``loss`` carries the gradient; every other field is detached. Per-chain metrics are kept per chain
    (``[C]``) so they can be gathered across processes before averaging; :meth:`metrics` averages them.

    Attributes:
        loss: reduced loss: a scalar for ``reduction="mean"|"sum"``, ``[C]`` for ``"none"``.
        chain_losses: ``[C]`` detached per-chain loss (ranking loss + ``sft_weight`` * SFT term).
        rewards: ``[S]`` implicit rewards ``beta * (s - s_ref)`` in chain order.
        pairwise_accuracy: ``[C]`` share of ordered pairs ``k < j`` with ``r_k > r_j``, a tie counting half
            (equal rewards, as before the first step, read 0.5; TRL's ``rewards/accuracies`` counts a tie
            as wrong).
        top1_accuracy: ``[C]`` 1.0 where the best caption has strictly the highest reward, ``1 / m`` where
            it is one of ``m`` tied highest, else 0.
        kendall_tau: ``[C]`` Kendall tau (tau-a) between rewards and the chain order.
        neighbour_margin: ``[C]`` mean of ``r_k - r_{k+1}``.
        reward_per_position: ``[K_max]`` mean reward at each chain position over the chains that have it.
        sft_loss: ``[C]`` the SFT term ``-s_1 / n_1`` of each chain, or ``None`` when ``sft_weight == 0``.
    """

    loss: Tensor
    chain_losses: Tensor
    rewards: Tensor
    pairwise_accuracy: Tensor
    top1_accuracy: Tensor
    kendall_tau: Tensor
    neighbour_margin: Tensor
    reward_per_position: Tensor
    sft_loss: Tensor | None = None

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Scalar metrics for logging (means over chains; this reads values back to the host)."""
        out = {
            "loss": float(self.loss.detach().float().mean()),
            "pairwise_accuracy": float(self.pairwise_accuracy.float().mean()),
            "top1_accuracy": float(self.top1_accuracy.float().mean()),
            "kendall_tau": float(self.kendall_tau.float().mean()),
            "neighbour_margin": float(self.neighbour_margin.float().mean()),
        }
        for k, v in enumerate(self.reward_per_position.float().tolist()):
            out[f"reward_pos{k + 1}"] = v
        if self.sft_loss is not None:
            out["sft_loss"] = float(self.sft_loss.float().mean())
        return {prefix + k: v for k, v in out.items()}
