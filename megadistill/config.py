"""The run configuration: dataclasses mapped from one YAML file, validated before any process group.

``load_config(path, overrides, world_size=...)`` reads the YAML, applies dotted command-line
overrides (``kd.temperature=2.0``), builds the dataclasses and checks them; every error names the
key and the bad value. The checks come in two kinds:

- :func:`validate`, the schema: pure (no file system, tokenizer or checkpoint reads), so a config
  can be checked anywhere, for any world size (``megadistill config run.yaml --world-size 16``);
- ``megadistill.preflight.preflight``: what needs the run's files (data, tokenizer, teacher
  checkpoint) or the machine (Transformer Engine).

The world size is never guessed here: ``None`` means unknown (its checks are skipped);
``megadistill train`` passes ``megadistill.launch.resolve().world_size``.
``explain()`` renders each field's one-line docstring (``megadistill config --explain``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import math
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megadistill.losses.config import KDLossConfig
from megadistill.schedules import AlphaSchedule, TemperatureSchedule


class ConfigError(ValueError):
    """A configuration problem, naming the offending key."""


@dataclass
class ModelConfig:
    """A GPT model (megatron-core ``GPTModel`` with RoPE): shape, architecture options and precision."""

    num_layers: int = 3
    """Transformer layers (divisible by the pipeline-parallel size)."""
    hidden_size: int = 192
    """Hidden size."""
    num_attention_heads: int = 4
    """Attention heads (divisible by the tensor-parallel size)."""
    ffn_hidden_size: Optional[int] = None
    """MLP hidden size (None = 4 x hidden_size)."""
    init_method_std: float = 0.02
    """Standard deviation of the weight initialisation."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    precision: Optional[str] = None
    """fp32, bf16 or fp16 weights and activations (a trained student keeps fp32 main weights and gradients in its optimizer; fp16 uses optimizer.loss_scale); null = fp32 for the student, for a teacher (teacher.model) bf16 on a GPU and fp32 on CPU."""
    normalization: str = "LayerNorm"
    """LayerNorm or RMSNorm."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of every normalization layer."""
    activation: str = "gelu"
    """MLP activation: gelu, or swiglu (gated: linear_fc1 holds the gate and up projections, 2 x ffn_hidden_size rows)."""
    num_query_groups: Optional[int] = None
    """Grouped-query attention: key/value heads, dividing num_attention_heads and divisible by TP (null = num_attention_heads: multi-head attention)."""
    untie_embeddings_and_output_weights: bool = False
    """Give the output layer its own weight instead of reusing the input embedding."""
    rotary_base: int = 10000
    """RoPE base (theta)."""
    rotary_percent: float = 1.0
    """Fraction of each head's dimensions RoPE rotates, in (0, 1]."""
    add_bias_linear: bool = True
    """Biases in every linear layer (attention and MLP); false as in Llama."""
    add_qkv_bias: bool = False
    """Biases in the query/key/value projection even when add_bias_linear is false (as in Qwen2)."""
    make_vocab_size_divisible_by: int = 128
    """The student's vocabulary is padded to a multiple of this x TP; a teacher's must divide the student's."""
    max_position_embeddings: Optional[int] = None
    """Longest sequence the model is built for (null = data.seq_length; RoPE has no position weights, so it fixes no shape)."""
    transformer_impl: str = "auto"
    """Layer implementation: auto (Transformer Engine when importable and a GPU is present, else local), local (megatron-core's own modules) or transformer_engine."""


@dataclass
class TeacherConfig:
    """The teacher: none (plain LM training), an online model, or an offline logits store."""

    mode: str = "none"
    """none, online (a frozen GPT next to the student) or offline (precomputed logits store)."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(num_layers=4, hidden_size=256))
    """The online teacher's architecture (same vocabulary as the student)."""
    checkpoint: Optional[str] = None
    """Teacher weights: a megadistill/megatron-core distributed checkpoint directory (online KD, and
    precompute-logits for offline KD)."""
    store: Optional[str] = None
    """Offline teacher: directory of a logits store (written by megadistill precompute-logits, read by
    teacher.mode=offline)."""


