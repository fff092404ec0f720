"""Hugging Face teachers (``megadistill convert-hf``): tiny random Llama and Qwen2 models built and
saved locally with ``transformers`` (no download) convert into teacher checkpoints whose
megatron-core logits equal the Hugging Face model's (fp32, <= 1e-4) at TP=1 and TP=2; what cannot
be mapped is refused naming the file and key; a student distils from a converted teacher with the
teacher's own tokenizer, end to end through ``megadistill train``'s driver."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[dev]')")

from megadistill.config import (  # noqa: E402
    CheckpointConfig, DataConfig, KDConfig, ModelConfig, OptimizerConfig, RunConfig, TeacherConfig, TrainingConfig,
    config_from_dict, validate,
)
from megadistill.hf.architecture import model_config  # noqa: E402
from megadistill.hf.convert import convert  # noqa: E402
from megadistill.hf.errors import ConversionError  # noqa: E402
from megadistill.hf.read import read_checkpoint  # noqa: E402
from megadistill.schedules import AlphaSchedule  # noqa: E402
from megadistill.testing import run_distributed  # noqa: E402

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, rms_norm_eps=1e-6)


def make_tokenizer(directory: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE tokenizer trained on the embedded corpus, saved as Hugging Face saves one
    (tokenizer.json + tokenizer_config.json naming the eos token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megadistill.data.corpus import embedded_corpus_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([embedded_corpus_text()[:60_000]], trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(directory)
    return directory


def _randomise(model: torch.nn.Module) -> None:
    # Norm weights of 1 and zero biases (the init) would hide a mix-up of norms or biases.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))


def make_model(directory: Path, kind: str, **overrides) -> torch.nn.Module:
    """A tiny random ``kind`` (llama, qwen2) causal LM saved as safetensors in ``directory``."""
    if kind == "llama":  # untied, another RoPE base
        config = transformers.LlamaConfig(vocab_size=512, tie_word_embeddings=False, rope_theta=50000.0, **SHAPE)
        model = transformers.LlamaForCausalLM(config)
    else:  # tied, query/key/value biases
        config = transformers.Qwen2Config(vocab_size=512, tie_word_embeddings=True, **SHAPE)
        model = transformers.Qwen2ForCausalLM(config)
    for k, v in overrides.items():
        setattr(model.config, k, v)
    _randomise(model)
    model.eval()
    # Qwen2 in shards: the index file path is read too.
    model.save_pretrained(directory, max_shard_size="100KB" if kind == "qwen2" else "1GB")
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """The tokenizer, the two saved models and their logits on fixed tokens, and both converted."""
    root = tmp_path_factory.mktemp("hf")
    tokenizer = make_tokenizer(root / "tokenizer")
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    models, logits = {}, {}
    for kind in ("llama", "qwen2"):
        model = make_model(root / kind, kind)
        with torch.no_grad():
            logits[kind] = model(input_ids=tokens).logits.float()
        models[kind] = root / kind

    def convert_both():
        # Llama through the function, Qwen2 through the command line (its tokenizer found beside
        # the weights), in one forked rank; the command ends with a clear error for a bad input.
        from megadistill import cli

        done = {"llama": convert(models["llama"], root / "llama-teacher", tokenizer=tokenizer)}
        for f in tokenizer.iterdir():
            (models["qwen2"] / f.name).write_bytes(f.read_bytes())
        assert cli.main(["convert-hf", str(models["qwen2"]), "--output", str(root / "qwen2-teacher")]) == 0
        assert cli.main(["convert-hf", str(models["qwen2"]), "--output", str(root / "bad"), "--model-type", "llama"]) == 2
        out = root / "qwen2-teacher"
        done["qwen2"] = SimpleNamespace(snippet=out / "teacher.yaml", snippet_text=(out / "teacher.yaml").read_text(),
                                        checkpoint=out / "step_00000000")
        return done

    converted = run_distributed(convert_both, 1)[0]
    return {"root": root, "tokenizer": tokenizer, "tokens": tokens, "logits": logits, "converted": converted}


def _teacher_logits(snippet: str, tokens: torch.Tensor, rows: int = 512):
    """This rank's full-vocabulary logits ``[b, s, rows]`` of the converted teacher, loaded as a run
    loads it into a teacher of ``rows`` vocabulary rows."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megadistill.megatron.gpt import build_gpt
    from megadistill.megatron.teacher import freeze, load_teacher_checkpoint
    from megadistill.checkpoint_identity import resolve_teacher_checkpoint

    block = yaml.safe_load(snippet)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cfg = config_from_dict({**block, "parallel": {"tensor_model_parallel_size": tp},
                            "data": {**block["data"], "seq_length": tokens.shape[1]}})
    ckpt = resolve_teacher_checkpoint(cfg.teacher.checkpoint)
    model = freeze(load_teacher_checkpoint(build_gpt(cfg.teacher.model, cfg, rows), ckpt))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        local = model(tokens, positions, None)  # [b, s, v/tp]
    return gather_from_tensor_model_parallel_region(local)


