"""Stage 0 of the example trainer (``--vision-pretrain proxy``): the proxy labels, the tower's training
(merger untouched), SFT with the pretrained tower frozen (merger trained), the per-seed cache, and
``--vision-pretrain none`` being exactly the SFT stage as it was before stage 0 existed."""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")
pytest.importorskip("torchvision")

from rankloss.synthetic import COLOURS, Event, Scene, SceneObject, random_scene, render  # noqa: E402
from rankloss.train import vision_pretrain as vp  # noqa: E402
from rankloss.train.config import TrainConfig  # noqa: E402
from rankloss.train.data import synthetic_chains, synthetic_frames  # noqa: E402
from rankloss.train.model import build_tiny_model, build_tiny_processor, tiny_config, train_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_video_rank.py"

TINY = [
    *("--num-videos", "10", "--heldout", "3", "--chain-length", "3", "--frames", "4", "--max-objects", "2"),
    *("--hidden-size", "32", "--num-layers", "1", "--vision-depth", "1", "--vision-hidden-size", "32"),
    *("--vocab-size", "300", "--batch-size", "2", "--eval-batch-size", "4", "--max-new-tokens", "4"),
    *("--log-every", "1", "--no-progress", "--threads", "1", "--no-compare", "--rank-steps", "1"),
    *("--sft-steps", "3", "--sft-lr", "1e-2", "--save-every", "0"),
]
PROXY = ["--vision-pretrain", "proxy", "--vision-pretrain-steps", "6", "--vision-pretrain-batch-size", "4"]


def _script():
    spec = importlib.util.spec_from_file_location("train_video_rank_vp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _context(tmp_path: Path, extra: list[str], name: str = "run"):
    """A prepared run folder and its Context, in this process (one process, CPU)."""
    from rankloss.train.loop import NullReporter, build_context, make_accelerator

    script = _script()
    config = script.parse_config([*TINY, *extra, "--output-dir", str(tmp_path / name), "--cpu"])
    acc = make_accelerator(config)
    run_dir = str(tmp_path / name)
    config.output_dir = run_dir
    script.prepare_run(config, run_dir, acc)
    return build_context(config, run_dir, acc, NullReporter())


def _weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out
    return out


def _tower_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if "visual." in k and "visual.merger." not in k]


def _merger_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if "visual.merger." in k]


# ------------------------------------------------------------------------------------------------------
# Labels


def test_labels_of_a_hand_built_scene():
    scene = Scene(
        (
            SceneObject("red", "circle", "medium"),
            SceneObject("blue", "square", "large", 2),
            SceneObject("green", "triangle", "small"),
        ),
        (Event(1, "appearing"), Event(2, "disappearing")),
    )  # blue squares appear in [0, 1/2); the green triangle disappears in [1/2, 1)
    n = len(vp.PROXY_CLASSES)
    red, blue, green = (
        vp.proxy_class(c, s) for c, s in (("red", "circle"), ("blue", "square"), ("green", "triangle"))
    )
    assert vp.PROXY_CLASSES[red] == ("red", "circle") and n == len(COLOURS) * 3

    def on(tau: float) -> set[int]:
        y = vp.proxy_labels(scene, tau, 56)
        assert y.shape == (n,) and y.dtype == np.float32
        return set(np.flatnonzero(y).tolist())

    assert on(0.0) == {red, green}  # the squares have not grown yet (scale 0)
    assert on(0.3) == {red, blue, green}
    assert on(0.75) == {red, blue, green}  # the triangle is half its size
    assert on(0.999) == {red, blue}  # shrunk below half a pixel: not drawn
    assert vp.frame_time(0, 4) == 0.125 and vp.frame_time(3, 4) == 0.875


def test_labels_agree_with_the_rendered_pixels():
    """Each labelled object's colour is in the frame, each colour in the frame belongs to a labelled
    object (on random scenes; objects are never fully hidden behind others often enough to matter)."""
    rng = random.Random(0)
    misses = checks = 0
    for _ in range(40):
        scene = random_scene(rng, max_objects=3)
        frames = render(scene, 8, 56, 56)
        for t in range(8):
            px = {tuple(p) for p in frames[t].reshape(3, -1).T.tolist()}
            drawn = {c for c, rgb in COLOURS.items() if tuple(rgb) in px}
            labelled = {scene.objects[i].colour for i in vp.visible_objects(scene, vp.frame_time(t, 8), 56)}
            assert drawn <= labelled  # nothing is drawn that the labels miss
            misses += len(labelled - drawn)  # occlusion only
            checks += len(labelled)
    assert misses <= 0.02 * checks


