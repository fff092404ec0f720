"""The training driver: one YAML-configured run on Megatron-core, with or without a teacher.

``python -m megadistill train run.yaml`` (single process), ``torchrun ... -m megadistill train
run.yaml`` or ``srun ... python -m megadistill train run.yaml`` all end up in :func:`run`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megadistill.config import (
    CHECKPOINT_MODEL_PREFIX,
    ConfigError,
    RunConfig,
    padded_vocab_size,
    resolve_teacher_checkpoint,
    to_dict,
)


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


# --------------------------------------------------------------------------- process setup


def init_distributed(cfg: RunConfig) -> None:
    """Start torch.distributed (from torchrun/SLURM variables, or as a single process) and Megatron's
    parallel state. On a machine without CUDA, megatron-core runs through the CPU compatibility layer."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not torch.cuda.is_available():
        from megadistill.megatron import cpu

        cpu.apply()
    if not dist.is_initialized():
        _launch_environment()
        if torch.cuda.is_available():
            # With one visible GPU per task (--gpus-per-task) every local rank maps to device 0.
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
        )
    # Each pipeline stage draws its own layers' weights and dropout masks (as in Megatron-LM).
    seed = cfg.training.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _launch_environment() -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from torchrun, from an ``srun`` step, or
    for a single process."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ:
        # One task per rank under srun (SLURM_NTASKS is also set in a plain sbatch shell).
        os.environ.update(
            RANK=os.environ["SLURM_PROCID"],
            WORLD_SIZE=os.environ["SLURM_STEP_NUM_TASKS"],
            LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
        )
        if "MASTER_ADDR" not in os.environ and int(os.environ.get("SLURM_NNODES", "1")) > 1:
            nodes = subprocess.run(
                ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                capture_output=True, text=True, check=True,
            ).stdout.split()
            os.environ["MASTER_ADDR"] = nodes[0]
    os.environ.setdefault("WORLD_SIZE", "1")
    for k, v in dict(MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0").items():
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        # A single process picks a free port, so that concurrent runs on one machine do not clash.
        os.environ["MASTER_PORT"] = str(_free_port()) if os.environ["WORLD_SIZE"] == "1" else "29500"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------- models


def build_gpt(model_cfg, cfg: RunConfig, vocab_size: int):
    """This rank's stage of a megatron-core GPTModel (local spec, RoPE, tied embeddings)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        ffn_hidden_size=model_cfg.ffn_hidden_size or 4 * model_cfg.hidden_size,
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
        sequence_parallel=cfg.parallel.sequence_parallel,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        init_method_std=model_cfg.init_method_std,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    model = GPTModel(
        config,
        get_gpt_layer_local_spec(),
        vocab_size=vocab_size,
        max_sequence_length=cfg.data.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
    )
    return model.to(_device())


# --------------------------------------------------------------------------- data


def prepare_data(cfg: RunConfig):
    """Tokenizer and (train, valid) GPTDatasets; rank 0 preprocesses the text first if needed."""
    from megadistill import data

    out = Path(cfg.output_dir)
    prefix, tok_path = cfg.data.data_prefix, cfg.data.tokenizer_model
    if prefix is None:
        prefix = str(out / "data" / "corpus")
        error = None
        if dist.get_rank() == 0:
            try:
                _preprocess_if_stale(cfg, prefix, tok_path)
            except Exception as e:  # every rank must learn of it, not wait at a barrier forever
                error = f"{type(e).__name__}: {e}"
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None:
            raise RuntimeError(f"preprocessing on rank 0 failed: {shared[0]}")
        if tok_path is None:
            tok_path = prefix + ".model"  # preprocess writes the tokenizer beside the data
    tokenizer = data.SentencePieceTokenizer(tok_path)
    steps = cfg.training.train_steps
    # Validation always reads the first eval_steps global batches: building exactly that many makes
    # the validation samples independent of the run's length (Megatron shuffles over all epochs).
    num_samples = (steps * cfg.data.global_batch_size, cfg.training.eval_steps * cfg.data.global_batch_size)
    train_ds, valid_ds = data.build_gpt_datasets(
        prefix, tokenizer, cfg.data.seq_length, cfg.data.split, num_samples, cfg.training.seed,
        cache_dir=str(out / "data" / "cache"),
    )
    return tokenizer, train_ds, valid_ds, tok_path


def _preprocess_if_stale(cfg: RunConfig, prefix: str, tokenizer_model: Optional[str]) -> None:
    """Preprocess the inputs into ``prefix`` unless a corpus made from the same inputs is there."""
    from megadistill import data

    recipe = {
        "inputs": [str(Path(p).resolve()) for p in cfg.data.inputs] if cfg.data.inputs else None,
        "json_key": cfg.data.json_key,
        "vocab_size": cfg.data.vocab_size,
        "tokenizer_model": str(Path(tokenizer_model).resolve()) if tokenizer_model else None,
    }
    stamp = Path(prefix + ".recipe.json")
    have = all(Path(prefix + ext).is_file() for ext in (".bin", ".idx", ".model"))
    if have and stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return
    data.preprocess(cfg.data.inputs, prefix, vocab_size=cfg.data.vocab_size, tokenizer_model=tokenizer_model,
                    json_key=cfg.data.json_key)
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps(recipe))
    os.replace(tmp, stamp)


def micro_batches(dataset, step: int, cfg: RunConfig):
    """This data-parallel rank's micro-batches of global batch ``step``: samples
    ``[step·G + r·G/dp, step·G + (r+1)·G/dp)``. The data position is a function of the step alone,
    so a resumed run reads exactly what the uninterrupted one would have."""
    from megatron.core import parallel_state

    g, mbs = cfg.data.global_batch_size, cfg.data.micro_batch_size
    dp, r = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    start = step * g + r * (g // dp)
    out = []
    for i in range(start, start + g // dp, mbs):
        samples = [dataset[j] for j in range(i, i + mbs)]
        out.append({k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(_device()) for k in ("tokens", "labels", "loss_mask", "position_ids")})
    return out


def get_batch(data_iterator):
    b = next(data_iterator)
    return b["tokens"], b["labels"], b["loss_mask"].float(), None, b["position_ids"]


# --------------------------------------------------------------------------- the run


# Settings a resumed run must share with the run it continues: they fix the weights' shapes, the
# data position and content, and the schedules.
RESUME_INVARIANTS = (
    "model", "teacher.mode", "teacher.model", "parallel.use_distributed_optimizer", "kd",
    "data.inputs", "data.data_prefix", "data.vocab_size", "data.seq_length", "data.global_batch_size",
    "data.split", "training.train_steps", "training.seed", "optimizer",
)


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else None
    return tree


def resume_mismatches(cfg: RunConfig, saved: Optional[dict]) -> list[str]:
    """Keys whose value differs from the checkpointed run's config (``saved``)."""
    if not saved:
        return []
    now = to_dict(cfg)
    return [k for k in RESUME_INVARIANTS if _lookup(now, k) != _lookup(saved, k)]


def _decide_paths(cfg: RunConfig, ckpt_root: Path) -> tuple[Optional[str], Optional[str]]:
    """(checkpoint to resume, teacher checkpoint), chosen on rank 0 and shared, so that ranks which
    list a shared file system at different moments still agree. A resumed run keeps the teacher
    checkpoint it started with, even if a newer one has appeared since."""
    from megatron.core import dist_checkpointing

    from megadistill.checkpoint import latest_checkpoint

    decision: list = [None, None, None]
    if dist.get_rank() == 0:
        try:
            resume = cfg.checkpoint.resume
            path = latest_checkpoint(ckpt_root) if resume == "auto" else (None if resume == "none" else Path(resume))
            if path is not None and not Path(path).is_dir():
                raise ConfigError(f"checkpoint.resume: {path} does not exist")
            extra = dist_checkpointing.load_common_state_dict(str(path)).get("extra", {}) if path else {}
            bad = resume_mismatches(cfg, extra.get("config"))
            if bad:
                raise ConfigError(
                    f"cannot resume from {path}: these settings differ from the checkpointed run's: "
                    f"{', '.join(bad)} (start a new output_dir, or set checkpoint.resume=none)"
                )
            teacher = None
            if cfg.teacher.mode == "online":
                teacher = extra.get("teacher_checkpoint") or str(resolve_teacher_checkpoint(cfg.teacher.checkpoint))
            decision = [str(path) if path else None, teacher, None]
        except Exception as e:  # raised on every rank below, instead of leaving them waiting
            decision = [None, None, e]
    dist.broadcast_object_list(decision, src=0)
    if decision[2] is not None:
        raise decision[2]
    return decision[0], decision[1]


class _TeacherTimer:
    """Time spent in the teacher's forward passes: CUDA events on a GPU (read once per step, no
    synchronisation inside the schedule), wall-clock on CPU."""

    def __init__(self, teacher) -> None:
        self.cuda = torch.cuda.is_available()
        self._spans: list = []
        teacher.register_forward_pre_hook(self._start)
        teacher.register_forward_hook(self._stop)

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, *_):
        self._spans.append([self._now(), None])

    def _stop(self, *_):
        self._spans[-1][1] = self._now()

    def take_seconds(self) -> float:
        """Seconds in the teacher since the last call (synchronises the GPU once)."""
        if self.cuda:
            torch.cuda.synchronize()
            total = sum(a.elapsed_time(b) for a, b in self._spans) / 1e3
        else:
            total = sum(b - a for a, b in self._spans)
        self._spans = []
        return total


