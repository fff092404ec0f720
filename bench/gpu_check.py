"""GPU check, the timing part: megadistill's losses and training steps on one CUDA GPU, each beside
its yardstick measured in the same process, written as ``results.json`` and ``results.md``.

    python bench/gpu_check.py --out DIR [--quick]          # on a CUDA GPU (bench/gpu_check.sh runs it)
    OMP_NUM_THREADS=1 python bench/gpu_check.py --dry-run --out DIR   # tiny sizes on CPU: the code paths and the files

Rows (``results.json`` ``rows``; ``ratio`` is ``ms`` over the row's ``ratio_to``):

1. **Losses**, forward + backward of one micro-batch of logits ``[seq, 1, vocab]`` (default 4096 x 1 x
   131,072 and 151,936), TP = 1: Megatron's ``tensor_parallel.vocab_parallel_cross_entropy``, megadistill's
   dense forward-KL ``vocab_parallel_kd_loss`` and the fused objective ``vocab_parallel_distillation_loss``
   (α = 0.5 at τ = 1 and τ = 2), all in place. The logits are bf16 and cast to fp32 inside the timed region,
   as Megatron's Float16Module hands a bf16 model's logits to the loss; the teacher's logits stay bf16.
   Interleaved repetitions, median time; ``peak_mib`` is ``torch.cuda.max_memory_allocated`` during the
   pass (the inputs included), ``extra_mib`` its rise above what was allocated before it.
2. **Online-teacher step**: ``megadistill.train.run`` of a bf16 student with a bf16 online teacher, and of
   the student alone, per-step median after warm-up (metrics.jsonl), against the FLOP ideal
   ``tokens x (6·N_student + 2·N_teacher)`` (``6·N_student`` alone) at the GPU's peak dense bf16 rate
   (datasheet table below, or ``--peak-tflops``). N counts every weight (tied embeddings once: the output
   layer's matrix multiply); attention's own FLOPs are left out of the ideal, as the 6N rule does, and
   given beside it (``ideal_ms_with_attention``).
3. **Offline-KD step**: the same student reading a top-p 0.95 / top-k 50 logits store that
   ``precompute`` writes on the spot from the same teacher, against the plain LM step.

Without CUDA it refuses ("needs a CUDA GPU") unless ``--dry-run``. The JSON is rewritten after every row,
so a run cut short by its time limit still leaves what it measured. ``--record-tests DIR`` instead folds
the test suite's JUnit files (``DIR/junit-*.xml``, written by gpu_check.sh) into ``results.json``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: this checkout's megadistill
    sys.path.insert(1, str(ROOT))

# Dense bf16 tensor-core peak (TFLOP/s, without sparsity) by device-name substring; first match wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
DRY_RUN_PEAK_TFLOPS = 1.0
"""A nominal rate for --dry-run, only so that the FLOP-ideal code runs; its ratios mean nothing."""

ROW_KEYS = {"name": str, "ms": (int, float, type(None)), "ratio": (int, float, type(None)),
            "peak_mib": (int, float, type(None))}
TEST_KEYS = ("passed", "failed", "skipped", "seconds")
TOP_KEYS = {"gpu": str, "torch": str, "cuda": (str, type(None)), "megatron_core": (str, type(None)),
            "rows": list, "tests": (dict, type(None))}


# --------------------------------------------------------------------------- sizes


@dataclass
class Sizes:
    """What one check measures: the loss table's logits and the training runs' models and batches."""

    vocabs: tuple
    seq: int
    reps: int
    warmup: int
    train_vocab: int  # the tokenizer trained on the embedded corpus
    train_seq: int
    micro_batch: int
    global_batch: int
    steps: int
    student: dict = field(default_factory=dict)  # ModelConfig fields
    teacher: dict = field(default_factory=dict)


def sizes_for(dry_run: bool, quick: bool) -> Sizes:
    if dry_run:
        return Sizes(vocabs=(1024, 1536), seq=64, reps=2, warmup=1, train_vocab=512, train_seq=32, micro_batch=2,
                     global_batch=4, steps=3, student=dict(num_layers=2, hidden_size=64, num_attention_heads=4),
                     teacher=dict(num_layers=2, hidden_size=96, num_attention_heads=4))
    return Sizes(vocabs=(131072,) if quick else (131072, 151936), seq=4096, reps=5 if quick else 10, warmup=2,
                 train_vocab=4096, train_seq=2048, micro_batch=4, global_batch=8, steps=6 if quick else 12,
                 student=dict(num_layers=8, hidden_size=1024, num_attention_heads=8),
                 teacher=dict(num_layers=16, hidden_size=1536, num_attention_heads=12))


def peak_tflops(gpu_name: str) -> Optional[float]:
    """The datasheet's dense bf16 peak of ``gpu_name`` (``torch.cuda.get_device_name``), None if not listed."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in gpu_name:
            return tflops
    return None


