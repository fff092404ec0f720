"""Training checkpoints (megadistill.megatron.checkpoint): exact resume, layouts, atomicity, bad loads.

The central test trains a tiny GPT on 2 ranks (Megatron DDP, the *distributed* optimizer over
torch Adam, grad clipping, a warmup + cosine LR schedule with weight decay, dropout > 0) for STEPS
steps, saving at step SAVE_AT. Fresh processes load that checkpoint and train on: their per-step
losses, grad norms and learning rates must equal the uninterrupted run's bit for bit, for DP=2
(optimizer state 'dp_reshardable' and 'fully_reshardable'), TP=2, PP=2 and the non-distributed
optimizer. That catches the shared-Adam-step trap (a wrong second resumed step) and a missing RNG
restore (different dropout masks at once); negative controls show both would be caught.
Checkpoints also load at another layout (DP=2 -> TP=2, DP=1, PP=2; dropout 0, to tolerance).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from checkpoint_training import GLOBAL, LR, SEQ, STEPS, VOCAB, build_training, tiny_model, train_steps

# Imported once in the pytest parent, so the forked ranks do not pay megatron's import time.
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megadistill import checkpoint_dir
from megadistill.checkpoint_dir import latest_checkpoint
from megadistill.megatron import checkpoint as ckpt
from megadistill.megatron.checkpoint import load_checkpoint, save_checkpoint
from megadistill.megatron.training import wrap_ddp
from megadistill.testing.distributed import run_distributed

SAVE_AT = 3


def _adam_states(optimizer):
    return [s for opt in getattr(optimizer, "chained_optimizers", [optimizer]) for s in opt.optimizer.state.values()]


def _snapshot(ddp, optimizer):
    """Weights and Adam state of this rank, for exact comparisons."""
    states = _adam_states(optimizer)
    return {
        "weights": torch.cat([p.detach().flatten() for p in ddp.parameters()]),
        "exp_avg": torch.cat([s["exp_avg"].flatten() for s in states]),
        "exp_avg_sq": torch.cat([s["exp_avg_sq"].flatten() for s in states]),
        "steps": sorted({float(s["step"]) for s in states}),
    }


def _eval_loss(ddp) -> float | None:
    """Mean LM loss on a fixed batch in eval mode (no dropout), the same at any TP/DP layout."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        return None
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (4, SEQ + 1), generator=g)
    ddp.eval()
    with torch.no_grad():
        logits = ddp(tokens[:, :-1], torch.arange(SEQ).expand(4, SEQ), None)
        loss = vocab_parallel_cross_entropy(logits.float(), tokens[:, 1:]).mean().item()
    ddp.train()
    return loss


def _uninterrupted(root, sharding="dp_reshardable", dropout=0.1, distributed_optimizer=True):
    """STEPS steps, saving after step SAVE_AT."""
    ddp, optimizer, scheduler = build_training(dropout=dropout, distributed_optimizer=distributed_optimizer)
    first = train_steps(ddp, optimizer, scheduler, range(1, SAVE_AT + 1))
    eval_loss = _eval_loss(ddp)
    extra = {"consumed_samples": SAVE_AT * GLOBAL, "config": {"lr": LR}}
    path = save_checkpoint(root, SAVE_AT, ddp, optimizer, scheduler, extra, optimizer_sharding=sharding)
    at_save = {**_snapshot(ddp, optimizer), "rng": torch.get_rng_state(), "eval_loss": eval_loss}
    rest = train_steps(ddp, optimizer, scheduler, range(SAVE_AT + 1, STEPS + 1))
    return {"steps": first + rest, "at_save": at_save, "path": str(path), "final": _snapshot(ddp, optimizer)}


