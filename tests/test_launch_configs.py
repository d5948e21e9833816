"""Every Accelerate config in configs/ builds as `accelerate launch` builds it, and lorafam decides
right under each launch: how the processes form a group, DeepSpeed's config from the recipe, the
dtype 4-bit weights are packed in.

Nothing here starts processes or needs DeepSpeed: the launcher's own code turns each config file
into the environment its processes get, and Accelerate's FSDP and DeepSpeed plugins are built from
that environment, exactly as each process builds them (tests/test_distributed.py runs real launches).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, patch_environment
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env
from torch.distributed.fsdp import CPUOffloadPolicy

from lorafam.errors import LorafamError
from lorafam.hardware import launched_engine, process_group
from lorafam.quant import bnb_config, check_sharded_storage
from lorafam.recipe import ModelConfig, load_recipe
from lorafam.engine import configure_deepspeed
from lorafam.trainer import layout_of

ROOT = Path(__file__).parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def launch(path: Path) -> tuple[dict[str, str], int]:
    """What `accelerate launch --config_file PATH script.py` exports to its processes, and how many it
    starts: the launcher's own steps, as accelerate.commands.launch.launch_command takes them."""
    args = launch_command_parser().parse_args(["--config_file", str(path), "script.py"])
    args, defaults, precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed and not args.cpu:
        fields = list(defaults.deepspeed_config) if defaults else []
        fields += ["mixed_precision"] if precision_from_config else []
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif (args.use_fsdp or args.multi_gpu) and not args.cpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    exported = {k: v for k, v in env.items() if os.environ.get(k) != v and k != "PYTHONPATH"}
    return exported, args.num_processes


def fsdp_plugin(env: dict[str, str]) -> FullyShardedDataParallelPlugin:
    with patch_environment(**env):
        return FullyShardedDataParallelPlugin()


def deepspeed_plugin(env: dict[str, str]) -> DeepSpeedPlugin:
    with patch_environment(**env):
        return DeepSpeedPlugin()


def check_fsdp2(env: dict[str, str]) -> None:
    plugin = fsdp_plugin(env)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # full shard
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"  # per decoder layer
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert not plugin.cpu_ram_efficient_loading and not plugin.activation_checkpointing
    assert not isinstance(plugin.cpu_offload, CPUOffloadPolicy)


def check_deepspeed(stage: int):
    def check(env: dict[str, str]) -> None:
        plugin = deepspeed_plugin(env)
        config = plugin.deepspeed_config
        assert plugin.zero_stage == stage and config["zero_optimization"]["stage"] == stage
        # Left to lorafam, which fills them from the recipe (test_deepspeed_config_comes_from_the_recipe).
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert config[key] == "auto", key
        assert "optimizer" not in config and "scheduler" not in config
        assert config["zero_optimization"]["offload_optimizer"]["device"] == "none"
        assert config["zero_optimization"]["offload_param"]["device"] == "none"
        assert not plugin.zero3_init_flag  # lorafam adapts the model before Accelerate prepares it

    return check


# Per config: the launcher, the process count, what lorafam must see, and the engine's settings.
EXPECTED = {
    "cpu.yaml": ("simple", 1, {"ACCELERATE_USE_CPU": "True"}, None),
    "single_gpu.yaml": ("simple", 1, {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "bf16"}, None),
    "ddp.yaml": ("multi_gpu", 2, {"ACCELERATE_MIXED_PRECISION": "no"}, None),
    "fsdp2.yaml": ("fsdp", 2, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, check_fsdp2),
    "deepspeed_zero2.yaml": ("deepspeed", 2, {"ACCELERATE_USE_DEEPSPEED": "true"}, check_deepspeed(2)),
    "deepspeed_zero3.yaml": ("deepspeed", 2, {"ACCELERATE_USE_DEEPSPEED": "true"}, check_deepspeed(3)),
}


def test_every_shipped_config_is_checked():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_builds_as_accelerate_launch_builds_it(path, monkeypatch):
    launcher, processes, exported, check_engine = EXPECTED[path.name]
    env, count = launch(path)
    assert count == processes
    assert {k: env.get(k) for k in exported} == exported
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    with patch_environment(**env):
        assert launched_engine() == (launcher if launcher in ("fsdp", "deepspeed") else None)
        if launcher == "deepspeed":  # on this CPU machine: gloo by name, not cpu=True (which drops DeepSpeed)
            assert process_group() == ((False, "gloo") if not torch.cuda.is_available() else (False, None))
    if check_engine is not None:
        check_engine(env)
    # Every config leaves the precision to the recipe, except the single-GPU one (bf16).
    assert env["ACCELERATE_MIXED_PRECISION"] == ("bf16" if path.name == "single_gpu.yaml" else "no")