# --------------------------------------------------------------------------- results files


def _version(dist_name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(dry_run: bool) -> dict:
    """The results' header: what ran it."""
    import torch

    cuda = torch.cuda.is_available() and not dry_run
    te = _version("transformer-engine") or _version("transformer_engine")
    if te is None and importlib.util.find_spec("transformer_engine") is not None:
        te = "importable (version unknown)"
    return {
        "gpu": torch.cuda.get_device_name(0) if cuda else "none (CPU dry run)",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "megatron_core": _version("megatron-core"),
        "deepspeed": _version("deepspeed"),
        "transformer_engine": te,
        "python": sys.version.split()[0],
        "dry_run": dry_run,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": [],
        "tests": None,
        "notes": [],
    }


def schema_problems(results: dict) -> list[str]:
    """What ``results`` lacks of the results.json schema (empty: it conforms)."""
    problems = []
    for key, kind in TOP_KEYS.items():
        if key not in results:
            problems.append(f"missing key {key}")
        elif not isinstance(results[key], kind):
            problems.append(f"{key} is {type(results[key]).__name__}")
    for i, row in enumerate(results.get("rows") or []):
        for key, kind in ROW_KEYS.items():
            if key not in row:
                problems.append(f"rows[{i}] has no {key}")
            elif not isinstance(row[key], kind) or isinstance(row[key], bool):
                problems.append(f"rows[{i}].{key} is {type(row[key]).__name__}")
    tests = results.get("tests")
    if isinstance(tests, dict):
        for key in TEST_KEYS:
            if not isinstance(tests.get(key), (int, float)) or isinstance(tests.get(key), bool):
                problems.append(f"tests.{key} is {type(tests.get(key)).__name__}")
    return problems


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown(results: dict) -> str:
    """results.md: a header line and one table row per measurement."""
    lines = [
        f"# megadistill GPU check{' (dry run on CPU: sizes and ratios are meaningless)' if results.get('dry_run') else ''}",
        "",
        f"{results['gpu']}; torch {results['torch']} (CUDA {results.get('cuda')}), megatron-core "
        f"{results.get('megatron_core')}, DeepSpeed {results.get('deepspeed')}, Transformer Engine "
        f"{results.get('transformer_engine')}; Python {results.get('python')}; peak bf16 "
        f"{_fmt(results.get('peak_bf16_tflops'), 'g')} TFLOP/s assumed; {results.get('started')}",
        "",
        "| check | ms | ratio | ratio to | peak MiB | notes |",
        "|---|---:|---:|---|---:|---|",
    ]
    for row in results["rows"]:
        note = row.get("error") or row.get("note", "")
        lines.append(f"| {row['name']} | {_fmt(row['ms'], '.1f')} | {_fmt(row['ratio'], '.2f')} | "
                     f"{row.get('ratio_to', '')} | {_fmt(row['peak_mib'], '.0f')} | {note} |")
    t = results.get("tests")
    lines.append("")
    if t:
        cut = " (cut short by its time limit)" if t.get("timed_out") else ""
        lines.append(f"Tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped in "
                     f"{t['seconds']:.0f} s{cut}.")
        for name in t.get("failures", []):
            lines.append(f"- failed: {name}")
    else:
        lines.append("Tests: not run.")
    for note in results.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict) -> None:
    """``results.json`` (replaced atomically) and ``results.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out / "results.json")
    (out / "results.md").write_text(markdown(results))


def tests_summary(junit_dir: Path, seconds: float) -> dict:
    """Counts over ``junit_dir/junit-*.xml`` (one per pytest shard). A shard whose ``shard-*.rc`` holds
    124 or 137 (``timeout`` ended it) marks the summary ``timed_out``; a shard with no JUnit file
    counts as one error (it never finished)."""
    total = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "seconds": round(seconds, 1),
             "timed_out": False, "failures": []}
    for rc_file in sorted(junit_dir.glob("shard-*.rc")):
        rc = rc_file.read_text().strip()
        if rc in ("124", "137"):
            total["timed_out"] = True
        if not (junit_dir / f"junit-{rc_file.stem[len('shard-'):]}.xml").is_file():
            total["errors"] += 1
            total["failures"].append(f"{rc_file.stem}: no JUnit report (exit status {rc})")
    for path in sorted(junit_dir.glob("junit-*.xml")):
        root = ET.parse(path).getroot()
        for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
            n, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
            total["passed"] += n - failures - errors - skipped
            total["failed"] += failures
            total["errors"] += errors
            total["skipped"] += skipped
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    total["failures"].append(f"{case.get('classname')}::{case.get('name')}")
    total["failed"] += total["errors"]  # an error in set-up fails the check as a failure does
    total["failures"] = total["failures"][:50]
    return total


# --------------------------------------------------------------------------- timing helpers


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _mib(n: Optional[float]) -> Optional[float]:
    return None if n is None else round(n / 2**20, 1)


def init_single_rank(cuda: bool) -> None:
    """torch.distributed with one rank (nccl on the GPU, gloo on CPU, with megadistill's CPU layer
    there) and Megatron's parallel state at TP = PP = 1: what the losses' group and a training run need."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megadistill.megatron import cpu
    from megadistill.testing import free_port

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # one process of its own, whatever launched it
        os.environ.pop(key, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method="env://", rank=0, world_size=1)
    cpu.apply_if_needed(backend)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)