def _resume(path, control=None, dropout=0.1, distributed_optimizer=True):
    """Fresh model/optimizer/scheduler, load ``path``, train to STEPS.

    ``control`` re-creates a bug on purpose (negative controls): "shared_step" puts back the one
    shared Adam step tensor that megatron-core 0.16.1 leaves behind, "no_rng" skips the RNG restore.
    """
    torch.manual_seed(999)  # a fresh process's RNG is not the saved one
    ddp, optimizer, scheduler = build_training(dropout=dropout, distributed_optimizer=distributed_optimizer)
    extra = load_checkpoint(path, ddp, optimizer, scheduler)
    loaded = {**_snapshot(ddp, optimizer), "rng": torch.get_rng_state(), "eval_loss": _eval_loss(ddp)}
    states = _adam_states(optimizer)
    distinct_steps = len({id(s["step"]) for s in states}) == len(states)
    if control == "shared_step":
        shared = states[0]["step"]
        for s in states:
            s["step"] = shared
    elif control == "no_rng":
        torch.manual_seed(4321)
    steps = train_steps(ddp, optimizer, scheduler, range(extra["step"] + 1, STEPS + 1))
    return {
        "extra": extra,
        "loaded": loaded,
        "distinct_steps": distinct_steps,
        "steps": steps,
        "final": _snapshot(ddp, optimizer),
    }


def _assert_same_snapshot(got, expected):
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert torch.equal(got[key], expected[key]), key
    assert got["steps"] == expected["steps"]


