"""Distillation inside Megatron-core's schedules: a frozen, co-located teacher on TP/PP/DP layouts.

A 2-layer student (hidden 32) learns from a 4-layer teacher (hidden 48, ~2.5x the parameters).
Both start from distributed checkpoints written once at TP=1, which every layout loads resharded.
Per-step losses and gradient norms of KD training must not depend on the layout.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megadistill.losses import KDLossConfig
from megadistill.megatron import DistillationLoss, DistillationModel, forward_backward, make_forward_step
from megadistill.kd.knobs import KDStep
from megadistill.megatron.training import train_step, wrap_ddp
from megadistill.megatron.teacher import load_teacher_checkpoint, save_model_checkpoint
from megadistill.testing import run_distributed
from megadistill.testing.models import tiny_gpt

VOCAB, SEQ, MBS, GLOBAL = 128, 16, 2, 8
STUDENT, TEACHER = dict(layers=2, hidden=32, heads=4), dict(layers=4, hidden=48, heads=4)
STEPS, LR = 3, 3e-3


def _student():
    return tiny_gpt(**STUDENT, vocab=VOCAB, seq=SEQ)


def _teacher(vocab=VOCAB):
    return tiny_gpt(**TEACHER, vocab=vocab, seq=SEQ)


def _make_checkpoints(root):
    torch.manual_seed(1)
    save_model_checkpoint(_student(), f"{root}/student")
    torch.manual_seed(2)
    teacher = _teacher()
    save_model_checkpoint(teacher, f"{root}/teacher")
    tokens = _global_batch(0)[0][:MBS]
    with torch.no_grad():
        return teacher(tokens, torch.arange(SEQ).expand(MBS, SEQ), None)  # [b, s, V] at TP=1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    logits = run_distributed(_make_checkpoints, 1, str(root))[0]
    return str(root), logits


def _global_batch(step):
    """GLOBAL sequences for this step, identical on every rank; uneven loss masks."""
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=g)
    mask = (torch.rand(GLOBAL, SEQ, generator=g) < torch.linspace(0.3, 1.0, GLOBAL)[:, None]).float()
    mask[:, 0] = 1.0
    return tokens[:, :-1], tokens[:, 1:], mask


def _micro_batches(step):
    """This data-parallel rank's contiguous share of the step's global batch, in micro-batches."""
    dp, r = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    tokens, labels, mask = (t[r * GLOBAL // dp : (r + 1) * GLOBAL // dp] for t in _global_batch(step))
    pos = torch.arange(SEQ).expand(MBS, SEQ)
    return [
        (tokens[i : i + MBS], labels[i : i + MBS], mask[i : i + MBS], None, pos)
        for i in range(0, tokens.shape[0], MBS)
    ]


def _train(root, alphas, kd=None, wrap=True):
    """KD-train for len(alphas) steps; per step (metrics, grad norm) plus teacher checks."""
    student = _student()
    load_teacher_checkpoint(student, f"{root}/student")
    model = DistillationModel(student, _teacher(), teacher_checkpoint=f"{root}/teacher") if wrap else student
    before = {k: v.clone() for k, v in model.teacher.state_dict().items() if torch.is_tensor(v)} if wrap else {}
    dp = parallel_state.get_data_parallel_world_size()
    ddp = wrap_ddp(model, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=dp > 1))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, clip_grad=1.0, use_distributed_optimizer=dp > 1),
        [ddp],
    )
    loss = DistillationLoss(kd or KDLossConfig(top_p=0.95, top_k=20, truncation="ghost"))
    forward_step = make_forward_step(lambda it: next(it), loss) if wrap else _plain_forward_step
    out = []
    for step, alpha in enumerate(alphas):
        loss.step = knobs = KDStep(alpha=alpha, temperature=1.5)
        if wrap:
            model.teacher_active = knobs.uses_teacher  # as a backend's TeacherSource.set_active does
        r = train_step(forward_step, iter(_micro_batches(step)), ddp, optimizer, GLOBAL // MBS // dp, SEQ, MBS)
        out.append((r.metrics, r.grad_norm))
    checks = {}
    if wrap:
        after = model.teacher.state_dict()
        checks["teacher_unchanged"] = all(torch.equal(v, after[k]) for k, v in before.items())
        checks["teacher_no_grad"] = all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
        checks["teacher_hidden_from_optimizer"] = not any(
            p is q for p in model.teacher.parameters() for q in ddp.parameters()
        )
    return out, checks


def _plain_forward_step(data_iterator, model):
    """Plain LM training of the bare student, as Megatron-LM's pretrain_gpt does it."""
    tokens, labels, mask, attn, pos = next(data_iterator)
    logits = model(tokens, pos, attn)

    def loss_func(output):
        lm = (vocab_parallel_cross_entropy(output, labels) * mask).sum()
        return lm, mask.sum().to(torch.int), {"lm loss": torch.stack([lm.detach().clone(), mask.sum()])}

    return logits, loss_func


