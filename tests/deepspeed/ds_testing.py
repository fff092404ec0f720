"""Shared pieces of the DeepSpeed backend tests: a tiny KD run config, its teacher checkpoint,
deterministic global batches, and a driver loop that runs any ``Backend`` through the protocol.

(No ``__init__.py`` in this directory: a package named ``deepspeed`` would shadow the real one.)
"""

from __future__ import annotations

from megadistill.deepspeed import env
from megadistill.testing.distributed import cuda_hidden

# Once in the pytest parent, the forked ranks inherit it. The ranks run with CUDA hidden (the
# harness's hide_cuda), on a GPU machine too: configure DeepSpeed as they see it, with its CPU
# accelerator (DS_ACCELERATOR=cpu), before DeepSpeed is imported and caches another one.
with cuda_hidden():
    env.configure_accelerator()

import torch  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from megadistill.config import (  # noqa: E402
    DataConfig,
    DeepSpeedConfig,
    KDConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    TeacherConfig,
    TrainingConfig,
)
from megadistill.kd.knobs import KDStep  # noqa: E402

VOCAB, SEQ, MBS, GLOBAL = 256, 32, 2, 8
STEPS = 5
ALPHAS = [0.5, 0.9, 0.0, 0.3, 1.0]  # includes an LM-only step (teacher off) and a KD-only one
TAU = 1.5  # kd.temperature, and every step's τ


def run_config(
    backend: str = "deepspeed",
    zero_stage: int = 1,
    teacher_checkpoint: str | None = None,
    dropout: float = 0.0,
    steps: int = STEPS,
    ds_extra: dict | None = None,
) -> RunConfig:
    """2-layer hidden-64 student, 2-layer hidden-96 teacher, seq 32, 4 sequences per DP rank."""
    ds = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}  # partition even tiny params
    ds.update(ds_extra or {})
    return RunConfig(
        model=ModelConfig(
            num_layers=2, hidden_size=64, num_attention_heads=4, init_method_std=0.1,
            hidden_dropout=dropout, attention_dropout=dropout,
        ),
        teacher=TeacherConfig(
            mode="online" if teacher_checkpoint else "none",
            model=ModelConfig(num_layers=2, hidden_size=96, num_attention_heads=4, init_method_std=0.3),
            checkpoint=teacher_checkpoint,
        ),
        parallel=ParallelConfig(),
        kd=KDConfig(temperature=TAU),
        # A large LR and weight decay, so that a wrong group (decayed norm) or LR shows in the loss.
        optimizer=OptimizerConfig(
            backend=backend, lr=1e-2, min_lr=1e-3, lr_schedule="cosine", warmup_fraction=0.2,
            weight_decay=0.5, clip_grad=1.0,
        ),
        deepspeed=DeepSpeedConfig(zero_stage=zero_stage, config=ds),
        data=DataConfig(seq_length=SEQ, micro_batch_size=MBS, global_batch_size=GLOBAL),
        training=TrainingConfig(train_steps=steps, seed=1234),
    )


def save_teacher(path: str) -> None:
    """A random teacher (``run_config``'s teacher architecture) saved as a distributed checkpoint."""
    from megadistill.megatron.gpt import build_gpt
    from megadistill.megatron.teacher import save_model_checkpoint

    cfg = run_config(teacher_checkpoint=path)
    torch.manual_seed(7)
    save_model_checkpoint(build_gpt(cfg.teacher.model, cfg, VOCAB), path)


def global_batch(step: int) -> dict:
    """The GLOBAL sequences of ``step`` (identical on every rank); uneven loss masks."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=g)
    mask = (torch.rand(GLOBAL, SEQ, generator=g) < torch.linspace(0.3, 1.0, GLOBAL)[:, None]).float()
    mask[:, 0] = 1.0
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": mask,
        "position_ids": torch.arange(SEQ).expand(GLOBAL, SEQ).contiguous(),
        "indices": torch.arange(step * GLOBAL, (step + 1) * GLOBAL),
    }


def micro_batches(step: int) -> list[dict]:
    """This data-parallel rank's contiguous share of ``global_batch(step)``, in micro-batches."""
    dp, r = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = GLOBAL // dp
    batch = {k: v[r * per_rank : (r + 1) * per_rank] for k, v in global_batch(step).items()}
    return [{k: v[i : i + MBS] for k, v in batch.items()} for i in range(0, per_rank, MBS)]


def build(cfg: RunConfig):
    """``(backend, teacher source)`` as the training loop builds them."""
    from megadistill.assemble import build_backend
    from megadistill.assemble import make_teacher_source

    teacher = make_teacher_source(cfg, VOCAB, cfg.teacher.checkpoint)
    return build_backend(cfg, VOCAB, teacher), teacher


def train(backend, steps, alphas=ALPHAS) -> list[dict]:
    """Run ``backend.train_step`` for each step in ``steps``: per step the reduced metrics, the
    grad norm, the learning rate it used and whether the update was applied."""
    out = []
    for step in steps:
        lr = backend.learning_rate()
        r = backend.train_step(micro_batches(step), KDStep(alpha=alphas[step % len(alphas)], temperature=TAU))
        out.append({**r.metrics, "grad_norm": r.grad_norm, "lr": lr, "ok": r.update_successful})
    return out
