"""Pre-training with distillation, in the shape of Megatron-LM's ``pretrain_gpt.py``.

The pieces Megatron-LM users know (``model_provider``, ``get_batch``, ``forward_step``) plus a
small training loop, so that this file runs on its own:

    python examples/pretrain_gpt_distill.py --steps 5
    torchrun --nproc-per-node 2 examples/pretrain_gpt_distill.py --tp 2
    torchrun --nproc-per-node 2 examples/pretrain_gpt_distill.py --pp 2 --teacher-load ckpt/teacher

Lines marked ``# KD`` are what distillation adds to an existing script: build the teacher next to
the student and wrap both, replace ``forward_step``/``loss_func`` with megadistill's, set each
step's α and τ (and, from α, whether the teacher runs), and run the schedule through
``megadistill.megatron.forward_backward`` (which widens the pipeline's stage-to-stage tensors while
the teacher is active). On a machine without CUDA it applies megadistill's CPU
compatibility layer for megatron-core.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig

from megadistill.losses import KDLossConfig
from megadistill.megatron import DistillationLoss, DistillationModel, make_forward_step
from megadistill.kd.knobs import KDStep
from megadistill.megatron.training import train_step, wrap_ddp

VOCAB, SEQ = 1024, 64


def transformer_config(args, layers: int, hidden: int, heads: int) -> TransformerConfig:
    return TransformerConfig(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=4 * hidden,
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=not torch.cuda.is_available(),
    )


def gpt(config: TransformerConfig, pre_process: bool, post_process: bool) -> GPTModel:
    return GPTModel(
        config,
        get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
    )


def model_provider(args, pre_process: bool = True, post_process: bool = True):
    student = gpt(transformer_config(args, 4, 128, 4), pre_process, post_process)
    teacher = gpt(transformer_config(args, 4, 256, 8), pre_process, post_process)  # KD
    return DistillationModel(student, teacher, teacher_checkpoint=args.teacher_load)  # KD


def get_batch(data_iterator):
    """tokens, labels, loss_mask, attention_mask, position_ids, each ``[b, s]``."""
    tokens = next(data_iterator).to(device())
    position_ids = torch.arange(SEQ, device=tokens.device).expand(tokens.shape[0], SEQ)
    return tokens[:, :-1], tokens[:, 1:], torch.ones_like(tokens[:, 1:], dtype=torch.float), None, position_ids


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def synthetic_batches(args, step: int):
    """This data-parallel rank's micro-batches (stand-in for Megatron's GPT dataset)."""
    dp = parallel_state.get_data_parallel_world_size()
    g = torch.Generator().manual_seed(step * dp + parallel_state.get_data_parallel_rank())
    n = args.global_batch_size // args.micro_batch_size // dp
    return iter([torch.randint(0, VOCAB, (args.micro_batch_size, SEQ + 1), generator=g) for _ in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--global-batch-size", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.5, help="KD weight")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--teacher-load", default=None, help="teacher dist checkpoint (default: random teacher)")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        from megadistill.megatron import cpu as cpu_patches  # megatron-core on a CPU-only torch

        cpu_patches.apply()
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(k, v)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    parallel_state.initialize_model_parallel(args.tp, args.pp)
    model_parallel_cuda_manual_seed(1234)

    model = model_provider(
        args, parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    ).to(device())
    dp = parallel_state.get_data_parallel_world_size()
    ddp_model = wrap_ddp(model, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, clip_grad=1.0, use_distributed_optimizer=True),
        [ddp_model],
    )
    loss = DistillationLoss(KDLossConfig(top_p=0.95, top_k=50, truncation="ghost"))  # KD
    forward_step = make_forward_step(get_batch, loss)  # KD: replaces forward_step + loss_func

    for step in range(args.steps):
        knobs = KDStep(alpha=args.alpha, temperature=args.temperature)  # KD: per-step α and τ
        loss.step = knobs  # KD
        model.teacher_active = knobs.uses_teacher  # KD: the teacher runs (stage tensors widen) only for α > 0
        result = train_step(
            forward_step, synthetic_batches(args, step), ddp_model, optimizer,
            args.global_batch_size // args.micro_batch_size // dp, SEQ, args.micro_batch_size,
        )
        if result.metrics and parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0:
            shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(result.metrics.items()))
            print(f"step {step}: {shown} grad_norm={result.grad_norm:.3f}", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
