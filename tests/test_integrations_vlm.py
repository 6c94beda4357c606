"""The chain forward of the vision-language families (rankloss.integrations.families.qwen_vl, .llava): for
Qwen2-VL, Qwen2.5-VL, Qwen3-VL (deepstack), LLaVA-OneVision and LLaVA-NeXT-Video, a tiny random model
built from its config and a processor built locally give, on a chain batch built by hand from the
processor's output (videos, images, prompts of different lengths, left padding, chains of different
sizes), the same loss and the same gradient of every parameter (the vision tower's included) as K
independent full-sequence forwards through the model's own ``forward`` with that prompt's media alone
(full logits, log_softmax), in float64; through the chain tree (each prompt and its media once, with and
without gradient checkpointing, through SDPA and through the flash path on an emulator of flash-attn's
varlen kernel) and with full sequences (media repeated per completion)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("torchvision")

from chain_testing import TREE_MODES, RowCounter, attention_path, checkpointing  # noqa: E402
from rankloss.reference.losses import chain_loss as ref_chain_loss  # noqa: E402

from rankloss.integrations import ChainForward, get_family  # noqa: E402
from rankloss.integrations.forward import LossSpec  # noqa: E402
from rankloss.train.model import train_tokenizer  # noqa: E402

WORDS = (
    "a the red blue green cat dog bird runs jumps sits over under left right of in on and then "
    "what happens video image describe shows seconds frame is two one"
).split()
SPEC = LossSpec(loss="plackett_luce", beta=0.5, sft_weight=0.3)


@functools.cache
def tokenizer():
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] + ["<0.5 seconds> 1.5 2.5 3.0"]
    tok = train_tokenizer(corpus, 300)
    tok.add_tokens(["<image>", "<video>"], special_tokens=True)
    return tok


def _ids(text):
    return tokenizer()(text, add_special_tokens=False)["input_ids"]


def _perturb(model, seed):
    """Random (not zero / one) norms and biases, so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _build(cls, config, seed=0):
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation="sdpa").double()
    return _perturb(model, seed)


def _frames(n, size, seed):
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------------
# Tiny models and processors


def _mrope_section(head_dim):
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _qwen_text(tok, **extra):
    return dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=extra.pop("num_hidden_layers", 2),
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(8)},
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        **extra,
    )


def _qwen_ids(tok):
    conv = tok.convert_tokens_to_ids
    return dict(
        image_token_id=conv("<|image_pad|>"),
        video_token_id=conv("<|video_pad|>"),
        vision_start_token_id=conv("<|vision_start|>"),
        vision_end_token_id=conv("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def qwen2_vl():
    tok = tokenizer()
    vision = dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14)
    config = transformers.Qwen2VLConfig(text_config=_qwen_text(tok), vision_config=vision, **_qwen_ids(tok))
    return (
        transformers.Qwen2VLForConditionalGeneration,
        config,
        _qwen_processor(transformers.Qwen2VLProcessor),
    )


def qwen2_5_vl():
    tok = tokenizer()
    vision = dict(
        depth=2,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        patch_size=14,
        window_size=56,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )
    config = transformers.Qwen2_5_VLConfig(
        text_config=_qwen_text(tok), vision_config=vision, **_qwen_ids(tok)
    )
    return (
        transformers.Qwen2_5_VLForConditionalGeneration,
        config,
        _qwen_processor(transformers.Qwen2_5_VLProcessor),
    )


def qwen3_vl():
    tok = tokenizer()
    # three layers: deepstack features enter after layers 0 and 1, so both reach the completions
    text = _qwen_text(tok, head_dim=8, num_hidden_layers=3)
    text["rope_parameters"]["mrope_interleaved"] = True
    vision = dict(
        depth=3,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        patch_size=16,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0, 1],
    )
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
    return (
        transformers.Qwen3VLForConditionalGeneration,
        config,
        _qwen_processor(transformers.Qwen3VLProcessor, patch=16),
    )


def _qwen_processor(cls, patch=14):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    if cls is transformers.Qwen3VLProcessor:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
            Qwen3VLVideoProcessor as VideoProcessor,
        )
    else:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
            Qwen2VLVideoProcessor as VideoProcessor,
        )
    unit = 2 * patch  # one merged token
    size = {"shortest_edge": unit * unit, "longest_edge": (2 * unit) ** 2}
    # Qwen3-VL's video processor bounds the pixels of all frames together
    vsize = {"shortest_edge": unit * unit, "longest_edge": 4 * size["longest_edge"]}
    if cls is transformers.Qwen3VLProcessor:
        size = vsize
    video = VideoProcessor(size=size, patch_size=patch, do_sample_frames=False, cap_pixels_per_frame=False)
    image = Qwen2VLImageProcessor(size=size, patch_size=patch)
    return cls(image_processor=image, tokenizer=tokenizer(), video_processor=video)


