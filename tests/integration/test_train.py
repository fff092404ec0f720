"""The training driver end to end: text files -> preprocess -> train (TP=2, PP=2, online teacher),
TensorBoard tags, the CLI, and kill -9 + resume reproducing the uninterrupted run exactly (with a
metrics log that holds every step once, the resumed attempt's line, each with its time)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from tiny_runs import ROOT, STUDENT, TEACHER, launch_train, online_kd_run, run_metrics, run_training, tiny_run

from megadistill.config import (
    CheckpointConfig,
    OptimizerConfig,
    RunConfig,
    TrainingConfig,
    to_dict,
    validate,
)
from megadistill.testing import run_distributed
from megadistill.testing.processes import kill_9_tree


def test_preprocessed_text_trains_a_teacher(teacher_run):
    from megadistill.checkpoint_dir import read_marker

    out, result = teacher_run
    losses = run_metrics(out)
    assert result.steps == 15 and len(losses) == 15
    assert losses[15]["total loss"] < losses[1]["total loss"] - 0.5
    assert result.checkpoint and Path(result.checkpoint).is_dir()
    # The tokenizer's ids: what tells the checkpoint's real vocabulary rows from padding as a teacher.
    assert read_marker(result.checkpoint)["vocab_size"] == 512


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_kd_on_two_ranks_with_an_online_teacher(tmp_path, mixed_corpus, teacher_run, layout):
    par = replace(RunConfig().parallel, **({"tensor_model_parallel_size": 2} if layout == "tp2" else {"pipeline_model_parallel_size": 2}))
    cfg = online_kd_run(tmp_path / layout, mixed_corpus, teacher_run[0] / "checkpoints", parallel=par)
    if layout == "tp2":
        # Padded to a multiple of 96 x 2: 576 rows, where the teacher was trained at TP=1 with 512
        # (128 x 1): its 64 padding rows are added, its 512 real rows are the tokenizer's.
        cfg = replace(cfg, model=replace(cfg.model, make_vocab_size_divisible_by=96),
                      teacher=replace(cfg.teacher, model=replace(cfg.teacher.model, make_vocab_size_divisible_by=96)))
    validate(cfg, world_size=2)
    results = run_distributed(run_training, 2, cfg, tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size)
    losses = run_metrics(tmp_path / layout)
    assert results[0].steps == 12 and set(losses) == set(range(1, 13))
    assert losses[12]["total loss"] < losses[1]["total loss"] - 0.3, (losses[1], losses[12])
    assert losses[12]["kd loss"] < losses[1]["kd loss"]
    assert 0 < losses[12]["teacher_time_fraction"] < 1
    assert set(results[0].val_losses) == {6, 12}


def test_tensorboard_event_files_hold_every_tag(tmp_path, mixed_corpus, teacher_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = online_kd_run(tmp_path / "tb", mixed_corpus, teacher_run[0] / "checkpoints",
                        training=TrainingConfig(train_steps=4, eval_interval=2, eval_steps=1))
    run_distributed(run_training, 1, cfg)
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"loss/total", "loss/lm", "loss/kd", "loss/val", "kd/alpha", "kd/temperature", "optim/lr",
                "optim/grad_norm", "perf/tokens_per_s", "perf/teacher_time_fraction", "kd/top1_agreement"}
    assert expected <= tags, expected - tags
    assert [e.step for e in acc.Scalars("loss/val")] == [2, 4]


KILL_CASES = {
    "deepspeed-zero3-dp2": ({"optimizer": {"backend": "deepspeed"}, "deepspeed": {"zero_stage": 3}}, 2),
    # Megatron, online KD then SALT's switch: resumed from step 6 (teacher rebuilt from its
    # checkpoint), the run crosses to plain LM training at step 7.
    "megatron-salt-across-the-switch": ({"kd": {"alpha": {"kind": "salt", "alpha_max": 0.5, "n_kd": 7}}}, 1),
}


@pytest.mark.parametrize("case", list(KILL_CASES))
def test_kill_9_and_resume_reproduces_the_uninterrupted_run(tmp_path, mixed_corpus, teacher_run, case):
    overrides, nproc = KILL_CASES[case]
    steps = 10
    training = TrainingConfig(train_steps=steps, eval_interval=5, eval_steps=1)
    # Dropout makes the exact match depend on restoring the RNG states as well.
    student = replace(STUDENT, hidden_dropout=0.1)
    cfgs = {}
    for name in ("full", "killed"):
        cfg = online_kd_run(tmp_path / name, mixed_corpus, teacher_run[0] / "checkpoints", training=training, model=student,
                            checkpoint=CheckpointConfig(save_interval=3))
        tree = to_dict(cfg)
        for section, values in overrides.items():
            tree[section].update(values)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        cfgs[name] = path
    with open(tmp_path / "full.log", "w") as log:
        assert launch_train(cfgs["full"], log, nproc).wait(timeout=300) == 0, (tmp_path / "full.log").read_text()
    with open(tmp_path / "killed.log", "w") as log:
        proc = launch_train(cfgs["killed"], log, nproc)
        metrics = tmp_path / "killed" / "metrics.jsonl"
        deadline = time.time() + 300
        # Kill between checkpoints: after step 7 is logged (last checkpoint at step 6).
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and max(run_metrics(tmp_path / "killed"), default=0) >= 7:
                break
            time.sleep(0.05)
        kill_9_tree(proc)  # the launcher and every rank (torchrun gives each worker a session of its own)
    assert max(run_metrics(tmp_path / "killed")) < steps, "the run finished before it could be killed"
    resumed_at = time.time()
    with open(tmp_path / "resumed.log", "w") as log:
        assert launch_train(cfgs["killed"], log, nproc).wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()
    # The log itself holds every step once: the killed attempt's lines after its checkpoint (step 6)
    # were dropped, the resumed attempt's are there, each line with its wall-clock time.
    lines = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, steps + 1))
    assert all(isinstance(r["time"], float) for r in lines)
    assert all((r["time"] >= resumed_at) == (r["step"] > 6) for r in lines), [(r["step"], r["time"], resumed_at) for r in lines]
    full, resumed = run_metrics(tmp_path / "full"), run_metrics(tmp_path / "killed")
    assert set(resumed) == set(range(1, steps + 1))
    for step in range(1, steps + 1):
        for key in ("total loss", "lm loss", "kd loss", "grad_norm"):
            assert resumed[step].get(key) == full[step].get(key), (step, key, resumed[step].get(key), full[step].get(key))
    assert resumed[steps]["val_loss"] == full[steps]["val_loss"]


def test_cli_rejects_a_bad_config_before_starting(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"kd": {"temprature": 2.0}}))
    r = subprocess.run([sys.executable, "-m", "megadistill", "train", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert "unknown key kd.temprature; did you mean kd.temperature?" in r.stderr
    r = subprocess.run([sys.executable, "-m", "megadistill", "config", "--explain"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "kd.alpha.n_kd" in r.stdout


def test_teacher_with_another_vocabulary_is_rejected_before_training(tmp_path, mixed_corpus, teacher_run):
    from megadistill.config import ConfigError
    from megadistill.data.corpus import embedded_corpus_text
    from megadistill.data.preprocess import train_tokenizer
    from megadistill.preflight import preflight

    tok = train_tokenizer(embedded_corpus_text()[:50_000].split("\n\n"), tmp_path / "small", vocab_size=384)
    cfg = online_kd_run(tmp_path / "x", mixed_corpus, teacher_run[0] / "checkpoints")
    cfg = replace(cfg, data=replace(cfg.data, tokenizer_model=str(tok)))
    with pytest.raises(ConfigError, match=r"was made for a tokenizer of 512 ids, this run's has 384"):
        preflight(cfg)


def test_teacher_architecture_must_match_its_checkpoint(tmp_path, mixed_corpus, teacher_run):
    from megadistill.config import ConfigError
    from megadistill.preflight import preflight

    cfg = online_kd_run(tmp_path / "x", mixed_corpus, teacher_run[0] / "checkpoints")
    cfg = replace(cfg, teacher=replace(cfg.teacher, model=replace(TEACHER, hidden_size=64)))
    with pytest.raises(ConfigError, match=r"teacher.model.hidden_size is 64 but teacher.checkpoint .* has 96"):
        preflight(cfg)


def _run_or_error(cfg):
    try:
        return run_training(cfg).steps
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def test_resume_refuses_a_changed_config(tmp_path, mixed_corpus):
    cfg = tiny_run(tmp_path / "r", mixed_corpus, training=TrainingConfig(train_steps=2, eval_interval=2, eval_steps=1))
    assert run_distributed(_run_or_error, 1, cfg)[0] == 2
    longer = replace(cfg, training=replace(cfg.training, train_steps=4, seed=7), kd=replace(cfg.kd, temperature=2.0))
    msg = run_distributed(_run_or_error, 1, longer)[0]
    # The refusal names the keys, not just their sections.
    assert msg.startswith("ConfigError: cannot resume from") and "kd.temperature, training.train_steps, training.seed" in msg
    assert "--overwrite" in msg and "checkpoint.resume=none" not in msg


def _other_tokenizer(tmp_path, vocab_size=512):
    from megadistill.data.corpus import embedded_corpus_text
    from megadistill.data.preprocess import train_tokenizer

    text = embedded_corpus_text()[200_000:320_000]  # other text: other pieces, same vocabulary size
    return str(train_tokenizer(text.split("\n\n"), tmp_path / "other", vocab_size=vocab_size))


def _from_text(cfg, corpus, tokenizer):
    """``cfg`` reading the corpus's text files, tokenised by ``tokenizer`` into its output_dir."""
    return replace(cfg, data=replace(cfg.data, data_prefix=None, inputs=corpus.inputs, tokenizer_model=tokenizer))


