"""Hugging Face tokenizers (``data.tokenizer_type: huggingface``): encoding as ``transformers``
encodes, a lossless round trip for byte-level BPE, the end-of-document token, the content hash;
preprocessing with one; Megatron data written with one (no manifest) read unchanged; and the
config and preflight errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megadistill.config import ConfigError, DataConfig, RunConfig, validate
from megadistill.data.datasets import build_gpt_datasets
from megadistill.data.corpus import embedded_corpus_text
from megadistill.data.preprocess import preprocess
from megadistill.data.errors import DataError
from megadistill.hashing import file_sha256
from megadistill.data.integrity import verify
from megadistill.data.tokenizer import HuggingFaceTokenizer, load_tokenizer, tokenizer_file

TEXT = embedded_corpus_text()[:30_000]


def _train(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "</s>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return tok


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer directory as save_pretrained writes it: tokenizer.json, and a
    tokenizer_config.json whose eos_token is <|endoftext|> (where the candidates list prefers no other)."""
    d = tmp_path_factory.mktemp("tok")
    _train().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


def test_encoding_round_trip_vocabulary_eod_and_hash(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir, "huggingface")
    text = "def f(x):\n    return x  # naïve → ✓\n\n\ttabs and  spaces"
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text  # byte-level BPE: lossless, whitespace and Unicode kept
    assert tok.vocab_size == 400 and all(0 <= i < 400 for i in ids)
    assert tok.eod == tok.vocab["</s>"] and tok.eod not in ids  # named by tokenizer_config.json
    assert tok.sha256 == file_sha256(tokenizer_dir / "tokenizer.json") == file_sha256(tok.model_path)
    # The tokenizer.json alone: no config beside it names the eos, the usual end-of-text token is taken.
    alone = tokenizer_dir.parent / "alone.json"
    alone.write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    assert HuggingFaceTokenizer(alone).eod == tok.vocab["<|endoftext|>"]
    assert load_tokenizer(alone, "huggingface").sha256 == tok.sha256  # identity is the content, not the eos choice


def test_encoding_equals_transformers(tokenizer_dir):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[dev]')")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ours = load_tokenizer(tokenizer_dir, "huggingface")
    for doc in TEXT.split("\n\n")[:50]:
        assert ours.tokenize(doc) == theirs(doc, add_special_tokens=False)["input_ids"]
    assert ours.eod == theirs.eos_token_id


def test_bad_tokenizers_are_named(tmp_path, tokenizer_dir):
    with pytest.raises(DataError, match="holds no tokenizer.json"):
        tokenizer_file(tmp_path, "huggingface")
    with pytest.raises(DataError, match="use tokenizer type huggingface"):
        tokenizer_file(tokenizer_dir, "sentencepiece")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json is not a Hugging Face tokenizer.json"):
        load_tokenizer(bad, "huggingface")
    from tokenizers import Tokenizer, models

    bare = tmp_path / "bare.json"
    Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(bare))
    with pytest.raises(DataError, match="cannot tell its end-of-document token"):
        load_tokenizer(bare, "huggingface")


