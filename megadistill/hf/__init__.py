"""Hugging Face models in and out: a Hugging Face Llama (3.x included) / Qwen2 / Qwen3 / Mistral
checkpoint (``config.json`` + safetensors) -> a megadistill teacher checkpoint of the equivalent
megatron-core ``GPTModel`` (``megadistill convert-hf``), and a trained student -> a Hugging Face
model directory (``megadistill export-hf``).

In (``convert-hf``):

- :mod:`megadistill.hf.convert`: the command's steps and the checkpoint + ``teacher.yaml`` it writes;
- :mod:`megadistill.hf.read`: the checkpoint directory (``config.json``, where each tensor is);
- :mod:`megadistill.hf.architecture`: ``config.json`` -> ``teacher.model`` (a ``ModelConfig``);
- :mod:`megadistill.hf.rope`: the RoPE settings of ``config.json``, read as ``transformers`` reads them;
- :mod:`megadistill.hf.weights`: Hugging Face tensors -> megatron-core's (QKV and gate/up fusion, names).

Out (``export-hf``):

- :mod:`megadistill.hf.export`: the command's steps, the sharded safetensors and the sidecar file;
- :mod:`megadistill.hf.student`: the student checkpoint (either backend), its marker and tokenizer;
- :mod:`megadistill.hf.hf_config`: ``model`` (a ``ModelConfig``) -> ``config.json``, or a refusal;
- :mod:`megadistill.hf.export_weights`: megatron-core tensors -> Hugging Face's;
- :mod:`megadistill.hf.tokenizer`: the run's tokenizer as ``AutoTokenizer`` loads it.

Both: :mod:`megadistill.hf.output` (the ``--output`` path), :mod:`megadistill.hf.errors`
(``ConversionError``, ``ExportError``).

Nothing here is imported by ``import megadistill.hf``: the modules pull in torch, megatron-core
or ``safetensors`` only when used.
"""
