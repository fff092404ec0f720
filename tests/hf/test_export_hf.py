"""The student out as a Hugging Face model (``megadistill export-hf``): Hugging Face models converted
in (``convert-hf``) come back out bit for bit; students trained by the Megatron backend (TP=2,
PP=2) and the DeepSpeed backend (ZeRO-3, and ZeRO-2 at TP=2) export to Starcoder2 models whose logits
equal megatron-core's (fp32, <= 1e-4) and whose greedy continuations are the same; a Llama-like
student (GQA, head dim 32, biases, untied, Llama 3 RoPE scaling) exports to Llama alike; the
sentencepiece wrap encodes the embedded corpus as training did; what cannot be exported, an output
that holds files, and a failure midway are refused or leave nothing behind."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[dev]')")

from test_convert_hf import _randomise, make_tokenizer  # noqa: E402
from tiny_runs import STUDENT, run_training, tiny_run  # noqa: E402

from megadistill.config import (  # noqa: E402
    DeepSpeedConfig, ModelConfig, ParallelConfig, RunConfig, config_from_dict, padded_vocab_size, to_dict,
)
from megadistill.hf.architecture import MODEL_TYPES  # noqa: E402
from megadistill.hf.errors import ExportError  # noqa: E402
from megadistill.hf.hf_config import hf_config  # noqa: E402
from megadistill.testing import run_distributed  # noqa: E402

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
KINDS = list(MODEL_TYPES)  # every family convert-hf maps goes round the trip
TOKENS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
NEW_TOKENS = 20
LLAMA_LIKE = ModelConfig(normalization="RMSNorm", activation="swiglu", add_bias_linear=False)


# --------------------------------------------------------------------------- (a) round trips


def _hf_model(directory: Path, kind: str) -> None:
    """A tiny random ``kind`` causal LM saved in ``directory``: Llama with biases everywhere and its
    own RoPE base, untied; Qwen2 tied, in shards; Mistral untied; Qwen3 tied, head_dim 32."""
    if kind == "llama":
        config = transformers.LlamaConfig(tie_word_embeddings=False, rope_theta=50000.0, attention_bias=True, mlp_bias=True,
                                          **SHAPE)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(tie_word_embeddings=True, **SHAPE)
    elif kind == "mistral":
        config = transformers.MistralConfig(tie_word_embeddings=False, sliding_window=None, **SHAPE)
    else:
        config = transformers.Qwen3Config(tie_word_embeddings=True, head_dim=32, **SHAPE)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _randomise(model)
    model.save_pretrained(directory, max_shard_size="100KB" if kind == "qwen2" else "1GB")


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """kind -> (the Hugging Face model directory, its export after convert-hf), for every family
    convert-hf maps; the Mistral checkpoint is exported by its step_00000000 directory, the
    others by the conversion's output directory."""
    root = tmp_path_factory.mktemp("round-trip")
    tokenizer = make_tokenizer(root / "tokenizer")
    for kind in KINDS:
        _hf_model(root / kind, kind)

    def convert_and_export():
        from megadistill.hf.convert import convert
        from megadistill.hf.export import export

        for kind in KINDS:
            convert(root / kind, root / f"{kind}-teacher", tokenizer=tokenizer)
            source = root / f"{kind}-teacher" / ("step_00000000" if kind == "mistral" else "")
            export(source, root / f"{kind}-hf")

    run_distributed(convert_and_export, 1)
    return {kind: (root / kind, root / f"{kind}-hf") for kind in KINDS} | {"tokenizer": tokenizer}


def _tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_convert_then_export_gives_back_every_tensor_bit_for_bit(round_trips, kind):
    source, exported = round_trips[kind]
    want, got = _tensors(source), _tensors(exported)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    config = json.loads((exported / "config.json").read_text())
    original = json.loads((source / "config.json").read_text())
    assert config["model_type"] == kind and config["vocab_size"] == 512
    assert config["tie_word_embeddings"] == original["tie_word_embeddings"]
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want)
    # The teacher's Hugging Face tokenizer is copied as it is.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (exported / name).read_bytes() == (round_trips["tokenizer"] / name).read_bytes()
    sidecar = json.loads((exported / "megadistill_export.json").read_text())
    assert sidecar["source"]["converted_from"]["model_type"] == kind and sidecar["source"]["step"] == 0
    assert sidecar["source"]["identity"]["content_sha256"]


# --------------------------------------------------------------------------- (b) trained students


