"""The run configuration's schema: one dataclass per YAML section, each field with its docstring,
the allowed values of the choice keys, and the quantities derived from a config alone (padded
vocabulary, sample order seed, model-parallel size).

Pure: imports nothing above ``megadistill.losses`` and ``megadistill.schedules`` (whose config
dataclasses it extends)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

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
    rope_scaling_factor: Optional[float] = None
    """Llama 3.x RoPE scaling (megatron-core's: wavelengths above 8192 positions divided by this factor, below 2048 kept, smoothly in between); null = plain RoPE."""
    kv_channels: Optional[int] = None
    """Dimensions of each query/key/value head (null = hidden_size / num_attention_heads; Qwen3 uses 128 at every width)."""
    qk_layernorm: bool = False
    """Normalise each query and key head (with the model's normalization) before RoPE, as Qwen3 does."""
    add_bias_linear: bool = True
    """Biases in every linear layer (attention and MLP); false as in Llama."""
    add_qkv_bias: bool = False
    """Biases in the query/key/value projection even when add_bias_linear is false (as in Qwen2)."""
    make_vocab_size_divisible_by: int = 128
    """The run's vocabulary (the tokenizer's ids) is padded to a multiple of model's value x TP, and teacher.model's must divide it; a teacher checkpoint padded otherwise (at another TP) still loads, the tokenizer's rows being what it must hold."""
    max_position_embeddings: Optional[int] = None
    """Longest sequence the model is built for (null = data.seq_length; RoPE has no position weights, so it fixes no shape)."""
    transformer_impl: str = "auto"
    """Layer implementation: auto (Transformer Engine when importable and a GPU is present, else local), local (megatron-core's own modules) or transformer_engine."""


@dataclass
class TeacherLayout:
    """The pre-pass teacher's own parallel layout over the run's ranks (null: the student's)."""

    tensor_model_parallel_size: Optional[int] = None
    """The teacher's tensor-parallel size; null: parallel.tensor_model_parallel_size."""
    pipeline_model_parallel_size: Optional[int] = None
    """The teacher's pipeline-parallel size (plain 1F1B, forward-only); null: parallel.pipeline_model_parallel_size."""


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
    placement: str = "colocated"
    """Online teacher: colocated (it runs inside each student micro-batch on the same stages, its
    hidden states riding in the pipeline's stage tensors; dense logits) or prepass (before each step
    it runs forward-only over the step's micro-batches through its own pipeline and hands the
    student's last stage sparse targets, as precompute-logits would store them: needs a truncating
    kd (top_p < 1 or top_k) or prepass_targets rskd)."""
    prepass_targets: str = "top_p_k"
    """placement prepass: top_p_k (the kd's top-p/top-k ids with their exact tempered ghost bucket)
    or rskd (prepass_draws RS-KD draws per position at the step's τ)."""
    prepass_draws: int = 12
    """placement prepass, prepass_targets rskd: draws per position."""
    parallel: TeacherLayout = field(default_factory=TeacherLayout)
    """placement prepass: the teacher's own TP and PP sizes over the same ranks (each dividing the
    world size; TP x PP need not equal the student's); its targets are sent to the student's last
    stage. Default: the student's layout."""

    def layout(self, parallel: "ParallelConfig") -> tuple[int, int]:
        """``(TP, PP)`` of the teacher in a run laid out as ``parallel``."""
        p = self.parallel
        return (p.tensor_model_parallel_size or parallel.tensor_model_parallel_size,
                p.pipeline_model_parallel_size or parallel.pipeline_model_parallel_size)


@dataclass
class ParallelConfig:
    """How the job is split over ranks (data-parallel size = world size / (tp x pp))."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (TP)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (PP); 1F1B, interleaved when virtual_pipeline_model_parallel_size is set."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline rank (megatron-core's interleaved 1F1B schedule: a smaller pipeline
    bubble); null = one chunk, non-interleaved. Needs PP >= 2, the student's num_layers divisible by
    PP x this, at least PP micro-batches per step, optimizer.backend megatron, and with an online
    teacher teacher.placement prepass."""
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

    fused_output_layer: bool = False
    """Fuse the output layer into the loss: the last stage hands it hidden states and the output weight, and the student's (and online teacher's) [s, b, V/tp] logits are computed chunk by chunk, never whole (online, offline and no teacher; not with record_logits or deepspeed.zero_stage 3)."""

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
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    """top_p_k: the kd.temperature values a student with truncation ghost may read the store at (1 is always
    served; each other costs 4 bytes per token); rskd: exactly one, the temperature the draws are made at."""
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
    "teacher.placement": ("colocated", "prepass"),
    "teacher.prepass_targets": ("top_p_k", "rskd"),
    "optimizer.lr_schedule": ("constant", "linear", "cosine", "wsd"),
    "optimizer.backend": ("megatron", "deepspeed"),
    "deepspeed.zero_stage": (1, 2, 3),
    "checkpoint.optimizer_sharding": ("dp_reshardable", "fully_reshardable"),
    "data_selection.select": ("top_fraction", "band"),
    "record_logits.kind": ("top_p_k", "rskd"),
    "data.tokenizer_type": ("sentencepiece", "huggingface"),
}


MODEL_CHOICES = {
    "precision": (None, "fp32", "bf16", "fp16"),
    "normalization": ("LayerNorm", "RMSNorm"),
    "activation": ("gelu", "swiglu"),
    "transformer_impl": ("auto", "local", "transformer_engine"),
}
"""Allowed values of ModelConfig keys (``model.*`` and ``teacher.model.*`` alike)."""



MIN_VOCAB_SIZE = 256 + 2 + 1  # byte pieces + <unk> + </s> + at least one learned piece
"""Smallest vocabulary of a newly trained sentencepiece tokenizer (``data.vocab_size``)."""

LOGPROB_ENCODINGS = ("fp16", "fp32", "qlog64", "qlog16")
"""Encodings of stored log-probs (``record_logits.logprob_dtype``, ``precompute-logits --logprob-dtype``);
``megadistill.store.codec`` implements each."""

COMPRESSIONS = (None, "zstd")
"""Shard compressions of a logits store (``record_logits.compression``)."""

# Settings a resumed run must share with the run it continues: they fix the weights' shapes, the
# data position and content, the schedules and the backend's checkpoint format.
RESUME_INVARIANTS = (
    "model", "teacher.mode", "teacher.model", "teacher.store", "parallel.use_distributed_optimizer", "kd",
    "data.inputs", "data.data_prefix", "data.vocab_size", "data.seq_length", "data.global_batch_size",
    "data.split", "data.seed", "data.train_samples", "training.train_steps", "training.seed", "optimizer", "deepspeed", "record_logits",
    "data_selection",
)

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


def to_dict(cfg) -> dict:
    """A config (or any of its sections) as plain nested dicts."""
    return dataclasses.asdict(cfg)
