"""Distillation inside Megatron-core: the model wrapper, the loss, and the schedule glue."""

from megadistill.megatron.fused import FusedOutput
from megadistill.megatron.loss import DistillationLoss
from megadistill.megatron.model import DistillationModel, fuse_output_layer
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
    "FusedOutput",
    "forward_backward",
    "fuse_output_layer",
    "make_forward_step",
    "reduce_reports",
    "widen_for_teacher",
]
