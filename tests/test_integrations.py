"""The model-agnostic chain forward (rankloss.integrations): for every supported family, a tiny random
model built from its config gives the same loss and the same gradient of every parameter as K
independent full-sequence forwards through the model's own ``forward`` (full logits, log_softmax), in
float64; the shared-prefix path, the full-sequence path and the fallbacks all agree."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rankloss.reference.losses import chain_loss as ref_chain_loss  # noqa: E402

from rankloss.integrations import ChainForward, ChainRankModel, get_family, supported_model_types  # noqa: E402
from rankloss.integrations.forward import _WARNED, LossSpec  # noqa: E402

V = 101
PAD = 0

# ------------------------------------------------------------------------------------------------------
# Tiny configs, one per text-only model type


def _common(**extra):
    base = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    base.update(extra)
    return base


TEXT_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_common()),
    "mistral": lambda: transformers.MistralConfig(**_common(sliding_window=None)),
    "qwen2": lambda: transformers.Qwen2Config(**_common()),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **_common(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24
        )
    ),
    "qwen3": lambda: transformers.Qwen3Config(**_common(head_dim=8)),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_common(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    ),
    "mixtral": lambda: transformers.MixtralConfig(**_common(num_local_experts=4, num_experts_per_tok=2)),
    "phi3": lambda: transformers.Phi3Config(**_common()),
    "gemma": lambda: transformers.GemmaConfig(**_common(head_dim=8, tie_word_embeddings=True)),
    "gemma2": lambda: transformers.Gemma2Config(
        **_common(head_dim=8, final_logit_softcapping=3.0, attn_logit_softcapping=None, sliding_window=64)
    ),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **_common(head_dim=8, final_logit_softcapping=3.0, sliding_window=64, sliding_window_pattern=2)
    ),
    "smollm3": lambda: transformers.SmolLM3Config(**_common()),
    "olmo2": lambda: transformers.Olmo2Config(**_common()),
}


#: Families without SDPA. Eager attention in float64 turns a fully padded query row into NaN (its softmax
#: runs in float32, where the float64 mask value is -inf), so their batches have prompts of equal length.
EAGER_ONLY = {"gemma2": "eager"}


def tiny_text_model(model_type: str, seed: int = 0, **overrides):
    config = TEXT_CONFIGS[model_type]()
    for k, v in overrides.items():
        setattr(config, k, v)
    config._attn_implementation = EAGER_ONLY.get(model_type, "sdpa")
    config._experts_implementation = "eager"  # grouped_mm has no float64
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).double()
    # random (not zero / one) norms and biases, so every parameter matters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------------------------------
# Chain batches built by hand (independent of the collator)


def text_batch(prompts, chains, ref=True, seed=0):
    """``prompts``: list of token-id lists; ``chains``: per prompt a list of completion token-id lists."""
    g = torch.Generator().manual_seed(seed)
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), PAD)
    mask = torch.zeros((B, P), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.tensor(p)
        mask[b, P - len(p) :] = 1
    comps = [c for ch in chains for c in ch]
    S, L = len(comps), max(len(c) for c in comps)
    cids = torch.full((S, L), PAD)
    labels = torch.full((S, L), -100)
    for s, c in enumerate(comps):
        cids[s, : len(c)] = torch.tensor(c)
        labels[s, : len(c)] = torch.tensor(c)
    batch = {
        "prompt_input_ids": ids,
        "prompt_attention_mask": mask,
        "completion_input_ids": cids,
        "completion_labels": labels,
        "chain_sizes": torch.tensor([len(ch) for ch in chains]),
    }
    if ref:
        batch["ref_scores"] = -20 * torch.rand(S, generator=g, dtype=torch.float64)
    return batch


def random_chains(lengths_p, ks, seed=0, lo=3, hi=V):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(lo, hi, (n,), generator=g).tolist() for n in lengths_p]
    chains = []
    for k in ks:
        chains.append(
            [
                torch.randint(lo, hi, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
                + [2]
                for _ in range(k)
            ]
        )
    return prompts, chains


def naive_scores(model, prompts, chains, media=None):
    """K independent full-sequence forwards through the model's own forward: logits, log_softmax, gather."""
    scores = []
    for b, (p, ch) in enumerate(zip(prompts, chains)):
        for c in ch:
            ids = torch.tensor([p + c])
            kwargs = media(b) if media is not None else {}
            logits = model(input_ids=ids, **kwargs).logits[0].double()
            logp = torch.log_softmax(logits[len(p) - 1 : -1], -1)
            scores.append(logp.gather(-1, torch.tensor(c)[:, None]).sum())
    return torch.stack(scores)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_equal(model, batch, prompts, chains, spec, media=None, share_prefix=None, atol=1e-9):
    """Loss and every parameter's gradient of the chain forward == those of independent forwards.

    Tolerance: transformers' RMSNorms (and eager softmax) compute in float32 even in a float64 model, so
    the gradient of a prompt token, summed over its K completions before such a float32 cast instead of
    K times after it, differs at float32 rounding: ``1e-6`` relative to the tensor's largest gradient
    (a gradient lost through the cache shows at order one). Losses agree to 1e-7 relative (eager float32
    softmax)."""
    model.zero_grad(set_to_none=True)
    out = ChainForward(model, share_prefix=share_prefix).loss(batch, spec)
    out.loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    s = naive_scores(model, prompts, chains, media)
    n = torch.tensor([len(c) for ch in chains for c in ch])
    ref = batch.get("ref_scores")
    want, _, _ = ref_chain_loss(
        s,
        batch["chain_sizes"].tolist(),
        ref,
        loss=spec.loss,
        beta=spec.beta,
        sft_weight=spec.sft_weight,
        num_tokens=n,
        **({"pairs": spec.pairs} if spec.pairs else {}),
    )
    want.backward()
    expected = grads(model)
    torch.testing.assert_close(out.loss.detach(), want.detach(), atol=atol, rtol=1e-7)
    assert set(got) == set(expected), set(got) ^ set(expected)
    for name, want_g in expected.items():
        scale = float(want_g.abs().max()) + 1e-30
        err = float((got[name] - want_g).abs().max())
        assert err <= 1e-6 * scale, f"{name}: max |diff| {err:.3g} > 1e-6 * {scale:.3g}"
    return out