@pytest.fixture(scope="module")
def students(tmp_path_factory, corpus):
    """name -> (run directory, its export, the checkpoint exported) of a default-shape student
    trained 3 steps: Megatron at TP=2 and at PP=2, DeepSpeed ZeRO-3 at DP=2, DeepSpeed ZeRO-2 at TP=2."""
    from megadistill.deepspeed import env
    from megadistill.testing.distributed import cuda_hidden

    with cuda_hidden():  # DeepSpeed imported once here, as its ranks see the machine
        env.configure_accelerator()
    root = tmp_path_factory.mktemp("students")
    runs = {}
    for name, tp, pp, backend, stage in (("megatron-tp2", 2, 1, "megatron", 1), ("megatron-pp2", 1, 2, "megatron", 1),
                                         ("zero3", 1, 1, "deepspeed", 3), ("zero2-tp2", 2, 1, "deepspeed", 2)):
        # Weights of std 0.3 rather than 0.02: activations large enough that an approximated GeLU or a
        # RoPE detail shows in the logits.
        cfg = tiny_run(root / name, corpus, steps=3, model=replace(STUDENT, init_method_std=0.3),
                       parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
        cfg = replace(cfg, optimizer=replace(cfg.optimizer, backend=backend), deepspeed=DeepSpeedConfig(zero_stage=stage))
        run_distributed(run_training, 2, cfg, tp=tp, pp=pp)
        runs[name] = root / name

    def export_all():
        from megadistill.hf.export import export

        return {name: export(run, f"{run}-hf").checkpoint.path for name, run in runs.items()}

    checkpoints = run_distributed(export_all, 1)[0]
    return {name: (run, Path(f"{run}-hf"), checkpoints[name]) for name, run in runs.items()}


def _greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt`` ``[1, s]`` from a megatron-core GPT (full logits)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tokens = prompt
    for _ in range(n):
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        logits = gather_from_tensor_model_parallel_region(model(tokens, positions, None))
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[0, prompt.shape[1]:].tolist()


def _megatron_reference(recorded: dict, load, prompt: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The student of the run config ``recorded`` built at this process group's TP, ``load(model)``
    filling its weights: its full-vocabulary logits on TOKENS and greedy continuation of ``prompt``."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megadistill.megatron.gpt import build_gpt
    from megadistill.megatron.teacher import freeze

    tp = parallel_state.get_tensor_model_parallel_world_size()
    cfg = config_from_dict({**recorded, "parallel": {"tensor_model_parallel_size": tp}})
    cfg = replace(cfg, model=replace(cfg.model, transformer_impl="local"))
    model = build_gpt(cfg.model, cfg, padded_vocab_size(512, tp, cfg.model.make_vocab_size_divisible_by))
    load(model)
    freeze(model)
    with torch.no_grad():
        positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
        logits = gather_from_tensor_model_parallel_region(model(TOKENS, positions, None))[..., :512]
        return logits, _greedy(model, prompt, NEW_TOKENS)


def _reference(name: str, checkpoint: Path, recorded: dict, prompt: torch.Tensor):
    """megatron-core's logits and greedy tokens for the student ``name``, loaded from ``checkpoint``
    without the exporter's code: Megatron's training loader at TP=1; DeepSpeed's own zero_to_fp32
    reader at TP=1 for ZeRO-3; each TP rank's module states into a TP=2 model for ZeRO-2 at TP=2."""
    from megatron.core import parallel_state

    if name.startswith("megatron"):
        from megadistill.megatron.checkpoint import load_checkpoint

        load = lambda model: load_checkpoint(checkpoint, model, restore_rng=False)  # noqa: E731
    elif name == "zero3":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        def load(model):
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / "engine"), tag="engine")
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    else:
        def load(model):
            rank = parallel_state.get_tensor_model_parallel_rank()
            file = checkpoint / "engine" / "engine" / f"mp_rank_{rank:02d}_model_states.pt"
            model.load_state_dict(torch.load(file, weights_only=False)["module"], strict=True)
    return _megatron_reference(recorded, load, prompt)


@pytest.mark.parametrize("name", ["megatron-tp2", "megatron-pp2", "zero3", "zero2-tp2"])
def test_a_trained_student_exports_to_a_model_with_megatron_cores_logits_and_continuation(students, name):
    from megadistill.checkpoint_dir import read_marker

    run, exported, checkpoint = students[name]
    assert checkpoint == run / "checkpoints" / "step_00000003"
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    prompt = torch.tensor([tokenizer("def first(items):\n    return")["input_ids"]])
    tp = 2 if name.endswith("tp2") else 1
    ref_logits, ref_tokens = run_distributed(_reference, tp, name, checkpoint, read_marker(checkpoint)["config"], prompt,
                                             tp=tp)[0]

    model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    assert type(model).__name__ == "Starcoder2ForCausalLM" and model.dtype == torch.float32
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=TOKENS).logits
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                   do_sample=False)[0, prompt.shape[1]:].tolist()
    err = (logits - ref_logits).abs().max().item()
    assert err <= 1e-4, (name, err)
    # generate stops after the end-of-text id; the reference loop runs on.
    eos = json.loads((exported / "generation_config.json").read_text())["eos_token_id"]
    assert generated == ref_tokens[:len(generated)] and (len(generated) == NEW_TOKENS or generated[-1] == eos), \
        (generated, ref_tokens)
    sidecar = json.loads((exported / "megadistill_export.json").read_text())
    assert sidecar["source"]["run"] == run.name and sidecar["source"]["step"] == 3
    assert sidecar["source"]["backend"] == ("megatron" if name.startswith("megatron") else "deepspeed")
    assert sidecar["source"]["identity"]["content_sha256"] and sidecar["checkpoint_vocab_rows"] == 512