def _lr_scheduler(optimizer, cfg: RunConfig):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, steps = cfg.optimizer, cfg.training.train_steps
    warmup = int(o.warmup_fraction * steps)
    style = {"constant": "constant", "linear": "linear", "cosine": "cosine", "wsd": "WSD"}[o.lr_schedule]
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(steps, warmup + 1),
        lr_decay_style=style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, int(o.wsd_decay_fraction * steps)) if style == "WSD" else None,
        lr_wsd_decay_style="linear" if style == "WSD" else None,
    )


def run(cfg: RunConfig, progress: bool = True) -> RunResult:
    """Train per ``cfg`` (distributed state is set up here if needed); returns the result."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from tqdm import tqdm

    from megadistill.checkpoint import load_checkpoint, save_checkpoint
    from megadistill.megatron import DistillationLoss, DistillationModel, KDStep, forward_backward, make_forward_step
    from megadistill.megatron.training import train_step, wrap_ddp

    init_distributed(cfg)
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    tokenizer, train_ds, valid_ds, _ = prepare_data(cfg)
    tp = cfg.parallel.tensor_model_parallel_size
    vocab = padded_vocab_size(tokenizer.vocab_size, tp)

    resume_path, teacher_path = _decide_paths(cfg, ckpt_root)
    student = build_gpt(cfg.model, cfg, vocab)
    teacher_timer = None
    if cfg.teacher.mode == "online":
        teacher = build_gpt(cfg.teacher.model, cfg, vocab)
        model = DistillationModel(student, teacher, teacher_path, CHECKPOINT_MODEL_PREFIX)
        teacher_timer = _TeacherTimer(teacher)
    else:
        model = student
    dp = parallel_state.get_data_parallel_world_size()
    ddp = wrap_ddp(
        model,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer
        ),
    )
    o = cfg.optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, clip_grad=o.clip_grad,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        ),
        [ddp],
    )
    scheduler = _lr_scheduler(optimizer, cfg)
    steps = cfg.training.train_steps

    start = 0
    if resume_path is not None:
        extra = load_checkpoint(resume_path, [ddp], optimizer, scheduler)
        start = int(extra["step"])
    if start > steps:
        raise ConfigError(f"checkpoint {resume_path} is at step {start}, beyond training.train_steps {steps}")

    kd_loss = DistillationLoss(cfg.kd.loss_config())
    forward_step = make_forward_step(get_batch, kd_loss)
    eval_loss = DistillationLoss(cfg.kd.loss_config(), KDStep(alpha=0.0))
    eval_step = make_forward_step(get_batch, eval_loss)
    seq = cfg.data.seq_length
    mbs, n_micro = cfg.data.micro_batch_size, cfg.data.global_batch_size // cfg.data.micro_batch_size // dp
    logger = _Logger(cfg, out, start) if dist.get_rank() == dist.get_world_size() - 1 else None
    bar = tqdm(total=steps, initial=start, desc=cfg.name, disable=logger is None or not progress, dynamic_ncols=True)
    result = RunResult(steps=start)
    if cfg.data.global_batch_size % (mbs * dp):
        raise ConfigError(
            f"data.global_batch_size {cfg.data.global_batch_size} is not divisible by data.micro_batch_size "
            f"{mbs} x data-parallel size {dp}"
        )

    def validate(step: int) -> float:
        ddp.eval()
        totals = []
        for e in range(cfg.training.eval_steps):
            reports = forward_backward(
                forward_step_func=eval_step, data_iterator=iter(micro_batches(valid_ds, e, cfg)), model=[ddp],
                num_microbatches=n_micro, seq_length=seq, micro_batch_size=mbs, forward_only=True,
            )
            totals.extend(reports)
        ddp.train()
        from megadistill.megatron import reduce_reports

        value = reduce_reports(totals).get("lm loss", float("nan")) if parallel_state.is_pipeline_last_stage() else float("nan")
        return value

    for step in range(start, steps):
        alpha = cfg.kd.alpha(step, steps) if cfg.teacher.mode != "none" else 0.0
        kd_loss.step = KDStep(alpha=alpha, temperature=cfg.kd.temperature)
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
        r = train_step(forward_step, iter(micro_batches(train_ds, step, cfg)), ddp, optimizer, n_micro, seq, mbs)
        scheduler.step(increment=1)
        elapsed = time.perf_counter() - t0
        metrics = dict(r.metrics)
        metrics.update(
            alpha=alpha, temperature=cfg.kd.temperature, lr=lr, grad_norm=r.grad_norm,
            tokens_per_s=cfg.data.global_batch_size * seq / elapsed,
        )
        if teacher_timer is not None:
            # Measured on this (last) pipeline stage: the teacher's share of its step time.
            metrics["teacher_time_fraction"] = teacher_timer.take_seconds() / elapsed
        done = step + 1
        if done % cfg.training.eval_interval == 0 or done == steps:
            metrics["val_loss"] = validate(done)
            result.val_losses[done] = metrics["val_loss"]
        if logger is not None:
            logger.log(done, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.get('total loss', float('nan')):.3f}", refresh=False)
        result.last_metrics = metrics
        result.steps = done
        if (cfg.checkpoint.save_interval and done % cfg.checkpoint.save_interval == 0) or done == steps:
            extra = {"step": done, "config": to_dict(cfg), "teacher_checkpoint": teacher_path}
            result.checkpoint = str(save_checkpoint(ckpt_root, done, [ddp], optimizer, scheduler, extra=extra))
    bar.close()
    if logger is not None:
        logger.close()
        # The whole run's history, including steps done before a resume.
        result.val_losses = {s: m["val_loss"] for s, m in read_metrics(out).items() if "val_loss" in m}
    # Every rank reports the logging rank's numbers.
    shared = [result if logger is not None else None]
    dist.broadcast_object_list(shared, src=dist.get_world_size() - 1)
    return shared[0]


def read_metrics(output_dir: str | Path) -> dict[int, dict]:
    """The metrics log by step; a step logged twice (re-run after a resume) keeps its last record."""
    path = Path(output_dir) / "metrics.jsonl"
    by_step: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # the partial last line of a killed run
                continue
            by_step[int(rec["step"])] = rec
    return by_step


class _Logger:
    """TensorBoard scalars and a JSON-lines metrics log (appended across resumes)."""

    TAGS = {
        "total loss": "loss/total", "lm loss": "loss/lm", "kd loss": "loss/kd", "val_loss": "loss/val",
        "top1 agreement": "kd/top1_agreement", "alpha": "kd/alpha", "temperature": "kd/temperature",
        "teacher_time_fraction": "perf/teacher_time_fraction", "tokens_per_s": "perf/tokens_per_s",
        "lr": "optim/lr", "grad_norm": "optim/grad_norm",
    }

    def __init__(self, cfg: RunConfig, out: Path, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        out.mkdir(parents=True, exist_ok=True)
        # Steps after the checkpoint were logged by the killed run and are logged again: drop them.
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)
        path = out / "metrics.jsonl"
        if path.is_file():
            # A run killed mid-write leaves a partial last line: drop it before appending.
            text = path.read_bytes()
            if text and not text.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(text.rfind(b"\n") + 1)
        self.jsonl = open(path, "a")
        self.every = cfg.training.log_interval

    def log(self, step: int, metrics: dict) -> None:
        # TensorBoard every log_interval steps (and at evaluations); the JSON log every step.
        if step % self.every == 0 or "val_loss" in metrics:
            for k, v in metrics.items():
                self.writer.add_scalar(self.TAGS.get(k, k), v, step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()
