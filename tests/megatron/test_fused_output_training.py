"""``kd.fused_output_layer``: training with the output layer fused into the distillation loss (the
last stage hands the loss hidden states and the output weight, ``megadistill.megatron.fused``) gives
the unfused run's per-step losses, gradient norms and validation loss, through the backends as the
training loop builds them: the Megatron backend at TP = 2 and at PP = 2, with the online teacher
(including SALT's release of it) and with sparse (offline-store-like) targets, and the DeepSpeed
backend (ZeRO-1, DP = 2) with the online teacher; and bf16 at PP = 2 (close, not equal). Steps include
α = 0 and α = 1; the sparse targets are top-k and RS-KD (TP = 2). And offline KD from a real store
(``precompute`` on disk, ghost bucket at τ = 2) through the training driver.

The tiny config, teacher checkpoint, batches and driver are the DeepSpeed tests' (``ds_testing``).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deepspeed"))  # ds_testing (no package there)
from ds_testing import SEQ, STEPS, TAU, VOCAB, micro_batches, run_config, save_teacher, train  # noqa: E402

from megadistill.config import ParallelConfig  # noqa: E402
from megadistill.kd.teacher import SparseLogits  # noqa: E402
from megadistill.megatron import reduce_reports  # noqa: E402
from megadistill.testing import run_distributed  # noqa: E402

ALPHAS = [0.5, 1.0, 0.0, 0.3, 0.0]
RELEASE_AT = 4
"""Online runs release the teacher (SALT's switch to LM training) before this step."""
K = 8


class _SparseTeacher:
    """A ``TeacherSource`` of sparse targets as an offline store serves them (top-k, or RS-KD draws
    made at ``drawn_at``), made from the batch's global sample indices, so identical on every rank
    and in every run."""

    active = True

    def __init__(self, drawn_at=None):
        self.drawn_at = drawn_at

    def wrap(self, student):
        return student

    def set_active(self, active):
        self.active = active

    def prepare(self, micro_batches, knobs):
        pass

    def take_seconds(self):
        return None

    def close(self):
        pass

    def release(self):
        self.active = False

    def split(self, batch, output):
        if not self.active:
            return output, None
        g = torch.Generator().manual_seed(int(batch["indices"][0]))
        b = batch["tokens"].shape[0]
        ids = torch.rand(b, SEQ, VOCAB, generator=g).argsort(-1)[..., :K]
        ids[..., -1] = torch.where(torch.rand(b, SEQ, generator=g) < 0.3, -1, ids[..., -1])  # some padded slots
        logprobs = torch.log_softmax(3 * torch.randn(b, SEQ, K, generator=g), -1)
        logprobs = torch.where(ids < 0, 0.0, logprobs)
        return output, SparseLogits(ids.to(output.device), logprobs.to(output.device), drawn_at=self.drawn_at)


def _run(cfg, sparse) -> dict:
    """Five steps of ``ALPHAS`` and a validation pass of the backend ``cfg`` picks."""
    import megadistill.megatron.loss as loss_module
    from megadistill.assemble import build_backend, make_teacher_source

    fused_calls = []  # the teacher each fused loss call got (this forked rank's module only)
    real = loss_module.fused_output_distillation

    def counted(*args, **kwargs):
        fused_calls.append("online" if "teacher_hidden" in kwargs else "sparse" if "target" in kwargs else "none")
        return real(*args, **kwargs)

    loss_module.fused_output_distillation = counted
    torch.manual_seed(11)  # the same student initialisation in every run
    if sparse:
        source = _SparseTeacher(TAU if sparse == "rskd" else None)
    else:
        source = make_teacher_source(cfg, VOCAB, cfg.teacher.checkpoint)
    backend = build_backend(cfg, VOCAB, source)
    steps = []
    for step in range(STEPS):
        if step == RELEASE_AT and not sparse:
            source.release()
        steps += train(backend, [step], ALPHAS)
    evaluation = reduce_reports(backend.eval_step(micro_batches(STEPS)))
    loss_module.fused_output_distillation = real
    return {"steps": steps, "eval": evaluation, "fused_calls": sorted(set(fused_calls))}


def _pairs(cases) -> list:
    """``[(unfused, fused)]`` of ``_run`` for each ``(cfg, sparse)`` case (sparse: False for the
    config's own teacher, True for top-k targets, "rskd"), built in this rank."""
    out = []
    for cfg, sparse in cases:
        fused = dataclasses.replace(cfg, kd=dataclasses.replace(cfg.kd, fused_output_layer=True))
        out.append((_run(cfg, sparse), _run(fused, sparse)))
    return out


def _hidden_order(cfg) -> float:
    """Largest |difference| between the GPT's logits ``[b, s, v/tp]`` and the fused output's
    ``hidden @ weight.T`` read back in ``[b, s]`` token order."""
    from megadistill.megatron.fused import output_layer_input
    from megadistill.megatron.gpt import build_gpt

    torch.manual_seed(3)
    gpt = build_gpt(cfg.model, cfg, VOCAB)
    batch = micro_batches(0)[0]
    args = (batch["tokens"], batch["position_ids"], None)
    with torch.no_grad():
        logits = gpt(*args)
        out = output_layer_input(gpt, *args)
    fused = (out.hidden @ out.weight.t()).reshape(logits.shape)
    return float((fused - logits).abs().max())


def _check(pairs, what: str, last_stage: bool = True, rel: float = 1e-6) -> None:
    for case, (ref, got) in enumerate(pairs):
        assert ref["fused_calls"] == [], f"{what} case {case}: the unfused run called the fused loss"
        if last_stage:  # targets: the online teacher's hidden states, or sparse; none at α = 0
            assert got["fused_calls"] == ["none", "online" if case == 0 else "sparse"], f"{what} case {case}"
        for step, (want, have) in enumerate(zip(ref["steps"], got["steps"], strict=True)):
            assert set(want) == set(have), f"{what} case {case} step {step}: {sorted(have)} vs {sorted(want)}"
            for k, v in want.items():
                if isinstance(v, float):
                    assert abs(have[k] - v) <= rel * max(1.0, abs(v)), f"{what} case {case} step {step} {k}: {have[k]} vs {v}"
                else:
                    assert have[k] == v, f"{what} case {case} step {step} {k}: {have[k]} vs {v}"
        assert set(ref["eval"]) == set(got["eval"])
        for k, v in ref["eval"].items():
            assert abs(got["eval"][k] - v) <= rel * max(1.0, abs(v)), f"{what} case {case} eval {k}"


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher") / "teacher")
    run_distributed(save_teacher, 1, path)
    return path


def _layout(teacher_ckpt, backend="megatron", **parallel):
    def cfg(online: bool):
        c = run_config(backend, teacher_checkpoint=teacher_ckpt if online else None)
        return dataclasses.replace(c, parallel=ParallelConfig(**parallel))

    return cfg


def _tp2(teacher_ckpt):
    cfg = _layout(teacher_ckpt, tensor_model_parallel_size=2)
    return _hidden_order(cfg(False)), _pairs([(cfg(True), False), (cfg(False), True), (cfg(False), "rskd")])


def test_fused_output_layer_trains_as_unfused_at_tp2(teacher_ckpt):
    for rank, (order_err, pairs) in enumerate(run_distributed(_tp2, 2, teacher_ckpt, tp=2)):
        assert order_err < 1e-5, f"rank {rank}: fused hidden states out of [b, s] order ({order_err})"
        _check(pairs, f"TP=2 rank {rank}")
        assert any("kd loss" in s for s in pairs[0][1]["steps"])


def test_fused_output_layer_trains_as_unfused_at_pp2(teacher_ckpt):
    cfg = _layout(teacher_ckpt, pipeline_model_parallel_size=2)
    results = run_distributed(_pairs, 2, [(cfg(True), False), (cfg(False), True)], pp=2)
    for rank, pairs in enumerate(results):
        _check(pairs, f"PP=2 rank {rank}", last_stage=rank == 1)
    assert all(s for s in results[1][0][1]["steps"]), "the last stage reports every step"


def test_fused_output_layer_trains_as_unfused_with_deepspeed(teacher_ckpt):
    cfg = _layout(teacher_ckpt, backend="deepspeed")
    for rank, pairs in enumerate(run_distributed(_pairs, 2, [(cfg(True), False)])):
        _check(pairs, f"DeepSpeed ZeRO-1 DP=2 rank {rank}")


def test_fused_output_layer_refuses_what_it_cannot_serve():
    from megadistill.config import ConfigError, validate

    fused = lambda c, **kw: dataclasses.replace(c, kd=dataclasses.replace(c.kd, fused_output_layer=True), **kw)  # noqa: E731
    validate(fused(run_config("deepspeed", zero_stage=2)))
    with pytest.raises(ConfigError, match="kd.fused_output_layer.*zero_stage 3"):
        validate(fused(run_config("deepspeed", zero_stage=3)))
    plain = run_config("megatron")
    with pytest.raises(ConfigError, match="kd.fused_output_layer cannot record logits"):
        validate(fused(plain, record_logits=dataclasses.replace(plain.record_logits, store="/tmp/store")))


def _bf16(cfg):
    half = lambda m: dataclasses.replace(m, precision="bf16")  # noqa: E731
    return dataclasses.replace(cfg, model=half(cfg.model), teacher=dataclasses.replace(cfg.teacher, model=half(cfg.teacher.model)))


def test_fused_output_layer_in_bf16_at_pp2(teacher_ckpt):
    """bf16 (Megatron's Float16Module passes the fused outputs through uncast): close to unfused."""
    cfg = _layout(teacher_ckpt, pipeline_model_parallel_size=2)
    results = run_distributed(_pairs, 2, [(_bf16(cfg(True)), False), (_bf16(cfg(False)), True)], pp=2)
    for rank, pairs in enumerate(results):
        # The fused loss multiplies bf16 chunks itself: not bit-equal to the output layer's matmul.
        _check(pairs, f"bf16 PP=2 rank {rank}", last_stage=rank == 1, rel=1e-3)


def _train_counting_fused_calls(cfg) -> int:
    """``run_training(cfg)`` in this forked rank; how many times it called the fused loss."""
    import megadistill.megatron.loss as loss_module
    from tiny_runs import run_training

    real, calls = loss_module.fused_output_distillation, []
    loss_module.fused_output_distillation = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    run_training(cfg)
    return len(calls)


def test_fused_output_layer_trains_from_a_store_as_unfused(tmp_path, corpus, corpus_teacher_ckpt):
    """Offline KD from a store on disk (``precompute`` of a teacher checkpoint, top-p-k with the
    ghost bucket at τ = 2, served by the offline teacher by global sample index) through the
    training driver: the fused run's logged per-step losses and gradient norms equal the unfused
    run's."""
    from tiny_runs import TEACHER, run_metrics, run_precompute, tiny_run

    from megadistill.config import KDConfig, TeacherConfig
    from megadistill.schedules import AlphaSchedule

    kd = KDConfig(top_p=0.9, top_k=12, truncation="ghost", temperature=2.0,
                  alpha=AlphaSchedule("constant", alpha_max=0.7))
    store = TeacherConfig(mode="offline", model=TEACHER, checkpoint=corpus_teacher_ckpt, store=str(tmp_path / "store"))
    run_distributed(run_precompute, 1, tiny_run(tmp_path / "pre", corpus, kd=kd, teacher=store),
                    logprob_dtype="fp32")
    metrics = []
    for fused in (False, True):
        out = tmp_path / f"fused-{fused}"
        calls = run_distributed(_train_counting_fused_calls, 1, tiny_run(
            out, corpus, steps=3, teacher=store, kd=dataclasses.replace(kd, fused_output_layer=fused)))[0]
        assert (calls > 0) == fused, f"fused_output_layer={fused}: {calls} fused loss calls"
        metrics.append(run_metrics(out))
    ref, got = metrics
    assert sorted(ref) == sorted(got) == [1, 2, 3]
    for step in ref:
        for k in ("total loss", "lm loss", "kd loss", "grad_norm") + (("val_loss",) if step == 3 else ()):
            want, have = ref[step][k], got[step][k]
            assert abs(have - want) <= 1e-6 * max(1.0, abs(want)), f"step {step} {k}: {have} vs {want}"
