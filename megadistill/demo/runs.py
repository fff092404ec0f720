"""What ``megadistill demo`` runs: the scale (sizes, steps) and one ``RunConfig`` per step.

Every run shares one corpus, one tokenizer and one sample order (``data.seed`` and
``data.train_samples`` pinned), so the students see the same samples in the same order and every
store serves every student that reads it. Students share one learning-rate schedule (WSD, as the
PD paper's PD*), so a comparison differs in the teacher signal alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from megadistill.config import (
    CheckpointConfig,
    DataConfig,
    DataSelectionConfig,
    KDConfig,
    ModelConfig,
    OptimizerConfig,
    RecordLogitsConfig,
    RunConfig,
    TeacherConfig,
    TrainingConfig,
)
from megadistill.schedules import AlphaSchedule

DATA_SEED = 1234


@dataclass(frozen=True)
class DemoScale:
    """Sizes and step counts of one demo."""

    name: str
    """default, fast, or scale<S>."""
    student: ModelConfig
    """Every student (and the baselines)."""
    teacher: ModelConfig
    """The large teacher (PD)."""
    small: ModelConfig
    """The small LM, smaller than the student (SALT's teacher)."""
    student_steps: int
    """Optimizer steps of every student run."""
    teacher_steps: int
    """Steps of the large teacher's own pre-training (its recorded logits cover the students' samples)."""
    small_steps: int
    """Steps of the small LM's pre-training."""
    truncation_steps: int
    """Steps of the truncation side-by-side runs (τ = 2, α = 0.9)."""
    truncation_seeds: int = 3
    """Seeds of every truncation side-by-side run at least (LM-only and untruncated references included):
    a difference there counts only beyond their seed spread."""
    vocab_size: int = 2048
    """Tokenizer vocabulary trained on the corpus."""
    seq_length: int = 128
    """Tokens per sequence."""
    batch_size: int = 8
    """Sequences per step (one micro-batch: the demo runs on one process)."""
    eval_points: int = 10
    """Validations per student run (and at the end)."""
    eval_steps: int = 8
    """Batches per validation (the same held-out samples for every run)."""
    baseline_lengths: tuple = (1.0, 1.5, 2.0)
    """Baselines trained for these multiples of student_steps, each with its own full LR schedule: the
    equal-wall-clock comparison interpolates between their final losses."""
    baseline_seeds: int = 3
    """Seeds of the baseline at least (the seed spread every single-seed comparison is judged by)."""
    rskd_draws: int = 12
    """RS-KD samples per position."""
    salt_kd_fraction: float = 0.25
    """SALT's KD phase: this fraction of the student steps."""

    @property
    def train_samples(self) -> int:
        """The sample order every run is built for: the longest run's samples."""
        longest = max(self.teacher_steps, self.small_steps, math.ceil(max(self.baseline_lengths) * self.student_steps))
        return longest * self.batch_size


def _model(layers: int, hidden: int) -> ModelConfig:
    return ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=4)


DEFAULT = DemoScale(
    name="default", student=_model(3, 192), teacher=_model(4, 256), small=_model(2, 128),
    student_steps=200, teacher_steps=400, small_steps=200, truncation_steps=100, eval_steps=4,
)
"""Sized for 15-25 minutes on 2 CPU cores (15.6 measured; the report measures it); the truncation side
by side's 15 runs of 100 steps are about a third of that."""

FAST = DemoScale(
    name="fast", student=_model(2, 64), teacher=_model(2, 96), small=_model(1, 32),
    student_steps=12, teacher_steps=24, small_steps=12, truncation_steps=8, truncation_seeds=2,
    vocab_size=512, seq_length=32, batch_size=4, eval_points=3, eval_steps=2,
)
"""A smoke version (minutes), for the test suite: every step and section, no meaningful numbers."""


def scaled(base: DemoScale, scale: float) -> DemoScale:
    """``base`` with every step count × ``scale`` and every hidden size × √scale (a multiple of
    32, so heads stay whole): roughly ``scale``² more compute."""
    if scale <= 0:
        raise ValueError(f"--scale must be positive, got {scale}")
    if scale == 1.0:
        return base

    def grow(m: ModelConfig) -> ModelConfig:
        return replace(m, hidden_size=max(32, int(round(m.hidden_size * math.sqrt(scale) / 32)) * 32))

    def steps(n: int) -> int:
        return max(4, int(round(n * scale)))

    return replace(
        base, name=f"{base.name}-x{scale:g}", student=grow(base.student), teacher=grow(base.teacher),
        small=grow(base.small), student_steps=steps(base.student_steps), teacher_steps=steps(base.teacher_steps),
        small_steps=steps(base.small_steps), truncation_steps=steps(base.truncation_steps),
    )


