"""Run a function on N forked gloo ranks with Megatron-core's ``parallel_state`` initialised.

Megatron-core takes ~6 s to import; forking from a parent that already imported it makes a
2-rank test cost well under a second. Each rank's return value is handed back to the caller.
"""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    tp: int,
    pp: int,
    vpp: int | None,
    seed: int | None,
    result_dir: str,
    args: tuple,
    kwargs: dict,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    # One thread per rank: on 2 cores, oversubscription makes steps several times slower.
    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        from megadistill.testing import cpu_patches

        cpu_patches.apply()
    from megatron.core import parallel_state

    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
        )
        if seed is not None:
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            torch.manual_seed(seed)
            model_parallel_cuda_manual_seed(seed)
        result = fn(*args, **kwargs)
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    seed: int | None = 1234,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` forked gloo ranks; return each rank's result.

    ``parallel_state`` is initialised with tensor-parallel size ``tp`` and pipeline size ``pp``
    (data-parallel size is what remains). If a rank raises, the first failing rank's traceback is
    re-raised here (``torch.multiprocessing.ProcessRaisedException``). ``fn`` must be picklable only
    in the sense that it is reachable after fork; closures are fine.
    """
    if world_size % (tp * pp) != 0:
        raise ValueError(f"world_size {world_size} is not divisible by tp*pp = {tp * pp}")
    with tempfile.TemporaryDirectory(prefix="megadistill-ranks-") as result_dir:
        mp.start_processes(
            _worker,
            args=(fn, world_size, free_port(), tp, pp, vpp, seed, result_dir, args, kwargs),
            nprocs=world_size,
            join=True,
            start_method="fork",
        )
        return [
            torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