def _last_stage(results):
    return [r for r in results if r[0][0][0]][0]


def _compare(ref, other, keys=("total loss", "kd loss", "lm loss")):
    assert len(other) == len(ref), f"{len(other)} steps, the reference ran {len(ref)}"
    for step, ((m_ref, g_ref), (m, g)) in enumerate(zip(ref, other, strict=True)):
        for k in keys:
            assert abs(m_ref[k] - m[k]) < 1e-5, f"step {step} {k}: {m_ref[k]} vs {m[k]}"
        assert abs(g_ref - g) < 1e-5 * max(1.0, g_ref), f"step {step} grad norm {g_ref} vs {g}"


ALPHAS = [0.5, 0.9, 0.3]


@pytest.fixture(scope="module")
def reference(ckpt):
    return run_distributed(_train, 1, ckpt[0], ALPHAS)[0]


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2), dict(dp=2)], ids=["tp2", "pp2", "dp2"])
def test_kd_training_matches_single_process(ckpt, reference, layout):
    results = run_distributed(_train, 2, ckpt[0], ALPHAS, tp=layout.get("tp", 1), pp=layout.get("pp", 1))
    steps, checks = _last_stage(results)
    _compare(reference[0], steps)
    for _, checks in results:
        assert checks == {"teacher_unchanged": True, "teacher_no_grad": True, "teacher_hidden_from_optimizer": True}


def test_kd_training_tp2_pp2_matches_single_process(ckpt, reference):
    results = run_distributed(_train, 4, ckpt[0], ALPHAS, tp=2, pp=2)
    _compare(reference[0], _last_stage(results)[0])


def test_reference_run_trains_and_keeps_teacher_frozen(reference):
    steps, checks = reference
    assert all(checks.values()), checks
    assert all(0.0 <= m["top1 agreement"] <= 1.0 for m, _ in steps)
    # α-weighted total, as the loss defines it.
    for (m, _), alpha in zip(steps, ALPHAS, strict=True):
        assert abs(m["total loss"] - ((1 - alpha) * m["lm loss"] + alpha * m["kd loss"])) < 1e-5


def test_alpha_zero_is_plain_lm_training(ckpt):
    plain = run_distributed(_train, 2, ckpt[0], [0.0] * STEPS, wrap=False, pp=2)
    distilled = run_distributed(_train, 2, ckpt[0], [0.0] * STEPS, pp=2)
    plain, distilled = _last_stage(plain)[0], _last_stage(distilled)[0]
    _compare(plain, distilled, keys=("lm loss",))
    assert all("kd loss" not in m for m, _ in distilled)


def _backend_teacher_activity(alphas):
    """A MegatronBackend with an online teacher at PP=2 (the one writer of the teacher's activity,
    from each step's α): for each train step, then a validation pass, then a schedule run with the
    teacher set active under an α = 0 loss, which of them ran this rank's teacher stage and the
    width of what pipeline stage 0 sent on."""
    from megadistill.assemble import build_backend
    from megadistill.config import DataConfig, ModelConfig, ParallelConfig, RunConfig, TeacherConfig, TrainingConfig
    from megadistill.megatron.gpt import build_gpt
    from megadistill.megatron.online import OnlineTeacher

    shape = lambda m: ModelConfig(num_layers=2, hidden_size=m["hidden"], num_attention_heads=m["heads"])  # noqa: E731
    cfg = RunConfig(
        model=shape(STUDENT),
        teacher=TeacherConfig(mode="online", model=shape(TEACHER)),
        parallel=ParallelConfig(pipeline_model_parallel_size=2),
        data=DataConfig(seq_length=SEQ, micro_batch_size=MBS, global_batch_size=GLOBAL),
        training=TrainingConfig(train_steps=len(alphas)),
    )
    teacher = OnlineTeacher(lambda: build_gpt(cfg.teacher.model, cfg, VOCAB))
    backend = build_backend(cfg, VOCAB, teacher)
    now, ran, sent = [None], [], {}
    teacher.teacher.register_forward_hook(lambda *_: ran.append(now[0]) and None)
    if not parallel_state.is_pipeline_last_stage():
        teacher.model.register_forward_hook(lambda _m, _i, out: sent.setdefault(now[0], out.shape[-1]) and None)
    for step, alpha in enumerate(alphas):
        now[0] = step
        backend.train_step(_micro_batches(step), KDStep(alpha=alpha, temperature=1.0))
    now[0] = "eval"
    backend.eval_step(_micro_batches(0))
    # The schedule reads the activity from the model, it does not derive it from the loss's α.
    now[0] = "active at alpha 0"
    teacher.set_active(True)
    forward_backward(forward_step_func=backend.eval_forward_step, data_iterator=iter(_micro_batches(0)),
                     model=[backend.model], num_microbatches=GLOBAL // MBS, seq_length=SEQ, micro_batch_size=MBS,
                     forward_only=True)
    return list(dict.fromkeys(ran)), sent