@pytest.mark.parametrize("tp", [1, 2])
def test_converted_teachers_compute_the_hugging_face_logits(hf, tp):
    for kind in ("llama", "qwen2"):
        got = run_distributed(_teacher_logits, tp, hf["converted"][kind].snippet_text, hf["tokens"], tp=tp)
        for rank_logits in got:
            assert rank_logits.shape == hf["logits"][kind].shape
            err = (rank_logits - hf["logits"][kind]).abs().max().item()
            assert err <= 1e-4, (kind, tp, err)


def marker_sha(hf) -> str:
    from megadistill.data.tokenizer import load_tokenizer

    return load_tokenizer(hf["tokenizer"], "huggingface").sha256


def test_the_snippet_and_marker_describe_the_teacher(hf):
    from megadistill.checkpoint_dir import read_marker

    llama, qwen = hf["converted"]["llama"], hf["converted"]["qwen2"]
    block = yaml.safe_load(llama.snippet.read_text())
    m = block["teacher"]["model"]
    assert (m["num_query_groups"], m["activation"], m["normalization"], m["rotary_base"]) == (2, "swiglu", "RMSNorm", 50000)
    assert m["untie_embeddings_and_output_weights"] and not m["add_qkv_bias"] and not m["add_bias_linear"]
    qwen_block = yaml.safe_load(qwen.snippet.read_text())
    assert qwen_block["teacher"]["model"]["add_qkv_bias"] is True
    assert qwen_block["teacher"]["model"]["untie_embeddings_and_output_weights"] is False
    assert qwen_block["data"]["tokenizer_model"] == str((hf["root"] / "qwen2").resolve())  # found beside the weights
    assert read_marker(qwen.checkpoint)["tokenizer_sha256"] == marker_sha(hf)
    assert block["data"] == {"tokenizer_model": str(hf["tokenizer"].resolve()), "tokenizer_type": "huggingface"}
    marker = read_marker(llama.checkpoint)
    assert marker["tokenizer_sha256"] == marker_sha(hf)
    assert marker["config"]["model"] == m and marker["backend"] == "megatron"
    assert llama.vocab_rows == 512 and marker["vocab_size"] == 512  # the tokenizer's ids: padding is told by it
    comment = llama.snippet_text.split("\n")[1]
    assert "512 ids (the tokenizer), 512 rows" in comment and "at any tensor_model_parallel_size" in comment
    assert "--tensor-parallel-size" not in llama.snippet_text


def test_a_converted_teacher_loads_with_another_padding(hf):
    """A run whose padding gives 768 rows (TP=2 here) loads the 512-row teachers: the Hugging Face
    logits on every id, zero logits on the 256 padding ids (their rows are zero). The tokenizer's
    size comes from the checkpoint's marker, as in training."""
    for kind in ("llama", "qwen2"):
        for got in run_distributed(_teacher_logits, 2, hf["converted"][kind].snippet_text, hf["tokens"], 768, tp=2):
            assert got.shape[-1] == 768 and not got[..., 512:].any()
            assert (got[..., :512] - hf["logits"][kind]).abs().max().item() <= 1e-4, kind


