"""One process as a whole megatron-core job: a one-rank gloo group with megatron-core's parallel
state at TP = PP = 1, for commands that build or load a whole model in the process they run in
(``megadistill export-hf``; ``convert-hf`` has the same need).

megatron-core's layers read the tensor- and pipeline-parallel state and its RNG tracker even at
one rank, and ``dist_checkpointing`` needs a process group to load or save: both exist here for
the ``with`` block, and are torn down after it. A caller that already runs inside a one-rank group
(a test's forked rank, say) keeps its own.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Iterator

from megadistill.config import ConfigError


@contextmanager
def one_process_group(command: str) -> Iterator[None]:
    """A one-rank gloo group with megatron-core's parallel state (TP = PP = 1) for the block,
    unless the caller has one already (then it must be a single rank). ``command`` names the
    command in the ``ConfigError`` raised when started as several ranks (under torchrun / srun)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megadistill.megatron import cpu

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConfigError(f"{command} runs as one process, not {dist.get_world_size()} ranks")
        yield
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"{command} runs as one process: start it without torchrun/srun")
    with tempfile.TemporaryDirectory(prefix="megadistill-one-process-") as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            cpu.apply_if_needed("gloo")
            parallel_state.initialize_model_parallel(1, 1)
            torch.manual_seed(0)
            # The weights are loaded over the initialisation; megatron-core needs the tracker to build.
            model_parallel_cuda_manual_seed(0)
            yield
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