@dataclass
class ParallelConfig:
    """How the job is split over ranks (data-parallel size = world size / (tp x pp))."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (TP)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (PP); non-interleaved 1F1B."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs Transformer Engine)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (ZeRO-1); optimizer.backend megatron only (deepspeed ignores it: deepspeed.zero_stage decides)."""


@dataclass
class KDConfig(KDLossConfig):
    """Distillation: the KD loss and teacher-logits processing (``KDLossConfig``), and the α schedule."""

    alpha: AlphaSchedule = field(default_factory=AlphaSchedule)
    """Schedule of the KD weight α in (1-α)·LM + α·KD (kind salt: SALT's KD phase, then plain LM training with the teacher released)."""

    temperature_schedule: TemperatureSchedule = field(default_factory=TemperatureSchedule)
    """Schedule of τ per step, starting from kd.temperature (constant, linear or cosine to final)."""

    def loss_config(self) -> KDLossConfig:
        """The loss part alone, as ``megadistill.losses`` takes it."""
        return KDLossConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(KDLossConfig)})


@dataclass
class OptimizerConfig:
    """AdamW and the learning-rate schedule (Megatron's OptimizerParamScheduler), and the backend
    that shards and steps the student."""

    backend: str = "megatron"
    """megatron (Megatron DDP + distributed optimizer) or deepspeed (a DeepSpeed ZeRO engine)."""
    lr: float = 2e-3
    """Peak learning rate."""
    min_lr: float = 2e-4
    """Learning rate at the end of the decay."""
    lr_schedule: str = "cosine"
    """constant, linear, cosine or wsd."""
    warmup_fraction: float = 0.05
    """Fraction of the steps spent in linear warmup."""
    wsd_decay_fraction: float = 0.2
    """wsd: fraction of the steps (at the end) spent decaying."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW β1."""
    adam_beta2: float = 0.95
    """AdamW β2."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping (0 = off)."""
    loss_scale: Optional[float] = None
    """model.precision fp16: a constant loss scale, or null for dynamic loss scaling (the settings below)."""
    initial_loss_scale: float = 65536.0
    """fp16, dynamic: the first loss scale (a power of two)."""
    min_loss_scale: float = 1.0
    """fp16, dynamic: the scale never drops below this."""
    loss_scale_window: int = 1000
    """fp16, dynamic: steps without overflow before the scale doubles."""
    hysteresis: int = 2
    """fp16, dynamic: overflowing steps tolerated before the scale halves."""


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed backend (``optimizer.backend: deepspeed``): ZeRO stage and extra engine settings."""

    zero_stage: int = 1
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    config: dict = field(default_factory=dict)
    """Pass-through DeepSpeed config keys merged into the generated config (for anything the YAML does not set)."""


@dataclass
class DataConfig:
    """Training data: text/JSONL files (or the embedded corpus), tokenised into Megatron's format."""

    inputs: Optional[list] = None
    """Text (.txt) or JSON-lines (.jsonl) files; None = the embedded Python documentation corpus."""
    json_key: str = "text"
    """Key holding the text in JSONL records."""
    data_prefix: Optional[str] = None
    """An existing Megatron indexed dataset (<prefix>.bin/.idx); skips preprocessing."""
    tokenizer_model: Optional[str] = None
    """The tokenizer: a sentencepiece .model, or for tokenizer_type huggingface a tokenizer.json or a Hugging Face tokenizer directory holding one (None = train a sentencepiece model on the inputs)."""
    tokenizer_type: str = "sentencepiece"
    """How to read data.tokenizer_model: a sentencepiece model, or a Hugging Face fast tokenizer (tokenizer.json; e.g. a Hugging Face teacher's own, as megadistill convert-hf writes in teacher.yaml), whose eos_token ends every document. A run file may give both keys as one block, data.tokenizer: {type, path}."""
    vocab_size: int = 2048
    """Vocabulary size of a newly trained tokenizer."""
    seq_length: int = 128
    """Tokens per training sequence."""
    micro_batch_size: int = 16
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all ranks (a multiple of micro_batch_size x DP)."""
    split: str = "90,10,0"
    """Train/valid/test split of the documents, Megatron style."""
    seed: Optional[int] = None
    """Seed of the sample order (None = training.seed). Set it to vary the weights' seed (training.seed) while keeping the data order, e.g. seeds of students that read one logits store."""
    train_samples: Optional[int] = None
    """Build the training sample order for this many samples (None = train_steps x global_batch_size; Megatron shuffles over all epochs, so the order depends on it). Runs that set the same value read the same samples in the same order, e.g. a shorter student reading a longer run's logits store."""


