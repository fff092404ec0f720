"""Benchmark: SALT's two phases against a plain LM run of the same student, side by side in one run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/salt.py [--steps 16]

Three driver runs, each a ``megadistill train`` process of its own so that memory figures do not
mix (Megatron backend, one rank, fp32, CPU): a short run that makes the small teacher's checkpoint
(not timed), the SALT run
(KD from the smaller teacher for the first half of the steps, then plain LM training with the
teacher released), and the plain LM run. Reported per phase: the median step time (the first step
of each phase left out: warm-up, and the release happens before it) and the process memory the
loop logs each step (``memory_mib``: resident set on CPU, CUDA allocated on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import yaml

from megadistill.config import (
    CheckpointConfig,
    DataConfig,
    KDConfig,
    ModelConfig,
    RunConfig,
    TeacherConfig,
    TrainingConfig,
    to_dict,
)
from megadistill.schedules import AlphaSchedule

# SALT's normal case: the teacher is smaller than the student.
STUDENT = ModelConfig(num_layers=6, hidden_size=512, num_attention_heads=8)
TEACHER = ModelConfig(num_layers=4, hidden_size=384, num_attention_heads=6)


def _params(m: ModelConfig, vocab: int) -> int:
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    return m.num_layers * (4 * m.hidden_size**2 + 2 * m.hidden_size * ffn) + vocab * m.hidden_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16, help="steps per run; KD for the first half of the SALT run")
    args = ap.parse_args()
    from megadistill.data.datasets import preprocess_if_stale
    from megadistill.metrics import read_metrics

    with tempfile.TemporaryDirectory(prefix="megadistill-bench-salt-") as tmp:
        tmp = Path(tmp)
        data = DataConfig(vocab_size=2048, seq_length=128, micro_batch_size=8, global_batch_size=16)
        training = TrainingConfig(train_steps=args.steps, eval_interval=args.steps, eval_steps=1, log_interval=1)
        base = RunConfig(data=data, training=training, checkpoint=CheckpointConfig(save_interval=0))
        prefix = tmp / "data" / "corpus"
        preprocess_if_stale(base, str(prefix), None)
        base = replace(base, data=replace(data, data_prefix=str(prefix), tokenizer_model=str(prefix) + ".model"))
        teacher = replace(base, name="teacher", output_dir=str(tmp / "teacher"), model=TEACHER,
                          training=replace(training, train_steps=2))
        n_kd = args.steps // 2
        salt = replace(
            base, name="salt", output_dir=str(tmp / "salt"), model=STUDENT,
            teacher=TeacherConfig(mode="online", model=TEACHER, checkpoint=str(tmp / "teacher" / "checkpoints")),
            kd=KDConfig(alpha=AlphaSchedule("salt", alpha_max=0.5, n_kd=n_kd)),
        )
        plain = replace(base, name="plain", output_dir=str(tmp / "plain"), model=STUDENT)
        for cfg in (teacher, salt, plain):
            path = tmp / f"{cfg.name}.yaml"
            path.write_text(yaml.safe_dump(to_dict(cfg)))
            subprocess.run([sys.executable, "-m", "megadistill", "train", str(path), "--no-progress"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        s, p = read_metrics(tmp / "salt"), read_metrics(tmp / "plain")

    def phase(m: dict, first: int, last: int) -> tuple[float, float]:
        steps = range(first + 1, last + 1)  # the first step of a phase is left out
        seconds = statistics.median(16 * 128 / m[i]["tokens_per_s"] for i in steps)
        return seconds, statistics.median(m[i]["memory_mib"] for i in steps)

    kd, lm, ref = phase(s, 1, n_kd), phase(s, n_kd + 1, args.steps), phase(p, 1, args.steps)
    vocab = 2048
    print(f"student {STUDENT.num_layers}x{STUDENT.hidden_size} ({_params(STUDENT, vocab) / 1e6:.1f} M params), "
          f"teacher {TEACHER.num_layers}x{TEACHER.hidden_size} ({_params(TEACHER, vocab) / 1e6:.1f} M params, "
          f"{_params(TEACHER, vocab) * 4 / 2**20:.0f} MiB of fp32 weights), {args.steps} steps, KD for {n_kd}")
    print("| phase | step time | vs plain LM | process memory (MiB) |")
    print("|---|---|---|---|")
    for name, (t, mem) in (("SALT KD phase (teacher in the loop)", kd), ("SALT LM phase (teacher released)", lm),
                           ("plain LM run", ref)):
        print(f"| {name} | {t * 1e3:.0f} ms | {t / ref[0]:.2f}x | {mem:.0f} |")


if __name__ == "__main__":
    main()
