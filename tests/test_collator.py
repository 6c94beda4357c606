"""rankloss.integrations.collator: TRL-shaped chain records to chain batches (the contract in
rankloss.integrations), with the tiny Qwen2.5-VL processor and a tiny text-only tokenizer built locally,
and load_chain_dataset on a chains JSONL file with tiny mp4 videos."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("torchvision")
datasets = pytest.importorskip("datasets")

from rankloss.integrations import CHAIN_KEYS, ChainCollator, load_chain_dataset  # noqa: E402
from rankloss.train.model import build_tiny_processor, train_tokenizer  # noqa: E402

FRAME = 56  # 4 x 4 patches of 14 px, merged 2 x 2: 4 LLM tokens per temporal patch (2 frames)
CAPTIONS = [
    "a red ball moves left.",
    "a blue cube spins.",
    "a green cone falls.",
    "a red cube moves right.",
    "Describe this video in detail.",
    "what is shown? user assistant system answer",
]
END = "<|endoftext|>"
# A chat template in the usual shape (role headers, one placeholder per media entry, the assistant turn
# closed by the end token). 'text' is looked at before 'type', as some real templates do, so content
# entries that carry "text": None (datasets rows) would break it unless the collator drops None values.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if 'text' in c %}{{ c['text'] }}"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% endif %}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}" + END + "{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CAPTIONS, 300)


@pytest.fixture(scope="module")
def chat_tok():
    t = train_tokenizer(CAPTIONS, 300)
    t.chat_template = TEMPLATE
    return t


@pytest.fixture(scope="module")
def proc(tok):
    return build_tiny_processor(tok, FRAME)


@pytest.fixture(scope="module")
def chat_proc():
    p = build_tiny_processor(train_tokenizer(CAPTIONS, 300), FRAME)
    p.chat_template = TEMPLATE
    return p


def _video(t: int, seed: int = 0, channels_last: bool = False) -> np.ndarray:
    v = np.random.default_rng(seed).integers(0, 256, (t, 3, FRAME, FRAME), dtype=np.uint8)
    return np.ascontiguousarray(v.transpose(0, 2, 3, 1)) if channels_last else v


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_layout(batch: dict, pad_id: int) -> None:
    """Left-padded prompts, right-padded completions, labels = ids with -100 at padding."""
    mask = batch["prompt_attention_mask"]
    assert mask.shape == batch["prompt_input_ids"].shape
    assert bool((mask[:, 1:] >= mask[:, :-1]).all()), "prompt padding must be on the left"
    assert bool((batch["prompt_input_ids"][mask == 0] == pad_id).all())
    ids, labels = batch["completion_input_ids"], batch["completion_labels"]
    real = labels != -100
    assert bool((real[:, 1:] <= real[:, :-1]).all()), "completion padding must be on the right"
    assert torch.equal(labels[real], ids[real])
    assert bool((ids[~real] == pad_id).all())
    assert ids.dtype == labels.dtype == mask.dtype == torch.long
    assert int(batch["chain_sizes"].sum()) == ids.shape[0]


# ------------------------------------------------------------------------------------------------------
# Video batches


def test_video_batch_follows_the_contract(proc, tok):
    collate = ChainCollator(proc, video_fps=4.0)
    records = [
        {"id": "a", "videos": [_video(4, 0, channels_last=True)], "completions": CAPTIONS[:3]},
        {"id": 7, "videos": [_video(8, 1)], "prompt": "what is shown?", "completions": CAPTIONS[3:4]},
    ]
    batch = collate(records)
    media = {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids"}
    assert set(batch) == set(CHAIN_KEYS) - {"ref_scores"} | media
    assert batch["chain_ids"] == ["a", "7"]
    assert batch["chain_sizes"].tolist() == [3, 1]
    _check_layout(batch, tok.pad_token_id)
    B, P = batch["prompt_input_ids"].shape
    assert B == 2  # one prompt row per chain, not per completion
    assert batch["completion_input_ids"].shape[0] == 4
    assert batch["mm_token_type_ids"].shape == (B, P)

    # Each completion: its tokens, then the end token.
    for s, caption in enumerate(CAPTIONS[:4]):
        n = int((batch["completion_labels"][s] != -100).sum())
        assert batch["completion_input_ids"][s, :n].tolist() == _ids(tok, caption) + [tok.eos_token_id]

    # Video tokens: grid.prod() / merge^2 per video; second_per_grid_ts from video_fps.
    grid = batch["video_grid_thw"]
    assert grid.tolist() == [[2, 4, 4], [4, 4, 4]]
    video_id = tok.convert_tokens_to_ids("<|video_pad|>")
    counts = (batch["prompt_input_ids"] == video_id).sum(1)
    assert counts.tolist() == (grid.prod(1) // 4).tolist()
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([0.5, 0.5])  # 2 frames / 4 fps

    # The media keys are the processor's own outputs for the prompts (one call, nothing renamed).
    start, end = "<|vision_start|>", "<|vision_end|>"
    texts = [
        f"{start}<|video_pad|>{end}Describe this video in detail.",
        f"{start}<|video_pad|>{end}what is shown?",
    ]
    meta = [{"total_num_frames": t, "fps": 4.0, "frames_indices": list(range(t))} for t in (4, 8)]
    ref = proc(
        text=texts,
        videos=[_video(4, 0), _video(8, 1)],
        video_metadata=meta,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    assert torch.equal(batch["prompt_input_ids"], ref["input_ids"])
    assert torch.equal(batch["prompt_attention_mask"], ref["attention_mask"])
    for key in media:
        assert torch.equal(batch[key], ref[key]), key


def test_same_prompt_and_video_give_identical_rows(proc):
    v = _video(4)
    batch = ChainCollator(proc)(
        [{"videos": [v], "completions": CAPTIONS[:2]}, {"videos": [v], "completions": CAPTIONS[2:5]}]
    )
    assert torch.equal(batch["prompt_input_ids"][0], batch["prompt_input_ids"][1])
    assert bool(batch["prompt_attention_mask"].all())
    assert batch["chain_sizes"].tolist() == [2, 3]
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([1.0, 1.0])  # default 2 fps
    pv = batch["pixel_values_videos"]
    assert torch.equal(pv[: pv.shape[0] // 2], pv[pv.shape[0] // 2 :])


def test_images_and_ref_scores(chat_proc, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (FRAME, FRAME, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    batch = ChainCollator(chat_proc)(
        [
            {"images": [arr], "completions": CAPTIONS[:2], "ref_scores": [-1.0, -2.5]},
            {"images": [str(path), Image.fromarray(arr)], "completions": CAPTIONS[2:3], "ref_scores": [3]},
        ]
    )
    assert batch["ref_scores"].dtype == torch.float32
    assert batch["ref_scores"].tolist() == [-1.0, -2.5, 3.0]
    assert {"pixel_values", "image_grid_thw"} <= set(batch)
    image_id = chat_proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = (batch["prompt_input_ids"] == image_id).sum(1).tolist()
    per_image = (batch["image_grid_thw"].prod(1) // 4).tolist()
    assert counts == [per_image[0], per_image[1] + per_image[2]]
    # A path, an array and a PIL image of the same pixels give the same pixel values.
    pv = batch["pixel_values"].view(3, -1, batch["pixel_values"].shape[-1])
    assert torch.equal(pv[0], pv[1]) and torch.equal(pv[1], pv[2])


# ------------------------------------------------------------------------------------------------------
# Prompts


def _prompt_ids(batch: dict, row: int) -> list[int]:
    return batch["prompt_input_ids"][row][batch["prompt_attention_mask"][row].bool()].tolist()


def test_string_and_conversational_prompts(chat_proc):
    tok = chat_proc.tokenizer
    v = _video(4)
    content = [{"type": "video"}, {"type": "text", "text": "what is shown?"}]
    batch = ChainCollator(chat_proc)(
        [
            {"prompt": "what is shown?", "videos": [v], "completions": CAPTIONS[:1]},
            {"prompt": [{"role": "user", "content": content}], "videos": [v], "completions": CAPTIONS[:1]},
            {"messages": [{"role": "user", "content": content}], "videos": [v], "completions": CAPTIONS[:1]},
            {"prompt": "what is shown?", "completions": CAPTIONS[:1]},  # no media: used as is
        ]
    )
    expected = "user: <|vision_start|><|video_pad|><|vision_end|>what is shown?\nassistant: "
    grid = batch["video_grid_thw"][0]
    expanded = expected.replace("<|video_pad|>", "<|video_pad|>" * int(grid.prod() // 4))
    for row in range(3):
        assert _prompt_ids(batch, row) == _ids(tok, expanded)
    assert _prompt_ids(batch, 3) == _ids(tok, "what is shown?")


def test_prompt_without_chat_template_gets_placeholders(proc, tok):
    v = _video(4)
    batch = ChainCollator(proc)(
        [
            {"prompt": "what is shown?", "videos": [v], "completions": CAPTIONS[:1]},
            {
                "prompt": "<|vision_start|><|video_pad|><|vision_end|>what is shown?",
                "videos": [v],
                "completions": CAPTIONS[:1],
            },
        ]  # fmt: skip
    )
    assert _prompt_ids(batch, 0) == _prompt_ids(batch, 1)
    assert _prompt_ids(batch, 0)[0] == tok.convert_tokens_to_ids("<|vision_start|>")


def test_text_only_tokenizer(tok, chat_tok):
    batch = ChainCollator(tok)(
        [{"prompt": "what is shown?", "completions": CAPTIONS[:2]}, {"completions": CAPTIONS[2:3]}]
    )
    assert set(batch) == set(CHAIN_KEYS) - {"ref_scores", "chain_ids"}
    _check_layout(batch, tok.pad_token_id)
    assert _prompt_ids(batch, 0) == _ids(tok, "what is shown?")
    assert _prompt_ids(batch, 1) == _ids(tok, "Describe this video in detail.")

    conv = ChainCollator(chat_tok)(
        [{"prompt": [{"role": "user", "content": "what is shown?"}], "completions": CAPTIONS[:1]}]
    )
    assert _prompt_ids(conv, 0) == _ids(chat_tok, "user: what is shown?\nassistant: ")


def test_conversational_completions_are_what_the_template_adds(chat_tok):
    prompt = [{"role": "user", "content": "what is shown?"}]
    comps = [[{"role": "assistant", "content": c}] for c in CAPTIONS[:2]]
    batch = ChainCollator(chat_tok)([{"prompt": prompt, "completions": comps}])
    _check_layout(batch, chat_tok.pad_token_id)
    for s, caption in enumerate(CAPTIONS[:2]):
        n = int((batch["completion_labels"][s] != -100).sum())
        row = batch["completion_input_ids"][s, :n].tolist()
        assert row == _ids(chat_tok, caption + END)
        assert row[-1] == chat_tok.eos_token_id  # the template's end of turn, no second EOS
    # A string prompt with conversational completions becomes one user message.
    same = ChainCollator(chat_tok)([{"prompt": "what is shown?", "completions": comps}])
    assert torch.equal(same["prompt_input_ids"], batch["prompt_input_ids"])
    assert torch.equal(same["completion_input_ids"], batch["completion_input_ids"])


def test_template_that_is_not_a_prefix_is_an_error():
    t = train_tokenizer(CAPTIONS, 300)
    t.chat_template = (
        "{% for m in messages %}{{ m['role'] }}| {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}answer: {% endif %}"
    )
    record = {
        "prompt": [{"role": "user", "content": "hi"}],
        "completions": [[{"role": "assistant", "content": "a red ball."}]],
    }
    with pytest.raises(ValueError, match=r"records\[0\]\['completions'\]\[0\].*does not start with"):
        ChainCollator(t)([record])


# ------------------------------------------------------------------------------------------------------
# Truncation, padding, memoisation


def test_truncation_and_pad_to_multiple_of(proc, tok):
    records = [{"videos": [_video(4)], "completions": CAPTIONS[:2]}, {"completions": CAPTIONS[2:3]}]
    full = ChainCollator(proc)(records)
    cut = ChainCollator(proc, max_completion_length=3)(records)
    assert cut["completion_input_ids"].shape[1] == 3
    assert torch.equal(cut["completion_input_ids"], full["completion_input_ids"][:, :3])
    assert not bool((cut["completion_input_ids"] == tok.eos_token_id).any())  # the end token was cut

    longest = int(full["prompt_attention_mask"].sum(1).max())
    ChainCollator(proc, max_prompt_length=longest)(records)
    with pytest.raises(ValueError, match=rf"records\[0\].*{longest} tokens.*max_prompt_length={longest - 1}"):
        ChainCollator(proc, max_prompt_length=longest - 1)(records)

    padded = ChainCollator(proc, pad_to_multiple_of=8)(records)
    P, L = padded["prompt_input_ids"].shape[1], padded["completion_input_ids"].shape[1]
    assert P % 8 == 0 and L % 8 == 0 and L >= full["completion_input_ids"].shape[1]
    _check_layout(padded, tok.pad_token_id)
    assert padded["mm_token_type_ids"].shape == padded["prompt_input_ids"].shape
    assert torch.equal(
        padded["prompt_input_ids"][:, -full["prompt_input_ids"].shape[1] :], full["prompt_input_ids"]
    )


def test_completion_tokens_are_memoised(tok):
    collate = ChainCollator(tok)
    calls = []
    original = collate.text.tokenizer

    class Counting:
        def __getattr__(self, name):
            return getattr(original, name)

        def __call__(self, text, **kw):
            calls.append(text)
            return original(text, **kw)

    collate.text.tokenizer = Counting()  # the collator's text side (rankloss.integrations.tokenization)
    records = [{"completions": CAPTIONS[:2]}, {"completions": CAPTIONS[:2]}]
    collate(records)
    collate(records)
    assert sum(c == CAPTIONS[0] for c in calls) == 1


# ------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "record, exc, match",
    [
        ({"prompt": "hi"}, ValueError, r"records\[1\] has no 'completions'"),
        ({"completions": "a red ball."}, TypeError, r"records\[1\]\['completions'\] must be a list"),
        ({"completions": []}, ValueError, r"records\[1\]\['completions'\] is an empty list"),
        ({"completions": ["a red ball.", "  "]}, ValueError, r"\['completions'\]\[1\] is an empty string"),
        (
            {"completions": ["a", 3]},
            TypeError,
            r"\['completions'\]\[1\] must be a non-empty string or a list",
        ),
        ({"completions": ["a", [{"role": "assistant", "content": "b"}]]}, TypeError, "mixes strings"),
        ({"completions": ["a"], "prompt": 5}, TypeError, r"records\[1\]\['prompt'\] must be a string or"),
        ({"completions": ["a"], "messages": "hi"}, TypeError, r"\['messages'\] must be a list of messages"),
        ({"completions": ["a"], "prompt": "x", "messages": []}, ValueError, "both 'prompt' and 'messages'"),
        (
            {"completions": ["a"], "videos": ["x.mp4"]},
            ValueError,
            r"records\[1\] has 0 image\(s\) and 1 video",
        ),
        ({"completions": ["a"], "ref_scores": [1.0, 2.0]}, ValueError, r"has 2 scores for 1 completions"),
        (
            {"completions": ["a"], "ref_scores": ["x"]},
            TypeError,
            r"\['ref_scores'\] must be a list of floats",
        ),
        ("not a record", TypeError, r"records\[1\] must be a dict"),
    ],
)
def test_record_errors_name_the_record_and_field(tok, record, exc, match):
    with pytest.raises(exc, match=match):
        ChainCollator(tok)([{"completions": ["a red ball."]}, record])


def test_batch_and_media_errors(proc, tok, tmp_path):
    collate = ChainCollator(proc)
    with pytest.raises(ValueError, match=r"records\[1\] has no 'ref_scores' but records\[0\] has"):
        collate([{"completions": ["a"], "ref_scores": [0.0]}, {"completions": ["b"]}])
    with pytest.raises(ValueError, match=r"records\[0\] has no 'id' but records\[1\] has"):
        collate([{"completions": ["a"]}, {"completions": ["b"], "id": "x"}])
    with pytest.raises(ValueError, match="records is empty"):
        collate([])
    with pytest.raises(TypeError, match="records must be a list"):
        collate({"completions": ["a"]})
    with pytest.raises(ValueError, match=r"records\[0\]\['videos'\]\[0\] is a file path.*num_frames"):
        collate([{"completions": ["a"], "videos": [str(tmp_path / "v.mp4")]}])
    with pytest.raises(FileNotFoundError, match=r"records\[0\]\['videos'\]\[0\]"):
        ChainCollator(proc, num_frames=4)([{"completions": ["a"], "videos": [str(tmp_path / "v.mp4")]}])
    with pytest.raises(ValueError, match=r"records\[0\]\['videos'\]\[0\] must be a uint8 frame array"):
        collate([{"completions": ["a"], "videos": [np.zeros((4, 3, 8, 8), np.float32)]}])
    with pytest.raises(ValueError, match=r"records\[0\]\['images'\]\[0\] must be a uint8 \[H, W, C\]"):
        collate([{"completions": ["a"], "images": [np.zeros((8, 8), np.uint8)]}])
    with pytest.raises(FileNotFoundError, match=r"records\[0\]\['images'\]\[0\]"):
        collate([{"completions": ["a"], "images": [str(tmp_path / "nope.png")]}])
    with pytest.raises(ValueError, match=r"records\[0\]: the prompt has 2 video placeholder\(s\).* 1 item"):
        collate([{"prompt": "<|video_pad|><|video_pad|>", "completions": ["a"], "videos": [_video(4)]}])
    with pytest.raises(ValueError, match="has no chat template"):
        collate([{"prompt": [{"role": "user", "content": "hi"}], "completions": ["a"]}])
    with pytest.raises(ValueError, match="max_completion_length must be None or an int >= 1"):
        ChainCollator(proc, max_completion_length=0)
    with pytest.raises(TypeError, match="processing_class must be a tokenizer or a processor"):
        ChainCollator("Qwen/Qwen2.5-VL-3B-Instruct")
    no_pad = train_tokenizer(CAPTIONS, 300)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        ChainCollator(no_pad)


# ------------------------------------------------------------------------------------------------------
# load_chain_dataset


def _chains_file(tmp_path: Path) -> Path:
    from rankloss.video import write_video

    (tmp_path / "videos").mkdir()
    records = []
    for i in range(3):
        write_video(tmp_path / "videos" / f"v{i}.mp4", _video(4, i), fps=8)
        records.append(
            {"id": f"v{i}", "video": f"videos/v{i}.mp4", "chain": CAPTIONS[i : i + 3], "source": {}}
        )
    records.append({"id": "short", "video": "videos/v0.mp4", "chain": CAPTIONS[:1], "source": {}})
    path = tmp_path / "chains.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_load_chain_dataset_round_trip(tmp_path, proc, tok):
    path = _chains_file(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 chain"):
        ds = load_chain_dataset(path)
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["id", "prompt", "videos", "completions"]
    assert ds["id"] == ["v0", "v1", "v2"]
    assert ds[1]["videos"] == [str(tmp_path / "videos" / "v1.mp4")]
    assert ds[1]["completions"] == CAPTIONS[1:4]
    assert ds[0]["prompt"] is None

    batch = ChainCollator(proc, num_frames=4)([ds[0], ds[2]])
    assert batch["chain_ids"] == ["v0", "v2"]
    assert batch["chain_sizes"].tolist() == [3, 3]
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4], [2, 4, 4]]
    # 4 frames of an 8 fps file: 0.5 s, so the sampled frames are 8 fps and 2 frames span 0.25 s.
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([0.25, 0.25])
    assert _prompt_ids(batch, 0)[-len(_ids(tok, "Describe this video in detail.")) :] == _ids(
        tok, "Describe this video in detail."
    )

    with pytest.warns(UserWarning, match=r"skipped 1 chain\(s\) .*after chain_length=2"):
        cut = load_chain_dataset(path, prompt="what is shown?", chain_length=2, video_root=tmp_path)
    assert cut["completions"] == [CAPTIONS[0:2], CAPTIONS[1:3], CAPTIONS[2:4]]
    assert cut["prompt"] == ["what is shown?"] * 3

    records = [json.loads(line) for line in path.read_text().splitlines()][:3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        listed = load_chain_dataset(records, video_root=tmp_path)
    assert listed["videos"] == ds["videos"]


def test_datasets_rows_with_conversational_media_prompts(chat_proc):
    """A datasets row fills the keys a content entry lacks with None ({"type": "video", "text": None})."""
    content = [{"type": "video"}, {"type": "text", "text": "what is shown?"}]
    ds = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": content}], "completions": ["a"]}]
    )
    assert ds[0]["prompt"][0]["content"][0] == {"type": "video", "text": None}
    row = {**ds[0], "videos": [_video(4)]}
    batch = ChainCollator(chat_proc)([row])
    ref = ChainCollator(chat_proc)(
        [{"prompt": "what is shown?", "completions": ["a"], "videos": [_video(4)]}]
    )
    assert torch.equal(batch["prompt_input_ids"], ref["prompt_input_ids"])


def test_load_chain_dataset_errors(tmp_path):
    path = _chains_file(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"3 video file\(s\) not found.*v0\.mp4"):
        with pytest.warns(UserWarning, match="skipped 1 chain"):
            load_chain_dataset(path, video_root=tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="no chain with at least 2 distinct captions"):
        with pytest.warns(UserWarning):
            load_chain_dataset([{"id": "a", "chain": ["one"]}])
    with pytest.raises(
        ValueError, match=r"path_or_records\[0\]: 'chain' must be a list of non-empty captions"
    ):
        load_chain_dataset([{"id": "a", "chain": ["one", ""]}])
    with pytest.raises(ValueError, match="id 'a' appears twice"):
        load_chain_dataset([{"id": "a", "chain": ["x", "y"]}, {"id": "a", "chain": ["x", "y"]}])
    with pytest.raises(ValueError, match="chain_length must be None or an int >= 2"):
        load_chain_dataset(path, chain_length=1)
    with pytest.raises(FileNotFoundError, match="chains file not found"):
        load_chain_dataset(tmp_path / "missing.jsonl")
    # Text-only chains (no video) load with an empty videos list.
    text = load_chain_dataset([{"id": "a", "chain": ["x", "y"]}])
    assert text["videos"] == [[]]


def test_batch_runs_through_the_chain_forward_like_full_sequences(proc, tok):
    """End to end: the collator's batch in ChainForward (prompt shared per chain) gives the final hidden
    states of plain Hugging Face forwards over each unpadded prompt + completion with that video."""
    from rankloss.integrations import ChainForward
    from rankloss.train.model import build_tiny_model, tiny_config

    cfg = tiny_config(tok, hidden_size=64, num_layers=2, vision_depth=1, vision_hidden_size=32)
    model = build_tiny_model(cfg, seed=0).double()
    records = [
        {"videos": [_video(4, 0)], "completions": CAPTIONS[:3]},
        {"videos": [_video(8, 1)], "prompt": "what is shown?", "completions": CAPTIONS[3:4]},
    ]
    batch = ChainCollator(proc, video_fps=4.0)(records)
    batch["pixel_values_videos"] = batch["pixel_values_videos"].double()
    with torch.no_grad():
        hidden = ChainForward(model).hidden_states(batch)
    grid = batch["video_grid_thw"]
    patches = grid.prod(1).tolist()
    owner = torch.repeat_interleave(torch.arange(2), batch["chain_sizes"]).tolist()
    for s, b in enumerate(owner):
        keep = batch["prompt_attention_mask"][b].bool()
        p, n = int(keep.sum()), int((batch["completion_labels"][s] != -100).sum())
        ids = torch.cat([batch["prompt_input_ids"][b][keep], batch["completion_input_ids"][s, :n]])
        types = torch.cat([batch["mm_token_type_ids"][b][keep], torch.zeros(n, dtype=torch.long)])
        first = sum(patches[:b])
        with torch.no_grad():
            out = model(
                input_ids=ids[None],
                pixel_values_videos=batch["pixel_values_videos"][first : first + patches[b]],
                video_grid_thw=grid[b : b + 1],
                second_per_grid_ts=batch["second_per_grid_ts"][b : b + 1],
                mm_token_type_ids=types[None],
                output_hidden_states=True,
            )
        torch.testing.assert_close(hidden[s, :n], out.hidden_states[-1][0, p - 1 : p - 1 + n])