@dataclass
class TrainingConfig:
    """The loop: steps, evaluation, seed."""

    train_steps: int = 300
    """Optimizer steps."""
    eval_interval: int = 50
    """Evaluate the validation loss every this many steps (and at the end)."""
    eval_steps: int = 4
    """Micro-batch groups (global batches) per validation."""
    seed: int = 1234
    """Seed for weights, data order and dropout."""
    log_interval: int = 10
    """TensorBoard scalars every this many steps (metrics.jsonl gets every step)."""


@dataclass
class CheckpointConfig:
    """Distributed checkpoints of the student, optimizer, scheduler, RNG and data position."""

    save_interval: int = 0
    """Save every this many steps (0 = only at the end)."""
    save_interval_minutes: float = 30.0
    """Also save once this many minutes have passed since the start or the last save (0 = off); the ranks agree on when, so a long run killed without warning loses at most this much."""
    stop_signals: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that stop the run gracefully: every rank finishes its step, a checkpoint is saved, and the process exits with status 75 ([] = the signals' default action)."""
    resume: str = "auto"
    """auto (latest complete checkpoint in the run's directory), none, or a checkpoint path."""
    optimizer_sharding: str = "dp_reshardable"
    """Megatron distributed optimizer state: dp_reshardable (fast; a resume may change the DP size only) or fully_reshardable (gathered on save; resumes at any TP/PP/DP)."""


@dataclass
class RecordLogitsConfig:
    """Online logits: record this run's own targets into a logits store while it pre-trains (teacher.mode none)."""

    store: Optional[str] = None
    """Directory of the logits store to record into (None = do not record); a student reads it with teacher.mode=offline."""
    kind: str = "top_p_k"
    """top_p_k (kept ids, log-probs and residual mass) or rskd (ids sampled from the full distribution, with counts)."""
    top_p: float = 0.95
    """top_p_k: keep the smallest set of most likely ids whose mass reaches top_p (a student sets the same kd.top_p)."""
    top_k: Optional[int] = 50
    """top_p_k: then keep at most top_k of them (None = off; a student sets the same kd.top_k)."""
    draws: int = 12
    """rskd: samples drawn per position (seeded by training.seed)."""
    logprob_dtype: str = "fp16"
    """top_p_k: encoding of the stored log-probs and residuals (as precompute-logits --logprob-dtype)."""
    compression: Optional[str] = None
    """Shard compression: null or zstd (as precompute-logits)."""
    samples_per_shard: int = 1024
    """Global samples per shard file (a shard is written once all its samples are recorded and checkpointed)."""


@dataclass
class DataSelectionConfig:
    """SALT_DS: phase 1 trains only on sequences the small teacher scored challenging yet learnable (megadistill score-data)."""

    scores: Optional[str] = None
    """Score directory written by megadistill score-data (None = no data selection)."""
    top_k: int = 10
    """A token is learnable if its target is among the teacher's top_k next-token ids (ties kept)."""
    min_learnable_tokens: int = 8
    """Sequences with fewer learnable tokens than this are not selectable (applied at selection: no rescoring)."""
    select: str = "top_fraction"
    """top_fraction (the highest-scoring fraction of the selectable sequences) or band (score ranks between two quantiles)."""
    fraction: float = 0.5
    """select=top_fraction: fraction of the selectable sequences kept, in (0, 1]."""
    low_quantile: float = 0.25
    """select=band: lower score quantile of the band, in [0, 1)."""
    high_quantile: float = 0.75
    """select=band: upper score quantile of the band, in (low_quantile, 1]."""


@dataclass
class RunConfig:
    """One megadistill run."""

    name: str = "run"
    """Run name (used in logs)."""
    output_dir: str = "runs/run"
    """Directory for data, checkpoints, TensorBoard events and the metrics log."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The student."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The teacher."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Distillation."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and learning rate."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed backend settings."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Training loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    data_selection: DataSelectionConfig = field(default_factory=DataSelectionConfig)
    """SALT_DS data selection for SALT's first phase."""
    record_logits: RecordLogitsConfig = field(default_factory=RecordLogitsConfig)
    """Recording this run's own logits for later students (online logits)."""


CHOICES = {
    "teacher.mode": ("none", "online", "offline"),
    "optimizer.lr_schedule": ("constant", "linear", "cosine", "wsd"),
    "optimizer.backend": ("megatron", "deepspeed"),
    "deepspeed.zero_stage": (1, 2, 3),
    "checkpoint.optimizer_sharding": ("dp_reshardable", "fully_reshardable"),
    "data_selection.select": ("top_fraction", "band"),
    "record_logits.kind": ("top_p_k", "rskd"),
    "data.tokenizer_type": ("sentencepiece", "huggingface"),
}


# --------------------------------------------------------------------------- building from dicts


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


# Numbers in exponent form without a dot ("1e-3", "5E+4"), which YAML 1.1 reads as strings.
_YAML_FLOAT_STRING = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (a field annotation), or a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp in (dict, typing.Dict) or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp in (list, typing.List) or origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [str(v) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML_FLOAT_STRING.fullmatch(value.strip()):
            # PyYAML follows YAML 1.1, where 1e-3 (no dot) is a string; every user means a number.
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            raise ConfigError(f"unknown key {key}{hint}")
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a dataclass's own validation (KDLossConfig's), named by its config key
        raise ConfigError(str(e).replace("KDLossConfig.", f"{prefix}." if prefix else "")) from e


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["kd.temperature=2.0", ...]`` → ``[("kd.temperature", 2.0), ...]`` (values parsed as YAML)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", k):
            raise ConfigError(f"override {item!r}: {k!r} is not a dotted key such as kd.temperature")
        out.append((k, yaml.safe_load(v)))
    return out


def config_from_dict(
    data: dict, overrides: list[str] | None = None, *, world_size: int | None = None, preflight: bool = True
) -> RunConfig:
    """Build a RunConfig from a (YAML-shaped) dict plus dotted overrides, and check it: the schema
    for ``world_size`` (None = unknown), then, with ``preflight``, the files and checkpoints."""
    data = dict(data or {})
    for k, v in parse_overrides(overrides or []):
        _set_dotted(data, k, v)
    _tokenizer_block(data)
    cfg = _build(RunConfig, data)
    validate(cfg, world_size=world_size)
    if preflight:
        from megadistill.preflight import preflight as check_files

        check_files(cfg)
    return cfg


def _tokenizer_block(data: dict) -> None:
    """``data.tokenizer: {type, path}`` is the block form of ``data.tokenizer_type`` and
    ``data.tokenizer_model``; rewritten in place to those keys (giving both forms is an error)."""
    d = data.get("data")
    if not isinstance(d, dict) or "tokenizer" not in d:
        return
    d = dict(d)  # the caller's mapping stays as it was
    block = d.pop("tokenizer")
    if not isinstance(block, dict) or not set(block) <= {"type", "path"}:
        raise ConfigError(f"data.tokenizer must be a mapping with keys type and path, got {block!r}")
    for short, flat in (("type", "tokenizer_type"), ("path", "tokenizer_model")):
        if short in block:
            if flat in d:
                raise ConfigError(f"data.tokenizer.{short} and data.{flat} say the same thing: give one of them")
            d[flat] = block[short]
    data["data"] = d


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    world_size: int | None = None,
    preflight: bool = True,
) -> RunConfig:
    """Read a YAML run file (None = all defaults), apply overrides, check (see
    :func:`config_from_dict`). Before a run, pass ``world_size=megadistill.launch.resolve().world_size``."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return config_from_dict(data, overrides, world_size=world_size, preflight=preflight)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- validation


def world_size_from_env() -> int:
    """The launch's world size; kept for older callers: use ``megadistill.launch.resolve().world_size``
    (which also tells an srun step from a bare allocation)."""
    from megadistill import launch

    return launch.resolve().world_size


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


def model_parallel_size(cfg: RunConfig) -> int:
    """Ranks holding one copy of the model: TP x PP."""
    return cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size


def accepted_world_sizes(cfg: RunConfig) -> list[int]:
    """Every world size the layout accepts: TP x PP x DP for each data-parallel size DP that
    divides global_batch_size / micro_batch_size (empty if micro_batch_size does not divide it)."""
    d = cfg.data
    if d.micro_batch_size <= 0 or d.global_batch_size % d.micro_batch_size:
        return []
    micro_batches = d.global_batch_size // d.micro_batch_size
    return [model_parallel_size(cfg) * dp for dp in range(1, micro_batches + 1) if micro_batches % dp == 0]


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
    models = [("model", cfg.model)] + ([("teacher.model", cfg.teacher.model)] if cfg.teacher.mode == "online" else [])
    for key, m in models:
        _positive(cfg, key, "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "init_method_std")
        if m.hidden_size % m.num_attention_heads:
            raise ConfigError(f"{key}.hidden_size {m.hidden_size} is not divisible by num_attention_heads {m.num_attention_heads}")
        if m.num_attention_heads % tp:
            raise ConfigError(f"{key}.num_attention_heads {m.num_attention_heads} is not divisible by parallel.tensor_model_parallel_size {tp}")
        if m.num_layers % pp:
            raise ConfigError(f"{key}.num_layers {m.num_layers} is not divisible by parallel.pipeline_model_parallel_size {pp}")
        if m.ffn_hidden_size is not None and m.ffn_hidden_size % tp:
            raise ConfigError(f"{key}.ffn_hidden_size {m.ffn_hidden_size} is not divisible by parallel.tensor_model_parallel_size {tp}")
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
    from megadistill import data_checks

    try:
        data_checks.check_split(d.split)
    except ValueError as e:
        raise ConfigError(f"data.split: {e}") from e
    parts = [float(x) for x in d.split.split(",")]
    if len(parts) != 3 or parts[0] <= 0 or parts[1] <= 0:
        raise ConfigError(f"data.split must be three weights 'train,valid,test' with train and valid > 0, got {d.split!r}")
    if d.tokenizer_type == "huggingface" and d.tokenizer_model is None:
        raise ConfigError("data.tokenizer_type huggingface needs data.tokenizer_model (a tokenizer.json or a Hugging Face "
                          "tokenizer directory): only sentencepiece tokenizers are trained on the fly")
    if d.tokenizer_model is None and d.vocab_size < data_checks.MIN_VOCAB_SIZE:
        raise ConfigError(f"data.vocab_size must be >= {data_checks.MIN_VOCAB_SIZE} for a new tokenizer, got {d.vocab_size}")
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
    from megadistill.preemption import parse_signals

    parse_signals(cfg.checkpoint.stop_signals, "checkpoint.stop_signals")
    _validate_data_selection(cfg)

    try:
        cfg.kd.alpha.validate("kd.alpha")
        cfg.kd.temperature_schedule.validate("kd.temperature_schedule")
    except ValueError as e:
        raise ConfigError(str(e)) from e

    t = cfg.teacher
    if t.mode == "offline" and not t.store:
        raise ConfigError(
            "teacher.store is required for teacher.mode=offline (a logits store written by "
            "megadistill precompute-logits)"
        )
    if t.mode == "online" and t.checkpoint is None:
        raise ConfigError("teacher.checkpoint is required for teacher.mode=online (a distributed checkpoint directory)")

    _validate_record_logits(cfg)

    if o.backend == "deepspeed":
        _validate_deepspeed(cfg, world_size)


MODEL_CHOICES = {
    "precision": (None, "fp32", "bf16", "fp16"),
    "normalization": ("LayerNorm", "RMSNorm"),
    "activation": ("gelu", "swiglu"),
    "transformer_impl": ("auto", "local", "transformer_engine"),
}
"""Allowed values of ModelConfig keys (``model.*`` and ``teacher.model.*`` alike)."""


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
    head_dim = m.hidden_size // m.num_attention_heads
    if int(head_dim * m.rotary_percent) % 2:
        raise ConfigError(f"{key}.rotary_percent {m.rotary_percent} rotates {int(head_dim * m.rotary_percent)} of the "
                          f"{head_dim} dimensions of a head: RoPE needs an even number")
    if m.max_position_embeddings is not None and m.max_position_embeddings < cfg.data.seq_length:
        raise ConfigError(f"{key}.max_position_embeddings {m.max_position_embeddings} is shorter than data.seq_length "
                          f"{cfg.data.seq_length}")
    if cfg.parallel.sequence_parallel and m.transformer_impl == "local":
        raise ConfigError(f"parallel.sequence_parallel needs Transformer Engine layers, but {key}.transformer_impl is local")


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
    from megadistill.store.format import COMPRESSIONS, LOGPROB_DTYPES  # pure: numpy only

    if r.logprob_dtype not in LOGPROB_DTYPES:
        raise ConfigError(f"record_logits.logprob_dtype: {r.logprob_dtype!r} is not one of {tuple(LOGPROB_DTYPES)}")
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
    from megadistill.deepspeed.config import check  # pure: no deepspeed import

    try:
        check(cfg, world_size=world_size)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


# Keys of the model inside megadistill checkpoints (see megadistill.megatron.checkpoint).
CHECKPOINT_MODEL_PREFIX = ""


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padding: a multiple of ``divisible_by x tp``."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def data_seed(cfg: RunConfig) -> int:
    """The seed of the run's sample order."""
    return cfg.training.seed if cfg.data.seed is None else cfg.data.seed