# ------------------------------------------------------------------------------------------------------
# Chain batches built by hand from one processor call (independent of the collator)


class Chains:
    """Prompts, their media and completion chains: ``videos[b]`` a list of ``(frames, fps)`` of prompt
    ``b`` (in placeholder order), ``images[b]`` a list of ``[H, W, 3]`` arrays."""

    def __init__(self, processor, texts, chains, videos=None, images=None, seed=0):
        self.processor, self.texts, self.chains = processor, texts, chains
        self.videos = videos or [[] for _ in texts]
        self.images = images or [[] for _ in texts]
        self.seed = seed

    def _media_kwargs(self, rows):
        out = {}
        vids = [v for b in rows for v in self.videos[b]]
        if vids:
            out["videos"] = [f for f, _ in vids]
            out["video_metadata"] = [
                {"total_num_frames": len(f), "fps": fps, "frames_indices": list(range(len(f)))}
                for f, fps in vids
            ]
        images = [i for b in rows for i in self.images[b]]
        if images:
            out["images"] = images
        return out

    def encode(self, rows):
        texts = [self.texts[b] for b in rows]
        return self.processor(
            text=texts, padding=True, padding_side="left", return_tensors="pt", **self._media_kwargs(rows)
        )

    def batch(self):
        enc = dict(self.encode(range(len(self.texts))))
        batch = {"prompt_input_ids": enc.pop("input_ids"), "prompt_attention_mask": enc.pop("attention_mask")}
        batch.update({k: v.double() if v.is_floating_point() else v for k, v in enc.items()})
        comps = [c for ch in self.chains for c in ch]
        S, L = len(comps), max(len(c) for c in comps)
        pad = self.processor.tokenizer.pad_token_id
        cids = torch.full((S, L), pad)
        labels = torch.full((S, L), -100)
        for s, c in enumerate(comps):
            cids[s, : len(c)] = torch.tensor(c)
            labels[s, : len(c)] = torch.tensor(c)
        g = torch.Generator().manual_seed(self.seed)
        batch.update(
            completion_input_ids=cids,
            completion_labels=labels,
            chain_sizes=torch.tensor([len(ch) for ch in self.chains]),
            ref_scores=-20 * torch.rand(S, generator=g, dtype=torch.float64),
        )
        return batch

    def naive_scores(self, model, batch):
        """K independent full-sequence forwards through the model's own forward, each with its prompt's
        media alone: logits, log_softmax, gather."""
        scores = []
        for b, chain in enumerate(self.chains):
            enc = dict(self.encode([b]))
            prompt = enc.pop("input_ids")
            enc.pop("attention_mask")
            # the batch row is this prompt, left-padded
            row = batch["prompt_input_ids"][b][batch["prompt_attention_mask"][b].bool()]
            assert row.tolist() == prompt[0].tolist()
            types = enc.pop("mm_token_type_ids", None)
            media = {k: v.double() if v.is_floating_point() else v for k, v in enc.items()}
            for c in chain:
                ids = torch.cat([prompt, torch.tensor([c])], 1)
                kw = dict(media)
                if types is not None:
                    kw["mm_token_type_ids"] = torch.cat(
                        [types, torch.zeros((1, len(c)), dtype=types.dtype)], 1
                    )
                logits = model(input_ids=ids, **kw).logits[0].double()
                logp = torch.log_softmax(logits[prompt.shape[1] - 1 : -1], -1)
                scores.append(logp.gather(-1, torch.tensor(c)[:, None]).sum())
        return torch.stack(scores)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_equal(model, chains, spec=SPEC, share_prefix=None, mode="sdpa"):
    """Loss and every parameter's gradient of the chain forward == those of independent forwards.

    Tolerance (as in tests/test_integrations.py): transformers' RMSNorms compute in float32 even in a
    float64 model, so a prompt token's gradient, summed over its K completions before such a cast instead
    of K times after it, differs at float32 rounding: 1e-6 relative to the tensor's largest gradient (a
    gradient lost across the tree, a wrong position or a wrong video shows at order one); ``mode``: the
    chain tree's attention path and gradient checkpointing (a key of ``TREE_MODES``)."""
    batch = chains.batch()
    path, reentrant = TREE_MODES[mode]
    model.zero_grad(set_to_none=True)
    with checkpointing(model, reentrant), attention_path(path):
        out = ChainForward(model, share_prefix=share_prefix, attention=path).loss(batch, spec)
        out.loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    s = chains.naive_scores(model, batch)
    n = torch.tensor([len(c) for ch in chains.chains for c in ch])
    want, _, _ = ref_chain_loss(
        s,
        batch["chain_sizes"].tolist(),
        batch["ref_scores"],
        loss=spec.loss,
        beta=spec.beta,
        sft_weight=spec.sft_weight,
        num_tokens=n,
    )
    want.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(out.loss.detach(), want.detach(), atol=1e-9, rtol=1e-7)
    assert set(got) == set(expected), set(got) ^ set(expected)
    for name, want_g in expected.items():
        scale = float(want_g.abs().max()) + 1e-30
        err = float((got[name] - want_g).abs().max())
        # a key projection's bias has gradient zero (softmax ignores it): rounding noise only
        tol = 1e-6 * scale + 1e-15
        assert err <= tol, f"{name}: max |diff| {err:.3g} > 1e-6 * {scale:.3g}"
    return got