def test_preprocess_with_a_hugging_face_tokenizer(tmp_path, tokenizer_dir):
    (tmp_path / "a.txt").write_text(TEXT)
    r = preprocess([tmp_path / "a.txt"], tmp_path / "data" / "corpus", tokenizer_model=tokenizer_dir,
                   tokenizer_type="huggingface", progress=False)
    tok = load_tokenizer(tokenizer_dir, "huggingface")
    assert r.tokenizer_model == tmp_path / "data" / "corpus.tokenizer.json" and r.vocab_size == 400
    manifest = json.loads((tmp_path / "data" / "corpus.manifest.json").read_text())
    assert set(manifest["files"]) == {".bin", ".idx", ".tokenizer.json"}
    assert manifest["recipe"]["tokenizer_sha256"] == tok.sha256 and manifest["recipe"]["eod"] == tok.eod
    report = verify(r.prefix)  # finds the .tokenizer.json beside the data and checks ids against it
    assert report.ids_checked and report.vocab_size == 400
    # The same from the command line: preprocess, then data verify against the tokenizer directory.
    from megadistill import cli

    assert cli.main(["preprocess", "--input", str(tmp_path / "a.txt"), "--output-prefix", str(tmp_path / "cli" / "c"),
                     "--tokenizer-model", str(tokenizer_dir), "--tokenizer-type", "huggingface"]) == 0
    assert (tmp_path / "cli" / "c.bin").read_bytes() == (tmp_path / "data" / "corpus.bin").read_bytes()
    assert cli.main(["data", "verify", str(tmp_path / "cli" / "c"), "--tokenizer-model", str(tokenizer_dir)]) == 0
    train, _ = build_gpt_datasets(r.prefix, tok, 32, "90,10,0", (8, 2), seed=1, cache_dir=tmp_path / "cache")
    assert len(train) >= 8 and train[0]["tokens"].shape == (32,)
    # The documents are the tokenizer's ids followed by eod, as with sentencepiece.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    documents = IndexedDataset(str(r.prefix))  # kept alive: items are views of its memory map
    assert documents[0].tolist() == tok.tokenize(TEXT.split("\n\n")[0]) + [tok.eod]
    # Another tokenizer with the same vocabulary size is not taken for the one the data was made with.
    other = tmp_path / "other"
    other.mkdir()
    _train(400).save(str(other / "tokenizer.json"))
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"</s>"', '"</z>"'))
    with pytest.raises(DataError, match="was written with the tokenizer"):
        build_gpt_datasets(r.prefix, load_tokenizer(other / "tokenizer.json", "huggingface"), 32, "90,10,0", (8, 2),
                           seed=1, cache_dir=tmp_path / "cache")


def test_megatron_data_made_with_a_hugging_face_tokenizer_reads_unchanged(tmp_path, tokenizer_dir):
    """Data from Megatron-LM's tools (no manifest, no tokenizer beside it) is checked against the
    given tokenizer's vocabulary and read by megatron-core's GPTDataset."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tok = load_tokenizer(tokenizer_dir, "huggingface")
    prefix = str(tmp_path / "megatron_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(tok.vocab_size))
    for doc in TEXT.split("\n\n")[:40]:
        builder.add_item(torch.tensor(tok.tokenize(doc) + [tok.eod]))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    report = verify(prefix, tokenizer_dir, tokenizer_type="huggingface")
    assert not report.manifest and report.ids_checked and report.vocab_size == 400
    train, valid = build_gpt_datasets(prefix, tok, 16, "90,10,0", (4, 2), seed=1, cache_dir=tmp_path / "cache")
    assert len(train) >= 4 and valid is not None
    small = tmp_path / "small"
    small.mkdir()
    _train(300).save(str(small / "tokenizer.json"))
    with pytest.raises(DataError, match="not below the vocabulary size 300"):
        verify(prefix, small / "tokenizer.json")  # a .json file: read as a Hugging Face tokenizer


def test_config_and_preflight_name_the_key(tmp_path, tokenizer_dir):
    from megadistill.data.tokenizer import tokenizer_vocab_size
    from megadistill.preflight import preflight, tokenizer_sha256

    with pytest.raises(ConfigError, match="data.tokenizer_type: 'tiktoken' is not one of"):
        validate(RunConfig(data=DataConfig(tokenizer_type="tiktoken", tokenizer_model=str(tokenizer_dir))))
    with pytest.raises(ConfigError, match="data.tokenizer_type huggingface needs data.tokenizer_model"):
        validate(RunConfig(data=DataConfig(tokenizer_type="huggingface")))
    cfg = RunConfig(data=DataConfig(tokenizer_type="huggingface", tokenizer_model=str(tokenizer_dir)))
    validate(cfg)
    preflight(cfg)
    assert tokenizer_vocab_size(cfg.data.tokenizer_model, cfg.data.tokenizer_type) == 400
    assert tokenizer_sha256(cfg) == file_sha256(tokenizer_dir / "tokenizer.json")
    with pytest.raises(ConfigError, match=r"data.tokenizer_model .*holds no tokenizer.json"):
        preflight(RunConfig(data=DataConfig(tokenizer_type="huggingface", tokenizer_model=str(tmp_path))))
    with pytest.raises(ConfigError, match="set data.tokenizer_type huggingface"):
        preflight(RunConfig(data=DataConfig(tokenizer_model=str(tokenizer_dir))))
