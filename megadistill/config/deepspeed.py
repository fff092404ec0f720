"""The DeepSpeed JSON config of a run, generated from its ``RunConfig`` (pure: no deepspeed import).

What the YAML already says (batch sizes, clipping, ZeRO stage, the student's precision
``model.precision`` -- DeepSpeed's ``bf16``/``fp16`` blocks, fp16 loss scaling from the
``optimizer.*loss_scale*`` keys --) is generated from it and
must not be contradicted by the ``deepspeed.config`` pass-through block; anything else (bucket
sizes, ZeRO-3 thresholds, offload, logging) passes through unchanged. The optimizer is AdamW with
Megatron's hyper-parameters; the learning-rate schedule is megadistill's own (Megatron's
``OptimizerParamScheduler``, stepped by the backend), so DeepSpeed gets neither an ``optimizer``
nor a ``scheduler`` block from the user.

:func:`check` raises ``ConfigError`` for every problem; the run's config validation calls it
before any process group exists. :func:`deepspeed_config` builds the dict ``deepspeed.initialize``
takes. :func:`check_with_deepspeed` hands that dict to DeepSpeed's own config classes (it imports
deepspeed; ``megadistill.preflight`` calls it, so ``megadistill config`` and ``megadistill train``
reject a key DeepSpeed does not know before any process group starts).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

from megadistill.config.schema import ConfigError, RunConfig

ADAM_EPS = 1e-8
"""Megatron's ``OptimizerConfig.adam_eps`` default (the Megatron backend uses it too)."""

# Blocks the user may not pass through, and why.
_REJECTED_BLOCKS = {
    "optimizer": "the optimizer is generated from the optimizer section (AdamW with its lr, betas, weight_decay)",
    "scheduler": "the learning-rate schedule is megadistill's (optimizer.lr_schedule, warmup_fraction, min_lr)",
    "datastates": "an asynchronous checkpoint writer would still be writing after the checkpoint is committed",
}
# Mixed-precision modes other than the student's own bf16/fp16 weights (model.precision).
_PRECISION_BLOCKS = ("amp", "torch_autocast")

# Settings megadistill picks but the user may change freely (quieter logs; nothing numerical).
_DEFAULTS = {
    "steps_per_print": 2**31 - 1,
    "wall_clock_breakdown": False,
}


