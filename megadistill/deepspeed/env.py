"""DeepSpeed's process setup: which accelerator, and no JIT-compiled ops on a CPU-only machine.

On a machine without CUDA, DeepSpeed must use its CPU accelerator (``DS_ACCELERATOR=cpu``; its
auto-detection also lands there, with a warning) and gloo. Its ``TorchBackend`` would otherwise
JIT-compile the ``deepspeed_shm_comm`` op (~100 s per fresh machine, a C++ compiler needed) the
first time it is created: :func:`configure_accelerator` marks that op incompatible first. (The
optimizer is torch's AdamW, ``"torch_adam": true`` in ``megadistill.deepspeed.config``, so no
Adam op is compiled either.) With CUDA, nothing changes: DeepSpeed detects the GPU accelerator
and its NCCL backend itself.
"""

from __future__ import annotations

import os

import torch


def configure_accelerator() -> None:
    """Pick DeepSpeed's accelerator and disable its JIT-built communication op (idempotent; needs
    no process group, so a parent process can pay for it once before forking ranks)."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        raise RuntimeError(
            f"DeepSpeed picked the {accelerator.device_name()!r} accelerator on a machine without CUDA "
            f"(DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}): set DS_ACCELERATOR=cpu"
        )
    # Read by TorchBackend.__init__ (deepspeed.comm.init_distributed) when it decides to build the op.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def setup() -> None:
    """Prepare this process for ``deepspeed.initialize``: :func:`configure_accelerator`, then
    DeepSpeed's communication layer over the process group torch.distributed already has."""
    configure_accelerator()
    import deepspeed.comm as ds_comm
    from deepspeed.accelerator import get_accelerator

    if not ds_comm.is_initialized():
        ds_comm.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
