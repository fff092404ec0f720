"""``DeepSpeedBackend``: the student in a DeepSpeed ZeRO 1/2/3 engine, the teacher outside it.

The student is megatron-core's ``GPTModel`` (``build_gpt``), wrapped by the run's
``TeacherSource`` (an online teacher's ``DistillationModel`` hides the teacher from the module
tree) and handed to ``deepspeed.initialize`` with megatron-core's parallel state as its ``mpu``.
So ZeRO partitions, hooks and checkpoints the student only; the teacher stays a frozen,
unpartitioned module that runs under ``no_grad`` in the wrapper's forward.

Numerics follow the Megatron backend (DDP + distributed optimizer, ``calculate_per_token_loss``):

* AdamW (torch's) with Megatron's parameter groups (no weight decay on biases and norms) and
  Megatron's ``OptimizerParamScheduler`` stepping the engine optimizer's groups after each step;
* the objective is the mean over every loss token of the global batch: each micro-batch's loss
  *sum* is scaled by ``dp / N`` (``N`` the global token count, all-reduced once per step) and
  back-propagated without DeepSpeed's ``1/gradient_accumulation_steps``; DeepSpeed's gradient
  averaging over the data-parallel group divides by ``dp`` again, leaving ``sum / N``;
* gradient clipping by the global norm (DeepSpeed's ``gradient_clipping``), reported before
  clipping;
* ``model.precision`` bf16/fp16: the student is built in that dtype and DeepSpeed's ``bf16`` /
  ``fp16`` engine keeps fp32 master weights, Adam state and gradient accumulation (fp16 with
  DeepSpeed's loss scaler); the loss reads the half-precision logits in fp32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megadistill.backend import StepResult

if TYPE_CHECKING:
    from megadistill.config import RunConfig
    from megadistill.kd.teacher import TeacherSource
    from megadistill.kd.knobs import KDStep


class DeepSpeedBackend:
    """A ZeRO-``cfg.deepspeed.zero_stage`` engine over this rank's student (see the module doc)."""

    def __init__(self, cfg: "RunConfig", vocab_size: int, teacher: "TeacherSource") -> None:
        from megadistill.deepspeed import env

        env.setup()  # before DeepSpeed picks its accelerator and communication backend

        import deepspeed
        from megatron.core import parallel_state

        from megadistill.config.deepspeed import deepspeed_config
        from megadistill.deepspeed.mpu import MegatronMPU
        from megadistill.deepspeed.param_groups import megatron_param_groups
        from megadistill.lr_schedule import lr_scheduler
        from megadistill.megatron.gpt import build_gpt
        from megadistill.megatron.loss import DistillationLoss

        self.cfg = cfg
        self.teacher = teacher
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.zero_stage = cfg.deepspeed.zero_stage
        self.config = deepspeed_config(cfg, self.dp_size)
        self.accumulation_steps = self.config["gradient_accumulation_steps"]

        self.student = build_gpt(cfg.model, cfg, vocab_size)
        self.model = teacher.wrap(self.student)
        if cfg.kd.fused_output_layer:
            from megadistill.megatron.model import fuse_output_layer

            self.model = fuse_output_layer(self.model)  # the loss gets hidden states, not logits
        groups = megatron_param_groups(self.model, cfg.optimizer.lr, cfg.optimizer.min_lr)
        if torch.cuda.is_available():
            # DeepSpeed's engine moves the student to cuda:LOCAL_RANK; with one visible GPU per task
            # that is not this task's device (launch binds local_rank % visible GPUs): tell it ours.
            os.environ["LOCAL_RANK"] = str(torch.cuda.current_device())
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, model_parameters=groups, config=self.config, mpu=MegatronMPU(), dist_init_required=False
        )
        if self.zero_stage == 3 and getattr(self.student, "share_embeddings_and_output_weights", False):
            # The output layer multiplies by the embedding's weight, which ZeRO-3 gathers only while
            # the embedding module runs; GPTModel.forward fetches it for its output layer itself.
            # DeepSpeed 0.19 also registers such a parameter when it sees the access during a
            # forward (ZeROOrderedDict); registering it up front does not rely on that discovery.
            weight = self.student.shared_embedding_or_output_weight()
            if weight is not None:
                deepspeed.zero.register_external_parameter(self.student, weight)
        self.scheduler = lr_scheduler(self.optimizer, cfg)
        self.loss = DistillationLoss(cfg.kd.loss_config())
        self._steps_done = 0

    # ------------------------------------------------------------------ training

    def _global_tokens(self, micro_batches: list[dict]) -> torch.Tensor:
        local = sum(b["loss_mask"].float().sum() for b in micro_batches)
        total = torch.as_tensor(local, dtype=torch.float32, device=micro_batches[0]["loss_mask"].device).clone()
        dist.all_reduce(total, group=self.dp_group)
        return total

    def train_step(self, micro_batches: list[dict], knobs: "KDStep") -> StepResult:
        """Forward/backward of this rank's ``micro_batches`` (``[b, s]`` tensors), one engine
        step (ZeRO reduction, clipping, AdamW), one LR-scheduler step."""
        from megadistill.megatron import reduce_reports

        if len(micro_batches) != self.accumulation_steps:
            raise ValueError(
                f"got {len(micro_batches)} micro-batches for one step, DeepSpeed was configured with "
                f"gradient_accumulation_steps={self.accumulation_steps} (global batch / (micro batch x DP))"
            )
        self.engine.train()
        self.teacher.set_active(knobs.uses_teacher)
        self.teacher.prepare(micro_batches, knobs)
        self.loss.step = knobs
        # dp/N per micro-batch sum: DeepSpeed's data-parallel gradient averaging divides by dp.
        scale = self.dp_size / self._global_tokens(micro_batches).clamp_min(1.0)
        reports = []
        for batch in micro_batches:
            output = self.engine(batch["tokens"], batch["position_ids"], None)
            logits, target = self.teacher.split(batch, output)
            loss_sum, _, report = self.loss(batch["labels"], batch["loss_mask"].float(), target, logits)
            self.engine.backward(loss_sum * scale, scale_wrt_gas=False)
            self.engine.step()  # applies the update only at the accumulation boundary (the last one)
            reports.append(report)
        grad_norm = self.engine.get_global_grad_norm()
        ok = self.engine.was_step_applied()
        if ok:
            # As the Megatron backend: a step skipped for an fp16 overflow does not advance the schedule.
            self.scheduler.step(increment=1)
        self._steps_done += 1
        return StepResult(
            metrics=reduce_reports(reports, self.dp_group),
            grad_norm=float(grad_norm) if grad_norm is not None else None,
            update_successful=bool(ok),
        )

    @torch.no_grad()
    def eval_step(self, micro_batches: list[dict]) -> list[dict]:
        """LM loss only (α = 0, the teacher does not run), dropout off: one report dict
        (name -> ``tensor([sum, count])``) per micro-batch."""
        from megadistill.megatron.loss import DistillationLoss
        from megadistill.kd.knobs import KDStep

        loss = DistillationLoss(self.cfg.kd.loss_config(), KDStep(alpha=0.0, temperature=self.cfg.kd.temperature))
        self.engine.eval()
        self.teacher.set_active(False)
        reports = []
        try:
            for batch in micro_batches:
                output = self.engine(batch["tokens"], batch["position_ids"], None)
                logits, _ = self.teacher.split(batch, output)
                reports.append(loss(batch["labels"], batch["loss_mask"].float(), None, logits)[2])
        finally:
            self.engine.train()
        return reports

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def is_logging_rank(self) -> bool:
        # Every rank computes the same DP-reduced metrics (there are no pipeline stages).
        return True

    # ------------------------------------------------------------------ checkpoints

    def layout(self) -> dict:
        """What a checkpoint of this backend can only be loaded back into."""
        from megatron.core import parallel_state

        return {
            "zero_stage": self.zero_stage,
            "data_parallel_size": self.dp_size,
            "tensor_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "world_size": dist.get_world_size(),
        }

    def save(self, directory: Path, step: int) -> None:
        from megadistill.deepspeed import checkpoint

        checkpoint.save(Path(directory), step, self.engine, self.scheduler, self.layout())

    def load(self, directory: Path) -> int:
        from megadistill.deepspeed import checkpoint

        if self._steps_done:
            # ZeRO-3's engine must be pristine to load (DeepSpeed's load_checkpoint docs).
            raise RuntimeError("DeepSpeedBackend.load must be called on a freshly built backend, before any train_step")
        return checkpoint.load(Path(directory), self.engine, self.scheduler, self.layout())
