"""One optimizer step of a ``DistillationModel`` with Megatron-core's DDP and optimizer."""

from __future__ import annotations

from typing import Callable, Iterator

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer.module import Float16Module

from megadistill.backend import StepResult
from megadistill.megatron.model import DistillationModel
from megadistill.megatron.schedule import forward_backward, reduce_reports


class HalfPrecisionStudent(Float16Module):
    """Megatron's ``Float16Module`` around a bf16/fp16 student (and its riding-along teacher).

    It casts the registered modules -- the student alone: a ``DistillationModel`` hides its
    teacher, which keeps its own precision -- and the first stage's float inputs to the half type.
    Unlike Megatron's default it hands the last stage's logits on in that type: the
    distillation loss reads them chunk by chunk in fp32 (``megadistill.losses``), so an fp32 copy
    of the full ``[b, s, v/tp]`` student and teacher logits would only cost memory.
    """

    def forward(self, *inputs, fp32_output: bool = False, **kwargs):
        return super().forward(*inputs, fp32_output=fp32_output, **kwargs)


def wrap_half(model, precision: str):
    """``model`` in a :class:`HalfPrecisionStudent` for precision bf16/fp16; unchanged for fp32."""
    if precision == "fp32":
        return model
    return HalfPrecisionStudent(model.config, model)


def wrap_ddp(model: DistillationModel, ddp_config: DistributedDataParallelConfig,
             disable_bucketing: bool = False) -> DistributedDataParallel:
    """Wrap the student (only: the teacher is outside the module tree) in Megatron's DDP.

    Sets, on the student's config and before DDP reads it, the conventions the distillation loss
    relies on: the loss function returns token *sums* (``calculate_per_token_loss``), and the
    schedule finishes each step with Megatron's ``finalize_model_grads`` (data-parallel reduction,
    tied-embedding all-reduce across pipeline stages, division by the global token count).
    ``disable_bucketing``: for the interleaved schedule's model chunks after the first (one
    bucket each, as Megatron-LM wraps them).
    """
    config = model.config
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    return DistributedDataParallel(config, ddp_config, model, disable_bucketing=disable_bucketing)


def train_step(
    forward_step_func: Callable,
    data_iterator: Iterator | list[Iterator],
    model: DistributedDataParallel | list[DistributedDataParallel],
    optimizer,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> StepResult:
    """Zero the gradients, run the 1F1B (or no-pipelining) schedule, step the optimizer (which
    may skip the update on an fp16 overflow: ``update_successful`` False, no grad norm). With the
    interleaved schedule ``model`` is the list of this rank's model chunks and ``data_iterator``
    one iterator per chunk."""
    chunks = model if isinstance(model, list) else [model]
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = forward_backward(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
    )
    ok, grad_norm, _ = optimizer.step()
    if ok and not grad_norm:
        # Without clipping, megatron's optimizers skip the norm (None or 0): compute it for logging.
        # A step skipped for an fp16 overflow has none (its gradients are not finite).
        grad_norm = optimizer.get_grad_norm()
    metrics = reduce_reports(reports) if parallel_state.is_pipeline_last_stage() else {}
    return StepResult(metrics, float(grad_norm) if grad_norm is not None else None, bool(ok))
