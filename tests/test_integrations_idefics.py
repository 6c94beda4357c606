"""The chain forward of the SmolVLM / Idefics3 family (rankloss.integrations.families.idefics): a tiny random
model built from its config and a processor built locally (images split into 32 x 32 tiles plus a global
view, so prompts carry different numbers of tiles and the processor pads with all-zero images; SmolVLM2's
video path: frames with timestamps) give, on a chain batch built by hand from ONE processor call on all
prompts (left padding, prompts of different lengths, chains of different sizes), the same loss and the
same gradient of every parameter (the vision encoder's included) as K independent full-sequence forwards
through the model's own ``forward`` with that prompt's media alone (full logits, log_softmax), in float64;
through the chain tree (each prompt and its images once, with and without gradient checkpointing,
through SDPA and through the flash path on an emulator of flash-attn's varlen kernel) and with full
sequences (each row its own prompt's images)."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("torchvision")

from chain_testing import TREE_MODES, attention_path, checkpointing  # noqa: E402
from rankloss.reference.losses import chain_loss as ref_chain_loss  # noqa: E402

from rankloss.integrations import ChainForward, get_family  # noqa: E402
from rankloss.integrations.forward import LossSpec  # noqa: E402
from rankloss.train.model import train_tokenizer  # noqa: E402

if not hasattr(transformers, "SmolVLMForConditionalGeneration"):  # pragma: no cover
    pytest.skip("this transformers has no SmolVLM / Idefics3", allow_module_level=True)

WORDS = (
    "a the red blue green cat dog bird runs jumps sits over under left right of in on and then "
    "what happens image describe shows is two one three you are provided following series frames "
    "from video frame"
).split()
SPEC = LossSpec(loss="plackett_luce", beta=0.5, sft_weight=0.3)
TILE = 32  # the vision encoder's image size: 4 x 4 patches of 8, 2 x 2 tokens after the pixel shuffle
IMAGE_SEQ_LEN = (TILE // 8) ** 2 // 4


@contextlib.contextmanager
def _num2words():
    """SmolVLM's processor needs ``num2words`` (not a rankloss dependency) only to spell a video's frame
    count in its prompt: stand in ``str`` for it where it is missing."""
    from transformers.models.smolvlm import processing_smolvlm

    if processing_smolvlm.num2words is not None:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(processing_smolvlm, "num2words", str)
        yield


def _tokenizer():
    """A fresh tiny tokenizer (the Idefics3 processor adds tokens to the one it is given)."""
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] + ["00:01 0:00:02 [H:MM:SS] \n."]
    tok = train_tokenizer(corpus, 300)
    extra = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
    tok.add_tokens(extra + [f"<row_{i}_col_{j}>" for i in (1, 2, 3) for j in (1, 2, 3)], special_tokens=True)
    return tok


def _perturb(model, seed):
    """Random (not zero / one) norms and biases, so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _config(cls, tok, image_token):
    text = dict(
        model_type="llama",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    return cls(
        text_config=text,
        vision_config=dict(vision, image_size=TILE, patch_size=8),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids(image_token),
        tie_word_embeddings=False,
    )


def smolvlm():
    from transformers.models.smolvlm.image_processing_smolvlm import SmolVLMImageProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    tok = _tokenizer()
    tiles = {"max_image_size": {"longest_edge": TILE}}
    processor = transformers.SmolVLMProcessor(
        # images: longest edge to 2 tiles, split into up to 2 x 2 tiles plus the global view
        image_processor=SmolVLMImageProcessor(size={"longest_edge": 2 * TILE}, **tiles),
        video_processor=SmolVLMVideoProcessor(size={"longest_edge": TILE}, do_sample_frames=False, **tiles),
        tokenizer=tok,
        image_seq_len=IMAGE_SEQ_LEN,
    )
    config = _config(transformers.SmolVLMConfig, tok, processor.image_token)
    return transformers.SmolVLMForConditionalGeneration, config, processor


def idefics3():
    from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessor

    tok = _tokenizer()
    processor = transformers.Idefics3Processor(
        image_processor=Idefics3ImageProcessor(
            size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE}
        ),
        tokenizer=tok,
        image_seq_len=IMAGE_SEQ_LEN,
    )
    config = _config(transformers.Idefics3Config, tok, processor.image_token)
    return transformers.Idefics3ForConditionalGeneration, config, processor


MODELS = {"smolvlm": smolvlm, "idefics3": idefics3}


@functools.cache
def tiny(model_type):
    with _num2words():
        cls, config, processor = MODELS[model_type]()
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="sdpa").double()
    return _perturb(model, 0), processor


