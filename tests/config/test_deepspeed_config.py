"""The DeepSpeed config generated from a RunConfig, and the checks on its pass-through block
(pure: no process group, no deepspeed import), DeepSpeed's own config classes run over it before
launch (``megadistill config``, ``megadistill train``), plus Megatron's optimizer parameter groups."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from megadistill.config import ConfigError, DataConfig, DeepSpeedConfig, OptimizerConfig, ParallelConfig, RunConfig
from megadistill.config.deepspeed import ADAM_EPS, check, check_with_deepspeed, deepspeed_config


def _cfg(passthrough=None, stage=2, **sections) -> RunConfig:
    cfg = RunConfig(
        optimizer=OptimizerConfig(backend="deepspeed", lr=3e-3, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.1, clip_grad=1.0),
        deepspeed=DeepSpeedConfig(zero_stage=stage, config=passthrough or {}),
        data=DataConfig(micro_batch_size=4, global_batch_size=32),
    )
    return dataclasses.replace(cfg, **sections)


def test_generated_config_follows_the_yaml():
    got = deepspeed_config(_cfg({"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 10}), dp_size=2)
    assert got["train_batch_size"] == 32
    assert got["train_micro_batch_size_per_gpu"] == 4
    assert got["gradient_accumulation_steps"] == 4  # 32 / (4 x 2)
    assert got["gradient_clipping"] == 1.0
    assert got["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}  # pass-through merged in
    assert got["steps_per_print"] == 10  # a default the user may change
    assert got["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True},
    }
    assert ADAM_EPS == 1e-8
    assert got["fp16"] == {"enabled": False} and got["bf16"] == {"enabled": False}
    assert "scheduler" not in got


def test_generated_config_does_not_alias_the_run_config():
    cfg = _cfg({"zero_optimization": {"reduce_bucket_size": 1000}})
    deepspeed_config(cfg, 1)["zero_optimization"]["reduce_bucket_size"] = 1
    assert cfg.deepspeed.config == {"zero_optimization": {"reduce_bucket_size": 1000}}


def test_agreeing_pass_through_keys_are_accepted():
    check(_cfg({"gradient_clipping": 1, "train_batch_size": 32, "zero_optimization": {"stage": 2}}), world_size=2)


@pytest.mark.parametrize(
    "passthrough, message",
    [
        ({"gradient_clipping": 0.5}, "deepspeed.config.gradient_clipping=0.5 contradicts optimizer.clip_grad=1.0"),
        ({"train_batch_size": 64}, "deepspeed.config.train_batch_size=64 contradicts data.global_batch_size=32"),
        ({"train_micro_batch_size_per_gpu": 8}, "deepspeed.config.train_micro_batch_size_per_gpu=8 contradicts data.micro_batch_size=4"),
        ({"gradient_accumulation_steps": 2}, "deepspeed.config.gradient_accumulation_steps=2 contradicts data.global_batch_size / (data.micro_batch_size x data-parallel size 2)=4"),
        ({"zero_optimization": {"stage": 3}}, "deepspeed.config.zero_optimization.stage=3 contradicts deepspeed.zero_stage=2"),
        ({"optimizer": {"type": "Adam"}}, "deepspeed.config.optimizer is not allowed"),
        ({"scheduler": {"type": "WarmupLR"}}, "deepspeed.config.scheduler is not allowed: the learning-rate schedule is megadistill's"),
        ({"bf16": {"enabled": True}}, "deepspeed.config.bf16.enabled=True contradicts model.precision='fp32'"),
        ({"fp16": {"enabled": True}}, "deepspeed.config.fp16.enabled=True"),
        ({"zero_optimization": 2}, "deepspeed.config.zero_optimization must be a mapping"),
        # Keys that would silently change the backend's arithmetic.
        ({"managed_gradient_accumulation": False}, "deepspeed.config.managed_gradient_accumulation=False is not allowed: the backend needs True"),
        ({"gradient_allreduce_op": "sum"}, "deepspeed.config.gradient_allreduce_op='sum' is not allowed: the backend needs 'mean'"),
        ({"data_types": {"grad_accum_dtype": "bf16"}}, "deepspeed.config.data_types.grad_accum_dtype='bf16' is not allowed"),
    ],
)
def test_pass_through_contradictions_name_both_keys(passthrough, message):
    with pytest.raises(ConfigError) as e:
        check(_cfg(passthrough), world_size=2)
    assert message in str(e.value)


def test_world_size_dependent_keys_wait_for_a_known_world_size():
    # Before launch the data-parallel size is unknown: not guessed from this shell's environment.
    passthrough = {"gradient_accumulation_steps": 2, "train_batch_size": 32}
    check(_cfg(passthrough), world_size=None)
    check(_cfg(passthrough), world_size=4)  # DP 4: 32 / (4 x 4) = 2
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=2 contradicts"):
        check(_cfg(passthrough), world_size=2)


def test_deepspeed_rejects_pipeline_parallelism_and_sequence_parallel():
    with pytest.raises(ConfigError, match="does not support pipeline parallelism.*pipeline_model_parallel_size=2"):
        check(_cfg(parallel=ParallelConfig(pipeline_model_parallel_size=2)), world_size=2)
    with pytest.raises(ConfigError, match="parallel.sequence_parallel"):
        check(_cfg(parallel=ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)), world_size=2)


def test_check_ignores_the_megatron_backend():
    cfg = _cfg({"gradient_clipping": 0.5}, parallel=ParallelConfig(pipeline_model_parallel_size=2))
    check(dataclasses.replace(cfg, optimizer=OptimizerConfig(backend="megatron")), world_size=2)


def test_check_does_not_import_deepspeed_or_megatron():
    # Config validation runs before any process group, in a process that may never train.
    code = (
        "import sys; from megadistill.config import RunConfig, OptimizerConfig; "
        "from megadistill.config.deepspeed import check; "
        "check(RunConfig(optimizer=OptimizerConfig(backend='deepspeed')), world_size=1); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'megatron')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.fixture(scope="module")
def ds_version():
    """DeepSpeed imported as the backend imports it on CPU (its CPU accelerator, no JIT-built op)."""
    from megadistill.deepspeed.env import configure_accelerator

    configure_accelerator()
    import deepspeed

    return deepspeed.__version__


UNKNOWN_TO_DEEPSPEED = [
    ({"zero_optimization": {"bogus_key": 1}}, "deepspeed.config.zero_optimization.bogus_key: DeepSpeed {v} does not know this key"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu", "bogus": 1}}},
     "deepspeed.config.zero_optimization.offload_optimizer.bogus: DeepSpeed {v} does not know this key"),
    ({"zero_optimization": {"reduce_bucket_size": "lots"}},
     "deepspeed.config.zero_optimization.reduce_bucket_size: Input should be a valid integer, unable to parse string as an "
     "integer (got 'lots')"),
    ({"bf16": {"bogus": 1}}, "deepspeed.config.bf16.bogus: DeepSpeed {v} does not know this key"),
    ({"tensorboard": {"enabled": False, "bogus": 1}}, "deepspeed.config.tensorboard.bogus: DeepSpeed {v} does not know this key"),
]


@pytest.mark.parametrize("passthrough, message", UNKNOWN_TO_DEEPSPEED)
def test_deepspeed_s_own_config_classes_check_the_pass_through_block(passthrough, message, ds_version):
    check(_cfg(passthrough), world_size=2)  # nothing the pure check knows about
    with pytest.raises(ConfigError) as e:
        check_with_deepspeed(_cfg(passthrough))
    assert str(e.value) == message.format(v=ds_version)


def test_deepspeed_s_own_config_classes_accept_what_runs(ds_version):
    # The data-parallel size is unknown before launch: its keys are the pure check's (at a known world size).
    check_with_deepspeed(_cfg({"zero_optimization": {"reduce_bucket_size": 1000, "stage3_param_persistence_threshold": 0},
                               "gradient_accumulation_steps": 7, "train_batch_size": 32}, stage=3))
    check_with_deepspeed(_cfg(model=dataclasses.replace(RunConfig().model, precision="fp16")))
    check_with_deepspeed(RunConfig())  # the Megatron backend: nothing to check


def test_config_and_train_reject_a_key_deepspeed_does_not_know(tmp_path, capsys, monkeypatch, ds_version):
    """Before: `megadistill config` printed the run and training died in deepspeed.initialize with a
    pydantic traceback after the process groups started."""
    from megadistill.cli import main
    from megadistill.launch import TORCHRUN_MARKERS

    for k in list(__import__("os").environ):  # one process, not under a launcher
        if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") or k in TORCHRUN_MARKERS:
            monkeypatch.delenv(k)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "optimizer": {"backend": "deepspeed"},
                                    "deepspeed": {"config": {"zero_optimization": {"bogus_key": 1}}}}))
    expected = (f"megadistill: error: deepspeed.config.zero_optimization.bogus_key: DeepSpeed {ds_version} does not "
                "know this key\n")
    for command in (["config", str(path)], ["train", str(path), "--no-progress"]):
        assert main(command) == 2, command
        out = capsys.readouterr()
        assert out.err.endswith(expected) and out.out == "", (command, out)
    assert not (tmp_path / "out").exists()  # stopped before the run started
    assert main(["config", str(path), "--schema-only"]) == 0  # the config alone: DeepSpeed is not asked
    capsys.readouterr()


def _groups_vs_megatron():
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import _get_param_groups, get_standard_config_overrides

    from megadistill.deepspeed.param_groups import megatron_param_groups
    from megadistill.testing.models import tiny_gpt

    model = tiny_gpt(2, 32, 4, 128, 16)
    ours = megatron_param_groups(model, lr=1e-3, min_lr=1e-4)
    config = MegatronOptimizerConfig(lr=1e-3, min_lr=1e-4)
    # The overrides get_megatron_optimizer applies (biases and 1-D parameters undecayed): passed
    # explicitly, as megatron-core 0.19 no longer applies them for None (0.16 did; both accept them).
    theirs = _get_param_groups([model], config, get_standard_config_overrides(config))
    keys = ("wd_mult", "lr_mult", "max_lr", "min_lr")
    return (
        [([id(p) for p in g["params"]], {k: g[k] for k in keys}) for g in ours],
        [([id(p) for p in g["params"]], {k: g[k] for k in keys}) for g in theirs],
        [n for n, p in model.named_parameters() if any(p is q for q in ours[1]["params"])],
    )


def test_param_groups_are_megatrons():
    from megadistill.testing import run_distributed

    ours, theirs, no_decay = run_distributed(_groups_vs_megatron, 1)[0]
    assert ours == theirs
    assert no_decay and all(n.endswith(("bias", "layer_norm_weight", "norm.weight")) for n in no_decay), no_decay