def test_resume_refuses_another_tokenizer_of_the_same_size(tmp_path, mixed_corpus):
    cfg = tiny_run(tmp_path / "r", mixed_corpus, training=TrainingConfig(train_steps=2, eval_interval=2, eval_steps=1))
    cfg = _from_text(cfg, mixed_corpus, mixed_corpus.tokenizer)
    assert run_distributed(_run_or_error, 1, cfg)[0] == 2
    # Same key values but another tokenizer file: the text is re-tokenised, the ids change.
    longer = _from_text(cfg, mixed_corpus, _other_tokenizer(tmp_path))
    msg = run_distributed(_run_or_error, 1, longer)[0]
    assert "cannot resume from" in msg and "the tokenizer differs from the checkpointed run's" in msg, msg


def test_teacher_must_match_the_architecture_and_tokenizer_it_was_trained_with(tmp_path, mixed_corpus, teacher_run):
    # num_attention_heads does not change any weight shape: only the checkpoint's record can tell.
    cfg = online_kd_run(tmp_path / "heads", mixed_corpus, teacher_run[0] / "checkpoints")
    cfg = replace(cfg, teacher=replace(cfg.teacher, model=replace(TEACHER, num_attention_heads=2)))
    msg = run_distributed(_run_or_error, 1, cfg)[0]
    assert "teacher.model.num_attention_heads is 2 but teacher.checkpoint" in msg and "was trained with 4" in msg, msg
    cfg = _from_text(online_kd_run(tmp_path / "tok", mixed_corpus, teacher_run[0] / "checkpoints"), mixed_corpus, _other_tokenizer(tmp_path))
    msg = run_distributed(_run_or_error, 1, cfg)[0]
    assert "was trained with another tokenizer" in msg, msg