def _dp_size(cfg: RunConfig, world_size: Optional[int]) -> Optional[int]:
    if world_size is None:
        return None  # unknown before launch: the settings that depend on it are checked then
    model_parallel = cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
    return max(1, world_size // model_parallel)


# Settings the backend's arithmetic relies on, pinned whatever the pass-through block says: the
# loss scaling (dp / global tokens per micro-batch sum) assumes gradients *averaged* over the
# data-parallel group, one optimizer update per global batch, and fp32 accumulation.
_PINNED = {
    ("gradient_allreduce_op",): ("mean", "gradients averaged over data-parallel ranks, as its loss scaling assumes"),
    ("managed_gradient_accumulation",): (True, "one optimizer update per global batch"),
    ("data_types", "grad_accum_dtype"): ("fp32", "gradients accumulate in fp32 whatever model.precision"),
}


def _from_yaml(cfg: RunConfig, dp_size: Optional[int]) -> dict[tuple[str, ...], tuple[Any, str]]:
    """Generated settings by DeepSpeed key path: ``(value, the YAML key or reason it comes from)``;
    with ``dp_size`` None, those that depend on the data-parallel size are left out."""
    d, o = cfg.data, cfg.optimizer
    out = {
        ("train_micro_batch_size_per_gpu",): (d.micro_batch_size, "data.micro_batch_size"),
        ("gradient_clipping",): (o.clip_grad, "optimizer.clip_grad"),
        ("zero_optimization", "stage"): (cfg.deepspeed.zero_stage, "deepspeed.zero_stage"),
        **_PINNED,
        **_precision(cfg),
    }
    if dp_size is not None:
        out[("train_batch_size",)] = (d.global_batch_size, "data.global_batch_size")
        out[("gradient_accumulation_steps",)] = (
            d.global_batch_size // (d.micro_batch_size * dp_size),
            f"data.global_batch_size / (data.micro_batch_size x data-parallel size {dp_size})",
        )
    return out


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        path = prefix + (str(k),)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, path))
        else:
            out[path] = v
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def check(cfg: RunConfig, world_size: Optional[int] = None) -> None:
    """Raise ``ConfigError`` if ``cfg`` cannot run on the DeepSpeed backend (does nothing for
    ``optimizer.backend: megatron``). With ``world_size`` None (not known before launch), the
    settings that depend on the data-parallel size are not compared."""
    if cfg.optimizer.backend != "deepspeed":
        return
    par = cfg.parallel
    if par.pipeline_model_parallel_size > 1:
        raise ConfigError(
            f"optimizer.backend=deepspeed does not support pipeline parallelism "
            f"(parallel.pipeline_model_parallel_size={par.pipeline_model_parallel_size}): use "
            "optimizer.backend=megatron for PP > 1, or set parallel.pipeline_model_parallel_size=1"
        )
    if par.sequence_parallel:
        raise ConfigError(
            "optimizer.backend=deepspeed does not support parallel.sequence_parallel (its layer-norm "
            "gradients need Megatron's tensor-parallel all-reduce): set parallel.sequence_parallel=false"
        )
    o = cfg.optimizer
    if cfg.model.precision == "fp16" and not o.loss_scale and not math.log2(o.initial_loss_scale).is_integer():
        raise ConfigError(f"optimizer.initial_loss_scale {o.initial_loss_scale} must be a power of two on "
                          "optimizer.backend=deepspeed (DeepSpeed's fp16.initial_scale_power)")
    if cfg.deepspeed.zero_stage not in (1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage: {cfg.deepspeed.zero_stage!r} is not one of (1, 2, 3)")
    passed = cfg.deepspeed.config
    if not isinstance(passed, dict):
        raise ConfigError(f"deepspeed.config must be a mapping of DeepSpeed config keys, got {passed!r}")
    for block, why in _REJECTED_BLOCKS.items():
        if block in passed:
            raise ConfigError(f"deepspeed.config.{block} is not allowed: {why}")
    for block in _PRECISION_BLOCKS:
        value = passed.get(block)
        enabled = value.get("enabled", False) if isinstance(value, dict) else value
        if enabled not in (False, None, "auto"):
            raise ConfigError(
                f"deepspeed.config.{block}.enabled={enabled!r}: the DeepSpeed backend trains the student in "
                f"model.precision (fp32, bf16 or fp16) without autocast (remove deepspeed.config.{block})"
            )
    precision = cfg.model.precision or "fp32"
    for block in ("bf16", "fp16"):
        value = passed.get(block)
        enabled = value.get("enabled", False) if isinstance(value, dict) else value
        if enabled not in (None, "auto") and bool(enabled) != (precision == block):
            raise ConfigError(
                f"deepspeed.config.{block}.enabled={enabled!r} contradicts model.precision={precision!r}: set "
                f"model.precision instead (remove deepspeed.config.{block}.enabled)"
            )
    if isinstance(passed.get("checkpoint"), dict) and "writer" in passed["checkpoint"]:
        raise ConfigError(
            "deepspeed.config.checkpoint.writer is not allowed: a decoupled checkpoint writer would still be "
            "writing after the checkpoint is committed (megadistill checksums and commits it on save)"
        )
    if "zero_optimization" in passed and not isinstance(passed["zero_optimization"], dict):
        raise ConfigError(f"deepspeed.config.zero_optimization must be a mapping, got {passed['zero_optimization']!r}")
    generated = _from_yaml(cfg, _dp_size(cfg, world_size))
    flat = _flatten(passed)
    for path, value in flat.items():
        for gen_path, (gen_value, yaml_key) in generated.items():
            if path == gen_path and not _same(value, gen_value) and gen_path in _PINNED:
                raise ConfigError(
                    f"deepspeed.config.{'.'.join(path)}={value!r} is not allowed: the backend needs "
                    f"{gen_value!r}: {yaml_key} (remove it from deepspeed.config)"
                )
            if path == gen_path and not _same(value, gen_value):
                source = yaml_key.split(" ")[0]
                change = f", or change {source}" if source.split(".")[0] in ("data", "optimizer", "deepspeed") else ""
                raise ConfigError(
                    f"deepspeed.config.{'.'.join(path)}={value!r} contradicts {yaml_key}={gen_value!r} "
                    f"(remove it from deepspeed.config{change})"
                )
            if path[: len(gen_path)] == gen_path and path != gen_path:
                raise ConfigError(f"deepspeed.config.{'.'.join(gen_path)} must be a value, got a mapping")


def deepspeed_config(cfg: RunConfig, dp_size: int) -> dict:
    """The config dict for ``deepspeed.initialize``: generated settings, then the pass-through
    block merged over the defaults (``check`` has ruled out contradictions)."""
    check(cfg, dp_size * cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)
    o = cfg.optimizer
    out = copy.deepcopy(_DEFAULTS)
    _merge(out, copy.deepcopy(cfg.deepspeed.config))
    for path, (value, _) in _from_yaml(cfg, dp_size).items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    out["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": o.lr,
            "betas": [o.adam_beta1, o.adam_beta2],
            "eps": ADAM_EPS,
            "weight_decay": o.weight_decay,
            # torch.optim.AdamW, as Megatron's optimizer falls back to without Apex/TE: the same
            # update arithmetic, and no JIT-compiled FusedAdam / CPUAdam op.
            "torch_adam": True,
        },
    }
    return out


