"""A run's data: the tokenizer and the train/valid ``GPTDataset``s, preprocessing the text first
(on rank 0) when no corpus made from the same inputs exists in the run's directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch.distributed as dist


def prepare_data(cfg):
    """``(tokenizer, train_ds, valid_ds, tokenizer_path)`` for run ``cfg`` (collective)."""
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


def _preprocess_if_stale(cfg, prefix: str, tokenizer_model: Optional[str]) -> None:
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
