"""Hugging Face teachers and tokenizers.

- :mod:`megadistill.hf.convert`: a Hugging Face Llama / Qwen2 / Mistral checkpoint (``config.json``
  + safetensors) -> a megadistill teacher checkpoint of the equivalent megatron-core ``GPTModel``
  (``megadistill convert-hf``);
- :mod:`megadistill.hf.tokenizer`: the tokenizer interface (sentencepiece | huggingface) that
  preprocessing and training use (``data.tokenizer_type``).

Nothing here is imported by ``import megadistill.hf``: the modules pull in torch, megatron-core
or ``tokenizers`` only when used.
"""
