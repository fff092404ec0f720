"""The schema check of a run configuration: everything that can be checked from the config alone,
for a given world size (None = unknown: what depends on it is skipped).

Pure: no file system, tokenizer or checkpoint reads (those are ``megadistill.preflight``'s), no
process group. Every error is a ``ConfigError`` naming the key. A valid config that probably does
not do what was meant gets a :class:`ConfigWarning` naming the keys (:func:`config_warnings`), said
by the launch's first rank only."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings

from megadistill import launch, preemption
from megadistill.config.deepspeed import check as check_deepspeed
from megadistill.config.schema import (
    CHOICES,
    COMPRESSIONS,
    LOGPROB_ENCODINGS,
    MIN_VOCAB_SIZE,
    MODEL_CHOICES,
    ConfigError,
    ModelConfig,
    RunConfig,
    accepted_world_sizes,
)


def check_split(split: str) -> str:
    """``" 90, 10"`` → ``"90,10"``, checked. Megatron's own parser silently skips stray characters
    (``"-5"`` reads as ``5``, ``"1e-3"`` as ``1,3``), so only plain decimal numbers pass here."""
    parts = [p.strip() for p in split.split(",")] if isinstance(split, str) else []
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", p) for p in parts):
        raise ValueError(f"split must be 1 to 3 comma-separated non-negative numbers (train,valid,test), got {split!r}")
    if float(parts[0]) == 0:
        raise ValueError(f"split {split!r} leaves no documents for training")
    return ",".join(parts)


def _positive(cfg, section: str, *names: str, allow_zero: bool = False) -> None:
    obj = cfg
    for part in section.split("."):
        obj = getattr(obj, part)
    for n in names:
        v = getattr(obj, n)
        if v is None:
            continue
        if v < 0 or (v == 0 and not allow_zero):
            raise ConfigError(f"{section}.{n} must be {'>= 0' if allow_zero else '> 0'}, got {v}")


def _check_finite(node, prefix: str = "") -> None:
    """Every number anywhere in the config is finite (configs built in code skip ``_coerce``)."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")


