"""Every random-number state a training step draws from (python, numpy, torch CPU, this rank's
CUDA device, and megatron-core's model-parallel RNG tracker), to save and restore exactly."""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import tensor_parallel


def get_state() -> dict:
    """This rank's RNG states (copies)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,  # this rank's device
        "tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }


def set_state(state: dict) -> None:
    """Restore what :func:`get_state` returned; call it last, when nothing else will draw first."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))
