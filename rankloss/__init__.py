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
from .fused_losses import ChainLoss, chain_loss_from_logits, fused_linear_chain_loss, sequence_scores
from .logprobs import linear_token_logprobs, sequence_logprobs, shift_labels, token_logprobs
from .losses import CHAIN_LOSSES, chain_loss, dpo_chain_loss, lipo_loss, plackett_luce_loss
from .modules import DPOChainLoss, LinearTokenLogProbs, LiPOLoss, PlackettLuceLoss, TokenLogProbs
from .outputs import ChainLossOutput

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
