"""Megatron-core's ``parallel_state`` in the shape DeepSpeed's ``mpu`` argument expects.

DeepSpeed asks its ``mpu`` for the *model-parallel* rank, size and group (its ZeRO optimizers
call ``get_model_parallel_world_size`` / ``get_model_parallel_rank``, which megatron-core no
longer has) and for the data-parallel group it shards and reduces over. With the DeepSpeed
backend there is no pipeline parallelism (``megadistill.deepspeed.config.check``), so the model
parallel group is the tensor-parallel one.
"""

from __future__ import annotations

from megatron.core import parallel_state


class MegatronMPU:
    """The ``mpu`` handed to ``deepspeed.initialize``: answers from megatron-core's parallel state."""

    def __init__(self) -> None:
        if parallel_state.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError("the DeepSpeed backend needs pipeline_model_parallel_size 1")

    # model parallel = tensor parallel (PP is 1)
    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return parallel_state.get_pipeline_model_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        import torch.distributed as dist

        return dist.get_process_group_ranks(parallel_state.get_data_parallel_group())
