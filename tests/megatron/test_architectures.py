"""Architecture options of student and teacher (``ModelConfig``): a Llama-like student (RMSNorm,
SwiGLU, grouped-query attention, untied embeddings, no biases, another RoPE base) distils from a
GPT-like teacher at TP=2; the defaults still build the model of earlier versions; a teacher's
``teacher.model`` is checked against its checkpoint's shapes and run record; invalid
combinations raise naming the key."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_runs import TEACHER, online_kd_run, run_metrics

from megadistill.config import ConfigError, ModelConfig, ParallelConfig, RunConfig, TrainingConfig, config_from_dict, to_dict, validate
from megadistill.testing import run_distributed

LLAMA = ModelConfig(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
    normalization="RMSNorm", layernorm_epsilon=1e-6, activation="swiglu", untie_embeddings_and_output_weights=True,
    add_bias_linear=False, rotary_base=500000, rotary_percent=0.5,
)


def _state(cfg, model_cfg, vocab=512):
    """Names, shapes and values of ``model_cfg`` built by build_gpt (seeded) on this rank."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megadistill.megatron.gpt import build_gpt

    torch.manual_seed(3)
    model_parallel_cuda_manual_seed(3)
    return {k: v.clone() for k, v in build_gpt(model_cfg, cfg, vocab).state_dict().items() if "_extra_state" not in k}


