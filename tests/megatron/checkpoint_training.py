"""A tiny GPT trained as a driver trains it, shared by the Megatron checkpoint tests (test_checkpoint.py,
test_checkpoint_integrity.py): model -> Megatron DDP -> optimizer (the distributed one over torch
Adam, grad clipping) -> warmup + cosine LR scheduler with weight decay, and deterministic
micro-batches, the data position being the step. Call inside ``run_distributed`` ranks.
"""

from __future__ import annotations

import torch

# Imported once in the pytest parent, so the forked ranks do not pay megatron's import time.
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megadistill.megatron.training import train_step, wrap_ddp
from megadistill.testing.models import tiny_gpt

VOCAB, SEQ, MBS, GLOBAL = 128, 16, 2, 8
LAYERS, HIDDEN, HEADS = 2, 32, 4
STEPS = 6
LR, CLIP = 3e-3, 1.0


def tiny_model(hidden=HIDDEN, layers=LAYERS, dropout=0.1) -> GPTModel:
    # Dropout draws from the CPU generator (hidden) and the model-parallel tracker (attention):
    # an exact resume needs both restored.
    return tiny_gpt(layers, hidden, HEADS, VOCAB, SEQ, dropout=dropout)


def build_training(hidden=HIDDEN, layers=LAYERS, distributed_optimizer=True, dropout=0.1):
    """Model -> DDP -> optimizer -> scheduler, as a driver builds them before a (re)start."""
    model = tiny_model(hidden, layers, dropout)
    ddp = wrap_ddp(
        model,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer),
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=LR,
            min_lr=LR / 10,  # the scheduler reads max_lr / min_lr from the param groups
            weight_decay=0.1,
            clip_grad=CLIP,
            use_distributed_optimizer=distributed_optimizer,
        ),
        [ddp],
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=LR,
        min_lr=LR / 10,
        lr_warmup_steps=2,
        lr_decay_steps=STEPS,
        lr_decay_style="cosine",
        start_wd=0.1,
        end_wd=0.1,
        wd_incr_steps=STEPS,
        wd_incr_style="constant",
    )
    return ddp, optimizer, scheduler


def _micro_batches(step):
    """This DP rank's share of step ``step``'s global batch (the data position is the step)."""
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=g)
    mask = (torch.rand(GLOBAL, SEQ, generator=g) < 0.8).float()
    dp, r = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = slice(r * GLOBAL // dp, (r + 1) * GLOBAL // dp)
    tokens, mask = tokens[mine], mask[mine]
    pos = torch.arange(SEQ).expand(MBS, SEQ)
    return [
        (tokens[i : i + MBS, :-1], tokens[i : i + MBS, 1:], mask[i : i + MBS], pos) for i in range(0, len(tokens), MBS)
    ]


def _forward_step(data_iterator, model):
    tokens, labels, mask, pos = next(data_iterator)
    logits = model(tokens, pos, None)

    def loss_func(output):
        loss = (vocab_parallel_cross_entropy(output, labels) * mask).sum()
        return loss, mask.sum().to(torch.int), {"lm loss": torch.stack([loss.detach().clone(), mask.sum()])}

    return logits, loss_func


def train_steps(ddp, optimizer, scheduler, steps):
    """Steps ``steps`` (1-based numbers); per step (loss, grad norm, lr)."""
    dp = parallel_state.get_data_parallel_world_size()
    out = []
    for step in steps:
        r = train_step(_forward_step, iter(_micro_batches(step)), ddp, optimizer, GLOBAL // MBS // dp, SEQ, MBS)
        assert r.update_successful
        scheduler.step(1)
        # The loss is reported on the last pipeline stage only (None elsewhere).
        out.append((r.metrics.get("lm loss"), r.grad_norm, optimizer.param_groups[0]["lr"]))
    return out