def _model_and_state(source: Path) -> tuple:
    from megadistill.hf.convert import _model_of
    from megadistill.hf.weights import convert_state_dict

    ckpt = read_checkpoint(source)
    arch = model_config(ckpt.config)
    state = convert_state_dict(ckpt, arch, 512)
    model = _model_of(arch.model, "fp32", 512, state)
    own = model.state_dict()
    return {k: own[k].data_ptr() == t.data_ptr() for k, t in state.items()}


def test_the_written_model_holds_the_converted_tensors_not_copies(hf):
    """The model whose checkpoint convert-hf writes takes the converted tensors as its parameters
    (built on the meta device, then assigned): every parameter is the very tensor, so the
    conversion does not hold the model twice."""
    for kind in ("llama", "qwen2"):
        shared = run_distributed(_model_and_state, 1, hf["root"] / kind)[0]
        assert shared and all(shared.values()), kind


def _convert_in_dtypes(source: Path, out: Path, tokenizer: Path) -> dict:
    from megatron.core import dist_checkpointing

    dtypes = {}
    for name, dtype in (("kept", None), ("asked", "fp32")):
        ckpt = convert(source, out / name, tokenizer=tokenizer, dtype=dtype).checkpoint
        dtypes[name] = {str(t.dtype) for t in dist_checkpointing.load_tensors_metadata(str(ckpt)).values()}
    return dtypes


