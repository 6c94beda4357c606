"""The accelerate recipes in ``examples/accelerate/`` (ddp.yaml, fsdp2.yaml, zero3.yaml), checked on CPU.

accelerate turns FSDP and DeepSpeed on only on accelerators, so ``accelerate launch`` with these files
cannot run here. What can run is every step of it up to starting the processes, with accelerate's own
code:

* ``load_config_from_file`` (the loader ``accelerate launch --config_file`` uses; it raises on unknown
  top-level keys), and a check that every key under ``fsdp_config`` / ``deepspeed_config`` is an option of
  ``accelerate launch`` (launch copies those keys onto its arguments without checking them, so a misspelt
  one would be ignored silently);
* ``_validate_launch_command`` then ``prepare_multi_gpu_env`` / ``prepare_deepspeed_cmd_env``: the
  environment accelerate hands the training processes (``FSDP_*``, ``ACCELERATE_*``);
* from that environment (``monkeypatch.setenv``), ``FullyShardedDataParallelPlugin()`` /
  ``DeepSpeedPlugin()`` as ``Accelerator()`` builds them, with ``set_mixed_precision("bf16")`` as
  ``AcceleratorState`` applies it;
* FSDP2: the model steps of ``Accelerator._prepare_fsdp2`` (``set_auto_wrap_policy``, ``fsdp2_apply_ac``
  for ``fsdp_activation_checkpointing``, ``fsdp2_prepare_model``) on a tiny ``ChainRankModel`` in this
  process, in a gloo group of one, then a rank-mode forward and backward;
* ZeRO-3: the DeepSpeed config dict the plugin builds (stage 3, bf16, 16-bit save), its
  ``zero_optimization`` section validated by DeepSpeed's own ``DeepSpeedZeroConfig``, and
  ``zero3_init_flag`` reaching transformers (``is_deepspeed_zero3_enabled()``) once the plugin is selected.

Not checked here: anything needing GPUs or several processes (NCCL, torchrun, ``deepspeed.initialize``,
sharding over 8 ranks); the multi-process CPU runs of the same wrapping are tests/test_fsdp_accelerate.py
and tests/test_zero3.py.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
yaml = pytest.importorskip("yaml")

import torch.distributed as dist  # noqa: E402
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file  # noqa: E402
from accelerate.commands.launch import _validate_launch_command, launch_command_parser  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "examples" / "accelerate"
EXPECTED_TYPE = {
    "ddp.yaml": DistributedType.MULTI_GPU,
    "fsdp2.yaml": DistributedType.FSDP,
    "zero3.yaml": DistributedType.DEEPSPEED,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_args(name: str):
    """``accelerate launch --config_file <recipe> train.py`` up to the launcher: the parsed and validated
    arguments, the loaded config, and whether mixed precision came from the config."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(RECIPES / name), "--main_process_port", "0", "train.py"])
    return _validate_launch_command(args)


def _launch_env(name: str) -> dict:
    """The variables ``accelerate launch`` would add to (or change in) the training processes'
    environment for ``name`` (the launcher's own code; nothing is started)."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, mp_from_config = _launch_args(name)
    if args.use_deepspeed:
        # what launch_command does before deepspeed_launcher
        fields = list(defaults.deepspeed_config.keys()) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


def _set_launch_env(monkeypatch, name: str) -> dict:
    env = {k: v for k, v in _launch_env(name).items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


# ------------------------------------------------------------------------------------------------------
# 1, 4: every recipe loads with accelerate's loader; ddp.yaml


def test_the_three_recipes_are_there():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(EXPECTED_TYPE)


@pytest.mark.parametrize("name", sorted(EXPECTED_TYPE))
def test_recipe_loads_with_accelerates_loader(name):
    path = str(RECIPES / name)
    cfg = load_config_from_file(path)
    assert isinstance(cfg, ClusterConfig)  # compute_environment LOCAL_MACHINE
    assert cfg.distributed_type == EXPECTED_TYPE[name]
    assert cfg.mixed_precision == "bf16"
    assert cfg.num_processes == 8 and cfg.num_machines == 1 and cfg.machine_rank == 0
    assert cfg.use_cpu is False
    # the loader raises on an unknown top-level key (BaseConfig.from_yaml_file's extra_keys check): the
    # recipe's keys are all dataclass fields
    raw = yaml.safe_load(Path(path).read_text())
    fields = set(ClusterConfig.__dataclass_fields__)
    assert set(raw) <= fields, sorted(set(raw) - fields)


def test_accelerates_loader_does_reject_unknown_keys(tmp_path):
    """The loader's unknown-key check that the test above leans on."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES / "ddp.yaml").read_text() + "num_gpus: 8\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_config_from_file(str(bad))