def test_a_broken_fsdp_config_is_rejected(tmp_path):
    text = (ROOT / "configs" / "fsdp2.yaml").read_text().replace("FULL_STATE_DICT", "WHOLE_STATE_DICT")
    (tmp_path / "bad.yaml").write_text(text)
    env, _ = launch(tmp_path / "bad.yaml")
    with pytest.raises(KeyError, match="WHOLE_STATE_DICT"):  # Accelerate's lookup of the state dict type
        fsdp_plugin(env)


def test_a_broken_deepspeed_config_is_rejected(tmp_path):
    # A DeepSpeed config file plus accelerate-level settings it would silently ignore.
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    text = (ROOT / "configs" / "deepspeed_zero2.yaml").read_text()
    text = text.replace("  zero_stage: 2\n", f"  deepspeed_config_file: {tmp_path / 'ds.json'}\n  zero_stage: 2\n")
    (tmp_path / "bad.yaml").write_text(text)
    env, _ = launch(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="the following accelerate config variables will be ignored"):
        deepspeed_plugin(env)


# --------------------------------------------------------------------------------------------------
# DeepSpeed's config comes from the recipe


def recipe(tmp_path: Path, **train) -> object:
    path = tmp_path / "r.yaml"
    settings = {"batch_size": 2, "grad_accum": 4, "max_grad_norm": 0.5} | train
    path.write_text(json.dumps({"model": {"name": "m"}, "adapter": {"variant": "lora"}, "data": {"train": "d.jsonl"},
                                "train": settings}))
    return load_recipe(path)


def prepared_config(yaml_text: str, spec, processes: int, tmp_path: Path) -> dict:
    (tmp_path / "launch.yaml").write_text(yaml_text)
    env, _ = launch(tmp_path / "launch.yaml")
    plugin = deepspeed_plugin(env)
    configure_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)), spec, layout_of(spec, processes))
    return plugin.deepspeed_config


def test_deepspeed_config_comes_from_the_recipe(tmp_path):
    zero2 = (ROOT / "configs" / "deepspeed_zero2.yaml").read_text()
    config = prepared_config(zero2, recipe(tmp_path), 2, tmp_path)
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 16 and config["gradient_clipping"] == 0.5
    config = prepared_config(zero2, recipe(tmp_path, max_grad_norm=None), 2, tmp_path)
    assert config["gradient_clipping"] == 0.0  # no clipping


def test_a_deepspeed_config_that_contradicts_the_recipe_is_refused(tmp_path):
    zero2 = (ROOT / "configs" / "deepspeed_zero2.yaml").read_text()
    accum = zero2.replace("  zero_stage: 2\n", "  zero_stage: 2\n  gradient_accumulation_steps: 1\n")
    with pytest.raises(LorafamError, match=(
        r"^the DeepSpeed config sets gradient_accumulation_steps: 1, but the recipe's train.grad_accum is 4; lorafam "
        r"lays out each step from the recipe: remove gradient_accumulation_steps from the DeepSpeed config \(or set it to auto\)$"
    )):
        prepared_config(accum, recipe(tmp_path), 2, tmp_path)
    # The same value is no contradiction.
    assert prepared_config(accum, recipe(tmp_path, grad_accum=1), 2, tmp_path)["gradient_accumulation_steps"] == 1
    clipping = zero2.replace("  zero_stage: 2\n", "  zero_stage: 2\n  gradient_clipping: 1.0\n")
    with pytest.raises(LorafamError, match="sets gradient_clipping: 1.0, but the recipe's train.max_grad_norm is 0.5"):
        prepared_config(clipping, recipe(tmp_path), 2, tmp_path)


def test_a_deepspeed_config_with_its_own_optimizer_is_refused(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({
        "zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
    }))
    text = f"distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  deepspeed_config_file: {tmp_path / 'ds.json'}\n"
    with pytest.raises(LorafamError, match="the DeepSpeed config has a 'optimizer' section"):
        prepared_config(text, recipe(tmp_path), 2, tmp_path)


def test_a_deepspeed_config_file_with_another_micro_batch_is_refused(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}))
    text = f"distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  deepspeed_config_file: {tmp_path / 'ds.json'}\n"
    with pytest.raises(LorafamError, match="sets train_micro_batch_size_per_gpu: 8, but the recipe's train.batch_size is 2"):
        prepared_config(text, recipe(tmp_path), 2, tmp_path)


# --------------------------------------------------------------------------------------------------
# 4-bit weights under FSDP


NF4 = ModelConfig(name="m", quantization="nf4", compute_dtype="bfloat16")