def _accepted_hint(cfg: RunConfig) -> str:
    sizes = accepted_world_sizes(cfg)
    if not sizes:
        return ""
    shown = ", ".join(map(str, sizes[:8])) + (", ..." if len(sizes) > 8 else "")
    return f" (world sizes this layout accepts: {shown})"


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """The schema: everything that can be checked from the config alone, for ``world_size`` ranks
    (None = unknown: what depends on it is skipped). Pure: no file system, tokenizer or checkpoint
    reads (those are ``megadistill.preflight``)."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    _positive(cfg, "parallel", "tensor_model_parallel_size", "pipeline_model_parallel_size")
    models = [("model", cfg.model, (tp, pp), "parallel")]
    if cfg.teacher.mode == "online":
        _validate_teacher_layout(cfg)
        own = cfg.teacher.parallel.tensor_model_parallel_size or cfg.teacher.parallel.pipeline_model_parallel_size
        models.append(("teacher.model", cfg.teacher.model, cfg.teacher.layout(par),
                       "teacher.parallel" if own else "parallel"))
    for key, m, (m_tp, m_pp), where in models:
        _positive(cfg, key, "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "init_method_std")
        if m.hidden_size % m.num_attention_heads:
            raise ConfigError(f"{key}.hidden_size {m.hidden_size} is not divisible by num_attention_heads {m.num_attention_heads}")
        if m.num_attention_heads % m_tp:
            raise ConfigError(f"{key}.num_attention_heads {m.num_attention_heads} is not divisible by {where}.tensor_model_parallel_size {m_tp}")
        if m.num_layers % m_pp:
            raise ConfigError(f"{key}.num_layers {m.num_layers} is not divisible by {where}.pipeline_model_parallel_size {m_pp}")
        if m.ffn_hidden_size is not None and m.ffn_hidden_size % m_tp:
            raise ConfigError(f"{key}.ffn_hidden_size {m.ffn_hidden_size} is not divisible by {where}.tensor_model_parallel_size {m_tp}")
        for d in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(m, d) < 1.0:
                raise ConfigError(f"{key}.{d} must be in [0, 1), got {getattr(m, d)}")
        _validate_architecture(cfg, key, m)
    if cfg.teacher.mode == "online":
        s, t = cfg.model.make_vocab_size_divisible_by, cfg.teacher.model.make_vocab_size_divisible_by
        if s % t:
            raise ConfigError(f"teacher.model.make_vocab_size_divisible_by {t} does not divide model.make_vocab_size_divisible_by "
                              f"{s}: the teacher shares the student's padded vocabulary")
    if world_size is not None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"world size must be a positive integer, got {world_size!r}")
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size x "
                f"parallel.pipeline_model_parallel_size = {tp} x {pp} = {tp * pp}{_accepted_hint(cfg)}"
            )
    d = cfg.data
    _positive(cfg, "data", "vocab_size", "seq_length", "micro_batch_size", "global_batch_size")
    if world_size is not None:
        dp = world_size // (tp * pp)
        if d.global_batch_size % (d.micro_batch_size * dp):
            raise ConfigError(
                f"data.global_batch_size {d.global_batch_size} is not divisible by data.micro_batch_size "
                f"{d.micro_batch_size} x data-parallel size {dp}{_accepted_hint(cfg)}"
            )
    elif d.global_batch_size % d.micro_batch_size:
        raise ConfigError(
            f"data.global_batch_size {d.global_batch_size} is not divisible by data.micro_batch_size "
            f"{d.micro_batch_size} (at any data-parallel size)"
        )
    try:
        check_split(d.split)
    except ValueError as e:
        raise ConfigError(f"data.split: {e}") from e
    parts = [float(x) for x in d.split.split(",")]
    if len(parts) != 3 or parts[0] <= 0 or parts[1] <= 0:
        raise ConfigError(f"data.split must be three weights 'train,valid,test' with train and valid > 0, got {d.split!r}")
    if d.tokenizer_type == "huggingface" and d.tokenizer_model is None:
        raise ConfigError("data.tokenizer_type huggingface needs data.tokenizer_model (a tokenizer.json or a Hugging Face "
                          "tokenizer directory): only sentencepiece tokenizers are trained on the fly")
    if d.tokenizer_model is None and d.vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"data.vocab_size must be >= {MIN_VOCAB_SIZE} for a new tokenizer, got {d.vocab_size}")
    if d.data_prefix is not None and d.tokenizer_model is None:
        raise ConfigError("data.data_prefix needs data.tokenizer_model (the tokenizer the data was made with)")
    if d.seed is not None and not 0 <= d.seed < 2**31:
        raise ConfigError(f"data.seed must be in [0, 2**31), got {d.seed}")
    if d.train_samples is not None and d.train_samples < cfg.training.train_steps * d.global_batch_size:
        raise ConfigError(
            f"data.train_samples {d.train_samples} is less than the {cfg.training.train_steps * d.global_batch_size} "
            "samples the run trains on (training.train_steps x data.global_batch_size)")

    o = cfg.optimizer
    _positive(cfg, "optimizer", "lr")
    _positive(cfg, "optimizer", "min_lr", "weight_decay", "clip_grad", allow_zero=True)
    _positive(cfg, "optimizer", "loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis")
    if o.min_loss_scale > o.initial_loss_scale:
        raise ConfigError(f"optimizer.min_loss_scale {o.min_loss_scale} exceeds optimizer.initial_loss_scale {o.initial_loss_scale}")
    if o.min_lr > o.lr:
        raise ConfigError(f"optimizer.min_lr {o.min_lr} exceeds optimizer.lr {o.lr}")
    for n in ("warmup_fraction", "wsd_decay_fraction"):
        if not 0.0 <= getattr(o, n) < 1.0:
            raise ConfigError(f"optimizer.{n} must be in [0, 1), got {getattr(o, n)}")
    if o.lr_schedule == "wsd" and o.warmup_fraction + o.wsd_decay_fraction > 1.0:
        raise ConfigError("optimizer.warmup_fraction + optimizer.wsd_decay_fraction must be <= 1 for lr_schedule wsd")
    for n in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(o, n) < 1.0:
            raise ConfigError(f"optimizer.{n} must be in [0, 1), got {getattr(o, n)}")
    _positive(cfg, "training", "train_steps", "eval_interval", "eval_steps", "log_interval")
    if not 0 <= cfg.training.seed < 2**31 - 1000:  # each pipeline stage adds 100 x its rank
        raise ConfigError(f"training.seed must be in [0, 2**31 - 1000), got {cfg.training.seed}")
    _check_finite(cfg)
    _positive(cfg, "checkpoint", "save_interval", "save_interval_minutes", allow_zero=True)
    try:
        preemption.parse_signals(cfg.checkpoint.stop_signals, "checkpoint.stop_signals")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    _validate_data_selection(cfg)

    try:
        cfg.kd.alpha.validate("kd.alpha")
        cfg.kd.temperature_schedule.validate("kd.temperature_schedule")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    _warn(config_warnings(cfg))

    t = cfg.teacher
    if t.mode == "offline" and not t.store:
        raise ConfigError(
            "teacher.store is required for teacher.mode=offline (a logits store written by "
            "megadistill precompute-logits)"
        )
    if t.mode == "online" and t.checkpoint is None:
        raise ConfigError("teacher.checkpoint is required for teacher.mode=online (a distributed checkpoint directory)")

    _validate_record_logits(cfg)
    _validate_fused_output_layer(cfg)
    _validate_prepass(cfg)
    _validate_interleaved(cfg, world_size)
    if world_size is not None and t.mode == "online":
        _validate_teacher_layout_for(cfg, world_size)

    if o.backend == "deepspeed":
        _validate_deepspeed(cfg, world_size)


class ConfigWarning(UserWarning):
    """A valid config that probably does not do what was meant."""


def config_warnings(cfg: RunConfig) -> list[str]:
    """What :func:`validate` warns about ``cfg``, one line each naming the keys (pure)."""
    out = []
    a, steps = cfg.kd.alpha, cfg.training.train_steps
    if cfg.teacher.mode != "none" and a.kind == "salt" and a.alpha_max > 0 and a.n_kd > steps:
        out.append(f"kd.alpha.n_kd {a.n_kd} is larger than training.train_steps {steps}: KD (alpha "
                   f"kd.alpha.alpha_max={a.alpha_max}) lasts the whole run and SALT never switches to plain LM "
                   "training; lower kd.alpha.n_kd below training.train_steps for the switch (or use kd.alpha.kind "
                   "constant to say KD throughout)")
    return out


def _warn(messages: list[str]) -> None:
    """Each message as a :class:`ConfigWarning`, by the launch's first rank only (every rank validates
    the config); Python shows a warning once per process however often the config is validated."""
    if not messages:
        return
    try:
        # The node list is not expanded (no scontrol call): only the rank matters here.
        first = launch.resolve(hostnames=lambda nodes: [nodes]).rank == 0
    except launch.LaunchError:
        first = True  # a launch error is reported where the launch is made; say the warning meanwhile
    if first:
        for message in messages:
            warnings.warn(message, ConfigWarning, stacklevel=1)


def _validate_architecture(cfg: RunConfig, key: str, m: ModelConfig) -> None:
    """``key`` (model or teacher.model): the precision and architecture options, for the run's TP."""
    tp = cfg.parallel.tensor_model_parallel_size
    for name, choices in MODEL_CHOICES.items():
        if getattr(m, name) not in choices:
            raise ConfigError(f"{key}.{name}: {getattr(m, name)!r} is not one of {choices}")
    _positive(cfg, key, "layernorm_epsilon", "rotary_base", "make_vocab_size_divisible_by", "max_position_embeddings")
    g = m.num_query_groups
    if g is not None:
        if g <= 0:
            raise ConfigError(f"{key}.num_query_groups must be > 0, got {g}")
        if m.num_attention_heads % g:
            raise ConfigError(f"{key}.num_query_groups {g} does not divide num_attention_heads {m.num_attention_heads}")
        if g % tp:
            raise ConfigError(f"{key}.num_query_groups {g} is not divisible by parallel.tensor_model_parallel_size {tp} "
                              "(each tensor-parallel rank holds whole key/value heads)")
    if not 0.0 < m.rotary_percent <= 1.0:
        raise ConfigError(f"{key}.rotary_percent must be in (0, 1], got {m.rotary_percent}")
    if m.kv_channels is not None and (isinstance(m.kv_channels, bool) or not isinstance(m.kv_channels, int)
                                      or m.kv_channels <= 0):
        raise ConfigError(f"{key}.kv_channels must be a positive integer or null, got {m.kv_channels!r}")
    if m.rope_scaling_factor is not None and not m.rope_scaling_factor >= 1.0:
        raise ConfigError(f"{key}.rope_scaling_factor must be >= 1 or null, got {m.rope_scaling_factor!r}")
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    if int(head_dim * m.rotary_percent) % 2:
        raise ConfigError(f"{key}.rotary_percent {m.rotary_percent} rotates {int(head_dim * m.rotary_percent)} of the "
                          f"{head_dim} dimensions of a head: RoPE needs an even number")
    if m.max_position_embeddings is not None and m.max_position_embeddings < cfg.data.seq_length:
        raise ConfigError(f"{key}.max_position_embeddings {m.max_position_embeddings} is shorter than data.seq_length "
                          f"{cfg.data.seq_length}")
    if cfg.parallel.sequence_parallel and m.transformer_impl == "local":
        raise ConfigError(f"parallel.sequence_parallel needs Transformer Engine layers, but {key}.transformer_impl is local")


