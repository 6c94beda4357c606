"""Helpers shared by the chain-forward tests: gradient checkpointing switched on for one block, hooks that
count what runs through a module, and the attention paths to run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import flash_emulator
import pytest
import torch
from torch import nn

#: (attention path, gradient checkpointing: None off, or use_reentrant) the equality tests run.
TREE_MODES = {
    "sdpa": ("sdpa", None),
    "sdpa+ckpt": ("sdpa", False),
    "sdpa+ckpt-reentrant": ("sdpa", True),
    "flash-emulated+ckpt": ("flash", False),
}


@contextlib.contextmanager
def checkpointing(model: nn.Module, reentrant: bool | None) -> Iterator[None]:
    """Gradient checkpointing on (``reentrant`` True / False) or left off (``None``) while the block runs,
    the model in training mode; both restored after it. Checks that the decoder layers really are
    checkpointed."""
    if reentrant is None:
        yield
        return
    was_training = model.training
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers, "gradient checkpointing switched on no layer"
    try:
        yield
    finally:
        model.activation_checkpointing_disable()
        model.train(was_training)


@contextlib.contextmanager
def attention_path(path: str) -> Iterator[None]:
    """``path == "flash"``: the chain tree's flash path runs on the CPU emulator of
    ``flash_attn_varlen_func`` (tests/flash_emulator.py), which must really be called."""
    if path != "flash":
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        import rankloss.integrations.attention as attention

        mp.setattr(attention, "flash_varlen_func", lambda: flash_emulator.flash_attn_varlen_func)
        flash_emulator.CALLS.clear()
        yield
        assert flash_emulator.CALLS, "the flash path never called flash_attn_varlen_func"


class RowCounter:
    """Counts the token positions (dim -2 of the first tensor argument, times its batch) that enter a
    module's forward, and its calls."""

    def __init__(self, module: nn.Module, rows_dim: int = -2) -> None:
        self.positions = 0
        self.calls = 0
        self.rows_dim = rows_dim
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        self.calls += 1
        if x.dim() >= 2 and self.rows_dim == -2:
            self.positions += int(x.shape[:-1].numel())
        else:
            self.positions += int(x.shape[0])

    def remove(self) -> None:
        self.handle.remove()