def test_4bit_weights_are_packed_in_the_compute_dtype_under_fsdp(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert bnb_config(NF4).bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' default, one process
    env, _ = launch(ROOT / "configs" / "fsdp2.yaml")
    with patch_environment(**env):
        assert bnb_config(NF4).bnb_4bit_quant_storage == torch.bfloat16
        assert bnb_config(NF4.model_copy(update={"compute_dtype": "float16"})).bnb_4bit_quant_storage == torch.float16
    env, _ = launch(ROOT / "configs" / "deepspeed_zero3.yaml")
    with patch_environment(**env):  # DeepSpeed casts floating-point weights to its own precision
        assert bnb_config(NF4).bnb_4bit_quant_storage == torch.uint8


def test_fsdp_refuses_a_4bit_base_whose_compute_dtype_is_not_the_autocast_dtype(monkeypatch):
    env, _ = launch(ROOT / "configs" / "fsdp2.yaml")
    with patch_environment(**env):
        check_sharded_storage(NF4, "bf16")
        check_sharded_storage(NF4, "no")
        with pytest.raises(LorafamError, match=(
            r"^model.compute_dtype: float32 under FSDP with bf16 mixed precision: FSDP casts every weight it shards to "
            r"bfloat16, and the 4-bit weights are packed in float32 there; set model.compute_dtype: bfloat16 "
            r"\(or train.mixed_precision: no\)$"
        )):
            check_sharded_storage(NF4.model_copy(update={"compute_dtype": "float32"}), "bf16")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    check_sharded_storage(NF4.model_copy(update={"compute_dtype": "float32"}), "bf16")  # one process: fine


# --------------------------------------------------------------------------------------------------
# train.mixed_precision: null takes the launch's precision


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state, fixed by the first Accelerator: a launched process
    starts without one, and the runs after this test must not inherit its precision either."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("launched", ["bf16", "no"])
def test_null_mixed_precision_trains_in_what_accelerate_launch_was_configured_with(launched, tmp_path, fresh_accelerate_state):
    """configs/cpu.yaml with its mixed_precision set to ``launched``, turned into the environment
    `accelerate launch` gives its process, and a recipe with ``train.mixed_precision: null``: the run
    records and prints the launch's precision, and its training forward passes run in it."""
    from tinyrun import cli, make_model_folder, make_text_data, write_recipe

    text = (ROOT / "configs" / "cpu.yaml").read_text().replace("mixed_precision: 'no'", f"mixed_precision: '{launched}'")
    (tmp_path / "launch.yaml").write_text(text)
    env, processes = launch(tmp_path / "launch.yaml")
    assert processes == 1 and env["ACCELERATE_MIXED_PRECISION"] == launched
    env.pop("OMP_NUM_THREADS", None)  # the thread count is fixed once torch has started; not under test

    model = make_model_folder(tmp_path / "model")
    recipe = write_recipe(tmp_path / "r.yaml", model, make_text_data(tmp_path / "d.jsonl"), tmp_path / "run",
                          train={"max_steps": 2, "save_every": None, "mixed_precision": None})
    assert load_recipe(recipe).train.mixed_precision is None
    dtypes: set[torch.dtype] = set()

    def record(module: torch.nn.Module, args, output) -> None:  # the adapted layers' base matmuls
        if module.training and isinstance(module, torch.nn.Linear) and torch.is_grad_enabled():
            dtypes.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        with patch_environment(**env):
            result = cli("train", recipe)
    finally:
        handle.remove()
    assert result.exit_code == 0, result.output
    shown = "fp32" if launched == "no" else launched
    assert f"precision: {shown} (from accelerate launch's config ({launched}))" in result.output
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["precision"] == {"mixed_precision": launched, "requested": None,
                                 "reason": f"from accelerate launch's config ({launched})"}
    assert dtypes == {torch.bfloat16 if launched == "bf16" else torch.float32}


def test_auto_precision_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch):
    """train.mixed_precision: auto on a CPU-only machine, from the CPU's flags (/proc/cpuinfo)."""
    import lorafam.hardware as hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "use_cpu", lambda: True)
    cases = {
        frozenset({"avx2", "avx512f"}): "no",  # AVX-512 without its bf16 extension: emulated, fp32 wins
        frozenset({"avx2", "avx512_bf16"}): "bf16",
        frozenset({"amx_bf16", "amx_tile"}): "bf16",
        None: "no",  # flags unreadable (not Linux)
    }
    for flags, expected in cases.items():
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: None if flags is None else set(flags))
        chosen = hardware.choose_precision("auto")
        assert (chosen.mixed_precision, chosen.requested) == (expected, "auto"), (flags, chosen)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert hardware.choose_precision("no").mixed_precision == "no"  # an explicit choice wins over the launch
    assert hardware.choose_precision(None).mixed_precision == "bf16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert hardware.choose_precision(None).mixed_precision == "no"  # a plain `python -m lorafam`: no launch
