"""Hugging Face teachers: a Hugging Face Llama / Qwen2 / Mistral checkpoint (``config.json`` +
safetensors) -> a megadistill teacher checkpoint of the equivalent megatron-core ``GPTModel``
(``megadistill convert-hf``).

- :mod:`megadistill.hf.convert`: the command's steps and the checkpoint + ``teacher.yaml`` it writes;
- :mod:`megadistill.hf.read`: the checkpoint directory (``config.json``, where each tensor is);
- :mod:`megadistill.hf.architecture`: ``config.json`` -> ``teacher.model`` (a ``ModelConfig``);
- :mod:`megadistill.hf.rope`: the RoPE settings of ``config.json``, read as ``transformers`` reads them;
- :mod:`megadistill.hf.weights`: Hugging Face tensors -> megatron-core's (QKV and gate/up fusion, names);
- :mod:`megadistill.hf.errors`: ``ConversionError``.

Nothing here is imported by ``import megadistill.hf``: the modules pull in torch, megatron-core
or ``safetensors`` only when used.
"""
