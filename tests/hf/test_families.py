"""Llama 3.x and Qwen3 teachers (``megadistill convert-hf``): tiny random models built and saved
locally with ``transformers`` (no download), one with Llama 3.1's RoPE scaling as its hub
``config.json`` states it, one Qwen3 with query/key norms and heads wider than hidden / heads,
convert into teachers whose megatron-core logits equal the Hugging Face model's (fp32, <= 1e-4)
at TP=1, TP=2 and PP=2, and a student distils from each; Llama 3 settings megatron-core cannot
express and mixture-of-experts models are refused naming the file, the key and its value."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[dev]')")

from test_convert_hf import ROUTES, _randomise, _route, make_tokenizer  # noqa: E402

from megadistill.config import config_from_dict  # noqa: E402
from megadistill.hf.architecture import model_config  # noqa: E402
from megadistill.hf.convert import convert  # noqa: E402
from megadistill.hf.errors import ConversionError  # noqa: E402
from megadistill.testing import run_distributed  # noqa: E402

# Llama 3.1's RoPE as its config.json on the hub states it (transformers 4 keys).
LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                "rope_type": "llama3"}
# Past 8192 / factor = 1024 the scaled frequencies have turned further than plain RoPE would
# allow in the original context: the comparison covers positions on both sides.
LLAMA3_TOKENS = 1100
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _llama3(directory: Path) -> transformers.PreTrainedModel:
    """A tiny Llama 3.1-shaped model (untied, RoPE base 500000, Llama 3 scaling, 128k context) saved
    in ``directory`` with a transformers 4 style config.json (rope_scaling + rope_theta), reloaded
    from it: the reference is what transformers makes of the file."""
    config = transformers.LlamaConfig(**SHAPE, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False,
                                      rope_parameters={**LLAMA31_ROPE, "rope_theta": 500000.0})
    model = transformers.LlamaForCausalLM(config)
    _randomise(model)
    model.save_pretrained(directory)
    saved = json.loads((directory / "config.json").read_text())
    del saved["rope_parameters"]
    (directory / "config.json").write_text(json.dumps({**saved, "rope_theta": 500000.0, "rope_scaling": LLAMA31_ROPE}))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
    assert reloaded.config.rope_parameters["rope_type"] == "llama3"
    return reloaded


def _qwen3(directory: Path) -> transformers.PreTrainedModel:
    """A tiny Qwen3 (tied, head_dim 32 = 2 x hidden / heads, query/key norms) saved in ``directory``
    with a sliding window its config does not use (use_sliding_window false), reloaded from it."""
    config = transformers.Qwen3Config(**SHAPE, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                                      tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 1000000.0})
    model = transformers.Qwen3ForCausalLM(config)
    _randomise(model)
    model.save_pretrained(directory)
    saved = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**saved, "sliding_window": 16, "use_sliding_window": False}))
    reloaded = transformers.Qwen3ForCausalLM.from_pretrained(directory).eval()
    assert reloaded.model.layers[0].self_attn.sliding_window is None  # full attention
    return reloaded


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """The tokenizer, both saved models, their logits on fixed tokens, both converted (TP=1
    padding: 512 rows, also TP=2's with make_vocab_size_divisible_by 128)."""
    root = tmp_path_factory.mktemp("families")
    tokenizer = make_tokenizer(root / "tokenizer")
    gen = torch.Generator().manual_seed(2)
    tokens = {"llama3": torch.randint(0, 512, (1, LLAMA3_TOKENS), generator=gen),
              "qwen3": torch.randint(0, 512, (2, 40), generator=gen)}  # longer than the unused window
    logits, models = {}, {}
    for kind, make in (("llama3", _llama3), ("qwen3", _qwen3)):
        models[kind] = make(root / kind)
        with torch.no_grad():
            logits[kind] = models[kind](input_ids=tokens[kind]).logits.float()
    # Llama 3 scaling matters at these positions: plain RoPE on the same weights is far off.
    config = copy.deepcopy(models["llama3"].config)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    plain = transformers.LlamaForCausalLM(config).eval()
    plain.load_state_dict(models["llama3"].state_dict())
    with torch.no_grad():
        unscaled = plain(input_ids=tokens["llama3"]).logits.float()
    assert (unscaled - logits["llama3"])[:, 1024:].abs().max() > 1e-2

    def convert_both():
        return {kind: convert(root / kind, root / f"{kind}-teacher", tokenizer=tokenizer).snippet_text
                for kind in ("llama3", "qwen3")}

    snippets = run_distributed(convert_both, 1)[0]
    return {"root": root, "tokenizer": tokenizer, "tokens": tokens, "logits": logits, "snippets": snippets}


def _stage_logits(snippets: dict, tokens: dict) -> dict:
    """Each converted teacher's full-vocabulary logits ``[b, s, v]`` on this rank (None off the last
    pipeline stage), loaded as a run loads it and run through megatron-core's forward-only schedule
    (stage-to-stage activations by p2p under pipeline parallelism)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megadistill.checkpoint_identity import resolve_teacher_checkpoint
    from megadistill.megatron.gpt import build_gpt
    from megadistill.megatron.teacher import freeze, load_teacher_checkpoint
    from megadistill.store.precompute import teacher_forwards

    parallel = {"tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
                "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size()}
    out = {}
    for kind, snippet in snippets.items():
        block = yaml.safe_load(snippet)
        seq = tokens[kind].shape[1]
        cfg = config_from_dict({**block, "parallel": parallel, "data": {**block["data"], "seq_length": seq},
                                "model": {**block.get("model", {}), "num_layers": 2}})  # the student splits too
        model = freeze(load_teacher_checkpoint(build_gpt(cfg.teacher.model, cfg, 512),
                                               resolve_teacher_checkpoint(cfg.teacher.checkpoint)))
        got = []

        def keep(_mb, local):  # logits [b, s, v/tp], on the last stage only
            got.append(gather_from_tensor_model_parallel_region(local))

        mb = {"tokens": tokens[kind], "position_ids": torch.arange(seq).expand_as(tokens[kind])}
        with torch.no_grad():
            teacher_forwards(model, [mb], seq, keep)
        out[kind] = got[0] if got else None
    return out


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_llama3_and_qwen3_teachers_compute_the_hugging_face_logits(families, tp, pp):
    ranks = run_distributed(_stage_logits, tp * pp, families["snippets"], families["tokens"], tp=tp, pp=pp)
    last = ranks[-tp:]  # the last pipeline stage's ranks
    assert all(r[k] is None for r in ranks[:-tp] for k in r)
    for kind, want in families["logits"].items():
        for got in (r[kind] for r in last):
            assert got.shape == want.shape
            err = (got - want).abs().max().item()
            assert err <= 1e-4, (kind, tp, pp, err)


def test_the_snippets_map_llama3_scaling_and_qwen3_heads(families):
    llama3 = yaml.safe_load(families["snippets"]["llama3"])["teacher"]["model"]
    assert (llama3["rotary_base"], llama3["rope_scaling_factor"], llama3["max_position_embeddings"]) == (500000, 8.0, 131072)
    assert llama3["kv_channels"] is None and not llama3["qk_layernorm"]
    qwen3 = yaml.safe_load(families["snippets"]["qwen3"])["teacher"]["model"]
    assert (qwen3["kv_channels"], qwen3["qk_layernorm"], qwen3["rope_scaling_factor"]) == (32, True, None)
    assert not qwen3["untie_embeddings_and_output_weights"] and not qwen3["add_qkv_bias"]
    assert qwen3["max_position_embeddings"] == 2048  # the window is not in use: no cap


def test_megatron_cores_llama3_frequencies_are_transformers(families):
    """Llama 3.1 (head 128, base 500000), 3.2 (factor 32) and the tiny model: megatron-core's
    scaled inverse frequencies equal transformers' bit for bit, with frequencies kept, smoothed
    and divided by the factor in each, and transformers' attention factor is 1 (cos/sin unscaled)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    for head_dim, factor in ((128, 8.0), (64, 32.0), (16, 8.0)):
        config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=131072,
                                          rope_parameters={**LLAMA31_ROPE, "factor": factor, "rope_theta": 500000.0})
        theirs, attention_factor = _compute_llama3_parameters(config, "cpu")
        ours = RotaryEmbedding(head_dim, 1.0, rotary_base=500000, rope_scaling=True, rope_scaling_factor=factor,
                               use_cpu_initialization=True).inv_freq
        assert attention_factor == 1.0 and torch.equal(ours, theirs), head_dim
        wavelength = 2 * math.pi / (1.0 / 500000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        assert (wavelength < 2048).any() and ((wavelength >= 2048) & (wavelength <= 8192)).any()
        assert (wavelength > 8192).any()


def test_a_student_distils_from_llama3_and_qwen3_teachers(tmp_path, families):
    """A few KD steps from each converted teacher with its tokenizer, through the run driver (which
    checks the teacher's architecture, rope_scaling_factor, kv_channels and qk_layernorm included,
    against the checkpoint's record)."""
    from megadistill import train
    from megadistill.data.corpus import embedded_corpus_text

    text = tmp_path / "a.txt"
    text.write_text(embedded_corpus_text()[:20_000])
    cfgs = []
    for kind, snippet in families["snippets"].items():
        block = yaml.safe_load(snippet)
        cfgs.append(config_from_dict({
            **block,
            "name": f"{kind}-student", "output_dir": str(tmp_path / kind),
            "model": {**block["model"], "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4},
            "data": {**block["data"], "inputs": [str(text)], "seq_length": 32, "micro_batch_size": 2,
                     "global_batch_size": 2},
            "kd": {"alpha": {"kind": "constant", "alpha_max": 0.5}},
            "training": {"train_steps": 2, "eval_interval": 2, "eval_steps": 1, "log_interval": 1},
            "checkpoint": {"save_interval": 0},
        }, world_size=1))

    def go(cfgs):
        return [train.run(cfg, progress=False).steps for cfg in cfgs]

    assert run_distributed(go, 1, cfgs) == [[2, 2]]
    for kind in families["snippets"]:
        metrics = train.read_metrics(tmp_path / kind)
        assert sorted(metrics) == [1, 2] and all(metrics[s]["kd loss"] > 0 for s in metrics), kind


def _hub_llama31(**rope) -> dict:
    """Llama 3.1's config.json keys that matter here, on the tiny shape."""
    return {"model_type": "llama", **SHAPE, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "rope_scaling": {**LLAMA31_ROPE, **rope}}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("config, message", [
    (_hub_llama31(high_freq_factor=2.0),
     "rope_scaling.high_freq_factor is 2.0: megatron-core's Llama 3 scaling fixes it at 4"),
    (_hub_llama31(low_freq_factor=2.0), "rope_scaling.low_freq_factor is 2.0: megatron-core's Llama 3 scaling fixes it at 1"),
    (_hub_llama31(original_max_position_embeddings=4096),
     "rope_scaling.original_max_position_embeddings is 4096: megatron-core's Llama 3 scaling fixes it at 8192"),
    ({**_hub_llama31(), "rope_scaling": {k: v for k, v in LLAMA31_ROPE.items() if k != "original_max_position_embeddings"}},
     "rope_scaling.original_max_position_embeddings is not stated, so transformers takes max_position_embeddings 131072: "
     "megatron-core's Llama 3 scaling fixes it at 8192"),
    (_hub_llama31(factor=0.5), r"rope_scaling.factor is 0.5: Llama 3 RoPE scaling needs a factor >= 1"),
    ({**_hub_llama31(), "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}},
     "rope_scaling.rope_type is 'yarn': RoPE scaling 'yarn' is not supported"),
    ({**_hub_llama31(), "model_type": "qwen3_moe", "num_experts": 8, "rope_scaling": None},
     r"num_experts is 8: a mixture-of-experts model \(model_type 'qwen3_moe'\), which the converter does not map \(it "
     r"maps the dense llama, qwen2, qwen3, mistral\)"),
    ({**_hub_llama31(), "model_type": "qwen3", "attention_bias": True, "rope_scaling": None},
     "attention_bias true: Qwen3 then biases q/k/v_proj and o_proj but no MLP layer"),
])
def test_what_megatron_core_cannot_express_is_refused_naming_key_and_value(monkeypatch, route, config, message):
    _route(monkeypatch, route)
    with pytest.raises(ConversionError, match=f"^teacher/config.json: {message}"):
        model_config(config, where="teacher/config.json")


def test_qwen3s_head_dim_defaults_to_128_as_transformers_reads_it():
    config = {"model_type": "qwen3", **SHAPE, "max_position_embeddings": 2048}
    arch = model_config(config)
    assert (arch.model.kv_channels, arch.model.qk_layernorm) == (128, True) and "Qwen3's default 128" in arch.notes[0]
    assert transformers.Qwen3Config(**SHAPE).head_dim == 128
    assert model_config({**config, "head_dim": 16}).model.kv_channels is None  # hidden / heads
