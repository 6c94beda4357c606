"""rankloss: listwise ranking losses over caption chains, with fused log-prob kernels.

Functional API (mirrors ``torch.nn.functional``): :func:`token_logprobs`, :func:`linear_token_logprobs`,
:func:`sequence_logprobs`, :func:`shift_labels`, :func:`plackett_luce_loss`, :func:`dpo_chain_loss`,
:func:`lipo_loss`, :func:`chain_loss`; end to end from hidden states: :func:`fused_linear_chain_loss`,
:func:`chain_loss_from_logits`, :func:`sequence_scores` (reference scores). Module wrappers:
:class:`ChainLoss`, :class:`PlackettLuceLoss`, :class:`DPOChainLoss`, :class:`LiPOLoss`,
:class:`TokenLogProbs`, :class:`LinearTokenLogProbs`. The maths is in DESIGN.md §2 and
in ``rankloss.reference``, the specification every fast path is tested against.
"""

import os as _os

# Installed, kernels/ and reference/ live inside the package as rankloss.kernels and rankloss.reference
# (a package-dir mapping). Imported straight from a source checkout (the repository root on sys.path,
# e.g. `python -m rankloss` or `python -c ...` run there) they are siblings of this folder instead:
# let the package find its submodules there too.
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "reference")):
    __path__.append(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))  # noqa: F821

from ._version import __version__  # noqa: E402

# The API is imported on first use (PEP 562), so that the tools that need no torch (``rankloss chains
# make`` with the rules engine, ``rankloss.chains``) start without importing it. ``from rankloss import
# chain_loss`` and ``rankloss.chain_loss`` work as before.
_API = {
    "ChainLoss": "fused_losses",
    "chain_loss_from_logits": "fused_losses",
    "fused_linear_chain_loss": "fused_losses",
    "sequence_scores": "fused_losses",
    "linear_token_logprobs": "logprobs",
    "sequence_logprobs": "logprobs",
    "shift_labels": "logprobs",
    "token_logprobs": "logprobs",
    "CHAIN_LOSSES": "losses",
    "chain_loss": "losses",
    "dpo_chain_loss": "losses",
    "lipo_loss": "losses",
    "plackett_luce_loss": "losses",
    "DPOChainLoss": "modules",
    "LinearTokenLogProbs": "modules",
    "LiPOLoss": "modules",
    "PlackettLuceLoss": "modules",
    "TokenLogProbs": "modules",
    "ChainLossOutput": "outputs",
}
# Submodules that ``import rankloss`` used to import (so ``rankloss.ops`` after ``import rankloss`` works).
_SUBMODULES = ("fused_losses", "logprobs", "losses", "modules", "outputs", "ops", "reference", "_validation")


def __getattr__(name: str) -> object:
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


__all__ = [
    "CHAIN_LOSSES",
    "ChainLoss",
    "ChainLossOutput",
    "DPOChainLoss",
    "LiPOLoss",
    "LinearTokenLogProbs",
    "PlackettLuceLoss",
    "TokenLogProbs",
    "__version__",
    "chain_loss",
    "chain_loss_from_logits",
    "fused_linear_chain_loss",
    "sequence_scores",
    "dpo_chain_loss",
    "linear_token_logprobs",
    "lipo_loss",
    "plackett_luce_loss",
    "sequence_logprobs",
    "shift_labels",
    "token_logprobs",
]
