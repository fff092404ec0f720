"""The training loop: one YAML-configured run, whatever the backend and the teacher.

``python -m megadistill train run.yaml`` (single process), ``torchrun ... -m megadistill train
run.yaml`` or ``srun ... python -m megadistill train run.yaml`` all end up in :func:`run`. The loop
knows three seams only: a ``Backend`` (``megadistill.backend``), a ``TeacherSource``
(``megadistill.kd.teacher``) and a ``Sampler`` (``megadistill.sampler``); ``megadistill.assemble``
builds the first two for the run's config.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megadistill.config import ConfigError, RunConfig, run_vocab_size
from megadistill.metrics import read_metrics


@dataclass
class RunResult:
    """What a finished run reports (on every rank)."""

    steps: int
    """Optimizer steps done in total (including those before a resume)."""
    val_losses: dict = field(default_factory=dict)
    """Validation LM loss by step."""
    last_metrics: dict = field(default_factory=dict)
    """Training metrics of the last step."""
    checkpoint: Optional[str] = None
    """The final checkpoint directory."""
    stopped_by: Optional[str] = None
    """The signal that stopped the run before train_steps (checkpoint saved), or None."""


def run(cfg: RunConfig, progress: bool = True, overwrite: bool = False) -> RunResult:
    """Train per ``cfg`` (distributed state is set up here if needed); returns the result.
    ``overwrite`` moves an earlier run's checkpoints and logs in ``cfg.output_dir`` aside instead of
    refusing to start over them."""
    from megatron.core import parallel_state
    from tqdm import tqdm

    from megadistill import preemption, resume
    from megadistill.assemble import build_backend, make_teacher_source
    from megadistill.checkpoint_dir import commit
    from megadistill.data.datasets import prepare_data
    from megadistill.hashing import file_sha256
    from megadistill.kd.knobs import KnobSchedule
    from megadistill.megatron.distributed import init_distributed
    from megadistill.megatron.gpt import device
    from megadistill.megatron.schedule import reduce_reports
    from megadistill.metrics import MetricsLogger, log_line, memory_mib, process_seconds, stop_if_not_finite, summary_line
    from megadistill.salt.selection import sampler_for_run
    from megadistill.sampler import ContiguousSampler, micro_batches

    began = time.perf_counter()  # the run summary's wall-clock where the process's age is unknown
    init_distributed(cfg)
    if dist.get_rank() == dist.get_world_size() - 1:
        p = cfg.parallel
        vpp = p.virtual_pipeline_model_parallel_size
        chunks = f" (interleaved, {vpp} model chunks per rank)" if vpp else ""
        placement = ""
        if cfg.teacher.mode == "online" and cfg.teacher.placement == "prepass":
            t_tp, t_pp = cfg.teacher.layout(p)
            placement = f" (pre-pass, TP {t_tp} x PP {t_pp})"
        tqdm.write(f"{cfg.name}: {dist.get_world_size()} ranks = TP {p.tensor_model_parallel_size} x PP "
                   f"{p.pipeline_model_parallel_size}{chunks} x DP {parallel_state.get_data_parallel_world_size()} "
                   f"({dist.get_backend()}), backend {cfg.optimizer.backend}, teacher {cfg.teacher.mode}{placement}, "
                   f"{cfg.training.train_steps} steps")
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    tokenizer, train_ds, valid_ds, tokenizer_path = prepare_data(cfg)
    vocab = run_vocab_size(cfg, tokenizer.vocab_size)
    tokenizer_sha256 = file_sha256(tokenizer_path)
    knobs = KnobSchedule(cfg)
    where = resume.decide(cfg, ckpt_root, tokenizer_sha256, overwrite, needs_teacher=knobs.needs_teacher)

    # A run resumed after its KD phase (SALT) builds no teacher at all.
    teacher = make_teacher_source(cfg, vocab, where.teacher_checkpoint, needed=knobs.needs_teacher(where.start_step),
                                  tokenizer_vocab_size=tokenizer.vocab_size)
    backend = build_backend(cfg, vocab, teacher)
    steps = cfg.training.train_steps
    start = backend.load(Path(where.checkpoint)) if where.checkpoint is not None else 0
    if where.checkpoint is not None and dist.get_rank() == dist.get_world_size() - 1:
        tqdm.write(f"{cfg.name}: resuming from step {start} (checkpoint {where.checkpoint})")
    if start != where.start_step:
        raise ConfigError(f"checkpoint {where.checkpoint} holds step {start}, its marker says {where.start_step}")
    if start > steps:
        raise ConfigError(f"checkpoint {where.checkpoint} is at step {start}, beyond training.train_steps {steps}")

    d = cfg.data
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    # SALT_DS: the KD phase draws the selected samples (data_selection.scores), then the full data.
    kd_end = knobs.teacher_released_at
    sampler = sampler_for_run(cfg, dp, steps if kd_end is None else kd_end, train_ds, start)
    eval_sampler = ContiguousSampler(d.global_batch_size, dp)
    dev = device()
    marker = resume.run_marker(cfg, where.teacher_record, tokenizer_sha256, where.teacher_identity,
                               vocab_size=tokenizer.vocab_size)
    logger = MetricsLogger(out, start, cfg.training.log_interval) if dist.get_rank() == dist.get_world_size() - 1 else None
    bar = tqdm(total=steps, initial=start, desc=cfg.name, disable=logger is None or not progress, dynamic_ncols=True)
    result = RunResult(steps=start)
    stops = preemption.install(cfg.checkpoint, dev)  # handlers only record; poll() below decides

    def validate() -> float:
        # Validation reads the first eval_steps global batches of its own dataset, whatever the selection.
        reports = []
        for e in range(cfg.training.eval_steps):
            reports += backend.eval_step(micro_batches(valid_ds, eval_sampler.indices(e, dp_rank), d.micro_batch_size, dev))
        return reduce_reports(reports).get("lm loss", float("nan")) if backend.is_logging_rank() else float("nan")

    def summary(reason: str, history: dict) -> None:
        """The run's last line in the job log (logging rank): how it ended, losses, speed, checkpoint."""
        last = history.get(result.steps) or result.last_metrics
        vals = sorted((s, m["val_loss"]) for s, m in history.items() if "val_loss" in m) or sorted(result.val_losses.items())
        tokens = (result.steps - start) * d.global_batch_size * d.seq_length
        tqdm.write(summary_line(cfg.name, reason, result.steps, steps, start, last.get("total loss"),
                                vals[-1] if vals else None, process_seconds() or time.perf_counter() - began, tokens,
                                time.perf_counter() - loop_began, result.checkpoint or where.checkpoint))

    loop_began = time.perf_counter()
    try:
        for step in range(start, steps):
            if step == knobs.teacher_released_at:
                before = memory_mib()
                teacher.release()
                if logger is not None:
                    tqdm.write(f"{cfg.name}: KD ended at step {step}; teacher released "
                               f"(process memory {before:.0f} -> {memory_mib():.0f} MiB on this rank)")
            k = knobs.at(step)
            lr = backend.learning_rate()  # the rate this step uses
            t0 = time.perf_counter()
            batches = micro_batches(train_ds, sampler.indices(step, dp_rank), d.micro_batch_size, dev)
            r = backend.train_step(batches, k)
            stop_if_not_finite(step + 1, r, dev)
            elapsed = time.perf_counter() - t0
            metrics = dict(r.metrics)
            metrics.update(alpha=k.alpha, temperature=k.temperature, lr=lr,
                           tokens_per_s=d.global_batch_size * d.seq_length / elapsed, memory_mib=memory_mib())
            if r.grad_norm is not None:
                metrics["grad_norm"] = r.grad_norm
            teacher_seconds = teacher.take_seconds()
            if teacher_seconds is not None:
                # Measured on this rank: the teacher's share of its step time.
                metrics["teacher_time_fraction"] = teacher_seconds / elapsed
            done = step + 1
            if done % cfg.training.eval_interval == 0 or done == steps:
                metrics["val_loss"] = result.val_losses[done] = validate()
            if logger is not None:
                logger.log(done, metrics)
                if done % cfg.training.log_interval == 0 or done == steps or "val_loss" in metrics:
                    tqdm.write(log_line(done, steps, metrics))
                bar.update(1)
                bar.set_postfix(loss=f"{metrics.get('total loss', float('nan')):.3f}", refresh=False)
            result.last_metrics, result.steps = metrics, done
            stop = stops.poll()  # collective: every rank saves and stops at the same step
            if (cfg.checkpoint.save_interval and done % cfg.checkpoint.save_interval == 0) or done == steps or stop.save:
                path = commit(ckpt_root, done, lambda directory: backend.save(directory, done), marker)
                result.checkpoint = str(path)
                stops.saved()
            if stop.signal is not None and done < steps:
                result.stopped_by = stop.signal
                if logger is not None:
                    tqdm.write(f"{cfg.name}: stopped by {stop.signal} at step {done}, checkpoint {result.checkpoint}")
                break
    except BaseException as e:
        stops.uninstall()  # a caller that goes on in this process gets its own handlers back
        if logger is not None:
            try:
                summary(f"failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else '-'})", {})
            except Exception:  # the summary must never take the place of the error being raised
                pass
        raise
    stops.finish(stopped=result.stopped_by is not None)
    bar.close()
    teacher.close()
    if logger is not None:
        logger.close()
        # The whole run's history, including steps done before a resume.
        history = read_metrics(out)
        result.val_losses = {s: m["val_loss"] for s, m in history.items() if "val_loss" in m}
        if result.stopped_by is not None:
            summary(f"stopped by {result.stopped_by} (exit {preemption.EXIT_STOPPED}: resubmit to resume)", history)
        else:
            summary("finished (exit 0)" if result.steps == steps else "ended early (exit 1)", history)
    # Every rank reports the logging rank's numbers.
    shared = [result if logger is not None else None]
    dist.broadcast_object_list(shared, src=dist.get_world_size() - 1)
    return shared[0]
