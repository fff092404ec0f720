"""Running a ``DistillationModel`` through Megatron-core's forward-backward schedules."""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from megadistill.megatron.loss import DistillationLoss
from megadistill.megatron.model import DistillationModel


def _distillation_model(model) -> DistillationModel:
    model = model[0] if isinstance(model, list) else model
    inner = model
    while not isinstance(inner, DistillationModel):
        if not hasattr(inner, "module"):
            raise TypeError(f"expected a DistillationModel (possibly wrapped by DDP), got {type(model).__name__}")
        inner = inner.module
    return inner


def widen_for_teacher(teacher_hidden: int):
    """An ``adjust_tensor_shapes_fn``: stage-to-stage tensors also carry the teacher's hidden states."""

    def adjust(recv_shapes, send_shapes):
        widen = lambda shapes: [(*s[:-1], s[-1] + teacher_hidden) for s in shapes]  # noqa: E731
        return widen(recv_shapes), widen(send_shapes)

    return adjust


def forward_backward(
    *,
    forward_step_func: Callable,
    data_iterator: Iterator,
    model,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
):
    """``get_forward_backward_func()(...)`` with the pipeline's send/receive shapes widened by the
    teacher's hidden size while the teacher is active. Returns the schedule's per-micro-batch
    loss reports (last pipeline stage; empty elsewhere)."""
    distill = _distillation_model(model)
    kwargs = {}
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        if parallel_state.get_virtual_pipeline_model_parallel_world_size() not in (None, 1):
            raise ValueError(
                "interleaved (virtual) pipeline parallelism is not supported with distillation: "
                "Megatron-core's interleaved schedule cannot widen the stage-to-stage tensors for the "
                "teacher; unset virtual_pipeline_model_parallel_size"
            )
        if distill.teacher_active:
            kwargs["adjust_tensor_shapes_fn"] = widen_for_teacher(distill.teacher_hidden)
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        **kwargs,
    )


def make_forward_step(get_batch: Callable, loss: DistillationLoss) -> Callable:
    """A ``forward_step_func(data_iterator, model)`` for Megatron's schedules.

    ``get_batch(data_iterator)`` returns ``tokens, labels, loss_mask, attention_mask, position_ids``
    (``[b, s]`` each; attention_mask may be None), as Megatron-LM's ``pretrain_gpt.get_batch``.
    Sets the model's ``teacher_active`` from the step's α before the forward pass.
    """

    def forward_step(data_iterator, model):
        tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
        distill = get_attr_wrapped_model(model, "teacher_active", return_model_obj=True)
        distill.teacher_active = loss.step.alpha > 0.0
        output = model(tokens, position_ids, attention_mask)
        if isinstance(output, tuple):  # last pipeline stage
            student_logits, teacher_logits = output
            return student_logits, partial(loss, labels, loss_mask, teacher_logits)
        return output, partial(loss, labels, loss_mask, None)

    return forward_step


def reduce_reports(reports: list[dict], group=None) -> dict[str, float]:
    """Mean of each reported quantity over micro-batches and data-parallel ranks.

    Call it on every rank of the last pipeline stage (it all-reduces over ``group``, by default the
    data-parallel group).
    """
    if not reports:
        return {}
    keys = sorted(reports[0])
    sums = torch.stack([sum(r[k] for r in reports) for k in keys]).double()
    if torch.distributed.is_initialized():
        g = group if group is not None else parallel_state.get_data_parallel_group()
        torch.distributed.all_reduce(sums, group=g)
    return {k: float(s[0] / s[1].clamp_min(1)) for k, s in zip(keys, sums)}
