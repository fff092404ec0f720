"""Run metrics: TensorBoard scalars, the JSON-lines log, the teacher timer.

``metrics.jsonl`` holds one line per step: ``{"step": N, "time": T, <metric>: value, ...}``, ``T``
the wall-clock when the step was logged in Unix seconds (UTC, millisecond resolution), in step
order. A resumed run continues it from its checkpoint's step: the lines of later steps, which the
interrupted attempt logged after its last checkpoint, are dropped first (as TensorBoard's
``purge_step`` drops their scalars), so every step appears once, with the values of the attempt
that carried on from it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

# Metric name -> TensorBoard tag.
TAGS = {
    "total loss": "loss/total", "lm loss": "loss/lm", "kd loss": "loss/kd", "val_loss": "loss/val",
    "top1 agreement": "kd/top1_agreement", "alpha": "kd/alpha", "temperature": "kd/temperature",
    "teacher_time_fraction": "perf/teacher_time_fraction", "tokens_per_s": "perf/tokens_per_s",
    "lr": "optim/lr", "grad_norm": "optim/grad_norm", "memory_mib": "perf/memory_mib",
}


def memory_mib() -> float:
    """This process's memory in MiB: CUDA memory allocated by tensors on a GPU, the resident set
    size elsewhere (what a released teacher gives back)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak, not the current size
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_metrics(output_dir: str | Path) -> dict[int, dict]:
    """The metrics log by step. A step logged twice (by a version that kept an interrupted attempt's
    lines) keeps its last record; the partial last line of a killed run is skipped."""
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


def log_line(step: int, total: int, m: dict) -> str:
    """One console line for step ``step`` of ``total`` (Megatron-LM style, for job logs without a
    TTY): losses, α, τ, lr, grad norm, throughput, the teacher's share of the step, memory."""
    parts = [f"step {step}/{total}"]
    for key, name in (("total loss", "loss"), ("lm loss", "lm"), ("kd loss", "kd"), ("val_loss", "val")):
        if key in m:
            parts.append(f"{name} {m[key]:.4f}")
    parts.append(f"α {m.get('alpha', 0.0):.3g}")
    if m.get("alpha", 0.0) > 0:
        parts.append(f"τ {m.get('temperature', 1.0):.3g}")
    parts.append(f"lr {m.get('lr', float('nan')):.3g}")
    if "grad_norm" in m:
        parts.append(f"grad {m['grad_norm']:.3g}")
    if "tokens_per_s" in m:
        parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
    if "teacher_time_fraction" in m:
        parts.append(f"teacher {m['teacher_time_fraction']:.0%}")
    if "memory_mib" in m:
        parts.append(f"mem {m['memory_mib'] / 1024:.2f} GiB")
    return " | ".join(parts)


def process_seconds() -> float | None:
    """Seconds since this process started (Linux: from ``/proc``), or None where that is unknown.
    A job's wall-clock includes the imports and the start-up before the training loop, which take
    seconds of their own on a busy node."""
    import os

    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, in clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def summary_line(name: str, reason: str, done: int, total: int, start: int, train_loss, val, wall_s: float,
                 tokens: int, loop_s: float, checkpoint) -> str:
    """The last line a run writes to its job log: how it ended (``reason``, e.g. ``finished (exit 0)``),
    steps ``done`` of ``total`` (``start`` = the step this process resumed from), the last training
    loss, the last validation loss ``val`` = ``(step, loss)`` or None, this process's wall-clock
    ``wall_s`` (start-up included), its throughput (``tokens`` trained in ``loop_s`` seconds of the
    training loop, evaluations and saves included) and the last checkpoint."""
    parts = [f"{name}: run summary: {reason}", f"steps {done}/{total}" + (f" (resumed from {start})" if start else "")]
    parts.append(f"loss {train_loss:.4f}" if train_loss is not None else "loss -")
    parts.append(f"val {val[1]:.4f} at step {val[0]}" if val is not None else "val -")
    parts.append(f"wall-clock {wall_s:.1f} s")
    parts.append(f"{tokens / loop_s:,.0f} tok/s" if tokens and loop_s > 0 else "0 tok/s")
    parts.append(f"checkpoint {checkpoint}" if checkpoint else "no checkpoint")
    return " | ".join(parts)


def keep_steps_up_to(path: Path, step: int) -> int:
    """Make the JSON-lines log ``path`` hold the steps 1..``step`` only, each once (its last complete
    line), in step order: what an attempt resuming from a checkpoint of ``step`` continues. The
    lines of later steps (logged by an interrupted attempt after its checkpoint), a partial last
    line and lines that are not JSON go. The file is replaced atomically (a temporary file in the
    same directory, then a rename), and only if anything changes. Returns the lines dropped."""
    if not path.is_file():
        return 0
    lines = path.read_bytes().splitlines(keepends=True)
    kept: dict[int, bytes] = {}
    for line in lines:
        if not line.endswith(b"\n"):  # the partial last line of a killed run
            continue
        try:
            n = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if n <= step:
            kept[n] = line
    new = [kept[n] for n in sorted(kept)]
    if new == lines:
        return 0
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.writelines(new)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(lines) - len(new)


class MetricsLogger:
    """TensorBoard scalars every ``log_interval`` steps (and at evaluations) and every step in
    ``metrics.jsonl`` (with its wall-clock ``time``), in ``out``; ``start`` is the step a resumed
    run continues from: what the logs hold after it is dropped first (see the module docstring)."""

    def __init__(self, out: Path, start: int, log_interval: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        out.mkdir(parents=True, exist_ok=True)
        # Steps after the checkpoint were logged by the interrupted attempt and are logged again: drop them.
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)
        path = out / "metrics.jsonl"
        keep_steps_up_to(path, start)
        self.jsonl = open(path, "a")
        self.every = log_interval

    def log(self, step: int, metrics: dict) -> None:
        if step % self.every == 0 or "val_loss" in metrics:
            for k, v in metrics.items():
                self.writer.add_scalar(TAGS.get(k, k), v, step)
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()


class ModuleTimer:
    """Time spent in a module's forward passes: CUDA events on a GPU (read once per step, no
    synchronisation inside the schedule), wall-clock on CPU."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.cuda = torch.cuda.is_available()
        self._spans: list = []
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

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
        """Seconds in the module since the last call (synchronises the GPU once)."""
        if self.cuda:
            torch.cuda.synchronize()
            total = sum(a.elapsed_time(b) for a, b in self._spans) / 1e3
        else:
            total = sum(b - a for a, b in self._spans)
        self._spans = []
        return total


def stop_if_not_finite(step: int, r, device) -> None:
    """Stop on every rank, before anything is logged or checkpointed, when the step's loss (known on
    the logging ranks) or gradient norm is not finite: NaN weights must never reach a checkpoint."""
    bad = [k for k, v in r.metrics.items() if not math.isfinite(v)]
    if r.grad_norm is not None and not math.isfinite(r.grad_norm):
        bad.append("grad_norm")
    flag = torch.tensor([1.0 if bad else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        where = f" ({', '.join(f'{k}={r.metrics.get(k, r.grad_norm)}' for k in bad)})" if bad else " (on another rank)"
        raise FloatingPointError(
            f"step {step}: non-finite loss or gradient norm{where}; stopped before logging or checkpointing "
            "it. Lower optimizer.lr, check the data and the teacher (kd.check_finite), then resume from the "
            "last checkpoint"
        )
