"""The vocab-parallel KD loss on its own, the way a Megatron forward step would call it.

    python examples/kd_loss_quickstart.py                                  # one process
    torchrun --nproc-per-node 2 examples/kd_loss_quickstart.py             # TP=2 (gloo on CPU)

Every rank holds its shard of the vocabulary, as GPTModel's output layer gives it with
``parallel_output=True``; the printed loss is the same for any TP size.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megadistill.losses import KDLossConfig, vocab_parallel_kd_loss


def main() -> None:
    seq, batch, vocab = 16, 2, 512
    group, tp, rank = None, 1, 0
    if "WORLD_SIZE" in os.environ:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        group, tp, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"

    g = torch.Generator().manual_seed(0)  # same full logits on every rank; each keeps its shard
    student_full = torch.randn(seq, batch, vocab, generator=g)
    teacher_full = torch.randn(seq, batch, vocab, generator=g) * 2
    shard = slice(rank * vocab // tp, (rank + 1) * vocab // tp)
    student = student_full[..., shard].to(device).requires_grad_(True)
    teacher = teacher_full[..., shard].to(device)
    loss_mask = torch.ones(seq, batch, device=device)

    # The PD paper's best setting: top-0.95-50 truncation, temperature 1, forward KL; here the
    # truncated mass is kept as a ghost bucket instead of renormalising it away.
    cfg = KDLossConfig(loss="forward_kl", top_p=0.95, top_k=50, truncation="ghost", temperature=1.0)
    per_token = vocab_parallel_kd_loss(student, teacher, cfg, group=group)  # [s, b]
    loss = (per_token * loss_mask).sum() / loss_mask.sum()
    loss.backward()
    if rank == 0:
        print(f"TP={tp}: KD loss {loss.item():.6f}; student grad shard {tuple(student.grad.shape)}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