@pytest.mark.parametrize("name, section", [("fsdp2.yaml", "fsdp_config"), ("zero3.yaml", "deepspeed_config")])
def test_nested_keys_are_launch_options(name, section):
    """``accelerate launch`` copies every key under fsdp_config / deepspeed_config onto its arguments
    (``setattr``, fsdp keys prefixed ``fsdp_``) and reads only the ones it knows: an unknown key would be
    dropped without a word. Each key must be one of launch's own options."""
    cfg = load_config_from_file(str(RECIPES / name))
    nested = getattr(cfg, section)
    assert nested, f"{name} has no {section}"
    dests = {a.dest for a in launch_command_parser()._actions}
    keys = {k if section != "fsdp_config" or k.startswith("fsdp") else "fsdp_" + k for k in nested}
    assert keys <= dests, sorted(keys - dests)


@pytest.mark.parametrize("name", sorted(EXPECTED_TYPE))
def test_launch_validates_recipe(name):
    """``accelerate launch``'s own argument validation and environment building accept the recipe."""
    args, defaults, _ = _launch_args(name)
    assert args.mixed_precision == "bf16" and args.num_processes == 8 and args.num_machines == 1
    assert args.use_fsdp == (name == "fsdp2.yaml")
    assert args.use_deepspeed == (name == "zero3.yaml")
    assert args.multi_gpu == (name == "ddp.yaml")
    env = _launch_env(name)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_ddp_recipe():
    cfg = load_config_from_file(str(RECIPES / "ddp.yaml"))
    assert cfg.distributed_type == DistributedType.MULTI_GPU
    assert cfg.num_processes == 8
    assert cfg.gpu_ids == "all"
    assert cfg.fsdp_config == {} and cfg.deepspeed_config == {}
    env = _launch_env("ddp.yaml")
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env


# ------------------------------------------------------------------------------------------------------
# 2: fsdp2.yaml


