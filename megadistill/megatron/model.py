"""``DistillationModel``: a student ``GPTModel`` with a frozen teacher riding along on every stage.

Per micro-batch, the teacher runs under ``torch.no_grad()`` and then the student runs. On the last
pipeline stage the wrapper returns ``(student_logits, teacher_logits)``, both ``[b, s, v/tp]``. On
any other stage it returns ``cat([student_hidden, teacher_hidden], -1)`` of shape
``[s, b, h_student + h_teacher]``, the one tensor Megatron's schedule sends to the next stage.
There, :meth:`set_input_tensor` splits it again. Gradients flow only into the student's part.
With ``fused_output`` (``kd.fused_output_layer``) the last stage returns a
``megadistill.megatron.fused.FusedOutput`` pair (hidden states and output weight) instead of logits.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule

from megadistill.megatron.fused import FusedOutputModel, output_layer_input
from megadistill.megatron.teacher import prepare_teacher


class DistillationModel(MegatronModule):
    """Student + frozen teacher on the same ranks and stages.

    Only the student is a registered submodule: ``parameters()``, ``state_dict()`` and
    ``sharded_state_dict()`` are the student's alone, under the student's own key names, so DDP, the
    optimizer and checkpoints see a plain GPT model. The student sits at ``.module``, the attribute
    Megatron's ``get_attr_wrapped_model`` unwraps through (as for DDP and Float16Module), so that
    code looking for GPT attributes (tied embeddings, ``pre_process``) finds the student's.
    """

    def __init__(
        self,
        student: GPTModel,
        teacher: GPTModel,
        teacher_checkpoint: Optional[str] = None,
        teacher_checkpoint_prefix: str = "",
        tokenizer_vocab_size: Optional[int] = None,
    ) -> None:
        """``tokenizer_vocab_size``: the tokenizer's ids (the real rows of the padded vocabulary),
        so that a teacher checkpoint padded for another TP size loads (``prepare_teacher``)."""
        super().__init__(config=student.config)
        self.module = student
        # A list hides the teacher from Module.__setattr__: no parameters, buffers or hooks leak.
        self._teacher = [prepare_teacher(teacher, student, teacher_checkpoint, teacher_checkpoint_prefix,
                                         vocab_size=tokenizer_vocab_size)]
        self.student_hidden = student.config.hidden_size
        self.teacher_hidden = teacher.config.hidden_size
        self.teacher_active = True
        """Run the teacher in the next forward passes (and widen the stage tensors for it, which
        ``megadistill.megatron.forward_backward`` reads from here). Set per step from the step's
        ``KDStep.uses_teacher`` (False for KD weight 0), by a backend through
        ``OnlineTeacher.set_active`` or by a training script; nothing else derives it."""
        self.fused_output = False
        """The last stage returns ``(FusedOutput, FusedOutput or None)`` (hidden states and output
        weights) instead of logits, for a loss that fuses the output layer
        (:func:`fuse_output_layer` sets it)."""

    @property
    def student(self) -> GPTModel:
        return self.module

    @property
    def teacher(self) -> Optional[GPTModel]:
        """The teacher, or None once :meth:`release_teacher` dropped it."""
        return self._teacher[0] if self._teacher else None

    def release_teacher(self) -> None:
        """Drop the teacher for good (SALT's switch to plain LM training): this wrapper then holds no
        reference to its parameters or buffers, and stage tensors keep the student's width."""
        self._teacher.clear()
        self.teacher_hidden = 0
        self.teacher_active = False

    def set_input_tensor(self, input_tensor) -> None:
        """Split the tensor received from the previous stage between student and teacher."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "a GPT stage receives one tensor"
            input_tensor = input_tensor[0]
        if input_tensor is None or not self.teacher_active:
            self.student.set_input_tensor(input_tensor)
            if self.teacher is not None:
                self.teacher.set_input_tensor(None)
            return
        expected = self.student_hidden + self.teacher_hidden
        if input_tensor.shape[-1] != expected:
            raise RuntimeError(
                f"received a stage input of width {input_tensor.shape[-1]}, expected student + teacher "
                f"hidden = {expected}: run the schedule through megadistill.megatron.forward_backward"
            )
        student_part, teacher_part = torch.split(input_tensor, [self.student_hidden, self.teacher_hidden], dim=-1)
        self.student.set_input_tensor(student_part)
        self.teacher.set_input_tensor(teacher_part.detach())

    def forward(self, input_ids, position_ids, attention_mask, **kwargs):
        """Last stage: ``(student_logits[b, s, v/tp], teacher_logits[b, s, v/tp] or None)``, or with
        ``fused_output`` the two models' ``FusedOutput`` (the teacher's None when inactive);
        other stages: the student's (and teacher's) hidden states for the next stage."""
        run = output_layer_input if self.fused_output and self.module.post_process else torch.nn.Module.__call__
        teacher_out = None
        if self.teacher_active:
            if self.teacher is None:
                raise RuntimeError("the teacher was released (KD has ended for this run): teacher_active must stay False")
            with torch.no_grad():
                teacher_out = run(self.teacher, input_ids, position_ids, attention_mask)
        student_out = run(self.student, input_ids, position_ids, attention_mask, **kwargs)
        if self.module.post_process:
            return student_out, teacher_out
        if teacher_out is None:
            return student_out
        return torch.cat([student_out, teacher_out], dim=-1)

    def state_dict(self, *args, **kwargs):
        return self.student.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.student.load_state_dict(state_dict, strict=strict)

    def sharded_state_dict(self, prefix: str = "", *args, **kwargs):
        return self.student.sharded_state_dict(prefix, *args, **kwargs)


def fuse_output_layer(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (what a ``TeacherSource.wrap`` returned) with its last stage returning
    ``megadistill.megatron.fused.FusedOutput`` s: a ``DistillationModel`` switches itself over (its teacher too), any
    other student is wrapped in ``FusedOutputModel``."""
    if isinstance(model, DistillationModel):
        model.fused_output = True
        return model
    return FusedOutputModel(model)
