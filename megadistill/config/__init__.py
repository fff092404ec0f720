"""The run configuration: dataclasses mapped from one YAML file, checked before any process group.

- :mod:`~megadistill.config.schema`: the dataclasses (one per YAML section, a docstring per field),
  the choice keys, ``ConfigError``, and what a config alone determines (padded vocabulary, seeds);
- :mod:`~megadistill.config.load`: YAML + dotted command-line overrides (``kd.temperature=2.0``)
  → dataclasses, then the schema check;
- :mod:`~megadistill.config.validate`: the schema check, pure (no file system, tokenizer or
  checkpoint reads), for a given world size or none (``megadistill config run.yaml --world-size 16``);
- :mod:`~megadistill.config.deepspeed`: the DeepSpeed JSON a run generates, and the checks of its
  pass-through block;
- :mod:`~megadistill.config.explain`: the reference of every key (``megadistill config --explain``).

What needs the run's files or the machine (data, tokenizer, teacher checkpoint, store, Transformer
Engine) is ``megadistill.preflight``'s, which the commands call after loading. The world size is
never guessed here: ``None`` means unknown; ``megadistill train`` passes the launch's.

This package imports nothing above ``megadistill.losses``, ``megadistill.schedules``,
``megadistill.preemption`` and ``megadistill.launch`` (leaves; the launch only tells validation's
warnings which rank says them); everything else may import it.
"""

from megadistill.config.explain import explain
from megadistill.config.load import config_from_dict, load_config, parse_overrides
from megadistill.config.schema import (
    CHECKPOINT_MODEL_PREFIX,
    CHOICES,
    MODEL_CHOICES,
    RESUME_INVARIANTS,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DataSelectionConfig,
    DeepSpeedConfig,
    KDConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RecordLogitsConfig,
    RunConfig,
    TeacherConfig,
    TeacherLayout,
    TrainingConfig,
    accepted_world_sizes,
    data_seed,
    model_parallel_size,
    padded_vocab_size,
    run_vocab_size,
    to_dict,
    train_dataset_samples,
)
from megadistill.config.validate import validate

__all__ = [
    "CHECKPOINT_MODEL_PREFIX", "CHOICES", "MODEL_CHOICES", "RESUME_INVARIANTS", "CheckpointConfig", "ConfigError",
    "DataConfig", "DataSelectionConfig", "DeepSpeedConfig", "KDConfig", "ModelConfig", "OptimizerConfig",
    "ParallelConfig", "RecordLogitsConfig", "RunConfig", "TeacherConfig", "TeacherLayout", "TrainingConfig", "accepted_world_sizes",
    "config_from_dict", "data_seed", "explain", "load_config", "model_parallel_size", "padded_vocab_size",
    "parse_overrides", "run_vocab_size", "to_dict", "train_dataset_samples", "validate",
]