# Generated from the data-parallel size, which is not known where check_with_deepspeed runs.
_DP_DEPENDENT = ("train_batch_size", "gradient_accumulation_steps")

# DeepSpeed's config classes whose errors name a field of one block of the config (their ``loc``),
# for when the field's name alone does not tell the block (e.g. ``enabled``).
_MODEL_BLOCKS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16",
                 "DeepSpeedFP16Config": "fp16"}


def check_with_deepspeed(cfg: RunConfig) -> None:
    """Raise ``ConfigError`` naming the ``deepspeed.config.<key>`` DeepSpeed's own config classes
    reject (pydantic models that forbid unknown keys and check types, and its consistency checks),
    in the config :func:`deepspeed_config` generates -- as ``deepspeed.initialize`` would, at the
    start of training. Nothing for ``optimizer.backend: megatron``.

    Imports deepspeed (a few seconds; on a machine without CUDA, call
    ``megadistill.deepspeed.env.configure_accelerator`` first). Run before any process group: the
    config is built for data-parallel size 1, leaving out the pass-through values that depend on it
    (:func:`check` compares those for a known world size). DeepSpeed's log lines are held back
    meanwhile, so that ``megadistill config`` prints only the config."""
    if cfg.optimizer.backend != "deepspeed":
        return
    import dataclasses
    import logging

    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    from pydantic import ValidationError

    passed = {k: v for k, v in cfg.deepspeed.config.items() if k not in _DP_DEPENDENT}
    one = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, config=passed))
    generated = deepspeed_config(one, 1)
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)
    try:
        DeepSpeedConfig(copy.deepcopy(generated))
    except ValidationError as e:  # before ValueError, its base class
        raise ConfigError(_validation_message(e, generated, deepspeed.__version__)) from None
    except (DeepSpeedConfigError, AssertionError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"deepspeed.config: DeepSpeed {deepspeed.__version__} rejects the config generated from this "
                          f"run: {_one_line(e)}") from None
    finally:
        ds_logger.setLevel(level)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _node_paths(tree: dict, prefix: tuple[str, ...] = ()):
    for k, v in tree.items():
        yield prefix + (str(k),)
        if isinstance(v, dict):
            yield from _node_paths(v, prefix + (str(k),))


def _validation_message(e, generated: dict, version: str) -> str:
    """One line for a pydantic ``ValidationError`` from DeepSpeed's config classes: the first error's
    key as ``deepspeed.config.<path>`` (found in the config by the error's location within its
    class), what is wrong with it, and how many more errors there are."""
    errors = e.errors()
    first = errors[0]
    loc = tuple(str(x) for x in first.get("loc", ()))
    found = [p for p in _node_paths(generated) if loc and p[-len(loc):] == loc]
    block = _MODEL_BLOCKS.get(e.title)
    if block and len(found) > 1:
        found = [p for p in found if p[0] == block] or found
    if len(found) == 1:
        key = "deepspeed.config." + ".".join(found[0])
    else:
        key = "deepspeed.config." + ".".join(((block,) if block else ()) + loc) if block or loc else "deepspeed.config"
        if not block:
            key += f" (in DeepSpeed's {e.title})"
    if first.get("type") == "extra_forbidden":
        what = f"DeepSpeed {version} does not know this key"
    else:
        what = f"{first.get('msg', 'invalid')} (got {first.get('input')!r})"
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return f"{key}: {what}{more}"


def _precision(cfg: RunConfig) -> dict[tuple[str, ...], tuple[Any, str]]:
    """DeepSpeed's ``bf16`` / ``fp16`` blocks for ``model.precision`` (null = fp32): the engine keeps
    fp32 master weights and optimizer state for a half-precision student."""
    p = cfg.model.precision or "fp32"
    out = {
        ("bf16", "enabled"): (p == "bf16", "model.precision"),
        ("fp16", "enabled"): (p == "fp16", "model.precision"),
    }
    if p == "fp16":
        o = cfg.optimizer
        # DeepSpeed: loss_scale 0 = dynamic, starting at 2**initial_scale_power.
        out[("fp16", "loss_scale")] = (o.loss_scale or 0, "optimizer.loss_scale")
        if not o.loss_scale:
            power = math.log2(o.initial_loss_scale)
            out[("fp16", "initial_scale_power")] = (int(power), "optimizer.initial_loss_scale (a power of two)")
            out[("fp16", "loss_scale_window")] = (o.loss_scale_window, "optimizer.loss_scale_window")
            out[("fp16", "hysteresis")] = (o.hysteresis, "optimizer.hysteresis")
            out[("fp16", "min_loss_scale")] = (o.min_loss_scale, "optimizer.min_loss_scale")
    return out


def _merge(into: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
