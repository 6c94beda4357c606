"""The model-agnostic chain forward (rankloss.integrations): for every supported family, a tiny random
model built from its config gives the same loss and the same gradient of every parameter as K
independent full-sequence forwards through the model's own ``forward`` (full logits, log_softmax), in
float64; the chain tree (with and without gradient checkpointing, reentrant or not, through SDPA and
through the flash path on an emulator of flash-attn's varlen kernel), the full-sequence path and the
fallbacks all agree."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from chain_testing import TREE_MODES, RowCounter, attention_path, checkpointing  # noqa: E402
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


def check_equal(model, batch, prompts, chains, spec, media=None, share_prefix=None, atol=1e-9, mode="sdpa"):
    """Loss and every parameter's gradient of the chain forward (``mode``: a key of ``TREE_MODES``, the
    attention path and gradient checkpointing) == those of independent forwards.

    Tolerance: transformers' RMSNorms (and eager softmax) compute in float32 even in a float64 model, so
    the gradient of a prompt token, summed over its K completions before such a float32 cast instead of
    K times after it, differs at float32 rounding: ``1e-6`` relative to the tensor's largest gradient
    (a gradient lost across the tree shows at order one). Losses agree to 1e-7 relative (eager float32
    softmax)."""
    path, reentrant = TREE_MODES[mode]
    model.zero_grad(set_to_none=True)
    with checkpointing(model, reentrant), attention_path(path):
        out = ChainForward(model, share_prefix=share_prefix, attention=path).loss(batch, spec)
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


@pytest.mark.parametrize("mode", sorted(TREE_MODES))
@pytest.mark.parametrize("model_type", sorted(TEXT_CONFIGS))
def test_text_family_equals_independent_forwards(model_type, mode):
    assert model_type in supported_model_types()
    model = tiny_text_model(model_type)
    lengths = [6, 6, 6] if model_type in EAGER_ONLY else [5, 9, 3]
    prompts, chains = random_chains(lengths, [3, 2, 4], seed=1)
    batch = text_batch(prompts, chains)
    assert ChainForward(model).uses_tree()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback, under checkpointing neither
        check_equal(model, batch, prompts, chains, SPEC, mode=mode)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_shared_and_full_sequence_paths_agree(share_prefix):
    model = tiny_text_model("qwen2", seed=3)
    prompts, chains = random_chains([7, 7], [2, 3], seed=4)  # no prompt padding
    batch = text_batch(prompts, chains)
    check_equal(
        model, batch, prompts, chains, LossSpec(loss="dpo", pairs="all", beta=0.2), share_prefix=share_prefix
    )


WINDOWED = {
    "gemma2": dict(sliding_window=6),
    "gemma2-softcap": dict(sliding_window=6, attn_logit_softcapping=4.0),
    "gemma3_text": dict(sliding_window=5),
    "mistral": dict(sliding_window=7),
}


@pytest.mark.parametrize("mode", ["sdpa", "sdpa+ckpt", "flash-emulated+ckpt"])
@pytest.mark.parametrize("case", sorted(WINDOWED))
def test_sliding_windows_shorter_than_the_prompt_share_it(case, mode):
    """Prompts of 11-12 tokens and completions of up to 14 against windows of 5-7: the window applies in
    position space inside the tree attention (Gemma 2's attention soft-cap too), and the prompt is still
    shared."""
    model_type = case.split("-")[0]
    model = tiny_text_model(model_type, **WINDOWED[case])
    assert model.config.sliding_window < 11
    lengths = [12, 12] if model_type in EAGER_ONLY else [11, 12]
    prompts, chains = random_chains(lengths, [2, 3], seed=5)
    chains[0][0] = chains[0][0] + [7] * 8
    batch = text_batch(prompts, chains)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert ChainForward(model).uses_tree()
        check_equal(model, batch, prompts, chains, SPEC, mode=mode)


def test_gradient_checkpointing_runs_each_prompt_once():
    """Hooks count the token positions entering the first decoder layer's attention: with checkpointing
    on, one prompt per chain (the tree), in one forward (and its recompute); full sequences repeat the
    prompt per completion."""
    model = tiny_text_model("llama")
    prompts, chains = random_chains([9, 12], [3, 4], seed=7)
    batch = text_batch(prompts, chains)
    tree_tokens = sum(map(len, prompts)) + sum(len(c) for ch in chains for c in ch)
    S, L = batch["completion_input_ids"].shape
    full_tokens = S * (batch["prompt_input_ids"].shape[1] + L)  # padded [prompt, completion] rows
    layer = model.model.layers[0].self_attn
    for share_prefix, want in ((None, tree_tokens), (False, full_tokens)):
        counter = RowCounter(layer)
        try:
            with checkpointing(model, reentrant=False):
                ChainForward(model, share_prefix=share_prefix).loss(batch, SPEC).loss.backward()
        finally:
            counter.remove()
        # the forward and the checkpoint's recompute in the backward
        assert (counter.calls, counter.positions) == (2, 2 * want), (share_prefix, counter.positions, want)


def test_unknown_text_model_runs_full_sequences_and_unknown_vlm_is_refused():
    model = tiny_text_model("llama")
    model.config.model_type = "my_llama"
    assert get_family("my_llama") is None
    prompts, chains = random_chains([4, 6], [2, 3], seed=8)
    batch = text_batch(prompts, chains)
    _WARNED.clear()
    with pytest.warns(UserWarning, match="no tested chain tree for model_type 'my_llama'"):
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


# ------------------------------------------------------------------------------------------------------
# The tree attention: paths, delegation, fallbacks, guards


@pytest.mark.parametrize("case", ["llama", "gemma2-window-softcap", "qwen3_moe"])
def test_flex_and_eager_forwards_match_sdpa(case):
    """flex_attention (BlockMask of the tree rule; forward only on CPU: torch 2.14 has no flex backward
    there) and the eager path give the SDPA path's scores; each path really runs."""
    import rankloss.integrations.attention as attention

    model_type = case.split("-")[0]
    extra = dict(sliding_window=5, attn_logit_softcapping=4.0) if "window" in case else {}
    model = tiny_text_model(model_type, **extra)
    lengths = [9, 9, 9] if model_type in EAGER_ONLY else [5, 9, 3]
    prompts, chains = random_chains(lengths, [3, 2, 4], seed=11)
    batch = text_batch(prompts, chains)
    ran = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ("_flex", "_grouped"):
            real = getattr(attention, name)
            mp.setattr(
                attention, name, lambda *a, _real=real, _name=name, **k: ran.append(_name) or _real(*a, **k)
            )
        with torch.no_grad():
            want = ChainForward(model, attention="sdpa").scores(batch)[0]
            for path in ("flex", "eager"):
                ran.clear()
                got = ChainForward(model, attention=path).scores(batch)[0]
                assert ran == [{"flex": "_flex", "eager": "_grouped"}[path]] * 2, ran
                torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(want.double(), naive_scores(model, prompts, chains), atol=1e-6, rtol=1e-7)


def test_the_model_stays_itself_outside_the_chain_forward():
    """Installing the tree attention changes nothing else: the model's own forward on a left-padded
    batch, its generate() and ChainForward.generate give what they gave before, and a saved config does
    not name rankloss's implementation."""
    model = tiny_text_model("qwen2", seed=4)
    prompts, chains = random_chains([3, 7], [2, 2], seed=12)
    batch = text_batch(prompts, chains)
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    model.eval()

    def outputs():
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
            ours = ChainRankModel(model)(batch, mode="generate", max_new_tokens=4)["tokens"]
        return logits, gen, ours

    before = outputs()
    assert model.config._attn_implementation == "sdpa"
    assert ChainForward(model).uses_tree()
    assert model.config._attn_implementation == "rankloss_tree_sdpa"
    after = outputs()
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert "rankloss" not in model.config.to_json_string()
    model.train()


def test_a_model_whose_attention_bypasses_the_interface_falls_back(monkeypatch):
    model = tiny_text_model("llama", seed=5)
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    prompts, chains = random_chains([4, 6], [2, 3], seed=13)
    batch = text_batch(prompts, chains)
    _WARNED.clear()
    with pytest.warns(UserWarning, match="does not go through transformers' AttentionInterface"):
        assert not ChainForward(model).uses_tree()
    check_equal(model, batch, prompts, chains, SPEC)
    with pytest.raises(ValueError, match="share_prefix=True: model_type 'llama'"):
        ChainForward(model, share_prefix=True).uses_tree()


def test_a_layer_outside_the_tree_attention_is_an_error_not_a_wrong_loss():
    """A layer that does not look its attention up by the text config's name (here layer 0 is given a
    config of its own that says 'sdpa') would attend across completions: the forward counts the tree
    attention's calls and refuses."""
    import copy

    model = tiny_text_model("llama", seed=6)
    prompts, chains = random_chains([4, 6], [2, 3], seed=14)
    batch = text_batch(prompts, chains)
    cf = ChainForward(model)
    assert cf.uses_tree()
    attn = model.model.layers[0].self_attn
    attn.config = copy.copy(attn.config)
    attn.config._attn_implementation = "sdpa"
    with pytest.raises(RuntimeError, match="ran in 1 of 2 layers"):
        cf.loss(batch, SPEC)


def test_a_chain_tree_from_another_batch_is_refused():
    from rankloss.integrations.layout import build_chain_tree

    model = tiny_text_model("llama", seed=7)
    prompts, chains = random_chains([4, 6], [2, 3], seed=15)
    batch = text_batch(prompts, chains)
    other = text_batch(*random_chains([5, 6], [2, 2], seed=16))
    with pytest.raises(ValueError, match=r"batch\['chain_tree'\] was not built from this batch"):
        ChainForward(model).loss({**batch, "chain_tree": build_chain_tree(other)}, SPEC)
    # the batch's own tree (what the collator attaches) gives what building it here gives
    a = ChainForward(model).loss({**batch, "chain_tree": build_chain_tree(batch)}, SPEC).loss
    b = ChainForward(model).loss(batch, SPEC).loss
    torch.testing.assert_close(a, b, atol=0, rtol=0)