def train_dataset_samples(cfg: RunConfig) -> int:
    """How many samples the training dataset (and so its sample order) is built for."""
    return cfg.data.train_samples or cfg.training.train_steps * cfg.data.global_batch_size


def run_vocab_size(cfg: RunConfig, tokenizer_vocab_size: int) -> int:
    """The run's padded vocabulary (student and teacher): a multiple of
    ``model.make_vocab_size_divisible_by`` x TP."""
    return padded_vocab_size(tokenizer_vocab_size, cfg.parallel.tensor_model_parallel_size,
                             cfg.model.make_vocab_size_divisible_by)


def resolve_teacher_checkpoint(path: str) -> Path:
    """A checkpoint directory, or a run directory whose latest complete checkpoint is used (reads
    the file system: lives in ``megadistill.preflight``; kept here for older imports)."""
    from megadistill.preflight import resolve_teacher_checkpoint as resolve

    return resolve(path)


# --------------------------------------------------------------------------- reference


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string right after each field) from the sources of the class and
    of the dataclasses it extends."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def explain(markdown: bool = False) -> str:
    """Every config key with its default and one-line description."""
    lines = []

    def walk(cls, prefix: str, default_obj) -> None:
        docs = _field_docs(cls)
        if markdown:
            lines.append(f"\n### `{prefix or 'top level'}` — {cls.__doc__.strip().splitlines()[0]}\n")
            lines.append("| key | default | meaning |")
            lines.append("|---|---|---|")
        else:
            lines.append(f"\n[{prefix or 'top level'}]  {cls.__doc__.strip().splitlines()[0]}")
        nested = []
        for f in dataclasses.fields(cls):
            value = getattr(default_obj, f.name)
            key = f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(value):
                nested.append((type(value), key, value))
                continue
            doc = docs.get(f.name, "")
            if key in CHOICES:
                doc += f" Choices: {', '.join(map(str, CHOICES[key]))}."
            if markdown:
                lines.append(f"| `{key}` | `{value!r}` | {doc} |")
            else:
                lines.append(f"  {key} = {value!r}\n      {doc}")
        for cls2, key, value in nested:
            walk(cls2, key, value)

    walk(RunConfig, "", RunConfig())
    return "\n".join(lines).strip() + "\n"