def _state_of_the_old_builder(cfg, vocab=512):
    """The model megadistill built before the architecture options (its build_gpt, verbatim in
    substance): local spec, RoPE, tied embeddings, TransformerConfig defaults."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(3)
    model_parallel_cuda_manual_seed(3)
    m = cfg.model
    config = TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        pipeline_dtype=torch.float32, params_dtype=torch.float32, init_method_std=m.init_method_std,
        use_cpu_initialization=True,
    )
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=vocab, max_sequence_length=cfg.data.seq_length,
                     pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=True, position_embedding_type="rope")
    return {k: v.clone() for k, v in model.state_dict().items() if "_extra_state" not in k}


def test_the_defaults_build_the_model_of_earlier_versions():
    def both(cfg):
        return _state(cfg, cfg.model), _state_of_the_old_builder(cfg)

    new, old = run_distributed(both, 1, RunConfig())[0]
    assert list(new) == list(old)
    for k in old:
        assert torch.equal(new[k], old[k]), k


def test_the_llama_like_options_reach_megatron_core():
    def build(cfg):
        from megadistill.megatron.gpt import build_gpt

        model = build_gpt(cfg.model, cfg, 512)
        layer = model.decoder.layers[0]
        return {
            "names": sorted(k for k in model.state_dict() if "_extra_state" not in k and ".layers.1." not in k),
            "qkv": tuple(layer.self_attention.linear_qkv.weight.shape),
            "fc1": tuple(layer.mlp.linear_fc1.weight.shape),
            "norm": type(layer.input_layernorm).__name__, "eps": layer.input_layernorm.eps,
            "groups": model.config.num_query_groups, "gated": model.config.gated_linear_unit,
            "act": model.config.activation_func.__name__, "rotary_dim": model.rotary_pos_emb.inv_freq.numel() * 2,
            "base": model.config.rotary_base if hasattr(model.config, "rotary_base") else None,
            "inv_freq_1": float(model.rotary_pos_emb.inv_freq[1]),
        }

    got = run_distributed(build, 1, RunConfig(model=LLAMA))[0]
    assert got["names"] == [
        "decoder.final_layernorm.weight", "decoder.layers.0.input_layernorm.weight",
        "decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc2.weight",
        "decoder.layers.0.pre_mlp_layernorm.weight", "decoder.layers.0.self_attention.linear_proj.weight",
        "decoder.layers.0.self_attention.linear_qkv.weight", "embedding.word_embeddings.weight", "output_layer.weight",
    ]  # no biases, RMSNorm has no bias, an output layer of its own
    head_dim = 16
    assert got["qkv"] == ((4 + 2 * 2) * head_dim, 64)  # 4 query heads, 2 key/value groups
    assert got["fc1"] == (2 * 96, 64)  # gate and up projections
    assert got["norm"] == "RMSNorm" and got["eps"] == 1e-6
    assert got["groups"] == 2 and got["gated"] and got["act"] == "silu"
    assert got["rotary_dim"] == head_dim // 2  # rotary_percent 0.5
    # inv_freq[i] = base ** (-2i / rotary_dim)
    assert got["inv_freq_1"] == pytest.approx(500000 ** (-2 / 8), rel=1e-6)


def test_a_llama_like_student_distils_from_a_gpt_like_teacher_at_tp2(tmp_path, mixed_corpus, teacher_run):
    from megadistill import train

    cfg = online_kd_run(tmp_path / "llama", mixed_corpus, teacher_run[0] / "checkpoints", model=LLAMA,
                        parallel=ParallelConfig(tensor_model_parallel_size=2),
                        training=TrainingConfig(train_steps=6, eval_interval=6, eval_steps=1, log_interval=1))
    validate(cfg, world_size=2)

    def run(cfg):
        result = train.run(cfg, progress=False)
        from megatron.core import parallel_state

        return result.steps, parallel_state.get_tensor_model_parallel_world_size()

    assert run_distributed(run, 2, cfg, tp=2) == [(6, 2), (6, 2)]
    m = run_metrics(tmp_path / "llama")
    assert sorted(m) == list(range(1, 7))
    assert m[6]["total loss"] < m[1]["total loss"] - 0.2 and m[6]["kd loss"] < m[1]["kd loss"]
    # Its checkpoint is a Llama-shaped megatron-core checkpoint: it can serve as a teacher, described by LLAMA.
    from megadistill.preflight import check_teacher_shape
    from megadistill.checkpoint_identity import resolve_teacher_checkpoint

    ckpt = resolve_teacher_checkpoint(str(tmp_path / "llama"))
    check_teacher_shape(LLAMA, ckpt)
    with pytest.raises(ConfigError, match=r"teacher.model.num_query_groups is 4 but teacher.checkpoint .* has 2"):
        check_teacher_shape(replace(LLAMA, num_query_groups=None), ckpt)
    with pytest.raises(ConfigError, match=r"teacher.model.activation is gelu but teacher.checkpoint .* has a gated"):
        check_teacher_shape(replace(LLAMA, activation="gelu"), ckpt)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_query_groups": 2}, r"teacher.model.num_query_groups is 2 but teacher.checkpoint .* has 4"),
        ({"normalization": "RMSNorm"}, r"teacher.model.normalization is RMSNorm but teacher.checkpoint .* has LayerNorm"),
        ({"untie_embeddings_and_output_weights": True},
         r"teacher.model.untie_embeddings_and_output_weights is True but teacher.checkpoint .* has False"),
        ({"add_bias_linear": False}, r"teacher.model.add_bias_linear is False but teacher.checkpoint .* has True"),
        ({"activation": "swiglu"}, r"teacher.model.activation is swiglu but teacher.checkpoint .* has an ungated"),
    ],
)
def test_teacher_model_is_checked_against_its_checkpoint_shapes(teacher_run, change, message):
    from megadistill.preflight import check_teacher_shape
    from megadistill.checkpoint_identity import resolve_teacher_checkpoint

    ckpt = resolve_teacher_checkpoint(str(teacher_run[0]))
    check_teacher_shape(TEACHER, ckpt)
    with pytest.raises(ConfigError, match=message):
        check_teacher_shape(replace(TEACHER, **change), ckpt)


def test_teacher_model_is_checked_against_its_run_record(teacher_run, mixed_corpus):
    from megadistill.resume import check_teacher_record
    from megadistill.checkpoint_identity import resolve_teacher_checkpoint
    from megadistill.hashing import file_sha256

    ckpt = str(resolve_teacher_checkpoint(str(teacher_run[0])))
    sha = file_sha256(mixed_corpus.tokenizer)
    cfg = online_kd_run("unused", mixed_corpus, ckpt)
    check_teacher_record(cfg, ckpt, sha)
    # Same shapes, another function: caught by the record, not by the tensor metadata.
    for change in ({"rotary_base": 500000}, {"layernorm_epsilon": 1e-6}, {"rotary_percent": 0.5}):
        bad = replace(cfg, teacher=replace(cfg.teacher, model=replace(cfg.teacher.model, **change)))
        (key,) = change
        with pytest.raises(ConfigError, match=rf"teacher.model.{key} is .* but teacher.checkpoint .* was trained with"):
            check_teacher_record(bad, ckpt, sha)


def test_a_record_written_before_the_options_existed_means_the_defaults():
    from megadistill.resume import _architecture, resume_mismatches

    cfg = RunConfig()
    old = to_dict(cfg)
    new_keys = ("precision", "normalization", "layernorm_epsilon", "activation", "num_query_groups",
                "untie_embeddings_and_output_weights", "rotary_base", "rotary_percent", "add_bias_linear",
                "add_qkv_bias", "make_vocab_size_divisible_by", "max_position_embeddings", "transformer_impl")
    for section in (old["model"], old["teacher"]["model"]):
        for k in new_keys:
            del section[k]
    for k in ("loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis"):
        del old["optimizer"][k]
    assert resume_mismatches(cfg, old) == []
    assert _architecture(old["model"]) == _architecture(to_dict(cfg.model))
    changed = replace(cfg, model=replace(cfg.model, activation="swiglu"))
    assert resume_mismatches(changed, old) == ["model.activation"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": {"num_query_groups": 3}}, "model.num_query_groups 3 does not divide num_attention_heads 4"),
        ({"model": {"num_query_groups": 0}}, "model.num_query_groups must be > 0, got 0"),
        ({"model": {"num_query_groups": 1}, "parallel": {"tensor_model_parallel_size": 2}},
         "model.num_query_groups 1 is not divisible by parallel.tensor_model_parallel_size 2"),
        ({"teacher": {"mode": "online", "checkpoint": "x", "model": {"num_attention_heads": 4, "num_query_groups": 8}}},
         "teacher.model.num_query_groups 8 does not divide num_attention_heads 4"),
        ({"model": {"normalization": "rmsnorm"}}, "model.normalization: 'rmsnorm' is not one of ('LayerNorm', 'RMSNorm')"),
        ({"model": {"activation": "relu"}}, "model.activation: 'relu' is not one of ('gelu', 'swiglu')"),
        ({"model": {"layernorm_epsilon": 0.0}}, "model.layernorm_epsilon must be > 0"),
        ({"model": {"rotary_percent": 0.0}}, "model.rotary_percent must be in (0, 1], got 0.0"),
        ({"model": {"rotary_percent": 0.3125}}, "model.rotary_percent 0.3125 rotates 15 of the 48 dimensions"),
        ({"model": {"rotary_base": 0}}, "model.rotary_base must be > 0"),
        ({"model": {"make_vocab_size_divisible_by": 0}}, "model.make_vocab_size_divisible_by must be > 0"),
        ({"teacher": {"mode": "online", "checkpoint": "x", "model": {"make_vocab_size_divisible_by": 256}}},
         "teacher.model.make_vocab_size_divisible_by 256 does not divide model.make_vocab_size_divisible_by 128"),
        ({"model": {"max_position_embeddings": 64}}, "model.max_position_embeddings 64 is shorter than data.seq_length 128"),
        ({"model": {"transformer_impl": "te"}}, "model.transformer_impl: 'te' is not one of ('auto', 'local', 'transformer_engine')"),
        ({"model": {"transformer_impl": "local"}, "parallel": {"sequence_parallel": True}},
         "parallel.sequence_parallel needs Transformer Engine layers, but model.transformer_impl is local"),
        ({"model": {"untie_embeddings_and_output_weights": "yes"}}, "model.untie_embeddings_and_output_weights: expected true or false"),
    ],
)
def test_invalid_architectures_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(overrides)
    assert message in str(e.value)


def test_transformer_engine_requested_but_absent_is_a_clear_error():
    from megadistill.megatron.gpt import use_transformer_engine

    cfg = config_from_dict({"model": {"transformer_impl": "transformer_engine"}})
    with pytest.raises(ValueError, match=r"model.transformer_impl is transformer_engine but (Transformer Engine is "
                                         r"not installed|no GPU is present): set model.transformer_impl to auto or local"):
        use_transformer_engine(cfg.model)
    from megadistill.preflight import preflight

    with pytest.raises(ConfigError, match="model.transformer_impl is transformer_engine but"):
        preflight(cfg)
    assert use_transformer_engine(replace(cfg.model, transformer_impl="auto")) is False  # no GPU here: the local spec


def test_a_vocabulary_not_padded_to_the_models_multiple_is_refused():
    cfg = RunConfig(model=ModelConfig(make_vocab_size_divisible_by=256))

    def build(cfg):
        from megadistill.megatron.gpt import build_gpt

        with pytest.raises(ValueError, match=r"vocabulary size 384 is not a multiple of model.make_vocab_size_divisible_by "
                                             r"x tensor-parallel size = 256"):
            build_gpt(cfg.model, cfg, 384)
        return build_gpt(cfg.model, cfg, 512).vocab_size

    assert run_distributed(build, 1, cfg) == [512]
