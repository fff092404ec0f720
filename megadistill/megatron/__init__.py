"""Distillation inside Megatron-core: the model wrapper, the loss, and the schedule glue."""

from megadistill.megatron.loss import DistillationLoss
from megadistill.megatron.model import DistillationModel
from megadistill.megatron.schedule import (
    DistillationForwardStep,
    forward_backward,
    make_forward_step,
    reduce_reports,
    widen_for_teacher,
)

__all__ = [
    "DistillationForwardStep",
    "DistillationLoss",
    "DistillationModel",
    "forward_backward",
    "make_forward_step",
    "reduce_reports",
    "widen_for_teacher",
]