def test_a_bf16_teacher_stays_bf16_unless_asked(tmp_path, hf):
    """A Hugging Face model saved in bf16 converts into a bf16 checkpoint (the written tensors' dtype,
    as the checkpoint's metadata records it); --dtype fp32 writes fp32."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "llama-bf16"
    src.mkdir()
    config = json.loads((hf["root"] / "llama" / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    weights = load_file(hf["root"] / "llama" / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, src / "model.safetensors", metadata={"format": "pt"})
    dtypes = run_distributed(_convert_in_dtypes, 1, src, tmp_path, hf["tokenizer"])[0]
    assert dtypes == {"kept": {"torch.bfloat16"}, "asked": {"torch.float32"}}


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma"}, "model_type 'gemma' is not one the converter maps"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "RoPE scaling 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not silu"),
    ({"head_dim": 15}, "head_dim 15 is odd"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 2.0, "original_max_position_embeddings": 8192}},
     "rope_parameters.high_freq_factor is 2.0: megatron-core's Llama 3 scaling fixes it at 4"),
    ({"attention_bias": True}, "attention_bias True with mlp_bias False"),
])
def test_an_unmappable_config_is_refused_naming_the_key(tmp_path, hf, change, message):
    src = hf["root"] / "llama"
    config = {**json.loads((src / "config.json").read_text()), **change}
    with pytest.raises(ConversionError, match=message) as e:
        model_config(config, where=str(src / "config.json"))
    assert "config.json" in str(e.value)


def test_a_tie_mismatch_and_missing_tensors_are_refused(tmp_path, hf):
    from megadistill.hf.weights import convert_state_dict

    src = hf["root"] / "llama"
    ckpt = read_checkpoint(src)
    arch = model_config({**ckpt.config, "tie_word_embeddings": True})
    with pytest.raises(ConversionError, match="lm_head.weight that differs"):
        convert_state_dict(ckpt, arch, 512)
    qwen = read_checkpoint(hf["root"] / "qwen2")
    with pytest.raises(ConversionError, match="tie_word_embeddings is false but .* holds no lm_head.weight"):
        convert_state_dict(qwen, model_config({**qwen.config, "tie_word_embeddings": False}), 512)
    del ckpt.weight_map["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match="model.layers.1.mlp.up_proj.weight is missing"):
        convert_state_dict(ckpt, model_config(ckpt.config), 512)
    with pytest.raises(ConversionError, match="not a Hugging Face checkpoint directory"):
        read_checkpoint(tmp_path / "nowhere")


def test_a_used_sliding_window_caps_the_sequence_length(hf):
    config = {**json.loads((hf["root"] / "llama" / "config.json").read_text()), "model_type": "mistral", "sliding_window": 64}
    arch = model_config(config)
    assert arch.model.max_position_embeddings == 64 and "sliding_window 64" in arch.notes[0]
    qwen = {**json.loads((hf["root"] / "qwen2" / "config.json").read_text()), "sliding_window": 64}
    assert model_config(qwen).model.max_position_embeddings == 128  # use_sliding_window false: full attention


def test_a_student_distils_from_a_converted_teacher_with_its_tokenizer(tmp_path, hf):
    """Preprocess with the teacher's Hugging Face tokenizer, then a few KD steps from the converted
    Llama: the run checks the teacher's architecture and tokenizer against the checkpoint's record."""
    from megadistill import train
    from megadistill.data.corpus import embedded_corpus_text

    text = tmp_path / "a.txt"
    text.write_text(embedded_corpus_text()[:40_000])
    block = yaml.safe_load(hf["converted"]["llama"].snippet_text)
    run = {
        **block,
        "name": "hf-student", "output_dir": str(tmp_path / "student"),
        "model": {**block["model"], "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4},
        "data": {**block["data"], "inputs": [str(text)], "seq_length": 32, "micro_batch_size": 4, "global_batch_size": 4},
        "kd": {"alpha": {"kind": "constant", "alpha_max": 0.5}},
        "training": {"train_steps": 3, "eval_interval": 3, "eval_steps": 1, "log_interval": 1},
        "checkpoint": {"save_interval": 0},
    }
    cfg = config_from_dict(run, world_size=1)

    def go(cfg):
        return train.run(cfg, progress=False).steps

    assert run_distributed(go, 1, cfg) == [3]
    metrics = train.read_metrics(tmp_path / "student")
    assert sorted(metrics) == [1, 2, 3] and all(metrics[s]["kd loss"] > 0 for s in metrics)
    manifest = json.loads((tmp_path / "student" / "data" / "corpus.manifest.json").read_text())
    assert manifest["recipe"]["tokenizer_type"] == "huggingface"


def test_the_vocabulary_is_padded_with_zeros_or_cut_to_the_runs(hf):
    """Rows past the model's vocabulary are zero; rows the run's padded vocabulary leaves out (ids
    the tokenizer never produces) are dropped; the first rows are the Hugging Face ones."""
    from megadistill.hf.weights import convert_state_dict

    ckpt = read_checkpoint(hf["root"] / "llama")
    emb, head = ckpt.tensor("model.embed_tokens.weight"), ckpt.tensor("lm_head.weight")
    for rows in (384, 640):
        state = convert_state_dict(ckpt, model_config(ckpt.config), rows)
        for name, hf_weight in (("embedding.word_embeddings.weight", emb), ("output_layer.weight", head)):
            assert state[name].shape == (rows, 64)
            keep = min(rows, 512)
            assert torch.equal(state[name][:keep], hf_weight[:keep])
            assert not state[name][keep:].any()


# RoPE is read as transformers reads it: asking it where it is installed, else by its precedence.
ROUTES = ["transformers", "without-transformers"]


def _route(monkeypatch, route):
    if route == "without-transformers":
        monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("route", ROUTES)
def test_rope_scaling_beside_rope_parameters_is_read_as_transformers_reads_it(hf, monkeypatch, route):
    """transformers 5 writes rope_parameters; a rope_scaling beside it wins when transformers reads
    the file (Llama 3 scaling here), so the pair is refused, not converted as the plain RoPE
    rope_parameters states; an unsupported rope_scaling type is named."""
    src = hf["root"] / "llama" / "config.json"
    saved = json.loads(src.read_text())
    assert saved["rope_parameters"] == {"rope_theta": 50000.0, "rope_type": "default"}
    _route(monkeypatch, route)
    assert model_config(saved, where=str(src)).model.rotary_base == 50000
    with pytest.raises(ConversionError, match=r"config.json: rope_scaling \{'rope_type': 'llama3', .*\} and "
                                              r"rope_parameters \{.*'default'\} differ \(transformers reads rope_scaling"):
        model_config({**saved, "rope_scaling": LLAMA3}, where=str(src))
    agreed = {**LLAMA3, "rope_theta": 50000.0}  # the same Llama 3 settings in both: read as Llama 3
    assert model_config({**saved, "rope_scaling": agreed, "rope_parameters": agreed}).model.rope_scaling_factor == 8.0
    with pytest.raises(ConversionError, match=r"config.json: rope_scaling.type is 'linear'"):
        model_config({**saved, "rope_scaling": {"type": "linear", "factor": 2.0}}, where=str(src))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("change, message", [
    ({"rope_theta": 20000.0}, r"config.json: rope_theta 20000.0 and rope_parameters.rope_theta 50000.0 contradict"),
    ({"rope_scaling": {"rope_type": "default"}},  # transformers would read the default base 10000, not 50000
     r"config.json: rope_scaling \{'rope_type': 'default'\} and rope_parameters \{.*\} differ"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 50000.0, "type": "yarn"}},
     r"config.json: rope_parameters.type is 'yarn'"),
])
def test_contradicting_rope_keys_are_refused_naming_both(hf, monkeypatch, route, change, message):
    src = hf["root"] / "llama" / "config.json"
    _route(monkeypatch, route)
    with pytest.raises(ConversionError, match=message):
        model_config({**json.loads(src.read_text()), **change}, where=str(src))


def test_convert_hf_refuses_inexpressible_llama3_scaling_in_one_line(tmp_path, hf, capsys):
    """Llama 3 scaling megatron-core cannot express (another original context), through the
    command: exit 2, one line naming the file, the key and its value, nothing written."""
    from megadistill import cli

    src = tmp_path / "llama3"
    src.mkdir()
    config = json.loads((hf["root"] / "llama" / "config.json").read_text())
    del config["rope_parameters"]
    (src / "config.json").write_text(json.dumps({**config, "rope_theta": 50000.0, "max_position_embeddings": 131072,
                                                 "rope_scaling": {**LLAMA3, "original_max_position_embeddings": 4096}}))
    (src / "model.safetensors").symlink_to(hf["root"] / "llama" / "model.safetensors")
    rc = cli.main(["convert-hf", str(src), "--output", str(tmp_path / "out"), "--tokenizer", str(hf["tokenizer"])])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err == (f"megadistill: error: {src / 'config.json'}: rope_scaling.original_max_position_embeddings is 4096: "
                   "megatron-core's Llama 3 scaling fixes it at 8192\n"), err
    assert not (tmp_path / "out").exists()


def _files(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier_conversion(tmp_path, hf):
    """A copy of the converted Llama teacher, as an earlier conversion's --output."""
    import shutil

    out = tmp_path / "teacher"
    shutil.copytree(hf["root"] / "llama-teacher", out)
    return out