def _validate_fused_output_layer(cfg: RunConfig) -> None:
    """kd.fused_output_layer: what the fused output layer + loss cannot serve."""
    if not cfg.kd.fused_output_layer:
        return
    if cfg.record_logits.store is not None:
        raise ConfigError("kd.fused_output_layer cannot record logits (record_logits.store needs the student's logits): "
                          "set kd.fused_output_layer=false")
    if cfg.optimizer.backend == "deepspeed" and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("kd.fused_output_layer is not supported with deepspeed.zero_stage 3 (ZeRO-3 releases the "
                          "output weight after the model's forward, before the loss reads it): use zero_stage 1 or 2")


def _validate_interleaved(cfg: RunConfig, world_size: int | None) -> None:
    """parallel.virtual_pipeline_model_parallel_size: megatron-core's interleaved schedule."""
    par = cfg.parallel
    vpp = par.virtual_pipeline_model_parallel_size
    if vpp is None:
        return
    key = "parallel.virtual_pipeline_model_parallel_size"
    if isinstance(vpp, bool) or not isinstance(vpp, int) or vpp < 2:
        raise ConfigError(f"{key} must be an integer >= 2 (model chunks per pipeline rank) or null, got {vpp!r}")
    pp = par.pipeline_model_parallel_size
    if pp < 2:
        raise ConfigError(f"{key} {vpp} needs parallel.pipeline_model_parallel_size >= 2, got {pp}")
    if cfg.model.num_layers % (pp * vpp):
        raise ConfigError(f"model.num_layers {cfg.model.num_layers} is not divisible by parallel.pipeline_model_parallel_size "
                          f"x {key} = {pp} x {vpp}: each model chunk holds an equal share of the layers")
    if cfg.optimizer.backend != "megatron":
        raise ConfigError(f"{key} needs optimizer.backend megatron (megatron-core's interleaved schedule), got {cfg.optimizer.backend}")
    if cfg.teacher.mode == "online" and cfg.teacher.placement != "prepass":
        raise ConfigError(
            f"{key}: a co-located online teacher cannot run under the interleaved schedule (its hidden states "
            "would have to ride the stage tensors, which that schedule cannot widen): set teacher.placement prepass"
        )
    if cfg.kd.fused_output_layer:
        raise ConfigError(f"{key} is not supported with kd.fused_output_layer yet: set kd.fused_output_layer false")
    if cfg.record_logits.store is not None:
        raise ConfigError(f"{key} is not supported with record_logits.store")
    if world_size is not None and world_size % (par.tensor_model_parallel_size * pp) == 0:
        dp = world_size // (par.tensor_model_parallel_size * pp)
        d = cfg.data
        m = d.global_batch_size // (d.micro_batch_size * dp)
        if d.global_batch_size % (d.micro_batch_size * dp) == 0 and (m < pp or m % pp):
            raise ConfigError(
                f"{key}: the interleaved schedule needs a multiple of PP = {pp} (and at least PP) micro-batches per "
                f"step and rank (megatron-core's groups of PP per model chunk), got data.global_batch_size / "
                f"(data.micro_batch_size x DP) = {d.global_batch_size} / ({d.micro_batch_size} x {dp}) = {m}"
            )


