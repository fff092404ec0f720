"""Hugging Face Llama / Qwen2 / Mistral checkpoints -> megadistill teacher checkpoints.

``megadistill convert-hf PATH --output DIR`` reads a Hugging Face checkpoint directory
(``config.json`` and ``model.safetensors``, or shards listed by ``model.safetensors.index.json``)
and writes the equivalent megatron-core ``GPTModel`` as a teacher checkpoint, the layout training
writes: ``DIR/step_00000000/`` is a complete megatron-core distributed checkpoint with its
``COMPLETE`` marker (file checksums, the ``teacher.model`` architecture and the tokenizer's
SHA-256, which a run checks its ``teacher.model`` and tokenizer against), so ``teacher.checkpoint:
DIR`` loads it resharded at any TP/PP. ``DIR/teacher.yaml`` holds the matching ``teacher`` block
and ``data.tokenizer_*`` lines.

The mapping, per layer (``h`` hidden size, ``nq`` query heads, ``ng`` key/value heads, ``d`` head
dimension, ``f`` MLP size; Hugging Face ``nn.Linear`` weights are ``[out, in]``, as megatron-core's):

- ``self_attn.{q,k,v}_proj.weight`` ``[nq·d, h]``, ``[ng·d, h]``, ``[ng·d, h]`` ->
  ``self_attention.linear_qkv.weight`` ``[(nq + 2·ng)·d, h]`` in megatron-core's grouped layout:
  per key/value group ``g``, its ``nq/ng`` query heads, then key ``g``, then value ``g`` (Hugging
  Face's ``repeat_kv`` gives query head ``i`` the key/value head ``i // (nq/ng)``); Qwen2's
  ``{q,k,v}_proj.bias`` likewise into ``linear_qkv.bias``;
- ``self_attn.o_proj.weight`` ``[h, nq·d]`` -> ``self_attention.linear_proj.weight``;
- ``mlp.{gate,up}_proj.weight`` ``[f, h]`` each -> ``mlp.linear_fc1.weight`` ``[2·f, h]`` (gate
  first: megatron-core's gated unit computes ``silu(first half) * second half``);
  ``mlp.down_proj.weight`` ``[h, f]`` -> ``mlp.linear_fc2.weight``;
- ``input_layernorm`` / ``post_attention_layernorm`` ``[h]`` -> ``input_layernorm`` /
  ``pre_mlp_layernorm`` (RMSNorm; saved under the fused names ``linear_qkv.layer_norm_weight`` /
  ``linear_fc1.layer_norm_weight`` by megatron-core's sharded state dict);
- ``model.embed_tokens.weight`` ``[V, h]`` -> ``embedding.word_embeddings.weight`` and
  ``lm_head.weight`` -> ``output_layer.weight`` (tied models have none), ``model.norm`` ->
  ``decoder.final_layernorm``.

Rotary embeddings need no permutation: Hugging Face's Llama-family checkpoints rotate the two
halves of each head (``rotate_half``), as megatron-core's non-interleaved RoPE does.

Vocabulary: the embedding and output layer get ``padded_vocab_size(V_tok, T, D)`` rows, the padded
vocabulary of a run whose tokenizer has ``V_tok`` ids, ``make_vocab_size_divisible_by: D`` and TP
``T`` (what the student builds: the shapes must agree, and a teacher's vocabulary check is exact).
Rows past the model's ``vocab_size`` are zero (megatron-core's own padding when it reshards a
vocabulary); rows past the padded size, which the tokenizer never produces (Qwen2 pads its
embedding beyond its tokenizer), are dropped.

What cannot be mapped is refused with a ``ConversionError`` naming the file and key: an unknown
``model_type``, RoPE scaling (``rope_scaling`` / ``rope_parameters.rope_type`` other than
default), partial rotary, another activation than SiLU, a ``head_dim`` other than
``hidden_size / num_attention_heads``, biases megatron-core cannot place (Llama's
``attention_bias`` without ``mlp_bias``, or the reverse), a tied model that ships a different
``lm_head``, an untied one without it, tensors missing or of the wrong shape, and tensors the
mapping does not know. A sliding window that is in use caps ``max_position_embeddings`` at the
window: up to that length sliding-window attention equals full causal attention, and a longer
``data.seq_length`` is refused by the config check.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from megadistill.config import ConfigError, ModelConfig, padded_vocab_size, to_dict

if TYPE_CHECKING:
    import torch

PathLike = Union[str, Path]

MODEL_TYPES = ("llama", "qwen2", "mistral")
"""``config.json`` ``model_type`` values the converter maps (``--model-type``)."""

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SNIPPET_FILE = "teacher.yaml"

_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
# Buffers some older checkpoints saved next to the weights; recomputed by megatron-core's RoPE.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ConfigError):
    """A Hugging Face checkpoint that cannot be converted, naming the file and key."""


# --------------------------------------------------------------------------- reading


@dataclass
class HFCheckpoint:
    """A Hugging Face checkpoint directory: its ``config.json`` and where each tensor is."""

    directory: Path
    config: dict
    """``config.json`` as a dict."""
    weight_map: dict
    """Tensor name -> safetensors file (under ``directory``)."""

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read from its safetensors file."""
        from safetensors import safe_open

        file = self.directory / self.weight_map[name]
        try:
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as err:  # safetensors raises its own SafetensorError (not an OSError)
            raise ConversionError(f"{file}: cannot read tensor {name} ({err})") from err

    def shape(self, name: str) -> tuple:
        from safetensors import safe_open

        with safe_open(str(self.directory / self.weight_map[name]), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())


