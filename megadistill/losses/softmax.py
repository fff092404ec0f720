"""Vocab-parallel softmax of one token chunk, written into a caller's buffer.

Computes ``exp((x - m)·scale)`` in place and normalises it with a global max and a global sum, two
``[c]``-sized all-reduces: the same pattern as Megatron's vocab-parallel cross entropy, and no
full-vocabulary temporary. The row max ``m`` and ``log s`` are kept apart (``log softmax =
(x - m)·scale - log s``) so that large logits do not cost fp32 precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megadistill.losses.parallel import all_reduce_


@dataclass
class ShardSoftmax:
    """Statistics of ``softmax(x·scale)`` for a chunk ``x[c, v/tp]``."""

    m: torch.Tensor
    """``[c]`` global row maximum of ``x`` (unscaled)."""
    log_s: torch.Tensor
    """``[c]`` log of the global ``Σ exp((x - m)·scale)`` (over kept ids)."""
    mass_local: torch.Tensor
    """``[c]`` this shard's share of the (kept) probability mass."""


def global_max(x: torch.Tensor, group) -> torch.Tensor:
    """``[c]`` maximum of ``x[c, v/tp]`` over the whole vocabulary (one all-reduce)."""
    return all_reduce_(x.amax(-1), dist.ReduceOp.MAX, group)


def exp_shifted_into(x: torch.Tensor, m: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """``out[c, v/tp] = exp((x - m)·scale)`` (``out`` may be ``x``)."""
    torch.sub(x, m.unsqueeze(-1), out=out)
    if scale != 1.0:
        out.mul_(scale)
    return out.exp_()


def normalize_(e: torch.Tensor, m: torch.Tensor, group, kept: Optional[torch.Tensor] = None) -> ShardSoftmax:
    """Turn ``e = exp((x - m)·scale)`` into the global softmax in place (over ``kept`` ids only,
    zero elsewhere, if given)."""
    if kept is not None:
        e.masked_fill_(~kept, 0.0)
    s_local = e.sum(-1)
    s = all_reduce_(s_local.clone(), dist.ReduceOp.SUM, group)
    e.mul_(s.reciprocal().unsqueeze(-1))
    return ShardSoftmax(m=m, log_s=torch.log(s), mass_local=s_local / s)


def softmax_into(
    x: torch.Tensor,
    scale: float,
    group,
    out: torch.Tensor,
    kept: Optional[torch.Tensor] = None,
    m: Optional[torch.Tensor] = None,
) -> ShardSoftmax:
    """Write ``softmax(x·scale)`` over the global vocabulary into ``out[c, v/tp]`` (``out`` may be
    ``x`` itself).

    With ``kept`` (bool ``[c, v/tp]``), the softmax is over the kept ids only and ``out`` is zero
    elsewhere; the row maximum must be kept (true for top-p/top-k truncation). ``m`` is the global
    row max if already known. ``scale`` > 0.
    """
    if m is None:
        m = global_max(x, group)
    return normalize_(exp_shifted_into(x, m, scale, out), m, group, kept)
