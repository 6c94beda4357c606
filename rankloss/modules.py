"""``nn.Module`` wrappers: they hold the options and route to the functional ops, nothing more."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from . import logprobs as _lp
from . import losses as _losses
from .outputs import ChainLossOutput

__all__ = ["TokenLogProbs", "LinearTokenLogProbs", "PlackettLuceLoss", "DPOChainLoss", "LiPOLoss"]


class TokenLogProbs(nn.Module):
    """Module form of :func:`rankloss.token_logprobs`: ``forward(logits [..., V], labels [...]) -> [...]``."""

    def __init__(self, ignore_index: int = -100, temperature: float = 1.0, impl: str | None = None):
        super().__init__()
        self.ignore_index, self.temperature, self.impl = ignore_index, temperature, impl

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return _lp.token_logprobs(
            logits, labels, ignore_index=self.ignore_index, temperature=self.temperature, impl=self.impl
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, temperature={self.temperature}, impl={self.impl!r}"


class LinearTokenLogProbs(nn.Module):
    """Module form of :func:`rankloss.linear_token_logprobs`.

    ``forward(hidden [..., D], weight [V, D], labels [...], bias=None) -> [...]``.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        temperature: float = 1.0,
        softcap: float | None = None,
        impl: str | None = None,
        chunk_size: int | None = None,
        deterministic: bool = False,
        filter_eps: float | str | None = "auto",
        cache_bytes: int | None = None,
    ):
        super().__init__()
        self.ignore_index, self.temperature = ignore_index, temperature
        self.softcap, self.impl = softcap, impl
        self.chunk_size, self.deterministic, self.filter_eps = chunk_size, deterministic, filter_eps
        self.cache_bytes = cache_bytes

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None) -> Tensor:
        return _lp.linear_token_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            softcap=self.softcap,
            impl=self.impl,
            chunk_size=self.chunk_size,
            deterministic=self.deterministic,
            filter_eps=self.filter_eps,
            cache_bytes=self.cache_bytes,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, temperature={self.temperature}, softcap={self.softcap}, "
            f"impl={self.impl!r}, chunk_size={self.chunk_size}, deterministic={self.deterministic}, "
            f"filter_eps={self.filter_eps!r}, cache_bytes={self.cache_bytes}"
        )


class _ScoreChainLoss(nn.Module):
    _loss: str

    def __init__(self, **options: object):
        super().__init__()
        self.options = options

    def forward(
        self,
        scores: Tensor,
        chain_sizes: Sequence[int] | Tensor,
        ref_scores: Tensor | None = None,
        num_tokens: Tensor | None = None,
    ) -> ChainLossOutput:
        return _losses.chain_loss(
            scores, chain_sizes, ref_scores, loss=self._loss, num_tokens=num_tokens, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class PlackettLuceLoss(_ScoreChainLoss):
    """Module form of :func:`rankloss.plackett_luce_loss`: ``forward(scores, chain_sizes, ref_scores=None)``.

    ``forward`` also takes ``num_tokens [S]`` (needed when ``sft_weight != 0``).
    """

    _loss = "plackett_luce"

    def __init__(
        self,
        beta: float = 0.1,
        top_k: int | None = None,
        sft_weight: float = 0.0,
        reduction: str = "mean",
        impl: str | None = None,
    ):
        super().__init__(beta=beta, top_k=top_k, sft_weight=sft_weight, reduction=reduction, impl=impl)


class DPOChainLoss(_ScoreChainLoss):
    """Module form of :func:`rankloss.dpo_chain_loss`: ``forward(scores, chain_sizes, ref_scores=None)``."""

    _loss = "dpo"

    def __init__(
        self,
        beta: float = 0.1,
        pairs: str = "adjacent",
        loss_type: str = "sigmoid",
        sft_weight: float = 0.0,
        reduction: str = "mean",
        impl: str | None = None,
    ):
        super().__init__(
            beta=beta,
            pairs=pairs,
            dpo_loss_type=loss_type,
            sft_weight=sft_weight,
            reduction=reduction,
            impl=impl,
        )


class LiPOLoss(_ScoreChainLoss):
    """Module form of :func:`rankloss.lipo_loss`: ``forward(scores, chain_sizes, ref_scores=None)``."""

    _loss = "lipo"

    def __init__(
        self, beta: float = 0.1, sft_weight: float = 0.0, reduction: str = "mean", impl: str | None = None
    ):
        super().__init__(beta=beta, sft_weight=sft_weight, reduction=reduction, impl=impl)
