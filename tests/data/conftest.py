import pytest

from megadistill.data.preprocess import PreprocessResult, preprocess
from megadistill.data.tokenizer import SentencePieceTokenizer


@pytest.fixture(scope="module")
def embedded_corpus(tmp_path_factory) -> PreprocessResult:
    """The whole embedded corpus preprocessed once per module (79 documents, uint16 tokens, a
    2048-piece tokenizer)."""
    return preprocess(None, tmp_path_factory.mktemp("corpus") / "corpus", vocab_size=2048, progress=False)


@pytest.fixture(scope="module")
def embedded_tokenizer(embedded_corpus) -> SentencePieceTokenizer:
    """``embedded_corpus``'s tokenizer."""
    return SentencePieceTokenizer(embedded_corpus.tokenizer_model)
