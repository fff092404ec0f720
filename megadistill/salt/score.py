"""SALT_DS scoring: how challenging, yet learnable, each training sequence is for the small teacher.

Per token, the teacher's loss is the cross entropy of the true next token,
``loss = logsumexp(x) - x[target]``; the token is *learnable* if the target is inside the
teacher's top-k (at most ``k - 1`` ids have a strictly larger logit, so a target tied with the
k-th logit counts as inside, as the store's truncation keeps ties). A sequence's score is the
**median** of its learnable tokens' losses; a sequence with fewer than ``min_learnable_tokens``
of them is not selectable.

Logits arrive vocab-sharded (``logits[c, v/tp]``, Megatron's ``parallel_output``). The global
max and the target's logit come from one MAX all-reduce of a ``[2, c]`` tensor, the sum of
exponentials and the number of ids above the target from one SUM all-reduce: two small
collectives per micro-batch, no ``[c, v]`` gather, the same result on every TP rank.

``megadistill score-data run.yaml`` (:func:`score_data`) runs this over the run's training
samples, ``0 .. train_steps × global_batch_size - 1`` by global sample index (the indices
``megadistill.sampler`` hands out), data-, tensor- and pipeline-parallel (the last stage scores),
and writes the score directory (``megadistill.salt.scorefile``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megadistill.config import ConfigError

# Elements of the per-chunk buffer (512 KB in float32): the comparison and the exponentials of a
# chunk stay in cache, so the logits are read from memory twice (max, then the chunk loop) instead
# of once per elementwise op — 3-4x faster than whole-tensor ops at vocab 2048 on CPU.
_CHUNK_ELEMENTS = 1 << 17


def token_losses(logits: torch.Tensor, labels: torch.Tensor, top_k: int, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's per-token loss and learnability.

    ``logits[c, v/tp]`` is this rank's vocab shard (ids ``[rank·v/tp, (rank+1)·v/tp)`` of the TP
    ``group``; ``None`` = unsharded), ``labels[c]`` global target ids. Returns, identical on every
    rank of ``group``: ``loss[c]`` float64, the cross entropy ``logsumexp(x) - x[label]``, and
    ``learnable[c]`` bool, whether fewer than ``top_k`` ids have a strictly larger logit than the
    label. float64 logits are reduced in float64 (exact reference); others in float32, the
    logsumexp assembled in float64.
    """
    from megadistill.losses.parallel import all_reduce_, group_rank, group_size

    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits[c, v/tp] and labels[c], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    x = logits if logits.dtype == torch.float64 else logits.float()
    c, v_local = x.shape
    local = labels.to(x.device, torch.long) - group_rank(group) * v_local
    owned = (local >= 0) & (local < v_local)
    target = x.gather(-1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    target = torch.where(owned, target, torch.full_like(target, -torch.inf))
    sharded = group_size(group) > 1
    if sharded:
        # Only the owning rank contributes a finite target logit: MAX shares it with the others.
        top = all_reduce_(torch.stack([x.amax(-1), target]), dist.ReduceOp.MAX, group)
        m, t = top[0], top[1]
    else:  # the max is taken chunk by chunk below, while the chunk is in cache
        m, t = torch.empty_like(target), target
    sums = torch.empty(2, c, dtype=x.dtype, device=x.device)  # [sum of exp(x - m), ids above the target]
    rows = max(1, _CHUNK_ELEMENTS // max(v_local, 1))
    buf = torch.empty(min(rows, c), v_local, dtype=x.dtype, device=x.device)
    for a in range(0, c, rows):
        xc = x[a : a + rows]
        b = buf[: xc.shape[0]]
        if not sharded:
            torch.amax(xc, -1, out=m[a : a + rows])
        # 0/1 floats sum exactly (a shard of < 2^24 ids in float32).
        sums[1, a : a + rows] = torch.gt(xc, t[a : a + rows].unsqueeze(-1), out=b).sum(-1)
        sums[0, a : a + rows] = torch.sub(xc, m[a : a + rows].unsqueeze(-1), out=b).exp_().sum(-1)
    sums = all_reduce_(sums.double(), dist.ReduceOp.SUM, group)
    return m.double() + torch.log(sums[0]) - t.double(), sums[1] < top_k


def sequence_scores(loss: torch.Tensor, learnable: torch.Tensor, loss_mask: Optional[torch.Tensor] = None,
                    min_learnable_tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence SALT_DS scores from per-token ``loss[b, s]`` and ``learnable[b, s]``.

    Positions with ``loss_mask[b, s] == 0`` (not trained on) are not counted. Returns
    ``score[b]`` float64, the median loss over the learnable tokens (the mean of the two middle
    values for an even count), NaN where fewer than ``max(min_learnable_tokens, 1)`` tokens are
    learnable; and ``count[b]`` int64, the number of learnable tokens.
    """
    keep = learnable.bool()
    if loss_mask is not None:
        keep = keep & (loss_mask.to(keep.device) != 0)
    n = keep.sum(-1)
    vals = torch.where(keep, loss.double(), torch.full_like(loss, torch.inf, dtype=torch.float64)).sort(-1).values
    last = vals.shape[-1] - 1
    lo = ((n - 1) // 2).clamp(0, last).unsqueeze(-1)
    hi = (n // 2).clamp(0, last).unsqueeze(-1)
    median = 0.5 * (vals.gather(-1, lo) + vals.gather(-1, hi)).squeeze(-1)
    score = torch.where(n >= max(int(min_learnable_tokens), 1), median, torch.full_like(median, torch.nan))
    return score, n


def score_logits(logits: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor], top_k: int,
                 min_learnable_tokens: int, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score[b], count[b])`` of a micro-batch from the teacher's ``logits[b, s, v/tp]``, the
    ``labels[b, s]`` and ``loss_mask[b, s]`` (see :func:`token_losses`, :func:`sequence_scores`)."""
    b, s, v = logits.shape
    loss, learnable = token_losses(logits.reshape(b * s, v), labels.reshape(b * s), top_k, group)
    return sequence_scores(loss.reshape(b, s), learnable.reshape(b, s), loss_mask, min_learnable_tokens)


def _forward_scores(teacher, batches: list[dict], top_k: int, group, seq_length: int) -> list[tuple]:
    """``[(score[b], count[b])]`` numpy arrays per micro-batch (``batches``: dicts of ``[b, s]``
    tensors, one ``b``) on the last pipeline stage, ``[]`` on the others; the forwards run through
    the logits store's forward-only schedule (``megadistill.store.precompute.teacher_forwards``:
    plain forwards without pipeline parallelism, p2p between stages with it). The score is the raw
    median (NaN only with no learnable token): ``min_learnable_tokens`` is applied at selection
    time, from the stored counts."""
    from megadistill.store.precompute import teacher_forwards

    out = []

    def on_logits(mb, logits):  # logits[b, s, v/tp], last stage only
        score, n = score_logits(logits, mb["labels"], mb["loss_mask"], top_k, 1, group)
        out.append((score.cpu().numpy(), n.cpu().numpy()))

    teacher_forwards(teacher, batches, seq_length, on_logits)
    return out


def score_data(cfg, progress: bool = True, samples_per_part: Optional[int] = None,
               timings: Optional[dict] = None) -> dict:
    """Score run ``cfg``'s training samples with its teacher (``teacher.model`` loaded from
    ``teacher.checkpoint``) and write ``data_selection.scores`` (collective over all ranks);
    returns the manifest.

    Part ``i`` (samples ``[i·P, (i+1)·P)``, ``P = samples_per_part``) is scored by data-parallel
    rank ``i mod DP`` in teacher forwards of ``data.micro_batch_size`` samples of that part, so the
    scores do not depend on the number of ranks and a resumed run (which skips finished parts)
    writes what an uninterrupted one would. A finished score directory for the same run is
    returned as is (only its histogram is redrawn for the current selection settings); one made
    for another run is refused. Under pipeline parallelism the last stage's tensor-parallel rank 0
    writes; ``P`` is rounded up to whole micro-batches (one stage-tensor shape per schedule call).
    ``timings`` (benchmarks), if given, receives this rank's ``loop_seconds`` (wall),
    ``loop_cpu_seconds`` (this process) and ``samples`` of the scoring loop (data reads, forwards,
    scoring, hashes, part writes).
    """
    from megatron.core import parallel_state
    from tqdm import tqdm

    from megadistill.config import CHECKPOINT_MODEL_PREFIX, run_vocab_size
    from megadistill.hashing import file_sha256
    from megadistill.data.datasets import prepare_data
    from megadistill.megatron.gpt import build_gpt, device
    from megadistill.megatron.teacher import freeze, load_teacher_checkpoint
    from megadistill.checkpoint_identity import resolve_teacher_checkpoint
    from megadistill.salt import histogram, scorefile
    from megadistill.store.format import sample_hash
    from megadistill.sampler import micro_batches
    from megadistill.collective import on_rank0 as _on_rank0  # any failure on rank 0 reaches every rank
    from megadistill.megatron.distributed import init_distributed

    sel = cfg.data_selection
    if not sel.scores:
        raise ConfigError("data_selection.scores is required: the directory to write the sequence scores to")
    if cfg.teacher.checkpoint is None:
        raise ConfigError("teacher.checkpoint is required to score data (the small teacher's weights)")
    pp = cfg.parallel.pipeline_model_parallel_size
    if cfg.teacher.model.num_layers % pp:
        raise ConfigError(f"teacher.model.num_layers {cfg.teacher.model.num_layers} is not divisible by "
                          f"parallel.pipeline_model_parallel_size {pp}")
    parts_size = samples_per_part or scorefile.DEFAULT_SAMPLES_PER_PART
    if parts_size < 1:
        raise ConfigError(f"samples per part must be >= 1, got {parts_size}")
    # Whole micro-batches only (the pipeline's stage tensors have one shape), whatever the layout,
    # so every layout runs the same micro-batches.
    mbs = cfg.data.micro_batch_size
    parts_size = -(-parts_size // mbs) * mbs
    init_distributed(cfg)
    tokenizer, train_ds, _, tok_path = prepare_data(cfg)
    vocab = run_vocab_size(cfg, tokenizer.vocab_size)
    ckpt = _on_rank0(lambda: resolve_teacher_checkpoint(cfg.teacher.checkpoint))
    out = Path(sel.scores)
    d = cfg.data

    def begin():
        plan = scorefile.make_plan(cfg, Path(ckpt), file_sha256(tok_path), scorefile.dataset_identity(cfg, train_ds),
                                   parts_size)
        return plan, scorefile.begin(out, plan)

    plan, done = _on_rank0(begin)
    if done is None:  # already complete for this run
        return _on_rank0(lambda: histogram.redraw_histogram(out, cfg))
    done = set(done)
    teacher = freeze(load_teacher_checkpoint(build_gpt(cfg.teacher.model, cfg, vocab), ckpt, CHECKPOINT_MODEL_PREFIX,
                                             vocab_size=tokenizer.vocab_size))

    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    writes = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.is_pipeline_last_stage()
    dev = device()
    ranges = scorefile.part_ranges(plan["num_samples"], parts_size)
    mine = [i for i in range(len(ranges)) if i % dp == dp_rank and i not in done]
    todo_tokens = sum(ranges[i][1] for i in range(len(ranges)) if i not in done) * d.seq_length
    bar = tqdm(total=todo_tokens, unit="tok", unit_scale=True, desc=f"score {out.name}",
               disable=not progress or dist.get_rank() != 0, dynamic_ncols=True)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i in mine:
            first, count = ranges[i]
            batches = micro_batches(train_ds, range(first, first + count), d.micro_batch_size, dev)
            results = _forward_scores(teacher, batches, sel.top_k, group, d.seq_length)
            bar.update(count * d.seq_length * dp)
            if writes:
                hashes = [sample_hash(b["tokens"][j].cpu(), b["labels"][j].cpu())
                          for b in batches for j in range(b["tokens"].shape[0])]
                scorefile.write_part(out, i, first, np.concatenate([r[0] for r in results]),
                                     np.concatenate([r[1] for r in results]), hashes)
    bar.close()
    if timings is not None:
        timings.update(loop_seconds=time.perf_counter() - t0, loop_cpu_seconds=time.process_time() - c0,
                       samples=sum(ranges[i][1] for i in mine))
    dist.barrier()
    return _on_rank0(lambda: scorefile.finish(out, plan, lambda s, c: histogram.draw_histogram(out, s, c, cfg)))