def test_convert_hf_refuses_an_output_that_holds_anything(tmp_path, hf, earlier_conversion, capsys):
    """Another model, the same model or stray files in --output: refused in one line naming the
    directory, before any work, and the earlier conversion is left byte for byte."""
    from megadistill import cli

    before = _files(earlier_conversion)
    for model in ("qwen2", "llama"):
        assert cli.main(["convert-hf", str(hf["root"] / model), "--output", str(earlier_conversion),
                         "--tokenizer", str(hf["tokenizer"])]) == 2
        err = capsys.readouterr().err
        assert err == (f"megadistill: error: --output {earlier_conversion} already holds an earlier conversion "
                       f"(step_00000000, teacher.yaml): give a new --output, or pass --overwrite to move them aside "
                       f"into {earlier_conversion}/superseded-<UTC time>/\n")
    assert _files(earlier_conversion) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli.main(["convert-hf", str(hf["root"] / "llama"), "--output", str(other)]) == 2
    assert f"--output {other} already holds files (notes.txt)" in capsys.readouterr().err
    assert _files(other) == {"notes.txt": b"mine"}


def test_overwrite_moves_the_earlier_conversion_aside(hf, earlier_conversion):
    """--overwrite: the earlier conversion goes, whole and unchanged, into superseded-<UTC time>/
    and the new model's conversion takes its place."""
    from megadistill.checkpoint_dir import read_marker

    before = _files(earlier_conversion)

    def overwrite(out):
        import contextlib
        import io

        from megadistill import cli

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            rc = cli.main(["convert-hf", str(hf["root"] / "qwen2"), "--output", str(out), "--overwrite"])
        return rc, printed.getvalue()

    rc, printed = run_distributed(overwrite, 1, earlier_conversion)[0]
    assert rc == 0
    aside = [p for p in earlier_conversion.iterdir() if p.name.startswith("superseded-")]
    assert len(aside) == 1 and f"aside to {aside[0]}" in printed
    assert _files(aside[0]) == before
    assert sorted(p.name for p in earlier_conversion.iterdir()) == sorted([aside[0].name, "step_00000000", "teacher.yaml"])
    assert read_marker(earlier_conversion / "step_00000000")["converted_from"]["model_type"] == "qwen2"
    assert "(qwen2)" in (earlier_conversion / "teacher.yaml").read_text()