# name -> (uninterrupted-run kwargs, harness layout)
CASES = {
    "dp2": (dict(sharding="dp_reshardable"), dict(tp=1)),
    "dp2_fully_reshardable": (dict(sharding="fully_reshardable"), dict(tp=1)),
    "tp2": (dict(sharding="dp_reshardable"), dict(tp=2)),
    "pp2": (dict(sharding="dp_reshardable"), dict(pp=2)),
    "dp2_plain_optimizer": (dict(distributed_optimizer=False), dict(tp=1)),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Memoised uninterrupted runs, one per case: (checkpoint root, per-rank results)."""
    cache = {}

    def run(name, **overrides):
        key = (name, tuple(sorted(overrides.items())))
        if key not in cache:
            kwargs, layout = CASES[name]
            root = str(tmp_path_factory.mktemp(name))
            cache[key] = root, run_distributed(_uninterrupted, 2, root, **{**kwargs, **overrides}, **layout)
        return cache[key]

    return run


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_exact(uninterrupted, case):
    """Fresh processes resume from the step-SAVE_AT checkpoint and reproduce the rest exactly."""
    kwargs, layout = CASES[case]
    root, full = uninterrupted(case)
    path = latest_checkpoint(root)
    assert path is not None and path.name == f"step_{SAVE_AT:08d}"
    distributed_optimizer = kwargs.get("distributed_optimizer", True)
    resumed = run_distributed(_resume, 2, str(path), distributed_optimizer=distributed_optimizer, **layout)
    for rank in range(2):
        got, ref = resumed[rank], full[rank]
        assert got["extra"] == {"consumed_samples": SAVE_AT * GLOBAL, "config": {"lr": LR}, "step": SAVE_AT}
        # Loaded state == this rank's state at save time: weights, Adam moments, steps, RNG.
        _assert_same_snapshot(got["loaded"], ref["at_save"])
        assert got["loaded"]["steps"] == [float(SAVE_AT)]
        assert torch.equal(got["loaded"]["rng"], ref["at_save"]["rng"])
        assert got["loaded"]["eval_loss"] == ref["at_save"]["eval_loss"]
        assert got["distinct_steps"]  # one Adam step tensor per parameter
        # Every step after the resume is the uninterrupted run's, exactly: loss, grad norm, lr.
        assert len(got["steps"]) == STEPS - SAVE_AT >= 3
        assert got["steps"] == ref["steps"][SAVE_AT:]
        _assert_same_snapshot(got["final"], ref["final"])
    if distributed_optimizer and layout == dict(tp=1):  # DP=2: each rank holds (and got back) half
        numel = [full[r]["at_save"]["exp_avg"].numel() for r in range(2)]
        assert 0 < numel[0] < full[0]["at_save"]["weights"].numel()


@pytest.mark.parametrize("control", ["shared_step", "no_rng"])
def test_resume_negative_controls_are_caught(uninterrupted, control):
    """The comparison above is sharp: each re-created bug changes the resumed losses."""
    root, full = uninterrupted("dp2")
    got = run_distributed(_resume, 2, str(latest_checkpoint(root)), control=control)[0]
    ref = full[0]["steps"][SAVE_AT:]
    if control == "shared_step":
        # The first resumed step is right; the shared step then advances once per parameter.
        assert got["steps"][0] == ref[0]
        assert abs(got["steps"][1][0] - ref[1][0]) > 1e-6
    else:
        assert abs(got["steps"][0][0] - ref[0][0]) > 1e-6


def _resume_at_tp2(fully_reshardable_path, dp_reshardable_path):
    # A 'fully_reshardable' DP=2 checkpoint resumes at TP=2: optimizer state resharded.
    resumed = _resume(fully_reshardable_path, dropout=0.0)
    # A 'dp_reshardable' one cannot carry its optimizer state to another TP size...
    ddp, optimizer, scheduler = build_training(dropout=0.0)
    with pytest.raises(ValueError, match="dp_reshardable.*same tensor/pipeline-parallel sizes.*checkpoint.optimizer_sharding=fully_reshardable"):
        load_checkpoint(dp_reshardable_path, ddp, optimizer, scheduler)
    # ... but its model weights load at any layout.
    ddp, _, _ = build_training(dropout=0.0)
    extra = load_checkpoint(dp_reshardable_path, ddp)
    return resumed, extra, _eval_loss(ddp)


def _assert_close_steps(got, expected):
    """Another layout changes the float summation order, not the math (cf. test_cpu_ddp_optimizer)."""
    for (loss, norm, lr), (ref_loss, ref_norm, ref_lr) in zip(got, expected, strict=True):
        assert loss == pytest.approx(ref_loss, abs=1e-5)
        assert norm == pytest.approx(ref_norm, abs=1e-5)
        assert lr == ref_lr


def test_changing_the_parallel_layout(uninterrupted):
    """DP=2 checkpoints resumed at TP=2 and at DP=1 (no dropout: RNG states stay with a layout)."""
    fully_root, fully = uninterrupted("dp2_fully_reshardable", dropout=0.0)
    dp_root, dp = uninterrupted("dp2", dropout=0.0)
    fully_path, dp_path = str(latest_checkpoint(fully_root)), str(latest_checkpoint(dp_root))

    for resumed, extra, eval_loss in run_distributed(_resume_at_tp2, 2, fully_path, dp_path, tp=2):
        assert resumed["extra"]["step"] == SAVE_AT and resumed["loaded"]["steps"] == [float(SAVE_AT)]
        assert resumed["loaded"]["eval_loss"] == pytest.approx(fully[0]["at_save"]["eval_loss"], abs=1e-6)
        _assert_close_steps(resumed["steps"], fully[0]["steps"][SAVE_AT:])
        assert extra["step"] == SAVE_AT
        assert eval_loss == pytest.approx(dp[0]["at_save"]["eval_loss"], abs=1e-6)

    # 'dp_reshardable' reshards along DP: DP=2 -> 1 rank, Adam state of both halves in one.
    resumed = run_distributed(_resume, 1, dp_path, dropout=0.0)[0]
    assert resumed["loaded"]["exp_avg"].numel() == resumed["loaded"]["weights"].numel()
    assert torch.equal(resumed["loaded"]["weights"], dp[0]["at_save"]["weights"])
    _assert_close_steps(resumed["steps"], dp[0]["steps"][SAVE_AT:])


def _killed_save(root):
    """A save that dies after writing every shard but before completing, then a good one."""
    ddp, optimizer, scheduler = build_training(dropout=0.0)
    train_steps(ddp, optimizer, scheduler, [1])
    save_checkpoint(root, 1, ddp, optimizer, scheduler)
    train_steps(ddp, optimizer, scheduler, [2])

    real_save = ckpt.dist_checkpointing.save

    def save_then_die(state, directory, **kwargs):
        real_save(state, directory, **kwargs)
        raise KeyboardInterrupt("killed while saving")

    ckpt.dist_checkpointing.save = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(root, 2, ddp, optimizer, scheduler)
    finally:
        ckpt.dist_checkpointing.save = real_save
    after_kill = {
        "latest": latest_checkpoint(root).name,
        "entries": sorted(os.listdir(root)),
    }
    with pytest.raises(FileNotFoundError, match="not a complete"):
        load_checkpoint(os.path.join(root, "step_00000002.tmp"), ddp, optimizer, scheduler)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(os.path.join(root, "step_00000002"), ddp, optimizer, scheduler)

    # The next save of that step replaces the debris; saving a step again replaces it whole.
    save_checkpoint(root, 2, ddp, optimizer, scheduler, {"attempt": 1})
    save_checkpoint(root, 2, ddp, optimizer, scheduler, {"attempt": 2})
    marker = json.loads((latest_checkpoint(root) / checkpoint_dir.COMPLETE_MARKER).read_text())
    d, o, s = build_training(dropout=0.0)
    return {
        "after_kill": after_kill,
        "latest": latest_checkpoint(root).name,
        "entries": sorted(os.listdir(root)),
        "marker": marker,
        "extra": load_checkpoint(latest_checkpoint(root), d, o, s),
    }


def test_killed_save_is_never_loaded(tmp_path):
    result = run_distributed(_killed_save, 1, str(tmp_path))[0]
    assert result["after_kill"] == {
        "latest": "step_00000001",
        "entries": ["step_00000001", "step_00000002.tmp"],
    }
    assert result["latest"] == "step_00000002"
    assert result["entries"] == ["step_00000001", "step_00000002"]
    assert result["marker"]["step"] == 2 and result["marker"]["layout"]["world_size"] == 1
    assert result["extra"] == {"attempt": 2, "step": 2}


def test_latest_checkpoint_picks_highest_complete_step(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None

    def make(name, complete):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / checkpoint_dir.COMPLETE_MARKER).write_text("{}\n")

    make("step_00000005", True)
    make("step_00000020", True)
    make("step_00000100.tmp", True)  # killed between the marker and the rename
    make("step_00000300", False)  # no marker: not a finished save
    make("step_00000200.old", True)
    make("step_7", True)  # not our naming
    make("notes", False)
    (tmp_path / "step_00000400").write_text("a file, not a directory")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000020"
    assert checkpoint_dir.checkpoint_path(tmp_path, 20) == tmp_path / "step_00000020"
    assert checkpoint_dir.is_complete(tmp_path / "step_00000020")
    assert not checkpoint_dir.is_complete(tmp_path / "step_00000300")
    assert not checkpoint_dir.is_complete(tmp_path / "step_00000100.tmp")
    make("step_000000021", True)  # more than 8 digits is fine (step >= 10**8)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000000021"


def _mismatched_models(root):
    ddp, optimizer, scheduler = build_training(dropout=0.0)
    path = save_checkpoint(root, 0, ddp, optimizer, scheduler)  # before any step: allowed
    errors = {}
    for name, kwargs in {
        "wider": dict(hidden=48),
        "deeper": dict(layers=3),
        "plain_optimizer": dict(distributed_optimizer=False),
    }.items():
        d, o, s = build_training(dropout=0.0, **kwargs)
        with pytest.raises(ValueError) as info:
            load_checkpoint(path, d, o, s)
        errors[name] = str(info.value)
    return errors


def test_loading_into_a_different_model_raises(tmp_path):
    errors = run_distributed(_mismatched_models, 2, str(tmp_path))[0]
    wider = errors["wider"]
    assert "does not match the model" in wider
    assert "embedding.word_embeddings.weight: shape (128, 32) in the checkpoint, (128, 48) in the model" in wider
    assert "does not match the model" in errors["deeper"]
    assert "(2, 32, 32) in the checkpoint, (3, 32, 32) in the model" in errors["deeper"]
    assert "distributed optimizer" in errors["plain_optimizer"]


def _pp2_fully_reshardable(root, fully_reshardable_path):
    ddp, optimizer, scheduler = build_training(dropout=0.0)
    with pytest.raises(ValueError, match="fully_reshardable.*several padded buckets"):
        save_checkpoint(root, 0, ddp, optimizer, scheduler, optimizer_sharding="fully_reshardable")
    written = sorted(os.listdir(root))
    torch.distributed.barrier()  # both ranks looked before the next save writes
    path = save_checkpoint(root, 0, ddp, optimizer, scheduler)  # dp_reshardable: fine
    # Loading a 'fully_reshardable' checkpoint into this layout is fine.
    return written, path.name, _resume(fully_reshardable_path, dropout=0.0)


def test_fully_reshardable_refuses_layouts_megatron_would_save_wrong(tmp_path, uninterrupted):
    """PP=2 with tied embeddings: the shared embedding has its own bucket after a padded one."""
    fully_root, fully = uninterrupted("dp2_fully_reshardable", dropout=0.0)
    ranks = run_distributed(_pp2_fully_reshardable, 2, str(tmp_path), str(latest_checkpoint(fully_root)), pp=2)
    for written, name, _ in ranks:
        assert written == []  # refused before anything was written
        assert name == "step_00000000"
    _assert_close_steps(ranks[1][2]["steps"], fully[0]["steps"][SAVE_AT:])  # last stage: the losses


def _distillation_checkpoint(root):
    from megadistill.megatron import DistillationModel

    def build():
        model = DistillationModel(tiny_model(dropout=0.0), tiny_model(hidden=48, layers=1, dropout=0.0))
        ddp = wrap_ddp(model, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True))
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=LR, use_distributed_optimizer=True), [ddp]
        )
        return model, ddp, optimizer

    model, ddp, optimizer = build()
    path = save_checkpoint(root, 0, ddp, optimizer)
    keys = sorted(k for k in ckpt.dist_checkpointing.load_tensors_metadata(str(path)) if not k.startswith("optimizer."))
    # The student checkpoint loads into a bare GPT (e.g. as the teacher of a later run) ...
    torch.manual_seed(5)
    plain = tiny_model(dropout=0.0)
    rng = torch.get_rng_state()
    assert load_checkpoint(path, plain, restore_rng=False) == {"step": 0}
    assert torch.equal(torch.get_rng_state(), rng)
    # ... and back into a DistillationModel run.
    torch.manual_seed(6)
    model2, ddp2, optimizer2 = build()
    load_checkpoint(path, ddp2, optimizer2)
    student = [p.detach().clone() for p in model.student.parameters()]
    return {
        "keys": keys,
        "student_keys": sorted({sh.key for sh in ckpt._sharded_tensors(model.student.sharded_state_dict())}),
        "plain_equal": all(torch.equal(a, b) for a, b in zip(student, plain.parameters(), strict=True)),
        "reload_equal": all(torch.equal(a, b) for a, b in zip(student, model2.student.parameters(), strict=True)),
        "teacher_untouched": not torch.equal(model.teacher.embedding.word_embeddings.weight,
                                             model2.teacher.embedding.word_embeddings.weight),
    }


def test_distillation_model_checkpoint_holds_the_student_only(tmp_path):
    result = run_distributed(_distillation_checkpoint, 1, str(tmp_path))[0]
    assert result["keys"] == result["student_keys"]  # no teacher tensor in the checkpoint
    assert result["plain_equal"] and result["reload_equal"]
    assert result["teacher_untouched"]  # the (frozen) teacher is not restored from a student checkpoint
