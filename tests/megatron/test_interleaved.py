"""The interleaved (virtual) pipeline schedule: ``parallel.virtual_pipeline_model_parallel_size``,
online distillation through the teacher pre-pass (``teacher.placement: prepass``).

Whole runs through the training driver on 4 gloo ranks (PP = 2 x DP = 2, two model chunks per
rank: rank 0 holds layers 0 and 2 of the 4-layer student, rank 1 layers 1 and 3):

* resumed from a non-interleaved, co-located run's step-2 checkpoint (the same weights, read by
  their global layer numbers into the other layout), the interleaved pre-pass run's steps 3-5 equal
  that run's own steps 3-5 (losses and gradient norms as the co-located and pre-pass placements
  are compared in tests/store/test_prepass.py; the schedule and the layout change nothing else);
* that interleaved run resumed from its own step-3 checkpoint, as a killed run is, repeats its
  steps 4-5 exactly;
* the configurations it cannot serve are refused before any process group starts.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from megadistill.config import (
    CheckpointConfig,
    ConfigError,
    KDConfig,
    ModelConfig,
    ParallelConfig,
    TeacherConfig,
    validate,
)
from megadistill.schedules import AlphaSchedule
from megadistill.testing import run_distributed
from tiny_runs import TEACHER, run_metrics, run_training, tiny_run

# Untied: megatron-core 0.16 saves 'fully_reshardable' optimizer state wrongly when pipeline-tied
# embeddings give a gradient buffer a second padded bucket (megadistill refuses that save).
STUDENT4 = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, untie_embeddings_and_output_weights=True)
STEPS = 5
KD = KDConfig(top_p=0.9, top_k=12, truncation="ghost", temperature=2.0, alpha=AlphaSchedule("constant", alpha_max=0.6))


def _cfg(out, corpus, corpus_teacher_ckpt, interleaved: bool, save_interval: int = 1, resume: str = "auto"):
    cfg = tiny_run(out, corpus, steps=STEPS, model=STUDENT4, kd=KD, teacher=TeacherConfig(
        mode="online", model=TEACHER, checkpoint=corpus_teacher_ckpt, placement="prepass" if interleaved else "colocated"),
        checkpoint=CheckpointConfig(save_interval=save_interval, optimizer_sharding="fully_reshardable", resume=resume))
    # Global batch 8 of micro-batch 2 over DP 2: 2 micro-batches per rank and step (>= PP).
    data = dataclasses.replace(cfg.data, micro_batch_size=2)
    parallel = ParallelConfig(pipeline_model_parallel_size=2,
                              virtual_pipeline_model_parallel_size=2 if interleaved else None)
    return dataclasses.replace(cfg, data=data, parallel=parallel)


def _train(cfg, world: int = 4):
    return run_distributed(run_training, world, cfg, pp=2, vpp=cfg.parallel.virtual_pipeline_model_parallel_size)


def _compare(ref: dict, got: dict, steps, exact: bool) -> None:
    for step in steps:
        for k in ("total loss", "lm loss", "kd loss", "grad_norm") + (("val_loss",) if step == STEPS else ()):
            want, have = ref[step][k], got[step][k]
            if exact:
                assert have == want, f"step {step} {k}: {have} vs {want}"
            else:
                bound = 1e-6 if k == "kd loss" else 2e-6 * abs(want)  # as tests/store/test_prepass.py
                assert abs(have - want) <= bound, f"step {step} {k}: {have} vs {want}"


def test_interleaved_prepass_continues_a_colocated_run_and_resumes_exactly(tmp_path, corpus, corpus_teacher_ckpt, capfd):
    plain = tmp_path / "plain"
    _train(_cfg(plain, corpus, corpus_teacher_ckpt, interleaved=False, save_interval=2))
    interleaved = tmp_path / "interleaved"
    capfd.readouterr()
    _train(_cfg(interleaved, corpus, corpus_teacher_ckpt, interleaved=True,
                resume=str(plain / "checkpoints" / "step_00000002")))
    assert "PP 2 (interleaved, 2 model chunks per rank) x DP 2" in capfd.readouterr().out
    ref, got = run_metrics(plain), run_metrics(interleaved)
    assert sorted(got) == [3, 4, 5], sorted(got)
    _compare(ref, got, (3, 4, 5), exact=False)

    # What the interleaved run leaves when killed after step 3: its checkpoints up to step 3 (and
    # its logs). Resumed, it repeats steps 4-5 exactly.
    killed = tmp_path / "killed"
    shutil.copytree(interleaved, killed)
    for step in (4, 5):
        shutil.rmtree(killed / "checkpoints" / f"step_{step:08d}")
    _train(_cfg(killed, corpus, corpus_teacher_ckpt, interleaved=True))
    _compare(got, run_metrics(killed), (4, 5), exact=True)


def test_a_dp_reshardable_optimizer_does_not_load_into_another_chunk_count(tmp_path, corpus, corpus_teacher_ckpt):
    """'dp_reshardable' optimizer state is keyed by gradient buckets, which the chunks change: refused
    by name (not a missing-key error from inside megatron-core)."""
    # 2 ranks (PP 2, DP 1: 4 micro-batches per step), the last checkpoint only.
    plain = _cfg(tmp_path / "plain", corpus, corpus_teacher_ckpt, interleaved=False, save_interval=STEPS)
    plain = dataclasses.replace(plain, checkpoint=dataclasses.replace(plain.checkpoint, optimizer_sharding="dp_reshardable"))
    _train(plain, world=2)
    resumed = _cfg(tmp_path / "interleaved", corpus, corpus_teacher_ckpt, interleaved=True,
                   resume=str(tmp_path / "plain" / "checkpoints" / f"step_{STEPS:08d}"))
    with pytest.raises(Exception, match="'dp_reshardable'.* 1 model chunk.*this run has 2.*fully_reshardable"):
        _train(resumed, world=2)


def test_interleaved_refusals(tmp_path, corpus):
    def cfg(vpp=2, pp=2, placement="prepass", layers=4, **kw):
        c = tiny_run(tmp_path, corpus, model=dataclasses.replace(STUDENT4, num_layers=layers), kd=KD,
                     teacher=TeacherConfig(mode="online", model=TEACHER, checkpoint="/nowhere", placement=placement),
                     parallel=ParallelConfig(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp))
        return dataclasses.replace(c, **kw)

    validate(cfg(), world_size=2)
    with pytest.raises(ConfigError, match="co-located online teacher cannot run under the interleaved schedule.*prepass"):
        validate(cfg(placement="colocated"))
    with pytest.raises(ConfigError, match="virtual_pipeline_model_parallel_size must be an integer >= 2"):
        validate(cfg(vpp=1))
    with pytest.raises(ConfigError, match="needs parallel.pipeline_model_parallel_size >= 2"):
        validate(cfg(pp=1, layers=4))
    with pytest.raises(ConfigError, match="model.num_layers 6 is not divisible by .* = 2 x 2"):
        validate(cfg(layers=6))
    with pytest.raises(ConfigError, match="a multiple of PP = 2 .* micro-batches per step and rank.* = 1"):
        validate(cfg(), world_size=4)  # DP 2: global batch 8 / (micro-batch 4 x 2) = 1 micro-batch each
    with pytest.raises(ConfigError, match="a multiple of PP = 2 .* = 3"):
        c = cfg()
        validate(dataclasses.replace(c, data=dataclasses.replace(c.data, global_batch_size=12)), world_size=2)
    with pytest.raises(ConfigError, match="needs optimizer.backend megatron"):
        c = cfg()
        validate(dataclasses.replace(c, optimizer=dataclasses.replace(c.optimizer, backend="deepspeed")))
