"""Tokenizer, preprocessing into Megatron's .bin/.idx, and megatron-core GPTDatasets over them."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch

# Megatron-core imported in the pytest parent: the forked ranks of run_distributed start at once.
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.tokenizers import MegatronTokenizerBase

from megadistill.data import corpus as data_corpus
from megadistill.data import preprocess as data_preprocess
from megadistill.data.tokenizer import SentencePieceTokenizer
from megadistill.data.datasets import build_gpt_datasets
from megadistill.data.corpus import embedded_corpus_text, read_documents
from megadistill.data.preprocess import preprocess, train_tokenizer
from megadistill.testing.distributed import run_distributed

SEQ = 64

TXT = "First paragraph,\n  indented line.\n\n\n   \nSecond: ünïcödé ✓\n\nThird\twith  tab  \n"
TXT_DOCS = ["First paragraph,\n  indented line.", "Second: ünïcödé ✓", "Third\twith  tab  "]
JSONL = (
    '{"text": "json one\\nwith a newline", "id": 1}\n'
    "\n"
    '{"text": "  json two  "}\n'
    '{"text": ""}\n'
    '{"text": "json three \\ud83d\\ude00", "meta": {"k": 1}}\n'
)
JSONL_DOCS = ["json one\nwith a newline", "  json two  ", "json three 😀"]


@pytest.fixture
def small_inputs(tmp_path):
    txt, jsonl = tmp_path / "a.txt", tmp_path / "b.jsonl"
    txt.write_text(TXT, encoding="utf-8")
    jsonl.write_text(JSONL, encoding="utf-8")
    return [txt, jsonl]


def _documents(prefix) -> list[list[int]]:
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


# --------------------------------------------------------------------------- tokenizer


def test_embedded_corpus_is_the_pydoc_topics():
    from pydoc_data.topics import topics

    text = embedded_corpus_text()
    assert len(text) > 400_000
    assert text == "\n\n".join(topics.values())
    assert data_corpus._embedded_documents() == list(topics.values())


def test_tokenizer_is_lossless_and_never_unknown(embedded_tokenizer):
    tok = embedded_tokenizer
    for text in ["  two leading spaces", "tab\there", "ünïcödé ✓ 😀 中文", "a  b\n\n   c \r\n", " x", "x ", ""]:
        ids = tok.tokenize(text)
        assert tok.detokenize(ids) == text
        assert 0 not in ids  # <unk>: byte fallback covers every character
        assert tok.eod not in ids
    assert tok.detokenize(torch.tensor(tok.tokenize("tensor ids"))) == "tensor ids"
    assert tok.detokenize(tok.tokenize("end") + [tok.eod]) == "end"


def test_tokenizer_fits_megatron(embedded_corpus, embedded_tokenizer):
    result, tok = embedded_corpus, embedded_tokenizer
    assert isinstance(tok, MegatronTokenizerBase)
    assert (tok.vocab_size, tok.eod) == (2048, 1)
    assert len(tok.vocab) == 2048
    # The cache key is the model's content, not its path.
    assert tok.unique_identifiers["model_sha256"] == SentencePieceTokenizer.load(result.tokenizer_model).sha256
    clone = pickle.loads(pickle.dumps(tok))  # DataLoader workers started with spawn pickle the dataset
    assert clone.tokenize("pickled text") == tok.tokenize("pickled text")


def test_train_tokenizer_is_deterministic(tmp_path):
    docs = data_corpus._embedded_documents()[:30]
    a = train_tokenizer(docs, tmp_path / "a", 512)
    b = train_tokenizer(iter(docs), tmp_path / "sub" / "b", 512)
    assert a == tmp_path / "a.model"
    assert a.read_bytes() == b.read_bytes()
    assert SentencePieceTokenizer(a).vocab_size == 512
    assert _files(tmp_path) == {"a.model", "sub"}  # no temporary files left behind


def test_train_tokenizer_rejects_bad_vocab_sizes(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 259"):
        train_tokenizer(["some text"], tmp_path / "t", 100)
    with pytest.raises(ValueError, match=r"could not train a vocabulary of 5000: .*Vocabulary size too high"):
        train_tokenizer(["a tiny corpus cannot fill a big vocabulary"], tmp_path / "t", 5000)
    with pytest.raises(ValueError, match="no documents"):
        train_tokenizer([], tmp_path / "t", 300)
    assert not (tmp_path / "t.model").exists()


# --------------------------------------------------------------------------- preprocessing


def test_preprocess_embedded_corpus(embedded_corpus, embedded_tokenizer):
    result, tok = embedded_corpus, embedded_tokenizer
    docs = data_corpus._embedded_documents()
    stored = _documents(result.prefix)
    assert result.num_documents == len(stored) == len(docs) == 79
    assert result.num_tokens == sum(map(len, stored))
    assert result.tokenizer_model == Path(f"{result.prefix}.model")
    for doc, ids in zip(docs, stored, strict=True):
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]  # exactly one EOD, appended
        assert ids[:-1] == tok.tokenize(doc)
        assert tok.detokenize(ids[:-1]) == doc  # byte-exact round trip, no normalisation
    # uint16 tokens for a 2048 vocabulary, as Megatron-LM's own preprocessing writes them.
    assert IndexedDataset(str(result.prefix)).index.dtype.__name__ == "uint16"
    assert Path(f"{result.prefix}.bin").stat().st_size == 2 * result.num_tokens


def test_preprocess_is_deterministic(embedded_corpus, tmp_path):
    first = embedded_corpus
    again = preprocess(None, tmp_path / "corpus", vocab_size=2048, progress=False)
    for ext in (".bin", ".idx", ".model"):
        assert Path(f"{again.prefix}{ext}").read_bytes() == Path(f"{first.prefix}{ext}").read_bytes()


def test_preprocess_txt_and_jsonl(embedded_tokenizer, small_inputs, tmp_path, capfd):
    tok = embedded_tokenizer
    assert list(read_documents(small_inputs)) == TXT_DOCS + JSONL_DOCS
    result = preprocess(small_inputs, tmp_path / "out" / "small", tokenizer_model=tok.model_path)
    assert "tokenizing" in capfd.readouterr().err  # the tqdm bar
    assert (result.num_documents, result.vocab_size) == (6, 2048)
    # The given tokenizer travels with the data.
    assert result.tokenizer_model.read_bytes() == tok.model_path.read_bytes()
    stored = _documents(result.prefix)
    assert result.num_tokens == sum(map(len, stored))
    for doc, ids in zip(TXT_DOCS + JSONL_DOCS, stored, strict=True):
        assert ids == tok.tokenize(doc) + [tok.eod]
        assert tok.detokenize(ids) == doc
    assert _files(tmp_path / "out") == {"small.bin", "small.idx", "small.model", "small.manifest.json"}


def test_preprocess_trains_on_the_inputs(tmp_path):
    text = tmp_path / "docs.txt"
    text.write_text(embedded_corpus_text()[:60_000], encoding="utf-8")
    result = preprocess([text], tmp_path / "docs", vocab_size=400, progress=False)
    tok = SentencePieceTokenizer(result.tokenizer_model)
    assert tok.vocab_size == result.vocab_size == 400
    docs = list(read_documents([text]))
    assert result.num_documents == len(docs) > 100  # one document per blank-line-separated block
    assert [tok.detokenize(ids[:-1]) for ids in _documents(result.prefix)] == docs


# --------------------------------------------------------------------------- input errors


def _write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


BAD_INPUTS = {
    "missing": (lambda d: d / "missing.txt", FileNotFoundError, "input file not found: {path}"),
    "dangling symlink": (lambda d: (d / "link.txt").symlink_to(d / "gone.txt") or d / "link.txt", FileNotFoundError, "{path}"),
    "empty": (lambda d: _write(d / "empty.txt", ""), ValueError, "input file {path} is empty"),
    "blank lines only": (lambda d: _write(d / "blank.txt", "\n  \n\t\n"), ValueError, "input file {path} contains no documents"),
    "directory": (lambda d: (d / "dir.txt").mkdir() or d / "dir.txt", ValueError, "input {path} is a directory"),
    "unsupported type": (lambda d: _write(d / "data.csv", "a,b\n"), ValueError, "input {path}: unsupported file type '.csv'"),
    "invalid utf-8": (lambda d: _write(d / "latin1.txt", b"fine\ncaf\xe9\n"), ValueError, "{path}, line 2: not valid UTF-8"),
    "bad json line": (lambda d: _write(d / "bad.jsonl", '{"text": "ok"}\n\n{"text": "unterminated\n'), ValueError, "{path}, line 3: not valid JSON"),
    "missing key": (lambda d: _write(d / "key.jsonl", '{"text": "ok"}\n{"body": "x", "id": 2}\n'), ValueError, "{path}, line 2: no key 'text' in the JSON object (keys: 'body', 'id')"),
    "non-string text": (lambda d: _write(d / "num.jsonl", '{"text": 3}\n'), ValueError, "{path}, line 1: 'text' must be a string, got int"),
    "not an object": (lambda d: _write(d / "list.jsonl", '["text"]\n'), ValueError, "{path}, line 1: expected a JSON object, got list"),
    "only empty texts": (lambda d: _write(d / "none.jsonl", '{"text": ""}\n'), ValueError, "input file {path} contains no documents"),
    "NUL characters": (lambda d: _write(d / "u16.txt", "ab\n".encode("utf-16-le")), ValueError, "{path}, line 1: contains NUL characters"),
    "lone surrogate": (lambda d: _write(d / "half.jsonl", '{"text": "\\ud83d"}\n'), ValueError, "{path}, line 1: 'text' is not valid Unicode"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_name_the_file(case, embedded_corpus, small_inputs, tmp_path):
    make, error, message = BAD_INPUTS[case]
    path = make(tmp_path)
    expected = re.escape(message.format(path=path))
    with pytest.raises(error, match=expected):
        list(read_documents([small_inputs[0], path]))
    # preprocess fails the same way and leaves no file (path errors: before creating the directory).
    with pytest.raises(error, match=expected):
        preprocess([small_inputs[0], path], tmp_path / "out" / "x", tokenizer_model=embedded_corpus.tokenizer_model, progress=False)
    assert not (tmp_path / "out").exists() or not _files(tmp_path / "out")


def test_bad_arguments(embedded_corpus, small_inputs, tmp_path):
    model = embedded_corpus.tokenizer_model
    with pytest.raises(ValueError, match="json_key must be a non-empty string"):
        read_documents(small_inputs, json_key="")
    with pytest.raises(ValueError, match="no input files"):
        preprocess([], tmp_path / "x")
    with pytest.raises(ValueError, match=re.escape(f"output_prefix {tmp_path / 'x.bin'} ends in .bin")):
        preprocess(small_inputs, tmp_path / "x.bin", tokenizer_model=model)
    with pytest.raises(ValueError, match="is a directory; give a file prefix inside it"):
        preprocess(small_inputs, tmp_path, tokenizer_model=model)
    with pytest.raises(FileNotFoundError, match=re.escape(f"tokenizer model not found: {tmp_path / 'no.model'}")):
        preprocess(small_inputs, tmp_path / "x", tokenizer_model=tmp_path / "no.model")
    not_a_model = _write(tmp_path / "text.model", "not a model")
    with pytest.raises(ValueError, match=re.escape(f"{not_a_model} is not a sentencepiece model")):
        preprocess(small_inputs, tmp_path / "x", tokenizer_model=not_a_model)
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 259"):
        preprocess(small_inputs, tmp_path / "x", vocab_size=64)
    assert _files(tmp_path) == {"a.txt", "b.jsonl", "text.model"}


def test_failed_preprocess_keeps_the_previous_dataset(embedded_corpus, small_inputs, tmp_path):
    model = embedded_corpus.tokenizer_model
    prefix = tmp_path / "out" / "data"
    preprocess(small_inputs, prefix, tokenizer_model=model, progress=False)
    before = {name: (tmp_path / "out" / name).read_bytes() for name in _files(tmp_path / "out")}
    # The bad line is only found while tokenizing, after the first file was written out.
    late = _write(tmp_path / "late.jsonl", '{"text": "fine"}\n' * 50 + "{oops\n")
    with pytest.raises(ValueError, match=re.escape(f"{late}, line 51: not valid JSON")):
        preprocess([small_inputs[0], late], prefix, tokenizer_model=model, progress=False)
    after = {name: (tmp_path / "out" / name).read_bytes() for name in _files(tmp_path / "out")}
    assert after == before  # no temporary files left behind either


@pytest.mark.parametrize("completed_moves", [0, 1, 2, 3])
def test_interrupted_commit_never_looks_complete(completed_moves, embedded_corpus, small_inputs, tmp_path, monkeypatch):
    """A run killed while moving its files into place leaves no .idx: the dataset reads as absent."""
    model = embedded_corpus.tokenizer_model
    prefix = tmp_path / "data"
    preprocess(small_inputs[:1], prefix, tokenizer_model=model, progress=False)
    real_replace, moves = os.replace, []

    def replace_then_die(src, dst):
        if len(moves) == completed_moves:
            raise KeyboardInterrupt("killed")
        moves.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(data_preprocess.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        preprocess(small_inputs, prefix, tokenizer_model=model, progress=False)
    monkeypatch.undo()
    assert not IndexedDataset.exists(str(prefix))
    assert not any(name.startswith(".") for name in _files(tmp_path))
    assert preprocess(small_inputs, prefix, tokenizer_model=model, progress=False).num_documents == 6


# --------------------------------------------------------------------------- datasets


def _build(result, tok, cache, seed=1234, split="90,10,0", num_samples=(300, 40)):
    return build_gpt_datasets(result.prefix, tok, SEQ, split, num_samples, seed, cache_dir=cache)


def _tokens(ds, n) -> torch.Tensor:
    return torch.stack([ds[i]["tokens"] for i in range(n)])


def _from_documents(sample_ids: list[int], documents: list[list[int]], eod: int) -> bool:
    """Whether each EOD-delimited piece of a sample is a contiguous run of one of ``documents``."""
    haystacks = ["," + ",".join(map(str, doc)) + "," for doc in documents]
    pieces, start = [], 0
    for i, t in enumerate(sample_ids):
        if t == eod:
            pieces.append(sample_ids[start : i + 1])
            start = i + 1
    pieces.append(sample_ids[start:])
    needles = ["," + ",".join(map(str, p)) + "," for p in pieces if p]
    return all(any(n in h for h in haystacks) for n in needles)


def test_gpt_dataset_samples(embedded_corpus, embedded_tokenizer, tmp_path):
    result, tok = embedded_corpus, embedded_tokenizer
    train, valid = _build(result, tok, tmp_path / "cache")
    assert len(train) >= 300 and len(valid) >= 40
    for ds in (train, valid):
        for i in (0, 1, len(ds) - 1):
            s = ds[i]
            assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}
            assert all(v.shape == (SEQ,) for v in s.values())
            assert (s["tokens"].dtype, s["labels"].dtype, s["position_ids"].dtype) == (torch.int64,) * 3
            assert s["loss_mask"].dtype == torch.float32 and bool((s["loss_mask"] == 1).all())
            assert torch.equal(s["labels"][:-1], s["tokens"][1:])  # next-token targets
            assert torch.equal(s["position_ids"], torch.arange(SEQ))
            assert int(s["tokens"].max()) < tok.vocab_size and int(s["tokens"].min()) >= 0


def test_train_and_valid_use_disjoint_documents(embedded_corpus, embedded_tokenizer, tmp_path):
    result, tok = embedded_corpus, embedded_tokenizer
    train, valid = _build(result, tok, tmp_path / "cache")
    # Megatron splits the documents into contiguous ranges: 90 % of 79 is documents 0..70.
    assert train.indices.tolist() == list(range(71)) and valid.indices.tolist() == list(range(71, 79))
    assert set(train.document_index.tolist()) == set(range(71))
    assert set(valid.document_index.tolist()) == set(range(71, 79))
    docs = _documents(result.prefix)
    for ds, own in ((train, docs[:71]), (valid, docs[71:])):
        for i in range(0, len(ds), max(1, len(ds) // 40)):
            s = ds[i]
            ids = s["tokens"].tolist() + s["labels"][-1:].tolist()
            assert _from_documents(ids, own, tok.eod)


def test_sample_order_is_deterministic(embedded_corpus, embedded_tokenizer, tmp_path):
    result, tok = embedded_corpus, embedded_tokenizer
    train_a, valid_a = _build(result, tok, tmp_path / "a")
    train_b, valid_b = _build(result, tok, tmp_path / "b")  # built afresh, not read from a's cache
    train_c, _ = _build(result, tok, tmp_path / "a")  # read from the cache
    assert torch.equal(_tokens(train_a, 50), _tokens(train_b, 50))
    assert torch.equal(_tokens(train_a, 50), _tokens(train_c, 50))
    assert torch.equal(_tokens(valid_a, 20), _tokens(valid_b, 20))
    train_d, _ = _build(result, tok, tmp_path / "a", seed=4321)
    assert not torch.equal(_tokens(train_a, 50), _tokens(train_d, 50))


def test_rewritten_data_never_reuses_a_stale_cache(embedded_corpus, embedded_tokenizer, small_inputs, tmp_path):
    result, tok = embedded_corpus, embedded_tokenizer
    prefix = tmp_path / "data"
    text = _write(tmp_path / "other.txt", "\n\n".join(data_corpus._embedded_documents()[:40]))
    first = preprocess(small_inputs + [text], prefix, tokenizer_model=tok.model_path, progress=False)
    _build(first, tok, tmp_path / "cache")
    second = preprocess([text], prefix, tokenizer_model=tok.model_path, progress=False)
    assert second.num_documents != first.num_documents
    stale, _ = _build(second, tok, tmp_path / "cache")
    fresh, _ = _build(second, tok, tmp_path / "fresh")
    assert torch.equal(_tokens(stale, len(fresh)), _tokens(fresh, len(fresh)))
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one index cache per .idx content


def test_dataset_argument_errors(embedded_corpus, embedded_tokenizer, small_inputs, tmp_path):
    result, tok = embedded_corpus, embedded_tokenizer
    with pytest.raises(FileNotFoundError, match=re.escape(f"dataset file not found: {tmp_path / 'none'}.bin")):
        build_gpt_datasets(tmp_path / "none", tok, SEQ, "90,10,0", (10, 10), 1)
    for split in ("-5,1", "90/10", "1e1,1", "1,2,3,4", ""):
        with pytest.raises(ValueError, match="split must be 1 to 3 comma-separated non-negative numbers"):
            _build(result, tok, tmp_path, split=split)
    with pytest.raises(ValueError, match="leaves no documents for training"):
        _build(result, tok, tmp_path, split="0,10,0")
    with pytest.raises(ValueError, match="seq_length must be a positive integer"):
        build_gpt_datasets(result.prefix, tok, 0, "90,10,0", (10, 10), 1)
    with pytest.raises(ValueError, match=r"num_samples must be \(train, valid\)"):
        build_gpt_datasets(result.prefix, tok, SEQ, "90,10,0", (10,), 1)

    small = preprocess(small_inputs, tmp_path / "small", tokenizer_model=tok.model_path, progress=False)
    # 99 % of 6 documents rounds to all 6: Megatron would loop forever on the empty valid split.
    with pytest.raises(ValueError, match="of the 6 documents in .* leaves the valid split without documents"):
        _build(small, tok, tmp_path / "cache", split="99,1,0")
    train, valid = _build(small, tok, tmp_path / "cache", split="100", num_samples=(20, 0))
    assert valid is None and len(train) >= 20  # 6 short documents repeated over epochs

    other = SentencePieceTokenizer(train_tokenizer(data_corpus._embedded_documents()[:20], tmp_path / "other", 400))
    with pytest.raises(ValueError, match="was written with the tokenizer .* not with .*other.model"):
        _build(result, other, tmp_path / "cache")


def _rank_samples(prefix: str, model: str, cache: str) -> dict:
    train, valid = build_gpt_datasets(prefix, SentencePieceTokenizer(model), SEQ, "90,10,0", (300, 40), 1234, cache_dir=cache)
    return {"train": _tokens(train, 32), "valid": _tokens(valid, 8)}


def test_two_ranks_build_identical_datasets(embedded_corpus, embedded_tokenizer, tmp_path):
    result, tok = embedded_corpus, embedded_tokenizer
    # A fresh cache: rank 0 builds the indices while rank 1 waits at Megatron's barrier, then reads them.
    ranks = run_distributed(_rank_samples, 2, str(result.prefix), str(result.tokenizer_model), str(tmp_path / "cache"))
    single = _rank_samples(str(result.prefix), str(result.tokenizer_model), str(tmp_path / "single"))
    for key in ("train", "valid"):
        assert torch.equal(ranks[0][key], ranks[1][key])
        assert torch.equal(ranks[0][key], single[key])


# --------------------------------------------------------------------------- the run's own corpus


def _run_corpus(tmp_path, inputs, tokenizer_model=None):
    """``prepare_data``'s preprocessing step for a run over ``inputs``; the corpus prefix."""
    from megadistill.config import DataConfig, RunConfig
    from megadistill.data.datasets import preprocess_if_stale

    cfg = RunConfig(output_dir=str(tmp_path / "run"),
                    data=DataConfig(inputs=[str(p) for p in inputs], tokenizer_model=tokenizer_model, vocab_size=300))
    prefix = str(tmp_path / "run" / "data" / "corpus")
    preprocess_if_stale(cfg, prefix, tokenizer_model)
    return prefix