def _validate_teacher_layout(cfg: RunConfig) -> None:
    """teacher.parallel: positive sizes, and only for a pre-pass teacher."""
    lay = cfg.teacher.parallel
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        v = getattr(lay, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"teacher.parallel.{name} must be a positive integer or null, got {v!r}")
    own = cfg.teacher.layout(cfg.parallel)
    student = (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    if own != student and cfg.teacher.placement != "prepass":
        raise ConfigError(
            f"teacher.parallel (TP {own[0]} x PP {own[1]}) differs from the student's layout (TP {student[0]} x PP "
            f"{student[1]}): only a pre-pass teacher has a layout of its own; set teacher.placement prepass"
        )


def _validate_teacher_layout_for(cfg: RunConfig, world_size: int) -> None:
    """teacher.parallel against the world size: TP x PP divides it, and every teacher replica gets
    an equal share of each step's micro-batches."""
    t_tp, t_pp = cfg.teacher.layout(cfg.parallel)
    if world_size % (t_tp * t_pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by the teacher's TP x PP = {t_tp} x {t_pp} = {t_tp * t_pp} "
            "(teacher.parallel)"
        )
    t_dp, d = world_size // (t_tp * t_pp), cfg.data
    if d.global_batch_size % d.micro_batch_size == 0 and (d.global_batch_size // d.micro_batch_size) % t_dp:
        raise ConfigError(
            f"teacher.parallel: the teacher's {t_dp} data-parallel replicas cannot share a step's "
            f"{d.global_batch_size // d.micro_batch_size} micro-batches (data.global_batch_size / data.micro_batch_size) equally"
        )


def _validate_prepass(cfg: RunConfig) -> None:
    """teacher.placement prepass: an online teacher whose targets can be held as sparse ones."""
    t = cfg.teacher
    if t.placement == "colocated":
        return
    if t.mode != "online":
        raise ConfigError(f"teacher.placement {t.placement} is for teacher.mode=online, got teacher.mode={t.mode}")
    if cfg.kd.loss == "mse":
        raise ConfigError("teacher.placement prepass hands the student sparse targets; kd.loss mse compares whole "
                          "logits: use teacher.placement colocated")
    if t.prepass_targets == "top_p_k" and not cfg.kd.truncates:
        raise ConfigError(
            "teacher.placement prepass with prepass_targets top_p_k needs truncated targets (kd.top_p < 1 or "
            "kd.top_k): untruncated KD needs the teacher's dense logits, which only teacher.placement colocated "
            "provides (or use prepass_targets rskd)"
        )
    if cfg.kd.is_reverse_kl and cfg.kd.truncation == "renormalize":
        raise ConfigError(
            "teacher.placement prepass hands the student sparse targets; kd.loss reverse KL is infinite against them "
            "when renormalised (the student has mass outside the kept ids): set kd.truncation ghost"
        )
    if t.prepass_targets == "rskd" and (isinstance(t.prepass_draws, bool) or not isinstance(t.prepass_draws, int)
                                        or t.prepass_draws < 1):
        raise ConfigError(f"teacher.prepass_draws must be a positive integer, got {t.prepass_draws!r}")


def _validate_record_logits(cfg: RunConfig) -> None:
    """record_logits: a plain LM run (its own logits are the targets)."""
    r = cfg.record_logits
    if r.store is None:
        return
    if cfg.teacher.mode != "none":
        raise ConfigError(
            f"record_logits.store needs teacher.mode=none (a run recording its own logits trains without KD), "
            f"got teacher.mode={cfg.teacher.mode}"
        )
    selection = getattr(cfg, "data_selection", None)
    if selection is not None and selection.scores is not None:
        raise ConfigError(
            "record_logits.store records every training sample in order (sample i at step i // "
            "data.global_batch_size) and cannot be combined with data_selection.scores"
        )
    if not 0.0 < r.top_p <= 1.0:
        raise ConfigError(f"record_logits.top_p must be in (0, 1], got {r.top_p}")
    if r.top_k is not None and r.top_k < 1:
        raise ConfigError(f"record_logits.top_k must be a positive integer or null, got {r.top_k}")
    if not 1 <= r.draws < 2**20:
        raise ConfigError(f"record_logits.draws must be in [1, 2**20), got {r.draws}")
    _positive(cfg, "record_logits", "samples_per_shard")
    temps = r.temperatures
    if not isinstance(temps, (list, tuple)) or not temps or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0 for t in temps):
        raise ConfigError(f"record_logits.temperatures must be a non-empty list of finite numbers > 0, got {temps!r}")
    if r.kind == "rskd" and len(set(temps)) != 1:
        raise ConfigError(f"record_logits.temperatures: RS-KD draws are made at one temperature, got {list(temps)}")
    if r.logprob_dtype not in LOGPROB_ENCODINGS:
        raise ConfigError(f"record_logits.logprob_dtype: {r.logprob_dtype!r} is not one of {LOGPROB_ENCODINGS}")
    if r.compression not in COMPRESSIONS:
        raise ConfigError(f"record_logits.compression: {r.compression!r} is not one of {COMPRESSIONS}")


def _validate_data_selection(cfg: RunConfig) -> None:
    """data_selection (SALT_DS): the scoring and selection settings (the score file itself is
    preflight's)."""
    s = cfg.data_selection
    _positive(cfg, "data_selection", "top_k", "min_learnable_tokens")
    if s.min_learnable_tokens > cfg.data.seq_length:
        raise ConfigError(f"data_selection.min_learnable_tokens {s.min_learnable_tokens} exceeds data.seq_length "
                          f"{cfg.data.seq_length}: no sequence could be selected")
    if not 0.0 < s.fraction <= 1.0:
        raise ConfigError(f"data_selection.fraction must be in (0, 1], got {s.fraction}")
    if not 0.0 <= s.low_quantile < 1.0:
        raise ConfigError(f"data_selection.low_quantile must be in [0, 1), got {s.low_quantile}")
    if not s.low_quantile < s.high_quantile <= 1.0:
        raise ConfigError(f"data_selection.high_quantile must be in (data_selection.low_quantile={s.low_quantile}, 1], "
                          f"got {s.high_quantile}")
    if s.scores is not None and not s.scores.strip():
        raise ConfigError("data_selection.scores must be a directory path (or null for no data selection), got ''")


def _validate_deepspeed(cfg: RunConfig, world_size: int | None) -> None:
    """optimizer.backend=deepspeed: what megadistill's DeepSpeed engine supports, then the DeepSpeed
    helper's own checks (pass-through block). parallel.use_distributed_optimizer is ignored there:
    ZeRO (deepspeed.zero_stage) always shards the optimizer state."""
    pp = cfg.parallel.pipeline_model_parallel_size
    if pp > 1:
        raise ConfigError(
            f"optimizer.backend=deepspeed does not support pipeline parallelism "
            f"(parallel.pipeline_model_parallel_size={pp}): set parallel.pipeline_model_parallel_size=1, "
            "or use optimizer.backend=megatron for PP > 1"
        )
    try:
        check_deepspeed(cfg, world_size=world_size)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


# Keys of the model inside megadistill checkpoints (see megadistill.megatron.checkpoint).