SPEC = LossSpec(loss="plackett_luce", beta=0.5, sft_weight=0.3)


@pytest.mark.parametrize("model_type", sorted(TEXT_CONFIGS))
def test_text_family_equals_independent_forwards(model_type):
    assert model_type in supported_model_types()
    model = tiny_text_model(model_type)
    lengths = [6, 6, 6] if model_type in EAGER_ONLY else [5, 9, 3]
    prompts, chains = random_chains(lengths, [3, 2, 4], seed=1)
    batch = text_batch(prompts, chains)
    assert ChainForward(model).will_share(batch)
    check_equal(model, batch, prompts, chains, SPEC)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_shared_and_full_sequence_paths_agree(share_prefix):
    model = tiny_text_model("qwen2", seed=3)
    prompts, chains = random_chains([7, 7], [2, 3], seed=4)  # no prompt padding
    batch = text_batch(prompts, chains)
    check_equal(
        model, batch, prompts, chains, LossSpec(loss="dpo", pairs="all", beta=0.2), share_prefix=share_prefix
    )


def test_sliding_window_shares_while_the_prompt_fits_and_falls_back_once_otherwise():
    model = tiny_text_model("gemma2", sliding_window=12)
    # prompts of at most 11 tokens: the cache keeps them whole; completions run past the window
    prompts, chains = random_chains([11, 11], [2, 3], seed=5)
    chains[0][0] = chains[0][0] + [7] * 8
    batch = text_batch(prompts, chains)
    assert ChainForward(model).will_share(batch)
    check_equal(model, batch, prompts, chains, SPEC)
    # a 12-token prompt does not fit: full sequences, one warning
    prompts, chains = random_chains([12, 12], [2, 2], seed=6)
    batch = text_batch(prompts, chains)
    _WARNED.clear()
    with pytest.warns(UserWarning, match="sliding-window"):
        assert not ChainForward(model).will_share(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_equal(model, batch, prompts, chains, SPEC)
    with pytest.raises(ValueError, match="share_prefix=True"):
        ChainForward(model, share_prefix=True).hidden_states(batch)


def test_gradient_checkpointing_falls_back_to_full_sequences():
    model = tiny_text_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    prompts, chains = random_chains([4, 8], [2, 2], seed=7)
    batch = text_batch(prompts, chains)
    _WARNED.clear()
    with pytest.warns(UserWarning, match="gradient checkpointing"):
        check_equal(model, batch, prompts, chains, SPEC)


def test_unknown_text_model_runs_full_sequences_and_unknown_vlm_is_refused():
    model = tiny_text_model("llama")
    model.config.model_type = "my_llama"
    assert get_family("my_llama") is None
    prompts, chains = random_chains([4, 6], [2, 3], seed=8)
    batch = text_batch(prompts, chains)
    _WARNED.clear()
    with pytest.warns(UserWarning, match="no tested prefix sharing for model_type 'my_llama'"):
        check_equal(model, batch, prompts, chains, SPEC)
    with pytest.raises(ValueError, match="model_type 'my_llama' has no tested"):
        ChainForward(model, share_prefix=True)
    model.config.vision_config = {"hidden_size": 8}
    with pytest.raises(ValueError, match="model_type 'my_llama' is a multimodal model"):
        ChainForward(model)


def test_bad_batches_name_the_key():
    model = tiny_text_model("llama")
    prompts, chains = random_chains([4, 6], [2, 3], seed=9)
    batch = text_batch(prompts, chains)
    cf = ChainForward(model)
    with pytest.raises(ValueError, match=r"chain_sizes.*sums to 4"):
        cf.hidden_states({**batch, "chain_sizes": torch.tensor([2, 2])})
    with pytest.raises(ValueError, match=r"batch\['completion_labels'\]"):
        cf.hidden_states({k: v for k, v in batch.items() if k != "completion_labels"})
    right = {**batch, "prompt_attention_mask": batch["prompt_attention_mask"].flip(1)}
    with pytest.raises(ValueError, match="left-padded"):
        cf.hidden_states(right)
    with pytest.raises(ValueError, match="text-only"):
        cf.hidden_states({**batch, "pixel_values": torch.zeros(2, 3)})


def test_chain_rank_model_modes():
    model = tiny_text_model("qwen3")
    prompts, chains = random_chains([4, 6], [2, 3], seed=10)
    batch = text_batch(prompts, chains)
    wrapper = ChainRankModel(model, LossSpec(beta=0.5))
    out = wrapper(batch)
    s = naive_scores(model, prompts, chains)
    sc = wrapper(batch, mode="score")
    torch.testing.assert_close(sc["scores"].double(), s.detach(), atol=1e-5, rtol=1e-5)
    assert sc["num_tokens"].tolist() == [len(c) for ch in chains for c in ch]
    sft = wrapper(batch, mode="sft")
    n = torch.tensor([len(chains[0][0]), len(chains[1][0])])
    want = -(s.detach()[[0, 2]] / n).mean()
    torch.testing.assert_close(sft["loss"].detach(), want, atol=1e-9, rtol=1e-9)
    assert out["chain"].pairwise_accuracy.shape == (2,)