def test_convert_hf_names_a_bad_path_in_one_line(tmp_path, hf, capsys):
    """Before any work: --output below a file or a file itself, an input directory that is missing
    or a file."""
    from megadistill import cli

    file = tmp_path / "file"
    file.write_text("x")
    llama = str(hf["root"] / "llama")
    for args, message in [
        ([llama, "--output", str(file / "out")], f"--output {file / 'out'}: {file} is a file"),
        ([llama, "--output", str(file / "a" / "b")], f"--output {file / 'a' / 'b'}: {file} is a file"),
        ([llama, "--output", str(file)], f"--output {file} is a file: give a directory"),
        ([str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")],
         f"{tmp_path / 'nowhere'} does not exist: not a Hugging Face checkpoint directory"),
        ([str(file), "--output", str(tmp_path / "out")], f"{file} is a file: not a Hugging Face checkpoint directory"),
    ]:
        assert cli.main(["convert-hf", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"megadistill: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and file.read_text() == "x"


def test_a_failed_write_is_one_line_naming_the_output(tmp_path, hf):
    """A file system error while the checkpoint is written (a full disk here) is one line naming
    --output, not a traceback; the lock is released and the half-written checkpoint removed, so the
    same command succeeds once the disk has room."""

    def full_disk(out):
        import contextlib
        import io

        from megatron.core import dist_checkpointing

        from megadistill import cli

        def save(*args, **kwargs):
            raise OSError(28, "No space left on device")

        real, dist_checkpointing.save = dist_checkpointing.save, save  # this forked rank's copy only
        args = ["convert-hf", str(hf["root"] / "llama"), "--output", str(out), "--tokenizer", str(hf["tokenizer"])]
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cli.main(args)
        left = sorted(p.name for p in out.iterdir())
        dist_checkpointing.save = real  # the disk has room again: the same command, no --overwrite
        return rc, err.getvalue(), left, cli.main(args)

    out = tmp_path / "out"
    rc, err, left, retried = run_distributed(full_disk, 1, out)[0]
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"megadistill: error: --output {out}: ") and "No space left on device" in err, err
    assert left == []  # no lock, no half-written step_00000000.tmp
    assert retried == 0 and (out / "step_00000000" / "COMPLETE").is_file()
