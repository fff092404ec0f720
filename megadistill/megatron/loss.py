"""The distillation loss for Megatron's schedules: ``(1-α)·LM + α·KD`` per micro-batch.

Follows Megatron-LM's ``loss_func`` convention: it returns ``(loss_sum, num_tokens, report)``.
With ``calculate_per_token_loss`` (set by ``megadistill.megatron.training.wrap_ddp``) the schedule
keeps the sum and ``finalize_model_grads`` divides the gradients by the global token count, so the
objective is the mean over every loss token of the global batch. ``report`` maps a name to a
detached ``[sum, count]`` pair; sum the pairs over micro-batches and data-parallel ranks and
divide to log means (``reduce_reports``).

With ``kd.fused_output_layer`` the schedule's output tensor is a ``FusedOutput`` (hidden states and
output weight, ``megadistill.megatron.fused``) and the loss computes the logits chunk by chunk
(``megadistill.losses.fused_output``); the report is the same.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core import parallel_state

from megadistill.kd.knobs import KDStep
from megadistill.kd.teacher import SparseLogits, Target
from megadistill.losses import KDLossConfig, vocab_parallel_distillation_loss
from megadistill.losses.fused_output import fused_output_distillation
from megadistill.megatron.fused import FusedOutput


class DistillationLoss:
    """Builds per-micro-batch loss functions; reads ``step`` (α, τ) at call time.

    ``kd`` holds what the KD loss computes; its ``temperature`` is not used here (τ is the step's,
    set per step by a schedule). ``step`` is the ``KDStep`` of the optimizer step about to run: set
    ``loss.step`` before each step (the backends do in ``train_step``); calling the loss before any
    step was set is an error, not a default α.
    """

    def __init__(self, kd: Optional[KDLossConfig] = None, step: Optional[KDStep] = None) -> None:
        self.kd = kd or KDLossConfig()
        self.step = step
        self._cfg_cache: tuple[float, KDLossConfig] | None = None

    def _kd_config(self, step: KDStep) -> KDLossConfig:
        """``kd`` with this step's τ."""
        tau = step.temperature
        if self._cfg_cache is None or self._cfg_cache[0] != tau:
            self._cfg_cache = (tau, dataclasses.replace(self.kd, temperature=tau))
        return self._cfg_cache[1]

    def __call__(
        self,
        labels: torch.Tensor,
        loss_mask: torch.Tensor,
        target: Optional["Target"],
        student_logits: torch.Tensor,
    ):
        """Loss of one micro-batch from ``student_logits[b, s, v/tp]`` (the schedule's output tensor),
        the KD ``target`` (dense teacher logits ``[b, s, v/tp]`` or ``SparseLogits`` of ``[b, s, k]``;
        None when α = 0), ``labels[b, s]`` and ``loss_mask[b, s]``. With ``kd.fused_output_layer``
        ``student_logits`` is the student's ``FusedOutput`` and a dense target the teacher's."""
        step = self.step
        if step is None:
            raise RuntimeError(
                "DistillationLoss has no step: set loss.step = KDStep(alpha=..., temperature=...) before the "
                "optimizer step runs"
            )
        alpha = step.alpha
        if alpha > 0.0 and target is None:
            raise RuntimeError(
                "KD weight alpha > 0 but there is no KD target: the teacher did not run (activate it for every "
                "step with alpha > 0: TeacherSource.set_active(step.uses_teacher), or DistillationModel.teacher_active)"
            )
        if isinstance(student_logits, FusedOutput):
            return self._fused(labels, loss_mask, target, student_logits, step)
        mask = loss_mask.reshape(student_logits.shape[:-1]).float()
        # One pass over the logits for the LM loss, the KD loss, their gradients and the agreement.
        # In place: the logits come from the output layer (GPTModel returns a fresh
        # ``logits.transpose(0, 1).contiguous()``; ColumnParallelLinear saves its input and weight,
        # not its output), and on the last stage Megatron's ``forward_step_calc_loss`` replaces the
        # output tensor by this loss, so nothing reads the logits afterwards (megatron-core 0.16.1;
        # the DeepSpeed backend likewise only backpropagates the loss). Megatron's own cross entropy,
        # which this replaces, overwrote fp32 logits in place as well.
        terms = vocab_parallel_distillation_loss(
            student_logits,
            labels if alpha < 1.0 else None,
            target if alpha > 0.0 else None,
            self._kd_config(step),
            alpha,
            parallel_state.get_tensor_model_parallel_group(),
            inplace=True,
            validate=not getattr(target, "checked", False),
        )
        return (terms.total * mask).sum(), mask.sum().to(torch.int), _report(terms, mask, alpha)

    def _fused(self, labels, loss_mask, target, out: FusedOutput, step: KDStep):
        """The loss from the student's ``FusedOutput`` (``hidden[n, h]`` in ``[b, s]`` token order,
        ``n = b·s``) and a teacher ``FusedOutput`` (online) or sparse ``[b, s, k]`` target (offline),
        with the output layer fused into the loss."""
        alpha = step.alpha
        mask = loss_mask.reshape(-1).float()  # [n], [b, s] order as the hidden states
        teacher = {}
        if alpha > 0.0:
            if isinstance(target, FusedOutput):
                teacher = dict(teacher_hidden=target.hidden, teacher_weight=target.weight)
            elif isinstance(target, SparseLogits):
                teacher = dict(target=target)  # [b, s, k]: flattened to [n, k] by the fused loss
            else:
                raise TypeError(
                    f"kd.fused_output_layer: the KD target is a {type(target).__name__}, expected the online "
                    "teacher's FusedOutput or sparse targets (SparseLogits)"
                )
        terms = fused_output_distillation(
            out.hidden,
            out.weight,
            labels.reshape(-1) if alpha < 1.0 else None,
            mask,
            alpha,
            self._kd_config(step),
            parallel_state.get_tensor_model_parallel_group(),
            validate=not getattr(target, "checked", False),
            **teacher,
        )
        return terms.loss, mask.sum().to(torch.int), _report(terms, mask, alpha)


def _report(terms, mask: torch.Tensor, alpha: float) -> dict:
    """The micro-batch's ``[sum, count]`` pairs from per-token ``terms`` (``.kd``, ``.lm``,
    ``.agree``, each shaped as ``mask``)."""
    count = mask.sum().detach()
    report = {}
    reported = torch.zeros((), device=mask.device)
    if alpha > 0.0:
        kd = (terms.kd * mask).sum().detach()
        report["top1 agreement"] = torch.stack([(terms.agree.float() * mask).sum(), count])
        report["kd loss"] = torch.stack([kd.clone(), count])
        reported = reported + alpha * kd
    if alpha < 1.0:
        lm = (terms.lm * mask).sum().detach()
        report["lm loss"] = torch.stack([lm.clone(), count])
        reported = reported + (1.0 - alpha) * lm
    report["total loss"] = torch.stack([reported, count])
    return report
