"""Text-only causal LMs: one decoder (``model.model``), 1-D RoPE, the LM head (Gemma 2/3's final-logit
soft-cap included). Sliding-window layers (Gemma 2/3, Mistral) apply their window inside the chain tree's
attention, in position space, whatever the prompt's length. Each model type here has an equality test
(tests/test_integrations.py)."""

from __future__ import annotations

from . import Family, register_family


class CausalLMFamily(Family):
    model_types = (
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "smollm3",
        "olmo2",
    )


FAMILY = register_family(CausalLMFamily())