@dataclass
class Step:
    """One step of the demo."""

    name: str
    """Also its directory under the demo's output directory."""
    kind: str
    """train, precompute or score."""
    role: str
    """teacher, inference or student (how the report counts its time)."""
    cfg: RunConfig
    """The run (for precompute/score: the student run the store or scores are made for)."""
    label: str
    """What the report calls it."""
    options: dict = field(default_factory=dict)
    """precompute: its keyword arguments (kind, draws, temperatures)."""
    seed: int = 0
    """Seed index (training.seed = DATA_SEED + seed; the data order stays)."""
    uses: tuple = ()
    """Names of the teacher/inference steps whose cost it shares (teacher training, precompute, scoring)."""
    group: str = "main"
    """main (equal-steps comparisons), baseline-long (equal-wall-clock baselines) or truncation."""


# Knobs of the PD runs: the PD paper's PD* (top-0.95-50, forward KL, τ = 1, WSD-α with α_max 0.9).
PD_STAR = KDConfig(loss="forward_kl", temperature=1.0, top_p=0.95, top_k=50, truncation="renormalize",
                   alpha=AlphaSchedule(kind="wsd", alpha_max=0.9, alpha_min=0.0, warmup_fraction=0.1, decay_fraction=0.2))


def plan(out: str | Path, scale: DemoScale, seeds: int = 1, data: Optional[DataConfig] = None) -> list[Step]:
    """The demo's steps in order (each after those it reads). ``data`` carries the corpus
    (data_prefix/tokenizer_model once preprocessed; the demo fills it in)."""
    out = Path(out)
    s = scale
    data = replace(
        data or DataConfig(), vocab_size=s.vocab_size, seq_length=s.seq_length, micro_batch_size=s.batch_size,
        global_batch_size=s.batch_size, seed=DATA_SEED, train_samples=s.train_samples,
    )

    def training(steps: int, seed: int = 0) -> TrainingConfig:
        return TrainingConfig(train_steps=steps, eval_interval=max(1, steps // s.eval_points), eval_steps=s.eval_steps,
                              seed=DATA_SEED + seed, log_interval=max(1, steps // 20))

    def run(name, model, steps, seed=0, lr_schedule="wsd", **kw) -> RunConfig:
        return RunConfig(
            name=name, output_dir=str(out / name), model=model, data=data, training=training(steps, seed),
            optimizer=OptimizerConfig(lr=2e-3, min_lr=2e-4, lr_schedule=lr_schedule, warmup_fraction=0.05,
                                      wsd_decay_fraction=0.2),
            # Saved at the end only: a demo run is minutes long (a killed demo re-runs the unfinished step).
            checkpoint=CheckpointConfig(save_interval=0, save_interval_minutes=0.0), **kw,
        )

    stores = out / "stores"
    recorded = stores / "recorded-top-0.95-50"
    topk = stores / "top-0.95-50"
    rskd = stores / f"rskd-{s.rskd_draws}"
    scores = out / "scores-small_lm"
    teacher_ckpt = str(out / "large_teacher" / "checkpoints")
    small_ckpt = str(out / "small_lm" / "checkpoints")
    n = s.student_steps

    steps = [
        Step("large_teacher", "train", "teacher",
             run("large_teacher", s.teacher, s.teacher_steps, lr_schedule="cosine",
                 record_logits=RecordLogitsConfig(store=str(recorded), top_p=0.95, top_k=50)),
             f"large teacher ({_shape(s.teacher)}, {s.teacher_steps} steps, recording its logits)"),
        Step("small_lm", "train", "teacher", run("small_lm", s.small, s.small_steps, lr_schedule="cosine"),
             f"small LM ({_shape(s.small)}, {s.small_steps} steps)"),
    ]

    def offline(name, store, kd, steps_=n, seed=0):
        return run(name, s.student, steps_, seed,
                   teacher=TeacherConfig(mode="offline", model=s.teacher, checkpoint=teacher_ckpt, store=str(store)), kd=kd)

    trunc_kd = KDConfig(loss="forward_kl", temperature=2.0, top_p=0.95, top_k=50,
                        alpha=AlphaSchedule(kind="constant", alpha_max=0.9))
    steps += [
        # τ = 1 serves PD* (renormalised) and τ = 2 the ghost-bucket truncation runs (their exact tempered tail).
        Step("precompute_top_p_k", "precompute", "inference", offline("precompute_top_p_k", topk, PD_STAR),
             "precompute top-0.95-50 (with the residual mass and the τ = 2 tail mass)",
             {"kind": "top_p_k", "temperatures": (1.0, 2.0)}, uses=("large_teacher",)),
        # Drawn from the τ = 2 teacher: the truncation runs' RS-KD targets are then unbiased at their τ.
        Step("precompute_rskd", "precompute", "inference", offline("precompute_rskd", rskd, trunc_kd),
             f"precompute RS-KD ({s.rskd_draws} draws at τ = 2)",
             {"kind": "rskd", "draws": s.rskd_draws, "temperatures": (2.0,)}, uses=("large_teacher",)),
    ]
    salt_alpha = AlphaSchedule(kind="salt", alpha_max=0.9, n_kd=max(1, round(s.salt_kd_fraction * n)))
    salt_kd = KDConfig(loss="forward_kl", temperature=1.0, alpha=salt_alpha)
    selection = DataSelectionConfig(scores=str(scores), top_k=10, min_learnable_tokens=min(8, s.seq_length // 4),
                                    select="top_fraction", fraction=0.5)

    def salt(name, seed=0, ds=False):
        return run(name, s.student, n, seed, teacher=TeacherConfig(mode="online", model=s.small, checkpoint=small_ckpt),
                   kd=salt_kd, data_selection=selection if ds else DataSelectionConfig())

    steps.append(Step("score_data", "score", "inference", salt("score_data", ds=True),
                      "score the data with the small LM (SALT_DS)", uses=("small_lm",)))
    for seed in range(max(seeds, s.baseline_seeds)):
        tag = "" if seed == 0 else f"@{seed}"
        steps.append(Step(f"baseline{tag}", "train", "student", run(f"baseline{tag}", s.student, n, seed),
                          "baseline (LM only)", seed=seed))
        if seed >= seeds:
            continue
        steps += [
            Step(f"pd_offline{tag}", "train", "student", offline(f"pd_offline{tag}", topk, PD_STAR, seed=seed),
                 "PD offline (PD*: stored top-0.95-50)", seed=seed, uses=("large_teacher", "precompute_top_p_k")),
            Step(f"pd_online{tag}", "train", "student",
                 run(f"pd_online{tag}", s.student, n, seed, kd=PD_STAR,
                     teacher=TeacherConfig(mode="online", model=s.teacher, checkpoint=teacher_ckpt)),
                 "PD online (teacher in the loop)", seed=seed, uses=("large_teacher",)),
            Step(f"pd_recorded{tag}", "train", "student", offline(f"pd_recorded{tag}", recorded, PD_STAR, seed=seed),
                 "PD from recorded logits", seed=seed, uses=("large_teacher",)),
            Step(f"salt{tag}", "train", "student", salt(f"salt{tag}", seed), "SALT (small LM, then LM)", seed=seed,
                 uses=("small_lm",)),
            Step(f"salt_ds{tag}", "train", "student", salt(f"salt_ds{tag}", seed, ds=True),
                 "SALT_DS (selected phase-1 data)", seed=seed, uses=("small_lm", "score_data")),
        ]
    for mult in s.baseline_lengths:
        if mult != 1.0:
            name = f"baseline_x{mult:g}"
            steps.append(Step(name, "train", "student", run(name, s.student, math.ceil(mult * n)),
                              f"baseline, {mult:g}x the steps", group="baseline-long"))
    m = s.truncation_steps
    full = replace(trunc_kd, top_p=1.0, top_k=None)  # the ceiling: every id of the teacher, nothing truncated
    for seed in range(max(seeds, s.truncation_seeds)):
        tag = "" if seed == 0 else f"@{seed}"
        for name, store, trunc, label in (
            ("trunc_renormalize", topk, "renormalize", "top-0.95-50 renormalised"),
            ("trunc_ghost", topk, "ghost", "top-0.95-50 + ghost bucket"),
            ("trunc_rskd", rskd, "renormalize", f"RS-KD ({s.rskd_draws} draws)"),
        ):
            used = ("large_teacher", "precompute_rskd" if store == rskd else "precompute_top_p_k")
            steps.append(Step(f"{name}{tag}", "train", "student",
                              offline(f"{name}{tag}", store, replace(trunc_kd, truncation=trunc), m, seed),
                              f"τ=2, α=0.9: {label}", seed=seed, group="truncation", uses=used))
        steps.append(Step(f"trunc_untruncated{tag}", "train", "student",
                          run(f"trunc_untruncated{tag}", s.student, m, seed, kd=full,
                              teacher=TeacherConfig(mode="online", model=s.teacher, checkpoint=teacher_ckpt)),
                          "τ=2, α=0.9: untruncated teacher (online)", seed=seed, group="truncation",
                          uses=("large_teacher",)))
        if m != n:  # the side-by-side's own baseline at its length (else the main baseline's seeds serve)
            steps.append(Step(f"trunc_baseline{tag}", "train", "student", run(f"trunc_baseline{tag}", s.student, m, seed),
                              "τ=2, α=0.9: baseline (LM only)", seed=seed, group="truncation"))
    return steps


def _shape(m: ModelConfig) -> str:
    return f"{m.num_layers}x{m.hidden_size}"