def test_a_resume_knows_its_teacher_by_content_not_by_path(tmp_path, mixed_corpus, teacher_run):
    """A teacher directory overwritten by another model of the same shape (a second convert-hf into
    the same --output, say) is refused on resume, naming the path and both sha256; the same teacher
    moved elsewhere and named by teacher.checkpoint is accepted, and the resume is exact."""
    import shutil

    from megadistill.checkpoint_dir import read_marker

    teacher = tmp_path / "teacher"  # a copy: the fixture's checkpoint is shared
    shutil.copytree(teacher_run[0] / "checkpoints", teacher)
    cfg = online_kd_run(tmp_path / "kd", mixed_corpus, teacher, steps=4, eval_interval=4,
                        checkpoint=CheckpointConfig(save_interval=2))
    assert run_distributed(_run_or_error, 1, cfg)[0] == 4
    first = run_metrics(tmp_path / "kd")
    ckpts = tmp_path / "kd" / "checkpoints"
    recorded = read_marker(ckpts / "step_00000002")["teacher_identity"]
    assert recorded["path"] == str((teacher / "step_00000015").resolve())

    other = tmp_path / "other"  # another teacher: one step of TEACHER from a fresh start
    assert run_distributed(_run_or_error, 1, tiny_run(other, mixed_corpus, model=TEACHER, steps=1))[0] == 1
    used, elsewhere = teacher / "step_00000015", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(used, elsewhere / used.name)
    shutil.copytree(other / "checkpoints" / "step_00000001", used)
    resume = replace(cfg, checkpoint=replace(cfg.checkpoint, resume=str(ckpts / "step_00000002")))
    msg = run_distributed(_run_or_error, 1, resume)[0]
    assert msg.startswith(f"ConfigError: cannot resume from {ckpts / 'step_00000002'}: its teacher changed: {used} "
                          "holds sha256 "), msg
    assert f"the run distilled from sha256 {recorded['content_sha256'][:12]}… ({recorded['path']})" in msg, msg
    assert "\n" not in msg

    moved = replace(resume, teacher=replace(cfg.teacher, checkpoint=str(elsewhere)))
    assert run_distributed(_run_or_error, 1, moved)[0] == 4
    again = run_metrics(tmp_path / "kd")
    for step in (3, 4):
        for key in ("total loss", "kd loss"):
            assert again[step][key] == first[step][key], (step, key)
    marker = read_marker(ckpts / "step_00000004")
    assert marker["teacher_checkpoint"] == str(elsewhere / used.name)
    assert marker["teacher_identity"] == {**recorded, "path": str((elsewhere / used.name).resolve())}


