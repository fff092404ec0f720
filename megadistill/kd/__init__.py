"""Distillation objective pieces: where KD targets come from (teacher sources) and the per-step knobs."""