def test_the_backend_alone_decides_whether_the_teacher_runs():
    first, last = run_distributed(_backend_teacher_activity, 2, [0.5, 0.0, 0.3], pp=2)
    # α > 0: the teacher runs on both stages and stage 0 sends student + teacher hidden states;
    # α = 0 (and validation): it does not, and stage tensors keep the student's width.
    assert first[0] == last[0] == [0, 2, "active at alpha 0"]
    both, student = STUDENT["hidden"] + TEACHER["hidden"], STUDENT["hidden"]
    assert first[1] == {0: both, 1: student, 2: both, "eval": student, "active at alpha 0": both}
    assert last[1] == {}


def test_alpha_one_skips_the_lm_loss(ckpt):
    steps, _ = run_distributed(_train, 1, ckpt[0], [1.0])[0]
    assert "lm loss" not in steps[0][0] and steps[0][0]["total loss"] == steps[0][0]["kd loss"]


def _teacher_logits_tp2(root):
    teacher = load_teacher_checkpoint(_teacher(), f"{root}/teacher")
    tokens = _global_batch(0)[0][:MBS]
    with torch.no_grad():
        return teacher(tokens, torch.arange(SEQ).expand(MBS, SEQ), None, runtime_gather_output=True)


def test_teacher_checkpoint_saved_at_tp1_loads_into_tp2(ckpt):
    root, tp1_logits = ckpt
    for logits in run_distributed(_teacher_logits_tp2, 2, root, tp=2):
        assert logits.shape == tp1_logits.shape
        assert (logits - tp1_logits).abs().max() < 1e-5


def _vocab_mismatch(root):
    errors = []
    for build in (
        lambda: DistillationModel(_student(), _teacher(vocab=96)),
        lambda: load_teacher_checkpoint(_teacher(vocab=96), f"{root}/teacher"),
        lambda: load_teacher_checkpoint(_teacher(), f"{root}/missing"),
    ):
        try:
            build()
            errors.append(None)
        except (ValueError, FileNotFoundError) as e:
            errors.append(str(e))
    return errors


def test_teacher_with_another_vocabulary_is_rejected(ckpt):
    model_err, ckpt_err, missing = run_distributed(_vocab_mismatch, 1, ckpt[0])[0]
    assert model_err.startswith("teacher vocabulary size 96 differs from the student's 128")
    assert "teacher checkpoint" in ckpt_err and "vocabulary size 128 differs from the student's 96" in ckpt_err
    assert "does not exist" in missing


def _interleaved(root):
    model = DistillationModel(_student(), _teacher())
    try:
        # Two model chunks: the interleaved schedule (their content does not matter for the refusal).
        forward_backward(forward_step_func=None, data_iterator=None, model=[model, model], num_microbatches=4,
                         seq_length=SEQ, micro_batch_size=MBS)
    except ValueError as e:
        return str(e)


def test_interleaved_pipeline_with_a_colocated_teacher_is_rejected(ckpt):
    msgs = run_distributed(_interleaved, 2, ckpt[0], pp=2, vpp=2)
    assert all(m.startswith("a co-located teacher cannot run under the interleaved") and "teacher.placement prepass" in m
               for m in msgs), msgs


def _loss_report():
    from megadistill.losses.parallel import vocab_parallel_argmax

    tp, r = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(9)
    full = torch.randn(2, 5, 64, generator=g)
    full[0, 0, 3] = full[0, 0, 40] = full[0, 0].max() + 1  # a tie across shards: the smaller id wins
    shard = lambda x: x[..., r * 64 // tp : (r + 1) * 64 // tp].contiguous()  # noqa: E731
    labels = torch.randint(0, 64, (2, 5), generator=g)
    mask = torch.ones(2, 5)
    mask[1, 4] = 0
    loss = DistillationLoss(KDLossConfig(), KDStep(alpha=0.25, temperature=1.0))
    other = full.flip(-1)
    _, n, same = loss(labels, mask, shard(full), shard(full).clone().requires_grad_(True))
    _, _, diff = loss(labels, mask, shard(other), shard(full).clone().requires_grad_(True))
    argmax = vocab_parallel_argmax(shard(full), parallel_state.get_tensor_model_parallel_group())
    agree = float(((full.argmax(-1) == other.argmax(-1)).float() * mask).sum() / mask.sum())
    return int(n), same, diff, torch.equal(argmax, full.argmax(-1)), agree


def test_loss_reports_agreement_and_weights():
    for n, same, diff, argmax_ok, agree in run_distributed(_loss_report, 2, tp=2):
        assert n == 9 and argmax_ok
        mean = {k: float(v[0] / v[1]) for k, v in same.items()}
        assert mean["top1 agreement"] == 1.0 and abs(mean["kd loss"]) < 1e-6
        assert abs(mean["total loss"] - 0.75 * mean["lm loss"]) < 1e-6
        assert float(diff["top1 agreement"][0] / diff["top1 agreement"][1]) == pytest.approx(agree)