@pytest.fixture
def count_preprocess(monkeypatch):
    from megadistill.data import datasets

    calls, real = [], datasets.preprocess
    monkeypatch.setattr(datasets, "preprocess", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def test_run_corpus_is_rebuilt_when_an_input_changes_in_place(embedded_corpus, embedded_tokenizer, tmp_path, count_preprocess):
    model = str(embedded_corpus.tokenizer_model)
    text = _write(tmp_path / "in.txt", "the first text\n\na second document")
    prefix = _run_corpus(tmp_path, [text], model)
    assert _run_corpus(tmp_path, [text], model) == prefix and len(count_preprocess) == 1  # unchanged: reused
    before = _documents(prefix)
    _write(text, "THE first text\n\na second document")  # same path, same size, other content
    _run_corpus(tmp_path, [text], model)
    assert len(count_preprocess) == 2
    assert _documents(prefix) != before
    assert _documents(prefix)[0] == embedded_tokenizer.tokenize("THE first text") + [embedded_tokenizer.eod]


def test_run_corpus_is_rebuilt_when_its_tokenizer_changes_in_place(embedded_corpus, tmp_path, count_preprocess):
    model = _write(tmp_path / "tok.model", embedded_corpus.tokenizer_model.read_bytes())
    text = _write(tmp_path / "in.txt", "some text\n\nmore text")
    prefix = _run_corpus(tmp_path, [text], str(model))
    other = train_tokenizer(data_corpus._embedded_documents()[:20], tmp_path / "other", 400)
    model.write_bytes(other.read_bytes())  # same path, another tokenizer
    _run_corpus(tmp_path, [text], str(model))
    assert len(count_preprocess) == 2
    assert Path(f"{prefix}.model").read_bytes() == other.read_bytes()
    assert _documents(prefix)[0] == SentencePieceTokenizer(other).tokenize("some text") + [1]