# --------------------------------------------------------------------------- 1. losses


def loss_rows(vocab: int, sz: Sizes, cuda: bool) -> list[dict]:
    """Rows for one vocabulary: Megatron CE first (the others' yardstick), then megadistill's losses."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megadistill.losses import KDLossConfig, vocab_parallel_distillation_loss, vocab_parallel_kd_loss

    dev = torch.device("cuda" if cuda else "cpu")
    group = parallel_state.get_tensor_model_parallel_group()
    g = torch.Generator(device=dev).manual_seed(vocab)
    # [s, b, v] bf16 logits, spread like a trained model's (std 3), built in slices to bound fp32 scratch.
    student = torch.empty(sz.seq, 1, vocab, dtype=torch.bfloat16, device=dev)
    teacher = torch.empty_like(student)
    for x in (student, teacher):
        for a in range(0, sz.seq, 512):
            x[a:a + 512] = torch.randn(x[a:a + 512].shape, generator=g, device=dev) * 3
    labels = torch.randint(0, vocab, (sz.seq, 1), generator=g, device=dev)
    kl = KDLossConfig(loss="forward_kl")
    kl2 = KDLossConfig(loss="forward_kl", temperature=2.0)
    variants: dict[str, Callable] = {
        "Megatron vocab_parallel_cross_entropy": lambda x: vocab_parallel_cross_entropy(x, labels).sum(),
        "megadistill vocab_parallel_kd_loss (forward KL)": lambda x: vocab_parallel_kd_loss(
            x, teacher, kl, group, inplace=True).sum(),
        "megadistill fused objective α=0.5 τ=1": lambda x: vocab_parallel_distillation_loss(
            x, labels, teacher, kl, 0.5, group, inplace=True).total.sum(),
        "megadistill fused objective α=0.5 τ=2": lambda x: vocab_parallel_distillation_loss(
            x, labels, teacher, kl2, 0.5, group, inplace=True).total.sum(),
    }

    def once(fn) -> tuple[float, Optional[float], Optional[float]]:
        leaf = student.detach().requires_grad_(True)
        _sync(cuda)
        base = None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn(leaf.float()).backward()  # the cast as Float16Module does it: a fresh fp32 tensor, overwritten in place
        _sync(cuda)
        elapsed = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if cuda else None
        return elapsed, peak, None if base is None else peak - base

    for fn in variants.values():
        for _ in range(sz.warmup):
            once(fn)
    times: dict[str, list] = {k: [] for k in variants}
    peaks: dict[str, tuple] = {k: (None, None) for k in variants}
    for _ in range(sz.reps):  # interleaved: drifting clocks or a neighbour's load hit every variant alike
        for name, fn in variants.items():
            t, peak, extra = once(fn)
            times[name].append(t)
            if peak is not None and (peaks[name][0] is None or peak > peaks[name][0]):
                peaks[name] = (peak, extra)
    ce = statistics.median(times["Megatron vocab_parallel_cross_entropy"])
    rows = []
    for name in variants:
        t = statistics.median(times[name])
        rows.append({
            "name": f"{name}, vocab {vocab}", "part": "loss", "vocab": vocab, "seq": sz.seq, "batch": 1,
            "ms": round(t * 1e3, 3), "ratio": round(t / ce, 3), "ratio_to": "Megatron CE",
            "peak_mib": _mib(peaks[name][0]), "extra_mib": _mib(peaks[name][1]), "reps": sz.reps,
        })
    return rows


# --------------------------------------------------------------------------- 2-3. training steps


def _step_ms(out: Path, tokens: int, skip: int) -> float:
    """Median step time (ms) of a finished run in ``out``, its first ``skip`` steps left out."""
    from megadistill.metrics import read_metrics

    per_step = [tokens / m["tokens_per_s"] for _, m in sorted(read_metrics(out).items()) if "tokens_per_s" in m]
    kept = per_step[skip:] or per_step
    return statistics.median(kept) * 1e3


class TrainBench:
    """The training runs, in this process, one after another: student alone, with the online teacher,
    with the store."""

    def __init__(self, sz: Sizes, cuda: bool, work: Path, peak: Optional[float]):
        if str(Path(__file__).parent) not in sys.path:
            sys.path.insert(0, str(Path(__file__).parent))
        from common import embedded_corpus, short_run  # bench/common.py

        from megadistill.config import KDConfig, ModelConfig, TeacherConfig, run_vocab_size
        from megadistill.data.tokenizer import tokenizer_vocab_size
        from megadistill.schedules import AlphaSchedule

        self.sz, self.cuda, self.work, self.peak = sz, cuda, work, peak
        self.student = ModelConfig(**sz.student, precision="bf16")
        self.teacher = ModelConfig(**sz.teacher, precision="bf16")
        (work / "corpus").mkdir(parents=True, exist_ok=True)
        self.corpus = embedded_corpus(work / "corpus", sz.train_vocab)
        self._short_run = short_run
        self.kd = KDConfig(top_p=0.95, top_k=50, truncation="ghost", alpha=AlphaSchedule("constant", alpha_max=0.5))
        self.teacher_dir = work / "teacher"
        self.store = work / "store"
        self.online_teacher = TeacherConfig(mode="online", model=self.teacher, checkpoint=str(self.teacher_dir))
        self.offline_teacher = TeacherConfig(mode="offline", model=self.teacher, checkpoint=str(self.teacher_dir),
                                             store=str(self.store))
        self.vocab = run_vocab_size(self.config("probe"), tokenizer_vocab_size(self.corpus[1]))
        self.tokens = sz.global_batch * sz.train_seq
        self.plain_ms: Optional[float] = None

    def config(self, name: str, **kw):
        sz = self.sz
        return self._short_run(self.work / name, self.corpus, sz.steps, self.student, sz.train_seq, sz.micro_batch,
                               sz.global_batch, **kw)

    def save_teacher(self) -> None:
        """A randomly initialised bf16 teacher, saved as a model-only checkpoint (timing needs no trained one)."""
        import torch

        from megadistill.megatron.gpt import build_gpt
        from megadistill.megatron.teacher import save_model_checkpoint

        cfg = self.config("probe", teacher=self.online_teacher)
        torch.manual_seed(7)
        model = build_gpt(cfg.teacher.model, cfg, self.vocab)
        save_model_checkpoint(model, self.teacher_dir)
        del model
        self._free()

    def _free(self) -> None:
        _release(self.cuda)

    def _run(self, cfg) -> tuple[float, Optional[float]]:
        """(median step ms, peak MiB) of ``megadistill.train.run(cfg)``."""
        import torch

        from megadistill.config import validate
        from megadistill.train import run

        validate(cfg, world_size=1)  # run() validates only when it starts torch.distributed itself
        self._free()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        run(cfg, progress=False)
        peak = torch.cuda.max_memory_allocated() if self.cuda else None
        self._free()
        skip = min(2, max(0, self.sz.steps - 1))  # first steps: allocator, autotuning, lazy inits
        return _step_ms(Path(cfg.output_dir), self.tokens, skip), peak

    def _flops_per_token(self) -> dict:
        from megadistill.plan.parameters import forward_flops_per_token, total_parameters

        ns, nt = total_parameters(self.student, self.vocab), total_parameters(self.teacher, self.vocab)
        seq = self.sz.train_seq
        return {"n_student": ns, "n_teacher": nt, "plain": 6 * ns, "kd": 6 * ns + 2 * nt,
                "plain_attn": 3 * forward_flops_per_token(self.student, self.vocab, seq),
                "kd_attn": 3 * forward_flops_per_token(self.student, self.vocab, seq)
                + forward_flops_per_token(self.teacher, self.vocab, seq)}

    def _ideal_ms(self, flops_per_token: float) -> Optional[float]:
        return None if self.peak is None else self.tokens * flops_per_token / (self.peak * 1e12) * 1e3

    def _common(self) -> dict:
        from megadistill.megatron.gpt import use_transformer_engine

        sz = self.sz
        return {"part": "train", "seq": sz.train_seq, "micro_batch": sz.micro_batch, "global_batch": sz.global_batch,
                "steps": sz.steps, "vocab": self.vocab, "tokens_per_step": self.tokens, "precision": "bf16",
                "layer_spec": "transformer_engine" if use_transformer_engine(self.student) else "local"}

    def plain_row(self) -> dict:
        ms, peak = self._run(self.config("plain"))
        self.plain_ms = ms
        f = self._flops_per_token()
        ideal = self._ideal_ms(f["plain"])
        return {"name": "train step: plain LM (student alone)", **self._common(), "ms": round(ms, 2),
                "ratio": None if ideal is None else round(ms / ideal, 3), "ratio_to": "FLOP ideal 6·N_s",
                "ideal_ms": None if ideal is None else round(ideal, 3),
                "ideal_ms_with_attention": _round(self._ideal_ms(f["plain_attn"])), "n_student": f["n_student"],
                "peak_mib": _mib(peak)}

    def online_row(self) -> dict:
        ms, peak = self._run(self.config("online", kd=self.kd, teacher=self.online_teacher))
        f = self._flops_per_token()
        ideal = self._ideal_ms(f["kd"])
        row = {"name": "train step: online KD (student + bf16 teacher)", **self._common(), "ms": round(ms, 2),
               "ratio": None if ideal is None else round(ms / ideal, 3), "ratio_to": "FLOP ideal 6·N_s + 2·N_t",
               "ideal_ms": None if ideal is None else round(ideal, 3),
               "ideal_ms_with_attention": _round(self._ideal_ms(f["kd_attn"])),
               "n_student": f["n_student"], "n_teacher": f["n_teacher"],
               "ideal_vs_plain": round(f["kd"] / f["plain"], 3), "peak_mib": _mib(peak)}
        if self.plain_ms:
            row["vs_plain"] = round(ms / self.plain_ms, 3)
            row["note"] = f"{row['vs_plain']:.2f}x the plain step (FLOP ideal {row['ideal_vs_plain']:.2f}x)"
        return row

    def offline_row(self) -> dict:
        from megadistill.store.precompute import precompute

        cfg = self.config("offline", kd=self.kd, teacher=self.offline_teacher)
        self._free()
        t0 = time.perf_counter()
        precompute(cfg, progress=False)
        precompute_s = time.perf_counter() - t0
        ms, peak = self._run(cfg)
        ratio = None if not self.plain_ms else round(ms / self.plain_ms, 3)
        return {"name": "train step: offline KD (top-p 0.95 / top-k 50 store)", **self._common(), "ms": round(ms, 2),
                "ratio": ratio, "ratio_to": "plain LM step", "precompute_s": round(precompute_s, 2),
                "note": f"store for {self.sz.steps} steps written in {precompute_s:.1f} s", "peak_mib": _mib(peak)}


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 3)


# --------------------------------------------------------------------------- driver


def _error_row(name: str, err: BaseException) -> dict:
    last = traceback.format_exception_only(type(err), err)[-1].strip()
    return {"name": name, "ms": None, "ratio": None, "peak_mib": None, "error": last[:300]}


def bench(args) -> int:
    out = Path(args.out)
    results_file = out / "results.json"
    previous = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results = environment(args.dry_run)
    results["tests"] = previous.get("tests")  # a test summary recorded before this run is kept
    cuda = not args.dry_run
    sz = sizes_for(args.dry_run, args.quick)
    if args.reps:
        sz.reps = args.reps
    if args.vocab:
        sz.vocabs = tuple(args.vocab)
    if args.seq:
        sz.seq = args.seq
    peak = args.peak_tflops or (DRY_RUN_PEAK_TFLOPS if args.dry_run else peak_tflops(results["gpu"]))
    results["peak_bf16_tflops"] = peak
    if peak is None:
        results["notes"].append(f"no datasheet peak for {results['gpu']!r}: pass --peak-tflops for the FLOP-ideal ratios")
    write_results(out, results)
    init_single_rank(cuda)
    failed = False

    def add(name: str, make: Callable[[], Any]) -> None:
        nonlocal failed
        print(f"gpu_check.py: {name} ...", flush=True)
        try:
            made = make()
        except Exception as e:  # one broken measurement must not hide the others
            traceback.print_exc()
            failed = True
            made = [_error_row(name, e)]
        for row in made if isinstance(made, list) else [made]:
            results["rows"].append(row)
            print(f"  {row['name']}: {_fmt(row['ms'], '.1f')} ms, ratio {_fmt(row['ratio'], '.2f')}"
                  f" ({row.get('ratio_to', '')}), peak {_fmt(row['peak_mib'], '.0f')} MiB"
                  f"{'  ERROR ' + row['error'] if 'error' in row else ''}", flush=True)
        write_results(out, results)

    for vocab in sz.vocabs:
        add(f"losses at vocab {vocab}", lambda vocab=vocab: loss_rows(vocab, sz, cuda))
        _release(cuda)  # the logits of that vocabulary, before the next one's
    with tempfile.TemporaryDirectory(prefix="gpu-check-runs-", dir=args.work) as tmp:
        train: list = []
        add("training set-up (corpus, teacher checkpoint)", lambda: _setup(train, sz, cuda, Path(tmp), peak))
        if train:
            tb = train[0]
            add("train step: plain LM", tb.plain_row)
            add("train step: online KD", tb.online_row)
            add("train step: offline KD", tb.offline_row)
    results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_results(out, results)
    print(f"gpu_check.py: wrote {out / 'results.json'} and {out / 'results.md'}")
    return 1 if failed else 0


def _release(cuda: bool) -> None:
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def _setup(holder: list, sz: Sizes, cuda: bool, work: Path, peak: Optional[float]) -> list:
    tb = TrainBench(sz, cuda, work, peak)
    tb.save_teacher()
    holder.append(tb)
    return []  # no row of its own: a failure here becomes an error row


def record_tests(args) -> int:
    out = Path(args.out)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else environment(dry_run=False)
    results["tests"] = tests_summary(Path(args.record_tests), args.tests_seconds)
    write_results(out, results)
    t = results["tests"]
    print(f"gpu_check.py: tests {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
          f"{' (time limit reached)' if t['timed_out'] else ''}")
    return 1 if t["failed"] or t["timed_out"] else 0


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-check-results", help="directory for results.json and results.md")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (no GPU needed)")
    ap.add_argument("--quick", action="store_true", help="one vocabulary, fewer repetitions and steps")
    ap.add_argument("--reps", type=int, help="loss-table repetitions (median)")
    ap.add_argument("--vocab", type=int, nargs="+", help="loss-table vocabularies")
    ap.add_argument("--seq", type=int, help="loss-table sequence length")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if the table does not know it")
    ap.add_argument("--work", help="where the training runs write (default: the system's temporary directory)")
    ap.add_argument("--record-tests", metavar="DIR", help="fold DIR/junit-*.xml into results.json and exit")
    ap.add_argument("--tests-seconds", type=float, default=0.0, help="with --record-tests: the suite's wall time")
    ap.add_argument("--shard-tests", type=int, metavar="N", help="print N lines of test files, balanced, and exit")
    ap.add_argument("--quick-tests", action="store_true", help="with --shard-tests: the GPU tests and a core subset")
    args = ap.parse_args(argv)
    if args.shard_tests:
        for shard in shard_test_files(args.shard_tests, args.quick_tests):
            print(" ".join(shard))
        return 0
    if args.record_tests:
        return record_tests(args)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Optional accelerators megatron-core announces on every import (as pyproject.toml filters them in tests).
    warnings.filterwarnings("ignore", message="(Transformer Engine and )?Apex (is|are) not installed")
    import torch

    if args.dry_run:
        from megadistill.testing import hide_cuda

        hide_cuda()  # the dry run is the CPU path, on a GPU machine too
    elif not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run runs tiny sizes on CPU",
              file=sys.stderr)
        return 2
    return bench(args)


# --------------------------------------------------------------------------- test shards

QUICK_TESTS = ("tests/megatron/test_gpu.py", "tests/losses", "tests/test_launch.py",
               "tests/megatron/test_cpu_harness.py", "tests/megatron/test_checkpoint.py")
"""--quick: the GPU tests, the losses, and what decides CPU vs GPU and checkpoints."""


def shard_test_files(n: int, quick: bool = False) -> list[list[str]]:
    """The test files (paths relative to the repository root) in ``n`` groups of about equal size in
    bytes (a rough stand-in for run time), the GPU tests first in the first group."""
    gpu = "tests/megatron/test_gpu.py"
    if quick:
        files = [p for p in QUICK_TESTS if (ROOT / p).exists()]
    else:
        files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py"))
    rest = [f for f in files if f != gpu]
    size = {f: sum(p.stat().st_size for p in ([ROOT / f] if (ROOT / f).is_file() else (ROOT / f).rglob("test_*.py")))
            for f in rest}
    shards: list[list[str]] = [[] for _ in range(max(1, n))]
    load = [0] * len(shards)
    if gpu in files:
        shards[0].append(gpu)
    for f in sorted(rest, key=lambda f: -size[f]):  # largest first into the lightest group
        i = load.index(min(load))
        shards[i].append(f)
        load[i] += size[f]
    return [s for s in shards if s]


if __name__ == "__main__":
    sys.exit(main())
