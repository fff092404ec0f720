"""A run's data: the tokenizer and the train/valid ``GPTDataset``s.

Rank 0 first makes sure the data can be trained on. With ``data.inputs`` (or the embedded corpus)
it preprocesses the text into the run's directory, unless a corpus made from the same content is
there and intact. With ``data.data_prefix`` it verifies the given files. A problem found there is
raised as ``DataError`` on every rank, so the command line exits with a one-line message.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch.distributed as dist


def prepare_data(cfg):
    """``(tokenizer, train_ds, valid_ds, tokenizer_path)`` for run ``cfg`` (collective)."""
    from megadistill import data, data_integrity
    from megadistill.data_checks import DataError
    from megadistill.hf.tokenizer import load_tokenizer

    out = Path(cfg.output_dir)
    prefix, tok_path = cfg.data.data_prefix, cfg.data.tokenizer_model
    own = prefix is None
    if own:
        prefix = str(out / "data" / "corpus")
    failure, cause = None, None
    if dist.get_rank() == 0:
        try:
            if own:
                preprocess_if_stale(cfg, prefix, tok_path)
            else:
                data_integrity.verify(prefix, tok_path, hash_limit=data_integrity.HASH_AT_START_BYTES,
                                      tokenizer_type=cfg.data.tokenizer_type)
        # Every rank must learn of a failure, not wait at a barrier forever.
        except (DataError, FileNotFoundError) as e:
            failure, cause = ("data", str(e)), e
        except Exception as e:
            failure, cause = ("other", f"{type(e).__name__}: {e}"), e
    shared = [failure]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        kind, message = shared[0]
        if kind == "data":  # the user's to fix: one line from the command line, on every rank
            raise DataError(message) from cause
        raise RuntimeError(f"preparing the data on rank 0 failed: {message}") from cause
    if own and tok_path is None:
        tok_path = prefix + ".model"  # preprocess writes the tokenizer beside the data
    tokenizer = load_tokenizer(tok_path, cfg.data.tokenizer_type)
    # The file that defines the tokenizer (a Hugging Face directory's tokenizer.json): callers
    # take file_sha256 of it as the tokenizer's identity, which is tokenizer.sha256.
    tok_path = str(tokenizer.model_path)
    from megadistill.config import data_seed, train_dataset_samples

    # Validation always reads the first eval_steps global batches: building exactly that many makes
    # the validation samples independent of the run's length (Megatron shuffles over all epochs).
    num_samples = (train_dataset_samples(cfg), cfg.training.eval_steps * cfg.data.global_batch_size)
    train_ds, valid_ds = data.build_gpt_datasets(
        prefix, tokenizer, cfg.data.seq_length, cfg.data.split, num_samples, data_seed(cfg),
        cache_dir=str(out / "data" / "cache"),
    )
    return tokenizer, train_ds, valid_ds, tok_path


def preprocess_if_stale(cfg, prefix: str, tokenizer_model: Optional[str]) -> None:
    """Preprocess the inputs into ``prefix`` unless the corpus there was made from the same
    content and passes ``data_integrity.verify`` (files above its start-up limit: sizes only).

    The comparison is by content (``data.corpus_recipe``), not by path: an input or tokenizer
    edited in place makes a new corpus. A damaged corpus is ours to rebuild, with a note on stderr.
    """
    from megadistill import data, data_integrity
    from megadistill.data_checks import DataError
    from megadistill.hf.tokenizer import HuggingFaceTokenizer, load_tokenizer

    d = cfg.data
    given = load_tokenizer(tokenizer_model, d.tokenizer_type) if tokenizer_model else None
    hf_eod = given.eod if isinstance(given, HuggingFaceTokenizer) else None
    wanted = data.corpus_recipe(d.inputs, d.json_key, d.vocab_size, given.sha256 if given else None, hf_eod=hf_eod)
    if Path(prefix + ".idx").is_file():  # else absent, or an interrupted commit
        try:
            found = data_integrity.read_manifest(prefix)
            if found is not None and found.get("recipe") == wanted:
                data_integrity.verify(prefix, hash_limit=data_integrity.HASH_AT_START_BYTES)
                return
        except (DataError, FileNotFoundError) as e:
            print(f"megadistill: {e}; preprocessing again", file=sys.stderr)
    data.preprocess(d.inputs, prefix, vocab_size=d.vocab_size, tokenizer_model=tokenizer_model, json_key=d.json_key,
                    tokenizer_type=d.tokenizer_type)
    Path(prefix + ".recipe.json").unlink(missing_ok=True)  # the path-keyed stamp of earlier versions