def test_fsdp2_launch_env_and_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    env = _set_launch_env(monkeypatch, "fsdp2.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env  # the classes come from _no_split_modules
    assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "true"
    # on: accelerate re-ties a tied head after the meta reload through ChainRankModel.tie_weights()
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_mixed_precision("bf16")  # what AcceleratorState does with ACCELERATE_MIXED_PRECISION
    assert plugin.fsdp_version == 2
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap is None
    assert plugin.reshard_after_forward is True
    assert plugin.activation_checkpointing is True
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert isinstance(plugin.mixed_precision_policy, MixedPrecisionPolicy)
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16


@pytest.fixture
def gloo_group_of_one():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    assert not dist.is_initialized()
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _fsdp2_helpers():
    try:
        from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model  # noqa: F401
        from torch.distributed.fsdp import FSDPModule  # noqa: F401
    except ImportError:  # pragma: no cover - older torch / accelerate
        pytest.skip("FSDP2 (fully_shard) or accelerate's fsdp2_prepare_model is not available")
    # the tiny models, batches, accelerator stand-in and head-ownership probe of the multi-process test
    import test_fsdp_accelerate as tfa

    return tfa


FSDP2_KINDS = ["text_untied", "text_tied", "vlm"]


@pytest.mark.parametrize("kind", FSDP2_KINDS)
def test_fsdp2_recipe_wraps_chain_rank_model(monkeypatch, gloo_group_of_one, kind):
    """fsdp2.yaml as ``Accelerator.prepare`` would apply it (one process, a gloo group of one): every
    decoder layer / vision block its own unit, activation checkpointing around each of them, the LM head in
    the root unit (the ChainRankModel whose forward computes the loss); a rank-mode forward and backward
    run under bf16 compute with fp32 master weights."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule

    from rankloss.integrations import ChainRankModel
    from rankloss.integrations.forward import LossSpec

    tfa = _fsdp2_helpers()
    if kind == "vlm" and not tfa.HAS_VLM:
        pytest.skip("the tiny VLM needs torchvision and tokenizers")

    _set_launch_env(monkeypatch, "fsdp2.yaml")
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_mixed_precision("bf16")
    acc = tfa._AcceleratorStub(plugin, mixed_precision="bf16")

    model = tfa._model(kind, torch.float32)
    n_params = len(list(model.parameters()))  # distinct parameters: a tied head counts once
    wrapper = ChainRankModel(model)
    # Accelerator._prepare_fsdp2's model steps
    plugin.set_auto_wrap_policy(wrapper)
    assert plugin.activation_checkpointing
    wrapped = fsdp2_apply_ac(acc, wrapper)
    assert wrapped is wrapper
    wrapped = fsdp2_prepare_model(acc, wrapped)
    assert wrapped is wrapper and isinstance(wrapped, FSDPModule) and isinstance(wrapped, ChainRankModel)

    units = {n for n, m in wrapper.named_modules() if isinstance(m, FSDPModule)}
    assert units == tfa._expected_units("fsdp2", kind), sorted(units)
    for n in units - {""}:  # each layer / block unit is the checkpoint wrapper around it
        assert isinstance(wrapper.get_submodule(n), CheckpointWrapper), n
    assert sum(isinstance(m, CheckpointWrapper) for m in wrapper.modules()) == len(units) - 1

    # fully_shard replaced every parameter by a DTensor (and, with fsdp_cpu_ram_efficient_loading,
    # load_state_dict(assign=True) replaces them again): read the head now
    head = model.get_output_embeddings().weight
    assert type(head).__name__ == "DTensor"
    # a tied head is still the embedding's parameter, not a second copy trained on its own
    tied = head is model.get_input_embeddings().weight
    assert tied == (kind == "text_tied"), (
        "the wrapping untied the LM head from the input embedding (fsdp_cpu_ram_efficient_loading reloads "
        "the weights and re-ties only through the prepared module's tie_weights())"
        if kind == "text_tied"
        else "an untied head came back tied"
    )
    assert len(list(model.parameters())) == n_params
    owners = tfa._fsdp2_owners(wrapper, head)
    assert owners["public"] == [""], owners
    if owners["private"] is not None:
        assert owners["private"] == [""], owners
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())

    seen = tfa._spy_head(wrapper)
    calls = {n: 0 for n in units - {""}}  # forwards of each checkpointed layer / block
    for n in calls:

        def count(mod, args, n=n):
            calls[n] += 1

        wrapper.get_submodule(n)._checkpoint_wrapped_module.register_forward_pre_hook(count)
    mode, spec_kwargs = tfa.SPECS["pl"]
    out = wrapped(tfa._batch(kind, [0, 1], mode), mode=mode, spec=LossSpec(**spec_kwargs))
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss), loss
    assert seen and all(t in ("Tensor", "Parameter") and d == "torch.bfloat16" for t, _, d in seen), seen
    assert set(calls.values()) == {1}, calls
    loss.backward()
    assert set(calls.values()) == {2}, calls  # the backward recomputed every layer / block: checkpointing
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads, "no parameter got a gradient"
    for n, g in grads.items():
        assert g.dtype == torch.float32 and torch.isfinite(g.full_tensor()).all(), n
    head_grad = model.get_output_embeddings().weight.grad
    assert head_grad is not None and head_grad.full_tensor().abs().sum() > 0
    assert math.isfinite(loss.item())


# ------------------------------------------------------------------------------------------------------
# 3: zero3.yaml


def test_zero3_recipe_builds_deepspeed_plugin(monkeypatch):
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    env = _set_launch_env(monkeypatch, "zero3.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
    assert "ACCELERATE_DEEPSPEED_CONFIG_FILE" not in env

    plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* variables, as Accelerator() does
    plugin.set_mixed_precision("bf16")  # AcceleratorState, from ACCELERATE_MIXED_PRECISION
    assert plugin.zero_stage == 3
    assert plugin.zero3_init_flag is True
    assert plugin.is_zero3_init_enabled()
    assert plugin.hf_ds_config.is_zero3()
    cfg = plugin.deepspeed_config
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "none" and zero["offload_param"]["device"] == "none"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    # left for Accelerator.prepare to fill from the dataloader / TrainingArguments
    assert cfg["train_micro_batch_size_per_gpu"] == "auto" and cfg["gradient_accumulation_steps"] == "auto"

    # DeepSpeed's own schema accepts the ZeRO section
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    z = DeepSpeedZeroConfig(**zero)
    assert int(z.stage) == 3 and z.gather_16bit_weights_on_model_save is True

    # zero3_init_flag reaches transformers once the plugin is selected (from_pretrained then builds the
    # model under deepspeed.zero.Init)
    try:
        plugin.select(_from_accelerator_state=True)
        assert is_deepspeed_zero3_enabled()
    finally:
        unset_hf_deepspeed_config()
    assert not is_deepspeed_zero3_enabled()