def _llama_student(root: Path, tokenizer: str):
    """A random Llama-like student (RMSNorm, SwiGLU, 4 heads in 2 groups of head dim 32, biases,
    untied, Llama 3 RoPE scaling, base 500000) committed as a step-0 checkpoint with a run record,
    exported; returns megatron-core's logits and the RoPE inverse frequencies of both models."""
    from megatron.core import dist_checkpointing

    from megadistill.checkpoint_dir import commit
    from megadistill.data.tokenizer import load_tokenizer
    from megadistill.hf.export import export
    from megadistill.megatron.checkpoint import version_marker
    from megadistill.megatron.gpt import build_gpt

    model_cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=32,
                            ffn_hidden_size=96, normalization="RMSNorm", activation="swiglu", add_bias_linear=True,
                            untie_embeddings_and_output_weights=True, rotary_base=500000, rope_scaling_factor=8.0,
                            transformer_impl="local")
    cfg = RunConfig(name="llama-student", model=model_cfg, data=replace(RunConfig().data, tokenizer_model=tokenizer,
                                                                         seq_length=32))
    model = build_gpt(cfg.model, cfg, 512)
    _randomise(model)
    marker = {"backend": "megatron", "config": to_dict(cfg), "tokenizer_sha256": load_tokenizer(tokenizer).sha256,
              **version_marker()}
    commit(root / "checkpoints", 0, lambda tmp: dist_checkpointing.save({"model": model.sharded_state_dict()}, str(tmp)),
           marker)
    result = export(root, root / "hf")
    model.eval()
    with torch.no_grad():
        logits = model(TOKENS, torch.arange(TOKENS.shape[1]).expand_as(TOKENS), None)
    return result.architecture.model_type, logits, model.rotary_pos_emb.inv_freq.clone()


