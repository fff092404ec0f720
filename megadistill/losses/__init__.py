"""Vocab-parallel KD losses (dense and sparse teacher targets) and teacher-logits processing."""

from megadistill.losses.config import KDLossConfig
from megadistill.losses.kd import (
    DistillationTerms,
    KDLoss,
    vocab_parallel_distillation_loss,
    vocab_parallel_kd_loss,
    vocab_parallel_sparse_kd_loss,
)
from megadistill.losses.fused_output import FusedTerms, fused_output_distillation
from megadistill.losses.parallel import check_vocab_partition

__all__ = [
    "DistillationTerms",
    "FusedTerms",
    "KDLoss",
    "KDLossConfig",
    "check_vocab_partition",
    "fused_output_distillation",
    "vocab_parallel_distillation_loss",
    "vocab_parallel_kd_loss",
    "vocab_parallel_sparse_kd_loss",
]
