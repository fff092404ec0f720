"""A GPT model's whole state dict: every tensor at full size (TP = 1, one pipeline stage) under
megatron-core's local-spec names, the form a model leaves megadistill in (``export-hf``).

Two sources:

- :func:`load_full_state` reads a megatron-core distributed checkpoint (the Megatron backend's, or a
  teacher's), saved at any TP/PP: a TP = 1 model loads it resharded, as a teacher loads;
- :func:`merge_tensor_parallel` joins the per-rank state dicts of another engine that kept
  megatron-core's TP shards as they are (the DeepSpeed backend), after :func:`local_names` has put
  Transformer Engine's fused names back to the local spec's.

How megatron-core splits a GPT over ``T`` tensor-parallel ranks (``[out, in]`` weights):

- along dim 0 (column parallel): ``embedding.word_embeddings.weight`` and ``output_layer.weight``
  (vocabulary rows), ``linear_qkv`` (whole query groups: each rank's rows are its groups in the
  grouped [q..., k, v] layout) and ``linear_fc1`` weight and bias. A gated ``linear_fc1`` holds
  ``[gate_r; up_r]`` on rank ``r``, so the full one is ``[gate_0 .. gate_T-1; up_0 .. up_T-1]``;
- along dim 1 (row parallel): ``linear_proj.weight``, ``linear_fc2.weight``;
- replicated: norms (``*layernorm*``), and the biases of the row-parallel layers (added after the
  reduction). Rank 0's copy is taken: every rank applies the same all-reduced update to them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from megadistill.config import ModelConfig

_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias")
_GATED = ("linear_fc1.weight", "linear_fc1.bias")
_COLUMNS = ("linear_proj.weight", "linear_fc2.weight")

# Transformer Engine's fused layer-norm + linear modules hold the norm before the linear layer.
_TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def load_full_state(checkpoint: str | Path, model: ModelConfig, seq_length: int) -> dict[str, torch.Tensor]:
    """The weights of the megatron-core distributed checkpoint ``checkpoint`` (a GPT of architecture
    ``model``, written at any TP/PP, by the Megatron backend or as a teacher) as one state dict:
    name -> tensor, full size, in the dtype the checkpoint holds them in (``model.precision``),
    the vocabulary rows as saved (padded). Needs a one-rank process group with megatron-core's
    parallel state at TP = PP = 1 (``megadistill.megatron.one_process``)."""
    from dataclasses import replace

    from megadistill.config import CHECKPOINT_MODEL_PREFIX, DataConfig, RunConfig
    from megadistill.megatron.gpt import build_gpt
    from megadistill.megatron.teacher import checkpoint_vocab_size, load_teacher_checkpoint

    # The local spec: its names are the ones this module returns; a checkpoint written with
    # Transformer Engine layers has the same sharded names.
    built = replace(model, transformer_impl="local")
    cfg = RunConfig(model=built, data=DataConfig(seq_length=seq_length))
    rows = checkpoint_vocab_size(checkpoint, CHECKPOINT_MODEL_PREFIX)
    gpt = load_teacher_checkpoint(build_gpt(cfg.model, cfg, rows), checkpoint, CHECKPOINT_MODEL_PREFIX)
    return {k: v.detach() for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}


def local_names(state: dict) -> dict[str, torch.Tensor]:
    """``state`` (one rank's GPT state dict) under the local spec's names: Transformer Engine's fused
    norm names renamed, its ``_extra_state`` entries (and any other non-tensor) dropped."""
    import torch

    out = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or name.endswith("_extra_state"):
            continue
        for fused, local in _TE_NAMES.items():
            if name.endswith(fused):
                name = name[: -len(fused)] + local
                break
        out[name] = value
    return out


def merge_tensor_parallel(shards: list[dict], gated: bool) -> dict[str, torch.Tensor]:
    """The full state dict of the per-rank GPT state dicts ``shards`` (tensor-parallel rank order,
    local-spec names); ``gated``: the MLP is a gated unit (``model.activation`` swiglu). See the
    module docstring for where each tensor is split. Raises ``ValueError`` for ranks holding
    different names."""
    import torch

    names = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(names):
            differ = sorted(set(shard) ^ set(names))
            raise ValueError(f"tensor-parallel rank {rank} holds other tensors than rank 0: {', '.join(differ[:6])}")
    if len(shards) == 1:
        return dict(shards[0])
    out = {}
    for name in names:
        parts = [shard[name] for shard in shards]
        if name.endswith(_GATED) and gated:
            halves = [p.chunk(2, dim=0) for p in parts]  # rank r: [gate_r; up_r]
            out[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        elif name.endswith(_ROWS + _GATED):
            out[name] = torch.cat(parts, dim=0)
        elif name.endswith(_COLUMNS):
            out[name] = torch.cat(parts, dim=1)
        else:
            out[name] = parts[0]
    return out
