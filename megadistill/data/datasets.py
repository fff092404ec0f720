"""A run's data: the tokenizer and megatron-core's train/valid ``GPTDataset``s.

Reading uses megatron-core's ``GPTDataset`` through ``BlendedMegatronDatasetBuilder``, so data
preprocessed by Megatron-LM's tools works here unchanged. For a run, rank 0 first makes sure the
data can be trained on (:func:`prepare_data`): with ``data.inputs`` (or the embedded corpus) it
preprocesses the text into the run's directory, unless a corpus made from the same content is
there and intact; with ``data.data_prefix`` it verifies the given files. A problem found there is
raised as ``DataError`` on every rank, so the command line exits with a one-line message.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Optional, Union

import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megadistill.config.schema import data_seed, train_dataset_samples
from megadistill.config.validate import check_split as _check_split
from megadistill.data import integrity as data_integrity
from megadistill.data.errors import DataError
from megadistill.data.preprocess import corpus_recipe, preprocess
from megadistill.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer, load_tokenizer

PathLike = Union[str, Path]


def _idx_fingerprint(idx_path: str) -> str:
    """Hash of the ``.idx``: the sample indices Megatron caches depend on the document lengths it
    holds (and on the config, which Megatron hashes itself), not on the ``.bin``."""
    digest = hashlib.blake2b(digest_size=8)
    with open(idx_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_gpt_datasets(
    data_prefix: PathLike,
    tokenizer: SentencePieceTokenizer,
    seq_length: int,
    split: str,
    num_samples: tuple[int, int],
    seed: int,
    cache_dir: Optional[PathLike] = None,
) -> tuple[GPTDataset, Optional[GPTDataset]]:
    """Megatron-core GPTDatasets (train, valid) over ``<data_prefix>.bin/.idx``.

    ``split`` ("train,valid[,test]" weights, e.g. "90,10,0") divides the *documents* into contiguous
    ranges, train first, as Megatron does; valid is None when its weight is 0. Each dataset has at
    least ``num_samples`` (train, valid) samples, repeating its documents over epochs as needed.
    A sample is a dict of ``[seq_length]`` tensors: ``tokens``, ``labels`` (int64, the tokens shifted
    by one), ``loss_mask`` (float32, all ones: ``eod`` is a target too) and ``position_ids`` (int64,
    ``0..seq_length-1``). No attention mask: the model uses its causal mask. The sample order is a
    function of ``seed`` only.

    The ``.bin/.idx`` structure is checked first (``data_integrity.check_index``: reads the
    ``.idx`` only); a damaged file raises ``DataError`` naming it.

    Megatron caches each dataset's sample indices under ``cache_dir`` (default
    ``<data_prefix>.cache``), in a subdirectory named after a hash of the ``.idx``, so rewriting the
    data never reuses indices of the old data. Under ``torch.distributed``, every rank must call
    this (Megatron's builder has barriers): rank 0 builds the indices, the others then read them,
    so ``cache_dir`` must be on a file system all ranks share. Works without a process group too.
    """
    prefix = str(data_prefix)  # Megatron appends ".bin"/".idx" to a str prefix
    for ext in (".bin", ".idx"):
        if not Path(prefix + ext).is_file():
            raise FileNotFoundError(f"dataset file not found: {prefix + ext}")
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"seq_length must be a positive integer, got {seq_length!r}")
    if len(num_samples) != 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be (train, valid) non-negative integers, got {num_samples!r}")
    split = _check_split(split)

    # The data must have been written with this tokenizer; only our own layout records which one.
    sibling = Path(prefix + getattr(tokenizer, "DATA_SUFFIX", ".model"))
    sha = getattr(tokenizer, "sha256", None)
    if sha is not None and sibling.is_file() and hashlib.sha256(sibling.read_bytes()).hexdigest() != sha:
        raise DataError(
            f"{prefix}.bin was written with the tokenizer {sibling}, not with {tokenizer.model_path} "
            f"(the models differ): token ids would be misread"
        )

    # Megatron reads a truncated or corrupt .bin/.idx without complaint (or fails with bare numpy
    # errors): every rank checks the structure first. The reads are the .idx's, not the tokens'.
    # GPTDataset splits by sequence; ours are one per document, as in Megatron-LM's text preprocessing.
    num_documents = data_integrity.check_index(prefix, full=True).num_sequences

    # Megatron's builder gives a split with no document an empty index and then loops forever
    # looking for tokens, so refuse such splits here, with the same arithmetic as the builder.
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for name, bounds in zip(("train", "valid", "test"), matrix):
        if bounds is not None and round(bounds[0] * num_documents) == round(bounds[1] * num_documents):
            raise DataError(
                f"split {split!r} of the {num_documents} documents in {prefix} leaves the {name} split "
                f"without documents; use more documents or a larger {name} weight"
            )

    cache = Path(cache_dir) if cache_dir is not None else Path(prefix + ".cache")
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split=split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(cache / f"idx-{_idx_fingerprint(prefix + '.idx')}"),
    )
    # Every rank builds its own (cheap, memory-mapped) datasets; the test split, if any, gets one epoch.
    train, valid, _test = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples[0], num_samples[1], None], lambda: True, config
    ).build()
    return train, valid


def prepare_data(cfg):
    """``(tokenizer, train_ds, valid_ds, tokenizer_path)`` for run ``cfg`` (collective)."""
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
    # Validation always reads the first eval_steps global batches: building exactly that many makes
    # the validation samples independent of the run's length (Megatron shuffles over all epochs).
    num_samples = (train_dataset_samples(cfg), cfg.training.eval_steps * cfg.data.global_batch_size)
    train_ds, valid_ds = build_gpt_datasets(
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
    d = cfg.data
    given = load_tokenizer(tokenizer_model, d.tokenizer_type) if tokenizer_model else None
    hf_eod = given.eod if isinstance(given, HuggingFaceTokenizer) else None
    wanted = corpus_recipe(d.inputs, d.json_key, d.vocab_size, given.sha256 if given else None, hf_eod=hf_eod)
    if Path(prefix + ".idx").is_file():  # else absent, or an interrupted commit
        try:
            found = data_integrity.read_manifest(prefix)
            if found is not None and found.get("recipe") == wanted:
                data_integrity.verify(prefix, hash_limit=data_integrity.HASH_AT_START_BYTES)
                return
        except (DataError, FileNotFoundError) as e:
            print(f"megadistill: {e}; preprocessing again", file=sys.stderr)
    preprocess(d.inputs, prefix, vocab_size=d.vocab_size, tokenizer_model=tokenizer_model, json_key=d.json_key,
                    tokenizer_type=d.tokenizer_type)
    Path(prefix + ".recipe.json").unlink(missing_ok=True)  # the path-keyed stamp of earlier versions
