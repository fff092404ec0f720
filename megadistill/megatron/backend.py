"""The Megatron backend: Megatron-core DDP + (distributed) optimizer, 1F1B pipeline schedules,
``dist_checkpointing`` checkpoints. See ``megadistill.backend.Backend``."""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megadistill.backend import StepResult
from megadistill.lr_schedule import lr_scheduler
from megadistill.megatron.checkpoint import load_checkpoint, write_checkpoint
from megadistill.megatron.model import fuse_output_layer
from megadistill.megatron.gpt import DTYPES, build_gpt, precision
from megadistill.megatron.loss import DistillationLoss
from megadistill.kd.knobs import KDStep
from megadistill.megatron.schedule import forward_backward, make_forward_step
from megadistill.megatron.training import train_step, wrap_ddp, wrap_half


def _next(data_iterator):
    return next(data_iterator)


class MegatronBackend:
    """The student (this rank's stage, wrapped with the teacher by ``teacher.wrap``; for
    ``model.precision`` bf16/fp16 in Megatron's ``Float16Module``) in Megatron's DDP, stepped by
    Megatron's optimizer (``parallel.use_distributed_optimizer``: ZeRO-1 sharded Adam state; fp32
    main parameters for a half-precision student; fp16 with loss scaling) and LR scheduler."""

    def __init__(self, cfg, vocab_size: int, teacher) -> None:
        self.cfg = cfg
        self.teacher = teacher
        use_dist_opt = cfg.parallel.use_distributed_optimizer
        self.precision = precision(cfg.model, cfg)
        vpp = cfg.parallel.virtual_pipeline_model_parallel_size
        self.chunks = []
        """This rank's model chunks: one, or ``vpp`` for the interleaved schedule."""
        for vp_stage in [None] if vpp is None else range(vpp):
            model = teacher.wrap(build_gpt(cfg.model, cfg, vocab_size, vp_stage=vp_stage))
            if cfg.kd.fused_output_layer:
                model = fuse_output_layer(model)  # the last stage hands the loss hidden states, not logits
            model = wrap_half(model, self.precision)
            # Gradients accumulate and reduce in fp32 (DDP's main_grad) whatever the precision.
            ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=use_dist_opt)
            self.chunks.append(wrap_ddp(model, ddp, disable_bucketing=bool(vp_stage)))
        self.model = self.chunks[0]
        o = cfg.optimizer
        half = self.precision != "fp32"
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2, clip_grad=o.clip_grad, use_distributed_optimizer=use_dist_opt,
                # bf16/fp16: fp32 main parameters (and Adam state) stepped from the fp32 gradients,
                # copied back to the half-precision model after each step.
                bf16=self.precision == "bf16", fp16=self.precision == "fp16",
                params_dtype=DTYPES[self.precision], main_params_dtype=torch.float32, main_grads_dtype=torch.float32,
                loss_scale=o.loss_scale, initial_loss_scale=o.initial_loss_scale, min_loss_scale=o.min_loss_scale,
                loss_scale_window=o.loss_scale_window, hysteresis=o.hysteresis,
            ),
            self.chunks,
        )
        if half:
            # Megatron's schedules multiply each micro-batch loss by the optimizer's loss scale
            # before backward (1 for bf16); the optimizer unscales and checks for overflow.
            for chunk in self.chunks:
                chunk.config.grad_scale_func = self.optimizer.scale_loss
        self.scheduler = lr_scheduler(self.optimizer, cfg)
        self.loss = DistillationLoss(cfg.kd.loss_config())  # its step is set by train_step
        self.forward_step = make_forward_step(_next, self.loss, teacher)
        # Validation: LM loss only (α = 0; τ then does not matter, the configured one is explicit).
        eval_loss = DistillationLoss(cfg.kd.loss_config(), KDStep(alpha=0.0, temperature=cfg.kd.temperature))
        self.eval_forward_step = make_forward_step(_next, eval_loss, teacher)
        self._shape = dict(seq_length=cfg.data.seq_length, micro_batch_size=cfg.data.micro_batch_size)

    def train_step(self, micro_batches: list[dict], knobs: KDStep) -> StepResult:
        self.loss.step = knobs
        self.teacher.set_active(knobs.uses_teacher)  # the schedule widens stage tensors from this
        self.teacher.prepare(micro_batches, knobs)  # a pre-pass teacher runs its whole schedule here
        mbs = self._shape["micro_batch_size"]
        result = train_step(
            self.forward_step, self._iterators(micro_batches), self.chunks, self.optimizer, len(micro_batches),
            self._shape["seq_length"], mbs,
        )
        if result.update_successful:
            # As Megatron-LM: a step skipped for an fp16 overflow does not advance the schedule.
            self.scheduler.step(increment=1)
        return result

    def _iterators(self, micro_batches: list[dict]):
        """The schedule's data: one iterator, or one per model chunk (each chunk's forward step takes
        its own micro-batch in the interleaved order)."""
        if len(self.chunks) == 1:
            return iter(micro_batches)
        return [iter(micro_batches) for _ in self.chunks]

    def eval_step(self, micro_batches: list[dict]) -> list[dict]:
        self.teacher.set_active(False)
        for chunk in self.chunks:
            chunk.eval()
        try:
            return forward_backward(
                forward_step_func=self.eval_forward_step, data_iterator=self._iterators(micro_batches),
                model=self.chunks, num_microbatches=len(micro_batches), forward_only=True, **self._shape,
            )
        finally:
            for chunk in self.chunks:
                chunk.train()

    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def is_logging_rank(self) -> bool:
        return parallel_state.is_pipeline_last_stage()

    def save(self, directory: Path, step: int) -> None:
        write_checkpoint(directory, step, self.chunks, self.optimizer, self.scheduler, {"step": step},
                         optimizer_sharding=self.cfg.checkpoint.optimizer_sharding)

    def load(self, directory: Path) -> int:
        return int(load_checkpoint(directory, self.chunks, self.optimizer, self.scheduler)["step"])
