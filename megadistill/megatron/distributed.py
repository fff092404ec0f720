"""Process groups for every command that runs models: torch.distributed and Megatron's parallel
state, started once per process (the training loop, precompute-logits, score-data and store
inspection alike)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megadistill import launch
from megadistill.config import RunConfig, validate
from megadistill.megatron import cpu


def init_distributed(cfg: RunConfig) -> None:
    """Start torch.distributed (ranks from ``megadistill.launch``: torchrun, an srun step, or one
    process) unless a caller already did, and Megatron's parallel state; seed this rank. Without
    CUDA on gloo, megatron-core runs through the CPU compatibility layer."""
    if not dist.is_initialized():
        where = launch.resolve()  # the same function the CLI validated with
        validate(cfg, world_size=where.world_size)  # for callers of run() that skipped load_config
        where = launch.init_process_group(where, launch.choose_backend())
        if where.rank == 0:
            for note in where.notes:
                print(f"megadistill: {note}", file=sys.stderr)
    cpu.apply_if_needed(dist.get_backend())
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=cfg.parallel.virtual_pipeline_model_parallel_size,
        )
    # Each pipeline stage draws its own layers' weights and dropout masks (as in Megatron-LM).
    seed = cfg.training.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
