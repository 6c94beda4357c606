"""The trainer's model wiring (chain records -> ChainCollator -> ChainRankModel, the parts ChainRankTrainer
uses): video tokens and 3-D positions, the shared-prefix forward, the ranking loss inside the wrapper
against the naive full-logits computation, gradients into the vision tower, greedy generation against
transformers' ``generate`` and against the scoring forward, per-record frame rates, ``--model`` errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("torchvision")

import rankloss  # noqa: E402
from rankloss.integrations import ChainRankModel, get_family  # noqa: E402
from rankloss.integrations.forward import LossSpec  # noqa: E402
from rankloss.train.config import TrainConfig  # noqa: E402
from rankloss.train.data import (  # noqa: E402
    IGNORE_INDEX,
    SYNTHETIC_FPS,
    FrameStore,
    chain_records,
    collate_chains,
    global_batch_indices,
    make_collator,
    split_by_video,
    synthetic_chains,
    synthetic_frames,
)
from rankloss.train.model import (  # noqa: E402
    build_tiny_model,
    build_tiny_processor,
    load_pretrained,
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
    collator = make_collator(processor)
    return chains, frames, processor, mcfg, model, collator


def _owner(batch):
    sizes = batch["chain_sizes"]
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes)


def _full_sequences(batch, mcfg):
    """Each completion behind its own copy of its prompt and video: the inputs of the plain Hugging Face
    forward (which builds the 3-D positions itself from ``mm_token_type_ids``)."""
    owner = _owner(batch)
    ids = torch.cat([batch["prompt_input_ids"][owner], batch["completion_input_ids"]], 1)
    comp = batch["completion_input_ids"]
    mask = torch.cat([batch["prompt_attention_mask"][owner], torch.ones_like(comp)], 1)
    grids = batch["video_grid_thw"]
    per_video = torch.split(batch["pixel_values_videos"], grids.prod(-1).tolist())
    return dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values_videos=torch.cat([per_video[i] for i in owner.tolist()]).double(),
        video_grid_thw=grids[owner],
        mm_token_type_ids=(ids == mcfg.video_token_id).long() * 2,
        second_per_grid_ts=batch["second_per_grid_ts"][owner],
    )


def _naive_scores(model, batch, mcfg):
    """Per-caption scores the plain way: full sequences through the Hugging Face forward, full logits,
    log_softmax, Hugging Face labels shifted with rankloss.shift_labels."""
    inputs = _full_sequences(batch, mcfg)
    out = model(**inputs)
    P = batch["prompt_input_ids"].shape[1]
    labels_in = batch["completion_labels"]
    hf_labels = torch.cat([torch.full((labels_in.shape[0], P), IGNORE_INDEX), labels_in], 1)
    labels = rankloss.shift_labels(hf_labels)
    logp = torch.log_softmax(out.logits.double(), -1)
    tok = torch.where(labels != IGNORE_INDEX, logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 0.0)
    return tok.sum(-1), (labels != IGNORE_INDEX).sum(-1)


def test_prefix_matches_the_processor_and_positions_are_3d(setup):
    chains, frames, processor, mcfg, model, collator = setup
    batch = collate_chains(collator, chains[:2], frames)
    records = chain_records(chains[:2], frames)
    assert batch["chain_ids"] == [c.id for c in chains[:2]]
    assert batch["chain_sizes"].tolist() == [len(c.captions) for c in chains[:2]]
    # The prompt is what the processor itself makes of the video's placeholder and the video.
    ref = processor(
        text=["<|vision_start|><|video_pad|><|vision_end|>"],
        videos=[frames.frames[chains[0].index]],
        video_metadata=[{"total_num_frames": 4, "fps": SYNTHETIC_FPS, "frames_indices": [0, 1, 2, 3]}],
        return_tensors="pt",
    )
    assert records[0]["video_fps"] == SYNTHETIC_FPS
    assert batch["prompt_input_ids"][0].tolist() == ref["input_ids"][0].tolist()
    assert batch["mm_token_type_ids"][0].tolist() == ref["mm_token_type_ids"][0].tolist()
    assert batch["second_per_grid_ts"].tolist() == [2 / SYNTHETIC_FPS] * 2
    prompt = batch["prompt_input_ids"][0]
    n_video = int(batch["video_grid_thw"][0].prod()) // 4
    assert int((prompt == mcfg.video_token_id).sum()) == n_video == 8
    # Positions (the family's: prompt from get_rope_index, caption token t at the next position + t)
    # equal the model's get_rope_index on the whole sequence (prompt + first caption) ...
    fam = get_family(model)
    prompt_pos, next_pos = fam.prompt_positions(model, batch)
    cap_pos = fam.completion_positions(next_pos, _owner(batch), batch["completion_input_ids"].shape[1])
    full = torch.cat([batch["prompt_input_ids"][:1], batch["completion_input_ids"][:1]], 1)
    types = (full == mcfg.video_token_id).long() * 2
    pos, _ = model.model.get_rope_index(
        full,
        types,
        video_grid_thw=batch["video_grid_thw"][:1],
        second_per_grid_ts=torch.tensor([2 / SYNTHETIC_FPS]),
    )
    mine = torch.cat([prompt_pos[:, :1], cap_pos[:, :1]], 2)
    assert torch.equal(pos, mine)
    # ... are really 3-D at the video tokens (height/width differ from time), and text continues after
    # (for these videos, 2 temporal patches of 2 x 2 merged tokens, right after the largest position).
    video = prompt == mcfg.video_token_id
    p = prompt_pos[:, 0][:, video]
    assert not torch.equal(p[0], p[1]) and not torch.equal(p[1], p[2])
    assert cap_pos[0, 0, 0] == prompt_pos[:, 0].max() + 1
    # Without mm_token_type_ids the model would fall back to 1-D positions: the scores would differ.
    s_mrope, _ = _naive_scores(model, batch, mcfg)
    inputs = _full_sequences(batch, mcfg)
    with_types = model(**inputs).logits
    inputs.pop("mm_token_type_ids")
    inputs.pop("second_per_grid_ts")
    assert not torch.allclose(model(**inputs).logits[:, -5:], with_types[:, -5:])
    assert torch.isfinite(s_mrope).all()


def test_labels_are_shifted_hf_labels(setup):
    chains, frames, _, _, _, collator = setup
    batch = collate_chains(collator, chains[:2], frames)
    labels = batch["completion_labels"]
    hf = torch.cat([torch.full((labels.shape[0], 1), IGNORE_INDEX), labels], 1)  # [last prefix, caption]
    assert torch.equal(rankloss.shift_labels(hf)[:, :-1], labels)
    lengths = (labels != IGNORE_INDEX).sum(1)
    eos = collator.tokenizer.eos_token_id
    assert all(labels[s, n - 1] == eos for s, n in enumerate(lengths.tolist()))


@pytest.mark.parametrize("share_prefix", [None, False])
def test_scores_match_naive_full_logits(setup, share_prefix):
    chains, frames, _, mcfg, model, collator = setup
    batch = collate_chains(collator, chains[:3], frames)
    out = ChainRankModel(model, share_prefix=share_prefix)(batch, mode="score")
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
    chains, frames, _, mcfg, model, collator = setup
    ref = {
        c.id: (torch.randn(len(c.captions)) * 3 - 150, torch.ones(len(c.captions), dtype=torch.long))
        for c in chains
    }
    batch = collate_chains(collator, chains[:3], frames, ref_scores=ref)
    assert torch.equal(batch["ref_scores"], torch.cat([ref[c.id][0] for c in chains[:3]]))
    spec = LossSpec(loss=loss, beta=0.05, **options)
    wrapper = ChainRankModel(model)
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
        batch["chain_sizes"].tolist(),
        batch["ref_scores"].double(),
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
    chains, frames, _, mcfg, model, collator = setup
    batch = collate_chains(collator, chains[:3], frames, best_only=True)
    assert batch["chain_sizes"].tolist() == [1, 1, 1]
    out = ChainRankModel(model)(batch, mode="sft")
    s, n = _naive_scores(model, batch, mcfg)
    torch.testing.assert_close(out["loss"].double(), (-s / n).mean().detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["sft", "rank"])
def test_vision_tower_gets_gradients_unless_frozen(setup, mode):
    chains, frames, _, mcfg, _, collator = setup
    model = build_tiny_model(mcfg, seed=1)
    ref = {
        c.id: (torch.zeros(len(c.captions)), torch.ones(len(c.captions), dtype=torch.long)) for c in chains
    }
    batch = collate_chains(collator, chains[:2], frames, best_only=mode == "sft", ref_scores=ref)
    wrapper = ChainRankModel(model)
    spec = LossSpec(sft_weight=0.5)
    wrapper(batch, mode=mode, spec=spec)["loss"].backward()
    vision = list(model.model.visual.parameters())
    assert get_family(model).vision_modules(model) == [model.model.visual]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vision)
    model.zero_grad(set_to_none=True)
    set_vision_trainable(model, False)
    wrapper(batch, mode=mode, spec=spec)["loss"].backward()
    assert all(p.grad is None for p in vision)
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    merger = model.model.visual.merger  # inside the vision tower: frozen with it
    assert all(p.grad is None for p in merger.parameters())
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
    collator = make_collator(loose)
    small = torch.nn.functional.interpolate(torch.from_numpy(frames.frames[1]).float(), size=(28, 28))
    store = {0: frames.frames[chains[0].index], 1: small.round().clamp(0, 255).byte().numpy()}
    mixed = FrameStore(store, frames.fps.copy())  # a dict of frame arrays serves as well as one array

    a, b = chains[0], chains[1]
    a1 = type(a)(a.id, a.captions, None, a.scene, 0)
    b1 = type(b)(b.id, b.captions, None, b.scene, 1)
    together = collate_chains(collator, [a1, b1], mixed)
    mask = together["prompt_attention_mask"]
    assert mask[1].sum() < mask[0].sum()
    for share in (None, False):
        wrapper = ChainRankModel(model, share_prefix=share)
        both = wrapper(together, mode="score")["scores"]
        one = torch.cat(
            [wrapper(collate_chains(collator, [c], mixed), mode="score")["scores"] for c in (a1, b1)]
        )
        torch.testing.assert_close(both, one, rtol=1e-9, atol=1e-8)
    eos = [collator.tokenizer.eos_token_id]
    gen = ChainRankModel(model)(together, mode="generate", max_new_tokens=5, stop_ids=eos, pad_id=0)
    for i, c in enumerate((a1, b1)):
        alone = ChainRankModel(model)(
            collate_chains(collator, [c], mixed, best_only=True),
            mode="generate",
            max_new_tokens=5,
            stop_ids=eos,
            pad_id=0,
        )
        assert gen["tokens"][i].tolist() == alone["tokens"][0].tolist()


def test_greedy_generation_matches_transformers_generate(setup):
    """Where transformers' ``generate`` places the first new token where its own full-sequence forward
    does (here: 2 temporal patches of 2 x 2 merged tokens at 4 frames per second), the tokens agree."""
    chains, frames, _, mcfg, model, collator = setup
    batch = collate_chains(collator, chains[:3], frames, best_only=True)
    mine = ChainRankModel(model)(batch, mode="generate", max_new_tokens=6, stop_ids=[], pad_id=0)["tokens"]
    prompt = batch["prompt_input_ids"]
    hf = model.generate(
        input_ids=prompt,
        attention_mask=batch["prompt_attention_mask"],
        pixel_values_videos=batch["pixel_values_videos"].double(),
        video_grid_thw=batch["video_grid_thw"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        second_per_grid_ts=batch["second_per_grid_ts"],
        max_new_tokens=6,
        do_sample=False,
    )
    assert mine.tolist() == hf[:, prompt.shape[1] :].tolist()


def test_greedy_generation_of_slow_videos_is_the_scoring_forwards_argmax(setup):
    """A video whose temporal positions run past its height and width (8 frames, or a low frame rate):
    transformers' ``get_rope_index`` (what its full-sequence forward, and so training, uses) puts the
    text after the video at the next position after the spatial extent, while its ``generate`` continues
    from the largest position + 1, so the two disagree for such videos (a known transformers
    difference). The chain forward uses the former for scores, losses and generation alike: each greedy
    token is the argmax of the full-sequence forward on the prompt and the tokens before it."""
    chains, frames, _, mcfg, model, collator = setup
    slow = FrameStore(frames.frames, np.full(len(frames.fps), 1.0))
    batch = collate_chains(collator, chains[:2], slow, best_only=True)
    assert batch["second_per_grid_ts"].tolist() == [2.0, 2.0]
    fam = get_family(model)
    pos, nxt = fam.prompt_positions(model, batch)
    assert bool((nxt < pos.amax(dim=(0, 2)) + 1).all())  # not the largest position + 1
    tokens = ChainRankModel(model)(batch, mode="generate", max_new_tokens=4, stop_ids=[], pad_id=0)["tokens"]
    P = batch["prompt_input_ids"].shape[1]
    inputs = _full_sequences({**batch, "completion_input_ids": tokens}, mcfg)
    logits = model(**inputs).logits[:, P - 1 : -1]
    assert logits.argmax(-1).tolist() == tokens.tolist()


def test_collator_takes_each_records_frame_rate(setup):
    """Records of one batch with different frame rates (``video_fps``) get their own temporal spacing."""
    chains, frames, _, _, _, collator = setup
    store = FrameStore(frames.frames, np.array([4.0, 1.0, 2.0, 4.0, 4.0, 4.0]))
    batch = collate_chains(collator, chains[:3], store)
    assert batch["second_per_grid_ts"].tolist() == [0.5, 2.0, 1.0]
    recs = chain_records(chains[:2], store)
    recs[0]["video_fps"] = [8.0]  # one per video also works
    assert collator(recs)["second_per_grid_ts"].tolist() == [0.25, 2.0]
    for bad, err in (([1.0, 2.0], ValueError), (0.0, ValueError), ("fast", TypeError), (True, TypeError)):
        with pytest.raises(err, match=r"records\[0\]\['video_fps'\]"):
            collator([{**recs[0], "video_fps": bad}])


def test_model_flag_names_unsupported_model_types(tmp_path):
    import json

    for model_type, extra, what in (
        ("qwen2", {}, "a text-only model"),
        ("gpt2", {}, "a text-only model"),
        ("fancy_vlm", {"vision_config": {}}, "a multimodal model without a rankloss family"),
    ):
        d = tmp_path / model_type
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": model_type, **extra}))
        with pytest.raises(ValueError, match=f"model_type '{model_type}', {what}") as exc:
            load_pretrained(str(d))
        assert "qwen2_5_vl" in str(exc.value) and "llava_onevision" in str(exc.value)


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
