"""``megadistill plan``: what a run will need per rank, computed from its config before launch.

Arithmetic on the config alone (no model is built, megatron-core is not imported, no GPU is needed):
parameter counts exactly as megatron-core's ``GPTModel`` lays the architecture out
(:mod:`~megadistill.plan.parameters`), memory per rank by pipeline stage (parameters, gradients,
optimizer state, activations, logits) for the student and the frozen teacher
(:mod:`~megadistill.plan.memory`), the teacher's FLOP overhead, tokens per step, and for offline and
recording runs the logits store's size (``megadistill.store.estimate``). :func:`make_plan` computes
a :class:`Plan`; :func:`report` renders it as text (:mod:`~megadistill.plan.report`).

The process's fixed part is not in the stages' figures but printed next to them: on a GPU rank the
CUDA context and library workspaces (typically 0.5-2 GiB, not computed); on a CPU (gloo) rank the
host memory of torch, megatron-core and the process, as measured here
(:data:`~megadistill.plan.memory.CPU_PROCESS_BYTES`, ~0.4 GiB), with each stage's total for such a
rank. What is not counted at all (so a rank needs some head room above the figures): allocator
fragmentation, communication buffers, transient copies (the output layer's ``[s, b, v/tp]`` logits
exist twice for a moment; a weight's gradient exists once before it is added into the gradient
buffer) and the data loader.
"""

from megadistill.plan.memory import RankMemory, student_memory, teacher_memory
from megadistill.plan.parameters import forward_flops_per_token, layer_parameters, stage_parameters, total_parameters
from megadistill.plan.report import Plan, StagePlan, make_plan, parse_size, report

__all__ = [
    "Plan", "RankMemory", "StagePlan", "forward_flops_per_token", "layer_parameters", "make_plan", "parse_size",
    "report", "stage_parameters", "student_memory", "teacher_memory", "total_parameters",
]