def test_fast_patchify_is_the_processors():
    tok = train_tokenizer(["a red circle", "two blue squares"], 300)
    proc = build_tiny_processor(tok, 56)
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 3, 56, 56), dtype=np.uint8)
    a, ga = vp.pixel_values(frames, proc.video_processor, fast=True)
    b, gb = vp.pixel_values(frames, proc.video_processor, fast=False)
    assert torch.equal(ga, gb) and a.shape == b.shape
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Stage 0 on a model


@pytest.fixture(scope="module")
def small():
    cfg = TrainConfig(num_videos=16, heldout=4, frames=4, frame_size=56, max_objects=3)
    chains = synthetic_chains(cfg)
    frames = synthetic_frames(cfg)
    tok = train_tokenizer([c for ch in chains for c in ch.captions], 300)
    proc = build_tiny_processor(tok, 56)
    mcfg = tiny_config(tok, hidden_size=32, num_layers=1, vision_depth=1, vision_hidden_size=32)
    return chains, frames, proc, mcfg


def test_stage0_lowers_the_proxy_loss_and_keeps_the_merger(small):
    chains, frames, proc, mcfg = small

    def train(steps: int):
        model = build_tiny_model(mcfg, seed=0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = vp.pretrain_tower(
            model,
            train=chains,
            heldout=chains,  # measured on the frames it trains on: is the loss going down?
            frames=frames.frames,
            video_processor=proc.video_processor,
            seed=0,
            steps=steps,
            batch_size=8,
            lr=5e-3,
        )
        return model, before, out

    _, _, untrained = train(0)
    model, before, out = train(40)
    assert out["fast_patchify"]
    assert out["heldout"]["loss"] < 0.8 * untrained["heldout"]["loss"]
    assert set(out["heldout"]) >= {"f1", "colour_f1", "shape_f1"}
    after = model.state_dict()
    merger = [k for k in after if ".visual.merger." in k or k.startswith("visual.merger.")]
    tower = [k for k in after if "visual." in k and k not in merger]
    rest = [k for k in after if "visual." not in k]
    assert merger and tower and rest
    assert all(torch.equal(before[k], after[k]) for k in merger)
    assert all(torch.equal(before[k], after[k]) for k in rest)
    assert any(not torch.equal(before[k], after[k]) for k in tower)
    assert all(p.requires_grad for p in model.parameters())  # left as it was

    # deterministic per seed
    again, _, out2 = train(40)
    assert out2["heldout"] == out["heldout"]
    assert all(
        torch.equal(a, b) for a, b in zip(vp.tower_state(model).values(), vp.tower_state(again).values())
    )


def test_proxy_f1_on_colour_and_shape():
    nc, ns = len(COLOURS), 3
    labels = torch.zeros(2, nc * ns)
    labels[0, vp.proxy_class("red", "circle")] = 1
    labels[1, vp.proxy_class("blue", "square")] = 1
    logits = torch.full_like(labels, -5.0)
    logits[0, vp.proxy_class("red", "square")] = 5  # right colour, wrong shape
    logits[1, vp.proxy_class("blue", "square")] = 5
    m = vp.proxy_f1(logits, labels)
    assert m["f1"] == pytest.approx(0.5)
    assert m["colour_f1"] == pytest.approx(1.0)
    assert m["shape_f1"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------------
# In a run


def test_sft_after_stage0_freezes_the_tower_and_trains_the_merger(tmp_path: Path, monkeypatch):
    from rankloss.train.loop import read_jsonl, run_sft_task

    ctx = _context(tmp_path, PROXY)
    done = run_sft_task(ctx, 0)
    assert done["vision_pretrain"]["heldout"]["f1"] >= 0
    stage0 = os.path.join(ctx.run_dir, "seed0", "vision_pretrain")
    record = json.loads(Path(stage0, "done.json").read_text())
    assert record["steps"] == 6 and {"f1", "colour_f1", "shape_f1"} <= set(record["heldout"])
    tower = torch.load(os.path.join(stage0, "tower.pt"), weights_only=True)
    sft = _weights(os.path.join(ctx.run_dir, "seed0", "sft", "model"))
    init = {  # names relative to visual (the saved model and the module name it differently)
        k.split("visual.", 1)[1]: v
        for k, v in build_tiny_model(ctx.model_config, seed=0).state_dict().items()
        if "visual." in k
    }
    keys = _tower_keys(sft)
    assert keys and _merger_keys(sft)
    for k in keys:  # the SFT model's tower is stage 0's, unchanged by SFT
        torch.testing.assert_close(sft[k], tower[k.split("visual.", 1)[1]], rtol=0, atol=0)
    rel = lambda k: k.split("visual.", 1)[1]  # noqa: E731
    assert any(not torch.equal(sft[k], init[rel(k)]) for k in keys)  # and stage 0 did train it
    assert any(not torch.equal(sft[k], init[rel(k)]) for k in _merger_keys(sft))  # SFT trained the merger
    records = read_jsonl(os.path.join(ctx.run_dir, "seed0", "sft", "metrics.jsonl"))
    assert any(r.get("event") == "vision_pretrain" and "f1" in r["metrics"] for r in records)

    # The cache: a second stage 0 of the seed trains nothing and gives the same tower.
    def boom(*a, **k):
        raise AssertionError("stage 0 trained again instead of reading its cache")

    monkeypatch.setattr(vp, "pretrain_tower", boom)
    again, state = vp.run_vision_pretrain(ctx, 0)
    assert again["cached"] is True and again["heldout"] == record["heldout"]
    assert all(torch.equal(state[k], tower[k]) for k in tower)

    # The arm afterwards trains the tower (not ':frozen').
    from rankloss.train.config import Arm
    from rankloss.train.loop import run_arm_task

    ctx.config.lr = 1e-2
    path = os.path.join(ctx.run_dir, "arm_model")
    run_arm_task(ctx, 0, Arm("plackett_luce"), save_to=path)
    arm = _weights(path)
    assert any(not torch.equal(arm[k], sft[k]) for k in keys)


def test_none_is_the_sft_stage_as_before(tmp_path: Path):
    """``--vision-pretrain none``: the SFT model is bit for bit what the SFT stage's code
    path without stage 0 gives (the calls ``run_sft_task`` made before stage 0 existed)."""
    from rankloss.train.loop import MetricsLog, _save_model, run_sft_task, run_steps, setup_stage

    ctx = _context(tmp_path, ["--vision-pretrain", "none"], "a")
    run_sft_task(ctx, 0)
    got = _weights(os.path.join(ctx.run_dir, "seed0", "sft", "model"))
    assert not os.path.exists(os.path.join(ctx.run_dir, "seed0", "vision_pretrain"))

    ref_ctx = _context(tmp_path, ["--vision-pretrain", "none"], "b")
    directory = os.path.join(ref_ctx.run_dir, "seed0", "ref")
    os.makedirs(directory)
    log = MetricsLog(os.path.join(directory, "m.jsonl"), {}, True)
    cfg = ref_ctx.config
    stage = setup_stage(
        ref_ctx,
        ref_ctx.new_model(0),
        seed=0,
        task="sft",
        directory=directory,
        steps=cfg.sft_steps,
        lr=cfg.sft_lr,
        freeze_vision=False,
        log=log,
    )
    run_steps(
        ref_ctx,
        stage,
        seed=0,
        task="sft",
        directory=directory,
        mode="sft",
        spec=None,
        ref_scores=None,
        log=log,
        beta=cfg.beta,
    )
    _save_model(ref_ctx, stage.wrapper, os.path.join(directory, "model"))
    want = _weights(os.path.join(directory, "model"))
    assert set(want) == set(got)
    for k in got:
        assert torch.equal(got[k], want[k]), k
    assert any("visual." in k and "merger" not in k for k in got)


def test_flags_are_checked(tmp_path: Path, capsys):
    script = _script()
    with pytest.raises(SystemExit) as e:
        script.parse_config(["--vision-pretrain", "none", "--vision-pretrain-steps", "5"])
    assert e.value.code == 2 and "--vision-pretrain proxy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_config(["--vision-pretrain", "proxy", "--vision-pretrain-lr", "0"])
    assert "--vision-pretrain-lr" in capsys.readouterr().err
    cfg = script.parse_config(["--vision-pretrain", "proxy"])
    assert (cfg.vision_pretrain_steps, cfg.vision_pretrain_batch_size, cfg.vision_pretrain_lr) == (
        1000,
        32,
        5e-3,
    )
    # auto (the default): stage 0 for the tiny model on synthetic videos, none for a chains file
    assert script.parse_config([]).vision_pretrain == "proxy"
    assert script.parse_config(["--vision-pretrain-steps", "5"]).vision_pretrain_steps == 5
    chains = tmp_path / "chains.jsonl"  # the flags are checked before the file is read
    chains.write_text("")
    chains = str(chains)
    assert script.parse_config(["--data", chains]).vision_pretrain == "none"
    assert script.parse_config(["--data", chains, "--vision-pretrain", "proxy"]).vision_pretrain == "proxy"
    with pytest.raises(SystemExit):
        script.parse_config(["--data", chains, "--vision-pretrain-steps", "5"])
    assert "add --vision-pretrain proxy" in capsys.readouterr().err
    # another model family's checkpoint: refused by name
    ckpt = tmp_path / "llava"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llava_onevision", "vision_config": {}}))
    from rankloss.train.model import vision_model_types

    if "llava_onevision" in vision_model_types():
        with pytest.raises(SystemExit):
            script.parse_config(["--model", str(ckpt), "--vision-pretrain", "proxy"])
        err = capsys.readouterr().err
        assert "--vision-pretrain" in err and "llava_onevision" in err
