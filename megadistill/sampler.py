"""The Sampler seam: which global sample indices each data-parallel rank reads at each step.

The data position is a pure function of the step (no iterator state), so a resumed run reads
exactly what the uninterrupted one would have. Batches carry the indices they were built from: an
offline logits store looks its targets up by them, and a data selection (SALT's phase 1) is just
another sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class Sampler(Protocol):
    """Maps (step, data-parallel rank) to the global sample indices that rank trains on."""

    def indices(self, step: int, dp_rank: int) -> Sequence[int]:
        """This rank's ``global_batch_size / dp`` sample indices of global batch ``step``."""
        ...


@dataclass(frozen=True)
class ContiguousSampler:
    """Global batch ``step`` is samples ``[step·G, (step+1)·G)``; rank ``r`` takes the ``r``-th
    ``G/dp`` of them (the order Megatron-LM's pretraining sampler uses)."""

    global_batch_size: int
    """G: sequences per optimizer step over all ranks."""
    dp_size: int
    """Data-parallel size."""
    offset: int = 0
    """First sample index of step 0 (e.g. to start a dataset part-way)."""

    def __post_init__(self) -> None:
        if self.global_batch_size % self.dp_size:
            raise ValueError(f"global batch size {self.global_batch_size} is not divisible by DP size {self.dp_size}")

    def indices(self, step: int, dp_rank: int) -> range:
        per_rank = self.global_batch_size // self.dp_size
        start = self.offset + step * self.global_batch_size + dp_rank * per_rank
        return range(start, start + per_rank)


def micro_batches(dataset, indices: Sequence[int], micro_batch_size: int, device: torch.device) -> list[dict]:
    """Micro-batches of ``dataset[i]`` for ``i`` in ``indices``, in order: dicts of ``[b, s]``
    tensors (``BATCH_KEYS``) plus the ``[b]`` global sample ``indices``."""
    indices = list(indices)
    if len(indices) % micro_batch_size:
        raise ValueError(f"{len(indices)} samples do not split into micro-batches of {micro_batch_size}")
    out = []
    for i in range(0, len(indices), micro_batch_size):
        chunk = indices[i : i + micro_batch_size]
        samples = [dataset[j] for j in chunk]
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(device) for k in BATCH_KEYS}
        batch["indices"] = torch.tensor(chunk, dtype=torch.long, device=device)
        out.append(batch)
    return out
