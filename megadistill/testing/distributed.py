"""Run a function on N forked gloo ranks with Megatron-core's ``parallel_state`` initialised.

Megatron-core takes ~6 s to import; forking from a parent that already imported it makes a
2-rank test cost well under a second. Each rank's return value is handed back to the caller.

The ranks always run on CPU with gloo, also on a machine with a GPU: each forked rank first calls
:func:`hide_cuda`, so the code under test (which picks its device, the CPU layer and DeepSpeed's
accelerator by ``torch.cuda.is_available()``) takes its CPU path, as on a CPU-only machine.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
"""The environment of a CPU-only process: no visible GPU (for CUDA and for any process it starts)
and DeepSpeed's CPU accelerator. Pass it to a subprocess that must run on CPU/gloo."""


def _no_cuda() -> bool:
    return False


def _no_cuda_devices() -> int:
    return 0


def hide_cuda() -> None:
    """Make this process a CPU-only one, for good: ``CPU_ONLY_ENV`` in ``os.environ``, and
    ``torch.cuda.is_available()`` False, ``torch.cuda.device_count()`` 0.

    The environment alone is not enough in a forked rank: torch caches the device count per
    process, and a parent that already asked (a ``torch.cuda.is_available()`` anywhere in the
    pytest session) hands its answer to every fork, so the rank would still see the GPU. Replacing
    the two ``torch.cuda`` functions is what the code under test reads (``megadistill`` and the
    CPU layer call ``torch.cuda.is_available()``; ``torch.accelerator.is_available()`` and
    ``device_count()`` delegate to them); any CUDA call that is still reached fails loudly (no
    visible device, or torch's "Cannot re-initialize CUDA in forked subprocess").
    """
    os.environ.update(CPU_ONLY_ENV)
    torch.cuda.is_available = _no_cuda
    torch.cuda.device_count = _no_cuda_devices


@contextlib.contextmanager
def cuda_hidden() -> Iterator[None]:
    """:func:`hide_cuda` for the duration of a ``with`` block, then put everything back (for a
    pytest parent that prepares state its forked ranks inherit, e.g. DeepSpeed's accelerator)."""
    saved_env = {name: os.environ.get(name) for name in CPU_ONLY_ENV}
    saved = torch.cuda.is_available, torch.cuda.device_count
    hide_cuda()
    try:
        yield
    finally:
        torch.cuda.is_available, torch.cuda.device_count = saved
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
    # First of all, before anything asks torch for a GPU: this rank runs on CPU/gloo, GPU or not.
    hide_cuda()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    # One thread per rank: on 2 cores, oversubscription makes steps several times slower.
    torch.set_num_threads(1)
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
    timeout: float | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` forked gloo ranks; return each rank's result.

    Each rank runs on CPU with CUDA hidden (:func:`hide_cuda`) and megatron-core's CPU layer applied,
    whether or not this machine has a GPU.

    ``parallel_state`` is initialised with tensor-parallel size ``tp`` and pipeline size ``pp``
    (data-parallel size is what remains). If a rank raises, the first failing rank's traceback is
    re-raised here (``torch.multiprocessing.ProcessRaisedException``). ``fn`` must be picklable only
    in the sense that it is reachable after fork; closures are fine.

    ``timeout`` (seconds; None = no limit): ranks still running after it are killed and a
    ``TimeoutError`` naming them is raised, so a test of "no rank hangs" fails instead of waiting
    for the process group's own timeout.
    """
    if world_size % (tp * pp) != 0:
        raise ValueError(f"world_size {world_size} is not divisible by tp*pp = {tp * pp}")
    with tempfile.TemporaryDirectory(prefix="megadistill-ranks-") as result_dir:
        context = mp.start_processes(
            _worker,
            args=(fn, world_size, free_port(), tp, pp, vpp, seed, result_dir, args, kwargs),
            nprocs=world_size,
            join=False,
            start_method="fork",
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        # join() returns False as each rank but the last exits cleanly (and raises for a failed one).
        while not context.join(None if deadline is None else max(0.0, deadline - time.monotonic())):
            if deadline is not None and time.monotonic() >= deadline:
                hung = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                for p in context.processes:
                    if p.is_alive():
                        p.kill()
                    p.join()
                raise TimeoutError(f"rank(s) {hung} of {world_size} still running after {timeout} s (killed)")
        return [
            torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
