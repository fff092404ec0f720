"""Tensor-parallel helpers for vocab-sharded logits: group lookup, vocab ranges, global reductions.

All reductions here run in the forward pass only; the KD losses' backward is purely local.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ProcessGroup = "torch.distributed.ProcessGroup | None"


def default_tp_group():
    """What ``group="default"`` means: Megatron's tensor-parallel group if ``parallel_state`` is
    initialised; ``None`` (no TP) in a single process. Raises ``ValueError`` when torch.distributed
    runs several ranks but ``parallel_state`` is not initialised: each rank's logits may be a vocab
    shard, and treating them as whole would give a wrong loss and gradient without any error."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from megatron.core import parallel_state
    except ImportError:  # megatron-core is a dependency, but the losses do not need it
        parallel_state = None
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size() == 1:
        return None
    raise ValueError(
        f"group='default' needs Megatron's parallel_state (torch.distributed runs {dist.get_world_size()} ranks "
        "but megatron.core.parallel_state is not initialised, so the tensor-parallel group is unknown): pass "
        "group=<the process group sharing the vocabulary>, or group=None if every rank holds the whole vocabulary"
    )


def group_size(group) -> int:
    """Number of ranks sharing the vocabulary (1 without a process group)."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    """This rank's index within the vocab-sharing group (0 without a process group)."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def check_vocab_partition(vocab_size: int, tp_size: int) -> int:
    """Return the per-rank shard width ``vocab_size // tp_size``; raise if it does not divide."""
    if vocab_size % tp_size != 0:
        raise ValueError(
            f"vocab size {vocab_size} is not divisible by tensor-parallel size {tp_size}; "
            "pad the vocabulary (Megatron's make_vocab_size_divisible_by) to a multiple of it"
        )
    return vocab_size // tp_size


def all_reduce_(t: torch.Tensor, op, group) -> torch.Tensor:
    """In-place all-reduce over ``group``; a no-op for a group of one."""
    if group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def global_logsumexp(local_lse: torch.Tensor, group) -> torch.Tensor:
    """Combine per-shard log-sum-exps ``[...]`` into the log-sum-exp over the whole vocabulary.

    Reduces two small ``[...]`` tensors (MAX, then SUM) instead of any ``[..., v]`` tensor. Shards
    that are entirely ``-inf`` contribute zero mass; a row that is ``-inf`` everywhere stays ``-inf``.
    """
    if group_size(group) == 1:
        return local_lse
    m = all_reduce_(local_lse.clone(), dist.ReduceOp.MAX, group)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = all_reduce_(torch.exp(local_lse - m_safe), dist.ReduceOp.SUM, group)
    return m_safe + torch.log(s)


def all_gather_last_dim(t: torch.Tensor, group) -> torch.Tensor:
    """Concatenate ``t[..., k]`` from every rank of ``group`` along the last dim → ``[..., k*tp]``."""
    n = group_size(group)
    if n == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def vocab_parallel_argmax(logits: torch.Tensor, group) -> torch.Tensor:
    """Global vocab id of the largest logit ``[...]`` from shards ``logits[..., v/tp]``.

    Two ``[...]``-sized all-reduces; ties go to the smallest id, as on a single rank.
    """
    local_max, local_idx = logits.max(dim=-1)
    global_max = all_reduce_(local_max.clone(), dist.ReduceOp.MAX, group)
    ids = local_idx + group_rank(group) * logits.shape[-1]
    # Ranks without the maximum offer an id larger than any real one.
    big = torch.iinfo(ids.dtype).max
    ids = torch.where(local_max == global_max, ids, torch.full_like(ids, big))
    return all_reduce_(ids, dist.ReduceOp.MIN, group)