def assert_vision_gradients(got, module, prefix, unused=()):
    """Every parameter of the vision tower has a gradient (key biases: mathematically zero; ``unused``:
    parts the model's own forward never runs, e.g. the layers after ``vision_feature_layer``)."""
    names = [f"{prefix}.{n}" for n, _ in module.named_parameters()]
    assert names
    for n in names:
        if n.endswith("k_proj.bias") or any(u in n for u in unused):
            continue
        assert n in got and float(got[n].abs().max()) > 1e-12, n


def _completions(seed, ks):
    g = torch.Generator().manual_seed(seed)
    eos = tokenizer().eos_token_id
    out = []
    for k in ks:
        chain = []
        for _ in range(k):
            n = int(torch.randint(1, 6, (1,), generator=g))
            words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)]
            chain.append(_ids(" ".join(words)) + [eos])
        out.append(chain)
    return out


QWEN = {"qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl}
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def qwen_chains(processor, unit):
    """A prompt with two videos, one with an image and a slow video (fps 0.5: Qwen2.5-VL's temporal
    positions run past the height / width ones), and a text-only prompt."""
    texts = [
        f"{VIDEO} and {VIDEO} describe the video",
        f"what happens in {IMAGE} {VIDEO} then",
        "describe a red cat",
    ]
    videos = [
        [(_frames(4, 2 * unit, 0), 2.0), (_frames(2, unit, 1), 1.0)],
        [(_frames(4, unit, 2), 0.5)],
        [],
    ]
    images = [[], [_frames(1, unit, 3)[0]], []]
    return Chains(processor, texts, _completions(1, [3, 2, 2]), videos, images, seed=2)


@functools.cache
def qwen_model(model_type):
    cls, config, processor = QWEN[model_type]()
    return _build(cls, config), processor


#: (share_prefix, mode): full sequences, and the chain tree in each mode.
PATHS = [(False, "sdpa")] + [(None, mode) for mode in sorted(TREE_MODES)]


@pytest.mark.parametrize(("share_prefix", "mode"), PATHS)
@pytest.mark.parametrize("model_type", sorted(QWEN))
def test_qwen_vl_equals_independent_forwards(model_type, share_prefix, mode):
    model, processor = qwen_model(model_type)
    assert model.config.model_type == model_type and get_family(model) is not None
    unit = 2 * model.config.vision_config.patch_size
    chains = qwen_chains(processor, unit)
    batch = chains.batch()
    assert bool((batch["prompt_attention_mask"] == 0).any())  # left padding
    if share_prefix is None:
        assert ChainForward(model).uses_tree()
    got = check_equal(model, chains, share_prefix=share_prefix, mode=mode)
    assert_vision_gradients(got, model.model.visual, "model.visual")


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_checkpointed_tree_runs_each_prompt_and_video_once(model_type):
    """Hooks count the token positions entering the first decoder layer's attention and the patch rows
    entering the vision tower, checkpointing on: the tree runs each prompt and each video once per
    chain, in one forward (plus the attention's recompute); full sequences once per completion."""
    model, processor = qwen_model(model_type)
    unit = 2 * model.config.vision_config.patch_size
    chains = qwen_chains(processor, unit)
    batch = chains.batch()
    mask = batch["prompt_attention_mask"]
    S, L = batch["completion_input_ids"].shape
    tree_tokens = int(mask.sum()) + int((batch["completion_labels"] != -100).sum())
    patches = int(batch["pixel_values_videos"].shape[0]) + int(batch["pixel_values"].shape[0])
    sizes = batch["chain_sizes"]
    # full sequences: every completion with its own prompt's videos and images
    full_patches = sum(n * k for n, k in zip(_patches_per_prompt(batch, model), sizes.tolist()))
    attn = model.model.language_model.layers[0].self_attn
    full_tokens = S * (mask.shape[1] + L)
    for share_prefix, tokens, rows in ((None, tree_tokens, patches), (False, full_tokens, full_patches)):
        text, vision = RowCounter(attn), RowCounter(model.model.visual, rows_dim=0)
        try:
            with checkpointing(model, reentrant=False):
                ChainForward(model, share_prefix=share_prefix).loss(batch, SPEC).loss.backward()
        finally:
            text.remove()
            vision.remove()
        assert (text.calls, text.positions) == (2, 2 * tokens), (share_prefix, text.positions, tokens)
        # one call per media kind (images, videos); checkpointed blocks recompute inside the tower
        assert vision.positions == rows, (share_prefix, vision.positions, rows)
    assert tree_tokens < S * mask.shape[1] and patches < full_patches


def _patches_per_prompt(batch, model):
    """Vision patch rows of each prompt's videos and images (their grids' products, assigned in order)."""
    cfg = model.config
    out = []
    grids = {
        "video": list(batch["video_grid_thw"].prod(-1).tolist()),
        "image": list(batch["image_grid_thw"].prod(-1).tolist()),
    }
    merge2 = cfg.vision_config.spatial_merge_size**2
    for row in batch["prompt_input_ids"]:
        n = 0
        for kind, token in (("video", cfg.video_token_id), ("image", cfg.image_token_id)):
            need = int((row == token).sum())
            while need:
                g = grids[kind].pop(0)
                need -= g // merge2
                n += g
        out.append(n)
    return out


# ------------------------------------------------------------------------------------------------------
# LLaVA-OneVision, LLaVA-NeXT-Video: SigLIP / CLIP towers on 56 x 56 frames (4 x 4 patches of 14)

FRAME = 56


def _llava_text(tok):
    return dict(
        model_type="qwen2",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )


def _vision_tower(model_type):
    return dict(
        model_type=model_type,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=FRAME,
        patch_size=14,
    )


def llava_onevision():
    from transformers.models.llava_onevision.image_processing_llava_onevision import (
        LlavaOnevisionImageProcessor,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    tok = tokenizer()
    size = {"height": FRAME, "width": FRAME}
    pinpoints = [[FRAME, FRAME], [FRAME, 2 * FRAME], [2 * FRAME, FRAME]]
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(size=size, do_sample_frames=False),
        num_image_tokens=(FRAME // 14) ** 2,
        vision_feature_select_strategy="full",
    )
    config = transformers.LlavaOnevisionConfig(
        text_config=_llava_text(tok),
        vision_config=_vision_tower("siglip_vision_model"),
        image_token_index=tok.convert_tokens_to_ids(processor.image_token),
        video_token_index=tok.convert_tokens_to_ids(processor.video_token),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=False,
    )
    return transformers.LlavaOnevisionForConditionalGeneration, config, processor


def llava_next_video():
    from transformers.models.llava_next.image_processing_llava_next import LlavaNextImageProcessor
    from transformers.models.llava_next_video.video_processing_llava_next_video import (
        LlavaNextVideoVideoProcessor,
    )

    tok = tokenizer()
    size = {"height": FRAME, "width": FRAME}
    pinpoints = [[FRAME, FRAME], [FRAME, 2 * FRAME], [2 * FRAME, FRAME]]
    processor = transformers.LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(
            size=size, crop_size=size, do_center_crop=False, do_sample_frames=False
        ),
        image_processor=LlavaNextImageProcessor(size=size, crop_size=size, image_grid_pinpoints=pinpoints),
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = transformers.LlavaNextVideoConfig(
        text_config=_llava_text(tok),
        vision_config=_vision_tower("clip_vision_model"),
        image_token_index=tok.convert_tokens_to_ids(processor.image_token),
        video_token_index=tok.convert_tokens_to_ids(processor.video_token),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        spatial_pool_stride=2,
        tie_word_embeddings=False,
    )
    return transformers.LlavaNextVideoForConditionalGeneration, config, processor


LLAVA = {"llava_onevision": llava_onevision, "llava_next_video": llava_next_video}


@functools.cache
def llava_model(model_type):
    cls, config, processor = LLAVA[model_type]()
    return _build(cls, config), processor


def llava_chains(processor):
    video = processor.video_token
    texts = [f"{video} describe the video", f"what happens in the {video} then the dog"]
    videos = [[(_frames(4, FRAME, 0), 2.0)], [(_frames(4, FRAME, 1), 2.0)]]
    return Chains(processor, texts, _completions(3, [2, 3]), videos, seed=4)


@pytest.mark.parametrize(("share_prefix", "mode"), PATHS)
@pytest.mark.parametrize("model_type", sorted(LLAVA))
def test_llava_equals_independent_forwards(model_type, share_prefix, mode):
    model, processor = llava_model(model_type)
    assert model.config.model_type == model_type and get_family(model) is not None
    chains = llava_chains(processor)
    batch = chains.batch()
    assert bool((batch["prompt_attention_mask"] == 0).any())  # left padding
    if share_prefix is None:
        assert ChainForward(model).uses_tree()
    got = check_equal(model, chains, share_prefix=share_prefix, mode=mode)
    # vision_feature_layer=-1: the last layer's hidden states, before the post-norm and the pooling head
    unused = ("post_layernorm", ".head.")
    assert_vision_gradients(got, model.model.vision_tower, "model.vision_tower", unused)
    assert_vision_gradients(got, model.model.multi_modal_projector, "model.multi_modal_projector")


def llava_mixed_chains(processor):
    """Two videos in one prompt, an image, no media, one video: each full-sequence row must take its own."""
    video, image = processor.video_token, processor.image_token
    texts = [f"{video} and {video} describe", f"what is in {image}", "describe a red cat", f"{video} then"]
    videos = [
        [(_frames(4, FRAME, 0), 2.0), (_frames(4, FRAME, 1), 2.0)],
        [],
        [],
        [(_frames(4, FRAME, 2), 2.0)],
    ]
    images = [[], [_frames(1, FRAME, 3)[0]], [], []]
    return Chains(processor, texts, _completions(7, [2, 2, 3, 2]), videos, images, seed=8)


@pytest.mark.parametrize(("share_prefix", "mode"), [(None, "sdpa+ckpt"), (False, "sdpa")])
@pytest.mark.parametrize("model_type", sorted(LLAVA))
def test_llava_prompts_with_several_videos_an_image_or_none(model_type, share_prefix, mode):
    model, processor = llava_model(model_type)
    chains = llava_mixed_chains(processor)
    batch = chains.batch()
    assert batch["pixel_values_videos"].shape[0] == 3 and batch["pixel_values"].shape[0] == 1
    got = check_equal(model, chains, share_prefix=share_prefix, mode=mode)
    assert float(got["model.vision_tower.embeddings.patch_embedding.weight"].abs().max()) > 0


# ------------------------------------------------------------------------------------------------------
# Text-only prompts in a VLM


def _any_model(model_type):
    return qwen_model(model_type) if model_type in QWEN else llava_model(model_type)


@pytest.mark.parametrize(("share_prefix", "mode"), [(None, "sdpa"), (None, "sdpa+ckpt"), (False, "sdpa")])
@pytest.mark.parametrize("model_type", sorted(QWEN) + sorted(LLAVA))
def test_text_only_prompts_in_a_vlm(model_type, share_prefix, mode):
    model, processor = _any_model(model_type)
    texts = ["describe a red cat", "what happens", "the dog runs over the blue bird and then sits"]
    chains = Chains(processor, texts, _completions(5, [2, 3, 2]), seed=6)
    batch = chains.batch()
    assert not any(k.startswith("pixel") for k in batch)
    assert bool((batch["prompt_attention_mask"] == 0).any())
    got = check_equal(model, chains, share_prefix=share_prefix, mode=mode)
    assert float(got["lm_head.weight"].abs().max()) > 0


def test_llava_full_sequences_refuse_media_they_cannot_assign():
    model, processor = llava_model("llava_onevision")
    batch = llava_chains(processor).batch()
    family = get_family(model)
    owner = torch.tensor([0, 0, 1, 1, 1])
    picked = family.select_media(model, batch, owner)
    assert torch.equal(picked["pixel_values_videos"], batch["pixel_values_videos"][owner])
    # three videos for two prompts of one video's placeholders each: whose is which?
    three = {**batch, "pixel_values_videos": batch["pixel_values_videos"][[0, 1, 1]]}
    with pytest.raises(ValueError, match="3 videos for placeholder counts"):
        family.select_media(model, three, owner)
