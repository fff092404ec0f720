"""Running a ``DistillationModel`` through Megatron-core's forward-backward schedules."""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megadistill.kd.teacher import InModelTargets, TeacherSource
from megadistill.megatron.loss import DistillationLoss
from megadistill.megatron.model import DistillationModel


def _distillation_model(model) -> DistillationModel | None:
    """The ``DistillationModel`` inside Megatron wrappers (DDP, Float16Module), if there is one."""
    inner = model[0] if isinstance(model, list) else model
    while not isinstance(inner, DistillationModel):
        inner = getattr(inner, "module", None)
        if inner is None:
            return None
    return inner


def _computes_loss(model) -> bool:
    """Whether ``model`` (a stage or model chunk, inside Megatron's wrappers) ends with the output
    layer, i.e. is where the schedule calls the loss."""
    inner = model
    while inner is not None and not hasattr(inner, "post_process"):
        inner = getattr(inner, "module", None)
    return True if inner is None else bool(inner.post_process)


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
    pg_collection=None,
):
    """``get_forward_backward_func()(...)`` with the pipeline's send/receive shapes widened by the
    teacher's hidden size while the teacher is active (any other model runs unchanged). Returns the
    schedule's per-micro-batch loss reports (last pipeline stage; empty elsewhere).

    Whether the teacher is active is the model's state (``DistillationModel.teacher_active``), set
    on every rank before the step by whoever sets its KD weight (a backend, through
    ``TeacherSource.set_active(knobs.uses_teacher)``); this only reads it, so the stage tensors'
    width and the forward passes agree. A list of several model chunks runs the interleaved
    schedule. ``pg_collection``: a model built in a layout of its own (``build_gpt(...,
    pg_collection=)``) runs its own pipeline over those groups."""
    distill = _distillation_model(model)
    kwargs = {}
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pg_collection is not None:
        # A model in a layout of its own (megadistill.megatron.layout): its groups, its pipeline.
        pp = pg_collection.pp.size()
        kwargs["pg_collection"] = pg_collection
        if pp > 1:
            from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

            config = (model[0] if isinstance(model, list) else model).config
            kwargs["p2p_communicator"] = P2PCommunicator(pp_group=pg_collection.pp, config=config)
    # The interleaved schedule for a list of model chunks; any single model (a teacher in its
    # pre-pass among them) runs the plain 1F1B schedule whatever the parallel state's virtual size.
    interleaved = isinstance(model, list) and len(model) > 1
    if interleaved and distill is not None and distill.teacher_active:
        raise ValueError(
            "a co-located teacher cannot run under the interleaved (virtual) pipeline schedule: megatron-core's "
            "interleaved schedule cannot widen the stage-to-stage tensors for its hidden states; use "
            "teacher.placement prepass"
        )
    if pp > 1 and not interleaved and distill is not None and distill.teacher_active:
        kwargs["adjust_tensor_shapes_fn"] = widen_for_teacher(distill.teacher_hidden)
    vpp = len(model) if interleaved else None
    return get_forward_backward_func(pp_size=pp, vp_size=vpp)(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        **kwargs,
    )


class DistillationForwardStep:
    """A ``forward_step_func(data_iterator, model)`` for Megatron's schedules.

    ``get_batch(data_iterator)`` returns ``tokens, labels, loss_mask, attention_mask, position_ids``
    (``[b, s]`` each; attention_mask may be None), as Megatron-LM's ``pretrain_gpt.get_batch``, or
    a batch dict with those keys (and ``indices``, as ``megadistill.sampler.micro_batches`` makes).
    ``teacher`` (a ``TeacherSource``) turns the model output and the batch into the student's logits
    and the KD target; by default a ``DistillationModel``'s ``(student, teacher)`` logits pair.
    """

    def __init__(self, get_batch: Callable, loss: DistillationLoss, teacher: Optional[TeacherSource] = None) -> None:
        self.get_batch = get_batch
        self.loss = loss
        self.teacher = teacher if teacher is not None else InModelTargets()

    def __call__(self, data_iterator, model):
        batch = self.get_batch(data_iterator)
        if isinstance(batch, dict):
            tokens, labels, loss_mask, position_ids = (batch[k] for k in ("tokens", "labels", "loss_mask", "position_ids"))
            loss_mask, attention_mask = loss_mask.float(), batch.get("attention_mask")
        else:
            tokens, labels, loss_mask, attention_mask, position_ids = batch
            batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
        output = model(tokens, position_ids, attention_mask)
        if not _computes_loss(model):
            # Not the last stage (or model chunk): no loss here, so no target to look up.
            return output, partial(self.loss, labels, loss_mask, None)
        # A bare GPTModel (no teacher) trains on the LM loss alone: the loss needs α = 0.
        logits, target = self.teacher.split(batch, output)
        return logits, partial(self.loss, labels, loss_mask, target)


def make_forward_step(
    get_batch: Callable, loss: DistillationLoss, teacher: Optional[TeacherSource] = None
) -> DistillationForwardStep:
    """The forward step for :func:`forward_backward` (see :class:`DistillationForwardStep`)."""
    return DistillationForwardStep(get_batch, loss, teacher)


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
