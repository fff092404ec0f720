"""DeepSpeed's process setup: which accelerator, and no JIT-compiled ops on a CPU-only machine.

On a machine without CUDA, DeepSpeed must use its CPU accelerator (``DS_ACCELERATOR=cpu``; its
auto-detection also lands there, with a warning) and gloo. Its ``TorchBackend`` would otherwise
JIT-compile the ``deepspeed_shm_comm`` op (~100 s per fresh machine, a C++ compiler needed) the
first time it is created: :func:`setup` marks that op incompatible before DeepSpeed's
communication layer starts. (The optimizer is torch's AdamW, ``"torch_adam": true`` in
``megadistill.deepspeed.config``, so no Adam op is compiled either.) With CUDA, nothing changes:
DeepSpeed detects the GPU accelerator and its NCCL backend itself.
"""

from __future__ import annotations

import os

import torch


def setup() -> None:
    """Prepare this process for ``deepspeed.initialize`` (idempotent). Call it before DeepSpeed
    first asks for its accelerator, i.e. before ``import deepspeed`` where possible."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm as ds_comm
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        raise RuntimeError(
            f"DeepSpeed picked the {accelerator.device_name()!r} accelerator on a machine without CUDA "
            f"(DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}): set DS_ACCELERATOR=cpu"
        )
    # The shm op is built by TorchBackend.__init__ (deepspeed.comm.init_distributed); once a backend
    # exists, the flag no longer matters.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not ds_comm.is_initialized():
        # DeepSpeed adopts the process group torch.distributed already has (gloo on CPU).
        ds_comm.init_distributed(dist_backend=accelerator.communication_backend_name(), verbose=False)
