"""``kd.fused_output_layer``: the last pipeline stage hands the loss the final hidden states and the
output weight instead of logits, so the student's (and an online teacher's) ``[s, b, v/tp]`` logits
are never materialised; ``megadistill.losses.fused_output`` computes them chunk by chunk inside the
loss.

How the hidden states are obtained: :func:`output_layer_input` runs the ``GPTModel`` as usual but
for that one call replaces its output layer's ``forward`` (an instance attribute, restored
afterwards) by one that records its input (the decoder's output after the final norm) and the
weight it was handed (the shared embedding weight for tied embeddings), and returns an empty
``[s, b, 0]`` tensor in place of the logits. This leans on one fact that megatron-core 0.16 and
0.19 share: ``GPTModel._postprocess`` calls ``self.output_layer(hidden, weight=..., ...)`` once
without labels. It does not copy or re-order GPTModel's forward (whose ``_preprocess``/``decoder``
arguments differ between releases), and the module is still *called*, so its pre-forward hooks
(Megatron DDP's overlapped parameter all-gather, DeepSpeed's) still run. A forward hook could not
skip the matmul, and 0.19's ``output_processor`` argument does not exist on 0.16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule


@dataclass
class FusedOutput:
    """What the last stage returns for one model (student or teacher) when the output layer is fused
    into the loss. Not a tuple or a tensor, so Megatron's ``Float16Module`` passes it through
    without casting (the loss reads each chunk's logits in fp32 itself)."""

    hidden: torch.Tensor
    """``[n, h]`` (``n = b·s``, in the ``[b, s]`` order of labels and loss masks) final hidden states
    after the final norm, the full sequence on every tensor-parallel rank; for the student, the
    backward all-reduces (or, under sequence parallelism, reduce-scatters) their gradient over TP,
    as the output layer's own backward would."""
    weight: torch.Tensor
    """``[v/tp, h]`` this rank's shard of the output weight (the shared embedding weight when tied)."""

    @property
    def device(self) -> torch.device:
        return self.hidden.device


def output_layer_input(gpt: GPTModel, *args, **kwargs) -> FusedOutput:
    """``gpt(*args, **kwargs)`` at the last pipeline stage, stopped before its output layer's matmul:
    the output layer's input and weight (see the module doc for why a temporary ``forward``)."""
    layer = gpt.output_layer
    seen = {}

    def record(input_, weight=None, runtime_gather_output=None):
        seen["hidden"], seen["weight"] = input_, layer.weight if weight is None else weight
        return input_[..., :0], None  # GPTModel transposes and copies this: an empty [b, s, 0]

    own = layer.__dict__.get("forward")  # an instance-level forward someone else installed
    layer.forward = record
    try:
        gpt(*args, **kwargs)
    finally:
        if own is None:
            del layer.forward
        else:
            layer.forward = own
    if "hidden" not in seen:
        raise RuntimeError("kd.fused_output_layer: the GPT model did not call its output layer (not the last stage?)")
    hidden = seen["hidden"]  # [s, b, h], or [s/tp, b, h] under sequence parallelism
    group = getattr(layer, "tp_group", None)
    if layer.sequence_parallel:  # its backward reduce-scatters a contiguous copy: any layout is fine
        hidden = gather_from_sequence_parallel_region(hidden, group=group)
    # [s, b, h] -> [b, s, h] -> [n, h] (a copy): the token order of labels[b, s] and the loss mask.
    hidden = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])
    if not layer.sequence_parallel:
        # After the transpose, so that the gradient reaching it is contiguous: megatron-core 0.16's
        # backward all-reduces ``grad.contiguous()`` and returns ``grad``, a no-op for a
        # non-contiguous one (0.19 returns the reduced copy).
        hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
    return FusedOutput(hidden, seen["weight"])


class FusedOutputModel(MegatronModule):
    """A student without an in-model teacher (offline store, no teacher) whose last stage returns a
    :class:`FusedOutput` instead of logits; other stages run the student unchanged.

    As ``DistillationModel``, the student sits at ``.module`` and state dicts are the student's own,
    so DDP, optimizers, checkpoints and Megatron's ``get_attr_wrapped_model`` see a plain GPT."""

    def __init__(self, student: GPTModel) -> None:
        super().__init__(config=student.config)
        self.module = student

    def set_input_tensor(self, input_tensor) -> None:
        self.module.set_input_tensor(input_tensor)

    def forward(self, input_ids, position_ids, attention_mask, **kwargs):
        if self.module.post_process:
            return output_layer_input(self.module, input_ids, position_ids, attention_mask, **kwargs)
        return self.module(input_ids, position_ids, attention_mask, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)

    def sharded_state_dict(self, prefix: str = "", *args, **kwargs):
        return self.module.sharded_state_dict(prefix, *args, **kwargs)