def read_checkpoint(path: PathLike) -> HFCheckpoint:
    """Read ``config.json`` and the tensor index of the Hugging Face checkpoint directory ``path``
    (``model.safetensors``, or the shards ``model.safetensors.index.json`` lists)."""
    from safetensors import safe_open

    d = Path(path)
    if not d.is_dir():
        raise ConversionError(f"{d} is not a Hugging Face checkpoint directory (config.json + safetensors)")
    config = _read_json(d / CONFIG_FILE)
    if (d / SAFETENSORS_INDEX).is_file():
        index = _read_json(d / SAFETENSORS_INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{d / SAFETENSORS_INDEX}: no weight_map")
        for file in sorted(set(weight_map.values())):
            if not (d / file).is_file():
                raise ConversionError(f"{d / SAFETENSORS_INDEX} lists {file}, which is missing from {d}")
    elif (d / SAFETENSORS_FILE).is_file():
        try:
            with safe_open(str(d / SAFETENSORS_FILE), framework="pt") as f:
                weight_map = {k: SAFETENSORS_FILE for k in f.keys()}
        except Exception as err:
            raise ConversionError(f"{d / SAFETENSORS_FILE} is not a safetensors file ({err})") from err
    else:
        others = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
        hint = f" ({', '.join(others[:3])} found: re-save it with save_pretrained(safe_serialization=True))" if others else ""
        raise ConversionError(f"{d} holds neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}{hint}")
    return HFCheckpoint(d, config, weight_map)


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise ConversionError(f"{file} does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise ConversionError(f"{file} is not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConversionError(f"{file} is not a JSON object")
    return data


# --------------------------------------------------------------------------- config


@dataclass
class TeacherArchitecture:
    """What ``config.json`` maps to."""

    model: ModelConfig
    """``teacher.model`` (``make_vocab_size_divisible_by`` set by :func:`convert`)."""
    model_type: str
    hf_vocab_size: int
    """Rows of the Hugging Face embedding (``config.json`` ``vocab_size``)."""
    tied: bool
    notes: list
    """What the mapping changed or capped, for the snippet's comments."""


def model_config(config: dict, model_type: Optional[str] = None, where: str = CONFIG_FILE) -> TeacherArchitecture:
    """Map a Hugging Face ``config.json`` (a dict; ``where`` names it in errors) onto a
    ``ModelConfig``. ``model_type`` (``--model-type``) must agree with the file's when both are given."""

    def need(key: str, kind=int):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConversionError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")
        return value

    found = config.get("model_type")
    if model_type is not None and found is not None and found != model_type:
        raise ConversionError(f"{where}: model_type is {found!r}, not the {model_type!r} asked for (--model-type)")
    kind = model_type or found
    if kind not in MODEL_TYPES:
        raise ConversionError(f"{where}: model_type {kind!r} is not one the converter maps ({', '.join(MODEL_TYPES)}); "
                              "give --model-type for a llama-shaped model of another name")
    hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
    groups = config.get("num_key_value_heads") or heads
    if heads % groups:
        raise ConversionError(f"{where}: num_key_value_heads {groups} does not divide num_attention_heads {heads}")
    if hidden % heads:
        raise ConversionError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise ConversionError(f"{where}: head_dim {head_dim} differs from hidden_size / num_attention_heads = "
                              f"{hidden // heads}, which megatron-core's attention assumes")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{where}: hidden_act {act!r} is not silu (megatron-core's SwiGLU here)")
    notes = []
    theta = _rope_theta(config, where)
    max_pos = need("max_position_embeddings")
    window = _used_sliding_window(config, kind)
    if window is not None and window < max_pos:
        notes.append(f"sliding_window {window} is in use: max_position_embeddings capped at {window} (up to that length "
                     "sliding-window attention is full causal attention)")
        max_pos = window
    qkv_bias, linear_bias = _biases(config, kind, where)
    tied = bool(config.get("tie_word_embeddings", False))
    model = ModelConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
        ffn_hidden_size=need("intermediate_size"), normalization="RMSNorm",
        layernorm_epsilon=float(config.get("rms_norm_eps", 1e-6)), activation="swiglu",
        untie_embeddings_and_output_weights=not tied, rotary_base=theta, rotary_percent=1.0,
        add_bias_linear=linear_bias, add_qkv_bias=qkv_bias, max_position_embeddings=max_pos,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    return TeacherArchitecture(model, kind, need("vocab_size"), tied, notes)


def _rope_theta(config: dict, where: str) -> int:
    """RoPE's base from ``rope_parameters`` (transformers 5) or ``rope_theta`` (earlier), refusing
    any scaling and partial rotary."""
    params = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    if params is not None:
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise ConversionError(f"{where}: rope_parameters {params!r} is not one RoPE setting with a rope_theta "
                                  "(per-layer RoPE is not supported)")
        scaling = params
        theta = params["rope_theta"]
        key = "rope_parameters"
    else:
        theta = config.get("rope_theta", 10000.0)
        key = "rope_scaling"
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            raise ConversionError(f"{where}: {key} uses RoPE scaling {kind!r}; only plain RoPE (rope_type default) maps "
                                  "onto megatron-core's rotary embedding here")
    partial = config.get("partial_rotary_factor", (params or {}).get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConversionError(f"{where}: partial_rotary_factor {partial} is not supported (the Llama family rotates whole heads)")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0 or float(theta) != int(theta):
        raise ConversionError(f"{where}: rope_theta {theta!r} must be a positive whole number (teacher.model.rotary_base)")
    return int(theta)


def _used_sliding_window(config: dict, kind: str) -> Optional[int]:
    window = config.get("sliding_window")
    if not window:
        return None
    if kind == "qwen2" and not config.get("use_sliding_window", False):
        return None  # Qwen2 ships a window size but attends fully unless use_sliding_window is set
    return int(window)


def _biases(config: dict, kind: str, where: str) -> tuple[bool, bool]:
    """``(add_qkv_bias, add_bias_linear)``: Qwen2 has query/key/value biases only; Llama may have
    biases everywhere (``attention_bias`` and ``mlp_bias``), which is megatron-core's
    ``add_bias_linear``; Mistral none."""
    if kind == "qwen2":
        return True, False
    attention, mlp = bool(config.get("attention_bias", False)), bool(config.get("mlp_bias", False))
    if attention != mlp:
        raise ConversionError(f"{where}: attention_bias {attention} with mlp_bias {mlp}: megatron-core's add_bias_linear "
                              "puts biases in every linear layer or in none")
    return False, attention


# --------------------------------------------------------------------------- tensors


def convert_state_dict(ckpt: HFCheckpoint, arch: TeacherArchitecture, vocab_rows: int,
                       dtype: Optional["torch.dtype"] = None) -> dict[str, "torch.Tensor"]:
    """The megatron-core ``GPTModel`` state dict (local layer spec, TP=1 names) of ``ckpt``, in
    ``dtype`` (default fp32), with ``vocab_rows`` embedding (and output) rows; see the module docstring."""
    import torch

    dtype = dtype or torch.float32
    m = arch.model
    heads, groups = m.num_attention_heads, m.num_query_groups
    d = m.hidden_size // heads
    h, f = m.hidden_size, m.ffn_hidden_size
    used: set[str] = set()
    index = ckpt.directory / (SAFETENSORS_INDEX if (ckpt.directory / SAFETENSORS_INDEX).is_file() else SAFETENSORS_FILE)

    def get(name: str, shape: tuple) -> torch.Tensor:
        if name not in ckpt.weight_map:
            raise ConversionError(f"{index}: tensor {name} is missing (a {arch.model_type} checkpoint of this config.json "
                                  "has it)")
        t = ckpt.tensor(name)
        if tuple(t.shape) != shape:
            raise ConversionError(f"{index}: tensor {name} has shape {tuple(t.shape)}, config.json implies {shape}")
        used.add(name)
        return t.to(dtype)

    def grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # [nq·d, ...], [ng·d, ...], [ng·d, ...] -> [ng, (nq/ng + 2)·d, ...] -> [(nq + 2·ng)·d, ...]
        rest = q.shape[1:]
        q = q.reshape(groups, heads // groups * d, *rest)
        k, v = k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape((heads + 2 * groups) * d, *rest)

    out: dict[str, torch.Tensor] = {}
    emb = get("model.embed_tokens.weight", (arch.hf_vocab_size, h))
    out["embedding.word_embeddings.weight"] = _resize_rows(emb, vocab_rows)
    for i in range(m.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = src + "self_attn."
        q = get(attn + "q_proj.weight", (heads * d, h))
        k = get(attn + "k_proj.weight", (groups * d, h))
        v = get(attn + "v_proj.weight", (groups * d, h))
        out[dst + "self_attention.linear_qkv.weight"] = grouped(q, k, v)
        if m.add_qkv_bias or m.add_bias_linear:
            out[dst + "self_attention.linear_qkv.bias"] = grouped(
                get(attn + "q_proj.bias", (heads * d,)), get(attn + "k_proj.bias", (groups * d,)),
                get(attn + "v_proj.bias", (groups * d,)))
        out[dst + "self_attention.linear_proj.weight"] = get(attn + "o_proj.weight", (h, heads * d))
        mlp = src + "mlp."
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [get(mlp + "gate_proj.weight", (f, h)), get(mlp + "up_proj.weight", (f, h))], dim=0)
        out[dst + "mlp.linear_fc2.weight"] = get(mlp + "down_proj.weight", (h, f))
        if m.add_bias_linear:
            out[dst + "self_attention.linear_proj.bias"] = get(attn + "o_proj.bias", (h,))
            out[dst + "mlp.linear_fc1.bias"] = torch.cat([get(mlp + "gate_proj.bias", (f,)), get(mlp + "up_proj.bias", (f,))])
            out[dst + "mlp.linear_fc2.bias"] = get(mlp + "down_proj.bias", (h,))
        out[dst + "input_layernorm.weight"] = get(src + "input_layernorm.weight", (h,))
        out[dst + "pre_mlp_layernorm.weight"] = get(src + "post_attention_layernorm.weight", (h,))
    out["decoder.final_layernorm.weight"] = get("model.norm.weight", (h,))
    has_head = "lm_head.weight" in ckpt.weight_map
    if arch.tied:
        if has_head:
            head = get("lm_head.weight", (arch.hf_vocab_size, h))
            if not torch.equal(head, emb):
                raise ConversionError(f"{ckpt.directory / CONFIG_FILE}: tie_word_embeddings is true but {index} holds an "
                                      "lm_head.weight that differs from model.embed_tokens.weight")
    else:
        if not has_head:
            raise ConversionError(f"{ckpt.directory / CONFIG_FILE}: tie_word_embeddings is false but {index} holds no "
                                  "lm_head.weight (set tie_word_embeddings true if the model reuses its embedding)")
        out["output_layer.weight"] = _resize_rows(get("lm_head.weight", (arch.hf_vocab_size, h)), vocab_rows)
    unknown = sorted(k for k in set(ckpt.weight_map) - used if not k.endswith(_IGNORED_SUFFIXES))
    if unknown:
        shown = ", ".join(unknown[:8]) + (", ..." if len(unknown) > 8 else "")
        raise ConversionError(f"{index}: {len(unknown)} tensor(s) the {arch.model_type} mapping does not know: {shown}")
    return out


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` ``[V, h]`` -> ``[rows, h]``: zero rows appended, or rows past ``rows`` dropped."""
    import torch

    if rows <= t.shape[0]:
        return t[:rows].clone()
    return torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])])


# --------------------------------------------------------------------------- the command


@dataclass
class ConversionResult:
    """What :func:`convert` wrote."""

    checkpoint: Path
    """The complete checkpoint directory (``DIR/step_00000000``)."""
    snippet: Path
    """``DIR/teacher.yaml``."""
    snippet_text: str
    model: ModelConfig
    """``teacher.model``."""
    vocab_rows: int
    """Rows of the embedding and output layer (the run's padded vocabulary)."""
    tokenizer: Optional[str]
    tokenizer_type: Optional[str]
    tokenizer_vocab_size: Optional[int]


def find_tokenizer(directory: PathLike) -> tuple[Optional[str], Optional[str]]:
    """``(path, type)`` of the tokenizer inside a Hugging Face checkpoint directory: the directory
    itself when it holds a ``tokenizer.json``, else its sentencepiece ``tokenizer.model``; else
    ``(None, None)``."""
    d = Path(directory)
    if (d / "tokenizer.json").is_file():
        return str(d), "huggingface"
    if (d / "tokenizer.model").is_file():
        return str(d / "tokenizer.model"), "sentencepiece"
    return None, None


def convert(
    source: PathLike,
    output: PathLike,
    *,
    model_type: Optional[str] = None,
    tokenizer: Optional[PathLike] = None,
    tokenizer_type: Optional[str] = None,
    make_vocab_size_divisible_by: int = 128,
    tensor_parallel_size: int = 1,
    dtype: Optional[str] = None,
) -> ConversionResult:
    """Convert the Hugging Face checkpoint ``source`` into a teacher checkpoint under ``output``.

    ``tokenizer`` (default: the one inside ``source``, see :func:`find_tokenizer`) is the
    student's: its vocabulary size fixes the padded vocabulary, ``padded_vocab_size(V_tok,
    tensor_parallel_size, make_vocab_size_divisible_by)``, and its SHA-256 goes into the marker.
    ``dtype`` (fp32, bf16, fp16) is the checkpoint's (default: ``config.json``'s ``dtype`` /
    ``torch_dtype``, else fp32); a teacher is cast to ``teacher.model.precision`` as it loads.
    One process (it starts and ends its own one-rank process group unless one exists).
    """
    from megadistill.data.tokenizer import guess_tokenizer_type, load_tokenizer

    out = Path(output)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / SNIPPET_FILE).is_file())):
        raise ConversionError(f"--output {out} exists and is not an earlier conversion's directory: give a new directory")
    ckpt = read_checkpoint(source)
    arch = model_config(ckpt.config, model_type, str(ckpt.directory / CONFIG_FILE))
    for name, value in (("--make-vocab-size-divisible-by", make_vocab_size_divisible_by),
                        ("--tensor-parallel-size", tensor_parallel_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(f"{name} must be a positive integer, got {value!r}")
    if tokenizer is None:
        tokenizer, found_type = find_tokenizer(ckpt.directory)
        tokenizer_type = tokenizer_type or found_type
    elif tokenizer_type is None:
        tokenizer_type = guess_tokenizer_type(tokenizer)
    tok = load_tokenizer(tokenizer, tokenizer_type) if tokenizer is not None else None
    if tok is not None and tok.vocab_size > arch.hf_vocab_size:
        raise ConversionError(f"tokenizer {tokenizer} has {tok.vocab_size} ids but {ckpt.directory / CONFIG_FILE} "
                              f"vocab_size is {arch.hf_vocab_size}: ids past it have no embedding")
    base_vocab = tok.vocab_size if tok is not None else arch.hf_vocab_size
    rows = padded_vocab_size(base_vocab, tensor_parallel_size, make_vocab_size_divisible_by)
    precision = _DTYPES.get(dtype or ckpt.config.get("dtype") or ckpt.config.get("torch_dtype") or "float32")
    if precision is None:
        raise ConversionError(f"dtype {dtype or ckpt.config.get('dtype') or ckpt.config.get('torch_dtype')!r} is not fp32, "
                              "bf16 or fp16 (--dtype)")
    teacher = replace(arch.model, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    from megadistill.megatron.gpt import DTYPES

    state = convert_state_dict(ckpt, replace(arch, model=teacher), rows, DTYPES[precision])

    marker = {
        "backend": "megatron",
        "config": {"model": to_dict(teacher)},
        "tokenizer_sha256": tok.sha256 if tok is not None else None,
        "converted_from": {
            "format": "huggingface", "model_type": arch.model_type, "path": str(ckpt.directory.resolve()),
            "files": {name: (ckpt.directory / name).stat().st_size for name in sorted(set(ckpt.weight_map.values()))},
            "hf_vocab_size": arch.hf_vocab_size, "vocab_rows": rows, "dtype": precision,
        },
    }
    with _one_process_group():
        path = _write(out, teacher, precision, rows, state, marker)
    text = snippet(out, teacher, arch, rows, tokenizer, tokenizer_type, tok.vocab_size if tok is not None else None,
                   tensor_parallel_size, ckpt.directory)
    snippet_path = out / SNIPPET_FILE
    tmp = snippet_path.with_name(f".{SNIPPET_FILE}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, snippet_path)
    return ConversionResult(path, snippet_path, text, teacher, rows, None if tokenizer is None else str(tokenizer),
                            tokenizer_type if tokenizer is not None else None, tok.vocab_size if tok is not None else None)


def _write(out: Path, teacher: ModelConfig, precision: str, rows: int, state: dict, marker: dict) -> Path:
    """Build the teacher ``GPTModel`` (TP=1, local spec), load ``state`` into it (strict: every
    name and shape must be the model's) and commit it as step 0 under ``out``."""
    from megatron.core import dist_checkpointing

    from megadistill.checkpoint_dir import children_die_with_this_process, commit
    from megadistill.config import DataConfig, RunConfig, TeacherConfig
    from megadistill.megatron.checkpoint import _layout, install_write_results_queue
    from megadistill.megatron.gpt import build_gpt

    # The local spec: its state dict names are the ones convert_state_dict writes; the checkpoint
    # layout (megatron-core's sharded names) is the same for Transformer Engine layers.
    built = replace(teacher, precision=precision, transformer_impl="local")
    cfg = RunConfig(teacher=TeacherConfig(mode="online", model=built),
                    data=DataConfig(seq_length=min(built.max_position_embeddings or 128, 128)))
    model = build_gpt(cfg.teacher.model, cfg, rows)
    own = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:  # a mapping bug, not the user's input
        raise RuntimeError(f"converted state dict does not fit the GPT model: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(state, strict=False)  # _extra_state entries keep the model's own
    del state

    def write(tmp: Path) -> None:
        install_write_results_queue()
        with children_die_with_this_process():
            dist_checkpointing.save({"model": model.sharded_state_dict()}, str(tmp))

    return commit(out, 0, write, {"layout": _layout(), **marker})


@contextmanager
def _one_process_group():
    """A one-rank gloo group with megatron-core's parallel state (TP=PP=1), unless the caller has
    one (then it must be a single rank at TP=PP=1)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megadistill.megatron import cpu

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError(f"convert-hf runs as one process, not {dist.get_world_size()} ranks")
        yield
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConversionError("convert-hf runs as one process: start it without torchrun/srun")
    with tempfile.TemporaryDirectory(prefix="megadistill-convert-") as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            cpu.apply_if_needed("gloo")
            parallel_state.initialize_model_parallel(1, 1)
            torch.manual_seed(0)
            model_parallel_cuda_manual_seed(0)  # the weights are overwritten; megatron-core needs the tracker
            yield
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def snippet(out: Path, teacher: ModelConfig, arch: TeacherArchitecture, rows: int, tokenizer, tokenizer_type,
            tokenizer_vocab: Optional[int], tensor_parallel_size: int, source: Path) -> str:
    """The YAML to merge into a run file: ``teacher`` (mode, checkpoint, model) and the student's
    ``data.tokenizer_*`` and ``model.make_vocab_size_divisible_by``, with comments."""
    import yaml

    base = tokenizer_vocab if tokenizer_vocab is not None else arch.hf_vocab_size
    loads = [t for t in (1, 2, 4, 8, 16) if padded_vocab_size(base, t, teacher.make_vocab_size_divisible_by) == rows]
    body = {
        "teacher": {"mode": "online", "checkpoint": str(out.resolve()), "model": to_dict(teacher)},
        "model": {"make_vocab_size_divisible_by": teacher.make_vocab_size_divisible_by},
    }
    if tokenizer is not None:
        body["data"] = {"tokenizer_model": str(Path(tokenizer).resolve()), "tokenizer_type": tokenizer_type}
    lines = [
        f"# megadistill convert-hf {source.resolve()} ({arch.model_type}) -> {out.resolve()}",
        f"# Vocabulary: {base} ids ({'the tokenizer' if tokenizer_vocab is not None else 'config.json vocab_size'}), "
        f"{rows} rows (a multiple of make_vocab_size_divisible_by {teacher.make_vocab_size_divisible_by} x TP "
        f"{tensor_parallel_size}); the student shares them, which holds at tensor_model_parallel_size "
        f"{', '.join(map(str, loads))}. For another TP, convert again with --tensor-parallel-size.",
    ]
    if tokenizer is None:
        lines.append("# No tokenizer was found beside the weights: set data.tokenizer_model (and data.tokenizer_type) "
                     "to the teacher's tokenizer.")
    lines += [f"# {n}" for n in arch.notes]
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False)
