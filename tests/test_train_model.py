"""The trainer's model wiring: video tokens and 3-D positions, the shared-prefix forward, the ranking loss
inside the wrapper against the naive full-logits computation, gradients into the vision tower, greedy
generation against transformers' ``generate``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("torchvision")

import rankloss  # noqa: E402
from rankloss.train.config import TrainConfig  # noqa: E402
from rankloss.train.data import (  # noqa: E402
    IGNORE_INDEX,
    SYNTHETIC_FPS,
    BatchBuilder,
    FrameStore,
    global_batch_indices,
    split_by_video,
    synthetic_chains,
    synthetic_frames,
)
from rankloss.train.model import (  # noqa: E402
    LossSpec,
    VideoChainModel,
    build_tiny_model,
    build_tiny_processor,
    set_vision_trainable,
    tiny_config,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def setup():
    cfg = TrainConfig(num_videos=6, heldout=2, frames=4, frame_size=56, max_objects=2)
    chains = synthetic_chains(cfg)
    frames = synthetic_frames(cfg)
    tok = train_tokenizer([c for ch in chains for c in ch.captions], 500)
    processor = build_tiny_processor(tok, 56)
    mcfg = tiny_config(tok, hidden_size=64, num_layers=2, vision_depth=2, vision_hidden_size=32)
    model = build_tiny_model(mcfg, seed=0).double()
    builder = BatchBuilder(processor, model.model.get_rope_index, video_token_id=mcfg.video_token_id)
    return chains, frames, processor, mcfg, model, builder


def _naive_scores(model, batch, mcfg, fps=SYNTHETIC_FPS):
    """Per-caption scores the plain way: full sequences through the Hugging Face forward (it builds the
    3-D positions from ``mm_token_type_ids``), full logits, log_softmax, Hugging Face labels shifted with
    rankloss.shift_labels."""
    owner = batch.caption_video
    ids = torch.cat([batch.prefix_ids[owner], batch.caption_ids], 1)
    types = (ids == mcfg.video_token_id).long() * 2
    per_video = batch.pixel_values_videos.view(batch.num_videos, -1, batch.pixel_values_videos.shape[-1])
    pixels = torch.cat([per_video[i] for i in owner.tolist()]).double()
    out = model(
        input_ids=ids,
        pixel_values_videos=pixels,
        video_grid_thw=batch.video_grid_thw[owner],
        mm_token_type_ids=types,
        second_per_grid_ts=torch.full((ids.shape[0],), 2 / fps),
    )
    P = batch.prefix_ids.shape[1]
    hf_labels = torch.cat([torch.full((ids.shape[0], P), IGNORE_INDEX), batch.labels], 1)
    labels = rankloss.shift_labels(hf_labels)
    logp = torch.log_softmax(out.logits.double(), -1)
    tok = torch.where(labels != IGNORE_INDEX, logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 0.0)
    return tok.sum(-1), (labels != IGNORE_INDEX).sum(-1)


def test_prefix_matches_the_processor_and_positions_are_3d(setup):
    chains, frames, processor, mcfg, model, builder = setup
    batch = builder.build(chains[:2], frames)
    # The prefix is what the processor itself makes of the prompt and the video.
    ref = processor(
        text=[builder.prompt_text],
        videos=[frames.frames[chains[0].index]],
        video_metadata=[{"total_num_frames": 4, "fps": SYNTHETIC_FPS, "frames_indices": [0, 1, 2, 3]}],
        return_tensors="pt",
    )
    assert batch.prefix_ids[0].tolist() == ref["input_ids"][0].tolist()
    assert (
        ref["mm_token_type_ids"][0].tolist()
        == ((batch.prefix_ids[0] == mcfg.video_token_id).long() * 2).tolist()
    )
    n_video = int(batch.video_grid_thw[0].prod()) // 4
    assert int((batch.prefix_ids[0] == mcfg.video_token_id).sum()) == n_video == 8
    # Positions equal the model's get_rope_index on the whole sequence (prefix + first caption) ...
    full = torch.cat([batch.prefix_ids[:1], batch.caption_ids[:1]], 1)
    types = (full == mcfg.video_token_id).long() * 2
    pos, _ = model.model.get_rope_index(
        full,
        types,
        video_grid_thw=batch.video_grid_thw[:1],
        second_per_grid_ts=torch.tensor([2 / SYNTHETIC_FPS]),
    )
    mine = torch.cat([batch.prefix_positions[:, :1], batch.caption_positions[:, :1]], 2)
    assert torch.equal(pos, mine)
    # ... are really 3-D at the video tokens (height/width differ from time), and text continues after.
    video = batch.prefix_ids[0] == mcfg.video_token_id
    p = batch.prefix_positions[:, 0][:, video]
    assert not torch.equal(p[0], p[1]) and not torch.equal(p[1], p[2])
    assert batch.caption_positions[0, 0, 0] == batch.prefix_positions[:, 0].max() + 1
    # Without mm_token_type_ids the model would fall back to 1-D positions: the scores would differ.
    s_mrope, _ = _naive_scores(model, batch, mcfg)
    owner = batch.caption_video
    ids = torch.cat([batch.prefix_ids[owner], batch.caption_ids], 1)
    per_video = batch.pixel_values_videos.view(2, -1, batch.pixel_values_videos.shape[-1])
    pixels = torch.cat([per_video[i] for i in owner.tolist()]).double()
    logits_1d = model(
        input_ids=ids, pixel_values_videos=pixels, video_grid_thw=batch.video_grid_thw[owner]
    ).logits
    assert not torch.allclose(
        logits_1d[:, -5:],
        model(
            input_ids=ids,
            pixel_values_videos=pixels,
            video_grid_thw=batch.video_grid_thw[owner],
            mm_token_type_ids=(ids == mcfg.video_token_id).long() * 2,
            second_per_grid_ts=torch.full((ids.shape[0],), 0.5),
        ).logits[:, -5:],
    )
    assert torch.isfinite(s_mrope).all()


def test_labels_are_shifted_hf_labels(setup):
    chains, frames, _, _, _, builder = setup
    batch = builder.build(chains[:2], frames)
    hf = torch.cat(
        [torch.full((batch.num_captions, 1), IGNORE_INDEX), batch.labels], 1
    )  # [last prefix, caption]
    assert torch.equal(rankloss.shift_labels(hf)[:, :-1], batch.labels)
    lengths = (batch.labels != IGNORE_INDEX).sum(1)
    assert all(batch.labels[s, n - 1] == builder.end_id for s, n in enumerate(lengths.tolist()))


@pytest.mark.parametrize("share_prefix", [True, False])
def test_scores_match_naive_full_logits(setup, share_prefix):
    chains, frames, _, mcfg, model, builder = setup
    batch = builder.build(chains[:3], frames)
    out = VideoChainModel(model, share_prefix=share_prefix)(batch, mode="score")
    naive, n = _naive_scores(model, batch, mcfg)
    torch.testing.assert_close(out["scores"].double(), naive.detach(), rtol=1e-10, atol=1e-9)
    assert torch.equal(out["num_tokens"], n)


@pytest.mark.parametrize(
    "loss,options",
    [
        ("plackett_luce", {}),
        ("dpo", {"pairs": "all"}),
        ("lipo", {}),
        ("plackett_luce", {"sft_weight": 0.7}),
    ],
)
def test_ranking_loss_matches_chain_loss_on_naive_scores(setup, loss, options):
    chains, frames, _, mcfg, model, builder = setup
    ref = {
        c.id: (torch.randn(len(c.captions)) * 3 - 150, torch.ones(len(c.captions), dtype=torch.long))
        for c in chains
    }
    batch = builder.build(chains[:3], frames, ref_scores=ref)
    spec = LossSpec(loss=loss, beta=0.05, **options)
    wrapper = VideoChainModel(model)
    out = wrapper(batch, mode="rank", spec=spec)
    params = [
        model.model.visual.patch_embed.proj.weight,
        model.lm_head.weight,
        model.model.language_model.layers[0].self_attn.q_proj.weight,
    ]
    grads = torch.autograd.grad(out["loss"], params)
    scores, n = _naive_scores(model, batch, mcfg)
    naive = rankloss.chain_loss(
        scores,
        batch.chain_sizes.tolist(),
        batch.ref_scores.double(),
        loss=loss,
        beta=0.05,
        num_tokens=n,
        impl="reference",
        **options,
    )
    naive_grads = torch.autograd.grad(naive.loss, params)
    torch.testing.assert_close(out["loss"].double(), naive.loss, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out["chain"].pairwise_accuracy.double(), naive.pairwise_accuracy.double())
    for g, ng in zip(grads, naive_grads):
        torch.testing.assert_close(g, ng, rtol=1e-6, atol=1e-9)


def test_sft_loss_is_mean_per_token_nll(setup):
    chains, frames, _, mcfg, model, builder = setup
    batch = builder.build(chains[:3], frames, best_only=True)
    assert batch.chain_sizes.tolist() == [1, 1, 1]
    out = VideoChainModel(model)(batch, mode="sft")
    s, n = _naive_scores(model, batch, mcfg)
    torch.testing.assert_close(out["loss"].double(), (-s / n).mean().detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["sft", "rank"])
def test_vision_tower_gets_gradients_unless_frozen(setup, mode):
    chains, frames, _, mcfg, _, builder = setup
    model = build_tiny_model(mcfg, seed=1)
    ref = {
        c.id: (torch.zeros(len(c.captions)), torch.ones(len(c.captions), dtype=torch.long)) for c in chains
    }
    batch = builder.build(chains[:2], frames, best_only=mode == "sft", ref_scores=ref)
    wrapper = VideoChainModel(model)
    spec = LossSpec(sft_weight=0.5)
    wrapper(batch, mode=mode, spec=spec)["loss"].backward()
    vision = list(model.model.visual.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vision)
    model.zero_grad(set_to_none=True)
    set_vision_trainable(model, False)
    wrapper(batch, mode=mode, spec=spec)["loss"].backward()
    assert all(p.grad is None for p in vision)
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    set_vision_trainable(model, True)


def test_left_padded_prefixes_match_one_by_one(setup):
    """Videos of different sizes give prefixes of different lengths in one batch (left padding + mask)."""
    chains, frames, processor, mcfg, model, _ = setup
    # The trainer's tiny processor pins every frame to frame_size**2 pixels; this test needs a processor
    # that keeps a smaller video smaller, so its prefix is shorter.
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    loose = type(processor)(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        video_processor=Qwen2VLVideoProcessor(
            size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56}, do_sample_frames=False
        ),
    )
    builder = BatchBuilder(loose, model.model.get_rope_index, video_token_id=mcfg.video_token_id)
    mixed = FrameStore(frames.frames[:, :, :, :, :], frames.fps.copy())
    small = torch.nn.functional.interpolate(torch.from_numpy(frames.frames[1]).float(), size=(28, 28))
    store = {0: frames.frames[chains[0].index], 1: small.round().clamp(0, 255).byte().numpy()}

    class Mixed:
        frames = store
        fps = mixed.fps

    a, b = chains[0], chains[1]
    a1 = type(a)(a.id, a.captions, None, a.scene, 0)
    b1 = type(b)(b.id, b.captions, None, b.scene, 1)
    together = builder.build([a1, b1], Mixed)
    assert together.prefix_mask is not None and together.prefix_mask[1].sum() < together.prefix_mask[0].sum()
    for share in (True, False):
        wrapper = VideoChainModel(model, share_prefix=share)
        both = wrapper(together, mode="score")["scores"]
        one = torch.cat([wrapper(builder.build([c], Mixed), mode="score")["scores"] for c in (a1, b1)])
        torch.testing.assert_close(both, one, rtol=1e-9, atol=1e-8)
    gen = VideoChainModel(model)(
        together, mode="generate", max_new_tokens=5, stop_ids=[builder.end_id], pad_id=0
    )
    for i, c in enumerate((a1, b1)):
        alone = VideoChainModel(model)(
            builder.build([c], Mixed, with_captions=False),
            mode="generate",
            max_new_tokens=5,
            stop_ids=[builder.end_id],
            pad_id=0,
        )
        assert gen["tokens"][i].tolist() == alone["tokens"][0].tolist()


def test_greedy_generation_matches_transformers_generate(setup):
    chains, frames, _, mcfg, model, builder = setup
    batch = builder.build(chains[:3], frames, with_captions=False)
    mine = VideoChainModel(model)(batch, mode="generate", max_new_tokens=6, stop_ids=[], pad_id=0)["tokens"]
    hf = model.generate(
        input_ids=batch.prefix_ids,
        attention_mask=torch.ones_like(batch.prefix_ids),
        pixel_values_videos=batch.pixel_values_videos.double(),
        video_grid_thw=batch.video_grid_thw,
        mm_token_type_ids=(batch.prefix_ids == mcfg.video_token_id).long() * 2,
        second_per_grid_ts=torch.full((3,), 2 / SYNTHETIC_FPS),
        max_new_tokens=6,
        do_sample=False,
    )
    assert mine.tolist() == hf[:, batch.prefix_ids.shape[1] :].tolist()


def test_tokenizer_round_trips_captions(setup):
    chains, _, processor, _, _, _ = setup
    tok = processor.tokenizer
    for c in chains:
        for cap in c.captions:
            assert tok.decode(tok(cap, add_special_tokens=False)["input_ids"]) == cap


def test_batches_are_a_function_of_the_step_and_split_by_video():
    a = [global_batch_indices(10, 4, s, seed=3, salt="sft") for s in range(6)]
    assert a == [global_batch_indices(10, 4, s, seed=3, salt="sft") for s in range(6)]
    flat = sum(a, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert a != [global_batch_indices(10, 4, s, seed=4, salt="sft") for s in range(6)]
    chains = synthetic_chains(TrainConfig(num_videos=20))
    train, held = split_by_video(chains, 5, seed=0)
    assert len(held) == 5 and not {c.id for c in train} & {c.id for c in held}
    with pytest.raises(ValueError, match="--heldout"):
        split_by_video(chains, 20, seed=0)