def _pixels(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _frames(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------------
# Chain batches built by hand from one processor call (independent of the collator)


class Chains:
    """Prompts, their media and completion chains: ``images[b]`` the ``[H, W, 3]`` images of prompt ``b``
    (in placeholder order), ``videos[b]`` its ``(frames, fps)`` videos."""

    def __init__(self, processor, texts, chains, images=None, videos=None, seed=0):
        self.processor, self.texts, self.chains = processor, texts, chains
        self.images = images or [[] for _ in texts]
        self.videos = videos or [[] for _ in texts]
        self.seed = seed

    def encode(self, rows):
        kw = {}
        if any(self.images[b] for b in rows):
            kw["images"] = [list(self.images[b]) for b in rows]  # nested: one list per prompt
        vids = [v for b in rows for v in self.videos[b]]
        if vids:
            kw["videos"] = [f for f, _ in vids]
            kw["video_metadata"] = [
                {"total_num_frames": len(f), "fps": fps, "frames_indices": list(range(len(f)))}
                for f, fps in vids
            ]
        texts = [self.texts[b] for b in rows]
        with _num2words():
            return self.processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **kw)

    def batch(self):
        enc = dict(self.encode(range(len(self.texts))))
        batch = {"prompt_input_ids": enc.pop("input_ids"), "prompt_attention_mask": enc.pop("attention_mask")}
        batch.update({k: v.double() if v.is_floating_point() else v for k, v in enc.items()})
        comps = [c for ch in self.chains for c in ch]
        S, L = len(comps), max(len(c) for c in comps)
        cids = torch.full((S, L), self.processor.tokenizer.pad_token_id)
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
            row = batch["prompt_input_ids"][b][batch["prompt_attention_mask"][b].bool()]
            assert row.tolist() == prompt[0].tolist()  # the batch row is this prompt, left-padded
            media = {k: v.double() if v.is_floating_point() else v for k, v in enc.items()}
            assert ("pixel_values" in media) == bool(self.images[b] or self.videos[b])
            for c in chain:
                ids = torch.cat([prompt, torch.tensor([c])], 1)
                logits = model(input_ids=ids, **media).logits[0].double()
                logp = torch.log_softmax(logits[prompt.shape[1] - 1 : -1], -1)
                scores.append(logp.gather(-1, torch.tensor(c)[:, None]).sum())
        return torch.stack(scores)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_equal(model, chains, spec=SPEC, share_prefix=None, mode="sdpa"):
    """Loss and every parameter's gradient of the chain forward == those of independent forwards.

    Tolerance (as in tests/test_integrations_vlm.py): transformers' RMSNorms compute in float32 even in a
    float64 model, so a prompt token's gradient, summed over its K completions before such a cast instead
    of K times after it, differs at float32 rounding: 1e-6 relative to the tensor's largest gradient (a
    gradient lost across the tree, a wrong position or another prompt's image shows at order one);
    ``mode``: the chain tree's attention path and gradient checkpointing (a key of ``TREE_MODES``)."""
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
        assert err <= 1e-6 * scale + 1e-15, f"{name}: max |diff| {err:.3g} > 1e-6 * {scale:.3g}"
    return got


def assert_vision_gradients(got, model):
    """Every parameter of the vision encoder and the connector has a non-zero gradient (key biases:
    mathematically zero, softmax ignores them)."""
    for prefix in ("model.vision_model", "model.connector"):
        names = [f"{prefix}.{n}" for n, _ in model.get_submodule(prefix).named_parameters()]
        assert names
        for n in names:
            if not n.endswith("k_proj.bias"):
                assert n in got and float(got[n].abs().max()) > 1e-12, n


def _completions(tok, seed, ks):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in ks:
        chain = []
        for _ in range(k):
            n = int(torch.randint(1, 6, (1,), generator=g))
            words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)]
            chain.append(tok(" ".join(words), add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        out.append(chain)
    return out


def image_chains(processor):
    """Two images in one prompt (2 x 2 tiles + global, 2 x 1 + global), a text-only prompt, one small
    image (upscaled and split too): 8, 0 and 5 tiles, so the processor pads prompts with zero images."""
    img = processor.image_token
    texts = [f"{img} and {img} describe", "describe a red cat and then the dog", f"what happens in {img}"]
    images = [[_pixels(48, 40, 0), _pixels(64, 30, 1)], [], [_pixels(20, 20, 2)]]
    return Chains(processor, texts, _completions(processor.tokenizer, 1, [3, 2, 2]), images, seed=2)


# ------------------------------------------------------------------------------------------------------


def test_family_is_registered_and_finds_the_vision_encoder():
    for model_type in MODELS:
        model, _ = tiny(model_type)
        family = get_family(model)
        assert model.config.model_type == model_type and family is not None
        assert family is get_family(model_type) and family.multimodal and family.rope == "1d"
        assert family.vision_modules(model) == [model.model.vision_model]
        assert family.text_module(model) is model.model.text_model
        assert family.head(model).weight is model.lm_head.weight


#: (share_prefix, mode): full sequences, and the chain tree in each mode.
PATHS = [(False, "sdpa")] + [(None, mode) for mode in sorted(TREE_MODES)]


@pytest.mark.parametrize(("share_prefix", "mode"), PATHS)
@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_images_equal_independent_forwards(model_type, share_prefix, mode):
    model, processor = tiny(model_type)
    chains = image_chains(processor)
    batch = chains.batch()
    assert bool((batch["prompt_attention_mask"] == 0).any())  # left padding
    pixels = batch["pixel_values"]
    assert pixels.shape[:2] == (3, 8)  # 8 tiles for the first prompt, padding images for the others
    real = (pixels != 0).flatten(2).any(-1).sum(-1)
    assert real.tolist() == [8, 0, 5]
    if share_prefix is None:
        assert ChainForward(model).uses_tree()
    got = check_equal(model, chains, share_prefix=share_prefix, mode=mode)
    assert_vision_gradients(got, model)


@pytest.mark.parametrize(("share_prefix", "mode"), [(None, "sdpa+ckpt"), (False, "sdpa")])
@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_text_only_prompts(model_type, share_prefix, mode):
    model, processor = tiny(model_type)
    texts = ["describe a red cat", "what happens", "the dog runs over the blue bird and then sits"]
    chains = Chains(processor, texts, _completions(processor.tokenizer, 5, [2, 3, 2]), seed=6)
    batch = chains.batch()
    assert not any(k.startswith("pixel") for k in batch)
    assert bool((batch["prompt_attention_mask"] == 0).any())
    got = check_equal(model, chains, share_prefix=share_prefix, mode=mode)
    assert float(got["lm_head.weight"].abs().max()) > 0
    assert not any(n.startswith("model.vision_model") for n in got)


def video_chains(processor):
    """Two videos of different lengths in one prompt, a text-only prompt, one video: the processor gives
    one pixel row per video (not per prompt), its frames padded with all-zero images."""
    video = processor.video_token
    texts = [f"{video} and {video} what happens", "describe a red cat", f"the dog and {video} then"]
    videos = [[(_frames(3, 40, 0), 1.0), (_frames(1, 24, 1), 1.0)], [], [(_frames(2, TILE, 2), 2.0)]]
    return Chains(processor, texts, _completions(processor.tokenizer, 3, [2, 2, 4]), videos=videos, seed=4)


@pytest.mark.parametrize(
    ("share_prefix", "mode"), [(None, "sdpa+ckpt"), (None, "flash-emulated+ckpt"), (False, "sdpa")]
)
def test_smolvlm_videos_equal_independent_forwards(share_prefix, mode):
    """SmolVLM2's video path: frames (with their timestamps in the prompt) are images to the model."""
    model, processor = tiny("smolvlm")
    chains = video_chains(processor)
    batch = chains.batch()
    assert batch["pixel_values"].shape[:2] == (3, 3)  # three videos, up to three frames
    assert (batch["pixel_values"] != 0).flatten(2).any(-1).sum(-1).tolist() == [3, 1, 2]
    if share_prefix is None:
        assert ChainForward(model).uses_tree()
    got = check_equal(model, chains, share_prefix=share_prefix, mode=mode)
    assert_vision_gradients(got, model)


def test_full_sequence_rows_take_their_own_prompts_images():
    model, processor = tiny("idefics3")
    batch = image_chains(processor).batch()
    family = get_family(model)
    owner = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    picked = family.select_media(model, batch, owner)
    assert set(picked) == {"pixel_values", "pixel_attention_mask"}
    for key in picked:  # one row per prompt with images; the text-only prompt's zero row is not needed
        assert torch.equal(picked[key], batch[key][[0, 0, 0, 2, 2]])
    # rows of text-only prompts alone: no image to encode, so no pixel keys (as the processor gives)
    assert family.select_media(model, batch, torch.tensor([1, 1])) == {}
    # a batch whose prompts have no image but that carries (all-zero) pixel values
    empty = {**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])}
    assert family.prompt_media(model, empty) == {}
    # pixel rows whose images do not fill the prompts' placeholders cannot be assigned
    wrong = {**batch, "pixel_values": batch["pixel_values"][[0, 2, 2]]}
    with pytest.raises(ValueError, match="image placeholder tokens"):
        family.select_media(model, wrong, owner)
    with pytest.raises(ValueError, match=r"\[rows, images, C, H, W\]"):
        family.prompt_media(model, {**batch, "pixel_values": batch["pixel_values"][:, 0]})


def test_smolvlm_video_rows_are_assigned_to_their_prompts():
    model, processor = tiny("smolvlm")
    batch = video_chains(processor).batch()
    owner = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    picked = get_family(model).select_media(model, batch, owner)
    rows = [0, 1, 0, 1] + [2] * 4  # prompt 0 owns the first two videos, prompt 2 the third
    for key in ("pixel_values", "pixel_attention_mask"):
        assert torch.equal(picked[key], batch[key][rows])