def test_a_llama_like_student_exports_to_llama_with_megatron_cores_logits(tmp_path, corpus):
    kind, ref_logits, ref_inv_freq = run_distributed(_llama_student, 1, tmp_path, corpus.tokenizer)[0]
    assert kind == "llama"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert (config["head_dim"], config["num_key_value_heads"]) == (32, 2)
    assert config["attention_bias"] is config["mlp_bias"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    model.eval()
    assert torch.allclose(model.model.rotary_emb.inv_freq, ref_inv_freq, rtol=1e-6, atol=0)
    with torch.no_grad():
        err = (model(input_ids=TOKENS).logits - ref_logits).abs().max().item()
    assert err <= 1e-4, err


# --------------------------------------------------------------------------- (c) refusals, tokenizer


@pytest.mark.parametrize("model, model_type, message", [
    (ModelConfig(rotary_percent=0.5), None, r"model.rotary_percent 0.5: .*rotate whole heads"),
    (ModelConfig(activation="swiglu"), None, "model.activation swiglu with normalization LayerNorm"),
    (ModelConfig(normalization="RMSNorm"), None, "model.activation gelu with normalization RMSNorm"),
    (ModelConfig(), "llama",
     r"model.normalization LayerNorm with activation gelu: llama has RMSNorm and SwiGLU \(--model-type starcoder2\)"),
    (ModelConfig(add_bias_linear=False, add_qkv_bias=True), None,
     "model.add_qkv_bias true with add_bias_linear false: starcoder2"),
    (replace(LLAMA_LIKE, add_bias_linear=True), "qwen2", "qwen2 has query/key/value biases and no others"),
    (LLAMA_LIKE, "qwen3", "model.qk_layernorm false"),
    (replace(LLAMA_LIKE, qk_layernorm=True, add_bias_linear=True), None, "model.add_bias_linear true: qwen3"),
])
def test_an_inexpressible_student_is_refused_naming_the_keys(model, model_type, message):
    with pytest.raises(ExportError, match=message):
        hf_config(model, model_type, vocab_size=512, max_position_embeddings=128, dtype="fp32", eos_token_id=1)


def test_the_default_student_maps_to_starcoder2_exactly():
    config = hf_config(ModelConfig(), None, vocab_size=500, max_position_embeddings=256, dtype="bf16",
                       eos_token_id=1).config
    assert config["model_type"] == "starcoder2" and config["hidden_act"] == "gelu" and config["use_bias"] is True
    assert (config["residual_dropout"], config["embedding_dropout"], config["sliding_window"]) == (0.0, 0.0, None)
    assert config["norm_epsilon"] == 1e-5 and config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == "bfloat16"
    hf = transformers.AutoConfig.for_model("starcoder2", **{k: v for k, v in config.items() if k != "model_type"})
    assert hf.hidden_act == "gelu" and hf.intermediate_size == 768 and hf.head_dim == 48


def test_the_command_refuses_before_writing(students, tmp_path, capsys):
    from megadistill import cli

    run = students["megatron-tp2"][0]
    assert cli.main(["export-hf", str(run), "--output", str(tmp_path / "llama"), "--model-type", "llama"]) == 2
    assert "model.normalization LayerNorm with activation gelu" in capsys.readouterr().err
    assert not (tmp_path / "llama").exists()
    held = tmp_path / "held"
    held.mkdir()
    (held / "notes.txt").write_text("mine")
    assert cli.main(["export-hf", str(run), "--output", str(held)]) == 2
    assert "already holds files (notes.txt)" in capsys.readouterr().err and (held / "notes.txt").read_text() == "mine"
    assert cli.main(["export-hf", str(run), "--output", str(students["megatron-tp2"][1])]) == 2
    assert "already holds an earlier export" in capsys.readouterr().err
    assert cli.main(["export-hf", str(run / "checkpoints" / "step_00000003"), "--output", str(tmp_path / "x"),
                     "--tokenizer", str(students["zero3"][1] / "tokenizer.json")]) == 2
    assert "is not the tokenizer" in capsys.readouterr().err
    assert cli.main(["export-hf", str(tmp_path / "nowhere"), "--output", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["held"]


def _fail_midway(run: Path, out: Path) -> str:
    from megadistill.hf import export as module

    def broken(path, data):
        if path.name == "config.json":
            raise OSError(28, "No space left on device")
        return real(path, data)

    real, module._write_json = module._write_json, broken
    try:
        module.export(run, out)
    except OSError as e:
        return str(e)
    return "exported"


def test_an_export_that_fails_midway_leaves_nothing(students, tmp_path):
    out = tmp_path / "out"
    assert "No space left" in run_distributed(_fail_midway, 1, students["zero3"][0], out)[0]
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temporary directory beside it


def test_the_sentencepiece_wrap_encodes_the_embedded_corpus_as_training_did(students, corpus):
    from megadistill.data.corpus import embedded_corpus_text
    from megadistill.data.tokenizer import load_tokenizer

    exported = students["megatron-tp2"][1]
    hf = transformers.AutoTokenizer.from_pretrained(exported)
    training = load_tokenizer(corpus.tokenizer)
    texts = [t for t in embedded_corpus_text().split("\n\n") if t]
    got = hf(texts)["input_ids"]  # special tokens as the tokenizer adds them by default: none
    assert got == [training.tokenize(t) for t in texts]
    assert hf.decode(got[0]) == texts[0] and hf.eos_token_id == training.eod == 1
    assert json.loads((exported / "megadistill_export.json").read_text())["tokenizer"]["ids_checked_on_texts"] > len(texts)


def test_a_normalising_sentencepiece_model_is_refused(tmp_path):
    import sentencepiece as spm

    from megadistill.data.corpus import embedded_corpus_text
    from megadistill.hf.tokenizer import wrap_sentencepiece

    spm.SentencePieceTrainer.train(sentence_iterator=iter(embedded_corpus_text()[:30_000].split("\n\n")),
                                   model_prefix=str(tmp_path / "nfkc"), vocab_size=400, model_type="bpe",
                                   byte_fallback=True, minloglevel=2)  # sentencepiece's defaults: NFKC, spaces folded
    with pytest.raises(ExportError, match="normalises text"):
        wrap_sentencepiece(tmp_path / "nfkc.model")


def test_the_demo_report_ends_with_the_command_exporting_its_best_student():
    from megadistill.demo import report

    records = {"baseline": {"role": "student", "group": "main", "val_losses": {"10": 3.1, "20": 2.9}},
               "salt": {"role": "student", "group": "main", "val_losses": {"10": 3.0, "20": 2.7}},
               "baseline_x2": {"role": "student", "group": "baseline-long", "val_losses": {"40": 2.5}},
               "large_teacher": {"role": "teacher", "group": "main", "val_losses": {"20": 1.5}}}
    lines = report.export_section(records, "runs/demo")
    assert lines[0] == "## The best student as a Hugging Face model"
    assert "megadistill export-hf runs/demo/salt --output runs/demo/hf/salt" in lines
