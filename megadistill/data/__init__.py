"""Training data, from text to megatron-core datasets.

    text files ──corpus──► documents ──preprocess──► <prefix>.model|.tokenizer.json + <prefix>.bin/.idx
                                                       (+ <prefix>.manifest.json, checked by integrity)
    <prefix>.bin/.idx ──datasets──► megatron-core GPTDataset (train, valid)

- :mod:`~megadistill.data.corpus`: reading ``.txt``/``.jsonl`` documents, or the embedded corpus;
- :mod:`~megadistill.data.tokenizer`: the tokenizers (sentencepiece and Hugging Face), as
  megatron-core tokenizers;
- :mod:`~megadistill.data.preprocess`: training a sentencepiece model and writing Megatron's indexed
  dataset, atomically, with its manifest;
- :mod:`~megadistill.data.datasets`: megatron-core's ``GPTDataset``s for a run (rank 0 prepares,
  every rank reads);
- :mod:`~megadistill.data.integrity`: structure, manifest and token-id checks (``megadistill data verify``);
- :mod:`~megadistill.data.errors`: ``DataError``, the one error of this package.

The package's ``__init__`` imports nothing, so ``DataError`` or the integrity checks come without
megatron-core's import cost.
"""
