"""What the bench scripts share: the embedded corpus preprocessed once per bench, and a short run's
config around it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from megadistill.config import CheckpointConfig, DataConfig, ModelConfig, OptimizerConfig, RunConfig, TrainingConfig


def embedded_corpus(root: Path, vocab_size: int) -> tuple[str, str]:
    """``(data prefix, tokenizer model)`` of the embedded corpus, preprocessed under ``root``."""
    from megadistill.data.corpus import embedded_corpus_text
    from megadistill.data.preprocess import preprocess

    (root / "a.txt").write_text(embedded_corpus_text())
    r = preprocess([str(root / "a.txt")], root / "data" / "corpus", vocab_size=vocab_size, progress=False)
    return str(r.prefix), str(r.tokenizer_model)


def short_run(out: Path, corpus: tuple[str, str], steps: int, model: ModelConfig, seq_length: int,
              micro_batch_size: int, global_batch_size: int, **kw) -> RunConfig:
    """A ``steps``-step run of ``model`` on ``corpus`` with one evaluation at the end, no checkpoints
    but the last, every step logged; ``kw`` replaces any other field."""
    prefix, tok = corpus
    cfg = RunConfig(
        name=out.name, output_dir=str(out), model=model,
        data=DataConfig(data_prefix=prefix, tokenizer_model=tok, seq_length=seq_length,
                        micro_batch_size=micro_batch_size, global_batch_size=global_batch_size),
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_fraction=0.1),
        training=TrainingConfig(train_steps=steps, eval_interval=steps, eval_steps=1, log_interval=1),
        checkpoint=CheckpointConfig(save_interval=0),
    )
    return replace(cfg, **kw)