def _run_overwriting(cfg):
    from megadistill.train import run

    return run(cfg, progress=False, overwrite=True).steps


def test_a_new_run_never_overwrites_an_earlier_one(tmp_path, mixed_corpus):
    out = tmp_path / "r"
    cfg = tiny_run(out, mixed_corpus, training=TrainingConfig(train_steps=2, eval_interval=2, eval_steps=1))
    assert run_distributed(_run_or_error, 1, cfg)[0] == 2
    before = {p.name: p.read_bytes() for p in (out / "checkpoints" / "step_00000002").iterdir() if p.is_file()}
    fresh = replace(cfg, training=replace(cfg.training, train_steps=3), checkpoint=CheckpointConfig(resume="none"))
    msg = run_distributed(_run_or_error, 1, fresh)[0]
    assert msg.startswith("ConfigError: output_dir") and "holds an earlier run (checkpoints/step_00000002" in msg, msg
    assert {p.name: p.read_bytes() for p in (out / "checkpoints" / "step_00000002").iterdir() if p.is_file()} == before
    # --overwrite moves the earlier run aside, whole, and the new one starts with clean logs.
    assert run_distributed(_run_overwriting, 1, fresh)[0] == 3
    (aside,) = [p for p in out.iterdir() if p.name.startswith("superseded-")]
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_00000002"]
    assert set(run_metrics(aside)) == {1, 2} and set(run_metrics(out)) == {1, 2, 3}


def _run_or_error_keeping_handlers(cfg):
    import signal

    mine = lambda *_: None  # noqa: E731
    signal.signal(signal.SIGTERM, mine)
    msg = _run_or_error(cfg)
    return msg, signal.getsignal(signal.SIGTERM) is mine


def test_a_diverging_run_stops_before_checkpointing_nan_weights(tmp_path, mixed_corpus, capfd):
    cfg = tiny_run(tmp_path / "nan", mixed_corpus, optimizer=OptimizerConfig(lr=1e30, min_lr=0.0, warmup_fraction=0.0, clip_grad=0.0),
                   training=TrainingConfig(train_steps=6, eval_interval=6, eval_steps=1), checkpoint=CheckpointConfig(save_interval=1))
    msg, handlers = run_distributed(_run_or_error_keeping_handlers, 1, cfg)[0]
    assert msg.startswith("FloatingPointError: step") and "non-finite loss or gradient norm" in msg, msg
    assert handlers  # the run's stop handlers did not outlive it: the caller's own are back
    bad = int(msg.split()[2].rstrip(":"))
    saved = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert saved == [f"step_{s:08d}" for s in range(1, bad)], (bad, saved)  # nothing of the diverged step
    assert max(run_metrics(tmp_path / "nan"), default=0) == bad - 1
    # The job log's last line says how the run ended (the forked rank writes to this process's stdout).
    summary = [line for line in capfd.readouterr().out.splitlines() if "run summary" in line]
    assert summary and summary[-1].startswith(f"nan: run summary: failed (FloatingPointError: step {bad}:"), summary
    assert f"steps {bad - 1}/6" in summary[-1] and f"checkpoint {tmp_path / 'nan' / 'checkpoints' / f'step_{bad - 1:08d}'}" in summary[-1]


def test_overwrite_starts_afresh_even_with_resume_auto(tmp_path, mixed_corpus):
    out = tmp_path / "r"
    cfg = tiny_run(out, mixed_corpus, training=TrainingConfig(train_steps=2, eval_interval=2, eval_steps=1))
    assert run_distributed(_run_or_error, 1, cfg)[0] == 2
    changed = replace(cfg, kd=replace(cfg.kd, temperature=2.0))  # resume=auto would refuse this
    assert "cannot resume from" in run_distributed(_run_or_error, 1, changed)[0]
    assert run_distributed(_run_overwriting, 1, changed)[0] == 2
    assert len([p for p in out.iterdir() if p.name.startswith("superseded-")]) == 1


def test_resume_refuses_a_corpus_retokenised_from_edited_inputs(tmp_path, mixed_corpus):
    text = tmp_path / "in.txt"
    text.write_text(Path(mixed_corpus.inputs[0]).read_text())
    cfg = tiny_run(tmp_path / "r", mixed_corpus, training=TrainingConfig(train_steps=2, eval_interval=2, eval_steps=1))
    cfg = replace(cfg, data=replace(cfg.data, data_prefix=None, inputs=[str(text)], tokenizer_model=mixed_corpus.tokenizer))
    assert run_distributed(_run_or_error, 1, cfg)[0] == 2
    text.write_text(text.read_text().replace("the", "a"))  # same path, same tokenizer, other ids
    msg = run_distributed(_run_or_error, 1, cfg)[0]
    assert "cannot resume from" in msg and "the training corpus differs" in msg, msg
