"""``megadistill demo``: both papers' comparisons end to end on the embedded corpus (no download,
2 CPU cores), with a report (``report.md``, PNG plots, TensorBoard logs of every run).

1. preprocess the corpus; train a large teacher (recording its own logits as it trains: the PD
   paper's "online logits") and a small LM, smaller than the student (SALT's teacher);
2. precompute the large teacher's top-0.95-50 targets and RS-KD samples; score the data with the
   small LM (SALT_DS);
3. train for the same steps: baseline, PD offline (PD*), PD online, PD from recorded logits, SALT,
   SALT_DS; baselines for 1.5x and 2x the steps (the equal-wall-clock comparison);
4. the truncation side by side at τ = 2, α = 0.9, over several seeds: renormalised top-0.95-50, ghost
   bucket, RS-KD (drawn at τ = 2), against LM only and the untruncated online teacher (the ceiling);
5. write the report. The numbers are whatever the runs give.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

from megadistill.demo.runs import DEFAULT, FAST, DemoScale, Step, plan, scaled

__all__ = ["run_demo", "demo_steps", "DemoScale", "DEFAULT", "FAST"]


def demo_steps(out: str | Path, scale: DemoScale, seeds: int, prefix: str, tokenizer: str) -> list[Step]:
    """The plan with the preprocessed corpus filled in, every config validated."""
    from megadistill.config import DataConfig, validate

    steps = plan(out, scale, seeds, DataConfig(data_prefix=prefix, tokenizer_model=tokenizer))
    for st in steps:
        validate(st.cfg, world_size=1)
    return steps


def _notes(scale: DemoScale, seeds: int, inputs) -> list[str]:
    s = scale
    tokens = s.student_steps * s.batch_size * s.seq_length
    notes = [
        f"Students: {s.student.num_layers} layers x {s.student.hidden_size}, {s.student_steps} steps of "
        f"{s.batch_size} x {s.seq_length} tokens ({tokens / 1e3:.0f} K tokens). The PD paper trained 1.9 B students on "
        "hundreds of billions of tokens from a 9 B teacher; SALT a 2.8 B student from a 1.5 B teacher. Toy scale "
        "changes the size of every effect; the directions are what this shows, and only where they exceed the seed spread.",
        f"Large teacher: {s.teacher.num_layers} x {s.teacher.hidden_size}, {s.teacher_steps} steps (twice the students'"
        f"); small LM: {s.small.num_layers} x {s.small.hidden_size}, {s.small_steps} steps.",
        f"SALT's KD phase: the first {round(s.salt_kd_fraction * s.student_steps)} steps ({s.salt_kd_fraction:.0%}; the "
        "paper: 36 K of ~208 K), α = 0.9; SALT_DS selects the top half of the sequences by the small LM's score.",
        f"Truncation side by side: {s.truncation_steps} steps per run, {max(seeds, s.truncation_seeds)} seeds of each "
        "row; one RS-KD store (one set of draws) serves every seed.",
        f"Seeds: {seeds} (`--seeds N` repeats every main student run with another weights seed; the data order stays; "
        f"the baseline runs at least {s.baseline_seeds} seeds).",
        "Online logits are recorded during the large teacher's first half (the samples the students read), so that "
        "teacher is less trained there than the finished one PD offline/online distil.",
    ]
    if inputs:
        notes.append("Corpus: " + ", ".join(str(p) for p in inputs) + " (given with --inputs).")
    return notes


def run_demo(out: str | Path = "runs/demo", scale: float = 1.0, seeds: int = 1, inputs: Optional[Sequence[str]] = None,
             fast: bool = False, progress: bool = True) -> str:
    """Run the demo into ``out``; returns the report (also ``<out>/report.md``). A demo started
    again reuses every finished step with the same config."""
    from megadistill.config import DataConfig, RunConfig
    from megadistill.data.datasets import preprocess_if_stale
    from megadistill.demo import report
    from megadistill.demo.runner import run_step

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    out = Path(out)
    s = scaled(FAST if fast else DEFAULT, scale)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "data" / "corpus"
    print(f"[demo] preparing the corpus ({'the given files' if inputs else 'the embedded Python documentation'})", flush=True)
    corpus_cfg = RunConfig(data=DataConfig(inputs=list(inputs) if inputs else None, vocab_size=s.vocab_size))
    preprocess_if_stale(corpus_cfg, str(prefix), None)
    steps = demo_steps(out, s, seeds, str(prefix), str(prefix) + ".model")
    # Megatron is imported once here: every step forks from this process.
    import megadistill.train  # noqa: F401

    records = {}
    for i, st in enumerate(steps, start=1):
        print(f"[demo] {i}/{len(steps)} {st.label} [{time.perf_counter() - t0:.0f} s so far]", flush=True)
        records[st.name] = run_step(out, st, progress=progress,
                                    upstream=tuple(records[u]["config_sha256"] for u in st.uses))
    meta = {"corpus": _corpus_line(inputs, s), "scale": s.name, "seeds": seeds, "cores": os.cpu_count(),
            "seconds": time.perf_counter() - t0, "notes": _notes(s, seeds, inputs), "out": str(out)}
    plots = report.plot(records, out)
    text = report.render(records, meta, plots)
    (out / "records.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1, sort_keys=True))
    tmp = out / ".report.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "report.md")
    print(text)
    print(f"[demo] report: {out / 'report.md'}")
    return text


def _corpus_line(inputs, s: DemoScale) -> str:
    what = "the given text files" if inputs else "the Python standard library's documentation text (pydoc_data.topics)"
    return (f"Corpus: {what}, a sentencepiece BPE vocabulary of {s.vocab_size}, sequences of {s.seq_length} tokens, "
            f"{s.batch_size} per step; validation on held-out documents (the last 10 %)")
